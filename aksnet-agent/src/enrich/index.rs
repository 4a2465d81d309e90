//! The address index: which Pod or Service owns an IP, kept up to date from watch events.
//!
//! Kept apart from the watching so it can be tested without an API server: the watch tasks only
//! call [`Index::upsert`], [`Index::remove`] and [`Index::replace_kind`].

use crate::events::Proto;
use crate::topology::Etp;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// What kind of object owns an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnerKind {
    Pod,
    Service,
}

impl fmt::Display for OwnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OwnerKind::Pod => "pod",
            OwnerKind::Service => "service",
        })
    }
}

/// The Pod or Service an address belongs to. Cheap to clone (the names are shared), since the
/// dump clones one per flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub kind: OwnerKind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// `namespace/name`, as kubectl and kube-proxy's rule comments name objects.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The addresses one object contributes to the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `status.podIPs` (one per IP family).
    Pod { ips: Vec<IpAddr> },
    Service {
        /// `spec.clusterIPs` (one per IP family; none for headless services).
        cluster_ips: Vec<IpAddr>,
        /// `status.loadBalancer.ingress[].ip`: the Azure LB frontends, which reach the node
        /// unchanged (floating IP).
        lb_ingress: Vec<IpAddr>,
        /// `spec.ports[]` as (protocol, port): the same port on the cluster IP and the frontends.
        ports: Vec<(Proto, u16)>,
        external_traffic_policy: Etp,
    },
}

impl Record {
    fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let (a, b): (&[IpAddr], &[IpAddr]) = match self {
            Record::Pod { ips } => (ips, &[]),
            Record::Service {
                cluster_ips,
                lb_ingress,
                ..
            } => (cluster_ips, lb_ingress),
        };
        a.iter().chain(b).copied()
    }

    fn serves(&self, proto: Proto, port: u16) -> bool {
        match self {
            Record::Pod { .. } => true,
            Record::Service { ports, .. } => ports.contains(&(proto, port)),
        }
    }
}

#[derive(Debug, Default)]
pub struct Index {
    objects: HashMap<Owner, Record>,
    /// Owners per address, sorted, so that an address shared by several objects (two Services
    /// on one LB frontend) always resolves the same way.
    by_ip: HashMap<IpAddr, Vec<Owner>>,
}

impl Index {
    /// Adds or replaces an object's addresses. A record without addresses removes the object.
    pub fn upsert(&mut self, owner: Owner, record: Record) {
        self.remove(&owner);
        if record.addresses().next().is_none() {
            return;
        }
        for ip in record.addresses() {
            let owners = self.by_ip.entry(ip).or_default();
            if let Err(at) = owners.binary_search(&owner) {
                owners.insert(at, owner.clone());
            }
        }
        self.objects.insert(owner, record);
    }

    pub fn remove(&mut self, owner: &Owner) {
        let Some(record) = self.objects.remove(owner) else {
            return;
        };
        for ip in record.addresses() {
            if let Some(owners) = self.by_ip.get_mut(&ip) {
                owners.retain(|o| o != owner);
                if owners.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// Replaces every object of one kind with a fresh listing (after a watch (re)started): objects
    /// missing from it were deleted while the watch was down.
    pub fn replace_kind(&mut self, kind: OwnerKind, listing: Vec<(Owner, Record)>) {
        let stale: Vec<Owner> = self
            .objects
            .keys()
            .filter(|o| o.kind == kind)
            .cloned()
            .collect();
        for owner in &stale {
            self.remove(owner);
        }
        for (owner, record) in listing {
            self.upsert(owner, record);
        }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Owner> {
        self.by_ip.get(&ip)?.first()
    }

    /// Like [`Index::lookup`], but prefers the Service that exposes `proto`/`port` where several
    /// share the address.
    pub fn lookup_port(&self, ip: IpAddr, proto: Proto, port: u16) -> Option<&Owner> {
        let owners = self.by_ip.get(&ip)?;
        owners
            .iter()
            .find(|o| self.objects.get(*o).is_some_and(|r| r.serves(proto, port)))
            .or_else(|| owners.first())
    }

    /// Every LB frontend IP with the Service behind it, sorted by address then Service.
    pub fn lb_frontends(&self) -> Vec<(IpAddr, String, Etp)> {
        let mut frontends: Vec<_> = self
            .objects
            .iter()
            .filter_map(|(owner, record)| match record {
                Record::Service {
                    lb_ingress,
                    external_traffic_policy,
                    ..
                } => Some(
                    lb_ingress
                        .iter()
                        .map(move |ip| (*ip, owner.to_string(), *external_traffic_policy)),
                ),
                Record::Pod { .. } => None,
            })
            .flatten()
            .collect();
        frontends.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        frontends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: OwnerKind, ns: &str, name: &str) -> Owner {
        Owner {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn service(cluster: &str, lb: &str, ports: &[(Proto, u16)]) -> Record {
        Record::Service {
            cluster_ips: vec![ip(cluster)],
            lb_ingress: vec![ip(lb)],
            ports: ports.to_vec(),
            external_traffic_policy: Etp::Cluster,
        }
    }

    #[test]
    fn shared_frontend_resolves_by_port_and_deterministically_without() {
        let mut index = Index::default();
        let dns = owner(OwnerKind::Service, "default", "dns");
        let app = owner(OwnerKind::Service, "default", "app");
        index.upsert(
            dns.clone(),
            service("10.0.0.53", "192.0.2.10", &[(Proto::Udp, 53)]),
        );
        index.upsert(
            app.clone(),
            service("10.0.12.34", "192.0.2.10", &[(Proto::Tcp, 80)]),
        );
        let frontend = ip("192.0.2.10");
        assert_eq!(index.lookup_port(frontend, Proto::Udp, 53), Some(&dns));
        assert_eq!(index.lookup_port(frontend, Proto::Tcp, 80), Some(&app));
        // No port match: the first in (namespace, name) order, whatever the insertion order.
        assert_eq!(index.lookup(frontend), Some(&app));
        assert_eq!(index.lookup_port(frontend, Proto::Tcp, 443), Some(&app));
    }

    #[test]
    fn changed_and_removed_addresses_leave_no_stale_entries() {
        let mut index = Index::default();
        let pod = owner(OwnerKind::Pod, "default", "app-7d4b9c-x2x9z");
        index.upsert(
            pod.clone(),
            Record::Pod {
                ips: vec![ip("10.244.0.10")],
            },
        );
        index.upsert(
            pod.clone(),
            Record::Pod {
                ips: vec![ip("10.244.0.20")],
            },
        );
        assert_eq!(index.lookup(ip("10.244.0.10")), None);
        assert_eq!(index.lookup(ip("10.244.0.20")), Some(&pod));
        index.upsert(pod.clone(), Record::Pod { ips: vec![] });
        assert_eq!(index.lookup(ip("10.244.0.20")), None);
        assert!(index.objects.is_empty() && index.by_ip.is_empty());
    }

    #[test]
    fn relisting_one_kind_drops_its_vanished_objects_only() {
        let mut index = Index::default();
        let gone = owner(OwnerKind::Pod, "default", "gone");
        let kept = owner(OwnerKind::Pod, "default", "kept");
        let svc = owner(OwnerKind::Service, "default", "app");
        index.upsert(
            gone.clone(),
            Record::Pod {
                ips: vec![ip("10.244.0.30")],
            },
        );
        index.upsert(svc.clone(), service("10.0.12.34", "192.0.2.10", &[]));
        let kept_record = Record::Pod {
            ips: vec![ip("10.244.0.31")],
        };
        index.replace_kind(OwnerKind::Pod, vec![(kept.clone(), kept_record)]);
        assert_eq!(index.lookup(ip("10.244.0.30")), None);
        assert_eq!(index.lookup(ip("10.244.0.31")), Some(&kept));
        assert_eq!(index.lookup(ip("10.0.12.34")), Some(&svc));
    }
}
