//! The hold: messages whose key is unknown, kept unacknowledged in memory, per key and in
//! arrival order, within a budget.
//!
//! Three views of the same entries: per key (to release a key's messages in order, at once), by
//! deadline (one timer serves the whole hold), and by message id (a redelivered copy takes its
//! stale original's place).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Limits on holding. `Copy` and `const`, with documented defaults.
///
/// Held messages are unacknowledged deliveries: the broker keeps them until prereq settles them,
/// so a crash loses none. The transport sizes its prefetch from this budget and the handler
/// concurrency, so that a full hold never stalls delivery. The hold time is also clamped below
/// the broker's acknowledgement timeout, as the transport reports it.
///
/// ```
/// use std::time::Duration;
/// use prereq::HoldBudget;
///
/// const BUDGET: HoldBudget = HoldBudget::DEFAULT.max_time(Duration::from_secs(5));
/// assert_eq!(BUDGET.max_messages, 10_000);
/// assert_eq!(BUDGET.max_time, Duration::from_secs(5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct HoldBudget {
    /// At most this many messages held at once (default 10 000). Past it, a message whose key
    /// is unknown is deferred through the broker at once.
    pub max_messages: usize,
    /// At most this many body bytes held at once (default 64 MiB).
    pub max_bytes: usize,
    /// A message is held at most this long (default 30 s), then its key is looked up once more
    /// and, if still unknown, the message is deferred by the policy.
    pub max_time: Duration,
}

impl Default for HoldBudget {
    /// [`HoldBudget::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl HoldBudget {
    /// 10 000 messages, 64 MiB of bodies, 30 seconds.
    pub const DEFAULT: Self = Self {
        max_messages: 10_000,
        max_bytes: 64 << 20,
        max_time: Duration::from_secs(30),
    };

    /// Never hold: every message whose key is unknown is deferred through the broker at once
    /// (the classic "re-publish with a delay" strategy).
    pub const NONE: Self = Self {
        max_messages: 0,
        max_bytes: 0,
        max_time: Duration::ZERO,
    };

    /// Hold at most `n` messages.
    pub const fn max_messages(mut self, n: usize) -> Self {
        self.max_messages = n;
        self
    }

    /// Hold at most `n` body bytes.
    pub const fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Hold each message at most this long.
    pub const fn max_time(mut self, t: Duration) -> Self {
        self.max_time = t;
        self
    }
}

struct Entry<K, V> {
    key: K,
    id: Option<Arc<str>>,
    deadline: Instant,
    size: usize,
    value: V,
}

/// The held messages, each under its *position*: a number the caller gives, increasing in
/// arrival order (a message that comes back from a deferral keeps its first position, so it
/// may be inserted before messages of its key that arrived later).
pub(crate) struct Hold<K, V> {
    /// The limits: checked by [`Hold::fits`].
    budget: HoldBudget,
    /// The entries, by position. Boxed: the table keeps up to twice as many slots as entries,
    /// and an empty slot then costs a pointer, not a whole entry.
    entries: HashMap<u64, Box<Entry<K, V>>>,
    /// The positions held for each key, ascending: a key's messages leave in this order.
    by_key: HashMap<K, VecDeque<u64>>,
    /// Every entry by deadline (then position): the next to expire is the first.
    by_deadline: BTreeSet<(Instant, u64)>,
    /// Entries by message id, to recognise a redelivered copy of a held message.
    by_id: HashMap<Arc<str>, u64>,
    /// Body bytes held.
    bytes: usize,
}

impl<K: Eq + Hash + Clone, V> Hold<K, V> {
    pub(crate) fn new(budget: HoldBudget) -> Self {
        Self {
            budget,
            entries: HashMap::new(),
            by_key: HashMap::new(),
            by_deadline: BTreeSet::new(),
            by_id: HashMap::new(),
            bytes: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
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

    /// Is anything held for `key`?
    pub(crate) fn holds(&self, key: &K) -> bool {
        self.by_key.contains_key(key)
    }

    /// The keys with held messages.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.by_key.keys()
    }

    /// Hold `value` for `key` at position `pos`, until `now + max_time` at the latest. The
    /// caller checked [`Hold::fits`]; positions are unique.
    pub(crate) fn insert(
        &mut self,
        key: K,
        pos: u64,
        id: Option<Arc<str>>,
        value: V,
        size: usize,
        now: Instant,
    ) {
        if let Some(id) = &id {
            self.by_id.insert(id.clone(), pos);
        }
        let queue = self.by_key.entry(key.clone()).or_default();
        // Usually the last; a message back from a deferral goes before later arrivals.
        let at = queue.partition_point(|p| *p < pos);
        queue.insert(at, pos);
        let deadline = now + self.budget.max_time;
        self.by_deadline.insert((deadline, pos));
        self.bytes += size;
        self.entries.insert(
            pos,
            Box::new(Entry {
                key,
                id,
                deadline,
                size,
                value,
            }),
        );
    }

    /// Remove and return what is held for `key` at positions before `limit`, in order.
    pub(crate) fn take_before(&mut self, key: &K, limit: u64) -> Vec<V> {
        let Some(queue) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        let n = queue.partition_point(|p| *p < limit);
        let taken: Vec<u64> = queue.drain(..n).collect();
        if queue.is_empty() {
            self.by_key.remove(key);
        }
        taken
            .into_iter()
            .filter_map(|pos| self.remove_entry(pos))
            .map(|e| e.value)
            .collect()
    }

    /// The value held under message id `id`, now counted as `size` bytes (a redelivered copy
    /// of the same message is about to take its place, keeping its position and deadline).
    pub(crate) fn by_id_mut(&mut self, id: &str, size: usize) -> Option<&mut V> {
        let entry = self
            .by_id
            .get(id)
            .and_then(|pos| self.entries.get_mut(pos))?;
        self.bytes = self.bytes - entry.size + size;
        entry.size = size;
        Some(&mut entry.value)
    }

    /// When the next held message expires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(t, _)| *t)
    }

    /// Remove and return the next message to expire if it has expired by `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(K, V)> {
        let &(deadline, pos) = self.by_deadline.first()?;
        if deadline > now {
            return None;
        }
        let entry = self.remove_entry(pos)?;
        if let Some(q) = self.by_key.get_mut(&entry.key) {
            q.retain(|p| *p != pos);
            if q.is_empty() {
                self.by_key.remove(&entry.key);
            }
        }
        Some((entry.key, entry.value))
    }

    /// Remove and return what `pred` selects, in position order.
    pub(crate) fn take_where(&mut self, pred: impl Fn(&V) -> bool) -> Vec<(K, V)> {
        let mut chosen: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| pred(&e.value))
            .map(|(pos, _)| *pos)
            .collect();
        chosen.sort_unstable();
        let mut out = Vec::with_capacity(chosen.len());
        for pos in chosen {
            if let Some(e) = self.remove_entry(pos) {
                if let Some(q) = self.by_key.get_mut(&e.key) {
                    q.retain(|p| *p != pos);
                    if q.is_empty() {
                        self.by_key.remove(&e.key);
                    }
                }
                out.push((e.key, e.value));
            }
        }
        out
    }

    /// Remove and return everything, in position order.
    pub(crate) fn drain(&mut self) -> Vec<(K, V)> {
        self.by_key.clear();
        self.by_id.clear();
        self.by_deadline.clear();
        self.bytes = 0;
        let mut all: Vec<(u64, Box<Entry<K, V>>)> = self.entries.drain().collect();
        all.sort_unstable_by_key(|(pos, _)| *pos);
        all.into_iter().map(|(_, e)| (e.key, e.value)).collect()
    }

    /// Remove the entry at `pos` from every view but `by_key`.
    fn remove_entry(&mut self, pos: u64) -> Option<Entry<K, V>> {
        let e = *self.entries.remove(&pos)?;
        self.by_deadline.remove(&(e.deadline, pos));
        self.bytes -= e.size;
        if let Some(id) = &e.id
            && self.by_id.get(id) == Some(&pos)
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
        HoldBudget::DEFAULT
            .max_messages(n)
            .max_bytes(bytes)
            .max_time(Duration::from_secs(10))
    }

    #[test]
    fn releases_a_key_in_position_order_and_frees_budget() {
        let now = Instant::now();
        let mut h = Hold::new(budget(3, 100));
        h.insert("a", 5, None, 1, 10, now);
        h.insert("b", 6, None, 2, 10, now);
        h.insert("a", 2, None, 3, 10, now); // back from a deferral: before 5
        assert!(!h.fits(1));
        assert_eq!(h.take_before(&"a", 5), vec![3], "only positions before 5");
        assert_eq!(h.take_before(&"a", u64::MAX), vec![1]);
        assert!(!h.holds(&"a"));
        assert_eq!((h.len(), h.bytes()), (1, 10));
        assert!(h.fits(90));
        assert!(!h.fits(91));
    }

    #[test]
    fn expires_by_deadline_and_only_when_due() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", 1, None, 1, 1, now);
        h.insert("b", 0, None, 2, 1, now + Duration::from_secs(1));
        assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(10)));
        assert_eq!(h.pop_expired(now + Duration::from_secs(9)), None);
        assert_eq!(h.pop_expired(now + Duration::from_secs(10)), Some(("a", 1)));
        assert!(h.take_before(&"a", u64::MAX).is_empty());
        assert_eq!(h.pop_expired(now + Duration::from_secs(10)), None);
        assert_eq!(h.drain(), vec![("b", 2)]);
        assert_eq!((h.len(), h.bytes(), h.next_deadline()), (0, 0, None));
    }

    #[test]
    fn a_redelivered_copy_takes_the_place_of_the_stale_one() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", 0, Some("m1".into()), 1, 10, now);
        h.insert("a", 1, Some("m2".into()), 2, 10, now);
        *h.by_id_mut("m1", 30).unwrap() = 11;
        assert!(h.by_id_mut("zz", 1).is_none());
        assert_eq!((h.len(), h.bytes()), (2, 40));
        assert_eq!(
            h.take_before(&"a", u64::MAX),
            vec![11, 2],
            "same place, same order"
        );
        assert!(h.by_id_mut("m1", 1).is_none(), "gone with its entry");
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn drain_is_in_position_order() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", 3, None, 3, 1, now);
        h.insert("b", 1, None, 1, 1, now);
        h.insert("a", 2, None, 2, 1, now);
        assert_eq!(h.drain(), vec![("b", 1), ("a", 2), ("a", 3)]);
    }

    #[test]
    fn take_where_keeps_the_rest_in_place() {
        let now = Instant::now();
        let mut h = Hold::new(budget(10, 100));
        h.insert("a", 1, None, 10, 1, now);
        h.insert("a", 2, None, 21, 1, now);
        h.insert("b", 3, None, 30, 1, now);
        assert_eq!(h.take_where(|v| *v % 10 == 0), vec![("a", 10), ("b", 30)]);
        assert_eq!((h.len(), h.bytes()), (1, 1));
        assert!(!h.holds(&"b"));
        assert_eq!(h.take_before(&"a", u64::MAX), vec![21]);
    }

    #[test]
    fn none_budget_holds_nothing() {
        let h: Hold<u8, u8> = Hold::new(HoldBudget::NONE);
        assert!(!h.fits(0));
    }
}
