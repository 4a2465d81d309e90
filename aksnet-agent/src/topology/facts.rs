//! Each topology fact with where it came from, and what the classifier lacks.
//!
//! Layers arrive lowest precedence first, each tagged with its [`Source`]; a fact's source is
//! the highest layer that sets it. The merged layer is what [`Topology`](super::Topology) is built
//! from; [`Facts::missing`] names what the classifier needs and nobody gave, with the flag and the
//! config key that give it.

use super::{CniMode, TopologyLayer};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// Where a fact came from, lowest precedence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// AKS's documented default.
    Default,
    /// The node's interfaces, addresses and routes.
    Interfaces,
    /// kube-proxy's and ip-masq-agent's rules (`iptables-save`).
    Iptables,
    /// The Azure Instance Metadata Service.
    Imds,
    /// The Kubernetes API.
    Api,
    /// The `--config` file.
    Config,
    /// A command-line flag.
    Flag,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::Interfaces => "interfaces",
            Source::Iptables => "iptables",
            Source::Imds => "imds",
            Source::Api => "api",
            Source::Config => "config",
            Source::Flag => "flag",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fact the classifier needs, and the flag that gives it (the config key is the fact's name).
struct Needed {
    fact: &'static str,
    flag: &'static str,
    /// Whether the network mode needs it (`None`: the mode is unknown).
    when: fn(Option<CniMode>) -> bool,
}

fn always(_: Option<CniMode>) -> bool {
    true
}

/// kubenet and Overlay pods hold addresses of a pod CIDR of their own; azure-cni pods hold vnet
/// addresses.
fn pod_cidr_mode(cni: Option<CniMode>) -> bool {
    cni != Some(CniMode::AzureCni)
}

const NEEDED: &[Needed] = &[
    Needed {
        fact: "cni",
        flag: "--cni",
        when: always,
    },
    Needed {
        fact: "node_ips",
        flag: "--node-ip",
        when: always,
    },
    Needed {
        fact: "node_subnet",
        flag: "--node-subnet",
        when: always,
    },
    Needed {
        fact: "vnet_cidrs",
        flag: "--vnet-cidr",
        when: always,
    },
    Needed {
        fact: "service_cidr",
        flag: "--service-cidr",
        when: always,
    },
    Needed {
        fact: "pod_cidr",
        flag: "--pod-cidr",
        when: pod_cidr_mode,
    },
    Needed {
        fact: "api_server",
        flag: "--api-server",
        when: always,
    },
];

/// A fact the classifier needs that no source gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MissingFact {
    pub fact: &'static str,
    pub flag: &'static str,
}

impl fmt::Display for MissingFact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` (give it with {} or `{}` in the config)",
            self.fact, self.flag, self.fact
        )
    }
}

/// One line of `aksnet-agent topology`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FactEntry {
    pub fact: String,
    pub value: String,
    pub source: Source,
}

/// The merged layer and each fact's source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    pub layer: TopologyLayer,
    sources: BTreeMap<String, Source>,
}

impl Facts {
    /// Merges `layers`, given lowest precedence first, over AKS's defaults.
    pub fn merge(layers: impl IntoIterator<Item = (Source, TopologyLayer)>) -> Facts {
        let defaults = std::iter::once((Source::Default, TopologyLayer::defaults()));
        let mut facts = Facts::default();
        for (source, layer) in defaults.chain(layers) {
            for (fact, _) in set_values(&layer) {
                facts.sources.insert(fact, source);
            }
            facts.layer = layer.over(std::mem::take(&mut facts.layer));
        }
        facts
    }

    /// Where `fact` came from, if anything set it.
    pub fn source(&self, fact: &str) -> Option<Source> {
        self.sources.get(fact).copied()
    }

    /// What the classifier needs for this network mode and no source gave.
    pub fn missing(&self) -> Vec<MissingFact> {
        NEEDED
            .iter()
            .filter(|n| (n.when)(self.layer.cni) && self.source(n.fact).is_none())
            .map(|n| MissingFact {
                fact: n.fact,
                flag: n.flag,
            })
            .collect()
    }

    /// Every fact that is set, its value in short and its source, in name order.
    pub fn entries(&self) -> Vec<FactEntry> {
        let mut entries: Vec<FactEntry> = set_values(&self.layer)
            .into_iter()
            .filter_map(|(fact, value)| {
                let source = self.source(&fact)?;
                Some(FactEntry {
                    value: short(&value),
                    fact,
                    source,
                })
            })
            .collect();
        entries.sort_by(|a, b| a.fact.cmp(&b.fact));
        entries
    }
}

/// The flags that give the facts the classifier needs (the CLI must have each).
pub fn needed_flags() -> impl Iterator<Item = &'static str> {
    NEEDED.iter().map(|n| n.flag)
}

/// The facts a layer sets (not `None`, not an empty list), by name, with their values.
fn set_values(layer: &TopologyLayer) -> Vec<(String, Value)> {
    let Ok(Value::Object(map)) = serde_json::to_value(layer) else {
        return Vec::new();
    };
    map.into_iter()
        .filter(|(_, v)| match v {
            Value::Null => false,
            Value::Array(items) => !items.is_empty(),
            _ => true,
        })
        .collect()
}

/// Items of a list shown before "… (N in all)".
const SHOWN: usize = 8;

/// A value in a few words: scalars as they are, lists of addresses joined, lists of objects by
/// their `ip` or `name`.
fn short(value: &Value) -> String {
    let one = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => match (o.get("ip"), o.get("name"), o.get("service")) {
            (Some(Value::String(ip)), _, Some(Value::String(svc))) => format!("{ip} ({svc})"),
            (Some(Value::String(ip)), _, _) => ip.clone(),
            (_, Some(Value::String(name)), _) => name.clone(),
            _ => v.to_string(),
        },
        other => other.to_string(),
    };
    match value {
        Value::Array(items) => {
            let mut words: Vec<String> = items.iter().take(SHOWN).map(one).collect();
            if items.len() > SHOWN {
                words.push(format!("… ({} in all)", items.len()));
            }
            words.join(", ")
        }
        other => one(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Cidr;

    fn cidrs(s: &[&str]) -> Option<Vec<Cidr>> {
        Some(s.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn each_fact_names_the_highest_source_that_set_it() {
        let interfaces = TopologyLayer {
            cni: Some(CniMode::Kubenet),
            node_ips: Some(vec!["10.224.0.4".parse().unwrap()]),
            ..Default::default()
        };
        let iptables = TopologyLayer {
            pod_cidr: cidrs(&["10.244.0.0/16"]),
            // An empty list says nothing.
            service_cidr: Some(vec![]),
            ..Default::default()
        };
        let flags = TopologyLayer {
            node_ips: Some(vec!["10.224.0.5".parse().unwrap()]),
            vnet_cidrs: cidrs(&["10.224.0.0/12"]),
            ..Default::default()
        };
        let facts = Facts::merge([
            (Source::Interfaces, interfaces),
            (Source::Iptables, iptables),
            (Source::Flag, flags),
        ]);
        let entries: Vec<(String, String, Source)> = facts
            .entries()
            .into_iter()
            .map(|e| (e.fact, e.value, e.source))
            .collect();
        let want = |f: &str, v: &str, s| (f.to_string(), v.to_string(), s);
        assert_eq!(
            entries,
            vec![
                want("cni", "kubenet", Source::Interfaces),
                want("dataplane", "iptables", Source::Default),
                want("health_probe_sources", "168.63.129.16", Source::Default),
                want("node_ips", "10.224.0.5", Source::Flag),
                want("outbound_type", "loadBalancer", Source::Default),
                want("pod_cidr", "10.244.0.0/16", Source::Iptables),
                want("vnet_cidrs", "10.224.0.0/12", Source::Flag),
            ]
        );
        let missing: Vec<String> = facts.missing().iter().map(|m| m.to_string()).collect();
        assert_eq!(
            missing,
            vec![
                "`node_subnet` (give it with --node-subnet or `node_subnet` in the config)",
                "`service_cidr` (give it with --service-cidr or `service_cidr` in the config)",
                "`api_server` (give it with --api-server or `api_server` in the config)",
            ]
        );
    }

    #[test]
    fn the_pod_cidr_is_needed_except_on_azure_cni() {
        let needs_pod_cidr = |cni| {
            let layer = TopologyLayer {
                cni,
                ..Default::default()
            };
            Facts::merge([(Source::Flag, layer)])
                .missing()
                .iter()
                .any(|m| m.fact == "pod_cidr")
        };
        assert!(needs_pod_cidr(Some(CniMode::Kubenet)));
        assert!(needs_pod_cidr(Some(CniMode::AzureCniOverlay)));
        assert!(needs_pod_cidr(None));
        assert!(!needs_pod_cidr(Some(CniMode::AzureCni)));
    }

    #[test]
    fn long_lists_are_shortened() {
        let ips: Vec<Value> = (1..=10)
            .map(|i| Value::String(format!("10.0.0.{i}")))
            .collect();
        let text = short(&Value::Array(ips));
        assert!(text.starts_with("10.0.0.1, 10.0.0.2,"), "{text}");
        assert!(text.ends_with("10.0.0.8, … (10 in all)"), "{text}");
    }
}
