//! Datapath overhead: new connections per second through the node's DNAT and bulk throughput
//! through its SNAT, without and with the agent attached, in alternating runs.

use crate::bench::error::BenchError;
use crate::bench::load;
use crate::bench::report::{median, thousands, Row};
use crate::bench::rig::{Rig, BULK_SINK, FRONTEND};
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

/// Runs the alternating rounds and returns the table rows.
pub fn run(rig: &Rig, plan: &Plan) -> Result<Vec<Row>, BenchError> {
    // Warm the path (ARP, routes, conntrack, the server's threads) outside the measurement.
    let warm = plan.connections.min(500);
    rig.storm(warm, plan.workers, STORM_DEADLINE)?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..plan.rounds {
        // Alternate which arm goes first so that drift over the session cancels out.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for attached in order {
            let arm = arm(rig, plan, attached)?;
            println!(
                "  round {}/{}, agent {}: {} new connections/s, {:.2} Gbit/s",
                round + 1,
                plan.rounds,
                if attached { "attached" } else { "absent  " },
                thousands(arm.conns_per_s),
                arm.gbit_per_s
            );
            if attached {
                with.push(arm);
            } else {
                without.push(arm);
            }
        }
    }
    let runs = format!("median of {} runs each, alternating", plan.rounds);
    let ratio_runs = format!("median of {} paired runs", plan.rounds);
    let ratios = |f: fn(&Arm) -> f64| -> Vec<f64> {
        without
            .iter()
            .zip(&with)
            .map(|(a, b)| f(b) / f(a))
            .collect()
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
    Ok(vec![
        Row::new(
            "datapath",
            format!("{what}, no agent"),
            format!("{}/s", thousands(med(&without, conns))),
            runs.clone(),
        ),
        Row::new(
            "datapath",
            format!("{what}, agent attached"),
            format!("{}/s", thousands(med(&with, conns))),
            runs.clone(),
        ),
        Row::new(
            "datapath",
            "connection rate ratio, attached / no agent",
            format!("{:.3}", median(&ratios(conns))),
            ratio_runs.clone(),
        ),
        Row::new(
            "datapath",
            format!("{bulk}, no agent"),
            format!("{:.2} Gbit/s", med(&without, gbit)),
            runs.clone(),
        ),
        Row::new(
            "datapath",
            format!("{bulk}, agent attached"),
            format!("{:.2} Gbit/s", med(&with, gbit)),
            runs,
        ),
        Row::new(
            "datapath",
            "throughput ratio, attached / no agent",
            format!("{:.3}", median(&ratios(gbit))),
            ratio_runs,
        ),
    ])
}

fn arm(rig: &Rig, plan: &Plan, attached: bool) -> Result<Arm, BenchError> {
    let agent = if attached {
        Some(rig.ready_agent(None, None, READY_TIMEOUT)?.0)
    } else {
        None
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
