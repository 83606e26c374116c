//! prereq: consume messages whose prerequisite key may not be known yet.
//!
//! A payment event can reach its consumer before the event that registers its client.
//! [`DependentConsumer`] neither processes it early nor loses it: it holds the message
//! (unacknowledged) while the key is unknown, releases it the moment the key arrives, and falls
//! back to a broker delay with a [`Backoff`] policy when holding is not possible; after the last
//! attempt the message is dead-lettered with a reason.
//!
//! - [`DependentConsumer::builder`]: the key of a message and its handler; then registrations,
//!   the [`KeySource`], the [`Policy`], the [`HoldBudget`]…
//! - [`HandlerError`]: `?` retries, [`HandlerError::permanent`] dead-letters,
//!   [`HandlerError::retry_after`] waits at least as asked.
//! - [`KeySource`]: where keys are known ([`MemoryKeys`]; SQLite and PostgreSQL in `sql`,
//!   behind features), shared by consumers and instances.
//! - [`transport`]: the seam to a broker; [`memory`] is an in-memory broker for tests; `amqp`
//!   (feature `amqp`, on by default) is RabbitMQ.
//! - [`Event`]: every decision, for logs and tests; [`Report`]: the counts.
//!
//! The README's example, run as a doctest:
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod config;
mod consumer;
mod context;
mod dead_letter;
mod engine;
mod error;
mod event;
mod handler;
mod hashed;
mod hold;
mod keys;
pub mod memory;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod pending;
#[doc(hidden)]
pub mod probe;
mod report;
mod retry;
mod seq_map;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub mod sql;
pub mod transport;

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub mod amqp;

pub use consumer::{
    ConsumerBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_CONCURRENCY, DEFAULT_SHUTDOWN_GRACE,
    DependentConsumer,
};
pub use context::Context;
pub use dead_letter::{DeadLetter, DeadLetterKind, MAX_REASON};
pub use error::{BoxError, HandlerError, MAX_CHAIN, RunError};
pub use event::{Decision, DeferCause, Event};
pub use handler::Handler;
pub use hold::HoldBudget;
pub use keys::{
    DEFAULT_NOTIFY_CAPACITY, Key, KeyError, KeyNotifier, KeySource, KeyWakes, MemoryKeys, Wake,
};
pub use report::Report;
pub use retry::{
    Backoff, BackoffError, DEFAULT_CAP, DEFAULT_MAX_ATTEMPTS, Kind, MIN_DELAY, Policy, Schedule,
};
