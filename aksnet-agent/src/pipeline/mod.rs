//! The agent's pipeline, wired end to end: capture → flow table → classification → outputs
//! (dump, metrics). `main.rs` parses flags into [`RunOptions`] and calls [`run`] or [`explain`].
//! Here: start-up and the loop that feeds events on; `handle` does each event's work, `labels`
//! names what the metrics and the dump show of a classified flow.

use crate::capture::netns::{IfNames, Netns, NetnsError, NetnsTarget};
use crate::capture::{self, CaptureError, CaptureHealth, SourceChoice};
use crate::enrich::{EnrichConfig, Enricher};
use crate::events::FlowEvent;
use crate::flows::{FlowTable, InterfaceWait, INTERFACES_WAIT};
use crate::metrics::conntrack::ConntrackReader;
use crate::metrics::{self, Metrics, MetricsConfig, MetricsError, Readiness};
use crate::output::dump::{self, Dump, Format};
use crate::output::explain;
use crate::startup::{self, Classify, Given, Knowledge, KnowledgeError};
use crate::topology::{LoadError, TopologyLayer};
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod handle;
mod labels;
use handle::Pipeline;

/// Events waiting between the capture and the pipeline; beyond this the capture's own buffers
/// (ring buffer, netlink socket) absorb bursts and count what they lose.
const EVENT_QUEUE: usize = 65_536;
/// Live flows the table holds by default before it evicts the oldest: about 35 MiB at the
/// ~170 bytes a flow costs (BENCHMARKS.md), inside the DaemonSet's memory limit.
pub const DEFAULT_MAX_FLOWS: usize = 200_000;
/// Events handled in a row before the loop looks at its timers and signals again.
const EVENT_BATCH: usize = 1024;
/// On stop, events still arriving are handled until none came for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// The longest the drain on stop may take (Kubernetes waits 30 s before SIGKILL).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How often the node's topology is discovered again: pods, Services and frontends come and go
/// while a DaemonSet runs for days.
pub const TOPOLOGY_REFRESH: Duration = Duration::from_secs(30);
/// How long the exit waits for background work (a discovery stuck in a slow command).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(200);

/// What the operator asked for on the command line.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Print flows in this format (`--dump`); `None` runs as a daemon.
    pub dump: Option<Format>,
    /// Draw matching flows' hop chains instead of dump lines (`explain`).
    pub diagram: bool,
    /// Diagrams also quote the seed note and aks-facts' correction (`explain --verbose`).
    pub verbose: bool,
    /// Show only flows that involve this address.
    pub matching: Option<Matcher>,
    pub netns: Option<String>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub source: Option<SourceChoice>,
    pub config: Option<PathBuf>,
    /// Topology facts given as flags, over the config file and discovery.
    pub flags: TopologyLayer,
    /// Ask IMDS for the node's addresses (only on an Azure VM, in the host's namespace).
    pub imds: bool,
    /// How often discovery runs again (default [`TOPOLOGY_REFRESH`]).
    pub refresh: Option<Duration>,
    pub model: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub allocated_outbound_ports: Option<u32>,
    pub node_pool_size: Option<u32>,
    /// The outbound device's idle timeout: how long it keeps an ended flow's SNAT port.
    pub outbound_idle_timeout_minutes: Option<u32>,
    /// Public IPs of the NAT gateway, when the outbound type is one.
    pub nat_gateway_public_ips: Option<u32>,
    /// Live flows held before the oldest is evicted.
    pub max_flows: Option<usize>,
    pub show_ends: bool,
}

/// What stopped the agent, with the way out.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the capture stopped delivering events (its reader ended); the agent exits so that it is restarted")]
    CaptureStopped,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Model(#[from] LoadError),
    #[error(transparent)]
    Knowledge(#[from] KnowledgeError),
    /// Boxed: the capture's errors carry both sources' reasons and are much larger than the rest.
    #[error(transparent)]
    Capture(Box<CaptureError>),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot write flows to standard output: {0}")]
    Output(#[source] std::io::Error),
    #[error("cannot read flows from {}: {source}", path.display())]
    ReadDump {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not a `--dump --output json` line: {reason}", path.display())]
    DumpLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--match {0:?}: expected an IP address, IPv4:PORT or [IPv6]:PORT")]
    Match(String),
}

impl From<CaptureError> for AgentError {
    fn from(err: CaptureError) -> AgentError {
        AgentError::Capture(Box::new(err))
    }
}

/// `--match`: an address, optionally with a port, that a flow must involve on either side,
/// before or after NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matcher {
    addr: IpAddr,
    port: Option<u16>,
}

impl std::str::FromStr for Matcher {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Matcher, AgentError> {
        if let Ok(addr) = s.parse() {
            return Ok(Matcher { addr, port: None });
        }
        s.parse::<SocketAddr>()
            .map(|sa| Matcher {
                addr: sa.ip(),
                port: Some(sa.port()),
            })
            .map_err(|_| AgentError::Match(s.to_owned()))
    }
}

impl Matcher {
    pub fn matches(&self, event: &FlowEvent) -> bool {
        let translated = event.translated();
        [
            (event.orig.src, event.orig.sport),
            (event.orig.dst, event.orig.dport),
            (translated.src, translated.sport),
            (translated.dst, translated.dport),
        ]
        .iter()
        .any(|&(addr, port)| addr == self.addr && self.port.is_none_or(|p| p == port))
    }
}

/// Runs the agent until `--duration`, `--count`, SIGINT or SIGTERM.
pub fn run(options: RunOptions) -> Result<(), AgentError> {
    let runtime = runtime()?;
    let result = runtime.block_on(Agent::start(&options)?.run(&options));
    // A discovery stuck in `iptables-save` or an API call must not hold the exit.
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    result
}

/// `aksnet-agent topology`: discovers once and prints every fact, its value and its source,
/// what is missing, kube-proxy's mode and what blinds the agent.
pub fn topology(options: RunOptions) -> Result<(), AgentError> {
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let Agent { given, netns, .. } = Agent::start(&options)?;
        let knowledge = startup::discover_once(given, netns).await?;
        let format = options.dump.unwrap_or(Format::Text);
        knowledge
            .write_report(format == Format::Json, std::io::stdout().lock())
            .map_err(AgentError::Output)
    });
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    result
}

/// `explain`: hop diagrams of flows read from a JSON dump, or of the first live flow(s) that
/// `--match` (one unless `--count` says otherwise).
pub fn explain(options: RunOptions, from_dump: Option<PathBuf>) -> Result<(), AgentError> {
    match from_dump {
        None => run(RunOptions {
            diagram: options.dump != Some(Format::Json),
            dump: Some(options.dump.unwrap_or(Format::Text)),
            count: options.count.or(Some(1)),
            ..options
        }),
        Some(path) => explain_dump(&options, &path),
    }
}

fn explain_dump(options: &RunOptions, path: &PathBuf) -> Result<(), AgentError> {
    let agent = Agent::start(options)?;
    let found = startup::discover_node(&agent.given, &agent.netns);
    let classifier = Knowledge::build(&agent.given, found)?.classify;
    let read_err = |source| AgentError::ReadDump {
        path: path.clone(),
        source,
    };
    let input: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(read_err)?,
        ))
    };
    let mut out = std::io::stdout().lock();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(read_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let flow = dump::read_line(&line).map_err(|reason| AgentError::DumpLine {
            path: path.clone(),
            line: n + 1,
            reason,
        })?;
        if options.matching.is_some_and(|m| !m.matches(&flow.event)) {
            continue;
        }
        let class = classifier.classify_with_interfaces(
            &flow.event,
            flow.in_iface.as_deref(),
            flow.out_iface.as_deref(),
        );
        writeln!(
            out,
            "{}",
            explain::render(&flow.event, &class, options.verbose)
        )
        .map_err(AgentError::Output)?;
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, AgentError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)
}

/// Everything the pipeline holds between start-up and the first event.
struct Agent {
    netns: Arc<Netns>,
    given: Arc<Given>,
    /// What the operator gave alone, until discovery adds to it.
    classify: Classify,
}

impl Agent {
    fn start(options: &RunOptions) -> Result<Agent, AgentError> {
        let netns = options
            .netns
            .as_deref()
            .map_or(Ok(NetnsTarget::Own), str::parse)?
            .open()?;
        let given = Given::load(
            options.config.as_ref(),
            options.flags.clone(),
            options.model.as_ref(),
            options.imds,
        )?;
        let classify = Knowledge::build(&given, startup::Found::default())?.classify;
        Ok(Agent {
            netns: Arc::new(netns),
            given: Arc::new(given),
            classify,
        })
    }

    async fn run(self, options: &RunOptions) -> Result<(), AgentError> {
        let health = Arc::new(CaptureHealth::default());
        let readiness = Readiness::default();
        let metrics = self.metrics(options, &readiness).await?;
        let enricher = match Enricher::start(EnrichConfig::from_env()).await {
            Ok(enricher) => enricher,
            Err(err) => {
                log::warn!("Kubernetes enrichment off: {err}; flows show bare addresses");
                Enricher::disabled()
            }
        };
        let (mut updates, refresher) = startup::spawn_refresh(
            Arc::clone(&self.given),
            Arc::clone(&self.netns),
            enricher.clone(),
            metrics.clone(),
            options.refresh.unwrap_or(TOPOLOGY_REFRESH),
            self.classify,
        );
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        let source = options.source.unwrap_or(SourceChoice::Auto);
        let capture = capture::start(source, &self.netns, tx, Arc::clone(&health)).await?;
        // Events queue meanwhile; a slow discovery is not waited for beyond this.
        if !startup::first_discovery(&mut updates, startup::FIRST_DISCOVERY_WAIT).await {
            log::warn!(
                "discovery did not finish within {:?}; classifying with the config and flags until it does",
                startup::FIRST_DISCOVERY_WAIT
            );
        }
        let classifier = updates.borrow_and_update().clone();
        log::info!(
            "capturing conntrack NAT in network namespace {} with {}; {} model",
            self.netns,
            capture.source,
            classifier.topology().map_or("no", |t| t.cni.as_str())
        );
        if let Some(metrics) = &metrics {
            metrics.set_capture(Arc::clone(&health), capture.source);
        }
        readiness.set_ready(true);

        let mut pipeline = Pipeline {
            table: FlowTable::new(options.max_flows.unwrap_or(DEFAULT_MAX_FLOWS)),
            ifnames: IfNames::new(&self.netns)?,
            classifier,
            enricher,
            metrics,
            dump: options
                .dump
                .map(|format| Dump::new(format, std::io::stdout().lock())),
            diagram: options.diagram,
            verbose: options.verbose,
            matching: options.matching,
            show_ends: options.show_ends,
            shown: 0,
        };
        let deadline = options.duration.map(|d| Instant::now() + d);
        let mut stop = Stop::new().map_err(AgentError::Signals)?;
        // Connections reported before their first packet wait briefly for its interfaces.
        let mut waiting = InterfaceWait::new(INTERFACES_WAIT);
        let now = std::time::Instant::now;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => pipeline.handle_queued(event, &mut rx, &mut waiting, options.count)?,
                    None => return Err(AgentError::CaptureStopped),
                },
                _ = sleep_until(waiting.next_deadline().map(Instant::from_std)) => {
                    pipeline.handle_all(waiting.expire(now()), options.count)?;
                    pipeline.flush()?;
                }
                Ok(()) = updates.changed() => {
                    pipeline.classifier = updates.borrow_and_update().clone();
                }
                _ = sleep_until(deadline) => break,
                _ = stop.signalled() => break,
            }
            if pipeline.done(options.count) {
                break;
            }
        }
        // What was captured before the stop is still shown: drain until the capture is quiet, or
        // for DRAIN_LIMIT at most on a node whose traffic never pauses.
        let drain_end = Instant::now() + DRAIN_LIMIT;
        while !pipeline.done(options.count) && Instant::now() < drain_end {
            match tokio::time::timeout(DRAIN_QUIET, rx.recv()).await {
                Ok(Some(event)) => {
                    pipeline.handle_all(waiting.offer(event, now()), options.count)?;
                    pipeline.flush()?;
                }
                Ok(None) | Err(_) => break,
            }
        }
        pipeline.handle_all(waiting.drain(), options.count)?;
        pipeline.flush()?;
        let lost = health.lost.load(std::sync::atomic::Ordering::Relaxed);
        let recovered = health.recovered.load(std::sync::atomic::Ordering::Relaxed);
        if lost > 0 {
            log::warn!("{lost} capture event(s) were lost to full kernel buffers during this run ({recovered} of those connections were reported later)");
        }
        drop(capture);
        refresher.abort();
        Ok(())
    }

    async fn metrics(
        &self,
        options: &RunOptions,
        readiness: &Readiness,
    ) -> Result<Option<Arc<Metrics>>, AgentError> {
        // A dump is for a person at a terminal: no listener unless asked for.
        let listen = match (options.metrics_listen, options.dump) {
            (Some(addr), _) => addr,
            (None, None) => MetricsConfig::default().listen,
            (None, Some(_)) => return Ok(None),
        };
        let defaults = MetricsConfig::default();
        let config = MetricsConfig {
            listen,
            allocated_outbound_ports: options.allocated_outbound_ports,
            node_pool_size: options.node_pool_size.unwrap_or(defaults.node_pool_size),
            outbound_idle_timeout_minutes: options
                .outbound_idle_timeout_minutes
                .unwrap_or(defaults.outbound_idle_timeout_minutes),
            // Only the operator says it (no node reveals it): the flags over the config file.
            outbound_type: self
                .given
                .flags
                .outbound_type
                .or_else(|| self.given.config.as_ref()?.outbound_type)
                .unwrap_or_default(),
            nat_gateway_public_ips: options
                .nat_gateway_public_ips
                .unwrap_or(defaults.nat_gateway_public_ips),
            ..defaults
        };
        let metrics = Arc::new(Metrics::new(&config)?);
        match ConntrackReader::open(&self.netns) {
            Ok(reader) => metrics.set_conntrack(reader)?,
            Err(err) => log::warn!("conntrack table metrics off: {err}"),
        }
        let listener = metrics::bind(config.listen).await?;
        log::info!(
            "serving /metrics, /healthz and /readyz on {}",
            config.listen
        );
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&metrics),
            readiness.clone(),
        ));
        Ok(Some(metrics))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// SIGINT (Ctrl-C) and SIGTERM (how Kubernetes stops a pod) both end the run cleanly.
struct Stop {
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn signalled(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
    }
}
