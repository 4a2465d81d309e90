//! What every hook does with an `nf_conn`: read it, decide whether it is news, report it.

use aksnet_common::{
    conn_flags, ct_info, ct_status, event_kind, hook, ConnEvent, KernelOffsets, RawTuple,
    OFFSET_ABSENT, TUPLE_FINGERPRINT_LEN,
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

/// Random key the agent writes before load; events carry `nf_conn address ^ key` as the
/// connection's identity, so kernel addresses never reach userspace.
#[unsafe(no_mangle)]
static CONN_ID_KEY: u64 = 0;

/// Records for the agent, one [`ConnEvent`] each.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Connections the agent was not told about because [`EVENTS`] was full (index 0), per CPU.
/// Each connection is counted once however many of its packets fail to report it.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections counted in [`LOST`] that a later packet did report (index 0), per CPU:
/// `LOST - RECOVERED` connections never reached the agent.
#[map]
static RECOVERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections seen so far, keyed by the `nf_conn` address, including those of other network
/// namespaces (flagged [`FOREIGN`]) so that their packets are also dismissed after one lookup.
/// LRU: the kernel forgets the oldest when full, which at worst reports a long-idle connection
/// again (the agent's flow table drops the repeat).
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
    /// The flags below, and `status & NAT_MASK` as last reported.
    flags: u64,
}

/// A `NEW` (or `NAT_CHANGED`) event reached the ring buffer; the NAT bits beside it are the
/// ones it carried.
const REPORTED: u64 = 1 << 63;
/// An event carried the interfaces of one of the connection's packets.
const IFACES_REPORTED: u64 = 1 << 62;
/// The connection belongs to a network namespace the agent does not observe.
const FOREIGN: u64 = 1 << 61;
/// An event of the connection found the ring buffer full and was counted in [`LOST`].
const LOSS_COUNTED: u64 = 1 << 60;
/// The connection has seen a reply (`IPS_SEEN_REPLY`). conntrack never clears that bit, so a
/// packet whose status lacks it belongs to a new connection reusing this `nf_conn` for the
/// same tuple (where `nf_ct_delete` cannot be hooked to forget the old one).
const SEEN_REPLY_STORED: u64 = 1 << 59;
/// A reuse was detected and not reported yet (the ring buffer was full): the retry still says
/// [`conn_flags::RENEWED`].
const RENEW_PENDING: u64 = 1 << 58;

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
    /// The packet travels in the connection's reply direction.
    pub reply: bool,
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
    let info = nfct & ct_info::MASK;
    if info == ct_info::UNTRACKED {
        return;
    }
    let packet = Packet {
        skb,
        dev,
        reply: info >= ct_info::IS_REPLY,
    };
    seen(nfct & !ct_info::MASK, hook::XMIT, Some(packet));
}

/// `nf_nat_setup_info` completed the connection's NAT decision.
#[inline(always)]
pub fn on_nat_setup(ct: u64) {
    seen(ct, hook::NAT_SETUP, None);
}

/// What CONNS knows about `ct`: its entry when the fingerprint matches, else `None`.
#[inline(always)]
fn known(ct: u64, fingerprint: u64) -> Option<*mut ConnState> {
    let state = CONNS.get_ptr_mut(ct)?;
    // SAFETY: the pointer is into a live map value.
    (unsafe { (*state).fingerprint } == fingerprint).then_some(state)
}

/// `Some(netns)` when the connection is one the agent observes (0 when it observes all and the
/// namespace is read later, if reported), `None` when it is another namespace's.
#[inline(always)]
fn observed_netns(ct: u64) -> Option<u32> {
    // SAFETY: reading a static.
    let filter = unsafe { core::ptr::read_volatile(&raw const NETNS_FILTER) };
    if filter == 0 {
        return Some(0);
    }
    // Unreadable counts as foreign: nothing could be reported about it anyway.
    (netns_of(ct) == Some(filter)).then_some(filter)
}

/// Remembers a connection of another namespace, so that its next packets cost one lookup.
#[inline(always)]
fn remember_foreign(ct: u64, fingerprint: u64) {
    let state = ConnState {
        fingerprint,
        packets: 0,
        bytes: 0,
        flags: FOREIGN,
    };
    let _ = CONNS.insert(ct, state, 0);
}

/// Whether a connection remembered as another namespace's now holds a new connection. The same
/// tuple lives in several namespaces (a router's and the node's conntrack both track a client's
/// connection), so a freed foreign `nf_conn` can come back for the node's own connection with
/// the same fingerprint. `IPS_SEEN_REPLY` never clears: seen before and absent now means a new
/// connection. Costs foreign packets one status read.
#[inline(always)]
fn foreign_entry_reused(ct: u64, state: *mut ConnState, flags: u64) -> bool {
    let Some(status) = read::<u64>(ct + off!(ct_status)) else {
        return false;
    };
    let seen_reply = status & ct_status::SEEN_REPLY != 0;
    if seen_reply && flags & SEEN_REPLY_STORED == 0 {
        // SAFETY: `state` points into a live map value; written once per connection.
        unsafe { (*state).flags = flags | SEEN_REPLY_STORED };
    }
    flags & SEEN_REPLY_STORED != 0 && !seen_reply
}

/// conntrack is deleting the connection: report its end and forget it. `dying_set` when the
/// hooked code runs after the caller set `IPS_DYING` (a compiler-split `nf_ct_delete.part.N`,
/// reached once per connection).
#[inline(always)]
pub fn on_delete(ct: u64, dying_set: bool) {
    if ct == 0 {
        return;
    }
    let Some(fingerprint) = fingerprint_of(ct) else {
        return;
    };
    let state = known(ct, fingerprint);
    // SAFETY: the fields are copied out at once; a concurrent update only makes them stale.
    let (flags, packets, bytes) = match state {
        Some(s) => unsafe { ((*s).flags, (*s).packets, (*s).bytes) },
        None => (0, 0, 0),
    };
    let netns = if flags & FOREIGN != 0 {
        None
    } else {
        observed_netns(ct)
    };
    let status = read::<u64>(ct + off!(ct_status));
    let _ = CONNS.remove(ct);
    let (Some(netns), Some(status)) = (netns, status) else {
        return;
    };
    // Another caller already deletes it (nf_ct_delete sets DYING once and bails out after).
    if !dying_set && status & ct_status::DYING != 0 {
        return;
    }
    let report = Report {
        ct,
        kind: event_kind::DESTROY,
        hook: hook::CT_DELETE,
        status,
        netns,
        packets,
        bytes,
        renewed: false,
    };
    // The entry is gone: a lost end is never recovered, and a connection already counted lost
    // is not counted twice.
    if !emit(&report, None) && flags & LOSS_COUNTED == 0 {
        bump(&LOST);
    }
}

/// Hot path: on a known connection of the observed namespace whose NAT bits did not change,
/// three probe reads besides `_nfct` (tuple, status, packet length), one map lookup and the
/// counter updates; on another namespace's known connection, two reads (tuple, status) and one
/// lookup.
/// Everything else only when reporting.
#[inline(always)]
fn seen(ct: u64, hook: u8, packet: Option<Packet>) {
    if ct == 0 {
        return;
    }
    let Some(fingerprint) = fingerprint_of(ct) else {
        return;
    };
    let state = known(ct, fingerprint);
    let (state, flags, netns) = match state {
        // SAFETY: the pointer is into a live map value.
        Some(s) => match unsafe { (*s).flags } {
            flags if flags & FOREIGN != 0 => {
                if !foreign_entry_reused(ct, s, flags) {
                    return;
                }
                // A new connection in a freed foreign nf_conn: it may be one of ours.
                match observed_netns(ct) {
                    Some(netns) => (None, 0, netns),
                    None => return remember_foreign(ct, fingerprint),
                }
            }
            flags => (state, flags, 0),
        },
        None => match observed_netns(ct) {
            Some(netns) => (None, 0, netns),
            None => return remember_foreign(ct, fingerprint),
        },
    };
    let Some(status) = read::<u64>(ct + off!(ct_status)) else {
        return;
    };
    // A packet still in flight after nf_ct_delete: the end is reported, do not bring it back.
    if status & ct_status::DYING != 0 {
        return;
    }
    let renewed = flags & SEEN_REPLY_STORED != 0 && status & ct_status::SEEN_REPLY == 0;
    let (flags, netns) = if renewed {
        // The new connection may be another namespace's with the same tuple (a router's).
        let Some(netns) = observed_netns(ct) else {
            return remember_foreign(ct, fingerprint);
        };
        if let Some(s) = state {
            // SAFETY: as above; the old connection's counters start over with the new one.
            unsafe {
                (*s).packets = 0;
                (*s).bytes = 0;
            }
        }
        (RENEW_PENDING, netns)
    } else {
        (flags, netns)
    };
    let nat = status & ct_status::NAT_MASK;
    let (counted, len) = match packet {
        Some(p) => (
            1,
            u64::from(read::<u32>(p.skb + off!(skb_len)).unwrap_or(0)),
        ),
        None => (0, 0),
    };
    // Only for a packet: LLVM turns an atomic add of a constant 0 into atomic OR, which kernels
    // before 5.12 refuse.
    if let (Some(s), 1) = (state, counted) {
        // SAFETY: as above; counters atomically because several CPUs send packets of one
        // connection. The BPF target has no AtomicU64; the intrinsic compiles to BPF's atomic add.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*s).packets, counted);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*s).bytes, len);
        }
    }
    // A connection first reported without a packet (by nf_nat_setup_info) gets one more NEW
    // from its first packet, for the interfaces and counters.
    let wants_ifaces = packet.is_some() && flags & IFACES_REPORTED == 0;
    let reported_nat = flags & (REPORTED | ct_status::NAT_MASK);
    if reported_nat == REPORTED | nat && !wants_ifaces {
        if status & ct_status::SEEN_REPLY != 0 && flags & SEEN_REPLY_STORED == 0 {
            if let Some(s) = state {
                // SAFETY: as above; written once per connection.
                unsafe { (*s).flags = flags | SEEN_REPLY_STORED };
            }
        }
        return;
    }
    let mut report = Report {
        ct,
        kind: event_kind::NEW,
        hook,
        status,
        netns,
        packets: counted,
        bytes: len,
        renewed: flags & RENEW_PENDING != 0,
    };
    if flags & REPORTED != 0 && reported_nat != REPORTED | nat {
        report.kind = event_kind::NAT_CHANGED;
    }
    if let Some(s) = state {
        // SAFETY: as above.
        unsafe {
            report.packets = (*s).packets;
            report.bytes = (*s).bytes;
        }
    }

    let mut flags = flags;
    if status & ct_status::SEEN_REPLY != 0 {
        flags |= SEEN_REPLY_STORED;
    }
    if emit(&report, packet) {
        flags = (flags & !(ct_status::NAT_MASK | RENEW_PENDING)) | REPORTED | nat;
        if packet.is_some() {
            flags |= IFACES_REPORTED;
        }
        if flags & LOSS_COUNTED != 0 {
            bump(&RECOVERED);
            flags &= !LOSS_COUNTED;
        }
    } else if flags & LOSS_COUNTED == 0 {
        // Not marked reported, so the next packet retries; counted lost only this once.
        bump(&LOST);
        flags |= LOSS_COUNTED;
    }
    match state {
        // SAFETY: as above. Two CPUs racing here at worst report the connection twice, which
        // the agent's flow table absorbs.
        Some(s) => unsafe { (*s).flags = flags },
        None => {
            let state = ConnState {
                fingerprint,
                packets: counted,
                bytes: len,
                flags,
            };
            // An LRU insert only fails on allocation failure: the next packet retries.
            let _ = CONNS.insert(ct, state, 0);
        }
    }
}

/// Adds one to a per-CPU counter.
#[inline(always)]
fn bump(counter: &PerCpuArray<u64>) {
    if let Some(n) = counter.get_ptr_mut(0) {
        // SAFETY: per-CPU value, and BPF programs do not migrate while running.
        unsafe { *n += 1 };
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
    /// See [`conn_flags::RENEWED`].
    renewed: bool,
}

/// Puts one event on the ring buffer; returns false when it is full.
/// Kernel fields are read straight into the reserved record: the BPF stack (512 bytes) is too
/// small for a staged copy.
#[inline(always)]
fn emit(report: &Report, packet: Option<Packet>) -> bool {
    let ct = report.ct;
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved record of the right size, owned until submit.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_boot_ns();
        (*ev).conn_id = ct ^ core::ptr::read_volatile(&raw const CONN_ID_KEY);
        (*ev).status = report.status;
        (*ev).packets = report.packets;
        (*ev).bytes = report.bytes;
        // A failed read leaves a zero family, which the agent counts as a decode error.
        (*ev).orig = RawTuple::default();
        read_tuple(ct, 0, &raw mut (*ev).orig);
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
        match packet {
            // The original direction entered where this reply leaves; where it leaves is
            // unknown until an original-direction packet is sent (for a connection that ends
            // on this host, never).
            Some(p) if p.reply => {
                read_into(&raw mut (*ev).in_ifindex, p.dev + off!(netdev_ifindex));
            }
            Some(p) => {
                read_into(&raw mut (*ev).in_ifindex, p.skb + off!(skb_iif));
                read_into(&raw mut (*ev).out_ifindex, p.dev + off!(netdev_ifindex));
            }
            None => {}
        }
        (*ev).kind = report.kind;
        (*ev).hook = report.hook;
        (*ev).flags = if report.renewed {
            conn_flags::RENEWED
        } else {
            0
        };
        (*ev)._pad = [0; 3];
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

/// Cheap hash of the first [`TUPLE_FINGERPRINT_LEN`] bytes of the original tuple (which
/// conntrack never changes for a live entry), read in one go.
#[inline(always)]
fn fingerprint_of(ct: u64) -> Option<u64> {
    let t = ct + off!(ct_tuplehash) + off!(tuplehash_tuple);
    let words = read::<[u64; TUPLE_FINGERPRINT_LEN / 8]>(t)?;
    let mut h: u64 = 0;
    for w in words {
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    Some(h)
}
