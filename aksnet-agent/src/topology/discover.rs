//! On-node discovery, in the calling thread's network namespace (the agent calls it from a
//! thread inside the namespace it observes): interfaces and addresses (`getifaddrs`), routes
//! (`/proc/thread-self/net/{route,ipv6_route}`, which follow the thread's namespace where
//! `/proc/self/net` would follow the main thread's), and kube-proxy's chains (`iptables-save`).
//!
//! Discovery never fails: what it cannot learn it leaves unset and says why in
//! [`Discovery::notes`]; the config file and flags fill the rest. What would blind the agent
//! (Cilium, kube-proxy in IPVS or nftables mode, no conntrack) is a [`Blindness`].

use super::{parse_iptables_save, Cidr, CniMode, Dataplane, Interface, LbFrontend, ServiceKind};
use super::{tool, KubeProxyRules, Source, TopologyLayer};
use serde::Serialize;
use std::ffi::CStr;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What discovery found, one layer per source (interfaces, then iptables), and notes on what it
/// could not find or cannot see.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub layers: Vec<(Source, TopologyLayer)>,
    pub kube_proxy: KubeProxyMode,
    pub blind: Vec<Blindness>,
    pub notes: Vec<String>,
}

/// How kube-proxy programs Services on this node, as far as the node shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeProxyMode {
    /// No kube-proxy chains, table or interface were found.
    #[default]
    NotFound,
    /// `KUBE-SERVICES` chains in iptables' legacy backend.
    IptablesLegacy,
    /// `KUBE-SERVICES` chains in iptables' nf_tables backend.
    IptablesNft,
    /// The `kube-ipvs0` interface, or ipset matches in `KUBE-SERVICES`.
    Ipvs,
    /// An `ip kube-proxy` nftables table.
    Nftables,
}

impl fmt::Display for KubeProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KubeProxyMode::NotFound => "not found",
            KubeProxyMode::IptablesLegacy => "iptables (legacy backend)",
            KubeProxyMode::IptablesNft => "iptables (nf_tables backend)",
            KubeProxyMode::Ipvs => "IPVS",
            KubeProxyMode::Nftables => "nftables",
        })
    }
}

/// A condition that hides NAT from the agent or hides the Services it needs to name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Blindness {
    CiliumDataplane,
    KubeProxyIpvs,
    KubeProxyNftables,
    ConntrackNotLoaded,
}

impl Blindness {
    pub const ALL: [Blindness; 4] = [
        Blindness::CiliumDataplane,
        Blindness::KubeProxyIpvs,
        Blindness::KubeProxyNftables,
        Blindness::ConntrackNotLoaded,
    ];

    /// The metric's `condition` label.
    pub fn label(self) -> &'static str {
        match self {
            Blindness::CiliumDataplane => "cilium_dataplane",
            Blindness::KubeProxyIpvs => "kube_proxy_ipvs",
            Blindness::KubeProxyNftables => "kube_proxy_nftables",
            Blindness::ConntrackNotLoaded => "conntrack_not_loaded",
        }
    }

    /// What the operator reads: what the agent cannot see, and why.
    pub fn warning(self) -> &'static str {
        match self {
            Blindness::CiliumDataplane => {
                "Cilium dataplane (cilium_host / lxc* interfaces): service NAT and masquerading \
                 happen in eBPF, not in netfilter conntrack, so aksnet cannot see them; flows are \
                 reported unclassified"
            }
            Blindness::KubeProxyIpvs => {
                "kube-proxy runs in IPVS mode (kube-ipvs0 / ipset rules): Service NAT is done by \
                 IPVS and its Services are not in iptables-save, so Services, NodePorts and LB \
                 frontends must come from the Kubernetes API or the config"
            }
            Blindness::KubeProxyNftables => {
                "kube-proxy runs in nftables mode (table ip kube-proxy): its Services are not in \
                 iptables-save, so Services, NodePorts and LB frontends must come from the \
                 Kubernetes API or the config"
            }
            Blindness::ConntrackNotLoaded => {
                "nf_conntrack is not loaded in the observed namespace: no connection is tracked, \
                 so no NAT can be seen until it is (kube-proxy or any NAT rule loads it)"
            }
        }
    }
}

/// An address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IfAddr {
    pub iface: String,
    pub prefix: Cidr,
    pub addr: IpAddr,
}

/// A route: destination prefix and the interface it leaves on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub dst: Cidr,
    pub iface: String,
}

/// The raw material discovery works from, gathered from the OS or given by a test.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sources {
    pub interfaces: Vec<Interface>,
    pub addrs: Vec<IfAddr>,
    pub routes: Vec<Route>,
    /// `iptables-save -t nat` and `ip6tables-save -t nat` output (both backends), where they ran.
    pub nat_tables: Vec<String>,
    /// An `ip kube-proxy` nftables table exists.
    pub nft_kube_proxy: bool,
    /// nf_conntrack is loaded (its sysctls exist in the namespace).
    pub conntrack_loaded: bool,
    pub notes: Vec<String>,
}

/// Discovers the topology of the current network namespace.
pub fn discover() -> Discovery {
    derive(gather())
}

fn gather() -> Sources {
    let mut s = Sources::default();
    match interfaces_and_addrs() {
        Ok((ifs, addrs)) => (s.interfaces, s.addrs) = (ifs, addrs),
        Err(e) => s.notes.push(format!(
            "getifaddrs failed: {e}; interfaces and node addresses are unknown"
        )),
    }
    for (file, v6) in [("route", false), ("ipv6_route", true)] {
        let path = format!("/proc/thread-self/net/{file}");
        match std::fs::read_to_string(&path) {
            Ok(text) => s.routes.extend(if v6 {
                parse_ipv6_route(&text)
            } else {
                parse_ipv4_route(&text)
            }),
            Err(e) => s.notes.push(format!("cannot read {path}: {e}")),
        }
    }
    for family in ["iptables", "ip6tables"] {
        let tool = format!("{family}-save");
        match tool::run(&tool, &["-t", "nat"], tool::DEADLINE) {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                // Rules may sit in the other backend (a kube-proxy image of another iptables
                // than the node's): read it too where its tool exists.
                let other = match backend(&text) {
                    Some(Backend::Nft) => Some("legacy"),
                    Some(Backend::Legacy) => Some("nft"),
                    None => None,
                };
                s.nat_tables.push(text);
                if let Some(other) = other {
                    let tool = format!("{family}-{other}-save");
                    match tool::run(&tool, &["-t", "nat"], tool::DEADLINE) {
                        Ok(out) if out.status.success() => s
                            .nat_tables
                            .push(String::from_utf8_lossy(&out.stdout).into_owned()),
                        // The other backend's tool is often not installed: nothing to say.
                        Ok(_) | Err(tool::ToolError::Spawn { .. }) => {}
                        Err(e) => s
                            .notes
                            .push(format!("{e}; rules in the {other} backend are unknown")),
                    }
                }
            }
            Ok(out) => s.notes.push(format!(
                "`{tool} -t nat` failed ({}): {}; kube-proxy's Services are unknown",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e @ tool::ToolError::Spawn { .. }) => s
                .notes
                .push(format!("{e}; install iptables in the agent image")),
            Err(e) => s
                .notes
                .push(format!("{e}; kube-proxy's Services are unknown")),
        }
    }
    match kube_proxy_nft_table(tool::run(
        "nft",
        &["list", "table", "ip", "kube-proxy"],
        tool::DEADLINE,
    )) {
        Ok(found) => s.nft_kube_proxy = found,
        Err(why) => s.notes.push(format!(
            "cannot tell whether kube-proxy runs in nftables mode: {why}; install nftables in \
             the agent image"
        )),
    }
    s.conntrack_loaded = std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists();
    s
}

/// Whether `nft list table ip kube-proxy` found the table; why not known when nft could not
/// answer (not installed, not permitted, hung), which is not the same as "no such table".
fn kube_proxy_nft_table(
    listed: Result<std::process::Output, tool::ToolError>,
) -> Result<bool, String> {
    let out = listed.map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(false);
    }
    Err(format!(
        "`nft list table ip kube-proxy` failed ({}): {}",
        out.status,
        stderr.trim()
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Legacy,
    Nft,
}

/// The backend `iptables-save` names in its first comment: `(legacy)` or `(nf_tables)`.
fn backend(save: &str) -> Option<Backend> {
    let header = save.lines().find(|l| l.starts_with("# Generated by"))?;
    if header.contains("(nf_tables)") {
        Some(Backend::Nft)
    } else if header.contains("(legacy)") {
        Some(Backend::Legacy)
    } else {
        None
    }
}

fn interfaces_and_addrs() -> std::io::Result<(Vec<Interface>, Vec<IfAddr>)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut ifs, mut addrs) = (Vec::<Interface>::new(), Vec::new());
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if !ifs.iter().any(|i| i.name == name) {
            // SAFETY: ifa_name is a valid C string.
            let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
            ifs.push(Interface {
                index,
                name: name.clone(),
            });
        }
        // SAFETY: the sockaddrs, when non-null, are of the family they declare.
        let (addr, mask) = unsafe { (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) };
        if let (Some(addr), Some(mask)) = (addr, mask) {
            let len = match mask {
                IpAddr::V4(m) => u32::from(m).count_ones(),
                IpAddr::V6(m) => u128::from(m).count_ones(),
            } as u8;
            if let Some(prefix) = Cidr::new(addr, len) {
                addrs.push(IfAddr {
                    iface: name,
                    prefix,
                    addr,
                });
            }
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok((ifs, addrs))
}

/// # Safety
/// `sa` must be null or point to a sockaddr of the family it declares.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: per the contract, `sa` points to a sockaddr, and to the struct of the family it
    // declares, which is read only after the family is checked.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// `/proc/net/route`: addresses are hex in host (little-endian) byte order.
fn parse_ipv4_route(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The kernel prints the address's in-memory (network-order) bytes as a native u32.
            let dst = Ipv4Addr::from(dst.to_ne_bytes());
            let len = mask.count_ones() as u8;
            Some(Route {
                dst: Cidr::new(IpAddr::V4(dst), len)?,
                iface: f[0].to_string(),
            })
        })
        .collect()
}

/// `/proc/net/ipv6_route`: destination (32 hex digits), prefix length (hex), ..., interface last.
fn parse_ipv6_route(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dst = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let iface = f.get(9)?.to_string();
            Some(Route {
                dst: Cidr::new(IpAddr::V6(Ipv6Addr::from(dst)), len)?,
                iface,
            })
        })
        .collect()
}

fn is_default(c: &Cidr) -> bool {
    c.prefix_len() == 0
}

fn is_host_route(c: &Cidr) -> bool {
    c.prefix_len() == if c.addr().is_ipv4() { 32 } else { 128 }
}

/// The AKS default Service CIDR: where every ClusterIP falls unless the cluster chose another.
const AKS_SERVICE_CIDR: &str = "10.0.0.0/16";

/// Turns what the OS showed into topology layers, blind spots and notes.
pub(crate) fn derive(s: Sources) -> Discovery {
    let mut d = Discovery {
        notes: s.notes.clone(),
        ..Discovery::default()
    };
    let interfaces = from_interfaces(&s, &mut d);
    let iptables = from_iptables(&s, &interfaces, &mut d);
    if interfaces.local_pods.is_some() && interfaces.cni.or(iptables.cni).is_none() {
        d.notes.push(
            "azure-cni interfaces (azv* / azure0) with pods neither in the node subnet nor in \
             kube-proxy's cluster CIDR: azure-cni with a pod subnet or Overlay; give it with --cni"
                .into(),
        );
    }
    if !s.conntrack_loaded {
        d.blind.push(Blindness::ConntrackNotLoaded);
    }
    d.layers = vec![
        (Source::Interfaces, interfaces),
        (Source::Iptables, iptables),
    ];
    d
}

/// The node's addresses, the CNI mode, the bridge and the pods' routes.
fn from_interfaces(s: &Sources, d: &mut Discovery) -> TopologyLayer {
    let mut layer = TopologyLayer::default();
    let names: Vec<&str> = s.interfaces.iter().map(|i| i.name.as_str()).collect();
    let has = |p: &dyn Fn(&str) -> bool| names.iter().any(|n| p(n));

    // The node's addresses are those on the interface(s) holding the default route (never the
    // loopback, where a host may route what it answers itself).
    let uplinks: Vec<&str> = s
        .routes
        .iter()
        .filter(|r| is_default(&r.dst) && r.iface != "lo")
        .map(|r| r.iface.as_str())
        .collect();
    let node_addrs: Vec<&IfAddr> = s
        .addrs
        .iter()
        .filter(|a| uplinks.contains(&a.iface.as_str()) && !is_link_local(a.addr))
        .collect();
    if node_addrs.is_empty() {
        d.notes
            .push("no address on a default-route interface: node IPs unknown".into());
    } else {
        layer.node_ips = Some(node_addrs.iter().map(|a| a.addr).collect());
        layer.node_subnet = Some(node_addrs.iter().map(|a| a.prefix).collect());
    }

    let bridge: Vec<IpAddr> = s
        .addrs
        .iter()
        .filter(|a| a.iface == "cbr0")
        .map(|a| a.addr)
        .collect();
    let pod_routes: Vec<IpAddr> = s
        .routes
        .iter()
        // Each veth's own IPv6 link-local /128 is no pod.
        .filter(|r| {
            r.iface.starts_with("azv")
                && is_host_route(&r.dst)
                && !super::is_link_local(r.dst.addr())
        })
        .map(|r| r.dst.addr())
        .collect();
    if has(&|n| n == "cilium_host" || n.starts_with("lxc")) {
        layer.dataplane = Some(Dataplane::Cilium);
        d.blind.push(Blindness::CiliumDataplane);
    } else if names.contains(&"cbr0") {
        layer.cni = Some(CniMode::Kubenet);
        layer.bridge_gateways = Some(bridge);
    } else if has(&|n| n.starts_with("azv") || n == "azure0") {
        let subnets = layer.node_subnet.clone().unwrap_or_default();
        let in_node_subnet = |ip: &IpAddr| subnets.iter().any(|c| c.contains(*ip));
        // Pods elsewhere may be Overlay's: kube-proxy's cluster CIDR tells (from_iptables).
        if !pod_routes.is_empty() && pod_routes.iter().all(in_node_subnet) {
            layer.cni = Some(CniMode::AzureCni);
        }
        layer.local_pods = Some(pod_routes);
    } else {
        d.notes
            .push("no cbr0, azv*, azure0 or cilium_host interface: the CNI mode is unknown".into());
    }
    if names.contains(&"kube-ipvs0") {
        d.kube_proxy = KubeProxyMode::Ipvs;
    }
    layer.interfaces = Some(s.interfaces.clone());
    layer
}

/// kube-proxy's Services, frontends, endpoints and cluster CIDR, the Service CIDR its ClusterIPs
/// fall in, and ip-masq-agent's configuration.
fn from_iptables(s: &Sources, interfaces: &TopologyLayer, d: &mut Discovery) -> TopologyLayer {
    let mut layer = TopologyLayer::default();
    let mut cni = interfaces.cni;
    let mut rules = KubeProxyRules::default();
    for text in &s.nat_tables {
        let r = parse_iptables_save(text);
        if r.has_kube_services && d.kube_proxy == KubeProxyMode::NotFound {
            d.kube_proxy = match backend(text) {
                Some(Backend::Legacy) => KubeProxyMode::IptablesLegacy,
                _ => KubeProxyMode::IptablesNft,
            };
        }
        if r.ipvs {
            d.kube_proxy = KubeProxyMode::Ipvs;
        }
        rules.has_kube_services |= r.has_kube_services;
        rules.services.extend(r.services);
        rules.endpoints.extend(r.endpoints);
        for c in r.cluster_cidrs {
            if !rules.cluster_cidrs.contains(&c) {
                rules.cluster_cidrs.push(c);
            }
        }
        rules.masq = rules.masq.or(r.masq);
    }
    // azure-cni interfaces whose pods all hold addresses of kube-proxy's cluster CIDR (not of the
    // node subnet, or the interfaces would have said azure-cni): Overlay.
    let pods = interfaces.local_pods.as_deref().unwrap_or_default();
    if cni.is_none()
        && !pods.is_empty()
        && pods
            .iter()
            .all(|ip| rules.cluster_cidrs.iter().any(|c| c.contains(*ip)))
    {
        cni = Some(CniMode::AzureCniOverlay);
        layer.cni = cni;
    }
    if s.nft_kube_proxy && !rules.has_kube_services {
        d.kube_proxy = KubeProxyMode::Nftables;
    }
    match d.kube_proxy {
        KubeProxyMode::Ipvs => d.blind.push(Blindness::KubeProxyIpvs),
        KubeProxyMode::Nftables => d.blind.push(Blindness::KubeProxyNftables),
        KubeProxyMode::NotFound
            if !s.nat_tables.is_empty() && !d.blind.contains(&Blindness::CiliumDataplane) =>
        {
            d.notes.push(
                "no KUBE-SERVICES chain in the nat table: kube-proxy is not running here".into(),
            )
        }
        _ => {}
    }
    let frontends: Vec<LbFrontend> = rules
        .services
        .iter()
        .filter(|svc| svc.kind == ServiceKind::LoadBalancer)
        .filter_map(|svc| Some((svc.ip?, svc)))
        .fold(Vec::new(), |mut acc, (ip, svc)| {
            if !acc.iter().any(|f: &LbFrontend| f.ip == ip) {
                acc.push(LbFrontend {
                    ip,
                    service: Some(svc.service().to_string()),
                    external_traffic_policy: svc.etp,
                });
            }
            acc
        });
    if !frontends.is_empty() {
        layer.lb_frontends = Some(frontends);
    }
    let cluster_ips = rules
        .services
        .iter()
        .filter(|svc| svc.kind == ServiceKind::ClusterIp)
        .filter_map(|svc| svc.ip);
    layer.service_cidr = Some(service_cidrs(cluster_ips)).filter(|c| !c.is_empty());
    if !rules.cluster_cidrs.is_empty() && cni != Some(CniMode::AzureCni) {
        layer.pod_cidr = Some(rules.cluster_cidrs.clone());
    }
    if let Some(masq) = rules.masq {
        // nonMasqueradeCIDRs are the pod CIDR on kubenet and Overlay and the vnet on azure-cni:
        // what is not the cluster's pod CIDR is the vnet.
        let vnet: Vec<Cidr> = masq
            .non_masquerade
            .iter()
            .filter(|c| !rules.cluster_cidrs.contains(c))
            .copied()
            .collect();
        if cni == Some(CniMode::AzureCni) && !vnet.is_empty() {
            layer.vnet_cidrs = Some(vnet);
        }
        layer.non_masquerade_cidrs = Some(masq.non_masquerade);
        layer.masq_link_local = Some(masq.masq_link_local);
    }
    if rules.has_kube_services {
        layer.api_server = Some(api_server(&rules.endpoints)).filter(|ips| !ips.is_empty());
        layer.services = Some(rules.services);
        layer.endpoints = Some(rules.endpoints);
    }
    layer
}

/// The API server's addresses without asking the API: kube-proxy DNATs the `kubernetes` Service
/// to them, so they are the endpoints of `default/kubernetes` in its chains.
fn api_server(endpoints: &[super::ServiceEndpoint]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = endpoints
        .iter()
        .filter(|e| e.name.split(':').next() == Some("default/kubernetes"))
        .map(|e| e.ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The Service CIDR per address family: AKS's default where it holds every ClusterIP, else the
/// longest prefix that does (which may be narrower than the cluster's: give --service-cidr).
fn service_cidrs(cluster_ips: impl Iterator<Item = IpAddr>) -> Vec<Cidr> {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = cluster_ips.partition(IpAddr::is_ipv4);
    let aks: Cidr = AKS_SERVICE_CIDR.parse().expect("a valid prefix");
    let v4 = if !v4.is_empty() && v4.iter().all(|ip| aks.contains(*ip)) {
        Some(aks)
    } else {
        Cidr::covering(v4)
    };
    v4.into_iter().chain(Cidr::covering(v6)).collect()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str) -> Interface {
        Interface {
            index,
            name: name.into(),
        }
    }

    fn addr(iface: &str, cidr: &str) -> IfAddr {
        let (a, _) = cidr.split_once('/').unwrap();
        IfAddr {
            iface: iface.into(),
            prefix: cidr.parse().unwrap(),
            addr: a.parse().unwrap(),
        }
    }

    fn route(dst: &str, iface: &str) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            iface: iface.into(),
        }
    }

    /// Discovery's layers merged, as the agent merges them.
    fn merged(d: &Discovery) -> TopologyLayer {
        d.layers
            .iter()
            .fold(TopologyLayer::default(), |lower, (_, upper)| {
                upper.clone().over(lower)
            })
    }

    #[test]
    fn kubenet_node() {
        let d = derive(Sources {
            interfaces: vec![iface(1, "lo"), iface(2, "eth0"), iface(3, "cbr0"), iface(4, "veth1a2b")],
            addrs: vec![addr("lo", "127.0.0.1/8"), addr("eth0", "10.224.0.4/16"), addr("cbr0", "10.244.0.1/24")],
            routes: vec![route("0.0.0.0/0", "eth0"), route("0.0.0.0/0", "lo"), route("10.224.0.0/16", "eth0"), route("10.244.0.0/24", "cbr0")],
            nat_tables: vec!["# Generated by iptables-save v1.8.9 (legacy) on Wed Nov 26 13:00:00 2025\n*nat\n:IP-MASQ-AGENT - [0:0]\n-A IP-MASQ-AGENT -d 10.244.0.0/16 -j RETURN\n-A IP-MASQ-AGENT -j MASQUERADE\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 192.0.2.11/32 -p tcp -m comment --comment \"ingress-nginx/ingress-nginx-controller:http loadbalancer IP\" -m tcp --dport 80 -j KUBE-EXT-I\n-A KUBE-SERVICES -d 10.0.80.80/32 -p tcp -m comment --comment \"ingress-nginx/ingress-nginx-controller:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-I\n-A KUBE-EXT-I -j KUBE-SVL-I\n-A KUBE-SVC-I ! -s 10.244.0.0/16 -d 10.0.80.80/32 -p tcp -m comment --comment \"ingress-nginx/ingress-nginx-controller:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\nCOMMIT\n".into()],
            nft_kube_proxy: false,
            conntrack_loaded: true,
            notes: vec![],
        });
        let l = merged(&d);
        assert_eq!(d.kube_proxy, KubeProxyMode::IptablesLegacy);
        assert_eq!(l.cni, Some(CniMode::Kubenet));
        assert_eq!(l.node_ips, Some(vec!["10.224.0.4".parse().unwrap()]));
        assert_eq!(l.node_subnet, Some(vec!["10.224.0.0/16".parse().unwrap()]));
        assert_eq!(l.bridge_gateways, Some(vec!["10.244.0.1".parse().unwrap()]));
        assert_eq!(l.pod_cidr, Some(vec!["10.244.0.0/16".parse().unwrap()]));
        assert_eq!(l.service_cidr, Some(vec!["10.0.0.0/16".parse().unwrap()]));
        // On kubenet the nonMasqueradeCIDR is the pod CIDR, not the vnet.
        assert_eq!(l.vnet_cidrs, None);
        assert_eq!(l.masq_link_local, Some(true));
        let f = &l.lb_frontends.unwrap()[0];
        assert_eq!(
            (f.ip.to_string(), f.external_traffic_policy),
            ("192.0.2.11".into(), Some(super::super::Etp::Local))
        );
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        assert!(d.blind.is_empty(), "{:?}", d.blind);
    }

    #[test]
    fn the_api_server_is_the_kubernetes_service_endpoint() {
        let d = derive(Sources {
            interfaces: vec![iface(2, "eth0"), iface(3, "cbr0")],
            addrs: vec![addr("eth0", "10.224.0.4/16")],
            routes: vec![route("0.0.0.0/0", "eth0")],
            nat_tables: vec!["*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -m comment --comment \"default/kubernetes:https cluster IP\" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y\n-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment \"default/kubernetes:https -> 198.51.100.50:443\" -j KUBE-SEP-API\n-A KUBE-SEP-API -p tcp -m comment --comment \"default/kubernetes:https\" -m tcp -j DNAT --to-destination 198.51.100.50:443\n-A KUBE-SERVICES -d 10.0.80.80/32 -p tcp -m comment --comment \"default/app:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-APP\n-A KUBE-SEP-APP -p tcp -m comment --comment \"default/app:http\" -m tcp -j DNAT --to-destination 10.244.0.10:8080\nCOMMIT\n".into()],
            conntrack_loaded: true,
            ..Default::default()
        });
        assert_eq!(
            merged(&d).api_server,
            Some(vec!["198.51.100.50".parse().unwrap()])
        );
    }

    #[test]
    fn azure_cni_vnet_from_ip_masq_agent() {
        let d = derive(Sources {
            interfaces: vec![iface(2, "eth0"), iface(5, "azv0011aabb")],
            addrs: vec![addr("eth0", "10.224.0.4/16")],
            routes: vec![
                route("0.0.0.0/0", "eth0"),
                route("10.224.0.10/32", "azv0011aabb"),
            ],
            nat_tables: vec!["*nat\n:IP-MASQ-AGENT - [0:0]\n-A IP-MASQ-AGENT -d 10.224.0.0/12 -j RETURN\n-A IP-MASQ-AGENT -d 169.254.0.0/16 -j RETURN\n-A IP-MASQ-AGENT -j MASQUERADE\nCOMMIT\n".into()],
            conntrack_loaded: true,
            ..Default::default()
        });
        let l = merged(&d);
        assert_eq!(l.cni, Some(CniMode::AzureCni));
        assert_eq!(l.vnet_cidrs, Some(vec!["10.224.0.0/12".parse().unwrap()]));
        assert_eq!(l.masq_link_local, Some(false));
        assert_eq!(d.kube_proxy, KubeProxyMode::NotFound);
        assert!(
            d.notes
                .iter()
                .any(|n| n.contains("kube-proxy is not running")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn blind_spots_are_named() {
        let ipvs = derive(Sources {
            interfaces: vec![iface(2, "eth0"), iface(3, "cbr0"), iface(4, "kube-ipvs0")],
            conntrack_loaded: true,
            ..Default::default()
        });
        assert_eq!(ipvs.kube_proxy, KubeProxyMode::Ipvs);
        assert_eq!(ipvs.blind, vec![Blindness::KubeProxyIpvs]);
        let nft = derive(Sources {
            nat_tables: vec!["*nat\nCOMMIT\n".into()],
            nft_kube_proxy: true,
            ..Default::default()
        });
        assert_eq!(nft.kube_proxy, KubeProxyMode::Nftables);
        assert_eq!(
            nft.blind,
            vec![Blindness::KubeProxyNftables, Blindness::ConntrackNotLoaded]
        );
    }

    #[test]
    fn azure_cni_flat_and_overlay_ambiguity() {
        let base = Sources {
            interfaces: vec![iface(2, "eth0"), iface(5, "azv0011aabb")],
            addrs: vec![addr("eth0", "10.224.0.4/16")],
            routes: vec![
                route("0.0.0.0/0", "eth0"),
                route("10.224.0.10/32", "azv0011aabb"),
                route("fe80::1/128", "azv0011aabb"),
            ],
            ..Default::default()
        };
        let d = merged(&derive(base.clone()));
        assert_eq!(d.cni, Some(CniMode::AzureCni));
        assert_eq!(d.local_pods, Some(vec!["10.224.0.10".parse().unwrap()]));
        let mut pod_subnet = base;
        pod_subnet.routes[1] = route("10.244.0.10/32", "azv0011aabb");
        let d = derive(pod_subnet.clone());
        assert_eq!(merged(&d).cni, None);
        assert!(d.notes[0].contains("Overlay"), "{:?}", d.notes);
        // kube-proxy's cluster CIDR holds the pods: Overlay.
        let mut overlay = pod_subnet;
        overlay.nat_tables = vec!["*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SVC-A ! -s 10.244.0.0/16 -d 10.0.0.10/32 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j KUBE-MARK-MASQ\nCOMMIT\n".into()];
        let d = derive(overlay);
        let l = merged(&d);
        assert_eq!(l.cni, Some(CniMode::AzureCniOverlay));
        assert_eq!(l.pod_cidr, Some(vec!["10.244.0.0/16".parse().unwrap()]));
        assert!(
            !d.notes.iter().any(|n| n.contains("--cni")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn cilium_is_reported_not_silent() {
        let d = derive(Sources {
            interfaces: vec![
                iface(2, "eth0"),
                iface(3, "cilium_host"),
                iface(4, "lxc12ab"),
            ],
            nat_tables: vec!["*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n".into()],
            ..Default::default()
        });
        assert_eq!(merged(&d).dataplane, Some(Dataplane::Cilium));
        assert!(
            d.blind.contains(&Blindness::CiliumDataplane),
            "{:?}",
            d.blind
        );
        assert!(Blindness::CiliumDataplane.warning().contains("eBPF"));
        // Cilium replaces kube-proxy: no note about a missing kube-proxy on top.
        assert!(
            !d.notes.iter().any(|n| n.contains("kube-proxy")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn nft_that_cannot_answer_is_not_a_no() {
        use std::os::unix::process::ExitStatusExt;
        let out = |code: i32, stderr: &str| std::process::Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: vec![],
            stderr: stderr.as_bytes().to_vec(),
        };
        assert_eq!(kube_proxy_nft_table(Ok(out(0, ""))), Ok(true));
        let absent = "Error: No such file or directory\nlist table ip kube-proxy\n";
        assert_eq!(kube_proxy_nft_table(Ok(out(1, absent))), Ok(false));
        let denied = kube_proxy_nft_table(Ok(out(1, "Error: Operation not permitted")));
        assert!(denied.unwrap_err().contains("Operation not permitted"));
        let missing = kube_proxy_nft_table(tool::run("aksnet-no-such-nft", &[], tool::DEADLINE));
        assert!(missing
            .unwrap_err()
            .contains("cannot run `aksnet-no-such-nft`"));
    }

    #[test]
    fn proc_route_formats() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100E00A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  azv0011\t0A00E00A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let r = parse_ipv4_route(v4);
        assert_eq!(
            r,
            vec![
                route("0.0.0.0/0", "eth0"),
                route("10.224.0.10/32", "azv0011")
            ]
        );
        let v6 = "fd0000100244000000000000000000aa 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 azv0011\n";
        assert_eq!(
            parse_ipv6_route(v6),
            vec![route("fd00:10:244::aa/128", "azv0011")]
        );
    }

    /// Runs the real thing in the test's own namespace: it must not fail, and what it reports
    /// about loopback must be true everywhere.
    #[test]
    fn discovers_current_namespace() {
        let d = discover();
        let ifs = merged(&d).interfaces.unwrap();
        assert!(ifs.iter().any(|i| i.name == "lo" && i.index > 0), "{ifs:?}");
    }
}
