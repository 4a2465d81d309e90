//! End-to-end check of the eBPF capture on this kernel (needs root).
//!
//! Builds client → router → server namespaces joined by veth pairs, with a DNAT (TCP) and a
//! MASQUERADE (UDP) rule in the router, starts `EbpfCapture` filtered to the router namespace,
//! makes a few connections and checks that each is reported exactly once with its exact
//! original and reply tuples.

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
    fn create() -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            client: format!("aksnet-ebpf-{pid}-client"),
            router: format!("aksnet-ebpf-{pid}-router"),
            server: format!("aksnet-ebpf-{pid}-server"),
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

/// Makes the TCP and UDP connections from the client namespace; returns what conntrack should
/// hold for each. Every TCP connection exchanges several packets and every UDP socket sends twice,
/// so "reported once" is checked against repeated packets.
fn make_traffic(client_ns: &str, server_ns: &str) -> Vec<(Expected, Nat)> {
    let listener = in_netns(server_ns, || {
        TcpListener::bind(BACKEND).expect("bind backend")
    });
    let udp_server = in_netns(server_ns, || {
        UdpSocket::bind(UDP_SERVICE).expect("bind udp")
    });
    udp_server.set_read_timeout(Some(TIMEOUT)).unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).expect("read request");
            conn.write_all(b"world").expect("write reply");
        }
    });

    let clients = in_netns(client_ns, || {
        let mut made = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut tcp =
                TcpStream::connect_timeout(&addr(FRONTEND), TIMEOUT).expect("connect frontend");
            tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
            tcp.write_all(b"hello").expect("send");
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).expect("receive");
            made.push((Proto::Tcp, tcp.local_addr().unwrap()));
        }
        for _ in 0..CONNECTIONS {
            let udp = UdpSocket::bind("0.0.0.0:0").expect("bind udp client");
            udp.connect(UDP_SERVICE).unwrap();
            udp.send(b"query-1").expect("send udp");
            udp.send(b"query-2").expect("send udp");
            made.push((Proto::Udp, udp.local_addr().unwrap()));
        }
        made
    });
    server.join().expect("tcp server");
    let mut buf = [0u8; 16];
    for _ in 0..2 * CONNECTIONS {
        udp_server
            .recv_from(&mut buf)
            .expect("udp datagram reached the server");
    }

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
                )
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_each_nat_connection_once_with_exact_tuples() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (BPF and netns)"
    );
    let lab = Lab::create();
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

    let (client, server) = (lab.client.clone(), lab.server.clone());
    let expected = tokio::task::spawn_blocking(move || make_traffic(&client, &server))
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
                let all = expected.iter().all(|(want, _)| {
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
        let Some((_, nat)) = expected.iter().find(|(want, _)| *want == key) else {
            panic!("unexpected event (wrong tuples or stray traffic): {event:?}");
        };
        assert_eq!(event.nat(), *nat, "{event:?}");
        // Reported on the first packet, forwarded from the client link to the server link.
        assert_eq!(event.in_ifindex, Some(r0), "{event:?}");
        assert_eq!(event.out_ifindex, Some(r1), "{event:?}");
        assert_eq!(event.packets, Some(1), "{event:?}");
        *counts.entry(key).or_default() += 1;
    }
    for (want, _) in &expected {
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
