//! `cargo xtask vm-test`: the agent on Debian's cloud kernels (5.10, 6.1, 6.12) booted under QEMU,
//! where nf_conntrack and nf_nat are modules and kprobes work, as on AKS nodes; this machine's own
//! kernel has neither. Each guest checks both capture sources against `conntrack -E` (see
//! `guest.sh`), and xtask judges its console: one verdict line per kernel.

mod initramfs;
pub mod kernels;
mod qemu;
mod verdict;

use crate::cmd::Cmd;
use anyhow::{bail, Result};
use kernels::{Kernel, MATRIX};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Capture sources each guest checks, in order. The first starts before nf_conntrack is loaded
/// and must attach its eBPF programs once it is, instead of settling for netlink.
const SOURCES: [&str; 3] = ["auto", "ebpf", "netlink"];

/// A guest boots in about 3 s under TCG and checks both sources in about a minute; a hung guest
/// is killed after this.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The agent's test that loads every kernel program; each guest runs it once its checks are done.
const PROGRAMS_TEST: &str = "programs_load";

/// Builds the agent's integration test `name` and returns its executable.
fn test_binary(workspace: &Path, name: &str) -> Result<PathBuf> {
    let out = Cmd::new("cargo")
        .args(["test", "-p", "aksnet-agent", "--test", name, "--no-run"])
        .args(["--message-format=json"])
        .current_dir(workspace)
        .output_string()?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["target"]["name"] == name)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow::anyhow!("cargo built no executable for the test {name}"))
}

/// `--kernel`: one kernel of the matrix, or all of them.
#[derive(Clone, Debug)]
pub struct KernelChoice(Vec<&'static Kernel>);

impl std::str::FromStr for KernelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(KernelChoice(MATRIX.iter().collect()));
        }
        MATRIX
            .iter()
            .find(|k| k.name == s)
            .map(|k| KernelChoice(vec![k]))
            .ok_or_else(|| {
                let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
                format!(
                    "no kernel {s} in the matrix: choose {} or all",
                    names.join(", ")
                )
            })
    }
}

/// Builds the agent, then boots and judges each chosen kernel; fails if any kernel does.
pub fn run(workspace: &Path, choice: &KernelChoice) -> Result<()> {
    Cmd::new("cargo")
        .args(["build", "-p", "aksnet-agent", "--bin", "aksnet-agent"])
        .current_dir(workspace)
        .run_visible()?;
    let agent = workspace.join("target/debug/aksnet-agent");
    let programs_test = test_binary(workspace, PROGRAMS_TEST)?;
    let cache = kernels::cache_dir();
    let mut failed = Vec::new();
    let mut lines = Vec::new();
    for kernel in &choice.0 {
        let started = Instant::now();
        let files = kernels::fetch(kernel, &cache)?;
        let work = cache.join("runs").join(kernel.suite);
        std::fs::create_dir_all(&work)?;
        let initramfs = initramfs::build(&files, &agent, &programs_test, &SOURCES, &work)?;
        println!("vm-test: booting {} under QEMU (TCG)", files.release);
        let console = work.join("console.log");
        let boot = qemu::boot(&files.vmlinuz, &initramfs, &console, BOOT_LIMIT)?;
        let verdict = verdict::judge(kernel.name, &boot.console, &SOURCES, boot.timed_out);
        let line = format!("{} [{:.0?}]", verdict.line, started.elapsed());
        println!("{line}");
        for problem in &verdict.problems {
            println!("  {problem}");
        }
        if !verdict.passed {
            println!("  the guest's console: {}", console.display());
            failed.push(kernel.name);
        }
        lines.push(line);
    }
    if choice.0.len() > 1 {
        println!("vm-test summary:");
        for line in &lines {
            println!("{line}");
        }
    }
    if !failed.is_empty() {
        bail!("vm-test failed on kernel(s) {}", failed.join(", "));
    }
    Ok(())
}
