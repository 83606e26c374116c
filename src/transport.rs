//! The seam between the engine and a broker.
//!
//! The engine never sees AMQP: it receives [`Delivery`] values and answers each one with a
//! [`Settle`] decision. A transport turns those into broker operations (ack, a delayed copy, a
//! dead-letter copy, a requeue). Two transports ship with prereq: [`crate::memory`], an in-memory
//! broker for tests, and `amqp` (feature `amqp`), RabbitMQ through lapin.
//!
//! Why two methods and not more: everything the engine decides fits in one enum, so a new
//! transport is small and the engine stays testable on a fake.

use std::future::Future;
use std::time::Duration;

/// Identifies one delivery within a transport, until it is settled.
///
/// Opaque to the engine; a transport chooses the numbers (a broker delivery tag, an index…).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub u64);

/// Which stream a delivery comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A dependent message: it needs its prerequisite key before it may be handled.
    Message,
    /// A registration: decoding it yields a prerequisite key that becomes known.
    Registration,
}

/// One message handed to the engine, not yet settled.
///
/// Until the engine answers [`Transport::settle`] for it, the broker still owns the message: a
/// crash loses nothing, the broker delivers it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Handle to settle this delivery with.
    pub id: DeliveryId,
    /// Message or registration.
    pub source: Source,
    /// The raw body, decoded by the engine (a decode error dead-letters the message).
    pub body: Vec<u8>,
    /// How many times this message was deferred already (0 for a new one).
    pub attempt: u32,
    /// A per-message limit on deferrals that overrides the policy's, when the sender set one.
    pub max_attempts: Option<u32>,
    /// A stable identifier of the message, if the sender gave one (seeds deterministic jitter).
    pub message_id: Option<String>,
    /// The broker delivered this message before to a consumer that did not settle it.
    pub redelivered: bool,
}

impl Delivery {
    /// A fresh, never-deferred dependent message with this id and body.
    pub fn message(id: DeliveryId, body: impl Into<Vec<u8>>) -> Self {
        Self {
            id,
            source: Source::Message,
            body: body.into(),
            attempt: 0,
            max_attempts: None,
            message_id: None,
            redelivered: false,
        }
    }

    /// A registration with this id and body.
    pub fn registration(id: DeliveryId, body: impl Into<Vec<u8>>) -> Self {
        Self {
            source: Source::Registration,
            ..Self::message(id, body)
        }
    }
}

/// Why a message was dead-lettered: a class (for metrics and routing) and a readable text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The class of the reason.
    pub kind: DeadLetterKind,
    /// A human-readable explanation (the decode error, the handler's error, …).
    pub reason: String,
    /// How many times the message had been deferred when it was dead-lettered.
    pub attempts: u32,
}

/// The class of a dead-letter reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// The body did not decode.
    Undecodable,
    /// The handler returned a permanent error.
    Rejected,
    /// The backoff policy (or the message's own limit) gave up while the key was still unknown.
    KeyNeverArrived,
    /// The backoff policy gave up while the handler kept failing with retryable errors.
    RetriesExhausted,
}

impl DeadLetterKind {
    /// A short, stable label (`undecodable`, `rejected`, `key-never-arrived`,
    /// `retries-exhausted`), for headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::Rejected => "rejected",
            Self::KeyNeverArrived => "key-never-arrived",
            Self::RetriesExhausted => "retries-exhausted",
        }
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine's answer for one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done: the broker may forget the message.
    Ack,
    /// Store a copy that comes back after `delay` carrying `attempt` as its attempt count; only
    /// once the copy is safely stored may the original be acknowledged.
    Defer {
        /// How long the copy waits before it is delivered again.
        delay: Duration,
        /// The attempt count the copy carries (the original's plus one).
        attempt: u32,
    },
    /// Store a copy in the dead-letter queue with this reason, then acknowledge the original.
    DeadLetter(DeadLetter),
    /// Give the message back unchanged (graceful shutdown): the broker delivers it again later.
    Requeue,
}

/// A broker, as the engine sees it.
///
/// `recv` is called from one task at a time; `settle` may be called from many tasks at once
/// (handlers run concurrently), so implementations take `&self` and synchronise inside.
///
/// A transport must never lose a delivery it handed out: until `settle` returns `Ok`, the
/// message stays with the broker.
pub trait Transport: Send + Sync + 'static {
    /// What can go wrong talking to the broker.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next delivery, from either stream; `Ok(None)` when the transport is closed for good.
    fn recv(&self) -> impl Future<Output = Result<Option<Delivery>, Self::Error>> + Send;

    /// Carry out the engine's decision for a delivery.
    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
