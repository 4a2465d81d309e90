//! `cargo xtask <command>`: aksnet's chores.

use clap::{Parser, Subcommand};
use std::path::Path;
use xtask::lab::cli::{DemoArgs, LabCommand};
use xtask::lab::DEFAULT_STATE_DIR;

#[derive(Parser)]
#[command(name = "xtask", about = "aksnet's chores")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing on this machine: Debian packages, nightly rust-src, bpf-linker,
    /// Python packages. Idempotent.
    Setup,
    /// Set up, then run every check CI runs: formatting, clippy, all tests, manifest validation.
    Test,
    /// Set up, then show what aksnet sees on a lab AKS node while every documented path runs.
    Demo(DemoArgs),
    /// Measure the agent: datapath overhead, capture completeness, its own cost. Writes
    /// BENCHMARKS.md.
    Bench {
        /// Fewer runs and smaller counts: a smoke run, not figures to quote.
        #[arg(long)]
        quick: bool,
        /// Run this agent binary instead of building target/release/aksnet-agent.
        #[arg(long, value_name = "PATH")]
        agent: Option<std::path::PathBuf>,
        /// Also measure this agent binary (the one before a change) for the cost and datapath
        /// figures, in alternation, and show its figures beside.
        #[arg(long, value_name = "PATH")]
        baseline: Option<std::path::PathBuf>,
        /// Measure only these sections (comma-separated) and print them; BENCHMARKS.md is only
        /// written by a full run.
        #[arg(long, value_delimiter = ',', value_name = "SECTION")]
        only: Vec<xtask::bench::Section>,
    },
    /// Build the agent's runtime image (the Dockerfile's runtime stage) with podman, offline: the
    /// base from debootstrap, the agent built here. Reports its size.
    Image,
    /// Boot Debian's cloud kernels under QEMU and check the agent's capture on each against
    /// `conntrack -E`: one verdict line per kernel.
    VmTest {
        /// 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: xtask::vm::KernelChoice,
    },
    /// The node lab: a one-node AKS network in network namespaces.
    #[command(subcommand)]
    Lab(LabCommand),
}

fn main() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace");
    match Cli::parse().command {
        Command::Setup => xtask::setup::run()?,
        Command::Test => xtask::check::run(workspace)?,
        Command::Demo(demo) => {
            xtask::setup::run()?;
            xtask::lab::cli::execute(LabCommand::Demo {
                demo,
                state_dir: DEFAULT_STATE_DIR.into(),
            })?
        }
        Command::Image => xtask::image::run(workspace)?,
        Command::Lab(cmd) => xtask::lab::cli::execute(cmd)?,
        Command::VmTest { kernel } => xtask::vm::run(workspace, &kernel)?,
        Command::Bench {
            quick,
            agent,
            baseline,
            only,
        } => {
            xtask::bench::run(
                workspace,
                &xtask::bench::Plan::new(quick, &only),
                agent.as_deref(),
                baseline.as_deref(),
            )?;
        }
    }
    Ok(())
}
