//! Loads aksnet's kernel programs, attaches them, and turns their ring-buffer records into
//! [`FlowEvent`]s.
//!
//! `tp_btf/net_dev_start_xmit` is required. The `nf_nat_setup_info` and `nf_ct_delete` hooks are
//! optional: each is tried as fentry/fexit first, kprobe second, and its absence is logged once
//! and recorded in [`CaptureHealth`].

use super::btf::{BtfError, BtfSource};
use super::{CaptureHealth, HookStatus};
use crate::events::{decode_conn_event, BootClock, FlowEvent};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The kernel programs, built by build.rs from `aksnet-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aksnet-ebpf.o"));

const XMIT_HOOK: &str = "tp_btf/net_dev_start_xmit";
/// How often the kernel's lost-event counter is read.
const LOST_POLL: Duration = Duration::from_secs(1);
/// How often the ring buffer is read without a wake-up: the kernel wakes the agent only once a
/// quarter of the buffer is queued, so this bounds the delay of an event on a quiet node.
const READ_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the kernel refused to create BPF map {map} ({source}): run the agent as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")]
    NotPermitted {
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no usable kernel BTF: {0}; use --source netlink on this kernel")]
    NoBtf(String),
    /// Says itself what to do (load the module).
    #[error(transparent)]
    ConntrackNotLoaded(BtfError),
    #[error("cannot resolve kernel struct offsets: {0}; use --source netlink on this kernel")]
    Offsets(#[source] BtfError),
    #[error("cannot load the eBPF object: {0}; use --source netlink, which needs no eBPF")]
    Object(String),
    #[error("the kernel refused {hook}: {errno}; verifier says: {verifier}. This kernel cannot run the eBPF capture (tp_btf needs 5.5+ with BTF); use --source netlink")]
    Refused {
        hook: &'static str,
        errno: std::io::Error,
        verifier: String,
    },
    #[error("cannot attach {hook}: {detail}; use --source netlink")]
    Attach { hook: &'static str, detail: String },
    #[error("cannot watch the EVENTS ring buffer: {0}; use --source netlink, which needs no eBPF")]
    RingBuf(#[source] std::io::Error),
}

/// The running eBPF capture; the programs stay attached while this value lives.
pub struct EbpfCapture {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for EbpfCapture {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl EbpfCapture {
    /// Loads and attaches the programs, reporting the connections of network namespace
    /// `netns_inode` (all namespaces when `None`) on `tx`. Must run inside a tokio runtime.
    pub async fn start(
        netns_inode: Option<u32>,
        tx: mpsc::Sender<FlowEvent>,
        health: Arc<CaptureHealth>,
    ) -> Result<EbpfCapture, EbpfError> {
        let source = BtfSource::running_kernel();
        let offsets = source.kernel_offsets().map_err(|err| match err {
            BtfError::Read { .. } => EbpfError::NoBtf(err.to_string()),
            BtfError::ConntrackNotLoaded { .. } => EbpfError::ConntrackNotLoaded(err),
            other => EbpfError::Offsets(other),
        })?;
        let btf = Btf::from_sys_fs().map_err(|err| EbpfError::NoBtf(chain(&err)))?;
        let netns_filter = netns_inode.unwrap_or(0);
        let sizes = MapSizes::for_this_node();
        log::debug!("eBPF maps: {sizes:?}");
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", &offsets, true)
            .override_global("NETNS_FILTER", &netns_filter, true)
            .override_global("CONN_ID_KEY", &conn_id_key(), true)
            .override_global("WAKEUP_BYTES", &sizes.wakeup_bytes, true)
            .map_max_entries("CONNS", sizes.conns)
            .map_max_entries("EVENTS", sizes.ring_bytes)
            .load(OBJECT)
            .map_err(object_error)?;

        attach_xmit(&mut ebpf, &btf)?;
        health.record_hook(HookStatus {
            name: XMIT_HOOK.to_owned(),
            attached: true,
            detail: String::new(),
        });
        log::info!(
            "eBPF capture attached to {XMIT_HOOK} (netns filter: {})",
            netns_inode.map_or("all".to_owned(), |n| n.to_string())
        );
        for hook in OPTIONAL_HOOKS {
            health.record_hook(hook.attach(&mut ebpf, &btf));
        }

        let events = take_map(&mut ebpf, "EVENTS")?;
        let events = RingBuf::try_from(events).map_err(|err| EbpfError::Object(chain(&err)))?;
        // SAFETY: the RingBuf owns its map fd until it is dropped with the AsyncFd, and
        // as_raw_fd always returns that fd.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|err| EbpfError::RingBuf(err.into()))?;
        let losses = Losses {
            lost: per_cpu_counter(&mut ebpf, "LOST")?,
            recovered: per_cpu_counter(&mut ebpf, "RECOVERED")?,
        };

        let tasks = vec![
            tokio::spawn(read_events(events, tx, Arc::clone(&health))),
            tokio::spawn(poll_losses(losses, health)),
        ];
        Ok(EbpfCapture { _ebpf: ebpf, tasks })
    }
}

/// Map sizes chosen at load for this node instead of compiled-in constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapSizes {
    /// `CONNS` entries: one per live connection of the observed namespace.
    conns: u32,
    /// `EVENTS` ring buffer bytes (a power of two, at least a page).
    ring_bytes: u32,
    /// Queued bytes from which the kernel wakes the reader.
    wakeup_bytes: u64,
}

/// New connections a second (one event each, two where `nf_nat_setup_info` is hooked) the ring
/// buffer absorbs while the agent is not reading: a busy node's peak, several times what the
/// lab's fastest storm reaches on this kind of machine.
const EXPECTED_EVENTS_PER_SEC: u64 = 40_000;
/// How long the agent may go without reading: its read timer (10 ms), plus what the DaemonSet's
/// CPU limit keeps it off the CPU (500m: up to 50 ms of every 100 ms CFS period), plus
/// scheduling delay on a loaded node.
const UNREAD_FOR: Duration = Duration::from_millis(150);
/// Bounds on `CONNS`: at least a small node's worth; at most what the pod's memory limit affords
/// (about 100 bytes an entry, charged to its memory cgroup).
const CONNS_BOUNDS: (u32, u32) = (16_384, 262_144);

impl MapSizes {
    fn for_this_node() -> MapSizes {
        MapSizes::new(conntrack_max())
    }

    /// `conntrack_max` is the kernel's `nf_conntrack_max`, when readable.
    fn new(conntrack_max: Option<u32>) -> MapSizes {
        let conns = conntrack_max
            .unwrap_or(CONNS_BOUNDS.0)
            .clamp(CONNS_BOUNDS.0, CONNS_BOUNDS.1);
        // Each record carries an 8-byte header in the ring.
        let record = std::mem::size_of::<aksnet_common::ConnEvent>() as u64 + 8;
        let needed = EXPECTED_EVENTS_PER_SEC * record * UNREAD_FOR.as_millis() as u64 / 1000;
        let ring_bytes = needed.next_power_of_two().clamp(1 << 18, 1 << 24);
        MapSizes {
            conns,
            ring_bytes: ring_bytes as u32,
            wakeup_bytes: ring_bytes / 4,
        }
    }
}

/// `net.netfilter.nf_conntrack_max`: how many connections conntrack holds at most.
fn conntrack_max() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A random key that hides kernel addresses in the events' connection ids.
fn conn_id_key() -> u64 {
    let mut key = [0u8; 8];
    // SAFETY: `key` is a valid buffer of the length passed.
    let filled = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
    if filled == key.len() as isize {
        u64::from_ne_bytes(key)
    } else {
        // getrandom cannot fail for 8 bytes once the pool is ready; the clock still hides
        // addresses from a casual reader if it ever does.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
    }
}

fn attach_xmit(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), EbpfError> {
    let prog: &mut BtfTracePoint = program(ebpf, "net_dev_start_xmit")?;
    prog.load("net_dev_start_xmit", btf)
        .map_err(|err| match err {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => EbpfError::Refused {
                hook: XMIT_HOOK,
                errno: io_error,
                verifier: log_tail(&verifier_log.to_string()),
            },
            other => EbpfError::Attach {
                hook: XMIT_HOOK,
                detail: chain(&other),
            },
        })?;
    prog.attach().map_err(|err| EbpfError::Attach {
        hook: XMIT_HOOK,
        detail: chain(&err),
    })?;
    Ok(())
}

/// An optional kernel function hook: its programs in both flavours and what covers for it.
struct OptionalHook {
    function: &'static str,
    /// fentry (`exit == false`) or fexit program name.
    tracing_prog: &'static str,
    exit: bool,
    /// kprobe program, and the kretprobe program when the return value is needed.
    kprobe_prog: &'static str,
    kretprobe_prog: Option<&'static str>,
    /// What the agent relies on when neither flavour attaches.
    fallback: &'static str,
}

const OPTIONAL_HOOKS: [OptionalHook; 2] = [
    OptionalHook {
        function: "nf_nat_setup_info",
        tracing_prog: "nf_nat_setup_info_exit",
        exit: true,
        kprobe_prog: "nf_nat_setup_info_entry",
        kretprobe_prog: Some("nf_nat_setup_info_ret"),
        fallback: "NAT decisions are reported when the connection's first packet leaves an interface (tp_btf/net_dev_start_xmit)",
    },
    OptionalHook {
        function: "nf_ct_delete",
        tracing_prog: "nf_ct_delete_entry",
        exit: false,
        kprobe_prog: "nf_ct_delete_kprobe",
        kretprobe_prog: None,
        fallback: "connection ends come from netlink conntrack DESTROY events",
    },
];

impl OptionalHook {
    /// Tries fentry/fexit, then kprobe; logs one line either way.
    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> HookStatus {
        let tracing_name = format!(
            "{}/{}",
            if self.exit { "fexit" } else { "fentry" },
            self.function
        );
        let tracing_err = match self.attach_tracing(ebpf, btf) {
            Ok(()) => return self.attached(tracing_name),
            Err(err) => err,
        };
        let kprobe_name = format!("kprobe/{}", self.function);
        let kprobe_err = match self.attach_kprobes(ebpf) {
            Ok(()) => return self.attached(kprobe_name),
            Err(err) => err,
        };
        let detail = format!(
            "{tracing_name}: {tracing_err}; {kprobe_name}: {kprobe_err}; instead: {}",
            self.fallback
        );
        log::warn!("optional hook {} unavailable: {detail}", self.function);
        HookStatus {
            name: self.function.to_owned(),
            attached: false,
            detail,
        }
    }

    fn attached(&self, name: String) -> HookStatus {
        log::info!("optional hook attached: {name}");
        HookStatus {
            name,
            attached: true,
            detail: String::new(),
        }
    }

    fn attach_tracing(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
        if self.exit {
            let prog: &mut FExit = program(ebpf, self.tracing_prog).map_err(|e| e.to_string())?;
            prog.load(self.function, btf).map_err(|e| short(&e))?;
            prog.attach().map_err(|e| short(&e))?;
        } else {
            let prog: &mut FEntry = program(ebpf, self.tracing_prog).map_err(|e| e.to_string())?;
            prog.load(self.function, btf).map_err(|e| short(&e))?;
            prog.attach().map_err(|e| short(&e))?;
        }
        Ok(())
    }

    /// Loads every program first (so the verifier checks them all, even where the kernel has
    /// no kprobes), then attaches; on any failure, unloads them all: a kprobe without its
    /// kretprobe would only fill the call map.
    fn attach_kprobes(&self, ebpf: &mut Ebpf) -> Result<(), String> {
        let names: Vec<&str> = std::iter::once(self.kprobe_prog)
            .chain(self.kretprobe_prog)
            .collect();
        let mut result = Ok(());
        for name in &names {
            result = result.and_then(|()| {
                let prog: &mut KProbe = program(ebpf, name).map_err(|e| e.to_string())?;
                prog.load().map_err(|e| format!("{name}: {}", short(&e)))
            });
        }
        for name in &names {
            result = result.and_then(|()| {
                let prog: &mut KProbe = program(ebpf, name).map_err(|e| e.to_string())?;
                prog.attach(self.function, 0)
                    .map(drop)
                    .map_err(|e| short(&e))
            });
        }
        if result.is_err() {
            for name in &names {
                if let Ok(prog) = program::<KProbe>(ebpf, name) {
                    let _ = prog.unload();
                }
            }
        }
        result
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| {
        EbpfError::Object(format!(
            "program {name} is missing (aksnet-ebpf and the agent are out of step: rebuild)"
        ))
    })?;
    prog.try_into()
        .map_err(|err: ProgramError| EbpfError::Object(format!("program {name}: {err}")))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or_else(|| {
        EbpfError::Object(format!(
            "map {name} is missing (aksnet-ebpf and the agent are out of step: rebuild)"
        ))
    })
}

fn per_cpu_counter(ebpf: &mut Ebpf, name: &str) -> Result<PerCpuArray<MapData, u64>, EbpfError> {
    PerCpuArray::try_from(take_map(ebpf, name)?)
        .map_err(|err| EbpfError::Object(format!("map {name}: {}", chain(&err))))
}

/// EPERM on map creation means missing privileges; anything else is reported as is.
fn object_error(err: aya::EbpfError) -> EbpfError {
    if let aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error }) = &err {
        if io_error.raw_os_error() == Some(libc::EPERM) {
            return EbpfError::NotPermitted {
                map: name.clone(),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            };
        }
    }
    EbpfError::Object(chain(&err))
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A load error without its (long) verifier log, for the one-line optional-hook messages.
fn short(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError { io_error, .. } => format!("load refused: {io_error}"),
        other => chain(other),
    }
}

/// The end of a verifier log, where the reason is, on one line.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(no log)".to_owned();
    }
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Drains the ring buffer when the kernel signals that enough is queued, and every
/// [`READ_EVERY`] otherwise, decoding and forwarding the records in one batch.
async fn read_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
) {
    let clock = BootClock::now();
    let mut timer = tokio::time::interval(READ_EVERY);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        let woken = tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &clock, &health, &mut batch);
                    guard.clear_ready();
                    true
                }
                Err(err) => {
                    log::error!("eBPF capture stopped: polling the EVENTS ring buffer failed: {err}");
                    return;
                }
            },
            _ = timer.tick() => false,
        };
        if !woken {
            drain(ring.get_mut(), &clock, &health, &mut batch);
        }
        for event in batch.drain(..) {
            if tx.send(event).await.is_err() {
                // The pipeline is gone: nobody wants events any more.
                return;
            }
            health.count_event();
        }
    }
}

/// Decodes every queued record into `batch`.
fn drain(
    ring: &mut RingBuf<MapData>,
    clock: &BootClock,
    health: &CaptureHealth,
    batch: &mut Vec<FlowEvent>,
) {
    while let Some(record) = ring.next() {
        match decode_conn_event(&record, clock) {
            Ok(event) => batch.push(event),
            Err(err) => {
                let before = health.decode_errors.fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    log::warn!("undecodable eBPF event (counted in decode errors): {err}");
                }
            }
        }
    }
}

/// The kernel's per-CPU loss counters: connections whose report found the ring buffer full
/// (each counted once), and those of them a later packet did report.
struct Losses {
    lost: PerCpuArray<MapData, u64>,
    recovered: PerCpuArray<MapData, u64>,
}

impl Losses {
    fn read(&self) -> Result<(u64, u64), aya::maps::MapError> {
        let sum = |map: &PerCpuArray<MapData, u64>| {
            map.get(&0, 0).map(|per_cpu| per_cpu.iter().sum::<u64>())
        };
        Ok((sum(&self.lost)?, sum(&self.recovered)?))
    }
}

/// Adds the kernel's loss counts to `health`, warning once per burst of losses.
async fn poll_losses(losses: Losses, health: Arc<CaptureHealth>) {
    let (mut lost_seen, mut recovered_seen) = (0u64, 0u64);
    let mut in_burst = false;
    let mut interval = tokio::time::interval(LOST_POLL);
    loop {
        interval.tick().await;
        let (lost, recovered) = match losses.read() {
            Ok(counts) => counts,
            Err(err) => {
                log::error!("cannot read the eBPF LOST/RECOVERED counters: {err}");
                return;
            }
        };
        let delta = lost.saturating_sub(lost_seen);
        health.count_lost(delta);
        health.count_recovered(recovered.saturating_sub(recovered_seen));
        (lost_seen, recovered_seen) = (lost, recovered);
        if delta > 0 && !in_burst {
            log::warn!(
                "eBPF ring buffer full: {delta} connection(s) not reported in the last {LOST_POLL:?} (the agent falls behind the kernel); their next packet retries"
            );
        }
        in_burst = delta > 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_follow_conntrack_max_within_bounds() {
        assert_eq!(MapSizes::new(Some(131_072)).conns, 131_072);
        assert_eq!(MapSizes::new(Some(4_194_304)).conns, CONNS_BOUNDS.1);
        assert_eq!(MapSizes::new(Some(100)).conns, CONNS_BOUNDS.0);
        assert_eq!(MapSizes::new(None).conns, CONNS_BOUNDS.0);
    }

    #[test]
    fn the_ring_holds_the_expected_events_and_wakes_at_a_quarter() {
        let sizes = MapSizes::new(None);
        assert!(sizes.ring_bytes.is_power_of_two());
        let record = std::mem::size_of::<aksnet_common::ConnEvent>() as u64 + 8;
        let held = u64::from(sizes.ring_bytes) / record;
        assert!(
            held * 1000 >= EXPECTED_EVENTS_PER_SEC * UNREAD_FOR.as_millis() as u64,
            "{sizes:?} holds {held} records"
        );
        assert_eq!(sizes.wakeup_bytes, u64::from(sizes.ring_bytes) / 4);
    }
}
