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

use aksnet_tests::agent::{assert_no_failures, of_event, run_scenarios, Agent, Placement};
use aksnet_tests::conntrack::{self, Entry, Witness};
use aksnet_tests::exactness::node_capture;
use aksnet_tests::prometheus::in_netns;
use aksnet_tests::require_root;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use xtask::lab::{ApiServerAccess, CniMode, Host, Lab, LabOptions, Scenario};

/// Where each node's agent serves its metrics, inside that node's namespace.
const METRICS: &str = "127.0.0.1:9965";

/// How long the agent may take to count the flows it was shown: an idle agent reads its ring
/// buffer every 100 ms.
const COUNTED_WITHIN: Duration = Duration::from_secs(2);

/// The sum of `aksnet_model_deviations_total` over its series, scraped from the agent on
/// `netns`; an error if the scrape is not the agent's (no `aksnet_flows_observed_total` within
/// [`COUNTED_WITHIN`]).
fn deviations_counted(netns: &str) -> Result<f64, String> {
    let url = format!("http://{METRICS}/metrics");
    let began = Instant::now();
    let text = loop {
        let text = in_netns(netns, &["curl", "-sS", "--fail", "--max-time", "5", &url])?;
        if text.contains("aksnet_flows_observed_total") {
            break text;
        }
        if began.elapsed() > COUNTED_WITHIN {
            return Err(format!(
                "the scrape of {url} in {netns} is not the agent's:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(text
        .lines()
        .filter(|l| l.starts_with("aksnet_model_deviations_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// What one node's agent and witness saw, checked against the scenarios' expectations there;
/// beyond them, everything else the node saw must be classified and conform too (the test's own
/// scrape of the agent's metrics is on loopback).
fn check_node(
    node: Host,
    scenarios: &[Scenario],
    witnessed: &[Entry],
    lines: &[Value],
    failures: &mut Vec<String>,
) -> usize {
    let on = node.suffix();
    let capture = node_capture(node, scenarios, witnessed, lines);
    failures.extend(capture.failures.iter().map(|f| format!("{on}: {f}")));
    let others = capture.opened.iter().filter(|d| {
        !d.original.dst.ip().is_loopback() && !capture.expected_lines.contains(&d.line)
    });
    for d in others {
        if d.verdict != "conforms" {
            failures.push(format!(
                "{on}: {} ({:?}) on path {:?}: {}",
                d.verdict, d.reason, d.path, d.line
            ));
        }
    }
    capture.opened.len()
}

fn end_to_end(cni: CniMode, source: &str, api_server: ApiServerAccess) {
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
    // too, and the agent must have its report (read from the ring buffer within 100 ms) before
    // the flush ends it.
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
    end_to_end(CniMode::Kubenet, "ebpf", ApiServerAccess::Public);
}

#[test]
fn azure_cni_ebpf() {
    end_to_end(CniMode::AzureCni, "ebpf", ApiServerAccess::Public);
}

#[test]
fn azure_cni_overlay_ebpf() {
    end_to_end(CniMode::AzureCniOverlay, "ebpf", ApiServerAccess::Public);
}

#[test]
fn kubenet_netlink() {
    end_to_end(CniMode::Kubenet, "netlink", ApiServerAccess::Private);
}

#[test]
fn azure_cni_netlink() {
    end_to_end(CniMode::AzureCni, "netlink", ApiServerAccess::Private);
}

#[test]
fn azure_cni_overlay_netlink() {
    end_to_end(
        CniMode::AzureCniOverlay,
        "netlink",
        ApiServerAccess::Private,
    );
}

/// A kubenet lab, and an agent outside it dumping its node with `--source source`.
fn kubenet_lab_watched_from_beside(source: &str) -> (Lab, Agent) {
    let lab = Lab::up(LabOptions::new(CniMode::Kubenet)).unwrap();
    let agent = Agent::start(
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &lab,
        Placement::Beside,
        source,
        &[],
        &[],
    );
    (lab, agent)
}

/// Clients that close with a reset may reuse their port at once: conntrack then ends the old entry
/// and makes a new one for the same tuple, often in the same freed `nf_conn`. Each connection must
/// still be reported opened, and the earlier one ended.
fn reused_client_port(source: &str) {
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::io::{Read, Write};
    use std::net::SocketAddrV4;
    use xtask::lab::layout::plan;

    const CONNECTIONS: usize = 5;
    const CLIENT_PORT: u16 = 41_234;
    require_root();
    let (lab, agent) = kubenet_lab_watched_from_beside(source);
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
    let ours = |v: &&Value| {
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

/// A connection that conntrack deletes right after its handshake must be reported opened and
/// ended. Where `nf_ct_delete` cannot be hooked (this machine), the eBPF capture reports the start
/// and netlink the end, each read on its own timer (10–100 ms), so the end often reaches the flow
/// table first.
#[test]
fn a_connection_deleted_at_once_is_reported_opened_and_ended() {
    use std::net::{SocketAddrV4, TcpStream};
    use xtask::lab::layout::plan;

    const CONNECTIONS: u16 = 60;
    const FIRST_PORT: u16 = 42_000;
    require_root();
    let (lab, agent) = kubenet_lab_watched_from_beside("ebpf");
    let (inet, node) = (lab.netns(Host::Inet), lab.netns(Host::Node));
    let client = std::thread::spawn(move || -> Result<(), String> {
        use socket2::{Domain, SockAddr, Socket, Type};
        xtask::bench::load::enter(&inet).map_err(|e| e.to_string())?;
        let frontend = SockAddr::from(SocketAddrV4::new(plan::FRONTEND_APP, 80));
        for port in FIRST_PORT..FIRST_PORT + CONNECTIONS {
            let local = SocketAddrV4::new(plan::CLIENT, port);
            let socket =
                Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
            socket.bind(&local.into()).map_err(|e| e.to_string())?;
            socket
                .connect_timeout(&frontend, Duration::from_secs(2))
                .map_err(|e| format!("connect from {local}: {e}"))?;
            conntrack::delete_tcp_from(&node, local)?;
            // A reset, which conntrack does not pick up as a new connection, ends it quietly.
            socket
                .set_linger(Some(Duration::ZERO))
                .map_err(|e| e.to_string())?;
            drop(TcpStream::from(socket));
        }
        Ok(())
    });
    let sent = client.join().expect("the client thread panicked");
    // Both sources are read within 100 ms; leave them ample time before stopping the agent.
    std::thread::sleep(Duration::from_millis(300));
    let lines = agent.finish();
    lab.down().unwrap();
    sent.unwrap();
    let count = |event: &str, port: u16| {
        of_event(&lines, event)
            .filter(|v| {
                v["orig"]["sport"] == port && v["orig"]["dst"] == plan::FRONTEND_APP.to_string()
            })
            .count()
    };
    let wrong: Vec<String> = (FIRST_PORT..FIRST_PORT + CONNECTIONS)
        .filter_map(|port| {
            let (opened, ended) = (count("new", port), count("destroy", port));
            (opened != 1 || ended != 1)
                .then(|| format!("client port {port}: opened {opened} times, ended {ended} times"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "each connection must be reported opened once and ended once:\n{}",
        wrong.join("\n")
    );
}
