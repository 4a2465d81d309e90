//! The node lab's self-test, one per CNI (they run in parallel, in separate lab instances): every
//! scenario's traffic succeeds end to end (the lab checks who answered, the address the server
//! saw, X-Forwarded-For, the LB's SNAT range), and each node's conntrack table shows the NAT the
//! scenario expects there (the second node: the legs that cross to it). A failed assertion
//! unwinds through the `Lab`'s Drop, which tears it down.

use aksnet_tests::{conntrack, require_root};
use std::time::Instant;
use xtask::lab::{ApiServerAccess, CniMode, Host, Lab, LabOptions, Scenario};

/// Runs `scenarios` (all of the lab's when `None`) and checks both nodes' conntrack after each.
fn selftest(cni: CniMode, api_server: ApiServerAccess, only: Option<&str>) {
    require_root();
    let started = Instant::now();
    let lab = Lab::up(LabOptions {
        api_server,
        ..LabOptions::new(cni)
    })
    .unwrap_or_else(|e| panic!("{cni} lab did not come up: {e}"));
    let up = started.elapsed();
    let scenarios: Vec<Scenario> = lab
        .scenarios()
        .into_iter()
        .filter(|s| only.is_none_or(|name| s.name == name))
        .collect();
    assert!(!scenarios.is_empty(), "{cni}: no scenario {only:?}");
    let mut failures = Vec::new();
    for scenario in &scenarios {
        for node in Host::NODES {
            conntrack::flush(&lab.netns(node)).unwrap();
        }
        let report = lab.run(scenario).unwrap_or_else(|e| panic!("{cni}: {e}"));
        assert_eq!(
            report.steps.len(),
            scenario.traffic.len(),
            "{}: not every step ran",
            scenario.name
        );
        for node in Host::NODES {
            let entries = conntrack::list(&lab.netns(node)).unwrap();
            for expected in scenario.expected_on(node) {
                match entries
                    .iter()
                    .find(|e| expected.matches(e.proto, &e.original, &e.reply))
                {
                    Some(entry) if entry.nat() == expected.nat => {}
                    Some(entry) => failures.push(format!(
                        "{cni} {} on {}: {expected}\n    matched `{}` but its NAT is {}",
                        scenario.name,
                        node.suffix(),
                        entry.line,
                        entry.nat().as_str()
                    )),
                    None => failures.push(format!(
                        "{cni} {} on {}: no entry for {expected}\n    conntrack:\n      {}",
                        scenario.name,
                        node.suffix(),
                        entries
                            .iter()
                            .map(|e| e.line.as_str())
                            .collect::<Vec<_>>()
                            .join("\n      ")
                    )),
                }
            }
        }
        println!(
            "{cni} {}: {} step(s), {} + {} expected entries seen on node + node2",
            scenario.name,
            report.steps.len(),
            scenario.expected_on(Host::Node).len(),
            scenario.expected_on(Host::Node2).len()
        );
    }
    assert!(
        failures.is_empty(),
        "conntrack did not show the expected NAT:\n{}",
        failures.join("\n")
    );
    let ran = started.elapsed();
    lab.down().unwrap();
    println!(
        "{cni} ({api_server} API server): {} scenarios; lab up {up:?}, traffic and checks {:?}, \
         teardown {:?}",
        scenarios.len(),
        ran - up,
        started.elapsed() - ran
    );
}

#[test]
fn kubenet_lab() {
    selftest(CniMode::Kubenet, ApiServerAccess::Public, None);
}

#[test]
fn azure_cni_lab() {
    selftest(CniMode::AzureCni, ApiServerAccess::Public, None);
}

#[test]
fn azure_cni_overlay_lab() {
    selftest(CniMode::AzureCniOverlay, ApiServerAccess::Public, None);
}

/// A private cluster's API server, on each CNI: only the scenario it changes.
#[test]
fn private_api_server() {
    for cni in CniMode::ALL {
        selftest(cni, ApiServerAccess::Private, Some("pod-to-api-server"));
    }
}
