//! What a consumer is built with, fixed before it runs, shared by the engine and its tasks.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::context::Context;
use crate::error::HandlerError;
use crate::event::Event;
use crate::hold::HoldBudget;
use crate::keys::SharedSource;
use crate::retry::Policy;

/// Turns a body into a value; the error text becomes the dead-letter reason.
pub(crate) type Decode<T> = Arc<dyn Fn(&[u8]) -> Result<T, String> + Send + Sync>;
/// The prerequisite key of a message.
pub(crate) type KeyFn<M, K> = Arc<dyn Fn(&M) -> K + Send + Sync>;
/// A stable id of a message.
pub(crate) type IdFn<M> = Arc<dyn Fn(&M) -> String + Send + Sync>;
/// The `on_event` callback.
pub(crate) type Observer<K> = Arc<dyn Fn(&Event<K>) + Send + Sync>;
/// The handler, either shape.
pub(crate) type HandlerFn<K, M> =
    Arc<dyn Fn(M, Context<K>) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// Everything the engine needs, fixed at build time.
pub(crate) struct Config<K, M> {
    /// Decodes message bodies.
    pub(crate) decode: Decode<M>,
    /// The key a message needs.
    pub(crate) key: KeyFn<M, K>,
    /// The message id, if the consumer was given an extractor.
    pub(crate) id: Option<IdFn<M>>,
    /// Decodes registrations into the key they make known; `None`: no registrations.
    pub(crate) registration: Option<Decode<K>>,
    /// Processes a message whose key is known.
    pub(crate) handler: HandlerFn<K, M>,
    /// The delays of deferrals.
    pub(crate) policy: Arc<dyn Policy>,
    /// The hold's limits (the hold time not yet clamped to the transport's ack timeout).
    pub(crate) budget: HoldBudget,
    /// Handlers running at once, at least 1.
    pub(crate) concurrency: usize,
    /// Called with every decision.
    pub(crate) observer: Option<Observer<K>>,
    /// Where keys are known.
    pub(crate) source: SharedSource<K>,
    /// The most keys the engine caches as known.
    pub(crate) cache_capacity: usize,
    /// Later messages of a key wait behind a deferred one.
    pub(crate) keep_order: bool,
    /// How long shutdown waits for running handlers.
    pub(crate) shutdown_grace: Duration,
    /// How long shutdown waits, consuming on, for the copies out in a delay when it began
    /// (zero: it does not).
    pub(crate) copies_wait: Duration,
}
