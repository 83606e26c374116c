//! [`Entries`]: the hold's entries by position, in slots of fixed chunks: holding a message costs
//! no allocation of its own, and releasing one frees none (docs/performance.md, round 22).

use crate::seq_map::SeqMap;

/// Slots a chunk: 512 entries of the engine's (about 130 bytes each) make about 64 KiB.
const CHUNK: usize = 512;

/// Values by position (see `SeqMap`), each in a slot of a chunk that is never moved nor grown
/// once made. A slot freed is the next one filled (its memory is likely still cached). The
/// chunks are kept while anything is held and dropped once nothing is, but for the first (a hold
/// that empties and fills again, message by message, does not take and give back a chunk each
/// time): the memory stays within the most held since the hold was last empty, and one chunk.
pub(super) struct Entries<V> {
    /// Each position's slot.
    slots: SeqMap<u32>,
    /// The values, `CHUNK` slots to a chunk (the last may be shorter); `None` where free.
    chunks: Vec<Vec<Option<V>>>,
    /// The free slots below the end of the last chunk, the last freed first.
    free: Vec<u32>,
}

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self {
            slots: SeqMap::default(),
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V> Entries<V> {
    /// How many values are kept.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Is there room for one more? (Slots are numbered in 32 bits: about four billion.)
    pub(super) fn has_room(&self) -> bool {
        u32::try_from(self.len()).is_ok_and(|n| n < u32::MAX)
    }

    /// Keep `value` at `pos` (the caller checked `has_room`; a value already there is replaced).
    pub(super) fn insert(&mut self, pos: u64, value: V) {
        if let Some(slot) = self.slots.get(pos).copied()
            && let Some(place) = self.place(slot)
        {
            *place = Some(value);
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(place) = self.place(slot) {
                    *place = Some(value);
                }
                slot
            }
            None => self.push(value),
        };
        self.slots.insert(pos, slot);
    }

    /// The value at `pos`.
    pub(super) fn get(&self, pos: u64) -> Option<&V> {
        self.value(*self.slots.get(pos)?)
    }

    /// The value at `pos`, to change it.
    pub(super) fn get_mut(&mut self, pos: u64) -> Option<&mut V> {
        let slot = *self.slots.get(pos)?;
        self.place(slot)?.as_mut()
    }

    /// Remove and return the value at `pos`.
    pub(super) fn remove(&mut self, pos: u64) -> Option<V> {
        let slot = self.slots.remove(pos)?;
        let value = self.place(slot)?.take();
        if self.slots.len() == 0 {
            self.emptied();
        } else {
            self.free.push(slot);
        }
        value
    }

    /// Every value with its position, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.slots
            .iter()
            .filter_map(|(pos, slot)| Some((pos, self.value(*slot)?)))
    }

    /// Remove and return every value with its position, in position order.
    pub(super) fn drain_sorted(&mut self) -> Vec<(u64, V)> {
        let slots = self.slots.drain_sorted();
        let drained = slots
            .into_iter()
            .filter_map(|(pos, slot)| Some((pos, self.place(slot)?.take()?)))
            .collect();
        self.emptied();
        drained
    }

    /// A new slot after the last, with `value` in it.
    fn push(&mut self, value: V) -> u32 {
        let full = self.chunks.last().is_none_or(|c| c.len() == CHUNK);
        if full {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let n = self.chunks.len() - 1;
        let mut at = 0;
        if let Some(chunk) = self.chunks.last_mut() {
            at = chunk.len();
            chunk.push(Some(value));
        }
        // Within 32 bits: `has_room`.
        u32::try_from(n * CHUNK + at).unwrap_or(u32::MAX)
    }

    /// Nothing held: the memory goes back, but for the first chunk (emptied).
    fn emptied(&mut self) {
        self.chunks.truncate(1);
        if let Some(first) = self.chunks.first_mut() {
            first.clear();
        }
        self.free = Vec::new();
    }

    fn value(&self, slot: u32) -> Option<&V> {
        self.chunks
            .get(slot as usize / CHUNK)?
            .get(slot as usize % CHUNK)?
            .as_ref()
    }

    fn place(&mut self, slot: u32) -> Option<&mut Option<V>> {
        self.chunks
            .get_mut(slot as usize / CHUNK)?
            .get_mut(slot as usize % CHUNK)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert under the next position, this far above the last one.
        Insert(u64),
        /// Remove the value at this position (an index into those inserted so far).
        Remove(usize),
        /// Insert again at a position inserted before (the value is its position plus this).
        Again(usize, u64),
        /// Add this to the value at this position, if there is one.
        Change(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1..4u64).prop_map(Op::Insert),
            1 => (4..3_000u64).prop_map(Op::Insert),
            7 => any::<usize>().prop_map(Op::Remove),
            2 => (any::<usize>(), 0..100u64).prop_map(|(i, d)| Op::Again(i, d)),
            2 => (any::<usize>(), 0..100u64).prop_map(|(i, d)| Op::Change(i, d)),
        ]
    }

    proptest! {
        /// Whatever the order of insertions and removals, it keeps exactly what a map would,
        /// within one slot a value since it was last empty (a freed slot is filled again before
        /// a new one is made); a drain gives everything in position order.
        #[test]
        fn it_behaves_as_a_map_reusing_its_slots(ops in prop::collection::vec(op(), 0..1_500)) {
            let mut e = Entries::default();
            let mut model = BTreeMap::new();
            let mut positions = Vec::new();
            let mut next = 0u64;
            let mut most = 0;
            for op in ops {
                match op {
                    Op::Insert(gap) => {
                        next += gap;
                        e.insert(next, next);
                        model.insert(next, next);
                        positions.push(next);
                    }
                    Op::Remove(i) if !positions.is_empty() => {
                        let pos = positions[i % positions.len()];
                        prop_assert_eq!(e.remove(pos), model.remove(&pos));
                    }
                    Op::Again(i, d) if !positions.is_empty() => {
                        let pos = positions[i % positions.len()];
                        e.insert(pos, pos + d);
                        model.insert(pos, pos + d);
                    }
                    Op::Change(i, d) if !positions.is_empty() => {
                        let pos = positions[i % positions.len()];
                        if let Some(v) = e.get_mut(pos) {
                            *v += d;
                        }
                        if let Some(v) = model.get_mut(&pos) {
                            *v += d;
                        }
                    }
                    Op::Remove(..) | Op::Again(..) | Op::Change(..) => {}
                }
                most = if model.is_empty() { 0 } else { most.max(model.len()) };
                prop_assert_eq!(e.len(), model.len());
                for (pos, v) in &model {
                    prop_assert_eq!(e.get(*pos), Some(v));
                }
                let mut all: Vec<(u64, u64)> = e.iter().map(|(p, v)| (p, *v)).collect();
                all.sort_unstable();
                prop_assert_eq!(all, model.iter().map(|(p, v)| (*p, *v)).collect::<Vec<_>>());
                let slots: usize = e.chunks.iter().map(Vec::len).sum();
                prop_assert_eq!(slots, most, "slots made since the entries were last empty");
                prop_assert_eq!(slots - e.free.len(), model.len());
            }
            let drained = e.drain_sorted();
            prop_assert_eq!(drained, model.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(e.len(), 0);
            prop_assert!(e.chunks.iter().all(Vec::is_empty) && e.chunks.len() <= 1);
        }
    }

    #[test]
    fn the_memory_goes_back_once_nothing_is_held() {
        let mut e = Entries::default();
        for pos in 0..(3 * CHUNK as u64) {
            e.insert(pos, pos);
        }
        assert_eq!(e.chunks.len(), 3);
        for pos in 0..(3 * CHUNK as u64) {
            assert_eq!(e.remove(pos), Some(pos));
        }
        assert_eq!(e.chunks.len(), 1, "all but the first chunk");
        assert!(e.chunks[0].is_empty());
        assert_eq!(e.free.capacity(), 0);
        e.insert(7, 7);
        assert_eq!(
            (e.chunks.len(), e.chunks[0].len()),
            (1, 1),
            "filled from its start again"
        );
        assert_eq!(e.get(7), Some(&7));
    }
}
