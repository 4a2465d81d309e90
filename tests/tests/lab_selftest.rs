//! The node lab's self-test, one per CNI (they run in parallel, in separate lab instances): every
//! scenario's traffic succeeds end to end (the lab checks who answered, the address the server
//! saw, X-Forwarded-For, the LB's SNAT range), and the node's conntrack table shows the NAT each
//! scenario expects. A failed assertion unwinds through the `Lab`'s Drop, which tears it down.

use aksnet_tests::{conntrack, require_root};
use xtask::lab::{Cni, Lab, LabOptions, Scenario};

fn selftest(cni: Cni) {
    require_root();
    let lab =
        Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab did not come up: {e}"));
    let node = lab.node_netns();
    let mut failures = Vec::new();
    for scenario in Scenario::all(cni) {
        conntrack::flush(&node).unwrap();
        let report = lab.run(&scenario).unwrap_or_else(|e| panic!("{cni}: {e}"));
        assert_eq!(
            report.steps.len(),
            scenario.traffic.len(),
            "{}: not every step ran",
            scenario.name
        );
        let entries = conntrack::list(&node).unwrap();
        for expected in scenario.expected_on_node() {
            match entries
                .iter()
                .find(|e| expected.matches(e.proto, &e.original, &e.reply))
            {
                Some(entry) if entry.nat() == expected.nat => {}
                Some(entry) => failures.push(format!(
                    "{cni} {}: {expected}\n    matched `{}` but its NAT is {}",
                    scenario.name,
                    entry.line,
                    entry.nat().as_str()
                )),
                None => failures.push(format!(
                    "{cni} {}: no entry for {expected}\n    node conntrack:\n      {}",
                    scenario.name,
                    entries
                        .iter()
                        .map(|e| e.line.as_str())
                        .collect::<Vec<_>>()
                        .join("\n      ")
                )),
            }
        }
        println!(
            "{cni} {}: {} step(s), {} expected entries seen",
            scenario.name,
            report.steps.len(),
            scenario.expected_on_node().len()
        );
    }
    assert!(
        failures.is_empty(),
        "conntrack did not show the expected NAT:\n{}",
        failures.join("\n")
    );
    lab.down().unwrap();
}

#[test]
fn kubenet_lab() {
    selftest(Cni::Kubenet);
}

#[test]
fn azure_cni_lab() {
    selftest(Cni::AzureCni);
}
