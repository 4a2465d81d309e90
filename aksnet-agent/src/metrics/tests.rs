//! The metrics' unit tests: what each observation does to the exported series.

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
    let (by_ip, t_by_ip) = pod_conn(41000, 51000, "198.51.100.7", 443);
    m.observe_new(&observation(by_ip, t_by_ip, &OUT, Some("10.244.0.5")));
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
    m.observe_end(&by_ip, &t_by_ip);
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

    m.observe_end(&k1, &t1);
    m.observe_end(&k3, &t3);
    let s = scrape(&m);
    assert_eq!(value(&s, conns, &web_a), Some(1.0));
    assert_eq!(value(&s, conns, &unknown_pod), None, "ended series go away");
    assert_eq!(value(&s, pressure, &[]), Some(1.0 / 8.0));
    m.observe_end(&k2, &t2);
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
    m.observe_end(&ended, &t);
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
fn a_changed_translation_is_followed_to_the_end() {
    let m = metrics(20);
    let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
    m.observe_new(&observation(k, t, &OUT, Some("web/a")));
    let moved = Tuple { sport: 50001, ..t };
    m.observe_nat_change(&k, &t, &moved);
    let s = scrape(&m);
    let conns = "aksnet_snat_connections";
    assert_eq!(series(&s, conns), 1);
    m.observe_end(&k, &moved);
    let s = scrape(&m);
    assert_eq!(
        series(&s, conns),
        0,
        "its end found it under the new translation"
    );
    assert_eq!(series(&s, "aksnet_lb_snat_destination_flows"), 0);
}

#[test]
fn ended_flows_hold_ports_against_the_allocation_until_the_idle_timeout() {
    let m = metrics(20);
    let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
    let (k2, t2) = pod_conn(40001, 50001, "198.51.100.7", 443);
    m.observe_new(&observation(k1, t1, &OUT, Some("web/a")));
    m.observe_new(&observation(k2, t2, &OUT, Some("web/a")));
    m.observe_end(&k1, &t1);
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
    no_hold.observe_end(&k1, &t1);
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
