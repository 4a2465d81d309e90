//! The stored form of a live flow: the tuples, ids, times and counters, packed.
//!
//! A node may hold a million live connections, so a table entry keeps no `Option` padding, no
//! `IpAddr` enum tags and no `SystemTime`s: what is absent is a flag bit, addresses are 16 bytes
//! (IPv4 mapped into IPv6, with a bit saying so) and times are nanoseconds since the epoch.

use super::Flow;
use crate::events::{EventKind, FlowEvent, FlowKey, Hook, Instance, Proto, SourceKind, Tuple};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime};

/// One direction's addresses and ports.
#[derive(Clone, Copy)]
struct PackedTuple {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

/// Which [`Entry::flags`] bit says what.
mod flag {
    /// Bits 0..4: the address at that position (orig src, orig dst, reply src, reply dst) is
    /// IPv4.
    pub const V4: u16 = 1;
    pub const IN_IFINDEX: u16 = 1 << 4;
    pub const OUT_IFINDEX: u16 = 1 << 5;
    pub const PACKETS: u16 = 1 << 6;
    pub const BYTES: u16 = 1 << 7;
    pub const INSTANCE: u16 = 1 << 8;
    pub const RENEWED: u16 = 1 << 9;
    pub const NETLINK: u16 = 1 << 10;
    pub const NAT_CHANGED: u16 = 1 << 11;
    /// Bits 12..14: the hook, 0 for none.
    pub const HOOK_SHIFT: u16 = 12;
    pub const HOOK_MASK: u16 = 0b11 << HOOK_SHIFT;
}

/// A live flow as the table stores it; [`Entry::flow`] gives it back whole.
#[derive(Clone, Copy)]
pub(super) struct Entry {
    orig: PackedTuple,
    reply: PackedTuple,
    status: u64,
    packets: u64,
    bytes: u64,
    instance_id: u64,
    /// Nanoseconds since the Unix epoch (negative before it); the first is also the event's.
    first_seen: i64,
    last_seen: i64,
    netns: u32,
    mark: u32,
    in_ifindex: u32,
    out_ifindex: u32,
    earlier_ends_pending: u32,
    zone: u16,
    flags: u16,
    /// The IP protocol number.
    proto: u8,
}

impl Entry {
    pub(super) fn new(flow: &Flow) -> Entry {
        let ev = &flow.event;
        let mut flags = 0;
        for (i, addr) in [ev.orig.src, ev.orig.dst, ev.reply.src, ev.reply.dst]
            .iter()
            .enumerate()
        {
            if addr.is_ipv4() {
                flags |= flag::V4 << i;
            }
        }
        let mut present = |bit, value: Option<u64>| {
            if value.is_some() {
                flags |= bit;
            }
            value.unwrap_or(0)
        };
        let in_ifindex = present(flag::IN_IFINDEX, ev.in_ifindex.map(u64::from)) as u32;
        let out_ifindex = present(flag::OUT_IFINDEX, ev.out_ifindex.map(u64::from)) as u32;
        let packets = present(flag::PACKETS, ev.packets);
        let bytes = present(flag::BYTES, ev.bytes);
        let instance_id = present(flag::INSTANCE, ev.instance.map(|i| i.id));
        if ev.instance.is_some_and(|i| i.renewed) {
            flags |= flag::RENEWED;
        }
        if ev.source == SourceKind::Netlink {
            flags |= flag::NETLINK;
        }
        if ev.kind == EventKind::NatChanged {
            flags |= flag::NAT_CHANGED;
        }
        let hook = match ev.hook {
            None => 0,
            Some(Hook::Xmit) => 1,
            Some(Hook::NatSetup) => 2,
            Some(Hook::CtDelete) => 3,
        };
        flags |= hook << flag::HOOK_SHIFT;
        Entry {
            orig: pack(&ev.orig),
            reply: pack(&ev.reply),
            status: ev.status,
            packets,
            bytes,
            instance_id,
            first_seen: nanos(flow.first_seen),
            last_seen: nanos(flow.last_seen),
            netns: ev.netns,
            mark: ev.mark,
            in_ifindex,
            out_ifindex,
            earlier_ends_pending: flow.earlier_ends_pending,
            zone: ev.zone,
            flags,
            proto: proto_number(ev.proto),
        }
    }

    pub(super) fn flow(&self) -> Flow {
        let has = |bit| self.flags & bit != 0;
        let first_seen = time(self.first_seen);
        Flow {
            event: FlowEvent {
                kind: if has(flag::NAT_CHANGED) {
                    EventKind::NatChanged
                } else {
                    EventKind::New
                },
                source: if has(flag::NETLINK) {
                    SourceKind::Netlink
                } else {
                    SourceKind::Ebpf
                },
                ts: first_seen,
                proto: Proto::from_number(self.proto),
                orig: self.unpack(&self.orig, 0),
                reply: self.unpack(&self.reply, 2),
                status: self.status,
                mark: self.mark,
                zone: self.zone,
                netns: self.netns,
                in_ifindex: has(flag::IN_IFINDEX).then_some(self.in_ifindex),
                out_ifindex: has(flag::OUT_IFINDEX).then_some(self.out_ifindex),
                packets: has(flag::PACKETS).then_some(self.packets),
                bytes: has(flag::BYTES).then_some(self.bytes),
                hook: match (self.flags & flag::HOOK_MASK) >> flag::HOOK_SHIFT {
                    1 => Some(Hook::Xmit),
                    2 => Some(Hook::NatSetup),
                    3 => Some(Hook::CtDelete),
                    _ => None,
                },
                instance: has(flag::INSTANCE).then_some(Instance {
                    id: self.instance_id,
                    renewed: has(flag::RENEWED),
                }),
            },
            first_seen,
            last_seen: time(self.last_seen),
            earlier_ends_pending: self.earlier_ends_pending,
        }
    }

    pub(super) fn key(&self) -> FlowKey {
        FlowKey {
            netns: self.netns,
            zone: self.zone,
            proto: Proto::from_number(self.proto),
            orig: self.unpack(&self.orig, 0),
        }
    }

    /// `tuple`, whose source address is at flag position `at` and destination at `at + 1`.
    fn unpack(&self, tuple: &PackedTuple, at: u16) -> Tuple {
        let addr = |octets: [u8; 16], at: u16| {
            let v6 = Ipv6Addr::from(octets);
            match v6.to_ipv4_mapped() {
                Some(v4) if self.flags & (flag::V4 << at) != 0 => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            }
        };
        Tuple {
            src: addr(tuple.src, at),
            sport: tuple.sport,
            dst: addr(tuple.dst, at + 1),
            dport: tuple.dport,
        }
    }
}

fn pack(tuple: &Tuple) -> PackedTuple {
    let octets = |addr: IpAddr| match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    PackedTuple {
        src: octets(tuple.src),
        dst: octets(tuple.dst),
        sport: tuple.sport,
        dport: tuple.dport,
    }
}

/// The inverse of [`Proto::from_number`].
fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Icmp => 1,
        Proto::Icmpv6 => 58,
        Proto::Sctp => 132,
        Proto::Other(n) => n,
    }
}

/// Nanoseconds from the epoch: an `i64` spans ±292 years, far beyond any clock a flow carries.
fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i64,
        Err(before) => -(before.duration().as_nanos() as i64),
    }
}

fn time(nanos: i64) -> SystemTime {
    let offset = Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 {
        SystemTime::UNIX_EPOCH + offset
    } else {
        SystemTime::UNIX_EPOCH - offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::testing::{tcp_event, tuple};

    fn round_trip(flow: Flow) {
        assert_eq!(Entry::new(&flow).flow(), flow);
        assert_eq!(Entry::new(&flow).key(), flow.event.key());
    }

    #[test]
    fn every_field_comes_back_as_it_went_in() {
        let event = tcp_event(
            EventKind::NatChanged,
            tuple("203.0.113.10", 40000, "192.0.2.10", 80),
            tuple("10.244.0.10", 8080, "10.244.0.1", 40000),
        );
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::new(secs, 123_456_789);
        round_trip(Flow {
            event: FlowEvent {
                ts: at(1_800_000_000),
                source: SourceKind::Netlink,
                proto: Proto::Other(47),
                status: u64::MAX - 1,
                mark: 0x4000,
                zone: 7,
                netns: 4026532000,
                in_ifindex: Some(0),
                out_ifindex: Some(u32::MAX),
                packets: Some(0),
                bytes: Some(u64::MAX),
                hook: Some(Hook::CtDelete),
                instance: Some(Instance {
                    id: u64::MAX,
                    renewed: true,
                }),
                ..event.clone()
            },
            first_seen: at(1_800_000_000),
            last_seen: at(1_800_000_009),
            earlier_ends_pending: 3,
        });
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_nanos(5);
        round_trip(Flow {
            event: FlowEvent {
                ts: before_epoch,
                ..event
            },
            first_seen: before_epoch,
            last_seen: before_epoch,
            earlier_ends_pending: 0,
        });
    }

    #[test]
    fn ipv6_and_ipv4_mapped_ipv6_addresses_stay_ipv6() {
        let event = tcp_event(
            EventKind::New,
            tuple("2001:db8::1", 40000, "::ffff:192.0.2.10", 443),
            tuple("::ffff:192.0.2.10", 443, "2001:db8::1", 40000),
        );
        round_trip(Flow {
            first_seen: event.ts,
            last_seen: event.ts,
            event,
            earlier_ends_pending: 0,
        });
    }
}
