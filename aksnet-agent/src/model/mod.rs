//! AKS path models as data: one TOML file per CNI mode (`models/*.toml`), embedded in the binary
//! and replaceable with a file. Each `[[path]]` row says how to recognise a flow (direction,
//! address classes, protocol, ports, Service policy, hairpin), which hops it crosses (observed on
//! the node or inferred, and from what), which NAT the node should apply, and which sentence of
//! the seed notes it encodes (`seed`) and how aks-facts.md corrects it (`refines`).
//! The [`Classifier`] interprets the rows; no path is special-cased in code.

mod classify;
mod compiled;
mod render;

pub use classify::{
    Classification, Classifier, CniMismatch, Evidence, Hop, HopMark, PathId, Verdict,
};

use crate::events::Proto;
use crate::topology::{AddrClass, CniMode, Etp, FileError, LoadError};
use compiled::{Candidates, RowMatch, Template};
use serde::{Deserialize, Deserializer};
use std::path::Path;
use toml::Spanned;

/// A loaded model: the path rows for one CNI mode, in match order, and the same rows compiled
/// for matching (`compiled`, index for index).
#[derive(Clone, Debug)]
pub struct Model {
    cni: CniMode,
    origin: String,
    paths: Vec<PathRow>,
    compiled: Vec<CompiledRow>,
    candidates: Candidates,
}

/// A row's matcher and its templates, parsed once.
#[derive(Clone, Debug)]
struct CompiledRow {
    matcher: RowMatch,
    describe: Template,
    /// Per hop: its label and, for an inferred hop, what it is inferred from.
    labels: Vec<Template>,
    froms: Vec<Option<Template>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    cni: Spanned<CniMode>,
    #[serde(rename = "path")]
    paths: Vec<PathRow>,
}

/// Which way a flow goes relative to the node and its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From outside the node to a pod, the node, a frontend or a Service.
    Inbound,
    /// From a pod or the node to outside.
    Outbound,
    /// Both ends are the node, its pods or cluster Services.
    Internal,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Internal => "internal",
        }
    }
}

/// Transport protocol names as the model files write them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProtoName {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl ProtoName {
    fn matches(self, p: Proto) -> bool {
        matches!(
            (self, p),
            (ProtoName::Tcp, Proto::Tcp)
                | (ProtoName::Udp, Proto::Udp)
                | (ProtoName::Sctp, Proto::Sctp)
                | (ProtoName::Icmp, Proto::Icmp)
                | (ProtoName::Icmpv6, Proto::Icmpv6)
        )
    }
}

/// `"80"` or `"30000-32767"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRange(u16, u16);

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parse = |p: &str| p.trim().parse::<u16>().ok();
        let range = match s.split_once('-') {
            Some((a, b)) => parse(a).zip(parse(b)),
            None => parse(&s).map(|p| (p, p)),
        };
        match range {
            Some((a, b)) if a <= b => Ok(PortRange(a, b)),
            _ => Err(serde::de::Error::custom(format!(
                "`{s}` is not a port or a range like \"30000-32767\""
            ))),
        }
    }
}

/// NAT the node applies, according to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnatExpect {
    Yes,
    No,
    /// Either is normal (a health probe to a nodePort is DNATed, one to the
    /// healthCheckNodePort is answered by kube-proxy itself).
    Any,
}

/// What the source of a flow should look like after the node: kept, or SNATed to one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatSource {
    /// No SNAT: the pod IP or client address survives.
    Kept,
    NodeIp,
    /// kubenet: `cbr0`'s address, what MASQUERADE picks toward a local pod.
    BridgeGateway,
}

impl SnatSource {
    fn describe(self) -> &'static str {
        match self {
            SnatSource::Kept => "no SNAT",
            SnatSource::NodeIp => "the node IP",
            SnatSource::BridgeGateway => "cbr0's gateway",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NatExpect {
    dnat: DnatExpect,
    snat: Vec<SnatSource>,
    /// What to check when DNAT or SNAT deviates, in operator words.
    hint_dnat: Option<String>,
    hint_snat: Option<String>,
}

/// Kinds of hop; how each one's addresses are computed is generic, not per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopKind {
    /// The connection's original source.
    Client,
    /// A pod, as source (first hop) or destination (last hop).
    Pod,
    /// The far end of an outbound flow.
    Destination,
    /// The node the agent runs on, with the interfaces the packet crossed.
    Node,
    /// Azure Load Balancer forwarding with floating IP (off-node, inferred).
    AzureLb,
    /// Application Gateway terminating the client connection and opening a new one.
    AppgwProxy,
    /// Application Gateway for Containers, likewise.
    AgcProxy,
    /// An in-cluster L7 proxy pod (ingress controller) opening the upstream connection.
    IngressProxy,
    /// kube-proxy's DNAT on the node (observed in conntrack).
    NodeDnat,
    /// MASQUERADE on the node (kube-proxy or ip-masq-agent, observed in conntrack).
    NodeSnat,
    /// SNAT off the node by the outbound type's device (inferred).
    OutboundSnat,
}

impl HopKind {
    fn is_node_nat(self) -> bool {
        matches!(self, HopKind::NodeDnat | HopKind::NodeSnat)
    }

    fn is_off_node(self) -> bool {
        matches!(
            self,
            HopKind::AzureLb | HopKind::AppgwProxy | HopKind::AgcProxy | HopKind::OutboundSnat
        )
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HopSpec {
    kind: HopKind,
    label: Spanned<String>,
    evidence: Spanned<ModelEvidence>,
    /// What an inferred hop is inferred from (a template).
    from: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ModelEvidence {
    Observed,
    Inferred,
}

/// One documented AKS path (or one variant of it).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRow {
    id: Spanned<String>,
    variant: Option<String>,
    direction: Direction,
    src: Vec<AddrClass>,
    dst: Vec<AddrClass>,
    /// Matches only when the destination after the node's DNAT is of one of these classes: a
    /// Service whose endpoint is not a pod is told by what its endpoint is.
    #[serde(default)]
    nat_dst: Vec<AddrClass>,
    #[serde(default)]
    proto: Vec<ProtoName>,
    #[serde(default)]
    dports: Vec<PortRange>,
    /// Matches only when the destination's Service has this externalTrafficPolicy.
    etp: Option<Etp>,
    /// Matches only a hairpin: kube-proxy DNATed the flow back to the pod that opened it (the
    /// translated destination is the original source), which `KUBE-SEP-*`'s
    /// `-s <endpoint ip> -j KUBE-MARK-MASQ` marks for MASQUERADE.
    #[serde(default)]
    hairpin: bool,
    /// Glob patterns (`*` wildcard) on the `namespace/name` of the source's / destination's Service.
    #[serde(default)]
    src_service: Vec<String>,
    #[serde(default)]
    dst_service: Vec<String>,
    seed: String,
    refines: Option<String>,
    /// How messages name a flow of this path (a template).
    describe: Spanned<String>,
    /// What SNAT would lose, e.g. "the client address".
    keeps: Option<String>,
    nat: NatExpect,
    hops: Vec<HopSpec>,
}

impl PathRow {
    pub fn id(&self) -> &str {
        self.id.get_ref()
    }

    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    pub fn seed(&self) -> &str {
        &self.seed
    }

    pub fn refines(&self) -> Option<&str> {
        self.refines.as_deref()
    }
}

const BUILTIN: [(CniMode, &str, &str); 3] = [
    (
        CniMode::Kubenet,
        "models/kubenet.toml",
        include_str!("../../models/kubenet.toml"),
    ),
    (
        CniMode::AzureCni,
        "models/azure-cni.toml",
        include_str!("../../models/azure-cni.toml"),
    ),
    (
        CniMode::AzureCniOverlay,
        "models/azure-cni-overlay.toml",
        include_str!("../../models/azure-cni-overlay.toml"),
    ),
];

impl Model {
    /// The model embedded in the binary for `cni`.
    pub fn load_builtin(cni: CniMode) -> Result<Model, FileError> {
        let (_, name, text) = BUILTIN
            .iter()
            .find(|(mode, _, _)| *mode == cni)
            .expect("every CNI mode has a built-in model");
        Model::parse(Path::new(name), text)
    }

    /// A model file that replaces the built-in one for the CNI mode it declares.
    pub fn from_file(path: &Path) -> Result<Model, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Ok(Model::parse(path, &text)?)
    }

    pub fn cni(&self) -> CniMode {
        self.cni
    }

    /// Where the model came from (built-in name or file path), for logs and `explain`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn paths(&self) -> &[PathRow] {
        &self.paths
    }

    fn parse(file: &Path, text: &str) -> Result<Model, FileError> {
        let m: ModelFile = crate::topology::parse_toml(file, text)?;
        let err = |span: std::ops::Range<usize>, field: &str, msg: String| {
            FileError::at(file, text, span, field, msg)
        };
        if m.paths.is_empty() {
            return Err(err(
                m.cni.span(),
                "path",
                "the model has no [[path]] rows".into(),
            ));
        }
        let mut seen: Vec<(&str, Option<&str>)> = Vec::new();
        let mut compiled = Vec::with_capacity(m.paths.len());
        for row in &m.paths {
            let key = (row.id(), row.variant());
            if seen.contains(&key) {
                return Err(err(
                    row.id.span(),
                    "path.id",
                    format!(
                        "duplicate path `{}` variant {:?}: give each row its own variant",
                        key.0, key.1
                    ),
                ));
            }
            seen.push(key);
            let at_id = |field: &str, msg: String| {
                err(row.id.span(), field, format!("path `{}`: {msg}", row.id()))
            };
            if row.seed.trim().is_empty() {
                return Err(at_id(
                    "path.seed",
                    "cite the seed sentence this row encodes".into(),
                ));
            }
            if row.hairpin && row.nat.dnat != DnatExpect::Yes {
                return Err(at_id(
                    "path.hairpin",
                    "a hairpin is kube-proxy's DNAT back to the source: set nat.dnat = \"yes\""
                        .into(),
                ));
            }
            if row.src.is_empty() || row.dst.is_empty() {
                return Err(at_id(
                    "path.src",
                    "src and dst need at least one address class".into(),
                ));
            }
            if row.nat.snat.is_empty() {
                return Err(at_id("path.nat.snat", "list the allowed sources after the node: \"kept\", \"node-ip\", \"bridge-gateway\"".into()));
            }
            if row.hops.len() < 2 {
                return Err(at_id(
                    "path.hops",
                    "a hop chain needs at least its two ends".into(),
                ));
            }
            let template = |t: &Spanned<String>, field: &str| {
                Template::parse(t.get_ref()).map_err(|m| err(t.span(), field, m))
            };
            let describe = template(&row.describe, "path.describe")?;
            // A required NAT needs its hop, a forbidden one must not have one; an optional one may.
            let has = |k: HopKind| row.hops.iter().any(|h| h.kind == k);
            let dnat_ok = match row.nat.dnat {
                DnatExpect::Yes => has(HopKind::NodeDnat),
                DnatExpect::No => !has(HopKind::NodeDnat),
                DnatExpect::Any => true,
            };
            if !dnat_ok {
                return Err(at_id("path.hops", "nat.dnat and the hop chain disagree: \"yes\" needs a node-dnat hop, \"no\" must not have one".into()));
            }
            let snat_ok = match (row.nat.snat.contains(&SnatSource::Kept), row.nat.snat.len()) {
                (true, 1) => !has(HopKind::NodeSnat),
                (false, _) => has(HopKind::NodeSnat),
                (true, _) => true,
            };
            if !snat_ok {
                return Err(at_id("path.hops", "nat.snat and the hop chain disagree: a required SNAT needs a node-snat hop, snat = [\"kept\"] must not have one".into()));
            }
            for hop in &row.hops {
                let ev = *hop.evidence.get_ref();
                let bad = (hop.kind.is_node_nat() && ev != ModelEvidence::Observed)
                    || (hop.kind.is_off_node() && ev != ModelEvidence::Inferred);
                if bad {
                    return Err(err(
                        hop.evidence.span(),
                        "path.hops.evidence",
                        format!(
                            "path `{}`: a {:?} hop is {} by a node agent",
                            row.id(),
                            hop.kind,
                            if hop.kind.is_node_nat() {
                                "observed"
                            } else {
                                "only inferred"
                            }
                        ),
                    ));
                }
                if hop.from.is_none() && ev == ModelEvidence::Inferred {
                    return Err(at_id(
                        "path.hops.from",
                        format!(
                            "the inferred hop `{}` must say what it is inferred from",
                            hop.label.get_ref()
                        ),
                    ));
                }
            }
            compiled.push(CompiledRow {
                matcher: RowMatch::new(row),
                describe,
                labels: row
                    .hops
                    .iter()
                    .map(|h| template(&h.label, "path.hops.label"))
                    .collect::<Result<_, _>>()?,
                froms: row
                    .hops
                    .iter()
                    .map(|h| {
                        h.from
                            .as_ref()
                            .map(|f| template(f, "path.hops.from"))
                            .transpose()
                    })
                    .collect::<Result<_, _>>()?,
            });
        }
        let candidates = Candidates::new(&m.paths);
        Ok(Model {
            cni: *m.cni.get_ref(),
            origin: file.display().to_string(),
            paths: m.paths,
            compiled,
            candidates,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
