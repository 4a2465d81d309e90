//! The agent's topology config for each lab node (the keys of the agent's `TopologyLayer`).

use crate::lab::layout::{node_facts, plan, Host, Layout};
use serde::Serialize;

#[derive(Serialize)]
struct LbFrontend {
    ip: String,
    service: String,
    external_traffic_policy: &'static str,
}

#[derive(Serialize)]
struct AgentConfig {
    cni: &'static str,
    node_name: &'static str,
    node_ips: Vec<String>,
    vnet_cidrs: Vec<&'static str>,
    node_subnet: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_cidr: Option<&'static str>,
    /// kubenet / Overlay: this node's share of the pod CIDR (its other addresses are pods on
    /// other nodes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    node_pod_cidrs: Vec<&'static str>,
    service_cidr: &'static str,
    appgw_subnets: Vec<&'static str>,
    agc_subnets: Vec<&'static str>,
    private_endpoints: Vec<String>,
    health_probe_sources: Vec<String>,
    lb_outbound_ips: Vec<String>,
    lb_frontends: Vec<LbFrontend>,
    /// The endpoints of `default/kubernetes`.
    api_server: Vec<String>,
    /// Peered vnets and on-premises ranges: private, routed without the LB.
    private_ranges: Vec<&'static str>,
}

/// The config of the agent on the first node.
pub fn render(layout: &Layout) -> String {
    render_on(layout, Host::Node)
}

/// The config of the agent on `node`.
pub fn render_on(layout: &Layout, node: Host) -> String {
    let facts = node_facts(node);
    let pod_cidr = (!layout.cni.pods_in_vnet()).then_some(plan::CLUSTER_POD_CIDR);
    let config = AgentConfig {
        cni: layout.cni.as_str(),
        node_name: facts.name,
        node_ips: vec![facts.ip.to_string()],
        vnet_cidrs: vec![plan::VNET_CIDR],
        node_subnet: plan::NODE_SUBNET,
        pod_cidr,
        node_pod_cidrs: pod_cidr.map(|_| facts.pod_cidr).into_iter().collect(),
        service_cidr: plan::SERVICE_CIDR,
        appgw_subnets: vec![plan::APPGW_SUBNET],
        agc_subnets: vec![plan::AGC_SUBNET],
        private_endpoints: vec![plan::PE_IP.to_string()],
        health_probe_sources: vec![layout.lb.probe_source.to_string()],
        lb_outbound_ips: vec![layout.lb.outbound_ip.to_string()],
        lb_frontends: layout
            .lb
            .frontends
            .iter()
            .map(|ip| {
                let svc = layout
                    .services
                    .iter()
                    .find(|s| s.lb_ip == Some(*ip))
                    .expect("every LB frontend belongs to a Service of the layout");
                LbFrontend {
                    ip: ip.to_string(),
                    service: svc.namespaced_name(),
                    external_traffic_policy: svc.external_traffic_policy.as_str(),
                }
            })
            .collect(),
        api_server: vec![layout.api_server.ip().to_string()],
        private_ranges: vec![plan::ON_PREMISES_CIDR],
    };
    toml::to_string(&config).expect("the agent config is plain strings and lists")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::layout::{ApiServerAccess, CniMode};

    #[test]
    fn renders_the_plan_keys() {
        let text = render(&Layout::new(CniMode::Kubenet));
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["cni"].as_str(), Some("kubenet"));
        assert_eq!(value["pod_cidr"].as_str(), Some("10.244.0.0/16"));
        let frontends = value["lb_frontends"].as_array().unwrap();
        assert_eq!(
            frontends[1]["service"].as_str(),
            Some("ingress-nginx/ingress-nginx-controller")
        );
        assert_eq!(
            frontends[1]["external_traffic_policy"].as_str(),
            Some("Local")
        );
        assert_eq!(value["node_pod_cidrs"][0].as_str(), Some("10.244.0.0/24"));
        assert_eq!(value["api_server"][0].as_str(), Some("198.51.100.40"));
        let azure: toml::Value = toml::from_str(&render(&Layout::new(CniMode::AzureCni))).unwrap();
        assert!(azure.get("pod_cidr").is_none());
        assert!(azure.get("node_pod_cidrs").is_none());
        let overlay = Layout::with_api_server(CniMode::AzureCniOverlay, ApiServerAccess::Private);
        let node2: toml::Value = toml::from_str(&render_on(&overlay, Host::Node2)).unwrap();
        assert_eq!(node2["node_ips"][0].as_str(), Some("10.224.0.5"));
        assert_eq!(node2["node_pod_cidrs"][0].as_str(), Some("10.244.1.0/24"));
        assert_eq!(node2["pod_cidr"].as_str(), Some("10.244.0.0/16"));
        assert_eq!(node2["api_server"][0].as_str(), Some("10.229.0.4"));
    }
}
