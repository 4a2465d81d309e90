//! The ctnetlink capture against the real kernel, in namespaces this test creates (root only).
//!
//! client ns (203.0.113.10) → "node" ns (DNAT 192.0.2.10:80/tcp → 10.244.0.10:8080 and
//! 192.0.2.10:53/udp → 10.244.0.10:5353, MASQUERADE toward the pod side) → server ns
//! (10.244.0.10). The capture runs in the node ns; `conntrack -E` in the same namespace is the
//! witness. Nothing links to the host namespace, and every loop is bounded.

use aksnet_agent::capture::netlink::{NetlinkCapture, NetlinkOptions};
use aksnet_agent::capture::netns::{IfNames, Netns, NetnsTarget};
use aksnet_agent::capture::CaptureHealth;
use aksnet_agent::events::{EventKind, FlowEvent, Proto, Tuple};
use aksnet_common::ct_status;
use aksnet_tests::run;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const CLIENT: &str = "203.0.113.10";
const FRONTEND: &str = "192.0.2.10";
const NODE_POD_SIDE: &str = "10.244.0.1";
const POD: &str = "10.244.0.10";
const CONNECTIONS: usize = 3;
const EVENTS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_events";

/// Namespaces made for one test, deleted on drop even when the test fails.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(roles: &[&str]) -> Namespaces {
        let mut made = Namespaces(Vec::new());
        for role in roles {
            let name = format!("aksnet-nl-{}-{role}", std::process::id());
            run(&["ip", "netns", "add", &name]);
            made.0.push(name.clone());
            run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        }
        made
    }

    fn name(&self, i: usize) -> &str {
        &self.0[i]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn exec_in(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Appends `rule` (chain first) to the nat table of `ns`.
fn nat_rule(ns: &str, rule: &[&str]) {
    let mut full = vec!["iptables", "-t", "nat", "-A"];
    full.extend_from_slice(rule);
    exec_in(ns, &full);
}

fn open(ns: &str) -> Netns {
    NetnsTarget::Named(ns.to_string()).open().unwrap()
}

fn read_events_sysctl(ns: &Netns) -> String {
    ns.run_in(|| std::fs::read_to_string(EVENTS_SYSCTL).unwrap())
        .unwrap()
        .trim()
        .to_string()
}

fn build_lab() -> Namespaces {
    let lab = Namespaces::create(&["client", "node", "server"]);
    let (client, node, server) = (lab.name(0), lab.name(1), lab.name(2));
    run(&[
        "ip", "-n", node, "link", "add", "n0", "type", "veth", "peer", "name", "c0", "netns",
        client,
    ]);
    run(&[
        "ip", "-n", node, "link", "add", "n1", "type", "veth", "peer", "name", "s0", "netns",
        server,
    ]);
    for (ns, dev, addr) in [
        (client, "c0", "203.0.113.10/24"),
        (node, "n0", "203.0.113.1/24"),
        (node, "n1", "10.244.0.1/24"),
        (server, "s0", "10.244.0.10/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    run(&[
        "ip",
        "-n",
        client,
        "route",
        "add",
        "default",
        "via",
        "203.0.113.1",
    ]);
    exec_in(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (proto, port, to) in [
        ("tcp", "80", "10.244.0.10:8080"),
        ("udp", "53", "10.244.0.10:5353"),
    ] {
        nat_rule(
            node,
            &[
                "PREROUTING",
                "-d",
                FRONTEND,
                "-p",
                proto,
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
                to,
            ],
        );
    }
    nat_rule(node, &["POSTROUTING", "-o", "n1", "-j", "MASQUERADE"]);
    lab
}

/// Echoes `CONNECTIONS` TCP connections and `CONNECTIONS` UDP datagrams, or gives up at the
/// deadline. The sockets were bound inside the server namespace and stay there.
fn respond(tcp: TcpListener, udp: UdpSocket) {
    tcp.set_nonblocking(true).unwrap();
    udp.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut tcp_done, mut udp_done) = (0, 0);
    let mut buf = [0u8; 64];
    while (tcp_done < CONNECTIONS || udp_done < CONNECTIONS) && Instant::now() < deadline {
        if let Ok((mut stream, _)) = tcp.accept() {
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            if let Ok(n) = stream.read(&mut buf) {
                let _ = stream.write_all(&buf[..n]);
            }
            tcp_done += 1;
        }
        if let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
            udp_done += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tcp_exchange() -> u16 {
    let to: SocketAddr = format!("{FRONTEND}:80").parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    stream.local_addr().unwrap().port()
}

fn udp_exchange() -> u16 {
    let sock = UdpSocket::bind(format!("{CLIENT}:0")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock.connect(format!("{FRONTEND}:53")).unwrap();
    sock.send(b"query").unwrap();
    let mut back = [0u8; 16];
    let n = sock.recv(&mut back).unwrap();
    assert_eq!(&back[..n], b"query");
    sock.local_addr().unwrap().port()
}

fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
    Tuple {
        src: src.parse().unwrap(),
        sport,
        dst: dst.parse().unwrap(),
        dport,
    }
}

/// (kind, proto, original tuple, reply tuple): what both the capture and the witness report.
type Seen = (EventKind, Proto, Tuple, Tuple);

fn seen(ev: &FlowEvent) -> Seen {
    (ev.kind, ev.proto, ev.orig, ev.reply)
}

/// Receives events until `want` of them match `keep`, or the deadline passes.
fn collect(
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<FlowEvent>,
    want: usize,
    keep: impl Fn(&FlowEvent) -> bool,
) -> Vec<FlowEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rt.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
            Ok(Some(ev)) if keep(&ev) => got.push(ev),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // Anything more arriving shortly after would be a duplicate.
    while let Ok(Some(ev)) =
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), rx.recv()).await })
    {
        if keep(&ev) {
            got.push(ev);
        }
    }
    got
}

/// `conntrack -E` in a namespace, stopped with SIGTERM so it flushes its output.
struct Witness(Child);

impl Witness {
    fn start(ns: &str) -> Witness {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "conntrack", "-E", "-e", "NEW,DESTROY"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("could not start conntrack -E");
        // Ready once its namespace shows a NETLINK_NETFILTER socket with groups joined.
        let table = format!("/proc/{}/net/netlink", child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !subscribed(&std::fs::read_to_string(&table).unwrap_or_default()) {
            assert!(Instant::now() < deadline, "conntrack -E did not subscribe");
            std::thread::sleep(Duration::from_millis(20));
        }
        Witness(child)
    }

    fn finish(mut self) -> Vec<Seen> {
        // `ip netns exec` execs conntrack, so this pid is conntrack's.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let mut out = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = self.0.wait();
        out.lines().filter_map(parse_witness_line).collect()
    }
}

/// `/proc/net/netlink` columns: sk Eth Pid Groups ...; NETLINK_NETFILTER is 12.
fn subscribed(table: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1] == "12" && !cols[3].trim_start_matches('0').is_empty()
    })
}

impl Drop for Witness {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `[NEW] tcp 6 120 SYN_SENT src=A dst=B sport=P dport=Q [UNREPLIED] src=.. dst=.. sport=.. dport=..`
fn parse_witness_line(line: &str) -> Option<Seen> {
    let kind = match line.split_whitespace().next()? {
        "[NEW]" => EventKind::New,
        "[DESTROY]" => EventKind::Destroy,
        _ => return None,
    };
    let proto = match line.split_whitespace().nth(1)? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let values: Vec<&str> = line
        .split_whitespace()
        .filter_map(|w| {
            let (key, value) = w.split_once('=')?;
            ["src", "dst", "sport", "dport"]
                .contains(&key)
                .then_some(value)
        })
        .collect();
    let t = |v: &[&str]| -> Option<Tuple> {
        Some(tuple(v[0], v[2].parse().ok()?, v[1], v[3].parse().ok()?))
    };
    if values.len() < 8 {
        return None;
    }
    Some((kind, proto, t(&values[0..4])?, t(&values[4..8])?))
}

#[test]
fn netlink_capture_reports_dnat_and_masquerade_exactly_once() {
    aksnet_tests::require_root();
    let lab = build_lab();
    let (client, node, server) = (open(lab.name(0)), open(lab.name(1)), open(lab.name(2)));

    // Event delivery off in the observed namespace: the capture must turn it on there only.
    let host_before = std::fs::read_to_string(EVENTS_SYSCTL).unwrap();
    exec_in(
        lab.name(1),
        &["sysctl", "-qw", "net.netfilter.nf_conntrack_events=0"],
    );
    assert_eq!(read_events_sysctl(&node), "0");

    let witness = Witness::start(lab.name(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let health = Arc::new(CaptureHealth::default());
    let capture = NetlinkCapture::start(&node, tx, health.clone()).unwrap();
    assert_eq!(read_events_sysctl(&node), "1");
    assert_eq!(std::fs::read_to_string(EVENTS_SYSCTL).unwrap(), host_before);

    let (listener, udp) = server
        .run_in(|| {
            (
                TcpListener::bind(format!("{POD}:8080")).unwrap(),
                UdpSocket::bind(format!("{POD}:5353")).unwrap(),
            )
        })
        .unwrap();
    let responder = std::thread::spawn(move || respond(listener, udp));
    let mut tcp_ports = Vec::new();
    let mut udp_ports = Vec::new();
    for _ in 0..CONNECTIONS {
        tcp_ports.push(client.run_in(tcp_exchange).unwrap());
        udp_ports.push(client.run_in(udp_exchange).unwrap());
    }
    responder.join().unwrap();

    // MASQUERADE keeps the client's port when nothing collides, as here.
    let mut expected_new = HashSet::new();
    for &p in &tcp_ports {
        expected_new.insert((
            Proto::Tcp,
            tuple(CLIENT, p, FRONTEND, 80),
            tuple(POD, 8080, NODE_POD_SIDE, p),
        ));
    }
    for &p in &udp_ports {
        expected_new.insert((
            Proto::Udp,
            tuple(CLIENT, p, FRONTEND, 53),
            tuple(POD, 5353, NODE_POD_SIDE, p),
        ));
    }
    let from_client = |ev: &FlowEvent| ev.orig.src == CLIENT.parse::<std::net::IpAddr>().unwrap();
    let news = collect(&rt, &mut rx, expected_new.len(), from_client);
    let got_new: Vec<_> = news.iter().map(|e| (e.proto, e.orig, e.reply)).collect();
    assert_eq!(
        got_new.len(),
        expected_new.len(),
        "each connection exactly once: {got_new:#?}"
    );
    assert_eq!(
        got_new.iter().cloned().collect::<HashSet<_>>(),
        expected_new
    );
    for ev in &news {
        assert_eq!(ev.kind, EventKind::New);
        assert_eq!(ev.netns, node.inode());
        assert_eq!((ev.in_ifindex, ev.out_ifindex), (None, None));
        let nat = ev.nat();
        assert!(nat.dnat && nat.snat, "{ev:?}");
        let bits = ct_status::CONFIRMED | ct_status::DST_NAT | ct_status::SRC_NAT;
        assert_eq!(ev.status & bits, bits, "status {:#x}", ev.status);
    }

    // Flushing the table makes conntrack destroy every entry now.
    exec_in(lab.name(1), &["conntrack", "-F"]);
    let destroys = collect(&rt, &mut rx, expected_new.len(), from_client);
    let got_destroy: HashSet<_> = destroys
        .iter()
        .inspect(|e| assert_eq!(e.kind, EventKind::Destroy))
        .map(|e| (e.proto, e.orig, e.reply))
        .collect();
    assert_eq!(destroys.len(), expected_new.len(), "{destroys:#?}");
    assert_eq!(got_destroy, expected_new);

    let witnessed: HashSet<Seen> = witness
        .finish()
        .into_iter()
        .filter(|s| s.2.src.to_string() == CLIENT)
        .collect();
    let ours: HashSet<Seen> = news.iter().chain(&destroys).map(seen).collect();
    assert_eq!(ours, witnessed, "capture and `conntrack -E` disagree");
    println!(
        "netlink: {} NEW and {} DESTROY events for {} connections, all matching conntrack -E; e.g. {} => {}",
        news.len(),
        destroys.len(),
        expected_new.len(),
        news[0].orig,
        news[0].reply
    );

    assert_eq!(health.lost.load(Ordering::Relaxed), 0);
    assert_eq!(health.decode_errors.load(Ordering::Relaxed), 0);
    assert!(health.events.load(Ordering::Relaxed) >= 2 * expected_new.len() as u64);
    assert!(health.hooks().iter().any(|h| h.attached));

    // Interface names resolve in the node namespace, not the test's.
    let names = IfNames::new(&node).unwrap();
    let line = exec_in(lab.name(1), &["ip", "-o", "link", "show", "n1"]);
    let index: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(names.name(index).unwrap().as_deref(), Some("n1"));

    let started = Instant::now();
    drop(capture);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop took too long"
    );
}

#[test]
fn overflow_is_counted_as_lost_and_capture_keeps_running() {
    aksnet_tests::require_root();
    let lab = Namespaces::create(&["overflow"]);
    exec_in(lab.name(0), &aksnet_tests::conntrack::TRACKING_RULE);
    let ns = open(lab.name(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // Smallest receive buffer and a one-slot channel nobody drains yet: the socket overflows.
    let (tx, mut rx) = mpsc::channel(1);
    let health = Arc::new(CaptureHealth::default());
    let options = NetlinkOptions {
        rcvbuf_bytes: 1,
        ..NetlinkOptions::default()
    };
    let _capture = NetlinkCapture::start_with(&ns, options, tx, health.clone()).unwrap();

    const FLOWS: u16 = 200;
    let send_flows = |count: u16| {
        ns.run_in(move || {
            for _ in 0..count {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.send_to(b"x", "127.0.0.1:9").unwrap();
            }
        })
        .unwrap()
    };
    send_flows(FLOWS);
    std::thread::sleep(Duration::from_millis(500));
    let udp = |ev: &FlowEvent| ev.proto == Proto::Udp && ev.kind == EventKind::New;
    let delivered = collect(&rt, &mut rx, FLOWS as usize, udp).len();
    let lost = health.lost.load(Ordering::Relaxed);
    println!("overflow: {delivered} of {FLOWS} events delivered, {lost} overflow(s) counted");
    assert!(lost >= 1, "no overflow counted");
    assert!(delivered < FLOWS as usize);

    // Still running after the overflow. The tiny buffer may overflow again under a loaded
    // machine, so a few single flows are tried (bounded); one must come through.
    let recovered = (0..5).any(|_| {
        send_flows(1);
        !collect(&rt, &mut rx, 1, udp).is_empty()
    });
    assert!(recovered, "no event delivered after the overflow");
}
