//! [`MemoryKeys`]: the simplest key source, a set in memory shared by clones.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::notify::{KeyNotifier, KeyWakes};
use super::source::{KeyError, KeySource};

/// Known keys in memory, shared by clones: the default source of a consumer.
///
/// Share one between consumers (or with your own code) and each consumer's held messages are
/// released the moment any of them, or [`MemoryKeys::insert`], makes their key known. It forgets
/// everything when the process stops: for keys that must survive restarts or be shared by
/// instances, use a database-backed source.
///
/// ```
/// use prereq::MemoryKeys;
///
/// let keys = MemoryKeys::new();
/// assert!(keys.insert(5u64), "new");
/// assert!(!keys.insert(5), "already known");
/// assert!(keys.contains(&5));
/// ```
pub struct MemoryKeys<K> {
    set: Arc<Mutex<HashSet<K>>>,
    notifier: KeyNotifier<K>,
}

impl<K> Clone for MemoryKeys<K> {
    fn clone(&self) -> Self {
        Self {
            set: Arc::clone(&self.set),
            notifier: self.notifier.clone(),
        }
    }
}

impl<K: Clone> Default for MemoryKeys<K> {
    fn default() -> Self {
        Self {
            set: Arc::default(),
            notifier: KeyNotifier::new(),
        }
    }
}

impl<K> fmt::Debug for MemoryKeys<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryKeys")
            .field("known", &self.lock().len())
            .finish()
    }
}

impl<K> MemoryKeys<K> {
    fn lock(&self) -> MutexGuard<'_, HashSet<K>> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Eq + Hash + Clone> MemoryKeys<K> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `key` as known and wake every consumer holding messages for it. Returns `true`
    /// if the key was new.
    pub fn insert(&self, key: K) -> bool {
        let new = self.lock().insert(key.clone());
        if new {
            self.notifier.notify(key);
        }
        new
    }

    /// Is `key` known?
    pub fn contains(&self, key: &K) -> bool {
        self.lock().contains(key)
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No key is known yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Clone> FromIterator<K> for MemoryKeys<K> {
    fn from_iter<I: IntoIterator<Item = K>>(keys: I) -> Self {
        let set = Self::new();
        set.lock().extend(keys);
        set
    }
}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> KeySource<K> for MemoryKeys<K> {
    type Error = Infallible;

    async fn contains(&self, key: &K) -> Result<bool, KeyError<Infallible>> {
        Ok(MemoryKeys::contains(self, key))
    }

    async fn insert(&self, key: &K) -> Result<(), KeyError<Infallible>> {
        MemoryKeys::insert(self, key.clone());
        Ok(())
    }

    fn subscribe(&self) -> KeyWakes<K> {
        self.notifier.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Wake;

    #[tokio::test]
    async fn clones_share_keys_and_notify_new_ones_once() {
        let a = MemoryKeys::new();
        let b = a.clone();
        let mut wakes = KeySource::subscribe(&b);
        assert!(KeySource::insert(&a, &7u32).await.is_ok());
        assert!(!a.insert(7), "known already: no second notification");
        assert!(b.insert(8));
        assert_eq!(wakes.next().await, Some(Wake::Known(7)));
        assert_eq!(wakes.next().await, Some(Wake::Known(8)));
        assert!(KeySource::contains(&b, &7).await.unwrap_or(false));
        assert_eq!(b.len(), 2);
        let pre: MemoryKeys<u32> = [1, 2].into_iter().collect();
        assert!(pre.contains(&2) && !pre.is_empty());
    }
}
