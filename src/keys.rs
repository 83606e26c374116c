//! Prerequisite keys: the set of keys known so far.
//!
//! The engine asks a [`KeyStore`] whether a message's key is known, and inserts the keys it
//! reads from registration messages. The store only answers; *waking* the messages held for a
//! key is the engine's job, so keys inserted from outside the consumer must go through a
//! [`KeyHandle`] (from [`crate::DependentConsumer::keys`]), which inserts and wakes.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

/// Where known prerequisite keys live.
///
/// Calls are synchronous and on the engine's hot path: a store backed by a database should keep
/// a local cache and answer from it. Object-safe, so the engine holds an `Arc<dyn KeyStore<K>>`.
pub trait KeyStore<K>: Send + Sync {
    /// Is `key` known?
    fn contains(&self, key: &K) -> bool;
    /// Record `key` as known; returns `true` if it was not known before.
    fn insert(&self, key: K) -> bool;
}

/// The default key store: a set in memory, shared by clones.
#[derive(Debug)]
pub struct MemoryKeys<K> {
    set: Arc<Mutex<HashSet<K>>>,
}

impl<K> Clone for MemoryKeys<K> {
    fn clone(&self) -> Self {
        Self {
            set: Arc::clone(&self.set),
        }
    }
}

impl<K> Default for MemoryKeys<K> {
    fn default() -> Self {
        Self {
            set: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

impl<K: Eq + Hash> MemoryKeys<K> {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No key is known yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Send> KeyStore<K> for MemoryKeys<K> {
    fn contains(&self, key: &K) -> bool {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    fn insert(&self, key: K) -> bool {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key)
    }
}

/// Inserts keys from outside the consumer (your own code learnt that a client exists) and
/// wakes the messages held for them. Cheap to clone.
pub struct KeyHandle<K> {
    store: Arc<dyn KeyStore<K>>,
    wake: mpsc::UnboundedSender<K>,
}

impl<K> Clone for KeyHandle<K> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            wake: self.wake.clone(),
        }
    }
}

impl<K> std::fmt::Debug for KeyHandle<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHandle").finish_non_exhaustive()
    }
}

impl<K: Clone> KeyHandle<K> {
    pub(crate) fn new(store: Arc<dyn KeyStore<K>>, wake: mpsc::UnboundedSender<K>) -> Self {
        Self { store, wake }
    }

    /// Record `key` as known and release every message held for it. Returns `true` if the key
    /// was new. Works before, during and after [`crate::DependentConsumer::run`].
    pub fn insert(&self, key: K) -> bool {
        let new = self.store.insert(key.clone());
        // The engine may not be running (yet, or any more): the store still has the key, and
        // nothing is held without a running engine, so a closed channel loses nothing.
        let _ = self.wake.send(key);
        new
    }

    /// Is `key` known?
    pub fn contains(&self, key: &K) -> bool {
        self.store.contains(key)
    }
}
