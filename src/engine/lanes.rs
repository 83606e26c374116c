//! [`Lanes`]: the messages of known keys waiting for a handler, one queue per key, and the keys
//! whose next message may start.
//!
//! One key never runs two handlers at once: a lane is *running* while its key's handler runs,
//! and *runnable* (listed once in `runnable`) while it has messages and nothing runs.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};

struct Lane<V> {
    /// Waiting messages by position, ascending.
    queue: VecDeque<(u64, V)>,
    /// While `queue` is not empty: not below the position of its last message (equal, unless
    /// messages were taken out of it since). A new message usually goes after it, and this says
    /// so without reading the last message, written long before: that read missed the cache
    /// (docs/performance.md, round 18). Where it is above, a new message finds its place by
    /// search, as one that arrives out of order does.
    last: u64,
    /// A handler of this key runs.
    running: bool,
    /// The key is listed in `Lanes::runnable`.
    runnable: bool,
}

/// Per-key queues of messages whose key is known; `S` hashes the keys (the engine's keys come
/// with their hash, `crate::hashed`).
pub(crate) struct Lanes<K, V, S = RandomState> {
    /// The queue of every key with waiting or running messages.
    lanes: HashMap<K, Lane<V>, S>,
    /// Keys whose next message may start, in the order they became startable.
    runnable: VecDeque<K>,
    /// Messages waiting in all queues (not running).
    queued: usize,
    /// Emptied queues of freed lanes, kept (at most [`SPARE_MAX`]) for the next new lane: a
    /// key that comes and goes costs no allocation.
    spare: Vec<VecDeque<(u64, V)>>,
}

/// Emptied lane queues kept for reuse.
const SPARE_MAX: usize = 64;

#[cfg(test)]
impl<K: Eq + Hash + Clone, V> Lanes<K, V> {
    fn new() -> Self {
        Self::default()
    }
}

impl<K, V, S: Default> Default for Lanes<K, V, S> {
    fn default() -> Self {
        Self {
            lanes: HashMap::default(),
            runnable: VecDeque::new(),
            queued: 0,
            spare: Vec::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher> Lanes<K, V, S> {
    /// Free `key`'s lane, keeping its (empty) queue for a new one.
    fn free(&mut self, key: &K) {
        if let Some(lane) = self.lanes.remove(key)
            && self.spare.len() < SPARE_MAX
            && lane.queue.is_empty()
        {
            self.spare.push(lane.queue);
        }
    }

    /// Messages waiting for a handler.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Queue `value` for `key` at position `pos` (its place among the key's messages).
    pub(crate) fn push(&mut self, key: K, pos: u64, value: V) {
        let spare = &mut self.spare;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            queue: spare.pop().unwrap_or_default(),
            last: 0,
            running: false,
            runnable: false,
        });
        if lane.queue.is_empty() || lane.last < pos {
            // Usually the last.
            lane.queue.push_back((pos, value));
            lane.last = pos;
        } else {
            let at = lane.queue.partition_point(|(p, _)| *p < pos);
            lane.queue.insert(at, (pos, value));
        }
        self.queued += 1;
        if !lane.running && !lane.runnable {
            lane.runnable = true;
            self.runnable.push_back(key);
        }
    }

    /// Queue `values` for `key`, each at its position (ascending, as the hold gives them): one
    /// lookup and at most one allocation for all of them.
    pub(crate) fn extend(&mut self, key: &K, values: Vec<(u64, V)>) {
        let Some(&(first, _)) = values.first() else {
            return;
        };
        let spare = &mut self.spare;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            queue: spare.pop().unwrap_or_default(),
            last: 0,
            running: false,
            runnable: false,
        });
        self.queued += values.len();
        if lane.queue.is_empty() || lane.last < first {
            lane.queue.extend(values);
        } else {
            // Later messages of the key are queued already: each goes to its place.
            lane.queue.reserve(values.len());
            for (pos, value) in values {
                let at = lane.queue.partition_point(|(p, _)| *p < pos);
                lane.queue.insert(at, (pos, value));
            }
        }
        if let Some((pos, _)) = lane.queue.back() {
            lane.last = *pos;
        }
        if !lane.running && !lane.runnable {
            lane.runnable = true;
            self.runnable.push_back(key.clone());
        }
    }

    /// Could a message of `key` start now, ahead of the lanes? Nothing waits to start (every
    /// runnable lane started), and no message of the key waits or runs.
    pub(crate) fn is_clear(&self, key: &K) -> bool {
        self.runnable.is_empty() && !self.lanes.contains_key(key)
    }

    /// No message of `key` waits to run or runs.
    pub(crate) fn is_idle(&self, key: &K) -> bool {
        !self.lanes.contains_key(key)
    }

    /// A message of `key` that started without its lane (see `is_clear`) goes on, and its
    /// key's later messages wait for it: its lane is now running, freed by `finish`.
    pub(crate) fn run(&mut self, key: K) {
        let spare = &mut self.spare;
        let lane = self.lanes.entry(key).or_insert_with(|| Lane {
            queue: spare.pop().unwrap_or_default(),
            last: 0,
            running: false,
            runnable: false,
        });
        lane.running = true;
    }

    /// The next message that may start, its key's lane now running.
    pub(crate) fn start_next(&mut self) -> Option<(K, V)> {
        while let Some(key) = self.runnable.pop_front() {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.runnable = false;
            let Some((_, value)) = lane.queue.pop_front() else {
                continue;
            };
            lane.running = true;
            self.queued -= 1;
            return Some((key, value));
        }
        None
    }

    /// The next message that may start and up to `max - 1` more of its key that `same` takes
    /// with it (compared with the first), in order: the first, and the others in a list with
    /// room for the first in front (none made where there are no others: most jobs are of one
    /// message where the loop runs them itself); its key's lane now running.
    pub(crate) fn start_batch(
        &mut self,
        max: usize,
        same: impl Fn(&V, &V) -> bool,
    ) -> Option<(K, V, VecDeque<V>)> {
        let (key, first) = self.start_next()?;
        let mut rest = VecDeque::new();
        if let Some(lane) = self.lanes.get_mut(&key) {
            let more = lane.queue.len();
            while rest.len() + 1 < max
                && lane.queue.front().is_some_and(|(_, v)| same(&first, v))
                && let Some((_, v)) = lane.queue.pop_front()
            {
                if rest.capacity() == 0 {
                    rest.reserve_exact(max.min(1 + more));
                }
                rest.push_back(v);
            }
        }
        self.queued -= rest.len();
        Some((key, first, rest))
    }

    /// The handler of `key` returned: its next message may start. The one place a lane is
    /// freed.
    pub(crate) fn finish(&mut self, key: &K) {
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        lane.running = false;
        if lane.queue.is_empty() {
            self.free(key);
        } else if !lane.runnable {
            lane.runnable = true;
            self.runnable.push_back(key.clone());
        }
    }

    /// Remove the messages waiting for `key` (not a running one), in order.
    pub(crate) fn take(&mut self, key: &K) -> Vec<(u64, V)> {
        let Some(lane) = self.lanes.get_mut(key) else {
            return Vec::new();
        };
        let taken: Vec<(u64, V)> = lane.queue.drain(..).collect();
        self.queued -= taken.len();
        if !lane.running {
            self.free(key);
        }
        taken
    }

    /// Remove the waiting messages `pred` selects (not running ones).
    pub(crate) fn take_where(&mut self, pred: impl Fn(&V) -> bool) -> Vec<(K, V)> {
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (key, lane) in &mut self.lanes {
            let before = lane.queue.len();
            let mut kept = VecDeque::with_capacity(before);
            for (pos, v) in lane.queue.drain(..) {
                if pred(&v) {
                    out.push((key.clone(), v));
                } else {
                    kept.push_back((pos, v));
                }
            }
            self.queued -= before - kept.len();
            lane.queue = kept;
            if lane.queue.is_empty() && !lane.running {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.free(&key);
        }
        out
    }

    /// Remove every waiting message.
    pub(crate) fn drain(&mut self) -> Vec<(K, V)> {
        self.runnable.clear();
        self.queued = 0;
        let mut out = Vec::new();
        for (key, lane) in self.lanes.drain() {
            out.extend(lane.queue.into_iter().map(|(_, v)| (key.clone(), v)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_the_key_s_next_messages_while_they_are_alike() {
        let mut l = Lanes::new();
        for (pos, v) in [(1, 10), (2, 11), (3, 20), (4, 12)] {
            l.push("a", pos, v);
        }
        l.push("b", 5, 13);
        let same = |a: &i32, b: &i32| a / 10 == b / 10;
        let batch = |l: &mut Lanes<&'static str, i32>, max| {
            l.start_batch(max, same).map(|(k, first, rest)| {
                let room = rest.capacity() > rest.len() || rest.is_empty();
                assert!(room, "room for the first in front");
                (k, std::iter::once(first).chain(rest).collect::<Vec<_>>())
            })
        };
        assert_eq!(batch(&mut l, 8), Some(("a", vec![10, 11])));
        assert_eq!(l.queued(), 3);
        assert_eq!(batch(&mut l, 8), Some(("b", vec![13])));
        assert_eq!(batch(&mut l, 8), None, "a and b are running");
        l.finish(&"a");
        assert_eq!(batch(&mut l, 8), Some(("a", vec![20])));
        l.finish(&"a");
        l.push("a", 6, 14);
        l.push("a", 7, 15);
        assert_eq!(batch(&mut l, 2), Some(("a", vec![12, 14])), "at most max");
        assert_eq!(l.queued(), 1);
    }

    /// Everything a lane would give out, in order, one message at a time.
    fn run_out(l: &mut Lanes<u8, u64>) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        while let Some((key, v)) = l.start_next() {
            out.push((key, v));
            l.finish(&key);
        }
        out
    }

    proptest::proptest! {
        /// Queuing a released batch at once gives the lanes exactly the state that queuing its
        /// messages one by one gives: the same order per key, count and runnable keys, also when
        /// later messages of the key are queued already or its handler runs.
        #[test]
        fn a_batch_queues_as_its_messages_one_by_one(
            before in proptest::collection::btree_map(0u64..200, 0u8..3, 0..20),
            batch in proptest::collection::btree_set(0u64..200, 0..20),
            later in proptest::bool::ANY,
            running in proptest::bool::ANY,
        ) {
            let (mut one, mut all) = (Lanes::new(), Lanes::new());
            for l in [&mut one, &mut all] {
                for (&pos, &key) in &before {
                    l.push(key, pos, pos);
                }
                if later {
                    l.push(0, 1000, 1000);
                }
                if running {
                    // Key 0's handler runs (the lanes hand out keys in the order they became
                    // runnable, so start until key 0 comes).
                    let mut started = Vec::new();
                    while let Some((key, v)) = l.start_next() {
                        started.push((key, v));
                        if key == 0 {
                            break;
                        }
                    }
                    for (key, _) in started.into_iter().filter(|(k, _)| *k != 0) {
                        l.finish(&key);
                    }
                }
            }
            let batch: Vec<u64> = batch.into_iter().filter(|p| !before.contains_key(p)).collect();
            for &pos in &batch {
                one.push(0, pos, pos);
            }
            all.extend(&0, batch.iter().map(|&p| (p, p)).collect());
            proptest::prop_assert_eq!(one.queued(), all.queued());
            if running {
                one.finish(&0);
                all.finish(&0);
            }
            proptest::prop_assert_eq!(run_out(&mut one), run_out(&mut all));
        }
    }

    /// A step of [`each_key_runs_in_position_order_whatever_the_steps`].
    #[derive(Clone, Debug)]
    enum Step {
        Push(u8, u64),
        Extend(u8, std::collections::BTreeSet<u64>),
        /// `take_where`: the odd positions.
        TakeOdd,
        /// Start the next message and finish its handler.
        Run,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..3, 0u64..100).prop_map(|(k, p)| Step::Push(k, p)),
            2 => (0u8..3, proptest::collection::btree_set(0u64..100, 0..6))
                .prop_map(|(k, ps)| Step::Extend(k, ps)),
            1 => Just(Step::TakeOdd),
            2 => Just(Step::Run),
        ]
    }

    proptest::proptest! {
        /// Whatever comes in whatever order (pushed, queued as a batch, taken out, run), each key
        /// gives out its waiting messages in ascending position: the lanes against a model.
        #[test]
        fn each_key_runs_in_position_order_whatever_the_steps(
            steps in proptest::collection::vec(step(), 0..60),
        ) {
            use std::collections::{BTreeMap, BTreeSet, HashSet};
            let mut l: Lanes<u8, u64> = Lanes::new();
            let mut model: BTreeMap<u8, BTreeSet<u64>> = BTreeMap::new();
            // Positions are unique across keys, as the engine's are.
            let mut used = HashSet::new();
            for s in steps {
                match s {
                    Step::Push(key, pos) => {
                        if used.insert(pos) {
                            l.push(key, pos, pos);
                            model.entry(key).or_default().insert(pos);
                        }
                    }
                    Step::Extend(key, ps) => {
                        let ps: Vec<u64> = ps.into_iter().filter(|p| used.insert(*p)).collect();
                        model.entry(key).or_default().extend(ps.iter().copied());
                        l.extend(&key, ps.into_iter().map(|p| (p, p)).collect());
                    }
                    Step::TakeOdd => {
                        for (key, v) in l.take_where(|v| v % 2 == 1) {
                            proptest::prop_assert!(model.entry(key).or_default().remove(&v));
                        }
                    }
                    Step::Run => {
                        if let Some((key, v)) = l.start_next() {
                            let first = model.entry(key).or_default().pop_first();
                            proptest::prop_assert_eq!(first, Some(v), "key {}", key);
                            l.finish(&key);
                        }
                    }
                }
            }
            let out = run_out(&mut l);
            for (key, want) in model {
                let got: Vec<u64> = out.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect();
                proptest::prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "key {}", key);
            }
        }
    }

    #[test]
    fn freed_lanes_leave_their_queues_for_new_keys_up_to_a_bound() {
        let mut l = Lanes::new();
        for key in 0..100u32 {
            l.push(key, u64::from(key), ());
        }
        while let Some((key, ())) = l.start_next() {
            l.finish(&key);
        }
        assert_eq!(l.spare.len(), SPARE_MAX, "kept, but no more than the bound");
        assert!(l.spare.iter().all(|q| q.is_empty() && q.capacity() > 0));
        l.push(7, 200, ());
        assert_eq!(l.spare.len(), SPARE_MAX - 1, "a new lane takes one");
        assert_eq!(l.start_next(), Some((7, ())));
    }

    #[test]
    fn one_running_per_key_in_position_order() {
        let mut l = Lanes::new();
        l.push("a", 2, 'x');
        l.push("a", 1, 'w');
        l.push("b", 3, 'y');
        assert_eq!(l.queued(), 3);
        assert_eq!(l.start_next(), Some(("a", 'w')));
        assert_eq!(l.start_next(), Some(("b", 'y')));
        l.push("b", 6, 'v');
        assert_eq!(l.take(&"b"), vec![(6, 'v')]);
        assert_eq!(l.start_next(), None, "a is running");
        l.finish(&"a");
        assert_eq!(l.start_next(), Some(("a", 'x')));
        l.push("a", 4, 'z');
        assert_eq!(l.take(&"a"), vec![(4, 'z')]);
        l.finish(&"a");
        l.finish(&"b");
        assert_eq!(l.queued(), 0);
        assert!(l.start_next().is_none());
        l.push("c", 5, 'q');
        assert_eq!(l.drain(), vec![("c", 'q')]);
    }

    #[test]
    fn a_message_started_without_its_lane_holds_back_its_key_once_it_runs_on() {
        let mut l = Lanes::new();
        assert!(l.is_clear(&"a"), "nothing waits, nothing of a runs");
        l.push("b", 1, 'x');
        assert!(
            !l.is_clear(&"a"),
            "b waits to start: a new message goes behind it"
        );
        assert_eq!(l.start_next(), Some(("b", 'x')));
        assert!(l.is_clear(&"a"), "b runs, a may start");
        assert!(!l.is_clear(&"b"), "a message of b runs");
        l.run("a");
        assert!(!l.is_clear(&"a"));
        l.push("a", 3, 'z');
        l.push("a", 2, 'y');
        assert_eq!(l.start_next(), None, "a runs: its next messages wait");
        l.finish(&"a");
        assert_eq!(l.start_next(), Some(("a", 'y')));
        l.finish(&"a");
        assert_eq!(l.start_next(), Some(("a", 'z')));
        l.finish(&"a");
        l.finish(&"b");
        assert!(l.is_clear(&"a") && l.is_clear(&"b"), "every lane freed");
        assert_eq!(l.queued(), 0);
    }
}
