//! `aksnet-agent`: the binary's edge. Parses flags, sets up logging, runs the pipeline, and turns
//! any error into one line on stderr with a non-zero exit code (no panic, no backtrace).

use aksnet_agent::capture::SourceChoice;
use aksnet_agent::output::dump::Format;
use aksnet_agent::pipeline::{self, Matcher, RunOptions};
use aksnet_agent::topology::CniMode;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Shows what really happens to packets on an AKS node: conntrack's NAT, classified into the
/// documented AKS traffic paths.
#[derive(Parser, Debug)]
#[command(name = "aksnet-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print live flows as they are seen, one line each.
    #[arg(long)]
    dump: bool,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Debug)]
struct CommonArgs {
    /// Output format of `--dump` and `explain`.
    #[arg(long, value_enum, default_value_t = Format::Text, global = true)]
    output: Format,
    /// Network namespace to observe: a name from `ip netns list`, or a path such as
    /// /proc/PID/ns/net. Default: the agent's own.
    #[arg(long, global = true)]
    netns: Option<String>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", global = true, value_parser = seconds)]
    duration: Option<Duration>,
    /// Stop after this many flows were shown.
    #[arg(long, value_name = "N", global = true)]
    count: Option<u64>,
    /// Where conntrack events come from: eBPF programs, netlink conntrack events, or eBPF where it
    /// loads and netlink where it does not.
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto, global = true)]
    source: SourceChoice,
    /// Topology configuration file (TOML): CIDRs, node IPs, load balancer frontends, CNI mode.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The cluster's network mode, over what the config file and discovery say.
    #[arg(long, value_enum, global = true)]
    cni: Option<CniArg>,
    /// A model file to use instead of the built-in model of the CNI mode.
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// Serve Prometheus metrics here (default 0.0.0.0:9965 when running as a daemon; off for
    /// --dump unless given).
    #[arg(long, value_name = "ADDR", global = true)]
    metrics_listen: Option<SocketAddr>,
    /// SNAT ports the load balancer allocates to each node (allocatedOutboundPorts); default:
    /// Azure's default for --node-pool-size.
    #[arg(long, value_name = "PORTS", global = true)]
    allocated_outbound_ports: Option<u32>,
    /// Nodes in the load balancer's backend pool, which sets Azure's default port allocation.
    #[arg(long, value_name = "NODES", global = true)]
    node_pool_size: Option<u32>,
    /// Live flows held before the oldest is evicted (each costs about 600 bytes).
    #[arg(long, value_name = "N", global = true)]
    max_flows: Option<usize>,
    /// Also print a line when a flow ends.
    #[arg(long, global = true)]
    show_ends: bool,
}

/// `--cni` values, as AKS names the network plugins.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CniArg {
    Kubenet,
    AzureCni,
    AzureCniOverlay,
}

impl From<CniArg> for CniMode {
    fn from(arg: CniArg) -> CniMode {
        match arg {
            CniArg::Kubenet => CniMode::Kubenet,
            CniArg::AzureCni => CniMode::AzureCni,
            CniArg::AzureCniOverlay => CniMode::AzureCniOverlay,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one flow's hop chain as a diagram: the first live flow that involves ADDRESS, or
    /// each `--dump --output json` line read from standard input with `--from-dump -`.
    Explain {
        /// An address (and optionally :port) the flow must involve on either side.
        #[arg(long = "match", value_name = "ADDRESS")]
        matching: Option<Matcher>,
        /// Read flows from a file of `--dump --output json` lines instead of capturing ("-" is stdin).
        #[arg(long, value_name = "FILE")]
        from_dump: Option<PathBuf>,
        /// Also quote the seed note each path encodes and how aks-facts corrects it.
        #[arg(long)]
        verbose: bool,
    },
}

/// A positive, finite number of seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text} is not a positive, finite number of seconds"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let common = cli.common;
    let options = RunOptions {
        dump: cli.dump.then_some(common.output),
        diagram: false,
        verbose: false,
        matching: None,
        netns: common.netns,
        duration: common.duration,
        count: common.count,
        source: Some(common.source),
        config: common.config,
        cni: common.cni.map(CniMode::from),
        model: common.model,
        metrics_listen: common.metrics_listen,
        allocated_outbound_ports: common.allocated_outbound_ports,
        node_pool_size: common.node_pool_size,
        max_flows: common.max_flows,
        show_ends: common.show_ends,
    };
    let result = match cli.command {
        None => pipeline::run(options),
        Some(Command::Explain {
            matching,
            from_dump,
            verbose,
        }) => pipeline::explain(
            RunOptions {
                matching,
                verbose,
                dump: Some(common.output),
                ..options
            },
            from_dump,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Each error's message already names its cause and the way out; printing the
            // source chain too would repeat them.
            eprintln!("aksnet-agent: {err}");
            ExitCode::FAILURE
        }
    }
}
