//! Kernel capture: where conntrack's NAT decisions enter the agent.
//!
//! Two sources feed the same `FlowEvent` channel:
//! - [`ebpf`]: kernel programs reading `nf_conn` from packets as they leave an interface
//!   (`tp_btf/net_dev_start_xmit`), plus optional hooks where the kernel allows them;
//! - [`netlink`]: conntrack NEW/DESTROY events over `NETLINK_NETFILTER`, which needs no eBPF.
//!
//! `auto` tries eBPF first and falls back to netlink, saying which one it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Which capture source the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceChoice {
    Ebpf,
    Netlink,
    Auto,
}

/// Counters and hook states of the running capture, shared with metrics and readiness.
#[derive(Debug, Default)]
pub struct CaptureHealth {
    /// Events delivered to the pipeline.
    pub events: AtomicU64,
    /// Events the kernel could not deliver (full ring buffer, netlink ENOBUFS).
    pub lost: AtomicU64,
    /// Records that could not be decoded.
    pub decode_errors: AtomicU64,
    hooks: Mutex<Vec<HookStatus>>,
}

/// Whether one kernel hook is attached, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookStatus {
    /// For example `tp_btf/net_dev_start_xmit` or `fentry/nf_ct_delete`.
    pub name: String,
    pub attached: bool,
    /// Why it is not attached, or what stands in for it.
    pub detail: String,
}

impl CaptureHealth {
    pub fn record_hook(&self, status: HookStatus) {
        self.hooks.lock().expect("hook list poisoned").push(status);
    }

    pub fn hooks(&self) -> Vec<HookStatus> {
        self.hooks.lock().expect("hook list poisoned").clone()
    }

    pub fn count_event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_lost(&self, n: u64) {
        self.lost.fetch_add(n, Ordering::Relaxed);
    }
}
