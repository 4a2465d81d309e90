//! The flow table: one entry per live conntrack connection, fed by capture events.
//!
//! Sources may report the same connection more than once (an LRU eviction in the kernel map, the
//! eBPF and netlink sources both running, a NAT status change), so the table decides what is new:
//! downstream outputs see each connection opened once, changed when its NAT changed, and closed once.

mod early;
mod entry;
mod store;
mod wait;

pub use early::EARLY_END_WINDOW;
pub use wait::{InterfaceWait, INTERFACES_WAIT};

use crate::events::{EventKind, FlowEvent, FlowKey, Tuple};
use aksnet_common::ct_status;
use early::EarlyEnds;
use entry::Entry;
use std::time::SystemTime;
use store::Store;

/// A live connection as the table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The latest state reported for the connection.
    pub event: FlowEvent,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Earlier connections on the same tuple this flow (and its predecessors) replaced before
    /// their ends were seen: that many ends without an instance id (netlink's) are theirs.
    earlier_ends_pending: u32,
}

/// What an event changed in the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    /// A connection not seen before.
    Opened(Flow),
    /// A known connection whose translation differs from what was reported before: `was`, in
    /// the original direction (as [`FlowEvent::translated`] gives it).
    NatChanged { flow: Flow, was: Tuple },
    /// A known connection ended; the flow as it was last known.
    Closed(Flow),
    /// A new connection on the tuple of a live one, which therefore ended (its end may still
    /// come, late, from another source).
    Replaced { ended: Box<Flow>, opened: Flow },
    /// A connection whose end arrived shortly before its start (the sources race, see
    /// [`EARLY_END_WINDOW`]): it opened and ended, and is not live.
    OpenedAndClosed(Flow),
    /// Nothing an output needs to show: a repeat of a known state, the end of a connection that
    /// was not seen open (it started before the agent, was evicted, or its start is still on its
    /// way), or a late end of an earlier connection whose tuple a new one already reuses.
    Unchanged,
}

/// Counters of the table's own behaviour, for capture health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub live: usize,
    /// Flows dropped to make room because the table was at capacity.
    pub evicted: u64,
}

/// Bounded map of live connections keyed by conntrack identity. Entries are stored packed
/// ([`entry`]) and unpacked into a [`Flow`] when an event concerns them.
pub struct FlowTable {
    store: Store,
    capacity: usize,
    evicted: u64,
    /// Flows evicted since the last [`FlowTable::drain_evicted`]: their ends will never be seen,
    /// so whoever accounts for live flows must close them.
    evicted_flows: Vec<Flow>,
    early_ends: EarlyEnds,
}

impl FlowTable {
    /// A table that holds at most `capacity` live flows, evicting the oldest beyond that.
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            store: Store::new(),
            // Slots are numbered by `u32`s.
            capacity: capacity.clamp(1, u32::MAX as usize),
            evicted: 0,
            evicted_flows: Vec::new(),
            early_ends: EarlyEnds::default(),
        }
    }

    pub fn apply(&mut self, event: FlowEvent) -> Update {
        let key = event.key();
        let Some(slot) = self.store.find(&key) else {
            return match event.kind {
                EventKind::Destroy => {
                    self.early_ends.remember(event);
                    Update::Unchanged
                }
                EventKind::New | EventKind::NatChanged => match self.early_ends.take_for(&event) {
                    Some(end) => Update::OpenedAndClosed(opened_and_closed(event, &end)),
                    None => Update::Opened(self.insert(event, 0)),
                },
            };
        };
        let mut flow = self.store.entry(slot).flow();
        match event.kind {
            EventKind::Destroy if !ends(&mut flow, &event) => {
                *self.store.entry_mut(slot) = Entry::new(&flow);
                Update::Unchanged
            }
            EventKind::Destroy => {
                self.store.remove(slot);
                flow.last_seen = event.ts;
                merge_details(&mut flow.event, &event);
                Update::Closed(flow)
            }
            EventKind::New if replaces(&flow, &event) => {
                self.store.remove(slot);
                flow.last_seen = event.ts;
                let pending = flow.earlier_ends_pending + 1;
                let opened = self.insert(event, pending);
                Update::Replaced {
                    ended: Box::new(flow),
                    opened,
                }
            }
            EventKind::New | EventKind::NatChanged => {
                flow.last_seen = event.ts;
                let was = flow.event.translated();
                let nat_changed = flow.event.reply != event.reply;
                merge_details(&mut flow.event, &event);
                if nat_changed {
                    flow.event.reply = event.reply;
                    flow.event.status = event.status;
                }
                *self.store.entry_mut(slot) = Entry::new(&flow);
                if nat_changed {
                    Update::NatChanged { flow, was }
                } else {
                    Update::Unchanged
                }
            }
        }
    }

    fn insert(&mut self, event: FlowEvent, earlier_ends_pending: u32) -> Flow {
        if self.store.len() >= self.capacity {
            self.evict_oldest();
        }
        let flow = Flow {
            first_seen: event.ts,
            last_seen: event.ts,
            event,
            earlier_ends_pending,
        };
        self.store.insert(Entry::new(&flow));
        flow
    }

    fn evict_oldest(&mut self) {
        if let Some(slot) = self.store.oldest() {
            let flow = self.store.remove(slot).flow();
            self.evicted_flows.push(flow);
            self.evicted += 1;
        }
    }

    /// The flows evicted to make room since the last call.
    pub fn drain_evicted(&mut self) -> std::vec::Drain<'_, Flow> {
        self.evicted_flows.drain(..)
    }

    /// The live flow with `key`, unpacked.
    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        self.store
            .find(key)
            .map(|slot| self.store.entry(slot).flow())
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            live: self.store.len(),
            evicted: self.evicted,
        }
    }
}

/// Whether a `NEW` for a live flow's tuple is another connection: a different conntrack entry
/// (two live entries never share a tuple, so the flow's has ended), or its entry reused. Without
/// ids (netlink) a repeat is the same connection: netlink reports the old end first.
fn replaces(flow: &Flow, new: &FlowEvent) -> bool {
    // An unconfirmed entry (seen by NAT setup) may still lose a clash to the live one and be
    // freed: only a confirmed entry proves the live one ended.
    if new.status & ct_status::CONFIRMED == 0 {
        return false;
    }
    match (flow.event.instance, new.instance) {
        (Some(live), Some(new)) => live.id != new.id || new.renewed,
        _ => false,
    }
}

/// Whether an end belongs to the live flow rather than to an earlier connection on its tuple.
/// Sources race: eBPF reports a new connection at its first packet, possibly before netlink
/// reports the end of the old one.
fn ends(flow: &mut Flow, end: &FlowEvent) -> bool {
    let both_identified = flow.event.instance.is_some() && end.instance.is_some();
    if !both_identified && flow.earlier_ends_pending > 0 {
        flow.earlier_ends_pending -= 1;
        return false;
    }
    same_connection(&flow.event, end)
}

/// Whether two events of one tuple are of the same conntrack entry: by its id where both
/// sources tell it, else by the translation (a new connection on the tuple may be translated
/// alike, which is why [`ends`] counts the ends still owed to earlier ones).
fn same_connection(a: &FlowEvent, b: &FlowEvent) -> bool {
    match (a.instance, b.instance) {
        (Some(a), Some(b)) => a.id == b.id,
        _ => a.reply == b.reply,
    }
}

/// The flow of a connection whose `end` was handled before its `start`.
fn opened_and_closed(start: FlowEvent, end: &FlowEvent) -> Flow {
    let mut flow = Flow {
        first_seen: start.ts,
        last_seen: end.ts,
        event: start,
        earlier_ends_pending: 0,
    };
    merge_details(&mut flow.event, end);
    flow
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
    use crate::events::testing::{tcp_event, tuple};
    use crate::events::{Hook, Instance};
    use std::time::Duration;

    fn event(kind: EventKind, sport: u16, reply_dport: u16) -> FlowEvent {
        let orig = tuple("203.0.113.10", sport, "192.0.2.10", 80);
        let reply = tuple("10.244.0.10", 8080, "10.244.0.1", reply_dport);
        FlowEvent {
            ts: SystemTime::UNIX_EPOCH + Duration::from_secs(sport as u64),
            out_ifindex: Some(3),
            hook: Some(Hook::Xmit),
            ..tcp_event(kind, orig, reply)
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
            Update::NatChanged { flow, was } => {
                assert_eq!(flow.event.reply.dport, 6000);
                assert_eq!(was.sport, 5000, "the translation reported before");
            }
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
            table.store.slots() <= 64 + 2,
            "the store grew to {} slots",
            table.store.slots()
        );
    }

    /// An event of conntrack entry `id`, confirmed (as every packet's entry is).
    fn of_entry(mut event: FlowEvent, id: u64, renewed: bool) -> FlowEvent {
        event.instance = Some(Instance { id, renewed });
        event.status |= ct_status::CONFIRMED;
        event
    }

    #[test]
    fn an_unconfirmed_entry_that_may_lose_a_clash_does_not_replace_the_live_one() {
        let mut table = FlowTable::new(10);
        table.apply(of_entry(event(EventKind::New, 1000, 5000), 1, false));
        let mut clash_loser = of_entry(event(EventKind::New, 1000, 5000), 2, false);
        clash_loser.status &= !ct_status::CONFIRMED;
        assert_eq!(table.apply(clash_loser), Update::Unchanged);
        assert_eq!(table.stats().live, 1);
    }

    #[test]
    fn a_late_end_of_an_earlier_connection_leaves_the_new_one_open() {
        let mut table = FlowTable::new(10);
        // The new connection on the tuple was MASQUERADEd to another port than the old one.
        table.apply(event(EventKind::New, 1000, 6000));
        assert_eq!(
            table.apply(event(EventKind::Destroy, 1000, 5000)),
            Update::Unchanged
        );
        assert_eq!(table.stats().live, 1);
        assert!(matches!(
            table.apply(event(EventKind::Destroy, 1000, 6000)),
            Update::Closed(_)
        ));
    }

    #[test]
    fn another_entry_on_a_live_tuple_replaces_the_flow_and_its_late_end_is_not_the_new_ones() {
        let mut table = FlowTable::new(10);
        table.apply(of_entry(event(EventKind::New, 1000, 5000), 1, false));
        match table.apply(of_entry(event(EventKind::New, 1000, 5000), 2, false)) {
            Update::Replaced { ended, opened } => {
                assert_eq!(ended.event.instance.map(|i| i.id), Some(1));
                assert_eq!(opened.event.instance.map(|i| i.id), Some(2));
            }
            other => panic!("expected Replaced, got {other:?}"),
        }
        // netlink's end of entry 1 (no id, same reply tuple) arrives after entry 2 opened.
        assert_eq!(
            table.apply(event(EventKind::Destroy, 1000, 5000)),
            Update::Unchanged
        );
        assert_eq!(table.stats().live, 1);
        assert!(matches!(
            table.apply(event(EventKind::Destroy, 1000, 5000)),
            Update::Closed(_)
        ));
    }

    #[test]
    fn a_renewed_entry_replaces_and_a_repeat_of_the_same_entry_does_not() {
        let mut table = FlowTable::new(10);
        table.apply(of_entry(event(EventKind::New, 1000, 5000), 7, false));
        // The kernel map forgot the entry (LRU) and reported it again: the same connection.
        let repeat = of_entry(event(EventKind::New, 1000, 5000), 7, false);
        assert_eq!(table.apply(repeat), Update::Unchanged);
        // The entry was freed and reused for a new connection on the same tuple.
        let renewed = of_entry(event(EventKind::New, 1000, 5000), 7, true);
        assert!(matches!(table.apply(renewed), Update::Replaced { .. }));
    }

    #[test]
    fn an_end_with_an_entry_id_closes_only_that_entry() {
        let mut table = FlowTable::new(10);
        table.apply(of_entry(event(EventKind::New, 1000, 5000), 1, false));
        table.apply(of_entry(event(EventKind::New, 1000, 5000), 2, false));
        let late = of_entry(event(EventKind::Destroy, 1000, 5000), 1, false);
        assert_eq!(table.apply(late), Update::Unchanged);
        let own = of_entry(event(EventKind::Destroy, 1000, 5000), 2, false);
        assert!(matches!(table.apply(own), Update::Closed(_)));
    }

    /// netlink's end (no entry id, stamped when read) of a connection whose eBPF start
    /// (stamped at its first packet) is read after it.
    fn end_read_at(start: &FlowEvent, later: Duration) -> FlowEvent {
        let mut end = start.clone();
        end.kind = EventKind::Destroy;
        end.instance = None;
        end.ts = start.ts + later;
        end.packets = Some(3);
        end.bytes = Some(180);
        end
    }

    #[test]
    fn an_end_read_before_its_start_closes_the_start() {
        let mut table = FlowTable::new(10);
        let start = of_entry(event(EventKind::New, 1000, 5000), 1, false);
        let end = end_read_at(&start, Duration::from_millis(15));
        assert_eq!(table.apply(end), Update::Unchanged);
        match table.apply(start) {
            Update::OpenedAndClosed(flow) => {
                assert_eq!(flow.event.instance.map(|i| i.id), Some(1));
                assert_eq!(flow.event.packets, Some(3), "the end's counters are merged");
                assert_eq!(
                    flow.last_seen.duration_since(flow.first_seen).unwrap(),
                    Duration::from_millis(15)
                );
            }
            other => panic!("expected OpenedAndClosed, got {other:?}"),
        }
        assert_eq!(table.stats().live, 0);
        // The end was used up: the tuple's next connection opens.
        let next = of_entry(event(EventKind::New, 1000, 5000), 2, false);
        assert!(matches!(table.apply(next), Update::Opened(_)));
    }

    #[test]
    fn an_unknown_end_does_not_close_a_later_connection_on_its_tuple() {
        let mut table = FlowTable::new(10);
        let earlier = of_entry(event(EventKind::New, 1000, 5000), 1, false);
        table.apply(end_read_at(&earlier, Duration::from_millis(15)));
        // Started after the old end was read: another connection, which stays open.
        let mut later = of_entry(event(EventKind::New, 1000, 5000), 2, false);
        later.ts = earlier.ts + Duration::from_millis(20);
        assert!(matches!(table.apply(later), Update::Opened(_)));
        // Translated differently (MASQUERADE picked another port): another connection too.
        let mut table = FlowTable::new(10);
        table.apply(end_read_at(&earlier, Duration::from_millis(15)));
        let other_port = of_entry(event(EventKind::New, 1000, 6000), 2, false);
        assert!(matches!(table.apply(other_port), Update::Opened(_)));
    }

    #[test]
    fn unknown_ends_are_kept_briefly_and_boundedly() {
        let mut table = FlowTable::new(10);
        let start = of_entry(event(EventKind::New, 1000, 5000), 1, false);
        table.apply(end_read_at(&start, Duration::from_millis(15)));
        // Another unknown end read long after the first drops it.
        let much_later = end_read_at(&start, EARLY_END_WINDOW * 3);
        let mut unrelated = much_later.clone();
        unrelated.orig.sport = 1001;
        table.apply(unrelated);
        assert_eq!(table.early_ends.len(), 1);
        assert!(matches!(table.apply(start), Update::Opened(_)));
        // A burst of ends of connections the agent never saw stays bounded.
        for sport in 0..10_000u16 {
            table.apply(end_read_at(
                &event(EventKind::New, sport, 5000),
                Duration::ZERO,
            ));
        }
        assert!(table.early_ends.len() <= 4096);
    }
}
