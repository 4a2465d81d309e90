//! Kernel capture: where conntrack's NAT decisions enter the agent.
//!
//! Two sources feed the same [`FlowEvent`] channel:
//! - [`ebpf`]: kernel programs reading `nf_conn` from packets as they leave an interface
//!   (`tp_btf/net_dev_start_xmit`), plus optional hooks where the kernel allows them;
//! - [`netlink`]: conntrack NEW/DESTROY events over `NETLINK_NETFILTER`, which needs no eBPF.
//!
//! `auto` tries eBPF first and falls back to netlink, saying which one it runs. Where nf_conntrack
//! is a module not loaded yet, the eBPF capture attaches once it is; netlink DESTROY events stand in
//! for an `nf_ct_delete` hook that is absent or not yet seen firing (`proof.rs`).

pub mod btf;
pub mod ebpf;
mod kallsyms;
pub mod netlink;
pub mod netns;
pub mod privileges;
mod proof;

use crate::error_chain;
use crate::events::{FlowEvent, SourceKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    /// Connection ends the eBPF source reported (its `nf_ct_delete` hook), which help prove
    /// that hook.
    pub ebpf_ends: AtomicU64,
    /// Connections the eBPF source reported from its `nf_nat_setup_info` hook, which prove that
    /// hook where BPF run statistics are unavailable.
    pub nat_setup_events: AtomicU64,
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

    /// Replaces the status of the hook named `status.name`.
    pub fn update_hook(&self, status: HookStatus) {
        let mut hooks = self.hooks.lock().expect("hook list poisoned");
        match hooks.iter_mut().find(|h| h.name == status.name) {
            Some(hook) => *hook = status,
            None => hooks.push(status),
        }
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
    #[error(
        "no capture source works here. eBPF: {}. netlink: {}",
        error_chain(ebpf),
        error_chain(netlink)
    )]
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
    /// Proves the optional hooks, or waits for nf_conntrack and then runs the eBPF capture.
    task: Option<JoinHandle<()>>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How often the agent looks for nf_conntrack when it started before the module was loaded.
const CONNTRACK_POLL: Duration = Duration::from_secs(1);
/// Present once nf_conntrack is loaded, or always where it is built in (it has parameters).
/// Its BTF is no sign: Debian's 5.10 describes `struct nf_conn` in vmlinux, with no module BTF.
const CONNTRACK_MODULE: &str = "/sys/module/nf_conntrack";

fn conntrack_loaded() -> bool {
    Path::new(CONNTRACK_MODULE).exists()
}

/// Starts the source the operator chose, falling back from eBPF to netlink for `auto`. Where
/// nf_conntrack is a module not loaded yet, the eBPF capture attaches once it is.
pub async fn start(
    choice: SourceChoice,
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
) -> Result<Capture, CaptureError> {
    if choice == SourceChoice::Netlink {
        return Ok(netlink_only(netns, tx, &health)?);
    }
    match ebpf::EbpfCapture::start(Some(netns.inode()), tx.clone(), Arc::clone(&health)).await {
        Ok(ebpf) => Ok(with_ebpf(ebpf, netns, tx, &health)),
        Err(ebpf::EbpfError::ConntrackNotLoaded(err)) => {
            log::info!(
                "{err}. Until then there are no connections to see; the eBPF capture attaches once it is loaded"
            );
            let path = netns.path().to_owned();
            Ok(Capture {
                source: SourceKind::Ebpf,
                _ebpf: None,
                _netlink: None,
                task: Some(tokio::spawn(attach_when_loaded(choice, path, tx, health))),
            })
        }
        Err(err) if choice == SourceChoice::Auto => {
            log::warn!(
                "eBPF capture unavailable ({}); using netlink conntrack events instead",
                error_chain(&err)
            );
            netlink_only(netns, tx, &health)
                .map_err(|netlink| CaptureError::Neither { ebpf: err, netlink })
        }
        Err(err) => Err(err.into()),
    }
}

fn netlink_only(
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: &Arc<CaptureHealth>,
) -> Result<Capture, netlink::NetlinkError> {
    Ok(Capture {
        source: SourceKind::Netlink,
        _ebpf: None,
        _netlink: Some(netlink::NetlinkCapture::start(
            netns,
            tx,
            Arc::clone(health),
        )?),
        task: None,
    })
}

/// The eBPF capture with netlink DESTROY events where `nf_ct_delete` is absent (for good) or
/// not yet proven (until it is), and the proof of the optional hooks.
fn with_ebpf(
    mut ebpf: ebpf::EbpfCapture,
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: &Arc<CaptureHealth>,
) -> Capture {
    let hooks = std::mem::take(&mut ebpf.hooks);
    let delete_to_prove = hooks
        .iter()
        .any(|h| h.proof == ebpf::Proof::EveryEnd && !h.prog_ids.is_empty());
    let ends = connection_ends(netns, tx, health);
    if ends.is_none() && delete_to_prove {
        log::warn!("netlink conntrack events cannot start, so nothing can show whether the nf_ct_delete hook misses ends: it is proven by the ends it reports itself, and ends it misses go unreported");
    }
    let (stand_in, for_good) = match ends {
        Some(ends) if delete_to_prove => (Some(ends), None),
        Some(ends) => (None, Some(ends.capture)),
        None => (None, None),
    };
    let task = tokio::spawn(proof::prove(hooks, Arc::clone(health), stand_in));
    Capture {
        source: SourceKind::Ebpf,
        _ebpf: Some(ebpf),
        _netlink: for_good,
        task: Some(task),
    }
}

/// Waits for nf_conntrack, then runs the eBPF capture until aborted; `auto` settles for
/// netlink if the eBPF capture fails then.
async fn attach_when_loaded(
    choice: SourceChoice,
    netns_path: PathBuf,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
) {
    let mut interval = tokio::time::interval(CONNTRACK_POLL);
    while !conntrack_loaded() {
        interval.tick().await;
    }
    let netns = match netns::NetnsTarget::Path(netns_path).open() {
        Ok(netns) => netns,
        Err(err) => {
            log::error!("nf_conntrack is loaded, but the observed namespace is gone: {err}; no capture runs");
            return;
        }
    };
    let _capture = match ebpf::EbpfCapture::start(
        Some(netns.inode()),
        tx.clone(),
        Arc::clone(&health),
    )
    .await
    {
        Ok(ebpf) => {
            log::info!("nf_conntrack is loaded: the eBPF capture is attached");
            with_ebpf(ebpf, &netns, tx, &health)
        }
        Err(err) if choice == SourceChoice::Auto => {
            log::warn!("eBPF capture unavailable once nf_conntrack was loaded ({}); using netlink conntrack events instead", error_chain(&err));
            match netlink_only(&netns, tx, &health) {
                Ok(capture) => capture,
                Err(netlink) => {
                    log::error!(
                        "no capture source works here. eBPF: {}. netlink: {}",
                        error_chain(&err),
                        error_chain(&netlink)
                    );
                    return;
                }
            }
        }
        Err(err) => {
            log::error!(
                "eBPF capture failed once nf_conntrack was loaded: {}",
                error_chain(&err)
            );
            return;
        }
    };
    std::future::pending::<()>().await;
}

/// netlink's DESTROY events, sent to the pipeline directly and counted by the capture (the
/// count proves or disproves the `nf_ct_delete` hook). NEW comes from eBPF, with interfaces.
fn connection_ends(
    netns: &netns::Netns,
    tx: mpsc::Sender<FlowEvent>,
    health: &Arc<CaptureHealth>,
) -> Option<proof::EndsStandIn> {
    let ends_only = netlink::NetlinkOptions {
        new_events: false,
        ..Default::default()
    };
    match netlink::NetlinkCapture::start_with(netns, ends_only, tx, Arc::clone(health)) {
        Ok(capture) => Some(proof::EndsStandIn {
            ends: capture.delivered(),
            capture,
        }),
        Err(err) => {
            log::warn!("no source of connection ends ({err}): flows end only when the flow table evicts them");
            None
        }
    }
}
