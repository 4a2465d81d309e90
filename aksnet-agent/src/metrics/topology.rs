//! The topology as metrics: which facts are known and from which source, which ones the
//! classifier lacks, and which conditions blind the agent. Labels come from fixed sets (fact
//! names, sources, conditions).

use super::{Metrics, MetricsError, Registrar};
use crate::topology::{Blindness, FactEntry, MissingFact};
use prometheus::core::Collector;
use prometheus::IntGaugeVec;

pub(super) struct TopologyGauges {
    info: IntGaugeVec,
    missing: IntGaugeVec,
    blind: IntGaugeVec,
}

impl TopologyGauges {
    pub(super) fn register(reg: &Registrar<'_>) -> Result<TopologyGauges, MetricsError> {
        Ok(TopologyGauges {
            info: reg.int_gauge_vec(
                "aksnet_topology_fact_info",
                "Topology facts the agent knows (value 1), by fact and the source that gave it: \
                 flag, config, api, imds, iptables, interfaces or default.",
                &["fact", "source"],
            )?,
            missing: reg.int_gauge_vec(
                "aksnet_topology_fact_missing",
                "Topology facts the classifier needs and no source gave (value 1): flows that \
                 need them are unclassified until a flag, the config or discovery gives them.",
                &["fact"],
            )?,
            blind: reg.int_gauge_vec(
                "aksnet_topology_blinding_condition",
                "Conditions that hide NAT or Services from the agent (1 when present): \
                 cilium_dataplane, kube_proxy_ipvs, kube_proxy_nftables, conntrack_not_loaded.",
                &["condition"],
            )?,
        })
    }
}

impl Metrics {
    /// Replaces the topology metrics with the latest discovery's. The new series are set first
    /// and only then are the ones no longer present removed: a scrape in between sees the old
    /// facts or the new ones, never none.
    pub fn set_topology(&self, facts: &[FactEntry], missing: &[MissingFact], blind: &[Blindness]) {
        let t = &self.topology;
        let info: Vec<[&str; 2]> = facts
            .iter()
            .map(|f| [f.fact.as_str(), f.source.as_str()])
            .collect();
        replace(&t.info, &["fact", "source"], &info);
        let missing: Vec<[&str; 1]> = missing.iter().map(|m| [m.fact]).collect();
        replace(&t.missing, &["fact"], &missing);
        for b in Blindness::ALL {
            t.blind
                .with_label_values(&[b.label()])
                .set(i64::from(blind.contains(&b)));
        }
    }
}

/// Sets `present` (label values in the order of `names`) to 1, then removes every other series
/// of `gauges`.
fn replace<const N: usize>(gauges: &IntGaugeVec, names: &[&str; N], present: &[[&str; N]]) {
    for labels in present {
        gauges.with_label_values(labels).set(1);
    }
    let stale: Vec<[String; N]> = gauges
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| {
            names.map(|name| {
                metric
                    .get_label()
                    .iter()
                    .find(|pair| pair.name() == name)
                    .map(|pair| pair.value().to_owned())
                    .unwrap_or_default()
            })
        })
        .filter(|values| {
            !present
                .iter()
                .any(|p| p == &values.each_ref().map(String::as_str))
        })
        .collect();
    for values in &stale {
        let _ = gauges.remove_label_values(&values.each_ref().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use crate::metrics::{Metrics, MetricsConfig};
    use crate::topology::{Blindness, FactEntry, MissingFact, Source};

    #[test]
    fn facts_missing_facts_and_blind_spots_are_exported() {
        let metrics = Metrics::new(&MetricsConfig::default()).unwrap();
        let fact = |fact: &str, source| FactEntry {
            fact: fact.into(),
            value: String::new(),
            source,
        };
        metrics.set_topology(
            &[
                fact("cni", Source::Interfaces),
                fact("vnet_cidrs", Source::Flag),
            ],
            &[MissingFact {
                fact: "service_cidr",
                flag: "--service-cidr",
            }],
            &[Blindness::KubeProxyIpvs],
        );
        // A later discovery replaces, never accumulates.
        metrics.set_topology(
            &[
                fact("cni", Source::Config),
                fact("vnet_cidrs", Source::Flag),
            ],
            &[MissingFact {
                fact: "api_server",
                flag: "--api-server",
            }],
            &[Blindness::KubeProxyIpvs],
        );
        let text = metrics.render().unwrap();
        for line in [
            "aksnet_topology_fact_info{fact=\"cni\",source=\"config\"} 1",
            "aksnet_topology_fact_info{fact=\"vnet_cidrs\",source=\"flag\"} 1",
            "aksnet_topology_fact_missing{fact=\"api_server\"} 1",
            "aksnet_topology_blinding_condition{condition=\"kube_proxy_ipvs\"} 1",
            "aksnet_topology_blinding_condition{condition=\"cilium_dataplane\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("source=\"interfaces\""), "{text}");
        assert!(!text.contains("service_cidr"), "{text}");
    }
}
