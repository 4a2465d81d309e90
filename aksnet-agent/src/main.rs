//! `aksnet-agent`: the binary's edge. Parses flags, sets up logging, runs the pipeline, and turns
//! any error into one line on stderr with a non-zero exit code (no panic, no backtrace).

use aksnet_agent::capture::SourceChoice;
use aksnet_agent::output::dump::Format;
use aksnet_agent::pipeline::{self, Matcher, RunOptions};
use aksnet_agent::topology::{
    Cidr, CniMode, Dataplane, Etp, LbFrontend, OutboundType, TopologyLayer,
};
use clap::{Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
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
    #[command(flatten)]
    facts: FactArgs,
    /// Do not ask the Azure Instance Metadata Service for the node's subnet and the LB's
    /// outbound IPs (asked only on an Azure VM, from the agent's own network namespace).
    #[arg(long, global = true)]
    no_imds: bool,
    /// How often the topology is discovered again.
    #[arg(long, value_name = "SECONDS", global = true, value_parser = seconds)]
    topology_refresh: Option<Duration>,
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
    /// How long the load balancer (or NAT gateway) keeps an ended connection's SNAT port; AKS's
    /// load balancer default is 30 minutes, 0 frees ports when the node's entry ends.
    #[arg(long, value_name = "MINUTES", global = true)]
    outbound_idle_timeout: Option<u32>,
    /// Public IP addresses of the NAT gateway (64 512 SNAT ports each), where the topology's
    /// outbound_type is a NAT gateway.
    #[arg(long, value_name = "N", global = true)]
    nat_gateway_public_ips: Option<u32>,
    /// Live flows held before the oldest is evicted (each costs about 600 bytes).
    #[arg(long, value_name = "N", global = true)]
    max_flows: Option<usize>,
    /// Also print a line when a flow ends.
    #[arg(long, global = true)]
    show_ends: bool,
}

/// Topology facts, each over what the config file and discovery say. Lists take several
/// flags or comma-separated values; the config key of each is its name with underscores.
#[derive(clap::Args, Debug)]
struct FactArgs {
    /// The cluster's network mode (config `cni`).
    #[arg(long, value_parser = cni_parser(), global = true)]
    cni: Option<CniMode>,
    /// Where service NAT happens: iptables (kube-proxy) or cilium (config `dataplane`).
    #[arg(long, value_parser = parse_serde::<Dataplane>, global = true)]
    dataplane: Option<Dataplane>,
    /// This node's name (config `node_name`).
    #[arg(long, global = true)]
    node_name: Option<String>,
    /// The node's own addresses (config `node_ips`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    node_ip: Vec<IpAddr>,
    /// The vnet's address ranges (config `vnet_cidrs`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    vnet_cidr: Vec<Cidr>,
    /// The node subnet: every node's address is in it (config `node_subnet`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    node_subnet: Vec<Cidr>,
    /// The cluster pod CIDR (kubenet, Overlay) or the pod subnet (config `pod_cidr`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    pod_cidr: Vec<Cidr>,
    /// This node's share of the pod CIDR (config `node_pod_cidrs`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    node_pod_cidr: Vec<Cidr>,
    /// The Service CIDR (config `service_cidr`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    service_cidr: Vec<Cidr>,
    /// The API server's addresses: the endpoints of default/kubernetes (config `api_server`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    api_server: Vec<IpAddr>,
    /// Peered vnets and on-premises ranges (config `private_ranges`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    private_range: Vec<Cidr>,
    /// Application Gateway subnets (config `appgw_subnets`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    appgw_subnet: Vec<Cidr>,
    /// Application Gateway for Containers subnets (config `agc_subnets`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    agc_subnet: Vec<Cidr>,
    /// Private endpoint addresses (config `private_endpoints`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    private_endpoint: Vec<IpAddr>,
    /// Sources of LB health probes (config `health_probe_sources`; default 168.63.129.16).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    health_probe_source: Vec<IpAddr>,
    /// The LB's outbound public IPs (config `lb_outbound_ips`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    lb_outbound_ip: Vec<IpAddr>,
    /// Who SNATs traffic leaving the vnet: loadBalancer, managedNATGateway,
    /// userAssignedNATGateway, userDefinedRouting or none (config `outbound_type`).
    #[arg(long, value_parser = parse_serde::<OutboundType>, global = true)]
    outbound_type: Option<OutboundType>,
    /// An LB frontend: IP[,namespace/service[,Cluster|Local]] (config `lb_frontends`).
    #[arg(long, value_name = "FRONTEND", value_parser = lb_frontend, global = true)]
    lb_frontend: Vec<LbFrontend>,
    /// kubenet: cbr0's addresses (config `bridge_gateways`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    bridge_gateway: Vec<IpAddr>,
    /// Pods on this node (config `local_pods`).
    #[arg(long, value_name = "IP", value_delimiter = ',', global = true)]
    local_pod: Vec<IpAddr>,
    /// ip-masq-agent's nonMasqueradeCIDRs (config `non_masquerade_cidrs`).
    #[arg(long, value_name = "CIDR", value_delimiter = ',', global = true)]
    non_masquerade_cidr: Vec<Cidr>,
    /// ip-masq-agent's masqLinkLocal (config `masq_link_local`).
    #[arg(long, value_name = "BOOL", global = true)]
    masq_link_local: Option<bool>,
}

impl FactArgs {
    /// The flags' layer: what is not given stays unset.
    fn layer(self) -> TopologyLayer {
        fn given<T>(v: Vec<T>) -> Option<Vec<T>> {
            Some(v).filter(|v| !v.is_empty())
        }
        TopologyLayer {
            cni: self.cni,
            dataplane: self.dataplane,
            node_name: self.node_name,
            node_ips: given(self.node_ip),
            vnet_cidrs: given(self.vnet_cidr),
            node_subnet: given(self.node_subnet),
            pod_cidr: given(self.pod_cidr),
            service_cidr: given(self.service_cidr),
            appgw_subnets: given(self.appgw_subnet),
            agc_subnets: given(self.agc_subnet),
            private_endpoints: given(self.private_endpoint),
            health_probe_sources: given(self.health_probe_source),
            lb_outbound_ips: given(self.lb_outbound_ip),
            outbound_type: self.outbound_type,
            lb_frontends: given(self.lb_frontend),
            bridge_gateways: given(self.bridge_gateway),
            local_pods: given(self.local_pod),
            api_server: given(self.api_server),
            private_ranges: given(self.private_range),
            node_pod_cidrs: given(self.node_pod_cidr),
            non_masquerade_cidrs: given(self.non_masquerade_cidr),
            masq_link_local: self.masq_link_local,
            services: None,
            endpoints: None,
            interfaces: None,
        }
    }
}

/// A value spelled as in the config file (`loadBalancer`, `cilium`).
fn parse_serde<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|e| format!("{text:?}: {e}"))
}

/// `IP[,namespace/service[,Cluster|Local]]`.
fn lb_frontend(text: &str) -> Result<LbFrontend, String> {
    let mut parts = text.split(',');
    let ip = parts
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| format!("{text:?}: expected IP[,namespace/service[,Cluster|Local]]"))?;
    let service = parts.next().map(str::to_string);
    let external_traffic_policy = parts
        .next()
        .map(|p| match p {
            "Cluster" => Ok(Etp::Cluster),
            "Local" => Ok(Etp::Local),
            other => Err(format!(
                "{other:?}: externalTrafficPolicy is Cluster or Local"
            )),
        })
        .transpose()?;
    Ok(LbFrontend {
        ip,
        service,
        external_traffic_policy,
    })
}

/// `--cni`'s parser: the names AKS gives the modes, listed by `--help`.
fn cni_parser() -> impl clap::builder::TypedValueParser<Value = CniMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(CniMode::ALL.map(CniMode::as_str))
        .map(|name| name.parse().expect("each possible value is a mode's name"))
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
    /// Discover the topology once and print every fact, its value and its source (flag, config,
    /// api, imds, iptables, interfaces, default), what is missing and what blinds the agent.
    Topology,
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
    let imds = !common.no_imds && common.netns.is_none();
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
        flags: common.facts.layer(),
        imds,
        refresh: common.topology_refresh,
        model: common.model,
        metrics_listen: common.metrics_listen,
        allocated_outbound_ports: common.allocated_outbound_ports,
        node_pool_size: common.node_pool_size,
        outbound_idle_timeout_minutes: common.outbound_idle_timeout,
        nat_gateway_public_ips: common.nat_gateway_public_ips,
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
        Some(Command::Topology) => pipeline::topology(RunOptions {
            dump: Some(common.output),
            ..options
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Errors keep their causes as typed sources: the chain is printed here, once.
            eprintln!("aksnet-agent: {}", aksnet_agent::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_needed_fact_has_its_flag() {
        let cli = Cli::command();
        let longs: Vec<String> = cli
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        for flag in aksnet_agent::topology::needed_flags() {
            assert!(
                longs.iter().any(|l| l == flag),
                "{flag} is not a flag: {longs:?}"
            );
        }
    }

    #[test]
    fn fact_flags_fill_the_flags_layer() {
        let cli = Cli::try_parse_from([
            "aksnet-agent",
            "topology",
            "--vnet-cidr",
            "10.224.0.0/12,172.16.0.0/16",
            "--outbound-type",
            "userDefinedRouting",
            "--lb-frontend",
            "192.0.2.10,default/app,Local",
            "--masq-link-local",
            "false",
        ])
        .unwrap();
        let layer = cli.common.facts.layer();
        assert_eq!(layer.vnet_cidrs.map(|v| v.len()), Some(2));
        assert_eq!(layer.outbound_type, Some(OutboundType::UserDefinedRouting));
        let fe = &layer.lb_frontends.unwrap()[0];
        assert_eq!(
            (fe.service.as_deref(), fe.external_traffic_policy),
            (Some("default/app"), Some(Etp::Local))
        );
        assert_eq!(layer.masq_link_local, Some(false));
        assert_eq!(layer.node_ips, None);
        assert!(Cli::try_parse_from(["aksnet-agent", "--pod-cidr", "10.244.0.0"]).is_err());
        assert!(
            Cli::try_parse_from(["aksnet-agent", "--lb-frontend", "192.0.2.10,a/b,Both"]).is_err()
        );
    }
}
