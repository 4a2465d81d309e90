//! The agent's topology config for this lab (format: notes/lab-plan.md; parsed by the classifier).

use crate::lab::topology::{plan, Cni, Topology};
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
    service_cidr: &'static str,
    appgw_subnets: Vec<&'static str>,
    agc_subnets: Vec<&'static str>,
    private_endpoints: Vec<String>,
    health_probe_sources: Vec<String>,
    lb_outbound_ips: Vec<String>,
    lb_frontends: Vec<LbFrontend>,
}

pub fn render(topo: &Topology) -> String {
    let config = AgentConfig {
        cni: topo.cni.as_str(),
        node_name: plan::NODE_NAME,
        node_ips: vec![plan::NODE_IP.to_string()],
        vnet_cidrs: vec![plan::VNET_CIDR],
        node_subnet: plan::NODE_SUBNET,
        pod_cidr: (topo.cni == Cni::Kubenet).then_some(plan::CLUSTER_POD_CIDR),
        service_cidr: plan::SERVICE_CIDR,
        appgw_subnets: vec![plan::APPGW_SUBNET],
        agc_subnets: vec![],
        private_endpoints: vec![plan::PE_IP.to_string()],
        health_probe_sources: vec![topo.lb.probe_source.to_string()],
        lb_outbound_ips: vec![topo.lb.outbound_ip.to_string()],
        lb_frontends: topo
            .lb
            .frontends
            .iter()
            .map(|ip| {
                let svc = topo
                    .services
                    .iter()
                    .find(|s| s.lb_ip == Some(*ip))
                    .expect("every LB frontend belongs to a Service of the topology");
                LbFrontend {
                    ip: ip.to_string(),
                    service: svc.namespaced_name(),
                    external_traffic_policy: svc.external_traffic_policy.as_str(),
                }
            })
            .collect(),
    };
    toml::to_string(&config).expect("the agent config is plain strings and lists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_plan_keys() {
        let text = render(&Topology::new(Cni::Kubenet));
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
        let azure: toml::Value = toml::from_str(&render(&Topology::new(Cni::AzureCni))).unwrap();
        assert!(azure.get("pod_cidr").is_none());
    }
}
