//! End-to-end check of the eBPF capture on this kernel (needs root).
//!
//! Builds client → router → server namespaces joined by veth pairs, with a DNAT (TCP) and a
//! MASQUERADE (UDP) rule in the router, starts `EbpfCapture` filtered to the router namespace,
//! makes a few connections (forwarded ones, and a health-probe-like one ending in the router)
//! and checks that each is reported exactly once with its exact original and reply tuples and
//! interfaces. A second test fills the ring buffer and checks the loss accounting.

use aksnet_agent::capture::ebpf::EbpfCapture;
use aksnet_agent::capture::CaptureHealth;
use aksnet_agent::events::{EventKind, FlowEvent, Nat, Proto, SourceKind, Tuple};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const CLIENT_IP: &str = "203.0.113.10";
/// Router side of the client link, and the client's gateway.
const ROUTER_OUTER_IP: &str = "203.0.113.1";
/// Router side of the server link: MASQUERADE rewrites sources to this.
const ROUTER_INNER_IP: &str = "10.224.0.1";
const SERVER_IP: &str = "10.224.0.5";
/// A LoadBalancer-like frontend the router DNATs to the server.
const FRONTEND: &str = "192.0.2.10:80";
const BACKEND: &str = "10.224.0.5:8080";
/// An "internet" UDP service reached through the router's MASQUERADE.
const UDP_SERVICE: &str = "198.51.100.20:53";
const CONNECTIONS: usize = 3;
/// Request/response round trips on each TCP connection.
const EXCHANGES: usize = 4;
/// Like kube-proxy's healthz, probed by the load balancer: the connection ends in the router.
const HEALTH: &str = "203.0.113.1:10256";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a command given as one whitespace-separated string.
fn run(cmd: &str) {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ns_run(ns: &str, cmd: &str) {
    run(&format!("ip netns exec {ns} {cmd}"));
}

/// The three namespaces; deleted on drop, also when an assertion fails.
struct Lab {
    client: String,
    router: String,
    server: String,
}

impl Lab {
    /// `tag` tells apart the labs of tests running at the same time.
    fn create(tag: &str) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            client: format!("aksnet-ebpf-{pid}-{tag}-c"),
            router: format!("aksnet-ebpf-{pid}-{tag}-r"),
            server: format!("aksnet-ebpf-{pid}-{tag}-s"),
        };
        for ns in [&lab.client, &lab.router, &lab.server] {
            run(&format!("ip netns add {ns}"));
            // IPv4 only, so no IPv6 neighbour discovery shows up as stray traffic.
            ns_run(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1");
            ns_run(ns, "sysctl -qw net.ipv6.conf.default.disable_ipv6=1");
            ns_run(ns, "ip link set lo up");
        }
        let (c, r, s) = (&lab.client, &lab.router, &lab.server);
        run(&format!(
            "ip link add c0 netns {c} type veth peer r0 netns {r}"
        ));
        run(&format!(
            "ip link add s0 netns {s} type veth peer r1 netns {r}"
        ));
        ns_run(c, &format!("ip addr add {CLIENT_IP}/24 dev c0"));
        ns_run(c, "ip link set c0 up");
        ns_run(c, &format!("ip route add default via {ROUTER_OUTER_IP}"));
        // Gives the client namespace conntrack entries of its own, which the filter must skip.
        ns_run(
            c,
            "iptables -A OUTPUT -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT",
        );
        ns_run(r, &format!("ip addr add {ROUTER_OUTER_IP}/24 dev r0"));
        ns_run(r, &format!("ip addr add {ROUTER_INNER_IP}/24 dev r1"));
        ns_run(r, "ip link set r0 up");
        ns_run(r, "ip link set r1 up");
        ns_run(r, &format!("ip route add 198.51.100.20/32 via {SERVER_IP}"));
        ns_run(r, "sysctl -qw net.ipv4.ip_forward=1");
        ns_run(s, &format!("ip addr add {SERVER_IP}/24 dev s0"));
        ns_run(s, "ip addr add 198.51.100.20/32 dev s0");
        ns_run(s, "ip link set s0 up");
        ns_run(s, &format!("ip route add default via {ROUTER_INNER_IP}"));
        let (front_ip, front_port) = FRONTEND.split_once(':').unwrap();
        ns_run(
            r,
            &format!(
                "iptables -t nat -A PREROUTING -p tcp -d {front_ip} --dport {front_port} \
                 -j DNAT --to-destination {BACKEND}"
            ),
        );
        ns_run(
            r,
            "iptables -t nat -A POSTROUTING -p udp -o r1 -j MASQUERADE",
        );
        lab
    }

    fn inode(&self, ns: &str) -> u32 {
        let meta = std::fs::metadata(format!("/run/netns/{ns}")).expect("namespace file");
        u32::try_from(meta.ino()).expect("netns inodes fit in 32 bits")
    }

    fn ifindex(&self, ns: &str, dev: &str) -> u32 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "cat",
                &format!("/sys/class/net/{dev}/ifindex"),
            ])
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("ifindex")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.router, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a fresh thread that entered namespace `ns`; sockets it makes stay in `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{ns}")).expect("namespace file");
    std::thread::spawn(move || {
        // SAFETY: valid namespace fd; only this short-lived thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn tuple(src: SocketAddr, dst: SocketAddr) -> Tuple {
    Tuple {
        src: src.ip(),
        sport: src.port(),
        dst: dst.ip(),
        dport: dst.port(),
    }
}

/// One expected connection: protocol, original and reply tuples.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Expected {
    proto: Proto,
    orig: Tuple,
    reply: Tuple,
}

/// Where a connection's packets go in the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Forwarded from the client link to the server link.
    Forwarded,
    /// Ends in the router: only replies leave it, on the client link.
    Local,
}

/// Serves `EXCHANGES` five-byte request/response round trips on each of `connections`
/// connections.
fn serve(listener: TcpListener, connections: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 5];
            for _ in 0..EXCHANGES {
                conn.read_exact(&mut buf).expect("read request");
                conn.write_all(b"world").expect("write reply");
            }
        }
    })
}

/// Connects to `to` and makes `EXCHANGES` round trips; returns the local address.
fn exchange(to: &str) -> SocketAddr {
    let mut tcp = TcpStream::connect_timeout(&addr(to), TIMEOUT).expect("connect");
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 5];
    for _ in 0..EXCHANGES {
        tcp.write_all(b"hello").expect("send");
        tcp.read_exact(&mut buf).expect("receive");
    }
    tcp.local_addr().unwrap()
}

/// Makes the TCP and UDP connections from the client namespace; returns what conntrack should
/// hold for each. Every TCP connection makes several round trips and every UDP socket sends
/// twice, so "reported once" is checked against repeated packets in both directions.
fn make_traffic(client_ns: &str, router_ns: &str, server_ns: &str) -> Vec<(Expected, Nat, Path)> {
    let listener = in_netns(server_ns, || {
        TcpListener::bind(BACKEND).expect("bind backend")
    });
    let health = in_netns(router_ns, || {
        TcpListener::bind(HEALTH).expect("bind health endpoint")
    });
    let udp_server = in_netns(server_ns, || {
        UdpSocket::bind(UDP_SERVICE).expect("bind udp")
    });
    udp_server.set_read_timeout(Some(TIMEOUT)).unwrap();
    let servers = [serve(listener, CONNECTIONS), serve(health, 1)];

    let (clients, probe) = in_netns(client_ns, || {
        let mut made = Vec::new();
        for _ in 0..CONNECTIONS {
            made.push((Proto::Tcp, exchange(FRONTEND)));
        }
        for _ in 0..CONNECTIONS {
            let udp = UdpSocket::bind("0.0.0.0:0").expect("bind udp client");
            udp.connect(UDP_SERVICE).unwrap();
            udp.send(b"query-1").expect("send udp");
            udp.send(b"query-2").expect("send udp");
            made.push((Proto::Udp, udp.local_addr().unwrap()));
        }
        (made, exchange(HEALTH))
    });
    for server in servers {
        server.join().expect("tcp server");
    }
    let mut buf = [0u8; 16];
    for _ in 0..2 * CONNECTIONS {
        udp_server
            .recv_from(&mut buf)
            .expect("udp datagram reached the server");
    }

    let probe = (
        Expected {
            proto: Proto::Tcp,
            orig: tuple(probe, addr(HEALTH)),
            reply: tuple(addr(HEALTH), probe),
        },
        Nat::default(),
        Path::Local,
    );
    clients
        .into_iter()
        .map(|(proto, client)| match proto {
            Proto::Tcp => (
                Expected {
                    proto,
                    orig: tuple(client, addr(FRONTEND)),
                    reply: tuple(addr(BACKEND), client),
                },
                Nat {
                    dnat: true,
                    snat: false,
                },
                Path::Forwarded,
            ),
            _ => {
                // MASQUERADE keeps the client's port when it is free, as it is here.
                let masqueraded = SocketAddr::new(ROUTER_INNER_IP.parse().unwrap(), client.port());
                (
                    Expected {
                        proto,
                        orig: tuple(client, addr(UDP_SERVICE)),
                        reply: tuple(addr(UDP_SERVICE), masqueraded),
                    },
                    Nat {
                        dnat: false,
                        snat: true,
                    },
                    Path::Forwarded,
                )
            }
        })
        .chain(std::iter::once(probe))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_each_nat_connection_once_with_exact_tuples() {
    aksnet_tests::require_root();
    let lab = Lab::create("once");
    let router_inode = lab.inode(&lab.router);
    let (r0, r1) = (
        lab.ifindex(&lab.router, "r0"),
        lab.ifindex(&lab.router, "r1"),
    );

    let health = Arc::new(CaptureHealth::default());
    let (tx, mut rx) = mpsc::channel(1024);
    let capture = EbpfCapture::start(Some(router_inode), tx, Arc::clone(&health))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for hook in health.hooks() {
        eprintln!(
            "hook {}: attached={} {}",
            hook.name, hook.attached, hook.detail
        );
    }

    let (client, router, server) = (lab.client.clone(), lab.router.clone(), lab.server.clone());
    let expected = tokio::task::spawn_blocking(move || make_traffic(&client, &router, &server))
        .await
        .expect("traffic thread");

    // Collect until every connection is reported, then a little longer to catch duplicates.
    let mut seen: Vec<FlowEvent> = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut settle: Option<Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline).min(deadline);
        match tokio::time::timeout_at(until.into(), rx.recv()).await {
            Ok(Some(event)) => {
                eprintln!(
                    "event {:?} {} {} reply {} nat={} in={:?} out={:?} packets={:?} bytes={:?}",
                    event.kind,
                    event.proto,
                    event.orig,
                    event.reply,
                    event.nat(),
                    event.in_ifindex,
                    event.out_ifindex,
                    event.packets,
                    event.bytes
                );
                seen.push(event);
                let all = expected.iter().all(|(want, _, _)| {
                    seen.iter()
                        .any(|e| e.orig == want.orig && e.proto == want.proto)
                });
                if all && settle.is_none() {
                    settle = Some(Instant::now() + Duration::from_millis(500));
                }
            }
            Ok(None) => panic!("capture channel closed"),
            Err(_) => break,
        }
    }
    drop(capture);

    let mut counts: HashMap<Expected, usize> = HashMap::new();
    for event in &seen {
        assert_eq!(event.source, SourceKind::Ebpf);
        assert_eq!(
            event.netns, router_inode,
            "event from another namespace: {event:?}"
        );
        assert_eq!(event.kind, EventKind::New, "{event:?}");
        let key = Expected {
            proto: event.proto,
            orig: event.orig,
            reply: event.reply,
        };
        let Some((_, nat, path)) = expected.iter().find(|(want, _, _)| *want == key) else {
            panic!("unexpected event (wrong tuples or stray traffic): {event:?}");
        };
        assert_eq!(event.nat(), *nat, "{event:?}");
        let interfaces = match path {
            // Reported on the first packet, forwarded from the client link to the server link.
            Path::Forwarded => (Some(r0), Some(r1)),
            // Reported on the SYN-ACK leaving on the client link: the original came in there,
            // and never leaves.
            Path::Local => (Some(r0), None),
        };
        assert_eq!(
            (event.in_ifindex, event.out_ifindex),
            interfaces,
            "{event:?}"
        );
        assert_eq!(event.packets, Some(1), "{event:?}");
        *counts.entry(key).or_default() += 1;
    }
    for (want, _, _) in &expected {
        assert_eq!(
            counts.get(want),
            Some(&1),
            "not reported exactly once: {want:?}"
        );
    }
    assert_eq!(
        health.lost.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "events lost"
    );
    assert_eq!(
        health
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "decode errors"
    );
    let hooks = health.hooks();
    assert!(
        hooks
            .iter()
            .any(|h| h.name == "tp_btf/net_dev_start_xmit" && h.attached),
        "xmit hook not recorded: {hooks:?}"
    );
    // The optional hooks are loaded before they are attached: where the kernel has no kprobes
    // (this machine), their programs must still have passed the verifier.
    for function in ["nf_nat_setup_info", "nf_ct_delete"] {
        let hook = hooks
            .iter()
            .find(|h| h.name.ends_with(function))
            .unwrap_or_else(|| panic!("{function} hook not recorded: {hooks:?}"));
        let kprobe_part = hook.detail.split("kprobe/").nth(1).unwrap_or_default();
        assert!(
            hook.attached || !kprobe_part.contains("load refused"),
            "verifier refused the kprobe programs: {hook:?}"
        );
    }
}

/// A host whose UDP ports no one answers (it replies port unreachable, itself rate-limited).
const FLOOD_HOST: &str = "198.51.100.20";
/// Its ports the overflow test sends to, from each client port: one conntrack entry each.
const FLOOD_SERVICE_PORTS: std::ops::Range<u16> = 5353..5360;
/// Client ports of the overflow test: with [`FLOOD_SERVICE_PORTS`], 63 000 connections, more
/// than the ring buffer holds records (about 55 000 in 8 MiB).
const FLOOD_PORTS: std::ops::Range<u16> = 20_000..29_000;
/// Connections that leave the capture's reader blocked on a full channel.
const BLOCKING_PORTS: std::ops::Range<u16> = 19_998..20_000;

/// From the client namespace, sends `datagrams` datagrams from each port to each of
/// [`FLOOD_SERVICE_PORTS`], pausing now and then so no queue on the way overflows.
fn send_from_ports(client_ns: &str, ports: std::ops::Range<u16>, datagrams: usize) {
    in_netns(client_ns, move || {
        for port in ports {
            let udp = UdpSocket::bind((CLIENT_IP, port)).expect("bind flood port");
            for service in FLOOD_SERVICE_PORTS {
                for _ in 0..datagrams {
                    udp.send_to(b"q", (FLOOD_HOST, service))
                        .expect("send flood datagram");
                }
            }
            if port % 25 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
}

/// Receives until nothing arrives for a while, bounded by [`TIMEOUT`] in all.
async fn drain(rx: &mut mpsc::Receiver<FlowEvent>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while let Ok(Some(event)) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
        rx.recv(),
    )
    .await
    {
        events.push(event);
    }
    events
}

fn loss_counters(health: &CaptureHealth) -> (u64, u64) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    (load(&health.lost), load(&health.recovered))
}

/// The agent stops reading while more connections start than the ring buffer holds: each
/// connection that found it full is counted lost once, although every one of its packets (two
/// datagrams, maybe an ICMP error back) retried; once the agent reads again, each one's next
/// packet reports it, counted recovered; and every connection is reported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ring_counts_each_lost_connection_once_and_its_late_report_as_recovered() {
    aksnet_tests::require_root();
    let lab = Lab::create("flood");
    let health = Arc::new(CaptureHealth::default());
    // Room for one event: the reader blocks on the second until the test receives.
    let (tx, mut rx) = mpsc::channel(1);
    let capture = EbpfCapture::start(Some(lab.inode(&lab.router)), tx, Arc::clone(&health))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = lab.client.clone();
    let flood = |ports: std::ops::Range<u16>, datagrams| {
        let client = client.clone();
        tokio::task::spawn_blocking(move || send_from_ports(&client, ports, datagrams))
    };

    flood(BLOCKING_PORTS, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    flood(FLOOD_PORTS, 2).await.unwrap();
    // The kernel's counters reach `health` once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (lost, recovered) = loss_counters(&health);
    eprintln!("while blocked: lost {lost}, recovered {recovered}");
    assert!(lost > 0, "the ring buffer never filled");
    assert_eq!(
        recovered, 0,
        "nothing could be reported while the ring was full"
    );

    let first = drain(&mut rx).await;
    flood(FLOOD_PORTS, 1).await.unwrap();
    let second = drain(&mut rx).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(capture);
    let (lost_after, recovered) = loss_counters(&health);
    eprintln!(
        "events before unblocking: {}, after the second round: {}; lost {lost_after}, recovered {recovered}",
        first.len(),
        second.len()
    );

    assert_eq!(lost_after, lost, "no losses once the agent read again");
    assert_eq!(
        recovered, lost,
        "each lost connection was reported by its next packet, and counted lost once"
    );
    // Connections dropped on the way before conntrack saw them would also first show up now.
    assert!(second.len() as u64 >= lost, "{} < {lost}", second.len());
    let mut counts: HashMap<(u16, u16), usize> = HashMap::new();
    for event in first.iter().chain(&second) {
        assert_eq!(event.kind, EventKind::New, "{event:?}");
        assert_eq!(event.orig.dst.to_string(), FLOOD_HOST, "{event:?}");
        *counts
            .entry((event.orig.sport, event.orig.dport))
            .or_default() += 1;
    }
    for port in BLOCKING_PORTS.chain(FLOOD_PORTS) {
        for service in FLOOD_SERVICE_PORTS {
            assert_eq!(
                counts.get(&(port, service)),
                Some(&1),
                "connection from port {port} to {service} not reported exactly once"
            );
        }
    }
}
