//! Errors: what a handler returns, and what running a consumer can fail with.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::report::Report;

/// A boxed error, as a handler's failure carries it.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What a handler reports when it could not process a message: what to do with the message, and
/// why (the source error, kept for the dead-letter reason and for tracing).
///
/// `?` on any `std::error::Error + Send + Sync + 'static` converts it into a retryable error, so
/// a handler reads like any other async function:
///
/// ```
/// use std::time::Duration;
/// use prereq::HandlerError;
///
/// # struct Payment { amount: String }
/// async fn handle(p: Payment) -> Result<(), HandlerError> {
///     let cents: u64 = p.amount.parse()?; // a parse error: retried by the policy
///     if cents == 0 {
///         return Err(HandlerError::permanent("a payment of zero")); // dead-lettered now
///     }
///     if cents > 1_000_000 {
///         // The downstream limits large payments to one a minute: defer at least that long.
///         return Err(HandlerError::retry_after(Duration::from_secs(60), "rate limited"));
///     }
///     Ok(())
/// }
/// ```
///
/// Like `anyhow::Error`, it is not itself a `std::error::Error` (that would clash with the
/// conversion from every error); its [`Display`](fmt::Display) shows the source chain.
pub struct HandlerError {
    action: Action,
    source: BoxError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Retry,
    RetryAfter(Duration),
    Permanent,
}

impl HandlerError {
    /// Might work later (a timeout, a busy database): defer by the policy.
    pub fn retry(source: impl Into<BoxError>) -> Self {
        Self {
            action: Action::Retry,
            source: source.into(),
        }
    }

    /// Might work later, but not before `delay` (a rate-limited downstream): defer by the
    /// policy's delay or `delay`, whichever is longer. It counts as an attempt, like
    /// [`HandlerError::retry`].
    pub fn retry_after(delay: Duration, source: impl Into<BoxError>) -> Self {
        Self {
            action: Action::RetryAfter(delay),
            source: source.into(),
        }
    }

    /// Will never work (a business rule refused it): dead-letter now, with the source chain as
    /// the reason.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            action: Action::Permanent,
            source: source.into(),
        }
    }

    /// Is the message to be dead-lettered rather than retried?
    pub fn is_permanent(&self) -> bool {
        self.action == Action::Permanent
    }

    /// The least delay asked for by [`HandlerError::retry_after`].
    pub fn min_delay(&self) -> Option<Duration> {
        match self.action {
            Action::RetryAfter(d) => Some(d),
            _ => None,
        }
    }

    /// The error the handler failed with.
    pub fn source_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The error the handler failed with, owned.
    pub fn into_source(self) -> BoxError {
        self.source
    }

    /// The source and its causes, `outer: inner: …`, at most [`MAX_CHAIN`] levels. A cause
    /// whose text is already part of the previous level's (as `thiserror`'s `{0}` writes it) is
    /// not repeated.
    pub fn chain(&self) -> String {
        let mut out = self.source.to_string();
        let mut last = out.clone();
        let mut next = self.source.source();
        let mut depth = 1;
        while let Some(cause) = next {
            if depth == MAX_CHAIN {
                out.push_str(": …");
                break;
            }
            let text = cause.to_string();
            if !last.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            last = text;
            next = cause.source();
            depth += 1;
        }
        out
    }
}

/// The most levels of a source chain shown in a dead-letter reason.
pub const MAX_CHAIN: usize = 8;

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    /// Any error is retryable by default.
    fn from(e: E) -> Self {
        Self::retry(e)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Retry => write!(f, "retryable: {}", self.chain()),
            Action::RetryAfter(d) => write!(f, "retryable after {d:?}: {}", self.chain()),
            Action::Permanent => write!(f, "permanent: {}", self.chain()),
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("action", &self.action)
            .field("source", &self.source)
            .finish()
    }
}

/// Why [`crate::DependentConsumer::run`] ended early. Held messages were given back to the
/// transport before it returned, and [`RunError::report`] says what was done until then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<E: StdError + 'static> {
    /// The transport failed (to start consuming, or to receive).
    #[error("transport failed: {source}")]
    Transport {
        /// The transport's error.
        #[source]
        source: E,
        /// What the consumer did before it stopped.
        report: Report,
    },
    /// The runtime shut down under the consumer's loop while `run` waited for it (the loop
    /// runs in a task of its own); what it held is with the broker again once the connection
    /// closes, as after a crash.
    #[error("the consumer's loop was cancelled: {reason}")]
    Cancelled {
        /// What the runtime said.
        reason: String,
        /// Nothing is known of what the loop did: empty.
        report: Report,
    },
}

impl<E: StdError + 'static> RunError<E> {
    /// What the consumer did before it stopped.
    pub fn report(&self) -> &Report {
        match self {
            Self::Transport { report, .. } | Self::Cancelled { report, .. } => report,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("query failed: {0}")]
    struct Query(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("saving the payment")]
    struct Save(#[source] Query);

    fn failing() -> Result<(), HandlerError> {
        Err(Save(Query(std::io::Error::other("connection reset"))))?;
        Ok(())
    }

    #[test]
    fn question_mark_retries_and_keeps_the_chain_without_repeats() {
        let e = failing().unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.min_delay(), None);
        assert_eq!(
            e.chain(),
            "saving the payment: query failed: connection reset"
        );
        assert!(e.to_string().starts_with("retryable: saving the payment"));
        assert!(e.source_error().source().is_some());
    }

    #[test]
    fn constructors_take_strings_and_errors() {
        let p = HandlerError::permanent("refused");
        assert!(p.is_permanent());
        assert_eq!(p.to_string(), "permanent: refused");
        let r = HandlerError::retry_after(Duration::from_secs(3), std::io::Error::other("busy"));
        assert_eq!(r.min_delay(), Some(Duration::from_secs(3)));
        assert!(!r.is_permanent());
        assert_eq!(r.into_source().to_string(), "busy");
    }

    #[test]
    fn the_chain_is_bounded() {
        #[derive(Debug)]
        struct Deep(u32);
        impl fmt::Display for Deep {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "level {}", self.0)
            }
        }
        impl StdError for Deep {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                // An endless chain: each level leaks a deeper one.
                Some(Box::leak(Box::new(Deep(self.0 + 1))))
            }
        }
        let chain = HandlerError::retry(Deep(0)).chain();
        assert_eq!(chain.matches("level").count(), MAX_CHAIN);
        assert!(chain.ends_with(": …"));
    }
}
