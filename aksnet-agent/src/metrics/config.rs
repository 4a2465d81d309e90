//! Settings of the metrics endpoint and of the SNAT port model (the `[metrics]` table of the
//! agent's configuration).

use super::MetricsError;
use crate::topology::OutboundType;
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Default port of the metrics endpoint.
pub const DEFAULT_PORT: u16 = 9965;

/// The most SNAT ports one backend instance can be given (`allocatedOutboundPorts`).
const MAX_ALLOCATED_PORTS: u32 = 64_000;

/// The largest backend pool Azure's default port allocation covers.
const MAX_DEFAULT_POOL: u32 = 1000;

/// SNAT ports a NAT gateway has per public IP address, shared by the subnet's nodes.
const NAT_GATEWAY_PORTS_PER_IP: u32 = 64_512;

/// A NAT gateway takes at most 16 public IP addresses.
const MAX_NAT_GATEWAY_IPS: u32 = 16;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// SNAT ports the LB allocates to each node (the outbound rule's `allocatedOutboundPorts`,
    /// AKS `--load-balancer-outbound-ports`). `None` or 0 (AKS's own "default" value): Azure's
    /// default for `node_pool_size`.
    pub allocated_outbound_ports: Option<u32>,
    /// Nodes in the LB's backend pool, which sets Azure's default allocation (1–1000).
    pub node_pool_size: u32,
    /// How many label sets each per-destination gauge keeps; the rest is summed into `other`.
    pub top_destinations: usize,
    /// How many source pods the per-destination, per-pod gauge keeps for each destination; the
    /// rest is summed into `pod="other"`.
    pub top_pods_per_destination: usize,
    /// How long the outbound device keeps an ended flow's SNAT port (the outbound rule's idle
    /// timeout, AKS `--load-balancer-idle-timeout`; AKS's default is 30 minutes). 0: ports are
    /// free as soon as the node's conntrack entry ends.
    pub outbound_idle_timeout_minutes: u32,
    /// Which device SNATs outbound flows off the node (the topology's `outbound_type`): the LB's
    /// outbound rule, or a NAT gateway, whose ports are counted per public IP instead.
    pub outbound_type: OutboundType,
    /// Public IP addresses of the NAT gateway, with `outbound_type` a NAT gateway (1–16).
    pub nat_gateway_public_ips: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            allocated_outbound_ports: None,
            node_pool_size: 1,
            top_destinations: 20,
            top_pods_per_destination: 5,
            outbound_idle_timeout_minutes: 30,
            outbound_type: OutboundType::LoadBalancer,
            nat_gateway_public_ips: 1,
        }
    }
}

impl MetricsConfig {
    /// How long an ended flow's outbound port stays held.
    pub fn outbound_idle_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.outbound_idle_timeout_minutes) * 60)
    }

    /// SNAT ports the outbound device gives this node per destination, as the configuration
    /// implies: the LB's allocation, or for a NAT gateway all its ports (the subnet's nodes share
    /// them, so this node's share may be smaller).
    pub fn snat_ports_per_node(&self) -> Result<u32, MetricsError> {
        match self.outbound_type {
            OutboundType::ManagedNatGateway | OutboundType::UserAssignedNatGateway => {
                match self.nat_gateway_public_ips {
                    ips @ 1..=MAX_NAT_GATEWAY_IPS => Ok(ips * NAT_GATEWAY_PORTS_PER_IP),
                    ips => Err(MetricsError::Config(format!(
                        "nat_gateway_public_ips = {ips}: a NAT gateway has 1 to \
                         {MAX_NAT_GATEWAY_IPS} public IP addresses; set the number it has"
                    ))),
                }
            }
            _ => self.lb_snat_ports_per_node(),
        }
    }

    fn lb_snat_ports_per_node(&self) -> Result<u32, MetricsError> {
        match self.allocated_outbound_ports {
            Some(ports @ 1..=MAX_ALLOCATED_PORTS) => Ok(ports),
            Some(ports) if ports > MAX_ALLOCATED_PORTS => Err(MetricsError::Config(format!(
                "allocated_outbound_ports = {ports} exceeds Azure's maximum of \
                 {MAX_ALLOCATED_PORTS} per node; set the outbound rule's value"
            ))),
            _ => default_ports_per_node(self.node_pool_size).ok_or_else(|| {
                MetricsError::Config(format!(
                    "node_pool_size = {} has no Azure default SNAT allocation (1 to \
                     {MAX_DEFAULT_POOL} nodes); set allocated_outbound_ports instead",
                    self.node_pool_size
                ))
            }),
        }
    }
}

/// Azure Load Balancer's default SNAT ports per backend instance for a pool of `nodes`.
fn default_ports_per_node(nodes: u32) -> Option<u32> {
    Some(match nodes {
        1..=50 => 1024,
        51..=100 => 512,
        101..=200 => 256,
        201..=400 => 128,
        401..=800 => 64,
        801..=MAX_DEFAULT_POOL => 32,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allocation_follows_the_pool_size_brackets() {
        let cases = [
            (1, 1024),
            (50, 1024),
            (51, 512),
            (100, 512),
            (101, 256),
            (200, 256),
            (201, 128),
            (400, 128),
            (401, 64),
            (800, 64),
            (801, 32),
            (1000, 32),
        ];
        for (nodes, ports) in cases {
            assert_eq!(default_ports_per_node(nodes), Some(ports), "{nodes} nodes");
        }
        assert_eq!(default_ports_per_node(0), None);
        assert_eq!(default_ports_per_node(1001), None);
    }

    #[test]
    fn explicit_allocation_overrides_the_default_and_zero_means_default() {
        let mut config = MetricsConfig {
            node_pool_size: 120,
            ..MetricsConfig::default()
        };
        assert_eq!(config.snat_ports_per_node().unwrap(), 256);
        config.allocated_outbound_ports = Some(4000);
        assert_eq!(config.snat_ports_per_node().unwrap(), 4000);
        config.allocated_outbound_ports = Some(0);
        assert_eq!(config.snat_ports_per_node().unwrap(), 256);
        config.allocated_outbound_ports = Some(64_001);
        let err = config.snat_ports_per_node().unwrap_err().to_string();
        assert!(err.contains("64000"), "{err}");
        config.allocated_outbound_ports = None;
        config.node_pool_size = 2000;
        let err = config.snat_ports_per_node().unwrap_err().to_string();
        assert!(err.contains("allocated_outbound_ports"), "{err}");
    }

    #[test]
    fn a_nat_gateway_counts_its_ports_per_public_ip() {
        let mut config = MetricsConfig {
            outbound_type: OutboundType::ManagedNatGateway,
            allocated_outbound_ports: Some(1024),
            ..MetricsConfig::default()
        };
        assert_eq!(config.snat_ports_per_node().unwrap(), 64_512);
        config.nat_gateway_public_ips = 2;
        config.outbound_type = OutboundType::UserAssignedNatGateway;
        assert_eq!(config.snat_ports_per_node().unwrap(), 129_024);
        config.nat_gateway_public_ips = 17;
        let err = config.snat_ports_per_node().unwrap_err().to_string();
        assert!(err.contains("nat_gateway_public_ips = 17"), "{err}");
        config.outbound_type = OutboundType::LoadBalancer;
        assert_eq!(config.snat_ports_per_node().unwrap(), 1024);
    }

    #[test]
    fn idle_timeout_defaults_to_aks_30_minutes() {
        let config = MetricsConfig::default();
        assert_eq!(config.outbound_idle_timeout(), Duration::from_secs(1800));
        let config: MetricsConfig = toml::from_str("outbound_idle_timeout_minutes = 0").unwrap();
        assert!(config.outbound_idle_timeout().is_zero());
    }

    #[test]
    fn deserializes_with_defaults() {
        let config: MetricsConfig = toml::from_str("node_pool_size = 60").unwrap();
        assert_eq!(config.listen, "0.0.0.0:9965".parse().unwrap());
        assert_eq!(config.top_destinations, 20);
        assert_eq!(config.snat_ports_per_node().unwrap(), 512);
        let config: MetricsConfig =
            toml::from_str("listen = \"127.0.0.1:19965\"\nallocated_outbound_ports = 2048")
                .unwrap();
        assert_eq!(config.listen.port(), 19965);
        assert_eq!(config.snat_ports_per_node().unwrap(), 2048);
        assert!(toml::from_str::<MetricsConfig>("top_n = 3").is_err());
    }
}
