//! Ends that reach the flow table before their connection's start.
//!
//! Where `nf_ct_delete` cannot be hooked, the eBPF capture reports a connection's start and
//! netlink its end, and the two are read on separate timers of about 10 ms. A connection that
//! conntrack removes within milliseconds of its first packet (`conntrack -F`/`-D`, a refused
//! connection) can then have its end handled first. Such an end is kept here briefly, so that
//! the start that follows closes at once instead of staying open until it is evicted.

use super::same_connection;
use crate::events::{FlowEvent, FlowKey};
use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// How long an end waits for its start: both sources are read every ~10 ms, so a start still
/// in flight arrives well within this; an end of a connection that started before the agent
/// (the usual unknown end) is dropped after it.
pub const EARLY_END_WINDOW: Duration = Duration::from_secs(1);

/// Ends kept at most: a start-up burst of ends of connections the agent never saw must not
/// grow without bound.
const CAPACITY: usize = 4096;

/// Unknown ends, by connection, with their arrival order for expiry.
#[derive(Default)]
pub(super) struct EarlyEnds {
    ends: foldhash::HashMap<FlowKey, FlowEvent>,
    /// Keys with the `ts` of the end they were stored with, oldest first; an entry whose end
    /// was taken or replaced since is skipped.
    order: VecDeque<(SystemTime, FlowKey)>,
}

impl EarlyEnds {
    /// Keeps an end whose connection the table does not know.
    pub(super) fn remember(&mut self, end: FlowEvent) {
        self.expire(end.ts);
        while self.ends.len() >= CAPACITY {
            self.pop_oldest();
        }
        let key = end.key();
        self.order.push_back((end.ts, key));
        self.ends.insert(key, end);
    }

    /// The kept end of the connection `start` reports, if any. An end belongs to it when it
    /// came no earlier than the start (netlink stamps an end when it reads it, after it
    /// happened; the eBPF capture stamps a start with its first packet's time) and names the
    /// same conntrack entry; a later connection on the tuple starts after the old end.
    pub(super) fn take_for(&mut self, start: &FlowEvent) -> Option<FlowEvent> {
        // Every new connection asks; almost always nothing is kept.
        if self.order.is_empty() {
            return None;
        }
        self.expire(start.ts);
        let key = start.key();
        let end = self.ends.get(&key)?;
        if end.ts < start.ts || !same_connection(start, end) {
            return None;
        }
        self.ends.remove(&key)
    }

    /// Drops the ends kept longer than [`EARLY_END_WINDOW`] before `now`.
    fn expire(&mut self, now: SystemTime) {
        while let Some(&(ts, _)) = self.order.front() {
            if now.duration_since(ts).unwrap_or_default() <= EARLY_END_WINDOW {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((ts, key)) = self.order.pop_front() else {
            return;
        };
        if self.ends.get(&key).is_some_and(|end| end.ts == ts) {
            self.ends.remove(&key);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }
}
