//! Decoding of the kernel's [`ConnEvent`] records into [`FlowEvent`]s.

use super::{EventKind, FlowEvent, Hook, Instance, Proto, SourceKind, Tuple};
use aksnet_common::{conn_flags, event_kind, hook, ConnEvent, RawTuple};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record is {got} bytes, expected {expected} (aksnet-ebpf and aksnet-agent were built from different aksnet-common versions: rebuild both)")]
    Size { got: usize, expected: usize },
    #[error("conntrack tuple has address family {0}, expected AF_INET (2) or AF_INET6 (10)")]
    Family(u16),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown hook {0}")]
    Hook(u8),
}

/// Converts the kernel's boot-time clock into wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// Wall-clock time at boot-clock zero.
    boot_epoch: SystemTime,
}

impl BootClock {
    /// Reads both clocks now; the kernel stamps events with `bpf_ktime_get_boot_ns`.
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME exists on every supported kernel.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        let since_boot = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        BootClock {
            boot_epoch: SystemTime::now() - since_boot,
        }
    }

    pub fn with_epoch(boot_epoch: SystemTime) -> Self {
        BootClock { boot_epoch }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        self.boot_epoch + Duration::from_nanos(boot_ns)
    }
}

/// Decodes one ring-buffer record.
pub fn decode_conn_event(bytes: &[u8], clock: &BootClock) -> Result<FlowEvent, DecodeError> {
    let expected = size_of::<ConnEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length matches and ConnEvent is plain old data; read_unaligned copes with
    // the ring buffer's 8-byte alignment not being guaranteed by the slice type.
    let raw: ConnEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = match raw.kind {
        event_kind::NEW => EventKind::New,
        event_kind::NAT_CHANGED => EventKind::NatChanged,
        event_kind::DESTROY => EventKind::Destroy,
        other => return Err(DecodeError::Kind(other)),
    };
    let hook = match raw.hook {
        hook::XMIT => Hook::Xmit,
        hook::NAT_SETUP => Hook::NatSetup,
        hook::CT_DELETE => Hook::CtDelete,
        other => return Err(DecodeError::Hook(other)),
    };
    let nonzero = |v: u32| (v != 0).then_some(v);
    let counted = |v: u64| (raw.packets != 0).then_some(v);
    Ok(FlowEvent {
        kind,
        source: SourceKind::Ebpf,
        ts: clock.wall(raw.ts_ns),
        proto: Proto::from_number(raw.orig.protonum),
        orig: decode_tuple(&raw.orig)?,
        reply: decode_tuple(&raw.reply)?,
        status: raw.status,
        mark: raw.mark,
        zone: raw.zone,
        netns: raw.netns,
        in_ifindex: nonzero(raw.in_ifindex),
        out_ifindex: nonzero(raw.out_ifindex),
        packets: counted(raw.packets),
        bytes: counted(raw.bytes),
        hook: Some(hook),
        instance: Some(Instance {
            id: raw.conn_id,
            renewed: raw.flags & conn_flags::RENEWED != 0,
        }),
    })
}

fn decode_tuple(raw: &RawTuple) -> Result<Tuple, DecodeError> {
    let addr = |b: &[u8; 16]| -> Result<IpAddr, DecodeError> {
        match raw.l3num {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*b))),
            other => Err(DecodeError::Family(other)),
        }
    };
    Ok(Tuple {
        src: addr(&raw.src)?,
        sport: u16::from_be(raw.sport),
        dst: addr(&raw.dst)?,
        dport: u16::from_be(raw.dport),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aksnet_common::ct_status;

    fn raw_tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> RawTuple {
        let mut t = RawTuple {
            l3num: AF_INET,
            protonum: 6,
            ..Default::default()
        };
        t.src[..4].copy_from_slice(&src);
        t.dst[..4].copy_from_slice(&dst);
        t.sport = sport.to_be();
        t.dport = dport.to_be();
        t
    }

    fn bytes_of(ev: &ConnEvent) -> Vec<u8> {
        // SAFETY: ConnEvent is repr(C) plain data.
        unsafe {
            std::slice::from_raw_parts(
                (ev as *const ConnEvent).cast::<u8>(),
                size_of::<ConnEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_dnat_event_with_network_order_ports() {
        let ev = ConnEvent {
            ts_ns: 2_000_000_000,
            status: ct_status::CONFIRMED | ct_status::DST_NAT | ct_status::DST_NAT_DONE,
            orig: raw_tuple([203, 0, 113, 10], 40000, [20, 45, 123, 10], 80),
            reply: raw_tuple([10, 244, 0, 5], 8080, [203, 0, 113, 10], 40000),
            netns: 4026531840,
            in_ifindex: 2,
            out_ifindex: 7,
            kind: event_kind::NEW,
            hook: hook::XMIT,
            ..Default::default()
        };
        let clock = BootClock::with_epoch(SystemTime::UNIX_EPOCH);
        let flow = decode_conn_event(&bytes_of(&ev), &clock).unwrap();
        assert_eq!(flow.kind, EventKind::New);
        assert_eq!(flow.proto, Proto::Tcp);
        assert_eq!(
            flow.orig.to_string(),
            "203.0.113.10:40000 -> 20.45.123.10:80"
        );
        assert_eq!(
            flow.translated().to_string(),
            "203.0.113.10:40000 -> 10.244.0.5:8080"
        );
        assert_eq!(flow.nat().to_string(), "dnat");
        assert_eq!(flow.ts, SystemTime::UNIX_EPOCH + Duration::from_secs(2));
        assert_eq!((flow.in_ifindex, flow.out_ifindex), (Some(2), Some(7)));
        assert_eq!(flow.packets, None);
    }

    #[test]
    fn decodes_ipv6() {
        let mut orig = RawTuple {
            l3num: AF_INET6,
            protonum: 17,
            ..Default::default()
        };
        orig.src = "fd00::5".parse::<Ipv6Addr>().unwrap().octets();
        orig.dst = "2001:db8::53".parse::<Ipv6Addr>().unwrap().octets();
        orig.sport = 5353u16.to_be();
        orig.dport = 53u16.to_be();
        let reply = RawTuple {
            src: orig.dst,
            dst: orig.src,
            sport: orig.dport,
            dport: orig.sport,
            ..orig
        };
        let ev = ConnEvent {
            orig,
            reply,
            kind: event_kind::NEW,
            hook: hook::NAT_SETUP,
            ..Default::default()
        };
        let flow = decode_conn_event(&bytes_of(&ev), &BootClock::now()).unwrap();
        assert_eq!(flow.proto, Proto::Udp);
        assert_eq!(flow.orig.to_string(), "[fd00::5]:5353 -> [2001:db8::53]:53");
        assert_eq!(flow.nat().to_string(), "none");
        assert_eq!(flow.hook, Some(Hook::NatSetup));
    }

    #[test]
    fn rejects_wrong_size_family_and_kind() {
        let clock = BootClock::now();
        assert!(matches!(
            decode_conn_event(&[0u8; 10], &clock),
            Err(DecodeError::Size { got: 10, .. })
        ));
        let ev = ConnEvent {
            kind: event_kind::NEW,
            hook: hook::XMIT,
            ..Default::default()
        };
        assert_eq!(
            decode_conn_event(&bytes_of(&ev), &clock),
            Err(DecodeError::Family(0))
        );
        let ev = ConnEvent {
            kind: 42,
            orig: raw_tuple([1, 1, 1, 1], 1, [2, 2, 2, 2], 2),
            ..Default::default()
        };
        assert_eq!(
            decode_conn_event(&bytes_of(&ev), &clock),
            Err(DecodeError::Kind(42))
        );
        let ev = ConnEvent {
            kind: event_kind::NEW,
            hook: 9,
            ..ev
        };
        assert_eq!(
            decode_conn_event(&bytes_of(&ev), &clock),
            Err(DecodeError::Hook(9))
        );
    }
}
