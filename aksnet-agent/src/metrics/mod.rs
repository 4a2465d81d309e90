//! Prometheus metrics: flows per AKS path, NAT hops, model deviations, SNAT port usage and
//! pressure, and the capture's health, served over HTTP by [`serve`].
//!
//! Counters are updated as flows are classified ([`Metrics::observe_new`]) and end
//! ([`Metrics::observe_end`]); gauges are computed from the live SNAT table and the capture's
//! counters at scrape time ([`Metrics::render`]). Every label comes from a fixed set or is bounded
//! by top-N folding into `other`; no label holds a client port or identifies a single flow.
//!
//! Series bounds (defaults in parentheses): per-destination gauges keep `top_destinations` (20)
//! label sets plus `other`; the per-destination, per-pod gauge keeps `top_pods_per_destination`
//! (5) pods plus `other` for each of those destinations (at most 20 × 6 + 1 series); per-pod
//! counters keep 1000 pods and per-Service counters 1000 Services before counting under `other`.

mod config;
pub mod conntrack;
mod forecast;
mod http;
pub mod snat;
mod topology;

pub use config::{MetricsConfig, DEFAULT_PORT};
pub use http::{bind, serve, Readiness};

use crate::capture::CaptureHealth;
use crate::events::{FlowKey, SourceKind, Tuple};
use conntrack::ConntrackReader;
use forecast::Forecast;
use prometheus::core::Collector;
use prometheus::{
    Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use snat::{top_n, Destination, Opened, SnatTable, SourceDestination};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Label value of the series that sums everything beyond the top N.
const OTHER: &str = "other";
/// Distinct `pod` label values the per-pod counters keep over the agent's life. A node runs at
/// most 250 pods at a time; this leaves room for their churn, and pods beyond it count under
/// `other` so that a node full of short-lived jobs cannot grow the series without bound.
const POD_SERIES: usize = 1000;
/// Distinct `service` label values the per-Service counters keep, likewise.
const SERVICE_SERIES: usize = 1000;
/// How far back the time-to-exhaustion forecast looks: long enough to smooth bursts, short
/// enough to follow a leak that started minutes ago.
const FORECAST_WINDOW: Duration = Duration::from_secs(300);
/// Scrapes closer together than this give the forecast one sample.
const FORECAST_SPACING: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics configuration: {0}")]
    Config(String),
    #[error("registering metric {name}: {source} (two metrics with one name?)")]
    Register {
        name: String,
        source: prometheus::Error,
    },
    #[error("encoding the metrics text exposition: {0}")]
    Encode(prometheus::Error),
    #[error(
        "metrics endpoint cannot listen on {addr}: {source}; is another agent running? \
         choose another metrics listen address"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A NAT hop on a flow's path, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatHop {
    /// kube-proxy rewrote the destination to a pod (seen on the node).
    KubeProxyDnat,
    /// The node rewrote the source: MASQUERADE by kube-proxy or ip-masq-agent (seen on the node).
    NodeSnat,
    /// The Azure LB's outbound rule SNATs the flow to its public IP (inferred, off the node): the
    /// flow holds one of the node's LB SNAT ports.
    LbSnatInferred,
    /// A NAT gateway SNATs the flow to one of its public IPs (inferred, off the node): the flow
    /// holds one of the gateway's ports.
    NatGatewaySnatInferred,
}

impl NatHop {
    /// The `hop` label value.
    pub fn label(self) -> &'static str {
        match self {
            NatHop::KubeProxyDnat => "kube_proxy_dnat",
            NatHop::NodeSnat => "node_snat",
            NatHop::LbSnatInferred => "lb_snat_inferred",
            NatHop::NatGatewaySnatInferred => "nat_gateway_snat_inferred",
        }
    }

    fn is_snat(self) -> bool {
        self == NatHop::NodeSnat || self.holds_outbound_port()
    }

    /// The outbound device's SNAT: the flow holds one of its ports for its destination.
    fn holds_outbound_port(self) -> bool {
        matches!(
            self,
            NatHop::LbSnatInferred | NatHop::NatGatewaySnatInferred
        )
    }
}

/// One classified connection, as the metrics need it. Report each connection once, when it is
/// classified; report a change of its translation with [`Metrics::observe_nat_change`] and its
/// end with [`Metrics::observe_end`], with the same key.
///
/// `path`, `cni`, `verdict` and `deviation` become label values: they must come from the
/// classifier's fixed vocabulary, never from addresses or free text.
#[derive(Clone, Copy, Debug)]
pub struct FlowObservation<'a> {
    /// The connection's conntrack identity (protocol and original tuple included).
    pub key: FlowKey,
    /// The tuple after the node's NAT, in the original direction (`FlowEvent::translated`).
    pub translated: Tuple,
    /// The AKS path it was classified as, e.g. `pod-to-internet`, `unclassified`.
    pub path: &'a str,
    /// The network mode it was classified under, e.g. `kubenet`, `azure-cni`.
    pub cni: &'a str,
    /// The classifier's verdict, e.g. `matches`, `deviates`.
    pub verdict: &'a str,
    /// Short class of the reason it deviates from the model, `None` when it does not.
    pub deviation: Option<&'a str>,
    /// The NAT hops on its path, seen or inferred; empty when nothing translates it.
    pub hops: &'a [NatHop],
    /// The pod the connection comes from: `namespace/pod`, or its address when the enrichment
    /// does not know it; `None` when the source is no pod. Bounded by the pods of one node.
    pub pod: Option<&'a str>,
}

/// The agent's metrics. Share it behind an `Arc`: every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    allocated_ports: u32,
    top_n: usize,
    flows: IntCounterVec,
    translations: IntCounterVec,
    snat_translations: IntCounterVec,
    pod_series: usize,
    deviations: IntCounterVec,
    snat_conflicts: IntCounter,
    snat_connections: IntGaugeVec,
    snat_ports_in_use: IntGaugeVec,
    lb_snat_flows: IntGaugeVec,
    top_pods: usize,
    lb_snat_pod_flows: IntGaugeVec,
    lb_snat_held: IntGaugeVec,
    lb_snat_pressure: Gauge,
    lb_snat_exhaustion: Gauge,
    client_address_lost: IntCounterVec,
    capture_events: IntCounter,
    capture_lost: IntCounter,
    capture_recovered: IntCounter,
    capture_decode_errors: IntCounter,
    capture_source: IntGaugeVec,
    capture_hooks: IntGaugeVec,
    topology: topology::TopologyGauges,
    /// Also serialises scrapes, which rewrite the gauges before encoding them.
    state: Mutex<State>,
    /// The observed namespace's conntrack statistics and their metrics, once attached. Apart
    /// from `state`: a scrape asks the kernel without holding up the flows.
    conntrack: Mutex<Option<(ConntrackReader, ConntrackMetrics)>>,
}

struct State {
    snat: SnatTable,
    capture: Option<(Arc<CaptureHealth>, SourceKind)>,
    /// `pod` label values the per-pod counters have used (at most `Metrics::pod_series`).
    pods_counted: HashSet<String>,
    /// `service` label values the per-Service counters have used (at most SERVICE_SERIES).
    services_counted: HashSet<String>,
    /// Usage of the busiest destination over time, for the time-to-exhaustion forecast.
    forecast: Forecast,
}

/// The conntrack pressure families, registered only once a reader is attached: no made-up
/// zeros where the agent cannot read them.
struct ConntrackMetrics {
    entries: IntGauge,
    max: IntGauge,
    insert_failed: IntCounter,
    drop: IntCounter,
    early_drop: IntCounter,
    invalid: IntCounter,
    clash_resolve: IntCounter,
    /// The last read failed (and was logged).
    failing: bool,
}

impl ConntrackMetrics {
    fn register(registry: &Registry) -> Result<ConntrackMetrics, MetricsError> {
        let reg = Registrar(registry);
        Ok(ConntrackMetrics {
            entries: reg.int_gauge(
                "aksnet_conntrack_entries",
                "Entries in the observed network namespace's conntrack table \
                 (nf_conntrack_count).",
            )?,
            max: reg.int_gauge(
                "aksnet_conntrack_entries_limit",
                "Size limit of the conntrack table, shared by every namespace \
                 (nf_conntrack_max): new connections are dropped beyond it.",
            )?,
            insert_failed: reg.int_counter(
                "aksnet_conntrack_insert_failed_total",
                "Connections conntrack could not insert at confirm time, summed over CPUs \
                 (a clash such as the DNS UDP race of kubernetes#56903): their packet was \
                 dropped.",
            )?,
            drop: reg.int_counter(
                "aksnet_conntrack_drop_total",
                "Packets dropped because the conntrack table was full, summed over CPUs.",
            )?,
            early_drop: reg.int_counter(
                "aksnet_conntrack_early_drop_total",
                "Conntrack entries evicted to make room in a full table, summed over CPUs.",
            )?,
            invalid: reg.int_counter(
                "aksnet_conntrack_invalid_total",
                "Packets conntrack could not track (invalid state), summed over CPUs.",
            )?,
            clash_resolve: reg.int_counter(
                "aksnet_conntrack_clash_resolve_total",
                "Insert clashes conntrack resolved without dropping, summed over CPUs.",
            )?,
            failing: false,
        })
    }

    fn set(&self, stats: &conntrack::ConntrackStats) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.entries.set(gauge(stats.entries));
        self.max.set(gauge(stats.max));
        set_counter(&self.insert_failed, stats.insert_failed);
        set_counter(&self.drop, stats.drop);
        set_counter(&self.early_drop, stats.early_drop);
        set_counter(&self.invalid, stats.invalid);
        set_counter(&self.clash_resolve, stats.clash_resolve);
    }
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Result<Metrics, MetricsError> {
        let allocated_ports = config.snat_ports_per_node()?;
        let registry = Registry::new();
        let reg = Registrar(&registry);
        let allocated = reg.int_gauge(
            "aksnet_lb_snat_ports_allocated",
            "SNAT ports the Azure Load Balancer allocates to this node per destination \
             (allocated_outbound_ports, or Azure's default for the node pool size).",
        )?;
        allocated.set(i64::from(allocated_ports));
        let idle_timeout = config.outbound_idle_timeout();
        reg.int_gauge(
            "aksnet_lb_snat_idle_timeout_seconds",
            "How long the outbound device keeps an ended flow's SNAT port, as configured \
             (outbound_idle_timeout_minutes).",
        )?
        .set(i64::try_from(idle_timeout.as_secs()).unwrap_or(i64::MAX));
        Ok(Metrics {
            allocated_ports,
            top_n: config.top_destinations,
            flows: reg.int_counter_vec(
                "aksnet_flows_observed_total",
                "Connections classified, by AKS path, network mode and verdict.",
                &["path", "cni", "verdict"],
            )?,
            translations: reg.int_counter_vec(
                "aksnet_nat_translations_total",
                "NAT hops on classified connections, seen on the node or inferred off it \
                 (hop=none: a connection nothing translates), by hop and protocol.",
                &["hop", "proto"],
            )?,
            snat_translations: reg.int_counter_vec(
                "aksnet_snat_translations_total",
                &format!(
                    "SNAT hops on classified connections (the node's MASQUERADE, the Azure LB's \
                     inferred outbound SNAT) by AKS path and the pod the connection comes from \
                     (namespace/name, its address when the enrichment does not know it, empty \
                     when the source is no pod; {OTHER} beyond {POD_SERIES} pods)."
                ),
                &["path", "pod", "hop"],
            )?,
            pod_series: POD_SERIES,
            deviations: reg.int_counter_vec(
                "aksnet_model_deviations_total",
                "Connections that deviate from their AKS path model, by path and reason class.",
                &["path", "reason_class"],
            )?,
            snat_conflicts: reg.int_counter(
                "aksnet_snat_port_conflicts_total",
                "New SNAT'ed connections whose translated tuple was still held by a live one: \
                 conntrack forbids this, so the older connection's end event was missed.",
            )?,
            snat_connections: reg.int_gauge_vec(
                "aksnet_snat_connections",
                "Live SNAT'ed connections by translated source, destination and owning pod \
                 (top N; the rest summed under label value other).",
                &["src_ip", "dst_ip", "dst_port", "proto", "pod"],
            )?,
            snat_ports_in_use: reg.int_gauge_vec(
                "aksnet_snat_ports_in_use",
                "Distinct translated source ports held by live SNAT'ed connections, by \
                 translated source and destination (top N; the rest summed under other).",
                &["src_ip", "dst_ip", "dst_port", "proto"],
            )?,
            lb_snat_flows: reg.int_gauge_vec(
                "aksnet_lb_snat_destination_flows",
                "Live connections through the outbound SNAT (the Azure Load Balancer's, or the \
                 NAT gateway's) by destination; each holds one of the node's SNAT ports for \
                 that destination (top N; the rest summed under other).",
                &["dst_ip", "dst_port", "proto"],
            )?,
            top_pods: config.top_pods_per_destination,
            lb_snat_pod_flows: reg.int_gauge_vec(
                "aksnet_lb_snat_destination_pod_flows",
                &format!(
                    "Live connections through the outbound SNAT (the LB's, or the NAT \
                     gateway's) by destination and source pod: who holds the ports. The top \
                     destinations as in aksnet_lb_snat_destination_flows, the top \
                     {} pods of each (namespace/name, else the pod IP, empty for the node \
                     itself), the rest summed under {OTHER}.",
                    config.top_pods_per_destination
                ),
                &["dst_ip", "dst_port", "proto", "pod"],
            )?,
            lb_snat_held: reg.int_gauge_vec(
                "aksnet_lb_snat_ports_held_after_close",
                "SNAT ports the outbound device still holds for connections that ended on the \
                 node less than its idle timeout ago, by destination (top N; the rest summed \
                 under other).",
                &["dst_ip", "dst_port", "proto"],
            )?,
            lb_snat_pressure: reg.gauge(
                "aksnet_lb_snat_port_pressure_ratio",
                "Busiest destination's SNAT ports in use (live connections plus ports held \
                 after close) over the ports allocated to the node: at 1 new connections to \
                 it fail.",
            )?,
            lb_snat_exhaustion: reg.gauge(
                "aksnet_lb_snat_exhaustion_forecast_seconds",
                "Seconds until the busiest destination runs out of SNAT ports at the growth of \
                 the last 5 minutes (least squares); +Inf when not growing, 0 when out.",
            )?,
            client_address_lost: reg.int_counter_vec(
                "aksnet_client_address_lost_total",
                &format!(
                    "Inbound connections whose client address was replaced before the pod, by \
                     Service (namespace/name; empty when unknown; {OTHER} beyond \
                     {SERVICE_SERIES}) and the hop that replaced it."
                ),
                &["service", "hop"],
            )?,
            capture_events: reg.int_counter(
                "aksnet_capture_events_total",
                "Conntrack events the capture delivered to the agent.",
            )?,
            capture_lost: reg.int_counter(
                "aksnet_capture_events_lost_total",
                "Conntrack events the kernel could not deliver (ring buffer full, netlink \
                 ENOBUFS).",
            )?,
            capture_recovered: reg.int_counter(
                "aksnet_capture_events_recovered_total",
                "Connections counted in aksnet_capture_events_lost_total that a later packet \
                 reported after all: lost minus recovered were never seen.",
            )?,
            capture_decode_errors: reg.int_counter(
                "aksnet_capture_decode_errors_total",
                "Capture records that could not be decoded.",
            )?,
            capture_source: reg.int_gauge_vec(
                "aksnet_capture_source_info",
                "The capture source in use (value 1): ebpf or netlink.",
                &["source"],
            )?,
            capture_hooks: reg.int_gauge_vec(
                "aksnet_capture_hook_attached",
                "Whether each kernel hook of the capture is attached (1) or not (0).",
                &["hook"],
            )?,
            topology: topology::TopologyGauges::register(&reg)?,
            state: Mutex::new(State {
                snat: SnatTable::new(idle_timeout),
                capture: None,
                pods_counted: HashSet::new(),
                services_counted: HashSet::new(),
                forecast: Forecast::new(FORECAST_WINDOW, FORECAST_SPACING),
            }),
            conntrack: Mutex::new(None),
            registry,
        })
    }

    /// Counts a newly classified connection and, when it is SNAT'ed, accounts its port.
    pub fn observe_new(&self, flow: &FlowObservation<'_>) {
        self.flows
            .with_label_values(&[flow.path, flow.cni, flow.verdict])
            .inc();
        if let Some(reason) = flow.deviation {
            self.deviations
                .with_label_values(&[flow.path, reason])
                .inc();
        }
        let proto = flow.key.proto.name();
        if flow.hops.is_empty() {
            self.translations.with_label_values(&["none", &proto]).inc();
        }
        for hop in flow.hops {
            self.translations
                .with_label_values(&[hop.label(), &proto])
                .inc();
        }
        if !flow.hops.iter().any(|hop| hop.is_snat()) {
            return;
        }
        let mut state = self.lock();
        let pod = match flow.pod {
            Some(pod) => self.pod_label(&mut state.pods_counted, pod),
            None => "",
        };
        for hop in flow.hops.iter().filter(|hop| hop.is_snat()) {
            self.snat_translations
                .with_label_values(&[flow.path, pod, hop.label()])
                .inc();
        }
        let outbound = flow.hops.iter().any(|hop| hop.holds_outbound_port());
        let opened = state
            .snat
            .open(flow.key, flow.translated, outbound, flow.pod);
        drop(state);
        self.count_conflict(opened, &flow.translated);
    }

    /// A live connection's translation changed from `was` to `now` (conntrack reported it
    /// again): its SNAT accounting follows, so that its end finds it.
    pub fn observe_nat_change(&self, key: &FlowKey, was: &Tuple, now: &Tuple) {
        let opened = self.lock().snat.retranslate(key, was, now);
        self.count_conflict(opened, now);
    }

    fn count_conflict(&self, opened: Option<Opened>, translated: &Tuple) {
        if let Some(Opened::Conflict { stale }) = opened {
            self.snat_conflicts.inc();
            log::debug!(
                "SNAT tuple {translated} ({}) still held by {}: its end was missed, dropped it",
                stale.proto,
                stale.orig,
            );
        }
    }

    /// `pod` itself while the per-pod counters have room for it, else `other`.
    fn pod_label<'p>(&self, counted: &mut HashSet<String>, pod: &'p str) -> &'p str {
        bounded_label(counted, self.pod_series, pod)
    }

    /// A connection ended: it no longer holds a SNAT port on the node, and the outbound device
    /// keeps its port until the idle timeout. `translated` is its last translation, as observed
    /// or changed since.
    pub fn observe_end(&self, key: &FlowKey, translated: &Tuple) {
        self.lock().snat.end(key, translated, Instant::now());
    }

    /// An inbound connection reached its pod without its client address: `hop` (a short, fixed
    /// name such as `kube_proxy_masquerade`) replaced it, on its way to `service`.
    pub fn observe_client_address_lost(&self, service: Option<&str>, hop: &'static str) {
        let mut state = self.lock();
        let service = match service {
            Some(name) => bounded_label(&mut state.services_counted, SERVICE_SERIES, name),
            None => "",
        };
        self.client_address_lost
            .with_label_values(&[service, hop])
            .inc();
    }

    /// Reads the observed namespace's conntrack statistics at every scrape from now on.
    pub fn set_conntrack(&self, reader: ConntrackReader) -> Result<(), MetricsError> {
        let mut conntrack = lock(&self.conntrack);
        let families = match conntrack.take() {
            Some((_, families)) => families,
            None => ConntrackMetrics::register(&self.registry)?,
        };
        *conntrack = Some((reader, families));
        Ok(())
    }

    /// Reads the capture's counters and hooks at every scrape from now on. Call again when the
    /// capture falls back to another source.
    pub fn set_capture(&self, health: Arc<CaptureHealth>, source: SourceKind) {
        self.lock().capture = Some((health, source));
    }

    /// The text exposition (format 0.0.4) of every metric, as of now.
    pub fn render(&self) -> Result<String, MetricsError> {
        // Held to the end: it also serialises scrapes.
        let mut conntrack = lock(&self.conntrack);
        if let Some((reader, families)) = &mut *conntrack {
            match reader.read() {
                Ok(stats) => {
                    families.set(&stats);
                    families.failing = false;
                }
                // The last values stay; the next scrape tries again. One warning per outage.
                Err(e) if !families.failing => {
                    log::warn!("conntrack statistics: {e}; keeping the last values");
                    families.failing = true;
                }
                Err(e) => log::debug!("conntrack statistics: {e}"),
            }
        }
        let mut state = self.lock();
        let state = &mut *state;
        self.refresh_snat(&mut state.snat, &mut state.forecast, Instant::now());
        if let Some((health, source)) = &state.capture {
            self.refresh_capture(health, *source);
        }
        let mut text = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut text)
            .map_err(MetricsError::Encode)?;
        Ok(text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn refresh_snat(&self, table: &mut SnatTable, forecast: &mut Forecast, now: Instant) {
        table.expire(now);
        let usage = table.usage();
        self.lb_snat_pressure
            .set(usage.pressure(self.allocated_ports));
        forecast.record(now, usage.busiest() as f64);
        self.lb_snat_exhaustion
            .set(forecast.seconds_until(f64::from(self.allocated_ports)));
        let top = self.top_n;
        self.publish_pod_flows(&usage);
        publish(
            &self.lb_snat_held,
            usage.held_after_close,
            top,
            destination_labels,
        );
        publish(
            &self.snat_connections,
            usage.connections,
            top,
            |(sd, pod)| {
                let mut labels = source_destination_labels(sd);
                labels.push(pod.clone().unwrap_or_default());
                labels
            },
        );
        publish(
            &self.snat_ports_in_use,
            usage.ports_in_use,
            top,
            source_destination_labels,
        );
        publish(&self.lb_snat_flows, usage.lb_flows, top, destination_labels);
    }

    /// The top destinations' flows per source pod: the top pods of each, the rest under `other`.
    fn publish_pod_flows(&self, usage: &snat::Usage) {
        let gauge = &self.lb_snat_pod_flows;
        gauge.reset();
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let busiest = top_n(usage.lb_flows.clone(), self.top_n);
        for (dest, _) in &busiest.top {
            let pods = usage.lb_pod_flows.get(dest).cloned().unwrap_or_default();
            let mut labels = destination_labels(dest);
            let pods = top_n(
                pods.into_iter()
                    .map(|(pod, n)| (pod.unwrap_or_default(), n))
                    .collect(),
                self.top_pods,
            );
            for (pod, n) in &pods.top {
                labels.push(pod.clone());
                gauge.with_label_values(&labels).set(count(*n));
                labels.pop();
            }
            if let Some(n) = pods.other {
                labels.push(OTHER.to_owned());
                gauge.with_label_values(&labels).set(count(n));
            }
        }
        if let Some(n) = busiest.other {
            gauge.with_label_values(&[OTHER; 4]).set(count(n));
        }
    }

    fn refresh_capture(&self, health: &CaptureHealth, source: SourceKind) {
        mirror(&self.capture_events, &health.events);
        mirror(&self.capture_lost, &health.lost);
        mirror(&self.capture_recovered, &health.recovered);
        mirror(&self.capture_decode_errors, &health.decode_errors);
        self.capture_source.reset();
        self.capture_source
            .with_label_values(&[&source.to_string()])
            .set(1);
        self.capture_hooks.reset();
        for hook in health.hooks() {
            self.capture_hooks
                .with_label_values(&[&hook.name])
                .set(i64::from(hook.attached));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state stays consistent across a panic elsewhere: every update is one call.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Replaces a gauge's series with the `n` largest `values` and the sum of the rest under `other`.
fn publish<K: Ord>(
    gauge: &IntGaugeVec,
    values: HashMap<K, u64>,
    n: usize,
    labels: impl Fn(&K) -> Vec<String>,
) {
    let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    gauge.reset();
    let folded = top_n(values, n);
    for (key, v) in &folded.top {
        gauge.with_label_values(&labels(key)).set(count(*v));
    }
    if let Some(v) = folded.other {
        let arity = gauge.desc()[0].variable_labels.len();
        gauge.with_label_values(&vec![OTHER; arity]).set(count(v));
    }
}

/// `dst_ip`, `dst_port`, `proto`.
fn destination_labels(dest: &Destination) -> Vec<String> {
    vec![
        dest.ip.to_string(),
        dest.port.to_string(),
        dest.proto.to_string(),
    ]
}

/// `src_ip`, then [`destination_labels`].
fn source_destination_labels(sd: &SourceDestination) -> Vec<String> {
    let mut labels = vec![sd.src.to_string()];
    labels.extend(destination_labels(&sd.dest));
    labels
}

/// Makes a registered counter show a count kept elsewhere.
fn mirror(counter: &IntCounter, source: &std::sync::atomic::AtomicU64) {
    set_counter(counter, source.load(Ordering::Relaxed));
}

fn set_counter(counter: &IntCounter, value: u64) {
    counter.reset();
    counter.inc_by(value);
}

/// `value` itself while fewer than `bound` values were used, else `other`.
fn bounded_label<'v>(used: &mut HashSet<String>, bound: usize, value: &'v str) -> &'v str {
    if used.contains(value) {
        return value;
    }
    if used.len() < bound {
        used.insert(value.to_owned());
        return value;
    }
    OTHER
}

/// Creates and registers metrics, naming the one that failed.
struct Registrar<'r>(&'r Registry);

impl Registrar<'_> {
    fn int_counter(&self, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
        self.add(name, IntCounter::with_opts(Opts::new(name, help)))
    }

    fn int_counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.add(name, IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn int_gauge(&self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        self.add(name, IntGauge::with_opts(Opts::new(name, help)))
    }

    fn int_gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.add(name, IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn gauge(&self, name: &str, help: &str) -> Result<Gauge, MetricsError> {
        self.add(name, Gauge::with_opts(Opts::new(name, help)))
    }

    fn add<C>(&self, name: &str, made: prometheus::Result<C>) -> Result<C, MetricsError>
    where
        C: Collector + Clone + 'static,
    {
        let failed = |source| MetricsError::Register {
            name: name.to_owned(),
            source,
        };
        let collector = made.map_err(failed)?;
        self.0
            .register(Box::new(collector.clone()))
            .map_err(failed)?;
        Ok(collector)
    }
}

#[cfg(test)]
mod tests;
