//! prereq: consume messages whose prerequisite key may not be known yet.
//!
//! A payment event can reach its consumer before the event that registers its client.
//! [`DependentConsumer`] neither processes it early nor loses it: it holds the message
//! (unacknowledged) while the key is unknown, releases it the moment the key arrives, and falls
//! back to a broker delay with a [`Backoff`] policy when holding is not possible; after the last
//! attempt the message is dead-lettered with a reason.
//!
//! - [`retry`]: the backoff policy, a pure function of the attempt number.
//! - [`keys`]: where known keys live.
//! - [`transport`]: the seam to a broker; [`memory`] is an in-memory broker for tests;
//!   `amqp` (feature `amqp`, on by default) is RabbitMQ.
//! - [`DependentConsumer`]: the engine and its builder; [`Event`]: its decisions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod consumer;
mod context;
mod engine;
mod error;
mod event;
mod hold;
pub mod keys;
pub mod memory;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod retry;
pub mod transport;

#[cfg(feature = "amqp")]
pub mod amqp;

pub use consumer::{
    ConsumerBuilder, DEFAULT_ACK_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, DependentConsumer, Key, Report,
};
pub use context::Context;
pub use error::{BuildError, Error, HandlerError};
pub use event::{Decision, DeferCause, Event};
pub use hold::HoldBudget;
pub use keys::{KeyHandle, KeyStore, MemoryKeys};
pub use retry::{Backoff, BackoffBuilder, BackoffError, Policy};
pub use transport::{DeadLetter, DeadLetterKind, Delivery, DeliveryId, Settle, Source, Transport};

/// The README's example is compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
