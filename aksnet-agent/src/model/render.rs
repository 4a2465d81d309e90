//! What a person reads about a classified flow, rendered only when read: the hop chain with
//! its addresses, the reason it deviates or is unclassified, and the JSON form of both.

use super::classify::{Facts, Outcome};
use super::compiled::{FlowFacts, Template, Var};
use super::{
    Classification, Classifier, CompiledRow, DnatExpect, Evidence, Hop, HopKind, HopMark,
    ModelEvidence, PathId, PathRow, SnatSource, Verdict,
};
use crate::events::{Endpoint, Nat};
use crate::topology::{AddrClass, CniMode, OutboundType, ServiceKind};
use serde::Serialize;
use std::net::IpAddr;

/// The JSON form: the fields of the dump line's classification.
#[derive(Serialize)]
struct Rendered<'a> {
    path: &'a Option<PathId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: &'a Option<String>,
    cni: Option<CniMode>,
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
        let Some(d) = &self.detail else {
            return Vec::new();
        };
        plan(row, d.event.nat(), d.classifier.topology().outbound_type)
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
        let own = self.model_reason();
        match (own, &self.lacking) {
            (Some(own), Some(lacking)) => Some(format!("{own}; {lacking}")),
            (own, lacking) => own.or_else(|| lacking.clone()),
        }
    }

    fn model_reason(&self) -> Option<String> {
        match self.detail.as_ref()?.outcome {
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

impl Classifier {
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
                Var::NodeIp => {
                    join(same_family(t.node_ips(), f.orig.src)).unwrap_or(unknown.into())
                }
                // lb_outbound_ips are the LB's: another outbound type's device has its own.
                Var::LbOutbound => match t.outbound_type {
                    OutboundType::LoadBalancer => {
                        join(same_family(t.lb_outbound_ips(), f.orig.src))
                            .unwrap_or_else(|| "not configured".into())
                    }
                    _ => "the device's own, not visible from the node".into(),
                },
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
        // An address of the vnet may be another node, which the node subnet would tell.
        let vnet_end = [f.src_class, f.dst_class].contains(&AddrClass::Vnet);
        let missing = if vnet_end && self.topology().node_subnets.is_empty() {
            "; if the vnet address is another node, declare the node subnet (node_subnet)"
        } else {
            ""
        };
        format!(
            "no {} model path for {} {} ({}) -> {} ({}){translated}, {}{service}{missing}",
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
            .services()
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
                    join(same_family(self.topology().node_ips(), o.src))
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
        let configured = same_family(t.lb_outbound_ips(), like);
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
