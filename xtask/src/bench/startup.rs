//! Start-up: from the agent's process start to its first event, which includes reading the
//! kernel's BTF, loading and attaching the programs, and the first flow crossing the pipeline.

use crate::bench::datapath::READY_TIMEOUT;
use crate::bench::error::BenchError;
use crate::bench::report::{median, Row};
use crate::bench::rig::Rig;

pub fn run(rig: &Rig, runs: usize) -> Result<Vec<Row>, BenchError> {
    let mut millis = Vec::new();
    for i in 0..runs {
        // `--count 1`: the agent exits by itself after the first flow.
        let (agent, line) = rig.ready_agent(Some(1), None, READY_TIMEOUT)?;
        let ms = line.at.duration_since(agent.started).as_secs_f64() * 1000.0;
        agent.stop();
        println!("  run {}/{runs}: first event after {ms:.0} ms", i + 1);
        millis.push(ms);
    }
    Ok(vec![Row::new(
        "start-up",
        "process start → first event (`--dump --output json --count 1`, BTF parsing and program load included; probes every 10 ms)",
        format!("{:.0} ms", median(&millis)),
        format!("median of {runs} runs"),
    )])
}
