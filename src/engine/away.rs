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
    /// The latest it may be back in its queue: its delay ends, and a transport may have
    /// rounded the delay up by as much as [`ROUNDING`] of it.
    latest: Instant,
    /// When to stop waiting for it.
    expires: Instant,
}

/// A transport may round a delay by up to this share of it, either way (the AMQP delay
/// queues' grid: 1/9).
pub(crate) const ROUNDING: u32 = 9;

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

    /// Record that the message at `pos` of `key` was deferred at `now`, is due back at `due`,
    /// and stops blocking its key at `expires` if it has not come back by then.
    pub(crate) fn insert(
        &mut self,
        key: K,
        pos: u64,
        seed: u64,
        [now, due, expires]: [Instant; 3],
    ) {
        let slots = self.by_key.entry(key.clone()).or_default();
        let at = slots.partition_point(|s| s.pos < pos);
        slots.insert(
            at,
            Slot {
                pos,
                seed,
                due,
                latest: due + due.saturating_duration_since(now) / ROUNDING,
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

    /// The latest any deferred message of `key` may be back in its queue.
    pub(crate) fn latest_back(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key)?.iter().map(|s| s.latest).max()
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

    /// The keys with a slot.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.by_key.keys()
    }

    /// The deferral of the message at `pos` of `key` failed at `now`: the broker gives the
    /// original back at once (or stored the copy after all), and whichever comes first takes
    /// the slot. It is due now, and stops blocking its key at `expires` at the latest (if
    /// neither comes back here). True if there was such a slot.
    pub(crate) fn failed(&mut self, key: &K, pos: u64, now: Instant, expires: Instant) -> bool {
        let Some(slot) = self
            .by_key
            .get_mut(key)
            .and_then(|slots| slots.iter_mut().find(|s| s.pos == pos))
        else {
            return false;
        };
        slot.due = now;
        if expires < slot.expires {
            if let Some(key) = self.expiries.remove(&(slot.expires, pos)) {
                self.expiries.insert((expires, pos), key);
            }
            slot.expires = expires;
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
        a.insert("k", 7, 70, [now, now, now + s]);
        a.insert("k", 3, 30, [now, now + s, now + 2 * s]);
        assert_eq!(
            a.latest_back(&"k"),
            Some(now + s + s / 9),
            "the later due, rounded up by as much as a transport may"
        );
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
    fn a_failed_slot_is_due_at_once_and_blocks_until_claimed_or_its_new_expiry() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Away::new();
        a.insert("k", 3, 30, [now, now + 5 * s, now + 60 * s]);
        a.insert("k", 7, 70, [now, now + 5 * s, now + 2 * s]);
        assert!(!a.failed(&"k", 4, now, now + s), "no slot there");
        assert!(a.failed(&"k", 3, now + s, now + 10 * s));
        assert_eq!(a.first(&"k"), Some(3), "it still blocks its key");
        assert_eq!(a.first_due(&"k"), Some(now + s), "due when it failed");
        assert!(
            a.failed(&"k", 7, now, now + 10 * s),
            "a later expiry is not taken"
        );
        assert_eq!(a.next_deadline(), Some(now + 2 * s));
        assert_eq!(a.pop_expired(now + 2 * s), Some("k"));
        assert_eq!(
            a.next_deadline(),
            Some(now + 10 * s),
            "the failed one's new expiry"
        );
        assert_eq!(
            a.claim(&"k", 30),
            Some(3),
            "the original given back takes its place"
        );
        assert_eq!((a.first(&"k"), a.next_deadline()), (None, None));
        a.insert("k", 9, 90, [now, now, now + 60 * s]);
        assert!(a.failed(&"k", 9, now, now + 10 * s));
        assert_eq!(
            a.pop_expired(now + 10 * s),
            Some("k"),
            "not claimed in time"
        );
        assert_eq!(a.first(&"k"), None);
    }
}
