use super::*;
use std::io::Write;

/// The config the lab writes (lab-plan.md), verbatim.
pub(crate) const LAB_CONFIG: &str = r#"cni = "kubenet"                      # kubenet | azure-cni | azure-cni-overlay
node_name = "aks-nodepool1-00000000-vmss000000"
node_ips = ["10.224.0.4"]
vnet_cidrs = ["10.224.0.0/12"]
node_subnet = "10.224.0.0/16"
pod_cidr = "10.244.0.0/16"           # kubenet/overlay: cluster pod CIDR; omitted for azure-cni
service_cidr = "10.0.0.0/16"
appgw_subnets = ["10.226.0.0/24"]
agc_subnets = []
private_endpoints = ["10.227.0.5"]
health_probe_sources = ["168.63.129.16"]
lb_outbound_ips = ["192.0.2.100"]

[[lb_frontends]]
ip = "192.0.2.10"
service = "default/app"
external_traffic_policy = "Cluster"

[[lb_frontends]]
ip = "192.0.2.11"
service = "ingress-nginx/ingress-nginx-controller"
external_traffic_policy = "Local"
"#;

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aksnet-topology-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn lab_config_parses_and_classifies_addresses() {
    let path = write_temp("lab.toml", LAB_CONFIG);
    let t = Topology::from_file(&path).unwrap();
    assert_eq!(t.cni, CniMode::Kubenet);
    assert_eq!(t.lb_frontends[1].external_traffic_policy, Some(Etp::Local));
    let classes: Vec<_> = [
        "203.0.113.10",
        "192.0.2.10",
        "192.0.2.100",
        "10.224.0.4",
        "10.244.0.10",
        "10.0.12.34",
        "10.226.0.4",
        "10.227.0.5",
        "10.225.0.4",
        "168.63.129.16",
        "169.254.169.254",
        "127.0.0.1",
    ]
    .iter()
    .map(|a| t.class_of(ip(a), false))
    .collect();
    use AddrClass::*;
    assert_eq!(
        classes,
        vec![
            Internet,
            LbFrontend,
            LbOutbound,
            NodeIp,
            Pod,
            ServiceIp,
            AppgwSubnet,
            PrivateEndpoint,
            Vnet,
            HealthProbe,
            LinkLocal,
            Loopback
        ]
    );
    // A pod interface on the path marks an address the topology did not list as a pod.
    assert_eq!(t.class_of(ip("10.224.0.10"), true), Pod);
    assert_eq!(
        t.service_at(Proto::Tcp, ip("192.0.2.11"), 80).unwrap().etp,
        Some(Etp::Local)
    );
}

#[test]
fn malformed_config_names_file_line_and_field() {
    let bad_etp = LAB_CONFIG.replace(
        "external_traffic_policy = \"Local\"",
        "external_traffic_policy = \"local\"",
    );
    let path = write_temp("bad-etp.toml", &bad_etp);
    let err = Topology::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad-etp.toml:22: field `lb_frontends.external_traffic_policy`"),
        "{err}"
    );

    let bad_cidr = LAB_CONFIG.replace("\"10.224.0.0/12\"", "\"10.224.0.0/33\"");
    let path = write_temp("bad-cidr.toml", &bad_cidr);
    let err = Topology::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("bad-cidr.toml:4: field `vnet_cidrs`"), "{err}");
    assert!(err.contains("prefix length too long"), "{err}");

    let typo = LAB_CONFIG.replace("lb_outbound_ips", "lb_outbound_ip");
    let path = write_temp("typo.toml", &typo);
    let err = Topology::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("typo.toml:12: field `lb_outbound_ip`: unknown field"),
        "{err}"
    );

    let err = Topology::from_file(Path::new("/nonexistent/aksnet.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read /nonexistent/aksnet.toml"),
        "{err}"
    );
}

#[test]
fn flags_win_over_config_which_wins_over_discovery() {
    let discovered = TopologyLayer {
        cni: Some(CniMode::AzureCni),
        node_ips: Some(vec![ip("10.224.0.99")]),
        lb_frontends: Some(vec![
            LbFrontend {
                ip: ip("192.0.2.11"),
                service: None,
                external_traffic_policy: Some(Etp::Cluster),
            },
            LbFrontend {
                ip: ip("192.0.2.12"),
                service: None,
                external_traffic_policy: Some(Etp::Cluster),
            },
        ]),
        local_pods: Some(vec![ip("10.224.0.10")]),
        ..Default::default()
    };
    let config: TopologyLayer = parse_toml(Path::new("lab.toml"), LAB_CONFIG).unwrap();
    let flags = TopologyLayer {
        cni: Some(CniMode::AzureCniOverlay),
        ..Default::default()
    };
    let t = Topology::from_layers([discovered, config, flags]).unwrap();
    assert_eq!(t.cni, CniMode::AzureCniOverlay);
    assert_eq!(t.node_ips, vec![ip("10.224.0.4")]);
    assert_eq!(t.local_pods, vec![ip("10.224.0.10")]);
    let fe: Vec<_> = t
        .lb_frontends
        .iter()
        .map(|f| (f.ip.to_string(), f.external_traffic_policy))
        .collect();
    assert_eq!(
        fe,
        vec![
            ("192.0.2.10".into(), Some(Etp::Cluster)),
            ("192.0.2.11".into(), Some(Etp::Local)),
            ("192.0.2.12".into(), Some(Etp::Cluster)),
        ]
    );
}

#[test]
fn only_the_network_mode_is_required() {
    let layer = TopologyLayer {
        cni: Some(CniMode::Kubenet),
        ..Default::default()
    };
    let t = Topology::from_layers([layer]).unwrap();
    assert!(t.vnet_cidrs.is_empty() && t.node_ips.is_empty());
    // AKS's defaults fill what has one.
    assert_eq!(t.health_probe_sources, vec![WIRESERVER]);
    assert_eq!(t.outbound_type, OutboundType::LoadBalancer);
    let err = Topology::from_layers([TopologyLayer::default()]).unwrap_err();
    assert!(matches!(err, TopologyError::NoCni), "{err}");
    assert!(err.to_string().contains("--cni"), "{err}");
}

#[test]
fn the_config_file_sets_the_new_facts() {
    let text = format!(
        "{LAB_CONFIG_HEAD}api_server = [\"10.0.0.200\"]\nprivate_ranges = [\"172.16.0.0/12\"]\nnode_pod_cidrs = [\"10.244.0.0/24\"]\nmasq_link_local = true\n"
    );
    let l: TopologyLayer = parse_toml(Path::new("new.toml"), &text).unwrap();
    let t = Topology::from_layers([l]).unwrap();
    assert_eq!(t.api_server, vec![ip("10.0.0.200")]);
    assert_eq!(t.private_ranges, vec!["172.16.0.0/12".parse().unwrap()]);
    assert_eq!(t.node_pod_cidrs, vec!["10.244.0.0/24".parse().unwrap()]);
    assert_eq!(t.masq_link_local, Some(true));
    // Discovery's lists cannot be set from a file.
    let err = parse_toml::<TopologyLayer>(Path::new("x.toml"), "services = []\n");
    assert!(err.is_err());
}

/// The start of the lab config, before its tables, to append keys to.
const LAB_CONFIG_HEAD: &str = "cni = \"kubenet\"\nnode_ips = [\"10.224.0.4\"]\n";

#[test]
fn a_frontend_keeps_what_a_lower_layer_knows_of_it() {
    let frontend = |service: Option<&str>, etp| LbFrontend {
        ip: ip("192.0.2.10"),
        service: service.map(str::to_string),
        external_traffic_policy: etp,
    };
    let iptables = TopologyLayer {
        lb_frontends: Some(vec![frontend(Some("default/app"), Some(Etp::Cluster))]),
        ..Default::default()
    };
    let imds = TopologyLayer {
        lb_frontends: Some(vec![frontend(None, None)]),
        ..Default::default()
    };
    let merged = imds.over(iptables);
    assert_eq!(
        merged.lb_frontends,
        Some(vec![frontend(Some("default/app"), Some(Etp::Cluster))])
    );
}

#[test]
fn dual_stack_pod_cidr_list() {
    let text = LAB_CONFIG.replace(
        "pod_cidr = \"10.244.0.0/16\"",
        "pod_cidr = [\"10.244.0.0/16\", \"fd00:10:244::/56\"]",
    );
    let l: TopologyLayer = parse_toml(Path::new("ds.toml"), &text).unwrap();
    let t = Topology::from_layers([l]).unwrap();
    assert_eq!(t.class_of(ip("fd00:10:244::12"), false), AddrClass::Pod);
    assert_eq!(t.class_of(ip("2001:db8::10"), false), AddrClass::Internet);
}

#[test]
fn node_subnet_api_server_private_ranges_and_pods_on_other_nodes_have_classes() {
    // Top-level keys go before the [[lb_frontends]] tables.
    let text = format!(
        "api_server = [\"198.51.100.50\", \"10.229.0.4\"]\n\
         private_ranges = [\"172.16.0.0/16\"]\nnode_pod_cidrs = [\"10.244.0.0/24\"]\n{LAB_CONFIG}"
    );
    let l: TopologyLayer = parse_toml(Path::new("facts.toml"), &text).unwrap();
    let t = Topology::from_layers([l]).unwrap();
    use AddrClass::*;
    for (addr, class) in [
        ("10.224.0.4", NodeIp),
        ("10.224.0.5", NodeSubnet),
        ("10.244.0.10", Pod),
        ("10.244.1.10", RemotePod),
        ("198.51.100.50", ApiServerPublic),
        ("10.229.0.4", ApiServerPrivate),
        ("172.16.5.5", PrivateRange),
        ("172.20.0.5", UnknownPrivate),
        ("100.64.0.1", UnknownPrivate),
        ("198.51.100.20", Internet),
    ] {
        assert_eq!(t.class_of(ip(addr), false), class, "{addr}");
    }
    assert!(UnknownPrivate.describe().contains("private_ranges"));
}

/// `class_of` as it was before the address index: every list walked in [`AddrClass`]'s order.
/// The indexed answer must be this one for every address.
fn class_by_walking(t: &Topology, ip: IpAddr, pod_side: bool) -> AddrClass {
    use AddrClass::*;
    let in_any = |cidrs: &[Cidr]| cidrs.iter().any(|c| c.contains(ip));
    let node_share_known = !t.node_pod_cidrs.is_empty() || !t.local_pods.is_empty();
    let cluster_pod = in_any(&t.pod_cidrs);
    let service = |kinds: &[ServiceKind]| {
        t.services
            .iter()
            .any(|s| s.ip == Some(ip) && kinds.contains(&s.kind))
    };
    if ip.is_loopback() {
        Loopback
    } else if t.health_probe_sources.contains(&ip) {
        HealthProbe
    } else if t.lb_frontends.iter().any(|f| f.ip == ip)
        || service(&[ServiceKind::LoadBalancer, ServiceKind::ExternalIp])
    {
        LbFrontend
    } else if t.lb_outbound_ips.contains(&ip) {
        LbOutbound
    } else if t.node_ips.contains(&ip) {
        NodeIp
    } else if t.bridge_gateways.contains(&ip) {
        BridgeGateway
    } else if pod_side
        || t.local_pods.contains(&ip)
        || in_any(&t.node_pod_cidrs)
        || (cluster_pod && !node_share_known)
    {
        Pod
    } else if cluster_pod {
        RemotePod
    } else if in_any(&t.service_cidrs) || service(&[ServiceKind::ClusterIp]) {
        ServiceIp
    } else if t.api_server.contains(&ip) {
        let private = in_any(&t.vnet_cidrs)
            || in_any(&t.node_subnets)
            || in_any(&t.private_ranges)
            || t.private_endpoints.contains(&ip)
            || is_private_use(ip);
        if private {
            ApiServerPrivate
        } else {
            ApiServerPublic
        }
    } else if in_any(&t.appgw_subnets) {
        AppgwSubnet
    } else if in_any(&t.agc_subnets) {
        AgcSubnet
    } else if t.private_endpoints.contains(&ip) {
        PrivateEndpoint
    } else if in_any(&t.node_subnets) {
        if t.cni == CniMode::AzureCni && t.endpoints.iter().any(|e| e.ip == ip) {
            RemotePod
        } else {
            NodeSubnet
        }
    } else if in_any(&t.vnet_cidrs) {
        Vnet
    } else if in_any(&t.private_ranges) {
        PrivateRange
    } else if is_link_local(ip) {
        LinkLocal
    } else if is_private_use(ip) {
        UnknownPrivate
    } else {
        Internet
    }
}

/// A topology whose lists overlap each other and its ranges wherever a real one can: a node IP
/// that is also an outbound IP, a LoadBalancer Service, a bridge gateway and in the pod CIDR; a
/// frontend that is a probe source; Service IPs inside and outside the service CIDR, of two
/// kinds at one address; endpoints in the node subnet, the pod CIDR and the service CIDR; an
/// API server that is a private endpoint; a listed loopback address.
fn overlapping_layer(cni: CniMode) -> TopologyLayer {
    let ips = |list: &[&str]| Some(list.iter().map(|a| ip(a)).collect::<Vec<_>>());
    let cidrs = |list: &[&str]| Some(list.iter().map(|c| c.parse().unwrap()).collect());
    let service = |n: u16, kind, addr: Option<&str>, proto, port| ServicePort {
        name: format!("default/s{n}:http"),
        kind,
        ip: addr.map(ip),
        proto,
        port,
        etp: [None, Some(Etp::Cluster), Some(Etp::Local)][usize::from(n % 3)],
    };
    let endpoint = |n: u16, addr: &str| ServiceEndpoint {
        name: format!("default/s{n}:http"),
        ip: ip(addr),
        port: 8080,
        proto: Tcp,
    };
    use Proto::{Tcp, Udp};
    use ServiceKind::*;
    TopologyLayer {
        cni: Some(cni),
        node_ips: ips(&["10.224.0.4", "10.244.0.4", "127.0.0.2", "fd00:10:224::4"]),
        vnet_cidrs: cidrs(&["10.224.0.0/12", "fd00:10:224::/48"]),
        node_subnet: cidrs(&["10.224.0.0/16", "fd00:10:224::/64"]),
        pod_cidr: cidrs(&["10.244.0.0/16", "fd00:10:244::/56"]),
        service_cidr: cidrs(&["10.0.0.0/16"]),
        appgw_subnets: cidrs(&["10.226.0.0/24"]),
        agc_subnets: cidrs(&["10.228.0.0/24"]),
        private_endpoints: ips(&["10.227.0.5", "10.224.0.50", "10.229.0.4"]),
        health_probe_sources: ips(&["168.63.129.16", "192.0.2.10"]),
        lb_outbound_ips: ips(&["192.0.2.100", "10.224.0.4"]),
        // Two frontends at 192.0.2.10 (the first counts); some without their Service.
        lb_frontends: Some(
            [
                ("192.0.2.10", Some("default/app"), Some(Etp::Cluster)),
                ("192.0.2.10", Some("default/other"), Some(Etp::Local)),
                ("192.0.2.11", None, None),
                ("10.224.0.100", Some("default/internal"), None),
                ("2001:db8::10", None, Some(Etp::Local)),
            ]
            .iter()
            .map(|&(a, service, etp)| LbFrontend {
                ip: ip(a),
                service: service.map(str::to_string),
                external_traffic_policy: etp,
            })
            .collect(),
        ),
        bridge_gateways: ips(&["10.244.0.1", "10.244.0.4", "fd00:10:244::1"]),
        local_pods: ips(&["10.244.0.10", "10.224.0.10", "10.0.5.5", "fd00:10:244::10"]),
        api_server: ips(&["198.51.100.40", "10.229.0.4", "10.0.0.1", "192.168.1.1"]),
        private_ranges: cidrs(&["172.16.0.0/16"]),
        node_pod_cidrs: cidrs(&["10.244.0.0/24", "fd00:10:244::/64"]),
        // Ports that share an address, a protocol or a NodePort's port, in an order where the
        // first match is sometimes at the address and sometimes the NodePort.
        services: Some(vec![
            service(1, ClusterIp, Some("10.0.12.34"), Tcp, 80),
            service(2, ClusterIp, Some("10.0.12.34"), Udp, 80),
            service(3, ClusterIp, Some("10.0.12.34"), Tcp, 443),
            service(4, ClusterIp, Some("10.96.0.10"), Udp, 53),
            service(5, ClusterIp, Some("10.224.0.60"), Tcp, 80),
            service(6, LoadBalancer, Some("192.0.2.11"), Tcp, 80),
            service(7, LoadBalancer, Some("192.0.2.11"), Tcp, 443),
            service(8, LoadBalancer, Some("192.0.2.12"), Tcp, 80),
            service(9, ClusterIp, Some("192.0.2.12"), Tcp, 80),
            service(10, LoadBalancer, Some("10.224.0.4"), Tcp, 8080),
            service(11, NodePort, None, Tcp, 8080),
            service(12, NodePort, None, Tcp, 30080),
            service(13, NodePort, None, Tcp, 30080),
            service(14, NodePort, None, Udp, 30080),
            service(15, ClusterIp, Some("10.224.0.4"), Tcp, 30080),
            service(16, ExternalIp, Some("203.0.113.7"), Tcp, 80),
            service(17, ExternalIp, Some("10.244.1.5"), Tcp, 80),
            service(18, LoadBalancer, Some("192.0.2.10"), Tcp, 80),
            service(19, ClusterIp, Some("fd00:10:96::a"), Tcp, 80),
        ]),
        endpoints: Some(vec![
            endpoint(1, "10.224.0.10"),
            endpoint(2, "10.224.0.10"),
            endpoint(3, "10.224.0.50"),
            endpoint(4, "10.224.1.20"),
            endpoint(5, "10.244.1.20"),
            endpoint(6, "10.244.0.10"),
            endpoint(7, "192.168.5.5"),
            endpoint(8, "10.0.12.99"),
            endpoint(9, "fd00:10:224::20"),
        ]),
        ..TopologyLayer::default()
    }
}

/// `a` moved by `d`, wrapping around its family's space.
fn near(a: IpAddr, d: i64) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            IpAddr::V4(((i64::from(u32::from(v4)) + d).rem_euclid(1 << 32) as u32).into())
        }
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6).wrapping_add_signed(i128::from(d))).into()),
    }
}

/// Every listed address and its neighbours, and addresses in and around every range.
fn listed_and_near(t: &Topology) -> Vec<IpAddr> {
    let listed: Vec<IpAddr> = [
        &t.node_ips,
        &t.private_endpoints,
        &t.health_probe_sources,
        &t.lb_outbound_ips,
        &t.bridge_gateways,
        &t.local_pods,
        &t.api_server,
    ]
    .into_iter()
    .flatten()
    .copied()
    .chain(t.lb_frontends.iter().map(|f| f.ip))
    .chain(t.services.iter().filter_map(|s| s.ip))
    .chain(t.endpoints.iter().map(|e| e.ip))
    .chain(
        [
            &t.vnet_cidrs,
            &t.node_subnets,
            &t.pod_cidrs,
            &t.service_cidrs,
            &t.appgw_subnets,
            &t.agc_subnets,
            &t.private_ranges,
            &t.node_pod_cidrs,
        ]
        .into_iter()
        .flatten()
        .map(Cidr::addr),
    )
    .chain(
        [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "100.64.0.1",
            "172.20.0.5",
            "fc00::5",
            "8.8.8.8",
            // IPv6 addresses ending in the node IP's bits: another family, never the node IP.
            "::ae0:4",
            "::ffff:10.224.0.4",
        ]
        .iter()
        .map(|a| ip(a)),
    )
    .collect();
    listed
        .iter()
        .flat_map(|&a| [-256, -1, 0, 1, 255, 65_536].map(|d| near(a, d)))
        .collect()
}

/// [`listed_and_near`]'s, and addresses drawn at random near them and anywhere.
fn addresses_to_compare(t: &Topology) -> Vec<IpAddr> {
    let listed = listed_and_near(t);
    let mut out = listed.clone();
    // xorshift64: the same addresses on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let r = next();
        out.push(match r % 3 {
            0 => near(
                listed[(r >> 8) as usize % listed.len()],
                (r >> 40) as i64 % 512 - 256,
            ),
            1 => IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 | (r >> 32) as u32 & 0x00ff_ffff,
            )),
            _ => IpAddr::V4(std::net::Ipv4Addr::from((r >> 32) as u32)),
        });
    }
    out
}

#[test]
fn indexed_classes_are_those_of_walking_every_list() {
    let mut compared = 0;
    for cni in CniMode::ALL {
        let full = overlapping_layer(cni);
        // Whether this node's share of the pod CIDR is known changes the pod classes.
        let variants = [
            full.clone(),
            TopologyLayer {
                node_pod_cidrs: None,
                ..full.clone()
            },
            TopologyLayer {
                node_pod_cidrs: None,
                local_pods: None,
                ..full.clone()
            },
            TopologyLayer {
                cni: Some(cni),
                ..TopologyLayer::default()
            },
        ];
        for layer in variants {
            let t = Topology::from_layers([layer]).unwrap();
            for addr in addresses_to_compare(&t) {
                for pod_side in [false, true] {
                    assert_eq!(
                        t.class_of(addr, pod_side),
                        class_by_walking(&t, addr, pod_side),
                        "{cni}: {addr} (pod side: {pod_side})"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 400_000, "{compared} comparisons");
}

/// `service_at` as it was before the address index: the frontends, then every Service port.
fn service_by_walking(t: &Topology, proto: Proto, ip: IpAddr, port: u16) -> Option<ServiceRef<'_>> {
    if let Some(f) = t.lb_frontends.iter().find(|f| f.ip == ip) {
        let discovered = t
            .services
            .iter()
            .find(|s| s.ip == Some(ip) && s.port == port);
        return Some(ServiceRef {
            name: f
                .service
                .as_deref()
                .or_else(|| discovered.map(ServicePort::service)),
            etp: f.external_traffic_policy.or(discovered.and_then(|s| s.etp)),
        });
    }
    let node_port = t.node_ips.contains(&ip) || t.bridge_gateways.contains(&ip);
    t.services
        .iter()
        .find(|s| {
            s.proto == proto
                && s.port == port
                && match s.ip {
                    Some(sip) => sip == ip,
                    None => node_port,
                }
        })
        .map(|s| ServiceRef {
            name: Some(s.service()),
            etp: s.etp,
        })
}

#[test]
fn indexed_services_are_those_of_walking_every_list() {
    let t = Topology::from_layers([overlapping_layer(CniMode::Kubenet)]).unwrap();
    let mut ports: Vec<u16> = t.services.iter().map(|s| s.port).collect();
    ports.extend([9, 8081, 30081]);
    let mut found = 0;
    for addr in listed_and_near(&t) {
        for &port in &ports {
            for proto in [Proto::Tcp, Proto::Udp] {
                let walked = service_by_walking(&t, proto, addr, port);
                assert_eq!(
                    t.service_at(proto, addr, port),
                    walked,
                    "{proto:?} {addr}:{port}"
                );
                found += usize::from(walked.is_some());
            }
        }
        let walked = t
            .endpoints
            .iter()
            .find(|e| e.ip == addr)
            .map(|e| e.name.split(':').next().unwrap_or(&e.name));
        assert_eq!(t.service_of_endpoint(addr), walked, "endpoint {addr}");
    }
    // The comparison covers Services found, not only addresses without one.
    assert!(found > 100, "{found} Services found");
}
