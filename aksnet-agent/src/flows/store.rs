//! Where the flow table keeps its entries: slots in fixed-size chunks, a hash index of slot
//! numbers, and the slots linked in insertion order for eviction.
//!
//! Memory per flow is the point. A `HashMap<FlowKey, Flow>` pays its spare capacity (up to
//! 2.3× after a doubling) on whole entries; here the index holds 4-byte slot numbers, so its
//! spare capacity costs a few bytes a flow, and chunks grow the slots without copying or
//! doubling. The insertion order is two slot numbers per entry instead of a queue.

use super::entry::Entry;
use crate::events::FlowKey;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Slots per chunk: 4096 entries are about 0.6 MiB, so a part-filled last chunk is small.
const CHUNK: usize = 4096;
/// No slot: the end of a list.
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Slot {
    entry: Entry,
    /// Neighbours in insertion order while live; `next` chains the free slots once freed.
    prev: u32,
    next: u32,
}

pub(super) struct Store {
    chunks: Vec<Vec<Slot>>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// Oldest and newest live slots.
    head: u32,
    tail: u32,
    /// Freed slots, reused before the chunks grow.
    free: u32,
    live: usize,
}

impl Store {
    pub(super) fn new() -> Store {
        Store {
            chunks: Vec::new(),
            index: HashTable::new(),
            hasher: Default::default(),
            head: NONE,
            tail: NONE,
            free: NONE,
            live: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Slots allocated, live or free: what the store's memory is proportional to.
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// The live slot holding `key`.
    pub(super) fn find(&self, key: &FlowKey) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |&slot| self.slot(slot).entry.key() == *key)
            .copied()
    }

    pub(super) fn entry(&self, slot: u32) -> &Entry {
        &self.slot(slot).entry
    }

    pub(super) fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        &mut self.slot_mut(slot).entry
    }

    /// Stores `entry`, whose key no live slot holds, as the newest.
    pub(super) fn insert(&mut self, entry: Entry) -> u32 {
        let hash = self.hasher.hash_one(entry.key());
        let linked = Slot {
            entry,
            prev: self.tail,
            next: NONE,
        };
        let slot = if self.free != NONE {
            let slot = self.free;
            self.free = self.slot(slot).next;
            *self.slot_mut(slot) = linked;
            slot
        } else {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(CHUNK));
            }
            let last = self.chunks.len() - 1;
            self.chunks[last].push(linked);
            (last * CHUNK + self.chunks[last].len() - 1) as u32
        };
        match self.tail {
            NONE => self.head = slot,
            tail => self.slot_mut(tail).next = slot,
        }
        self.tail = slot;
        let Store { chunks, hasher, .. } = self;
        self.index.insert_unique(hash, slot, |&other| {
            hasher.hash_one(
                chunks[other as usize / CHUNK][other as usize % CHUNK]
                    .entry
                    .key(),
            )
        });
        self.live += 1;
        slot
    }

    /// Frees a live slot and returns its entry.
    pub(super) fn remove(&mut self, slot: u32) -> Entry {
        let hash = self.hasher.hash_one(self.entry(slot).key());
        self.index
            .find_entry(hash, |&other| other == slot)
            .expect("a live slot is indexed")
            .remove();
        let Slot { entry, prev, next } = *self.slot(slot);
        match prev {
            NONE => self.head = next,
            prev => self.slot_mut(prev).next = next,
        }
        match next {
            NONE => self.tail = prev,
            next => self.slot_mut(next).prev = prev,
        }
        self.slot_mut(slot).next = self.free;
        self.free = slot;
        self.live -= 1;
        entry
    }

    /// The live slot stored longest ago.
    pub(super) fn oldest(&self) -> Option<u32> {
        (self.head != NONE).then_some(self.head)
    }

    fn slot(&self, slot: u32) -> &Slot {
        &self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Slot {
        &mut self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }
}
