//! The hold: messages whose key is unknown, kept unacknowledged in memory, per key and in
//! arrival order, within a budget.
//!
//! Three views of the same entries: per key (to release a key's messages in order, at once), by
//! deadline (one timer serves the whole hold), and by message id (a redelivered copy takes its
//! stale original's place).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use entries::Entries;

mod entries;

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

/// A moment in a hold's time (nanoseconds since its start, plus one): half an `Instant`'s size,
/// and `Option<Stamp>` no bigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp(NonZeroU64);

impl Stamp {
    /// How long before this moment `earlier` was stamped (zero without one).
    pub(crate) fn since(self, earlier: Option<Stamp>) -> Duration {
        earlier.map_or(Duration::ZERO, |e| {
            Duration::from_nanos(self.0.get().saturating_sub(e.0.get()))
        })
    }
}

/// What the hold reads of a held value: its message id and its size are the value's own, not
/// stored twice.
pub(crate) trait Held {
    /// The message id, if any: a redelivered copy with the same id takes the value's place.
    fn id(&self) -> Option<&Arc<str>>;
    /// Body bytes, counted against the budget.
    fn size(&self) -> usize;
}

struct Entry<K, V> {
    key: K,
    /// When it expires, in [`Hold::epoch`]'s nanoseconds.
    deadline: u64,
    value: V,
}

/// The held messages, each under its *position*: a number the caller gives, increasing in
/// arrival order (a message that comes back from a deferral keeps its first position, so it
/// may be inserted before messages of its key that arrived later). `S` hashes the keys (the
/// engine's come with their hash, `crate::hashed`).
pub(crate) struct Hold<K, V, S = RandomState> {
    /// The limits: checked by [`Hold::fits`].
    budget: HoldBudget,
    /// The entries, by position: the engine's own rising sequence, so slots indexed by it for
    /// the most part (see `SeqMap`; docs/performance.md, round 16), each naming the entry's place
    /// in chunks (`Entries`): the window keeps up to sixteen slots per entry, and an empty slot
    /// then costs a number, not a whole entry.
    entries: Entries<Entry<K, V>>,
    /// The positions held for each key, ascending: a key's messages leave in this order.
    by_key: HashMap<K, VecDeque<u64>, S>,
    /// Every entry by deadline (then position), ascending; the first is the next to expire.
    /// Deadlines are nanoseconds since `epoch` (half the size of an `Instant`). Every hold lasts
    /// the same `max_time`, so a new deadline goes last: a queue, not a tree. An entry removed
    /// before it expires stays here until it reaches the front or the queue is compacted (see
    /// [`Hold::forget_deadline`]); the first is always a live entry's.
    by_deadline: VecDeque<(u64, u64)>,
    /// Where deadlines are counted from.
    epoch: Instant,
    /// Entries by message id, to recognise a redelivered copy of a held message.
    by_id: HashMap<Arc<str>, u64>,
    /// Body bytes held.
    bytes: usize,
}

#[cfg(test)]
impl<K: Eq + Hash + Clone, V: Held> Hold<K, V> {
    fn new(budget: HoldBudget) -> Self {
        Self::with_budget(budget)
    }
}

impl<K: Eq + Hash + Clone, V: Held, S: BuildHasher + Default> Hold<K, V, S> {
    /// An empty hold with these limits.
    pub(crate) fn with_budget(budget: HoldBudget) -> Self {
        Self {
            budget,
            entries: Entries::default(),
            by_key: HashMap::default(),
            by_deadline: VecDeque::new(),
            epoch: Instant::now(),
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
            && self.entries.has_room()
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
    #[cfg(test)]
    pub(crate) fn insert(&mut self, key: K, pos: u64, value: V, now: Instant) {
        let now = self.stamp(now);
        self.insert_at(key, pos, value, now);
    }

    /// As `insert`, `now` a stamp of the present (the engine stamps a message as it holds it:
    /// one reading of the epoch's distance for both).
    pub(crate) fn insert_at(&mut self, key: K, pos: u64, value: V, now: Stamp) {
        if let Some(id) = value.id() {
            self.by_id.insert(Arc::clone(id), pos);
        }
        let queue = self.by_key.entry(key.clone()).or_default();
        // Usually the last (looked at first: a search of a long queue reads memory far apart);
        // a message back from a deferral goes before later arrivals.
        if queue.back().is_none_or(|last| *last < pos) {
            queue.push_back(pos);
        } else {
            let at = queue.partition_point(|p| *p < pos);
            queue.insert(at, pos);
        }
        let max_time = u64::try_from(self.budget.max_time.as_nanos()).unwrap_or(u64::MAX);
        let deadline = (now.0.get() - 1).saturating_add(max_time);
        let due = (deadline, pos);
        if self.by_deadline.back().is_none_or(|last| *last < due) {
            self.by_deadline.push_back(due);
        } else {
            // The same instant as a later position (one back from a deferral).
            let at = self.by_deadline.partition_point(|d| *d < due);
            self.by_deadline.insert(at, due);
        }
        self.bytes += value.size();
        self.entries.insert(
            pos,
            Entry {
                key,
                deadline,
                value,
            },
        );
    }

    /// Remove and return what is held for `key` at positions before `limit`, in order, each
    /// with its position.
    pub(crate) fn take_before(&mut self, key: &K, limit: u64) -> Vec<(u64, V)> {
        let Some(queue) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        // Usually all of them (as in `insert`, the last is looked at first).
        let n = if queue.back().is_none_or(|last| *last < limit) {
            queue.len()
        } else {
            queue.partition_point(|p| *p < limit)
        };
        let taken: Vec<u64> = queue.drain(..n).collect();
        if queue.is_empty() {
            self.by_key.remove(key);
        }
        // Sized once: a collect through `filter_map` would grow the vector step by step.
        let mut values = Vec::with_capacity(taken.len());
        for pos in taken {
            if let Some(e) = self.remove_entry(pos) {
                values.push((pos, e.value));
            }
        }
        values
    }

    /// Put `value` in the place of the value held under its message id, keeping that one's
    /// position and deadline (a redelivered copy of the same message); the one it replaced. Gives
    /// `value` back if nothing is held under its id.
    pub(crate) fn replace(&mut self, value: V) -> Result<V, V> {
        let Some(entry) = value
            .id()
            .and_then(|id| self.by_id.get(id))
            .and_then(|pos| self.entries.get_mut(*pos))
        else {
            return Err(value);
        };
        self.bytes = self.bytes - entry.value.size() + value.size();
        Ok(std::mem::replace(&mut entry.value, value))
    }

    /// The value held under message id `id`.
    pub(crate) fn by_id(&self, id: &str) -> Option<&V> {
        let pos = self.by_id.get(id)?;
        self.entries.get(*pos).map(|e| &e.value)
    }

    /// When the next held message expires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline
            .front()
            .map(|(t, _)| self.epoch + Duration::from_nanos(*t))
    }

    /// A stamp of `now`, for [`Hold::waited`].
    pub(crate) fn stamp(&self, now: Instant) -> Stamp {
        Stamp(NonZeroU64::MIN.saturating_add(self.since_epoch(now)))
    }

    /// How long ago, at `now`, `stamp` was taken (zero without one).
    pub(crate) fn waited(&self, stamp: Option<Stamp>, now: Instant) -> Duration {
        self.stamp(now).since(stamp)
    }

    /// `t` in nanoseconds since the epoch (0 before it; 584 years fit).
    fn since_epoch(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Remove and return the next message to expire if it has expired by `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(K, V)> {
        let &(deadline, pos) = self.by_deadline.front()?;
        if deadline > self.since_epoch(now) {
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
            .map(|(pos, _)| pos)
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
        let all = self.entries.drain_sorted();
        all.into_iter().map(|(_, e)| (e.key, e.value)).collect()
    }

    /// Remove the entry at `pos` from every view but `by_key`.
    fn remove_entry(&mut self, pos: u64) -> Option<Entry<K, V>> {
        let e = self.entries.remove(pos)?;
        self.forget_deadline();
        self.bytes -= e.value.size();
        if let Some(id) = e.value.id()
            && self.by_id.get(id) == Some(&pos)
        {
            self.by_id.remove(id);
        }
        Some(e)
    }

    /// An entry was removed: drop the deadlines at the front whose entries are gone, and
    /// compact the queue once most of it is such (amortised: each compaction follows at least
    /// as many removals as it keeps).
    fn forget_deadline(&mut self) {
        let live = |entries: &Entries<Entry<K, V>>, (deadline, pos): (u64, u64)| {
            entries.get(pos).is_some_and(|e| e.deadline == deadline)
        };
        while let Some(&first) = self.by_deadline.front()
            && !live(&self.entries, first)
        {
            self.by_deadline.pop_front();
        }
        if self.by_deadline.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.by_deadline.retain(|d| live(entries, *d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held value for the tests: a number, an optional id, a size.
    #[derive(Debug, PartialEq)]
    struct V(i32, Option<Arc<str>>, usize);

    impl Held for V {
        fn id(&self) -> Option<&Arc<str>> {
            self.1.as_ref()
        }

        fn size(&self) -> usize {
            self.2
        }
    }

    /// Value `n` of `size` bytes, without an id.
    fn v(n: i32, size: usize) -> V {
        V(n, None, size)
    }

    /// The values taken, without their positions.
    fn nums(vs: Vec<(u64, V)>) -> Vec<i32> {
        vs.into_iter().map(|(_, v)| v.0).collect()
    }

    fn keyed(vs: Vec<(&'static str, V)>) -> Vec<(&'static str, i32)> {
        vs.into_iter().map(|(k, v)| (k, v.0)).collect()
    }

    fn budget(n: usize, bytes: usize) -> HoldBudget {
        HoldBudget::DEFAULT
            .max_messages(n)
            .max_bytes(bytes)
            .max_time(Duration::from_secs(10))
    }

    #[test]
    fn releases_a_key_in_position_order_and_frees_budget() {
        let mut h = Hold::new(budget(3, 100));
        let now = Instant::now();
        h.insert("a", 5, v(1, 10), now);
        h.insert("b", 6, v(2, 10), now);
        h.insert("a", 2, v(3, 10), now); // back from a deferral: before 5
        assert!(!h.fits(1));
        assert_eq!(
            nums(h.take_before(&"a", 5)),
            vec![3],
            "only positions before 5"
        );
        let rest = h.take_before(&"a", u64::MAX);
        assert_eq!(
            rest.iter().map(|(pos, v)| (*pos, v.0)).collect::<Vec<_>>(),
            vec![(5, 1)],
            "each with its position"
        );
        assert!(!h.holds(&"a"));
        assert_eq!((h.len(), h.bytes()), (1, 10));
        assert!(h.fits(90));
        assert!(!h.fits(91));
    }

    #[test]
    fn expires_by_deadline_and_only_when_due() {
        let mut h = Hold::new(budget(10, 100));
        let now = Instant::now();
        h.insert("a", 1, v(1, 1), now);
        h.insert("b", 0, v(2, 1), now + Duration::from_secs(1));
        assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(10)));
        assert_eq!(h.pop_expired(now + Duration::from_secs(9)), None);
        assert_eq!(
            h.pop_expired(now + Duration::from_secs(10)),
            Some(("a", v(1, 1)))
        );
        assert!(h.take_before(&"a", u64::MAX).is_empty());
        assert_eq!(h.pop_expired(now + Duration::from_secs(10)), None);
        assert_eq!(keyed(h.drain()), vec![("b", 2)]);
        assert_eq!((h.len(), h.bytes(), h.next_deadline()), (0, 0, None));
    }

    #[test]
    fn a_redelivered_copy_takes_the_place_of_the_stale_one() {
        let mut h = Hold::new(budget(10, 100));
        let now = Instant::now();
        h.insert("a", 0, V(1, Some("m1".into()), 10), now);
        h.insert("a", 1, V(2, Some("m2".into()), 10), now);
        assert_eq!(h.by_id("m1").map(|v| v.0), Some(1));
        let stale = h.replace(V(11, Some("m1".into()), 30));
        assert_eq!(stale.map(|v| v.0), Ok(1));
        let unknown = h.replace(V(12, Some("zz".into()), 1));
        assert_eq!(unknown.map_err(|v| v.0), Err(12));
        assert_eq!(
            h.replace(v(13, 1)).map_err(|v| v.0),
            Err(13),
            "no id, no place"
        );
        assert_eq!((h.len(), h.bytes()), (2, 40));
        assert_eq!(
            nums(h.take_before(&"a", u64::MAX)),
            vec![11, 2],
            "same place, same order"
        );
        assert!(h.by_id("m1").is_none(), "gone with its entry");
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn drain_is_in_position_order() {
        let mut h = Hold::new(budget(10, 100));
        let now = Instant::now();
        h.insert("a", 3, v(3, 1), now);
        h.insert("b", 1, v(1, 1), now);
        h.insert("a", 2, v(2, 1), now);
        assert_eq!(keyed(h.drain()), vec![("b", 1), ("a", 2), ("a", 3)]);
    }

    #[test]
    fn take_where_keeps_the_rest_in_place() {
        let mut h = Hold::new(budget(10, 100));
        let now = Instant::now();
        h.insert("a", 1, v(10, 1), now);
        h.insert("a", 2, v(21, 1), now);
        h.insert("b", 3, v(30, 1), now);
        let taken = h.take_where(|v| v.0 % 10 == 0);
        assert_eq!(keyed(taken), vec![("a", 10), ("b", 30)]);
        assert_eq!((h.len(), h.bytes()), (1, 1));
        assert!(!h.holds(&"b"));
        assert_eq!(nums(h.take_before(&"a", u64::MAX)), vec![21]);
    }

    #[test]
    fn none_budget_holds_nothing() {
        let h: Hold<u8, V> = Hold::new(HoldBudget::NONE);
        assert!(!h.fits(0));
    }

    #[test]
    fn released_deadlines_do_not_pile_up() {
        let mut h = Hold::new(budget(10_000, usize::MAX));
        let now = Instant::now();
        for pos in 0..2_000 {
            let key = if pos % 10 == 0 { "a" } else { "b" };
            h.insert(key, pos, v(0, 1), now + Duration::from_millis(pos));
        }
        // "b" leaves from behind the first deadline, which is "a"'s.
        assert_eq!(h.take_before(&"b", u64::MAX).len(), 1_800);
        assert_eq!(h.len(), 200);
        assert!(
            h.by_deadline.len() <= 2 * h.len() + 64,
            "{} deadlines kept for {} entries",
            h.by_deadline.len(),
            h.len()
        );
        assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(10)));
    }

    /// What the engine does to a hold, for the property below.
    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes (ms), then a message of key `key` arrives (or comes back from a
        /// deferral with an earlier position, when `back`).
        Insert { after_ms: u64, key: u8, back: bool },
        /// A key becomes known: what is held for it leaves, all of it or (as behind a deferred
        /// message of the key) what is before position `before`.
        Release { key: u8, before: Option<u64> },
        /// Time passes (ms), then everything due expires.
        Expire { after_ms: u64 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u64..3, 0u8..6, proptest::bool::weighted(0.1))
                .prop_map(|(after_ms, key, back)| Op::Insert { after_ms, key, back }),
            2 => (0u8..6, proptest::option::of(990u64..1_200))
                .prop_map(|(key, before)| Op::Release { key, before }),
            1 => (0u64..40).prop_map(|after_ms| Op::Expire { after_ms }),
        ]
    }

    proptest::proptest! {
        /// Whatever is inserted, released (wholly or before a position) and expired, the hold
        /// releases a key's messages in position order and expires exactly what is due, in
        /// deadline then position order, never a released message, and its next deadline is
        /// the earliest of what it holds; its deadline queue stays within a bound of its size.
        #[test]
        fn expiry_matches_a_reference(ops in proptest::collection::vec(op(), 1..300)) {
            const MAX_MS: u64 = 20;
            let mut h: Hold<u8, V> = Hold::new(
                HoldBudget::DEFAULT
                    .max_messages(usize::MAX)
                    .max_bytes(usize::MAX)
                    .max_time(Duration::from_millis(MAX_MS)),
            );
            // Not before the hold's start: moments before it count as its start.
            let start = Instant::now();
            // The reference: (deadline ms, position) -> (key, value), and positions in use.
            let mut model: std::collections::BTreeMap<(u64, u64), (u8, i32)> = Default::default();
            let (mut now_ms, mut next_pos, mut n) = (0u64, 1_000u64, 0i32);
            let mut backs = 999u64;
            for op in ops {
                match op {
                    Op::Insert { after_ms, key, back } => {
                        now_ms += after_ms;
                        let pos = if back { backs -= 1; backs } else { next_pos += 1; next_pos };
                        n += 1;
                        h.insert(key, pos, v(n, 1), start + Duration::from_millis(now_ms));
                        model.insert((now_ms + MAX_MS, pos), (key, n));
                    }
                    Op::Release { key, before } => {
                        let limit = before.unwrap_or(u64::MAX);
                        let leaves = |(_, pos): &(u64, u64), (k, _): &(u8, i32)| {
                            *k == key && *pos < limit
                        };
                        let mut want: Vec<(u64, i32)> = model
                            .iter()
                            .filter(|(d, kv)| leaves(d, kv))
                            .map(|((_, pos), (_, n))| (*pos, *n))
                            .collect();
                        want.sort_unstable();
                        model.retain(|d, kv| !leaves(d, kv));
                        let want: Vec<i32> = want.into_iter().map(|(_, n)| n).collect();
                        proptest::prop_assert_eq!(nums(h.take_before(&key, limit)), want);
                    }
                    Op::Expire { after_ms } => {
                        now_ms += after_ms;
                        let at = start + Duration::from_millis(now_ms);
                        let mut got = Vec::new();
                        while let Some((k, v)) = h.pop_expired(at) {
                            got.push((k, v.0));
                        }
                        let due: Vec<(u64, u64)> =
                            model.range(..(now_ms + 1, 0)).map(|(d, _)| *d).collect();
                        let want: Vec<(u8, i32)> =
                            due.iter().filter_map(|d| model.remove(d)).collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                let next = model.keys().next().map(|(d, _)| start + Duration::from_millis(*d));
                proptest::prop_assert_eq!(h.next_deadline(), next);
                proptest::prop_assert_eq!(h.len(), model.len());
                proptest::prop_assert!(h.by_deadline.len() <= 2 * h.len() + 64);
            }
        }
    }
}
