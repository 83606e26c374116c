//! What the engine decided, for each message: the timeline of a consumer.
//!
//! Every decision is also emitted as a `tracing` event; [`Event`] is the same information as a
//! value, for an `on_event` callback (a readable log, metrics, tests).

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::{DeadLetter, DeliveryId};

/// One decision about one delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<K> {
    /// When (tokio's clock, so tests under a paused clock see virtual time).
    pub at: Instant,
    /// The delivery the decision is about.
    pub delivery: DeliveryId,
    /// The message's id (from the consumer's id extractor, else the transport), if any.
    pub message_id: Option<String>,
    /// The prerequisite key, when the body decoded.
    pub key: Option<K>,
    /// How many times the message had been deferred before this delivery.
    pub attempt: u32,
    /// What was decided.
    pub decision: Decision,
}

/// Why a message was deferred through the broker instead of being held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeferCause {
    /// The key was unknown and the hold budget was full (or zero).
    HoldFull,
    /// The key was still unknown when the hold time ran out.
    HoldExpired,
    /// The handler returned a retryable error.
    HandlerRetry,
}

impl fmt::Display for DeferCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HoldFull => "hold full",
            Self::HoldExpired => "key still unknown",
            Self::HandlerRetry => "handler asked to retry",
        })
    }
}

/// The engine's decisions.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// A registration made its key known.
    Registered,
    /// Key unknown: held in memory, unacknowledged.
    Held,
    /// Its key arrived: released from the hold after waiting this long.
    Released {
        /// Time spent held.
        waited: Duration,
    },
    /// The handler succeeded and the message was acknowledged.
    Handled,
    /// A delayed copy was stored with the next attempt count, then the original acknowledged.
    Deferred {
        /// The delay of the copy.
        delay: Duration,
        /// Why.
        cause: DeferCause,
    },
    /// Dead-lettered with this reason.
    DeadLettered(DeadLetter),
    /// Given back to the broker unchanged (shutdown).
    Requeued,
    /// The transport failed to carry out the decision; the broker still owns the message and
    /// delivers it again (at-least-once).
    SettleFailed {
        /// The transport's error.
        error: String,
    },
}

impl<K: fmt::Debug> fmt::Display for Event<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message_id {
            Some(id) => write!(f, "message {id}")?,
            None => write!(f, "delivery {}", self.delivery.0)?,
        }
        if let Some(k) = &self.key {
            write!(f, " key {k:?}")?;
        }
        write!(f, " attempt {}: {}", self.attempt, self.decision)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registered => write!(f, "registered"),
            Self::Held => write!(f, "held (key unknown)"),
            Self::Released { waited } => write!(f, "released after {waited:?}"),
            Self::Handled => write!(f, "handled"),
            Self::Deferred { delay, cause } => write!(f, "deferred {delay:?} ({cause})"),
            Self::DeadLettered(dl) => write!(
                f,
                "dead-lettered ({}: {}) after {} attempts",
                dl.kind, dl.reason, dl.attempts
            ),
            Self::Requeued => write!(f, "given back to the broker"),
            Self::SettleFailed { error } => write!(f, "settle failed: {error}"),
        }
    }
}
