//! The agent's own cost: criterion benchmarks of the userspace pipeline (aksnet-agent/benches/
//! pipeline.rs), read back from criterion's estimates, and the flow table's memory
//! (aksnet-agent/benches/flow_table_rss.rs).

use crate::bench::error::BenchError;
use crate::bench::report::{median, thousands, Row};
use crate::cmd::Cmd;
use crate::file_error::FileError;
use serde_json::Value;
use std::path::Path;

/// The pipeline benchmarks, in table order, with what each measures.
const PIPELINE: [(&str, &str); 10] = [
    (
        "decode/conn_event",
        "decode one ring-buffer record (`decode_conn_event`)",
    ),
    (
        "flow_table/open_close_100k_live",
        "correlate: open + close churn, 100k live flows (`FlowTable::apply`)",
    ),
    (
        "flow_table/repeat_100k_live",
        "correlate: a known flow reported again, 100k live flows",
    ),
    (
        "metrics/open_close_snat_100k_live",
        "metrics: a connection counted, SNAT-accounted and ended, 100k live (`Metrics::observe_new` + `observe_end`)",
    ),
    (
        "classify/lb_inbound",
        "classify: internet → LB frontend → pod (`Classifier::classify`)",
    ),
    ("classify/pod_outbound", "classify: pod → internet (SNAT)"),
    (
        "classify/pod_to_service",
        "classify: pod → ClusterIP Service",
    ),
    (
        "classify_large/kubenet_lb_inbound",
        "classify on a large cluster's node (2 000 Services, 5 000 endpoints, 100 local pods): internet → LB frontend → pod, kubenet",
    ),
    (
        "classify_large/azure-cni_lb_inbound",
        "… the same, azure-cni (endpoints in the node subnet)",
    ),
    ("dump/json_line", "format one `--dump --output json` line"),
];

/// Flow-table sizes whose memory is measured.
const TABLE_SIZES: [u64; 2] = [100_000, 1_000_000];

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Criterion samples per benchmark.
    pub samples: usize,
    pub warm_up_secs: f64,
    pub measurement_secs: f64,
    /// Fresh processes per table size.
    pub rss_runs: usize,
}

/// `cargo ARGS` in the workspace, with extra environment.
fn cargo(workspace: &Path, args: &[&str], env: &[(&str, &Path)]) -> Cmd {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    env.iter().fold(
        Cmd::new(cargo).args(args).current_dir(workspace),
        |cmd, (key, value)| cmd.env(key, value),
    )
}

/// Builds the agent binary the lab runs.
pub fn build_agent(workspace: &Path) -> Result<(), BenchError> {
    Ok(cargo(
        workspace,
        &["build", "--release", "-p", "aksnet-agent"],
        &[],
    )
    .run_visible()?)
}

pub fn pipeline(workspace: &Path, plan: &Plan) -> Result<Vec<Row>, BenchError> {
    let home = workspace.join("target/aksnet-bench/criterion");
    if home.exists() {
        // Stale estimates from an earlier run must not stand in for a benchmark that did not run.
        std::fs::remove_dir_all(&home)
            .map_err(FileError::on("cannot clear old criterion results", &home))?;
    }
    let (samples, warm, measure) = (
        plan.samples.to_string(),
        plan.warm_up_secs.to_string(),
        plan.measurement_secs.to_string(),
    );
    cargo(
        workspace,
        &[
            "bench",
            "-p",
            "aksnet-agent",
            "--bench",
            "pipeline",
            "--",
            "--sample-size",
            &samples,
            "--warm-up-time",
            &warm,
            "--measurement-time",
            &measure,
        ],
        &[("CRITERION_HOME", &home)],
    )
    .run_visible()?;
    let aggregation = format!("median of {} criterion samples, one core", plan.samples);
    PIPELINE
        .iter()
        .map(|(id, what)| {
            let ns = per_element_ns(&home, id)?;
            Ok(Row::new(
                "userspace",
                *what,
                format!("{} events/s ({ns:.0} ns/event)", thousands(1e9 / ns)),
                aggregation.clone(),
            ))
        })
        .collect()
}

/// Criterion's median time per iteration divided by the elements one iteration handles.
fn per_element_ns(home: &Path, id: &str) -> Result<f64, BenchError> {
    let read = |file: &str| -> Result<Value, BenchError> {
        let path = home.join(id).join("new").join(file);
        let text = std::fs::read_to_string(&path).map_err(FileError::on(
            "no criterion result (did the benchmark run? see its output above)",
            &path,
        ))?;
        serde_json::from_str(&text).map_err(|e| BenchError::Parse {
            what: path.display().to_string(),
            detail: e.to_string(),
        })
    };
    let median_ns = read("estimates.json")?["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| BenchError::Parse {
            what: format!("criterion estimates of {id}"),
            detail: "no median.point_estimate".into(),
        })?;
    let elements = read("benchmark.json")?["throughput"]["Elements"]
        .as_f64()
        .unwrap_or(1.0);
    Ok(median_ns / elements)
}

pub fn memory(workspace: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for flows in TABLE_SIZES {
        let mut total = Vec::new();
        let mut table = Vec::new();
        for _ in 0..runs {
            let out = cargo(
                workspace,
                &[
                    "bench",
                    "-p",
                    "aksnet-agent",
                    "--bench",
                    "flow_table_rss",
                    "--",
                    "--flows",
                    &flows.to_string(),
                ],
                &[],
            )
            .output_string()?;
            let (before, after) = parse_rss(&out)?;
            total.push(after as f64);
            table.push(after.saturating_sub(before) as f64);
        }
        let (total, table) = (median(&total), median(&table));
        rows.push(Row::new(
            "memory",
            format!(
                "process RSS with the flow table holding {} live flows",
                thousands(flows as f64)
            ),
            format!(
                "{:.1} MiB, of which the table {:.1} MiB ({:.0} B/flow)",
                total / 1024.0,
                table / 1024.0,
                table * 1024.0 / flows as f64
            ),
            format!("median of {runs} fresh processes"),
        ));
    }
    Ok(rows)
}

/// `rss flows=N before_kib=A after_kib=B` from flow_table_rss.
fn parse_rss(out: &str) -> Result<(u64, u64), BenchError> {
    let line = out
        .lines()
        .find(|l| l.starts_with("rss "))
        .unwrap_or_default();
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("before_kib="), field("after_kib=")) {
        (Some(before), Some(after)) => Ok((before, after)),
        _ => Err(BenchError::Parse {
            what: "flow_table_rss output".into(),
            detail: format!("no `rss ... before_kib= after_kib=` line in:\n{out}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rss_line() {
        assert_eq!(
            parse_rss("x\nrss flows=10 live=10 before_kib=100 after_kib=350\n").unwrap(),
            (100, 350)
        );
        assert!(parse_rss("rss flows=10\n").is_err());
    }
}
