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
use aksnet_tests::require_root;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xtask::lab::{Cni, Host, Lab, LabOptions, Scenario};

const AGENT: &str = env!("CARGO_BIN_EXE_aksnet-agent");

/// No Kubernetes API for the agent: no kubeconfig where it would look.
const NO_API: &[(&str, &str)] = &[("HOME", "/nonexistent"), ("KUBECONFIG", "")];

/// `GET path` on the agent's metrics listener: the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// A free port on loopback for the agent's metrics.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The facts a lab node cannot reveal without the API or IMDS, and those it reveals (with their
/// source). azure-cni's ip-masq-agent shows the vnet; a kubenet node cannot.
type Revealed = &'static [(&'static str, &'static str)];
fn facts_of(cni: Cni) -> (&'static [&'static str], Revealed) {
    match cni {
        Cni::Kubenet => (
            &["vnet_cidrs", "api_server"],
            &[
                ("cni", "interfaces"),
                ("node_ips", "interfaces"),
                ("pod_cidr", "iptables"),
                ("service_cidr", "iptables"),
                ("lb_frontends", "iptables"),
            ],
        ),
        _ => (
            &["api_server"],
            &[
                ("cni", "interfaces"),
                ("node_ips", "interfaces"),
                ("vnet_cidrs", "iptables"),
                ("service_cidr", "iptables"),
                ("lb_frontends", "iptables"),
            ],
        ),
    }
}

/// Paths that need a fact no node reveals, the general path such a flow is on without it (the
/// same node NAT), and the fact: an Application Gateway is a vnet client, a private endpoint a
/// vnet address.
const GENERALISED: &[(&str, &str, &str)] = &[
    ("agic-inbound", "vnet-client-to-pod", "appgw_subnets"),
    (
        "pod-to-private-endpoint",
        "pod-to-vnet",
        "private_endpoints",
    ),
];

#[test]
fn kubenet_lab_without_config_captures_exactly_and_names_what_is_missing() {
    without_config(Cni::Kubenet);
}

#[test]
fn azure_cni_lab_without_config_captures_exactly_and_names_what_is_missing() {
    without_config(Cni::AzureCni);
}

fn without_config(cni: Cni) {
    require_root();
    let (unrevealed, revealed) = facts_of(cni);
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let node = lab.node_netns();
    let witness = Witness::start(&node).unwrap();
    let metrics = free_port();
    let listen = metrics.to_string();
    let mut agent = Agent::start_in(
        Path::new(AGENT),
        &node,
        Placement::Beside,
        "auto",
        &["--metrics-listen", &listen],
        NO_API,
    );
    let scenarios = Scenario::all(cni);
    for scenario in &scenarios {
        lab.run(scenario)
            .unwrap_or_else(|e| panic!("{cni} scenario {}: {e}", scenario.name));
    }
    let (ready, _) = get(metrics, "/readyz");
    let (status, scrape) = get(metrics, "/metrics");
    // conntrack -E loses what is still in its socket when stopped: let the last events reach it.
    std::thread::sleep(Duration::from_millis(300));
    let witnessed = witness.finish();
    agent
        .wait_for_log("topology: missing", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the agent did not log what is missing: {e}"));
    let lines = agent.finish();
    let opened: Vec<Dumped> = of_event(&lines, "new").filter_map(dumped).collect();
    let mut failures = Vec::new();

    if !ready.contains("200") || !status.contains("200") {
        failures.push(format!("/readyz: {ready}, /metrics: {status}"));
    }
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
                        .any(|f| reason.contains(&format!("`{f}`")))
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
    let cni = Cni::Kubenet;
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

/// GETs `path` until it answers 200, for at most 30 s.
fn wait_ok(addr: SocketAddr, path: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            let (status, body) = get(addr, path);
            if status.contains(" 200") {
                return Ok(body);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{path} on {addr} did not answer 200 within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A namespace with only NAT rules and no Kubernetes at all: the lab's Azure side, whose
/// outbound SNAT translates the node's traffic to the internet. No config, no API: the dump
/// reports every translation `conntrack -E` sees, unclassified for want of the network mode;
/// the daemon serves metrics and is ready; `topology` lists what is missing.
#[test]
fn a_plain_host_with_only_nat_rules() {
    require_root();
    let cni = Cni::Kubenet;
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let host = lab.netns(Host::Lb);
    let witness = Witness::start(&host).unwrap();
    let metrics = free_port();
    let listen = metrics.to_string();
    let mut daemon = Command::new(AGENT)
        .args([
            "--netns",
            &host,
            "--metrics-listen",
            &listen,
            "--duration",
            "120",
        ])
        .envs(NO_API.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dump = Agent::start_in(
        Path::new(AGENT),
        &host,
        Placement::Beside,
        "auto",
        &[],
        NO_API,
    );
    let ready = wait_ok(metrics, "/readyz");
    let scenario = Scenario::find(cni, "pod-to-internet").unwrap();
    lab.run(&scenario).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let witnessed = witness.finish();
    let scrape = wait_ok(metrics, "/metrics");
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    let daemon_exit = daemon.wait().unwrap();
    let lines = dump.finish();
    let topology = Command::new(AGENT)
        .args(["topology", "--netns", &host])
        .envs(NO_API.iter().copied())
        .output()
        .unwrap();
    lab.down().unwrap();

    let opened: Vec<Dumped> = of_event(&lines, "new").filter_map(dumped).collect();
    let mut failures = Vec::new();
    if let Err(e) = ready {
        failures.push(e);
    }
    if !daemon_exit.success() {
        failures.push(format!("the daemon exited with {daemon_exit}"));
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
    for entry in &witnessed {
        let reported = opened.iter().find(|d| {
            d.proto == entry.proto && d.original == entry.original && d.reply == entry.reply
        });
        match reported {
            None => failures.push(format!(
                "conntrack -E saw it, the dump did not: {}",
                entry.line
            )),
            Some(d)
                if d.verdict != "unclassified"
                    || !d.reason.as_deref().unwrap_or_default().contains("--cni") =>
            {
                failures.push(format!("not unclassified for want of --cni: {}", d.line))
            }
            Some(_) => {}
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
