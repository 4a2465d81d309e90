//! Datapath overhead: new connections per second through the node's DNAT and bulk throughput
//! through its SNAT, without and with the agent attached, in alternating runs.

use crate::bench::agent::Mode;
use crate::bench::busy::BusyClock;
use crate::bench::completeness::free_local_port;
use crate::bench::cost::{run_time_ns, Subject};
use crate::bench::error::BenchError;
use crate::bench::load;
use crate::bench::report::{median, thousands, Row};
use crate::bench::rig::{Launch, Rig, BULK_SINK, FRONTEND};
use std::path::Path;
use std::time::Duration;

/// How long the agent may take to show its first probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Added to the connection run's CPU-time window, so that the agent's last batch of its events
/// (it reads every 10 ms) falls in it; an idle machine adds next to nothing.
const SETTLE: Duration = Duration::from_millis(100);
/// A storm that has not finished by then is a broken lab, not a slow one.
const STORM_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Pairs of runs (one without the agent, one with).
    pub rounds: usize,
    /// Connections per run.
    pub connections: u64,
    /// Concurrent clients.
    pub workers: usize,
    /// Seconds of bulk streaming per run.
    pub bulk: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Arm {
    conns_per_s: f64,
    gbit_per_s: f64,
    /// The whole machine's busy time over the connection run, µs per connection.
    cpu_us_per_conn: f64,
    /// The agent's threads' run time over the connection run, µs per connection (zero without
    /// one).
    agent_us_per_conn: f64,
    /// The whole machine's busy time over the bulk stream, µs per MB received.
    cpu_us_per_mb: f64,
}

/// Runs the alternating rounds (no agent, then each of `subjects` as a daemon) and returns the
/// table rows; the first subject's figures are the values, the second's (the baseline) go
/// beside them.
pub fn run(rig: &Rig, plan: &Plan, subjects: &[Subject]) -> Result<Vec<Row>, BenchError> {
    // Warm the path (ARP, routes, conntrack, the server's threads) outside the measurement.
    let warm = plan.connections.min(500);
    rig.storm(warm, plan.workers, STORM_DEADLINE)?;
    let arms: Vec<Option<&Path>> = std::iter::once(None)
        .chain(subjects.iter().map(|s| Some(s.binary.as_path())))
        .collect();
    let mut results: Vec<Vec<Arm>> = vec![Vec::new(); arms.len()];
    for round in 0..plan.rounds {
        // Rotate which arm goes first so that drift over the session cancels out.
        for i in 0..arms.len() {
            let i = (i + round) % arms.len();
            let arm = arm(rig, plan, arms[i])?;
            println!(
                "  round {}/{}, agent {}: {} new connections/s ({:.1} µs CPU each), {:.2} Gbit/s ({:.1} µs CPU a MB)",
                round + 1,
                plan.rounds,
                arms[i].map_or("absent".into(), |b| b.display().to_string()),
                thousands(arm.conns_per_s),
                arm.cpu_us_per_conn,
                arm.gbit_per_s,
                arm.cpu_us_per_mb,
            );
            results[i].push(arm);
        }
    }
    let route = format!(
        "internet → LB frontend {FRONTEND} → node DNAT → pod ({} per run, {} clients)",
        plan.connections, plan.workers
    );
    let bulk_route = format!(
        "pod → node SNAT → internet {BULK_SINK} (one stream, {} s per run)",
        plan.bulk.as_secs_f64()
    );
    let figures = [
        Figure {
            what: format!("new TCP connections/s, {route}"),
            value: |a| a.conns_per_s,
            show: |v| format!("{}/s", thousands(v)),
            rows: Rows::Compared {
                ratio: "connection rate ratio, attached (daemon mode) / no agent",
                higher_is_better: true,
            },
        },
        Figure {
            what: format!("the machine's busy CPU time per new TCP connection, {route}"),
            value: |a| a.cpu_us_per_conn,
            show: |v| format!("{v:.1} µs"),
            rows: Rows::Compared {
                ratio: "connection rate ratio in CPU time, CPU per connection no agent / attached",
                higher_is_better: false,
            },
        },
        Figure {
            what: format!(
                "… of which the agent's own threads (their `schedstat` run time), {route}"
            ),
            value: |a| a.agent_us_per_conn,
            show: |v| format!("{v:.1} µs"),
            rows: Rows::AttachedOnly,
        },
        Figure {
            what: format!("bulk TCP throughput, {bulk_route}"),
            value: |a| a.gbit_per_s,
            show: |v| format!("{v:.2} Gbit/s"),
            rows: Rows::Compared {
                ratio: "throughput ratio, attached (daemon mode) / no agent",
                higher_is_better: true,
            },
        },
        Figure {
            what: format!("the machine's busy CPU time per MB of bulk TCP, {bulk_route}"),
            value: |a| a.cpu_us_per_mb,
            show: |v| format!("{v:.1} µs"),
            rows: Rows::Compared {
                ratio: "throughput ratio in CPU time, CPU per MB no agent / attached",
                higher_is_better: false,
            },
        },
    ];
    Ok(figures
        .iter()
        .flat_map(|figure| figure.rows(plan.rounds, &results))
        .collect())
}

/// One figure of every arm, and the rows it gives.
struct Figure {
    what: String,
    value: fn(&Arm) -> f64,
    show: fn(f64) -> String,
    rows: Rows,
}

enum Rows {
    /// Without the agent, attached, and their ratio (above 1: the agent cost nothing, or the
    /// noise hid it).
    Compared {
        ratio: &'static str,
        higher_is_better: bool,
    },
    /// A figure of the agent itself: attached only.
    AttachedOnly,
}

impl Figure {
    /// `results[0]` ran without the agent, `results[1]` with the subject under test and
    /// `results[2]`, if any, with the baseline: its figures go in the "before" column.
    fn rows(&self, rounds: usize, results: &[Vec<Arm>]) -> Vec<Row> {
        let runs = format!("median of {rounds} runs each, alternating");
        let median_of = |arms: &[Arm]| median(&arms.iter().map(self.value).collect::<Vec<_>>());
        let attached_row =
            |figure: String, aggregation: String, value: &dyn Fn(&[Arm]) -> String| {
                let mut row = Row::new("datapath", figure, value(&results[1]), aggregation);
                row.before = results.get(2).map(|arms| value(arms));
                row
            };
        let attached = attached_row(
            format!("{}, agent attached (daemon mode)", self.what),
            runs.clone(),
            &|arms| (self.show)(median_of(arms)),
        );
        let Rows::Compared {
            ratio,
            higher_is_better,
        } = self.rows
        else {
            return vec![attached];
        };
        let ratio_of = |with: &[Arm]| {
            let ratios: Vec<f64> = results[0]
                .iter()
                .zip(with)
                .map(|(alone, attached)| {
                    let (alone, attached) = ((self.value)(alone), (self.value)(attached));
                    if higher_is_better {
                        attached / alone
                    } else {
                        alone / attached
                    }
                })
                .collect();
            format!("{:.3}", median(&ratios))
        };
        vec![
            Row::new(
                "datapath",
                format!("{}, no agent", self.what),
                (self.show)(median_of(&results[0])),
                runs,
            ),
            attached,
            attached_row(
                ratio.into(),
                format!("median of {rounds} rounds"),
                &ratio_of,
            ),
        ]
    }
}

fn arm(rig: &Rig, plan: &Plan, binary: Option<&Path>) -> Result<Arm, BenchError> {
    let agent = match binary {
        Some(binary) => {
            let launch = Launch {
                binary,
                mode: Mode::Daemon,
                count: None,
                metrics: Some(free_local_port()?),
                cgroup: None,
            };
            Some(rig.launch(&launch, READY_TIMEOUT)?.0)
        }
        None => None,
    };
    let agent_run_time = || -> Result<f64, BenchError> {
        agent
            .as_ref()
            .and_then(|a| a.pid())
            .map_or(Ok(0.0), run_time_ns)
    };
    // The same storm once unmeasured, as the cost section's first: an attached agent's tables
    // and heap have then grown to the run's size, as a DaemonSet's have after days. A fresh
    // agent's first storm spent 8% of its samples growing hash tables (`perf record -a`).
    rig.storm(plan.connections, plan.workers, STORM_DEADLINE)?;
    let clock = BusyClock::start()?;
    let agent_before = agent_run_time()?;
    let storm = rig.storm(plan.connections, plan.workers, STORM_DEADLINE)?;
    std::thread::sleep(SETTLE);
    let storm_busy = clock.busy()?;
    let agent_storm_ns = (agent_run_time()? - agent_before).max(0.0);
    if storm.ok != plan.connections {
        return Err(BenchError::Failed {
            what: format!("the connection run to {FRONTEND}"),
            detail: format!(
                "{} of {} connections succeeded in {:?}; first error: {}",
                storm.ok,
                plan.connections,
                storm.elapsed,
                storm.first_error.as_deref().unwrap_or("none (deadline)")
            ),
        });
    }
    let clock = BusyClock::start()?;
    let bulk = load::bulk(&rig.pod(), &rig.inet(), BULK_SINK, plan.bulk)?;
    let bulk_busy = clock.busy()?;
    if let Some(mut agent) = agent {
        if agent.exited() {
            return Err(agent.fail("exited during a measured run, so the run measured nothing"));
        }
        agent.stop();
    }
    Ok(Arm {
        conns_per_s: storm.per_second(),
        gbit_per_s: bulk.gbit_per_second(),
        cpu_us_per_conn: storm_busy.as_secs_f64() * 1e6 / storm.ok as f64,
        agent_us_per_conn: agent_storm_ns / 1e3 / storm.ok as f64,
        cpu_us_per_mb: bulk_busy.as_secs_f64() * 1e6 / (bulk.bytes as f64 / 1e6),
    })
}
