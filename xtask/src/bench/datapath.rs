//! Datapath overhead: new connections per second through the node's DNAT and bulk throughput
//! through its SNAT, without and with the agent attached, in alternating runs.

use crate::bench::agent::Mode;
use crate::bench::completeness::free_local_port;
use crate::bench::cost::Subject;
use crate::bench::error::BenchError;
use crate::bench::load;
use crate::bench::report::{median, thousands, Row};
use crate::bench::rig::{Launch, Rig, BULK_SINK, FRONTEND};
use std::path::Path;
use std::time::Duration;

/// How long the agent may take to show its first probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
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
                "  round {}/{}, agent {}: {} new connections/s, {:.2} Gbit/s",
                round + 1,
                plan.rounds,
                arms[i].map_or("absent".into(), |b| b.display().to_string()),
                thousands(arm.conns_per_s),
                arm.gbit_per_s
            );
            results[i].push(arm);
        }
    }
    let runs = format!("median of {} runs each, alternating", plan.rounds);
    let ratio_runs = format!("median of {} rounds", plan.rounds);
    let without = &results[0];
    let ratio = |with: &[Arm], f: fn(&Arm) -> f64| -> f64 {
        median(
            &without
                .iter()
                .zip(with)
                .map(|(a, b)| f(b) / f(a))
                .collect::<Vec<_>>(),
        )
    };
    let conns = |a: &Arm| a.conns_per_s;
    let gbit = |a: &Arm| a.gbit_per_s;
    let med = |arms: &[Arm], f: fn(&Arm) -> f64| median(&arms.iter().map(f).collect::<Vec<_>>());
    let what = format!(
        "new TCP connections/s, internet → LB frontend {FRONTEND} → node DNAT → pod ({} per run, {} clients)",
        plan.connections, plan.workers
    );
    let bulk = format!(
        "bulk TCP throughput, pod → node SNAT → internet {BULK_SINK} (one stream, {} s per run)",
        plan.bulk.as_secs_f64()
    );
    // Value from the subject under test, "before" from the baseline, where there is one.
    let attached = |what: String, aggregation: &str, value: &dyn Fn(&[Arm]) -> String| {
        let mut row = Row::new("datapath", what, value(&results[1]), aggregation);
        row.before = results.get(2).map(|arms| value(arms));
        row
    };
    Ok(vec![
        Row::new(
            "datapath",
            format!("{what}, no agent"),
            format!("{}/s", thousands(med(without, conns))),
            runs.clone(),
        ),
        attached(
            format!("{what}, agent attached (daemon mode)"),
            &runs,
            &|arms| format!("{}/s", thousands(med(arms, conns))),
        ),
        attached(
            "connection rate ratio, attached (daemon mode) / no agent".into(),
            &ratio_runs,
            &|arms| format!("{:.3}", ratio(arms, conns)),
        ),
        Row::new(
            "datapath",
            format!("{bulk}, no agent"),
            format!("{:.2} Gbit/s", med(without, gbit)),
            runs.clone(),
        ),
        attached(
            format!("{bulk}, agent attached (daemon mode)"),
            &runs,
            &|arms| format!("{:.2} Gbit/s", med(arms, gbit)),
        ),
        attached(
            "throughput ratio, attached (daemon mode) / no agent".into(),
            &ratio_runs,
            &|arms| format!("{:.3}", ratio(arms, gbit)),
        ),
    ])
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
    let storm = rig.storm(plan.connections, plan.workers, STORM_DEADLINE)?;
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
    let bulk = load::bulk(&rig.pod(), &rig.inet(), BULK_SINK, plan.bulk)?;
    if let Some(mut agent) = agent {
        if agent.exited() {
            return Err(agent.fail("exited during a measured run, so the run measured nothing"));
        }
        agent.stop();
    }
    Ok(Arm {
        conns_per_s: storm.per_second(),
        gbit_per_s: bulk.gbit_per_second(),
    })
}
