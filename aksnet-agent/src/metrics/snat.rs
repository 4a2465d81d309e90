//! SNAT accounting: which SNAT'ed connections are live, towards which destinations, and how close
//! the node is to running out of the Azure Load Balancer's SNAT ports.
//!
//! Pure bookkeeping (no metrics, no I/O) so that its rules are tested on their own:
//! - a connection is identified by its conntrack key and found by the translated tuple it holds,
//!   which its callers know at its end (the flow table keeps it, and reports its changes);
//! - one translated source port may serve many destinations at once (the LB reuses a SNAT port
//!   across destinations), but conntrack never holds two live entries with the same translated
//!   tuple in one table: such a collision means the older entry's end was missed, so it is dropped
//!   and reported as a conflict;
//! - what runs out at the LB is the number of concurrent flows from one node to the same
//!   destination IP, port and protocol, whatever the node-side source address;
//! - the outbound device (the LB's outbound rule, or a NAT gateway) keeps a flow's port until its
//!   idle timeout after the node's conntrack entry ends (AKS's LB default: 30 minutes), so ended
//!   flows still count against the allocation until then.

use crate::events::{FlowKey, Proto, Tuple};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A destination as the LB's SNAT port allocation counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub proto: Proto,
    pub ip: IpAddr,
    pub port: u16,
}

/// A translated source address together with a destination: the unit of node-side port usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceDestination {
    pub src: IpAddr,
    pub dest: Destination,
}

/// What [`SnatTable::open`] or [`SnatTable::retranslate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The translated tuple was free: for [`SnatTable::open`], a connection not seen before.
    New,
    /// The connection was already live with this translation.
    Updated,
    /// Another live connection held the same translated tuple. conntrack cannot hold both, so
    /// `stale`'s end was missed: it was dropped in favour of the new one.
    Conflict { stale: FlowKey },
}

/// Live SNAT'ed connections of one node, and the outbound ports ended ones still hold.
///
/// One map, keyed by the translated tuple: conntrack keeps those unique per table, so the key
/// both finds a connection (its callers know its translation) and detects a missed end. Every
/// connection costs one hash operation to open and one to end, which matters: this runs for
/// every SNAT'ed connection of the node.
#[derive(Debug, Default)]
pub struct SnatTable {
    live: foldhash::HashMap<TranslatedKey, Holder>,
    /// How long the outbound device keeps an ended flow's port; zero: not at all.
    idle_timeout: Duration,
    /// Ports of ended flows the outbound device still holds, per destination: when they are
    /// released and how many, oldest first. Ends within one second share an entry, which bounds
    /// each destination's queue by the idle timeout in seconds.
    held: foldhash::HashMap<Destination, VecDeque<(Instant, u64)>>,
}

/// The connection holding a translated tuple.
#[derive(Debug)]
struct Holder {
    /// Its original tuple: with the key's namespace, zone and protocol, its [`FlowKey`].
    orig: Tuple,
    /// The outbound device (Azure LB outbound rule or NAT gateway) SNATs this connection too, so
    /// it holds one of that device's ports for its destination.
    outbound: bool,
    pod: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TranslatedKey {
    netns: u32,
    zone: u16,
    proto: Proto,
    translated: Tuple,
}

impl TranslatedKey {
    fn new(key: &FlowKey, translated: &Tuple) -> Self {
        TranslatedKey {
            netns: key.netns,
            zone: key.zone,
            proto: key.proto,
            translated: *translated,
        }
    }

    /// The connection `holder` is, in this key's table.
    fn flow_key(&self, holder: &Holder) -> FlowKey {
        FlowKey {
            netns: self.netns,
            zone: self.zone,
            proto: self.proto,
            orig: holder.orig,
        }
    }
}

/// Current usage, aggregated from the live connections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Live SNAT'ed connections per translated source, destination and owning pod.
    pub connections: HashMap<(SourceDestination, Option<String>), u64>,
    /// Distinct translated source ports in use per translated source and destination.
    pub ports_in_use: HashMap<SourceDestination, u64>,
    /// Concurrent flows through the LB's SNAT per destination: each holds one LB SNAT port.
    pub lb_flows: HashMap<Destination, u64>,
    /// The same flows per destination and source pod (`None`: not from a pod).
    pub lb_pod_flows: HashMap<Destination, HashMap<Option<String>, u64>>,
    /// Ports the outbound device still holds for ended flows, per destination.
    pub held_after_close: HashMap<Destination, u64>,
}

impl Usage {
    /// Ports of the allocation in use per destination: live flows plus ports held after close.
    pub fn ports_accounted(&self) -> HashMap<Destination, u64> {
        let mut sum = self.lb_flows.clone();
        for (dest, held) in &self.held_after_close {
            *sum.entry(*dest).or_default() += held;
        }
        sum
    }

    /// The busiest destination's share of the ports the outbound device allocated to the node,
    /// ports held after close included: new connections to it fail when this reaches 1.
    pub fn pressure(&self, allocated_ports: u32) -> f64 {
        self.busiest() as f64 / f64::from(allocated_ports)
    }

    /// Ports in use towards the busiest destination, held ones included.
    pub fn busiest(&self) -> u64 {
        self.ports_accounted().into_values().max().unwrap_or(0)
    }
}

impl SnatTable {
    /// A table whose ended flows keep their outbound port for `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> SnatTable {
        SnatTable {
            idle_timeout,
            ..SnatTable::default()
        }
    }

    /// Records a live SNAT'ed connection. `translated` is its tuple after NAT in the original
    /// direction; `outbound` says whether the outbound device (LB or NAT gateway) SNATs it as
    /// well; `pod` owns the original source, where known. Protocols without ports (ICMP) hold no
    /// SNAT port and are ignored. A later change of its translation goes through
    /// [`retranslate`](Self::retranslate), and its end names the translation it holds then.
    pub fn open(
        &mut self,
        key: FlowKey,
        translated: Tuple,
        outbound: bool,
        pod: Option<&str>,
    ) -> Option<Opened> {
        if !key.proto.has_ports() {
            return None;
        }
        let holder = Holder {
            orig: key.orig,
            outbound,
            pod: pod.map(str::to_owned),
        };
        Some(self.hold(TranslatedKey::new(&key, &translated), holder))
    }

    /// A live connection's translation changed from `was` to `now`: it holds `now`'s tuple
    /// instead, with what it was opened with. `None` when it was not live here under `was`.
    pub fn retranslate(&mut self, key: &FlowKey, was: &Tuple, now: &Tuple) -> Option<Opened> {
        let holder = self.remove(key, was)?;
        Some(self.hold(TranslatedKey::new(key, now), holder))
    }

    fn hold(&mut self, slot: TranslatedKey, holder: Holder) -> Opened {
        let orig = holder.orig;
        match self.live.insert(slot, holder) {
            None => Opened::New,
            Some(previous) if previous.orig == orig => Opened::Updated,
            Some(previous) => Opened::Conflict {
                stale: slot.flow_key(&previous),
            },
        }
    }

    /// A connection that held `translated` ended at `now`: it leaves the table, and its outbound
    /// port stays held until the idle timeout. Returns whether it was live here.
    pub fn end(&mut self, key: &FlowKey, translated: &Tuple, now: Instant) -> bool {
        let Some(holder) = self.remove(key, translated) else {
            return false;
        };
        if holder.outbound && !self.idle_timeout.is_zero() {
            let release = now + self.idle_timeout;
            let queue = self
                .held
                .entry(destination(key.proto, translated))
                .or_default();
            match queue.back_mut() {
                Some((at, n))
                    if release.saturating_duration_since(*at) < Duration::from_secs(1) =>
                {
                    *n += 1
                }
                _ => queue.push_back((release, 1)),
            }
        }
        true
    }

    /// Takes `key`'s holder of `translated`, if it still holds it (another connection may have
    /// taken it since).
    fn remove(&mut self, key: &FlowKey, translated: &Tuple) -> Option<Holder> {
        match self.live.entry(TranslatedKey::new(key, translated)) {
            std::collections::hash_map::Entry::Occupied(slot) if slot.get().orig == key.orig => {
                Some(slot.remove())
            }
            _ => None,
        }
    }

    /// Releases the ports whose idle timeout passed by `now`.
    pub fn expire(&mut self, now: Instant) {
        self.held.retain(|_, queue| {
            while queue.front().is_some_and(|(at, _)| *at <= now) {
                queue.pop_front();
            }
            !queue.is_empty()
        });
    }

    /// Number of live SNAT'ed connections.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Aggregates the live connections and the held ports (call [`expire`](Self::expire)
    /// first). Linear in their number: meant for scrape time.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        let mut ports: HashMap<SourceDestination, HashSet<u16>> = HashMap::new();
        for (slot, entry) in &self.live {
            let t = &slot.translated;
            let dest = destination(slot.proto, t);
            let sd = SourceDestination { src: t.src, dest };
            *usage
                .connections
                .entry((sd, entry.pod.clone()))
                .or_default() += 1;
            ports.entry(sd).or_default().insert(t.sport);
            if entry.outbound {
                *usage.lb_flows.entry(dest).or_default() += 1;
                *usage
                    .lb_pod_flows
                    .entry(dest)
                    .or_default()
                    .entry(entry.pod.clone())
                    .or_default() += 1;
            }
        }
        usage.ports_in_use = ports
            .into_iter()
            .map(|(sd, set)| (sd, set.len() as u64))
            .collect();
        usage.held_after_close = self
            .held
            .iter()
            .map(|(dest, queue)| (*dest, queue.iter().map(|(_, n)| n).sum()))
            .collect();
        usage
    }
}

/// Where a connection goes after the node's NAT: what the outbound device counts ports for.
fn destination(proto: Proto, translated: &Tuple) -> Destination {
    Destination {
        proto,
        ip: translated.dst,
        port: translated.dport,
    }
}

/// The largest `n` values by usage, and the sum of the rest: bounds a gauge's label cardinality.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopN<K> {
    /// Largest first; ties in key order, so that scrapes are stable.
    pub top: Vec<(K, u64)>,
    /// Sum of the values folded away, `None` when nothing was folded.
    pub other: Option<u64>,
}

/// Keeps the `n` largest values of `values` and folds the rest into one sum.
pub fn top_n<K: Ord>(values: HashMap<K, u64>, n: usize) -> TopN<K> {
    let mut rows: Vec<(K, u64)> = values.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest = if rows.len() > n {
        Some(rows.split_off(n).into_iter().map(|(_, v)| v).sum())
    } else {
        None
    };
    TopN {
        top: rows,
        other: rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::testing::pod_conn;

    fn dest(ip: &str, port: u16) -> Destination {
        Destination {
            proto: Proto::Tcp,
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn opening_counts_connections_ports_and_lb_flows() {
        let mut table = SnatTable::default();
        let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (k2, t2) = pod_conn(40001, 50001, "198.51.100.7", 443);
        assert_eq!(table.open(k1, t1, true, Some("web/a")), Some(Opened::New));
        assert_eq!(table.open(k2, t2, true, Some("web/b")), Some(Opened::New));
        let usage = table.usage();
        let sd = SourceDestination {
            src: "10.224.0.4".parse().unwrap(),
            dest: dest("198.51.100.7", 443),
        };
        assert_eq!(usage.connections[&(sd, Some("web/a".to_owned()))], 1);
        assert_eq!(usage.connections[&(sd, Some("web/b".to_owned()))], 1);
        assert_eq!(usage.ports_in_use[&sd], 2);
        assert_eq!(usage.lb_flows[&dest("198.51.100.7", 443)], 2);
        assert_eq!(usage.pressure(1024), 2.0 / 1024.0);
    }

    #[test]
    fn one_port_reused_across_destinations_is_not_a_conflict() {
        let mut table = SnatTable::default();
        let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (k2, t2) = pod_conn(40001, 50000, "203.0.113.9", 443);
        let (k3, t3) = pod_conn(40002, 50000, "198.51.100.7", 80);
        assert_eq!(table.open(k1, t1, true, None), Some(Opened::New));
        assert_eq!(table.open(k2, t2, true, None), Some(Opened::New));
        assert_eq!(table.open(k3, t3, true, None), Some(Opened::New));
        assert_eq!(table.len(), 3);
        let usage = table.usage();
        // Three destinations, one flow each: the busiest uses one port of the allocation.
        assert_eq!(usage.lb_flows.len(), 3);
        assert_eq!(usage.pressure(64), 1.0 / 64.0);
    }

    #[test]
    fn pressure_is_the_busiest_destination_not_the_total() {
        let mut table = SnatTable::default();
        for i in 0..6u16 {
            let (k, t) = pod_conn(40000 + i, 50000 + i, "198.51.100.7", 443);
            table.open(k, t, true, None);
        }
        for i in 0..3u16 {
            let (k, t) = pod_conn(41000 + i, 51000 + i, "203.0.113.9", 443);
            table.open(k, t, true, None);
        }
        assert_eq!(table.usage().pressure(8), 6.0 / 8.0);
    }

    #[test]
    fn only_connections_through_the_lb_count_towards_pressure() {
        let mut table = SnatTable::default();
        // kubenet pod → vnet: MASQUERADEd on the node, never through the LB.
        let (k, t) = pod_conn(40000, 50000, "10.224.0.9", 443);
        table.open(k, t, false, Some("web/a"));
        let usage = table.usage();
        assert_eq!(usage.connections.values().sum::<u64>(), 1);
        assert!(usage.lb_flows.is_empty());
        assert_eq!(usage.pressure(1024), 0.0);
    }

    #[test]
    fn colliding_translated_tuple_evicts_the_stale_connection() {
        let mut table = SnatTable::default();
        let (old, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (new, t_new) = pod_conn(40001, 50000, "198.51.100.7", 443);
        assert_eq!(t, t_new);
        table.open(old, t, true, Some("web/a"));
        assert_eq!(
            table.open(new, t_new, true, Some("web/b")),
            Some(Opened::Conflict { stale: old })
        );
        assert_eq!(table.len(), 1);
        assert!(
            !table.end(&old, &t, Instant::now()),
            "the stale entry is gone: its late end frees nothing"
        );
        assert_eq!(table.len(), 1);
        let usage = table.usage();
        assert_eq!(usage.lb_flows[&dest("198.51.100.7", 443)], 1);
        assert_eq!(
            usage.connections.keys().next().unwrap().1.as_deref(),
            Some("web/b")
        );
    }

    #[test]
    fn same_translated_tuple_in_another_namespace_is_no_conflict() {
        let mut table = SnatTable::default();
        let (k1, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let k2 = FlowKey { netns: 1, ..k1 };
        table.open(k1, t, false, None);
        assert_eq!(table.open(k2, t, false, None), Some(Opened::New));
        // One translated source port, held in two conntrack tables.
        let usage = table.usage();
        assert_eq!(
            usage.ports_in_use.values().copied().collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(usage.connections.values().sum::<u64>(), 2);
    }

    #[test]
    fn reporting_a_live_connection_again_updates_it() {
        let mut table = SnatTable::default();
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        table.open(k, t, false, None);
        assert_eq!(table.open(k, t, true, None), Some(Opened::Updated));
        assert_eq!(table.len(), 1);
        assert_eq!(table.usage().lb_flows.values().sum::<u64>(), 1);
    }

    #[test]
    fn a_changed_translation_moves_the_connection() {
        let mut table = SnatTable::default();
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        table.open(k, t, true, Some("web/a"));
        let moved = Tuple { sport: 50001, ..t };
        assert_eq!(table.retranslate(&k, &t, &moved), Some(Opened::New));
        assert_eq!(table.len(), 1);
        let usage = table.usage();
        assert_eq!(usage.lb_flows.values().sum::<u64>(), 1, "still outbound");
        assert_eq!(
            usage.connections.keys().next().unwrap().1.as_deref(),
            Some("web/a")
        );
        // The old translated tuple is free again: another connection may take it.
        let (other, _) = pod_conn(40001, 50000, "198.51.100.7", 443);
        assert_eq!(table.open(other, t, true, None), Some(Opened::New));
        assert!(
            !table.end(&k, &t, Instant::now()),
            "not under its old translation"
        );
        assert!(table.end(&k, &moved, Instant::now()));
        assert_eq!(
            table.retranslate(&k, &moved, &t),
            None,
            "ended: nothing to move"
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn ending_releases_the_connection() {
        let mut table = SnatTable::default();
        let (k, t) = pod_conn(40000, 50000, "198.51.100.7", 443);
        table.open(k, t, true, None);
        assert!(table.end(&k, &t, Instant::now()));
        assert!(
            !table.end(&k, &t, Instant::now()),
            "a second end changes nothing"
        );
        assert!(table.is_empty());
        assert_eq!(table.usage(), Usage::default());
    }

    #[test]
    fn protocols_without_ports_hold_no_snat_port() {
        let mut table = SnatTable::default();
        let (mut k, t) = pod_conn(7, 7, "198.51.100.7", 0x0800);
        k.proto = Proto::Icmp;
        assert_eq!(table.open(k, t, true, None), None);
        assert!(table.is_empty());
    }

    #[test]
    fn ended_outbound_flows_hold_their_port_until_the_idle_timeout() {
        let idle = Duration::from_secs(1800);
        let mut table = SnatTable::new(idle);
        let t0 = Instant::now();
        let (k1, t1) = pod_conn(40000, 50000, "198.51.100.7", 443);
        let (k2, t2) = pod_conn(40001, 50001, "198.51.100.7", 443);
        let (node_only, t3) = pod_conn(40002, 50002, "10.224.0.9", 443);
        table.open(k1, t1, true, Some("web/a"));
        table.open(k2, t2, true, Some("web/a"));
        table.open(node_only, t3, false, Some("web/a"));
        assert!(table.end(&k1, &t1, t0));
        assert!(
            table.end(&node_only, &t3, t0),
            "ended, but never held an outbound port"
        );
        assert!(!table.end(&k1, &t1, t0), "a second end changes nothing");
        let dest = dest("198.51.100.7", 443);
        let usage = table.usage();
        assert_eq!(usage.lb_flows[&dest], 1);
        assert_eq!(usage.held_after_close[&dest], 1);
        assert_eq!(usage.held_after_close.len(), 1);
        assert_eq!(usage.pressure(4), 2.0 / 4.0, "live plus held");
        table.end(&k2, &t2, t0 + Duration::from_secs(60));
        table.expire(t0 + idle);
        let usage = table.usage();
        assert_eq!(
            usage.held_after_close[&dest], 1,
            "k1 released, k2 still held"
        );
        assert!(usage.lb_flows.is_empty());
        table.expire(t0 + idle + Duration::from_secs(60));
        assert_eq!(table.usage().pressure(4), 0.0);
    }

    #[test]
    fn ends_within_a_second_share_one_entry_and_a_missed_end_holds_nothing() {
        let mut table = SnatTable::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..100u16 {
            let (k, t) = pod_conn(40000 + i, 50000 + i, "198.51.100.7", 443);
            table.open(k, t, true, None);
            table.end(&k, &t, t0 + Duration::from_millis(u64::from(i) * 5));
        }
        let queue = &table.held[&dest("198.51.100.7", 443)];
        assert_eq!(queue.len(), 1);
        assert_eq!(queue[0].1, 100);
        // A connection whose end was missed (another took its tuple) holds no port after it.
        let (missed, t) = pod_conn(41000, 51000, "198.51.100.7", 443);
        let (next, _) = pod_conn(41001, 51000, "198.51.100.7", 443);
        table.open(missed, t, true, None);
        let conflict = table.open(next, t, true, None);
        assert_eq!(conflict, Some(Opened::Conflict { stale: missed }));
        assert_eq!(
            table.usage().held_after_close[&dest("198.51.100.7", 443)],
            100
        );
        assert_eq!(SnatTable::default().idle_timeout, Duration::ZERO);
    }

    #[test]
    fn outbound_flows_are_counted_per_destination_and_pod() {
        let mut table = SnatTable::default();
        let pods = [Some("web/a"), Some("web/a"), Some("web/b"), None];
        for (i, pod) in (0u16..).zip(pods) {
            let (k, t) = pod_conn(40000 + i, 50000 + i, "198.51.100.7", 443);
            table.open(k, t, true, pod);
        }
        let (k, t) = pod_conn(41000, 51000, "203.0.113.9", 443);
        table.open(k, t, true, Some("web/b"));
        let usage = table.usage();
        let to_7 = &usage.lb_pod_flows[&dest("198.51.100.7", 443)];
        assert_eq!(to_7[&Some("web/a".to_owned())], 2);
        assert_eq!(to_7[&Some("web/b".to_owned())], 1);
        assert_eq!(to_7[&None], 1);
        let to_9 = &usage.lb_pod_flows[&dest("203.0.113.9", 443)];
        assert_eq!(to_9.len(), 1);
        assert_eq!(usage.busiest(), 4);
    }

    #[test]
    fn top_n_keeps_the_largest_and_folds_the_rest() {
        let values: HashMap<&str, u64> = [("a", 5), ("b", 9), ("c", 1), ("d", 5), ("e", 2)]
            .into_iter()
            .collect();
        let folded = top_n(values.clone(), 3);
        assert_eq!(folded.top, vec![("b", 9), ("a", 5), ("d", 5)]);
        assert_eq!(folded.other, Some(3));
        let all = top_n(values.clone(), 5);
        assert_eq!(all.top.len(), 5);
        assert_eq!(all.other, None);
        let none = top_n(values, 0);
        assert!(none.top.is_empty());
        assert_eq!(none.other, Some(22));
    }
}
