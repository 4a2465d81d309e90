//! What the pipeline tells the metrics and the dump about a classified flow: names of its
//! addresses, the pod it comes from, its path, verdict and NAT hops as bounded labels.

use crate::enrich::{Enricher, OwnerKind};
use crate::events::FlowEvent;
use crate::metrics::{FlowObservation, NatHop};
use crate::model::{Classification, Evidence, HopKind, HopMark, Verdict};
use crate::topology::{self, AddrClass, CniMode, OutboundType, Topology};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Pod and Service names of the flow's addresses, where the enrichment knows them.
pub(super) fn names(enricher: &Enricher, event: &FlowEvent) -> BTreeMap<IpAddr, String> {
    if !enricher.is_enabled() {
        return BTreeMap::new();
    }
    let translated = event.translated();
    [
        enricher.lookup(event.orig.src).map(|o| (event.orig.src, o)),
        enricher
            .lookup_port(event.orig.dst, event.proto, event.orig.dport)
            .map(|o| (event.orig.dst, o)),
        enricher.lookup(translated.dst).map(|o| (translated.dst, o)),
    ]
    .into_iter()
    .flatten()
    .map(|(ip, owner)| (ip, owner.to_string()))
    .collect()
}

/// The pod a connection comes from, for the metrics: `namespace/name` where the enrichment knows
/// it, else its address when the topology says the source is a pod (a pod CIDR, a listed local
/// pod, or it entered through a pod interface), else `None`. Addresses of hosts outside the
/// cluster never become labels.
pub(super) fn source_pod(
    enricher: &Enricher,
    topology: Option<&Topology>,
    src: IpAddr,
    in_iface: Option<&str>,
) -> Option<String> {
    if let Some(owner) = enricher
        .lookup(src)
        .filter(|owner| owner.kind == OwnerKind::Pod)
    {
        return Some(owner.to_string());
    }
    let pod_side = in_iface.is_some_and(topology::is_pod_interface);
    (topology?.class_of(src, pod_side) == AddrClass::Pod).then(|| src.to_string())
}

/// The metrics' view of a classified flow: its path, verdict and NAT hops.
pub(super) fn observation<'a>(
    event: &FlowEvent,
    class: &'a Classification,
    marks: &[HopMark],
    hops: &'a [NatHop],
    pod: Option<&'a str>,
) -> FlowObservation<'a> {
    FlowObservation {
        key: event.key(),
        translated: event.translated(),
        path: class.path.as_ref().map_or("unclassified", |p| p.0.as_str()),
        cni: class.cni.map_or("unknown", CniMode::as_str),
        verdict: verdict_label(class.verdict),
        deviation: deviation_class(class, marks),
        hops,
        pod,
    }
}

pub(super) fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Conforms => "conforms",
        Verdict::Deviates => "deviates",
        Verdict::Unclassified => "unclassified",
    }
}

/// The NAT hops the metrics count: those the node applied and, where the outbound type is the
/// load balancer, its inferred SNAT (a NAT gateway or firewall does not use the LB's ports).
pub(super) fn nat_hops(marks: &[HopMark], outbound: OutboundType) -> Vec<NatHop> {
    marks
        .iter()
        .filter(|hop| hop.evidence != Evidence::ExpectedNotSeen)
        .filter_map(|hop| match hop.kind {
            HopKind::NodeDnat => Some(NatHop::KubeProxyDnat),
            HopKind::NodeSnat => Some(NatHop::NodeSnat),
            HopKind::OutboundSnat if outbound == OutboundType::LoadBalancer => {
                Some(NatHop::LbSnatInferred)
            }
            HopKind::OutboundSnat
                if matches!(
                    outbound,
                    OutboundType::ManagedNatGateway | OutboundType::UserAssignedNatGateway
                ) =>
            {
                Some(NatHop::NatGatewaySnatInferred)
            }
            _ => None,
        })
        .collect()
}

/// A short, bounded label for why a flow deviates: which node NAT was unexpected or missing.
pub(super) fn deviation_class(class: &Classification, marks: &[HopMark]) -> Option<&'static str> {
    if class.verdict != Verdict::Deviates {
        return None;
    }
    let class_of = |hop: &HopMark| match (hop.kind, hop.evidence, hop.in_model) {
        (HopKind::NodeSnat, Evidence::ExpectedNotSeen, _) => Some("missing-node-snat"),
        (HopKind::NodeDnat, Evidence::ExpectedNotSeen, _) => Some("missing-node-dnat"),
        (HopKind::NodeSnat, _, false) => Some("unexpected-node-snat"),
        (HopKind::NodeDnat, _, false) => Some("unexpected-node-dnat"),
        _ => None,
    };
    Some(marks.iter().find_map(class_of).unwrap_or("other"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Classifier, Model};
    use crate::topology::TopologyLayer;

    fn topology(config: &str) -> Topology {
        Topology::from_layers([toml::from_str::<TopologyLayer>(config).unwrap()]).unwrap()
    }

    const BASE: &str = "node_ips = [\"10.224.0.4\"]\nvnet_cidrs = [\"10.224.0.0/12\"]\nservice_cidr = \"10.0.0.0/16\"\n";

    #[test]
    fn the_outbound_type_decides_whose_snat_ports_a_flow_holds() {
        let cni = CniMode::Kubenet;
        let classifier = Classifier::new(
            Model::load_builtin(cni).unwrap(),
            crate::model::tests::lab_topology(cni),
        )
        .unwrap();
        let event = crate::model::tests::flow(
            crate::events::Proto::Tcp,
            "10.244.0.10:40000",
            "198.51.100.20:80",
            "10.224.0.4:40000",
            "198.51.100.20:80",
        );
        let class = classifier.classify(&event);
        let outbound = |t| {
            nat_hops(&class.hop_marks(), t)
                .into_iter()
                .filter(|hop| *hop != NatHop::NodeSnat)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            outbound(OutboundType::LoadBalancer),
            [NatHop::LbSnatInferred]
        );
        assert_eq!(
            outbound(OutboundType::ManagedNatGateway),
            [NatHop::NatGatewaySnatInferred]
        );
        assert_eq!(
            outbound(OutboundType::UserAssignedNatGateway),
            [NatHop::NatGatewaySnatInferred]
        );
        assert_eq!(outbound(OutboundType::UserDefinedRouting), []);
    }

    #[test]
    fn an_unnamed_pod_is_labelled_by_its_address_and_other_sources_not_at_all() {
        let kubenet = topology(&format!(
            "cni = \"kubenet\"\npod_cidr = \"10.244.0.0/16\"\n{BASE}"
        ));
        let unnamed = Enricher::disabled();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let pod = |t: &Topology, src: &str, iface| source_pod(&unnamed, Some(t), ip(src), iface);
        assert_eq!(
            pod(&kubenet, "10.244.0.10", None),
            Some("10.244.0.10".into())
        );
        assert_eq!(
            pod(&kubenet, "203.0.113.10", None),
            None,
            "an internet client"
        );
        assert_eq!(pod(&kubenet, "10.224.0.4", None), None, "the node itself");
        // azure-cni pods hold vnet addresses: only their interface tells them from a VM.
        let azure = topology(&format!("cni = \"azure-cni\"\n{BASE}"));
        assert_eq!(pod(&azure, "10.224.0.10", None), None);
        assert_eq!(
            pod(&azure, "10.224.0.10", Some("azv1a2b3c4d5e6")),
            Some("10.224.0.10".into())
        );
    }
}
