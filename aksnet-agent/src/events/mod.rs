//! Events: what a capture source saw about one conntrack entry, decoded into addresses and ports.
//!
//! Both capture sources (eBPF and netlink) produce [`FlowEvent`]s, so everything downstream
//! (flow table, classification, outputs) is independent of where an event came from.

mod decode;

pub use decode::{decode_conn_event, BootClock, DecodeError};

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

/// Transport protocol of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    Other(u8),
}

impl Proto {
    pub fn from_number(n: u8) -> Self {
        match n {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            1 => Proto::Icmp,
            58 => Proto::Icmpv6,
            132 => Proto::Sctp,
            n => Proto::Other(n),
        }
    }

    /// Ports mean something only for these; ICMP's "ports" are the echo id and type/code.
    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp | Proto::Sctp)
    }

    /// Its name, e.g. `tcp`; allocated only for protocols without one (`proto-N`), so that a
    /// metric label costs nothing for the common ones.
    pub fn name(self) -> Cow<'static, str> {
        match self {
            Proto::Tcp => "tcp".into(),
            Proto::Udp => "udp".into(),
            Proto::Icmp => "icmp".into(),
            Proto::Icmpv6 => "icmpv6".into(),
            Proto::Sctp => "sctp".into(),
            Proto::Other(n) => format!("proto-{n}").into(),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that width specifiers line up dump columns.
        f.pad(&self.name())
    }
}

impl std::str::FromStr for Proto {
    type Err = String;

    /// The names [`Display`](fmt::Display) prints.
    fn from_str(s: &str) -> Result<Proto, String> {
        Ok(match s {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            "sctp" => Proto::Sctp,
            other => other
                .strip_prefix("proto-")
                .and_then(|n| n.parse().ok())
                .map(Proto::Other)
                .ok_or_else(|| format!("unknown protocol {other:?}"))?,
        })
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One direction of a connection: source and destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Tuple {
    /// The same tuple seen from the other end.
    pub fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// `addr:port`, with brackets around IPv6 addresses as in URLs.
pub struct Endpoint(pub IpAddr, pub u16);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}",
            Endpoint(self.src, self.sport),
            Endpoint(self.dst, self.dport)
        )
    }
}

/// Which address translations conntrack applied to a connection, derived from its two tuples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Nat {
    /// The destination was rewritten (kube-proxy's DNAT to a pod, for example).
    pub dnat: bool,
    /// The source was rewritten (MASQUERADE to the node IP, for example).
    pub snat: bool,
}

impl Nat {
    /// Compares the original tuple with the reversed reply tuple: what differs was translated.
    /// This holds for any NAT netfilter performs, whatever the status bits say. Without ports
    /// (ICMP) only addresses count: an echo's reply tuple carries another ICMP type by nature.
    pub fn between(proto: Proto, orig: &Tuple, reply: &Tuple) -> Nat {
        let after = reply.reversed();
        if proto.has_ports() {
            Nat {
                dnat: (orig.dst, orig.dport) != (after.dst, after.dport),
                snat: (orig.src, orig.sport) != (after.src, after.sport),
            }
        } else {
            Nat {
                dnat: orig.dst != after.dst,
                snat: orig.src != after.src,
            }
        }
    }

    /// `["dnat","snat"]`-style names, in that order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(2);
        if self.dnat {
            names.push("dnat");
        }
        if self.snat {
            names.push("snat");
        }
        names
    }
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match (self.dnat, self.snat) {
            (true, true) => "both",
            (true, false) => "dnat",
            (false, true) => "snat",
            (false, false) => "none",
        })
    }
}

/// What happened to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    New,
    NatChanged,
    Destroy,
}

/// Which capture source produced an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Ebpf,
    Netlink,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Ebpf => "ebpf",
            SourceKind::Netlink => "netlink",
        })
    }
}

/// Which eBPF hook reported an event (see [`aksnet_common::hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// A packet leaving an interface: the event carries interfaces and counters.
    Xmit,
    /// `nf_nat_setup_info`: the NAT decision, before any packet left.
    NatSetup,
    /// `nf_ct_delete`.
    CtDelete,
}

impl Hook {
    /// Whether the hook saw a packet, so the event knows the connection's interfaces.
    pub fn has_packet(self) -> bool {
        self == Hook::Xmit
    }
}

/// A conntrack entry's state as one capture source reported it at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub kind: EventKind,
    pub source: SourceKind,
    pub ts: SystemTime,
    pub proto: Proto,
    /// The tuple of the first packet, before any NAT.
    pub orig: Tuple,
    /// The tuple replies carry, after NAT: its reverse is where the connection really goes.
    pub reply: Tuple,
    /// Raw `nf_conn.status` bits ([`aksnet_common::ct_status`]).
    pub status: u64,
    pub mark: u32,
    pub zone: u16,
    /// Network namespace inode of the conntrack table that holds the entry.
    pub netns: u32,
    /// Interface the packet came in on, where known.
    pub in_ifindex: Option<u32>,
    /// Interface the packet left on, where known.
    pub out_ifindex: Option<u32>,
    /// Packets and bytes counted so far, where the source counts them.
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    /// The eBPF hook that reported the event; `None` for other sources.
    pub hook: Option<Hook>,
    /// Which conntrack entry, where the source tells (eBPF); `None` for netlink.
    pub instance: Option<Instance>,
}

/// One conntrack entry's identity, as the eBPF source reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Opaque while the entry lives (see `ConnEvent::conn_id`); reused after it ends.
    pub id: u64,
    /// A new connection reusing the entry of an earlier one with the same tuple.
    pub renewed: bool,
}

impl FlowEvent {
    pub fn nat(&self) -> Nat {
        Nat::between(self.proto, &self.orig, &self.reply)
    }

    /// The tuple after NAT, in the original direction (the reply tuple reversed).
    pub fn translated(&self) -> Tuple {
        self.reply.reversed()
    }

    /// Identity of the connection across events and sources: conntrack's own key is the
    /// original tuple with protocol, zone and namespace.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            netns: self.netns,
            zone: self.zone,
            proto: self.proto,
            orig: self.orig,
        }
    }
}

/// Identifies one conntrack entry across events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns: u32,
    pub zone: u16,
    pub proto: Proto,
    pub orig: Tuple,
}

/// Event builders the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `src:sport -> dst:dport`.
    pub(crate) fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    /// A kubenet pod's TCP connection to `dst:dport`, MASQUERADEd to the node IP 10.224.0.4 on
    /// `node_port`: its key and its source after the node's SNAT.
    pub(crate) fn pod_conn(
        pod_port: u16,
        node_port: u16,
        dst: &str,
        dport: u16,
    ) -> (FlowKey, Tuple) {
        let key = FlowKey {
            netns: 4026531840,
            zone: 0,
            proto: Proto::Tcp,
            orig: tuple("10.244.0.5", pod_port, dst, dport),
        };
        (key, tuple("10.224.0.4", node_port, dst, dport))
    }

    /// A TCP event of the eBPF source in the first namespace, at the epoch, with no packet
    /// details, hook or entry id: tests set what they look at with `..tcp_event(..)`.
    pub(crate) fn tcp_event(kind: EventKind, orig: Tuple, reply: Tuple) -> FlowEvent {
        FlowEvent {
            kind,
            source: SourceKind::Ebpf,
            ts: SystemTime::UNIX_EPOCH,
            proto: Proto::Tcp,
            orig,
            reply,
            status: 0,
            mark: 0,
            zone: 0,
            netns: 1,
            in_ifindex: None,
            out_ifindex: None,
            packets: None,
            bytes: None,
            hook: None,
            instance: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::tuple as t;
    use super::*;

    #[test]
    fn dnat_only_when_destination_changes() {
        let orig = t("203.0.113.10", 40000, "20.45.123.10", 80);
        let reply = t("10.244.0.5", 8080, "203.0.113.10", 40000);
        let nat = Nat::between(Proto::Tcp, &orig, &reply);
        assert_eq!(
            nat,
            Nat {
                dnat: true,
                snat: false
            }
        );
        assert_eq!(nat.to_string(), "dnat");
        assert_eq!(nat.names(), vec!["dnat"]);
    }

    #[test]
    fn masquerade_changing_only_the_port_is_snat() {
        let orig = t("10.244.0.5", 40000, "198.51.100.7", 443);
        let reply = t("198.51.100.7", 443, "10.244.0.5", 40001);
        assert_eq!(
            Nat::between(Proto::Tcp, &orig, &reply),
            Nat {
                dnat: false,
                snat: true
            }
        );
    }

    #[test]
    fn both_and_none() {
        let orig = t("203.0.113.10", 40000, "20.45.123.10", 80);
        assert_eq!(
            Nat::between(Proto::Tcp, &orig, &orig.reversed()).to_string(),
            "none"
        );
        let reply = t("10.244.0.5", 8080, "10.244.0.1", 7000);
        assert_eq!(Nat::between(Proto::Tcp, &orig, &reply).to_string(), "both");
    }

    #[test]
    fn icmp_echo_is_not_translated_by_its_reply_type() {
        // Echo request type 8 / id 7; the reply tuple carries echo-reply type 0.
        let orig = t("10.244.0.10", 7, "198.51.100.20", 8 << 8);
        let reply = t("198.51.100.20", 7, "10.244.0.10", 0);
        assert_eq!(Nat::between(Proto::Icmp, &orig, &reply).to_string(), "none");
        let masqueraded = t("198.51.100.20", 7, "10.224.0.4", 0);
        assert_eq!(
            Nat::between(Proto::Icmp, &orig, &masqueraded).to_string(),
            "snat"
        );
    }

    #[test]
    fn protocol_names_round_trip() {
        for proto in [
            Proto::Tcp,
            Proto::Udp,
            Proto::Icmp,
            Proto::Icmpv6,
            Proto::Sctp,
            Proto::Other(47),
        ] {
            assert_eq!(proto.to_string().parse::<Proto>(), Ok(proto));
        }
        assert!("gre".parse::<Proto>().is_err());
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let tuple = t("fd00::1", 1, "2001:db8::2", 443);
        assert_eq!(tuple.to_string(), "[fd00::1]:1 -> [2001:db8::2]:443");
    }
}
