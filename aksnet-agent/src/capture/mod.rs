//! Kernel capture: where conntrack's NAT decisions enter the agent.
//!
//! Two sources feed the same [`FlowEvent`] channel:
//! - [`ebpf`]: kernel programs reading `nf_conn` from packets as they leave an interface
//!   (`tp_btf/net_dev_start_xmit`), plus optional hooks where the kernel allows them;
//! - [`netlink`]: conntrack NEW/DESTROY events over `NETLINK_NETFILTER`, which needs no eBPF.
//!
//! `auto` tries eBPF first and falls back to netlink, saying which one it runs.

pub mod btf;
pub mod ebpf;
pub mod netlink;
pub mod netns;
pub mod privileges;

use crate::events::{FlowEvent, SourceKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

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
    /// Events the kernel could not deliver (full ring buffer, netlink ENOBUFS). The eBPF source
    /// counts each connection once, however many of its packets failed to report it.
    pub lost: AtomicU64,
    /// Connections counted in `lost` that were reported later after all (eBPF: a later packet
    /// retried): `lost - recovered` connections never reached the agent.
    pub recovered: AtomicU64,
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

    pub fn count_recovered(&self, n: u64) {
        self.recovered.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why no capture could start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("eBPF capture: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("netlink capture: {0}")]
    Netlink(#[from] netlink::NetlinkError),
    #[error("no capture source works here. eBPF: {ebpf}. netlink: {netlink}")]
    Neither {
        ebpf: ebpf::EbpfError,
        netlink: netlink::NetlinkError,
    },
}

/// The running capture; dropping it detaches the programs and closes the sockets.
pub struct Capture {
    pub source: SourceKind,
    _ebpf: Option<ebpf::EbpfCapture>,
    _netlink: Option<netlink::NetlinkCapture>,
}

/// Hook whose absence the eBPF source makes up for with netlink DESTROY events.
const CT_DELETE_HOOK: &str = "nf_ct_delete";

/// Starts the source the operator chose, falling back from eBPF to netlink for `auto`.
pub async fn start(
    choice: SourceChoice,
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
) -> Result<Capture, CaptureError> {
    let netlink_only = |tx| -> Result<Capture, netlink::NetlinkError> {
        Ok(Capture {
            source: SourceKind::Netlink,
            _ebpf: None,
            _netlink: Some(netlink::NetlinkCapture::start(
                netns,
                tx,
                Arc::clone(&health),
            )?),
        })
    };
    let ebpf = match choice {
        SourceChoice::Netlink => return Ok(netlink_only(tx)?),
        SourceChoice::Ebpf | SourceChoice::Auto => {
            ebpf::EbpfCapture::start(Some(netns.inode()), tx.clone(), Arc::clone(&health)).await
        }
    };
    let ebpf = match (ebpf, choice) {
        (Ok(ebpf), _) => ebpf,
        (Err(err), SourceChoice::Auto) => {
            log::warn!("eBPF capture unavailable ({err}); using netlink conntrack events instead");
            return netlink_only(tx)
                .map_err(|netlink| CaptureError::Neither { ebpf: err, netlink });
        }
        (Err(err), _) => return Err(err.into()),
    };
    let ends_seen = health
        .hooks()
        .iter()
        .any(|h| h.attached && h.name.contains(CT_DELETE_HOOK));
    let ends = if ends_seen {
        None
    } else {
        connection_ends(netns, tx, &health)
    };
    Ok(Capture {
        source: SourceKind::Ebpf,
        _ebpf: Some(ebpf),
        _netlink: ends,
    })
}

/// Without an `nf_ct_delete` hook the eBPF source never sees a connection end; netlink's
/// DESTROY events stand in (NEW comes from eBPF, with interfaces).
fn connection_ends(
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: &Arc<CaptureHealth>,
) -> Option<netlink::NetlinkCapture> {
    let ends_only = netlink::NetlinkOptions {
        new_events: false,
        ..Default::default()
    };
    match netlink::NetlinkCapture::start_with(netns, ends_only, tx, Arc::clone(health)) {
        Ok(capture) => Some(capture),
        Err(err) => {
            log::warn!("no source of connection ends ({err}): flows end only when the flow table evicts them");
            None
        }
    }
}
