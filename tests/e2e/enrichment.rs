//! The agent's Kubernetes enrichment end to end on the node lab: the agent runs with `KUBECONFIG`
//! and `NODE_NAME` pointing at the fake API server of `aksnet_tests::kubeapi`, which lists the
//! lab's pods and Services, and every scenario's flows must carry the names of the pod and
//! Service addresses they involve, and no name for any other address.
//!
//! The agent may attach its capture before the enrichment has listed the API: the test sends
//! traffic only after the agent logs that the enrichment synced. Built as a test of
//! aksnet-agent (see its Cargo.toml). Needs root.

use aksnet_tests::agent::{assert_no_failures, reported, run_scenarios, Agent, Dumped, Placement};
use aksnet_tests::require_root;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use xtask::lab::layout::plan;
use xtask::lab::{CniMode, Lab, LabOptions, Layout, Proto, Scenario};

/// The names the agent must give a flow: the pods at its original source, original destination
/// and translated destination, and the Service at its original destination (by port, where
/// one LB frontend serves several Services).
fn expected_names(layout: &Layout, d: &Dumped) -> BTreeMap<Ipv4Addr, String> {
    let pod = |ip: Ipv4Addr| {
        layout
            .pods
            .iter()
            .find(|p| p.ip == ip)
            .map(|p| (ip, p.k8s_name.to_string()))
    };
    let service = |proto: Proto, ip: Ipv4Addr, port: u16| {
        let at_ip = || {
            layout
                .services
                .iter()
                .filter(|s| s.cluster_ip == ip || s.lb_ip == Some(ip))
        };
        at_ip()
            .find(|s| s.proto == proto && s.port == port)
            .or_else(|| at_ip().min_by_key(|s| s.namespaced_name()))
            .map(|s| (ip, s.namespaced_name()))
    };
    let (orig, reply) = (d.original, d.reply);
    [
        pod(*orig.src.ip()),
        service(d.proto, *orig.dst.ip(), orig.dst.port()).or_else(|| pod(*orig.dst.ip())),
        pod(*reply.src.ip()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn names_flows(cni: CniMode) {
    require_root();
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    // The agent observes the node through --netns but runs, with its API client, here.
    let (agent, api) = Agent::start_enriched(
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &lab,
        Placement::Beside,
        &[],
    );
    let scenarios = Scenario::all(cni);
    run_scenarios(&lab, &scenarios);
    let opened = agent.finish_opened();
    let layout = lab.layout();

    let mut failures = Vec::new();
    for d in &opened {
        let expected = expected_names(layout, d);
        if d.names != expected {
            failures.push(format!(
                "names {:?}, expected {expected:?}: {}",
                d.names, d.line
            ));
        }
    }
    // Every scenario's flows were seen, so the check above covered each of them.
    for scenario in &scenarios {
        for expected in scenario.expected_on_node() {
            reported(&opened, scenario, expected, &mut failures);
        }
    }
    // The headline case, spelled out: the LB inbound flow names the Service and the pod.
    let app = layout.pod(xtask::lab::Host::PodApp);
    let inbound = opened
        .iter()
        .find(|d| *d.original.dst.ip() == plan::FRONTEND_APP && d.proto == Proto::Tcp);
    match inbound {
        Some(d) => {
            let frontend = d.names.get(&plan::FRONTEND_APP).map(String::as_str);
            let pod = d.names.get(&app.ip).map(String::as_str);
            if frontend != Some("default/app") || pod != Some(app.k8s_name) {
                failures.push(format!("LB inbound flow misnamed: {}", d.line));
            }
        }
        None => failures.push("no LB inbound TCP flow".into()),
    }
    let requests = api.requests();
    drop(api);
    lab.down().unwrap();
    assert_no_failures(cni, &failures);
    println!(
        "{cni}: {} flows, every pod and Service address named ({} API requests); the LB \
         inbound flow {} -> {} names {:?}",
        opened.len(),
        requests.len(),
        inbound
            .map(|d| d.original.src.to_string())
            .unwrap_or_default(),
        inbound
            .map(|d| d.original.dst.to_string())
            .unwrap_or_default(),
        inbound.map(|d| &d.names)
    );
}

#[test]
fn kubenet_flows_carry_pod_and_service_names() {
    names_flows(CniMode::Kubenet);
}

#[test]
fn azure_cni_flows_carry_pod_and_service_names() {
    names_flows(CniMode::AzureCni);
}
