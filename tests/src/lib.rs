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
