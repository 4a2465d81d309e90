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
/// classified; report its end with [`Metrics::observe_end`] and the same key.
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
        let proto = flow.key.proto.to_string();
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
        if let Some(Opened::Conflict { stale }) = opened {
            self.snat_conflicts.inc();
            log::debug!(
                "SNAT tuple {} ({}) still held by {} ({}): its end was missed, dropped it",
                flow.translated,
                flow.key.proto,
                stale.orig,
                stale.proto
            );
        }
    }

    /// `pod` itself while the per-pod counters have room for it, else `other`.
    fn pod_label<'p>(&self, counted: &mut HashSet<String>, pod: &'p str) -> &'p str {
        bounded_label(counted, self.pod_series, pod)
    }

    /// A connection ended: it no longer holds a SNAT port on the node, and the outbound device
    /// keeps its port until the idle timeout.
    pub fn observe_end(&self, key: &FlowKey) {
        self.lock().snat.end(key, Instant::now());
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
mod tests {
    use super::*;
    use crate::capture::HookStatus;
    use crate::events::testing::{pod_conn, tuple};
    use crate::events::Proto;
    use std::collections::BTreeMap;

    /// One sample of the text exposition.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses the samples of a text exposition (label values here never hold quotes or commas).
    fn parse(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        let body = rest.strip_suffix('}').expect("labels end with }");
                        let labels = body
                            .split(',')
                            .filter(|pair| !pair.is_empty())
                            .map(|pair| {
                                let (k, v) = pair.split_once('=').expect("label has =");
                                (k.to_owned(), v.trim_matches('"').to_owned())
                            })
                            .collect();
                        (name, labels)
                    }
                    None => (series, BTreeMap::new()),
                };
                Sample {
                    name: name.to_owned(),
                    labels,
                    value: value.parse().expect("value is a number"),
                }
            })
            .collect()
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    fn series(samples: &[Sample], name: &str) -> usize {
        samples.iter().filter(|s| s.name == name).count()
    }

    const NODE_IP: &str = "10.224.0.4";
    const OUT: [NatHop; 2] = [NatHop::NodeSnat, NatHop::LbSnatInferred];

    fn observation<'a>(
        key: FlowKey,
        translated: Tuple,
        hops: &'a [NatHop],
        pod: Option<&'a str>,
    ) -> FlowObservation<'a> {
        FlowObservation {
            key,
            translated,
            path: "pod-to-internet",
            cni: "kubenet",
            verdict: "matches",
            deviation: None,
            hops,
            pod,
        }
    }

    fn metrics(top_destinations: usize) -> Metrics {
        Metrics::new(&MetricsConfig {
            allocated_outbound_ports: Some(8),
            top_destinations,
            ..MetricsConfig::default()
        })
        .unwrap()
    }

    fn scrape(metrics: &Metrics) -> Vec<Sample> {
        parse(&metrics.render().unwrap())
    }

    #[test]
    fn counts_flows_hops_and_deviations() {
        let m = metrics(20);
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        m.observe_new(&observation(k, t, &OUT, Some("web/a")));
        let inbound_key = FlowKey {
            orig: tuple("203.0.113.10", 40000, "192.0.2.10", 80),
            ..k
        };
        m.observe_new(&FlowObservation {
            path: "lb-to-pod",
            verdict: "deviates",
            deviation: Some("unexpected_snat"),
            ..observation(
                inbound_key,
                tuple("10.244.0.1", 61000, "10.244.0.7", 8080),
                &[NatHop::KubeProxyDnat, NatHop::NodeSnat],
                None,
            )
        });
        let direct_key = FlowKey {
            proto: Proto::Udp,
            orig: tuple("10.244.0.5", 53000, "10.244.0.9", 53),
            ..k
        };
        m.observe_new(&FlowObservation {
            path: "pod-to-pod",
            ..observation(direct_key, direct_key.orig, &[], None)
        });

        let s = scrape(&m);
        let flows = "aksnet_flows_observed_total";
        let labels = [("path", "pod-to-internet"), ("cni", "kubenet")];
        assert_eq!(value(&s, flows, &labels), Some(1.0));
        let labels = [("path", "lb-to-pod"), ("verdict", "deviates")];
        assert_eq!(value(&s, flows, &labels), Some(1.0));
        assert_eq!(series(&s, flows), 3);

        let hops = "aksnet_nat_translations_total";
        let node_snat = [("hop", "node_snat"), ("proto", "tcp")];
        assert_eq!(value(&s, hops, &node_snat), Some(2.0));
        let lb_snat = [("hop", "lb_snat_inferred"), ("proto", "tcp")];
        assert_eq!(value(&s, hops, &lb_snat), Some(1.0));
        let dnat = [("hop", "kube_proxy_dnat"), ("proto", "tcp")];
        assert_eq!(value(&s, hops, &dnat), Some(1.0));
        let none = [("hop", "none"), ("proto", "udp")];
        assert_eq!(value(&s, hops, &none), Some(1.0));

        let deviations = "aksnet_model_deviations_total";
        let labels = [("path", "lb-to-pod"), ("reason_class", "unexpected_snat")];
        assert_eq!(value(&s, deviations, &labels), Some(1.0));
        assert_eq!(series(&s, deviations), 1);
    }

    #[test]
    fn counts_snat_translations_per_path_pod_and_hop() {
        let m = metrics(20);
        for port in 0..3 {
            let (k, t) = pod_conn(40000 + port, 50000 + port, "198.51.100.7", 443);
            m.observe_new(&observation(k, t, &OUT, Some("default/app")));
        }
        let (by_ip, t) = pod_conn(41000, 51000, "198.51.100.7", 443);
        m.observe_new(&observation(by_ip, t, &OUT, Some("10.244.0.5")));
        // kubenet pod → vnet: the node's SNAT only.
        let (k, t) = pod_conn(42000, 52000, "10.225.0.4", 80);
        m.observe_new(&FlowObservation {
            path: "pod-to-vnet",
            ..observation(k, t, &[NatHop::NodeSnat], Some("default/app"))
        });
        // LB inbound with eTP Cluster: MASQUERADEd, but from an internet client, no pod.
        let (k, t) = pod_conn(43000, 53000, "10.244.0.7", 8080);
        m.observe_new(&FlowObservation {
            path: "lb-inbound",
            ..observation(k, t, &[NatHop::KubeProxyDnat, NatHop::NodeSnat], None)
        });
        // Not SNATed at all: not counted.
        let (k, t) = pod_conn(44000, 44000, "10.0.0.10", 53);
        m.observe_new(&FlowObservation {
            path: "pod-to-service",
            ..observation(k, t, &[NatHop::KubeProxyDnat], Some("default/app"))
        });

        let s = scrape(&m);
        let snat = "aksnet_snat_translations_total";
        let at = |path, pod, hop| value(&s, snat, &[("path", path), ("pod", pod), ("hop", hop)]);
        assert_eq!(at("pod-to-internet", "default/app", "node_snat"), Some(3.0));
        assert_eq!(
            at("pod-to-internet", "default/app", "lb_snat_inferred"),
            Some(3.0)
        );
        assert_eq!(at("pod-to-internet", "10.244.0.5", "node_snat"), Some(1.0));
        assert_eq!(at("pod-to-vnet", "default/app", "node_snat"), Some(1.0));
        assert_eq!(at("pod-to-vnet", "default/app", "lb_snat_inferred"), None);
        assert_eq!(at("lb-inbound", "", "node_snat"), Some(1.0));
        assert_eq!(series(&s, snat), 6);
        // A counter: the connection's end does not take it back.
        m.observe_end(&by_ip);
        let s = scrape(&m);
        let by_ip = [("pod", "10.244.0.5"), ("hop", "node_snat")];
        assert_eq!(value(&s, snat, &by_ip), Some(1.0));
    }

    #[test]
    fn pods_beyond_the_series_bound_count_as_other() {
        let mut m = metrics(20);
        m.pod_series = 2;
        let pods = [
            "default/a",
            "default/b",
            "default/c",
            "default/a",
            "default/d",
        ];
        for (i, pod) in (0u16..).zip(pods) {
            let (k, t) = pod_conn(40000 + i, 50000 + i, "198.51.100.7", 443);
            m.observe_new(&observation(k, t, &[NatHop::NodeSnat], Some(pod)));
        }
        let s = scrape(&m);
        let snat = "aksnet_snat_translations_total";
        let pod = |name| value(&s, snat, &[("pod", name)]);
        assert_eq!(pod("default/a"), Some(2.0), "a known pod keeps its series");
        assert_eq!(pod("default/b"), Some(1.0));
        assert_eq!(pod("default/c"), None);
        assert_eq!(pod("other"), Some(2.0));
        assert_eq!(series(&s, snat), 3);
    }

    #[test]
    fn snat_gauges_follow_live_connections() {
        // Ports held after close are another test's: here ended flows free theirs at once.
        let m = Metrics::new(&MetricsConfig {
            allocated_outbound_ports: Some(8),
            outbound_idle_timeout_minutes: 0,
            ..MetricsConfig::default()
        })
        .unwrap();
        let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (k2, t2) = pod_conn(40001, 50001, "198.51.100.7", 443);
        let (k3, t3) = pod_conn(40002, 50000, "203.0.113.9", 443);
        m.observe_new(&observation(k1, t1, &OUT, Some("web/a")));
        m.observe_new(&observation(k2, t2, &OUT, Some("web/a")));
        m.observe_new(&observation(k3, t3, &OUT, None));

        let s = scrape(&m);
        let to_7 = [("src_ip", NODE_IP), ("dst_ip", "198.51.100.7")];
        let conns = "aksnet_snat_connections";
        let web_a = [to_7[0], to_7[1], ("dst_port", "443"), ("pod", "web/a")];
        assert_eq!(value(&s, conns, &web_a), Some(2.0));
        let unknown_pod = [("dst_ip", "203.0.113.9"), ("pod", "")];
        assert_eq!(value(&s, conns, &unknown_pod), Some(1.0));
        assert_eq!(value(&s, "aksnet_snat_ports_in_use", &to_7), Some(2.0));
        let lb = "aksnet_lb_snat_destination_flows";
        let labels = [("dst_ip", "198.51.100.7"), ("proto", "tcp")];
        assert_eq!(value(&s, lb, &labels), Some(2.0));
        let pressure = "aksnet_lb_snat_port_pressure_ratio";
        assert_eq!(value(&s, pressure, &[]), Some(2.0 / 8.0));
        assert_eq!(value(&s, "aksnet_lb_snat_ports_allocated", &[]), Some(8.0));

        m.observe_end(&k1);
        m.observe_end(&k3);
        let s = scrape(&m);
        assert_eq!(value(&s, conns, &web_a), Some(1.0));
        assert_eq!(value(&s, conns, &unknown_pod), None, "ended series go away");
        assert_eq!(value(&s, pressure, &[]), Some(1.0 / 8.0));
        m.observe_end(&k2);
        let s = scrape(&m);
        assert_eq!(series(&s, conns), 0);
        assert_eq!(series(&s, lb), 0);
        assert_eq!(value(&s, pressure, &[]), Some(0.0));
    }

    #[test]
    fn dnat_only_and_node_only_snat_hold_no_lb_port() {
        let m = metrics(20);
        let (k, _) = pod_conn(40000, 50000, "10.0.0.10", 53);
        let dnat_only = tuple("10.244.0.5", 40000, "10.244.1.3", 53);
        m.observe_new(&observation(k, dnat_only, &[NatHop::KubeProxyDnat], None));
        let (k2, t2) = pod_conn(40001, 50001, "10.224.0.9", 443);
        m.observe_new(&observation(k2, t2, &[NatHop::NodeSnat], Some("web/a")));
        let s = scrape(&m);
        assert_eq!(series(&s, "aksnet_snat_connections"), 1);
        assert_eq!(series(&s, "aksnet_lb_snat_destination_flows"), 0);
        let pressure = "aksnet_lb_snat_port_pressure_ratio";
        assert_eq!(value(&s, pressure, &[]), Some(0.0));
    }

    #[test]
    fn destinations_beyond_top_n_fold_into_other() {
        let m = metrics(2);
        let destinations = [
            ("198.51.100.1", 3),
            ("198.51.100.2", 2),
            ("198.51.100.3", 1),
        ];
        let mut port = 50000;
        for (dst, flows) in destinations {
            for _ in 0..flows {
                let (k, t) = pod_conn(port - 10000, port, dst, 443);
                m.observe_new(&observation(k, t, &OUT, None));
                port += 1;
            }
        }
        let s = scrape(&m);
        let lb = "aksnet_lb_snat_destination_flows";
        assert_eq!(series(&s, lb), 3);
        assert_eq!(value(&s, lb, &[("dst_ip", "198.51.100.1")]), Some(3.0));
        assert_eq!(value(&s, lb, &[("dst_ip", "198.51.100.2")]), Some(2.0));
        let other = [
            ("dst_ip", "other"),
            ("dst_port", "other"),
            ("proto", "other"),
        ];
        assert_eq!(value(&s, lb, &other), Some(1.0));
        assert_eq!(series(&s, "aksnet_snat_connections"), 3);
        assert_eq!(series(&s, "aksnet_snat_ports_in_use"), 3);
        // Pressure looks at every destination, folded or not.
        let pressure = "aksnet_lb_snat_port_pressure_ratio";
        assert_eq!(value(&s, pressure, &[]), Some(3.0 / 8.0));
    }

    #[test]
    fn a_reused_live_snat_tuple_counts_a_conflict() {
        let m = metrics(20);
        let (old, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (new, _) = pod_conn(40001, 50000, "198.51.100.7", 443);
        let (elsewhere, t_elsewhere) = pod_conn(40002, 50000, "203.0.113.9", 443);
        m.observe_new(&observation(old, t, &OUT, None));
        m.observe_new(&observation(elsewhere, t_elsewhere, &OUT, None));
        let conflicts = "aksnet_snat_port_conflicts_total";
        assert_eq!(value(&scrape(&m), conflicts, &[]), Some(0.0));
        m.observe_new(&observation(new, t, &OUT, None));
        let s = scrape(&m);
        assert_eq!(value(&s, conflicts, &[]), Some(1.0));
        let lb = [("dst_ip", "198.51.100.7")];
        assert_eq!(
            value(&s, "aksnet_lb_snat_destination_flows", &lb),
            Some(1.0)
        );
    }

    #[test]
    fn capture_health_is_read_at_scrape_time() {
        let m = metrics(20);
        let s = scrape(&m);
        assert_eq!(value(&s, "aksnet_capture_events_total", &[]), Some(0.0));
        assert_eq!(series(&s, "aksnet_capture_source_info"), 0);

        let health = Arc::new(CaptureHealth::default());
        health.record_hook(HookStatus {
            name: "tp_btf/net_dev_start_xmit".into(),
            attached: true,
            detail: String::new(),
        });
        health.record_hook(HookStatus {
            name: "fentry/nf_ct_delete".into(),
            attached: false,
            detail: "EPERM".into(),
        });
        m.set_capture(health.clone(), SourceKind::Ebpf);
        for _ in 0..5 {
            health.count_event();
        }
        health.count_lost(3);
        health.count_recovered(1);
        health.decode_errors.fetch_add(2, Ordering::Relaxed);
        let s = scrape(&m);
        assert_eq!(value(&s, "aksnet_capture_events_total", &[]), Some(5.0));
        assert_eq!(
            value(&s, "aksnet_capture_events_lost_total", &[]),
            Some(3.0)
        );
        assert_eq!(
            value(&s, "aksnet_capture_events_recovered_total", &[]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "aksnet_capture_decode_errors_total", &[]),
            Some(2.0)
        );
        let source = "aksnet_capture_source_info";
        assert_eq!(value(&s, source, &[("source", "ebpf")]), Some(1.0));
        let hooks = "aksnet_capture_hook_attached";
        let xmit = [("hook", "tp_btf/net_dev_start_xmit")];
        assert_eq!(value(&s, hooks, &xmit), Some(1.0));
        let delete = [("hook", "fentry/nf_ct_delete")];
        assert_eq!(value(&s, hooks, &delete), Some(0.0));

        health.count_event();
        m.set_capture(health, SourceKind::Netlink);
        let s = scrape(&m);
        assert_eq!(value(&s, "aksnet_capture_events_total", &[]), Some(6.0));
        assert_eq!(series(&s, source), 1, "only the source in use");
        assert_eq!(value(&s, source, &[("source", "netlink")]), Some(1.0));
    }

    #[test]
    fn exposes_every_family_with_its_type_and_help() {
        let m = metrics(20);
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        m.observe_new(&FlowObservation {
            deviation: Some("missing_hop"),
            ..observation(k, t, &OUT, Some("web/a"))
        });
        let health = Arc::new(CaptureHealth::default());
        health.record_hook(HookStatus {
            name: "tp_btf/net_dev_start_xmit".into(),
            attached: true,
            detail: String::new(),
        });
        m.set_capture(health, SourceKind::Netlink);
        let (ended, t) = pod_conn(40001, 50001, "198.51.100.7", 443);
        m.observe_new(&observation(ended, t, &OUT, Some("web/a")));
        m.observe_end(&ended);
        m.observe_client_address_lost(Some("web/front"), "kube_proxy_masquerade");
        let text = m.render().unwrap();
        let types: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let expected: BTreeMap<&str, &str> = [
            ("aksnet_capture_decode_errors_total", "counter"),
            ("aksnet_capture_events_lost_total", "counter"),
            ("aksnet_capture_events_recovered_total", "counter"),
            ("aksnet_capture_events_total", "counter"),
            ("aksnet_capture_hook_attached", "gauge"),
            ("aksnet_capture_source_info", "gauge"),
            ("aksnet_client_address_lost_total", "counter"),
            ("aksnet_flows_observed_total", "counter"),
            ("aksnet_lb_snat_destination_flows", "gauge"),
            ("aksnet_lb_snat_destination_pod_flows", "gauge"),
            ("aksnet_lb_snat_exhaustion_forecast_seconds", "gauge"),
            ("aksnet_lb_snat_idle_timeout_seconds", "gauge"),
            ("aksnet_lb_snat_port_pressure_ratio", "gauge"),
            ("aksnet_lb_snat_ports_allocated", "gauge"),
            ("aksnet_lb_snat_ports_held_after_close", "gauge"),
            ("aksnet_model_deviations_total", "counter"),
            ("aksnet_nat_translations_total", "counter"),
            ("aksnet_snat_connections", "gauge"),
            ("aksnet_snat_port_conflicts_total", "counter"),
            ("aksnet_snat_ports_in_use", "gauge"),
            ("aksnet_snat_translations_total", "counter"),
        ]
        .into_iter()
        .collect();
        assert_eq!(types, expected);
        assert_eq!(
            expected.keys().copied().collect::<Vec<_>>(),
            FAMILIES
                .iter()
                .copied()
                .filter(|f| !f.starts_with("aksnet_conntrack_"))
                .collect::<Vec<_>>(),
            "FAMILIES lists every family"
        );
        for name in expected.keys() {
            let help = format!("# HELP {name} ");
            assert!(
                text.lines()
                    .any(|l| l.len() > help.len() + 10 && l.starts_with(&help)),
                "{name} has no help text"
            );
        }
    }

    /// Every metric family the agent can export, sorted: what the shipped alert rules and the
    /// dashboard may name.
    const FAMILIES: &[&str] = &[
        "aksnet_capture_decode_errors_total",
        "aksnet_capture_events_lost_total",
        "aksnet_capture_events_recovered_total",
        "aksnet_capture_events_total",
        "aksnet_capture_hook_attached",
        "aksnet_capture_source_info",
        "aksnet_client_address_lost_total",
        "aksnet_conntrack_clash_resolve_total",
        "aksnet_conntrack_drop_total",
        "aksnet_conntrack_early_drop_total",
        "aksnet_conntrack_entries",
        "aksnet_conntrack_entries_limit",
        "aksnet_conntrack_insert_failed_total",
        "aksnet_conntrack_invalid_total",
        "aksnet_flows_observed_total",
        "aksnet_lb_snat_destination_flows",
        "aksnet_lb_snat_destination_pod_flows",
        "aksnet_lb_snat_exhaustion_forecast_seconds",
        "aksnet_lb_snat_idle_timeout_seconds",
        "aksnet_lb_snat_port_pressure_ratio",
        "aksnet_lb_snat_ports_allocated",
        "aksnet_lb_snat_ports_held_after_close",
        "aksnet_model_deviations_total",
        "aksnet_nat_translations_total",
        "aksnet_snat_connections",
        "aksnet_snat_port_conflicts_total",
        "aksnet_snat_ports_in_use",
        "aksnet_snat_translations_total",
    ];

    const RULES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/components/monitoring/prometheusrule.yaml"
    );
    const DASHBOARD: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/components/monitoring/dashboard.json"
    );

    /// Every `aksnet_*` metric and `aksnet:*` recorded series an expression names.
    fn names_in(expr: &str) -> Vec<&str> {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(start) = rest.find("aksnet") {
            let before = expr.len() - rest.len() + start;
            let word = &rest[start..];
            let end = word.find(|c| !ident(c)).unwrap_or(word.len());
            let preceded = expr[..before].chars().next_back().is_some_and(ident);
            if !preceded {
                names.push(&word[..end]);
            }
            rest = &word[end.max(1)..];
        }
        names
    }

    /// The rule file's expressions and recorded names: each expression is on its `expr:` line.
    fn rule_expressions(text: &str) -> (Vec<String>, Vec<String>) {
        let value = |line: &str, key: &str| {
            let v = line.trim().trim_start_matches("- ").strip_prefix(key)?;
            Some(v.trim().to_owned())
        };
        let exprs: Vec<String> = text.lines().filter_map(|l| value(l, "expr:")).collect();
        let records = text.lines().filter_map(|l| value(l, "record:")).collect();
        let rules = text
            .lines()
            .filter(|l| value(l, "record:").is_some() || value(l, "alert:").is_some())
            .count();
        assert_eq!(exprs.len(), rules, "one expr: line per rule");
        for expr in &exprs {
            assert!(
                !expr.starts_with(['|', '>', '"', '\'']),
                "keep expressions on their expr: line, unquoted: {expr}"
            );
        }
        (exprs, records)
    }

    #[test]
    fn shipped_rules_and_dashboard_name_only_exported_metrics() {
        let rules = std::fs::read_to_string(RULES).unwrap();
        let (exprs, records) = rule_expressions(&rules);
        assert!(exprs.len() >= 10, "{exprs:?}");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
        let mut queries = Vec::new();
        collect_queries(&dashboard, &mut queries);
        assert!(queries.len() >= 15, "{queries:?}");
        let mut named = HashSet::new();
        for expr in exprs.iter().chain(&queries) {
            let names = names_in(expr);
            assert!(!names.is_empty(), "{expr} names no aksnet metric");
            for name in names {
                let known = if name.contains(':') {
                    records.iter().any(|r| r == name)
                } else {
                    FAMILIES.contains(&name)
                };
                assert!(known, "{expr}: {name} is not a metric the agent exports");
                named.insert(name.to_owned());
            }
        }
        // The SNAT, conntrack and capture families the issue asks to alert on and show.
        for family in [
            "aksnet_lb_snat_exhaustion_forecast_seconds",
            "aksnet_lb_snat_port_pressure_ratio",
            "aksnet_lb_snat_destination_pod_flows",
            "aksnet_conntrack_entries",
            "aksnet_conntrack_insert_failed_total",
            "aksnet_model_deviations_total",
            "aksnet_capture_events_lost_total",
            "aksnet_capture_hook_attached",
        ] {
            assert!(named.contains(family), "nothing uses {family}");
        }
        assert_eq!(
            names_in("rate(aksnet_a_total[5m]) / aksnet:b:c + xaksnet_no"),
            vec!["aksnet_a_total", "aksnet:b:c"]
        );
    }

    /// Every `expr` and templating `query` string in a Grafana dashboard.
    fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query" | "definition", serde_json::Value::String(q))
                            if q.contains("aksnet") =>
                        {
                            out.push(q.clone())
                        }
                        _ => collect_queries(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    collect_queries(item, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn conntrack_families_appear_once_attached_with_the_kernel_values() {
        let registry = Registry::new();
        let families = ConntrackMetrics::register(&registry).unwrap();
        families.set(&conntrack::ConntrackStats {
            entries: 12,
            max: 262_144,
            insert_failed: 3,
            drop: 2,
            early_drop: 1,
            invalid: 7,
            clash_resolve: 4,
            ..conntrack::ConntrackStats::default()
        });
        let mut text = String::new();
        TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .unwrap();
        let s = parse(&text);
        let expected = [
            ("aksnet_conntrack_entries", 12.0),
            ("aksnet_conntrack_entries_limit", 262_144.0),
            ("aksnet_conntrack_insert_failed_total", 3.0),
            ("aksnet_conntrack_drop_total", 2.0),
            ("aksnet_conntrack_early_drop_total", 1.0),
            ("aksnet_conntrack_invalid_total", 7.0),
            ("aksnet_conntrack_clash_resolve_total", 4.0),
        ];
        for (name, v) in expected {
            assert_eq!(value(&s, name, &[]), Some(v), "{name}");
        }
        let names: Vec<&str> = FAMILIES
            .iter()
            .copied()
            .filter(|f| f.starts_with("aksnet_conntrack_"))
            .collect();
        assert_eq!(names.len(), expected.len());
        assert!(names.iter().all(|n| expected.iter().any(|(e, _)| e == n)));
    }

    #[test]
    fn the_top_destinations_name_their_top_pods_and_fold_the_rest() {
        let mut m = metrics(1);
        m.top_pods = 2;
        let mut port = 0u16;
        let mut open = |dst: &str, pod: Option<&str>, n: usize| {
            for _ in 0..n {
                let (k, t) = pod_conn(40000 + port, 50000 + port, dst, 443);
                m.observe_new(&observation(k, t, &OUT, pod));
                port += 1;
            }
        };
        open("198.51.100.7", Some("web/a"), 4);
        open("198.51.100.7", Some("web/b"), 3);
        open("198.51.100.7", Some("web/c"), 1);
        open("198.51.100.7", None, 1);
        open("203.0.113.9", Some("web/a"), 2);
        let s = scrape(&m);
        let g = "aksnet_lb_snat_destination_pod_flows";
        let at = |dst, pod| value(&s, g, &[("dst_ip", dst), ("pod", pod)]);
        assert_eq!(at("198.51.100.7", "web/a"), Some(4.0));
        assert_eq!(at("198.51.100.7", "web/b"), Some(3.0));
        assert_eq!(at("198.51.100.7", "other"), Some(2.0), "web/c and the node");
        assert_eq!(at("other", "other"), Some(2.0), "the folded destination");
        assert_eq!(series(&s, g), 4);
    }

    #[test]
    fn ended_flows_hold_ports_against_the_allocation_until_the_idle_timeout() {
        let m = metrics(20);
        let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (k2, t2) = pod_conn(40001, 50001, "198.51.100.7", 443);
        m.observe_new(&observation(k1, t1, &OUT, Some("web/a")));
        m.observe_new(&observation(k2, t2, &OUT, Some("web/a")));
        m.observe_end(&k1);
        let s = scrape(&m);
        let to_7 = [("dst_ip", "198.51.100.7"), ("dst_port", "443")];
        assert_eq!(
            value(&s, "aksnet_lb_snat_destination_flows", &to_7),
            Some(1.0)
        );
        let held = "aksnet_lb_snat_ports_held_after_close";
        assert_eq!(value(&s, held, &to_7), Some(1.0));
        let pressure = "aksnet_lb_snat_port_pressure_ratio";
        assert_eq!(value(&s, pressure, &[]), Some(2.0 / 8.0));
        let idle = "aksnet_lb_snat_idle_timeout_seconds";
        assert_eq!(value(&s, idle, &[]), Some(1800.0));

        let no_hold = Metrics::new(&MetricsConfig {
            allocated_outbound_ports: Some(8),
            outbound_idle_timeout_minutes: 0,
            ..MetricsConfig::default()
        })
        .unwrap();
        no_hold.observe_new(&observation(k1, t1, &OUT, None));
        no_hold.observe_end(&k1);
        let s = scrape(&no_hold);
        assert_eq!(series(&s, held), 0);
        assert_eq!(value(&s, pressure, &[]), Some(0.0));
    }

    #[test]
    fn nat_gateway_flows_hold_the_gateway_ports() {
        let m = Metrics::new(&MetricsConfig {
            outbound_type: crate::topology::OutboundType::ManagedNatGateway,
            ..MetricsConfig::default()
        })
        .unwrap();
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let hops = [NatHop::NodeSnat, NatHop::NatGatewaySnatInferred];
        m.observe_new(&observation(k, t, &hops, Some("web/a")));
        let s = scrape(&m);
        assert_eq!(
            value(&s, "aksnet_lb_snat_ports_allocated", &[]),
            Some(64_512.0)
        );
        let g = "aksnet_lb_snat_destination_pod_flows";
        assert_eq!(value(&s, g, &[("pod", "web/a")]), Some(1.0));
        let hop = [("hop", "nat_gateway_snat_inferred")];
        assert_eq!(value(&s, "aksnet_snat_translations_total", &hop), Some(1.0));
    }

    #[test]
    fn the_forecast_is_infinite_until_usage_grows_then_falls_as_ports_fill() {
        let m = metrics(20);
        let forecast = "aksnet_lb_snat_exhaustion_forecast_seconds";
        assert_eq!(value(&scrape(&m), forecast, &[]), Some(f64::INFINITY));
        let mut previous = f64::INFINITY;
        for i in 0..4u16 {
            let (k, t) = pod_conn(40000 + i, 50000 + i, "198.51.100.7", 443);
            m.observe_new(&observation(k, t, &OUT, None));
            // Scrapes closer than FORECAST_SPACING would replace each other.
            std::thread::sleep(FORECAST_SPACING + Duration::from_millis(20));
            let left = value(&scrape(&m), forecast, &[]).unwrap();
            if i > 0 {
                assert!(left < previous, "{left} after {previous}");
            }
            previous = left;
        }
        let (k, t) = pod_conn(41000, 51000, "198.51.100.7", 443);
        for i in 0..4u16 {
            let (k, t) = pod_conn(42000 + i, 52000 + i, "198.51.100.7", 443);
            m.observe_new(&observation(k, t, &OUT, None));
        }
        m.observe_new(&observation(k, t, &OUT, None));
        let s = scrape(&m);
        assert_eq!(value(&s, forecast, &[]), Some(0.0), "9 flows, 8 ports");
    }

    #[test]
    fn client_address_losses_are_counted_per_service_and_hop() {
        let m = metrics(20);
        for _ in 0..3 {
            m.observe_client_address_lost(Some("web/front"), "kube_proxy_masquerade");
        }
        m.observe_client_address_lost(None, "application_gateway");
        let s = scrape(&m);
        let lost = "aksnet_client_address_lost_total";
        let front = [("service", "web/front"), ("hop", "kube_proxy_masquerade")];
        assert_eq!(value(&s, lost, &front), Some(3.0));
        let appgw = [("service", ""), ("hop", "application_gateway")];
        assert_eq!(value(&s, lost, &appgw), Some(1.0));
        let mut used = HashSet::new();
        assert_eq!(bounded_label(&mut used, 1, "a"), "a");
        assert_eq!(bounded_label(&mut used, 1, "b"), OTHER);
        assert_eq!(bounded_label(&mut used, 1, "a"), "a");
    }

    #[test]
    fn invalid_configuration_is_refused() {
        let config = MetricsConfig {
            node_pool_size: 5000,
            ..MetricsConfig::default()
        };
        let err = Metrics::new(&config).err().expect("refused").to_string();
        assert!(err.contains("node_pool_size = 5000"), "{err}");
    }
}
