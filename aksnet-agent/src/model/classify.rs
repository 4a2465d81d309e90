//! Classifying one flow: its facts (what each address is, before and after the node's NAT),
//! the first candidate row that matches, and whether the NAT the node applied is the NAT that
//! row expects. Nothing here renders text; `render` does, when a person reads the result.

use super::compiled::FlowFacts;
use super::{CompiledRow, Direction, DnatExpect, HopKind, Model, PathRow, SnatSource};
use crate::events::{FlowEvent, Nat, Proto, Tuple};
use crate::topology::{is_pod_interface, AddrClass, CniMode, Dataplane, Etp, ServiceRef, Topology};
use serde::Serialize;
use std::cell::OnceCell;
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
    /// `None` when the network mode is unknown: no model applies.
    pub cni: Option<CniMode>,
    pub verdict: Verdict,
    /// `None` when no model applied.
    pub(super) detail: Option<Detail>,
    /// What the topology lacks, told after the model's own reason (or instead of it, without a
    /// model): a fact the node did not reveal may be why the flow is unclassified.
    pub(super) lacking: Option<String>,
}

/// What rendering needs later: the classifier (shared), the flow and the matched row.
#[derive(Clone, Debug)]
pub(super) struct Detail {
    pub(super) classifier: Classifier,
    pub(super) event: FlowEvent,
    pub(super) in_iface: Option<String>,
    pub(super) out_iface: Option<String>,
    pub(super) outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome {
    /// Cilium's eBPF dataplane: conntrack does not show the NAT.
    Cilium,
    NoRow,
    Row(usize),
}

impl Classification {
    /// A flow no model could be applied to (the network mode is unknown), and why.
    pub fn without_model(reason: String) -> Classification {
        Classification {
            path: None,
            variant: None,
            cni: None,
            verdict: Verdict::Unclassified,
            detail: None,
            lacking: Some(reason),
        }
    }

    /// Adds what the topology lacks to the reason of this (unclassified) flow.
    pub fn lacking(self, what: String) -> Classification {
        Classification {
            lacking: Some(what),
            ..self
        }
    }

    pub(super) fn row(&self) -> Option<(&PathRow, &CompiledRow)> {
        let d = self.detail.as_ref()?;
        match d.outcome {
            Outcome::Row(r) => {
                let m = &d.classifier.inner.model;
                Some((&m.paths[r], &m.compiled[r]))
            }
            Outcome::Cilium | Outcome::NoRow => None,
        }
    }

    /// Runs `f` on the flow's facts, recomputed (they borrow the classifier's topology).
    pub(super) fn with_facts<T>(&self, f: impl FnOnce(&Classifier, &Facts) -> T) -> Option<T> {
        let d = self.detail.as_ref()?;
        if matches!(d.outcome, Outcome::Cilium) {
            return None;
        }
        let facts = d
            .classifier
            .facts(&d.event, d.in_iface.as_deref(), d.out_iface.as_deref());
        Some(f(&d.classifier, &facts))
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
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) model: Model,
    pub(super) topology: Topology,
}

/// Everything about one flow the rows and templates look at. Service lookups are made once,
/// and only if a row asks.
pub(super) struct Facts<'a> {
    pub(super) topology: &'a Topology,
    pub(super) proto: Proto,
    pub(super) orig: Tuple,
    pub(super) tr: Tuple,
    pub(super) nat: Nat,
    pub(super) src_class: AddrClass,
    pub(super) dst_class: AddrClass,
    /// The class of the destination after the node's DNAT (the same as `dst_class` without).
    pub(super) nat_dst_class: AddrClass,
    pub(super) direction: Direction,
    /// DNATed back to its own source address (see `PathRow::hairpin`).
    pub(super) hairpin: bool,
    pub(super) dst_service: OnceCell<Option<ServiceRef<'a>>>,
    pub(super) src_service: OnceCell<Option<&'a str>>,
    pub(super) in_iface: Option<&'a str>,
    pub(super) out_iface: Option<&'a str>,
}

impl<'a> Facts<'a> {
    pub(super) fn dst_service_ref(&self) -> Option<ServiceRef<'a>> {
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
pub(super) struct Problems {
    pub(super) dnat: bool,
    pub(super) snat: bool,
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
            cni: Some(self.topology().cni),
            verdict,
            detail: Some(Detail {
                classifier: self.clone(),
                event: ev.clone(),
                in_iface: in_iface.map(str::to_string),
                out_iface: out_iface.map(str::to_string),
                outcome,
            }),
            lacking: None,
        }
    }

    pub(super) fn facts<'a>(
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

    pub(super) fn problems(&self, row: &PathRow, f: &Facts) -> Problems {
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

    /// The class of the source the node SNATed to, `Kept` without SNAT, `None` when it is
    /// neither the node IP nor cbr0's gateway.
    pub(super) fn snat_source(&self, f: &Facts) -> Option<SnatSource> {
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
}
