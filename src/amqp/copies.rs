//! Deferred copies the broker delivers more than once.
//!
//! Every deferred copy carries its own identity ([`super::headers::COPY`]). A broker may deliver
//! one copy twice: a quorum delay queue dead-letters *at least once*, and on a RabbitMQ cluster
//! (3.10) its dead-letter worker was seen to forward one expired copy several times. The second
//! delivery of a copy this transport has settled (handled, deferred again or dead-lettered), or
//! still holds on a live channel, is a duplicate: it is acknowledged and dropped, never handled
//! twice. A copy is only ever dropped while another delivery of it is done or still in hand, so
//! nothing is lost: a copy whose first delivery went stale (its channel failed) is not a
//! duplicate, and a copy given back (requeued) is not done.

use std::collections::{HashMap, HashSet, VecDeque};

/// How many settled copies are remembered (oldest forgotten first): duplicates arrive within
/// seconds of their original; this many copies cost a few MiB at most.
pub(crate) const REMEMBERED: usize = 65_536;

/// A new identity for a deferred copy, unique across processes.
pub(crate) fn new_copy_id() -> String {
    format!("{}.{}", std::process::id(), super::unique_suffix())
}

/// What an arriving copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Not seen before (or seen only on a channel that failed since): handle it.
    New,
    /// Another delivery of it is settled, or still in hand on a live channel: drop it.
    Duplicate,
}

/// The copies one transport has in hand and has settled.
#[derive(Debug)]
pub(crate) struct Copies {
    /// Copies in hand: the delivery that holds each.
    in_hand: HashMap<String, u64>,
    /// Copies settled for good (handled, deferred again, dead-lettered).
    done: HashSet<String>,
    /// `done` in the order it was filled, to forget the oldest first.
    order: VecDeque<String>,
    /// How many settled copies to remember.
    capacity: usize,
}

impl Default for Copies {
    fn default() -> Self {
        Self::with_capacity(REMEMBERED)
    }
}

impl Copies {
    /// Remember at most `capacity` settled copies.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            in_hand: HashMap::new(),
            done: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Copy `copy` arrives. `live(holder)` says whether the delivery holding it already is still
    /// settleable (its channel has not failed). A new copy is not recorded yet: see
    /// [`Copies::in_hand`].
    pub(crate) fn arrives(&self, copy: &str, live: impl Fn(u64) -> bool) -> Arrival {
        if self.done.contains(copy) {
            return Arrival::Duplicate;
        }
        match self.in_hand.get(copy) {
            Some(&holder) if live(holder) => Arrival::Duplicate,
            _ => Arrival::New,
        }
    }

    /// Delivery `id` holds `copy` from now on.
    pub(crate) fn in_hand(&mut self, copy: &str, id: u64) {
        self.in_hand.insert(copy.to_owned(), id);
    }

    /// Delivery `id` of `copy` was settled: for good (`done`), or not (given back, or its
    /// channel failed: the broker has it again).
    pub(crate) fn settled(&mut self, copy: &str, id: u64, done: bool) {
        if self.in_hand.get(copy) == Some(&id) {
            self.in_hand.remove(copy);
        }
        if done && self.done.insert(copy.to_owned()) {
            self.order.push_back(copy.to_owned());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_copy_arriving_again_is_a_duplicate() {
        let mut c = Copies::default();
        assert_eq!(c.arrives("a", |_| true), Arrival::New);
        c.in_hand("a", 1);
        c.settled("a", 1, true);
        assert_eq!(c.arrives("a", |_| true), Arrival::Duplicate);
        assert_eq!(c.arrives("b", |_| true), Arrival::New);
    }

    #[test]
    fn a_copy_in_hand_on_a_live_channel_is_a_duplicate_and_on_a_failed_one_is_not() {
        let mut c = Copies::default();
        c.in_hand("a", 1);
        assert_eq!(c.arrives("a", |id| id == 1), Arrival::Duplicate);
        assert_eq!(c.arrives("a", |_| false), Arrival::New);
    }

    #[test]
    fn a_copy_given_back_or_gone_stale_is_not_a_duplicate() {
        let mut c = Copies::default();
        c.in_hand("a", 1);
        c.settled("a", 1, false);
        assert_eq!(c.arrives("a", |_| true), Arrival::New);
    }

    #[test]
    fn the_stale_holder_settling_late_leaves_its_redelivery_in_hand() {
        let mut c = Copies::default();
        c.in_hand("a", 1);
        // Delivery 1's channel failed; the broker delivers it again as 2.
        assert_eq!(c.arrives("a", |id| id != 1), Arrival::New);
        c.in_hand("a", 2);
        c.settled("a", 1, false);
        assert_eq!(c.arrives("a", |id| id == 2), Arrival::Duplicate);
    }

    #[test]
    fn the_oldest_settled_copies_are_forgotten_first() {
        let mut c = Copies::with_capacity(2);
        for (i, copy) in ["a", "b", "c"].into_iter().enumerate() {
            c.in_hand(copy, i as u64);
            c.settled(copy, i as u64, true);
        }
        assert_eq!(c.arrives("a", |_| true), Arrival::New);
        assert_eq!(c.arrives("b", |_| true), Arrival::Duplicate);
        assert_eq!(c.arrives("c", |_| true), Arrival::Duplicate);
        assert!(c.done.len() <= 2 && c.order.len() <= 2);
    }

    #[test]
    fn copy_ids_differ() {
        assert_ne!(new_copy_id(), new_copy_id());
    }
}
