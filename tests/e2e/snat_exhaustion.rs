//! Issue 15 end to end: SNAT exhaustion seen coming. On the kubenet lab, two pods open
//! connections to one internet destination, a few a second, and hold them, until the lab LB's
//! bounded outbound SNAT range (1024 ports) runs out and a connection fails. Meanwhile the agent
//! runs on the node as the DaemonSet does, and a real Prometheus in the node namespace scrapes
//! it every second and evaluates the shipped rules (deploy/components/monitoring). The test
//! asserts that:
//! - the exhaustion alert fires before the first connection fails;
//! - the agent's time-to-exhaustion forecast falls as the ports fill;
//! - the per-destination, per-pod metric names both pods, and the shipped recording rule gives
//!   each about half of the destination's flows;
//! - the failure is the LB running out (its conntrack table holds the SNAT'd connections, and
//!   its insert failures, read by the agent's statistics reader, are those `conntrack -S` shows);
//! - the node's conntrack entries and limit are exported (`nf_conntrack_max` from /proc).
//!
//! Before the fill, inbound scenarios check the client-address counter: an
//! `externalTrafficPolicy: Cluster` Service's connection counts under its Service and kube-proxy's
//! MASQUERADE, an Application Gateway's under the gateway.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml). Needs root and Debian's prometheus.

use aksnet_agent::capture::netns::{Netns, NetnsTarget};
use aksnet_agent::metrics::conntrack::ConntrackReader;
use aksnet_tests::agent::assert_no_failures;
use aksnet_tests::kubeapi::KubeApi;
use aksnet_tests::prometheus::{in_netns, Prometheus};
use aksnet_tests::require_root;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use xtask::lab::layout::plan;
use xtask::lab::{CniMode, Host, Lab, LabOptions, Scenario};

const METRICS: &str = "127.0.0.1:9965";
const PROMETHEUS: &str = "127.0.0.1:9090";
/// The destination both pods exhaust: the lab's internet server, on a port only this test uses.
const DEST_PORT: u16 = 8443;
/// The LB's outbound range for the node (plan::LB_OUTBOUND_PORTS): what runs out.
const LB_PORTS: usize = (plan::LB_OUTBOUND_PORTS.1 - plan::LB_OUTBOUND_PORTS.0) as usize + 1;
/// One connection per pod per step: 8 a second, so the range lasts about two minutes, longer
/// than the alert's `for: 1m`.
const STEP: Duration = Duration::from_millis(250);
/// Bounds on the fill: a few more attempts than ports, and time.
const MAX_STEPS: usize = LB_PORTS / 2 + 100;
const FILL_LIMIT: Duration = Duration::from_secs(300);
/// A connection is failed when its handshake does not finish within this (one SYN retransmit).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Two scrapes and a rule evaluation.
const SETTLE: Duration = Duration::from_secs(4);
const ALERT: &str = "ALERTS{alertname=\"AksnetSnatExhaustionForecast\",alertstate=\"firing\"}";

/// The agent as a DaemonSet runs it (no dump), inside the node namespace, stopped on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts it with the fake API's kubeconfig and waits until its capture is attached and its
    /// enrichment has listed the pods. (tests/src/agent.rs starts dumping agents bounded to two
    /// minutes; this run needs the daemon mode for longer.)
    fn start(lab: &Lab, kubeconfig: &Path) -> Daemon {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.node_netns()])
            .arg(env!("CARGO_BIN_EXE_aksnet-agent"))
            .arg("--config")
            .arg(lab.topology_path())
            .args(["--metrics-listen", METRICS, "--duration", "600"])
            .args(["--allocated-outbound-ports", &LB_PORTS.to_string()])
            .env("RUST_LOG", "info")
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", plan::NODE_NAME)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start aksnet-agent");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                let _ = tx.send(line);
            }
        });
        let daemon = Daemon { child };
        let mut waiting = vec!["capturing conntrack NAT", "kubernetes enrichment synced"];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => waiting.retain(|needle| !line.contains(needle)),
                Err(e) => panic!("the agent did not log {waiting:?} within 30 s: {e}"),
            }
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Accepts and holds connections to the internet server's test port until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Server {
    fn start(inet: &Netns) -> Server {
        let addr = SocketAddr::from((plan::INET_SERVER, DEST_PORT));
        let listener = inet
            .run_in(|| TcpListener::bind(addr))
            .expect("enter the internet namespace")
            .unwrap_or_else(|e| panic!("listen on {addr} in the internet namespace: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            let deadline = Instant::now() + FILL_LIMIT + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("accepting on {addr}: {e}"),
                }
            }
            held.len()
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting and closes every connection; returns how many it accepted.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("server thread")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The rule groups of the shipped PrometheusRule, as a Prometheus rule file.
fn shipped_rules(dir: &Path) -> PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/components/monitoring/check.sh");
    let rules = dir.join("aksnet-rules.yaml");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&rules)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} could not extract the rules",
        script.display()
    );
    rules
}

fn value(prometheus: &Prometheus, promql: &str) -> Option<f64> {
    let result = prometheus.query(promql).unwrap();
    assert!(result.len() <= 1, "{promql} returned {result:?}");
    result.first().map(|(_, v)| *v)
}

#[test]
fn kubenet_snat_exhaustion_is_forecast_and_alerted_before_connections_fail() {
    require_root();
    let lab = Lab::up(LabOptions::new(CniMode::Kubenet)).unwrap_or_else(|e| panic!("lab: {e}"));
    let node = lab.node_netns();
    let api = KubeApi::lab(lab.layout(), Some(&node)).expect("the fake Kubernetes API");
    let kubeconfig = lab.work_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let agent = Daemon::start(&lab, &kubeconfig);
    let rules = shipped_rules(lab.work_dir());
    let prometheus = Prometheus::start_with_rules(
        &node,
        PROMETHEUS.parse().unwrap(),
        METRICS.parse().unwrap(),
        Some(&rules),
    )
    .unwrap();
    prometheus
        .wait_for("up{job=\"aksnet\"}", Duration::from_secs(10), |up| {
            up == 1.0
        })
        .unwrap()
        .filter(|up| *up == 1.0)
        .expect("Prometheus does not scrape the agent");

    let mut failures = Vec::new();
    // Whose client address is lost, and where.
    let app = lab
        .layout()
        .services
        .iter()
        .find(|s| s.lb_ip == Some(plan::FRONTEND_APP))
        .expect("the app Service's LB frontend")
        .namespaced_name();
    for (scenario, service, hop) in [
        ("lb-inbound-tcp", app.as_str(), "kube_proxy_masquerade"),
        ("agic-inbound", "", "application_gateway"),
    ] {
        lab.run(&Scenario::find(CniMode::Kubenet, scenario).unwrap())
            .unwrap_or_else(|e| panic!("{scenario}: {e}"));
        let promql =
            format!("aksnet_client_address_lost_total{{service=\"{service}\",hop=\"{hop}\"}}");
        let seen = prometheus.wait_for(&promql, SETTLE, |n| n >= 1.0).unwrap();
        println!("{scenario}: {promql} = {seen:?}");
        if !seen.is_some_and(|n| n >= 1.0) {
            failures.push(format!(
                "{scenario}: {promql} is {seen:?}, expected at least 1"
            ));
        }
    }

    let open = |host: Host| NetnsTarget::Named(lab.netns(host)).open().unwrap();
    let server = Server::start(&open(Host::Inet));
    let pods = [Host::PodApp, Host::PodIngress].map(|host| {
        let pod = lab.layout().pod(host);
        (open(host), pod.k8s_name)
    });
    let dest = SocketAddr::from((plan::INET_SERVER, DEST_PORT));

    // Fill: one connection per pod per step, held, until one fails.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut failed_at = None;
    let mut alert_at = None;
    let mut forecasts: Vec<(usize, f64)> = Vec::new();
    let started = Instant::now();
    'fill: for step in 0..MAX_STEPS {
        for (netns, name) in &pods {
            let connected = netns
                .run_in(|| TcpStream::connect_timeout(&dest, CONNECT_TIMEOUT))
                .unwrap();
            match connected {
                Ok(stream) => held.push(stream),
                Err(e) => {
                    println!("connection {} from {name} failed: {e}", held.len() + 1);
                    failed_at = Some(held.len());
                    break 'fill;
                }
            }
        }
        if step % 4 == 0 {
            let forecast = "aksnet_lb_snat_exhaustion_forecast_seconds";
            if let Some(seconds) = value(&prometheus, forecast).filter(|s| s.is_finite()) {
                forecasts.push((held.len(), seconds));
            }
            if alert_at.is_none() && !prometheus.query(ALERT).unwrap().is_empty() {
                println!("{ALERT} fired with {} connections open", held.len());
                alert_at = Some(held.len());
            }
        }
        if started.elapsed() > FILL_LIMIT {
            break;
        }
        std::thread::sleep(STEP);
    }
    std::thread::sleep(SETTLE);

    let Some(failed_at) = failed_at else {
        panic!(
            "no connection failed after {} were opened in {:?}: the LB's range did not run out",
            held.len(),
            started.elapsed()
        );
    };
    // The witness: the LB's conntrack holds the SNAT'd connections to the destination.
    let lb_entries = in_netns(
        &lab.netns(Host::Lb),
        &[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "-d",
            &plan::INET_SERVER.to_string(),
            "--dport",
            &DEST_PORT.to_string(),
        ],
    )
    .unwrap()
    .lines()
    .filter(|l| l.contains("ESTABLISHED"))
    .count();
    if !(LB_PORTS * 9 / 10..=LB_PORTS).contains(&lb_entries) {
        failures.push(format!(
            "the LB holds {lb_entries} established connections to {dest}: its {LB_PORTS}-port \
             range did not run out"
        ));
    }
    match alert_at {
        Some(at) if at < failed_at => {}
        Some(at) => failures.push(format!(
            "the exhaustion alert fired at {at} connections, not before the first failure at \
             {failed_at}"
        )),
        None => failures.push(format!(
            "the exhaustion alert never fired before the first failure at {failed_at}"
        )),
    }
    println!("forecasts (connections open, seconds left): {forecasts:?}");
    let falling = forecasts.windows(2).filter(|w| w[1].1 < w[0].1).count();
    match (forecasts.first(), forecasts.last()) {
        (Some(first), Some(last))
            if forecasts.len() >= 5
                && last.1 < first.1 / 2.0
                && falling * 4 >= (forecasts.len() - 1) * 3 => {}
        _ => failures.push(format!(
            "the forecast did not fall as the ports filled: {forecasts:?}"
        )),
    }

    // Who holds the ports: both pods, about half each, by the agent and the shipped rule.
    let selector = format!(
        "dst_ip=\"{}\",dst_port=\"{DEST_PORT}\",proto=\"tcp\"",
        plan::INET_SERVER
    );
    let flows = prometheus
        .query(&format!(
            "aksnet_lb_snat_destination_pod_flows{{{selector}}}"
        ))
        .unwrap();
    let shares = prometheus
        .query(&format!(
            "aksnet:lb_snat_destination_pod_flows:share{{{selector}}}"
        ))
        .unwrap();
    println!("per-pod flows: {flows:?}\nshares: {shares:?}");
    if flows.len() != 2 {
        failures.push(format!("expected two pods holding ports, got {flows:?}"));
    }
    for (_, name) in &pods {
        let of = |samples: &[(serde_json::Value, f64)]| {
            samples
                .iter()
                .find(|(labels, _)| labels["pod"] == *name)
                .map(|(_, v)| *v)
        };
        match (of(&flows), of(&shares)) {
            (Some(n), Some(share))
                if (0.4..=0.6).contains(&share) && n >= (failed_at / 2 - 10) as f64 =>
            {
                println!("{name}: {n} flows, share {share:.3}");
            }
            other => failures.push(format!("{name}: flows and share {other:?}")),
        }
    }
    // Where the LB ran out, conntrack failed to insert the connection it could not SNAT: the
    // statistics reader sees the insert failures `conntrack -S` sees there.
    let lb_stats = ConntrackReader::open(&open(Host::Lb))
        .unwrap()
        .read()
        .unwrap();
    let lb_tool_failures: u64 = in_netns(&lab.netns(Host::Lb), &["conntrack", "-S"])
        .unwrap()
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("insert_failed="))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    println!(
        "LB namespace: {} insert failures (conntrack -S: {lb_tool_failures})",
        lb_stats.insert_failed
    );
    if lb_stats.insert_failed == 0 || lb_stats.insert_failed != lb_tool_failures {
        failures.push(format!(
            "LB namespace insert failures: reader {}, conntrack -S {lb_tool_failures}",
            lb_stats.insert_failed
        ));
    }

    // The node's conntrack pressure, as the agent exports it: the held connections are there.
    let entries = value(&prometheus, "aksnet_conntrack_entries");
    let limit = value(&prometheus, "aksnet_conntrack_entries_limit");
    let proc_max: f64 = in_netns(&node, &["cat", "/proc/sys/net/netfilter/nf_conntrack_max"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if !entries.is_some_and(|n| n >= failed_at as f64) || limit != Some(proc_max) {
        failures.push(format!(
            "conntrack entries {entries:?} (expected at least {failed_at}), limit {limit:?} \
             (nf_conntrack_max {proc_max})"
        ));
    }
    let pressure = value(&prometheus, "aksnet_lb_snat_port_pressure_ratio");
    if !pressure.is_some_and(|p| p >= 0.9) {
        failures.push(format!("pressure at exhaustion is {pressure:?}"));
    }

    drop(held);
    let accepted = server.stop();
    drop(prometheus);
    drop(agent);
    drop(api);
    lab.down().unwrap();
    assert_no_failures("kubenet SNAT exhaustion", &failures);
    println!(
        "kubenet: {failed_at} connections opened ({accepted} accepted) before the first failed; \
         the LB held {lb_entries} of its {LB_PORTS} ports; the exhaustion alert fired at \
         {} connections; the forecast fell from {:.0} s to {:.0} s; pressure {:.3}; node \
         conntrack {} of {} entries",
        alert_at.unwrap(),
        forecasts.first().unwrap().1,
        forecasts.last().unwrap().1,
        pressure.unwrap(),
        entries.unwrap(),
        proc_max
    );
}
