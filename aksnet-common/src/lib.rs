//! Types shared by aksnet's kernel programs (`aksnet-ebpf`) and its agent (`aksnet-agent`), and
//! the names the agent shares with xtask ([`CniMode`]).
//!
//! Everything the kernel touches is `#[repr(C)]` and `no_std`: the kernel writes these bytes and
//! userspace reads them, so a layout change here is a protocol change between the two sides.
#![no_std]

mod cni;
pub use cni::{CniMode, UnknownCniMode};

/// What a [`ConnEvent`] reports about a connection.
pub mod event_kind {
    /// A hook saw the connection for the first time. For a connection first reported by a
    /// packet-less hook (`hook::NAT_SETUP`), the xmit hook sends one more `NEW`, with
    /// `hook::XMIT`, for the interfaces and counters of its first packet.
    pub const NEW: u8 = 1;
    /// The connection's NAT status bits changed after it was first reported.
    pub const NAT_CHANGED: u8 = 2;
    /// conntrack removed the connection.
    pub const DESTROY: u8 = 3;
}

/// Which kernel hook produced a [`ConnEvent`].
pub mod hook {
    /// `tp_btf/net_dev_start_xmit`: the packet is leaving an interface with its NAT applied.
    pub const XMIT: u8 = 1;
    /// `nf_nat_setup_info` (fentry or kprobe, where the kernel allows them).
    pub const NAT_SETUP: u8 = 2;
    /// `nf_ct_delete` (fentry or kprobe, where the kernel allows them).
    pub const CT_DELETE: u8 = 3;
}

/// `enum ip_conntrack_status` bits from `include/uapi/linux/netfilter/nf_conntrack_common.h`.
/// They are uapi, so stable across kernels.
pub mod ct_status {
    pub const EXPECTED: u64 = 1 << 0;
    pub const SEEN_REPLY: u64 = 1 << 1;
    pub const ASSURED: u64 = 1 << 2;
    pub const CONFIRMED: u64 = 1 << 3;
    pub const SRC_NAT: u64 = 1 << 4;
    pub const DST_NAT: u64 = 1 << 5;
    pub const SRC_NAT_DONE: u64 = 1 << 7;
    pub const DST_NAT_DONE: u64 = 1 << 8;
    pub const DYING: u64 = 1 << 9;
    /// The bits whose change makes the kernel side report a connection again.
    pub const NAT_MASK: u64 = SRC_NAT | DST_NAT | SRC_NAT_DONE | DST_NAT_DONE;
}

/// `enum ip_conntrack_info` values from `include/uapi/linux/netfilter/nf_conntrack_common.h`,
/// kept by `skb->_nfct` in its low 3 bits.
pub mod ct_info {
    /// `IP_CT_ESTABLISHED`: original direction, the connection has seen a reply.
    pub const ESTABLISHED: u64 = 0;
    /// `IP_CT_RELATED`: original direction, first packet of a connection an existing one
    /// expected (an FTP data channel, an ICMP error).
    pub const RELATED: u64 = 1;
    /// `IP_CT_NEW`: original direction, no reply seen yet.
    pub const NEW: u64 = 2;
    /// This value and above: the packet travels in the reply direction.
    pub const IS_REPLY: u64 = 3;
    /// No conntrack entry (the pointer part is NULL on current kernels, a template on old ones).
    pub const UNTRACKED: u64 = 7;
    /// `NFCT_INFOMASK`
    pub const MASK: u64 = 7;
}

/// Bytes at the start of `struct nf_conntrack_tuple` (40 on 64-bit kernels: both addresses,
/// ports, family, protocol, direction) that the kernel programs hash, in one read, to tell a
/// connection from another one later allocated at the same address. The agent checks that the
/// running kernel's tuple is at least this long.
pub const TUPLE_FINGERPRINT_LEN: usize = 40;

/// Most bytes of a `struct nf_conn` the kernel programs read in one go: every field they use
/// (both tuples, status, namespace, zone, mark) lies within about 160 bytes on 64-bit kernels,
/// so one helper call reads them all. The agent refuses a kernel whose fields spread wider.
pub const CT_SPAN_MAX: u32 = 192;

/// One direction of a conntrack entry, as `struct nf_conntrack_tuple` holds it. Aligned to 4
/// (where [`ConnEvent`] puts it anyway) so that the kernel programs store the addresses a word
/// at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawTuple {
    /// `union nf_inet_addr`: an IPv4 address uses the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order, as the kernel stores them. ICMP: `sport` is the echo id,
    /// `dport` is `type << 8 | code` read as the two bytes of `dst.u.icmp`.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub l3num: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protonum: u8,
    pub _pad: u8,
}

/// One record on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// `bpf_ktime_get_boot_ns()` when the event was made.
    pub ts_ns: u64,
    /// Identifies the `nf_conn` while it lives: its address XOR the agent's random
    /// `CONN_ID_KEY`, so the kernel address itself never leaves the kernel.
    pub conn_id: u64,
    /// `nf_conn.status` (see [`ct_status`]).
    pub status: u64,
    /// The packet that produced the event, where a packet did: 1 and its length; 0 otherwise.
    /// The kernel side keeps no per-packet counters (they would cost every packet a map update).
    pub packets: u64,
    pub bytes: u64,
    pub orig: RawTuple,
    pub reply: RawTuple,
    /// Inode number of the connection's network namespace (`net->ns.inum`).
    pub netns: u32,
    /// `nf_conn.mark`, 0 where the kernel has no `CONFIG_NF_CONNTRACK_MARK`.
    pub mark: u32,
    /// Where the connection's original direction enters: `skb->skb_iif` of an original-direction
    /// packet, or the device a reply-direction packet leaves on (the original came in where its
    /// reply goes out). 0 for locally generated traffic or unknown.
    pub in_ifindex: u32,
    /// Device an original-direction packet leaves on; 0 when unknown (reported from a reply).
    pub out_ifindex: u32,
    /// Conntrack zone id, 0 where the kernel has no `CONFIG_NF_CONNTRACK_ZONES`.
    pub zone: u16,
    /// One of [`event_kind`].
    pub kind: u8,
    /// One of [`hook`].
    pub hook: u8,
    /// [`conn_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Bits of [`ConnEvent::flags`].
pub mod conn_flags {
    /// This `NEW` is a new connection in an `nf_conn` that an earlier connection with the same
    /// original tuple used: the earlier one ended, even if its end was not reported yet.
    pub const RENEWED: u8 = 1 << 0;
}

/// Marks an offset that the running kernel does not have (the field is compiled out).
pub const OFFSET_ABSENT: u32 = u32::MAX;

/// Byte offsets of the kernel fields the programs read, resolved from the running kernel's BTF
/// by the agent at start-up and written into the programs' `OFFSETS` global before load.
/// Rust eBPF has no CO-RE relocations, so this is how one object runs on many kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `sk_buff._nfct` (conntrack pointer | ctinfo in the low 3 bits).
    pub skb_nfct: u32,
    /// `sk_buff.skb_iif`.
    pub skb_iif: u32,
    /// `sk_buff.len`.
    pub skb_len: u32,
    /// `net_device.ifindex`.
    pub netdev_ifindex: u32,
    /// `net_device.nd_net.net` (the device's namespace), or [`OFFSET_ABSENT`] on a kernel
    /// without `CONFIG_NET_NS`, where every device is in the one namespace.
    pub netdev_net: u32,
    /// `nf_conn.tuplehash` (array of two `nf_conntrack_tuple_hash`).
    pub ct_tuplehash: u32,
    /// `sizeof(struct nf_conntrack_tuple_hash)`: stride from the original to the reply entry.
    pub tuplehash_size: u32,
    /// `nf_conntrack_tuple_hash.tuple`.
    pub tuplehash_tuple: u32,
    /// `nf_conn.status`.
    pub ct_status: u32,
    /// `nf_conn.zone.id`, or [`OFFSET_ABSENT`].
    pub ct_zone_id: u32,
    /// `nf_conn.mark`, or [`OFFSET_ABSENT`].
    pub ct_mark: u32,
    /// `nf_conn.ct_net.net` (the `struct net *` inside `possible_net_t`).
    pub ct_net: u32,
    /// `net.ns.inum`.
    pub net_ns_inum: u32,
    /// Inside `struct nf_conntrack_tuple`.
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_src_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    pub tuple_dst_protonum: u32,
    /// Where the programs' one read of an `nf_conn` starts: 8-byte aligned, at or before the
    /// first byte of the `nf_conn` fields above that they use.
    pub ct_span_start: u32,
    /// Bytes of that read, up to the last byte they use; at most [`CT_SPAN_MAX`].
    pub ct_span_len: u32,
}

#[cfg(test)]
mod tests {
    use super::ct_info;

    /// `enum ip_conntrack_info` in include/uapi/linux/netfilter/nf_conntrack_common.h.
    #[test]
    fn ct_info_matches_the_uapi_enum() {
        assert_eq!(ct_info::ESTABLISHED, 0);
        assert_eq!(ct_info::RELATED, 1);
        assert_eq!(ct_info::NEW, 2);
        assert_eq!(ct_info::IS_REPLY, 3);
        // IP_CT_ESTABLISHED_REPLY = IP_CT_ESTABLISHED + IP_CT_IS_REPLY
        assert_eq!(ct_info::ESTABLISHED + ct_info::IS_REPLY, 3);
        // IP_CT_UNTRACKED = 7, and NFCT_INFOMASK = 7 in include/linux/skbuff.h
        assert_eq!(ct_info::UNTRACKED, 7);
        assert_eq!(ct_info::MASK, 7);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding fields and no pointers, so every
    // byte pattern is a valid value; the same holds for the two types below.
    unsafe impl aya::Pod for super::RawTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
}
