//! [`SharedSource`]: any [`KeySource`] behind one object-safe handle, as the engine holds it.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::notify::KeyWakes;
use super::source::{Key, KeyError, KeySource};
use crate::error::BoxError;

/// A pending answer of the source, owning what it needs (it runs in a task of its own).
pub(crate) type Answer<T> = BoxFuture<'static, Result<T, KeyError<BoxError>>>;

/// The object-safe face of a [`KeySource`]: futures own the key and a handle on the source.
trait DynSource<K>: Send + Sync {
    fn contains(&self, key: K) -> Answer<bool>;
    fn insert(&self, key: K) -> Answer<()>;
    fn subscribe(&self) -> KeyWakes<K>;
}

struct Erased<S>(Arc<S>);

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: KeyError<E>) -> KeyError<BoxError> {
    match e {
        KeyError::Unavailable(e) => KeyError::Unavailable(Box::new(e)),
        KeyError::InvalidKey(reason) => KeyError::InvalidKey(reason),
    }
}

impl<K: Key, S: KeySource<K>> DynSource<K> for Erased<S> {
    fn contains(&self, key: K) -> Answer<bool> {
        let source = Arc::clone(&self.0);
        Box::pin(async move { source.contains(&key).await.map_err(boxed) })
    }

    fn insert(&self, key: K) -> Answer<()> {
        let source = Arc::clone(&self.0);
        Box::pin(async move { source.insert(&key).await.map_err(boxed) })
    }

    fn subscribe(&self) -> KeyWakes<K> {
        self.0.subscribe()
    }
}

/// A key source of any type, cheap to clone.
pub(crate) struct SharedSource<K>(Arc<dyn DynSource<K>>);

impl<K> Clone for SharedSource<K> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<K: Key> SharedSource<K> {
    pub(crate) fn new<S: KeySource<K>>(source: S) -> Self {
        Self(Arc::new(Erased(Arc::new(source))))
    }

    /// Is `key` known? See [`KeySource::contains`].
    pub(crate) fn contains(&self, key: K) -> Answer<bool> {
        self.0.contains(key)
    }

    /// Record `key`. See [`KeySource::insert`].
    pub(crate) fn insert(&self, key: K) -> Answer<()> {
        self.0.insert(key)
    }

    /// See [`KeySource::subscribe`].
    pub(crate) fn subscribe(&self) -> KeyWakes<K> {
        self.0.subscribe()
    }
}
