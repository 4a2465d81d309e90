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
