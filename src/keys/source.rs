//! The [`KeySource`] seam and its error: where prerequisite keys are known.

use std::fmt;
use std::future::Future;
use std::hash::Hash;

use super::notify::KeyWakes;

/// What a prerequisite key must be: hashable, cloneable, printable (for dead-letter reasons and
/// logs), shareable between tasks. Implemented for every such type.
pub trait Key: Eq + Hash + Clone + fmt::Debug + Send + Sync + 'static {}

impl<T: Eq + Hash + Clone + fmt::Debug + Send + Sync + 'static> Key for T {}

/// Where prerequisite keys are known: asked by the consumer, written by registrations, and
/// watched for keys that become known.
///
/// Async and fallible, like [`crate::transport::Transport`]: implement the methods as
/// `async fn`. The consumer calls them from spawned tasks, never from its own loop, and keeps a
/// bounded cache of known keys in front of [`KeySource::contains`].
pub trait KeySource<K>: Send + Sync + 'static {
    /// What can go wrong reaching the source (a database error, …).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Is `key` known? [`KeyError::Unavailable`]: the consumer holds the message and asks again
    /// later; [`KeyError::InvalidKey`]: the message is dead-lettered with the reason.
    fn contains(&self, key: &K)
    -> impl Future<Output = Result<bool, KeyError<Self::Error>>> + Send;

    /// Record `key` as known (a registration arrived). Idempotent: a registration delivered
    /// twice inserts twice. Only once this returned `Ok` does the key count as known (what
    /// waited for it is released) and is the registration acknowledged, so a handler never runs
    /// before its key is in the source, and a crash in between delivers the registration again.
    /// A source that records keys must also notify its subscribers.
    fn insert(&self, key: &K) -> impl Future<Output = Result<(), KeyError<Self::Error>>> + Send;

    /// A subscription to keys becoming known by any path, from now on. A source that cannot
    /// tell returns [`KeyWakes::none`](crate::KeyWakes::none): held messages are then re-checked when their hold time
    /// runs out.
    fn subscribe(&self) -> KeyWakes<K>;
}

/// Why a [`KeySource`] could not answer, as `deadpool`'s `RecycleError<E>`: `?` on the source's
/// own error type converts it into [`KeyError::Unavailable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError<E> {
    /// The source cannot be reached or failed (a database outage): hold and ask again later.
    #[error("key source unavailable: {0}")]
    Unavailable(#[source] E),
    /// The key can never be looked up (it does not fit the source's column, …): the message is
    /// dead-lettered with this reason.
    #[error("invalid key: {0}")]
    InvalidKey(String),
}

impl<E> From<E> for KeyError<E> {
    fn from(e: E) -> Self {
        Self::Unavailable(e)
    }
}

impl<E> KeyError<E> {
    /// An [`KeyError::InvalidKey`] with this explanation.
    pub fn invalid_key(reason: impl fmt::Display) -> Self {
        Self::InvalidKey(reason.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_error_converts_with_question_mark() {
        fn lookup() -> Result<bool, KeyError<std::io::Error>> {
            Err(std::io::Error::other("down"))?;
            Ok(true)
        }
        assert!(matches!(lookup(), Err(KeyError::Unavailable(_))));
        let e: KeyError<std::io::Error> = KeyError::invalid_key("too long");
        assert_eq!(e.to_string(), "invalid key: too long");
    }
}
