//! The documented AKS traffic paths as named scenarios: the traffic each drives, what the client
//! must get back, and what a correct observer must see in the node's conntrack table.

use crate::lab::error::LabError;
use crate::lab::layout::{
    masquerade_to_pod_ip, plan, ApiServerAccess, CniMode, Host, Layout, Proto,
};
use crate::lab::paths::PathId;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Scenario names, in the order `Scenario::all` runs them (agic-nodeport: kubenet only;
/// agc-inbound: azure-cni and Overlay only). To add one: a name here and an arm in `build`.
pub const SCENARIO_NAMES: [&str; 20] = [
    "lb-inbound-tcp",
    "lb-inbound-udp",
    "lb-health-probe",
    "l7-ingress",
    "agic-inbound",
    "agic-nodeport",
    "agc-inbound",
    "vnet-client-to-pod",
    "internal-lb-from-vnet",
    "onprem-to-nodeport",
    "pod-to-internet",
    "pod-to-vnet",
    "pod-to-private-endpoint",
    "ingress-pod-outbound",
    "pod-to-api-server",
    "pod-to-imds",
    "vnet-to-kubelet",
    "lb-inbound-cross-node",
    "nodeport-cross-node",
    "clusterip-cross-node",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// An ephemeral or NAT-chosen port.
    Any,
    Exact(u16),
}

impl PortMatch {
    pub fn matches(self, port: u16) -> bool {
        match self {
            PortMatch::Any => true,
            PortMatch::Exact(p) => p == port,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointMatch {
    pub ip: Ipv4Addr,
    pub port: PortMatch,
}

impl EndpointMatch {
    pub fn matches(&self, addr: SocketAddrV4) -> bool {
        *addr.ip() == self.ip && self.port.matches(addr.port())
    }
}

impl fmt::Display for EndpointMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            PortMatch::Any => write!(f, "{}:*", self.ip),
            PortMatch::Exact(p) => write!(f, "{}:{p}", self.ip),
        }
    }
}

/// A conntrack tuple direction as observed: source and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleMatch {
    pub src: EndpointMatch,
    pub dst: EndpointMatch,
}

impl TupleMatch {
    pub fn matches(&self, t: &Tuple) -> bool {
        self.src.matches(t.src) && self.dst.matches(t.dst)
    }
}

/// Which NAT the node applied to an entry (as seen by comparing its two tuples).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    None,
    Dnat,
    Snat,
    DnatSnat,
}

impl NatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NatKind::None => "none",
            NatKind::Dnat => "dnat",
            NatKind::Snat => "snat",
            NatKind::DnatSnat => "dnat+snat",
        }
    }
}

/// One conntrack entry a correct observer of the node must see for a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedConntrack {
    /// The path name the classifier should give this entry.
    pub path: PathId,
    pub proto: Proto,
    pub original: TupleMatch,
    pub reply: TupleMatch,
    pub nat: NatKind,
}

impl ExpectedConntrack {
    pub fn matches(&self, proto: Proto, original: &Tuple, reply: &Tuple) -> bool {
        proto == self.proto && self.original.matches(original) && self.reply.matches(reply)
    }
}

impl fmt::Display for ExpectedConntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<24} {} {} -> {} | reply {} -> {} [{}]",
            self.path.as_str(),
            self.proto,
            self.original.src,
            self.original.dst,
            self.reply.src,
            self.reply.dst,
            self.nat.as_str()
        )
    }
}

/// A hop off the node that an observer can only infer (Azure does it), stated for each scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InferredHop {
    /// The Azure LB forwarded to the node keeping the frontend as destination (floating IP).
    LbFloatingIp { frontend: SocketAddrV4 },
    /// The Azure LB's outbound rule SNATed the node IP to its public IP and a port in range.
    LbOutboundSnat {
        public_ip: Ipv4Addr,
        ports: (u16, u16),
    },
    /// The Application Gateway terminated TLS and opened a new connection from its private IP.
    AppGatewayProxy {
        listener: SocketAddrV4,
        private_ip: Ipv4Addr,
    },
    /// Application Gateway for Containers proxied from an address of its delegated subnet.
    AgcProxy {
        frontend: SocketAddrV4,
        private_ip: Ipv4Addr,
    },
    /// An in-cluster proxy pod joined the two connections ("proxied by", not one flow).
    ProxiedByPod { pod_ip: Ipv4Addr },
    /// The name was resolved through the privatelink zone (CoreDNS → Azure DNS).
    PrivateDns {
        fqdn: &'static str,
        answer: Ipv4Addr,
    },
}

/// What a client must get back from one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The `server=` name the echo server reports.
    pub server: Option<String>,
    /// The address the server saw the connection (or datagram) come from.
    pub peer_ip: Option<Ipv4Addr>,
    pub peer_ports: Option<(u16, u16)>,
    /// The first address of X-Forwarded-For as the app received it.
    pub forwarded_for: Option<Ipv4Addr>,
    /// Text the answer must contain (for servers that do not echo).
    pub body_contains: Option<&'static str>,
}

impl Expect {
    fn from(server: &str, peer_ip: Ipv4Addr) -> Expect {
        Expect {
            server: Some(server.to_string()),
            peer_ip: Some(peer_ip),
            peer_ports: None,
            forwarded_for: None,
            body_contains: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub from: Host,
    /// Source address to bind (a second client address, the probe source).
    pub bind: Option<Ipv4Addr>,
    pub url: String,
    /// For https to the Application Gateway: resolve the URL's host to this address and trust the
    /// lab's certificate.
    pub resolve_to: Option<Ipv4Addr>,
    pub expect: Expect,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpQuery {
    pub from: Host,
    pub bind: Option<Ipv4Addr>,
    pub dst: SocketAddrV4,
    pub payload: &'static str,
    pub expect: Expect,
}

/// One bounded piece of traffic (one HTTP request: one TCP handshake; or one UDP query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Traffic {
    Http(HttpRequest),
    Udp(UdpQuery),
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Traffic::Http(r) => write!(f, "{} GET {}", r.from.suffix(), r.url),
            Traffic::Udp(q) => write!(f, "{} udp {}", q.from.suffix(), q.dst),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub cni: CniMode,
    pub summary: &'static str,
    pub traffic: Vec<Traffic>,
    /// What the first node (`Host::Node`) must show.
    pub expected: Vec<ExpectedConntrack>,
    /// What the second node (`Host::Node2`) must show: the legs that cross to it.
    pub expected_on_node2: Vec<ExpectedConntrack>,
    pub inferred: Vec<InferredHop>,
}

fn any(ip: Ipv4Addr) -> EndpointMatch {
    EndpointMatch {
        ip,
        port: PortMatch::Any,
    }
}

fn at(ip: Ipv4Addr, port: u16) -> EndpointMatch {
    EndpointMatch {
        ip,
        port: PortMatch::Exact(port),
    }
}

fn entry(
    path: PathId,
    proto: Proto,
    original: (EndpointMatch, EndpointMatch),
    reply: (EndpointMatch, EndpointMatch),
) -> ExpectedConntrack {
    // The NAT kind follows from the tuples: a translated destination shows as a reply source
    // other than the original destination, a translated source as another reply destination.
    let dnat = reply.0.ip != original.1.ip || reply.0.port != original.1.port;
    let snat = reply.1.ip != original.0.ip;
    let nat = match (dnat, snat) {
        (false, false) => NatKind::None,
        (true, false) => NatKind::Dnat,
        (false, true) => NatKind::Snat,
        (true, true) => NatKind::DnatSnat,
    };
    ExpectedConntrack {
        path,
        proto,
        original: TupleMatch {
            src: original.0,
            dst: original.1,
        },
        reply: TupleMatch {
            src: reply.0,
            dst: reply.1,
        },
        nat,
    }
}

fn http(from: Host, url: String, expect: Expect) -> Traffic {
    Traffic::Http(HttpRequest {
        from,
        bind: None,
        url,
        resolve_to: None,
        expect,
    })
}

/// The `server=` name of a pod's echo server (its pod name).
pub fn server_name(layout: &Layout, host: Host) -> String {
    let k8s = layout.pod(host).k8s_name;
    k8s.split('/').nth(1).unwrap_or(k8s).to_string()
}

impl Scenario {
    /// Every scenario that applies to this CNI (public API server), in `SCENARIO_NAMES` order.
    pub fn all(cni: CniMode) -> Vec<Scenario> {
        Scenario::all_in(&Layout::new(cni))
    }

    /// Every scenario of the lab built from `layout`, in `SCENARIO_NAMES` order.
    pub fn all_in(layout: &Layout) -> Vec<Scenario> {
        SCENARIO_NAMES
            .iter()
            .filter_map(|name| build(layout, name))
            .collect()
    }

    pub fn find(cni: CniMode, name: &str) -> Result<Scenario, LabError> {
        Scenario::find_in(&Layout::new(cni), name)
    }

    pub fn find_in(layout: &Layout, name: &str) -> Result<Scenario, LabError> {
        SCENARIO_NAMES
            .iter()
            .find(|n| **n == name)
            .and_then(|n| build(layout, n))
            .ok_or_else(|| LabError::UnknownScenario {
                name: name.to_string(),
                cni: layout.cni.to_string(),
                known: Scenario::all_in(layout)
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The conntrack entries a correct observer must see on the first node for this scenario.
    pub fn expected_on_node(&self) -> &[ExpectedConntrack] {
        &self.expected
    }

    /// The conntrack entries a correct observer must see on `node` (`Host::Node` or
    /// `Host::Node2`).
    pub fn expected_on(&self, node: Host) -> &[ExpectedConntrack] {
        match node {
            Host::Node2 => &self.expected_on_node2,
            _ => &self.expected,
        }
    }
}

fn build(layout: &Layout, name: &'static str) -> Option<Scenario> {
    use PathId::*;
    use Proto::{Tcp, Udp};
    let cni = layout.cni;
    let pod = |h: Host| layout.pod(h).ip;
    let (app, udp, ingress, coredns) = (
        pod(Host::PodApp),
        pod(Host::PodUdp),
        pod(Host::PodIngress),
        pod(Host::PodCoreDns),
    );
    let app_name = server_name(layout, Host::PodApp);
    let masq = masquerade_to_pod_ip(cni);
    let kubenet = cni == CniMode::Kubenet;
    let node = plan::NODE_IP;
    let app_port = plan::APP_PORT;
    // The node's view of a pod's outbound connection to a destination outside the pod CIDR:
    // ip-masq-agent MASQUERADEs it to the node IP unless the destination is in
    // nonMasqueradeCIDRs (kubenet and Overlay: the pod CIDR only; azure-cni: the vnet).
    let pod_source_seen_as = |pod_ip: Ipv4Addr, dst: Ipv4Addr| {
        let kept = cni.pods_in_vnet()
            && u32::from(dst) >> 20 == u32::from(Ipv4Addr::new(10, 224, 0, 0)) >> 20;
        if kept {
            pod_ip
        } else {
            node
        }
    };
    let lb_snat = InferredHop::LbOutboundSnat {
        public_ip: plan::LB_OUTBOUND_IP,
        ports: plan::LB_OUTBOUND_PORTS,
    };
    let internet = |from: Host, pod_ip: Ipv4Addr| {
        let mut expect = Expect::from("inet-server", plan::LB_OUTBOUND_IP);
        expect.peer_ports = Some(plan::LB_OUTBOUND_PORTS);
        (
            vec![http(from, format!("http://{}/", plan::INET_SERVER), expect)],
            vec![entry(
                PodToInternet,
                Tcp,
                (any(pod_ip), at(plan::INET_SERVER, 80)),
                (
                    at(plan::INET_SERVER, 80),
                    any(pod_source_seen_as(pod_ip, plan::INET_SERVER)),
                ),
            )],
        )
    };

    let web = pod(Host::PodWeb);
    let web_name = server_name(layout, Host::PodWeb);
    // The second leg of a connection the first node DNATed to the web pod and MASQUERADEd to
    // its own IP (eTP Cluster): on the second node, node IP → pod, no NAT.
    let forwarded_to_web = || {
        vec![entry(
            ForwardedByNode,
            Tcp,
            (any(node), at(web, app_port)),
            (at(web, app_port), any(node)),
        )]
    };
    let mut expected_on_node2 = Vec::new();
    let (summary, traffic, expected, inferred) = match name {
        "lb-inbound-tcp" => (
            "internet client → LB frontend (floating IP) → node KUBE-EXT (eTP Cluster: MASQUERADE) → app pod",
            vec![Traffic::Http(HttpRequest {
                from: Host::Inet,
                bind: Some(plan::CLIENT),
                url: format!("http://{}/", plan::FRONTEND_APP),
                resolve_to: None,
                expect: Expect::from(&app_name, masq),
            })],
            vec![entry(LbInbound, Tcp, (any(plan::CLIENT), at(plan::FRONTEND_APP, 80)), (at(app, app_port), any(masq)))],
            vec![InferredHop::LbFloatingIp { frontend: SocketAddrV4::new(plan::FRONTEND_APP, 80) }],
        ),
        "lb-inbound-udp" => (
            "internet client → LB frontend UDP 53 (floating IP) → node DNAT + MASQUERADE → UDP echo pod",
            vec![Traffic::Udp(UdpQuery {
                from: Host::Inet,
                bind: Some(plan::CLIENT),
                dst: SocketAddrV4::new(plan::FRONTEND_APP, 53),
                payload: "aksnetlab-query",
                expect: Expect::from(&server_name(layout, Host::PodUdp), masq),
            })],
            vec![entry(
                LbInboundUdp,
                Udp,
                (any(plan::CLIENT), at(plan::FRONTEND_APP, 53)),
                (at(udp, plan::UDP_ECHO_PORT), any(masq)),
            )],
            vec![InferredHop::LbFloatingIp { frontend: SocketAddrV4::new(plan::FRONTEND_APP, 53) }],
        ),
        "lb-health-probe" => (
            "LB probes from 168.63.129.16: the Cluster service's nodePort (DNAT to the pod) and the Local service's healthCheckNodePort (kube-proxy answers)",
            vec![
                Traffic::Http(HttpRequest {
                    from: Host::Lb,
                    bind: Some(plan::WIRESERVER),
                    url: format!("http://{node}:{}/", plan::APP_NODE_PORT),
                    resolve_to: None,
                    expect: Expect::from(&app_name, masq),
                }),
                Traffic::Http(HttpRequest {
                    from: Host::Lb,
                    bind: Some(plan::WIRESERVER),
                    url: format!("http://{node}:{}/healthz", plan::INGRESS_HEALTH_NODE_PORT),
                    resolve_to: None,
                    expect: Expect {
                        server: None,
                        peer_ip: None,
                        peer_ports: None,
                        forwarded_for: None,
                        body_contains: Some("\"localEndpoints\":1"),
                    },
                }),
            ],
            vec![
                entry(LbHealthProbe, Tcp, (any(plan::WIRESERVER), at(node, plan::APP_NODE_PORT)), (at(app, app_port), any(masq))),
                entry(
                    LbHealthProbe,
                    Tcp,
                    (any(plan::WIRESERVER), at(node, plan::INGRESS_HEALTH_NODE_PORT)),
                    (at(node, plan::INGRESS_HEALTH_NODE_PORT), any(plan::WIRESERVER)),
                ),
            ],
            vec![],
        ),
        "l7-ingress" => (
            "internet client → LB frontend → node DNAT (eTP Local: client address kept) → ingress pod → app pod IP (second connection, no NAT)",
            vec![Traffic::Http(HttpRequest {
                from: Host::Inet,
                bind: Some(plan::CLIENT2),
                url: format!("http://{}/", plan::FRONTEND_INGRESS),
                resolve_to: None,
                expect: Expect { forwarded_for: Some(plan::CLIENT2), ..Expect::from(&app_name, ingress) },
            })],
            vec![
                entry(L7Ingress, Tcp, (any(plan::CLIENT2), at(plan::FRONTEND_INGRESS, 80)), (at(ingress, 80), any(plan::CLIENT2))),
                entry(L7IngressUpstream, Tcp, (any(ingress), at(app, app_port)), (at(app, app_port), any(ingress))),
            ],
            vec![
                InferredHop::LbFloatingIp { frontend: SocketAddrV4::new(plan::FRONTEND_INGRESS, 80) },
                InferredHop::ProxiedByPod { pod_ip: ingress },
            ],
        ),
        "agic-inbound" => (
            "internet client → Application Gateway (TLS, host rule, X-Forwarded-For) → new connection from its private IP to the app pod IP (no NAT on the node)",
            vec![Traffic::Http(HttpRequest {
                from: Host::Inet,
                bind: Some(plan::CLIENT),
                url: format!("https://{}/", plan::APPGW_HOST),
                resolve_to: Some(plan::APPGW_PUBLIC),
                expect: Expect { forwarded_for: Some(plan::CLIENT), ..Expect::from(&app_name, plan::APPGW_IP) },
            })],
            vec![entry(AgicInbound, Tcp, (any(plan::APPGW_IP), at(app, app_port)), (at(app, app_port), any(plan::APPGW_IP)))],
            vec![InferredHop::AppGatewayProxy {
                listener: SocketAddrV4::new(plan::APPGW_PUBLIC, 443),
                private_ip: plan::APPGW_IP,
            }],
        ),
        "agic-nodeport" if kubenet => (
            "internet client → Application Gateway (path rule /nodeport/, backend pool on the node's NodePort, set up without AGIC) → node DNAT + MASQUERADE → app pod",
            vec![Traffic::Http(HttpRequest {
                from: Host::Inet,
                bind: Some(plan::CLIENT),
                url: format!("https://{}/nodeport/", plan::APPGW_HOST),
                resolve_to: Some(plan::APPGW_PUBLIC),
                expect: Expect { forwarded_for: Some(plan::CLIENT), ..Expect::from(&app_name, masq) },
            })],
            vec![entry(AgicNodePort, Tcp, (any(plan::APPGW_IP), at(node, plan::APP_NODE_PORT)), (at(app, app_port), any(masq)))],
            vec![InferredHop::AppGatewayProxy {
                listener: SocketAddrV4::new(plan::APPGW_PUBLIC, 443),
                private_ip: plan::APPGW_IP,
            }],
        ),
        "agic-nodeport" => return None,
        // AGC supports azure-cni and Overlay, not kubenet.
        "agc-inbound" if !kubenet => (
            "internet client → AGC frontend → new connection from an address of AGC's delegated subnet to the app pod IP (X-Forwarded-For; no NAT on the node)",
            vec![Traffic::Http(HttpRequest {
                from: Host::Inet,
                bind: Some(plan::CLIENT),
                url: format!("http://{}/", plan::AGC_FRONTEND),
                resolve_to: None,
                expect: Expect { forwarded_for: Some(plan::CLIENT), ..Expect::from(&app_name, plan::AGC_IP) },
            })],
            vec![entry(AgcInbound, Tcp, (any(plan::AGC_IP), at(app, app_port)), (at(app, app_port), any(plan::AGC_IP)))],
            vec![InferredHop::AgcProxy {
                frontend: SocketAddrV4::new(plan::AGC_FRONTEND, 80),
                private_ip: plan::AGC_IP,
            }],
        ),
        "agc-inbound" => return None,
        "internal-lb-from-vnet" => (
            "VM in the vnet → internal LB frontend (floating IP, from the node subnet) → node DNAT (eTP Local: the VM's address kept) → app pod",
            vec![http(Host::Vm, format!("http://{}/", plan::INTERNAL_FRONTEND), Expect::from(&app_name, plan::VM_IP))],
            vec![entry(
                VnetClientToPod,
                Tcp,
                (any(plan::VM_IP), at(plan::INTERNAL_FRONTEND, 80)),
                (at(app, app_port), any(plan::VM_IP)),
            )],
            vec![InferredHop::LbFloatingIp { frontend: SocketAddrV4::new(plan::INTERNAL_FRONTEND, 80) }],
        ),
        "vnet-client-to-pod" => {
            let (url, expect, expected) = if !cni.pods_in_vnet() {
                (
                    format!("http://{node}:{}/", plan::APP_NODE_PORT),
                    Expect::from(&app_name, masq),
                    entry(VnetClientToPod, Tcp, (any(plan::VM_IP), at(node, plan::APP_NODE_PORT)), (at(app, app_port), any(masq))),
                )
            } else {
                (
                    format!("http://{app}:{app_port}/"),
                    Expect::from(&app_name, plan::VM_IP),
                    entry(VnetClientToPod, Tcp, (any(plan::VM_IP), at(app, app_port)), (at(app, app_port), any(plan::VM_IP))),
                )
            };
            (
                "VM in the vnet → pod (azure-cni: the pod IP directly; kubenet and Overlay: the node IP's NodePort, DNAT + MASQUERADE)",
                vec![http(Host::Vm, url, expect)],
                vec![expected],
                vec![],
            )
        }
        "pod-to-internet" => {
            let (traffic, expected) = internet(Host::PodApp, app);
            (
                "app pod → internet server: node MASQUERADE to the node IP, then the LB's outbound SNAT (off the node)",
                traffic,
                expected,
                vec![lb_snat],
            )
        }
        "pod-to-vnet" => {
            let seen = pod_source_seen_as(app, plan::VM_IP);
            (
                "app pod → VM in the vnet (kubenet and Overlay: SNAT to the node IP; azure-cni: the pod IP is kept)",
                vec![http(Host::PodApp, format!("http://{}/", plan::VM_IP), Expect::from("vm", seen))],
                vec![entry(PodToVnet, Tcp, (any(app), at(plan::VM_IP, 80)), (at(plan::VM_IP, 80), any(seen)))],
                vec![],
            )
        }
        "pod-to-private-endpoint" => {
            let seen = pod_source_seen_as(app, plan::PE_IP);
            (
                "app pod resolves the private endpoint's FQDN (kube-dns → CoreDNS → Azure DNS privatelink zone) and connects to its private IP",
                vec![http(Host::PodApp, format!("http://{}/", plan::PE_FQDN), Expect::from("private-endpoint", seen))],
                vec![
                    entry(PodToService, Udp, (any(app), at(plan::KUBE_DNS_IP, 53)), (at(coredns, 53), any(app))),
                    entry(
                        PodToAzureDns,
                        Udp,
                        (any(coredns), at(plan::WIRESERVER, 53)),
                        (at(plan::WIRESERVER, 53), any(pod_source_seen_as(coredns, plan::WIRESERVER))),
                    ),
                    entry(PodToPrivateEndpoint, Tcp, (any(app), at(plan::PE_IP, 80)), (at(plan::PE_IP, 80), any(seen))),
                ],
                vec![InferredHop::PrivateDns { fqdn: plan::PE_FQDN, answer: plan::PE_IP }],
            )
        }
        "ingress-pod-outbound" => {
            let (traffic, expected) = internet(Host::PodIngress, ingress);
            (
                "the ingress controller pod's own outbound to the internet: node MASQUERADE, then LB SNAT",
                traffic,
                expected,
                vec![lb_snat],
            )
        }
        "onprem-to-nodeport" => (
            "on-premises client (through the VPN gateway, a declared private range) → the node IP's NodePort → DNAT + MASQUERADE (eTP Cluster) → app pod",
            vec![http(
                Host::OnPrem,
                format!("http://{node}:{}/", plan::APP_NODE_PORT),
                Expect::from(&app_name, masq),
            )],
            vec![entry(
                VnetClientToPod,
                Tcp,
                (any(plan::ON_PREMISES_CLIENT), at(node, plan::APP_NODE_PORT)),
                (at(app, app_port), any(masq)),
            )],
            vec![],
        ),
        "pod-to-api-server" => {
            let api = layout.api_server.ip();
            let port = plan::API_SERVER_PORT;
            let seen = pod_source_seen_as(app, api);
            let (expect, inferred) = match layout.api_server {
                ApiServerAccess::Public => {
                    let mut expect = Expect::from("kube-apiserver", plan::LB_OUTBOUND_IP);
                    expect.peer_ports = Some(plan::LB_OUTBOUND_PORTS);
                    (expect, vec![lb_snat])
                }
                ApiServerAccess::Private => (Expect::from("kube-apiserver", seen), vec![]),
            };
            (
                "app pod → the `kubernetes` Service 10.0.0.1:443 → node DNAT to the API server (the endpoint of default/kubernetes, no pod); public: MASQUERADE to the node IP, then the outbound SNAT; private: azure-cni keeps the pod IP, kubenet and Overlay MASQUERADE",
                vec![http(Host::PodApp, format!("http://{}:{port}/", plan::KUBERNETES_SERVICE_IP), expect)],
                vec![entry(
                    PodToApiServer,
                    Tcp,
                    (any(app), at(plan::KUBERNETES_SERVICE_IP, port)),
                    (at(api, port), any(seen)),
                )],
                inferred,
            )
        }
        "pod-to-imds" => (
            "app pod → IMDS 169.254.169.254: ip-masq-agent masquerades link-local to the node IP (IMDS answers only the VM's own address)",
            vec![http(
                Host::PodApp,
                format!("http://{}/metadata/instance", plan::IMDS),
                Expect::from("imds", node),
            )],
            vec![entry(PodToImds, Tcp, (any(app), at(plan::IMDS, 80)), (at(plan::IMDS, 80), any(node)))],
            vec![],
        ),
        "vnet-to-kubelet" => (
            "VM in the vnet → kubelet on the node IP :10250 (as metrics scrapers in the vnet do), no NAT",
            vec![http(
                Host::Vm,
                format!("http://{node}:{}/healthz", plan::KUBELET_PORT),
                Expect::from("kubelet", plan::VM_IP),
            )],
            vec![entry(
                VnetToNode,
                Tcp,
                (any(plan::VM_IP), at(node, plan::KUBELET_PORT)),
                (at(node, plan::KUBELET_PORT), any(plan::VM_IP)),
            )],
            vec![],
        ),
        "lb-inbound-cross-node" => {
            expected_on_node2 = forwarded_to_web();
            (
                "internet client → LB frontend of default/web → first node KUBE-EXT (eTP Cluster: MASQUERADE to the node IP) → DNAT to the web pod on the second node, which sees the first node's IP",
                vec![Traffic::Http(HttpRequest {
                    from: Host::Inet,
                    bind: Some(plan::CLIENT),
                    url: format!("http://{}/", plan::FRONTEND_WEB),
                    resolve_to: None,
                    expect: Expect::from(&web_name, node),
                })],
                vec![entry(LbInbound, Tcp, (any(plan::CLIENT), at(plan::FRONTEND_WEB, 80)), (at(web, app_port), any(node)))],
                vec![InferredHop::LbFloatingIp { frontend: SocketAddrV4::new(plan::FRONTEND_WEB, 80) }],
            )
        }
        "nodeport-cross-node" => {
            expected_on_node2 = forwarded_to_web();
            (
                "VM in the vnet → the first node's NodePort of default/web → DNAT + MASQUERADE (eTP Cluster) → the web pod on the second node",
                vec![http(
                    Host::Vm,
                    format!("http://{node}:{}/", plan::WEB_NODE_PORT),
                    Expect::from(&web_name, node),
                )],
                vec![entry(VnetClientToPod, Tcp, (any(plan::VM_IP), at(node, plan::WEB_NODE_PORT)), (at(web, app_port), any(node)))],
                vec![],
            )
        }
        "clusterip-cross-node" => {
            expected_on_node2 = vec![entry(PodToPod, Tcp, (any(app), at(web, app_port)), (at(web, app_port), any(app)))];
            (
                "app pod → ClusterIP of default/web → first node DNAT to the web pod on the second node (the pod IP is kept: pod CIDR / vnet are not masqueraded)",
                vec![http(Host::PodApp, format!("http://{}/", plan::WEB_CLUSTER_IP), Expect::from(&web_name, app))],
                vec![entry(PodToService, Tcp, (any(app), at(plan::WEB_CLUSTER_IP, 80)), (at(web, app_port), any(app)))],
                vec![],
            )
        }
        _ => return None,
    };
    Some(Scenario {
        name,
        cni,
        summary,
        traffic,
        expected,
        expected_on_node2,
        inferred,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_for_some_cni_and_agic_nodeport_is_kubenet_only() {
        for name in SCENARIO_NAMES {
            assert!(
                CniMode::ALL
                    .iter()
                    .any(|c| Scenario::find(*c, name).is_ok()),
                "{name}"
            );
        }
        assert!(Scenario::find(CniMode::AzureCni, "agic-nodeport").is_err());
        assert!(Scenario::find(CniMode::AzureCniOverlay, "agic-nodeport").is_err());
        assert!(Scenario::find(CniMode::Kubenet, "agc-inbound").is_err());
        assert_eq!(Scenario::all(CniMode::Kubenet).len(), 19);
        assert_eq!(Scenario::all(CniMode::AzureCni).len(), 19);
        assert_eq!(Scenario::all(CniMode::AzureCniOverlay).len(), 19);
    }

    #[test]
    fn nat_kinds_follow_aks_facts() {
        let nat = |cni, name: &str| Scenario::find(cni, name).unwrap().expected[0].nat;
        assert_eq!(nat(CniMode::Kubenet, "lb-inbound-tcp"), NatKind::DnatSnat);
        assert_eq!(nat(CniMode::Kubenet, "agic-inbound"), NatKind::None);
        assert_eq!(nat(CniMode::Kubenet, "pod-to-vnet"), NatKind::Snat);
        assert_eq!(nat(CniMode::AzureCni, "pod-to-vnet"), NatKind::None);
        assert_eq!(nat(CniMode::AzureCni, "pod-to-internet"), NatKind::Snat);
        assert_eq!(nat(CniMode::AzureCni, "vnet-client-to-pod"), NatKind::None);
        assert_eq!(
            nat(CniMode::Kubenet, "vnet-client-to-pod"),
            NatKind::DnatSnat
        );
        assert_eq!(nat(CniMode::AzureCni, "l7-ingress"), NatKind::Dnat);
        assert_eq!(nat(CniMode::AzureCniOverlay, "pod-to-vnet"), NatKind::Snat);
        assert_eq!(
            nat(CniMode::AzureCniOverlay, "vnet-client-to-pod"),
            NatKind::DnatSnat
        );
        assert_eq!(nat(CniMode::AzureCniOverlay, "agc-inbound"), NatKind::None);
        assert_eq!(nat(CniMode::AzureCni, "pod-to-imds"), NatKind::Snat);
        assert_eq!(
            nat(CniMode::AzureCni, "internal-lb-from-vnet"),
            NatKind::Dnat
        );
        assert_eq!(
            nat(CniMode::Kubenet, "lb-inbound-cross-node"),
            NatKind::DnatSnat
        );
        assert_eq!(nat(CniMode::Kubenet, "clusterip-cross-node"), NatKind::Dnat);
        assert_eq!(nat(CniMode::Kubenet, "vnet-to-kubelet"), NatKind::None);
    }

    #[test]
    fn api_server_nat_follows_access_and_cni() {
        let nat = |cni, access| {
            Scenario::find_in(&Layout::with_api_server(cni, access), "pod-to-api-server")
                .unwrap()
                .expected[0]
                .nat
        };
        for cni in CniMode::ALL {
            assert_eq!(
                nat(cni, ApiServerAccess::Public),
                NatKind::DnatSnat,
                "{cni}"
            );
        }
        assert_eq!(
            nat(CniMode::AzureCni, ApiServerAccess::Private),
            NatKind::Dnat
        );
        assert_eq!(
            nat(CniMode::Kubenet, ApiServerAccess::Private),
            NatKind::DnatSnat
        );
        assert_eq!(
            nat(CniMode::AzureCniOverlay, ApiServerAccess::Private),
            NatKind::DnatSnat
        );
    }

    #[test]
    fn cross_node_scenarios_state_both_nodes() {
        for cni in CniMode::ALL {
            for s in Scenario::all(cni) {
                let crosses = s.name.ends_with("-cross-node");
                assert_eq!(
                    !s.expected_on(Host::Node2).is_empty(),
                    crosses,
                    "{cni} {}",
                    s.name
                );
                assert!(!s.expected_on(Host::Node).is_empty(), "{cni} {}", s.name);
                for e in s.expected_on(Host::Node2) {
                    assert_eq!(e.nat, NatKind::None, "{cni} {}: {e}", s.name);
                }
            }
        }
    }
}
