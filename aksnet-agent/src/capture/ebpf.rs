//! Loads aksnet's kernel programs, attaches them, and turns their ring-buffer records into
//! [`FlowEvent`]s.
//!
//! `tp_btf/net_dev_start_xmit` is required. The `nf_nat_setup_info` and `nf_ct_delete` hooks are
//! optional, and the table `OPTIONAL_HOOKS` says for each how it is attached on which kernel
//! (fentry/fexit where the function is in vmlinux's BTF, kprobe otherwise, the `.part.N` copy of
//! a function the compiler split), what proves it fires (`capture::proof`) and what replaces it.
//! Its absence is logged once and recorded in [`CaptureHealth`].

use super::btf::{resolve_offsets, Btf as KernelBtf, BtfError, BtfSource};
use super::kallsyms;
use super::{CaptureHealth, HookStatus};
use crate::error_chain;
use crate::events::{decode_conn_event, BootClock, EventKind, FlowEvent, Hook};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use std::path::Path;
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
const KALLSYMS: &str = "/proc/kallsyms";
/// How often the kernel's lost-event counter is read.
const LOST_POLL: Duration = Duration::from_secs(1);
/// How often the ring buffer is read without a wake-up while events flow: the kernel wakes the
/// agent only once a quarter of the buffer is queued, so this bounds the delay of an event.
const READ_EVERY: Duration = Duration::from_millis(10);
/// The same once a read found nothing: an idle node's agent wakes up 10 times a second instead
/// of 100, and the first event after a quiet spell waits at most this long.
const IDLE_READ_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the kernel refused to create BPF map {map}: {refusal}")]
    NotPermitted {
        map: String,
        #[source]
        source: std::io::Error,
        /// What to change: a capability, or the seccomp profile.
        refusal: super::privileges::Refusal,
    },
    /// Says itself what failed and what to do.
    #[error(transparent)]
    NoBtf(BtfError),
    #[error(
        "cannot parse the kernel's BTF for the eBPF loader; use --source netlink on this kernel"
    )]
    LoaderBtf(#[source] aya::BtfError),
    /// Says itself what to do (load the module).
    #[error(transparent)]
    ConntrackNotLoaded(BtfError),
    #[error("cannot resolve kernel struct offsets; use --source netlink on this kernel")]
    Offsets(#[source] BtfError),
    #[error("cannot load the eBPF object; use --source netlink, which needs no eBPF")]
    Object(#[source] aya::EbpfError),
    #[error(
        "map {name} of the eBPF object is unusable; use --source netlink, which needs no eBPF"
    )]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "program {name} of the eBPF object is unusable; use --source netlink, which needs no eBPF"
    )]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("{what} is missing from the eBPF object (aksnet-ebpf and the agent are out of step: rebuild)")]
    OutOfStep { what: String },
    #[error("the kernel refused {hook}: {errno}; verifier says: {verifier}. This kernel cannot run the eBPF capture (tp_btf needs 5.5+ with BTF); use --source netlink")]
    Refused {
        hook: &'static str,
        errno: std::io::Error,
        verifier: String,
    },
    #[error("cannot attach {hook}; use --source netlink")]
    Attach {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot watch the EVENTS ring buffer; use --source netlink, which needs no eBPF")]
    RingBuf(#[source] std::io::Error),
}

/// The running eBPF capture; the programs stay attached while this value lives.
pub struct EbpfCapture {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    tasks: Vec<JoinHandle<()>>,
    /// The optional hooks as attached, for `capture::proof` to prove.
    pub hooks: Vec<AttachedHook>,
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
        let netns_filter = netns_inode.unwrap_or(0);
        let Loaded {
            mut ebpf,
            btf,
            kernel_btf,
        } = load_object(netns_filter)?;

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
        let hooks: Vec<AttachedHook> = OPTIONAL_HOOKS
            .iter()
            .map(|hook| hook.attach(&mut ebpf, &btf, &kernel_btf))
            .collect();
        for hook in &hooks {
            health.record_hook(hook.status.clone());
        }

        let events = take_map(&mut ebpf, "EVENTS")?;
        let events = RingBuf::try_from(events).map_err(|source| EbpfError::Map {
            name: "EVENTS",
            source,
        })?;
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
        Ok(EbpfCapture {
            _ebpf: ebpf,
            tasks,
            hooks,
        })
    }
}

/// The object loaded into the kernel (maps created, no program loaded yet), with the BTF it
/// was loaded against.
struct Loaded {
    ebpf: Ebpf,
    btf: Btf,
    kernel_btf: KernelBtf,
}

fn load_object(netns_filter: u32) -> Result<Loaded, EbpfError> {
    let source = BtfSource::running_kernel();
    if !super::conntrack_loaded() {
        return Err(EbpfError::ConntrackNotLoaded(
            BtfError::ConntrackNotLoaded {
                kernel: source.kernel,
                module: super::CONNTRACK_MODULE.into(),
            },
        ));
    }
    let btf_error = |err| match err {
        BtfError::Read { .. } => EbpfError::NoBtf(err),
        BtfError::ConntrackNotLoaded { .. } => EbpfError::ConntrackNotLoaded(err),
        other => EbpfError::Offsets(other),
    };
    let kernel_btf = source.load().map_err(btf_error)?;
    let offsets = resolve_offsets(&kernel_btf, &source.kernel).map_err(btf_error)?;
    let btf = Btf::from_sys_fs().map_err(EbpfError::LoaderBtf)?;
    let sizes = MapSizes::for_this_node();
    log::debug!("eBPF maps: {sizes:?}");
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("OFFSETS", &offsets, true)
        .override_global("NETNS_FILTER", &netns_filter, true)
        .override_global("CONN_ID_KEY", &conn_id_key(), true)
        .override_global("WAKEUP_BYTES", &sizes.wakeup_bytes, true)
        .map_max_entries("CONNS", sizes.conns)
        .map_max_entries("EVENTS", sizes.ring_bytes)
        .load(OBJECT)
        .map_err(object_error)?;
    Ok(Loaded {
        ebpf,
        btf,
        kernel_btf,
    })
}

/// One program of the object, loaded into the running kernel (not attached), or why not.
#[derive(Debug)]
pub struct ProgramLoad {
    pub program: String,
    /// `Ok(true)`: loaded; `Ok(false)`: not attempted, for the reason in `note`.
    pub outcome: Result<bool, String>,
    pub note: String,
}

/// Loads every program of the object without attaching any: the kernel matrix's proof that the
/// verifier of each kernel takes all of them, including those this kernel's agent would not
/// use (the plain `nf_ct_delete` kprobe where the function is split, the part's where it is
/// not). fentry/fexit on a function outside vmlinux's BTF is not attempted (aya 0.14).
pub fn load_every_program() -> Result<Vec<ProgramLoad>, EbpfError> {
    let Loaded {
        mut ebpf,
        btf,
        kernel_btf,
    } = load_object(0)?;
    let mut targets: Vec<(&str, &str, bool)> =
        vec![("net_dev_start_xmit", "net_dev_start_xmit", true)];
    for hook in &OPTIONAL_HOOKS {
        targets.push((hook.tracing_prog, hook.function, true));
        targets.push((hook.kprobe_prog, hook.function, false));
        targets.extend(hook.kretprobe_prog.map(|p| (p, hook.function, false)));
        if let OnSplit::ProbePart(prog) = hook.on_split {
            targets.push((prog, hook.function, false));
        }
    }
    let names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
    let mut loads = Vec::new();
    for name in names {
        let Some(&(_, function, by_btf)) = targets.iter().find(|t| t.0 == name) else {
            loads.push(ProgramLoad {
                outcome: Err("in no row of the hook tables of capture::ebpf".to_owned()),
                program: name,
                note: String::new(),
            });
            continue;
        };
        let needs_vmlinux = by_btf && name != "net_dev_start_xmit";
        let (outcome, note) = if needs_vmlinux && !kernel_btf.vmlinux_has_function(function) {
            (Ok(false), format!("{function} is not in vmlinux's BTF"))
        } else {
            let prog = ebpf.program_mut(&name).expect("listed above");
            let result = match prog {
                aya::programs::Program::BtfTracePoint(p) => p.load(function, &btf),
                aya::programs::Program::FEntry(p) => p.load(function, &btf),
                aya::programs::Program::FExit(p) => p.load(function, &btf),
                aya::programs::Program::KProbe(p) => p.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            };
            (
                result
                    .map(|()| true)
                    .map_err(|err| match verifier_refusal(err) {
                        Ok((errno, verifier)) => format!("{errno}; verifier says: {verifier}"),
                        Err(other) => error_chain(&other),
                    }),
                String::new(),
            )
        };
        loads.push(ProgramLoad {
            program: name,
            outcome,
            note,
        });
    }
    Ok(loads)
}

/// Map sizes chosen at load for this node instead of compiled-in constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapSizes {
    /// `CONNS` entries: one per live connection of the observed namespace, plus what the
    /// CPUs' free lists hold ([`LRU_LOCAL_FREE`]).
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
/// How long the agent may go without reading while events flow: its read timer (10 ms), what
/// the DaemonSet's CPU limit keeps it off the CPU (500m: up to 50 ms of every 100 ms CFS period),
/// and above all the scheduler's delay on a node whose CPUs are saturated, where the agent's
/// cgroup is one entity weighed against every busy task: in the lab's capped completeness storms
/// its threads stayed runnable but off the CPU for 0.4 s and more, unthrottled, and a 150 ms ring
/// (1 MiB) lost thousands of events in a third of the runs. 1 s makes an 8 MiB ring here. A burst
/// after a quiet spell wakes it once a quarter of the buffer is queued, or at the idle pace.
const UNREAD_FOR: Duration = Duration::from_secs(1);
/// Bounds on `CONNS`: at least a small node's worth; at most what the pod's memory limit affords
/// (about 100 bytes an entry, charged to its memory cgroup).
const CONNS_BOUNDS: (u32, u32) = (16_384, 262_144);
/// Free entries each possible CPU keeps aside in a common LRU map
/// (`LRU_LOCAL_LIST_TARGET_FREE`, kernel/bpf/bpf_lru_list.h): the map starts evicting while
/// that many per CPU are still unused, so `CONNS` gets them on top of the connections it holds.
const LRU_LOCAL_FREE: u32 = 128;

impl MapSizes {
    fn for_this_node() -> MapSizes {
        let cpus = aya::util::nr_cpus().unwrap_or_else(|(path, err)| {
            log::warn!("cannot read {path} ({err}); sizing CONNS for 1 CPU");
            1
        });
        MapSizes::new(conntrack_max(), u32::try_from(cpus).unwrap_or(u32::MAX))
    }

    /// `conntrack_max` is the kernel's `nf_conntrack_max`, when readable; `possible_cpus` the
    /// number of CPUs the kernel may ever run (`/sys/devices/system/cpu/possible`).
    fn new(conntrack_max: Option<u32>, possible_cpus: u32) -> MapSizes {
        let conns = conntrack_max
            .unwrap_or(CONNS_BOUNDS.0)
            .clamp(CONNS_BOUNDS.0, CONNS_BOUNDS.1)
            .saturating_add(possible_cpus.saturating_mul(LRU_LOCAL_FREE));
        // Each record carries an 8-byte header in the ring.
        let record = size_of::<aksnet_common::ConnEvent>() as u64 + 8;
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
        .map_err(|err| match verifier_refusal(err) {
            Ok((errno, verifier)) => EbpfError::Refused {
                hook: XMIT_HOOK,
                errno,
                verifier,
            },
            Err(source) => EbpfError::Attach {
                hook: XMIT_HOOK,
                source,
            },
        })?;
    prog.attach().map_err(|source| EbpfError::Attach {
        hook: XMIT_HOOK,
        source,
    })?;
    Ok(())
}

/// A load the verifier refused: its errno and the end of its log, where the reason is. Any
/// other error is given back.
fn verifier_refusal(err: ProgramError) -> Result<(std::io::Error, String), ProgramError> {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => Ok((io_error, log_tail(&verifier_log.to_string()))),
        other => Err(other),
    }
}

/// How the agent learns that an attached hook really fires; until it does, the hook does not
/// count as attached (a probe can attach to a function some callers bypass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Its program has run once, or (without BPF statistics) reported a connection: enough
    /// where another hook covers the same events (`net_dev_start_xmit` reports every
    /// connection anyway).
    Runs,
    /// It reported at least as many connection ends of the observed namespace as netlink did
    /// over the same window (and ran at least as often, where run counts are available);
    /// netlink DESTROY stands in until then. Without netlink, one end it reported.
    EveryEnd,
}

/// What to do where the symbol table shows a compiler-split copy of the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnSplit {
    /// Probe the `.part.N` copy, which every caller reaches, with this kprobe program; fall back
    /// for other copies.
    ProbePart(&'static str),
    /// Do not hook: a probe on either copy misses calls, and a return probe sees the part's
    /// return value, not the function's.
    FallBack,
}

/// One optional kernel function hook and its whole compatibility story: attach points in the
/// order tried, what the kernel must offer for each, what to do with a split function, what
/// proves it fires, and what replaces it.
struct OptionalHook {
    function: &'static str,
    /// fentry (`exit == false`) or fexit program. Needs 5.5+ and the function in vmlinux BTF:
    /// aya 0.14 resolves fentry/fexit targets only there, so a module function (nf_conntrack,
    /// nf_nat on AKS) is not attempted.
    tracing_prog: &'static str,
    exit: bool,
    /// kprobe program, and the kretprobe program when the return value is needed. Needs
    /// CONFIG_KPROBES (AKS kernels have it; this agent's build machine does not).
    kprobe_prog: &'static str,
    kretprobe_prog: Option<&'static str>,
    on_split: OnSplit,
    proof: Proof,
    /// What the agent relies on when the hook is absent or never proven.
    fallback: &'static str,
}

const OPTIONAL_HOOKS: [OptionalHook; 2] = [
    OptionalHook {
        function: "nf_nat_setup_info",
        tracing_prog: "nf_nat_setup_info_exit",
        exit: true,
        kprobe_prog: "nf_nat_setup_info_entry",
        kretprobe_prog: Some("nf_nat_setup_info_ret"),
        on_split: OnSplit::FallBack,
        proof: Proof::Runs,
        fallback: "NAT decisions are reported when the connection's first packet leaves an interface (tp_btf/net_dev_start_xmit)",
    },
    OptionalHook {
        function: "nf_ct_delete",
        tracing_prog: "nf_ct_delete_entry",
        exit: false,
        kprobe_prog: "nf_ct_delete_kprobe",
        kretprobe_prog: None,
        // Debian's 5.10 nf_conntrack.ko: nf_ct_delete() only sets IPS_DYING and calls
        // nf_ct_delete.part.0, which garbage collection, early drop and flush call directly
        // (net/netfilter/nf_conntrack_core.c, v5.10).
        on_split: OnSplit::ProbePart("nf_ct_delete_part_kprobe"),
        proof: Proof::EveryEnd,
        fallback: "connection ends come from netlink conntrack DESTROY events",
    },
];

/// An optional hook after the attempt: its status, and when attached, what has to prove it.
pub struct AttachedHook {
    pub status: HookStatus,
    pub proof: Proof,
    /// Kernel ids of its programs, whose run counts prove it fires.
    pub prog_ids: Vec<u32>,
    pub fallback: &'static str,
}

impl OptionalHook {
    /// Tries fentry/fexit, then kprobe, as the kernel allows; logs one line either way.
    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf, kernel_btf: &KernelBtf) -> AttachedHook {
        let symbols = kallsyms::lookup(Path::new(KALLSYMS), self.function)
            .inspect_err(|err| {
                log::warn!(
                    "cannot read {KALLSYMS} ({err}): {} is hooked without knowing whether the kernel has it, split it, or holds it in a module",
                    self.function
                );
            })
            .ok();
        let kprobe_target = self.kprobe_target(symbols.as_ref());
        let symbols = symbols.unwrap_or_default();
        let tracing_name = format!(
            "{}/{}",
            if self.exit { "fexit" } else { "fentry" },
            self.function
        );
        let tracing_err = if let Err(why) = &kprobe_target {
            why.clone()
        } else if !symbols.split.is_empty() {
            "not attempted: fentry attaches to the unsplit function, which not every caller reaches"
                .to_owned()
        } else if !kernel_btf.vmlinux_has_function(self.function) {
            format!(
                "not attempted: it is in module {} and aya 0.14 attaches fentry/fexit only to vmlinux functions",
                symbols.module.as_deref().unwrap_or("(unknown)")
            )
        } else {
            match self.attach_tracing(ebpf, btf) {
                Ok(()) => return self.attached(ebpf, tracing_name, &[self.tracing_prog]),
                Err(err) => err,
            }
        };
        let kprobe_err = match &kprobe_target {
            Ok((target, prog)) => {
                let progs: Vec<&str> = std::iter::once(*prog).chain(self.kretprobe_prog).collect();
                match attach_kprobes(ebpf, &progs, target) {
                    Ok(()) => return self.attached(ebpf, format!("kprobe/{target}"), &progs),
                    Err(err) => err,
                }
            }
            Err(why) => why.clone(),
        };
        let detail = format!(
            "{tracing_name}: {tracing_err}; kprobe/{}: {kprobe_err}; instead: {}",
            self.function, self.fallback
        );
        log::warn!("optional hook {} unavailable: {detail}", self.function);
        AttachedHook {
            status: HookStatus {
                name: self.function.to_owned(),
                attached: false,
                detail,
            },
            proof: self.proof,
            prog_ids: Vec::new(),
            fallback: self.fallback,
        }
    }

    /// The symbol a kprobe goes on and its program, from what `/proc/kallsyms` says of the
    /// function (`None`: unreadable, so the plain name is tried), or why no kprobe is attempted.
    fn kprobe_target(
        &self,
        symbols: Option<&kallsyms::FunctionSymbols>,
    ) -> Result<(String, &'static str), String> {
        let Some(symbols) = symbols else {
            return Ok((self.function.to_owned(), self.kprobe_prog));
        };
        match (self.on_split, symbols.part(), symbols.split.first()) {
            // Absent from the symbol table: not in this kernel, or its module is not loaded.
            _ if !symbols.whole && symbols.split.is_empty() => Err(format!(
                "not attempted: not in {KALLSYMS}, so not in this kernel (or its module is not loaded)"
            )),
            (_, _, None) => Ok((self.function.to_owned(), self.kprobe_prog)),
            (OnSplit::ProbePart(prog), Some(part), _) => Ok((part.to_owned(), prog)),
            (_, _, Some(copy)) => Err(format!(
                "the compiler split it ({copy} in {KALLSYMS}), so a probe on it would miss calls"
            )),
        }
    }

    /// Attached but not yet seen firing: recorded as not attached until proven.
    fn attached(&self, ebpf: &Ebpf, name: String, progs: &[&str]) -> AttachedHook {
        log::info!("optional hook attached: {name} (counts once seen firing)");
        let prog_ids = progs
            .iter()
            .filter_map(|p| ebpf.program(p)?.info().ok().map(|info| info.id()))
            .collect();
        AttachedHook {
            status: HookStatus {
                name,
                attached: false,
                detail: format!(
                    "attached, not yet seen firing; until then: {}",
                    self.fallback
                ),
            },
            proof: self.proof,
            prog_ids,
            fallback: self.fallback,
        }
    }

    fn attach_tracing(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
        if self.exit {
            load_and_attach(ebpf, self.tracing_prog, |p: &mut FExit| {
                p.load(self.function, btf)?;
                p.attach().map(drop)
            })
        } else {
            load_and_attach(ebpf, self.tracing_prog, |p: &mut FEntry| {
                p.load(self.function, btf)?;
                p.attach().map(drop)
            })
        }
    }
}

/// Runs `load_and_attach` on program `name` of type `T`; the error on one line.
fn load_and_attach<'a, T: 'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load_and_attach: impl FnOnce(&'a mut T) -> Result<(), ProgramError>,
) -> Result<(), String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = program(ebpf, name).map_err(|e| error_chain(&e))?;
    load_and_attach(prog).map_err(|e| short(&e))
}

/// Loads every program first (so the verifier checks them all, even where the kernel has no
/// kprobes), then attaches each to `target`; on any failure, unloads them all: a kprobe without
/// its kretprobe would only fill the call map.
fn attach_kprobes(ebpf: &mut Ebpf, names: &[&str], target: &str) -> Result<(), String> {
    let mut result = Ok(());
    for name in names {
        result = result.and_then(|()| {
            let prog: &mut KProbe = program(ebpf, name).map_err(|e| e.to_string())?;
            prog.load().map_err(|e| format!("{name}: {}", short(&e)))
        });
    }
    for name in names {
        result = result.and_then(|()| {
            let prog: &mut KProbe = program(ebpf, name).map_err(|e| e.to_string())?;
            prog.attach(target, 0).map(drop).map_err(|e| short(&e))
        });
    }
    if result.is_err() {
        for name in names {
            if let Ok(prog) = program::<KProbe>(ebpf, name) {
                let _ = prog.unload();
            }
        }
    }
    result
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| EbpfError::OutOfStep {
        what: format!("program {name}"),
    })?;
    prog.try_into().map_err(|source| EbpfError::Program {
        name: name.to_owned(),
        source,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or_else(|| EbpfError::OutOfStep {
        what: format!("map {name}"),
    })
}

fn per_cpu_counter(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, EbpfError> {
    PerCpuArray::try_from(take_map(ebpf, name)?).map_err(|source| EbpfError::Map { name, source })
}

/// EPERM on map creation means missing privileges, and so does ENOSYS under a seccomp filter (a
/// profile's default answer to calls it does not list); anything else is reported as is.
fn object_error(err: aya::EbpfError) -> EbpfError {
    use super::privileges::Refusal;
    if let aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error }) = &err {
        let refusal = Refusal::of_this_process();
        let errno = io_error.raw_os_error();
        if errno == Some(libc::EPERM)
            || (errno == Some(libc::ENOSYS) && refusal == Refusal::Seccomp)
        {
            return EbpfError::NotPermitted {
                map: name.clone(),
                source: std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EPERM)),
                refusal,
            };
        }
    }
    EbpfError::Object(err)
}

/// A load error without its (long) verifier log, for the one-line optional-hook messages.
fn short(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError { io_error, .. } => format!("load refused: {io_error}"),
        other => error_chain(other),
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
/// [`READ_EVERY`] otherwise ([`IDLE_READ_EVERY`] after a read that found nothing), decoding and
/// forwarding the records in one batch.
async fn read_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
) {
    let clock = BootClock::now();
    let mut batch = Vec::new();
    let mut pause = READ_EVERY;
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
            _ = tokio::time::sleep(pause) => false,
        };
        if !woken {
            drain(ring.get_mut(), &clock, &health, &mut batch);
        }
        pause = if batch.is_empty() {
            IDLE_READ_EVERY
        } else {
            READ_EVERY
        };
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
            Ok(event) => {
                // What proves the optional hooks fire (proof.rs).
                if event.kind == EventKind::Destroy {
                    health.ebpf_ends.fetch_add(1, Ordering::Relaxed);
                }
                if event.hook == Some(Hook::NatSetup) {
                    health.nat_setup_events.fetch_add(1, Ordering::Relaxed);
                }
                batch.push(event)
            }
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
    fn kprobes_go_where_kallsyms_says_the_function_is() {
        let [nat, delete] = &OPTIONAL_HOOKS;
        let symbols = |text: &str, function| kallsyms::parse(text, function);
        // Debian 5.10: nf_ct_delete split, the part is probed.
        let split = "0 t nf_ct_delete.part.0 [nf_conntrack]\n0 T nf_ct_delete [nf_conntrack]\n";
        assert_eq!(
            delete.kprobe_target(Some(&symbols(split, "nf_ct_delete"))),
            Ok(("nf_ct_delete.part.0".to_owned(), "nf_ct_delete_part_kprobe"))
        );
        let whole = "0 T nf_nat_setup_info [nf_nat]\n";
        assert_eq!(
            nat.kprobe_target(Some(&symbols(whole, "nf_nat_setup_info"))),
            Ok(("nf_nat_setup_info".to_owned(), "nf_nat_setup_info_entry"))
        );
        // nf_nat not loaded: no kprobe attempted.
        let absent = nat.kprobe_target(Some(&symbols(split, "nf_nat_setup_info")));
        assert!(absent.unwrap_err().contains("not in /proc/kallsyms"));
        // A split function without a part to probe falls back.
        let isra = "0 t nf_nat_setup_info.isra.0 [nf_nat]\n";
        assert!(nat
            .kprobe_target(Some(&symbols(isra, "nf_nat_setup_info")))
            .unwrap_err()
            .contains("split"));
        // kallsyms unreadable: the plain name is tried.
        assert_eq!(
            delete.kprobe_target(None),
            Ok(("nf_ct_delete".to_owned(), "nf_ct_delete_kprobe"))
        );
    }

    #[test]
    fn maps_follow_conntrack_max_within_bounds() {
        let free = 2 * LRU_LOCAL_FREE;
        assert_eq!(MapSizes::new(Some(131_072), 2).conns, 131_072 + free);
        assert_eq!(
            MapSizes::new(Some(4_194_304), 2).conns,
            CONNS_BOUNDS.1 + free
        );
        assert_eq!(MapSizes::new(Some(100), 2).conns, CONNS_BOUNDS.0 + free);
        assert_eq!(MapSizes::new(None, 2).conns, CONNS_BOUNDS.0 + free);
    }

    #[test]
    fn conns_keeps_room_for_every_cpus_free_list() {
        let one = MapSizes::new(Some(65_536), 1).conns;
        let many = MapSizes::new(Some(65_536), 96).conns;
        assert_eq!(many - one, 95 * LRU_LOCAL_FREE);
    }

    #[test]
    fn the_ring_holds_the_expected_events_and_wakes_at_a_quarter() {
        let sizes = MapSizes::new(None, 2);
        assert!(sizes.ring_bytes.is_power_of_two());
        let record = size_of::<aksnet_common::ConnEvent>() as u64 + 8;
        let held = u64::from(sizes.ring_bytes) / record;
        assert!(
            held * 1000 >= EXPECTED_EVENTS_PER_SEC * UNREAD_FOR.as_millis() as u64,
            "{sizes:?} holds {held} records"
        );
        assert_eq!(sizes.wakeup_bytes, u64::from(sizes.ring_bytes) / 4);
    }
}
