//! Decoding of ctnetlink event datagrams into [`FlowEvent`]s: a pure function over bytes.
//!
//! Layout: `nlmsghdr` (host byte order) → `nfgenmsg` → attributes (`nlattr`, 4-byte aligned,
//! nested ones flagged `NLA_F_NESTED`) whose values are big-endian. Numbers are from
//! `include/uapi/linux/netlink.h`, `netfilter/nfnetlink.h` and `netfilter/nfnetlink_conntrack.h`.

use crate::events::{EventKind, FlowEvent, Proto, SourceKind, Tuple};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
/// `NLM_F_CREATE`: set on ctnetlink NEW events, absent on UPDATE events (same message type).
const NLM_F_CREATE: u16 = 0x400;
/// Clears `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` from `nla_type`.
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));

/// `enum nfnetlink_groups`.
pub const NFNLGRP_CONNTRACK_NEW: u32 = 1;
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

/// `nlmsg_type` is `subsystem << 8 | message`.
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `struct nfgenmsg`: family, version, big-endian resource id.
pub(crate) const NFGENMSG_LEN: usize = 4;

/// `enum cntl_msg_types`.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// `enum ctattr_type`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ZONE: u16 = 18;

/// `enum ctattr_tuple`.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

/// `enum ctattr_ip`.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

/// `enum ctattr_l4proto`.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

/// `enum ctattr_counters`.
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("netlink datagram ends with {0} bytes, too few for a 16-byte nlmsghdr")]
    ShortHeader(usize),
    #[error("nlmsghdr says {len} bytes but {left} remain in the datagram")]
    MessageLength { len: usize, left: usize },
    #[error("ctnetlink message body is {0} bytes, too short for its 4-byte nfgenmsg")]
    ShortNfgenmsg(usize),
    #[error("netlink attribute header says {len} bytes but {left} remain")]
    AttrLength { len: usize, left: usize },
    #[error("conntrack attribute {name} is {got} bytes, expected {expected}")]
    AttrSize {
        name: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("conntrack event has no {0}")]
    Missing(&'static str),
    #[error("conntrack event has no {what} in {tuple}")]
    MissingInTuple {
        what: &'static str,
        tuple: &'static str,
    },
}

/// Decodes every conntrack NEW and DESTROY event in one datagram received on a ctnetlink
/// event socket. Other messages (NLMSG_NOOP, UPDATE events, other subsystems) are skipped.
/// An error in one message does not hide the others, except a broken `nlmsghdr`, after which
/// the rest of the datagram cannot be framed.
pub fn parse_datagram(
    buf: &[u8],
    netns: u32,
    ts: SystemTime,
) -> Vec<Result<FlowEvent, ParseError>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            out.push(Err(ParseError::ShortHeader(rest.len())));
            break;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            out.push(Err(ParseError::MessageLength {
                len,
                left: rest.len(),
            }));
            break;
        }
        let msg_type = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        if let Some(kind) = event_kind(msg_type, flags) {
            out.push(parse_event(kind, &rest[NLMSG_HDRLEN..len], netns, ts));
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

/// Which event a message is, or `None` for messages this source does not report.
fn event_kind(msg_type: u16, flags: u16) -> Option<EventKind> {
    if msg_type >> 8 != NFNL_SUBSYS_CTNETLINK {
        return None;
    }
    match msg_type & 0xff {
        // NEW and UPDATE events share the type; only NEW carries NLM_F_CREATE. UPDATE is not
        // subscribed: NEW is sent at confirm time, after DNAT and SNAT are both set up.
        IPCTNL_MSG_CT_NEW if flags & NLM_F_CREATE != 0 => Some(EventKind::New),
        IPCTNL_MSG_CT_DELETE => Some(EventKind::Destroy),
        _ => None,
    }
}

fn parse_event(
    kind: EventKind,
    body: &[u8],
    netns: u32,
    ts: SystemTime,
) -> Result<FlowEvent, ParseError> {
    if body.len() < NFGENMSG_LEN {
        return Err(ParseError::ShortNfgenmsg(body.len()));
    }
    let mut orig = None;
    let mut reply = None;
    let mut status = 0;
    let mut mark = 0;
    // Absent means the default zone: ctnetlink omits CTA_ZONE for zone 0.
    let mut zone = 0;
    let mut counters: Option<(u64, u64)> = None;
    for attr in Attrs(&body[NFGENMSG_LEN..]) {
        let (ty, payload) = attr?;
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(payload, "CTA_TUPLE_ORIG")?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(payload, "CTA_TUPLE_REPLY")?),
            CTA_STATUS => status = u64::from(be_u32(payload, "CTA_STATUS")?),
            CTA_MARK => mark = be_u32(payload, "CTA_MARK")?,
            CTA_ZONE => zone = be_u16(payload, "CTA_ZONE")?,
            // Present when nf_conntrack_acct is on, on DESTROY events: the connection's total
            // is both directions added.
            CTA_COUNTERS_ORIG | CTA_COUNTERS_REPLY => {
                let (packets, bytes) = parse_counters(payload)?;
                let (p, b) = counters.unwrap_or((0, 0));
                counters = Some((p.saturating_add(packets), b.saturating_add(bytes)));
            }
            _ => {}
        }
    }
    let (proto, orig) = orig.ok_or(ParseError::Missing("CTA_TUPLE_ORIG"))?;
    let (_, reply) = reply.ok_or(ParseError::Missing("CTA_TUPLE_REPLY"))?;
    Ok(FlowEvent {
        kind,
        source: SourceKind::Netlink,
        ts,
        proto,
        orig,
        reply,
        status,
        mark,
        zone,
        netns,
        in_ifindex: None,
        out_ifindex: None,
        packets: counters.map(|c| c.0),
        bytes: counters.map(|c| c.1),
        hook: None,
        instance: None,
    })
}

/// `CTA_TUPLE_*`: addresses from `CTA_TUPLE_IP`, protocol and ports from `CTA_TUPLE_PROTO`.
/// ICMP and ICMPv6 are reported like the kernel stores them (and the eBPF source decodes
/// them): the echo id as the source port, `type << 8 | code` as the destination port.
fn parse_tuple(payload: &[u8], which: &'static str) -> Result<(Proto, Tuple), ParseError> {
    let (mut src, mut dst) = (None, None);
    let mut protonum = None;
    let (mut sport, mut dport) = (0u16, 0u16);
    let (mut icmp_type, mut icmp_code) = (None, None);
    for attr in Attrs(payload) {
        let (ty, inner) = attr?;
        match ty {
            CTA_TUPLE_IP => {
                for attr in Attrs(inner) {
                    let (ty, value) = attr?;
                    match ty {
                        CTA_IP_V4_SRC => src = Some(ipv4(value, "CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => dst = Some(ipv4(value, "CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => src = Some(ipv6(value, "CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => dst = Some(ipv6(value, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attr in Attrs(inner) {
                    let (ty, value) = attr?;
                    match ty {
                        CTA_PROTO_NUM => protonum = Some(be_u8(value, "CTA_PROTO_NUM")?),
                        CTA_PROTO_SRC_PORT => sport = be_u16(value, "CTA_PROTO_SRC_PORT")?,
                        CTA_PROTO_DST_PORT => dport = be_u16(value, "CTA_PROTO_DST_PORT")?,
                        CTA_PROTO_ICMP_ID => sport = be_u16(value, "CTA_PROTO_ICMP_ID")?,
                        CTA_PROTO_ICMPV6_ID => sport = be_u16(value, "CTA_PROTO_ICMPV6_ID")?,
                        CTA_PROTO_ICMP_TYPE => {
                            icmp_type = Some(be_u8(value, "CTA_PROTO_ICMP_TYPE")?)
                        }
                        CTA_PROTO_ICMPV6_TYPE => {
                            icmp_type = Some(be_u8(value, "CTA_PROTO_ICMPV6_TYPE")?)
                        }
                        CTA_PROTO_ICMP_CODE => {
                            icmp_code = Some(be_u8(value, "CTA_PROTO_ICMP_CODE")?)
                        }
                        CTA_PROTO_ICMPV6_CODE => {
                            icmp_code = Some(be_u8(value, "CTA_PROTO_ICMPV6_CODE")?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if icmp_type.is_some() || icmp_code.is_some() {
        dport = u16::from_be_bytes([icmp_type.unwrap_or(0), icmp_code.unwrap_or(0)]);
    }
    let missing = |what: &'static str| ParseError::MissingInTuple { what, tuple: which };
    let tuple = Tuple {
        src: src.ok_or_else(|| missing("source address"))?,
        sport,
        dst: dst.ok_or_else(|| missing("destination address"))?,
        dport,
    };
    let protonum = protonum.ok_or_else(|| missing("CTA_PROTO_NUM"))?;
    Ok((Proto::from_number(protonum), tuple))
}

fn parse_counters(payload: &[u8]) -> Result<(u64, u64), ParseError> {
    let (mut packets, mut bytes) = (0, 0);
    for attr in Attrs(payload) {
        let (ty, value) = attr?;
        match ty {
            CTA_COUNTERS_PACKETS => packets = be_u64(value, "CTA_COUNTERS_PACKETS")?,
            CTA_COUNTERS_BYTES => bytes = be_u64(value, "CTA_COUNTERS_BYTES")?,
            _ => {}
        }
    }
    Ok((packets, bytes))
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates `(type, payload)` over a run of netlink attributes; stops after the first error.
pub(crate) struct Attrs<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0;
        if rest.is_empty() {
            return None;
        }
        let len = if rest.len() >= NLA_HDRLEN {
            usize::from(u16::from_ne_bytes([rest[0], rest[1]]))
        } else {
            0
        };
        if len < NLA_HDRLEN || len > rest.len() {
            self.0 = &[];
            return Some(Err(ParseError::AttrLength {
                len,
                left: rest.len(),
            }));
        }
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        self.0 = &rest[align4(len).min(rest.len())..];
        Some(Ok((ty, &rest[NLA_HDRLEN..len])))
    }
}

fn fixed<const N: usize>(value: &[u8], name: &'static str) -> Result<[u8; N], ParseError> {
    value.try_into().map_err(|_| ParseError::AttrSize {
        name,
        got: value.len(),
        expected: N,
    })
}

fn be_u8(value: &[u8], name: &'static str) -> Result<u8, ParseError> {
    Ok(fixed::<1>(value, name)?[0])
}

fn be_u16(value: &[u8], name: &'static str) -> Result<u16, ParseError> {
    fixed(value, name).map(u16::from_be_bytes)
}

pub(crate) fn be_u32(value: &[u8], name: &'static str) -> Result<u32, ParseError> {
    fixed(value, name).map(u32::from_be_bytes)
}

fn be_u64(value: &[u8], name: &'static str) -> Result<u64, ParseError> {
    fixed(value, name).map(u64::from_be_bytes)
}

fn ipv4(value: &[u8], name: &'static str) -> Result<IpAddr, ParseError> {
    fixed::<4>(value, name).map(|b| IpAddr::V4(Ipv4Addr::from(b)))
}

fn ipv6(value: &[u8], name: &'static str) -> Result<IpAddr, ParseError> {
    fixed::<16>(value, name).map(|b| IpAddr::V6(Ipv6Addr::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NLA_F_NESTED: u16 = 1 << 15;
    const NLMSG_NOOP: u16 = 1;
    const NLM_F_EXCL: u16 = 0x200;
    const NETNS: u32 = 4026532001;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
        out
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | NLA_F_NESTED, &parts.concat())
    }

    fn ip_attrs(src: &str, dst: &str) -> Vec<u8> {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let one = |ty_v4, ty_v6, a: IpAddr| match a {
            IpAddr::V4(a) => attr(ty_v4, &a.octets()),
            IpAddr::V6(a) => attr(ty_v6, &a.octets()),
        };
        nested(
            CTA_TUPLE_IP,
            &[
                one(CTA_IP_V4_SRC, CTA_IP_V6_SRC, src),
                one(CTA_IP_V4_DST, CTA_IP_V6_DST, dst),
            ],
        )
    }

    fn port_tuple(ty: u16, proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        nested(
            ty,
            &[
                ip_attrs(src, dst),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[proto]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    fn message(msg: u16, flags: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = attrs.concat();
        let len = (NLMSG_HDRLEN + NFGENMSG_LEN + body.len()) as u32;
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | msg).to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // seq
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id
        out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg, res_id 0
        out.extend_from_slice(&body);
        out
    }

    fn new_msg(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, family, attrs)
    }

    fn ts() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn only(buf: &[u8]) -> FlowEvent {
        let mut all = parse_datagram(buf, NETNS, ts());
        assert_eq!(all.len(), 1, "{all:?}");
        all.pop().unwrap().unwrap()
    }

    /// An internet client through a LoadBalancer frontend DNATed to a pod and masqueraded.
    fn tcp_dnat_new() -> Vec<u8> {
        new_msg(
            libc::AF_INET as u8,
            &[
                port_tuple(CTA_TUPLE_ORIG, 6, "203.0.113.10", 40000, "192.0.2.10", 80),
                port_tuple(CTA_TUPLE_REPLY, 6, "10.244.0.10", 8080, "10.244.0.1", 40000),
                attr(CTA_STATUS, &0x1b8u32.to_be_bytes()),
                attr(CTA_MARK, &0x4000u32.to_be_bytes()),
                attr(CTA_ZONE, &7u16.to_be_bytes()),
                attr(12, &0xdead_beefu32.to_be_bytes()), // CTA_ID: skipped
                nested(4, &[attr(1, &[3])]),             // CTA_PROTOINFO: skipped
            ],
        )
    }

    #[test]
    fn ipv4_tcp_dnat_new_event() {
        let ev = only(&tcp_dnat_new());
        assert_eq!(ev.kind, EventKind::New);
        assert_eq!(ev.source, SourceKind::Netlink);
        assert_eq!(ev.proto, Proto::Tcp);
        assert_eq!(ev.orig.to_string(), "203.0.113.10:40000 -> 192.0.2.10:80");
        assert_eq!(ev.reply.to_string(), "10.244.0.10:8080 -> 10.244.0.1:40000");
        assert_eq!(ev.nat().to_string(), "both");
        assert_eq!(ev.status, 0x1b8);
        assert_eq!((ev.mark, ev.zone, ev.netns), (0x4000, 7, NETNS));
        assert_eq!(ev.ts, ts());
        assert_eq!((ev.in_ifindex, ev.out_ifindex), (None, None));
        assert_eq!((ev.packets, ev.bytes), (None, None));
    }

    #[test]
    fn ipv6_udp_defaults_zone_and_mark_to_zero() {
        let ev = only(&new_msg(
            libc::AF_INET6 as u8,
            &[
                port_tuple(CTA_TUPLE_ORIG, 17, "fd00::5", 5353, "2001:db8::53", 53),
                port_tuple(CTA_TUPLE_REPLY, 17, "2001:db8::53", 53, "fd00::5", 5353),
                attr(CTA_STATUS, &8u32.to_be_bytes()),
            ],
        ));
        assert_eq!(ev.proto, Proto::Udp);
        assert_eq!(ev.orig.to_string(), "[fd00::5]:5353 -> [2001:db8::53]:53");
        assert_eq!(ev.nat().to_string(), "none");
        assert_eq!((ev.mark, ev.zone, ev.status), (0, 0, 8));
    }

    fn icmp_tuple(ty: u16, v6: bool, src: &str, dst: &str, id: u16, typ: u8) -> Vec<u8> {
        let (num, id_t, type_t, code_t) = if v6 {
            (
                58,
                CTA_PROTO_ICMPV6_ID,
                CTA_PROTO_ICMPV6_TYPE,
                CTA_PROTO_ICMPV6_CODE,
            )
        } else {
            (
                1,
                CTA_PROTO_ICMP_ID,
                CTA_PROTO_ICMP_TYPE,
                CTA_PROTO_ICMP_CODE,
            )
        };
        nested(
            ty,
            &[
                ip_attrs(src, dst),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[num]),
                        attr(id_t, &id.to_be_bytes()),
                        attr(type_t, &[typ]),
                        attr(code_t, &[0]),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn icmp_echo_id_and_type_code_take_the_port_slots() {
        let ev = only(&new_msg(
            libc::AF_INET as u8,
            &[
                icmp_tuple(
                    CTA_TUPLE_ORIG,
                    false,
                    "10.244.0.10",
                    "198.51.100.7",
                    0x1234,
                    8,
                ),
                icmp_tuple(
                    CTA_TUPLE_REPLY,
                    false,
                    "198.51.100.7",
                    "10.224.0.4",
                    0x1234,
                    0,
                ),
            ],
        ));
        assert_eq!(ev.proto, Proto::Icmp);
        assert_eq!((ev.orig.sport, ev.orig.dport), (0x1234, 8 << 8));
        assert_eq!((ev.reply.sport, ev.reply.dport), (0x1234, 0));
        assert_eq!(ev.reply.dst.to_string(), "10.224.0.4");

        let ev = only(&new_msg(
            libc::AF_INET6 as u8,
            &[
                icmp_tuple(CTA_TUPLE_ORIG, true, "fd00::5", "2001:db8::1", 7, 128),
                icmp_tuple(CTA_TUPLE_REPLY, true, "2001:db8::1", "fd00::5", 7, 129),
            ],
        ));
        assert_eq!(ev.proto, Proto::Icmpv6);
        assert_eq!((ev.orig.sport, ev.orig.dport), (7, 128 << 8));
        assert_eq!(ev.reply.dport, 129 << 8);
    }

    #[test]
    fn destroy_sums_both_directions_counters() {
        let counters = |p: u64, b: u64| {
            [
                attr(CTA_COUNTERS_PACKETS, &p.to_be_bytes()),
                attr(CTA_COUNTERS_BYTES, &b.to_be_bytes()),
            ]
        };
        let ev = only(&message(
            IPCTNL_MSG_CT_DELETE,
            0,
            libc::AF_INET as u8,
            &[
                port_tuple(CTA_TUPLE_ORIG, 17, "10.244.0.11", 5353, "10.0.0.53", 53),
                port_tuple(
                    CTA_TUPLE_REPLY,
                    17,
                    "10.244.0.11",
                    5353,
                    "10.244.0.11",
                    5353,
                ),
                nested(CTA_COUNTERS_ORIG, &counters(3, 180)),
                nested(CTA_COUNTERS_REPLY, &counters(2, 300)),
            ],
        ));
        assert_eq!(ev.kind, EventKind::Destroy);
        assert_eq!((ev.packets, ev.bytes), (Some(5), Some(480)));
    }

    #[test]
    fn several_messages_in_one_datagram_and_others_skipped() {
        let update = message(IPCTNL_MSG_CT_NEW, 0, 2, &[]);
        let mut noop = message(0, 0, 0, &[]);
        noop[4..6].copy_from_slice(&NLMSG_NOOP.to_ne_bytes());
        let buf = [tcp_dnat_new(), update, noop, tcp_dnat_new()].concat();
        let all = parse_datagram(&buf, NETNS, ts());
        assert_eq!(all.len(), 2);
        assert!(all
            .iter()
            .all(|r| r.as_ref().unwrap().kind == EventKind::New));
    }

    #[test]
    fn truncated_input_is_an_error_never_a_panic() {
        let full = tcp_dnat_new();
        for cut in 1..full.len() {
            let all = parse_datagram(&full[..cut], NETNS, ts());
            assert_eq!(all.len(), 1, "cut at {cut}");
            assert!(all[0].is_err(), "cut at {cut}: {:?}", all[0]);
        }
        assert!(parse_datagram(&[], NETNS, ts()).is_empty());
    }

    #[test]
    fn malformed_attributes_are_reported() {
        // nfgenmsg missing entirely.
        let mut short = new_msg(2, &[]);
        short.truncate(NLMSG_HDRLEN + 2);
        short[0..4].copy_from_slice(&((NLMSG_HDRLEN + 2) as u32).to_ne_bytes());
        assert_eq!(
            parse_datagram(&short, NETNS, ts()),
            vec![Err(ParseError::ShortNfgenmsg(2))]
        );
        // A status of the wrong width.
        let bad = new_msg(2, &[attr(CTA_STATUS, &[1, 2])]);
        assert_eq!(
            parse_datagram(&bad, NETNS, ts()),
            vec![Err(ParseError::AttrSize {
                name: "CTA_STATUS",
                got: 2,
                expected: 4
            })]
        );
        // An attribute length shorter than its own header.
        let mut zero_len = new_msg(2, &[attr(CTA_MARK, &[0; 4])]);
        zero_len[NLMSG_HDRLEN + NFGENMSG_LEN..][..2].copy_from_slice(&2u16.to_ne_bytes());
        assert!(matches!(
            parse_datagram(&zero_len, NETNS, ts())[0],
            Err(ParseError::AttrLength { len: 2, .. })
        ));
        // No reply tuple; no protocol number.
        let no_reply = new_msg(
            2,
            &[port_tuple(
                CTA_TUPLE_ORIG,
                6,
                "192.0.2.1",
                1,
                "192.0.2.2",
                2,
            )],
        );
        assert_eq!(
            parse_datagram(&no_reply, NETNS, ts()),
            vec![Err(ParseError::Missing("CTA_TUPLE_REPLY"))]
        );
        let no_proto = new_msg(
            2,
            &[nested(
                CTA_TUPLE_ORIG,
                &[ip_attrs("192.0.2.1", "192.0.2.2")],
            )],
        );
        assert_eq!(
            parse_datagram(&no_proto, NETNS, ts()),
            vec![Err(ParseError::MissingInTuple {
                what: "CTA_PROTO_NUM",
                tuple: "CTA_TUPLE_ORIG"
            })]
        );
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let full = tcp_dnat_new();
        // Deterministic xorshift so failures reproduce.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut buf = full.clone();
            let at = (state as usize) % buf.len();
            buf[at] = (state >> 32) as u8;
            let _ = parse_datagram(&buf, NETNS, ts());
        }
    }
}
