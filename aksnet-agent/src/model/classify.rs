//! Matches a flow against a model's rows and compares the NAT the node applied with the NAT the
//! matched row expects.

use super::compiled::{FlowFacts, Template, Var};
use super::{
    CompiledRow, Direction, DnatExpect, HopKind, Model, ModelEvidence, PathRow, SnatSource,
};
use crate::events::{Endpoint, FlowEvent, Nat, Proto, Tuple};
use crate::topology::{
    is_pod_interface, AddrClass, CniMode, Dataplane, Etp, OutboundType, ServiceKind, ServiceRef,
    Topology,
};
use serde::Serialize;
use std::cell::OnceCell;
use std::net::IpAddr;
use std::sync::Arc;

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
    /// What the hop is, in operator words, e.g. "Azure Load Balancer (floating IP)".
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

/// A hop without its texts: what the metrics need, computed without rendering anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopMark {
    pub kind: HopKind,
    pub evidence: Evidence,
    /// False for NAT conntrack shows but the model does not have.
    pub in_model: bool,
}

/// The result of classifying one flow. Path and verdict are decided at once; the hop texts, the
/// reason and the seed quotation are rendered only when asked for ([`Classification::hops`],
/// [`Classification::reason`], serialising it), which the daemon without `--dump` never does.
#[derive(Clone, Debug)]
pub struct Classification {
    pub path: Option<PathId>,
    pub variant: Option<String>,
    pub cni: CniMode,
    pub verdict: Verdict,
    detail: Detail,
}

/// What rendering needs later: the classifier (shared), the flow and the matched row.
#[derive(Clone, Debug)]
struct Detail {
    classifier: Classifier,
    event: FlowEvent,
    in_iface: Option<String>,
    out_iface: Option<String>,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Cilium's eBPF dataplane: conntrack does not show the NAT.
    Cilium,
    NoRow,
    Row(usize),
}

/// The JSON form: the fields of the dump line's classification.
#[derive(Serialize)]
struct Rendered<'a> {
    path: &'a Option<PathId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: &'a Option<String>,
    cni: CniMode,
    verdict: Verdict,
    hops: Vec<Hop>,
    /// Why it deviates or is unclassified, in operator words.
    reason: Option<String>,
    /// The seed sentence the matched row encodes, and aks-facts' correction of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refines: Option<&'a str>,
    /// What each address is: `src`, `dst` and, after a DNAT, `nat_dst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    classes: Option<Classes>,
}

#[derive(Serialize)]
struct Classes {
    src: AddrClass,
    dst: AddrClass,
    #[serde(skip_serializing_if = "Option::is_none")]
    nat_dst: Option<AddrClass>,
}

impl Serialize for Classification {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let classes = self.with_facts(|_, f| Classes {
            src: f.src_class,
            dst: f.dst_class,
            nat_dst: f.nat.dnat.then_some(f.nat_dst_class),
        });
        Rendered {
            path: &self.path,
            variant: &self.variant,
            cni: self.cni,
            verdict: self.verdict,
            hops: self.hops(),
            reason: self.reason(),
            seed: self.seed(),
            refines: self.refines(),
            classes,
        }
        .serialize(s)
    }
}

impl Classification {
    fn row(&self) -> Option<(&PathRow, &CompiledRow)> {
        match self.detail.outcome {
            Outcome::Row(r) => {
                let m = &self.detail.classifier.inner.model;
                Some((&m.paths[r], &m.compiled[r]))
            }
            Outcome::Cilium | Outcome::NoRow => None,
        }
    }

    /// Runs `f` on the flow's facts, recomputed (they borrow the classifier's topology).
    fn with_facts<T>(&self, f: impl FnOnce(&Classifier, &Facts) -> T) -> Option<T> {
        let d = &self.detail;
        if matches!(d.outcome, Outcome::Cilium) {
            return None;
        }
        let facts = d
            .classifier
            .facts(&d.event, d.in_iface.as_deref(), d.out_iface.as_deref());
        Some(f(&d.classifier, &facts))
    }

    /// The seed sentence the matched row encodes.
    pub fn seed(&self) -> Option<&str> {
        self.row().map(|(row, _)| row.seed.as_str())
    }

    /// How aks-facts corrects the seed for this row.
    pub fn refines(&self) -> Option<&str> {
        self.row().and_then(|(row, _)| row.refines.as_deref())
    }

    /// The hops' kinds and evidence, without their texts.
    pub fn hop_marks(&self) -> Vec<HopMark> {
        let Some((row, _)) = self.row() else {
            return Vec::new();
        };
        let c = &self.detail.classifier;
        plan(row, self.detail.event.nat(), c.topology().outbound_type)
            .into_iter()
            .map(|(_, mark)| mark)
            .collect()
    }

    /// The hop chain, rendered.
    pub fn hops(&self) -> Vec<Hop> {
        let Some((row, compiled)) = self.row() else {
            return Vec::new();
        };
        self.with_facts(|c, f| c.hops(row, compiled, f))
            .unwrap_or_default()
    }

    /// Why it deviates or is unclassified, in operator words; `None` when it conforms.
    pub fn reason(&self) -> Option<String> {
        match self.detail.outcome {
            Outcome::Cilium => Some(
                "this node runs Cilium's eBPF dataplane: service NAT and masquerading happen in \
                 eBPF, not in netfilter conntrack, so the node-side NAT cannot be checked"
                    .into(),
            ),
            Outcome::NoRow => self.with_facts(|c, f| c.unclassified_reason(f)),
            Outcome::Row(_) if self.verdict == Verdict::Conforms => None,
            Outcome::Row(_) => {
                let (row, compiled) = self.row()?;
                self.with_facts(|c, f| c.deviations(row, compiled, f).join("; also "))
            }
        }
    }
}

/// Why a classifier cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("the model {origin} is for {model}, but the topology says the cluster runs {topology}; load the {topology} model or fix `cni` in the topology")]
pub struct CniMismatch {
    pub origin: String,
    pub model: CniMode,
    pub topology: CniMode,
}

/// Classifies flows of one node against one model. Cloning shares the model and topology.
#[derive(Clone, Debug)]
pub struct Classifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    model: Model,
    topology: Topology,
}

/// Everything about one flow the rows and templates look at. Service lookups are made once,
/// and only if a row asks.
struct Facts<'a> {
    topology: &'a Topology,
    proto: Proto,
    orig: Tuple,
    tr: Tuple,
    nat: Nat,
    src_class: AddrClass,
    dst_class: AddrClass,
    /// The class of the destination after the node's DNAT (the same as `dst_class` without).
    nat_dst_class: AddrClass,
    direction: Direction,
    /// DNATed back to its own source address (see `PathRow::hairpin`).
    hairpin: bool,
    dst_service: OnceCell<Option<ServiceRef<'a>>>,
    src_service: OnceCell<Option<&'a str>>,
    in_iface: Option<&'a str>,
    out_iface: Option<&'a str>,
}

impl<'a> Facts<'a> {
    fn dst_service_ref(&self) -> Option<ServiceRef<'a>> {
        *self.dst_service.get_or_init(|| {
            self.topology
                .service_at(self.proto, self.orig.dst, self.orig.dport)
        })
    }
}

impl FlowFacts for Facts<'_> {
    fn src_class(&self) -> AddrClass {
        self.src_class
    }
    fn dst_class(&self) -> AddrClass {
        self.dst_class
    }
    fn nat_dst_class(&self) -> AddrClass {
        self.nat_dst_class
    }
    fn proto(&self) -> Proto {
        self.proto
    }
    fn dport(&self) -> u16 {
        self.orig.dport
    }
    fn hairpin(&self) -> bool {
        self.hairpin
    }
    fn dst_etp(&self) -> Option<Etp> {
        self.dst_service_ref().and_then(|s| s.etp)
    }
    fn src_service(&self) -> Option<&str> {
        *self
            .src_service
            .get_or_init(|| self.topology.service_of_endpoint(self.orig.src))
    }
    fn dst_service(&self) -> Option<&str> {
        self.dst_service_ref().and_then(|s| s.name)
    }
}

/// Which of the node's NATs differ from the row's expectation.
struct Problems {
    dnat: bool,
    snat: bool,
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
        Ok(Classifier {
            inner: Arc::new(Inner { model, topology }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn model(&self) -> &Model {
        &self.inner.model
    }

    /// Classifies a flow, naming its interfaces from the topology's interface list.
    pub fn classify(&self, ev: &FlowEvent) -> Classification {
        let name = |i: Option<u32>| i.and_then(|i| self.topology().interface_name(i));
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
        let model = &self.inner.model;
        let (outcome, verdict) = if self.topology().dataplane == Dataplane::Cilium {
            (Outcome::Cilium, Verdict::Unclassified)
        } else {
            let f = self.facts(ev, in_iface, out_iface);
            let found = model
                .candidates
                .of(f.direction)
                .iter()
                .copied()
                .find(|&r| model.compiled[r].matcher.matches(&f));
            match found {
                None => (Outcome::NoRow, Verdict::Unclassified),
                Some(r) => {
                    let p = self.problems(&model.paths[r], &f);
                    let verdict = if p.dnat || p.snat {
                        Verdict::Deviates
                    } else {
                        Verdict::Conforms
                    };
                    (Outcome::Row(r), verdict)
                }
            }
        };
        let row = match outcome {
            Outcome::Row(r) => Some(&model.paths[r]),
            Outcome::Cilium | Outcome::NoRow => None,
        };
        Classification {
            path: row.map(|r| PathId(r.id().to_string())),
            variant: row.and_then(|r| r.variant.clone()),
            cni: self.topology().cni,
            verdict,
            detail: Detail {
                classifier: self.clone(),
                event: ev.clone(),
                in_iface: in_iface.map(str::to_string),
                out_iface: out_iface.map(str::to_string),
                outcome,
            },
        }
    }

    fn facts<'a>(
        &'a self,
        ev: &FlowEvent,
        in_iface: Option<&'a str>,
        out_iface: Option<&'a str>,
    ) -> Facts<'a> {
        let t = self.topology();
        let (orig, tr, nat) = (ev.orig, ev.translated(), ev.nat());
        let src_pod_side = in_iface.is_some_and(is_pod_interface);
        let out_pod_side = out_iface.is_some_and(is_pod_interface);
        // After a DNAT the pod is the translated destination, not the original one.
        let src_class = t.class_of(orig.src, src_pod_side);
        let dst_class = t.class_of(orig.dst, out_pod_side && !nat.dnat);
        let nat_dst_class = if nat.dnat {
            t.class_of(tr.dst, out_pod_side)
        } else {
            dst_class
        };
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
            topology: t,
            proto: ev.proto,
            orig,
            tr,
            nat,
            src_class,
            dst_class,
            nat_dst_class,
            direction,
            hairpin: nat.dnat && tr.dst == orig.src,
            dst_service: OnceCell::new(),
            src_service: OnceCell::new(),
            in_iface,
            out_iface,
        }
    }

    fn problems(&self, row: &PathRow, f: &Facts) -> Problems {
        let dnat = matches!(
            (row.nat.dnat, f.nat.dnat),
            (DnatExpect::Yes, false) | (DnatExpect::No, true)
        );
        let allowed = &row.nat.snat;
        let snat_ok = self.snat_source(f).is_some_and(|o| allowed.contains(&o))
            || (!f.nat.snat && allowed.contains(&SnatSource::Kept));
        Problems {
            dnat,
            snat: !snat_ok,
        }
    }

    /// Fills a row's template with this flow's facts.
    fn render(&self, template: &Template, f: &Facts) -> String {
        let t = self.topology();
        template.fill(|var, out| {
            let unknown = "unknown";
            let text = match var {
                Var::Src => f.orig.src.to_string(),
                Var::Dst => f.orig.dst.to_string(),
                Var::Dport => f.orig.dport.to_string(),
                Var::NatSrc => f.tr.src.to_string(),
                Var::NatDst => f.tr.dst.to_string(),
                Var::SrcService => f.src_service().unwrap_or(unknown).to_string(),
                Var::DstService => f.dst_service().unwrap_or(unknown).to_string(),
                Var::Etp => f.dst_etp().map_or(unknown.into(), |e| e.to_string()),
                Var::Cni => t.cni.to_string(),
                Var::NodeIp => join(same_family(&t.node_ips, f.orig.src)).unwrap_or(unknown.into()),
                Var::LbOutbound => {
                    join(&t.lb_outbound_ips).unwrap_or_else(|| "not configured".into())
                }
                Var::Outbound => t.outbound_type.snat_device().to_string(),
                Var::InIface => f.in_iface.unwrap_or(unknown).to_string(),
                Var::OutIface => f.out_iface.unwrap_or(unknown).to_string(),
                Var::SrcClass => f.src_class.describe().to_string(),
            };
            out.push_str(&text);
        })
    }

    fn unclassified_reason(&self, f: &Facts) -> String {
        let service = match f.dst_service_ref() {
            Some(s) => format!(
                ", destination Service {} (externalTrafficPolicy {})",
                s.name.unwrap_or("unknown"),
                s.etp
                    .map_or("unknown: declare it in lb_frontends".into(), |e| e
                        .to_string())
            ),
            None => String::new(),
        };
        let translated = if f.nat.dnat {
            format!(
                ", DNATed to {} ({})",
                Endpoint(f.tr.dst, f.tr.dport),
                f.nat_dst_class.describe()
            )
        } else {
            String::new()
        };
        format!(
            "no {} model path for {} {} ({}) -> {} ({}){translated}, {}{service}",
            self.topology().cni,
            f.proto,
            Endpoint(f.orig.src, f.orig.sport),
            f.src_class.describe(),
            Endpoint(f.orig.dst, f.orig.dport),
            f.dst_class.describe(),
            f.direction.as_str(),
        )
    }

    fn deviations(&self, row: &PathRow, compiled: &CompiledRow, f: &Facts) -> Vec<String> {
        let problems = self.problems(row, f);
        let subject = format!(
            "{} {}",
            self.topology().cni,
            self.render(&compiled.describe, f)
        );
        let hint = |h: &Option<String>| h.as_ref().map(|h| format!("; {h}")).unwrap_or_default();
        let mut out = Vec::new();
        if problems.dnat {
            out.push(if f.nat.dnat {
                format!(
                    "{subject} was DNATed on the node to {}; the model expects no DNAT{}",
                    Endpoint(f.tr.dst, f.tr.dport),
                    hint(&row.nat.hint_dnat)
                )
            } else {
                format!(
                    "{subject} was not DNATed on the node; the model expects kube-proxy to DNAT it{}",
                    hint(&row.nat.hint_dnat)
                )
            });
        }
        if !problems.snat {
            return out;
        }
        let expected = row
            .nat
            .snat
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
            .zip(&compiled.labels)
            .take_while(|(h, _)| h.kind != HopKind::Node)
            .find(|(h, _)| matches!(h.kind, HopKind::AppgwProxy | HopKind::AgcProxy));
        out.push(match (f.nat.snat, expected.is_empty(), upstream_rewrite) {
            (true, true, Some((_, label))) => format!(
                "double SNAT: {subject} already had its source replaced by the {} (inferred), and the node SNATed it again to {to}; the model has one source rewrite{}",
                self.render(label, f),
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
            .topology()
            .services
            .iter()
            .find(|s| {
                s.kind == ServiceKind::LoadBalancer
                    && s.ip == Some(f.orig.dst)
                    && s.port == f.orig.dport
                    && s.proto == f.proto
            })
            .and_then(|s| s.etp)?;
        let unexpected_snat = f.nat.snat && row.nat.snat == [SnatSource::Kept];
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
        if !f.nat.snat {
            return Some(SnatSource::Kept);
        }
        match self.topology().class_of(f.tr.src, false) {
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

    fn hops(&self, row: &PathRow, compiled: &CompiledRow, f: &Facts) -> Vec<Hop> {
        let planned = plan(row, f.nat, self.topology().outbound_type);
        let last = planned.len() - 1;
        planned
            .into_iter()
            .enumerate()
            .map(|(i, (spec, mark))| {
                let what = match (spec, mark.kind) {
                    (Some(s), _) => self.render(&compiled.labels[s], f),
                    (None, HopKind::NodeDnat) => "Node DNAT (not in the model)".into(),
                    (None, _) => "Node SNAT (not in the model)".into(),
                };
                let mut hop = Hop {
                    kind: mark.kind,
                    what,
                    evidence: mark.evidence,
                    in_model: mark.in_model,
                    inferred_from: spec
                        .and_then(|s| compiled.froms[s].as_ref())
                        .map(|t| self.render(t, f)),
                    at: None,
                    before: None,
                    after: None,
                };
                self.place(&mut hop, i == 0, i == last, f);
                hop
            })
            .collect()
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
                hop.after = Some(self.outbound_address(t.src));
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
                let ifaces = match (f.in_iface, f.out_iface) {
                    (None, None) => String::new(),
                    (i, o) => format!(" (in {}, out {})", i.unwrap_or("?"), o.unwrap_or("?")),
                };
                hop.at = Some(format!(
                    "{}{ifaces}",
                    join(same_family(&self.topology().node_ips, o.src))
                        .unwrap_or_else(|| "node".into())
                ));
            }
            HopKind::Client | HopKind::Pod | HopKind::Destination | HopKind::IngressProxy => {
                // An endpoint on another node is reached through this node's routes.
                if last
                    && hop.kind == HopKind::Pod
                    && matches!(
                        f.nat_dst_class,
                        AddrClass::RemotePod | AddrClass::NodeSubnet
                    )
                {
                    hop.what.push_str(" on another node");
                }
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

    /// The address the outbound type's device SNATs to, as far as the topology knows it.
    fn outbound_address(&self, like: IpAddr) -> String {
        let t = self.topology();
        let configured = same_family(&t.lb_outbound_ips, like);
        match (t.outbound_type, configured.first()) {
            (OutboundType::LoadBalancer, Some(IpAddr::V4(ip))) => format!("{ip}:*"),
            (OutboundType::LoadBalancer, Some(IpAddr::V6(ip))) => format!("[{ip}]:*"),
            (OutboundType::LoadBalancer, None) => {
                "an outbound public IP of the LB (lb_outbound_ips not configured)".into()
            }
            (OutboundType::ManagedNatGateway | OutboundType::UserAssignedNatGateway, _) => {
                "the NAT gateway's public IP".into()
            }
            (OutboundType::UserDefinedRouting, _) => "the firewall's public IP".into(),
            (OutboundType::None, _) => "no SNAT".into(),
        }
    }
}

/// The hops a row shows for a flow with this NAT, without texts: each with its row hop index,
/// or `None` for NAT conntrack shows that the model does not have (placed just before the far
/// end). A NAT the model allows but does not require is shown only when it happened; the
/// off-node SNAT only when the outbound type has a device that does it.
fn plan(row: &PathRow, nat: Nat, outbound: OutboundType) -> Vec<(Option<usize>, HopMark)> {
    let required = |k: HopKind| match k {
        HopKind::NodeDnat => row.nat.dnat == DnatExpect::Yes,
        HopKind::NodeSnat => !row.nat.snat.contains(&SnatSource::Kept),
        _ => true,
    };
    let seen = |k: HopKind| match k {
        HopKind::NodeDnat => nat.dnat,
        HopKind::NodeSnat => nat.snat,
        _ => true,
    };
    let mut hops: Vec<(Option<usize>, HopMark)> = row
        .hops
        .iter()
        .enumerate()
        .filter(|(_, spec)| seen(spec.kind) || required(spec.kind))
        .filter(|(_, spec)| !(spec.kind == HopKind::OutboundSnat && outbound == OutboundType::None))
        .map(|(i, spec)| {
            let inferred = *spec.evidence.get_ref() == ModelEvidence::Inferred;
            let evidence = match (inferred, seen(spec.kind)) {
                (true, _) => Evidence::Inferred,
                (false, true) => Evidence::Observed,
                (false, false) => Evidence::ExpectedNotSeen,
            };
            let mark = HopMark {
                kind: spec.kind,
                evidence,
                in_model: true,
            };
            (Some(i), mark)
        })
        .collect();
    for (kind, happened) in [(HopKind::NodeDnat, nat.dnat), (HopKind::NodeSnat, nat.snat)] {
        if happened && !row.hops.iter().any(|h| h.kind == kind) {
            let mark = HopMark {
                kind,
                evidence: Evidence::Observed,
                in_model: false,
            };
            let at = hops.len() - 1;
            hops.insert(at, (None, mark));
        }
    }
    hops
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
