//! Memory of the flow table: the process's VmRSS before and after filling a [`FlowTable`] with N
//! live flows (`--flows N`, default 100000). Prints one line for `cargo xtask bench`:
//! `rss flows=N live=N before_kib=A after_kib=B`. Run it in a fresh process per size, so that
//! one size's freed memory does not hide the next one's.

mod common;

use aksnet_agent::flows::FlowTable;
use std::hint::black_box;

fn vm_rss_kib() -> u64 {
    let status =
        std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("/proc/self/status has a VmRSS line in kB")
}

fn main() {
    // `cargo bench` adds `--bench`; only `--flows N` matters here.
    let args: Vec<String> = std::env::args().collect();
    let flows: u32 = args
        .iter()
        .position(|a| a == "--flows")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--flows takes a number"))
        .unwrap_or(100_000);
    let before = vm_rss_kib();
    let mut table = FlowTable::new(flows as usize);
    for n in 0..flows {
        table.apply(common::lb_inbound(n));
    }
    let live = table.stats().live;
    assert_eq!(
        live, flows as usize,
        "every flow is distinct, so all stay live"
    );
    let after = vm_rss_kib();
    black_box(&table);
    println!("rss flows={flows} live={live} before_kib={before} after_kib={after}");
}
