//! Userspace pipeline cost per event on one core: ring-buffer record decoding, flow-table
//! correlation, the metrics' counting and SNAT accounting, classification against the built-in
//! kubenet model, and the `--dump --output json` line. `cargo xtask bench` runs these and reads criterion's medians; run one by hand with
//! `cargo bench -p aksnet-agent --bench pipeline -- decode`.
//!
//! The flows are the lab's (xtask::lab): an internet client through the LB frontend to the app
//! pod (DNAT + MASQUERADE), the app pod to the internet (SNAT), a pod to a ClusterIP Service.

mod common;

use aksnet_agent::events::{decode_conn_event, BootClock, EventKind, FlowEvent, Tuple};
use aksnet_agent::flows::FlowTable;
use aksnet_agent::metrics::{FlowObservation, Metrics, MetricsConfig, NatHop};
use aksnet_agent::model::{Classifier, Model};
use aksnet_agent::output::dump::{Dump, FlowView, Format};
use aksnet_agent::topology::{CniMode, Topology};
use aksnet_common::{ct_status, event_kind, hook, ConnEvent, RawTuple};
use common::{lb_inbound, tuple};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use xtask::lab::agent_config;

/// Live flows in the table while correlation is measured: a busy node's conntrack table.
const LIVE_FLOWS: u32 = 100_000;

/// App pod → internet server 198.51.100.20:443, masqueraded to the node IP.
fn pod_outbound() -> FlowEvent {
    FlowEvent {
        orig: tuple(
            Ipv4Addr::new(10, 244, 0, 10),
            40000,
            Ipv4Addr::new(198, 51, 100, 20),
            443,
        ),
        reply: tuple(
            Ipv4Addr::new(198, 51, 100, 20),
            443,
            Ipv4Addr::new(10, 224, 0, 4),
            40000,
        ),
        status: ct_status::CONFIRMED | ct_status::SRC_NAT,
        mark: 0,
        in_ifindex: Some(4),
        out_ifindex: Some(2),
        ..lb_inbound(0)
    }
}

/// Ingress pod → ClusterIP 10.0.12.34:80 → app pod, DNAT only.
fn pod_to_service() -> FlowEvent {
    FlowEvent {
        orig: tuple(
            Ipv4Addr::new(10, 244, 0, 12),
            41000,
            Ipv4Addr::new(10, 0, 12, 34),
            80,
        ),
        reply: tuple(
            Ipv4Addr::new(10, 244, 0, 10),
            8080,
            Ipv4Addr::new(10, 244, 0, 12),
            41000,
        ),
        status: ct_status::CONFIRMED | ct_status::DST_NAT,
        mark: 0,
        in_ifindex: Some(5),
        out_ifindex: Some(4),
        ..lb_inbound(0)
    }
}

fn raw_tuple(t: &Tuple, protonum: u8) -> RawTuple {
    let octets = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => unreachable!("the bench flows are IPv4"),
    };
    let mut raw = RawTuple {
        l3num: 2,
        protonum,
        sport: t.sport.to_be(),
        dport: t.dport.to_be(),
        ..Default::default()
    };
    raw.src[..4].copy_from_slice(&octets(t.src));
    raw.dst[..4].copy_from_slice(&octets(t.dst));
    raw
}

/// The ring-buffer record the kernel side writes for [`lb_inbound`].
fn record() -> Vec<u8> {
    let ev = lb_inbound(40000);
    let raw = ConnEvent {
        ts_ns: 123_456_789_000,
        status: ev.status,
        orig: raw_tuple(&ev.orig, 6),
        reply: raw_tuple(&ev.reply, 6),
        netns: ev.netns,
        mark: ev.mark,
        in_ifindex: 2,
        out_ifindex: 4,
        kind: event_kind::NEW,
        hook: hook::XMIT,
        ..Default::default()
    };
    // SAFETY: ConnEvent is repr(C) plain data with explicit padding fields; the slice covers it.
    unsafe {
        std::slice::from_raw_parts(
            (&raw as *const ConnEvent).cast::<u8>(),
            size_of::<ConnEvent>(),
        )
    }
    .to_vec()
}

fn decode(c: &mut Criterion) {
    let bytes = record();
    let clock = BootClock::now();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("conn_event", |b| {
        b.iter(|| decode_conn_event(black_box(&bytes), &clock).expect("the record is valid"))
    });
    g.finish();
}

/// A table holding [`LIVE_FLOWS`] connections.
fn full_table() -> FlowTable {
    let mut table = FlowTable::new(LIVE_FLOWS as usize * 2);
    for n in 0..LIVE_FLOWS {
        table.apply(lb_inbound(n));
    }
    table
}

fn correlate(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_table");
    g.throughput(Throughput::Elements(1));
    // Churn at a steady size: each iteration opens one new connection and closes the oldest.
    let mut table = full_table();
    let mut n = LIVE_FLOWS;
    g.bench_function("open_close_100k_live", |b| {
        b.iter_batched(
            || {
                let open = lb_inbound(n);
                let close = FlowEvent {
                    kind: EventKind::Destroy,
                    ..lb_inbound(n - LIVE_FLOWS)
                };
                n += 1;
                (open, close)
            },
            |(open, close)| {
                black_box(table.apply(open));
                black_box(table.apply(close));
            },
            BatchSize::SmallInput,
        )
    });
    // A connection reported again in the same state (kernel LRU eviction, two sources).
    let mut table = full_table();
    g.bench_function("repeat_100k_live", |b| {
        b.iter_batched(
            || lb_inbound(LIVE_FLOWS / 2),
            |ev| black_box(table.apply(ev)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What the pipeline tells the metrics of one connection from the internet through the LB
/// frontend to the pod, DNAT'ed and masqueraded on the node.
fn lb_inbound_observed(ev: &FlowEvent) -> FlowObservation<'static> {
    const HOPS: [NatHop; 2] = [NatHop::KubeProxyDnat, NatHop::NodeSnat];
    FlowObservation {
        key: ev.key(),
        translated: ev.translated(),
        path: "lb-inbound",
        cni: "kubenet",
        verdict: "conforms",
        deviation: None,
        hops: &HOPS,
        pod: None,
    }
}

fn metrics(c: &mut Criterion) {
    let metrics = Metrics::new(&MetricsConfig::default()).expect("the default metrics build");
    for n in 0..LIVE_FLOWS {
        metrics.observe_new(&lb_inbound_observed(&lb_inbound(n)));
    }
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1));
    // Churn at a steady size, as in `flow_table`: one connection counted and SNAT-accounted,
    // the oldest one ended.
    let mut n = LIVE_FLOWS;
    g.bench_function("open_close_snat_100k_live", |b| {
        b.iter_batched(
            || {
                let open = lb_inbound(n);
                let close = lb_inbound(n - LIVE_FLOWS);
                n += 1;
                (open, close)
            },
            |(open, close)| {
                metrics.observe_new(&lb_inbound_observed(black_box(&open)));
                metrics.observe_end(black_box(&close.key()), black_box(&close.translated()));
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn classifier() -> Classifier {
    let path = std::env::temp_dir().join(format!("aksnet-bench-{}.toml", std::process::id()));
    let layout = xtask::lab::Layout::new(CniMode::Kubenet);
    std::fs::write(&path, agent_config::render(&layout)).expect("cannot write the bench topology");
    let topology = Topology::from_file(&path).expect("the lab's agent config loads");
    let _ = std::fs::remove_file(&path);
    let model = Model::load_builtin(CniMode::Kubenet).expect("the built-in kubenet model loads");
    Classifier::new(model, topology).expect("the kubenet model matches the kubenet topology")
}

fn classify(c: &mut Criterion) {
    let classifier = classifier();
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, ev) in [
        ("lb_inbound", lb_inbound(40000)),
        ("pod_outbound", pod_outbound()),
        ("pod_to_service", pod_to_service()),
    ] {
        g.bench_function(name, |b| b.iter(|| classifier.classify(black_box(&ev))));
    }
    g.finish();
}

fn dump(c: &mut Criterion) {
    let ev = lb_inbound(40000);
    let view = FlowView {
        kind: EventKind::New,
        event: &ev,
        in_iface: Some("eth0".into()),
        out_iface: Some("cbr0".into()),
        names: BTreeMap::new(),
        classification: None,
    };
    let mut out = Dump::new(Format::Json, std::io::sink());
    let mut g = c.benchmark_group("dump");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_line", |b| {
        b.iter(|| {
            out.write(black_box(&view))
                .expect("the sink accepts everything")
        })
    });
    g.finish();
}

criterion_group!(benches, decode, correlate, metrics, classify, dump);
criterion_main!(benches);
