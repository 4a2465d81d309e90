//! The node's nat table as kube-proxy (iptables mode) and ip-masq-agent write it on AKS, and the
//! Azure LB's outbound rule, rendered as `iptables-restore` input from the layout.

use crate::lab::hash::{base32, sha256};
use crate::lab::layout::{node_of, Host, Layout, Service, TrafficPolicy};

/// kube-proxy's `portProtoHash`: base32(sha256(servicePortName + protocol))[:16].
fn port_proto_hash(svc: &Service) -> String {
    base32(&sha256(
        format!("{}{}", svc.port_name_string(), svc.proto).as_bytes(),
    ))[..16]
        .to_string()
}

pub fn svc_chain(svc: &Service) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(svc))
}

pub fn ext_chain(svc: &Service) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(svc))
}

pub fn svl_chain(svc: &Service) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(svc))
}

/// kube-proxy's `servicePortEndpointChainName`: hash of servicePortName + protocol + "ip:port".
pub fn sep_chain(svc: &Service, endpoint: &str) -> String {
    let digest = sha256(format!("{}{}{}", svc.port_name_string(), svc.proto, endpoint).as_bytes());
    format!("KUBE-SEP-{}", &base32(&digest)[..16])
}

/// Rules for the first node's nat table (a complete table: the node namespace starts empty).
pub fn node_nat_rules(layout: &Layout) -> String {
    node_nat_rules_on(layout, Host::Node)
}

/// Rules for `node`'s nat table. kube-proxy programs every Service on every node; only
/// externalTrafficPolicy Local chains differ, listing the endpoints on that node.
pub fn node_nat_rules_on(layout: &Layout, node: Host) -> String {
    let mut chains: Vec<String> = vec![
        "KUBE-SERVICES".into(),
        "KUBE-NODEPORTS".into(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
        "IP-MASQ-AGENT".into(),
    ];
    let mut rules: Vec<String> = vec![
        // kube-proxy prepends its jumps; ip-masq-agent appends its own.
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#.into(),
        r#"-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT"#.into(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into(),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into(),
    ];
    for cidr in &layout.non_masquerade_cidrs {
        rules.push(format!(
            r#"-A IP-MASQ-AGENT -d {cidr} -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN"#
        ));
    }
    rules.push(
        r#"-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE"#
            .into(),
    );

    let mut nodeport_rules = Vec::new();
    for svc in &layout.services {
        service_rules(
            layout,
            node,
            svc,
            &mut chains,
            &mut rules,
            &mut nodeport_rules,
        );
    }
    rules.extend(nodeport_rules);
    rules.push(
        r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#
            .into(),
    );
    render_table("nat", &chains, &rules)
}

fn service_rules(
    layout: &Layout,
    node: Host,
    svc: &Service,
    chains: &mut Vec<String>,
    rules: &mut Vec<String>,
    nodeport_rules: &mut Vec<String>,
) {
    let name = svc.port_name_string();
    let p = svc.proto;
    let svc_chain = svc_chain(svc);
    let external = svc.node_port.is_some() || svc.lb_ip.is_some();
    let ext_chain = ext_chain(svc);
    chains.push(svc_chain.clone());
    if external {
        chains.push(ext_chain.clone());
    }

    rules.push(format!(
        r#"-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment "{name} cluster IP" -m {p} --dport {} -j {svc_chain}"#,
        svc.cluster_ip, svc.port
    ));
    if let Some(lb_ip) = svc.lb_ip {
        rules.push(format!(
            r#"-A KUBE-SERVICES -d {lb_ip}/32 -p {p} -m comment --comment "{name} loadbalancer IP" -m {p} --dport {} -j {ext_chain}"#,
            svc.port
        ));
    }
    if let Some(node_port) = svc.node_port {
        nodeport_rules.push(format!(
            r#"-A KUBE-NODEPORTS -p {p} -m comment --comment "{name}" -m {p} --dport {node_port} -j {ext_chain}"#
        ));
    }

    if external {
        match svc.external_traffic_policy {
            TrafficPolicy::Cluster => {
                rules.push(format!(
                    r#"-A {ext_chain} -m comment --comment "masquerade traffic for {name} external destinations" -j KUBE-MARK-MASQ"#
                ));
                rules.push(format!("-A {ext_chain} -j {svc_chain}"));
            }
            TrafficPolicy::Local => {
                let svl_chain = svl_chain(svc);
                chains.push(svl_chain.clone());
                rules.push(format!(
                    r#"-A {ext_chain} -s {} -m comment --comment "pod traffic for {name} external destinations" -j {svc_chain}"#,
                    layout.cluster_cidr
                ));
                rules.push(format!(
                    r#"-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"#
                ));
                rules.push(format!(
                    r#"-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} external destinations" -m addrtype --src-type LOCAL -j {svc_chain}"#
                ));
                rules.push(format!("-A {ext_chain} -j {svl_chain}"));
                let local: Vec<Host> = svc
                    .endpoints
                    .iter()
                    .copied()
                    .filter(|e| node_of(*e) == node)
                    .collect();
                endpoint_jumps(layout, svc, &local, &svl_chain, rules);
            }
        }
    }

    rules.push(format!(
        r#"-A {svc_chain} ! -s {} -d {}/32 -p {p} -m comment --comment "{name} cluster IP" -m {p} --dport {} -j KUBE-MARK-MASQ"#,
        layout.cluster_cidr, svc.cluster_ip, svc.port
    ));
    endpoint_jumps(layout, svc, &svc.endpoints, &svc_chain, rules);

    for host in &svc.endpoints {
        let ip = layout.endpoint_ip(*host);
        let endpoint = format!("{ip}:{}", svc.target_port);
        let sep = sep_chain(svc, &endpoint);
        chains.push(sep.clone());
        rules.push(format!(
            r#"-A {sep} -s {ip}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ"#
        ));
        rules.push(format!(
            r#"-A {sep} -p {p} -m comment --comment "{name}" -m {p} -j DNAT --to-destination {endpoint}"#
        ));
    }
}

/// kube-proxy's endpoint selection among `endpoints`: random with probability 1/(remaining),
/// last one unconditional.
fn endpoint_jumps(
    layout: &Layout,
    svc: &Service,
    endpoints: &[Host],
    chain: &str,
    rules: &mut Vec<String>,
) {
    let name = svc.port_name_string();
    let n = endpoints.len();
    for (i, host) in endpoints.iter().enumerate() {
        let endpoint = format!("{}:{}", layout.endpoint_ip(*host), svc.target_port);
        let sep = sep_chain(svc, &endpoint);
        let statistic = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        rules.push(format!(
            r#"-A {chain} -m comment --comment "{name} -> {endpoint}"{statistic} -j {sep}"#
        ));
    }
}

/// The Azure LB's outbound rule: node traffic leaving for the internet gets the LB's public IP and
/// a port from the node's allocation. Floating-IP inbound replies are reply-direction traffic of
/// existing entries, so this rule never touches them.
pub fn lb_nat_rules(layout: &Layout) -> String {
    let lb = &layout.lb;
    let (lo, hi) = lb.outbound_ports;
    let rules: Vec<String> = ["tcp", "udp"]
        .iter()
        .map(|p| {
            format!(
                r#"-A POSTROUTING -s {} -o {} -p {p} -m comment --comment "azure-lb outbound rule" -j SNAT --to-source {}:{lo}-{hi}"#,
                lb.backend_subnet, lb.public_ifname, lb.outbound_ip
            )
        })
        .collect();
    render_table("nat", &[], &rules)
}

fn render_table(table: &str, chains: &[String], rules: &[String]) -> String {
    let mut out = format!("*{table}\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        out.push_str(&format!(":{builtin} ACCEPT [0:0]\n"));
    }
    for chain in chains {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in rules {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::layout::CniMode;

    #[test]
    fn chain_names_match_kube_proxy_hashing() {
        // Every cluster has `default/kubernetes:https`; its chain is KUBE-SVC-NPX46M4PTMTKRN6Y.
        let mut svc = Layout::new(CniMode::Kubenet).services[0].clone();
        (svc.name, svc.port_name) = ("kubernetes", "https");
        assert_eq!(svc_chain(&svc), "KUBE-SVC-NPX46M4PTMTKRN6Y");
        assert_eq!(ext_chain(&svc), "KUBE-EXT-NPX46M4PTMTKRN6Y");
    }

    #[test]
    fn every_jump_target_is_declared() {
        for (cni, node) in CniMode::ALL
            .into_iter()
            .flat_map(|c| Host::NODES.map(|n| (c, n)))
        {
            let text = node_nat_rules_on(&Layout::new(cni), node);
            let declared: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.split(' ').next().unwrap())
                .collect();
            for line in text.lines().filter(|l| l.starts_with("-A")) {
                let target = line
                    .rsplit(" -j ")
                    .next()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap();
                if target.starts_with("KUBE-") || target.starts_with("IP-MASQ") {
                    assert!(
                        declared.contains(&target),
                        "{target} used but not declared ({cni})"
                    );
                }
            }
        }
    }
}
