//! [`KeyCache`]: the keys a consumer knows to be known, bounded, in front of its key source.

use std::collections::HashSet;
use std::hash::Hash;

use crate::hashed::{ByHash, Hashed};

/// A bounded set of known keys with least-recently-used eviction by generations: keys live in a
/// young set; when it is full it becomes the old set (the previous old one is dropped), and a
/// key found in the old set moves back to the young one. Lookups and inserts are O(1); at most
/// `capacity` keys are kept; a key used within the last `capacity / 2` distinct keys is never
/// evicted. Keys are assumed never to stop being known, so nothing else invalidates them. Keys
/// come with their hash ([`Hashed`]), worked out once for each message.
pub(crate) struct KeyCache<K> {
    /// Recently inserted or used keys.
    young: HashSet<Hashed<K>, ByHash>,
    /// The generation before; dropped when `young` fills up again.
    old: HashSet<Hashed<K>, ByHash>,
    /// The size of a generation.
    generation: usize,
}

impl<K: Eq + Hash> KeyCache<K> {
    /// A cache of at most `capacity` keys (at least 2).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            young: HashSet::default(),
            old: HashSet::default(),
            generation: (capacity / 2).max(1),
        }
    }

    /// Is `key` known?
    pub(crate) fn contains(&mut self, key: &Hashed<K>) -> bool {
        if self.young.contains(key) {
            return true;
        }
        match self.old.take(key) {
            Some(key) => {
                self.insert(key);
                true
            }
            None => false,
        }
    }

    /// Remember `key` as known.
    pub(crate) fn insert(&mut self, key: Hashed<K>) {
        if self.young.len() >= self.generation && !self.young.contains(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key);
    }

    /// How many keys are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_recently_used_keys_survive() {
        let state = std::hash::RandomState::new();
        let h = |k: u32| Hashed::new(&state, k);
        let mut c = KeyCache::new(4);
        for k in 0..100u32 {
            c.insert(h(k));
            assert!(c.contains(&h(0)) || k >= 2, "0 is used at every step");
            assert!(c.len() <= 4, "{} cached", c.len());
        }
        assert!(c.contains(&h(99)) && c.contains(&h(98)));
        assert!(!c.contains(&h(50)));
    }
}
