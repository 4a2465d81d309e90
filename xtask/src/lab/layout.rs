//! The lab's declarative layout: every namespace, link, address, route, pod and Service, as data,
//! for one CNI mode. `build` applies it; `agent_config` and the scenarios read it. The address plan
//! is [`plan`].

use crate::lab::hash::{hex, sha256};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub use aksnet_common::CniMode;

/// Where the cluster's API server is, as the endpoints of `default/kubernetes` show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ApiServerAccess {
    /// A public cluster: a public IP, reached through the outbound SNAT.
    #[default]
    Public,
    /// A private cluster (API Server VNet Integration): a private IP in a delegated subnet.
    Private,
}

impl ApiServerAccess {
    pub const ALL: [ApiServerAccess; 2] = [ApiServerAccess::Public, ApiServerAccess::Private];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiServerAccess::Public => "public",
            ApiServerAccess::Private => "private",
        }
    }

    /// The API server's address, the one endpoint of `default/kubernetes`.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            ApiServerAccess::Public => plan::API_SERVER_PUBLIC,
            ApiServerAccess::Private => plan::API_SERVER_PRIVATE,
        }
    }
}

impl fmt::Display for ApiServerAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApiServerAccess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ApiServerAccess::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown API server access `{s}`: use public or private"))
    }
}

/// One network namespace of the lab. Its netns name is the lab prefix + [`Host::suffix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// Internet clients, the internet server and the public API server.
    Inet,
    /// Azure's side: the Load Balancer (floating-IP inbound, outbound SNAT) and the wireserver
    /// 168.63.129.16 (health-probe source and Azure DNS).
    Lb,
    /// The vnet's router (Azure SDN): subnets, backend-pool and secondary-IP routing, route table.
    Vnet,
    /// The first AKS node: where the single-node scenarios happen and the agent runs first.
    Node,
    Vm,
    Appgw,
    Pe,
    PodApp,
    PodUdp,
    PodIngress,
    PodCoreDns,
    /// The second AKS node: its own kube-proxy chains and pods, so traffic crosses nodes.
    Node2,
    /// A pod on the second node.
    PodWeb,
    /// Application Gateway for Containers: its data plane in its delegated subnet.
    Agc,
    /// The private API server (API Server VNet Integration subnet).
    ApiServer,
    /// The Instance Metadata Service at 169.254.169.254.
    Imds,
    /// An on-premises client, connected to the vnet through a VPN gateway.
    OnPrem,
}

impl Host {
    pub const ALL: [Host; 17] = [
        Host::Inet,
        Host::Lb,
        Host::Vnet,
        Host::Node,
        Host::Vm,
        Host::Appgw,
        Host::Pe,
        Host::PodApp,
        Host::PodUdp,
        Host::PodIngress,
        Host::PodCoreDns,
        Host::Node2,
        Host::PodWeb,
        Host::Agc,
        Host::ApiServer,
        Host::Imds,
        Host::OnPrem,
    ];

    /// The lab's AKS nodes.
    pub const NODES: [Host; 2] = [Host::Node, Host::Node2];

    pub fn suffix(self) -> &'static str {
        match self {
            Host::Inet => "inet",
            Host::Lb => "lb",
            Host::Vnet => "vnet",
            Host::Node => "node",
            Host::Vm => "vm",
            Host::Appgw => "appgw",
            Host::Pe => "pe",
            Host::PodApp => "pod-app",
            Host::PodUdp => "pod-udp",
            Host::PodIngress => "pod-ingress",
            Host::PodCoreDns => "pod-coredns",
            Host::Node2 => "node2",
            Host::PodWeb => "pod-web",
            Host::Agc => "agc",
            Host::ApiServer => "apiserver",
            Host::Imds => "imds",
            Host::OnPrem => "onprem",
        }
    }
}

/// The address plan. Pod addresses depend on the CNI and the node: see [`pod_ip`].
pub mod plan {
    use std::net::Ipv4Addr;

    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
    pub const INET_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
    pub const LB_PUBLIC_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    pub const FRONTEND_APP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    pub const FRONTEND_INGRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    /// The frontend of `default/web`, whose only endpoint runs on the second node.
    pub const FRONTEND_WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
    pub const APPGW_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
    /// AGC's public frontend (Azure gives it an FQDN; the lab, an address).
    pub const AGC_FRONTEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
    pub const LB_OUTBOUND_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
    /// The LB's outbound rule gives the node this many ports (1–50 nodes: 1024).
    pub const LB_OUTBOUND_PORTS: (u16, u16) = (1024, 2047);
    pub const WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
    pub const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    /// Transit between the Azure fabric (lb ns) and the vnet router, outside every lab range.
    pub const FABRIC_LB: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
    pub const FABRIC_VNET: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 2);
    /// Transit between the vnet router and the IMDS namespace (the host's side, in Azure).
    pub const FABRIC_IMDS_GW: Ipv4Addr = Ipv4Addr::new(172, 31, 254, 1);
    pub const FABRIC_IMDS: Ipv4Addr = Ipv4Addr::new(172, 31, 254, 2);
    pub const VNET_CIDR: &str = "10.224.0.0/12";
    /// An on-premises range (VPN / ExpressRoute) the operator declares as private, and a client
    /// in it behind the vnet's VPN gateway.
    pub const ON_PREMISES_CIDR: &str = "192.168.0.0/16";
    pub const ON_PREMISES_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 1);
    pub const ON_PREMISES_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 4);
    pub const NODE_SUBNET: &str = "10.224.0.0/16";
    pub const NODE_GW: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 1);
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 4);
    pub const NODE_NAME: &str = "aks-nodepool1-00000000-vmss000000";
    pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 5);
    pub const NODE2_NAME: &str = "aks-nodepool1-00000000-vmss000001";
    /// An internal LB frontend, allocated from the node subnet as AKS does by default.
    pub const INTERNAL_FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 100);
    pub const VM_GW: Ipv4Addr = Ipv4Addr::new(10, 225, 0, 1);
    pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 225, 0, 4);
    pub const APPGW_SUBNET: &str = "10.226.0.0/24";
    pub const APPGW_GW: Ipv4Addr = Ipv4Addr::new(10, 226, 0, 1);
    pub const APPGW_IP: Ipv4Addr = Ipv4Addr::new(10, 226, 0, 4);
    pub const PE_GW: Ipv4Addr = Ipv4Addr::new(10, 227, 0, 1);
    pub const PE_IP: Ipv4Addr = Ipv4Addr::new(10, 227, 0, 5);
    pub const PE_FQDN: &str = "aksnetlab.privatelink.blob.core.windows.net";
    /// AGC's delegated subnet (a /24, as AGC requires).
    pub const AGC_SUBNET: &str = "10.228.0.0/24";
    pub const AGC_GW: Ipv4Addr = Ipv4Addr::new(10, 228, 0, 1);
    pub const AGC_IP: Ipv4Addr = Ipv4Addr::new(10, 228, 0, 4);
    /// API Server VNet Integration's delegated subnet and the API server's private address.
    pub const API_SERVER_SUBNET: &str = "10.229.0.0/28";
    pub const API_SERVER_GW: Ipv4Addr = Ipv4Addr::new(10, 229, 0, 1);
    pub const API_SERVER_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 229, 0, 4);
    /// A public cluster's API server, on the internet side of the LB's outbound SNAT.
    pub const API_SERVER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
    pub const API_SERVER_PORT: u16 = 443;
    /// The `kubernetes` Service: the first address of the Service CIDR.
    pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    /// kubenet / Overlay: the cluster's pod CIDR and each node's /24 (cbr0's .1 on kubenet).
    pub const CLUSTER_POD_CIDR: &str = "10.244.0.0/16";
    pub const NODE_POD_CIDR: &str = "10.244.0.0/24";
    pub const CBR0_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    pub const NODE2_POD_CIDR: &str = "10.244.1.0/24";
    pub const NODE2_CBR0_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    /// azure-cni transparent mode: every pod's default gateway.
    pub const AZURE_POD_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
    pub const SERVICE_CIDR: &str = "10.0.0.0/16";
    pub const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    pub const WEB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 33, 33);
    /// Application Gateway listener host names (TLS SNI / Host rules).
    pub const APPGW_HOST: &str = "app.aksnetlab.example";
    /// kube-proxy's healthCheckNodePort for the eTP Local ingress Service.
    pub const INGRESS_HEALTH_NODE_PORT: u16 = 32000;
    /// kube-proxy's healthCheckNodePort for the eTP Local internal-LB Service.
    pub const INTERNAL_HEALTH_NODE_PORT: u16 = 32001;
    pub const APP_NODE_PORT: u16 = 30080;
    pub const WEB_NODE_PORT: u16 = 30090;
    pub const KUBELET_PORT: u16 = 10250;
    /// HTTP port of the vnet VM, the private endpoint, the internet server and IMDS.
    pub const HTTP_PORT: u16 = 80;
    pub const APP_PORT: u16 = 8080;
    pub const UDP_ECHO_PORT: u16 = 5353;
}

/// What the lab knows of one of its AKS nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub host: Host,
    pub name: &'static str,
    pub ip: Ipv4Addr,
    /// kubenet / Overlay: this node's share of the cluster pod CIDR.
    pub pod_cidr: &'static str,
    /// kubenet: `cbr0`'s address, the .1 of `pod_cidr`.
    pub bridge_ip: Ipv4Addr,
}

/// The facts of `node` (`Host::Node` or `Host::Node2`).
pub fn node_facts(node: Host) -> NodeFacts {
    match node {
        Host::Node => NodeFacts {
            host: node,
            name: plan::NODE_NAME,
            ip: plan::NODE_IP,
            pod_cidr: plan::NODE_POD_CIDR,
            bridge_ip: plan::CBR0_IP,
        },
        Host::Node2 => NodeFacts {
            host: node,
            name: plan::NODE2_NAME,
            ip: plan::NODE2_IP,
            pod_cidr: plan::NODE2_POD_CIDR,
            bridge_ip: plan::NODE2_CBR0_IP,
        },
        other => panic!("{other:?} is not a node of the lab"),
    }
}

/// The node a pod runs on.
pub fn node_of(pod: Host) -> Host {
    match pod {
        Host::PodApp | Host::PodUdp | Host::PodIngress | Host::PodCoreDns => Host::Node,
        Host::PodWeb => Host::Node2,
        other => panic!("{other:?} is not a pod"),
    }
}

/// A pod's address: kubenet and Overlay use its node's pod /24, azure-cni gives pods vnet
/// addresses (secondary IPs of their node's NIC).
pub fn pod_ip(cni: CniMode, pod: Host) -> Ipv4Addr {
    let last = match pod {
        Host::PodApp | Host::PodWeb => 10,
        Host::PodUdp => 11,
        Host::PodIngress => 12,
        Host::PodCoreDns => 13,
        other => panic!("{other:?} is not a pod"),
    };
    let second = u8::from(node_of(pod) == Host::Node2);
    if cni.pods_in_vnet() {
        Ipv4Addr::new(10, 224, 0, last + 10 * second)
    } else {
        Ipv4Addr::new(10, 244, second, last)
    }
}

/// The address a Service's MASQUERADE gives node-forwarded traffic towards a pod on node 1: the
/// egress interface's address (kubenet: `cbr0`; azure-cni and Overlay: `azv*` has none, so the
/// node IP).
pub fn masquerade_to_pod_ip(cni: CniMode) -> Ipv4Addr {
    match cni {
        CniMode::Kubenet => plan::CBR0_IP,
        CniMode::AzureCni | CniMode::AzureCniOverlay => plan::NODE_IP,
    }
}

/// One end of a veth pair, created directly inside its namespace (never in the host's).
#[derive(Clone, Debug)]
pub struct LinkEnd {
    pub host: Host,
    pub ifname: String,
    /// Addresses in CIDR notation.
    pub addrs: Vec<String>,
    pub mac: Option<String>,
    /// Bridge to enslave the interface to (kubenet's `cbr0`).
    pub master: Option<String>,
    /// The addresses' subnet is not on-link: everything goes through the gateway, as Azure's
    /// fabric answers for every address of a node's subnet (`noprefixroute`).
    pub routed_subnet: bool,
}

#[derive(Clone, Debug)]
pub struct Link {
    pub a: LinkEnd,
    pub b: LinkEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `default` or a CIDR.
    pub dst: String,
    pub via: Option<Ipv4Addr>,
    pub dev: Option<String>,
    pub table: Option<u32>,
}

impl Route {
    fn via(dst: &str, via: Ipv4Addr) -> Self {
        Route {
            dst: dst.to_string(),
            via: Some(via),
            dev: None,
            table: None,
        }
    }
    fn dev(dst: &str, dev: &str) -> Self {
        Route {
            dst: dst.to_string(),
            via: None,
            dev: Some(dev.to_string()),
            table: None,
        }
    }
}

/// A policy-routing rule: traffic from `from` consults `table` first.
#[derive(Clone, Debug)]
pub struct Rule {
    pub from: String,
    pub table: u32,
    pub pref: u32,
}

/// A permanent neighbour entry (azure-cni: the pod's 169.254.1.1 → the host veth's MAC).
#[derive(Clone, Debug)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: String,
    pub dev: String,
}

/// Per-namespace settings beyond its links.
#[derive(Clone, Debug)]
pub struct HostSpec {
    pub host: Host,
    pub sysctls: Vec<(&'static str, &'static str)>,
    /// Extra addresses on `lo` (CIDR notation).
    pub lo_addrs: Vec<String>,
    pub bridges: Vec<(String, String)>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// What runs in a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// HTTP server that answers with the peer address and the request headers.
    HttpEcho { port: u16 },
    /// UDP server that answers each datagram with the peer address.
    UdpEcho { port: u16 },
    /// In-cluster L7 ingress (nginx) proxying to the upstream pod's IP, as ingress-nginx does.
    Ingress {
        port: u16,
        upstream: Host,
        upstream_port: u16,
    },
    /// CoreDNS stand-in (dnsmasq) forwarding to Azure DNS, without cache so every lookup shows.
    ClusterDns { port: u16 },
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub host: Host,
    /// `namespace/name` as Kubernetes would list it.
    pub k8s_name: &'static str,
    pub ip: Ipv4Addr,
    /// The host-side veth name (kubenet `veth<8 hex>`, azure-cni `azv<hex>`), ≤ 15 chars.
    pub host_ifname: String,
    pub workload: Workload,
}

/// One Service port, as kube-proxy programs it.
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: &'static str,
    pub name: &'static str,
    pub port_name: &'static str,
    pub proto: Proto,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub lb_ip: Option<Ipv4Addr>,
    pub external_traffic_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    pub endpoints: Vec<Host>,
}

impl Service {
    /// kube-proxy's ServicePortName string: `namespace/name:port`, the rule comment.
    pub fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    /// `namespace/name`, as the agent config names a Service.
    pub fn namespaced_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The Azure Load Balancer of the cluster.
#[derive(Clone, Debug)]
pub struct LoadBalancer {
    pub frontends: Vec<Ipv4Addr>,
    pub outbound_ip: Ipv4Addr,
    pub outbound_ports: (u16, u16),
    /// The backend pool's subnet: what the outbound rule SNATs.
    pub backend_subnet: &'static str,
    pub probe_source: Ipv4Addr,
    /// The lb namespace's internet-facing interface, where outbound SNAT applies.
    pub public_ifname: &'static str,
}

/// The "cluster route table" (kubenet): subnets associated with it reach pod CIDRs via nodes.
#[derive(Clone, Debug)]
pub struct RouteTable {
    pub id: u32,
    pub associated_subnets: Vec<&'static str>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub cni: CniMode,
    pub hosts: Vec<HostSpec>,
    pub links: Vec<Link>,
    /// The pods of the first node (`Host::Node`), the one every single-node scenario uses.
    pub pods: Vec<Pod>,
    /// The pods of the second node (`Host::Node2`).
    pub node2_pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// ip-masq-agent's nonMasqueradeCIDRs (masqLinkLocal is on in AKS, so no link-local entry).
    pub non_masquerade_cidrs: Vec<&'static str>,
    /// kube-proxy's --cluster-cidr: sources outside it are masqueraded to ClusterIPs.
    pub cluster_cidr: &'static str,
    pub lb: LoadBalancer,
    pub route_table: Option<RouteTable>,
    /// Where `default/kubernetes` sends pods.
    pub api_server: ApiServerAccess,
}

fn end(host: Host, ifname: &str, addrs: &[String]) -> LinkEnd {
    LinkEnd {
        host,
        ifname: ifname.to_string(),
        addrs: addrs.to_vec(),
        mac: None,
        master: None,
        routed_subnet: false,
    }
}

fn cidr(ip: Ipv4Addr, len: u8) -> String {
    format!("{ip}/{len}")
}

fn host_spec(host: Host) -> HostSpec {
    HostSpec {
        host,
        sysctls: Vec::new(),
        lo_addrs: Vec::new(),
        bridges: Vec::new(),
        routes: Vec::new(),
        rules: Vec::new(),
        neighbours: Vec::new(),
    }
}

/// A host at the end of one link to the vnet router: its address and default route.
fn vnet_host(host: Host, gw: Ipv4Addr) -> HostSpec {
    let mut spec = host_spec(host);
    spec.routes.push(Route::via("default", gw));
    spec
}

const LB_PUBLIC_IFNAME: &str = "inet";

/// Routers forward; reverse-path filtering is off because the lab's paths are asymmetric by
/// design (floating-IP replies, the route table) and a host's default must not leak in.
const ROUTER_SYSCTLS: [(&str, &str); 3] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

/// Every veth gets an IPv6 link-local address, as on AKS nodes; without duplicate address
/// detection it (and its local route) exists as soon as the link is up, so a lab that is up is in
/// its steady state instead of finishing DAD while an agent discovers the node.
const NO_DAD: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
];

/// The vnet router sends node-subnet traffic back out of the interface it came in on (node to
/// node through the fabric): no ICMP redirect may teach a node a shortcut.
const NO_REDIRECTS: [(&str, &str); 2] = [
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
];

fn pods(cni: CniMode) -> Vec<Pod> {
    let spec = [
        (
            Host::PodApp,
            "default/app-6d8f7c9b5-x2kqp",
            Workload::HttpEcho {
                port: plan::APP_PORT,
            },
        ),
        (
            Host::PodUdp,
            "default/dns-echo-7b9c6d5f4-m8zrt",
            Workload::UdpEcho {
                port: plan::UDP_ECHO_PORT,
            },
        ),
        (
            Host::PodIngress,
            "ingress-nginx/ingress-nginx-controller-5c8d66c76d-4wq9n",
            Workload::Ingress {
                port: 80,
                upstream: Host::PodApp,
                upstream_port: plan::APP_PORT,
            },
        ),
        (
            Host::PodCoreDns,
            "kube-system/coredns-789789675-9hxcz",
            Workload::ClusterDns { port: 53 },
        ),
        (
            Host::PodWeb,
            "default/web-5f7d8c6b9-q4z8n",
            Workload::HttpEcho {
                port: plan::APP_PORT,
            },
        ),
    ];
    spec.into_iter()
        .map(|(host, k8s_name, workload)| {
            let digest = hex(&sha256(k8s_name.as_bytes()));
            // The CNIs derive these names from a hash of the container; ours from the pod name.
            let host_ifname = match cni {
                CniMode::Kubenet => format!("veth{}", &digest[..8]),
                CniMode::AzureCni | CniMode::AzureCniOverlay => format!("azv{}", &digest[..11]),
            };
            Pod {
                host,
                k8s_name,
                ip: pod_ip(cni, host),
                host_ifname,
                workload,
            }
        })
        .collect()
}

/// A Service reached only inside the cluster (no NodePort, no LB frontend).
fn cluster_ip_service(
    namespace: &'static str,
    name: &'static str,
    port_name: &'static str,
    proto: Proto,
    cluster_ip: Ipv4Addr,
    (port, target_port): (u16, u16),
    endpoint: Host,
) -> Service {
    Service {
        namespace,
        name,
        port_name,
        proto,
        cluster_ip,
        port,
        target_port,
        node_port: None,
        lb_ip: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        endpoints: vec![endpoint],
    }
}

fn services() -> Vec<Service> {
    let app = Service {
        node_port: Some(plan::APP_NODE_PORT),
        lb_ip: Some(plan::FRONTEND_APP),
        ..cluster_ip_service(
            "default",
            "app",
            "http",
            Proto::Tcp,
            Ipv4Addr::new(10, 0, 12, 34),
            (80, plan::APP_PORT),
            Host::PodApp,
        )
    };
    let dns = Service {
        node_port: Some(30053),
        lb_ip: Some(plan::FRONTEND_APP),
        ..cluster_ip_service(
            "default",
            "dns",
            "dns",
            Proto::Udp,
            Ipv4Addr::new(10, 0, 0, 53),
            (53, plan::UDP_ECHO_PORT),
            Host::PodUdp,
        )
    };
    let ingress = Service {
        node_port: Some(30880),
        lb_ip: Some(plan::FRONTEND_INGRESS),
        external_traffic_policy: TrafficPolicy::Local,
        health_check_node_port: Some(plan::INGRESS_HEALTH_NODE_PORT),
        ..cluster_ip_service(
            "ingress-nginx",
            "ingress-nginx-controller",
            "http",
            Proto::Tcp,
            Ipv4Addr::new(10, 0, 80, 80),
            (80, 80),
            Host::PodIngress,
        )
    };
    let kube_dns = cluster_ip_service(
        "kube-system",
        "kube-dns",
        "dns",
        Proto::Udp,
        plan::KUBE_DNS_IP,
        (53, 53),
        Host::PodCoreDns,
    );
    // Its only endpoint runs on the second node: every external path to it crosses nodes.
    let web = Service {
        node_port: Some(plan::WEB_NODE_PORT),
        lb_ip: Some(plan::FRONTEND_WEB),
        ..cluster_ip_service(
            "default",
            "web",
            "http",
            Proto::Tcp,
            plan::WEB_CLUSTER_IP,
            (80, plan::APP_PORT),
            Host::PodWeb,
        )
    };
    // `service.beta.kubernetes.io/azure-load-balancer-internal: "true"`, client address kept.
    let internal = Service {
        node_port: Some(30081),
        lb_ip: Some(plan::INTERNAL_FRONTEND),
        external_traffic_policy: TrafficPolicy::Local,
        health_check_node_port: Some(plan::INTERNAL_HEALTH_NODE_PORT),
        ..cluster_ip_service(
            "default",
            "app-internal",
            "http",
            Proto::Tcp,
            Ipv4Addr::new(10, 0, 12, 35),
            (80, plan::APP_PORT),
            Host::PodApp,
        )
    };
    let kubernetes = cluster_ip_service(
        "default",
        "kubernetes",
        "https",
        Proto::Tcp,
        plan::KUBERNETES_SERVICE_IP,
        (plan::API_SERVER_PORT, plan::API_SERVER_PORT),
        Host::ApiServer,
    );
    vec![app, dns, ingress, kube_dns, web, internal, kubernetes]
}

/// A stable, locally administered MAC for the i-th pod's host-side veth.
fn host_veth_mac(index: usize) -> String {
    format!("aa:aa:aa:00:00:{:02x}", index + 1)
}

/// The internet side: clients, the internet server and the public API server, and the LB.
fn internet_hosts() -> (Vec<HostSpec>, Vec<Link>) {
    let inet = vnet_host(Host::Inet, Ipv4Addr::new(203, 0, 113, 1));
    let mut lb = host_spec(Host::Lb);
    lb.sysctls.extend(ROUTER_SYSCTLS);
    lb.lo_addrs.push(cidr(plan::WIRESERVER, 32));
    lb.routes
        .push(Route::via(plan::VNET_CIDR, plan::FABRIC_VNET));
    // Floating IP: frontends are routed to the backend (through the vnet), never DNATed here.
    for ip in [
        plan::FRONTEND_APP,
        plan::FRONTEND_INGRESS,
        plan::FRONTEND_WEB,
        plan::APPGW_PUBLIC,
        plan::AGC_FRONTEND,
    ] {
        lb.routes.push(Route::via(&cidr(ip, 32), plan::FABRIC_VNET));
    }
    let links = vec![
        Link {
            a: end(
                Host::Inet,
                "eth0",
                &[
                    cidr(plan::CLIENT, 24),
                    cidr(plan::CLIENT2, 24),
                    cidr(plan::INET_SERVER, 24),
                    cidr(plan::API_SERVER_PUBLIC, 24),
                ],
            ),
            b: end(
                Host::Lb,
                LB_PUBLIC_IFNAME,
                &[
                    cidr(Ipv4Addr::new(203, 0, 113, 1), 24),
                    cidr(Ipv4Addr::new(198, 51, 100, 1), 24),
                    cidr(plan::LB_PUBLIC_SIDE, 24),
                ],
            ),
        },
        Link {
            a: end(Host::Lb, "vnet", &[cidr(plan::FABRIC_LB, 30)]),
            b: end(Host::Vnet, "fabric", &[cidr(plan::FABRIC_VNET, 30)]),
        },
    ];
    (vec![inet, lb], links)
}

/// The vnet's own hosts (VM, Application Gateway, private endpoint, AGC, private API server,
/// IMDS) and the on-premises client behind the VPN gateway, each on its own link to the vnet
/// router, and the router's routes to them.
fn vnet_hosts(vnet: &mut HostSpec) -> (Vec<HostSpec>, Vec<Link>) {
    let mut hosts = Vec::new();
    let mut links = Vec::new();
    let subnets = [
        (Host::Vm, "vm", plan::VM_GW, plan::VM_IP, 16),
        (Host::Appgw, "appgw", plan::APPGW_GW, plan::APPGW_IP, 24),
        (Host::Pe, "pe", plan::PE_GW, plan::PE_IP, 24),
        (Host::Agc, "agc", plan::AGC_GW, plan::AGC_IP, 24),
        (
            Host::ApiServer,
            "apiserver",
            plan::API_SERVER_GW,
            plan::API_SERVER_PRIVATE,
            28,
        ),
        (
            Host::Imds,
            "imds",
            plan::FABRIC_IMDS_GW,
            plan::FABRIC_IMDS,
            30,
        ),
        (
            Host::OnPrem,
            "onprem",
            plan::ON_PREMISES_GW,
            plan::ON_PREMISES_CLIENT,
            24,
        ),
    ];
    for (host, ifname, gw, ip, len) in subnets {
        let mut spec = vnet_host(host, gw);
        // Public frontends are the gateways' own; Azure delivers them to the instances.
        match host {
            Host::Appgw => spec.lo_addrs.push(cidr(plan::APPGW_PUBLIC, 32)),
            Host::Agc => spec.lo_addrs.push(cidr(plan::AGC_FRONTEND, 32)),
            Host::Imds => spec.lo_addrs.push(cidr(plan::IMDS, 32)),
            _ => {}
        }
        hosts.push(spec);
        links.push(Link {
            a: end(Host::Vnet, ifname, &[cidr(gw, len)]),
            b: end(host, "eth0", &[cidr(ip, len)]),
        });
    }
    for (ip, via) in [
        (plan::APPGW_PUBLIC, plan::APPGW_IP),
        (plan::AGC_FRONTEND, plan::AGC_IP),
        (plan::IMDS, plan::FABRIC_IMDS),
    ] {
        vnet.routes.push(Route::via(&cidr(ip, 32), via));
    }
    (hosts, links)
}

/// One AKS node: its link into the node subnet, its routes, and its pods' links.
fn node(
    cni: CniMode,
    facts: NodeFacts,
    pods: &[Pod],
    first_mac: usize,
) -> (HostSpec, Vec<HostSpec>, Vec<Link>) {
    let mut node = host_spec(facts.host);
    node.sysctls.extend(ROUTER_SYSCTLS);
    node.sysctls.extend(NO_DAD);
    node.routes
        .push(Route::dev(&cidr(plan::NODE_GW, 32), "eth0"));
    node.routes.push(Route::via("default", plan::NODE_GW));
    // The first node's link carries the node subnet on the vnet side; the others a /32 (the
    // vnet routes their addresses), so the router holds the gateway once per node link.
    let (vnet_ifname, vnet_len) = match facts.host {
        Host::Node => ("node", 16),
        _ => ("node2", 32),
    };
    let mut node_end = end(facts.host, "eth0", &[cidr(facts.ip, 16)]);
    node_end.routed_subnet = true;
    let mut links = vec![Link {
        a: end(Host::Vnet, vnet_ifname, &[cidr(plan::NODE_GW, vnet_len)]),
        b: node_end,
    }];
    if cni == CniMode::Kubenet {
        // br_netfilter: bridged pod-to-pod traffic goes through iptables, as on AKS.
        node.sysctls
            .push(("net.bridge.bridge-nf-call-iptables", "1"));
        node.bridges
            .push(("cbr0".to_string(), cidr(facts.bridge_ip, 24)));
    }
    let mut pod_hosts = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let mut spec = host_spec(pod.host);
        let mut host_end = end(facts.host, &pod.host_ifname, &[]);
        host_end.mac = Some(host_veth_mac(first_mac + i));
        let pod_end = match cni {
            CniMode::Kubenet => {
                host_end.master = Some("cbr0".to_string());
                spec.routes.push(Route::via("default", facts.bridge_ip));
                end(pod.host, "eth0", &[cidr(pod.ip, 24)])
            }
            CniMode::AzureCni | CniMode::AzureCniOverlay => {
                node.routes
                    .push(Route::dev(&cidr(pod.ip, 32), &pod.host_ifname));
                spec.routes
                    .push(Route::dev(&cidr(plan::AZURE_POD_GW, 32), "eth0"));
                spec.routes.push(Route::via("default", plan::AZURE_POD_GW));
                spec.neighbours.push(Neighbour {
                    ip: plan::AZURE_POD_GW,
                    mac: host_veth_mac(first_mac + i),
                    dev: "eth0".to_string(),
                });
                end(pod.host, "eth0", &[cidr(pod.ip, 32)])
            }
        };
        links.push(Link {
            a: host_end,
            b: pod_end,
        });
        pod_hosts.push(spec);
    }
    (node, pod_hosts, links)
}

/// How the vnet reaches pods. azure-cni: pod IPs are secondary IP configs of their node's NIC,
/// so the vnet delivers each to its node. kubenet and Overlay: the pod CIDR is routed per node
/// only for the subnets that use the cluster's route table (kubenet) or Azure's overlay routing
/// domain (Overlay, extended to AGC and, since AGIC 1.8, the Application Gateway); the pod CIDR
/// itself is listed so un-NATed pod-to-pod traffic between nodes is routed too.
fn pod_routing(cni: CniMode, all_pods: &[Pod], vnet: &mut HostSpec) -> Option<RouteTable> {
    if cni.pods_in_vnet() {
        for pod in all_pods {
            let node = node_facts(node_of(pod.host));
            vnet.routes.push(Route::via(&cidr(pod.ip, 32), node.ip));
        }
        return None;
    }
    let mut associated_subnets = vec![plan::NODE_SUBNET, plan::APPGW_SUBNET];
    if cni == CniMode::AzureCniOverlay {
        associated_subnets.push(plan::AGC_SUBNET);
    }
    associated_subnets.push(plan::CLUSTER_POD_CIDR);
    let routes = Host::NODES
        .iter()
        .map(|n| {
            let facts = node_facts(*n);
            Route {
                table: Some(100),
                ..Route::via(facts.pod_cidr, facts.ip)
            }
        })
        .collect();
    Some(RouteTable {
        id: 100,
        associated_subnets,
        routes,
    })
}

impl Layout {
    /// The lab of `cni` with a public API server.
    pub fn new(cni: CniMode) -> Layout {
        Layout::with_api_server(cni, ApiServerAccess::default())
    }

    pub fn with_api_server(cni: CniMode, api_server: ApiServerAccess) -> Layout {
        let all_pods = pods(cni);
        let (pods, node2_pods): (Vec<Pod>, Vec<Pod>) = all_pods
            .iter()
            .cloned()
            .partition(|p| node_of(p.host) == Host::Node);

        let mut vnet = host_spec(Host::Vnet);
        vnet.sysctls.extend(ROUTER_SYSCTLS);
        vnet.sysctls.extend(NO_REDIRECTS);
        vnet.routes.push(Route::via("default", plan::FABRIC_LB));
        // The LB's backend pool: its frontends (public and internal) go to the first node.
        for ip in [
            plan::FRONTEND_APP,
            plan::FRONTEND_INGRESS,
            plan::FRONTEND_WEB,
            plan::INTERNAL_FRONTEND,
        ] {
            vnet.routes.push(Route::via(&cidr(ip, 32), plan::NODE_IP));
        }
        vnet.routes
            .push(Route::dev(&cidr(plan::NODE2_IP, 32), "node2"));

        let (mut hosts, mut links) = internet_hosts();
        let (vnet_side, vnet_links) = vnet_hosts(&mut vnet);
        links.extend(vnet_links);
        let mut node_hosts = Vec::new();
        for (node_pods, facts, first_mac) in [
            (&pods, node_facts(Host::Node), 0),
            (&node2_pods, node_facts(Host::Node2), pods.len()),
        ] {
            let (spec, pod_hosts, node_links) = node(cni, facts, node_pods, first_mac);
            node_hosts.push(spec);
            node_hosts.extend(pod_hosts);
            links.extend(node_links);
        }
        let route_table = pod_routing(cni, &all_pods, &mut vnet);
        if let Some(table) = &route_table {
            vnet.routes.extend(table.routes.iter().cloned());
            for (i, subnet) in table.associated_subnets.iter().enumerate() {
                vnet.rules.push(Rule {
                    from: subnet.to_string(),
                    table: table.id,
                    pref: 100 + i as u32,
                });
            }
        }
        hosts.push(vnet);
        hosts.extend(vnet_side);
        hosts.extend(node_hosts);

        let (non_masquerade_cidrs, cluster_cidr) = match cni {
            CniMode::Kubenet | CniMode::AzureCniOverlay => {
                (vec![plan::CLUSTER_POD_CIDR], plan::CLUSTER_POD_CIDR)
            }
            CniMode::AzureCni => (vec![plan::VNET_CIDR], plan::NODE_SUBNET),
        };
        Layout {
            cni,
            hosts,
            links,
            pods,
            node2_pods,
            services: services(),
            non_masquerade_cidrs,
            cluster_cidr,
            lb: LoadBalancer {
                frontends: vec![
                    plan::FRONTEND_APP,
                    plan::FRONTEND_INGRESS,
                    plan::FRONTEND_WEB,
                    plan::INTERNAL_FRONTEND,
                ],
                outbound_ip: plan::LB_OUTBOUND_IP,
                outbound_ports: plan::LB_OUTBOUND_PORTS,
                backend_subnet: plan::NODE_SUBNET,
                probe_source: plan::WIRESERVER,
                public_ifname: LB_PUBLIC_IFNAME,
            },
            route_table,
            api_server,
        }
    }

    /// A pod of either node.
    pub fn pod(&self, host: Host) -> &Pod {
        self.pods
            .iter()
            .chain(&self.node2_pods)
            .find(|p| p.host == host)
            .unwrap_or_else(|| panic!("{host:?} is not a pod of the lab"))
    }

    /// The pods running on `node`.
    pub fn pods_on(&self, node: Host) -> &[Pod] {
        match node {
            Host::Node => &self.pods,
            _ => &self.node2_pods,
        }
    }

    /// The address of a Service endpoint: a pod of either node, or the API server.
    pub fn endpoint_ip(&self, endpoint: Host) -> Ipv4Addr {
        match endpoint {
            Host::ApiServer => self.api_server.ip(),
            pod => self.pod(pod).ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_the_kernel_limit_and_are_unique_per_namespace() {
        for cni in CniMode::ALL {
            let layout = Layout::new(cni);
            let mut seen = std::collections::HashSet::new();
            for link in &layout.links {
                for e in [&link.a, &link.b] {
                    assert!(e.ifname.len() <= 15, "{} too long", e.ifname);
                    assert!(
                        seen.insert((e.host, e.ifname.clone())),
                        "duplicate {:?} {}",
                        e.host,
                        e.ifname
                    );
                }
            }
        }
    }

    #[test]
    fn pods_take_their_nodes_addresses_and_no_address_repeats() {
        let in_cidr = |ip: Ipv4Addr, cidr: &str| {
            let (net, len) = cidr.split_once('/').unwrap();
            let (net, len): (Ipv4Addr, u32) = (net.parse().unwrap(), len.parse().unwrap());
            u32::from(ip) >> (32 - len) == u32::from(net) >> (32 - len)
        };
        for cni in CniMode::ALL {
            let layout = Layout::new(cni);
            let mut seen = std::collections::HashSet::new();
            for node in Host::NODES {
                let facts = node_facts(node);
                assert!(seen.insert(facts.ip), "{cni}: {} repeats", facts.ip);
                for pod in layout.pods_on(node) {
                    assert!(seen.insert(pod.ip), "{cni}: {} repeats", pod.ip);
                    assert_eq!(node_of(pod.host), node);
                    let home = if cni.pods_in_vnet() {
                        plan::NODE_SUBNET
                    } else {
                        facts.pod_cidr
                    };
                    assert!(in_cidr(pod.ip, home), "{cni}: {} not in {home}", pod.ip);
                }
            }
            assert_eq!(layout.pods_on(Host::Node2).len(), 1, "{cni}");
        }
    }

    #[test]
    fn every_host_has_exactly_one_spec() {
        for cni in CniMode::ALL {
            let layout = Layout::new(cni);
            for host in Host::ALL {
                assert_eq!(
                    layout.hosts.iter().filter(|h| h.host == host).count(),
                    1,
                    "{host:?}"
                );
            }
        }
    }
}
