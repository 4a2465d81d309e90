//! Reading a namespace's conntrack table with `conntrack -L`, the observer the lab's expectations
//! are checked against.

use std::io::Read;
use std::net::SocketAddrV4;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xtask::lab::{NatKind, Proto, Tuple};

/// One TCP or UDP entry of `conntrack -L`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub proto: Proto,
    pub original: Tuple,
    pub reply: Tuple,
    pub line: String,
}

impl Entry {
    /// The NAT the two tuples show: a reply source other than the original destination is a
    /// DNAT, a reply destination other than the original source is an SNAT.
    pub fn nat(&self) -> NatKind {
        match (
            self.reply.src != self.original.dst,
            self.reply.dst != self.original.src,
        ) {
            (false, false) => NatKind::None,
            (true, false) => NatKind::Dnat,
            (false, true) => NatKind::Snat,
            (true, true) => NatKind::DnatSnat,
        }
    }
}

fn run(netns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "conntrack"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run conntrack in {netns}: {e} (is conntrack installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "conntrack {} in {netns} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `conntrack -L` output; entries of other protocols (IGMP, ICMP) are skipped.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter_map(parse_line).collect()
}

/// Parses `conntrack -E -e NEW` output: the `[NEW]` tag, then a `conntrack -L` line.
pub fn parse_new_events(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("[NEW]"))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    let proto = match line.split_whitespace().next()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    // The first src/dst/sport/dport set is the original direction, the second the reply.
    let mut fields: [Vec<&str>; 4] = Default::default();
    for token in line.split_whitespace() {
        if let Some((key, value)) = token.split_once('=') {
            if let Some(i) = ["src", "dst", "sport", "dport"]
                .iter()
                .position(|k| *k == key)
            {
                fields[i].push(value);
            }
        }
    }
    let tuple = |n: usize| -> Option<Tuple> {
        let addr = |ip: usize, port: usize| -> Option<SocketAddrV4> {
            Some(SocketAddrV4::new(
                fields[ip].get(n)?.parse().ok()?,
                fields[port].get(n)?.parse().ok()?,
            ))
        };
        Some(Tuple {
            src: addr(0, 2)?,
            dst: addr(1, 3)?,
        })
    };
    Some(Entry {
        proto,
        original: tuple(0)?,
        reply: tuple(1)?,
        line: line.to_string(),
    })
}

pub fn list(netns: &str) -> Result<Vec<Entry>, String> {
    run(netns, &["-L"]).map(|out| parse(&out))
}

/// A rule that makes conntrack track a namespace's traffic: it tracks a namespace only once a
/// rule there needs it.
pub const TRACKING_RULE: [&str; 9] = [
    "iptables",
    "-A",
    "OUTPUT",
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-j",
    "ACCEPT",
];

/// Deletes the TCP entry of the connection from `client` (its original source).
pub fn delete_tcp_from(netns: &str, client: SocketAddrV4) -> Result<(), String> {
    let (src, sport) = (client.ip().to_string(), client.port().to_string());
    let args = [
        "-D",
        "-p",
        "tcp",
        "--orig-src",
        &src,
        "--orig-port-src",
        &sport,
    ];
    run(netns, &args).map(|_| ())
}

/// Empties the table so the next listing shows only what follows.
pub fn flush(netns: &str) -> Result<(), String> {
    run(netns, &["-F"]).map(|_| ())
}

/// `conntrack -E` in a namespace: the independent witness of the NEW entries the node makes.
pub struct Witness(Child);

impl Witness {
    /// Starts it and waits until it has joined conntrack's event groups, so nothing that
    /// follows is missed.
    pub fn start(netns: &str) -> Result<Witness, String> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "conntrack", "-E", "-e", "NEW"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run conntrack -E in {netns}: {e}"))?;
        let witness = Witness(child);
        let table = format!("/proc/{}/net/netlink", witness.0.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !subscribed(&std::fs::read_to_string(&table).unwrap_or_default()) {
            if Instant::now() > deadline {
                return Err(format!(
                    "conntrack -E in {netns} did not subscribe within 5 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(witness)
    }

    /// Stops it with SIGTERM, which makes it flush its output, and returns what it saw.
    pub fn finish(mut self) -> Vec<Entry> {
        // `ip netns exec` execs conntrack, so the child's pid is conntrack's.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = self.0.wait();
        parse_new_events(&out)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `/proc/PID/net/netlink` columns: sk Eth Pid Groups ...; NETLINK_NETFILTER is protocol 12.
fn subscribed(table: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1] == "12" && !cols[3].trim_start_matches('0').is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nat_entries_and_skips_other_protocols() {
        let text = "tcp      6 117 TIME_WAIT src=203.0.113.10 dst=192.0.2.10 sport=38258 dport=80 src=10.244.0.10 dst=10.244.0.1 sport=8080 dport=35858 [ASSURED] mark=0 use=1\n\
                    unknown  2 597 src=10.244.0.1 dst=224.0.0.22 [UNREPLIED] src=224.0.0.22 dst=10.244.0.1 mark=0 use=1\n\
                    udp      17 28 src=10.244.0.10 dst=10.0.0.10 sport=41960 dport=53 src=10.244.0.13 dst=10.244.0.10 sport=53 dport=41960 mark=0 use=1\n";
        let entries = parse(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].original.dst, "192.0.2.10:80".parse().unwrap());
        assert_eq!(entries[0].reply.dst, "10.244.0.1:35858".parse().unwrap());
        assert_eq!(entries[0].nat(), NatKind::DnatSnat);
        assert_eq!(entries[1].proto, Proto::Udp);
        assert_eq!(entries[1].nat(), NatKind::Dnat);
    }

    #[test]
    fn parses_new_events_only() {
        let text = "    [NEW] tcp      6 120 SYN_SENT src=10.244.0.10 dst=198.51.100.20 sport=40000 dport=80 [UNREPLIED] src=198.51.100.20 dst=10.224.0.4 sport=80 dport=40000\n\
                    [DESTROY] udp      17 src=10.244.0.10 dst=10.0.0.10 sport=41960 dport=53 src=10.244.0.13 dst=10.244.0.10 sport=53 dport=41960\n";
        let entries = parse_new_events(text);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].nat(), NatKind::Snat);
        assert_eq!(entries[0].reply.dst, "10.224.0.4:40000".parse().unwrap());
    }
}
