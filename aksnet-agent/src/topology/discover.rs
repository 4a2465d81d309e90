//! On-node discovery, in the calling thread's network namespace (the agent calls it from a
//! thread inside the namespace it observes): interfaces and addresses (`getifaddrs`), routes
//! (`/proc/thread-self/net/{route,ipv6_route}`, which follow the thread's namespace where
//! `/proc/self/net` would follow the main thread's), and kube-proxy's chains (`iptables-save`).
//!
//! Discovery never fails: what it cannot learn it leaves unset and says why in
//! [`Discovery::notes`]; the config file and flags fill the rest.

use super::{parse_iptables_save, Cidr, CniMode, Dataplane, Interface, LbFrontend, ServiceKind};
use super::{KubeProxyRules, TopologyLayer};
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

/// What discovery found, and notes on what it could not find or cannot see.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub layer: TopologyLayer,
    pub notes: Vec<String>,
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
    /// `iptables-save -t nat` and `ip6tables-save -t nat` output, where they ran.
    pub nat_tables: Vec<String>,
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
    for tool in ["iptables-save", "ip6tables-save"] {
        match Command::new(tool).args(["-t", "nat"]).output() {
            Ok(out) if out.status.success() => s
                .nat_tables
                .push(String::from_utf8_lossy(&out.stdout).into_owned()),
            Ok(out) => s.notes.push(format!(
                "`{tool} -t nat` failed ({}): {}; kube-proxy's Services are unknown",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => s.notes.push(format!(
                "cannot run `{tool}`: {e}; install iptables in the agent image"
            )),
        }
    }
    s
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

/// Turns what the OS showed into a topology layer and notes.
pub(crate) fn derive(s: Sources) -> Discovery {
    let mut notes = s.notes;
    let mut layer = TopologyLayer::default();
    let names: Vec<&str> = s.interfaces.iter().map(|i| i.name.as_str()).collect();
    let has = |p: &dyn Fn(&str) -> bool| names.iter().any(|n| p(n));

    // The node's addresses are those on the interface(s) holding the default route.
    let uplinks: Vec<&str> = s
        .routes
        .iter()
        .filter(|r| is_default(&r.dst))
        .map(|r| r.iface.as_str())
        .collect();
    let node_addrs: Vec<&IfAddr> = s
        .addrs
        .iter()
        .filter(|a| uplinks.contains(&a.iface.as_str()) && !is_link_local(a.addr))
        .collect();
    if node_addrs.is_empty() {
        notes.push("no address on a default-route interface: node IPs unknown".into());
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
        notes.push(
            "Cilium dataplane (cilium_host / lxc* interfaces): service NAT happens in eBPF, not in \
             netfilter conntrack, so aksnet cannot see it; flows will be reported unclassified"
                .into(),
        );
    } else if names.contains(&"cbr0") {
        layer.cni = Some(CniMode::Kubenet);
        layer.bridge_gateways = Some(bridge);
    } else if has(&|n| n.starts_with("azv") || n == "azure0") {
        let subnets = layer.node_subnet.clone().unwrap_or_default();
        let in_node_subnet = |ip: &IpAddr| subnets.iter().any(|c| c.contains(*ip));
        if !pod_routes.is_empty() && pod_routes.iter().all(in_node_subnet) {
            layer.cni = Some(CniMode::AzureCni);
        } else {
            notes.push(
                "azure-cni interfaces (azv* / azure0) but no pod in the node subnet: this is \
                 azure-cni-overlay or azure-cni with a pod subnet; set cni in the config"
                    .into(),
            );
        }
        layer.local_pods = Some(pod_routes);
    } else {
        notes
            .push("no cbr0, azv*, azure0 or cilium_host interface: the CNI mode is unknown".into());
    }

    let mut rules = KubeProxyRules::default();
    for text in &s.nat_tables {
        let r = parse_iptables_save(text);
        rules.has_kube_services |= r.has_kube_services;
        rules.services.extend(r.services);
        rules.endpoints.extend(r.endpoints);
        rules.cluster_cidrs.extend(r.cluster_cidrs);
    }
    if !s.nat_tables.is_empty()
        && !rules.has_kube_services
        && layer.dataplane != Some(Dataplane::Cilium)
    {
        notes.push("no KUBE-SERVICES chain in the nat table: kube-proxy (iptables mode) is not running here".into());
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
    if !rules.cluster_cidrs.is_empty() && layer.cni != Some(CniMode::AzureCni) {
        layer.pod_cidr = Some(rules.cluster_cidrs);
    }
    if rules.has_kube_services {
        layer.services = Some(rules.services);
        layer.endpoints = Some(rules.endpoints);
    }
    layer.interfaces = Some(s.interfaces);
    Discovery { layer, notes }
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

    #[test]
    fn kubenet_node() {
        let d = derive(Sources {
            interfaces: vec![iface(1, "lo"), iface(2, "eth0"), iface(3, "cbr0"), iface(4, "veth1a2b")],
            addrs: vec![addr("lo", "127.0.0.1/8"), addr("eth0", "10.224.0.4/16"), addr("cbr0", "10.244.0.1/24")],
            routes: vec![route("0.0.0.0/0", "eth0"), route("10.224.0.0/16", "eth0"), route("10.244.0.0/24", "cbr0")],
            nat_tables: vec!["*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 192.0.2.11/32 -p tcp -m comment --comment \"ingress-nginx/ingress-nginx-controller:http loadbalancer IP\" -m tcp --dport 80 -j KUBE-EXT-I\n-A KUBE-EXT-I -j KUBE-SVL-I\n-A KUBE-SVC-I ! -s 10.244.0.0/16 -d 10.0.80.80/32 -p tcp -m comment --comment \"ingress-nginx/ingress-nginx-controller:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\nCOMMIT\n".into()],
            notes: vec![],
        });
        let l = d.layer;
        assert_eq!(l.cni, Some(CniMode::Kubenet));
        assert_eq!(l.node_ips, Some(vec!["10.224.0.4".parse().unwrap()]));
        assert_eq!(l.node_subnet, Some(vec!["10.224.0.0/16".parse().unwrap()]));
        assert_eq!(l.bridge_gateways, Some(vec!["10.244.0.1".parse().unwrap()]));
        assert_eq!(l.pod_cidr, Some(vec!["10.244.0.0/16".parse().unwrap()]));
        let f = &l.lb_frontends.unwrap()[0];
        assert_eq!(
            (f.ip.to_string(), f.external_traffic_policy),
            ("192.0.2.11".into(), Some(super::super::Etp::Local))
        );
        assert!(d.notes.is_empty(), "{:?}", d.notes);
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
        let d = derive(base.clone());
        assert_eq!(d.layer.cni, Some(CniMode::AzureCni));
        assert_eq!(
            d.layer.local_pods,
            Some(vec!["10.224.0.10".parse().unwrap()])
        );
        let mut overlay = base;
        overlay.routes[1] = route("10.244.0.10/32", "azv0011aabb");
        let d = derive(overlay);
        assert_eq!(d.layer.cni, None);
        assert!(d.notes[0].contains("azure-cni-overlay"), "{:?}", d.notes);
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
        assert_eq!(d.layer.dataplane, Some(Dataplane::Cilium));
        assert!(d.notes.iter().any(|n| n.contains("eBPF")), "{:?}", d.notes);
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
        let ifs = d.layer.interfaces.unwrap();
        assert!(ifs.iter().any(|i| i.name == "lo" && i.index > 0), "{ifs:?}");
    }
}
