//! Deliberate misconfigurations of the lab node, as data: what the operator got wrong, what it
//! breaks, the change to the node's nat table that produces it, and the scenario whose flow shows
//! it. Applying one never touches the agent's config (`topology.toml`): it keeps what the
//! operator declared, and the node disagreeing with it is what the agent must report as
//! `deviates`.
//!
//! ```no_run
//! use xtask::lab::{CniMode, Lab, LabOptions, Misconfig};
//! let lab = Lab::up(LabOptions::new(CniMode::AzureCni))?;
//! let misconfig = Misconfig::find(CniMode::AzureCni, "missing-non-masquerade")?;
//! lab.apply(&misconfig)?;
//! lab.run(&misconfig.shown_by())?; // the answers now show the node IP instead of the pod IP
//! # Ok::<(), xtask::lab::LabError>(())
//! ```

use crate::lab::error::LabError;
use crate::lab::exec;
use crate::lab::kubeproxy;
use crate::lab::layout::{masquerade_to_pod_ip, plan, CniMode, Layout, TrafficPolicy};
use crate::lab::paths::PathId;
use crate::lab::scenario::{EndpointMatch, NatKind, PortMatch, Scenario, Traffic};
use std::fmt;
use std::net::Ipv4Addr;

/// Misconfiguration names, in the order `Misconfig::all` lists them.
pub const MISCONFIG_NAMES: [&str; 3] = [
    "missing-non-masquerade",
    "double-snat",
    "etp-cluster-declared-local",
];

/// What changes in the node's nat table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeChange {
    /// ip-masq-agent runs without this entry in nonMasqueradeCIDRs (its ConfigMap lost it).
    DropNonMasqueradeCidr(&'static str),
    /// kube-proxy programs the Service's external traffic with `policy` (the Service was
    /// changed, or the node's rules are stale), whatever the operator declared.
    KubeProxyPolicy {
        /// `namespace/name`.
        service: &'static str,
        policy: TrafficPolicy,
    },
    /// Rules someone added to the nat table by hand, in `iptables-restore` syntax.
    ExtraNatRules(Vec<String>),
}

impl fmt::Display for NodeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeChange::DropNonMasqueradeCidr(cidr) => {
                write!(f, "ip-masq-agent without {cidr} in nonMasqueradeCIDRs")
            }
            NodeChange::KubeProxyPolicy { service, policy } => write!(
                f,
                "kube-proxy programs {service} as externalTrafficPolicy {}",
                policy.as_str()
            ),
            NodeChange::ExtraNatRules(rules) => {
                write!(f, "hand-added nat rules: {}", rules.join("; "))
            }
        }
    }
}

/// Where the server of the affected scenario sees the source the broken node gives the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenAs {
    /// As the connection's peer address.
    Peer,
    /// As the first X-Forwarded-For address, added by an in-cluster proxy that got the
    /// SNATed connection.
    ForwardedFor,
}

/// How a misconfiguration shows: the node SNATs one flow of one scenario that the model says
/// keeps its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symptom {
    pub scenario: &'static str,
    /// The flow (by the path it is on) the node now SNATs.
    pub path: PathId,
    /// The source address the broken node gives it.
    pub snat_to: Ipv4Addr,
    pub seen_as: SeenAs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Misconfig {
    pub name: &'static str,
    pub cni: CniMode,
    /// What the operator got wrong and what it breaks, in operator words.
    pub breaks: &'static str,
    pub change: NodeChange,
    pub symptom: Symptom,
    /// Other scenarios whose flows it changes too: they are neither the symptom nor unaffected.
    pub also_affects: &'static [&'static str],
}

fn build(cni: CniMode, name: &'static str) -> Option<Misconfig> {
    let masq = masquerade_to_pod_ip(cni);
    let (breaks, change, symptom, also_affects) = match name {
        // kubenet and Overlay do not keep vnet traffic unmasqueraded in the first place.
        "missing-non-masquerade" if cni == CniMode::AzureCni => (
            "ip-masq-agent's nonMasqueradeCIDRs lost the vnet: pod traffic to the vnet (VMs, \
             private endpoints, other pods) is MASQUERADEd to the node IP, so vnet peers see \
             the node instead of the pod and NSG rules or allow-lists written for pod IPs stop \
             matching",
            NodeChange::DropNonMasqueradeCidr(plan::VNET_CIDR),
            Symptom {
                scenario: "pod-to-vnet",
                path: PathId::PodToVnet,
                snat_to: plan::NODE_IP,
                seen_as: SeenAs::Peer,
            },
            // Every forwarded packet to a vnet address goes through IP-MASQ-AGENT, inbound ones
            // to pods too; only flows kube-proxy already MASQUERADEs, or that leave the vnet,
            // or that end on the node itself, are unchanged.
            &[
                "l7-ingress",
                "agic-inbound",
                "agc-inbound",
                "vnet-client-to-pod",
                "internal-lb-from-vnet",
                "pod-to-private-endpoint",
                "clusterip-cross-node",
            ][..],
        ),
        "missing-non-masquerade" => return None,
        "double-snat" => (
            "a hand-added MASQUERADE for the Application Gateway subnet: connections the \
             gateway already proxied (their source is its private IP) are SNATed a second time \
             on the node, so pods see the node's address instead of the gateway's and \
             per-gateway-instance logs and allow-lists break",
            NodeChange::ExtraNatRules(vec![format!(
                r#"-A POSTROUTING -s {} -o {} -m comment --comment "custom: masquerade Application Gateway traffic to pods" -j MASQUERADE"#,
                plan::APPGW_SUBNET,
                if cni == CniMode::Kubenet {
                    "cbr0"
                } else {
                    "azv+"
                }
            )]),
            Symptom {
                scenario: "agic-inbound",
                path: PathId::AgicInbound,
                snat_to: masq,
                seen_as: SeenAs::Peer,
            },
            &[][..],
        ),
        "etp-cluster-declared-local" => (
            "the ingress Service is declared externalTrafficPolicy Local, but the node's \
             kube-proxy rules treat it as Cluster (KUBE-EXT -> KUBE-MARK-MASQ -> MASQUERADE): \
             the ingress controller sees the node's address, the client address is lost and \
             X-Forwarded-For carries the node's address",
            NodeChange::KubeProxyPolicy {
                service: "ingress-nginx/ingress-nginx-controller",
                policy: TrafficPolicy::Cluster,
            },
            Symptom {
                scenario: "l7-ingress",
                path: PathId::L7Ingress,
                snat_to: masq,
                seen_as: SeenAs::ForwardedFor,
            },
            &[][..],
        ),
        _ => return None,
    };
    Some(Misconfig {
        name,
        cni,
        breaks,
        change,
        symptom,
        also_affects,
    })
}

impl Misconfig {
    /// Every misconfiguration that applies to this CNI, in `MISCONFIG_NAMES` order.
    pub fn all(cni: CniMode) -> Vec<Misconfig> {
        MISCONFIG_NAMES
            .iter()
            .filter_map(|name| build(cni, name))
            .collect()
    }

    pub fn find(cni: CniMode, name: &str) -> Result<Misconfig, LabError> {
        MISCONFIG_NAMES
            .iter()
            .find(|n| **n == name)
            .and_then(|n| build(cni, n))
            .ok_or_else(|| LabError::UnknownMisconfig {
                name: name.to_string(),
                cni: cni.to_string(),
                known: Misconfig::all(cni)
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The symptom's scenario as it runs on the misconfigured node: its answers show the
    /// SNATed source and the affected conntrack entry is SNATed; everything else is as
    /// documented.
    pub fn shown_by(&self) -> Scenario {
        let s = &self.symptom;
        let mut scenario = Scenario::find(self.cni, s.scenario)
            .expect("a misconfiguration's symptom names a scenario of its CNI");
        // The scenarios' steps all reach the server through the flow the symptom names.
        for traffic in &mut scenario.traffic {
            let expect = match traffic {
                Traffic::Http(r) => &mut r.expect,
                Traffic::Udp(q) => &mut q.expect,
            };
            match s.seen_as {
                SeenAs::Peer => expect.peer_ip = Some(s.snat_to),
                SeenAs::ForwardedFor => expect.forwarded_for = Some(s.snat_to),
            }
        }
        for entry in scenario.expected.iter_mut().filter(|e| e.path == s.path) {
            entry.reply.dst = EndpointMatch {
                ip: s.snat_to,
                port: PortMatch::Any,
            };
            entry.nat = match entry.nat {
                NatKind::None | NatKind::Snat => NatKind::Snat,
                NatKind::Dnat | NatKind::DnatSnat => NatKind::DnatSnat,
            };
        }
        scenario
    }

    /// The scenarios of the CNI this misconfiguration leaves alone: they run exactly as
    /// documented on the misconfigured node.
    pub fn unaffected(&self) -> Vec<Scenario> {
        Scenario::all(self.cni)
            .into_iter()
            .filter(|s| s.name != self.symptom.scenario && !self.also_affects.contains(&s.name))
            .collect()
    }

    /// The `iptables-restore --noflush` input that makes the node's nat table (as the lab
    /// builds it from `layout`) misconfigured.
    pub fn nat_change(&self, layout: &Layout) -> String {
        let lines = match &self.change {
            NodeChange::ExtraNatRules(rules) => rules.clone(),
            NodeChange::DropNonMasqueradeCidr(cidr) => {
                let mut changed = layout.clone();
                changed.non_masquerade_cidrs.retain(|c| c != cidr);
                rerender(layout, &changed)
            }
            NodeChange::KubeProxyPolicy { service, policy } => {
                let mut changed = layout.clone();
                changed
                    .services
                    .iter_mut()
                    .filter(|s| s.namespaced_name() == *service)
                    .for_each(|s| s.external_traffic_policy = *policy);
                rerender(layout, &changed)
            }
        };
        format!("*nat\n{}\nCOMMIT\n", lines.join("\n"))
    }
}

impl fmt::Display for Misconfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}; on the node: {}",
            self.name, self.cni, self.breaks, self.change
        )
    }
}

/// Applies the misconfiguration to the nat table of the node namespace, in one atomic restore.
pub(crate) fn apply(node_netns: &str, layout: &Layout, m: &Misconfig) -> Result<(), LabError> {
    exec::in_ns_with_input(
        node_netns,
        &["iptables-restore", "--noflush"],
        &m.nat_change(layout),
    )?;
    Ok(())
}

/// A rendered nat table's chains in declaration order, each with its `-A` lines.
fn chains_of(table: &str) -> Vec<(String, Vec<String>)> {
    let mut chains: Vec<(String, Vec<String>)> = table
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split(' ').next())
        .map(|name| (name.to_string(), Vec::new()))
        .collect();
    for rule in table.lines().filter(|l| l.starts_with("-A ")) {
        let chain = rule.split(' ').nth(1).unwrap_or_default();
        if let Some((_, rules)) = chains.iter_mut().find(|(c, _)| c == chain) {
            rules.push(rule.to_string());
        }
    }
    chains
}

const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// The restore lines that turn the node's nat table rendered from `before` into the one rendered
/// from `after`: every chain that differs is flushed and refilled, new chains are created first
/// and chains no longer rendered are removed last (once nothing jumps to them). Chains that do
/// not differ, and rules added by hand, are left alone.
fn rerender(before: &Layout, after: &Layout) -> Vec<String> {
    let old = chains_of(&kubeproxy::node_nat_rules(before));
    let new = chains_of(&kubeproxy::node_nat_rules(after));
    let find = |chains: &[(String, Vec<String>)], name: &str| {
        chains
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, r)| r.clone())
    };
    let (mut prepare, mut fill, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    for (chain, rules) in &new {
        match find(&old, chain) {
            Some(old_rules) if old_rules == *rules => continue,
            Some(_) => prepare.push(format!("-F {chain}")),
            None => prepare.push(format!("-N {chain}")),
        }
        fill.extend(rules.iter().cloned());
    }
    for (chain, _) in &old {
        if find(&new, chain).is_none() && !BUILTIN_CHAINS.contains(&chain.as_str()) {
            prepare.push(format!("-F {chain}"));
            remove.push(format!("-X {chain}"));
        }
    }
    prepare.into_iter().chain(fill).chain(remove).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nat table after restore `lines` (only -N, -F, -X, -A) on a rendered table.
    fn after_restore(table: &str, lines: &[String]) -> Vec<(String, Vec<String>)> {
        let mut chains = chains_of(table);
        for line in lines {
            let (op, rest) = line.split_once(' ').unwrap();
            let chain = rest.split(' ').next().unwrap().to_string();
            let at = chains.iter().position(|(c, _)| *c == chain);
            match (op, at) {
                ("-N", None) => chains.push((chain, Vec::new())),
                ("-F", Some(i)) => chains[i].1.clear(),
                ("-X", Some(i)) if chains[i].1.is_empty() => {
                    chains.remove(i);
                }
                ("-A", Some(i)) => chains[i].1.push(line.clone()),
                _ => panic!("iptables-restore would refuse `{line}`"),
            }
        }
        chains.sort();
        chains
    }

    #[test]
    fn rerendering_changes_reach_exactly_the_changed_table() {
        for cni in CniMode::ALL {
            let layout = Layout::new(cni);
            for m in Misconfig::all(cni) {
                let text = m.nat_change(&layout);
                let lines: Vec<String> = text
                    .lines()
                    .filter(|l| l.starts_with('-'))
                    .map(String::from)
                    .collect();
                assert!(!lines.is_empty(), "{m}");
                let mut changed = layout.clone();
                match &m.change {
                    NodeChange::DropNonMasqueradeCidr(cidr) => {
                        changed.non_masquerade_cidrs.retain(|c| c != cidr)
                    }
                    NodeChange::KubeProxyPolicy { service, policy } => {
                        let svc = changed
                            .services
                            .iter_mut()
                            .find(|s| s.namespaced_name() == *service)
                            .expect("the Service exists");
                        svc.external_traffic_policy = *policy;
                    }
                    NodeChange::ExtraNatRules(_) => continue,
                }
                let mut expected = chains_of(&kubeproxy::node_nat_rules(&changed));
                expected.sort();
                assert_eq!(
                    after_restore(&kubeproxy::node_nat_rules(&layout), &lines),
                    expected,
                    "{m}"
                );
            }
        }
    }

    #[test]
    fn missing_non_masquerade_drops_only_the_vnet_return_rule() {
        let m = Misconfig::find(CniMode::AzureCni, "missing-non-masquerade").unwrap();
        let text = m.nat_change(&Layout::new(CniMode::AzureCni));
        assert!(text.contains("-F IP-MASQ-AGENT"), "{text}");
        assert!(!text.contains(plan::VNET_CIDR), "{text}");
        assert!(text.contains("-A IP-MASQ-AGENT -m comment"), "{text}");
        assert!(Misconfig::find(CniMode::Kubenet, "missing-non-masquerade").is_err());
    }

    #[test]
    fn symptoms_change_one_flow_of_a_real_scenario() {
        for cni in CniMode::ALL {
            for m in Misconfig::all(cni) {
                let documented = Scenario::find(cni, m.symptom.scenario).unwrap();
                let shown = m.shown_by();
                let changed: Vec<_> = documented
                    .expected
                    .iter()
                    .zip(&shown.expected)
                    .filter(|(a, b)| a != b)
                    .collect();
                assert_eq!(changed.len(), 1, "{m}");
                let (before, after) = changed[0];
                assert_eq!(before.path, m.symptom.path, "{m}");
                assert_ne!(before.nat, after.nat, "{m}: the model keeps its source");
                assert_ne!(documented.traffic, shown.traffic, "{m}");
                let unaffected = m.unaffected();
                assert!(!unaffected.is_empty(), "{m}");
                assert!(
                    unaffected
                        .iter()
                        .all(|s| s.name != m.symptom.scenario && !m.also_affects.contains(&s.name)),
                    "{m}"
                );
                for name in m.also_affects {
                    Scenario::find(cni, name).unwrap();
                }
            }
        }
        assert_eq!(Misconfig::all(CniMode::Kubenet).len(), 2);
        assert_eq!(Misconfig::all(CniMode::AzureCni).len(), 3);
        assert_eq!(Misconfig::all(CniMode::AzureCniOverlay).len(), 2);
    }
}
