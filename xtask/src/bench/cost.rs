//! What the agent takes from the node per connection, in CPU time, which holds on a shared,
//! noisy machine where wall time does not: the kernel time of its BPF programs
//! (`kernel.bpf_stats_enabled`, each program's `run_time_ns`/`run_cnt` from the agent's own
//! file descriptors) and its process CPU time (`utime+stime` of `/proc/PID/stat`, with the
//! per-thread `schedstat` run time as a finer cross-check and a breakdown by thread). Each run
//! measures every agent binary under test in turn, so the "before" and "after" figures share the
//! machine's load. Each agent handles two storms: a DaemonSet's agent runs for days, so the
//! figure is the second (steady state); the first, with its maps and heap still growing, is
//! reported beside it.

use crate::bench::agent::{scrape, Agent, Mode};
use crate::bench::busy::{user_hz, BusyClock};
use crate::bench::completeness::free_local_port;
use crate::bench::datapath::READY_TIMEOUT;
use crate::bench::error::BenchError;
use crate::bench::floor::Floor;
use crate::bench::load;
use crate::bench::report::{median, Row};
use crate::bench::rig::{Launch, Rig, BULK_SINK, EVENTS_METRIC, FRONTEND};
use crate::file_error::FileError;
use crate::lab::layout::plan;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The known connection's datagrams go from the app pod to this sink on the internet server,
/// through the node's MASQUERADE.
const UDP_SINK: SocketAddrV4 = SocketAddrV4::new(plan::INET_SERVER, 5300);
const STORM_DEADLINE: Duration = Duration::from_secs(120);
/// The idle window before each measured run: the agent's own timers and the machine's other
/// traffic (which also runs the agent's xmit program) are measured there and subtracted.
const IDLE: Duration = Duration::from_secs(1);
/// The agent has handled everything once its progress (events counted, dump bytes written) stood
/// still this long, or it ran no more than when idle...
const SETTLE_QUIET: Duration = Duration::from_millis(300);
/// ...or after this long at most.
const SETTLE_MAX: Duration = Duration::from_secs(30);
const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub runs: usize,
    /// Sequential connections per measured run.
    pub connections: u64,
    /// Datagrams of the known UDP connection per run.
    pub datagrams: u64,
    /// How long the bulk stream of each run lasts.
    pub bulk: Duration,
}

/// An agent binary under test.
#[derive(Clone, Debug)]
pub struct Subject {
    pub binary: PathBuf,
}

/// One run's figures for one binary.
#[derive(Clone, Debug, Default)]
struct Sample {
    kernel_us_per_conn: f64,
    runs_per_conn: f64,
    /// The do-nothing program's time on the same tracepoint ([`Floor`]), per connection and per run.
    floor_us_per_conn: f64,
    floor_ns_per_run: f64,
    /// Per program name: kernel µs per connection.
    per_program: BTreeMap<String, f64>,
    ns_per_known_run: f64,
    ns_per_datagram: f64,
    runs_per_datagram: f64,
    floor_ns_per_known_run: f64,
    /// The same known connection's datagrams in its reply direction.
    reply_ns_per_run: f64,
    reply_ns_per_datagram: f64,
    reply_runs_per_datagram: f64,
    reply_floor_ns_per_run: f64,
    /// The first storm after the agent started, its tables and heap still growing.
    daemon_first_us: f64,
    /// The daemon's CPU and wake-ups while idle (the second before its second storm).
    idle_ms_per_s: f64,
    idle_wakeups_per_s: f64,
    daemon_us: f64,
    daemon_sched_us: f64,
    /// Per thread name: `schedstat` run time (µs) and times scheduled in, per connection.
    daemon_threads: BTreeMap<String, (f64, f64)>,
    dump_us: f64,
    dump_sched_us: f64,
    bulk: BulkShare,
}

/// Measures `subjects` (the binary under test first, then its baseline if any) `plan.runs`
/// times, alternating, and returns one row per figure with the baseline's figure beside it.
pub fn run(rig: &Rig, plan: &Plan, subjects: &[Subject]) -> Result<Vec<Row>, BenchError> {
    let _stats = BpfStats::enable()?;
    let floor = Floor::attach()?;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); subjects.len()];
    for round in 0..plan.runs {
        for i in 0..subjects.len() {
            // Alternate which binary goes first so that drift over the session cancels out.
            let i = (i + round) % subjects.len();
            let s = once(rig, plan, &floor, &subjects[i].binary)?;
            println!(
                "  run {}/{} {}: kernel {:.2} µs/conn ({:.1} runs; a do-nothing program {:.2} µs/conn, {:.1} ns/run), {:.0} ns/run on a known flow ({:.0} ns/datagram), {:.0} ns/run on its replies ({:.0} ns/datagram); agent {:.1} µs/conn daemon ({:.1} on its first storm), {:.1} µs/conn dump",
                round + 1,
                plan.runs,
                subjects[i].binary.display(),
                s.kernel_us_per_conn,
                s.runs_per_conn,
                s.floor_us_per_conn,
                s.floor_ns_per_run,
                s.ns_per_known_run,
                s.ns_per_datagram,
                s.reply_ns_per_run,
                s.reply_ns_per_datagram,
                s.daemon_us,
                s.daemon_first_us,
                s.dump_us
            );
            let threads: Vec<String> = s
                .daemon_threads
                .iter()
                .map(|(name, (us, slices))| format!("{name} {us:.1} µs/{slices:.2}"))
                .collect();
            println!(
                "    daemon threads per connection (run time/times scheduled): {}",
                threads.join(", ")
            );
            println!(
                "    bulk stream per MB: machine {:.1} µs, agent's programs {:.2} µs (floor {:.2}), its threads {:.2} µs: share {:.2}%",
                s.bulk.busy_us,
                s.bulk.bpf_us,
                s.bulk.floor_us,
                s.bulk.agent_us,
                s.bulk.share() * 100.0
            );
            samples[i].push(s);
        }
    }
    Ok(rows(plan, &samples))
}

fn rows(plan: &Plan, samples: &[Vec<Sample>]) -> Vec<Row> {
    let agg = if samples.len() > 1 {
        format!(
            "median (min–max) of {} runs, alternating with the baseline",
            plan.runs
        )
    } else {
        format!("median (min–max) of {} runs", plan.runs)
    };
    let figure = |f: &dyn Fn(&Sample) -> f64, unit: &str, digits: usize| {
        let values: Vec<Vec<f64>> = samples.iter().map(|s| s.iter().map(f).collect()).collect();
        values
            .iter()
            .map(|v| spread(v, unit, digits))
            .collect::<Vec<_>>()
    };
    let row = |section: &'static str, what: String, cells: Vec<String>| {
        let mut cells = cells.into_iter();
        let mut row = Row::new(section, what, cells.next().unwrap_or_default(), agg.clone());
        row.before = cells.next();
        row
    };
    let conns = format!(
        "{} sequential connections internet → LB frontend {FRONTEND} → node DNAT+SNAT → pod, their ends included (`conntrack -F` after them)",
        plan.connections
    );
    let mut rows = vec![
        row(
            "kernel",
            format!("BPF program time per connection ({conns}; `run_time_ns`, idle subtracted)"),
            figure(&|s| s.kernel_us_per_conn, "µs", 2),
        ),
        row(
            "kernel",
            "… program runs per connection (`run_cnt`; every packet leaving any device of the machine runs it)".into(),
            figure(&|s| s.runs_per_conn, "", 1),
        ),
        row(
            "kernel",
            "… the floor: a do-nothing program attached beside it to the same tracepoint, per connection (what `bpf_stats` charges any run there: its clock readings, the call)".into(),
            figure(&|s| s.floor_us_per_conn, "µs", 2),
        ),
        row(
            "kernel",
            "… the floor per run".into(),
            figure(&|s| s.floor_ns_per_run, "ns", 1),
        ),
        row(
            "kernel",
            "… the agent's programs above the floor, per connection (the work they do; the floor follows the machine's phase, this less so)".into(),
            figure(&|s| s.kernel_us_per_conn - s.floor_us_per_conn, "µs", 2),
        ),
    ];
    for name in names_in(samples, |s| s.per_program.keys()) {
        rows.push(row(
            "kernel",
            format!("… of which `{name}`"),
            figure(
                &|s| s.per_program.get(&name).copied().unwrap_or(0.0),
                "µs",
                2,
            ),
        ));
    }
    let stream = format!(
        "a known connection's packets (UDP, app pod → node SNAT → internet {UDP_SINK}, {} datagrams after one reply)",
        plan.datagrams
    );
    // The same four figures for each direction of the known connection.
    let stream_rows = |what: String,
                       per_run: fn(&Sample) -> f64,
                       floor: fn(&Sample) -> f64,
                       per_datagram: fn(&Sample) -> f64,
                       runs: fn(&Sample) -> f64| {
        [
            row(
                "kernel",
                format!("BPF time per program run, {what}"),
                figure(&per_run, "ns", 0),
            ),
            row(
                "kernel",
                "… the floor per run on the same packets (the do-nothing program)".into(),
                figure(&floor, "ns", 0),
            ),
            row(
                "kernel",
                "… per datagram (all its program runs on the way)".into(),
                figure(&per_datagram, "ns", 0),
            ),
            row(
                "kernel",
                "… program runs per datagram".into(),
                figure(&runs, "", 1),
            ),
        ]
    };
    rows.extend(stream_rows(
        stream,
        |s| s.ns_per_known_run,
        |s| s.floor_ns_per_known_run,
        |s| s.ns_per_datagram,
        |s| s.runs_per_datagram,
    ));
    rows.extend(stream_rows(
        format!(
            "the same connection's reply direction (internet → node → app pod, {} datagrams)",
            plan.datagrams
        ),
        |s| s.reply_ns_per_run,
        |s| s.reply_floor_ns_per_run,
        |s| s.reply_ns_per_datagram,
        |s| s.reply_runs_per_datagram,
    ));
    rows.extend([
        row(
            "agent",
            format!("agent CPU per connection, daemon mode (`utime+stime`; {conns}; the agent's second storm: steady state)"),
            figure(&|s| s.daemon_us, "µs", 1),
        ),
        row(
            "agent",
            "… the same from the threads' `schedstat` run time (ns resolution)".into(),
            figure(&|s| s.daemon_sched_us, "µs", 1),
        ),
    ]);
    for name in names_in(samples, |s| s.daemon_threads.keys()) {
        let of = |s: &Sample| s.daemon_threads.get(&name).copied().unwrap_or_default();
        rows.push(row(
            "agent",
            format!("… of which thread `{name}`"),
            figure(&|s| of(s).0, "µs", 1),
        ));
        rows.push(row(
            "agent",
            format!("… times `{name}` was scheduled in per connection"),
            figure(&|s| of(s).1, "", 2),
        ));
    }
    rows.extend([
        row(
            "agent",
            "agent CPU per connection, daemon mode, its first storm after start (its tables and heap still growing; `utime+stime`)".into(),
            figure(&|s| s.daemon_first_us, "µs", 1),
        ),
        row(
            "agent",
            "agent CPU while idle, daemon mode (`schedstat`, the second before its second storm), ms per second".into(),
            figure(&|s| s.idle_ms_per_s, "ms/s", 2),
        ),
        row(
            "agent",
            "… times its threads were scheduled in, per second".into(),
            figure(&|s| s.idle_wakeups_per_s, "/s", 0),
        ),
        row(
            "agent",
            "agent CPU per connection, `--dump --output json` to a file (`utime+stime`; second storm)".into(),
            figure(&|s| s.dump_us, "µs", 1),
        ),
        row(
            "agent",
            "… the same from `schedstat`".into(),
            figure(&|s| s.dump_sched_us, "µs", 1),
        ),
    ]);
    let bulk = format!(
        "a bulk TCP stream, pod → node SNAT → internet {BULK_SINK} (one stream, {} s, agent attached as a daemon)",
        plan.bulk.as_secs_f64()
    );
    rows.extend([
        row(
            "bulk",
            format!("the machine's busy CPU time per MB, {bulk} (`/proc/stat`, every core)"),
            figure(&|s| s.bulk.busy_us, "µs", 1),
        ),
        row(
            "bulk",
            "… the agent's BPF programs per MB (`run_time_ns`, the statistics' own clock readings included)".into(),
            figure(&|s| s.bulk.bpf_us, "µs", 2),
        ),
        row(
            "bulk",
            "… the floor per MB (the do-nothing program on the same packets)".into(),
            figure(&|s| s.bulk.floor_us, "µs", 2),
        ),
        row(
            "bulk",
            "… the agent's threads per MB (`schedstat`)".into(),
            figure(&|s| s.bulk.agent_us, "µs", 2),
        ),
        row(
            "bulk",
            "… the agent's share of the machine's CPU (programs and threads over the busy time), as a throughput ratio: 1 − share".into(),
            figure(&|s| 1.0 - s.bulk.share(), "", 4),
        ),
        row(
            "bulk",
            "… the same with the programs' time above the floor (the statistics' own clock readings left out; the true figure lies between)".into(),
            figure(&|s| 1.0 - s.bulk.share_above_floor(), "", 4),
        ),
    ]);
    rows
}

/// Every name `names` gives for any sample of any binary, once each and in order: the rows of a
/// per-program or per-thread breakdown.
fn names_in<'a, I>(samples: &'a [Vec<Sample>], names: impl Fn(&'a Sample) -> I) -> BTreeSet<String>
where
    I: Iterator<Item = &'a String>,
{
    samples.iter().flatten().flat_map(names).cloned().collect()
}

/// `median (min–max) unit`.
fn spread(values: &[f64], unit: &str, digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    format!(
        "{:.digits$}{unit} ({min:.digits$}–{max:.digits$})",
        median(values)
    )
}

/// One run of one binary: as a daemon (connections, then the known UDP connection), then with
/// `--dump --output json` to a file (connections).
fn once(rig: &Rig, plan: &Plan, floor: &Floor, binary: &Path) -> Result<Sample, BenchError> {
    let mut sample = Sample::default();
    let metrics = free_local_port()?;
    let daemon = Launch {
        binary,
        mode: Mode::Daemon,
        count: None,
        metrics: Some(metrics),
        cgroup: None,
    };
    let (mut agent, _) = rig.launch(&daemon, READY_TIMEOUT)?;
    let progress = || scrape(metrics, EVENTS_METRIC).unwrap_or(f64::NAN);
    let first = connections(rig, plan, floor, &mut agent, &progress)?;
    sample.daemon_first_us = first.cpu_ns / 1000.0;
    let cost = connections(rig, plan, floor, &mut agent, &progress)?;
    sample.kernel_us_per_conn = cost.kernel_ns / 1000.0;
    sample.runs_per_conn = cost.runs;
    sample.floor_us_per_conn = cost.floor_ns / 1000.0;
    sample.floor_ns_per_run = cost.floor_ns / cost.floor_runs;
    sample.per_program = cost.per_program;
    sample.daemon_us = cost.cpu_ns / 1000.0;
    sample.daemon_sched_us = cost.sched_ns / 1000.0;
    sample.daemon_threads = cost.threads;
    sample.idle_ms_per_s = cost.idle_ms_per_s;
    sample.idle_wakeups_per_s = cost.idle_wakeups_per_s;
    let (known, reply) = known_connection(rig, plan, floor, &mut agent)?;
    sample.ns_per_known_run = known.ns_per_run;
    sample.ns_per_datagram = known.ns_per_datagram;
    sample.runs_per_datagram = known.runs_per_datagram;
    sample.floor_ns_per_known_run = known.floor_ns_per_run;
    sample.reply_ns_per_run = reply.ns_per_run;
    sample.reply_ns_per_datagram = reply.ns_per_datagram;
    sample.reply_runs_per_datagram = reply.runs_per_datagram;
    sample.reply_floor_ns_per_run = reply.floor_ns_per_run;
    sample.bulk = bulk_share(rig, plan, floor, &agent)?;
    agent.stop();

    let file = std::env::temp_dir().join(format!("aksnet-bench-{}-dump.json", std::process::id()));
    let dump = Launch {
        binary,
        mode: Mode::DumpToFile(file.clone()),
        count: None,
        metrics: None,
        cgroup: None,
    };
    let (mut agent, _) = rig.launch(&dump, READY_TIMEOUT)?;
    let progress = || std::fs::metadata(&file).map_or(f64::NAN, |m| m.len() as f64);
    let cost = connections(rig, plan, floor, &mut agent, &progress)
        .and_then(|_first| connections(rig, plan, floor, &mut agent, &progress));
    agent.stop();
    let _ = std::fs::remove_file(&file);
    let cost = cost?;
    sample.dump_us = cost.cpu_ns / 1000.0;
    sample.dump_sched_us = cost.sched_ns / 1000.0;
    Ok(sample)
}

/// Per-connection costs of one storm, idle subtracted.
struct PerConnection {
    /// The agent's CPU (`schedstat`) and times its threads were scheduled in, per second of the
    /// idle window.
    idle_ms_per_s: f64,
    idle_wakeups_per_s: f64,
    kernel_ns: f64,
    runs: f64,
    /// The do-nothing program's time and runs, per connection.
    floor_ns: f64,
    floor_runs: f64,
    per_program: BTreeMap<String, f64>,
    cpu_ns: f64,
    sched_ns: f64,
    /// Per thread name: `schedstat` run time (µs) and times scheduled in.
    threads: BTreeMap<String, (f64, f64)>,
}

fn connections(
    rig: &Rig,
    plan: &Plan,
    floor: &Floor,
    agent: &mut Agent,
    progress: &dyn Fn() -> f64,
) -> Result<PerConnection, BenchError> {
    let pid = agent.pid().ok_or_else(|| BenchError::Failed {
        what: "the cost run".into(),
        detail: "the agent is not running".into(),
    })?;
    end_connections(rig)?;
    settle(progress);
    let idle_start = Snapshot::take(pid, floor)?;
    std::thread::sleep(IDLE);
    let start = Snapshot::take(pid, floor)?;
    let storm = rig.storm(plan.connections, 1, STORM_DEADLINE)?;
    if storm.ok != plan.connections {
        return Err(BenchError::Failed {
            what: format!("the sequential connections to {FRONTEND}"),
            detail: format!(
                "{} of {} succeeded; first error: {}",
                storm.ok,
                plan.connections,
                storm.first_error.as_deref().unwrap_or("none (deadline)")
            ),
        });
    }
    end_connections(rig)?;
    let idle = start.since(&idle_start);
    settle_on_cpu(pid, &idle)?;
    let end = Snapshot::take(pid, floor)?;
    if agent.exited() {
        return Err(BenchError::Failed {
            what: "the cost run".into(),
            detail: "the agent exited during it".into(),
        });
    }
    let busy = end.since(&start).minus_idle(&idle);
    let n = storm.ok as f64;
    let idle_seconds = idle.seconds.max(f64::EPSILON);
    Ok(PerConnection {
        idle_ms_per_s: idle.sched_ns / 1e6 / idle_seconds,
        idle_wakeups_per_s: summed(&idle.threads).1 / idle_seconds,
        kernel_ns: busy.bpf_ns / n,
        runs: busy.bpf_runs / n,
        floor_ns: busy.floor_ns / n,
        floor_runs: busy.floor_runs / n,
        per_program: busy
            .per_program
            .iter()
            .map(|(name, ns)| (name.clone(), ns / n / 1000.0))
            .collect(),
        cpu_ns: busy.cpu_ns / n,
        sched_ns: busy.sched_ns / n,
        threads: busy
            .threads
            .iter()
            .map(|(name, (ns, slices))| (name.clone(), (ns / n / 1000.0, slices / n)))
            .collect(),
    })
}

/// Ends every connection of the node now. conntrack reports an end (DESTROY) only when it reaps
/// the entry: for the storm's reset connections 10 s after their last packet, or later at its
/// garbage collector's pace, so one run's ends fell into a later run's idle or measured window
/// at random. Flushing the node's table reaps every entry at once, with the same DESTROY events:
/// a run then measures each of its connections' start and end, and nothing of another run's.
fn end_connections(rig: &Rig) -> Result<(), BenchError> {
    crate::lab::exec::in_ns(&rig.node(), &["conntrack", "-F"])?;
    Ok(())
}

/// Waits until `progress` stood still for [`SETTLE_QUIET`].
fn settle(progress: &dyn Fn() -> f64) {
    let began = Instant::now();
    let mut last = progress();
    while began.elapsed() < SETTLE_MAX {
        std::thread::sleep(SETTLE_QUIET);
        let now = progress();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Waits until the agent's threads ran, over [`SETTLE_QUIET`], no more than twice what they run
/// when idle (plus 1 ms): it has handled the storm. Unlike [`settle`], it adds no load inside
/// the measured window: scraping `/metrics` every 300 ms costs the agent more than a
/// Prometheus scraping every 15 s or more ever would.
fn settle_on_cpu(pid: u32, idle: &Delta) -> Result<(), BenchError> {
    let idle_rate = idle.sched_ns / idle.seconds.max(f64::EPSILON);
    let quiet = 2.0 * idle_rate * SETTLE_QUIET.as_secs_f64() + 1e6;
    let run_time = || run_time_ns(pid);
    let began = Instant::now();
    let mut last = run_time()?;
    while began.elapsed() < SETTLE_MAX {
        std::thread::sleep(SETTLE_QUIET);
        let now = run_time()?;
        if now - last <= quiet {
            break;
        }
        last = now;
    }
    Ok(())
}

struct Known {
    ns_per_run: f64,
    ns_per_datagram: f64,
    runs_per_datagram: f64,
    floor_ns_per_run: f64,
}

/// The kernel cost of packets of a connection the agent already reported: one UDP socket from
/// the app pod to the internet server, one datagram answered (so conntrack has seen a reply),
/// then `plan.datagrams` more in the original direction, and as many in the reply direction.
fn known_connection(
    rig: &Rig,
    plan: &Plan,
    floor: &Floor,
    agent: &mut Agent,
) -> Result<(Known, Known), BenchError> {
    let pid = agent.pid().unwrap_or_default();
    let flow = load::UdpFlow::establish(&rig.pod(), &rig.inet(), UDP_SINK)?;
    // Let its report through first: the streams are what is measured.
    std::thread::sleep(Duration::from_millis(200));
    let original = stream(pid, plan, floor, || flow.send(plan.datagrams))?;
    let reply = stream(pid, plan, floor, || flow.answer(plan.datagrams))?;
    Ok((original, reply))
}

/// The kernel cost of one stream of `plan.datagrams` datagrams that `send` sends.
fn stream(
    pid: u32,
    plan: &Plan,
    floor: &Floor,
    send: impl FnOnce() -> Result<(), BenchError>,
) -> Result<Known, BenchError> {
    let idle_start = Snapshot::take(pid, floor)?;
    std::thread::sleep(IDLE);
    let start = Snapshot::take(pid, floor)?;
    send()?;
    let end = Snapshot::take(pid, floor)?;
    let idle = start.since(&idle_start);
    let busy = end.since(&start).minus_idle(&idle);
    let n = plan.datagrams as f64;
    Ok(Known {
        ns_per_run: busy.bpf_ns / busy.bpf_runs,
        floor_ns_per_run: busy.floor_ns / busy.floor_runs,
        ns_per_datagram: busy.bpf_ns / n,
        runs_per_datagram: busy.bpf_runs / n,
    })
}

/// What one bulk stream cost the machine and the agent, per MB received.
#[derive(Clone, Copy, Debug, Default)]
struct BulkShare {
    busy_us: f64,
    bpf_us: f64,
    floor_us: f64,
    agent_us: f64,
}

impl BulkShare {
    /// The agent's direct share of the machine's CPU over the stream: its programs and threads.
    fn share(&self) -> f64 {
        (self.bpf_us + self.agent_us) / self.busy_us
    }

    /// The same less the floor, which `bpf_stats` charges any program there: a program's true
    /// cost without the statistics lies between the two.
    fn share_above_floor(&self) -> f64 {
        (self.bpf_us - self.floor_us + self.agent_us) / self.busy_us
    }
}

/// A bulk TCP stream from the app pod through the node's SNAT, measured as the datapath section
/// streams, with the agent attached: the machine's busy time against the agent's programs' and
/// threads'. Both sides move with the host's phase together, so their ratio holds where the
/// datapath section's wall-time ratio does not.
fn bulk_share(
    rig: &Rig,
    plan: &Plan,
    floor: &Floor,
    agent: &Agent,
) -> Result<BulkShare, BenchError> {
    let pid = agent.pid().unwrap_or_default();
    let start = Snapshot::take(pid, floor)?;
    let clock = BusyClock::start()?;
    let bulk = load::bulk(&rig.pod(), &rig.inet(), BULK_SINK, plan.bulk)?;
    let busy = clock.busy()?;
    let spent = Snapshot::take(pid, floor)?.since(&start);
    let mb = bulk.bytes as f64 / 1e6;
    Ok(BulkShare {
        busy_us: busy.as_secs_f64() * 1e6 / mb,
        bpf_us: spent.bpf_ns / 1e3 / mb,
        floor_us: spent.floor_ns / 1e3 / mb,
        agent_us: spent.sched_ns / 1e3 / mb,
    })
}

/// The agent's counters at one moment.
struct Snapshot {
    at: Instant,
    /// `utime+stime` in ns.
    cpu_ns: f64,
    /// Sum of the threads' `schedstat` run time.
    sched_ns: f64,
    /// Per thread name: summed `schedstat` run time and times scheduled in.
    threads: BTreeMap<String, (f64, f64)>,
    /// Per program id: name, `run_time_ns`, `run_cnt`.
    programs: BTreeMap<u32, (String, u64, u64)>,
    /// The do-nothing program's `run_time_ns`, `run_cnt`.
    floor: (u64, u64),
}

/// The difference of two snapshots.
struct Delta {
    seconds: f64,
    cpu_ns: f64,
    sched_ns: f64,
    bpf_ns: f64,
    bpf_runs: f64,
    floor_ns: f64,
    floor_runs: f64,
    per_program: BTreeMap<String, f64>,
    threads: BTreeMap<String, (f64, f64)>,
}

impl Snapshot {
    fn take(pid: u32, floor: &Floor) -> Result<Snapshot, BenchError> {
        let cpu_ns = cpu_time(pid)?;
        let threads = threads(pid)?;
        Ok(Snapshot {
            at: Instant::now(),
            cpu_ns,
            sched_ns: summed(&threads).0,
            threads,
            programs: programs(pid)?,
            floor: floor.counters()?,
        })
    }

    fn since(&self, earlier: &Snapshot) -> Delta {
        let mut per_program = BTreeMap::new();
        let (mut bpf_ns, mut bpf_runs) = (0.0, 0.0);
        for (id, (name, ns, runs)) in &self.programs {
            let (ns0, runs0) = earlier
                .programs
                .get(id)
                .map_or((0, 0), |(_, ns, runs)| (*ns, *runs));
            let ns = ns.saturating_sub(ns0) as f64;
            bpf_ns += ns;
            bpf_runs += runs.saturating_sub(runs0) as f64;
            *per_program.entry(name.clone()).or_insert(0.0) += ns;
        }
        // A thread that ended in between (tokio's blocking pool) takes its time with it.
        let threads = self
            .threads
            .iter()
            .map(|(name, (ns, slices))| {
                let (ns0, slices0) = earlier.threads.get(name).copied().unwrap_or_default();
                (
                    name.clone(),
                    ((ns - ns0).max(0.0), (slices - slices0).max(0.0)),
                )
            })
            .collect();
        Delta {
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
            cpu_ns: self.cpu_ns - earlier.cpu_ns,
            sched_ns: self.sched_ns - earlier.sched_ns,
            bpf_ns,
            bpf_runs,
            floor_ns: self.floor.0.saturating_sub(earlier.floor.0) as f64,
            floor_runs: self.floor.1.saturating_sub(earlier.floor.1) as f64,
            per_program,
            threads,
        }
    }
}

impl Delta {
    /// This delta less what `idle` spent in as long a time.
    fn minus_idle(mut self, idle: &Delta) -> Delta {
        let scale = if idle.seconds > 0.0 {
            self.seconds / idle.seconds
        } else {
            0.0
        };
        self.cpu_ns -= idle.cpu_ns * scale;
        self.sched_ns -= idle.sched_ns * scale;
        self.bpf_ns -= idle.bpf_ns * scale;
        self.bpf_runs -= idle.bpf_runs * scale;
        self.floor_ns -= idle.floor_ns * scale;
        self.floor_runs -= idle.floor_runs * scale;
        for (name, ns) in &mut self.per_program {
            *ns -= idle.per_program.get(name).copied().unwrap_or(0.0) * scale;
        }
        for (name, (ns, slices)) in &mut self.threads {
            let (idle_ns, idle_slices) = idle.threads.get(name).copied().unwrap_or_default();
            *ns -= idle_ns * scale;
            *slices -= idle_slices * scale;
        }
        self
    }
}

/// `utime+stime` of the whole process (dead threads included), in ns.
fn cpu_time(pid: u32) -> Result<f64, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(&path).map_err(FileError::on("cannot read", &path))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| BenchError::Parse {
        what: path.display().to_string(),
        detail: format!("no utime/stime fields in {stat:?}"),
    })?;
    Ok(ticks as f64 * 1e9 / user_hz())
}

/// The live threads' `schedstat` run time (ns) and times scheduled in, summed per thread name:
/// which thread takes the time, and how often it wakes up to do so. The main thread, named after
/// the binary's file, is `main` whatever the binary under test is called.
fn threads(pid: u32) -> Result<BTreeMap<String, (f64, f64)>, BenchError> {
    let process = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(&tasks).map_err(FileError::on("cannot list", &tasks))? {
        let Ok(task) = task else { continue };
        // A thread that exited since the listing simply has nothing to add.
        let read = |file| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let Some((ns, slices)) = parse_schedstat(&read("schedstat")) else {
            continue;
        };
        let comm = read("comm");
        let name = if comm == process {
            "main".to_owned()
        } else {
            comm.trim().to_owned()
        };
        let total: &mut (f64, f64) = threads.entry(name).or_default();
        total.0 += ns;
        total.1 += slices;
    }
    Ok(threads)
}

/// The summed `schedstat` run time (ns) of the live threads of `pid`.
pub(super) fn run_time_ns(pid: u32) -> Result<f64, BenchError> {
    Ok(summed(&threads(pid)?).0)
}

/// The run time and times scheduled in of all of `threads`.
fn summed(threads: &BTreeMap<String, (f64, f64)>) -> (f64, f64) {
    threads
        .values()
        .fold((0.0, 0.0), |(ns, slices), (n, s)| (ns + n, slices + s))
}

/// Run time (ns) and times scheduled in, the first and third fields of `schedstat`.
fn parse_schedstat(text: &str) -> Option<(f64, f64)> {
    let fields: Vec<f64> = text
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    Some((*fields.first()?, *fields.get(2)?))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line; the command name in
/// parentheses may hold spaces, so fields are counted after its closing parenthesis.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The BPF programs the process holds, from its file descriptors' `fdinfo`: id → (name,
/// `run_time_ns`, `run_cnt`). Links also name a `prog_id`, but only programs carry counters.
fn programs(pid: u32) -> Result<BTreeMap<u32, (String, u64, u64)>, BenchError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).map_err(FileError::on("cannot list", &dir))? {
        let Ok(entry) = entry else { continue };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some((id, ns, runs)) = parse_prog_fdinfo(&text) {
            found
                .entry(id)
                .or_insert_with(|| (program_name(id), ns, runs));
        }
    }
    Ok(found)
}

/// A BPF program's id, `run_time_ns` and `run_cnt` from its fdinfo; `None` for other descriptors.
pub(super) fn parse_prog_fdinfo(text: &str) -> Option<(u32, u64, u64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        u32::try_from(field("prog_id:")?).ok()?,
        field("run_time_ns:")?,
        field("run_cnt:")?,
    ))
}

/// The program's name as `bpftool prog show id N` prints it, else `program N`.
fn program_name(id: u32) -> String {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut words = text.split_whitespace();
            words.find(|w| *w == "name")?;
            words.next().map(str::to_owned)
        })
        .unwrap_or_else(|| format!("program {id}"))
}

/// `kernel.bpf_stats_enabled` on while measuring; the previous value is written back on drop.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<BpfStats, BenchError> {
        let previous =
            std::fs::read_to_string(SYSCTL).map_err(FileError::on("cannot read", SYSCTL))?;
        std::fs::write(SYSCTL, "1").map_err(FileError::on(
            "cannot enable BPF run-time statistics",
            SYSCTL,
        ))?;
        Ok(BpfStats {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(SYSCTL, &self.previous) {
            eprintln!(
                "bench: could not restore {SYSCTL} to {}: {err}; restore it by hand",
                self.previous
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_a_command_with_spaces() {
        let stat = "4242 (tokio runtime) S 1 4242 4242 0 -1 4194560 1 0 0 0 150 25 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert_eq!(parse_stat_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_run_time_and_times_scheduled_from_schedstat() {
        assert_eq!(parse_schedstat("123456 789 42\n"), Some((123456.0, 42.0)));
        assert_eq!(parse_schedstat("123456 789"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn reads_program_counters_and_skips_links() {
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_id:\t57\nrun_time_ns:\t1200\nrun_cnt:\t7\n";
        assert_eq!(parse_prog_fdinfo(prog), Some((57, 1200, 7)));
        let link = "pos:\t0\nlink_type:\ttracing\nlink_id:\t3\nprog_tag:\tab\nprog_id:\t57\n";
        assert_eq!(parse_prog_fdinfo(link), None);
    }

    #[test]
    fn idle_time_is_subtracted_in_proportion() {
        let delta = |seconds, ns| Delta {
            seconds,
            cpu_ns: ns,
            sched_ns: ns,
            bpf_ns: ns,
            bpf_runs: ns,
            floor_ns: ns,
            floor_runs: ns,
            per_program: BTreeMap::from([("p".to_string(), ns)]),
            threads: BTreeMap::from([("t".to_string(), (ns, ns / 10.0))]),
        };
        let busy = delta(2.0, 1000.0).minus_idle(&delta(1.0, 100.0));
        assert_eq!(busy.bpf_ns, 800.0);
        assert_eq!(busy.per_program["p"], 800.0);
        assert_eq!(busy.threads["t"], (800.0, 80.0));
        assert_eq!(spread(&[3.0, 1.0, 2.0], "µs", 1), "2.0 µs (1.0–3.0)");
    }
}
