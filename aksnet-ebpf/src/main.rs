//! aksnet's kernel programs: report conntrack entries (`struct nf_conn`) with their NAT decision.
//!
//! - `tp_btf/net_dev_start_xmit` (always): every packet leaving an interface carries its
//!   `nf_conn` in `skb->_nfct`, with NAT already applied. Each connection is reported once, and
//!   again only when its NAT status bits change; an established connection's packets in its
//!   original direction cost one read and nothing more.
//! - `nf_nat_setup_info` (fexit, or kprobe+kretprobe): reports the NAT decision as it is made,
//!   also for connections whose packets never leave through a device of this namespace.
//! - `nf_ct_delete` (fentry, or kprobe): reports the end of a connection and forgets it.
//!
//! Rust eBPF has no CO-RE, so every field offset comes from the `OFFSETS` global that the agent
//! resolves from the running kernel's BTF and writes before loading.
#![no_std]
#![no_main]

mod conn;

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};

/// `enum nf_nat_manip_type`: the source binding is set up last (POSTROUTING or INPUT), so when
/// it is done the connection's NAT decision is complete.
const NF_NAT_MANIP_SRC: u32 = 0;
/// `NF_ACCEPT`: `nf_nat_setup_info` succeeded.
const NF_ACCEPT: u32 = 1;

/// The `nf_conn` of an `nf_nat_setup_info` call in flight, from the kprobe to the kretprobe
/// (a kretprobe cannot see the arguments). Keyed by [`call_key`]. LRU: a kretprobe the kernel
/// misses (too many calls in flight) leaves its entry behind, and those must not fill the map.
#[map]
static NAT_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    conn::on_xmit(skb, dev);
    0
}

#[fexit(function = "nf_nat_setup_info")]
pub fn nf_nat_setup_info_exit(ctx: FExitContext) -> i32 {
    // (struct nf_conn *ct, const struct nf_nat_range2 *range, enum nf_nat_manip_type maniptype)
    // -> unsigned int; fexit passes the return value after the arguments (works on 5.15, where
    // bpf_get_func_ret does not exist yet).
    let ct: u64 = ctx.arg(0);
    let maniptype: u32 = ctx.arg(2);
    let ret: u32 = ctx.arg(3);
    if maniptype == NF_NAT_MANIP_SRC && ret == NF_ACCEPT {
        conn::on_nat_setup(ct);
    }
    0
}

#[kprobe(function = "nf_nat_setup_info")]
pub fn nf_nat_setup_info_entry(ctx: ProbeContext) -> u32 {
    let (Some(ct), Some(maniptype)) = (ctx.arg::<u64>(0), ctx.arg::<u32>(2)) else {
        return 0;
    };
    if maniptype == NF_NAT_MANIP_SRC {
        // A failed insert only costs this call's early report: the xmit hook still reports it.
        let _ = NAT_CALLS.insert(call_key(), ct, 0);
    }
    0
}

#[kretprobe(function = "nf_nat_setup_info")]
pub fn nf_nat_setup_info_ret(ctx: RetProbeContext) -> u32 {
    let key = call_key();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(ct) = (unsafe { NAT_CALLS.get(key) }).copied() else {
        return 0;
    };
    let _ = NAT_CALLS.remove(key);
    if ctx.ret::<u32>() == NF_ACCEPT {
        conn::on_nat_setup(ct);
    }
    0
}

#[fentry(function = "nf_ct_delete")]
pub fn nf_ct_delete_entry(ctx: FEntryContext) -> i32 {
    // bool nf_ct_delete(struct nf_conn *ct, u32 portid, int report)
    conn::on_delete(ctx.arg(0), false);
    0
}

#[kprobe(function = "nf_ct_delete")]
pub fn nf_ct_delete_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        conn::on_delete(ct, false);
    }
    0
}

/// Attached to `nf_ct_delete.part.N` where the compiler split the function: its callers set
/// `IPS_DYING` before calling it, once per connection, and the connection stays first argument.
#[kprobe(function = "nf_ct_delete.part")]
pub fn nf_ct_delete_part_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        conn::on_delete(ct, true);
    }
    0
}

/// Identifies one `nf_nat_setup_info` call between its kprobe and kretprobe: the task, except
/// for the idle tasks (pid 0 on every CPU), which only run it in softirq context where the call
/// cannot migrate, so the CPU identifies it.
#[inline(always)]
fn call_key() -> u64 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if pid_tgid as u32 != 0 {
        pid_tgid
    } else {
        // SAFETY: helper without arguments.
        let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
        (1 << 63) | u64::from(cpu)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
