use super::*;
use crate::events::testing::tcp_event;
use crate::events::{EventKind, FlowEvent, Proto, SourceKind, Tuple};
use crate::topology::{
    tests::LAB_CONFIG, Dataplane, Etp, OutboundType, ServiceEndpoint, ServiceKind, ServicePort,
    Topology, TopologyLayer,
};
use std::net::{IpAddr, SocketAddr};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The lab's topology for `cni`, dual-stack, plus what discovery adds on the node (NodePorts,
/// the ingress pod's endpoint, cbr0's addresses, azure-cni's local pods).
pub(crate) fn lab_topology(cni: CniMode) -> Topology {
    Topology::from_layers(lab_layers(cni)).unwrap()
}

/// [`lab_topology`]'s layers, lowest precedence first: what discovery adds, the config file.
fn lab_layers(cni: CniMode) -> [TopologyLayer; 2] {
    let pods = if cni == CniMode::AzureCni {
        "10.224.0"
    } else {
        "10.244.0"
    };
    let mut config = LAB_CONFIG
        .replace("cni = \"kubenet\"", &format!("cni = \"{cni}\""))
        .replace(
            "node_ips = [\"10.224.0.4\"]",
            "node_ips = [\"10.224.0.4\", \"fd00:10:224::4\"]",
        )
        .replace(
            "vnet_cidrs = [\"10.224.0.0/12\"]",
            "vnet_cidrs = [\"10.224.0.0/12\", \"fd00:10:224::/48\"]",
        )
        .replace(
            "service_cidr = \"10.0.0.0/16\"",
            "service_cidr = [\"10.0.0.0/16\", \"fd00:10:96::/108\"]",
        )
        .replace("agc_subnets = []", "agc_subnets = [\"10.228.0.0/24\"]")
        .replace(
            "lb_outbound_ips = [\"192.0.2.100\"]",
            "lb_outbound_ips = [\"192.0.2.100\", \"2001:db8:f::100\"]",
        );
    config = if cni == CniMode::AzureCni {
        config.replace("pod_cidr = \"10.244.0.0/16\"", "")
    } else {
        config.replace(
            "pod_cidr = \"10.244.0.0/16\"",
            "pod_cidr = [\"10.244.0.0/16\", \"fd00:10:244::/56\"]",
        )
    };
    config = config.replace(
        "node_subnet = \"10.224.0.0/16\"",
        "node_subnet = [\"10.224.0.0/16\", \"fd00:10:224::/64\"]\n\
         api_server = [\"198.51.100.50\", \"10.229.0.4\"]\n\
         private_ranges = [\"172.16.0.0/16\"]",
    );
    if cni != CniMode::AzureCni {
        config = config.replace(
            "service_cidr",
            "node_pod_cidrs = [\"10.244.0.0/24\", \"fd00:10:244::/64\"]\nservice_cidr",
        );
    }
    config.push_str(
        "\n[[lb_frontends]]\nip = \"2001:db8:f::10\"\nservice = \"default/app\"\nexternal_traffic_policy = \"Cluster\"\n\
         \n[[lb_frontends]]\nip = \"192.0.2.12\"\nservice = \"default/web\"\nexternal_traffic_policy = \"Local\"\n\
         \n[[lb_frontends]]\nip = \"192.0.2.13\"\nservice = \"app-routing-system/nginx\"\nexternal_traffic_policy = \"Cluster\"\n",
    );
    let config: TopologyLayer =
        crate::topology::parse_toml(Path::new("lab.toml"), &config).unwrap();
    let node_port = |name: &str, port, etp| ServicePort {
        name: name.into(),
        kind: ServiceKind::NodePort,
        ip: None,
        proto: Tcp,
        port,
        etp: Some(etp),
    };
    let discovered = TopologyLayer {
        services: Some(vec![
            node_port("default/app:http", 30080, Etp::Cluster),
            node_port(
                "ingress-nginx/ingress-nginx-controller:http",
                31080,
                Etp::Local,
            ),
        ]),
        // The ingress controller has a pod here and one on another node.
        endpoints: Some(
            [format!("{pods}.12"), remote_pod(cni, 12)]
                .iter()
                .map(|addr| ServiceEndpoint {
                    name: "ingress-nginx/ingress-nginx-controller:http".into(),
                    ip: ip(addr),
                    port: 80,
                    proto: Tcp,
                })
                .collect(),
        ),
        bridge_gateways: (cni == CniMode::Kubenet)
            .then(|| vec![ip("10.244.0.1"), ip("fd00:10:244::1")]),
        local_pods: (cni == CniMode::AzureCni).then(|| {
            ["10", "11", "12"]
                .iter()
                .map(|p| ip(&format!("10.224.0.{p}")))
                .collect()
        }),
        ..Default::default()
    };
    [discovered, config]
}

/// A pod on another node: in the pod CIDR outside this node's /24 (kubenet, Overlay), another
/// secondary IP of the node subnet (flat azure-cni).
fn remote_pod(cni: CniMode, host: u8) -> String {
    match cni {
        CniMode::AzureCni => format!("10.224.0.{}", 50 + host),
        _ => format!("10.244.1.{host}"),
    }
}

fn classifier(cni: CniMode) -> Classifier {
    Classifier::new(Model::load_builtin(cni).unwrap(), lab_topology(cni)).unwrap()
}

fn tuple(src: &str, dst: &str) -> Tuple {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    Tuple {
        src: s.ip(),
        sport: s.port(),
        dst: d.ip(),
        dport: d.port(),
    }
}

/// A conntrack entry: the original tuple and the tuple after the node's NAT.
pub(crate) fn flow(proto: Proto, src: &str, dst: &str, nat_src: &str, nat_dst: &str) -> FlowEvent {
    let reply = tuple(nat_src, nat_dst).reversed();
    FlowEvent {
        source: SourceKind::Netlink,
        proto,
        netns: 4026531840,
        ..tcp_event(EventKind::New, tuple(src, dst), reply)
    }
}

use Proto::{Tcp, Udp};

/// Checks the matched row: `expected` is a path id, or `id/variant` where the variant matters.
fn assert_path(c: &Classification, expected: &str, row: &str) {
    let got = match (&c.path, &c.variant) {
        (Some(p), Some(v)) if expected.contains('/') => format!("{p}/{v}"),
        (Some(p), _) => p.to_string(),
        (None, _) => "unclassified".into(),
    };
    assert_eq!(got, expected, "{row}: {c:?}");
}

/// (cni, proto, orig src, orig dst, src after NAT, dst after NAT, expected path).
#[rustfmt::skip]
const CONFORMING: &[(CniMode, Proto, &str, &str, &str, &str, &str)] = &[
    (CniMode::Kubenet, Tcp, "203.0.113.10:40000", "192.0.2.10:80", "10.244.0.1:40000", "10.244.0.10:8080", "lb-inbound"),
    (CniMode::Kubenet, Tcp, "203.0.113.10:40001", "192.0.2.12:80", "203.0.113.10:40001", "10.244.0.13:8080", "lb-inbound"),
    (CniMode::Kubenet, Udp, "203.0.113.10:5000", "192.0.2.10:53", "10.244.0.1:5000", "10.244.0.11:5353", "lb-inbound-udp"),
    (CniMode::Kubenet, Tcp, "168.63.129.16:60000", "10.224.0.4:32000", "168.63.129.16:60000", "10.224.0.4:32000", "lb-health-probe"),
    (CniMode::Kubenet, Tcp, "168.63.129.16:60001", "10.224.0.4:30080", "10.244.0.1:60001", "10.244.0.10:8080", "lb-health-probe"),
    (CniMode::Kubenet, Tcp, "203.0.113.11:41000", "192.0.2.11:80", "203.0.113.11:41000", "10.244.0.12:80", "l7-ingress"),
    (CniMode::Kubenet, Tcp, "10.244.0.12:50000", "10.244.0.10:8080", "10.244.0.12:50000", "10.244.0.10:8080", "l7-ingress-upstream"),
    (CniMode::Kubenet, Tcp, "10.226.0.4:50000", "10.244.0.10:8080", "10.226.0.4:50000", "10.244.0.10:8080", "agic-inbound"),
    (CniMode::Kubenet, Tcp, "10.226.0.4:50001", "10.224.0.4:30080", "10.244.0.1:50001", "10.244.0.10:8080", "agic-nodeport/etp-cluster"),
    (CniMode::Kubenet, Tcp, "10.225.0.4:50000", "10.224.0.4:30080", "10.244.0.1:50000", "10.244.0.10:8080", "vnet-client-to-pod"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40000", "198.51.100.20:80", "10.224.0.4:40000", "198.51.100.20:80", "pod-to-internet"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40001", "10.225.0.4:80", "10.224.0.4:40001", "10.225.0.4:80", "pod-to-vnet"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40002", "10.227.0.5:443", "10.224.0.4:40002", "10.227.0.5:443", "pod-to-private-endpoint"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40003", "10.0.80.80:80", "10.244.0.10:40003", "10.244.0.12:80", "pod-to-service"),
    (CniMode::Kubenet, Tcp, "[2001:db8::10]:40000", "[2001:db8:f::10]:80", "[fd00:10:244::1]:40000", "[fd00:10:244::10]:8080", "lb-inbound"),
    (CniMode::Kubenet, Tcp, "[fd00:10:244::10]:40000", "[2001:db8::20]:443", "[fd00:10:224::4]:40000", "[2001:db8::20]:443", "pod-to-internet"),
    // Node-local traffic: kubelet probes from cbr0's gateway, a pod to the node, to its own frontends.
    (CniMode::Kubenet, Tcp, "10.244.0.1:50000", "10.244.0.10:8080", "10.244.0.1:50000", "10.244.0.10:8080", "node-local"),
    (CniMode::Kubenet, Tcp, "[fd00:10:244::1]:50000", "[fd00:10:244::10]:8080", "[fd00:10:244::1]:50000", "[fd00:10:244::10]:8080", "node-local"),
    (CniMode::Kubenet, Tcp, "10.244.0.20:40005", "10.224.0.4:10250", "10.244.0.20:40005", "10.224.0.4:10250", "pod-to-node"),
    (CniMode::Kubenet, Udp, "10.244.0.20:40006", "10.244.0.1:53", "10.244.0.20:40006", "10.244.0.1:53", "pod-to-node"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40007", "10.0.80.80:80", "10.244.0.1:40007", "10.244.0.10:8080", "pod-to-service/hairpin"),
    (CniMode::Kubenet, Tcp, "[fd00:10:244::10]:40007", "[fd00:10:96::50]:80", "[fd00:10:244::1]:40007", "[fd00:10:244::10]:8080", "pod-to-service/hairpin"),
    (CniMode::Kubenet, Tcp, "10.244.0.20:40000", "192.0.2.10:80", "10.244.0.1:40000", "10.244.0.10:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::Kubenet, Tcp, "10.244.0.20:40001", "192.0.2.10:80", "10.224.0.4:40001", "10.244.1.10:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::Kubenet, Tcp, "10.244.0.20:40004", "10.224.0.4:30080", "10.244.0.1:40004", "10.244.0.10:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::Kubenet, Tcp, "[fd00:10:244::20]:40000", "[2001:db8:f::10]:80", "[fd00:10:244::1]:40000", "[fd00:10:244::10]:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::Kubenet, Tcp, "10.244.0.20:40002", "192.0.2.12:80", "10.244.0.20:40002", "10.244.0.13:8080", "pod-to-frontend/etp-local"),
    (CniMode::Kubenet, Tcp, "10.244.0.13:40003", "192.0.2.12:80", "10.244.0.1:40003", "10.244.0.13:8080", "pod-to-frontend/etp-local-hairpin"),
    (CniMode::AzureCni, Tcp, "203.0.113.10:40000", "192.0.2.10:80", "10.224.0.4:40000", "10.224.0.10:8080", "lb-inbound"),
    (CniMode::AzureCni, Udp, "203.0.113.10:5000", "192.0.2.10:53", "10.224.0.4:5000", "10.224.0.11:5353", "lb-inbound-udp"),
    (CniMode::AzureCni, Tcp, "168.63.129.16:60000", "10.224.0.4:32000", "168.63.129.16:60000", "10.224.0.4:32000", "lb-health-probe"),
    (CniMode::AzureCni, Tcp, "203.0.113.11:41000", "192.0.2.11:80", "203.0.113.11:41000", "10.224.0.12:80", "l7-ingress"),
    (CniMode::AzureCni, Tcp, "10.224.0.12:50000", "10.224.0.10:8080", "10.224.0.12:50000", "10.224.0.10:8080", "l7-ingress-upstream"),
    (CniMode::AzureCni, Tcp, "10.226.0.4:50000", "10.224.0.10:8080", "10.226.0.4:50000", "10.224.0.10:8080", "agic-inbound"),
    (CniMode::AzureCni, Tcp, "10.226.0.4:50001", "10.224.0.4:30080", "10.224.0.4:50001", "10.224.0.10:8080", "agic-nodeport/etp-cluster"),
    (CniMode::AzureCni, Tcp, "10.226.0.4:50002", "10.224.0.4:31080", "10.226.0.4:50002", "10.224.0.12:80", "agic-nodeport/etp-local"),
    (CniMode::AzureCni, Tcp, "10.228.0.4:50000", "10.224.0.10:8080", "10.228.0.4:50000", "10.224.0.10:8080", "agc-inbound"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50000", "10.224.0.10:8080", "10.225.0.4:50000", "10.224.0.10:8080", "vnet-client-to-pod/pod-ip"),
    // API Server VNet Integration reaches an azure-cni webhook pod directly.
    (CniMode::AzureCni, Tcp, "10.229.0.4:50001", "10.224.0.12:8443", "10.229.0.4:50001", "10.224.0.12:8443", "vnet-client-to-pod/pod-ip"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50002", "10.224.0.4:31080", "10.225.0.4:50002", "10.224.0.12:80", "vnet-client-to-pod/nodeport-etp-local"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50003", "10.224.0.4:30080", "10.224.0.4:50003", "10.224.0.10:8080", "vnet-client-to-pod/nodeport-etp-cluster"),
    (CniMode::AzureCni, Tcp, "[fd00:10:224:1::4]:50000", "[fd00:10:224::4]:30080", "[fd00:10:224::4]:50000", "[fd00:10:224::10]:8080", "vnet-client-to-pod/nodeport-etp-cluster"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40000", "198.51.100.20:80", "10.224.0.4:40000", "198.51.100.20:80", "pod-to-internet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40001", "10.225.0.4:80", "10.224.0.10:40001", "10.225.0.4:80", "pod-to-vnet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40002", "10.227.0.5:443", "10.224.0.10:40002", "10.227.0.5:443", "pod-to-private-endpoint"),
    (CniMode::AzureCni, Udp, "10.224.0.10:40003", "10.0.0.53:53", "10.224.0.10:40003", "10.224.0.11:5353", "pod-to-service"),
    (CniMode::AzureCni, Tcp, "10.224.0.4:50000", "10.224.0.10:8080", "10.224.0.4:50000", "10.224.0.10:8080", "node-local"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40015", "10.224.0.4:10250", "10.224.0.10:40015", "10.224.0.4:10250", "pod-to-node"),
    (CniMode::AzureCni, Udp, "10.224.0.11:40016", "10.0.0.53:53", "10.224.0.4:40016", "10.224.0.11:5353", "pod-to-service/hairpin"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40010", "192.0.2.10:80", "10.224.0.4:40010", "10.224.0.11:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40011", "192.0.2.10:80", "10.224.0.4:40011", "10.224.0.10:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40012", "192.0.2.12:80", "10.224.0.10:40012", "10.224.0.11:8080", "pod-to-frontend/etp-local"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40014", "10.224.0.4:31080", "10.224.0.10:40014", "10.224.0.12:80", "pod-to-frontend/etp-local"),
    (CniMode::AzureCni, Tcp, "10.224.0.11:40013", "192.0.2.12:80", "10.224.0.4:40013", "10.224.0.11:8080", "pod-to-frontend/etp-local-hairpin"),
    (CniMode::AzureCniOverlay, Tcp, "203.0.113.10:40000", "192.0.2.10:80", "10.224.0.4:40000", "10.244.0.10:8080", "lb-inbound"),
    (CniMode::AzureCniOverlay, Tcp, "168.63.129.16:60000", "10.224.0.4:31080", "168.63.129.16:60000", "10.244.0.12:80", "lb-health-probe"),
    (CniMode::AzureCniOverlay, Tcp, "10.228.0.4:50000", "10.244.0.10:8080", "10.228.0.4:50000", "10.244.0.10:8080", "agc-inbound"),
    (CniMode::AzureCniOverlay, Tcp, "10.225.0.4:50000", "10.224.0.4:30080", "10.224.0.4:50000", "10.244.0.10:8080", "vnet-client-to-pod"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40001", "10.225.0.4:80", "10.224.0.4:40001", "10.225.0.4:80", "pod-to-vnet"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40002", "10.227.0.5:443", "10.224.0.4:40002", "10.227.0.5:443", "pod-to-private-endpoint"),
    (CniMode::AzureCniOverlay, Tcp, "[fd00:10:244::10]:40000", "[2001:db8::20]:443", "[fd00:10:224::4]:40000", "[2001:db8::20]:443", "pod-to-internet"),
    (CniMode::AzureCniOverlay, Tcp, "10.226.0.4:50001", "10.224.0.4:30080", "10.224.0.4:50001", "10.244.0.10:8080", "agic-nodeport/etp-cluster"),
    (CniMode::AzureCniOverlay, Tcp, "10.226.0.4:50002", "10.224.0.4:31080", "10.226.0.4:50002", "10.244.0.12:80", "agic-nodeport/etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.4:50000", "10.244.0.10:8080", "10.224.0.4:50000", "10.244.0.10:8080", "node-local"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.20:40003", "10.224.0.4:10250", "10.244.0.20:40003", "10.224.0.4:10250", "pod-to-node"),
    (CniMode::AzureCniOverlay, Tcp, "[fd00:10:244::20]:40004", "[fd00:10:224::4]:10250", "[fd00:10:244::20]:40004", "[fd00:10:224::4]:10250", "pod-to-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40005", "10.0.80.80:80", "10.224.0.4:40005", "10.244.0.10:8080", "pod-to-service/hairpin"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.20:40000", "192.0.2.10:80", "10.224.0.4:40000", "10.244.0.10:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::AzureCniOverlay, Tcp, "[fd00:10:244::20]:40000", "[2001:db8:f::10]:80", "[fd00:10:224::4]:40000", "[fd00:10:244::10]:8080", "pod-to-frontend/etp-cluster"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.20:40001", "192.0.2.12:80", "10.244.0.20:40001", "10.244.0.13:8080", "pod-to-frontend/etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.13:40002", "192.0.2.12:80", "10.224.0.4:40002", "10.244.0.13:8080", "pod-to-frontend/etp-local-hairpin"),
    // Everyday traffic beyond the seed (aks-facts): the API server through the `kubernetes`
    // Service and directly, public (198.51.100.50) and private (10.229.0.4, VNet Integration).
    (CniMode::Kubenet, Tcp, "10.244.0.10:40100", "10.0.0.1:443", "10.224.0.4:40100", "198.51.100.50:443", "pod-to-api-server/kubernetes-service-public"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40101", "10.0.0.1:443", "10.224.0.4:40101", "10.229.0.4:443", "pod-to-api-server/kubernetes-service-private"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40102", "198.51.100.50:443", "10.224.0.4:40102", "198.51.100.50:443", "pod-to-api-server/public"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40103", "10.229.0.4:443", "10.224.0.4:40103", "10.229.0.4:443", "pod-to-api-server/private"),
    (CniMode::Kubenet, Tcp, "10.224.0.4:50100", "198.51.100.50:443", "10.224.0.4:50100", "198.51.100.50:443", "node-outbound"),
    (CniMode::Kubenet, Tcp, "10.224.0.4:50101", "10.229.0.4:443", "10.224.0.4:50101", "10.229.0.4:443", "node-to-vnet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40100", "10.0.0.1:443", "10.224.0.4:40100", "198.51.100.50:443", "pod-to-api-server/kubernetes-service-public"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40101", "10.0.0.1:443", "10.224.0.10:40101", "10.229.0.4:443", "pod-to-api-server/kubernetes-service-private"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40102", "198.51.100.50:443", "10.224.0.4:40102", "198.51.100.50:443", "pod-to-api-server/public"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40103", "10.229.0.4:443", "10.224.0.10:40103", "10.229.0.4:443", "pod-to-api-server/private"),
    (CniMode::AzureCni, Tcp, "10.224.0.4:50100", "198.51.100.50:443", "10.224.0.4:50100", "198.51.100.50:443", "node-outbound"),
    (CniMode::AzureCni, Tcp, "10.224.0.4:50101", "10.229.0.4:443", "10.224.0.4:50101", "10.229.0.4:443", "node-to-vnet"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40100", "10.0.0.1:443", "10.224.0.4:40100", "198.51.100.50:443", "pod-to-api-server/kubernetes-service-public"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40101", "10.0.0.1:443", "10.224.0.4:40101", "10.229.0.4:443", "pod-to-api-server/kubernetes-service-private"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40102", "198.51.100.50:443", "10.224.0.4:40102", "198.51.100.50:443", "pod-to-api-server/public"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40103", "10.229.0.4:443", "10.224.0.4:40103", "10.229.0.4:443", "pod-to-api-server/private"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.4:50100", "198.51.100.50:443", "10.224.0.4:50100", "198.51.100.50:443", "node-outbound"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.4:50101", "10.229.0.4:443", "10.224.0.4:50101", "10.229.0.4:443", "node-to-vnet"),
    // IMDS: masqLinkLocal SNATs it to the node IP on every CNI.
    (CniMode::Kubenet, Tcp, "10.244.0.10:40110", "169.254.169.254:80", "10.224.0.4:40110", "169.254.169.254:80", "pod-to-imds"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40110", "169.254.169.254:80", "10.224.0.4:40110", "169.254.169.254:80", "pod-to-imds"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40110", "169.254.169.254:80", "10.224.0.4:40110", "169.254.169.254:80", "pod-to-imds"),
    // kubelet and hostNetwork pods, from the vnet, the private API server and another node.
    (CniMode::Kubenet, Tcp, "10.225.0.4:50200", "10.224.0.4:10250", "10.225.0.4:50200", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::Kubenet, Tcp, "10.229.0.4:50201", "10.224.0.4:10250", "10.229.0.4:50201", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::Kubenet, Tcp, "10.224.0.5:50202", "10.224.0.4:9100", "10.224.0.5:50202", "10.224.0.4:9100", "vnet-to-node"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50200", "10.224.0.4:10250", "10.225.0.4:50200", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::AzureCni, Tcp, "10.229.0.4:50201", "10.224.0.4:10250", "10.229.0.4:50201", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.5:50202", "10.224.0.4:9100", "10.224.0.5:50202", "10.224.0.4:9100", "vnet-to-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.225.0.4:50200", "10.224.0.4:10250", "10.225.0.4:50200", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.229.0.4:50201", "10.224.0.4:10250", "10.229.0.4:50201", "10.224.0.4:10250", "vnet-to-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.5:50202", "10.224.0.4:9100", "10.224.0.5:50202", "10.224.0.4:9100", "vnet-to-node"),
    // Legs forwarded by another node: eTP Cluster / NodePort (from its node IP), ClusterIP (from a pod).
    (CniMode::Kubenet, Tcp, "10.224.0.5:50300", "10.244.0.10:8080", "10.224.0.5:50300", "10.244.0.10:8080", "forwarded-by-node"),
    (CniMode::Kubenet, Tcp, "10.244.1.20:50301", "10.244.0.10:8080", "10.244.1.20:50301", "10.244.0.10:8080", "pod-to-pod/from-another-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.5:50300", "10.224.0.10:8080", "10.224.0.5:50300", "10.224.0.10:8080", "forwarded-by-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.70:50301", "10.224.0.10:8080", "10.224.0.70:50301", "10.224.0.10:8080", "forwarded-by-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.5:50300", "10.244.0.10:8080", "10.224.0.5:50300", "10.244.0.10:8080", "forwarded-by-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.1.20:50301", "10.244.0.10:8080", "10.244.1.20:50301", "10.244.0.10:8080", "pod-to-pod/from-another-node"),
    // This node's half: the endpoint it picks is on another node.
    (CniMode::Kubenet, Tcp, "203.0.113.10:40010", "192.0.2.10:80", "10.224.0.4:40010", "10.244.1.10:8080", "lb-inbound/etp-cluster"),
    (CniMode::AzureCni, Tcp, "203.0.113.10:40010", "192.0.2.10:80", "10.224.0.4:40010", "10.224.0.60:8080", "lb-inbound/etp-cluster"),
    (CniMode::AzureCniOverlay, Tcp, "203.0.113.10:40010", "192.0.2.10:80", "10.224.0.4:40010", "10.244.1.10:8080", "lb-inbound/etp-cluster"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40011", "10.0.80.80:80", "10.244.0.10:40011", "10.244.1.10:8080", "pod-to-service"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40011", "10.0.80.80:80", "10.244.0.10:40011", "10.244.1.10:8080", "pod-to-service"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40011", "10.0.80.80:80", "10.224.0.10:40011", "10.224.0.60:8080", "pod-to-service"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40200", "10.244.1.10:8080", "10.244.0.10:40200", "10.244.1.10:8080", "pod-to-pod/other-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40200", "10.244.1.10:8080", "10.244.0.10:40200", "10.244.1.10:8080", "pod-to-pod/other-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40200", "10.224.0.60:8080", "10.224.0.10:40200", "10.224.0.60:8080", "pod-to-vnet"),
    (CniMode::Kubenet, Tcp, "10.224.0.4:50600", "10.244.1.10:8080", "10.224.0.4:50600", "10.244.1.10:8080", "node-to-vnet"),
    // The ingress upstream on another node, on both nodes: still proxied-by, never pod-to-vnet.
    (CniMode::Kubenet, Tcp, "10.244.0.12:50010", "10.244.1.10:8080", "10.244.0.12:50010", "10.244.1.10:8080", "l7-ingress-upstream/pod-ip-other-node"),
    (CniMode::Kubenet, Tcp, "10.244.1.12:50011", "10.244.0.10:8080", "10.244.1.12:50011", "10.244.0.10:8080", "l7-ingress-upstream/from-another-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.12:50010", "10.224.0.60:8080", "10.224.0.12:50010", "10.224.0.60:8080", "l7-ingress-upstream/pod-ip-other-node"),
    (CniMode::AzureCni, Tcp, "10.224.0.62:50011", "10.224.0.10:8080", "10.224.0.62:50011", "10.224.0.10:8080", "l7-ingress-upstream/from-another-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.12:50010", "10.244.1.10:8080", "10.244.0.12:50010", "10.244.1.10:8080", "l7-ingress-upstream/pod-ip-other-node"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.1.12:50011", "10.244.0.10:8080", "10.244.1.12:50011", "10.244.0.10:8080", "l7-ingress-upstream/from-another-node"),
    // AGIC on Overlay (AGIC 1.8+): the gateway reaches overlay pod IPs directly.
    (CniMode::AzureCniOverlay, Tcp, "10.226.0.4:50000", "10.244.0.10:8080", "10.226.0.4:50000", "10.244.0.10:8080", "agic-inbound"),
    // An internal LB frontend (192.0.2.12, eTP Local) from the vnet and from on-premises.
    (CniMode::Kubenet, Tcp, "10.225.0.4:50400", "192.0.2.12:80", "10.225.0.4:50400", "10.244.0.13:8080", "vnet-client-to-pod/internal-lb-etp-local"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50400", "192.0.2.12:80", "10.225.0.4:50400", "10.224.0.11:8080", "vnet-client-to-pod/internal-lb-etp-local"),
    (CniMode::AzureCni, Tcp, "10.225.0.4:50402", "192.0.2.10:80", "10.224.0.4:50402", "10.224.0.10:8080", "vnet-client-to-pod/internal-lb-etp-cluster"),
    (CniMode::AzureCni, Tcp, "203.0.113.10:40001", "192.0.2.12:80", "203.0.113.10:40001", "10.224.0.13:8080", "lb-inbound/etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "10.225.0.4:50400", "192.0.2.12:80", "10.225.0.4:50400", "10.244.0.13:8080", "vnet-client-to-pod/internal-lb-etp-local"),
    (CniMode::Kubenet, Tcp, "172.16.5.5:50401", "192.0.2.10:80", "10.244.0.1:50401", "10.244.0.10:8080", "vnet-client-to-pod/internal-lb-etp-cluster"),
    (CniMode::AzureCni, Tcp, "172.16.5.5:50401", "10.224.0.4:31080", "172.16.5.5:50401", "10.224.0.12:80", "vnet-client-to-pod/nodeport-etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "172.16.5.5:50401", "192.0.2.10:80", "10.224.0.4:50401", "10.244.0.10:8080", "vnet-client-to-pod/internal-lb-etp-cluster"),
    // Declared private ranges (peered vnets, on-premises): node SNAT, never the LB's.
    (CniMode::Kubenet, Tcp, "10.244.0.10:40500", "172.16.5.5:443", "10.224.0.4:40500", "172.16.5.5:443", "pod-to-private-range"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40500", "172.16.5.5:443", "10.224.0.4:40500", "172.16.5.5:443", "pod-to-private-range"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40501", "172.16.5.5:443", "10.224.0.10:40501", "172.16.5.5:443", "pod-to-private-range"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40500", "172.16.5.5:443", "10.224.0.4:40500", "172.16.5.5:443", "pod-to-private-range"),
    // Services whose endpoint is not a pod: a VM, a hostNetwork pod, a public address.
    (CniMode::Kubenet, Tcp, "10.244.0.10:40300", "10.0.50.50:80", "10.224.0.4:40300", "10.225.0.9:80", "pod-to-service/endpoint-in-vnet"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40300", "10.0.50.50:80", "10.224.0.4:40300", "10.224.0.5:9100", "pod-to-service/endpoint-in-vnet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40300", "10.0.50.50:80", "10.224.0.10:40300", "10.225.0.9:80", "pod-to-service"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40301", "10.0.50.51:9100", "10.244.0.10:40301", "10.224.0.4:9100", "pod-to-service"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40301", "10.0.50.51:9100", "10.224.0.10:40301", "10.224.0.4:9100", "pod-to-service"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40301", "10.0.50.51:9100", "10.244.0.10:40301", "10.224.0.4:9100", "pod-to-service"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40302", "10.0.50.52:443", "10.224.0.4:40302", "203.0.113.99:443", "pod-to-service/endpoint-on-internet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40302", "10.0.50.52:443", "10.224.0.4:40302", "203.0.113.99:443", "pod-to-service/endpoint-on-internet"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40302", "10.0.50.52:443", "10.224.0.4:40302", "203.0.113.99:443", "pod-to-service/endpoint-on-internet"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40303", "10.0.50.53:443", "10.224.0.4:40303", "172.16.5.6:443", "pod-to-service/endpoint-in-private-range"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40304", "10.0.50.53:443", "10.224.0.10:40304", "172.16.5.6:443", "pod-to-service/endpoint-in-private-range"),
    // The rest of each model's rows, so that every row has a flow (see every_row_is_in_the_table_on_every_cni).
    (CniMode::Kubenet, Tcp, "203.0.113.11:41001", "192.0.2.13:80", "10.244.0.1:41001", "10.244.0.12:80", "l7-ingress/etp-cluster"),
    (CniMode::Kubenet, Udp, "203.0.113.10:5001", "192.0.2.12:53", "203.0.113.10:5001", "10.244.0.11:5353", "lb-inbound-udp/etp-local"),
    (CniMode::Kubenet, Udp, "10.244.0.11:40600", "168.63.129.16:53", "10.224.0.4:40600", "168.63.129.16:53", "pod-to-azure-dns"),
    (CniMode::Kubenet, Tcp, "10.244.0.12:50020", "10.0.80.80:80", "10.244.0.12:50020", "10.244.0.10:8080", "l7-ingress-upstream/service-upstream"),
    (CniMode::Kubenet, Tcp, "10.244.0.10:40700", "10.244.0.11:8080", "10.244.0.10:40700", "10.244.0.11:8080", "pod-to-pod"),
    (CniMode::Kubenet, Tcp, "10.224.0.4:50700", "10.0.80.80:80", "10.224.0.4:50700", "10.244.0.10:8080", "node-to-service"),
    (CniMode::AzureCni, Tcp, "203.0.113.11:41001", "192.0.2.13:80", "10.224.0.4:41001", "10.224.0.12:80", "l7-ingress/etp-cluster"),
    (CniMode::AzureCni, Udp, "203.0.113.10:5001", "192.0.2.12:53", "203.0.113.10:5001", "10.224.0.11:5353", "lb-inbound-udp/etp-local"),
    (CniMode::AzureCni, Udp, "10.224.0.11:40600", "168.63.129.16:53", "10.224.0.4:40600", "168.63.129.16:53", "pod-to-azure-dns"),
    (CniMode::AzureCni, Tcp, "10.224.0.12:50020", "10.0.80.80:80", "10.224.0.12:50020", "10.224.0.10:8080", "l7-ingress-upstream/service-upstream"),
    (CniMode::AzureCni, Tcp, "10.224.0.10:40700", "10.224.0.11:8080", "10.224.0.10:40700", "10.224.0.11:8080", "pod-to-pod"),
    (CniMode::AzureCni, Tcp, "10.224.0.4:50700", "10.0.80.80:80", "10.224.0.4:50700", "10.224.0.10:8080", "node-to-service"),
    (CniMode::AzureCniOverlay, Tcp, "203.0.113.11:41001", "192.0.2.13:80", "10.224.0.4:41001", "10.244.0.12:80", "l7-ingress/etp-cluster"),
    (CniMode::AzureCniOverlay, Udp, "203.0.113.10:5001", "192.0.2.12:53", "203.0.113.10:5001", "10.244.0.11:5353", "lb-inbound-udp/etp-local"),
    (CniMode::AzureCniOverlay, Udp, "10.244.0.11:40600", "168.63.129.16:53", "10.224.0.4:40600", "168.63.129.16:53", "pod-to-azure-dns"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.12:50020", "10.0.80.80:80", "10.244.0.12:50020", "10.244.0.10:8080", "l7-ingress-upstream/service-upstream"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.10:40700", "10.244.0.11:8080", "10.244.0.10:40700", "10.244.0.11:8080", "pod-to-pod"),
    (CniMode::AzureCniOverlay, Tcp, "10.224.0.4:50700", "10.0.80.80:80", "10.224.0.4:50700", "10.244.0.10:8080", "node-to-service"),
    (CniMode::Kubenet, Tcp, "10.225.0.4:50002", "10.224.0.4:31080", "10.225.0.4:50002", "10.244.0.12:80", "vnet-client-to-pod/nodeport-etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "10.225.0.4:50002", "10.224.0.4:31080", "10.225.0.4:50002", "10.244.0.12:80", "vnet-client-to-pod/nodeport-etp-local"),
    (CniMode::Kubenet, Tcp, "10.226.0.4:50002", "10.224.0.4:31080", "10.226.0.4:50002", "10.244.0.12:80", "agic-nodeport/etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "203.0.113.11:41000", "192.0.2.11:80", "203.0.113.11:41000", "10.244.0.12:80", "l7-ingress/etp-local"),
    (CniMode::AzureCniOverlay, Tcp, "203.0.113.10:40001", "192.0.2.12:80", "203.0.113.10:40001", "10.244.0.13:8080", "lb-inbound/etp-local"),
    (CniMode::AzureCniOverlay, Udp, "203.0.113.10:5000", "192.0.2.10:53", "10.224.0.4:5000", "10.244.0.11:5353", "lb-inbound-udp/etp-cluster"),
    (CniMode::AzureCniOverlay, Tcp, "10.244.0.12:50000", "10.244.0.10:8080", "10.244.0.12:50000", "10.244.0.10:8080", "l7-ingress-upstream/pod-ip"),
];

#[test]
fn every_path_conforms_in_every_mode() {
    for &(cni, proto, src, dst, nat_src, nat_dst, path) in CONFORMING {
        let c = classifier(cni).classify(&flow(proto, src, dst, nat_src, nat_dst));
        let row = format!("{cni} {proto} {src} -> {dst} (after NAT {nat_src} -> {nat_dst})");
        assert_path(&c, path, &row);
        assert_eq!(c.verdict, Verdict::Conforms, "{row}: {:?}", c.reason());
        assert!(
            c.hops()
                .iter()
                .all(|h| h.in_model && h.evidence != Evidence::ExpectedNotSeen),
            "{row}: {:?}",
            c.hops()
        );
    }
}

/// (cni, proto, flow, expected path, expected reason).
#[rustfmt::skip]
const DEVIATING: &[(CniMode, Proto, [&str; 4], &str, &str)] = &[
    (CniMode::AzureCni, Tcp, ["10.224.0.10:40000", "10.224.0.8:80", "10.224.0.4:40000", "10.224.0.8:80"], "pod-to-vnet",
     "azure-cni pod traffic to 10.224.0.8 inside the vnet was SNATed to the node IP 10.224.0.4: the pod IP is lost, the model expects it to be kept; check ip-masq-agent's nonMasqueradeCIDRs"),
    (CniMode::Kubenet, Tcp, ["203.0.113.10:40000", "192.0.2.12:80", "10.244.0.1:40000", "10.244.0.13:8080"], "lb-inbound",
     "kubenet lb-inbound to 192.0.2.12 (declared externalTrafficPolicy Local) was SNATed to cbr0's gateway 10.244.0.1: the client address is lost, the model expects it to be kept; check the Service's externalTrafficPolicy"),
    (CniMode::AzureCni, Tcp, ["203.0.113.11:41000", "192.0.2.11:80", "10.224.0.4:41000", "10.224.0.12:80"], "l7-ingress",
     "azure-cni l7-ingress to 192.0.2.11 (ingress-nginx/ingress-nginx-controller, declared externalTrafficPolicy Local) was SNATed to the node IP 10.224.0.4: the client address is lost"),
    (CniMode::Kubenet, Tcp, ["10.226.0.4:50000", "10.244.0.10:8080", "10.244.0.1:50000", "10.244.0.10:8080"], "agic-inbound",
     "double SNAT: kubenet agic-inbound from Application Gateway 10.226.0.4 to pod 10.244.0.10 already had its source replaced by the Application Gateway (L7, terminates TLS) (inferred), and the node SNATed it again to cbr0's gateway 10.244.0.1; the model has one source rewrite"),
    (CniMode::Kubenet, Tcp, ["10.244.0.10:40000", "198.51.100.20:80", "10.244.0.10:40000", "198.51.100.20:80"], "pod-to-internet",
     "kubenet pod traffic to 198.51.100.20 on the internet kept its source 10.244.0.10 (no SNAT on the node); the model expects SNAT to the node IP; check ip-masq-agent"),
    (CniMode::AzureCni, Tcp, ["203.0.113.10:40000", "192.0.2.10:80", "203.0.113.10:40000", "192.0.2.10:80"], "lb-inbound",
     "azure-cni lb-inbound to 192.0.2.10 (declared externalTrafficPolicy Cluster) was not DNATed on the node; the model expects kube-proxy to DNAT it; check that kube-proxy has a `loadbalancer IP` rule"),
    (CniMode::AzureCniOverlay, Tcp, ["10.244.0.10:40002", "10.227.0.5:443", "10.244.0.10:40002", "10.227.0.5:443"], "pod-to-private-endpoint",
     "azure-cni-overlay pod traffic to private endpoint 10.227.0.5 kept its source 10.244.0.10 (no SNAT on the node); the model expects SNAT to the node IP"),
    // Each externalTrafficPolicy split: a Local Service whose flow the node masquerades anyway.
    (CniMode::AzureCni, Tcp, ["10.225.0.4:50002", "10.224.0.4:31080", "10.224.0.4:50002", "10.224.0.12:80"], "vnet-client-to-pod/nodeport-etp-local",
     "azure-cni vnet client 10.225.0.4 to NodePort 10.224.0.4:31080 (externalTrafficPolicy Local) was SNATed to the node IP 10.224.0.4: the client address is lost, the model expects it to be kept; check the Service's externalTrafficPolicy"),
    (CniMode::AzureCni, Tcp, ["10.226.0.4:50002", "10.224.0.4:31080", "10.224.0.4:50002", "10.224.0.12:80"], "agic-nodeport/etp-local",
     "double SNAT: azure-cni agic-nodeport from Application Gateway 10.226.0.4 to NodePort 10.224.0.4:31080 (externalTrafficPolicy Local) already had its source replaced by the Application Gateway (L7, terminates TLS) (inferred), and the node SNATed it again to the node IP 10.224.0.4; the model has one source rewrite; check the Service's externalTrafficPolicy"),
    (CniMode::AzureCniOverlay, Tcp, ["10.226.0.4:50002", "10.224.0.4:31080", "10.224.0.4:50002", "10.244.0.12:80"], "agic-nodeport/etp-local",
     "double SNAT: azure-cni-overlay agic-nodeport from Application Gateway 10.226.0.4 to NodePort 10.224.0.4:31080 (externalTrafficPolicy Local) already had its source replaced by the Application Gateway (L7, terminates TLS) (inferred), and the node SNATed it again to the node IP 10.224.0.4"),
    (CniMode::Kubenet, Tcp, ["10.244.0.20:40002", "192.0.2.12:80", "10.244.0.1:40002", "10.244.0.13:8080"], "pod-to-frontend/etp-local",
     "kubenet pod traffic to 192.0.2.12:80, an LB frontend or NodePort of default/web (externalTrafficPolicy Local) was SNATed to cbr0's gateway 10.244.0.1: the pod IP is lost, the model expects it to be kept; kube-proxy does not masquerade"),
    (CniMode::AzureCni, Tcp, ["10.224.0.10:40012", "192.0.2.12:80", "10.224.0.4:40012", "10.224.0.11:8080"], "pod-to-frontend/etp-local",
     "azure-cni pod traffic to 192.0.2.12:80, an LB frontend or NodePort of default/web (externalTrafficPolicy Local) was SNATed to the node IP 10.224.0.4: the pod IP is lost"),
    (CniMode::AzureCniOverlay, Tcp, ["[fd00:10:244::20]:40001", "[fd00:10:224::4]:31080", "[fd00:10:224::4]:40001", "[fd00:10:244::12]:80"], "pod-to-frontend/etp-local",
     "azure-cni-overlay pod traffic to fd00:10:224::4:31080, an LB frontend or NodePort of ingress-nginx/ingress-nginx-controller (externalTrafficPolicy Local) was SNATed to the node IP fd00:10:224::4: the pod IP is lost"),
    (CniMode::AzureCni, Tcp, ["10.224.0.10:40010", "192.0.2.10:80", "10.224.0.10:40010", "10.224.0.11:8080"], "pod-to-frontend/etp-cluster",
     "azure-cni pod traffic to 192.0.2.10:80, an LB frontend or NodePort of default/app (externalTrafficPolicy Cluster) kept its source 10.224.0.10 (no SNAT on the node); the model expects SNAT to the node IP; check KUBE-EXT's"),
    // A hairpin the node does not masquerade: the pod would answer itself directly.
    (CniMode::Kubenet, Tcp, ["10.244.0.10:40007", "10.0.80.80:80", "10.244.0.10:40007", "10.244.0.10:8080"], "pod-to-service/hairpin",
     "kubenet pod traffic to ClusterIP 10.0.80.80:80, sent back to the same pod (hairpin) kept its source 10.244.0.10 (no SNAT on the node); the model expects SNAT to cbr0's gateway; check KUBE-SEP's"),
    // Masquerading a pod's traffic to another endpoint of its ClusterIP is still a deviation.
    (CniMode::AzureCni, Udp, ["10.224.0.10:40003", "10.0.0.53:53", "10.224.0.4:40003", "10.224.0.11:5353"], "pod-to-service",
     "azure-cni pod traffic to ClusterIP 10.0.0.53:53 was SNATed to the node IP 10.224.0.4: the pod IP is lost"),
];

#[test]
fn misconfigurations_deviate_with_operator_reasons() {
    for &(cni, proto, [src, dst, nat_src, nat_dst], path, reason) in DEVIATING {
        let c = classifier(cni).classify(&flow(proto, src, dst, nat_src, nat_dst));
        assert_path(&c, path, &format!("{cni} {src} -> {dst}"));
        assert_eq!(c.verdict, Verdict::Deviates, "{c:?}");
        let got = c.reason().unwrap();
        assert!(
            got.starts_with(reason),
            "expected: {reason}\n     got: {got}"
        );
    }
}

#[test]
fn unexpected_nat_shows_as_a_hop_outside_the_model() {
    let c = classifier(CniMode::AzureCni).classify(&flow(
        Tcp,
        "10.224.0.10:40000",
        "10.224.0.8:80",
        "10.224.0.4:40000",
        "10.224.0.8:80",
    ));
    let extra: Vec<_> = c.hops().into_iter().filter(|h| !h.in_model).collect();
    assert_eq!(extra.len(), 1, "{:?}", c.hops());
    assert_eq!(
        (extra[0].before.as_deref(), extra[0].after.as_deref()),
        (Some("10.224.0.10:40000"), Some("10.224.0.4:40000"))
    );
    assert_eq!(c.hops().last().unwrap().kind, HopKind::Destination);
    let missing = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "10.244.0.10:40000",
        "198.51.100.20:80",
        "10.244.0.10:40000",
        "198.51.100.20:80",
    ));
    assert!(missing
        .hops()
        .iter()
        .any(|h| h.kind == HopKind::NodeSnat && h.evidence == Evidence::ExpectedNotSeen));
}

#[test]
fn health_probes_are_never_client_paths() {
    for cni in CniMode::ALL {
        let c = classifier(cni).classify(&flow(
            Tcp,
            "168.63.129.16:61000",
            "10.224.0.4:32000",
            "168.63.129.16:61000",
            "10.224.0.4:32000",
        ));
        assert_eq!(c.path, Some(PathId("lb-health-probe".into())), "{cni}");
    }
}

#[test]
fn unclassified_says_why() {
    let c = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "203.0.113.10:40000",
        "10.224.0.4:22",
        "203.0.113.10:40000",
        "10.224.0.4:22",
    ));
    assert_eq!((c.path.as_ref(), c.verdict), (None, Verdict::Unclassified));
    assert_eq!(
        c.reason().as_deref(),
        Some("no kubenet model path for tcp 203.0.113.10:40000 (internet) -> 10.224.0.4:22 (node IP), inbound")
    );
    // AGC is not supported with kubenet: its model has no such path.
    let c = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "10.228.0.4:50000",
        "10.244.0.10:8080",
        "10.228.0.4:50000",
        "10.244.0.10:8080",
    ));
    assert_eq!(c.verdict, Verdict::Unclassified);

    let mut t = lab_topology(CniMode::AzureCni);
    t.dataplane = Dataplane::Cilium;
    let c = Classifier::new(Model::load_builtin(CniMode::AzureCni).unwrap(), t)
        .unwrap()
        .classify(&flow(
            Tcp,
            "203.0.113.10:40000",
            "192.0.2.10:80",
            "203.0.113.10:40000",
            "192.0.2.10:80",
        ));
    assert_eq!(c.verdict, Verdict::Unclassified);
    assert!(c.reason().unwrap().contains("eBPF"));
}

#[test]
fn pod_interface_marks_an_unlisted_pod() {
    let cl = classifier(CniMode::AzureCni);
    let ev = flow(
        Tcp,
        "10.225.0.4:50000",
        "10.224.0.77:8080",
        "10.225.0.4:50000",
        "10.224.0.77:8080",
    );
    assert_eq!(
        cl.classify_with_interfaces(&ev, Some("eth0"), Some("azv1234abcd"))
            .path,
        Some(PathId("vnet-client-to-pod".into()))
    );
    assert_eq!(
        cl.classify_with_interfaces(&ev, Some("eth0"), Some("eth0"))
            .verdict,
        Verdict::Unclassified
    );
}

#[test]
fn json_field_names() {
    let c = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "10.244.0.10:40000",
        "198.51.100.20:80",
        "10.224.0.4:40000",
        "198.51.100.20:80",
    ));
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["path"], "pod-to-internet");
    assert_eq!(v["verdict"], "conforms");
    assert_eq!(v["reason"], serde_json::Value::Null);
    assert_eq!(v["hops"][3]["kind"], "outbound-snat");
    assert_eq!(v["hops"][3]["evidence"], "inferred");
    assert_eq!(v["hops"][3]["after"], "192.0.2.100:*");
}

#[test]
fn builtin_models_cover_the_lab_paths() {
    let lab_ids = [
        "lb-inbound",
        "lb-inbound-udp",
        "lb-health-probe",
        "l7-ingress",
        "l7-ingress-upstream",
        "agic-inbound",
        "agic-nodeport",
        "vnet-client-to-pod",
        "pod-to-internet",
        "pod-to-vnet",
        "pod-to-private-endpoint",
    ];
    for cni in CniMode::ALL {
        let m = Model::load_builtin(cni).unwrap();
        assert_eq!(m.cni(), cni);
        for id in lab_ids {
            // AGIC's pod-IP backends are documented for kubenet and flat azure-cni only.
            if cni == CniMode::AzureCniOverlay && id == "agic-inbound" {
                continue;
            }
            assert!(m.paths().iter().any(|p| p.id() == id), "{cni} lacks {id}");
        }
    }
    let cni_only = |cni| {
        Model::load_builtin(cni)
            .unwrap()
            .paths()
            .iter()
            .any(|p| p.id() == "agc-inbound")
    };
    assert!(
        !cni_only(CniMode::Kubenet)
            && cni_only(CniMode::AzureCni)
            && cni_only(CniMode::AzureCniOverlay)
    );
}

/// Every row quotes the seed note it encodes or extends: one line of the operator's notes, as
/// written (they live outside the repository, so only the quotation's form is checked here).
#[test]
fn every_row_quotes_one_seed_line() {
    for cni in CniMode::ALL {
        for p in Model::load_builtin(cni).unwrap().paths() {
            let seed = p.seed();
            let row = format!("{cni} {}/{}", p.id(), p.variant().unwrap_or("-"));
            assert!(!seed.trim().is_empty(), "{row}: empty seed");
            assert_eq!(
                seed,
                seed.trim(),
                "{row}: the quotation has loose whitespace"
            );
            assert!(!seed.contains('\n'), "{row}: a seed quotation is one line");
            assert!(seed.len() <= 200, "{row}: quote one line, not a passage");
        }
    }
}

/// Rows added for everyday traffic beyond the seed say which aks-facts bullet they follow.
#[test]
fn every_row_says_how_aks_facts_refines_it() {
    for cni in CniMode::ALL {
        for p in Model::load_builtin(cni).unwrap().paths() {
            let refines = p.refines().unwrap_or_default();
            if refines.contains("everyday traffic") {
                assert!(
                    refines.starts_with("aks-facts, everyday traffic ("),
                    "{cni} {}: {refines}",
                    p.id()
                );
            }
        }
        let m = Model::load_builtin(cni).unwrap();
        for id in [
            "pod-to-api-server",
            "pod-to-imds",
            "vnet-to-node",
            "forwarded-by-node",
        ] {
            let rows: Vec<_> = m.paths().iter().filter(|p| p.id() == id).collect();
            assert!(!rows.is_empty(), "{cni} lacks {id}");
            for p in rows {
                assert!(
                    p.refines()
                        .is_some_and(|r| r.starts_with("aks-facts, everyday traffic (")),
                    "{cni} {id}: cite the aks-facts bullet"
                );
            }
        }
    }
}

/// Words of the seed's Portuguese that must never reach what a person reads.
const PORTUGUESE: &[&str] = &[
    " para ",
    " da ",
    " do ",
    " de ",
    "não",
    "ção",
    "Cliente",
    "Origem",
    "Regras",
    "outro",
    " faz ",
    "privado",
    "direto",
    "interno",
    "Encaminha",
    "IP da",
    "IP do",
];

#[test]
fn hop_names_reasons_and_hints_are_plain_english() {
    for (cni, _, text) in BUILTIN {
        let model = Model::load_builtin(cni).unwrap();
        for p in model.paths() {
            let mut read: Vec<&str> = vec![p.describe.get_ref()];
            read.extend(p.hops.iter().map(|h| h.label.get_ref().as_str()));
            read.extend(
                p.hops
                    .iter()
                    .filter_map(|h| h.from.as_ref().map(|f| f.get_ref().as_str())),
            );
            read.extend(p.nat.hint_dnat.as_deref());
            read.extend(p.nat.hint_snat.as_deref());
            read.extend(p.keeps.as_deref());
            for t in read {
                for word in PORTUGUESE {
                    assert!(
                        !t.contains(word),
                        "{cni} {}: {t:?} contains {word:?}",
                        p.id()
                    );
                }
            }
        }
        assert!(!text.is_empty());
    }
}

fn model_err(text: &str) -> FileError {
    Model::parse(Path::new("models/bad.toml"), text).unwrap_err()
}

const KUBENET: &str = include_str!("../../models/kubenet.toml");

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn malformed_models_name_file_line_and_field() {
    let bad = KUBENET.replacen("src = [\"health-probe\"]", "src = [\"health-prob\"]", 1);
    let e = model_err(&bad);
    assert_eq!(
        (e.line, e.field.as_str()),
        (line_of(&bad, "health-prob\"]"), "path.src"),
        "{e}"
    );
    assert!(e.to_string().starts_with("models/bad.toml:"), "{e}");

    let bad = KUBENET.replacen(
        "{ kind = \"node-dnat\", label = \"kube-proxy DNAT (nodePort)\"",
        "{ kind = \"node-dnatt\", label = \"kube-proxy DNAT (nodePort)\"",
        1,
    );
    let e = model_err(&bad);
    assert_eq!(
        (e.line, e.field.as_str()),
        (line_of(&bad, "node-dnatt"), "path.hops.kind"),
        "{e}"
    );

    let bad = KUBENET.replacen(
        "describe = \"pod traffic to {dst} on the internet\"",
        "describe = \"pod traffic to {dsst}\"",
        1,
    );
    let e = model_err(&bad);
    assert_eq!(
        (e.line, e.field.as_str()),
        (line_of(&bad, "{dsst}"), "path.describe"),
        "{e}"
    );

    // pod-to-internet's node SNAT, the hop just before its outbound SNAT.
    let pod_to_internet_snat = "  { kind = \"node-snat\", label = \"Node SNAT (ip-masq-agent)\", evidence = \"observed\" },\n  { kind = \"outbound-snat\", label = \"{outbound}\", evidence = \"inferred\", from = \"destination {dst}";
    let bad = KUBENET.replacen(
        pod_to_internet_snat,
        &pod_to_internet_snat[pod_to_internet_snat.find("\n").unwrap() + 1..],
        1,
    );
    let e = model_err(&bad);
    assert_eq!(e.field, "path.hops", "{e}");
    assert!(
        e.message.contains("pod-to-internet") && e.message.contains("node-snat"),
        "{e}"
    );

    let bad = KUBENET.replacen("kind = \"node-snat\", label = \"Node SNAT (ip-masq-agent)\", evidence = \"observed\"", "kind = \"node-snat\", label = \"Node SNAT (ip-masq-agent)\", evidence = \"inferred\", from = \"x\"", 1);
    let e = model_err(&bad);
    assert_eq!(
        (e.line, e.field.as_str()),
        (
            line_of(&bad, "evidence = \"inferred\", from = \"x\""),
            "path.hops.evidence"
        ),
        "{e}"
    );

    let bad = KUBENET.replacen(
        "variant = \"etp-cluster\"\ndirection = \"inbound\"\nsrc = [\"internet\", \"vnet\", \"private-range\"]",
        "variant = \"etp-local\"\ndirection = \"inbound\"\nsrc = [\"internet\", \"vnet\", \"private-range\"]",
        1,
    );
    let e = model_err(&bad);
    assert!(e.message.contains("duplicate path `l7-ingress`"), "{e}");

    let bad = KUBENET.replacen(
        "id = \"pod-to-node\"\n",
        "id = \"pod-to-node\"\nhairpin = true\n",
        1,
    );
    let e = model_err(&bad);
    assert_eq!(
        (e.line, e.field.as_str()),
        (line_of(&bad, "id = \"pod-to-node\""), "path.hairpin"),
        "{e}"
    );

    let err = Model::from_file(Path::new("/nonexistent/model.toml")).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot read /nonexistent/model.toml"),
        "{err}"
    );
}

#[test]
fn model_for_another_cni_is_refused() {
    let err = Classifier::new(
        Model::load_builtin(CniMode::Kubenet).unwrap(),
        lab_topology(CniMode::AzureCni),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("is for kubenet, but the topology says the cluster runs azure-cni"),
        "{err}"
    );
}

/// The ingress frontend as kube-proxy's rules on the node program it (what discovery adds).
fn with_programmed_ingress(cni: CniMode, etp: Etp) -> Classifier {
    let [mut discovered, config] = lab_layers(cni);
    discovered
        .services
        .get_or_insert_default()
        .push(ServicePort {
            name: "ingress-nginx/ingress-nginx-controller:http".into(),
            kind: ServiceKind::LoadBalancer,
            ip: Some(ip("192.0.2.11")),
            proto: Tcp,
            port: 80,
            etp: Some(etp),
        });
    let t = Topology::from_layers([discovered, config]).unwrap();
    Classifier::new(Model::load_builtin(cni).unwrap(), t).unwrap()
}

#[test]
fn snat_of_a_declared_local_frontend_says_what_the_node_programs() {
    for (cni, masq) in [
        (CniMode::Kubenet, "10.244.0.1:41000"),
        (CniMode::AzureCni, "10.224.0.4:41000"),
    ] {
        let pod = if cni == CniMode::Kubenet {
            "10.244.0.12:80"
        } else {
            "10.224.0.12:80"
        };
        let ev = flow(Tcp, "203.0.113.11:41000", "192.0.2.11:80", masq, pod);
        // The node's rules treat the Service as Cluster: that is the cause.
        let c = with_programmed_ingress(cni, Etp::Cluster).classify(&ev);
        assert_eq!(c.verdict, Verdict::Deviates, "{cni}: {c:?}");
        let reason = c.reason().unwrap();
        assert!(
            reason.contains("the client address is lost")
                && reason.contains("kube-proxy's rules on this node program it as externalTrafficPolicy Cluster, not the declared Local"),
            "{cni}: {reason}"
        );
        // The node's rules agree with the declaration: another rule SNATed it.
        let reason = with_programmed_ingress(cni, Etp::Local)
            .classify(&ev)
            .reason()
            .unwrap();
        assert!(
            reason.contains("rules on this node agree (externalTrafficPolicy Local), so another nat rule rewrote the source")
                && !reason.contains("not the declared"),
            "{cni}: {reason}"
        );
    }
    // Conforming flows get no note, whatever the node programs.
    let c = with_programmed_ingress(CniMode::AzureCni, Etp::Local).classify(&flow(
        Tcp,
        "203.0.113.11:41000",
        "192.0.2.11:80",
        "203.0.113.11:41000",
        "10.224.0.12:80",
    ));
    assert_eq!((c.verdict, c.reason()), (Verdict::Conforms, None));
}

/// azure-cni with a pod subnet: pods outside this node's (listed) pods are on other nodes.
fn pod_subnet_classifier() -> Classifier {
    let [discovered, mut config] = lab_layers(CniMode::AzureCni);
    config.pod_cidr = Some(vec!["10.240.0.0/16".parse().unwrap()]);
    config.local_pods = Some(vec![ip("10.240.0.10"), ip("10.240.0.11")]);
    let t = Topology::from_layers([discovered, config]).unwrap();
    Classifier::new(Model::load_builtin(CniMode::AzureCni).unwrap(), t).unwrap()
}

/// (orig src, orig dst, src after NAT, dst after NAT, expected path) on [`pod_subnet_classifier`].
#[rustfmt::skip]
const POD_SUBNET: &[(&str, &str, &str, &str, &str)] = &[
    ("10.240.0.10:40000", "10.240.1.10:8080", "10.240.0.10:40000", "10.240.1.10:8080", "pod-to-pod/other-node"),
    ("10.240.1.10:40001", "10.240.0.10:8080", "10.240.1.10:40001", "10.240.0.10:8080", "pod-to-pod/from-another-node"),
    ("10.240.0.10:40002", "10.240.0.11:8080", "10.240.0.10:40002", "10.240.0.11:8080", "pod-to-pod"),
    ("10.240.0.10:40003", "10.0.80.80:80", "10.240.0.10:40003", "10.240.1.10:8080", "pod-to-service"),
];

#[test]
fn azure_cni_pod_subnet_tells_pods_on_other_nodes() {
    let cl = pod_subnet_classifier();
    for &(src, dst, nat_src, nat_dst, path) in POD_SUBNET {
        let c = cl.classify(&flow(Tcp, src, dst, nat_src, nat_dst));
        assert_path(&c, path, src);
        assert_eq!(c.verdict, Verdict::Conforms, "{src}: {:?}", c.reason());
    }
}

/// The table tests exercise every row of every built-in model: a row no flow reaches is either
/// dead or untested.
#[test]
fn every_row_is_in_the_table_on_every_cni() {
    let mut missing = Vec::new();
    for cni in CniMode::ALL {
        let cl = classifier(cni);
        let reached: Vec<(Option<PathId>, Option<String>)> = CONFORMING
            .iter()
            .filter(|row| row.0 == cni)
            .map(|&(_, proto, src, dst, nat_src, nat_dst, _)| (proto, [src, dst, nat_src, nat_dst]))
            .chain(
                DEVIATING
                    .iter()
                    .filter(|row| row.0 == cni)
                    .map(|&(_, proto, tuples, _, _)| (proto, tuples)),
            )
            .map(|(proto, [src, dst, nat_src, nat_dst])| {
                let c = cl.classify(&flow(proto, src, dst, nat_src, nat_dst));
                (c.path, c.variant)
            })
            .chain(POD_SUBNET.iter().filter(|_| cni == CniMode::AzureCni).map(
                |&(src, dst, nat_src, nat_dst, _)| {
                    let c =
                        pod_subnet_classifier().classify(&flow(Tcp, src, dst, nat_src, nat_dst));
                    (c.path, c.variant)
                },
            ))
            .collect();
        for p in cl.model().paths() {
            let key = (
                Some(PathId(p.id().to_string())),
                p.variant().map(str::to_string),
            );
            if !reached.contains(&key) {
                missing.push(format!("{cni} {}/{}", p.id(), p.variant().unwrap_or("-")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "rows no table flow reaches:\n{}",
        missing.join("\n")
    );
}

#[test]
fn a_private_address_in_no_known_range_names_the_missing_fact() {
    // 172.20.0.5 is private but neither the vnet nor a declared range: no LB SNAT is inferred.
    let c = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "10.244.0.10:40000",
        "172.20.0.5:443",
        "10.224.0.4:40000",
        "172.20.0.5:443",
    ));
    assert_eq!(c.verdict, Verdict::Unclassified);
    let reason = c.reason().unwrap();
    assert!(reason.contains("private_ranges"), "{reason}");
    assert!(c.hops().is_empty() && c.hop_marks().is_empty());
}

#[test]
fn the_off_node_snat_hop_follows_the_outbound_type() {
    let ev = flow(
        Tcp,
        "10.244.0.10:40000",
        "198.51.100.20:80",
        "10.224.0.4:40000",
        "198.51.100.20:80",
    );
    for (outbound, device, after) in [
        (
            OutboundType::LoadBalancer,
            Some("Azure Load Balancer outbound SNAT"),
            "192.0.2.100:*",
        ),
        (
            OutboundType::ManagedNatGateway,
            Some("NAT gateway SNAT"),
            "the NAT gateway's public IP",
        ),
        (
            OutboundType::UserDefinedRouting,
            Some("firewall / NVA SNAT (user-defined routing)"),
            "the firewall's public IP",
        ),
        (OutboundType::None, None, ""),
    ] {
        let mut t = lab_topology(CniMode::Kubenet);
        t.outbound_type = outbound;
        let c = Classifier::new(Model::load_builtin(CniMode::Kubenet).unwrap(), t)
            .unwrap()
            .classify(&ev);
        assert_eq!(c.verdict, Verdict::Conforms, "{outbound:?}");
        let hops = c.hops();
        let off_node = hops.iter().find(|h| h.kind == HopKind::OutboundSnat);
        assert_eq!(off_node.map(|h| h.what.as_str()), device, "{outbound:?}");
        if let Some(h) = off_node {
            assert_eq!(h.after.as_deref(), Some(after), "{outbound:?}");
            // The LB's outbound IPs are named only when the LB is the device.
            let from = h.inferred_from.as_deref().unwrap();
            assert_eq!(
                from.contains("192.0.2.100"),
                outbound == OutboundType::LoadBalancer,
                "{from}"
            );
        }
        let marks = c.hop_marks();
        assert_eq!(marks.len(), hops.len());
        assert_eq!(
            marks.iter().any(|m| m.kind == HopKind::OutboundSnat),
            device.is_some()
        );
    }
}

#[test]
fn an_endpoint_on_another_node_is_named_so() {
    for (cni, endpoint) in [
        (CniMode::Kubenet, "10.244.1.10:8080"),
        (CniMode::AzureCni, "10.224.0.60:8080"),
        (CniMode::AzureCniOverlay, "10.244.1.10:8080"),
    ] {
        let c = classifier(cni).classify(&flow(
            Tcp,
            "203.0.113.10:40000",
            "192.0.2.10:80",
            "10.224.0.4:40000",
            endpoint,
        ));
        let last = c.hops().pop().unwrap();
        assert_eq!(
            (last.what.as_str(), last.at.as_deref()),
            ("Pod on another node", Some(endpoint)),
            "{cni}"
        );
    }
}

#[test]
fn hop_names_say_where_the_client_is() {
    // The same internal LB path from the vnet and from the internet.
    let cl = classifier(CniMode::AzureCni);
    for (client, name) in [
        ("10.225.0.4:50000", "Client (vnet)"),
        ("203.0.113.10:50000", "Client (internet)"),
        ("172.16.5.5:50000", "Client (declared private range)"),
    ] {
        let c = cl.classify(&flow(
            Tcp,
            client,
            "192.0.2.12:80",
            client,
            "10.224.0.11:8080",
        ));
        assert_eq!(c.hops()[0].what, name);
    }
}

#[test]
fn json_has_the_seed_and_what_each_address_is() {
    let c = classifier(CniMode::Kubenet).classify(&flow(
        Tcp,
        "10.244.0.10:40100",
        "10.0.0.1:443",
        "10.224.0.4:40100",
        "198.51.100.50:443",
    ));
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["path"], "pod-to-api-server");
    assert_eq!(v["variant"], "kubernetes-service-public");
    assert_eq!(v["seed"], "# destination is internet");
    assert_eq!(
        v["classes"],
        serde_json::json!({"src": "pod", "dst": "service-ip", "nat_dst": "api-server-public"})
    );
    assert_eq!(v["hops"][5]["what"], "API server (public endpoint)");
}

#[test]
fn an_unknown_node_subnet_is_named_in_the_reason() {
    let mut t = lab_topology(CniMode::Kubenet);
    t.node_subnets.clear();
    let c = Classifier::new(Model::load_builtin(CniMode::Kubenet).unwrap(), t)
        .unwrap()
        .classify(&flow(
            Tcp,
            "10.224.0.5:50300",
            "10.244.0.10:8080",
            "10.224.0.5:50300",
            "10.244.0.10:8080",
        ));
    assert_eq!(c.verdict, Verdict::Unclassified);
    assert!(
        c.reason().unwrap().contains("(node_subnet)"),
        "{:?}",
        c.reason()
    );
}
