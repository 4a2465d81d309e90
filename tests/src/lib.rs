//! Shared helpers of the end-to-end tests.

pub mod agent;
pub mod conntrack;
pub mod exactness;
pub mod kubeapi;
pub mod prometheus;

/// The lab and the agent need root (network namespaces, iptables, eBPF); CI runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests build network namespaces and need root (CI runs them as root)"
    );
}

/// Runs `args` (program first) to completion and returns its stdout; panics with the program's
/// stderr when it cannot start or fails, which fails the test that needed it.
pub fn run(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("could not run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
