//! `cargo xtask test`: every check CI runs, in the order that fails fastest.

use crate::cmd::Cmd;
use crate::setup;
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(workspace: &Path) -> Result<()> {
    setup::run()?;
    let cargo = || Cmd::new("cargo").current_dir(workspace);
    step("formatting", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "formatting of the kernel programs",
        cargo()
            .current_dir(workspace.join("aksnet-ebpf"))
            .args(["+nightly", "fmt", "--check"]),
    )?;
    step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "clippy of the kernel programs",
        cargo().current_dir(workspace.join("aksnet-ebpf")).args([
            "+nightly",
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // A test that cannot run on this kernel is #[ignore]d with its reason, never skipped
    // silently, and runs where it can: `programs_load` inside each VM of the VM step below.
    step(
        "tests (unit, kernel capture, lab end to end; needs root)",
        cargo().args(["test", "--workspace", "--no-fail-fast"]),
    )?;
    step(
        "alert and recording rules (promtool check rules, promtool test rules)",
        Cmd::new("bash")
            .arg(workspace.join("deploy/components/monitoring/check.sh"))
            .current_dir(workspace),
    )?;
    vm_step(workspace)?;
    step(
        "Kubernetes manifests against the OpenAPI schemas",
        Cmd::new("bash")
            .arg(workspace.join("deploy/validate.sh"))
            .current_dir(workspace),
    )?;
    println!("xtask test: all checks passed");
    Ok(())
}

/// The agent on a kernel other than this machine's, as AKS runs it (nf_conntrack a module,
/// kprobes on): 6.1, the obtainable kernel closest to AKS's 5.15 and 6.6, under QEMU.
/// `cargo xtask vm-test --kernel all` runs the whole matrix.
fn vm_step(workspace: &Path) -> Result<()> {
    println!("xtask test: the agent on Debian's 6.1 kernel under QEMU (vm-test --kernel 6.1)");
    let kernel = "6.1".parse().map_err(anyhow::Error::msg)?;
    crate::vm::run(workspace, &kernel).context("the agent on Debian's 6.1 kernel failed")
}

fn step(what: &str, cmd: Cmd) -> Result<()> {
    println!("xtask test: {what}");
    cmd.run_visible().with_context(|| format!("{what} failed"))
}
