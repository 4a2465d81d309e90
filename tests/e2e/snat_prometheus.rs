//! Issue 5 end to end: a real Prometheus server on loopback inside the lab's node namespace
//! scrapes the agent, which runs there too (as a hostNetwork DaemonSet pod does) with the fake
//! Kubernetes API naming the lab's pods. After the pod-to-internet scenario opens N connections,
//! a PromQL query through Prometheus's HTTP API must return exactly N SNAT translations of each
//! hop (the node's MASQUERADE, the LB's inferred outbound SNAT) for that pod and path; and a
//! scrape taken in the lab must pass `promtool check metrics`.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml). Needs root and Debian's prometheus.

use aksnet_tests::agent::{assert_no_failures, Agent, Placement};
use aksnet_tests::prometheus::{check_metrics, in_netns, Prometheus};
use aksnet_tests::require_root;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use xtask::lab::{CniMode, Host, Lab, LabOptions, Scenario};

/// Connections the scenario opens, one per run.
const CONNECTIONS: usize = 5;
const METRICS: &str = "127.0.0.1:9965";
const PROMETHEUS: &str = "127.0.0.1:9090";
/// Two scrape intervals and Prometheus's query lag.
const SCRAPED: Duration = Duration::from_secs(10);

fn snat_translations_reach_prometheus(cni: CniMode) {
    require_root();
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let node = lab.node_netns();
    // The agent's API client runs in the node namespace: so does the API.
    let (agent, api) = Agent::start_enriched(
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &lab,
        Placement::OnNode,
        &["--metrics-listen", METRICS],
    );
    let listen: SocketAddr = PROMETHEUS.parse().unwrap();
    let prometheus = Prometheus::start(&node, listen, METRICS.parse().unwrap())
        .unwrap_or_else(|e| panic!("{cni}: {e}"));
    prometheus
        .wait_for("up{job=\"aksnet\"}", SCRAPED, |up| up == 1.0)
        .unwrap()
        .filter(|up| *up == 1.0)
        .unwrap_or_else(|| panic!("{cni}: Prometheus does not scrape the agent"));

    let scenario = Scenario::find(cni, "pod-to-internet").unwrap();
    for _ in 0..CONNECTIONS {
        lab.run(&scenario)
            .unwrap_or_else(|e| panic!("{cni} {}: {e}", scenario.name));
    }
    let pod = lab.layout().pod(Host::PodApp).k8s_name;
    let n = CONNECTIONS as f64;
    let mut failures = Vec::new();
    for hop in ["node_snat", "lb_snat_inferred"] {
        let promql = format!(
            "sum by (path, pod) (aksnet_snat_translations_total\
             {{path=\"pod-to-internet\",pod=\"{pod}\",hop=\"{hop}\"}})"
        );
        let seen = prometheus.wait_for(&promql, SCRAPED, |v| v >= n).unwrap();
        println!("{cni}: {promql} = {seen:?}");
        if seen != Some(n) {
            failures.push(format!("{promql} returned {seen:?}, expected {n}"));
        }
    }
    let scrape = in_netns(
        &node,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ],
    )
    .unwrap();
    if let Err(e) = check_metrics(&scrape) {
        failures.push(e);
    }
    // A second look a few scrapes later: exactly N, not N so far.
    std::thread::sleep(Duration::from_secs(2));
    let total =
        format!("sum(aksnet_snat_translations_total{{path=\"pod-to-internet\",pod=\"{pod}\"}})");
    let later = prometheus.query(&total).unwrap();
    if later.first().map(|(_, v)| *v) != Some(2.0 * n) {
        failures.push(format!("{total} returned {later:?}, expected {}", 2.0 * n));
    }

    drop(prometheus);
    drop(agent);
    drop(api);
    lab.down().unwrap();
    assert_no_failures(cni, &failures);
    println!(
        "{cni}: {CONNECTIONS} connections → Prometheus counts {CONNECTIONS} node SNATs and \
         {CONNECTIONS} LB SNATs for {pod} on pod-to-internet; promtool check metrics passes on a \
         {}-line scrape",
        scrape.lines().count()
    );
}

#[test]
fn kubenet_snat_translations_reach_prometheus() {
    snat_translations_reach_prometheus(CniMode::Kubenet);
}

#[test]
fn azure_cni_snat_translations_reach_prometheus() {
    snat_translations_reach_prometheus(CniMode::AzureCni);
}
