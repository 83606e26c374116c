//! [`DependentConsumer`]: the public face of the engine, and its builder.

use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::{Config, Decode, HandlerFn, IdFn, KeyFn, Observer};
use crate::error::RunError;
use crate::event::Event;
use crate::handler::Handler;
use crate::hold::HoldBudget;
use crate::keys::{Key, KeySource, MemoryKeys, SharedSource};
use crate::report::Report;
use crate::retry::{Backoff, Policy};
use crate::transport::Transport;

/// How many handlers run at once by default.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// How many known keys a consumer caches by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 100_000;

/// How long shutdown waits for running handlers by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Consumes messages of type `M` that may only be handled once their prerequisite key `K` is
/// known.
///
/// For each message: if its key is known, the handler runs; if not, the message is held in
/// memory (unacknowledged, so a crash loses nothing) and runs the moment the key arrives, in
/// arrival order; if the hold is full or the key does not come in time, the message is deferred
/// through the broker by the backoff policy — later messages of its key wait behind it — and
/// dead-lettered with a reason once the policy gives up. Messages of one key never run
/// concurrently.
///
/// ```
/// use std::time::Duration;
/// use prereq::{DependentConsumer, memory::MemoryBroker};
///
/// #[derive(serde::Deserialize)]
/// struct Payment { id: u64, #[serde(rename = "clientId")] client_id: u64 }
/// #[derive(serde::Deserialize)]
/// struct Client { id: u64 }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let broker = MemoryBroker::new();
/// broker.publish(br#"{"id":1,"clientId":5}"#.to_vec()); // the payment comes first…
/// broker.register(br#"{"id":5}"#.to_vec());              // …then its client
///
/// let (done, finished) = tokio::sync::mpsc::unbounded_channel();
/// let consumer = DependentConsumer::builder(
///     |p: &Payment| p.client_id,
///     move |p: Payment| {
///         let done = done.clone();
///         async move {
///             let _ = done.send(p.id);
///             Ok(())
///         }
///     },
/// )
/// .registrations(|c: &Client| c.id)
/// .build();
///
/// let mut finished = finished;
/// let report = consumer
///     .run(broker.transport(), async move { finished.recv().await })
///     .await
///     .unwrap();
/// assert_eq!(report.handled, 1);
/// assert_eq!(report.released, 1); // it was held, then released when client 5 arrived
/// # }
/// ```
pub struct DependentConsumer<K, M> {
    cfg: Arc<Config<K, M>>,
}

impl<K, M> Clone for DependentConsumer<K, M> {
    fn clone(&self) -> Self {
        Self {
            cfg: Arc::clone(&self.cfg),
        }
    }
}

impl<K, M> fmt::Debug for DependentConsumer<K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependentConsumer")
            .field("policy", &self.cfg.policy)
            .field("budget", &self.cfg.budget)
            .field("concurrency", &self.cfg.concurrency)
            .finish_non_exhaustive()
    }
}

impl<K: Key, M: Send + 'static> DependentConsumer<K, M> {
    /// A builder for messages decoded as JSON, with the two parts every consumer needs: the
    /// prerequisite key of a message, and the handler (an async function of the message, or of
    /// the message and its [`crate::Context`]).
    pub fn builder<A>(
        key: impl Fn(&M) -> K + Send + Sync + 'static,
        handler: impl Handler<K, M, A>,
    ) -> ConsumerBuilder<K, M>
    where
        M: DeserializeOwned,
    {
        Self::builder_with_decoder(
            |body: &[u8]| {
                serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
            },
            key,
            handler,
        )
    }

    /// Like [`DependentConsumer::builder`], with your own body decoder; its error text becomes
    /// the dead-letter reason.
    pub fn builder_with_decoder<A, E: fmt::Display>(
        decode: impl Fn(&[u8]) -> Result<M, E> + Send + Sync + 'static,
        key: impl Fn(&M) -> K + Send + Sync + 'static,
        handler: impl Handler<K, M, A>,
    ) -> ConsumerBuilder<K, M> {
        let handler = Arc::new(handler);
        ConsumerBuilder {
            decode: Arc::new(move |body: &[u8]| decode(body).map_err(|e| e.to_string())),
            key: Arc::new(key),
            handler: Arc::new(move |m, ctx| handler.call(m, ctx)),
            id: None,
            registration: None,
            policy: Arc::new(Backoff::DEFAULT),
            budget: HoldBudget::DEFAULT,
            concurrency: DEFAULT_CONCURRENCY,
            observer: None,
            source: SharedSource::new(MemoryKeys::new()),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            keep_order: true,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            copies_wait: Duration::ZERO,
        }
    }

    /// The hold budget, as built (the transport may clamp its hold time: see
    /// [`Transport::ack_timeout`]).
    pub fn budget(&self) -> HoldBudget {
        self.cfg.budget
    }

    /// Consume from `transport` until `shutdown` completes (any future: its output is
    /// ignored), or the transport closes or fails.
    ///
    /// On the way out: stop taking deliveries, let running handlers finish (for up to the
    /// shutdown grace), give every held or waiting message back to the transport in the order
    /// it was received, and return what was done — also inside the error, if the transport
    /// failed.
    ///
    /// The consumer's loop runs in a task of its own on the current tokio runtime (so it runs
    /// on the runtime's workers even where `run` is awaited in `block_on`); `shutdown` is polled
    /// here, in the caller's future. Dropping the `run` future cancels the loop's task: what it
    /// had not settled goes back to the broker as the transport is dropped. A panic in the loop
    /// (an observer that panics) is a panic of `run`.
    pub async fn run<T, S>(self, transport: T, shutdown: S) -> Result<Report, RunError<T::Error>>
    where
        T: Transport,
        S: IntoFuture,
        S::IntoFuture: Send,
    {
        crate::engine::run(self.cfg, transport, shutdown.into_future()).await
    }
}

/// Builds a [`DependentConsumer`]; every setting has a default, and building cannot fail.
///
/// | setting | default |
/// |---|---|
/// | [`registrations`](Self::registrations) | none: keys come from the source only |
/// | [`keys`](Self::keys) | a new [`MemoryKeys`] |
/// | [`policy`](Self::policy) | [`Backoff::DEFAULT`]: linear 1 s, 10 attempts |
/// | [`budget`](Self::budget) | [`HoldBudget::DEFAULT`]: 10 000 messages, 64 MiB, 30 s |
/// | [`concurrency`](Self::concurrency) | [`DEFAULT_CONCURRENCY`] (8) |
/// | [`keep_key_order`](Self::keep_key_order) | `true` |
/// | [`cache_capacity`](Self::cache_capacity) | [`DEFAULT_CACHE_CAPACITY`] (100 000 keys) |
/// | [`shutdown_grace`](Self::shutdown_grace) | [`DEFAULT_SHUTDOWN_GRACE`] (30 s) |
/// | [`wait_for_copies_at_stop`](Self::wait_for_copies_at_stop) | zero: a stop does not wait |
#[must_use = "call .build()"]
pub struct ConsumerBuilder<K, M> {
    decode: Decode<M>,
    key: KeyFn<M, K>,
    handler: HandlerFn<K, M>,
    id: Option<IdFn<M>>,
    registration: Option<Decode<K>>,
    policy: Arc<dyn Policy>,
    budget: HoldBudget,
    concurrency: usize,
    observer: Option<Observer<K>>,
    source: SharedSource<K>,
    cache_capacity: usize,
    keep_order: bool,
    shutdown_grace: Duration,
    copies_wait: Duration,
}

impl<K, M> fmt::Debug for ConsumerBuilder<K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("policy", &self.policy)
            .field("budget", &self.budget)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<K: Key, M: Send + 'static> ConsumerBuilder<K, M> {
    /// Registrations are JSON values of type `R`; `key` extracts the key each one makes known.
    /// Each is recorded in the key source before it is acknowledged.
    pub fn registrations<R, F>(self, key: F) -> Self
    where
        R: DeserializeOwned,
        F: Fn(&R) -> K + Send + Sync + 'static,
    {
        self.registrations_with_decoder(move |body: &[u8]| {
            serde_json::from_slice::<R>(body)
                .map(|r| key(&r))
                .map_err(|e| format!("invalid JSON registration: {e}"))
        })
    }

    /// Registrations decoded by your own function, straight to the key they make known; its
    /// error text becomes the dead-letter reason.
    pub fn registrations_with_decoder<E: fmt::Display>(
        mut self,
        decode: impl Fn(&[u8]) -> Result<K, E> + Send + Sync + 'static,
    ) -> Self {
        self.registration = Some(Arc::new(move |body: &[u8]| {
            decode(body).map_err(|e| e.to_string())
        }));
        self
    }

    /// Where keys are known. Share one source between consumers (or with your own code, as a
    /// [`MemoryKeys`] clone) and each wakes the others' held messages at once.
    pub fn keys(mut self, source: impl KeySource<K>) -> Self {
        self.source = SharedSource::new(source);
        self
    }

    /// A stable id of a message, for events, for deterministic jitter and to recognise a
    /// deferred message when it comes back (default: the transport's message id, else a hash
    /// of the body).
    pub fn id(mut self, f: impl Fn(&M) -> String + Send + Sync + 'static) -> Self {
        self.id = Some(Arc::new(f));
        self
    }

    /// The backoff policy of deferrals.
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// The hold budget.
    pub fn budget(mut self, budget: HoldBudget) -> Self {
        self.budget = budget;
        self
    }

    /// How many handlers may run at once, across keys (one key never runs two). Zero is
    /// raised to 1.
    ///
    /// Handlers run in worker tasks, as many as run at once. Where they complete at once (and
    /// their acknowledgements too, as on the in-memory transport), the consumer's own task runs
    /// them itself, one after another, sparing the hand-over between threads; a handler that
    /// has to wait or takes longer than 50 µs goes on in a worker, and the next ones start in
    /// workers for a while (docs/design.md).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Whether a deferred message keeps its place in its key's order (default `true`): later
    /// messages of the key wait behind it (held, or deferred in turn) and run after it when it
    /// comes back. With `false`, a later message of the key runs as soon as the key is known,
    /// possibly before the deferred one.
    pub fn keep_key_order(mut self, keep: bool) -> Self {
        self.keep_order = keep;
        self
    }

    /// How many known keys the consumer remembers in front of its source (at least 2). Keys are
    /// assumed never to stop being known.
    pub fn cache_capacity(mut self, n: usize) -> Self {
        self.cache_capacity = n.max(2);
        self
    }

    /// Called with every decision (from the consumer's loop: keep it quick).
    pub fn on_event(mut self, f: impl Fn(&Event<K>) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// How long shutdown waits for running handlers. A handler still running then is
    /// abandoned: its message stays unacknowledged, so the broker delivers it again.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// At a graceful stop, first wait up to `max` for the messages this consumer deferred
    /// that are out in a delay then, consuming on meanwhile (what arrives is decided as
    /// usual): until the keys that had a message out have none out (one deferred again
    /// meanwhile included) and none waiting to run or running; then stop as usual. A message
    /// of such a key published after the stop then runs after them here, instead of reaching
    /// the next consumer before them. A key still unknown keeps its messages going round
    /// their delays: the wait then lasts `max`. Zero (the default): a stop does not wait; what
    /// waits behind a deferred message is still deferred after it.
    pub fn wait_for_copies_at_stop(mut self, max: Duration) -> Self {
        self.copies_wait = max;
        self
    }

    /// The consumer.
    pub fn build(self) -> DependentConsumer<K, M> {
        DependentConsumer {
            cfg: Arc::new(Config {
                decode: self.decode,
                key: self.key,
                id: self.id,
                registration: self.registration,
                handler: self.handler,
                policy: self.policy,
                budget: self.budget,
                concurrency: self.concurrency,
                observer: self.observer,
                source: self.source,
                cache_capacity: self.cache_capacity,
                keep_order: self.keep_order,
                shutdown_grace: self.shutdown_grace,
                copies_wait: self.copies_wait,
            }),
        }
    }
}
