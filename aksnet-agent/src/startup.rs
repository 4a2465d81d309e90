//! What the classifier knows, and how it learns more while the agent runs.
//!
//! At start the agent classifies with what the operator gave (config file, flags); discovery
//! (interfaces, iptables, IMDS, the Kubernetes API) runs on its own task, first at once and then
//! every refresh period, and hands each result to the event loop through a watch channel. The
//! event loop never waits for `iptables-save`, IMDS or the API. Nothing found is fatal: what is
//! missing is named, in the log, the metrics and every flow it leaves unclassified.

use crate::capture::netns::Netns;
use crate::enrich::{self, EnrichConfig, Enricher};
use crate::events::FlowEvent;
use crate::metrics::Metrics;
use crate::model::{Classification, Classifier, CniMismatch, Model, Verdict};
use crate::topology::imds::{self, Imds, IMDS_ADDR, IMDS_TIMEOUT};
use crate::topology::{
    self, Blindness, Discovery, Facts, LoadError, MissingFact, Source, Topology, TopologyError,
    TopologyLayer,
};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the operator gave: flags and model fixed for the run, the config file read again by
/// each round of discovery (a ConfigMap's update reaches the agent without a restart).
#[derive(Clone, Debug)]
pub struct Given {
    pub config_path: Option<PathBuf>,
    /// The config file as read at start.
    pub config: Option<TopologyLayer>,
    pub flags: TopologyLayer,
    /// `--model`, loaded once.
    pub model: Option<Model>,
    /// Ask IMDS (the agent observes its own, host, namespace on an Azure VM).
    pub imds: Option<Imds>,
}

impl Given {
    /// Loads the config file and the model file: errors in what the operator wrote stop the
    /// agent at once, with the file, line and field.
    pub fn load(
        config: Option<&PathBuf>,
        flags: TopologyLayer,
        model: Option<&PathBuf>,
        ask_imds: bool,
    ) -> Result<Given, LoadError> {
        Ok(Given {
            config_path: config.cloned(),
            config: config.map(|p| TopologyLayer::from_file(p)).transpose()?,
            flags,
            model: model.map(|p| Model::from_file(p)).transpose()?,
            imds: (ask_imds && imds::on_azure()).then(|| Imds::new(IMDS_ADDR, IMDS_TIMEOUT)),
        })
    }
}

/// What one round of discovery found, by source.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// The config file as this round read it.
    pub config: Option<TopologyLayer>,
    pub discovery: Discovery,
    pub imds: Option<TopologyLayer>,
    pub api: Option<TopologyLayer>,
    pub notes: Vec<String>,
}

/// Reads the config file again, discovers the node (in `netns`) and asks IMDS, on the calling
/// thread: all block. A config file that became unreadable or wrong is a warning, and the one
/// read at start stays.
pub fn discover_node(given: &Given, netns: &Netns) -> Found {
    let mut found = Found::default();
    if let Some(path) = &given.config_path {
        match TopologyLayer::from_file(path) {
            Ok(layer) => found.config = Some(layer),
            Err(e) => log::warn!("{e}; keeping the config read at start"),
        }
    }
    match netns.run_in(topology::discover) {
        Ok(discovery) => found.discovery = discovery,
        Err(e) => found
            .notes
            .push(format!("cannot discover the node's topology: {e}")),
    }
    if let Some(imds) = &given.imds {
        let (layer, notes) = imds.layer();
        found.imds = Some(layer);
        found.notes.extend(notes);
    }
    found
}

/// [`discover_node`] on a blocking thread: `iptables-save` and IMDS never hold an async one.
async fn discover_node_blocking(given: &Arc<Given>, netns: &Arc<Netns>) -> Found {
    let (given, netns) = (Arc::clone(given), Arc::clone(netns));
    tokio::task::spawn_blocking(move || discover_node(&given, &netns))
        .await
        .unwrap_or_else(|e| Found {
            notes: vec![format!("node discovery stopped: {e}")],
            ..Found::default()
        })
}

/// How often the Kubernetes API is read again: its facts (API server, Service CIDRs, pod CIDRs)
/// change rarely, and every node of a large cluster asks.
pub const API_REFRESH: Duration = Duration::from_secs(600);

/// The API's facts from the last read, and when that was.
#[derive(Default)]
struct ApiFacts {
    read_at: Option<Instant>,
    layer: TopologyLayer,
    notes: Vec<String>,
}

/// [`discover_node`] off the async threads; the Kubernetes API's facts, read again when older
/// than [`API_REFRESH`]; and the LB frontends the enrichment's Services watch knows.
async fn discover(
    given: &Arc<Given>,
    netns: &Arc<Netns>,
    enricher: &Enricher,
    api: &mut ApiFacts,
) -> Found {
    let mut found = discover_node_blocking(given, netns).await;
    if !enricher.is_enabled() {
        return found;
    }
    if api.read_at.is_none_or(|at| at.elapsed() >= API_REFRESH) {
        if let Some((layer, notes)) = enricher.cluster_layer().await {
            *api = ApiFacts {
                read_at: Some(Instant::now()),
                layer,
                notes,
            };
        }
    }
    found.api = Some(enricher.frontends_layer().over(api.layer.clone()));
    found.notes.extend(api.notes.iter().cloned());
    found
}

/// One round of discovery with the API read directly (no enrichment watches), for
/// `aksnet-agent topology`.
pub async fn discover_once(
    given: Arc<Given>,
    netns: Arc<Netns>,
) -> Result<Knowledge, KnowledgeError> {
    let mut found = discover_node_blocking(&given, &netns).await;
    match enrich::connect(EnrichConfig::from_env()).await {
        Ok(Some((client, node))) => {
            let (layer, notes) = enrich::cluster::cluster_layer(client, Some(&node)).await;
            found.api = Some(layer);
            found.notes.extend(notes);
        }
        Ok(None) => found
            .notes
            .push("no Kubernetes API configured: facts from the API are not read".into()),
        Err(e) => found.notes.push(e.to_string()),
    }
    Knowledge::build(&given, found)
}

/// Everything known about the topology, and the classifier built from it.
#[derive(Clone, Debug)]
pub struct Knowledge {
    pub facts: Facts,
    pub found: Found,
    pub classify: Classify,
}

/// Why the classifier could not be built from what was found.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    #[error(transparent)]
    Model(#[from] LoadError),
    #[error(transparent)]
    Cni(#[from] CniMismatch),
}

impl Knowledge {
    /// Merges what was found under what was given and builds the classifier. Only a model that
    /// does not fit the network mode is an error; a missing fact never is.
    pub fn build(given: &Given, found: Found) -> Result<Knowledge, KnowledgeError> {
        Self::build_after(given, found, None)
    }

    /// [`build`](Self::build), keeping `before`'s classifier when the facts did not change: the
    /// classifier follows from the facts alone, and rebuilding it (and dropping the old one on
    /// the event loop) every refresh costs the node CPU for nothing.
    fn build_after(
        given: &Given,
        found: Found,
        before: Option<&Knowledge>,
    ) -> Result<Knowledge, KnowledgeError> {
        let mut layers = found.discovery.layers.clone();
        layers.extend(found.imds.clone().map(|l| (Source::Imds, l)));
        layers.extend(found.api.clone().map(|l| (Source::Api, l)));
        let config = found.config.clone().or_else(|| given.config.clone());
        layers.extend(config.map(|l| (Source::Config, l)));
        layers.push((Source::Flag, given.flags.clone()));
        let facts = Facts::merge(layers);
        if let Some(before) = before.filter(|before| before.facts == facts) {
            return Ok(Knowledge {
                facts,
                found,
                classify: before.classify.clone(),
            });
        }
        let missing = facts.missing();
        let classifier = match Topology::from_merged(facts.layer.clone()) {
            Ok(topology) => {
                let model = match &given.model {
                    Some(model) => model.clone(),
                    None => Model::load_builtin(topology.cni).map_err(LoadError::from)?,
                };
                Some(Classifier::new(model, topology)?)
            }
            Err(TopologyError::NoCni) => None,
            Err(TopologyError::Load(e)) => return Err(e.into()),
        };
        Ok(Knowledge {
            facts,
            found,
            classify: Classify {
                classifier,
                missing,
            },
        })
    }

    /// What is known, for `aksnet-agent topology` and the start-up log.
    pub fn report(&self) -> Report<'_> {
        Report {
            facts: self.facts.entries(),
            missing: self.classify.missing.clone(),
            kube_proxy: self.found.discovery.kube_proxy.to_string(),
            blind: self.found.discovery.blind.clone(),
            notes: self
                .found
                .discovery
                .notes
                .iter()
                .chain(&self.found.notes)
                .map(String::as_str)
                .collect(),
        }
    }

    /// Writes [`Knowledge::report`]: one JSON object, or a table of facts followed by what is
    /// missing, kube-proxy's mode, what blinds the agent and discovery's notes.
    pub fn write_report(&self, json: bool, mut out: impl Write) -> std::io::Result<()> {
        let report = self.report();
        if json {
            let text = serde_json::to_string(&report).map_err(std::io::Error::other)?;
            return writeln!(out, "{text}");
        }
        let width = report.facts.iter().map(|f| f.fact.len()).max().unwrap_or(0);
        writeln!(out, "{:width$}  {:<10}  value", "fact", "source")?;
        for f in &report.facts {
            let source = f.source.as_str();
            writeln!(out, "{:width$}  {source:<10}  {}", f.fact, f.value)?;
        }
        for m in &report.missing {
            writeln!(out, "missing: {m}")?;
        }
        writeln!(out, "kube-proxy: {}", report.kube_proxy)?;
        for b in &report.blind {
            writeln!(out, "blind: {}", b.warning())?;
        }
        for note in &report.notes {
            writeln!(out, "note: {note}")?;
        }
        Ok(())
    }

    /// Logs what is known: each fact and its source, what is missing, and one WARN line per
    /// condition that blinds the agent.
    pub fn log(&self) {
        let report = self.report();
        for f in &report.facts {
            log::info!("topology: {} = {} (from {})", f.fact, f.value, f.source);
        }
        log::info!("topology: kube-proxy mode {}", report.kube_proxy);
        if !report.missing.is_empty() {
            log::warn!(
                "topology: missing {}; flows that need them are reported unclassified",
                join(&report.missing)
            );
        }
        for b in &report.blind {
            log::warn!("{}", b.warning());
        }
        for note in &report.notes {
            log::info!("discovery: {note}");
        }
    }

    /// Logs what changed since `before`: one line when the facts did, the missing facts when
    /// they changed, and a WARN line for each new blind spot, whether or not the facts changed
    /// (kube-proxy switching to IPVS or conntrack unloading changes no fact).
    fn log_changes(&self, before: &Knowledge) {
        if self.facts != before.facts {
            log::info!("topology changed on the node; classifying with the new one");
            if self.classify.missing != before.classify.missing {
                match self.classify.missing.as_slice() {
                    [] => log::info!("topology: no fact is missing any more"),
                    missing => log::warn!("topology: missing {}", join(missing)),
                }
            }
        }
        for b in self.new_blind_spots(before) {
            log::warn!("{}", b.warning());
        }
    }

    /// The blind spots found now that were not found in `before`.
    fn new_blind_spots<'a>(
        &'a self,
        before: &'a Knowledge,
    ) -> impl Iterator<Item = Blindness> + 'a {
        self.found
            .discovery
            .blind
            .iter()
            .copied()
            .filter(|b| !before.found.discovery.blind.contains(b))
    }

    /// Publishes the facts, what is missing and what blinds the agent as metrics.
    pub fn export(&self, metrics: &Metrics) {
        metrics.set_topology(
            &self.facts.entries(),
            &self.classify.missing,
            &self.found.discovery.blind,
        );
    }
}

/// `aksnet-agent topology`'s content.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub facts: Vec<topology::FactEntry>,
    pub missing: Vec<MissingFact>,
    pub kube_proxy: String,
    pub blind: Vec<Blindness>,
    pub notes: Vec<&'a str>,
}

fn join(missing: &[MissingFact]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The classifier as far as the topology allows: without the network mode there is no model,
/// and every flow is unclassified with the reason; with facts missing, what the model leaves
/// unclassified names them.
#[derive(Clone, Debug)]
pub struct Classify {
    classifier: Option<Classifier>,
    missing: Vec<MissingFact>,
}

impl Classify {
    pub fn topology(&self) -> Option<&Topology> {
        self.classifier.as_ref().map(Classifier::topology)
    }

    fn no_cni_reason(&self) -> String {
        let others: Vec<MissingFact> = self
            .missing
            .iter()
            .filter(|m| m.fact != "cni")
            .copied()
            .collect();
        if others.is_empty() {
            TopologyError::NoCni.to_string()
        } else {
            format!("{}; also missing: {}", TopologyError::NoCni, join(&others))
        }
    }

    /// Classifies a flow whose interface names the caller resolved.
    pub fn classify_with_interfaces(
        &self,
        ev: &FlowEvent,
        in_iface: Option<&str>,
        out_iface: Option<&str>,
    ) -> Classification {
        let Some(classifier) = &self.classifier else {
            return Classification::without_model(self.no_cni_reason());
        };
        let class = classifier.classify_with_interfaces(ev, in_iface, out_iface);
        if class.verdict == Verdict::Unclassified && !self.missing.is_empty() {
            return class.lacking(format!(
                "the topology lacks {}, which may be why",
                join(&self.missing)
            ));
        }
        class
    }
}

/// How long the agent waits after its capture is attached for the first discovery before it
/// classifies with what the operator gave alone (the discovery's result still arrives later).
pub const FIRST_DISCOVERY_WAIT: Duration = Duration::from_secs(2);

/// Runs discovery now and every `period` on its own task, and sends a classifier whenever the
/// facts change.
/// The first round is logged in full; later ones log what changed. A round whose classifier
/// cannot be built (a `--model` for another network mode) keeps the previous one, with a warning.
pub fn spawn_refresh(
    given: Arc<Given>,
    netns: Arc<Netns>,
    enricher: Enricher,
    metrics: Option<Arc<Metrics>>,
    period: Duration,
    initial: Classify,
) -> (watch::Receiver<Classify>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(initial);
    let task = tokio::spawn(async move {
        let mut previous: Option<Knowledge> = None;
        let mut api = ApiFacts::default();
        loop {
            let found = discover(&given, &netns, &enricher, &mut api).await;
            match Knowledge::build_after(&given, found, previous.as_ref()) {
                Ok(knowledge) => {
                    let changed = match &previous {
                        None => {
                            knowledge.log();
                            true
                        }
                        Some(before) => {
                            knowledge.log_changes(before);
                            knowledge.facts != before.facts
                        }
                    };
                    if let Some(metrics) = &metrics {
                        knowledge.export(metrics);
                    }
                    // The pipeline keeps its classifier until the facts change.
                    if changed && tx.send(knowledge.classify.clone()).is_err() {
                        return;
                    }
                    previous = Some(knowledge);
                }
                Err(err) => log::warn!("topology refresh failed, keeping the previous one: {err}"),
            }
            tokio::time::sleep(period).await;
        }
    });
    (rx, task)
}

/// The first discovery's classifier, if it comes within `wait`.
pub async fn first_discovery(rx: &mut watch::Receiver<Classify>, wait: Duration) -> bool {
    matches!(tokio::time::timeout(wait, rx.changed()).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Proto;
    use crate::model::tests::flow;
    use crate::topology::{CniMode, Discovery};

    fn given(flags: TopologyLayer) -> Given {
        Given {
            config_path: None,
            config: None,
            flags,
            model: None,
            imds: None,
        }
    }

    /// A DNAT to an address of a range nobody described: no model row matches it.
    fn unknown_flow() -> FlowEvent {
        flow(
            Proto::Tcp,
            "198.51.100.7:40000",
            "198.51.100.8:80",
            "198.51.100.7:40000",
            "198.51.100.9:8080",
        )
    }

    #[test]
    fn without_the_network_mode_every_flow_is_unclassified_and_says_why() {
        let k = Knowledge::build(&given(TopologyLayer::default()), Found::default()).unwrap();
        assert!(k.classify.topology().is_none());
        let c = k
            .classify
            .classify_with_interfaces(&unknown_flow(), None, None);
        assert_eq!(
            (c.verdict, c.cni, c.path.clone()),
            (Verdict::Unclassified, None, None)
        );
        let reason = c.reason().unwrap();
        for words in [
            "network mode is unknown",
            "--cni",
            "`vnet_cidrs`",
            "--vnet-cidr",
        ] {
            assert!(reason.contains(words), "{words:?} missing from {reason:?}");
        }
    }

    #[test]
    fn an_unclassified_flow_names_the_missing_facts() {
        let flags = TopologyLayer {
            cni: Some(CniMode::Kubenet),
            ..Default::default()
        };
        let k = Knowledge::build(&given(flags), Found::default()).unwrap();
        let c = k
            .classify
            .classify_with_interfaces(&unknown_flow(), None, None);
        assert_eq!(c.verdict, Verdict::Unclassified);
        assert_eq!(c.cni, Some(CniMode::Kubenet));
        let reason = c.reason().unwrap();
        assert!(
            reason.contains("the topology lacks `node_ips` (give it with --node-ip"),
            "{reason}"
        );
        assert!(reason.contains("`pod_cidr`"), "{reason}");
    }

    #[test]
    fn without_the_vnet_a_private_address_is_not_the_internet() {
        let flags = TopologyLayer {
            cni: Some(CniMode::Kubenet),
            pod_cidr: Some(vec!["10.244.0.0/16".parse().unwrap()]),
            node_ips: Some(vec!["10.224.0.4".parse().unwrap()]),
            ..Default::default()
        };
        let k = Knowledge::build(&given(flags), Found::default()).unwrap();
        let to = |dst: &str| {
            let ev = flow(
                Proto::Tcp,
                "10.244.0.10:40000",
                dst,
                "10.224.0.4:40000",
                dst,
            );
            k.classify
                .classify_with_interfaces(&ev, Some("cbr0"), Some("eth0"))
        };
        let vnet = to("10.224.0.8:80");
        assert_eq!(vnet.verdict, Verdict::Unclassified);
        let reason = vnet.reason().unwrap();
        assert!(reason.contains("10.224.0.8"), "{reason}");
        assert!(
            reason.contains("`vnet_cidrs` (give it with --vnet-cidr"),
            "{reason}"
        );
        // A public address is the internet whatever the vnet is.
        let internet = to("198.51.100.20:80");
        assert_ne!(internet.verdict, Verdict::Unclassified, "{internet:?}");
    }

    #[test]
    fn each_round_reads_the_config_file_again() {
        let path = std::env::temp_dir().join(format!("aksnet-startup-{}.toml", std::process::id()));
        std::fs::write(&path, "cni = \"kubenet\"\n").unwrap();
        let given = Given::load(Some(&path), TopologyLayer::default(), None, false).unwrap();
        let netns = crate::capture::netns::NetnsTarget::Own.open().unwrap();
        std::fs::write(
            &path,
            "cni = \"kubenet\"\nvnet_cidrs = [\"10.224.0.0/12\"]\n",
        )
        .unwrap();
        let k = Knowledge::build(&given, discover_node(&given, &netns)).unwrap();
        assert_eq!(k.facts.source("vnet_cidrs"), Some(Source::Config));
        // A broken file keeps what was read at start.
        std::fs::write(&path, "cni = \"token-ring\"\n").unwrap();
        let found = discover_node(&given, &netns);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(found.config, None);
        let k = Knowledge::build(&given, found).unwrap();
        assert_eq!(k.classify.topology().map(|t| t.cni), Some(CniMode::Kubenet));
        assert_eq!(k.facts.source("vnet_cidrs"), None);
    }

    #[test]
    fn a_refresh_keeps_the_classifier_until_the_facts_change() {
        let given = given(TopologyLayer {
            cni: Some(CniMode::Kubenet),
            ..Default::default()
        });
        let first = Knowledge::build(&given, Found::default()).unwrap();
        let topology = |k: &Knowledge| k.classify.topology().unwrap() as *const Topology;
        let same = Knowledge::build_after(&given, Found::default(), Some(&first)).unwrap();
        assert_eq!(topology(&same), topology(&first));
        let found = Found {
            config: Some(TopologyLayer {
                vnet_cidrs: Some(vec!["10.224.0.0/12".parse().unwrap()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let changed = Knowledge::build_after(&given, found, Some(&first)).unwrap();
        assert_ne!(changed.facts, first.facts);
        assert_ne!(topology(&changed), topology(&first));
    }

    #[test]
    fn a_blind_spot_appearing_with_unchanged_facts_is_new() {
        let with_blind = |blind: Vec<Blindness>| {
            let found = Found {
                discovery: Discovery {
                    blind,
                    ..Default::default()
                },
                ..Default::default()
            };
            Knowledge::build(&given(TopologyLayer::default()), found).unwrap()
        };
        let before = with_blind(vec![]);
        let now = with_blind(vec![
            Blindness::KubeProxyIpvs,
            Blindness::ConntrackNotLoaded,
        ]);
        assert!(now.facts == before.facts);
        assert_eq!(
            now.new_blind_spots(&before).collect::<Vec<_>>(),
            [Blindness::KubeProxyIpvs, Blindness::ConntrackNotLoaded]
        );
        assert_eq!(now.new_blind_spots(&now).count(), 0);
    }

    #[test]
    fn flags_win_over_the_config_and_discovery() {
        let discovered = TopologyLayer {
            cni: Some(CniMode::AzureCni),
            node_ips: Some(vec!["10.224.0.99".parse().unwrap()]),
            ..Default::default()
        };
        let found = Found {
            discovery: Discovery {
                layers: vec![(Source::Interfaces, discovered)],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut g = given(TopologyLayer {
            cni: Some(CniMode::Kubenet),
            ..Default::default()
        });
        g.config = Some(TopologyLayer {
            node_ips: Some(vec!["10.224.0.4".parse().unwrap()]),
            ..Default::default()
        });
        let k = Knowledge::build(&g, found).unwrap();
        let t = k.classify.topology().unwrap();
        assert_eq!(t.cni, CniMode::Kubenet);
        assert_eq!(
            t.node_ips(),
            ["10.224.0.4".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(k.facts.source("cni"), Some(Source::Flag));
        assert_eq!(k.facts.source("node_ips"), Some(Source::Config));
    }
}
