//! Settings of the metrics endpoint and of the SNAT port model (the `[metrics]` table of the
//! agent's configuration).

use super::MetricsError;
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};

/// Default port of the metrics endpoint.
pub const DEFAULT_PORT: u16 = 9965;

/// The most SNAT ports one backend instance can be given (`allocatedOutboundPorts`).
const MAX_ALLOCATED_PORTS: u32 = 64_000;

/// The largest backend pool Azure's default port allocation covers.
const MAX_DEFAULT_POOL: u32 = 1000;

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
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            allocated_outbound_ports: None,
            node_pool_size: 1,
            top_destinations: 20,
        }
    }
}

impl MetricsConfig {
    /// SNAT ports the LB gives one node, as the configuration implies.
    pub fn snat_ports_per_node(&self) -> Result<u32, MetricsError> {
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
