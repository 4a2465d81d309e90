//! What the index keeps of a Pod or a Service: its name and its addresses, nothing else, so the
//! full objects are dropped as soon as they arrive.

use super::index::{Owner, OwnerKind, Record};
use crate::events::Proto;
use crate::topology::Etp;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use std::net::IpAddr;

/// A watched resource the index understands.
pub trait Indexed: kube::Resource + Sized {
    const KIND: OwnerKind;

    /// The object's addresses; empty when it has none the agent can attribute to it.
    fn record(&self) -> Record;

    fn owner(&self) -> Owner {
        Owner {
            kind: Self::KIND,
            namespace: self.namespace().unwrap_or_default().into(),
            name: self.name_any().into(),
        }
    }
}

impl Indexed for Pod {
    const KIND: OwnerKind = OwnerKind::Pod;

    fn record(&self) -> Record {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        // hostNetwork pods report the node's IP: naming the node's address after one of them
        // (kube-proxy, this agent...) would mislabel every flow of the node itself.
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        // A finished pod keeps its podIP in status, but the address is free for the next pod.
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if host_network || finished {
            return Record::Pod { ips: Vec::new() };
        }
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str());
        let single = status.and_then(|s| s.pod_ip.as_deref());
        Record::Pod {
            ips: parse_unique(listed.chain(single)),
        }
    }
}

impl Indexed for Service {
    const KIND: OwnerKind = OwnerKind::Service;

    fn record(&self) -> Record {
        let spec = self.spec.as_ref();
        let cluster_ips = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .into_iter()
            .flatten()
            .map(String::as_str)
            .chain(spec.and_then(|s| s.cluster_ip.as_deref()));
        let lb_ingress = self
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref());
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Proto::Tcp,
                    "UDP" => Proto::Udp,
                    "SCTP" => Proto::Sctp,
                    _ => return None,
                };
                Some((proto, u16::try_from(p.port).ok()?))
            })
            .collect();
        // The API server defaults the field to Cluster for services that have one.
        let external_traffic_policy = match spec.and_then(|s| s.external_traffic_policy.as_deref())
        {
            Some("Local") => Etp::Local,
            _ => Etp::Cluster,
        };
        Record::Service {
            // Headless services have clusterIP "None", which does not parse and is skipped.
            cluster_ips: parse_unique(cluster_ips),
            lb_ingress: parse_unique(lb_ingress),
            ports,
            external_traffic_policy,
        }
    }
}

/// Parses addresses, skipping what is not one and keeping the first occurrence of each.
fn parse_unique<'a>(addrs: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in addrs.filter_map(|a| a.parse().ok()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pod_ips_of_both_families_are_kept_once() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "app-7d4b9c-x2x9z", "namespace": "default"},
            "status": {"phase": "Running", "podIP": "10.244.0.10",
                       "podIPs": [{"ip": "10.244.0.10"}, {"ip": "fd00:10:244::a"}]}
        }));
        let ips = vec![
            "10.244.0.10".parse().unwrap(),
            "fd00:10:244::a".parse().unwrap(),
        ];
        assert_eq!(p.record(), Record::Pod { ips });
        assert_eq!(p.owner().to_string(), "default/app-7d4b9c-x2x9z");
    }

    #[test]
    fn host_network_and_finished_pods_own_no_address() {
        for (spec, phase) in [
            (
                serde_json::json!({"hostNetwork": true, "containers": []}),
                "Running",
            ),
            (serde_json::json!({"containers": []}), "Succeeded"),
        ] {
            let p = pod(serde_json::json!({
                "metadata": {"name": "p", "namespace": "kube-system"},
                "spec": spec,
                "status": {"phase": phase, "podIP": "10.224.0.4"}
            }));
            assert_eq!(p.record(), Record::Pod { ips: vec![] });
        }
    }

    #[test]
    fn headless_service_has_no_cluster_ip_and_protocol_defaults_to_tcp() {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
        }))
        .unwrap();
        assert_eq!(
            s.record(),
            Record::Service {
                cluster_ips: vec![],
                lb_ingress: vec![],
                ports: vec![(Proto::Tcp, 5432)],
                external_traffic_policy: Etp::Cluster,
            }
        );
    }
}
