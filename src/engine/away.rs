//! [`Away`]: deferred messages out in the broker, per key, so that later messages of the key
//! wait behind them and the key's order survives a deferral.
//!
//! A *slot* remembers a deferred message's position among its key's messages, its seed (to
//! recognise it when it comes back), when it is due back and when to stop waiting for it. A
//! message that
//! comes back claims its slot and takes its old position. A slot that is not claimed in time
//! (the copy went to another instance, or this one was not running) expires, and stops
//! blocking its key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;

use tokio::time::Instant;

struct Slot {
    pos: u64,
    seed: u64,
    /// When its delay ends.
    due: Instant,
    /// When to stop waiting for it.
    expires: Instant,
}

/// The deferred messages of each key.
pub(crate) struct Away<K> {
    /// Slots per key, by position ascending.
    by_key: HashMap<K, VecDeque<Slot>>,
    /// Every slot by expiry (then position), with its key.
    expiries: BTreeMap<(Instant, u64), K>,
}

impl<K: Eq + Hash + Clone> Away<K> {
    pub(crate) fn new() -> Self {
        Self {
            by_key: HashMap::new(),
            expiries: BTreeMap::new(),
        }
    }

    /// Record that the message at `pos` of `key` was deferred, is due back at `due`, and stops
    /// blocking its key at `expires` if it has not come back by then.
    pub(crate) fn insert(&mut self, key: K, pos: u64, seed: u64, due: Instant, expires: Instant) {
        let slots = self.by_key.entry(key.clone()).or_default();
        let at = slots.partition_point(|s| s.pos < pos);
        slots.insert(
            at,
            Slot {
                pos,
                seed,
                due,
                expires,
            },
        );
        self.expiries.insert((expires, pos), key);
    }

    /// The position of the first deferred message of `key`, if any: messages of the key after
    /// it must wait.
    pub(crate) fn first(&self, key: &K) -> Option<u64> {
        self.by_key.get(key)?.front().map(|s| s.pos)
    }

    /// When the first deferred message of `key` is due back.
    pub(crate) fn first_due(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key)?.front().map(|s| s.due)
    }

    /// A message of `key` with `seed` arrived: if it is a deferred one coming back, remove its
    /// slot and return its position.
    pub(crate) fn claim(&mut self, key: &K, seed: u64) -> Option<u64> {
        let slots = self.by_key.get_mut(key)?;
        let i = slots.iter().position(|s| s.seed == seed)?;
        let slot = slots.remove(i)?;
        if slots.is_empty() {
            self.by_key.remove(key);
        }
        self.expiries.remove(&(slot.expires, slot.pos));
        Some(slot.pos)
    }

    /// Forget the slot of the message at `pos` of `key` (its deferral did not happen); true if
    /// there was one.
    pub(crate) fn remove(&mut self, key: &K, pos: u64) -> bool {
        let Some(slots) = self.by_key.get_mut(key) else {
            return false;
        };
        let Some(i) = slots.iter().position(|s| s.pos == pos) else {
            return false;
        };
        let slot = slots.remove(i);
        if slots.is_empty() {
            self.by_key.remove(key);
        }
        if let Some(slot) = slot {
            self.expiries.remove(&(slot.expires, slot.pos));
        }
        true
    }

    /// When the next slot expires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.expiries.keys().next().map(|(t, _)| *t)
    }

    /// Remove the next slot if it expired by `now`, and return its key.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<K> {
        let entry = self.expiries.first_entry()?;
        let (expires, pos) = *entry.key();
        if expires > now {
            return None;
        }
        let key = entry.remove();
        if let Some(slots) = self.by_key.get_mut(&key) {
            slots.retain(|s| s.pos != pos);
            if slots.is_empty() {
                self.by_key.remove(&key);
            }
        }
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slots_block_until_claimed_or_expired() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Away::new();
        a.insert("k", 7, 70, now, now + s);
        a.insert("k", 3, 30, now + s, now + 2 * s);
        assert_eq!(a.first(&"k"), Some(3));
        assert_eq!(a.first_due(&"k"), Some(now + s));
        assert_eq!(a.claim(&"k", 99), None, "not a deferred message");
        assert_eq!(a.claim(&"k", 30), Some(3));
        assert_eq!(a.first(&"k"), Some(7));
        assert_eq!(a.next_deadline(), Some(now + s));
        assert_eq!(a.pop_expired(now), None);
        assert_eq!(a.pop_expired(now + s), Some("k"));
        assert_eq!((a.first(&"k"), a.next_deadline()), (None, None));
    }

    #[test]
    fn a_removed_slot_stops_blocking_at_once() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Away::new();
        a.insert("k", 3, 30, now, now + s);
        a.insert("k", 7, 70, now, now + 2 * s);
        assert!(a.remove(&"k", 3));
        assert!(!a.remove(&"k", 3), "gone already");
        assert_eq!(a.first(&"k"), Some(7));
        assert_eq!(a.next_deadline(), Some(now + 2 * s));
        assert!(a.remove(&"k", 7));
        assert_eq!((a.first(&"k"), a.next_deadline()), (None, None));
    }
}
