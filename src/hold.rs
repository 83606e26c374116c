//! The hold: messages whose key is unknown, kept unacknowledged in memory, per key and in
//! arrival order, within a budget.
//!
//! Two views of the same entries: per key (to release a key's messages in order, at once) and
//! globally by arrival (every message is held for the same time, so the oldest is always the
//! next to expire, and one timer serves them all).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Limits on holding. `Copy`, with documented defaults.
///
/// Held messages are unacknowledged deliveries: the broker keeps them until prereq settles them,
/// so a crash loses none, but they count against the channel's prefetch. Size the transport's
/// prefetch above `max_messages` plus the handler concurrency, or a full hold stalls delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldBudget {
    /// At most this many messages held at once (default 10 000). Past it, a message whose key
    /// is unknown is deferred through the broker at once.
    pub max_messages: usize,
    /// At most this many body bytes held at once (default 64 MiB).
    pub max_bytes: usize,
    /// A message is held at most this long (default 30 s), then deferred by the policy.
    pub max_time: Duration,
}

impl Default for HoldBudget {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 64 << 20,
            max_time: Duration::from_secs(30),
        }
    }
}

impl HoldBudget {
    /// Never hold: every message whose key is unknown is deferred through the broker at once
    /// (the classic "re-publish with a delay" strategy).
    pub const NONE: Self = Self {
        max_messages: 0,
        max_bytes: 0,
        max_time: Duration::ZERO,
    };

    /// Set the maximum number of held messages.
    pub fn with_max_messages(mut self, n: usize) -> Self {
        self.max_messages = n;
        self
    }

    /// Set the maximum number of held body bytes.
    pub fn with_max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Set the maximum hold time.
    pub fn with_max_time(mut self, t: Duration) -> Self {
        self.max_time = t;
        self
    }
}

struct Entry<K, V> {
    key: K,
    id: Option<String>,
    deadline: Instant,
    size: usize,
    value: V,
}

/// The held messages.
pub(crate) struct Hold<K, V> {
    budget: HoldBudget,
    by_key: HashMap<K, VecDeque<u64>>,
    by_arrival: BTreeMap<u64, Entry<K, V>>,
    /// Entries by message id, to recognise a redelivered copy of a held message.
    by_id: HashMap<String, u64>,
    bytes: usize,
    next_seq: u64,
}

impl<K: Eq + Hash + Clone, V> Hold<K, V> {
    pub(crate) fn new(budget: HoldBudget) -> Self {
        Self {
            budget,
            by_key: HashMap::new(),
            by_arrival: BTreeMap::new(),
            by_id: HashMap::new(),
            bytes: 0,
            next_seq: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_arrival.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Would a message of `size` bytes fit?
    pub(crate) fn fits(&self, size: usize) -> bool {
        self.len() < self.budget.max_messages
            && !self.budget.max_time.is_zero()
            && self.bytes.saturating_add(size) <= self.budget.max_bytes
    }

    /// Hold `value` for `key`, until `now + max_time` at the latest. The caller checked
    /// [`Hold::fits`].
    pub(crate) fn insert(
        &mut self,
        key: K,
        id: Option<String>,
        value: V,
        size: usize,
        now: Instant,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(id) = &id {
            self.by_id.insert(id.clone(), seq);
        }
        self.by_key.entry(key.clone()).or_default().push_back(seq);
        self.bytes += size;
        self.by_arrival.insert(
            seq,
            Entry {
                key,
                id,
                deadline: now + self.budget.max_time,
                size,
                value,
            },
        );
    }

    /// Remove and return everything held for `key`, in arrival order.
    pub(crate) fn take(&mut self, key: &K) -> Vec<V> {
        let Some(seqs) = self.by_key.remove(key) else {
            return Vec::new();
        };
        seqs.into_iter()
            .filter_map(|seq| self.remove_entry(seq))
            .map(|e| e.value)
            .collect()
    }

    /// The value held under message id `id`, now counted as `size` bytes (a redelivered copy
    /// of the same message is about to take its place, keeping its position and deadline).
    pub(crate) fn by_id_mut(&mut self, id: &str, size: usize) -> Option<&mut V> {
        let entry = self
            .by_id
            .get(id)
            .and_then(|seq| self.by_arrival.get_mut(seq))?;
        self.bytes = self.bytes - entry.size + size;
        entry.size = size;
        Some(&mut entry.value)
    }

    /// When the oldest held message expires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_arrival.values().next().map(|e| e.deadline)
    }

    /// Remove and return the oldest held message if it has expired by `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(K, V)> {
        let (&seq, first) = self.by_arrival.iter().next()?;
        if first.deadline > now {
            return None;
        }
        let entry = self.remove_entry(seq)?;
        if let Some(q) = self.by_key.get_mut(&entry.key) {
            // Arrival order is global, so the oldest overall is the oldest of its key.
            q.retain(|s| *s != seq);
            if q.is_empty() {
                self.by_key.remove(&entry.key);
            }
        }
        Some((entry.key, entry.value))
    }

    /// Remove and return everything, in arrival order.
    pub(crate) fn drain(&mut self) -> Vec<(K, V)> {
        self.by_key.clear();
        self.by_id.clear();
        self.bytes = 0;
        std::mem::take(&mut self.by_arrival)
            .into_values()
            .map(|e| (e.key, e.value))
            .collect()
    }

    fn remove_entry(&mut self, seq: u64) -> Option<Entry<K, V>> {
        let e = self.by_arrival.remove(&seq)?;
        self.bytes -= e.size;
        if let Some(id) = &e.id
            && self.by_id.get(id) == Some(&seq)
        {
            self.by_id.remove(id);
        }
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(n: usize, bytes: usize) -> HoldBudget {
        HoldBudget::default()
            .with_max_messages(n)
            .with_max_bytes(bytes)
            .with_max_time(Duration::from_secs(10))
    }

    #[test]
    fn releases_a_key_in_arrival_order_and_frees_budget() {
        let now = Instant::now();
        let mut h = Hold::new(budget(3, 100));
        h.insert("a", None, 1, 10, now);
        h.insert("b", None, 2, 10, now);
        h.insert("a", None, 3, 10, now);
        assert!(!h.fits(1));
        assert_eq!(h.take(&"a"), vec![1, 3]);
        assert!(h.take(&"a").is_empty());
        assert_eq!((h.len(), h.bytes()), (1, 10));
        assert!(h.fits(90));
        assert!(!h.fits(91));
    }

    #[test]
    fn expires_oldest_first_and_only_when_due() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", None, 1, 1, now);
        h.insert("b", None, 2, 1, now + Duration::from_secs(1));
        assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(10)));
        assert_eq!(h.pop_expired(now + Duration::from_secs(9)), None);
        assert_eq!(h.pop_expired(now + Duration::from_secs(10)), Some(("a", 1)));
        assert!(h.take(&"a").is_empty());
        assert_eq!(h.pop_expired(now + Duration::from_secs(10)), None);
        assert_eq!(h.drain(), vec![("b", 2)]);
        assert_eq!((h.len(), h.bytes()), (0, 0));
    }

    #[test]
    fn a_redelivered_copy_takes_the_place_of_the_stale_one() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", Some("m1".to_owned()), 1, 10, now);
        h.insert("a", Some("m2".to_owned()), 2, 10, now);
        *h.by_id_mut("m1", 30).unwrap() = 11;
        assert!(h.by_id_mut("zz", 1).is_none());
        assert_eq!((h.len(), h.bytes()), (2, 40));
        assert_eq!(h.take(&"a"), vec![11, 2], "same place, same order");
        assert!(h.by_id_mut("m1", 1).is_none(), "gone with its entry");
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn none_budget_holds_nothing() {
        let h: Hold<u8, u8> = Hold::new(HoldBudget::NONE);
        assert!(!h.fits(0));
    }
}
