//! The flow table: one entry per live conntrack connection, fed by capture events.
//!
//! Sources may report the same connection more than once (an LRU eviction in the kernel map, the
//! eBPF and netlink sources both running, a NAT status change), so the table decides what is new:
//! downstream outputs see each connection opened once, changed when its NAT changed, and closed once.

mod wait;

pub use wait::{InterfaceWait, INTERFACES_WAIT};

use crate::events::{EventKind, FlowEvent, FlowKey};
use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

/// A live connection as the table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The latest state reported for the connection.
    pub event: FlowEvent,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Insertion order, for eviction when the table is full.
    seq: u64,
}

/// What an event changed in the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    /// A connection not seen before.
    Opened(Flow),
    /// A known connection whose translation differs from what was reported before.
    NatChanged(Flow),
    /// A known connection ended; the flow as it was last known.
    Closed(Flow),
    /// Nothing an output needs to show: a repeat of a known state, the end of a connection that
    /// was never seen open (it started before the agent, or was evicted), or a late end of an
    /// earlier connection whose tuple a new one already reuses.
    Unchanged,
}

/// Counters of the table's own behaviour, for capture health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub live: usize,
    /// Flows dropped to make room because the table was at capacity.
    pub evicted: u64,
}

/// Bounded map of live connections keyed by conntrack identity.
pub struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    /// Keys in insertion order; entries whose `seq` no longer matches are stale and skipped.
    order: VecDeque<(FlowKey, u64)>,
    capacity: usize,
    next_seq: u64,
    evicted: u64,
    /// Flows evicted since the last [`FlowTable::drain_evicted`]: their ends will never be seen,
    /// so whoever accounts for live flows must close them.
    evicted_flows: Vec<Flow>,
}

impl FlowTable {
    /// A table that holds at most `capacity` live flows, evicting the oldest beyond that.
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            flows: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            next_seq: 0,
            evicted: 0,
            evicted_flows: Vec::new(),
        }
    }

    pub fn apply(&mut self, event: FlowEvent) -> Update {
        let key = event.key();
        match event.kind {
            EventKind::Destroy => match self.flows.get(&key) {
                // Sources race: a new connection on the same tuple can be reported (eBPF, at its
                // first packet) before the old one's end (netlink). The end carries the old
                // connection's reply tuple.
                Some(flow) if flow.event.reply == event.reply => {
                    let mut flow = self.flows.remove(&key).expect("just found");
                    flow.last_seen = event.ts;
                    merge_details(&mut flow.event, &event);
                    Update::Closed(flow)
                }
                _ => Update::Unchanged,
            },
            EventKind::New | EventKind::NatChanged => match self.flows.get_mut(&key) {
                Some(flow) => {
                    flow.last_seen = event.ts;
                    let nat_changed = flow.event.reply != event.reply;
                    merge_details(&mut flow.event, &event);
                    if nat_changed {
                        flow.event.reply = event.reply;
                        flow.event.status = event.status;
                        Update::NatChanged(flow.clone())
                    } else {
                        Update::Unchanged
                    }
                }
                None => Update::Opened(self.insert(key, event)),
            },
        }
    }

    fn insert(&mut self, key: FlowKey, event: FlowEvent) -> Flow {
        if self.flows.len() >= self.capacity {
            self.evict_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let flow = Flow {
            first_seen: event.ts,
            last_seen: event.ts,
            event,
            seq,
        };
        self.order.push_back((key, seq));
        self.flows.insert(key, flow.clone());
        self.compact_order();
        flow
    }

    fn evict_oldest(&mut self) {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.flows.get(&key).is_some_and(|f| f.seq == seq) {
                let flow = self.flows.remove(&key).expect("just found");
                self.evicted_flows.push(flow);
                self.evicted += 1;
                return;
            }
        }
    }

    /// The flows evicted to make room since the last call.
    pub fn drain_evicted(&mut self) -> std::vec::Drain<'_, Flow> {
        self.evicted_flows.drain(..)
    }

    /// Drops stale order entries (flows closed since) once they outnumber the live ones, so the
    /// queue stays proportional to the table.
    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.flows.len() + 64 {
            let flows = &self.flows;
            self.order
                .retain(|(key, seq)| flows.get(key).is_some_and(|f| f.seq == *seq));
        }
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key)
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            live: self.flows.len(),
            evicted: self.evicted,
        }
    }
}

/// Fills in what a later event knows and the first did not (interfaces, counters).
fn merge_details(into: &mut FlowEvent, from: &FlowEvent) {
    into.in_ifindex = into.in_ifindex.or(from.in_ifindex);
    into.out_ifindex = into.out_ifindex.or(from.out_ifindex);
    if from.packets.is_some() {
        into.packets = from.packets;
        into.bytes = from.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Hook, Proto, SourceKind, Tuple};
    use std::time::Duration;

    fn event(kind: EventKind, sport: u16, reply_dport: u16) -> FlowEvent {
        let orig = Tuple {
            src: "203.0.113.10".parse().unwrap(),
            sport,
            dst: "192.0.2.10".parse().unwrap(),
            dport: 80,
        };
        let reply = Tuple {
            src: "10.244.0.10".parse().unwrap(),
            sport: 8080,
            dst: "10.244.0.1".parse().unwrap(),
            dport: reply_dport,
        };
        FlowEvent {
            kind,
            source: SourceKind::Ebpf,
            ts: SystemTime::UNIX_EPOCH + Duration::from_secs(sport as u64),
            proto: Proto::Tcp,
            orig,
            reply,
            status: 0,
            mark: 0,
            zone: 0,
            netns: 1,
            in_ifindex: None,
            out_ifindex: Some(3),
            packets: None,
            bytes: None,
            hook: Some(Hook::Xmit),
        }
    }

    #[test]
    fn opens_once_and_ignores_repeats() {
        let mut table = FlowTable::new(10);
        assert!(matches!(
            table.apply(event(EventKind::New, 1000, 5000)),
            Update::Opened(_)
        ));
        let mut repeat = event(EventKind::New, 1000, 5000);
        repeat.in_ifindex = Some(2);
        assert_eq!(table.apply(repeat), Update::Unchanged);
        let flow = table.get(&event(EventKind::New, 1000, 5000).key()).unwrap();
        assert_eq!(flow.event.in_ifindex, Some(2), "later details are merged");
    }

    #[test]
    fn reports_a_changed_translation() {
        let mut table = FlowTable::new(10);
        table.apply(event(EventKind::New, 1000, 5000));
        match table.apply(event(EventKind::NatChanged, 1000, 6000)) {
            Update::NatChanged(flow) => assert_eq!(flow.event.reply.dport, 6000),
            other => panic!("expected NatChanged, got {other:?}"),
        }
    }

    #[test]
    fn closes_known_flows_only() {
        let mut table = FlowTable::new(10);
        table.apply(event(EventKind::New, 1000, 5000));
        let mut end = event(EventKind::Destroy, 1000, 5000);
        end.packets = Some(12);
        end.bytes = Some(3400);
        match table.apply(end) {
            Update::Closed(flow) => assert_eq!(
                (flow.event.packets, flow.event.bytes),
                (Some(12), Some(3400))
            ),
            other => panic!("expected Closed, got {other:?}"),
        }
        assert_eq!(
            table.apply(event(EventKind::Destroy, 1000, 5000)),
            Update::Unchanged
        );
        assert_eq!(table.stats().live, 0);
    }

    #[test]
    fn evicts_the_oldest_when_full() {
        let mut table = FlowTable::new(2);
        table.apply(event(EventKind::New, 1, 5000));
        table.apply(event(EventKind::New, 2, 5000));
        table.apply(event(EventKind::Destroy, 1, 5000));
        table.apply(event(EventKind::New, 3, 5000));
        table.apply(event(EventKind::New, 4, 5000));
        assert_eq!(
            table.stats(),
            TableStats {
                live: 2,
                evicted: 1
            }
        );
        assert!(
            table.get(&event(EventKind::New, 2, 5000).key()).is_none(),
            "2 was the oldest live flow"
        );
        assert!(table.get(&event(EventKind::New, 4, 5000).key()).is_some());
        let evicted: Vec<u16> = table.drain_evicted().map(|f| f.event.orig.sport).collect();
        assert_eq!(evicted, vec![2]);
        assert_eq!(table.drain_evicted().count(), 0);
    }

    #[test]
    fn order_queue_stays_bounded_under_churn() {
        let mut table = FlowTable::new(8);
        for port in 0..10_000u16 {
            table.apply(event(EventKind::New, port, 5000));
            table.apply(event(EventKind::Destroy, port, 5000));
        }
        assert!(
            table.order.len() <= 64 + 2,
            "order queue grew to {}",
            table.order.len()
        );
    }
}
