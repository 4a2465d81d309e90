//! Where an address is in the topology's lists, found with one hash lookup: the lists grow with
//! the cluster (thousands of Service ports and endpoints), and every new flow looks up two to
//! three addresses and its destination's Service. [`Topology`] builds the index from its lists
//! when it is built and keeps both private, so the index cannot go stale.

use super::{ServiceKind, Topology};
use crate::events::Proto;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

/// A set of the address lists, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Lists(u16);

impl Lists {
    pub(super) const HEALTH_PROBE: Lists = Lists(1 << 0);
    /// An LB frontend, or the IP of a LoadBalancer or external-IP Service port.
    pub(super) const LB_FRONTEND: Lists = Lists(1 << 1);
    pub(super) const LB_OUTBOUND: Lists = Lists(1 << 2);
    pub(super) const NODE_IP: Lists = Lists(1 << 3);
    pub(super) const BRIDGE_GATEWAY: Lists = Lists(1 << 4);
    pub(super) const LOCAL_POD: Lists = Lists(1 << 5);
    /// The IP of a ClusterIP Service port.
    pub(super) const CLUSTER_IP: Lists = Lists(1 << 6);
    pub(super) const API_SERVER: Lists = Lists(1 << 7);
    pub(super) const PRIVATE_ENDPOINT: Lists = Lists(1 << 8);
    /// A Service endpoint kube-proxy lists.
    pub(super) const ENDPOINT: Lists = Lists(1 << 9);

    #[inline]
    pub(super) fn has(self, list: Lists) -> bool {
        self.0 & list.0 != 0
    }
}

/// One address: the lists it is in, and its positions in the lists the topology searches by
/// address (positions keep the lists' order, so the first match is the one a walk finds).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Listed {
    pub(super) lists: Lists,
    /// The first LB frontend with this IP.
    pub(super) lb_frontend: Option<usize>,
    /// The Service ports with this IP, in order.
    pub(super) services: Vec<usize>,
    /// The first Service endpoint with this IP.
    pub(super) endpoint: Option<usize>,
}

/// An address as a key: one integer to hash (the derived `Hash` of `IpAddr` feeds its variant,
/// the octets' count and the octets, three calls for every lookup). The family is not hashed:
/// addresses of the two families may collide, and compare unequal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key(IpAddr);

impl Hash for Key {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self.0 {
            IpAddr::V4(a) => state.write_u32(a.to_bits()),
            IpAddr::V6(a) => state.write_u128(a.to_bits()),
        }
    }
}

#[derive(Clone, Default, PartialEq)]
pub(super) struct AddrIndex {
    by_ip: foldhash::HashMap<Key, Listed>,
    /// The first NodePort (a Service port without an IP) of each protocol and port.
    node_ports: foldhash::HashMap<(Proto, u16), usize>,
}

impl AddrIndex {
    /// The index of `t`'s address lists.
    pub(super) fn of(t: &Topology) -> AddrIndex {
        let mut index = AddrIndex::default();
        index.add(Lists::HEALTH_PROBE, &t.health_probe_sources);
        index.add(Lists::LB_OUTBOUND, &t.lb_outbound_ips);
        index.add(Lists::NODE_IP, &t.node_ips);
        index.add(Lists::BRIDGE_GATEWAY, &t.bridge_gateways);
        index.add(Lists::LOCAL_POD, &t.local_pods);
        index.add(Lists::API_SERVER, &t.api_server);
        index.add(Lists::PRIVATE_ENDPOINT, &t.private_endpoints);
        for (i, f) in t.lb_frontends.iter().enumerate() {
            let listed = index.entry(f.ip, Lists::LB_FRONTEND);
            listed.lb_frontend.get_or_insert(i);
        }
        for (i, s) in t.services.iter().enumerate() {
            let Some(ip) = s.ip else {
                index.node_ports.entry((s.proto, s.port)).or_insert(i);
                continue;
            };
            let list = match s.kind {
                ServiceKind::LoadBalancer | ServiceKind::ExternalIp => Lists::LB_FRONTEND,
                ServiceKind::ClusterIp => Lists::CLUSTER_IP,
                // A NodePort has no IP of its own; one given one is found by address only.
                ServiceKind::NodePort => Lists::default(),
            };
            index.entry(ip, list).services.push(i);
        }
        for (i, e) in t.endpoints.iter().enumerate() {
            index.entry(e.ip, Lists::ENDPOINT).endpoint.get_or_insert(i);
        }
        index
    }

    fn entry(&mut self, ip: IpAddr, list: Lists) -> &mut Listed {
        let listed = self.by_ip.entry(Key(ip)).or_default();
        listed.lists.0 |= list.0;
        listed
    }

    fn add(&mut self, list: Lists, ips: &[IpAddr]) {
        for &ip in ips {
            self.entry(ip, list);
        }
    }

    /// What the topology lists at `ip`, if anything.
    #[inline]
    pub(super) fn get(&self, ip: IpAddr) -> Option<&Listed> {
        self.by_ip.get(&Key(ip))
    }

    /// The lists `ip` is in (none for an address the topology does not list).
    #[inline]
    pub(super) fn lists(&self, ip: IpAddr) -> Lists {
        self.get(ip).map_or_else(Lists::default, |l| l.lists)
    }

    /// The first NodePort of `proto` and `port`.
    pub(super) fn node_port(&self, proto: Proto, port: u16) -> Option<usize> {
        self.node_ports.get(&(proto, port)).copied()
    }
}

/// The addresses are the topology's lists again: their count is enough.
impl fmt::Debug for AddrIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddrIndex")
            .field("addresses", &self.by_ip.len())
            .field("node_ports", &self.node_ports.len())
            .finish()
    }
}
