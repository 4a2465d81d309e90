//! What the agent knows about the cluster around the node: address ranges, the node's own
//! addresses, the LB's frontends and outbound IPs, kube-proxy's Services, and the network mode.
//!
//! Layers feed it, lowest precedence first: AKS's defaults, on-node [`discover`]y (interfaces,
//! then iptables), IMDS, the Kubernetes API, the `--config` file ([`TopologyLayer::from_file`]) and
//! command-line flags. [`Facts::merge`] keeps each fact's [`Source`] and names what is missing;
//! [`Topology::from_layers`] needs only the network mode: facts nobody gave stay empty, and what
//! they would have classified is reported unclassified with the missing fact named.

mod cidr;
mod config;
mod discover;
mod facts;
pub mod imds;
mod index;
mod iptables;
mod tool;

pub use cidr::{Cidr, CidrError};
pub(crate) use config::parse_toml;
pub use config::{FileError, LoadError};
pub use discover::{discover, Blindness, Discovery};
pub use facts::{needed_flags, FactEntry, Facts, MissingFact, Source};
pub use iptables::{parse_iptables_save, KubeProxyRules, MasqRules};

use index::{AddrIndex, Lists};

use crate::events::Proto;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

pub use aksnet_common::CniMode;

/// Where service NAT happens: netfilter (kube-proxy iptables, visible in conntrack) or Cilium's
/// eBPF programs (not visible to conntrack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataplane {
    #[default]
    Iptables,
    Cilium,
}

/// A Service's `externalTrafficPolicy`, spelled as in Kubernetes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Etp {
    Cluster,
    Local,
}

impl fmt::Display for Etp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Etp::Cluster => "Cluster",
            Etp::Local => "Local",
        })
    }
}

/// The cluster's `outboundType`, spelled as in AKS: it decides who SNATs traffic leaving the vnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OutboundType {
    #[default]
    #[serde(rename = "loadBalancer")]
    LoadBalancer,
    #[serde(rename = "managedNATGateway")]
    ManagedNatGateway,
    #[serde(rename = "userAssignedNATGateway")]
    UserAssignedNatGateway,
    #[serde(rename = "userDefinedRouting")]
    UserDefinedRouting,
    #[serde(rename = "none")]
    None,
}

impl OutboundType {
    /// Who performs the off-node outbound SNAT, in operator words.
    pub fn snat_device(self) -> &'static str {
        match self {
            OutboundType::LoadBalancer => "Azure Load Balancer outbound SNAT",
            OutboundType::ManagedNatGateway | OutboundType::UserAssignedNatGateway => {
                "NAT gateway SNAT"
            }
            OutboundType::UserDefinedRouting => "firewall / NVA SNAT (user-defined routing)",
            OutboundType::None => "no outbound SNAT (outboundType none)",
        }
    }
}

/// An Azure LB frontend IP and the Service behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbFrontend {
    pub ip: IpAddr,
    /// `namespace/name`.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub external_traffic_policy: Option<Etp>,
}

/// How a Service port is reached, as kube-proxy's rule comments name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceKind {
    ClusterIp,
    LoadBalancer,
    ExternalIp,
    NodePort,
}

/// One Service port kube-proxy programs on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// `namespace/name:port-name` as in the rule comment.
    pub name: String,
    pub kind: ServiceKind,
    /// `None` for a NodePort (it matches every local address).
    pub ip: Option<IpAddr>,
    pub proto: Proto,
    pub port: u16,
    /// Known for external kinds (LoadBalancer, NodePort, external IP).
    pub etp: Option<Etp>,
}

impl ServicePort {
    /// `namespace/name` without the port name.
    pub fn service(&self) -> &str {
        self.name.split(':').next().unwrap_or(&self.name)
    }
}

/// A pod endpoint of a Service, from a `KUBE-SEP-*` DNAT rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEndpoint {
    /// `namespace/name:port-name`.
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// A network interface of the observed namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Whether an interface name is a pod-side interface of any supported mode.
pub fn is_pod_interface(name: &str) -> bool {
    name == "cbr0"
        || name == "azure0"
        || name.starts_with("veth")
        || name.starts_with("azv")
        || name.starts_with("lxc")
}

/// One source of topology facts. Every field is optional: a layer says only what it knows.
/// The config file deserializes into this type (unknown keys are errors, so a typo cannot
/// silently leave a field unset); it serializes to list the facts it sets ([`Facts`]).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyLayer {
    pub cni: Option<CniMode>,
    pub dataplane: Option<Dataplane>,
    pub node_name: Option<String>,
    pub node_ips: Option<Vec<IpAddr>>,
    pub vnet_cidrs: Option<Vec<Cidr>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub node_subnet: Option<Vec<Cidr>>,
    /// kubenet / Overlay: the cluster pod CIDR(s); azure-cni with a pod subnet: that subnet.
    #[serde(default, deserialize_with = "one_or_many")]
    pub pod_cidr: Option<Vec<Cidr>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub service_cidr: Option<Vec<Cidr>>,
    pub appgw_subnets: Option<Vec<Cidr>>,
    pub agc_subnets: Option<Vec<Cidr>>,
    pub private_endpoints: Option<Vec<IpAddr>>,
    pub health_probe_sources: Option<Vec<IpAddr>>,
    pub lb_outbound_ips: Option<Vec<IpAddr>>,
    pub outbound_type: Option<OutboundType>,
    pub lb_frontends: Option<Vec<LbFrontend>>,
    /// kubenet: `cbr0`'s addresses, the source MASQUERADE picks toward local pods.
    pub bridge_gateways: Option<Vec<IpAddr>>,
    /// Pods on this node (azure-cni: their /32 host routes).
    pub local_pods: Option<Vec<IpAddr>>,
    /// The API server's addresses: the endpoints of `default/kubernetes`.
    pub api_server: Option<Vec<IpAddr>>,
    /// Private ranges that are neither this vnet nor the internet (peered vnets, on-premises).
    pub private_ranges: Option<Vec<Cidr>>,
    /// This node's share of the pod CIDR (`Node.spec.podCIDRs`).
    pub node_pod_cidrs: Option<Vec<Cidr>>,
    /// ip-masq-agent's nonMasqueradeCIDRs (its `IP-MASQ-AGENT` chain's RETURN rules).
    pub non_masquerade_cidrs: Option<Vec<Cidr>>,
    /// ip-masq-agent's masqLinkLocal: whether link-local destinations are MASQUERADEd.
    pub masq_link_local: Option<bool>,
    /// kube-proxy's Service ports and endpoints (discovery only).
    #[serde(skip_deserializing)]
    pub services: Option<Vec<ServicePort>>,
    #[serde(skip_deserializing)]
    pub endpoints: Option<Vec<ServiceEndpoint>>,
    #[serde(skip_deserializing)]
    pub interfaces: Option<Vec<Interface>>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Cidr>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a CIDR string or an array of them"))?
    {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    items
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl TopologyLayer {
    /// AKS's defaults for the facts that have one: the bottom layer of every merge.
    pub fn defaults() -> TopologyLayer {
        TopologyLayer {
            dataplane: Some(Dataplane::Iptables),
            outbound_type: Some(OutboundType::LoadBalancer),
            health_probe_sources: Some(vec![WIRESERVER]),
            ..TopologyLayer::default()
        }
    }

    /// Reads a topology config file (the format in the lab plan).
    pub fn from_file(path: &Path) -> Result<TopologyLayer, LoadError> {
        config::read_toml(path).map(|(layer, _)| layer)
    }

    /// `self` over `lower`: every field `self` sets wins; LB frontends merge by IP, and what a
    /// frontend of `self` leaves unsaid (its Service, its policy) `lower`'s says.
    pub fn over(self, lower: TopologyLayer) -> TopologyLayer {
        let lb_frontends = match (self.lb_frontends, lower.lb_frontends) {
            (Some(mine), Some(mut theirs)) => {
                let mut merged: Vec<LbFrontend> = mine
                    .into_iter()
                    .map(|m| match theirs.iter().position(|t| t.ip == m.ip) {
                        Some(i) => {
                            let t = theirs.remove(i);
                            LbFrontend {
                                service: m.service.or(t.service),
                                external_traffic_policy: m
                                    .external_traffic_policy
                                    .or(t.external_traffic_policy),
                                ..m
                            }
                        }
                        None => m,
                    })
                    .collect();
                merged.extend(theirs);
                Some(merged)
            }
            (mine, theirs) => mine.or(theirs),
        };
        TopologyLayer {
            cni: self.cni.or(lower.cni),
            dataplane: self.dataplane.or(lower.dataplane),
            node_name: self.node_name.or(lower.node_name),
            node_ips: self.node_ips.or(lower.node_ips),
            vnet_cidrs: self.vnet_cidrs.or(lower.vnet_cidrs),
            node_subnet: self.node_subnet.or(lower.node_subnet),
            pod_cidr: self.pod_cidr.or(lower.pod_cidr),
            service_cidr: self.service_cidr.or(lower.service_cidr),
            appgw_subnets: self.appgw_subnets.or(lower.appgw_subnets),
            agc_subnets: self.agc_subnets.or(lower.agc_subnets),
            private_endpoints: self.private_endpoints.or(lower.private_endpoints),
            health_probe_sources: self.health_probe_sources.or(lower.health_probe_sources),
            lb_outbound_ips: self.lb_outbound_ips.or(lower.lb_outbound_ips),
            outbound_type: self.outbound_type.or(lower.outbound_type),
            lb_frontends,
            bridge_gateways: self.bridge_gateways.or(lower.bridge_gateways),
            local_pods: self.local_pods.or(lower.local_pods),
            api_server: self.api_server.or(lower.api_server),
            private_ranges: self.private_ranges.or(lower.private_ranges),
            node_pod_cidrs: self.node_pod_cidrs.or(lower.node_pod_cidrs),
            non_masquerade_cidrs: self.non_masquerade_cidrs.or(lower.non_masquerade_cidrs),
            masq_link_local: self.masq_link_local.or(lower.masq_link_local),
            services: self.services.or(lower.services),
            endpoints: self.endpoints.or(lower.endpoints),
            interfaces: self.interfaces.or(lower.interfaces),
        }
    }
}

/// The Azure wireserver: source of every LB health probe (and Azure DNS).
pub const WIRESERVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(168, 63, 129, 16));

/// The merged, complete topology the classifier works with. The address lists are private:
/// [`Topology::class_of`] and the Service lookups find addresses in an index built with them,
/// which must not go stale.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Topology {
    pub cni: CniMode,
    pub dataplane: Dataplane,
    pub node_name: Option<String>,
    node_ips: Vec<IpAddr>,
    pub vnet_cidrs: Vec<Cidr>,
    pub node_subnets: Vec<Cidr>,
    pub pod_cidrs: Vec<Cidr>,
    pub service_cidrs: Vec<Cidr>,
    pub appgw_subnets: Vec<Cidr>,
    pub agc_subnets: Vec<Cidr>,
    private_endpoints: Vec<IpAddr>,
    health_probe_sources: Vec<IpAddr>,
    lb_outbound_ips: Vec<IpAddr>,
    pub outbound_type: OutboundType,
    lb_frontends: Vec<LbFrontend>,
    bridge_gateways: Vec<IpAddr>,
    local_pods: Vec<IpAddr>,
    api_server: Vec<IpAddr>,
    pub private_ranges: Vec<Cidr>,
    pub node_pod_cidrs: Vec<Cidr>,
    pub non_masquerade_cidrs: Vec<Cidr>,
    pub masq_link_local: Option<bool>,
    services: Vec<ServicePort>,
    endpoints: Vec<ServiceEndpoint>,
    pub interfaces: Vec<Interface>,
    #[serde(skip)]
    index: AddrIndex,
}

/// Why a topology could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Without the network mode there is no model to classify with; everything else may be
    /// missing.
    #[error(
        "the network mode is unknown: no cbr0 bridge or azv* interface with pods in the node \
         subnet shows it; give it with --cni or `cni` in the config"
    )]
    NoCni,
}

impl Topology {
    /// Reads a topology from one config file, without discovery.
    pub fn from_file(path: &Path) -> Result<Topology, TopologyError> {
        Topology::from_layers([TopologyLayer::from_file(path)?])
    }

    /// Merges layers given lowest precedence first (discovery, config file, flags) over AKS's
    /// defaults. Only the network mode is required: see [`Facts::missing`] for the rest.
    pub fn from_layers(
        layers: impl IntoIterator<Item = TopologyLayer>,
    ) -> Result<Topology, TopologyError> {
        let merged = layers
            .into_iter()
            .fold(TopologyLayer::defaults(), |lower, upper| upper.over(lower));
        Topology::from_merged(merged)
    }

    /// The topology of an already merged layer (a [`Facts`]'s).
    pub fn from_merged(l: TopologyLayer) -> Result<Topology, TopologyError> {
        let cni = l.cni.ok_or(TopologyError::NoCni)?;
        let mut t = Topology {
            cni,
            dataplane: l.dataplane.unwrap_or_default(),
            node_name: l.node_name,
            node_ips: l.node_ips.unwrap_or_default(),
            vnet_cidrs: l.vnet_cidrs.unwrap_or_default(),
            node_subnets: l.node_subnet.unwrap_or_default(),
            pod_cidrs: l.pod_cidr.unwrap_or_default(),
            service_cidrs: l.service_cidr.unwrap_or_default(),
            appgw_subnets: l.appgw_subnets.unwrap_or_default(),
            agc_subnets: l.agc_subnets.unwrap_or_default(),
            private_endpoints: l.private_endpoints.unwrap_or_default(),
            health_probe_sources: l.health_probe_sources.unwrap_or_default(),
            lb_outbound_ips: l.lb_outbound_ips.unwrap_or_default(),
            outbound_type: l.outbound_type.unwrap_or_default(),
            lb_frontends: l.lb_frontends.unwrap_or_default(),
            bridge_gateways: l.bridge_gateways.unwrap_or_default(),
            local_pods: l.local_pods.unwrap_or_default(),
            api_server: l.api_server.unwrap_or_default(),
            private_ranges: l.private_ranges.unwrap_or_default(),
            node_pod_cidrs: l.node_pod_cidrs.unwrap_or_default(),
            non_masquerade_cidrs: l.non_masquerade_cidrs.unwrap_or_default(),
            masq_link_local: l.masq_link_local,
            services: l.services.unwrap_or_default(),
            endpoints: l.endpoints.unwrap_or_default(),
            interfaces: l.interfaces.unwrap_or_default(),
            index: AddrIndex::default(),
        };
        t.index = AddrIndex::of(&t);
        Ok(t)
    }

    /// The class of `ip`: the first that applies in [`AddrClass`]'s order. `pod_side` says the
    /// packet crossed a pod interface on this side, which marks a pod the topology did not list.
    pub fn class_of(&self, ip: IpAddr, pod_side: bool) -> AddrClass {
        let in_any = |cidrs: &[Cidr]| cidrs.iter().any(|c| c.contains(ip));
        // Without this node's share of the pod CIDR (and no listed local pods) every pod address
        // is taken for one of this node's: the flows are the same, only the hop text differs.
        let node_share_known = !self.node_pod_cidrs.is_empty() || !self.local_pods.is_empty();
        let cluster_pod = in_any(&self.pod_cidrs);
        let lists = self.index.lists(ip);
        if ip.is_loopback() {
            AddrClass::Loopback
        } else if lists.has(Lists::HEALTH_PROBE) {
            AddrClass::HealthProbe
        } else if lists.has(Lists::LB_FRONTEND) {
            AddrClass::LbFrontend
        } else if lists.has(Lists::LB_OUTBOUND) {
            AddrClass::LbOutbound
        } else if lists.has(Lists::NODE_IP) {
            AddrClass::NodeIp
        } else if lists.has(Lists::BRIDGE_GATEWAY) {
            AddrClass::BridgeGateway
        } else if pod_side
            || lists.has(Lists::LOCAL_POD)
            || in_any(&self.node_pod_cidrs)
            || (cluster_pod && !node_share_known)
        {
            AddrClass::Pod
        } else if cluster_pod {
            AddrClass::RemotePod
        } else if in_any(&self.service_cidrs) || lists.has(Lists::CLUSTER_IP) {
            AddrClass::ServiceIp
        } else if lists.has(Lists::API_SERVER) {
            if self.is_private(ip) {
                AddrClass::ApiServerPrivate
            } else {
                AddrClass::ApiServerPublic
            }
        } else if in_any(&self.appgw_subnets) {
            AddrClass::AppgwSubnet
        } else if in_any(&self.agc_subnets) {
            AddrClass::AgcSubnet
        } else if lists.has(Lists::PRIVATE_ENDPOINT) {
            AddrClass::PrivateEndpoint
        } else if in_any(&self.node_subnets) {
            // Flat azure-cni gives pods secondary addresses of the node subnet: one that
            // kube-proxy lists as a Service endpoint is taken for a pod on another node.
            if self.cni == CniMode::AzureCni && lists.has(Lists::ENDPOINT) {
                AddrClass::RemotePod
            } else {
                AddrClass::NodeSubnet
            }
        } else if in_any(&self.vnet_cidrs) {
            AddrClass::Vnet
        } else if in_any(&self.private_ranges) {
            AddrClass::PrivateRange
        } else if is_link_local(ip) {
            AddrClass::LinkLocal
        } else if is_private_use(ip) {
            AddrClass::UnknownPrivate
        } else {
            AddrClass::Internet
        }
    }

    /// Whether `ip` is reached without the outbound SNAT: the vnet, a declared private range, or
    /// a private-use address.
    fn is_private(&self, ip: IpAddr) -> bool {
        let in_any = |cidrs: &[Cidr]| cidrs.iter().any(|c| c.contains(ip));
        in_any(&self.vnet_cidrs)
            || in_any(&self.node_subnets)
            || in_any(&self.private_ranges)
            || self.index.lists(ip).has(Lists::PRIVATE_ENDPOINT)
            || is_private_use(ip)
    }

    /// The Service and policy a destination belongs to: an LB frontend, a NodePort on this
    /// node, or a ClusterIP.
    pub fn service_at(&self, proto: Proto, ip: IpAddr, port: u16) -> Option<ServiceRef<'_>> {
        let listed = self.index.get(ip);
        let at_ip = listed.map_or(&[][..], |l| &l.services[..]);
        if let Some(f) = listed.and_then(|l| l.lb_frontend) {
            let f = &self.lb_frontends[f];
            let discovered = at_ip
                .iter()
                .map(|&i| &self.services[i])
                .find(|s| s.port == port);
            return Some(ServiceRef {
                name: f
                    .service
                    .as_deref()
                    .or_else(|| discovered.map(ServicePort::service)),
                etp: f.external_traffic_policy.or(discovered.and_then(|s| s.etp)),
            });
        }
        let lists = listed.map_or_else(Lists::default, |l| l.lists);
        let node_port = lists.has(Lists::NODE_IP) || lists.has(Lists::BRIDGE_GATEWAY);
        // The first Service port a walk of the list would match: one at this IP, or a NodePort.
        let by_ip = at_ip
            .iter()
            .copied()
            .find(|&i| self.services[i].proto == proto && self.services[i].port == port);
        let by_node_port = node_port
            .then(|| self.index.node_port(proto, port))
            .flatten();
        by_ip
            .into_iter()
            .chain(by_node_port)
            .min()
            .map(|i| &self.services[i])
            .map(|s| ServiceRef {
                name: Some(s.service()),
                etp: s.etp,
            })
    }

    /// The Service whose endpoint `ip` is, if kube-proxy lists it.
    pub fn service_of_endpoint(&self, ip: IpAddr) -> Option<&str> {
        let e = &self.endpoints[self.index.get(ip)?.endpoint?];
        Some(e.name.split(':').next().unwrap_or(&e.name))
    }

    /// This node's own addresses.
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    pub fn lb_outbound_ips(&self) -> &[IpAddr] {
        &self.lb_outbound_ips
    }

    pub fn lb_frontends(&self) -> &[LbFrontend] {
        &self.lb_frontends
    }

    /// kube-proxy's Service ports on this node.
    pub fn services(&self) -> &[ServicePort] {
        &self.services
    }

    pub fn interface_name(&self, index: u32) -> Option<&str> {
        self.interfaces
            .iter()
            .find(|i| i.index == index)
            .map(|i| i.name.as_str())
    }
}

/// A destination's Service, as far as the topology knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRef<'a> {
    pub name: Option<&'a str>,
    pub etp: Option<Etp>,
}

/// RFC 1918, shared address space (RFC 6598) and IPv6 unique-local addresses: private, but
/// not known to be this vnet's nor a declared range.
fn is_private_use(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private() || (a.octets()[0] == 100 && a.octets()[1] & 0xc0 == 64),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// What an address is, from the node's point of view. Declaration order is precedence: an
/// address that is both (an Application Gateway in the vnet) gets the first class listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddrClass {
    Loopback,
    /// 168.63.129.16 (or the configured probe sources): LB health probes, Azure DNS.
    HealthProbe,
    LbFrontend,
    LbOutbound,
    /// This node's own addresses.
    NodeIp,
    /// kubenet: `cbr0`'s address.
    BridgeGateway,
    /// A pod on this node.
    Pod,
    /// A pod on another node: the pod CIDR outside this node's share; on flat azure-cni, a
    /// node-subnet address kube-proxy lists as a Service endpoint.
    RemotePod,
    ServiceIp,
    /// The API server (an endpoint of `default/kubernetes`) at a public address.
    ApiServerPublic,
    /// The API server at a private address: a private cluster's private endpoint, or API Server
    /// VNet Integration's internal LB.
    ApiServerPrivate,
    AppgwSubnet,
    AgcSubnet,
    PrivateEndpoint,
    /// The node subnet: other nodes (and, on flat azure-cni, their pods).
    NodeSubnet,
    Vnet,
    /// Operator-declared peered vnets and on-premises ranges.
    PrivateRange,
    LinkLocal,
    /// A private-use address in no range the topology knows.
    UnknownPrivate,
    Internet,
}

impl AddrClass {
    /// Operator words for messages.
    pub fn describe(self) -> &'static str {
        match self {
            AddrClass::Loopback => "loopback",
            AddrClass::HealthProbe => "Azure wireserver / health-probe address",
            AddrClass::LbFrontend => "LB frontend",
            AddrClass::LbOutbound => "LB outbound IP",
            AddrClass::NodeIp => "node IP",
            AddrClass::BridgeGateway => "cbr0's gateway",
            AddrClass::Pod => "pod",
            AddrClass::RemotePod => "pod on another node",
            AddrClass::ServiceIp => "ClusterIP",
            AddrClass::ApiServerPublic => "API server, public",
            AddrClass::ApiServerPrivate => "API server, private",
            AddrClass::AppgwSubnet => "Application Gateway subnet",
            AddrClass::AgcSubnet => "AGC subnet",
            AddrClass::PrivateEndpoint => "private endpoint",
            AddrClass::NodeSubnet => "node subnet: another node",
            AddrClass::Vnet => "vnet",
            AddrClass::PrivateRange => "declared private range",
            AddrClass::LinkLocal => "link-local",
            AddrClass::UnknownPrivate => {
                "private address outside the vnet and every declared range: list peered vnets and on-premises ranges in private_ranges"
            }
            AddrClass::Internet => "internet",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
