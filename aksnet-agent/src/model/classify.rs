//! Matches a flow against a model's rows and compares the NAT the node applied with the NAT the
//! matched row expects.

use super::{Direction, DnatExpect, HopKind, Model, ModelEvidence, PathRow, SnatSource};
use crate::events::{Endpoint, FlowEvent, Tuple};
use crate::topology::{
    is_pod_interface, AddrClass, CniMode, Dataplane, ServiceKind, ServiceRef, Topology,
};
use serde::Serialize;
use std::net::IpAddr;

/// A path id from the model (`lb-inbound`, `pod-to-internet`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PathId(pub String);

impl std::fmt::Display for PathId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Conforms,
    Deviates,
    Unclassified,
}

/// How the agent knows about a hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evidence {
    /// Seen on the node (conntrack tuples, interfaces).
    Observed,
    /// Off the node: deduced from the topology.
    Inferred,
    /// The model expects it on the node, conntrack does not show it.
    ExpectedNotSeen,
}

/// One hop of a flow's path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub kind: HopKind,
    /// What the hop is, in the seed's words, e.g. "Azure Load Balancer (L4)".
    pub what: String,
    pub evidence: Evidence,
    /// False for NAT conntrack shows but the model does not have.
    pub in_model: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inferred_from: Option<String>,
    /// An endpoint's address (`ip:port`) or the node's address and interfaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// For a NAT or proxy hop: the address it rewrites, before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// The result of classifying one flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub path: Option<PathId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// `None` when the network mode is unknown: no model applies.
    pub cni: Option<CniMode>,
    pub verdict: Verdict,
    pub hops: Vec<Hop>,
    /// Why it deviates or is unclassified, in operator words.
    pub reason: Option<String>,
    /// The seed sentence the matched row encodes, and aks-facts' correction of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refines: Option<String>,
}

/// Why a classifier cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("the model {origin} is for {model}, but the topology says the cluster runs {topology}; load the {topology} model or fix `cni` in the topology")]
pub struct CniMismatch {
    pub origin: String,
    pub model: CniMode,
    pub topology: CniMode,
}

/// Classifies flows of one node against one model.
#[derive(Clone, Debug)]
pub struct Classifier {
    model: Model,
    topology: Topology,
}

/// Everything about one flow the rows and templates look at.
struct Facts<'a> {
    ev: &'a FlowEvent,
    orig: Tuple,
    tr: Tuple,
    src_class: AddrClass,
    dst_class: AddrClass,
    direction: Direction,
    /// DNATed back to its own source address (see `PathRow::hairpin`).
    hairpin: bool,
    dst_service: Option<ServiceRef>,
    src_service: Option<String>,
    in_iface: Option<String>,
    out_iface: Option<String>,
}

impl Classifier {
    pub fn new(model: Model, topology: Topology) -> Result<Classifier, CniMismatch> {
        if model.cni() != topology.cni {
            return Err(CniMismatch {
                origin: model.origin().to_string(),
                model: model.cni(),
                topology: topology.cni,
            });
        }
        Ok(Classifier { model, topology })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Classifies a flow, naming its interfaces from the topology's interface list.
    pub fn classify(&self, ev: &FlowEvent) -> Classification {
        let name = |i: Option<u32>| i.and_then(|i| self.topology.interface_name(i));
        self.classify_with_interfaces(ev, name(ev.in_ifindex), name(ev.out_ifindex))
    }

    /// Classifies a flow whose interface names the caller resolved. A pod-side interface
    /// (`cbr0`, `veth*`, `azv*`, `lxc*`) marks that end as a pod even if the topology does not
    /// list it (a pod started after discovery).
    pub fn classify_with_interfaces(
        &self,
        ev: &FlowEvent,
        in_iface: Option<&str>,
        out_iface: Option<&str>,
    ) -> Classification {
        let unclassified = |reason: String| Classification {
            path: None,
            variant: None,
            cni: Some(self.topology.cni),
            verdict: Verdict::Unclassified,
            hops: Vec::new(),
            reason: Some(reason),
            seed: None,
            refines: None,
        };
        if self.topology.dataplane == Dataplane::Cilium {
            return unclassified(
                "this node runs Cilium's eBPF dataplane: service NAT and masquerading happen in \
                 eBPF, not in netfilter conntrack, so the node-side NAT cannot be checked"
                    .into(),
            );
        }
        let facts = self.facts(ev, in_iface, out_iface);
        let Some(row) = self.model.paths.iter().find(|r| matches(r, &facts)) else {
            let service = match &facts.dst_service {
                Some(s) => format!(
                    ", destination Service {} (externalTrafficPolicy {})",
                    s.name.as_deref().unwrap_or("unknown"),
                    s.etp
                        .map_or("unknown: declare it in lb_frontends".into(), |e| e
                            .to_string())
                ),
                None => String::new(),
            };
            return unclassified(format!(
                "no {} model path for {} {} ({}) -> {} ({}), {}{service}",
                self.topology.cni,
                ev.proto,
                Endpoint(facts.orig.src, facts.orig.sport),
                facts.src_class.describe(),
                Endpoint(facts.orig.dst, facts.orig.dport),
                facts.dst_class.describe(),
                facts.direction.as_str(),
            ));
        };
        let mut problems = self.deviations(row, &facts);
        let hops = self.hops(row, &facts);
        let verdict = if problems.is_empty() {
            Verdict::Conforms
        } else {
            Verdict::Deviates
        };
        Classification {
            path: Some(PathId(row.id().to_string())),
            variant: row.variant.clone(),
            cni: Some(self.topology.cni),
            verdict,
            hops,
            reason: (!problems.is_empty()).then(|| std::mem::take(&mut problems).join("; also ")),
            seed: Some(row.seed.clone()),
            refines: row.refines.clone(),
        }
    }

    fn facts<'a>(
        &self,
        ev: &'a FlowEvent,
        in_iface: Option<&str>,
        out_iface: Option<&str>,
    ) -> Facts<'a> {
        let t = &self.topology;
        let (orig, tr, nat) = (ev.orig, ev.translated(), ev.nat());
        let src_pod_side = in_iface.is_some_and(is_pod_interface);
        // After a DNAT the pod is the translated destination, not the original one.
        let dst_pod_side = out_iface.is_some_and(is_pod_interface) && !nat.dnat;
        let src_class = t.class_of(orig.src, src_pod_side);
        let dst_class = t.class_of(orig.dst, dst_pod_side);
        use AddrClass::*;
        let local_src = matches!(src_class, Pod | NodeIp | BridgeGateway | Loopback);
        let local_dst = matches!(
            dst_class,
            Pod | NodeIp | BridgeGateway | Loopback | ServiceIp | LbFrontend
        );
        let direction = match (local_src, local_dst) {
            (true, true) => Direction::Internal,
            (true, false) => Direction::Outbound,
            _ => Direction::Inbound,
        };
        Facts {
            ev,
            orig,
            tr,
            src_class,
            dst_class,
            direction,
            hairpin: nat.dnat && tr.dst == orig.src,
            dst_service: t.service_at(ev.proto, orig.dst, orig.dport),
            src_service: t.service_of_endpoint(orig.src).map(str::to_string),
            in_iface: in_iface.map(str::to_string),
            out_iface: out_iface.map(str::to_string),
        }
    }

    /// Fills a row's template with this flow's facts.
    fn render(&self, template: &str, f: &Facts) -> String {
        let t = &self.topology;
        let unknown = || "unknown".to_string();
        let values: [(&str, String); 14] = [
            ("src", f.orig.src.to_string()),
            ("dst", f.orig.dst.to_string()),
            ("dport", f.orig.dport.to_string()),
            ("nat_src", f.tr.src.to_string()),
            ("nat_dst", f.tr.dst.to_string()),
            ("src_service", f.src_service.clone().unwrap_or_else(unknown)),
            (
                "dst_service",
                f.dst_service
                    .as_ref()
                    .and_then(|s| s.name.clone())
                    .unwrap_or_else(unknown),
            ),
            (
                "etp",
                f.dst_service
                    .as_ref()
                    .and_then(|s| s.etp)
                    .map(|e| e.to_string())
                    .unwrap_or_else(unknown),
            ),
            ("cni", t.cni.to_string()),
            (
                "node_ip",
                join(same_family(&t.node_ips, f.orig.src)).unwrap_or_else(unknown),
            ),
            (
                "lb_outbound",
                join(&t.lb_outbound_ips).unwrap_or_else(|| "not configured".into()),
            ),
            ("outbound", t.outbound_type.snat_device().to_string()),
            ("in_iface", f.in_iface.clone().unwrap_or_else(unknown)),
            ("out_iface", f.out_iface.clone().unwrap_or_else(unknown)),
        ];
        values.iter().fold(template.to_string(), |s, (k, v)| {
            s.replace(&format!("{{{k}}}"), v)
        })
    }

    fn deviations(&self, row: &PathRow, f: &Facts) -> Vec<String> {
        let nat = f.ev.nat();
        let subject = format!(
            "{} {}",
            self.topology.cni,
            self.render(row.describe.get_ref(), f)
        );
        let hint = |h: &Option<String>| h.as_ref().map(|h| format!("; {h}")).unwrap_or_default();
        let mut out = Vec::new();
        match (row.nat.dnat, nat.dnat) {
            (DnatExpect::Yes, false) => out.push(format!(
                "{subject} was not DNATed on the node; the model expects kube-proxy to DNAT it to a pod{}",
                hint(&row.nat.hint_dnat)
            )),
            (DnatExpect::No, true) => out.push(format!(
                "{subject} was DNATed on the node to {}; the model expects no DNAT{}",
                Endpoint(f.tr.dst, f.tr.dport),
                hint(&row.nat.hint_dnat)
            )),
            _ => {}
        }
        let observed = self.snat_source(f);
        let allowed = &row.nat.snat;
        if observed.is_some_and(|o| allowed.contains(&o))
            || (!nat.snat && allowed.contains(&SnatSource::Kept))
        {
            return out;
        }
        let expected = allowed
            .iter()
            .filter(|s| **s != SnatSource::Kept)
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(" or ");
        let keeps = row
            .keeps
            .as_deref()
            .unwrap_or("the original source address");
        let to = self.describe_snat(f);
        let hint_snat = format!(
            "{}{}",
            self.node_policy_note(row, f)
                .map(|n| format!("; {n}"))
                .unwrap_or_default(),
            hint(&row.nat.hint_snat)
        );
        let upstream_rewrite = row
            .hops
            .iter()
            .take_while(|h| h.kind != HopKind::Node)
            .find(|h| matches!(h.kind, HopKind::AppgwProxy | HopKind::AgcProxy));
        out.push(match (nat.snat, expected.is_empty(), upstream_rewrite) {
            (true, true, Some(proxy)) => format!(
                "double SNAT: {subject} already had its source replaced by the {} (inferred), and the node SNATed it again to {to}; the model has one source rewrite{}",
                proxy.label,
                hint_snat
            ),
            (true, true, None) => format!(
                "{subject} was SNATed to {to}: {keeps} is lost, the model expects it to be kept{}",
                hint_snat
            ),
            (true, false, _) => format!(
                "{subject} was SNATed to {to}; the model expects SNAT to {expected}{}",
                hint_snat
            ),
            (false, _, _) => format!(
                "{subject} kept its source {} (no SNAT on the node); the model expects SNAT to {expected}{}",
                f.orig.src,
                hint_snat
            ),
        });
        out
    }

    /// For a row that depends on the declared externalTrafficPolicy and whose SNAT deviates:
    /// what kube-proxy's rules on this node program for the frontend. Rules that disagree with
    /// the declaration explain the deviation; rules that agree while the node still SNATed a
    /// source the model keeps point at another nat rule instead.
    fn node_policy_note(&self, row: &PathRow, f: &Facts) -> Option<String> {
        let declared = row.etp?;
        let programmed = self
            .topology
            .services
            .iter()
            .find(|s| {
                s.kind == ServiceKind::LoadBalancer
                    && s.ip == Some(f.orig.dst)
                    && s.port == f.orig.dport
                    && s.proto == f.ev.proto
            })
            .and_then(|s| s.etp)?;
        let unexpected_snat = f.ev.nat().snat && row.nat.snat == [SnatSource::Kept];
        if programmed != declared {
            Some(format!(
                "kube-proxy's rules on this node program it as externalTrafficPolicy {programmed}, not the declared {declared}"
            ))
        } else if unexpected_snat {
            Some(format!(
                "kube-proxy's rules on this node agree (externalTrafficPolicy {programmed}), so another nat rule rewrote the source: check ip-masq-agent's nonMasqueradeCIDRs and hand-added POSTROUTING rules"
            ))
        } else {
            None
        }
    }

    /// The class of the source the node SNATed to, `Kept` without SNAT, `None` when it is
    /// neither the node IP nor cbr0's gateway.
    fn snat_source(&self, f: &Facts) -> Option<SnatSource> {
        if !f.ev.nat().snat {
            return Some(SnatSource::Kept);
        }
        match self.topology.class_of(f.tr.src, false) {
            AddrClass::NodeIp => Some(SnatSource::NodeIp),
            AddrClass::BridgeGateway => Some(SnatSource::BridgeGateway),
            _ if f.tr.src == f.orig.src => Some(SnatSource::Kept), // port-only rewrite
            _ => None,
        }
    }

    fn describe_snat(&self, f: &Facts) -> String {
        match self.snat_source(f) {
            Some(SnatSource::NodeIp) => format!("the node IP {}", f.tr.src),
            Some(SnatSource::BridgeGateway) => format!("cbr0's gateway {}", f.tr.src),
            Some(SnatSource::Kept) => format!("{} (port only)", f.tr.src),
            None => format!("{} (neither the node IP nor cbr0's gateway)", f.tr.src),
        }
    }

    fn hops(&self, row: &PathRow, f: &Facts) -> Vec<Hop> {
        let nat = f.ev.nat();
        let last = row.hops.len() - 1;
        let mandatory = |k: HopKind| match k {
            HopKind::NodeDnat => row.nat.dnat == DnatExpect::Yes,
            HopKind::NodeSnat => !row.nat.snat.contains(&SnatSource::Kept),
            _ => true,
        };
        let mut hops: Vec<Hop> = row
            .hops
            .iter()
            .enumerate()
            .filter(|(_, spec)| {
                // A NAT the model allows but does not require is shown only when it happened.
                let seen = match spec.kind {
                    HopKind::NodeDnat => nat.dnat,
                    HopKind::NodeSnat => nat.snat,
                    _ => true,
                };
                seen || mandatory(spec.kind)
            })
            .map(|(i, spec)| {
                let inferred = *spec.evidence.get_ref() == ModelEvidence::Inferred;
                let seen = match spec.kind {
                    HopKind::NodeDnat => nat.dnat,
                    HopKind::NodeSnat => nat.snat,
                    _ => true,
                };
                let mut hop = Hop {
                    kind: spec.kind,
                    what: self.render(&spec.label, f),
                    evidence: match (inferred, seen) {
                        (true, _) => Evidence::Inferred,
                        (false, true) => Evidence::Observed,
                        (false, false) => Evidence::ExpectedNotSeen,
                    },
                    in_model: true,
                    inferred_from: spec.from.as_ref().map(|t| self.render(t.get_ref(), f)),
                    at: None,
                    before: None,
                    after: None,
                };
                self.place(&mut hop, i == 0, i == last, f);
                hop
            })
            .collect();
        // NAT conntrack shows that the model does not have goes just before the far end.
        for (kind, happened) in [(HopKind::NodeDnat, nat.dnat), (HopKind::NodeSnat, nat.snat)] {
            if happened && !row.hops.iter().any(|h| h.kind == kind) {
                let mut hop = Hop {
                    kind,
                    what: match kind {
                        HopKind::NodeDnat => "node DNAT (not in the model)".into(),
                        _ => "node SNAT (not in the model)".into(),
                    },
                    evidence: Evidence::Observed,
                    in_model: false,
                    inferred_from: None,
                    at: None,
                    before: None,
                    after: None,
                };
                self.place(&mut hop, false, false, f);
                let at = hops.len() - 1;
                hops.insert(at, hop);
            }
        }
        hops
    }

    /// Sets a hop's addresses from the flow, by kind and position.
    fn place(&self, hop: &mut Hop, first: bool, last: bool, f: &Facts) {
        let (o, t) = (&f.orig, &f.tr);
        let ep = |ip: IpAddr, port: u16| Some(Endpoint(ip, port).to_string());
        match hop.kind {
            HopKind::NodeDnat => {
                hop.before = ep(o.dst, o.dport);
                hop.after = ep(t.dst, t.dport);
            }
            HopKind::NodeSnat => {
                hop.before = ep(o.src, o.sport);
                hop.after = ep(t.src, t.sport);
            }
            HopKind::OutboundSnat => {
                hop.before = ep(t.src, t.sport);
                hop.after = Some(
                    match same_family(&self.topology.lb_outbound_ips, t.src).first() {
                        Some(IpAddr::V4(ip)) => format!("{ip}:*"),
                        Some(IpAddr::V6(ip)) => format!("[{ip}]:*"),
                        None => "an outbound public IP (lb_outbound_ips not configured)".into(),
                    },
                );
            }
            HopKind::AzureLb => {
                hop.before = ep(o.dst, o.dport);
                hop.after = ep(o.dst, o.dport);
            }
            HopKind::AppgwProxy | HopKind::AgcProxy => {
                hop.before =
                    Some("client connection (client address only in X-Forwarded-For)".into());
                hop.after = ep(o.src, o.sport);
            }
            HopKind::Node => {
                let ifaces = match (&f.in_iface, &f.out_iface) {
                    (None, None) => String::new(),
                    (i, o) => format!(
                        " (in {}, out {})",
                        i.as_deref().unwrap_or("?"),
                        o.as_deref().unwrap_or("?")
                    ),
                };
                hop.at = Some(format!(
                    "{}{ifaces}",
                    join(same_family(&self.topology.node_ips, o.src))
                        .unwrap_or_else(|| "node".into())
                ));
            }
            HopKind::Client | HopKind::Pod | HopKind::Destination | HopKind::IngressProxy => {
                // An inferred endpoint (the client behind a proxy) has no address on the node.
                hop.at = if hop.evidence == Evidence::Inferred {
                    None
                } else if first {
                    ep(o.src, o.sport)
                } else if last {
                    ep(t.dst, t.dport)
                } else {
                    None
                };
            }
        }
    }
}

fn matches(row: &PathRow, f: &Facts) -> bool {
    let glob_any = |pats: &[String], name: Option<&str>| {
        pats.is_empty() || name.is_some_and(|n| pats.iter().any(|p| glob(p, n)))
    };
    let dst_service = f.dst_service.as_ref().and_then(|s| s.name.as_deref());
    row.direction == f.direction
        && row.src.contains(&f.src_class)
        && row.dst.contains(&f.dst_class)
        && (row.proto.is_empty() || row.proto.iter().any(|p| p.matches(f.ev.proto)))
        && (row.dports.is_empty()
            || row
                .dports
                .iter()
                .any(|r| (r.0..=r.1).contains(&f.orig.dport)))
        && (row.etp.is_none() || row.etp == f.dst_service.as_ref().and_then(|s| s.etp))
        && (!row.hairpin || f.hairpin)
        && glob_any(&row.src_service, f.src_service.as_deref())
        && glob_any(&row.dst_service, dst_service)
}

/// `*` matches any run of characters; nothing else is special.
fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn same_family(ips: &[IpAddr], like: IpAddr) -> Vec<IpAddr> {
    ips.iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == like.is_ipv4())
        .collect()
}

fn join(ips: impl AsRef<[IpAddr]>) -> Option<String> {
    let ips = ips.as_ref();
    (!ips.is_empty()).then(|| {
        ips.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    })
}
