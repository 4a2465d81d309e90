//! Userspace pipeline cost per event on one core: ring-buffer record decoding, flow-table
//! correlation, the metrics' counting and SNAT accounting, classification against the built-in
//! kubenet model (and, on a large cluster's node, the kubenet and azure-cni ones), and the
//! `--dump --output json` line. `cargo xtask bench` runs these and reads criterion's medians; run one by hand with
//! `cargo bench -p aksnet-agent --bench pipeline -- decode`.
//!
//! The flows are the lab's (xtask::lab): an internet client through the LB frontend to the app
//! pod (DNAT + MASQUERADE), the app pod to the internet (SNAT), a pod to a ClusterIP Service.

mod common;

use aksnet_agent::events::Proto;
use aksnet_agent::events::{decode_conn_event, BootClock, EventKind, FlowEvent, Tuple};
use aksnet_agent::flows::FlowTable;
use aksnet_agent::metrics::{FlowObservation, Metrics, MetricsConfig, NatHop};
use aksnet_agent::model::{Classifier, Model};
use aksnet_agent::output::dump::{Dump, FlowView, Format};
use aksnet_agent::topology::{
    CniMode, Etp, ServiceEndpoint, ServiceKind, ServicePort, Topology, TopologyLayer,
};
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

/// The lab's agent config for `cni`, as the layer the config file gives.
fn lab_layer(cni: CniMode) -> TopologyLayer {
    let path = std::env::temp_dir().join(format!("aksnet-bench-{}.toml", std::process::id()));
    let layout = xtask::lab::Layout::new(cni);
    std::fs::write(&path, agent_config::render(&layout)).expect("cannot write the bench topology");
    let layer = TopologyLayer::from_file(&path).expect("the lab's agent config loads");
    let _ = std::fs::remove_file(&path);
    layer
}

fn classifier_of(cni: CniMode, layers: impl IntoIterator<Item = TopologyLayer>) -> Classifier {
    let topology = Topology::from_layers(layers).expect("the bench topology has a network mode");
    let model = Model::load_builtin(cni).expect("the built-in model loads");
    Classifier::new(model, topology).expect("the built-in model matches the topology's mode")
}

/// Services, endpoints and local pods of a large cluster, as kube-proxy's rules and the node's
/// routes give them: [`LARGE_SERVICES`] Services (every one a ClusterIP, one in five also a
/// NodePort, one in ten also a LoadBalancer, one in fifty also an external IP),
/// [`LARGE_ENDPOINTS`] endpoints on other nodes and [`LARGE_LOCAL_PODS`] pods on this one, the
/// lab's among them. Pods are in the cluster pod CIDR on kubenet and in the node subnet on
/// azure-cni. With what discovery adds on the lab's node (its pods, cbr0's address), the lab's
/// flows classify as they do in the lab.
fn large_cluster(cni: CniMode) -> TopologyLayer {
    let v4 = |a: u32| IpAddr::V4(Ipv4Addr::from(a));
    // Endpoints from the second /24 (kubenet: other nodes' shares of the pod CIDR; azure-cni:
    // the node subnet past the lab's hosts); local pods: the lab's four (.10 to .13), the rest
    // from .150 of the first.
    let (remote_pods, first_24, bridge) = match cni {
        CniMode::Kubenet => (
            Ipv4Addr::new(10, 244, 1, 0),
            Ipv4Addr::new(10, 244, 0, 0),
            Some(vec![v4(u32::from(Ipv4Addr::new(10, 244, 0, 1)))]),
        ),
        _ => (
            Ipv4Addr::new(10, 224, 1, 0),
            Ipv4Addr::new(10, 224, 0, 0),
            None,
        ),
    };
    let (remote_pods, first_24) = (u32::from(remote_pods), u32::from(first_24));
    let local_pods = (10..14)
        .chain(150..150 + LARGE_LOCAL_PODS - 4)
        .map(|last| v4(first_24 + last))
        .collect();
    let mut services = Vec::new();
    for i in 0..LARGE_SERVICES {
        let name = format!("ns{}/svc{i}:http", i % 40);
        let port = |kind, ip, port, etp| ServicePort {
            name: name.clone(),
            kind,
            ip,
            proto: Proto::Tcp,
            port,
            etp,
        };
        // ClusterIPs from 10.0.100.0, inside the lab's service CIDR 10.0.0.0/16.
        let cluster_ip = v4(u32::from(Ipv4Addr::new(10, 0, 100, 0)) + i);
        services.push(port(ServiceKind::ClusterIp, Some(cluster_ip), 80, None));
        if i % 5 == 0 {
            let node_port = 30_000 + i as u16;
            services.push(port(
                ServiceKind::NodePort,
                None,
                node_port,
                Some(Etp::Cluster),
            ));
        }
        if i % 10 == 0 {
            // LoadBalancer IPs from the benchmarking range 198.18.0.0/15 (RFC 2544).
            let lb_ip = v4(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
            services.push(port(
                ServiceKind::LoadBalancer,
                Some(lb_ip),
                80,
                Some(Etp::Local),
            ));
        }
        if i % 50 == 0 {
            let external = v4(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
            services.push(port(
                ServiceKind::ExternalIp,
                Some(external),
                80,
                Some(Etp::Cluster),
            ));
        }
    }
    let endpoints = (0..LARGE_ENDPOINTS)
        .map(|i| ServiceEndpoint {
            name: format!("ns{}/svc{}:http", i % 40, i % LARGE_SERVICES),
            ip: v4(remote_pods + i / 100 * 256 + 10 + i % 100),
            port: 8080,
            proto: Proto::Tcp,
        })
        .collect();
    TopologyLayer {
        services: Some(services),
        endpoints: Some(endpoints),
        local_pods: Some(local_pods),
        bridge_gateways: bridge,
        ..TopologyLayer::default()
    }
}

const LARGE_SERVICES: u32 = 2_000;
const LARGE_ENDPOINTS: u32 = 5_000;
const LARGE_LOCAL_PODS: u32 = 100;

/// `ev` on azure-cni: the lab's pods keep their last octet in the node subnet, and what cbr0's
/// address masqueraded is masqueraded to the node IP (`xtask::lab::layout::pod_ip`,
/// `masquerade_to_pod_ip`).
fn on_azure_cni(ev: FlowEvent) -> FlowEvent {
    let pod = |ip: IpAddr| match ip {
        IpAddr::V4(a) if a == Ipv4Addr::new(10, 244, 0, 1) => {
            IpAddr::V4(Ipv4Addr::new(10, 224, 0, 4))
        }
        IpAddr::V4(a) if a.octets()[..3] == [10, 244, 0] => {
            IpAddr::V4(Ipv4Addr::new(10, 224, 0, a.octets()[3]))
        }
        other => other,
    };
    let moved = |t: Tuple| Tuple {
        src: pod(t.src),
        dst: pod(t.dst),
        ..t
    };
    FlowEvent {
        orig: moved(ev.orig),
        reply: moved(ev.reply),
        ..ev
    }
}

fn classify(c: &mut Criterion) {
    let flows = [
        ("lb_inbound", lb_inbound(40000)),
        ("pod_outbound", pod_outbound()),
        ("pod_to_service", pod_to_service()),
    ];
    let classifier = classifier_of(CniMode::Kubenet, [lab_layer(CniMode::Kubenet)]);
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, ev) in &flows {
        g.bench_function(*name, |b| b.iter(|| classifier.classify(black_box(ev))));
    }
    g.finish();
    // The same flows on a node of a large cluster: the cost of classifying must not grow with
    // the cluster.
    let mut g = c.benchmark_group("classify_large");
    g.throughput(Throughput::Elements(1));
    for cni in [CniMode::Kubenet, CniMode::AzureCni] {
        let classifier = classifier_of(cni, [lab_layer(cni), large_cluster(cni)]);
        for (name, ev) in &flows {
            let ev = match cni {
                CniMode::Kubenet => ev.clone(),
                _ => on_azure_cni(ev.clone()),
            };
            g.bench_function(format!("{cni}_{name}"), |b| {
                b.iter(|| classifier.classify(black_box(&ev)))
            });
        }
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
