//! The agent on the node lab with no config file at all: it starts, captures every NAT
//! translation exactly, serves metrics that name what it found and what is missing, and classifies
//! what discovery alone allows; what it cannot classify names the missing fact. And discovery
//! runs beside the event loop: an `iptables-save` that hangs does not hold a single event.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml) so that cargo builds the agent binary
//! first. Needs root.

use aksnet_tests::agent::{
    assert_no_failures, dumped, of_event, reported, Agent, Dumped, Placement,
};
use aksnet_tests::conntrack::{self, Witness};
use aksnet_tests::exactness::witness_mismatches;
use aksnet_tests::prometheus::poll_ok;
use aksnet_tests::require_root;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use xtask::lab::{CniMode, Host, Lab, LabOptions, Scenario};

const AGENT: &str = env!("CARGO_BIN_EXE_aksnet-agent");

/// No Kubernetes API for the agent: no kubeconfig where it would look.
const NO_API: &[(&str, &str)] = &[("HOME", "/nonexistent"), ("KUBECONFIG", "")];

/// The agent's metrics listener, inside the lab namespace it runs in (each test has its own lab,
/// so the port is free there), scraped from inside that namespace.
const METRICS_LISTEN: &str = "127.0.0.1:9965";
const METRICS_URL: &str = "http://127.0.0.1:9965";
/// How long an endpoint may take to answer 200.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The facts a lab node cannot reveal without the API or IMDS, and those it reveals (with their
/// source). azure-cni's ip-masq-agent shows the vnet; a kubenet node cannot. kube-proxy's
/// `default/kubernetes` endpoints show the API server on both.
type Revealed = &'static [(&'static str, &'static str)];
fn facts_of(cni: CniMode) -> (&'static [&'static str], Revealed) {
    match cni {
        CniMode::Kubenet => (
            &["vnet_cidrs"],
            &[
                ("cni", "interfaces"),
                ("node_ips", "interfaces"),
                ("pod_cidr", "iptables"),
                ("service_cidr", "iptables"),
                ("lb_frontends", "iptables"),
                ("api_server", "iptables"),
            ],
        ),
        _ => (
            &[],
            &[
                ("cni", "interfaces"),
                ("node_ips", "interfaces"),
                ("vnet_cidrs", "iptables"),
                ("service_cidr", "iptables"),
                ("lb_frontends", "iptables"),
                ("api_server", "iptables"),
            ],
        ),
    }
}

/// Facts only the operator knows, never missed by discovery (most clusters have none), that an
/// unclassified flow's reason may name: peered vnets and on-premises ranges.
const OPERATOR_ONLY: &[&str] = &["private_ranges"];

/// Paths that need a fact no node reveals, the general path such a flow is on without it (the
/// same node NAT), and the fact: an Application Gateway or AGC is a vnet client, a private
/// endpoint a vnet address.
const GENERALISED: &[(&str, &str, &str)] = &[
    ("agic-inbound", "vnet-client-to-pod", "appgw_subnets"),
    ("agc-inbound", "vnet-client-to-pod", "agc_subnets"),
    (
        "pod-to-private-endpoint",
        "pod-to-vnet",
        "private_endpoints",
    ),
];

#[test]
fn kubenet_lab_without_config_captures_exactly_and_names_what_is_missing() {
    without_config(CniMode::Kubenet);
}

#[test]
fn azure_cni_lab_without_config_captures_exactly_and_names_what_is_missing() {
    without_config(CniMode::AzureCni);
}

fn without_config(cni: CniMode) {
    require_root();
    let (unrevealed, revealed) = facts_of(cni);
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let node = lab.node_netns();
    let witness = Witness::start(&node).unwrap();
    // On the node, so that its listener is in the node's namespace; IMDS off, as beside it.
    let mut agent = Agent::start_in(
        Path::new(AGENT),
        &node,
        Placement::OnNode,
        "auto",
        &["--metrics-listen", METRICS_LISTEN, "--no-imds"],
        NO_API,
    );
    let scenarios = Scenario::all(cni);
    for scenario in &scenarios {
        lab.run(scenario)
            .unwrap_or_else(|e| panic!("{cni} scenario {}: {e}", scenario.name));
    }
    // The scrapes are connections on the node too, which the witness and the agent both see.
    let ready = poll_ok(&node, &format!("{METRICS_URL}/readyz"), ANSWER_TIMEOUT);
    let scrape = poll_ok(&node, &format!("{METRICS_URL}/metrics"), ANSWER_TIMEOUT);
    // conntrack -E loses what is still in its socket when stopped: let the last events reach it.
    std::thread::sleep(Duration::from_millis(300));
    let witnessed = witness.finish();
    if !unrevealed.is_empty() {
        agent
            .wait_for_log("topology: missing", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("the agent did not log what is missing: {e}"));
    }
    let lines = agent.finish();
    let opened: Vec<Dumped> = of_event(&lines, "new").filter_map(dumped).collect();
    let mut failures = Vec::new();

    if let Err(e) = &ready {
        failures.push(format!("/readyz: {e}"));
    }
    let scrape = scrape.unwrap_or_else(|e| {
        failures.push(format!("/metrics: {e}"));
        String::new()
    });
    for (fact, source) in revealed {
        let line = format!("aksnet_topology_fact_info{{fact=\"{fact}\",source=\"{source}\"}} 1");
        if !scrape.contains(&line) {
            failures.push(format!("the metrics lack {line}"));
        }
    }
    for fact in unrevealed {
        let line = format!("aksnet_topology_fact_missing{{fact=\"{fact}\"}} 1");
        if !scrape.contains(&line) {
            failures.push(format!("the metrics lack {line}"));
        }
    }
    // Every translation the witness saw, with exact tuples, and nothing else.
    failures.extend(witness_mismatches(&witnessed, &opened));
    // Each scenario's flows: on their path as with the config, or unclassified naming a fact
    // the node does not reveal; never deviating for want of configuration.
    let (mut on_path, mut named, mut general) = (0, Vec::new(), Vec::new());
    for scenario in &scenarios {
        for expected in scenario.expected_on_node() {
            for d in reported(&opened, scenario, expected, &mut failures) {
                let reason = d.reason.as_deref().unwrap_or_default();
                if d.path.as_deref() == Some(expected.path.as_str()) && d.verdict == "conforms" {
                    on_path += 1;
                } else if d.verdict == "unclassified"
                    && unrevealed
                        .iter()
                        .chain(OPERATOR_ONLY)
                        .any(|f| reason.contains(f))
                {
                    named.push(scenario.name);
                } else if let Some((_, _, fact)) = GENERALISED.iter().find(|(specific, path, _)| {
                    expected.path.as_str() == *specific
                        && d.path.as_deref() == Some(*path)
                        && d.verdict == "conforms"
                }) {
                    general.push(format!("{} (without {fact})", scenario.name));
                } else {
                    failures.push(format!(
                        "{}: {:?} {} ({reason}), expected {} or unclassified naming a missing fact",
                        scenario.name,
                        d.path,
                        d.verdict,
                        expected.path.as_str()
                    ));
                }
            }
        }
    }
    lab.down().unwrap();
    assert_no_failures(format_args!("{cni} lab without config"), &failures);
    println!(
        "{cni} without config: {} flows, all {} witnessed by conntrack -E; {on_path} on their \
         path and conforming, {} unclassified naming a fact the node does not reveal: {}; {} on \
         the general path: {}",
        opened.len(),
        witnessed.len(),
        named.len(),
        named.join(", "),
        general.len(),
        general.join(", ")
    );
}

/// Files of a stand-in `iptables-save` that blocks until the test releases it.
struct SlowIptables {
    dir: std::path::PathBuf,
}

impl SlowIptables {
    fn new() -> SlowIptables {
        let dir = std::env::temp_dir().join(format!("aksnet-slow-iptables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("iptables-save");
        // Bounded: gives up after 60 s even if the test never releases it.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n: > {dir}/called\nn=0\nwhile [ ! -e {dir}/release ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\nexec /usr/sbin/iptables-save \"$@\"\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        SlowIptables { dir }
    }

    fn called(&self) -> bool {
        self.dir.join("called").exists()
    }

    fn release(&self) {
        std::fs::write(self.dir.join("release"), "").unwrap();
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

impl Drop for SlowIptables {
    fn drop(&mut self) {
        self.release();
        // The agent's stuck child sees the release within 0.1 s; then nothing uses the files.
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_hanging_iptables_save_does_not_hold_events() {
    require_root();
    let cni = CniMode::Kubenet;
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let slow = SlowIptables::new();
    let path = slow.path_env();
    let mut env = NO_API.to_vec();
    env.push(("PATH", &path));
    let mut agent = Agent::start(
        Path::new(AGENT),
        &lab,
        Placement::Beside,
        "auto",
        &["--topology-refresh", "1"],
        &env,
    );
    agent
        .wait_for_log("discovery did not finish within", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the agent waited for discovery instead of capturing: {e}"));
    assert!(slow.called(), "discovery never ran iptables-save");
    let scenario = Scenario::find(cni, "lb-inbound-tcp").unwrap();
    lab.run(&scenario).unwrap();
    // The flows must come out while iptables-save still hangs: the agent stops (SIGTERM) and
    // shows what it handled; nothing has released the stand-in yet.
    let lines = agent.finish();
    assert!(
        !slow.dir.join("release").exists(),
        "released before the events were checked"
    );
    let opened: Vec<Dumped> = of_event(&lines, "new").filter_map(dumped).collect();
    let mut failures = Vec::new();
    for expected in scenario.expected_on_node() {
        for d in reported(&opened, &scenario, expected, &mut failures) {
            // With the config alone the flow is still classified.
            if d.path.as_deref() != Some(expected.path.as_str()) {
                failures.push(format!("{}: {}", scenario.name, d.line));
            }
        }
    }
    drop(slow);
    lab.down().unwrap();
    assert_no_failures("events while iptables-save hangs", &failures);
}

/// A namespace with only NAT rules and no Kubernetes at all: the lab's Azure side, whose
/// outbound SNAT translates the node's traffic to the internet. No config, no API: the dump
/// reports every translation `conntrack -E` sees, unclassified for want of the network mode;
/// the daemon serves metrics and is ready; `topology` lists what is missing.
#[test]
fn a_plain_host_with_only_nat_rules() {
    require_root();
    let cni = CniMode::Kubenet;
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let host = lab.netns(Host::Lb);
    // The daemon, on the host (its listener there), killed by Agent's Drop if the test panics.
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &host, AGENT])
        .args(["--metrics-listen", METRICS_LISTEN, "--no-imds"])
        .args(["--duration", "120"])
        .envs(NO_API.iter().copied())
        .env("RUST_LOG", "info");
    let daemon = Agent::spawn(command).unwrap_or_else(|e| panic!("the daemon did not attach: {e}"));
    // Ready before the witness starts, so that this poll is not among what it sees.
    let ready = poll_ok(&host, &format!("{METRICS_URL}/readyz"), ANSWER_TIMEOUT);
    let witness = Witness::start(&host).unwrap();
    let dump = Agent::start_in(
        Path::new(AGENT),
        &host,
        Placement::Beside,
        "auto",
        &[],
        NO_API,
    );
    let scenario = Scenario::find(cni, "pod-to-internet").unwrap();
    lab.run(&scenario).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let witnessed = witness.finish();
    let lines = dump.finish();
    // After the dump stopped, so that this scrape is not among what it reports.
    let scrape = poll_ok(&host, &format!("{METRICS_URL}/metrics"), ANSWER_TIMEOUT);
    // Stops it with SIGTERM and fails unless it exits 0.
    daemon.finish();
    let topology = Command::new(AGENT)
        .args(["topology", "--netns", &host, "--no-imds"])
        .envs(NO_API.iter().copied())
        .output()
        .unwrap();
    lab.down().unwrap();

    let opened: Vec<Dumped> = of_event(&lines, "new").filter_map(dumped).collect();
    let mut failures = Vec::new();
    if let Err(e) = ready {
        failures.push(format!("/readyz: {e}"));
    }
    for line in [
        "aksnet_topology_fact_missing{fact=\"cni\"} 1",
        "aksnet_topology_fact_missing{fact=\"vnet_cidrs\"} 1",
    ] {
        if !scrape.as_deref().unwrap_or_default().contains(line) {
            failures.push(format!("the daemon's metrics lack {line}"));
        }
    }
    let snat: Vec<&conntrack::Entry> = witnessed
        .iter()
        .filter(|e| e.original.src != e.reply.dst)
        .collect();
    if snat.is_empty() {
        failures.push("conntrack -E saw no SNAT on the Azure side".into());
    }
    failures.extend(witness_mismatches(&witnessed, &opened));
    for d in &opened {
        if d.verdict != "unclassified" || !d.reason.as_deref().unwrap_or_default().contains("--cni")
        {
            failures.push(format!("not unclassified for want of --cni: {}", d.line));
        }
    }
    let listing = String::from_utf8_lossy(&topology.stdout);
    if !topology.status.success() || !listing.contains("missing: `cni` (give it with --cni") {
        failures.push(format!("topology: {listing}"));
    }
    assert_no_failures("a host with only NAT rules", &failures);
    println!(
        "plain host: {} connections witnessed ({} SNATed), each dumped with exact tuples and \
         unclassified for want of --cni; the daemon was ready and exported what is missing",
        witnessed.len(),
        snat.len()
    );
}
