//! Which of the topology's address lists an address is in, found with one hash lookup: the
//! lists grow with the cluster (thousands of Service endpoints), and every new flow classifies
//! two to three addresses. [`Topology`](super::Topology) builds the index with its lists and
//! keeps both private, so the index cannot go stale.

use std::fmt;
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

    pub(super) fn has(self, list: Lists) -> bool {
        self.0 & list.0 != 0
    }
}

/// Every listed address and the lists it is in.
#[derive(Clone, Default, PartialEq)]
pub(super) struct AddrIndex(foldhash::HashMap<IpAddr, Lists>);

impl AddrIndex {
    /// Marks every address of `ips` as in `list`.
    pub(super) fn add(&mut self, list: Lists, ips: impl IntoIterator<Item = IpAddr>) {
        for ip in ips {
            self.0.entry(ip).or_default().0 |= list.0;
        }
    }

    /// The lists `ip` is in (none for an address the topology does not list).
    pub(super) fn lists(&self, ip: IpAddr) -> Lists {
        self.0.get(&ip).copied().unwrap_or_default()
    }
}

/// The addresses are the topology's lists again: their count is enough.
impl fmt::Debug for AddrIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddrIndex")
            .field("addresses", &self.0.len())
            .finish()
    }
}
