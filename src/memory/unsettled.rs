//! [`Unsettled`]: the in-memory broker's deliveries that no consumer settled yet, by delivery tag.
//!
//! Acknowledgements come in about tag order where keys are known, and far from it where a
//! consumer holds messages and releases them key by key (each key's tags spread over the whole
//! hold). An acknowledgement touches only its delivery's *owner*: eight bytes a delivery, side by
//! side, so the owners of the next key's deliveries are mostly in the lines the last key's
//! brought in. The message itself is not touched then: it is dropped once the window moves past
//! it, in tag order, in about the order its memory was allocated (docs/performance.md,
//! round 22).

use std::collections::VecDeque;
use std::num::NonZeroU64;

use rustc_hash::FxHashMap;

use super::Stored;
use crate::seq_map::too_sparse;

/// Deliveries by tag: tags rise as they are handed out (one given again is kept all the same).
/// `crate::seq_map::SeqMap`'s window with each slot in two (the owner, the message), under its
/// rule (`too_sparse`): a window of slots from the oldest tag still unsettled, and a map for the
/// stragglers, where the oldest deliveries of a window too sparse to keep move until it is dense
/// again; a delivery left unsettled while later ones come and go keeps at most a few slots (and
/// their messages) alive. A slot costs its owner and, once acknowledged and until the window
/// moves past it, its message.
#[derive(Default)]
pub(super) struct Unsettled {
    /// The tag of the window's first slot; every straggler's tag is below it.
    base: u64,
    /// One slot per tag from `base`: the transport holding the delivery, `None` once it is
    /// settled (or for a tag never given). The first is never `None`. What an acknowledgement
    /// touches.
    owners: VecDeque<Option<NonZeroU64>>,
    /// Side by side with `owners`: each delivery's message. It stays after an acknowledgement
    /// until the window moves past it; it is gone (`None`) once taken back.
    messages: VecDeque<Option<Stored>>,
    /// Deliveries moved out of the window. Tags are the broker's own sequence, not outside
    /// input: a fast hasher, not a DoS-resistant one.
    stragglers: FxHashMap<u64, (NonZeroU64, Stored)>,
    /// Unsettled deliveries in the window.
    in_window: usize,
}

impl Unsettled {
    /// How many deliveries are unsettled.
    pub(super) fn len(&self) -> usize {
        self.in_window + self.stragglers.len()
    }

    /// Keep delivery `tag` of `message`, held by `owner`.
    pub(super) fn insert(&mut self, tag: u64, owner: NonZeroU64, message: Stored) {
        if self.owners.is_empty() {
            self.base = self.base.max(tag);
        }
        let Some(mut at) = tag
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
        else {
            // Below the window: every straggler's tag is.
            self.stragglers.insert(tag, (owner, message));
            return;
        };
        if let (Some(slot), Some(kept)) = (self.owners.get_mut(at), self.messages.get_mut(at)) {
            // A tag given before, within the window: its slot again.
            if slot.replace(owner).is_none() {
                self.in_window += 1;
            }
            *kept = Some(message);
            return;
        }
        if too_sparse(at + 1, self.in_window + 1) {
            // So far ahead that the window would be mostly empty: what it holds goes to the
            // stragglers and it starts again at `tag` (the gap is never allocated).
            while !self.owners.is_empty() {
                self.spill_front();
            }
            self.base = tag;
            at = 0;
        }
        self.owners.resize(at, None);
        self.messages.resize_with(at, || None);
        self.owners.push_back(Some(owner));
        self.messages.push_back(Some(message));
        self.in_window += 1;
        self.thin_out();
    }

    /// The holder of delivery `tag` and its message.
    pub(super) fn get(&self, tag: u64) -> Option<(NonZeroU64, &Stored)> {
        match self.index(tag) {
            Some(i) => {
                let owner = self.owners.get(i).copied().flatten()?;
                Some((owner, self.messages.get(i)?.as_ref()?))
            }
            None => self.stragglers.get(&tag).map(|(o, m)| (*o, m)),
        }
    }

    /// Settle delivery `tag` if `owner` holds it, leaving its message to be dropped as the
    /// window moves past it: true if it did.
    pub(super) fn ack(&mut self, tag: u64, owner: NonZeroU64) -> bool {
        match self.index(tag) {
            Some(i) => self.settle(i, owner),
            None => self.take_straggler(tag, owner).is_some(),
        }
    }

    /// Settle delivery `tag` if `owner` holds it, taking its message back.
    pub(super) fn take(&mut self, tag: u64, owner: NonZeroU64) -> Option<Stored> {
        let Some(i) = self.index(tag) else {
            return self.take_straggler(tag, owner);
        };
        // Taken before the slot is settled: settling may move the window.
        let holds = self.owners.get(i) == Some(&Some(owner));
        let message = match self.messages.get_mut(i) {
            Some(kept) if holds => kept.take(),
            _ => None,
        };
        self.settle(i, owner);
        message
    }

    /// Every unsettled delivery with its tag and holder, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, NonZeroU64, &Stored)> {
        let window = (self.base..)
            .zip(self.owners.iter().zip(&self.messages))
            .filter_map(|(tag, (owner, m))| Some((tag, (*owner)?, m.as_ref()?)));
        window.chain(self.stragglers.iter().map(|(tag, (o, m))| (*tag, *o, m)))
    }

    /// Mark the window's slot `i` settled if `owner` holds it: true if it did.
    fn settle(&mut self, i: usize, owner: NonZeroU64) -> bool {
        match self.owners.get_mut(i) {
            Some(slot) if *slot == Some(owner) => *slot = None,
            _ => return false,
        }
        self.in_window -= 1;
        self.trim_front();
        self.thin_out();
        true
    }

    fn take_straggler(&mut self, tag: u64, owner: NonZeroU64) -> Option<Stored> {
        if self.stragglers.get(&tag)?.0 != owner {
            return None;
        }
        self.stragglers.remove(&tag).map(|(_, m)| m)
    }

    /// Where `tag` is in the window, if the window spans it.
    fn index(&self, tag: u64) -> Option<usize> {
        tag.checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|at| *at < self.owners.len())
    }

    /// Move the oldest deliveries to `stragglers` while the window is long and mostly settled:
    /// on return it is not `too_sparse`.
    fn thin_out(&mut self) {
        while too_sparse(self.owners.len(), self.in_window) {
            self.spill_front();
            self.trim_front();
        }
    }

    /// Move the window's first delivery, if unsettled, to `stragglers`; the window starts after
    /// it.
    fn spill_front(&mut self) {
        let owner = self.owners.pop_front().flatten();
        let message = self.messages.pop_front().flatten();
        if let Some(owner) = owner {
            self.in_window -= 1;
            if let Some(m) = message {
                self.stragglers.insert(self.base, (owner, m));
            }
        }
        self.base += 1;
    }

    /// Drop the settled slots at the window's front, with their messages.
    fn trim_front(&mut self) {
        while let Some(None) = self.owners.front() {
            self.owners.pop_front();
            self.messages.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::seq_map::{MIN_WINDOW, SPARSE};

    #[derive(Debug, Clone)]
    enum Op {
        /// Deliver under the next tag, this far above the last one, to this transport.
        Deliver(u64, u64),
        /// Acknowledge this tag (an index into the tags given so far) as this transport.
        Ack(usize, u64),
        /// Take this tag back as this transport.
        Take(usize, u64),
        /// Deliver again under a tag given before.
        Again(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1..4u64, 1..3u64).prop_map(|(gap, t)| Op::Deliver(gap, t)),
            1 => (4..300u64, 1..3u64).prop_map(|(gap, t)| Op::Deliver(gap, t)),
            8 => (any::<usize>(), 1..3u64).prop_map(|(i, t)| Op::Ack(i, t)),
            3 => (any::<usize>(), 1..3u64).prop_map(|(i, t)| Op::Take(i, t)),
            1 => (any::<usize>(), 1..3u64).prop_map(|(i, t)| Op::Again(i, t)),
        ]
    }

    fn owner(t: u64) -> NonZeroU64 {
        NonZeroU64::MIN.saturating_add(t)
    }

    fn message(tag: u64) -> Stored {
        Stored::message(tag.to_be_bytes().to_vec())
    }

    proptest! {
        /// Whatever the order of acknowledgements and takes, by the holder or not, it keeps
        /// exactly the deliveries a map would, gives each message back whole to its holder only,
        /// and its window keeps at most `SPARSE` slots for each delivery unsettled in it.
        #[test]
        fn it_keeps_what_is_unsettled_within_bounded_memory(
            ops in prop::collection::vec(op(), 0..600)
        ) {
            let mut u = Unsettled::default();
            let mut model: BTreeMap<u64, NonZeroU64> = BTreeMap::new();
            let mut tags = Vec::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Deliver(gap, t) => {
                        next += gap;
                        u.insert(next, owner(t), message(next));
                        model.insert(next, owner(t));
                        tags.push(next);
                    }
                    Op::Again(i, t) if !tags.is_empty() => {
                        let tag = tags[i % tags.len()];
                        if let std::collections::btree_map::Entry::Vacant(e) = model.entry(tag) {
                            u.insert(tag, owner(t), message(tag));
                            e.insert(owner(t));
                        }
                    }
                    Op::Ack(i, t) if !tags.is_empty() => {
                        let tag = tags[i % tags.len()];
                        let holds = model.get(&tag) == Some(&owner(t));
                        if holds {
                            model.remove(&tag);
                        }
                        prop_assert_eq!(u.ack(tag, owner(t)), holds);
                    }
                    Op::Take(i, t) if !tags.is_empty() => {
                        let tag = tags[i % tags.len()];
                        let holds = model.get(&tag) == Some(&owner(t));
                        if holds {
                            model.remove(&tag);
                        }
                        prop_assert_eq!(u.take(tag, owner(t)), holds.then(|| message(tag)));
                    }
                    Op::Again(..) | Op::Ack(..) | Op::Take(..) => {}
                }
                prop_assert_eq!(u.len(), model.len());
                for (tag, o) in &model {
                    prop_assert_eq!(u.get(*tag), Some((*o, &message(*tag))));
                }
                let mut all: Vec<(u64, NonZeroU64)> = u
                    .iter()
                    .map(|(tag, o, m)| {
                        assert_eq!(*m, message(tag));
                        (tag, o)
                    })
                    .collect();
                all.sort_unstable();
                prop_assert_eq!(all, model.iter().map(|(t, o)| (*t, *o)).collect::<Vec<_>>());
                prop_assert!(u.owners.front().is_none_or(Option::is_some));
                prop_assert_eq!(u.owners.len(), u.messages.len());
                prop_assert!(
                    u.owners.len() <= MIN_WINDOW.max(SPARSE * u.in_window),
                    "window of {} slots for {} deliveries", u.owners.len(), u.in_window
                );
            }
        }
    }

    #[test]
    fn a_jump_far_ahead_allocates_no_gap() {
        let mut u = Unsettled::default();
        u.insert(1, owner(1), message(1));
        u.insert(1_000_000_000, owner(1), message(2));
        assert!(u.owners.capacity() < 1_000, "{} slots", u.owners.capacity());
        assert_eq!(u.len(), 2);
        assert_eq!(u.take(1, owner(1)), Some(message(1)));
        assert!(u.ack(1_000_000_000, owner(1)));
        assert_eq!(u.len(), 0);
    }
}
