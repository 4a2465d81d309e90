//! Deliberate misconfigurations of the node lab, caught by the agent: each one of
//! `xtask::lab::misconfig` is applied to a fresh lab of its CNI, the agent runs on the node while
//! the scenario that shows it and every scenario it leaves alone send their traffic, and the
//! flow it breaks must be `deviates` with a reason that names the problem, while every other
//! flow of the same run still conforms.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml), like agent_lab. Needs root.

use aksnet_tests::agent::{assert_no_failures, reported, run_scenarios, Agent, Placement};
use aksnet_tests::require_root;
use std::path::Path;
use xtask::lab::{CniMode, Lab, LabOptions, Misconfig, Scenario};

/// Applies `name` on a `cni` lab and checks what the agent makes of it. The broken flow's
/// reason must contain every one of `key_words` and the address the node SNATed it to.
fn caught(cni: CniMode, name: &str, key_words: &[&str]) {
    require_root();
    let misconfig = Misconfig::find(cni, name).unwrap();
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    lab.apply(&misconfig)
        .unwrap_or_else(|e| panic!("applying {misconfig}: {e}"));
    let agent = Agent::start(
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &lab,
        Placement::Beside,
        "ebpf",
        &[],
        &[],
    );
    let shown = misconfig.shown_by();
    let scenarios: Vec<Scenario> = std::iter::once(shown.clone())
        .chain(misconfig.unaffected())
        .collect();
    // The lab checks every answer, so the misconfiguration is known to be in effect (the
    // server saw the SNATed source) and the other paths to work as documented.
    run_scenarios(&lab, &scenarios);
    let opened = agent.finish_opened();

    let snat_to = misconfig.symptom.snat_to.to_string();
    let mut failures = Vec::new();
    let mut broken_reason = None;
    let mut conforming = 0;
    for scenario in &scenarios {
        for expected in scenario.expected_on_node() {
            let broken = scenario.name == shown.name && expected.path == misconfig.symptom.path;
            for d in reported(&opened, scenario, expected, &mut failures) {
                if d.path.as_deref() != Some(expected.path.as_str()) {
                    failures.push(format!(
                        "{}: on path {:?}, expected {}: {}",
                        scenario.name, d.path, expected.path, d.line
                    ));
                } else if !broken && d.verdict == "conforms" {
                    conforming += 1;
                } else if !broken {
                    failures.push(format!(
                        "{}: left alone by {name} but {} ({:?}): {}",
                        scenario.name, d.verdict, d.reason, d.line
                    ));
                } else if d.verdict != "deviates" {
                    failures.push(format!(
                        "{}: broken by {name} but {}: {}",
                        scenario.name, d.verdict, d.line
                    ));
                } else {
                    let reason = d.reason.clone().unwrap_or_default();
                    let missing: Vec<&str> = key_words
                        .iter()
                        .copied()
                        .chain([snat_to.as_str()])
                        .filter(|w| !reason.contains(w))
                        .collect();
                    if !missing.is_empty() {
                        failures.push(format!(
                            "{}: the reason does not name {missing:?}: {reason}",
                            scenario.name
                        ));
                    }
                    broken_reason = Some(reason);
                }
            }
        }
    }
    lab.down().unwrap();
    assert_no_failures(&misconfig, &failures);
    println!(
        "{cni} {name}: deviates: {}\n  {conforming} flows of {} unaffected scenarios conform",
        broken_reason.expect("the broken flow was checked"),
        scenarios.len() - 1
    );
}

#[test]
fn azure_cni_missing_non_masquerade() {
    caught(
        CniMode::AzureCni,
        "missing-non-masquerade",
        &["node IP", "pod IP is lost", "nonMasqueradeCIDRs"],
    );
}

#[test]
fn kubenet_double_snat() {
    caught(
        CniMode::Kubenet,
        "double-snat",
        &["double SNAT", "Application Gateway", "one source rewrite"],
    );
}

#[test]
fn azure_cni_double_snat() {
    caught(
        CniMode::AzureCni,
        "double-snat",
        &["double SNAT", "Application Gateway", "one source rewrite"],
    );
}

#[test]
fn kubenet_etp_cluster_declared_local() {
    caught(
        CniMode::Kubenet,
        "etp-cluster-declared-local",
        &[
            "declared externalTrafficPolicy Local",
            "client address is lost",
            "program it as externalTrafficPolicy Cluster, not the declared Local",
        ],
    );
}

#[test]
fn azure_cni_etp_cluster_declared_local() {
    caught(
        CniMode::AzureCni,
        "etp-cluster-declared-local",
        &[
            "declared externalTrafficPolicy Local",
            "client address is lost",
            "program it as externalTrafficPolicy Cluster, not the declared Local",
        ],
    );
}

#[test]
fn azure_cni_overlay_double_snat() {
    caught(
        CniMode::AzureCniOverlay,
        "double-snat",
        &["double SNAT", "Application Gateway", "one source rewrite"],
    );
}

#[test]
fn azure_cni_overlay_etp_cluster_declared_local() {
    caught(
        CniMode::AzureCniOverlay,
        "etp-cluster-declared-local",
        &[
            "declared externalTrafficPolicy Local",
            "client address is lost",
            "program it as externalTrafficPolicy Cluster, not the declared Local",
        ],
    );
}

/// Every misconfiguration the lab knows has a test above.
#[test]
fn every_misconfiguration_is_tested() {
    let tested = [
        (CniMode::AzureCni, "missing-non-masquerade"),
        (CniMode::Kubenet, "double-snat"),
        (CniMode::AzureCni, "double-snat"),
        (CniMode::Kubenet, "etp-cluster-declared-local"),
        (CniMode::AzureCni, "etp-cluster-declared-local"),
        (CniMode::AzureCniOverlay, "double-snat"),
        (CniMode::AzureCniOverlay, "etp-cluster-declared-local"),
    ];
    for cni in CniMode::ALL {
        for m in Misconfig::all(cni) {
            assert!(
                tested.contains(&(cni, m.name)),
                "{cni} {} has no test",
                m.name
            );
        }
    }
}
