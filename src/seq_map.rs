//! [`SeqMap`]: values under a rising sequence number (the hold's positions), most of them
//! removed in about the order they came; and its rule for when a window is too sparse to keep,
//! which the in-memory broker's unsettled deliveries follow too (`memory::unsettled`).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

/// Values by a number (a *tag*) handed out in rising order, removed in about that order: a
/// window of slots from the oldest tag still in it, indexed by the tag (no hashing, neighbours
/// side by side in memory), and a map for the stragglers and for a tag below the window (one
/// inserted out of order is kept all the same).
///
/// A value left behind while later ones come and go would keep every slot after it alive; once
/// the window is less than `1 / SPARSE` full (and more than `MIN_WINDOW` slots long), its oldest
/// values move to the map until it is dense again, so the memory stays within `SPARSE` slots per
/// value; a tag so far ahead that the window would be mostly empty starts it again there.
pub(crate) struct SeqMap<V> {
    /// The tag of `window`'s first slot; every straggler's tag is below it.
    base: u64,
    /// One slot per tag from `base`; the first is never empty.
    window: VecDeque<Option<V>>,
    /// Values moved out of the window (see the type's doc). Tags are the caller's own sequence,
    /// not outside input: a fast hasher, not a DoS-resistant one.
    stragglers: FxHashMap<u64, V>,
    /// Values in the window.
    in_window: usize,
}

/// A window this short is never thinned out.
pub(crate) const MIN_WINDOW: usize = 64;
/// A window longer than `MIN_WINDOW` keeps at most this many slots for each value in it: a slot
/// is small (the hold's are slot numbers, the broker's transport ids), and moving values to the
/// map while a hold is released key by key (its window thins out evenly) costs more than the
/// slots (docs/performance.md, round 22).
pub(crate) const SPARSE: usize = 16;

/// Is a window of `slots` slots holding `values` values too sparse to keep: longer than
/// `MIN_WINDOW` and less than `1 / SPARSE` full?
pub(crate) fn too_sparse(slots: usize, values: usize) -> bool {
    slots > MIN_WINDOW && values.saturating_mul(SPARSE) < slots
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        Self {
            base: 0,
            window: VecDeque::new(),
            stragglers: FxHashMap::default(),
            in_window: 0,
        }
    }
}

impl<V> SeqMap<V> {
    /// How many values are kept.
    pub(crate) fn len(&self) -> usize {
        self.in_window + self.stragglers.len()
    }

    /// Keep `value` under `tag` (in the window unless the tag is below it); a value already
    /// under `tag` is replaced.
    pub(crate) fn insert(&mut self, tag: u64, value: V) {
        if self.window.is_empty() {
            // Every straggler's tag stays below the window.
            self.base = self.base.max(tag);
        }
        let Some(mut at) = self.index(tag) else {
            self.stragglers.insert(tag, value);
            return;
        };
        if let Some(slot) = self.window.get_mut(at) {
            if slot.replace(value).is_none() {
                self.in_window += 1;
            }
            return;
        }
        if too_sparse(at + 1, self.in_window + 1) {
            // So far ahead that the window would be mostly empty: what it holds goes to the
            // stragglers and it starts again at `tag` (the gap is never allocated).
            while !self.window.is_empty() {
                self.spill_front();
            }
            self.base = tag;
            at = 0;
        }
        self.window.resize_with(at, || None);
        self.window.push_back(Some(value));
        self.in_window += 1;
        self.thin_out();
    }

    /// The value under `tag`.
    pub(crate) fn get(&self, tag: u64) -> Option<&V> {
        match self.index(tag).and_then(|at| self.window.get(at)) {
            Some(slot) => slot.as_ref(),
            None => self.stragglers.get(&tag),
        }
    }

    /// Remove and return the value under `tag`.
    pub(crate) fn remove(&mut self, tag: u64) -> Option<V> {
        self.remove_if(tag, |_| true)
    }

    /// Remove and return the value under `tag` if `take` says so.
    pub(crate) fn remove_if(&mut self, tag: u64, take: impl FnOnce(&V) -> bool) -> Option<V> {
        let Some(slot) = self.slot_mut(tag) else {
            let value = self.stragglers.get(&tag)?;
            return if take(value) {
                self.stragglers.remove(&tag)
            } else {
                None
            };
        };
        if !slot.as_ref().is_some_and(take) {
            return None;
        }
        let value = slot.take();
        self.in_window -= 1;
        self.trim_front();
        self.thin_out();
        value
    }

    /// Every value with its tag, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        let window = (self.base..)
            .zip(&self.window)
            .filter_map(|(tag, slot)| slot.as_ref().map(|v| (tag, v)));
        window.chain(self.stragglers.iter().map(|(tag, v)| (*tag, v)))
    }

    /// Remove and return every value with its tag, in tag order.
    pub(crate) fn drain_sorted(&mut self) -> Vec<(u64, V)> {
        let mut all: Vec<(u64, V)> = self.stragglers.drain().collect();
        let base = self.base;
        all.extend(
            (base..)
                .zip(self.window.drain(..))
                .filter_map(|(tag, slot)| slot.map(|v| (tag, v))),
        );
        self.in_window = 0;
        all.sort_unstable_by_key(|(tag, _)| *tag);
        all
    }

    /// The window's slot for `tag`, if the window spans it.
    fn slot_mut(&mut self, tag: u64) -> Option<&mut Option<V>> {
        self.index(tag).and_then(|at| self.window.get_mut(at))
    }

    /// Where `tag` goes in the window, if it is not before it.
    fn index(&self, tag: u64) -> Option<usize> {
        tag.checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
    }

    /// Move the oldest values to `stragglers` while the window is long and mostly empty: on
    /// return it holds at most `MIN_WINDOW` slots or is at least `1 / SPARSE` full.
    fn thin_out(&mut self) {
        while too_sparse(self.window.len(), self.in_window) {
            self.spill_front();
            self.trim_front();
        }
    }

    /// Move the window's first slot's value, if any, to `stragglers`; the window starts after it.
    fn spill_front(&mut self) {
        if let Some(Some(value)) = self.window.pop_front() {
            self.stragglers.insert(self.base, value);
            self.in_window -= 1;
        }
        self.base += 1;
    }

    /// Drop the empty slots at the window's front.
    fn trim_front(&mut self) {
        while let Some(None) = self.window.front() {
            self.window.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert under the next tag, this far above the last one.
        Insert(u64),
        /// Remove the value under this tag (an index into the tags inserted so far), if the
        /// value is even or `any`.
        Remove(usize, bool),
        /// Insert again under a tag inserted before (the value is its tag plus this).
        Again(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1..4u64).prop_map(Op::Insert),
            1 => (4..300u64).prop_map(Op::Insert),
            8 => (any::<usize>(), any::<bool>()).prop_map(|(i, any)| Op::Remove(i, any)),
            2 => (any::<usize>(), 0..100u64).prop_map(|(i, d)| Op::Again(i, d)),
        ]
    }

    proptest! {
        /// Whatever the order of removals and insertions out of order, it keeps exactly
        /// what a map would, and its window stays within `SPARSE` slots per value; a drain gives
        /// everything in tag order.
        #[test]
        fn it_behaves_as_a_map_within_bounded_memory(ops in prop::collection::vec(op(), 0..600)) {
            let mut u = SeqMap::default();
            let mut model = BTreeMap::new();
            let mut tags = Vec::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Insert(gap) => {
                        next += gap;
                        u.insert(next, next);
                        model.insert(next, next);
                        tags.push(next);
                    }
                    Op::Remove(i, any) if !tags.is_empty() => {
                        let tag = tags[i % tags.len()];
                        let take = |v: &u64| any || v.is_multiple_of(2);
                        let want = model.get(&tag).copied().filter(take);
                        if want.is_some() {
                            model.remove(&tag);
                        }
                        prop_assert_eq!(u.remove_if(tag, take), want);
                    }
                    Op::Again(i, d) if !tags.is_empty() => {
                        let tag = tags[i % tags.len()];
                        u.insert(tag, tag + d);
                        model.insert(tag, tag + d);
                    }
                    Op::Remove(..) | Op::Again(..) => {}
                }
                prop_assert_eq!(u.len(), model.len());
                for (tag, v) in &model {
                    prop_assert_eq!(u.get(*tag), Some(v));
                }
                let mut all: Vec<(u64, u64)> = u.iter().map(|(t, v)| (t, *v)).collect();
                all.sort_unstable();
                prop_assert_eq!(all, model.iter().map(|(t, v)| (*t, *v)).collect::<Vec<_>>());
                prop_assert!(u.window.front().is_none_or(Option::is_some));
                prop_assert!(
                    u.window.len() <= MIN_WINDOW.max(SPARSE * u.in_window),
                    "window of {} slots for {} values", u.window.len(), u.in_window
                );
            }
            let drained = u.drain_sorted();
            prop_assert_eq!(drained, model.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(u.len(), 0);
        }
    }

    #[test]
    fn a_jump_far_ahead_allocates_no_gap() {
        let mut u = SeqMap::default();
        u.insert(1, "old");
        u.insert(1_000_000_000, "new");
        assert!(u.window.capacity() < 1_000, "{} slots", u.window.capacity());
        assert_eq!(u.get(1), Some(&"old"));
        assert_eq!(u.get(1_000_000_000), Some(&"new"));
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn a_tag_below_the_window_is_kept_all_the_same() {
        let mut u = SeqMap::default();
        u.insert(10, "a");
        u.insert(5, "b");
        assert_eq!(u.get(5), Some(&"b"));
        assert_eq!(u.remove_if(5, |_| true), Some("b"));
        assert_eq!(u.remove_if(10, |_| false), None);
        assert_eq!(u.len(), 1);
    }
}
