//! Reads kube-proxy's Services out of `iptables-save -t nat` text.
//!
//! The rule comments carry `namespace/service:port` (see aks-facts.md, "kube-proxy"), so a node
//! agent can name Services, their frontends, NodePorts and endpoints without the API server.
//! `externalTrafficPolicy` shows in the chain a frontend jumps to: `KUBE-SVL-*` (and the older
//! `KUBE-XLB-*`) serve local endpoints only; `KUBE-SVC-*` serves all of them.

use super::{Cidr, Etp, ServiceEndpoint, ServiceKind, ServicePort};
use crate::events::Proto;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::IpAddr;

/// What kube-proxy programmed in one address family's nat table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyRules {
    pub services: Vec<ServicePort>,
    pub endpoints: Vec<ServiceEndpoint>,
    /// kube-proxy's `--cluster-cidr`, seen in its "masquerade off-cluster traffic" rules.
    pub cluster_cidrs: Vec<Cidr>,
    /// Whether a `KUBE-SERVICES` chain exists at all (it does not under Cilium's replacement).
    pub has_kube_services: bool,
    /// `KUBE-SERVICES` matches ipsets (`--match-set KUBE-CLUSTER-IP`): kube-proxy's IPVS mode.
    pub ipvs: bool,
    /// ip-masq-agent's chain, where it exists.
    pub masq: Option<MasqRules>,
}

/// What ip-masq-agent's `IP-MASQ-AGENT` chain says about its configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasqRules {
    /// nonMasqueradeCIDRs: destinations RETURNed before the final MASQUERADE, link-local aside.
    pub non_masquerade: Vec<Cidr>,
    /// masqLinkLocal: false when link-local destinations are RETURNed too.
    pub masq_link_local: bool,
}

/// ip-masq-agent's own chain in nat POSTROUTING.
const MASQ_CHAIN: &str = "IP-MASQ-AGENT";

/// One `-A CHAIN ...` line: its options, with `!` folded into the option that follows it.
#[derive(Debug, Default)]
struct Rule {
    opts: Vec<(String, bool, String)>,
}

impl Rule {
    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(n, negated, _)| n == name && !negated)
            .map(|(_, _, v)| v.as_str())
    }

    fn get_negated(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(n, negated, _)| n == name && *negated)
            .map(|(_, _, v)| v.as_str())
    }

    fn target(&self) -> Option<&str> {
        self.get("-j")
    }

    fn comment(&self) -> Option<&str> {
        self.get("--comment")
    }
}

/// Splits a rule line into words, honouring iptables-save's double quotes and backslashes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut started) = (false, false, false);
    for c in line.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            started = true;
        } else if c.is_whitespace() && !quoted {
            if started {
                out.push(std::mem::take(&mut cur));
                started = false;
            }
        } else {
            cur.push(c);
            started = true;
        }
    }
    if started {
        out.push(cur);
    }
    out
}

fn parse_rule(args: &[String]) -> Rule {
    let mut rule = Rule::default();
    let mut negate = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "!" {
            negate = true;
        } else if a.starts_with('-') {
            let value = args
                .get(i + 1)
                .filter(|v| !v.starts_with('-') || v.parse::<i64>().is_ok())
                .cloned();
            if value.is_some() {
                i += 1;
            }
            rule.opts
                .push((a.clone(), negate, value.unwrap_or_default()));
            negate = false;
        }
        i += 1;
    }
    rule
}

/// `10.0.0.1/32` or `10.0.0.1` to an address (kube-proxy writes single addresses as /32, /128).
fn host(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.parse().ok()
}

/// `10.244.0.10:8080` or `[fd00::10]:8080`.
fn endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = s.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some((ip.parse().ok()?, port.parse().ok()?))
}

fn proto(s: Option<&str>) -> Option<Proto> {
    match s? {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        "sctp" => Some(Proto::Sctp),
        _ => None,
    }
}

/// Parses `iptables-save -t nat` (or `ip6tables-save -t nat`) output.
pub fn parse_iptables_save(text: &str) -> KubeProxyRules {
    let mut chains: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    let mut in_nat = false;
    let (mut has_kube_services, mut has_masq) = (false, false);
    for line in text.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
        } else if !in_nat {
            continue;
        } else if line.starts_with(":KUBE-SERVICES ") {
            has_kube_services = true;
        } else if line.starts_with(":IP-MASQ-AGENT ") {
            has_masq = true;
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let w = words(rest);
            if let Some((chain, args)) = w.split_first() {
                chains
                    .entry(chain.clone())
                    .or_default()
                    .push(parse_rule(args));
            }
        }
    }

    let mut rules = KubeProxyRules {
        has_kube_services,
        ipvs: chains
            .get("KUBE-SERVICES")
            .into_iter()
            .flatten()
            .any(|r| r.get("--match-set").is_some()),
        masq: has_masq.then(|| masq_rules(chains.get(MASQ_CHAIN).into_iter().flatten())),
        ..Default::default()
    };
    let service_rules = chains.get("KUBE-SERVICES").into_iter().flatten();
    for r in service_rules {
        let (Some(comment), Some(target)) = (r.comment(), r.target()) else {
            continue;
        };
        if target == "KUBE-MARK-MASQ" {
            continue;
        }
        let kinds = [
            (" cluster IP", ServiceKind::ClusterIp),
            (" loadbalancer IP", ServiceKind::LoadBalancer),
            (" external IP", ServiceKind::ExternalIp),
        ];
        let Some((name, kind)) = kinds
            .iter()
            .find_map(|(suffix, kind)| comment.strip_suffix(suffix).map(|n| (n, *kind)))
        else {
            continue;
        };
        let (Some(ip), Some(p), Some(port)) = (
            r.get("-d").and_then(host),
            proto(r.get("-p")),
            r.get("--dport").and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        let etp = (kind != ServiceKind::ClusterIp)
            .then(|| policy_of(&chains, target))
            .flatten();
        rules.services.push(ServicePort {
            name: name.to_string(),
            kind,
            ip: Some(ip),
            proto: p,
            port,
            etp,
        });
    }
    for r in chains.get("KUBE-NODEPORTS").into_iter().flatten() {
        let (Some(name), Some(target)) = (r.comment(), r.target()) else {
            continue;
        };
        let (Some(p), Some(port)) = (
            proto(r.get("-p")),
            r.get("--dport").and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        if target == "KUBE-MARK-MASQ" || r.get("-s").is_some() {
            continue;
        }
        rules.services.push(ServicePort {
            name: name.to_string(),
            kind: ServiceKind::NodePort,
            ip: None,
            proto: p,
            port,
            etp: policy_of(&chains, target),
        });
    }
    let mut cidrs = HashSet::new();
    for (chain, list) in &chains {
        for r in list {
            let comment = r.comment().unwrap_or_default();
            if chain.starts_with("KUBE-SEP-") && r.target() == Some("DNAT") {
                let (Some((ip, port)), Some(p)) = (
                    r.get("--to-destination").and_then(endpoint),
                    proto(r.get("-p")),
                ) else {
                    continue;
                };
                rules.endpoints.push(ServiceEndpoint {
                    name: comment.to_string(),
                    ip,
                    port,
                    proto: p,
                });
            }
            // "! -s <cluster-cidr> ... cluster IP -j KUBE-MARK-MASQ" and "pod traffic for ..."
            // rules both name kube-proxy's cluster CIDR.
            let cidr = if comment.ends_with(" cluster IP") && r.target() == Some("KUBE-MARK-MASQ") {
                r.get_negated("-s")
            } else if comment.starts_with("pod traffic for ") {
                r.get("-s")
            } else {
                None
            };
            if let Some(c) = cidr.and_then(|c| c.parse::<Cidr>().ok()) {
                if cidrs.insert(c) {
                    rules.cluster_cidrs.push(c);
                }
            }
        }
    }
    rules
}

/// ip-masq-agent RETURNs each nonMasqueradeCIDR, and 169.254.0.0/16 too when masqLinkLocal is
/// off, before its final MASQUERADE.
fn masq_rules<'a>(list: impl Iterator<Item = &'a Rule>) -> MasqRules {
    let link_local: Cidr = "169.254.0.0/16".parse().expect("a valid prefix");
    let mut masq = MasqRules {
        masq_link_local: true,
        ..Default::default()
    };
    for cidr in list
        .filter(|r| r.target() == Some("RETURN"))
        .filter_map(|r| r.get("-d")?.parse::<Cidr>().ok())
    {
        if cidr == link_local {
            masq.masq_link_local = false;
        } else if !masq.non_masquerade.contains(&cidr) {
            masq.non_masquerade.push(cidr);
        }
    }
    masq
}

/// Follows jumps from `start` through kube-proxy's chains: reaching `KUBE-SVL-*`/`KUBE-XLB-*`
/// means Local, reaching only `KUBE-SVC-*` means Cluster.
fn policy_of(chains: &BTreeMap<String, Vec<Rule>>, start: &str) -> Option<Etp> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([start.to_string()]);
    let mut cluster = false;
    while let Some(chain) = queue.pop_front() {
        if !seen.insert(chain.clone()) {
            continue;
        }
        if chain.starts_with("KUBE-SVL-") || chain.starts_with("KUBE-XLB-") {
            return Some(Etp::Local);
        }
        if chain.starts_with("KUBE-SVC-") {
            cluster = true;
            continue;
        }
        for r in chains.get(&chain).into_iter().flatten() {
            if let Some(t) = r.target().filter(|t| t.starts_with("KUBE-")) {
                queue.push_back(t.to_string());
            }
        }
    }
    cluster.then_some(Etp::Cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's Services as kube-proxy 1.30 writes them (chain hashes shortened).
    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Wed Nov 26 13:00:00 2025
*filter
:INPUT ACCEPT [0:0]
-A INPUT -m comment --comment "default/app:http loadbalancer IP" -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:IP-MASQ-AGENT - [0:0]
:KUBE-EXT-APPHTTP000000000 - [0:0]
:KUBE-EXT-DNSUDP0000000000 - [0:0]
:KUBE-EXT-INGRESS000000000 - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-APP00000000000000 - [0:0]
:KUBE-SEP-DNS00000000000000 - [0:0]
:KUBE-SEP-ING00000000000000 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-APPHTTP000000000 - [0:0]
:KUBE-SVC-DNSUDP0000000000 - [0:0]
:KUBE-SVC-INGRESS000000000 - [0:0]
:KUBE-SVL-INGRESS000000000 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT
-A IP-MASQ-AGENT -d 10.244.0.0/16 -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
-A KUBE-EXT-APPHTTP000000000 -m comment --comment "masquerade traffic for default/app:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-APPHTTP000000000 -j KUBE-SVC-APPHTTP000000000
-A KUBE-EXT-DNSUDP0000000000 -m comment --comment "masquerade traffic for default/dns:dns external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-DNSUDP0000000000 -j KUBE-SVC-DNSUDP0000000000
-A KUBE-EXT-INGRESS000000000 -s 10.244.0.0/16 -m comment --comment "pod traffic for ingress-nginx/ingress-nginx-controller:http external destinations" -j KUBE-SVC-INGRESS000000000
-A KUBE-EXT-INGRESS000000000 -m comment --comment "masquerade LOCAL traffic for ingress-nginx/ingress-nginx-controller:http external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-INGRESS000000000 -m comment --comment "route LOCAL traffic for ingress-nginx/ingress-nginx-controller:http external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-INGRESS000000000
-A KUBE-EXT-INGRESS000000000 -j KUBE-SVL-INGRESS000000000
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/app:http" -m tcp --dport 30080 -j KUBE-EXT-APPHTTP000000000
-A KUBE-NODEPORTS -p tcp -m comment --comment "ingress-nginx/ingress-nginx-controller:http" -m tcp --dport 31080 -j KUBE-EXT-INGRESS000000000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-APP00000000000000 -s 10.244.0.10/32 -m comment --comment "default/app:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-APP00000000000000 -p tcp -m comment --comment "default/app:http" -m tcp -j DNAT --to-destination 10.244.0.10:8080
-A KUBE-SEP-DNS00000000000000 -s 10.244.0.11/32 -m comment --comment "default/dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-DNS00000000000000 -p udp -m comment --comment "default/dns:dns" -m udp -j DNAT --to-destination 10.244.0.11:5353
-A KUBE-SEP-ING00000000000000 -s 10.244.0.12/32 -m comment --comment "ingress-nginx/ingress-nginx-controller:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-ING00000000000000 -p tcp -m comment --comment "ingress-nginx/ingress-nginx-controller:http" -m tcp -j DNAT --to-destination 10.244.0.12:80
-A KUBE-SERVICES -d 10.0.12.34/32 -p tcp -m comment --comment "default/app:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-APPHTTP000000000
-A KUBE-SERVICES -d 192.0.2.10/32 -p tcp -m comment --comment "default/app:http loadbalancer IP" -m tcp --dport 80 -j KUBE-EXT-APPHTTP000000000
-A KUBE-SERVICES -d 10.0.0.53/32 -p udp -m comment --comment "default/dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-DNSUDP0000000000
-A KUBE-SERVICES -d 192.0.2.10/32 -p udp -m comment --comment "default/dns:dns loadbalancer IP" -m udp --dport 53 -j KUBE-EXT-DNSUDP0000000000
-A KUBE-SERVICES -d 10.0.80.80/32 -p tcp -m comment --comment "ingress-nginx/ingress-nginx-controller:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-INGRESS000000000
-A KUBE-SERVICES -d 192.0.2.11/32 -p tcp -m comment --comment "ingress-nginx/ingress-nginx-controller:http loadbalancer IP" -m tcp --dport 80 -j KUBE-EXT-INGRESS000000000
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-APPHTTP000000000 ! -s 10.244.0.0/16 -d 10.0.12.34/32 -p tcp -m comment --comment "default/app:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-APPHTTP000000000 -m comment --comment "default/app:http -> 10.244.0.10:8080" -j KUBE-SEP-APP00000000000000
-A KUBE-SVC-DNSUDP0000000000 ! -s 10.244.0.0/16 -d 10.0.0.53/32 -p udp -m comment --comment "default/dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-DNSUDP0000000000 -m comment --comment "default/dns:dns -> 10.244.0.11:5353" -j KUBE-SEP-DNS00000000000000
-A KUBE-SVC-INGRESS000000000 ! -s 10.244.0.0/16 -d 10.0.80.80/32 -p tcp -m comment --comment "ingress-nginx/ingress-nginx-controller:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-INGRESS000000000 -m comment --comment "ingress-nginx/ingress-nginx-controller:http -> 10.244.0.12:80" -j KUBE-SEP-ING00000000000000
-A KUBE-SVL-INGRESS000000000 -m comment --comment "ingress-nginx/ingress-nginx-controller:http -> 10.244.0.12:80" -j KUBE-SEP-ING00000000000000
COMMIT
# Completed on Wed Nov 26 13:00:00 2025
"#;

    fn find(r: &KubeProxyRules, kind: ServiceKind, port: u16) -> &ServicePort {
        r.services
            .iter()
            .find(|s| {
                s.kind == kind
                    && s.port == port
                    && (kind != ServiceKind::LoadBalancer || s.proto == Proto::Tcp)
            })
            .unwrap()
    }

    #[test]
    fn services_frontends_nodeports_and_policies() {
        let r = parse_iptables_save(SAVE);
        assert!(r.has_kube_services);
        let lb: Vec<_> = r
            .services
            .iter()
            .filter(|s| s.kind == ServiceKind::LoadBalancer)
            .map(|s| {
                (
                    s.ip.unwrap().to_string(),
                    s.proto,
                    s.port,
                    s.service(),
                    s.etp,
                )
            })
            .collect();
        assert_eq!(
            lb,
            vec![
                (
                    "192.0.2.10".into(),
                    Proto::Tcp,
                    80,
                    "default/app",
                    Some(Etp::Cluster)
                ),
                (
                    "192.0.2.10".into(),
                    Proto::Udp,
                    53,
                    "default/dns",
                    Some(Etp::Cluster)
                ),
                (
                    "192.0.2.11".into(),
                    Proto::Tcp,
                    80,
                    "ingress-nginx/ingress-nginx-controller",
                    Some(Etp::Local)
                ),
            ]
        );
        let cip = find(&r, ServiceKind::ClusterIp, 53);
        assert_eq!(
            (cip.name.as_str(), cip.ip, cip.proto, cip.etp),
            (
                "default/dns:dns",
                Some("10.0.0.53".parse().unwrap()),
                Proto::Udp,
                None
            )
        );
        let np: Vec<_> = r
            .services
            .iter()
            .filter(|s| s.kind == ServiceKind::NodePort)
            .map(|s| (s.port, s.etp))
            .collect();
        assert_eq!(
            np,
            vec![(30080, Some(Etp::Cluster)), (31080, Some(Etp::Local))]
        );
        // The filter table's lookalike comment is ignored.
        assert_eq!(r.services.len(), 3 + 3 + 2);
    }

    #[test]
    fn endpoints_and_cluster_cidr() {
        let r = parse_iptables_save(SAVE);
        let eps: Vec<_> = r
            .endpoints
            .iter()
            .map(|e| (e.name.as_str(), e.ip.to_string(), e.port, e.proto))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("default/app:http", "10.244.0.10".into(), 8080, Proto::Tcp),
                ("default/dns:dns", "10.244.0.11".into(), 5353, Proto::Udp),
                (
                    "ingress-nginx/ingress-nginx-controller:http",
                    "10.244.0.12".into(),
                    80,
                    Proto::Tcp
                ),
            ]
        );
        assert_eq!(r.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn ipv6_and_legacy_xlb_chains() {
        let save = r#"*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d fd00:10:96::1234/128 -p tcp -m comment --comment "default/app:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-V6
-A KUBE-SERVICES -d 2001:db8:f::10/128 -p tcp -m comment --comment "default/web:https loadbalancer IP" -m tcp --dport 443 -j KUBE-FW-WEB
-A KUBE-FW-WEB -m comment --comment "default/web:https loadbalancer IP" -j KUBE-XLB-WEB
-A KUBE-XLB-WEB -m comment --comment "Balancing rule 0 for default/web:https" -j KUBE-SEP-WEB6
-A KUBE-SEP-WEB6 -p tcp -m comment --comment "default/web:https" -m tcp -j DNAT --to-destination [fd00:10:244::a]:8443
COMMIT
"#;
        let r = parse_iptables_save(save);
        let lb = &r.services[1];
        assert_eq!(
            (lb.ip, lb.etp),
            (Some("2001:db8:f::10".parse().unwrap()), Some(Etp::Local))
        );
        assert_eq!(
            r.endpoints[0].ip,
            "fd00:10:244::a".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.endpoints[0].port, 8443);
    }

    #[test]
    fn ip_masq_agent_chain() {
        let r = parse_iptables_save(SAVE);
        assert_eq!(
            r.masq,
            Some(MasqRules {
                non_masquerade: vec!["10.244.0.0/16".parse().unwrap()],
                masq_link_local: true,
            })
        );
        let no_link_local = SAVE.replace(
            "-A IP-MASQ-AGENT -d 10.244.0.0/16",
            "-A IP-MASQ-AGENT -d 169.254.0.0/16 -m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN\n-A IP-MASQ-AGENT -d 10.224.0.0/12",
        );
        let masq = parse_iptables_save(&no_link_local).masq.unwrap();
        assert_eq!(
            (masq.non_masquerade, masq.masq_link_local),
            (vec!["10.224.0.0/12".parse().unwrap()], false)
        );
        assert!(!r.ipvs);
    }

    #[test]
    fn ipvs_mode_matches_ipsets() {
        let save = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ\nCOMMIT\n";
        let r = parse_iptables_save(save);
        assert!(r.ipvs && r.has_kube_services && r.masq.is_none());
    }

    #[test]
    fn no_kube_proxy_chains() {
        let r = parse_iptables_save("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        assert!(!r.has_kube_services);
        assert!(r.services.is_empty());
    }

    #[test]
    fn quoted_words() {
        assert_eq!(
            words(r#"KUBE-X -m comment --comment "a \"b\" c" -j Y"#),
            vec![
                "KUBE-X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "Y"
            ]
        );
    }
}
