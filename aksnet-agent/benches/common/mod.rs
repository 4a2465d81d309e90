//! The flows the benchmarks feed the agent's pipeline: the lab's (xtask::lab) addresses.

use aksnet_agent::events::{EventKind, FlowEvent, Proto, SourceKind, Tuple};
use aksnet_common::ct_status;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

pub fn tuple(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Tuple {
    Tuple {
        src: IpAddr::V4(src),
        sport,
        dst: IpAddr::V4(dst),
        dport,
    }
}

/// Internet client → LB frontend 192.0.2.10:80 → app pod 10.244.0.10:8080, masqueraded to cbr0.
/// `n` varies the client address and port so that every `n` is a distinct connection.
pub fn lb_inbound(n: u32) -> FlowEvent {
    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 0)) + (n >> 16) % 256);
    let sport = (n & 0xffff) as u16;
    FlowEvent {
        kind: EventKind::New,
        source: SourceKind::Ebpf,
        ts: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        proto: Proto::Tcp,
        orig: tuple(client, sport, Ipv4Addr::new(192, 0, 2, 10), 80),
        reply: tuple(
            Ipv4Addr::new(10, 244, 0, 10),
            8080,
            Ipv4Addr::new(10, 244, 0, 1),
            sport,
        ),
        status: ct_status::CONFIRMED | ct_status::DST_NAT | ct_status::SRC_NAT,
        mark: 0x4000,
        zone: 0,
        netns: 4026532000,
        in_ifindex: Some(2),
        out_ifindex: Some(4),
        packets: None,
        bytes: None,
        hook: None,
        instance: None,
    }
}
