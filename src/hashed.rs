//! [`Hashed`]: a key with its hash, worked out once for a message and kept with the key by the
//! engine's tables it passes through (the key cache, the lookups in flight, the hold, the
//! lanes), which take the hash as it is ([`ByHash`]) instead of hashing the key again.
//!
//! The hash is SipHash with the process's random keys ([`std::hash::RandomState`]), as a
//! `HashMap` of the keys would use: keys come from outside, so the tables stay as resistant to
//! chosen collisions as before; they only stop hashing one key several times.

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

/// A key and its hash under one [`RandomState`]. Two are equal when their keys are, as long as
/// both were hashed with the same state (the engine has one for all its tables).
#[derive(Clone, Debug)]
pub(crate) struct Hashed<K> {
    /// The key's hash.
    hash: u64,
    /// The key.
    key: K,
}

impl<K: Hash> Hashed<K> {
    /// `key`, hashed once with `state`.
    pub(crate) fn new(state: &RandomState, key: K) -> Self {
        Self {
            hash: state.hash_one(&key),
            key,
        }
    }
}

impl<K> Hashed<K> {
    /// The key.
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    /// The key, its hash dropped.
    pub(crate) fn into_key(self) -> K {
        self.key
    }
}

impl<K: PartialEq> PartialEq for Hashed<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Hashed<K> {}

impl<K> Hash for Hashed<K> {
    /// The hash worked out before: a table keyed by `Hashed` with [`ByHash`] uses it as it is.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of tables keyed by [`Hashed`]: the hash it is given is the one it finishes with.
#[derive(Default)]
pub(crate) struct TakeHash(u64);

impl Hasher for TakeHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Only `write_u64` is used (by `Hashed`); anything else is mixed in, never ignored.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
}

/// Builds [`TakeHash`]: the hasher of tables keyed by [`Hashed`].
pub(crate) type ByHash = BuildHasherDefault<TakeHash>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_table_finds_a_key_by_the_hash_worked_out_before() {
        let state = RandomState::new();
        let mut t: HashMap<Hashed<String>, u32, ByHash> = HashMap::default();
        for i in 0..1_000u32 {
            t.insert(Hashed::new(&state, i.to_string()), i);
        }
        for i in 0..1_000u32 {
            assert_eq!(t.get(&Hashed::new(&state, i.to_string())), Some(&i));
        }
        assert_eq!(t.get(&Hashed::new(&state, "x".to_owned())), None);
    }

    #[test]
    fn the_hash_is_the_state_s_own() {
        let state = RandomState::new();
        let h = Hashed::new(&state, 42u64);
        assert_eq!(ByHash::default().hash_one(&h), state.hash_one(42u64));
        assert_eq!(h.key(), &42);
    }

    #[test]
    fn equal_hashes_of_different_keys_stay_different_keys() {
        let a = Hashed { hash: 7, key: 1u8 };
        let b = Hashed { hash: 7, key: 2u8 };
        let mut t: HashMap<Hashed<u8>, (), ByHash> = HashMap::default();
        t.insert(a.clone(), ());
        assert!(t.contains_key(&a) && !t.contains_key(&b));
    }
}
