//! Errors: what a handler returns, what building and running a consumer can fail with.

use std::fmt::Display;

/// What a handler reports when it could not process a message.
///
/// The distinction decides the message's fate: a retryable error defers it through the broker
/// delay by the backoff policy; a permanent one dead-letters it at once with the error as reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Might work later (a timeout, a busy database): defer by the policy.
    #[error("retryable: {0}")]
    Retry(String),
    /// Will never work (a business rule refused it): dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// A retryable error with this explanation.
    pub fn retry(reason: impl Display) -> Self {
        Self::Retry(reason.to_string())
    }

    /// A permanent error with this explanation.
    pub fn permanent(reason: impl Display) -> Self {
        Self::Permanent(reason.to_string())
    }
}

/// Why a [`crate::ConsumerBuilder`] refused to build.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// No key extractor was given (`.key(..)`).
    #[error("no key extractor: call .key(|m| ...)")]
    MissingKey,
    /// No handler was given (`.handler(..)`).
    #[error("no handler: call .handler(|m| async {{ ... }})")]
    MissingHandler,
    /// Handler concurrency of zero would never run anything.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
}

/// Why [`crate::DependentConsumer::run`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    /// The transport failed to receive; held messages were given back before returning.
    #[error("transport: {0}")]
    Transport(#[source] E),
}
