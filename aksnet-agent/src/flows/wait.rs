//! Holds back connections first reported without a packet until their interfaces arrive.
//!
//! Where `nf_nat_setup_info` can be hooked (AKS nodes), the kernel reports a connection when its
//! NAT decision is made, before any packet of it left an interface, so that report knows no
//! interfaces. The xmit hook then sends one more `NEW` from the connection's first packet. An
//! output line is written once per connection, so the first report waits here, for at most
//! [`INTERFACES_WAIT`], for that follow-up to merge into it.

use super::merge_details;
use crate::events::{EventKind, FlowEvent, FlowKey};
use std::collections::VecDeque;
use std::iter::Chain;
use std::option;
use std::time::{Duration, Instant};

/// How long a packet-less report waits for its packet: the first packet leaves microseconds
/// after the NAT decision, so this only bounds the delay for connections that never send one
/// through this namespace's devices.
pub const INTERFACES_WAIT: Duration = Duration::from_millis(250);

/// Packet-less `NEW` events waiting for their xmit follow-up, with deadlines.
pub struct InterfaceWait {
    wait: Duration,
    pending: foldhash::HashMap<FlowKey, Pending>,
    /// Keys in arrival order, which is deadline order; entries no longer pending (or pending
    /// again with a later deadline) are skipped.
    deadlines: VecDeque<(Instant, FlowKey)>,
}

/// The events an [`InterfaceWait::offer`] releases, in order: none, one, or a held one and then
/// the offered one. An iterator, not a `Vec`: every event of the capture passes here.
pub type Released = Chain<option::IntoIter<FlowEvent>, option::IntoIter<FlowEvent>>;

fn released(first: Option<FlowEvent>, then: Option<FlowEvent>) -> Released {
    first.into_iter().chain(then)
}

struct Pending {
    deadline: Instant,
    event: FlowEvent,
}

impl InterfaceWait {
    pub fn new(wait: Duration) -> InterfaceWait {
        InterfaceWait {
            wait,
            pending: foldhash::HashMap::default(),
            deadlines: VecDeque::new(),
        }
    }

    /// Takes one event from the capture; returns the events ready for the flow table, in order.
    /// A packet-less `NEW` is held; the packet's `NEW` for a held connection releases it merged
    /// (interfaces, counters); any other event of a held connection releases it first.
    pub fn offer(&mut self, event: FlowEvent, now: Instant) -> Released {
        let is_new = event.kind == EventKind::New;
        let packet_less_new = is_new && event.hook.is_some_and(|h| !h.has_packet());
        // Nothing is held where the kernel reports no packet-less connections: no key to hash.
        let held = if self.pending.is_empty() {
            None
        } else {
            self.pending.remove(&event.key())
        };
        let Some(held) = held else {
            if packet_less_new {
                self.hold(event, now);
                return released(None, None);
            }
            return released(Some(event), None);
        };
        let mut first = held.event;
        let same_entry = first.instance.map(|i| i.id) == event.instance.map(|i| i.id);
        if is_new && same_entry && event.hook.is_some_and(|h| h.has_packet()) {
            merge_details(&mut first, &event);
            // The packet's status is later: confirmed, where NAT setup saw it unconfirmed.
            first.status = event.status;
            return released(Some(first), None);
        }
        if packet_less_new {
            // Another entry on the tuple: the held one goes as it is, this one waits in turn.
            self.hold(event, now);
            return released(Some(first), None);
        }
        released(Some(first), Some(event))
    }

    fn hold(&mut self, event: FlowEvent, now: Instant) {
        let key = event.key();
        let deadline = now + self.wait;
        self.deadlines.push_back((deadline, key));
        self.pending.insert(key, Pending { deadline, event });
    }

    /// Releases, unchanged, the events whose wait ended at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<FlowEvent> {
        self.release(|deadline| deadline <= now)
    }

    /// When [`expire`](Self::expire) next has something to release.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines
            .iter()
            .find(|(deadline, key)| {
                self.pending
                    .get(key)
                    .is_some_and(|p| p.deadline == *deadline)
            })
            .map(|(deadline, _)| *deadline)
    }

    /// Releases everything still held, oldest first (the capture ended).
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        self.release(|_| true)
    }

    /// Releases, oldest first, the held events whose deadline `due` accepts, stopping at the
    /// first it refuses. A deadline whose event was already released is only dropped.
    fn release(&mut self, due: impl Fn(Instant) -> bool) -> Vec<FlowEvent> {
        let mut ready = Vec::new();
        while let Some(&(deadline, key)) = self.deadlines.front() {
            if !due(deadline) {
                break;
            }
            self.deadlines.pop_front();
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.deadline == deadline)
            {
                ready.extend(self.pending.remove(&key).map(|p| p.event));
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::testing::{tcp_event, tuple};
    use crate::events::Hook;
    use crate::flows::{FlowTable, Update};

    const WAIT: Duration = INTERFACES_WAIT;

    fn event(kind: EventKind, sport: u16, hook: Option<Hook>) -> FlowEvent {
        let orig = tuple("10.244.0.10", sport, "198.51.100.20", 443);
        let reply = tuple("198.51.100.20", 443, "10.224.0.4", sport);
        let has_packet = hook.is_some_and(Hook::has_packet);
        FlowEvent {
            in_ifindex: has_packet.then_some(4),
            out_ifindex: has_packet.then_some(2),
            packets: has_packet.then_some(1),
            bytes: has_packet.then_some(60),
            hook,
            ..tcp_event(kind, orig, reply)
        }
    }

    fn offer(wait: &mut InterfaceWait, event: FlowEvent, now: Instant) -> Vec<FlowEvent> {
        wait.offer(event, now).collect()
    }

    fn nat_setup(sport: u16) -> FlowEvent {
        event(EventKind::New, sport, Some(Hook::NatSetup))
    }

    fn xmit(sport: u16) -> FlowEvent {
        event(EventKind::New, sport, Some(Hook::Xmit))
    }

    #[test]
    fn a_packet_less_new_takes_the_interfaces_of_its_follow_up() {
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        assert!(offer(&mut wait, nat_setup(1000), t0).is_empty());
        assert_eq!(wait.next_deadline(), Some(t0 + WAIT));
        let ready = offer(&mut wait, xmit(1000), t0 + Duration::from_millis(1));
        assert_eq!(ready.len(), 1, "one event, so one opened flow: {ready:?}");
        let merged = &ready[0];
        assert_eq!(
            merged.hook,
            Some(Hook::NatSetup),
            "the first report, completed"
        );
        assert_eq!((merged.in_ifindex, merged.out_ifindex), (Some(4), Some(2)));
        assert_eq!((merged.packets, merged.bytes), (Some(1), Some(60)));
        assert_eq!(wait.next_deadline(), None);
        assert!(wait.expire(t0 + 2 * WAIT).is_empty(), "nothing left over");
    }

    #[test]
    fn a_second_packet_less_entry_releases_the_first_and_waits_itself() {
        use crate::events::Instance;
        let entry = |mut ev: FlowEvent, id| {
            ev.instance = Some(Instance { id, renewed: false });
            ev
        };
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        assert!(offer(&mut wait, entry(nat_setup(1000), 1), t0).is_empty());
        let released = offer(&mut wait, entry(nat_setup(1000), 2), t0);
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].instance.map(|i| i.id), Some(1));
        assert_eq!(
            released[0].in_ifindex, None,
            "entry 1 goes without interfaces"
        );
        // A packet of entry 2 completes entry 2, not entry 1.
        let ready = offer(&mut wait, entry(xmit(1000), 2), t0);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].instance.map(|i| i.id), Some(2));
        assert_eq!(ready[0].in_ifindex, Some(4));
    }

    #[test]
    fn without_a_follow_up_the_event_is_released_at_its_deadline() {
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        offer(&mut wait, nat_setup(1000), t0);
        offer(&mut wait, nat_setup(1001), t0 + Duration::from_millis(100));
        assert!(wait.expire(t0 + WAIT - Duration::from_millis(1)).is_empty());
        let ready = wait.expire(t0 + WAIT);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].orig.sport, 1000);
        assert_eq!(ready[0].in_ifindex, None, "released with what it has");
        assert_eq!(
            wait.next_deadline(),
            Some(t0 + Duration::from_millis(100) + WAIT)
        );
        let ready = wait.drain();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].orig.sport, 1001);
        assert_eq!(wait.next_deadline(), None);
    }

    #[test]
    fn events_with_a_packet_and_from_other_sources_pass_straight_through() {
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        assert_eq!(offer(&mut wait, xmit(1000), t0), vec![xmit(1000)]);
        let netlink = event(EventKind::New, 1001, None);
        assert_eq!(offer(&mut wait, netlink.clone(), t0), vec![netlink]);
        assert_eq!(wait.next_deadline(), None);
    }

    #[test]
    fn another_event_of_a_held_connection_releases_it_first() {
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        offer(&mut wait, nat_setup(1000), t0);
        let end = event(EventKind::Destroy, 1000, Some(Hook::CtDelete));
        let ready = offer(&mut wait, end.clone(), t0);
        assert_eq!(ready, vec![nat_setup(1000), end]);
        assert!(wait.expire(t0 + WAIT).is_empty(), "released only once");
        // A later packet-less report of the same key waits again, with its own deadline.
        let t1 = t0 + Duration::from_millis(200);
        offer(&mut wait, nat_setup(1000), t1);
        assert_eq!(wait.next_deadline(), Some(t1 + WAIT));
        assert!(
            wait.expire(t0 + WAIT).is_empty(),
            "the old deadline is stale"
        );
        assert_eq!(wait.expire(t1 + WAIT).len(), 1);
    }

    #[test]
    fn merged_flow_opens_once_in_the_table() {
        let mut table = FlowTable::new(10);
        let mut wait = InterfaceWait::new(WAIT);
        let t0 = Instant::now();
        let mut updates = Vec::new();
        for ev in [nat_setup(1000), xmit(1000)] {
            for ready in offer(&mut wait, ev, t0) {
                updates.push(table.apply(ready));
            }
        }
        assert_eq!(updates.len(), 1);
        match &updates[0] {
            Update::Opened(flow) => {
                assert_eq!(flow.event.in_ifindex, Some(4))
            }
            other => panic!("expected Opened, got {other:?}"),
        }
        // A late follow-up (after the wait) only completes the table's entry.
        offer(&mut wait, nat_setup(1001), t0);
        for ready in wait.expire(t0 + WAIT) {
            assert!(matches!(table.apply(ready), Update::Opened(_)));
        }
        for ready in offer(&mut wait, xmit(1001), t0 + WAIT) {
            assert_eq!(table.apply(ready), Update::Unchanged);
        }
        let key = xmit(1001).key();
        assert_eq!(table.get(&key).unwrap().event.out_ifindex, Some(2));
    }
}
