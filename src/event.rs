//! What the engine decided, for each message: the timeline of a consumer.
//!
//! Every decision is also emitted as a `tracing` event; [`Event`] is the same information as a
//! value, for an `on_event` callback (a readable log, metrics, tests).

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::dead_letter::DeadLetter;
use crate::transport::DeliveryId;

/// One decision about one delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<K> {
    /// When (tokio's clock, so tests under a paused clock see virtual time). A settlement's
    /// event is dated once the transport answered; a handled message's when the engine learned
    /// that its handler returned and its acknowledgement was made (never before either).
    pub at: Instant,
    /// The delivery the decision is about.
    pub delivery: DeliveryId,
    /// The message's id (from the consumer's id extractor, else the transport), if any. A
    /// message given back before it was decoded (taken from the transport as the consumer
    /// stops, or arriving from a partition being handed over) and a registration carry the
    /// transport's id: the extractor needs the decoded message.
    pub message_id: Option<String>,
    /// The prerequisite key, when the body decoded.
    pub key: Option<K>,
    /// Which attempt the delivery is (0 the first time; the numbering of [`crate::Policy`]).
    pub attempt: u32,
    /// What was decided.
    pub decision: Decision,
}

/// Why a message was deferred through the broker instead of being held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeferCause {
    /// The key was unknown and the hold budget was full (or zero).
    HoldFull,
    /// The key was still unknown when the hold time ran out (the source was asked once more).
    HoldExpired,
    /// The handler returned a retryable error.
    HandlerRetry,
    /// The key source could not be asked (an outage) and the message could not be held. Does
    /// not count as an attempt: an outage never makes a message dead-lettered.
    SourceUnavailable,
    /// An earlier message of the key is deferred, and this one could not wait for it in the
    /// hold. Does not count as an attempt.
    BehindDeferred,
    /// At a graceful stop: the key's messages this consumer had would reach whoever consumes
    /// next out of order if given back (one came back from a delay after a later one arrived,
    /// or they came from different queues), so they are deferred together, in the key's order.
    /// Does not count as an attempt.
    OrderAtStop,
}

impl DeferCause {
    /// Does a deferral for this cause count as an attempt (towards the policy's limit)?
    pub fn counts_as_attempt(self) -> bool {
        matches!(
            self,
            Self::HoldFull | Self::HoldExpired | Self::HandlerRetry
        )
    }

    /// A short, stable label (`hold-full`, `hold-expired`, `handler-retry`,
    /// `source-unavailable`, `behind-deferred`, `order-at-stop`), for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HoldFull => "hold-full",
            Self::HoldExpired => "hold-expired",
            Self::HandlerRetry => "handler-retry",
            Self::SourceUnavailable => "source-unavailable",
            Self::BehindDeferred => "behind-deferred",
            Self::OrderAtStop => "order-at-stop",
        }
    }
}

impl fmt::Display for DeferCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HoldFull => "hold full",
            Self::HoldExpired => "key still unknown",
            Self::HandlerRetry => "handler asked to retry",
            Self::SourceUnavailable => "key source unavailable",
            Self::BehindDeferred => "waiting behind a deferred message of its key",
            Self::OrderAtStop => "kept in its key's order at a stop",
        })
    }
}

/// The engine's decisions.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Decision {
    /// A registration made its key known.
    Registered,
    /// Held in memory, unacknowledged: its key is unknown, or an earlier message of its key is
    /// deferred and this one waits behind it.
    Held,
    /// Its key arrived: released from the hold after waiting this long.
    Released {
        /// Time spent held.
        waited: Duration,
    },
    /// The handler succeeded and the message was acknowledged.
    Handled,
    /// A delayed copy was stored (with the next attempt, if the cause counts as one), then the
    /// original acknowledged.
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
    /// The transport failed to carry out the decision (or the delivery predates a reconnect);
    /// the broker still owns the message and delivers it again (at-least-once). Nothing the
    /// decision meant to do happened.
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
            Self::Held => write!(f, "held"),
            Self::Released { waited } => write!(f, "released after {waited:?}"),
            Self::Handled => write!(f, "handled"),
            Self::Deferred { delay, cause } => write!(f, "deferred {delay:?} ({cause})"),
            Self::DeadLettered(dl) => write!(f, "dead-lettered ({}: {})", dl.kind, dl.reason),
            Self::Requeued => write!(f, "given back to the broker"),
            Self::SettleFailed { error } => write!(f, "settle failed: {error}"),
        }
    }
}
