//! The lab's declarative topology: every namespace, link, address, route, pod and Service, as data,
//! for one CNI mode. `build` applies it; `agent_config` and the scenarios read it. The address plan
//! is `notes/lab-plan.md` (shared with the classifier).

use crate::lab::hash::{hex, sha256};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The node's network mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cni {
    Kubenet,
    AzureCni,
}

impl Cni {
    pub const ALL: [Cni; 2] = [Cni::Kubenet, Cni::AzureCni];

    pub fn as_str(self) -> &'static str {
        match self {
            Cni::Kubenet => "kubenet",
            Cni::AzureCni => "azure-cni",
        }
    }
}

impl fmt::Display for Cni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Cni {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cni::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown CNI mode `{s}`: use kubenet or azure-cni"))
    }
}

/// One network namespace of the lab. Its netns name is the lab prefix + [`Host::suffix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// Internet clients and the internet server.
    Inet,
    /// Azure's side: the Load Balancer (floating-IP inbound, outbound SNAT) and the wireserver
    /// 168.63.129.16 (health-probe source and Azure DNS).
    Lb,
    /// The vnet's router (Azure SDN): subnets, backend-pool and secondary-IP routing, route table.
    Vnet,
    Node,
    Vm,
    Appgw,
    Pe,
    PodApp,
    PodUdp,
    PodIngress,
    PodCoreDns,
}

impl Host {
    pub const ALL: [Host; 11] = [
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
    ];

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
        }
    }
}

/// The address plan (lab-plan.md). Pod addresses depend on the CNI: see [`pod_ip`].
pub mod plan {
    use std::net::Ipv4Addr;

    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
    pub const INET_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
    pub const LB_PUBLIC_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    pub const FRONTEND_APP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    pub const FRONTEND_INGRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    pub const APPGW_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
    pub const LB_OUTBOUND_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
    /// The LB's outbound rule gives the node this many ports (1–50 nodes: 1024).
    pub const LB_OUTBOUND_PORTS: (u16, u16) = (1024, 2047);
    pub const WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
    /// Transit between the Azure fabric (lb ns) and the vnet router, outside every lab range.
    pub const FABRIC_LB: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
    pub const FABRIC_VNET: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 2);
    pub const VNET_CIDR: &str = "10.224.0.0/12";
    pub const NODE_SUBNET: &str = "10.224.0.0/16";
    pub const NODE_GW: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 1);
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 4);
    pub const NODE_NAME: &str = "aks-nodepool1-00000000-vmss000000";
    pub const VM_GW: Ipv4Addr = Ipv4Addr::new(10, 225, 0, 1);
    pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 225, 0, 4);
    pub const APPGW_SUBNET: &str = "10.226.0.0/24";
    pub const APPGW_GW: Ipv4Addr = Ipv4Addr::new(10, 226, 0, 1);
    pub const APPGW_IP: Ipv4Addr = Ipv4Addr::new(10, 226, 0, 4);
    pub const PE_GW: Ipv4Addr = Ipv4Addr::new(10, 227, 0, 1);
    pub const PE_IP: Ipv4Addr = Ipv4Addr::new(10, 227, 0, 5);
    pub const PE_FQDN: &str = "aksnetlab.privatelink.blob.core.windows.net";
    /// kubenet: the cluster's pod CIDR and this node's /24 on `cbr0`.
    pub const CLUSTER_POD_CIDR: &str = "10.244.0.0/16";
    pub const NODE_POD_CIDR: &str = "10.244.0.0/24";
    pub const CBR0_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    /// azure-cni transparent mode: every pod's default gateway.
    pub const AZURE_POD_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
    pub const SERVICE_CIDR: &str = "10.0.0.0/16";
    pub const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    /// Application Gateway listener host names (TLS SNI / Host rules).
    pub const APPGW_HOST: &str = "app.aksnetlab.example";
    /// kube-proxy's healthCheckNodePort for the eTP Local ingress Service.
    pub const INGRESS_HEALTH_NODE_PORT: u16 = 32000;
    pub const APP_NODE_PORT: u16 = 30080;
    /// HTTP port of the vnet VM, the private endpoint and the internet server.
    pub const HTTP_PORT: u16 = 80;
    pub const APP_PORT: u16 = 8080;
    pub const UDP_ECHO_PORT: u16 = 5353;
}

/// A pod's address: kubenet uses the node's pod /24, azure-cni gives pods vnet addresses.
pub fn pod_ip(cni: Cni, pod: Host) -> Ipv4Addr {
    let last = match pod {
        Host::PodApp => 10,
        Host::PodUdp => 11,
        Host::PodIngress => 12,
        Host::PodCoreDns => 13,
        other => panic!("{other:?} is not a pod"),
    };
    match cni {
        Cni::Kubenet => Ipv4Addr::new(10, 244, 0, last),
        Cni::AzureCni => Ipv4Addr::new(10, 224, 0, last),
    }
}

/// The address a Service's MASQUERADE gives node-forwarded traffic towards a local pod: the
/// egress interface's address (kubenet: `cbr0`; azure-cni: `azv*` has none, so the node IP).
pub fn masquerade_to_pod_ip(cni: Cni) -> Ipv4Addr {
    match cni {
        Cni::Kubenet => plan::CBR0_IP,
        Cni::AzureCni => plan::NODE_IP,
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
pub struct Topology {
    pub cni: Cni,
    pub hosts: Vec<HostSpec>,
    pub links: Vec<Link>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// ip-masq-agent's nonMasqueradeCIDRs (masqLinkLocal is on in AKS, so no link-local entry).
    pub non_masquerade_cidrs: Vec<&'static str>,
    /// kube-proxy's --cluster-cidr: sources outside it are masqueraded to ClusterIPs.
    pub cluster_cidr: &'static str,
    pub lb: LoadBalancer,
    pub route_table: Option<RouteTable>,
}

fn end(host: Host, ifname: &str, addrs: &[String]) -> LinkEnd {
    LinkEnd {
        host,
        ifname: ifname.to_string(),
        addrs: addrs.to_vec(),
        mac: None,
        master: None,
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

const LB_PUBLIC_IFNAME: &str = "inet";

/// Routers forward; reverse-path filtering is off because the lab's paths are asymmetric by
/// design (floating-IP replies, the route table) and a host's default must not leak in.
const ROUTER_SYSCTLS: [(&str, &str); 3] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

fn pods(cni: Cni) -> Vec<Pod> {
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
    ];
    spec.into_iter()
        .map(|(host, k8s_name, workload)| {
            let digest = hex(&sha256(k8s_name.as_bytes()));
            // The CNIs derive these names from a hash of the container; ours from the pod name.
            let host_ifname = match cni {
                Cni::Kubenet => format!("veth{}", &digest[..8]),
                Cni::AzureCni => format!("azv{}", &digest[..11]),
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

fn services() -> Vec<Service> {
    vec![
        Service {
            namespace: "default",
            name: "app",
            port_name: "http",
            proto: Proto::Tcp,
            cluster_ip: Ipv4Addr::new(10, 0, 12, 34),
            port: 80,
            target_port: plan::APP_PORT,
            node_port: Some(plan::APP_NODE_PORT),
            lb_ip: Some(plan::FRONTEND_APP),
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            endpoints: vec![Host::PodApp],
        },
        Service {
            namespace: "default",
            name: "dns",
            port_name: "dns",
            proto: Proto::Udp,
            cluster_ip: Ipv4Addr::new(10, 0, 0, 53),
            port: 53,
            target_port: plan::UDP_ECHO_PORT,
            node_port: Some(30053),
            lb_ip: Some(plan::FRONTEND_APP),
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            endpoints: vec![Host::PodUdp],
        },
        Service {
            namespace: "ingress-nginx",
            name: "ingress-nginx-controller",
            port_name: "http",
            proto: Proto::Tcp,
            cluster_ip: Ipv4Addr::new(10, 0, 80, 80),
            port: 80,
            target_port: 80,
            node_port: Some(30880),
            lb_ip: Some(plan::FRONTEND_INGRESS),
            external_traffic_policy: TrafficPolicy::Local,
            health_check_node_port: Some(plan::INGRESS_HEALTH_NODE_PORT),
            endpoints: vec![Host::PodIngress],
        },
        Service {
            namespace: "kube-system",
            name: "kube-dns",
            port_name: "dns",
            proto: Proto::Udp,
            cluster_ip: plan::KUBE_DNS_IP,
            port: 53,
            target_port: 53,
            node_port: None,
            lb_ip: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            endpoints: vec![Host::PodCoreDns],
        },
    ]
}

/// A stable, locally administered MAC for the i-th pod's host-side veth.
fn host_veth_mac(index: usize) -> String {
    format!("aa:aa:aa:00:00:{:02x}", index + 1)
}

impl Topology {
    pub fn new(cni: Cni) -> Topology {
        let pods = pods(cni);
        let mut inet = host_spec(Host::Inet);
        inet.routes
            .push(Route::via("default", Ipv4Addr::new(203, 0, 113, 1)));

        let mut lb = host_spec(Host::Lb);
        lb.sysctls.extend(ROUTER_SYSCTLS);
        lb.lo_addrs.push(cidr(plan::WIRESERVER, 32));
        lb.routes
            .push(Route::via(plan::VNET_CIDR, plan::FABRIC_VNET));
        // Floating IP: frontends are routed to the backend (through the vnet), never DNATed here.
        for ip in [
            plan::FRONTEND_APP,
            plan::FRONTEND_INGRESS,
            plan::APPGW_PUBLIC,
        ] {
            lb.routes.push(Route::via(&cidr(ip, 32), plan::FABRIC_VNET));
        }

        let mut vnet = host_spec(Host::Vnet);
        vnet.sysctls.extend(ROUTER_SYSCTLS);
        vnet.routes.push(Route::via("default", plan::FABRIC_LB));
        for ip in [plan::FRONTEND_APP, plan::FRONTEND_INGRESS] {
            vnet.routes.push(Route::via(&cidr(ip, 32), plan::NODE_IP));
        }
        vnet.routes
            .push(Route::via(&cidr(plan::APPGW_PUBLIC, 32), plan::APPGW_IP));

        let mut node = host_spec(Host::Node);
        node.sysctls.extend(ROUTER_SYSCTLS);
        node.routes.push(Route::via("default", plan::NODE_GW));

        let mut links = vec![
            Link {
                a: end(
                    Host::Inet,
                    "eth0",
                    &[
                        cidr(plan::CLIENT, 24),
                        cidr(plan::CLIENT2, 24),
                        cidr(plan::INET_SERVER, 24),
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
            Link {
                a: end(Host::Vnet, "node", &[cidr(plan::NODE_GW, 16)]),
                b: end(Host::Node, "eth0", &[cidr(plan::NODE_IP, 16)]),
            },
            Link {
                a: end(Host::Vnet, "vm", &[cidr(plan::VM_GW, 16)]),
                b: end(Host::Vm, "eth0", &[cidr(plan::VM_IP, 16)]),
            },
            Link {
                a: end(Host::Vnet, "appgw", &[cidr(plan::APPGW_GW, 24)]),
                b: end(Host::Appgw, "eth0", &[cidr(plan::APPGW_IP, 24)]),
            },
            Link {
                a: end(Host::Vnet, "pe", &[cidr(plan::PE_GW, 24)]),
                b: end(Host::Pe, "eth0", &[cidr(plan::PE_IP, 24)]),
            },
        ];

        let mut hosts = vec![inet, lb];
        for (host, gw) in [
            (Host::Vm, plan::VM_GW),
            (Host::Appgw, plan::APPGW_GW),
            (Host::Pe, plan::PE_GW),
        ] {
            let mut spec = host_spec(host);
            spec.routes.push(Route::via("default", gw));
            if host == Host::Appgw {
                // The gateway's public frontend; Azure delivers it to the instances.
                spec.lo_addrs.push(cidr(plan::APPGW_PUBLIC, 32));
            }
            hosts.push(spec);
        }

        let route_table = match cni {
            Cni::Kubenet => {
                // br_netfilter: bridged pod-to-pod traffic goes through iptables, as on AKS.
                node.sysctls
                    .push(("net.bridge.bridge-nf-call-iptables", "1"));
                node.bridges
                    .push(("cbr0".to_string(), cidr(plan::CBR0_IP, 24)));
                Some(RouteTable {
                    id: 100,
                    associated_subnets: vec![plan::NODE_SUBNET, plan::APPGW_SUBNET],
                    routes: vec![Route {
                        table: Some(100),
                        ..Route::via(plan::NODE_POD_CIDR, plan::NODE_IP)
                    }],
                })
            }
            Cni::AzureCni => {
                // Pod IPs are secondary IP configs of the node NIC: the vnet delivers them to it.
                for pod in &pods {
                    vnet.routes
                        .push(Route::via(&cidr(pod.ip, 32), plan::NODE_IP));
                }
                None
            }
        };
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

        for (i, pod) in pods.iter().enumerate() {
            let mut spec = host_spec(pod.host);
            let mut host_end = end(Host::Node, &pod.host_ifname, &[]);
            host_end.mac = Some(host_veth_mac(i));
            let pod_end = match cni {
                Cni::Kubenet => {
                    host_end.master = Some("cbr0".to_string());
                    spec.routes.push(Route::via("default", plan::CBR0_IP));
                    end(pod.host, "eth0", &[cidr(pod.ip, 24)])
                }
                Cni::AzureCni => {
                    node.routes
                        .push(Route::dev(&cidr(pod.ip, 32), &pod.host_ifname));
                    spec.routes
                        .push(Route::dev(&cidr(plan::AZURE_POD_GW, 32), "eth0"));
                    spec.routes.push(Route::via("default", plan::AZURE_POD_GW));
                    spec.neighbours.push(Neighbour {
                        ip: plan::AZURE_POD_GW,
                        mac: host_veth_mac(i),
                        dev: "eth0".to_string(),
                    });
                    end(pod.host, "eth0", &[cidr(pod.ip, 32)])
                }
            };
            links.push(Link {
                a: host_end,
                b: pod_end,
            });
            hosts.push(spec);
        }
        hosts.splice(2..2, [vnet, node]);

        let (non_masquerade_cidrs, cluster_cidr) = match cni {
            Cni::Kubenet => (vec![plan::CLUSTER_POD_CIDR], plan::CLUSTER_POD_CIDR),
            Cni::AzureCni => (vec![plan::VNET_CIDR], plan::NODE_SUBNET),
        };
        Topology {
            cni,
            hosts,
            links,
            pods,
            services: services(),
            non_masquerade_cidrs,
            cluster_cidr,
            lb: LoadBalancer {
                frontends: vec![plan::FRONTEND_APP, plan::FRONTEND_INGRESS],
                outbound_ip: plan::LB_OUTBOUND_IP,
                outbound_ports: plan::LB_OUTBOUND_PORTS,
                backend_subnet: plan::NODE_SUBNET,
                probe_source: plan::WIRESERVER,
                public_ifname: LB_PUBLIC_IFNAME,
            },
            route_table,
        }
    }

    pub fn pod(&self, host: Host) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.host == host)
            .unwrap_or_else(|| panic!("{host:?} is not a pod of the lab"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_the_kernel_limit_and_are_unique_per_namespace() {
        for cni in Cni::ALL {
            let topo = Topology::new(cni);
            let mut seen = std::collections::HashSet::new();
            for link in &topo.links {
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
    fn every_host_has_exactly_one_spec() {
        for cni in Cni::ALL {
            let topo = Topology::new(cni);
            for host in Host::ALL {
                assert_eq!(
                    topo.hosts.iter().filter(|h| h.host == host).count(),
                    1,
                    "{host:?}"
                );
            }
        }
    }
}
