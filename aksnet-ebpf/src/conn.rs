//! What every hook does with an `nf_conn`: read it, decide whether it is news, report it.

use aksnet_common::{
    conn_flags, ct_info, ct_status, event_kind, hook, ConnEvent, KernelOffsets, RawTuple,
    CT_SPAN_MAX, OFFSET_ABSENT, TUPLE_FINGERPRINT_LEN,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_probe_read_kernel,
        generated::{self, bpf_ktime_get_boot_ns},
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use core::{ffi::c_void, mem::MaybeUninit};

/// Field offsets of the running kernel, written by the agent before load (see aksnet-common).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skb_nfct: OFFSET_ABSENT,
    skb_iif: OFFSET_ABSENT,
    skb_len: OFFSET_ABSENT,
    netdev_ifindex: OFFSET_ABSENT,
    netdev_net: OFFSET_ABSENT,
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
    ct_span_start: OFFSET_ABSENT,
    ct_span_len: 0,
};

/// Network namespace inode to report, 0 for all namespaces. Written by the agent before load.
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;

/// Random key the agent writes before load; events carry `nf_conn address ^ key` as the
/// connection's identity, so kernel addresses never reach userspace.
#[unsafe(no_mangle)]
static CONN_ID_KEY: u64 = 0;

/// Records for the agent, one [`ConnEvent`] each. The agent sizes it at load from the event
/// rate it must absorb while it is not reading (`map_max_entries`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Queued bytes from which a record wakes the agent up; below it records are queued silently
/// and the agent reads them on its own short timer, so a busy node pays one wake-up per batch,
/// not one per connection. Written by the agent before load.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// Connections the agent was not told about because [`EVENTS`] was full (index 0), per CPU.
/// Each connection is counted once however many of its packets fail to report it.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections counted in [`LOST`] that a later packet did report (index 0), per CPU:
/// `LOST - RECOVERED` connections never reached the agent.
#[map]
static RECOVERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections of the observed namespace seen so far, keyed by the `nf_conn` address. LRU: the
/// kernel forgets the oldest when full, which at worst reports a long-idle connection again (the
/// agent's flow table drops the repeat). The agent sizes it from `nf_conntrack_max` at load.
/// One LRU list for all CPUs: `BPF_F_NO_COMMON_LRU` would split the entries evenly between the
/// possible CPUs, and the CPU that sees most new connections would evict live ones from its
/// share long before the map is full. Only a connection's first report inserts, so the shared
/// list's lock is taken once per connection.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(1 << 16, 0);

/// Connections that no later packet can tell anything new, one tag ([`Settled`]) per slot,
/// the slot chosen by the `nf_conn` address. Their packets (replies, mostly: an
/// original-direction packet of such a connection takes the one-load fast path) are dismissed
/// by one load from this small array instead of a `CONNS` lookup, which misses the cache on a
/// busy node. A slot another connection took only costs that lookup.
#[map]
static SETTLED: Array<u64> = Array::with_max_entries(SETTLED_SLOTS, 0);

/// 32 KiB of tags. `nf_conn` objects are 256 bytes apart in their slab cache, so 4 096 slots
/// cover 1 MiB of them without two sharing a slot.
const SETTLED_SLOTS: u32 = 4096;

/// `struct net *` of the observed namespace (index 0), learnt from its first connection, so
/// that telling another namespace's device (`dev->nd_net`) or connection (`ct->ct_net`) apart
/// is a compare, not a read of `->ns.inum`. The agent holds the namespace open, so the address
/// stays its own.
#[map]
static OBSERVED_NET: Array<u64> = Array::with_max_entries(1, 0);

/// Per-connection state kept between packets. Each fact is its own field, written by a plain
/// store of a value every racing writer agrees on, never by read-modify-write of a shared word:
/// two CPUs updating one flags word could erase each other's bits, and the atomic OR/AND that
/// would prevent it are refused by kernels before 5.12.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConnState {
    /// Hash of the original tuple: an `nf_conn` freed and reallocated at the same address
    /// for another connection must not inherit this entry.
    fingerprint: u64,
    /// `status & NAT_MASK` as last reported (the mask fits in 16 bits).
    reported_nat: u16,
    /// A `NEW` (or `NAT_CHANGED`) event reached the ring buffer, carrying `reported_nat`.
    reported: u8,
    /// An event carried the interfaces of one of the connection's packets.
    ifaces_reported: u8,
    /// The connection has seen a reply (`IPS_SEEN_REPLY`). conntrack never clears that bit, so a
    /// packet whose status lacks it belongs to a new connection reusing this `nf_conn` for the
    /// same tuple (where `nf_ct_delete` cannot be hooked to forget the old one).
    seen_reply: u8,
    /// An event of the connection found the ring buffer full and was counted in [`LOST`].
    loss_counted: u8,
    /// After `loss_counted`, a report went through and was counted in [`RECOVERED`]. Both only
    /// ever go from 0 to 1, so a connection is counted lost at most once by [`seen`], and
    /// recovered at most once.
    recovered: u8,
    /// A reuse was detected and not reported yet (the ring buffer was full): the retry still says
    /// [`conn_flags::RENEWED`].
    renew_pending: u8,
}

impl ConnState {
    const fn new(fingerprint: u64) -> ConnState {
        ConnState {
            fingerprint,
            reported_nat: 0,
            reported: 0,
            ifaces_reported: 0,
            seen_reply: 0,
            loss_counted: 0,
            recovered: 0,
            renew_pending: 0,
        }
    }

    /// Counted lost and not recovered since.
    fn loss_outstanding(&self) -> bool {
        self.loss_counted != 0 && self.recovered == 0
    }

    /// Nothing a later packet could add while the NAT status bits stay `nat`: reported with
    /// them and with a packet's interfaces, its reply recorded, no loss to recover.
    fn settled(&self, nat: u16) -> bool {
        self.reported != 0
            && self.reported_nat == nat
            && self.ifaces_reported != 0
            && self.seen_reply != 0
            && !self.loss_outstanding()
            && self.renew_pending == 0
    }
}

/// A settled connection's tag in its [`SETTLED`] slot: its `nf_conn` address, fingerprint and
/// NAT status bits, so that another connection in the same slot, a reuse of the `nf_conn` for
/// another tuple, or a NAT change all miss it. A reuse for the same tuple is told by its first
/// packets, which lack `IPS_SEEN_REPLY` and so take the full path, which clears the slot; and
/// `nf_ct_delete` clears it where it can be hooked.
#[derive(Clone, Copy)]
struct Settled {
    slot: u32,
    tag: u64,
}

impl Settled {
    #[inline(always)]
    fn of(ct: u64, fingerprint: u64, nat: u16) -> Settled {
        Settled {
            slot: ((ct >> 8) as u32) & (SETTLED_SLOTS - 1),
            // Never 0, the empty slot.
            tag: (fingerprint ^ ct ^ (u64::from(nat) << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                | 1,
        }
    }

    /// The slot holds this connection's tag.
    #[inline(always)]
    fn holds(self) -> bool {
        // SAFETY: a pointer into the array; a 64-bit load is never torn.
        SETTLED
            .get_ptr(self.slot)
            .is_some_and(|t| unsafe { *t } == self.tag)
    }

    /// Records the connection as settled, or clears its tag when it no longer is.
    #[inline(always)]
    fn set(self, settled: bool) {
        let Some(t) = SETTLED.get_ptr_mut(self.slot) else {
            return;
        };
        // SAFETY: as above; whole 64-bit stores.
        unsafe {
            if settled {
                *t = self.tag;
            } else if *t == self.tag {
                *t = 0;
            }
        }
    }
}

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

/// A field of the tracepoint's typed `struct sk_buff *` or `struct net_device *`, at an offset
/// from `OFFSETS`: a direct load the verifier checks against BTF and makes fault-safe.
///
/// # Safety
/// `addr` must be such a pointer plus the offset of a field of type `T`.
#[inline(always)]
unsafe fn load<T>(addr: u64) -> T {
    // SAFETY: per the contract.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// The bytes of one `nf_conn` that the programs use (both tuples, status, namespace, zone,
/// mark), read by one helper call instead of one call per field.
type Span = MaybeUninit<[u64; CT_SPAN_MAX as usize / 8]>;

/// Reads `ct`'s span into `span`; false when unreadable.
#[inline(always)]
fn read_span(ct: u64, span: &mut Span) -> bool {
    let len = off!(ct_span_len);
    if len > u64::from(CT_SPAN_MAX) {
        return false;
    }
    // SAFETY: `span` has room for `CT_SPAN_MAX` bytes; the helper checks the source address.
    let ret = unsafe {
        generated::bpf_probe_read_kernel(
            span.as_mut_ptr().cast(),
            len as u32,
            (ct + off!(ct_span_start)) as *const c_void,
        )
    };
    ret == 0
}

/// The `nf_conn` field at `offset` (an `OFFSETS` value), out of a span.
///
/// # Safety
/// `span` was filled by [`read_span`], and the field lies inside it (the agent sizes the span
/// to cover every field the programs use). The span starts 8-byte aligned and C aligns every
/// field naturally, so the load is aligned, as the verifier requires on the stack.
#[inline(always)]
unsafe fn field<T: Copy>(span: &Span, offset: u64) -> T {
    let at = (offset - off!(ct_span_start)) as usize;
    // SAFETY: per the contract.
    unsafe { span.as_ptr().cast::<u8>().add(at).cast::<T>().read() }
}

/// A packet is leaving on `dev`: report its connection if that is news.
///
/// Hot path. An original-direction packet of a connection that has seen a reply
/// (`IP_CT_ESTABLISHED`, most packets of any stream) costs one direct load (`skb->_nfct`) and
/// nothing else: its connection was reported at its first packet, which conntrack marks
/// `IP_CT_NEW` (`IP_CT_RELATED` for an expected one), or is reported by its replies
/// (connections whose first packets do not leave through this namespace, and retries after a
/// full ring buffer). A packet leaving through another namespace's device costs one more
/// direct load (`dev->nd_net`) and never a helper call.
#[inline(always)]
pub fn on_xmit(skb: u64, dev: u64) {
    // SAFETY: `skb` is the tracepoint's typed `struct sk_buff *` and the offset a constant the
    // verifier reads from the frozen `OFFSETS`: it checks this load against the kernel's BTF and
    // makes it fault-safe (BPF_PROBE_MEM), at a fraction of a bpf_probe_read_kernel call.
    let nfct = unsafe { core::ptr::read_volatile((skb + off!(skb_nfct)) as *const u64) };
    let info = nfct & ct_info::MASK;
    if info == ct_info::ESTABLISHED || info == ct_info::UNTRACKED {
        return;
    }
    if leaves_another_namespace(dev) {
        return;
    }
    let packet = Packet {
        skb,
        dev,
        reply: info >= ct_info::IS_REPLY,
    };
    seen(nfct & !ct_info::MASK, hook::XMIT, Some(packet));
}

/// The packet leaves through a device of another namespace than the observed one, so its
/// conntrack entry is that namespace's: a packet gets its entry from the hooks of the namespace
/// it is routed in, routing there sends it out through a device of that namespace first, and
/// crossing into another namespace (veth, tunnels: `skb_scrub_packet`) drops the entry. (A
/// macvlan's lower device may sit in another namespace: the packet left the macvlan first.)
/// Never true before the observed namespace's `struct net *` is learnt, when every namespace
/// is observed, or on a kernel without network namespaces.
#[inline(always)]
fn leaves_another_namespace(dev: u64) -> bool {
    let field = off!(netdev_net);
    if field == u64::from(OFFSET_ABSENT) {
        return false;
    }
    let Some(observed) = OBSERVED_NET.get_ptr(0) else {
        return false;
    };
    // SAFETY: a pointer into the one-entry array, written once with the same value by racers.
    let observed = unsafe { *observed };
    if observed == 0 {
        return false;
    }
    // SAFETY: `dev` is the tracepoint's typed `struct net_device *`: a direct load the verifier
    // checks against BTF, as for `skb->_nfct` above.
    let net = unsafe { core::ptr::read_volatile((dev + field) as *const u64) };
    net != observed
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

/// `Some(netns)` when a connection in namespace `net` (its `ct->ct_net`) is one the agent
/// observes (0 when it observes all and the namespace is read later, if reported), `None` when
/// it is another namespace's. Unreadable counts as another namespace's: nothing could be
/// reported about it anyway.
#[inline(always)]
fn observed_netns(net: u64) -> Option<u32> {
    // SAFETY: reading a static.
    let filter = unsafe { core::ptr::read_volatile(&raw const NETNS_FILTER) };
    if filter == 0 {
        return Some(0);
    }
    let cached = OBSERVED_NET.get_ptr_mut(0)?;
    // SAFETY: a pointer into the one-entry array; racing writers store the same value.
    let learnt = unsafe { *cached };
    if learnt == net {
        return Some(filter);
    }
    if learnt != 0 || net_inum(net) != Some(filter) {
        return None;
    }
    // SAFETY: as above.
    unsafe { *cached = net };
    Some(filter)
}

/// conntrack is deleting the connection: report its end and forget it. `dying_set` when the
/// hooked code runs after the caller set `IPS_DYING` (a compiler-split `nf_ct_delete.part.N`,
/// reached once per connection).
#[inline(always)]
pub fn on_delete(ct: u64, dying_set: bool) {
    if ct == 0 {
        return;
    }
    let mut span = Span::uninit();
    if !read_span(ct, &mut span) {
        return;
    }
    // SAFETY: the span was read, and holds these fields.
    let (net, status) = unsafe {
        (
            field(&span, off!(ct_net)),
            field::<u64>(&span, off!(ct_status)),
        )
    };
    let Some(netns) = observed_netns(net) else {
        return;
    };
    let fingerprint = fingerprint_of(&span);
    // SAFETY: the state is copied out at once; a concurrent update only makes it stale.
    let outstanding = known(ct, fingerprint).is_some_and(|s| unsafe { (*s).loss_outstanding() });
    let _ = CONNS.remove(ct);
    let nat = (status & ct_status::NAT_MASK) as u16;
    Settled::of(ct, fingerprint, nat).set(false);
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
        renewed: false,
    };
    // The entry is gone: a lost end is never recovered, and a connection counted lost and not
    // recovered is not counted twice.
    if !emit(&report, &span, None) && !outstanding {
        bump(&LOST);
    }
}

/// A connection that may be news: a first packet, a reply, a packet-less hook. One read of the
/// `nf_conn` and one lookup; a report adds no other read of it.
#[inline(always)]
fn seen(ct: u64, hook: u8, packet: Option<Packet>) {
    if ct == 0 {
        return;
    }
    let mut span = Span::uninit();
    if !read_span(ct, &mut span) {
        return;
    }
    // SAFETY: the span was read, and holds these fields.
    let (net, status) = unsafe {
        (
            field(&span, off!(ct_net)),
            field::<u64>(&span, off!(ct_status)),
        )
    };
    let Some(netns) = observed_netns(net) else {
        return;
    };
    let fingerprint = fingerprint_of(&span);
    let seen_reply = status & ct_status::SEEN_REPLY != 0;
    let nat = (status & ct_status::NAT_MASK) as u16;
    let settled = Settled::of(ct, fingerprint, nat);
    if seen_reply && settled.holds() {
        return;
    }
    let state = known(ct, fingerprint);
    // SAFETY: the pointer is into a live map value; the copy may be stale, never torn in a way
    // that matters (each field is written whole).
    let mut old = state.map_or(ConnState::new(fingerprint), |s| unsafe { *s });
    // A packet still in flight after nf_ct_delete: the end is reported, do not bring it back.
    if status & ct_status::DYING != 0 {
        return;
    }
    let renewed = old.seen_reply != 0 && !seen_reply;
    if renewed {
        old = ConnState {
            renew_pending: 1,
            ..ConnState::new(fingerprint)
        };
    }
    // A connection first reported without a packet (by nf_nat_setup_info) gets one more NEW
    // from its first packet, for the interfaces.
    let wants_ifaces = packet.is_some() && old.ifaces_reported == 0;
    let nat_known = old.reported != 0 && old.reported_nat == nat;
    if nat_known && !wants_ifaces {
        if seen_reply && old.seen_reply == 0 {
            if let Some(s) = state {
                // SAFETY: as above; racing writers store the same 1.
                unsafe { (*s).seen_reply = 1 };
            }
            old.seen_reply = 1;
        }
        if old.settled(nat) {
            settled.set(true);
        }
        return;
    }
    let mut report = Report {
        ct,
        kind: event_kind::NEW,
        hook,
        status,
        netns,
        renewed: old.renew_pending != 0,
    };
    if old.reported != 0 && !nat_known {
        report.kind = event_kind::NAT_CHANGED;
    }

    let reported = emit(&report, &span, packet);
    let mut new = old;
    if seen_reply {
        new.seen_reply = 1;
    }
    if reported {
        new.reported = 1;
        new.reported_nat = nat;
        new.renew_pending = 0;
        if packet.is_some() {
            new.ifaces_reported = 1;
        }
        if old.loss_outstanding() {
            bump(&RECOVERED);
            new.recovered = 1;
        }
    } else if old.loss_counted == 0 {
        // Not marked reported, so the next packet retries; counted lost only this once.
        bump(&LOST);
        new.loss_counted = 1;
    }
    settled.set(new.settled(nat));
    match state {
        // A known connection: store only what changed, field by field, so a racing CPU's
        // facts survive. Two CPUs racing here at worst report the connection twice, which the
        // agent's flow table absorbs.
        Some(s) if !renewed => {
            // SAFETY: as above.
            unsafe { store_changes(s, &old, &new) }
        }
        // New, or a reuse whose old facts must all go: the whole entry (an LRU update replaces
        // the element at once). An insert only fails on allocation failure: the next packet
        // retries.
        _ => {
            let _ = CONNS.insert(ct, new, 0);
        }
    }
}

/// Writes the fields of `new` that differ from `old` into `*s`.
///
/// # Safety
/// `s` must point into a live `CONNS` value.
#[inline(always)]
unsafe fn store_changes(s: *mut ConnState, old: &ConnState, new: &ConnState) {
    // SAFETY: per the contract; each store is a whole field.
    unsafe {
        if new.reported_nat != old.reported_nat {
            (*s).reported_nat = new.reported_nat;
        }
        if new.reported != old.reported {
            (*s).reported = new.reported;
        }
        if new.ifaces_reported != old.ifaces_reported {
            (*s).ifaces_reported = new.ifaces_reported;
        }
        if new.seen_reply != old.seen_reply {
            (*s).seen_reply = new.seen_reply;
        }
        if new.loss_counted != old.loss_counted {
            (*s).loss_counted = new.loss_counted;
        }
        if new.recovered != old.recovered {
            (*s).recovered = new.recovered;
        }
        if new.renew_pending != old.renew_pending {
            (*s).renew_pending = new.renew_pending;
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
    /// See [`conn_flags::RENEWED`].
    renewed: bool,
}

/// Puts one event on the ring buffer, from `ct`'s `span` and the packet; returns false when it
/// is full. Wakes the agent only once [`WAKEUP_BYTES`] are queued (see there).
#[inline(always)]
fn emit(report: &Report, span: &Span, packet: Option<Packet>) -> bool {
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
        // The kernel side keeps no per-packet counters (they cost every packet a map update):
        // an event from a packet counts that packet, for the agent's first view of the flow.
        (*ev).packets = 0;
        (*ev).bytes = 0;
        copy_tuple(span, 0, &raw mut (*ev).orig);
        copy_tuple(span, 1, &raw mut (*ev).reply);
        (*ev).netns = if report.netns != 0 {
            report.netns
        } else {
            // An unreadable namespace leaves 0, which the agent shows as unknown.
            net_inum(field(span, off!(ct_net))).unwrap_or(0)
        };
        (*ev).mark = optional::<u32>(span, off!(ct_mark));
        (*ev).zone = optional::<u16>(span, off!(ct_zone_id));
        (*ev).in_ifindex = 0;
        (*ev).out_ifindex = 0;
        match packet {
            // The original direction entered where this reply leaves; where it leaves is
            // unknown until an original-direction packet is sent (for a connection that ends
            // on this host, never).
            Some(p) if p.reply => {
                (*ev).in_ifindex = load(p.dev + off!(netdev_ifindex));
            }
            Some(p) => {
                (*ev).in_ifindex = load(p.skb + off!(skb_iif));
                (*ev).out_ifindex = load(p.dev + off!(netdev_ifindex));
            }
            None => {}
        }
        if let Some(p) = packet {
            (*ev).packets = 1;
            (*ev).bytes = u64::from(load::<u32>(p.skb + off!(skb_len)));
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
    // SAFETY: reading a static.
    let wakeup = unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) };
    let flags = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
    true
}

/// A field the kernel may have compiled out: 0 when absent.
///
/// # Safety
/// As for [`field`].
#[inline(always)]
unsafe fn optional<T: Copy + Default>(span: &Span, offset: u64) -> T {
    if offset == u64::from(OFFSET_ABSENT) {
        return T::default();
    }
    // SAFETY: per the contract.
    unsafe { field(span, offset) }
}

/// `net->ns.inum`
#[inline(always)]
fn net_inum(net: u64) -> Option<u32> {
    read::<u32>(net + off!(net_ns_inum))
}

/// Copies `ct->tuplehash[dir].tuple` (direction 0 original, 1 reply) out of `span` into `out`.
///
/// # Safety
/// As for [`field`]; `out` must be valid for writes.
#[inline(always)]
unsafe fn copy_tuple(span: &Span, dir: u64, out: *mut RawTuple) {
    let t = off!(ct_tuplehash) + dir * off!(tuplehash_size) + off!(tuplehash_tuple);
    // SAFETY: per the contract; `RawTuple` is 4-byte aligned, so its addresses take words.
    unsafe {
        (&raw mut (*out).src)
            .cast::<[u32; 4]>()
            .write(field(span, t + off!(tuple_src_u3)));
        (&raw mut (*out).dst)
            .cast::<[u32; 4]>()
            .write(field(span, t + off!(tuple_dst_u3)));
        (*out).sport = field(span, t + off!(tuple_src_port));
        (*out).dport = field(span, t + off!(tuple_dst_port));
        (*out).l3num = field(span, t + off!(tuple_src_l3num));
        (*out).protonum = field(span, t + off!(tuple_dst_protonum));
        (*out)._pad = 0;
    }
}

/// Cheap hash of the first [`TUPLE_FINGERPRINT_LEN`] bytes of the original tuple (which
/// conntrack never changes for a live entry).
#[inline(always)]
fn fingerprint_of(span: &Span) -> u64 {
    // SAFETY: the agent's span covers the whole fingerprint; a tuple is 4-byte aligned.
    let words: [u32; TUPLE_FINGERPRINT_LEN / 4] =
        unsafe { field(span, off!(ct_tuplehash) + off!(tuplehash_tuple)) };
    let mut h: u64 = 0;
    for w in words {
        h = (h ^ u64::from(w))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    h
}
