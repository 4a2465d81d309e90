//! The agent end to end on the node lab: for each CNI and each capture source, an agent's
//! `--dump --output json` runs on each of the lab's two nodes (inside the node's namespace, as
//! the DaemonSet's hostNetwork pod does) while every scenario sends its traffic, with
//! `conntrack -E` beside each as an independent witness. On each node, every connection must
//! appear exactly once with the exact original and translated tuples, the same as the witness
//! saw, on the documented AKS path, conforming to the model, and be reported ended once when
//! conntrack ends it; and `aksnet_model_deviations_total` must stay 0: a clean lab has no
//! false positives. The eBPF runs use a public API server, the netlink runs a private one.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml) so that cargo builds the agent binary
//! fresh before it runs; the file lives here with the other end-to-end tests. Needs root.

use aksnet_tests::agent::{
    assert_no_failures, dumped, of_event, reported, run_scenarios, Agent, Dumped, Placement,
};
use aksnet_tests::conntrack::{self, Entry, Witness};
use aksnet_tests::prometheus::in_netns;
use aksnet_tests::require_root;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use xtask::lab::{ApiServerAccess, Cni, Host, Lab, LabOptions, NatKind, Scenario};

/// Where each node's agent serves its metrics, inside that node's namespace.
const METRICS: &str = "127.0.0.1:9965";

fn nat_names(kind: NatKind) -> Vec<&'static str> {
    match kind {
        NatKind::None => vec![],
        NatKind::Dnat => vec!["dnat"],
        NatKind::Snat => vec!["snat"],
        NatKind::DnatSnat => vec!["dnat", "snat"],
    }
}

/// The sum of `aksnet_model_deviations_total` over its series, scraped from the agent on
/// `netns`; an error if the scrape is not the agent's (no `aksnet_flows_observed_total`).
fn deviations_counted(netns: &str) -> Result<f64, String> {
    let url = format!("http://{METRICS}/metrics");
    let text = in_netns(netns, &["curl", "-sS", "--fail", "--max-time", "5", &url])?;
    if !text.contains("aksnet_flows_observed_total") {
        return Err(format!(
            "the scrape of {url} in {netns} is not the agent's:\n{text}"
        ));
    }
    Ok(text
        .lines()
        .filter(|l| l.starts_with("aksnet_model_deviations_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// What one node's agent and witness saw, checked against the scenarios' expectations there.
fn check_node(
    node: Host,
    scenarios: &[Scenario],
    witnessed: &[Entry],
    lines: &[Value],
    failures: &mut Vec<String>,
) -> usize {
    let on = node.suffix();
    let opened: Vec<Dumped> = of_event(lines, "new").filter_map(dumped).collect();
    let ended: Vec<Dumped> = of_event(lines, "destroy").filter_map(dumped).collect();

    // Exactly once: no connection is reported opened twice.
    for (i, a) in opened.iter().enumerate() {
        if opened[..i]
            .iter()
            .any(|b| b.proto == a.proto && b.original == a.original)
        {
            failures.push(format!("{on}: reported twice: {}", a.line));
        }
    }
    // Every connection ends once, with the translation it opened with.
    for d in &opened {
        let ends = ended
            .iter()
            .filter(|e| e.proto == d.proto && e.original == d.original);
        match ends.collect::<Vec<_>>().as_slice() {
            [end] if end.reply == d.reply => {}
            [] => failures.push(format!("{on}: never reported ended: {}", d.line)),
            many => failures.push(format!("{on}: {} ends for {}", many.len(), d.line)),
        }
    }
    // The witness and the agent agree on every NAT translation, both ways.
    let same = |d: &Dumped, e: &Entry| {
        d.proto == e.proto && d.original == e.original && d.reply == e.reply
    };
    for entry in witnessed {
        if !opened.iter().any(|d| same(d, entry)) {
            failures.push(format!(
                "{on}: conntrack -E saw it, the agent did not: {}",
                entry.line
            ));
        }
    }
    for d in &opened {
        if !witnessed.iter().any(|e| same(d, e)) {
            failures.push(format!(
                "{on}: the agent reported it, conntrack -E did not: {}",
                d.line
            ));
        }
    }
    // Every scenario's expected entries on this node: right tuples, NAT, path and verdict.
    let mut expected_flows: Vec<&str> = Vec::new();
    for scenario in scenarios {
        for expected in scenario.expected_on(node) {
            for d in reported(&opened, scenario, expected, failures) {
                expected_flows.push(&d.line);
                if d.nat != nat_names(expected.nat) {
                    failures.push(format!(
                        "{} on {on}: NAT {:?}, expected {expected}",
                        scenario.name, d.nat
                    ));
                }
                if d.path.as_deref() != Some(expected.path.as_str()) || d.verdict != "conforms" {
                    failures.push(format!(
                        "{} on {on}: classified {:?} {} ({:?}), expected {} conforms: {}",
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
    // Everything else the node saw is classified and conforms too; the test's own scrape of
    // the agent's metrics is on loopback.
    let others = opened
        .iter()
        .filter(|d| !d.original.dst.ip().is_loopback() && !expected_flows.contains(&&*d.line));
    for d in others {
        if d.verdict != "conforms" {
            failures.push(format!(
                "{on}: {} ({:?}) on path {:?}: {}",
                d.verdict, d.reason, d.path, d.line
            ));
        }
    }
    opened.len()
}

fn end_to_end(cni: Cni, source: &str, api_server: ApiServerAccess) {
    require_root();
    let started = Instant::now();
    let lab = Lab::up(LabOptions {
        api_server,
        ..LabOptions::new(cni)
    })
    .unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let observers: Vec<(Host, Witness, Agent)> = Host::NODES
        .into_iter()
        .map(|node| {
            let witness = Witness::start(&lab.netns(node)).unwrap();
            let agent = Agent::start_on(
                Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
                &lab,
                node,
                Placement::OnNode,
                source,
                &["--metrics-listen", METRICS],
                &[],
            );
            (node, witness, agent)
        })
        .collect();
    let scenarios = lab.scenarios();
    run_scenarios(&lab, &scenarios);
    let mut failures = Vec::new();
    // Every node is scraped before any table is flushed: the scrape is a connection on the node
    // too, and the agent must have its report (read from the ring buffer at least every 10 ms)
    // before the flush ends it.
    for (node, _, _) in &observers {
        match deviations_counted(&lab.netns(*node)) {
            Ok(0.0) => {}
            Ok(n) => failures.push(format!(
                "{}: aksnet_model_deviations_total is {n} on a clean lab",
                node.suffix()
            )),
            Err(e) => failures.push(format!("{}: {e}", node.suffix())),
        }
    }
    // conntrack -E loses what is still in its socket when stopped: let the last events reach it.
    std::thread::sleep(Duration::from_millis(300));
    let mut summary = Vec::new();
    for (node, witness, agent) in observers {
        let netns = lab.netns(node);
        let witnessed = witness.finish();
        // Flushing the node's table ends every connection now, so each must also be reported ended.
        conntrack::flush(&netns).unwrap();
        let lines = agent.finish();
        let flows = check_node(node, &scenarios, &witnessed, &lines, &mut failures);
        summary.push(format!(
            "{}: {flows} flows, {} witnessed",
            node.suffix(),
            witnessed.len()
        ));
    }
    let ran = started.elapsed();
    lab.down().unwrap();
    assert_no_failures(
        format_args!("{cni} with --source {source}, {api_server} API server"),
        &failures,
    );
    println!(
        "{cni} --source {source} ({api_server} API server): {}; every flow reported once, \
         witnessed, classified and conforming, no deviation counted ({} scenarios in {ran:?}, \
         teardown {:?})",
        summary.join(", "),
        scenarios.len(),
        started.elapsed() - ran
    );
}

#[test]
fn kubenet_ebpf() {
    end_to_end(Cni::Kubenet, "ebpf", ApiServerAccess::Public);
}

#[test]
fn azure_cni_ebpf() {
    end_to_end(Cni::AzureCni, "ebpf", ApiServerAccess::Public);
}

#[test]
fn azure_cni_overlay_ebpf() {
    end_to_end(Cni::AzureCniOverlay, "ebpf", ApiServerAccess::Public);
}

#[test]
fn kubenet_netlink() {
    end_to_end(Cni::Kubenet, "netlink", ApiServerAccess::Private);
}

#[test]
fn azure_cni_netlink() {
    end_to_end(Cni::AzureCni, "netlink", ApiServerAccess::Private);
}

#[test]
fn azure_cni_overlay_netlink() {
    end_to_end(Cni::AzureCniOverlay, "netlink", ApiServerAccess::Private);
}

/// Clients that close with a reset may reuse their port at once: conntrack then ends the old entry
/// and makes a new one for the same tuple, often in the same freed `nf_conn`. Each connection must
/// still be reported opened, and the earlier one ended.
fn reused_client_port(source: &str) {
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::io::{Read, Write};
    use std::net::SocketAddrV4;
    use xtask::lab::topology::plan;

    const CONNECTIONS: usize = 5;
    const CLIENT_PORT: u16 = 41_234;
    require_root();
    let lab = Lab::up(LabOptions::new(Cni::Kubenet)).unwrap();
    let agent = Agent::start(
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &lab,
        Placement::Beside,
        source,
        &[],
        &[],
    );
    let inet = lab.netns(Host::Inet);
    let client = std::thread::spawn(move || {
        xtask::bench::load::enter(&inet).unwrap();
        let local = SockAddr::from(SocketAddrV4::new(plan::CLIENT, CLIENT_PORT));
        let frontend = SockAddr::from(SocketAddrV4::new(plan::FRONTEND_APP, 80));
        // The client's kernel may hold the tuple a moment after the reset: retry, bounded.
        let connect = || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&local)?;
            socket.connect_timeout(&frontend, Duration::from_secs(2))?;
            Ok(socket)
        };
        for _ in 0..CONNECTIONS {
            let socket = (0..20)
                .find_map(|_| {
                    connect()
                        .inspect_err(|_| std::thread::sleep(Duration::from_millis(50)))
                        .ok()
                })
                .expect("the client could not connect from its port within 1 s");
            let mut stream = std::net::TcpStream::from(socket);
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            assert!(answer.starts_with(b"HTTP/1."), "no HTTP answer");
            // A reset instead of FIN: no TIME_WAIT, so the next connect reuses the tuple now.
            Socket::from(stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    });
    client.join().expect("the client thread failed");
    let lines = agent.finish();
    let ours = |v: &&serde_json::Value| {
        v["orig"]["sport"] == CLIENT_PORT && v["orig"]["dst"] == plan::FRONTEND_APP.to_string()
    };
    let opened: Vec<String> = of_event(&lines, "new")
        .filter(ours)
        .map(|v| v.to_string())
        .collect();
    let ended = of_event(&lines, "destroy").filter(ours).count();
    lab.down().unwrap();
    assert_eq!(
        opened.len(),
        CONNECTIONS,
        "--source {source}: connections reported opened:\n{}",
        opened.join("\n")
    );
    assert!(
        ended >= CONNECTIONS - 1,
        "--source {source}: only {ended} earlier connections reported ended"
    );
}

#[test]
fn reused_client_port_ebpf() {
    reused_client_port("ebpf");
}

#[test]
fn reused_client_port_netlink() {
    reused_client_port("netlink");
}
