//! `cargo xtask bench`: what the agent costs and whether it misses anything. Datapath overhead
//! (connection rate through the node's DNAT, throughput through its SNAT, with and without the
//! agent), capture completeness under load (agent vs `conntrack -E` vs ground truth), the
//! userspace pipeline per event, the flow table's memory, and start-up time. Prints a table and
//! writes it to BENCHMARKS.md. Never part of `cargo xtask test`: figures come from here only.

pub mod agent;
mod busy;
mod cap;
mod completeness;
mod cost;
mod daemonset;
mod datapath;
mod entries;
pub mod error;
mod floor;
pub mod load;
pub mod report;
pub mod rig;
mod startup;
mod userspace;

pub use error::BenchError;

use crate::file_error::FileError;
use report::{Machine, Report};
use rig::Rig;
use std::path::Path;
use std::time::{Duration, Instant};

/// One part of the bench, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Criterion figures of the userspace pipeline.
    Userspace,
    /// The flow table's bytes per live flow.
    Memory,
    /// CPU time per connection, kernel and agent.
    Cost,
    /// Connection rate and bulk throughput with and without the agent.
    Datapath,
    /// Capture completeness under load, uncapped and capped at the DaemonSet's CPU limit.
    Completeness,
    /// Process start to first event.
    Startup,
}

/// How much to measure: the full run (under ~10 minutes on 2 cores once built) or a smoke run,
/// of every section or of some.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Empty for every section.
    only: Vec<Section>,
    datapath: datapath::Plan,
    completeness: completeness::Plan,
    cost: cost::Plan,
    startup_runs: usize,
    userspace: userspace::Plan,
}

impl Plan {
    pub fn new(quick: bool, only: &[Section]) -> Plan {
        fn choose<T>(quick: bool, full: T, smoke: T) -> T {
            if quick {
                smoke
            } else {
                full
            }
        }
        Plan {
            quick,
            only: only.to_vec(),
            datapath: datapath::Plan {
                rounds: choose(quick, 5, 2),
                connections: choose(quick, 10_000, 2000),
                workers: 16,
                bulk: Duration::from_secs(choose(quick, 3, 1)),
            },
            completeness: completeness::Plan {
                runs: choose(quick, 3, 1),
                connections: choose(quick, 30_000, 5000),
                workers: 32,
            },
            cost: cost::Plan {
                runs: choose(quick, 5, 2),
                connections: choose(quick, 4000, 1000),
                datagrams: choose(quick, 50_000, 10_000),
                bulk: Duration::from_secs(choose(quick, 3, 1)),
            },
            startup_runs: choose(quick, 5, 2),
            userspace: userspace::Plan {
                samples: choose(quick, 30, 10),
                warm_up_secs: choose(quick, 1.0, 0.5),
                measurement_secs: choose(quick, 3.0, 1.0),
                rss_runs: choose(quick, 3, 1),
            },
        }
    }

    fn measures(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }
}

/// Where the hand-kept part of BENCHMARKS.md starts; the bench rewrites what is above it.
const HAND_KEPT: &str = "## What these figures found, before and after";

/// Runs every benchmark, prints the table and writes `BENCHMARKS.md` into `workspace`. The lab
/// runs `agent`, or else the release build of the workspace's agent, built first. With
/// `baseline` (another agent binary, the one before a change), the cost and datapath figures are
/// measured for it too, in alternation, and shown beside.
pub fn run(
    workspace: &Path,
    plan: &Plan,
    agent: Option<&Path>,
    baseline: Option<&Path>,
) -> Result<Report, BenchError> {
    let began = Instant::now();
    let load_at_start = report::load_average();
    let agent = match agent {
        Some(path) => path.to_path_buf(),
        None => {
            println!("bench: building the agent (release)");
            userspace::build_agent(workspace)?;
            workspace.join("target/release/aksnet-agent")
        }
    };
    let mut subjects = vec![cost::Subject {
        binary: agent.clone(),
    }];
    subjects.extend(baseline.map(|b| cost::Subject {
        binary: b.to_path_buf(),
    }));
    let daemonset = daemonset::DaemonSet::read(workspace)?;
    let limit = daemonset.limit;
    let mut rows = Vec::new();
    if plan.measures(Section::Userspace) {
        println!("bench: userspace pipeline (criterion)");
        rows.extend(userspace::pipeline(workspace, &plan.userspace)?);
    }
    if plan.measures(Section::Memory) {
        println!("bench: flow table memory");
        rows.extend(userspace::memory(workspace, plan.userspace.rss_runs)?);
    }
    let lab_sections = [
        Section::Cost,
        Section::Datapath,
        Section::Completeness,
        Section::Startup,
    ];
    if lab_sections.iter().any(|s| plan.measures(*s)) {
        println!("bench: node lab up (kubenet)");
        let rig = Rig::up(&agent, daemonset.env)?;
        let lab_rows = lab_benchmarks(&rig, plan, &subjects, limit);
        // Tear down whether or not the measurements worked; report the measurement error first.
        let down = rig.down();
        rows.extend(lab_rows?);
        down?;
    }
    let report = Report {
        machine: Machine::read(),
        load: (load_at_start, report::load_average()),
        baseline: baseline.map(|b| b.display().to_string()),
        quick: plan.quick,
        rows,
        notes: notes(plan),
    };
    println!("\n{}", report.table());
    if !plan.only.is_empty() {
        println!("bench: --only measured part of the bench; BENCHMARKS.md is left as it was");
        return Ok(report);
    }
    let path = workspace.join("BENCHMARKS.md");
    // The findings written by hand below the generated part stay.
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(HAND_KEPT).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    let text = format!("{}\n{kept}", report.markdown());
    std::fs::write(&path, text).map_err(FileError::on("cannot write", &path))?;
    println!(
        "written to {} after {:.0} s",
        path.display(),
        began.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn lab_benchmarks(
    rig: &Rig,
    plan: &Plan,
    subjects: &[cost::Subject],
    limit: cap::CpuLimit,
) -> Result<Vec<report::Row>, BenchError> {
    let mut rows = Vec::new();
    if plan.measures(Section::Cost) {
        println!("bench: cost per connection (CPU time)");
        rows.extend(cost::run(rig, &plan.cost, subjects)?);
    }
    if plan.measures(Section::Datapath) {
        println!("bench: datapath overhead, alternating runs");
        rows.extend(datapath::run(rig, &plan.datapath, subjects)?);
    }
    if plan.measures(Section::Completeness) {
        println!("bench: capture completeness under load");
        rows.extend(completeness::run(rig, &plan.completeness, None)?);
        println!(
            "bench: capture completeness under load, agent capped at {}m CPU",
            limit.millicores
        );
        let capped = completeness::Cap {
            group: cap::CpuGroup::create(limit)?,
            limit,
            section: "completeness, capped",
        };
        rows.extend(completeness::run(rig, &plan.completeness, Some(&capped))?);
    }
    if plan.measures(Section::Startup) {
        println!("bench: start-up");
        rows.extend(startup::run(rig, plan.startup_runs)?);
    }
    Ok(rows)
}

fn notes(plan: &Plan) -> Vec<String> {
    let d = &plan.datapath;
    let c = &plan.completeness;
    let k = &plan.cost;
    vec![
        format!(
            "Cost per connection: CPU time, which holds on this shared machine where wall time does not. \
             Each run starts the agent as the DaemonSet runs it (no `--dump`, metrics on a local port, \
             the literal environment variables of `deploy/base/daemonset.yaml`: every agent the bench \
             starts gets them), \
             waits until it counted a probe, measures 1 s idle, then {} sequential connections from the \
             internet client through the LB frontend; then it flushes the node's conntrack table \
             (`conntrack -F`, before the idle second too), so that every connection's end (netlink \
             DESTROY, otherwise sent when conntrack reaps the entry, 10 s or more later) falls in the \
             run that opened it, and waits until the agent's threads run no more than twice their \
             idle rate over 300 ms (without scraping its metrics, which would add load a Prometheus \
             scraping every 15 s does not). Each agent does this twice and the second storm is the \
             figure: a DaemonSet's agent runs for days, its tables and heap already grown; the first \
             is shown beside it. Then the same with `--dump --output json` into a file. Kernel: `kernel.bpf_stats_enabled` is \
             set to 1 for the cost runs and restored after; `run_time_ns` and `run_cnt` are summed over \
             the BPF programs the agent's own file descriptors hold (`/proc/PID/fdinfo`). The xmit \
             program runs for every packet leaving any device of the machine, including other users' \
             traffic: the idle second's rate is subtracted. The floor: for the cost runs the bench attaches \
             a program that does nothing (`r0 = 0; exit`, a raw tracepoint program loaded with `bpf(2)`) to the \
             same tracepoint; its `run_time_ns` is what the statistics charge any program there (their two \
             clock readings and the call), idle subtracted the same way. Agent: `utime+stime` of `/proc/PID/stat` \
             (10 ms ticks), idle subtracted, and the threads' `schedstat` run time as a finer check, also \
             per thread with the times each was scheduled in. \
             Known connection: one UDP socket from the app pod to the internet server, answered once \
             (conntrack established), then {} datagrams; `run_time_ns / run_cnt` over that stream. Bulk: \
             the datapath section's stream for {} s with the daemon attached; the machine's busy time over \
             it (`/proc/stat`: every core's wall time less idle, I/O-wait and stolen time) against the \
             agent's programs' `run_time_ns` and its threads' `schedstat` time. {} runs; \
             with `--baseline`, each run measures both binaries, alternating which goes first.",
            k.connections, k.datagrams, k.bulk.as_secs_f64(), k.runs
        ),
        "Capped completeness: the same storms with the agent (`--dump`, which costs more than the \
         daemon) moved into a cgroup v1 cpu group whose `cpu.cfs_quota_us` over a 100 ms period is \
         the CPU limit of `deploy/base/daemonset.yaml`, as the kubelet applies it."
            .to_string(),
        format!(
            "Datapath: a kubenet node lab (`xtask::lab`, network namespaces only). The load generator is \
             Rust threads that `setns(2)` into the lab's internet namespace; each connection sends one byte, \
             reads one back and closes with a reset. The app pod's socat server (a shell per connection) is \
             replaced by the bench's accept loop so that the node's datapath, not the server, sets the rate. \
             Each round runs once without the agent and once with each agent binary as a daemon (no `--dump`, \
             `--source ebpf`, started and shown ready before the run), rotating which goes first. Each \
             arm runs the storm twice and measures the second, as the cost section does: a \
             DaemonSet's agent has its tables and heap grown. Ratios are \
             per round, then the median. {} rounds, {} connections per run. Each run's CPU time is the \
             whole machine's busy time over it (every core's wall time less the idle, I/O-wait and stolen \
             time of `/proc/stat`, all the lab's processes, the kernel's packet work and the agent \
             included; the connection run's window ends 100 ms after its last connection, so that the \
             agent's last batch falls in it), per connection or per MB, and the agent's own share, its \
             threads' `schedstat` run time over the same window. Most connections' ends (conntrack's \
             reaping of closed entries, 10 s later) fall outside the window, with or without the agent. Its ratio (no agent's / attached) is the node's work for \
             the same traffic without and with the agent, and holds where the wall-time ratio does not: \
             the time other guests take from this machine's cores is stolen time, not counted.",
            d.rounds, d.connections
        ),
        "Bulk throughput: one TCP stream from the app pod to the internet server, through the node's \
         MASQUERADE and the LB's outbound SNAT; bytes counted by the receiver from the first byte to the \
         sender's close."
            .to_string(),
        format!(
            "Completeness: {} connections per run from {} clients as fast as the lab takes them. The agent \
             count is its `new` lines showing the frontend's DNAT, not deduplicated (a client port reused \
             after a reset is a new conntrack entry, and `conntrack -E` counts it so); its lost count \
             is `aksnet_capture_events_lost_total` from `--metrics-listen`, read after it went quiet. \
             The ground truth is the new conntrack entries, counted by a rule at the top of the node's \
             nat `PREROUTING` chain (netfilter evaluates it once per new entry): a connection whose SYN \
             reaches the node before the RST of the previous connection on its client port is carried \
             on that entry (conntrack lets a SYN through an established entry and follows the new \
             handshake there), with no entry, NAT decision or event of its own. An unaccounted \
             difference lists the client ports whose uses and reports differ, with the agent's lines \
             and conntrack's for them. `conntrack -E -e NEW -o timestamp -p tcp` (64 MiB buffer) ran \
             in the node namespace at the same time, unfiltered.",
            c.connections, c.workers
        ),
        "Userspace: criterion, one thread, the lab's flows; events/s per core is 1 / the median time per event."
            .to_string(),
        "Memory: VmRSS of a fresh process before and after filling `FlowTable` with distinct live flows."
            .to_string(),
        "Start-up: from spawning the agent to its first stdout line while probe connections cross the node \
         every 10 ms, so the figure includes up to 10 ms of probe spacing."
            .to_string(),
    ]
}
