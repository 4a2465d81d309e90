//! What every hook does with an `nf_conn`: read it, decide whether it is news, report it.

use aksnet_common::{
    ct_status, event_kind, hook, ConnEvent, KernelOffsets, RawTuple, OFFSET_ABSENT,
};
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{self, bpf_ktime_get_boot_ns},
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use core::ffi::c_void;
use core::intrinsics::{atomic_xadd, AtomicOrdering};

/// Field offsets of the running kernel, written by the agent before load (see aksnet-common).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skb_nfct: OFFSET_ABSENT,
    skb_iif: OFFSET_ABSENT,
    skb_len: OFFSET_ABSENT,
    netdev_ifindex: OFFSET_ABSENT,
    ct_tuplehash: OFFSET_ABSENT,
    tuplehash_size: OFFSET_ABSENT,
    tuplehash_tuple: OFFSET_ABSENT,
    ct_status: OFFSET_ABSENT,
    ct_zone_id: OFFSET_ABSENT,
    ct_mark: OFFSET_ABSENT,
    ct_net: OFFSET_ABSENT,
    net_ns_inum: OFFSET_ABSENT,
    tuple_src_u3: OFFSET_ABSENT,
    tuple_src_port: OFFSET_ABSENT,
    tuple_src_l3num: OFFSET_ABSENT,
    tuple_dst_u3: OFFSET_ABSENT,
    tuple_dst_port: OFFSET_ABSENT,
    tuple_dst_protonum: OFFSET_ABSENT,
};

/// Network namespace inode to report, 0 for all namespaces. Written by the agent before load.
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;

/// Records for the agent, one [`ConnEvent`] each.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events dropped because [`EVENTS`] was full (index 0), per CPU.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections seen so far, keyed by the `nf_conn` address. LRU: the kernel forgets the oldest
/// when full, which at worst reports a long-idle connection again.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(1 << 16, 0);

/// Per-connection state kept between packets.
#[repr(C)]
struct ConnState {
    /// Hash of the original tuple: an `nf_conn` freed and reallocated at the same address
    /// for another connection must not inherit this entry.
    fingerprint: u64,
    packets: u64,
    bytes: u64,
    /// `REPORTED | (status & NAT_MASK)` as last reported, 0 while not reported yet.
    reported: u64,
}

/// Marks [`ConnState::reported`]; outside [`ct_status::NAT_MASK`].
const REPORTED: u64 = 1 << 63;

/// `skb->_nfct` keeps `enum ip_conntrack_info` in its low 3 bits (`NFCT_INFOMASK`).
const NFCT_INFOMASK: u64 = 7;

/// One offset from [`OFFSETS`]; volatile so the compiler cannot fold the placeholder value the
/// agent overwrites.
macro_rules! off {
    ($field:ident) => {
        offset(&raw const OFFSETS.$field)
    };
}

#[inline(always)]
fn offset(field: *const u32) -> u64 {
    // SAFETY: `field` points into the `OFFSETS` static.
    u64::from(unsafe { core::ptr::read_volatile(field) })
}

/// The packet a hook saw the connection on, for counters and interfaces.
#[derive(Clone, Copy)]
pub struct Packet {
    /// `struct sk_buff *`
    pub skb: u64,
    /// `struct net_device *` the packet leaves on.
    pub dev: u64,
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copes with any address, returning an error if unmapped.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Reads kernel memory at `addr` straight into `dst`, saving a stack copy.
///
/// # Safety
/// `dst` must be valid for writes of a `T`.
#[inline(always)]
unsafe fn read_into<T>(dst: *mut T, addr: u64) -> bool {
    // SAFETY: per the contract on `dst`; the helper checks the source address.
    let ret = unsafe {
        generated::bpf_probe_read_kernel(dst.cast(), size_of::<T>() as u32, addr as *const c_void)
    };
    ret == 0
}

/// A packet is leaving on `dev`: report its connection if that is news, count it otherwise.
#[inline(always)]
pub fn on_xmit(skb: u64, dev: u64) {
    let Some(nfct) = read::<u64>(skb + off!(skb_nfct)) else {
        return;
    };
    seen(nfct & !NFCT_INFOMASK, hook::XMIT, Some(Packet { skb, dev }));
}

/// `nf_nat_setup_info` completed the connection's NAT decision.
#[inline(always)]
pub fn on_nat_setup(ct: u64) {
    seen(ct, hook::NAT_SETUP, None);
}

/// conntrack is deleting the connection: report its end and forget it.
#[inline(always)]
pub fn on_delete(ct: u64) {
    let Some((netns, status, orig)) = identify(ct) else {
        return;
    };
    // Another caller already deletes it (nf_ct_delete sets DYING once and bails out after).
    if status & ct_status::DYING != 0 {
        return;
    }
    let fingerprint = fingerprint(&orig);
    // SAFETY: the counters are copied out at once; a concurrent update only makes them stale.
    let (packets, bytes) = match unsafe { CONNS.get(ct) } {
        Some(state) if state.fingerprint == fingerprint => (state.packets, state.bytes),
        _ => (0, 0),
    };
    let report = Report {
        ct,
        kind: event_kind::DESTROY,
        hook: hook::CT_DELETE,
        status,
        netns,
        packets,
        bytes,
    };
    emit(&report, &orig, None);
    let _ = CONNS.remove(ct);
}

/// The connection's namespace (when filtering; 0 otherwise, read later if reported), status and
/// original tuple, or `None` to ignore it.
#[inline(always)]
fn identify(ct: u64) -> Option<(u32, u64, RawTuple)> {
    if ct == 0 {
        return None;
    }
    // SAFETY: reading a static.
    let filter = unsafe { core::ptr::read_volatile(&raw const NETNS_FILTER) };
    let netns = if filter != 0 {
        let netns = netns_of(ct)?;
        if netns != filter {
            return None;
        }
        netns
    } else {
        0
    };
    let status = read::<u64>(ct + off!(ct_status))?;
    let mut orig = RawTuple::default();
    read_tuple(ct, 0, &mut orig).then_some((netns, status, orig))
}

/// Hot path: on a known connection whose NAT bits did not change, one map lookup and the
/// counter updates; everything else only when reporting.
#[inline(always)]
fn seen(ct: u64, hook: u8, packet: Option<Packet>) {
    let Some((netns, status, orig)) = identify(ct) else {
        return;
    };
    let fingerprint = fingerprint(&orig);
    let len = match packet {
        Some(p) => u64::from(read::<u32>(p.skb + off!(skb_len)).unwrap_or(0)),
        None => 0,
    };
    let counted = u64::from(packet.is_some());
    let nat = status & ct_status::NAT_MASK;

    let known = match CONNS.get_ptr_mut(ct) {
        // SAFETY: the pointer is into a live map value; fields are updated in place, counters
        // atomically because several CPUs send packets of one connection.
        Some(state) if unsafe { (*state).fingerprint } == fingerprint => unsafe {
            // The BPF target has no AtomicU64; the intrinsic compiles to BPF's atomic add.
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*state).packets,
                counted,
            );
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).bytes, len);
            if (*state).reported == REPORTED | nat {
                return;
            }
            Some(state)
        },
        _ => None,
    };

    let mut report = Report {
        ct,
        kind: event_kind::NEW,
        hook,
        status,
        netns,
        packets: counted,
        bytes: len,
    };
    if let Some(state) = known {
        // SAFETY: as above.
        unsafe {
            if (*state).reported != 0 {
                report.kind = event_kind::NAT_CHANGED;
            }
            report.packets = (*state).packets;
            report.bytes = (*state).bytes;
        }
    }
    // Not marked reported when the ring buffer is full, so the next packet retries.
    let reported = if emit(&report, &orig, packet) {
        REPORTED | nat
    } else {
        0
    };
    match known {
        // SAFETY: as above.
        Some(state) if reported != 0 => unsafe { (*state).reported = reported },
        Some(_) => {}
        None => {
            let state = ConnState {
                fingerprint,
                packets: counted,
                bytes: len,
                reported,
            };
            // An LRU insert only fails on allocation failure: the next packet retries.
            let _ = CONNS.insert(ct, state, 0);
        }
    }
}

/// What [`emit`] needs besides the tuples.
struct Report {
    ct: u64,
    kind: u8,
    hook: u8,
    status: u64,
    /// 0 when not read yet.
    netns: u32,
    packets: u64,
    bytes: u64,
}

/// Puts one event on the ring buffer; counts it in [`LOST`] and returns false when full.
/// Kernel fields are read straight into the reserved record: the BPF stack (512 bytes) is too
/// small for a staged copy.
#[inline(always)]
fn emit(report: &Report, orig: &RawTuple, packet: Option<Packet>) -> bool {
    let ct = report.ct;
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU value, and BPF programs do not migrate while running.
            unsafe { *lost += 1 };
        }
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved record of the right size, owned until submit.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_boot_ns();
        (*ev).conn_id = ct;
        (*ev).status = report.status;
        (*ev).packets = report.packets;
        (*ev).bytes = report.bytes;
        (*ev).orig = *orig;
        // A failed read leaves a zero family, which the agent counts as a decode error.
        (*ev).reply = RawTuple::default();
        read_tuple(ct, 1, &raw mut (*ev).reply);
        (*ev).netns = if report.netns != 0 {
            report.netns
        } else {
            netns_of(ct).unwrap_or(0)
        };
        (*ev).mark = optional::<u32>(ct, off!(ct_mark));
        (*ev).zone = optional::<u16>(ct, off!(ct_zone_id));
        (*ev).in_ifindex = 0;
        (*ev).out_ifindex = 0;
        if let Some(p) = packet {
            read_into(&raw mut (*ev).in_ifindex, p.skb + off!(skb_iif));
            read_into(&raw mut (*ev).out_ifindex, p.dev + off!(netdev_ifindex));
        }
        (*ev).kind = report.kind;
        (*ev).hook = report.hook;
        (*ev)._pad = [0; 4];
    }
    entry.submit(0);
    true
}

/// A field the kernel may have compiled out: 0 when absent.
#[inline(always)]
fn optional<T: Default>(ct: u64, offset: u64) -> T {
    if offset == u64::from(OFFSET_ABSENT) {
        return T::default();
    }
    read::<T>(ct + offset).unwrap_or_default()
}

/// `ct->ct_net.net->ns.inum`
#[inline(always)]
fn netns_of(ct: u64) -> Option<u32> {
    let net = read::<u64>(ct + off!(ct_net))?;
    read::<u32>(net + off!(net_ns_inum))
}

/// Reads `ct->tuplehash[dir].tuple` (direction 0 original, 1 reply) into `out`.
#[inline(always)]
fn read_tuple(ct: u64, dir: u64, out: *mut RawTuple) -> bool {
    let t = ct + off!(ct_tuplehash) + dir * off!(tuplehash_size) + off!(tuplehash_tuple);
    // SAFETY: `out` is a valid destination; each field is written by one kernel read.
    unsafe {
        read_into(&raw mut (*out).src, t + off!(tuple_src_u3))
            && read_into(&raw mut (*out).dst, t + off!(tuple_dst_u3))
            && read_into(&raw mut (*out).sport, t + off!(tuple_src_port))
            && read_into(&raw mut (*out).dport, t + off!(tuple_dst_port))
            && read_into(&raw mut (*out).l3num, t + off!(tuple_src_l3num))
            && read_into(&raw mut (*out).protonum, t + off!(tuple_dst_protonum))
    }
}

/// Cheap hash of the original tuple (which conntrack never changes for a live entry).
#[inline(always)]
fn fingerprint(t: &RawTuple) -> u64 {
    // SAFETY: RawTuple is 40 bytes of plain data; the size check is at compile time.
    let words: [u64; 5] = unsafe { core::mem::transmute(*t) };
    let mut h: u64 = 0;
    for w in words {
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    h
}
