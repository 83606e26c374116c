//! `DependentConsumer`: the public face of the engine, and its builder.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::context::Context;
use crate::error::{BuildError, Error, HandlerError};
use crate::event::Event;
use crate::hold::HoldBudget;
use crate::keys::{KeyHandle, KeyStore, MemoryKeys};
use crate::retry::{Backoff, Policy};
use crate::transport::Transport;

/// What a prerequisite key must be: hashable, cloneable, printable, shareable.
pub trait Key: Eq + Hash + Clone + fmt::Debug + Send + Sync + 'static {}
impl<T: Eq + Hash + Clone + fmt::Debug + Send + Sync + 'static> Key for T {}

pub(crate) type Decode<T> = Arc<dyn Fn(&[u8]) -> Result<T, String> + Send + Sync>;
pub(crate) type Handler<K, M> =
    Arc<dyn Fn(M, Context<K>) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;
pub(crate) type Observer<K> = Arc<dyn Fn(&Event<K>) + Send + Sync>;
pub(crate) type KeyFn<M, K> = Arc<dyn Fn(&M) -> K + Send + Sync>;
pub(crate) type IdFn<M> = Arc<dyn Fn(&M) -> String + Send + Sync>;

/// How long shutdown waits for running handlers by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The default broker acknowledgement timeout (RabbitMQ's `consumer_timeout`, 30 minutes).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Everything the engine needs, fixed at build time.
pub(crate) struct Config<K, M> {
    pub(crate) decode: Decode<M>,
    pub(crate) key: KeyFn<M, K>,
    pub(crate) id: Option<IdFn<M>>,
    pub(crate) registration: Option<Decode<K>>,
    pub(crate) handler: Handler<K, M>,
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) budget: HoldBudget,
    pub(crate) concurrency: usize,
    pub(crate) observer: Option<Observer<K>>,
    pub(crate) keys: Arc<dyn KeyStore<K>>,
    pub(crate) shutdown_grace: Duration,
}

/// Consumes messages of type `M` that may only be handled once their prerequisite key `K` is
/// known.
///
/// For each message: if its key is known, the handler runs; if not, the message is held in
/// memory (unacknowledged, so a crash loses nothing) and runs the moment the key arrives, before
/// any later message of that key; if the hold is full or the key does not come in time, the
/// message is deferred through the broker by the backoff policy, and dead-lettered with a reason
/// once the policy gives up. Messages of one key never run concurrently.
///
/// ```
/// use std::time::Duration;
/// use prereq::{DependentConsumer, HandlerError, memory::MemoryBroker};
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
/// let (done_tx, done_rx) = tokio::sync::oneshot::channel();
/// let done_tx = std::sync::Mutex::new(Some(done_tx));
/// let consumer = DependentConsumer::<u64, Payment>::builder()
///     .key(|p: &Payment| p.client_id)
///     .registrations(|c: &Client| c.id)
///     .handler(move |p: Payment| {
///         if let Some(tx) = done_tx.lock().unwrap().take() { let _ = tx.send(p.id); }
///         async { Ok::<_, HandlerError>(()) }
///     })
///     .build()
///     .unwrap();
///
/// let report = consumer
///     .run(broker.transport(), async { let _ = done_rx.await; })
///     .await
///     .unwrap();
/// assert_eq!(report.handled, 1);
/// assert_eq!(report.released, 1); // it was held, then released when client 5 arrived
/// # }
/// ```
pub struct DependentConsumer<K, M> {
    pub(crate) config: Arc<Config<K, M>>,
    pub(crate) wake_tx: mpsc::UnboundedSender<K>,
    pub(crate) wake_rx: mpsc::UnboundedReceiver<K>,
}

impl<K, M> fmt::Debug for DependentConsumer<K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependentConsumer")
            .field("policy", &self.config.policy)
            .field("budget", &self.config.budget)
            .field("concurrency", &self.config.concurrency)
            .finish_non_exhaustive()
    }
}

/// What a consumer did, returned by [`DependentConsumer::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages handled successfully.
    pub handled: u64,
    /// Messages held because their key was unknown.
    pub held: u64,
    /// Held messages released when their key arrived.
    pub released: u64,
    /// Messages deferred through the broker.
    pub deferred: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages given back to the broker at shutdown.
    pub requeued: u64,
    /// Registrations that made a key known.
    pub registered: u64,
    /// Decisions the transport failed to carry out (the broker redelivers those messages).
    pub settle_failures: u64,
    /// The most messages held at once.
    pub peak_held: usize,
}

impl<K: Key, M: Send + 'static> DependentConsumer<K, M> {
    /// A builder that decodes message bodies as JSON.
    pub fn builder() -> ConsumerBuilder<K, M>
    where
        M: DeserializeOwned,
    {
        Self::builder_with_decoder(|body: &[u8]| {
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
        })
    }

    /// A builder with your own body decoder; its error text becomes the dead-letter reason.
    pub fn builder_with_decoder<F>(decode: F) -> ConsumerBuilder<K, M>
    where
        F: Fn(&[u8]) -> Result<M, String> + Send + Sync + 'static,
    {
        ConsumerBuilder {
            decode: Arc::new(decode),
            key: None,
            id: None,
            registration: None,
            handler: None,
            policy: Arc::new(Backoff::default()),
            budget: HoldBudget::default(),
            concurrency: 8,
            observer: None,
            keys: Arc::new(MemoryKeys::new()),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// A handle to insert keys from your own code; inserting wakes what is held for the key.
    pub fn keys(&self) -> KeyHandle<K> {
        KeyHandle::new(Arc::clone(&self.config.keys), self.wake_tx.clone())
    }

    /// The hold budget in force (after clamping to the broker's acknowledgement timeout).
    pub fn budget(&self) -> HoldBudget {
        self.config.budget
    }

    /// Consume from `transport` until `shutdown` completes or the transport closes.
    ///
    /// On the way out: stop taking deliveries, let running handlers finish (for up to the
    /// shutdown grace), give every held or queued message back to the transport, and return
    /// what was done. On a transport error,
    /// the same, then `Err`.
    pub async fn run<T, S>(self, transport: T, shutdown: S) -> Result<Report, Error<T::Error>>
    where
        T: Transport,
        S: Future<Output = ()> + Send,
    {
        crate::engine::Engine::new(self.config, Arc::new(transport), self.wake_rx)
            .run(shutdown)
            .await
    }
}

/// Builds a [`DependentConsumer`]. Defaults: the linear 1 s policy with 10 attempts,
/// [`HoldBudget::default`], 8 concurrent handlers, an in-memory key store, no registrations
/// stream, a broker acknowledgement timeout of 30 minutes, a shutdown grace of 30 seconds.
#[must_use = "call build()"]
pub struct ConsumerBuilder<K, M> {
    decode: Decode<M>,
    key: Option<KeyFn<M, K>>,
    id: Option<IdFn<M>>,
    registration: Option<Decode<K>>,
    handler: Option<Handler<K, M>>,
    policy: Arc<dyn Policy>,
    budget: HoldBudget,
    concurrency: usize,
    observer: Option<Observer<K>>,
    keys: Arc<dyn KeyStore<K>>,
    ack_timeout: Duration,
    shutdown_grace: Duration,
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
    /// The prerequisite key of a message (required).
    pub fn key(mut self, f: impl Fn(&M) -> K + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(f));
        self
    }

    /// A stable id of a message, for events and for deterministic jitter (default: the
    /// transport's message id, else a hash of the body).
    pub fn id(mut self, f: impl Fn(&M) -> String + Send + Sync + 'static) -> Self {
        self.id = Some(Arc::new(f));
        self
    }

    /// Registrations are JSON values of type `R`; `key` extracts the key each one makes known.
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

    /// Registrations decoded by your own function, straight to the key they make known.
    pub fn registrations_with_decoder(
        mut self,
        decode: impl Fn(&[u8]) -> Result<K, String> + Send + Sync + 'static,
    ) -> Self {
        self.registration = Some(Arc::new(decode));
        self
    }

    /// The handler (required). `Ok` acknowledges; [`HandlerError::Retry`] defers by the policy;
    /// [`HandlerError::Permanent`] dead-letters. A panicking handler counts as a retryable error.
    pub fn handler<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |m, _| Box::pin(f(m))));
        self
    }

    /// Like [`ConsumerBuilder::handler`], and the handler also receives the delivery's
    /// [`Context`] (key, message id, attempt, redelivered flag), e.g. to deduplicate.
    pub fn handler_with_context<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(M, Context<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |m, ctx| Box::pin(f(m, ctx))));
        self
    }

    /// The backoff policy (default: [`Backoff::default`], linear 1 s, 10 attempts).
    pub fn policy(mut self, policy: impl Policy + 'static) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// The hold budget (default: [`HoldBudget::default`]).
    pub fn budget(mut self, budget: HoldBudget) -> Self {
        self.budget = budget;
        self
    }

    /// How many handlers may run at once, across keys (default 8; one key never runs two).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Called with every decision (from the engine's task: keep it quick).
    pub fn on_event(mut self, f: impl Fn(&Event<K>) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// Where known keys live (default: [`MemoryKeys`]).
    pub fn key_store(mut self, store: impl KeyStore<K> + 'static) -> Self {
        self.keys = Arc::new(store);
        self
    }

    /// The broker's acknowledgement timeout (RabbitMQ `consumer_timeout`, default 30 min). A
    /// held message is unacknowledged, so the hold time is clamped to half of this: held
    /// messages are deferred well before the broker would close the channel over them.
    pub fn broker_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How long shutdown waits for running handlers (default 30 s). A handler still running
    /// then is abandoned: its message stays unacknowledged, so the broker delivers it again.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<DependentConsumer<K, M>, BuildError> {
        let key = self.key.ok_or(BuildError::MissingKey)?;
        let handler = self.handler.ok_or(BuildError::MissingHandler)?;
        if self.concurrency == 0 {
            return Err(BuildError::ZeroConcurrency);
        }
        let mut budget = self.budget;
        budget.max_time = budget.max_time.min(self.ack_timeout / 2);
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Ok(DependentConsumer {
            config: Arc::new(Config {
                decode: self.decode,
                key,
                id: self.id,
                registration: self.registration,
                handler,
                policy: self.policy,
                budget,
                concurrency: self.concurrency,
                observer: self.observer,
                keys: self.keys,
                shutdown_grace: self.shutdown_grace,
            }),
            wake_tx,
            wake_rx,
        })
    }
}
