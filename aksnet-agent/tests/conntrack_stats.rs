//! The conntrack pressure the agent exports, against the kernel's own tools (root only): in a
//! namespace this test creates, the ctnetlink statistics reader must report what `conntrack -S`
//! prints (per-CPU counters summed) and what `/proc/sys/net/netfilter/nf_conntrack_count` and
//! `nf_conntrack_max` say, before and after traffic that adds a known number of entries and of
//! invalid packets; and the agent's metrics must export those figures. Traffic stays on the
//! namespace's loopback; nothing links to the host.

use aksnet_agent::capture::netns::{Netns, NetnsTarget};
use aksnet_agent::metrics::conntrack::{ConntrackReader, ConntrackStats};
use aksnet_agent::metrics::{Metrics, MetricsConfig};
use aksnet_tests::run;
use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

/// Connections held open while the statistics are compared: one entry each. (Recent kernels no
/// longer count `insert`; it is compared with `conntrack -S` like the rest.)
const CONNECTIONS: usize = 20;
/// Raw TCP packets with SYN and RST both set: conntrack counts each as invalid.
const INVALID_PACKETS: usize = 7;

/// A namespace made for this test, deleted on drop even when the test fails.
struct Namespace(String);

impl Namespace {
    fn create() -> Namespace {
        let name = format!("aksnet-cts-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Namespace(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&aksnet_tests::conntrack::TRACKING_RULE);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `conntrack -S`: each counter summed over the CPU lines.
    fn conntrack_s(&self) -> BTreeMap<String, u64> {
        let mut sums = BTreeMap::new();
        for field in self.exec(&["conntrack", "-S"]).split_whitespace() {
            if let Some((key, value)) = field.split_once('=') {
                if key != "cpu" {
                    let value: u64 = value.parse().unwrap_or_else(|e| panic!("{field}: {e}"));
                    *sums.entry(key.to_owned()).or_default() += value;
                }
            }
        }
        assert!(sums.contains_key("insert"), "conntrack -S printed {sums:?}");
        sums
    }

    fn sysctl(&self, name: &str) -> u64 {
        let path = format!("/proc/sys/net/netfilter/{name}");
        let text = self.exec(&["cat", &path]);
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The reader's figures must be the tools' figures, field by field.
fn assert_matches_tools(stats: &ConntrackStats, ns: &Namespace, when: &str) {
    let tools = ns.conntrack_s();
    let ours = [
        ("found", stats.found),
        ("invalid", stats.invalid),
        ("insert", stats.insert),
        ("insert_failed", stats.insert_failed),
        ("drop", stats.drop),
        ("early_drop", stats.early_drop),
        ("error", stats.error),
        ("search_restart", stats.search_restart),
        ("clash_resolve", stats.clash_resolve),
        ("chaintoolong", stats.chain_toolong),
    ];
    for (key, value) in ours {
        if let Some(expected) = tools.get(key) {
            assert_eq!(value, *expected, "{when}: {key} (conntrack -S: {tools:?})");
        }
    }
    assert_eq!(
        stats.entries,
        ns.sysctl("nf_conntrack_count"),
        "{when}: entries vs nf_conntrack_count"
    );
    assert_eq!(
        stats.max,
        ns.sysctl("nf_conntrack_max"),
        "{when}: limit vs nf_conntrack_max"
    );
}

/// Opens `CONNECTIONS` loopback connections and sends the invalid packets, inside `netns`.
/// Returns the sockets, which keep the entries alive.
fn traffic(netns: &Netns) -> Vec<TcpStream> {
    netns
        .run_in(|| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
            let addr = listener.local_addr().unwrap();
            let mut held = Vec::new();
            for _ in 0..CONNECTIONS {
                let client = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .expect("connect on loopback");
                let (server, _) = listener.accept().expect("accept on loopback");
                held.push(client);
                held.push(server);
            }
            send_invalid(addr.port());
            held
        })
        .expect("enter the test namespace")
}

/// TCP segments flagged SYN and RST from a raw socket: a combination conntrack refuses.
fn send_invalid(port: u16) {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&40000u16.to_be_bytes());
    segment[2..4].copy_from_slice(&port.to_be_bytes());
    segment[12] = 5 << 4; // data offset: 5 words
    segment[13] = 0x02 | 0x04; // SYN | RST
    segment[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    for _ in 0..INVALID_PACKETS {
        // SAFETY: segment and dst are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn conntrack_statistics_match_conntrack_tools_and_proc() {
    aksnet_tests::require_root();
    let ns = Namespace::create();
    let netns = NetnsTarget::Named(ns.0.clone()).open().unwrap();
    let mut reader = ConntrackReader::open(&netns).unwrap();

    let before = reader.read().unwrap();
    assert_matches_tools(&before, &ns, "before traffic");
    assert!(before.max > 0, "{before:?}");

    let held = traffic(&netns);
    let after = reader.read().unwrap();
    assert_matches_tools(&after, &ns, "after traffic");
    let n = CONNECTIONS as u64;
    assert_eq!(
        after.entries,
        before.entries + n,
        "one entry per connection"
    );
    assert!(
        after.invalid >= before.invalid + INVALID_PACKETS as u64,
        "SYN+RST segments count as invalid: {before:?} -> {after:?}"
    );
    assert_eq!(after.insert_failed, before.insert_failed);
    assert_eq!(
        (after.drop, after.early_drop),
        (before.drop, before.early_drop)
    );

    // What the agent exports is what the tools say.
    let metrics = Metrics::new(&MetricsConfig::default()).unwrap();
    metrics
        .set_conntrack(ConntrackReader::open(&netns).unwrap())
        .unwrap();
    let text = metrics.render().unwrap();
    let exported = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} is not exported:\n{text}"))
            .parse()
            .unwrap()
    };
    let tools = ns.conntrack_s();
    let expected = [
        ("aksnet_conntrack_entries", ns.sysctl("nf_conntrack_count")),
        (
            "aksnet_conntrack_entries_limit",
            ns.sysctl("nf_conntrack_max"),
        ),
        (
            "aksnet_conntrack_insert_failed_total",
            tools["insert_failed"],
        ),
        ("aksnet_conntrack_drop_total", tools["drop"]),
        ("aksnet_conntrack_early_drop_total", tools["early_drop"]),
        ("aksnet_conntrack_invalid_total", tools["invalid"]),
    ];
    for (name, value) in expected {
        assert_eq!(exported(name), value, "{name}");
    }
    drop(held);
    println!(
        "conntrack statistics match conntrack -S and /proc: {} entries of {} max, {} inserts, \
         {} invalid, {} insert failures, {} drops, {} early drops",
        after.entries,
        after.max,
        after.insert,
        after.invalid,
        after.insert_failed,
        after.drop,
        after.early_drop
    );
}
