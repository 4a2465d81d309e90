//! What "the agent captured the lab exactly" means, for any way the agent is run: every
//! connection reported opened once and ended once, the same translations as `conntrack -E` saw
//! (both ways), and each scenario's expected entries with their NAT, on their path, conforming.

use crate::agent::{dumped, of_event, reported, Dumped};
use crate::conntrack::Entry;
use serde_json::Value;
use xtask::lab::{Host, NatKind, Scenario};

fn nat_names(kind: NatKind) -> Vec<&'static str> {
    match kind {
        NatKind::None => vec![],
        NatKind::Dnat => vec!["dnat"],
        NatKind::Snat => vec!["snat"],
        NatKind::DnatSnat => vec!["dnat", "snat"],
    }
}

/// The translations the witness saw and the agent did not report (`opened`), and those it
/// reported and the witness did not see, compared by protocol and both tuples.
pub fn witness_mismatches(witnessed: &[Entry], opened: &[Dumped]) -> Vec<String> {
    let same = |d: &Dumped, e: &Entry| {
        d.proto == e.proto && d.original == e.original && d.reply == e.reply
    };
    let unreported = witnessed
        .iter()
        .filter(|e| !opened.iter().any(|d| same(d, e)))
        .map(|e| format!("conntrack -E saw it, the agent did not: {}", e.line));
    let unwitnessed = opened
        .iter()
        .filter(|d| !witnessed.iter().any(|e| same(d, e)))
        .map(|d| format!("the agent reported it, conntrack -E did not: {}", d.line));
    unreported.chain(unwitnessed).collect()
}

/// What one node's agent reported, checked: the flows it reported opened, the dump lines of
/// those a scenario expected there, and every way the capture fell short.
pub struct NodeCapture {
    pub opened: Vec<Dumped>,
    pub expected_lines: Vec<String>,
    pub failures: Vec<String>,
}

/// Every way the agent's dump `lines` on `node` fall short of the witness's `witnessed` entries
/// and of `scenarios`' expectations on that node, after the node's table was flushed (so every
/// connection ended): each connection opened once and ended once with the translation it opened
/// with, the same translations as the witness (both ways), each expected entry with its NAT, on
/// its path, conforming.
pub fn node_capture(
    node: Host,
    scenarios: &[Scenario],
    witnessed: &[Entry],
    lines: &[Value],
) -> NodeCapture {
    let opened: Vec<Dumped> = of_event(lines, "new").filter_map(dumped).collect();
    let ended: Vec<Dumped> = of_event(lines, "destroy").filter_map(dumped).collect();
    let mut failures = Vec::new();
    for (i, a) in opened.iter().enumerate() {
        if opened[..i]
            .iter()
            .any(|b| b.proto == a.proto && b.original == a.original)
        {
            failures.push(format!("reported twice: {}", a.line));
        }
    }
    for d in &opened {
        let ends: Vec<&Dumped> = ended
            .iter()
            .filter(|e| e.proto == d.proto && e.original == d.original)
            .collect();
        match ends.as_slice() {
            [end] if end.reply == d.reply => {}
            [] => failures.push(format!("never reported ended: {}", d.line)),
            many => failures.push(format!("{} ends for {}", many.len(), d.line)),
        }
    }
    failures.extend(witness_mismatches(witnessed, &opened));
    let mut expected_lines = Vec::new();
    for scenario in scenarios {
        for expected in scenario.expected_on(node) {
            for d in reported(&opened, scenario, expected, &mut failures) {
                expected_lines.push(d.line.clone());
                if d.nat != nat_names(expected.nat) {
                    failures.push(format!(
                        "{}: NAT {:?}, expected {expected}",
                        scenario.name, d.nat
                    ));
                }
                if d.path.as_deref() != Some(expected.path.as_str()) || d.verdict != "conforms" {
                    failures.push(format!(
                        "{}: classified {:?} {} ({:?}), expected {} conforms: {}",
                        scenario.name,
                        d.path,
                        d.verdict,
                        d.reason,
                        expected.path.as_str(),
                        d.line
                    ));
                }
            }
        }
    }
    NodeCapture {
        opened,
        expected_lines,
        failures,
    }
}
