//! Shared helpers for the engine tests (`tests/engine_*.rs`) and the property tests
//! (`tests/prop_*.rs`).
//!
//! Everything runs on the in-memory broker under tokio's paused clock
//! (`#[tokio::test(start_paused = true)]`): time only moves when every task is idle, so
//! "zero virtual time" and "exactly `delay(n)` later" are exact statements.
//!
//! - [`Payment`] / [`Client`] and their JSON bodies ([`payment`], [`client`]): the payment race.
//! - [`builder`]: a consumer builder keyed by client, with registrations, message ids and a
//!   [`Recorder`] wired in; add a handler (and any option) and build.
//! - [`Recorder`]: every [`Event`] the engine emits, in order, plus [`Recorder::until`], a future
//!   that completes when a condition over the events holds: use it as the `shutdown` of
//!   [`DependentConsumer::run`] to run "until X happened", with no real-time waiting.
//! - [`Log`]: a shared list for handlers to write what they saw.
//! - [`fails_once`]: a handler that fails one payment once (retryably) and logs the others' runs.
//! - [`publish_at`]: a publish at a later (virtual) instant, as a step of a test's script.
//! - [`FailingSettles`]: the in-memory transport, whose settlements fail as a test plans.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prereq::memory::{MemoryBroker, MemoryTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Source, Transport};
use prereq::{
    Backoff, ConsumerBuilder, Decision, DependentConsumer, Event, Handler, HandlerError, Report,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A dependent message: a payment whose prerequisite key is its client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The payment id (also its message id, see [`builder`]).
    pub id: u64,
    /// The client it needs.
    pub client: u64,
}

/// A registration: it makes its `id` known as a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// The client id.
    pub id: u64,
}

/// A property test's message: an id and one of a few small keys.
#[derive(serde::Deserialize)]
pub struct Msg {
    pub id: u32,
    pub key: u8,
}

/// A property test's registration of a key.
#[derive(serde::Deserialize)]
pub struct Reg {
    pub key: u8,
}

/// The body of [`Msg`] `id` for `key`.
pub fn msg(id: u32, key: u8) -> String {
    format!(r#"{{"id":{id},"key":{key}}}"#)
}

/// The body of [`Reg`] for `key`.
pub fn reg(key: u8) -> String {
    format!(r#"{{"key":{key}}}"#)
}

/// The JSON body of a payment.
pub fn payment(id: u64, client: u64) -> Vec<u8> {
    serde_json::to_vec(&Payment { id, client }).unwrap()
}

/// The JSON body of a client registration.
pub fn client(id: u64) -> Vec<u8> {
    serde_json::to_vec(&Client { id }).unwrap()
}

/// The message id the engine reports for payment `id` (see [`builder`]).
pub fn mid(id: u64) -> Option<String> {
    Some(id.to_string())
}

/// A linear policy: retry `n` waits `n × step_secs` seconds, at most `max_attempts` retries.
pub fn linear(step_secs: u64, max_attempts: u32) -> Backoff {
    Backoff::linear(Duration::from_secs(step_secs)).max_attempts(max_attempts)
}

/// A builder for payments keyed by client, handled by `handler`, with client registrations,
/// the payment id as message id, and `rec` observing every event. Add any option and build.
pub fn builder<A>(
    rec: &Recorder<u64>,
    handler: impl Handler<u64, Payment, A>,
) -> ConsumerBuilder<u64, Payment> {
    DependentConsumer::builder(|p: &Payment| p.client, handler)
        .registrations(|c: &Client| c.id)
        .id(|p: &Payment| p.id.to_string())
        .on_event(rec.observer())
}

/// A handler that fails payment `id` the first time it runs (a retryable error: the engine
/// defers it) and logs in `ran` the id of every payment it runs successfully.
pub fn fails_once(
    id: u64,
    ran: Log<u64>,
) -> impl Fn(Payment) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static {
    let failed = AtomicBool::new(false);
    move |p: Payment| {
        if p.id == id && !failed.swap(true, Ordering::SeqCst) {
            return std::future::ready(Err(HandlerError::retry("busy")));
        }
        ran.push(p.id);
        std::future::ready(Ok(()))
    }
}

/// Publish `body` to `broker` `after` from now: a step of a test's script, in virtual time.
pub async fn publish_at(broker: MemoryBroker, after: Duration, body: Vec<u8>) {
    tokio::time::sleep(after).await;
    broker.publish(body);
}

/// How a settlement fails on a [`FailingSettles`] transport.
#[derive(Clone, Copy, Debug)]
pub enum Fails {
    /// Nothing is settled: the broker takes the delivery back this much later (`None`: never,
    /// another instance took it).
    GivenBack(Option<Duration>),
    /// Settled all the same, its confirm lost (a deferral's copy stored).
    Done,
}

/// A settlement the transport reports failed, and which kind it was.
#[derive(Debug, thiserror::Error)]
#[error("the connection dropped before the {0} was confirmed")]
pub struct Dropped(pub &'static str);

/// Whether a settlement fails, and how: asked once for each.
type Plan = Box<dyn FnMut(&Settle) -> Option<Fails> + Send>;

/// The in-memory transport, whose settlements of dependent messages (not registrations) fail as
/// `plan` says.
pub struct FailingSettles {
    inner: Arc<MemoryTransport>,
    plan: Mutex<Plan>,
    /// The deliveries of dependent messages.
    messages: Mutex<HashSet<DeliveryId>>,
}

impl FailingSettles {
    pub fn new(
        broker: &MemoryBroker,
        plan: impl FnMut(&Settle) -> Option<Fails> + Send + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(broker.transport()),
            plan: Mutex::new(Box::new(plan)),
            messages: Mutex::new(HashSet::new()),
        }
    }

    /// Fails the first settlement `pick` picks, `how`.
    pub fn first(broker: &MemoryBroker, pick: fn(&Settle) -> bool, how: Fails) -> Self {
        let mut failed = false;
        Self::new(broker, move |s| {
            (pick(s) && !std::mem::replace(&mut failed, true)).then_some(how)
        })
    }
}

fn kind(settle: &Settle) -> &'static str {
    match settle {
        Settle::Ack => "acknowledgement",
        Settle::Defer { .. } => "deferral",
        Settle::DeadLetter(_) => "dead letter",
        _ => "give-back",
    }
}

impl Transport for FailingSettles {
    type Error = Dropped;

    async fn start(&self, demand: Demand) -> Result<(), Dropped> {
        self.inner.start(demand).await.map_err(|_| Dropped("start"))
    }

    async fn recv(&self) -> Result<Option<Delivery>, Dropped> {
        let got = self.inner.recv().await.map_err(|_| Dropped("receive"))?;
        if let Some(d) = got.as_ref().filter(|d| d.source == Source::Message) {
            self.messages.lock().unwrap().insert(d.id);
        }
        Ok(got)
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), Dropped> {
        let what = kind(&settle);
        let message = self.messages.lock().unwrap().contains(&id);
        let fails = if message {
            (self.plan.lock().unwrap())(&settle)
        } else {
            None
        };
        match fails {
            None => self
                .inner
                .settle(id, settle)
                .await
                .map_err(|_| Dropped(what)),
            Some(Fails::Done) => {
                let _ = self.inner.settle(id, settle).await;
                Err(Dropped(what))
            }
            Some(Fails::GivenBack(after)) => {
                if let Some(after) = after {
                    let inner = Arc::clone(&self.inner);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = inner.settle(id, Settle::Requeue).await;
                    });
                }
                Err(Dropped(what))
            }
        }
    }
}

/// A handler that logs in `ran` the id of every payment it runs, and succeeds.
pub fn logs(
    ran: Log<u64>,
) -> impl Fn(Payment) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static {
    move |p: Payment| {
        ran.push(p.id);
        std::future::ready(Ok(()))
    }
}

/// Run `consumer` on a fresh transport of `broker` until `cond` holds over the recorded events,
/// then shut it down gracefully and return its report.
pub async fn run_until<K: prereq::Key>(
    consumer: DependentConsumer<K, Payment>,
    broker: &MemoryBroker,
    rec: &Recorder<K>,
    cond: impl Fn(&[Event<K>]) -> bool + Send + 'static,
) -> Report {
    consumer
        .run(broker.transport(), rec.until(cond))
        .await
        .expect("the in-memory transport does not fail")
}

/// How long (virtual time) [`Recorder::until`] waits before failing the test: a condition that
/// never holds makes the test fail quickly (the paused clock jumps there) instead of hang.
pub const PATIENCE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Records every [`Event`] in emission order and wakes [`Recorder::until`] waiters. Clones
/// share the same record.
pub struct Recorder<K> {
    events: Arc<Mutex<Vec<Event<K>>>>,
    changed: Arc<watch::Sender<usize>>,
}

impl<K> Clone for Recorder<K> {
    fn clone(&self) -> Self {
        Self {
            events: Arc::clone(&self.events),
            changed: Arc::clone(&self.changed),
        }
    }
}

impl<K: Clone + Debug + Send + Sync + 'static> Default for Recorder<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Debug + Send + Sync + 'static> Recorder<K> {
    /// An empty record.
    pub fn new() -> Self {
        Self {
            events: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event<K>>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The callback for `ConsumerBuilder::on_event`.
    pub fn observer(&self) -> impl Fn(&Event<K>) + Send + Sync + 'static {
        let rec = self.clone();
        move |e: &Event<K>| {
            let n = {
                let mut events = rec.lock();
                events.push(e.clone());
                events.len()
            };
            rec.changed.send_replace(n);
        }
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event<K>> {
        self.lock().clone()
    }

    /// How many events so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Event<K>) -> bool) -> usize {
        self.lock().iter().filter(|e| pred(e)).count()
    }

    /// The events about the message with this message id, in order.
    pub fn of(&self, message_id: &str) -> Vec<Event<K>> {
        self.lock()
            .iter()
            .filter(|e| e.message_id.as_deref() == Some(message_id))
            .cloned()
            .collect()
    }

    /// When the first event with `decision` about key `key` was emitted.
    pub fn of_key(&self, key: K, decision: Decision) -> Option<tokio::time::Instant>
    where
        K: PartialEq,
    {
        self.lock()
            .iter()
            .find(|e| e.key.as_ref() == Some(&key) && e.decision == decision)
            .map(|e| e.at)
    }

    /// The message ids of the events with `decision`, in order.
    pub fn ids_with(&self, decision: Decision) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|e| e.decision == decision)
            .filter_map(|e| e.message_id.clone())
            .collect()
    }

    /// The decisions about the message with this message id, in order.
    pub fn decisions_of(&self, message_id: &str) -> Vec<Decision> {
        self.of(message_id)
            .into_iter()
            .map(|e| e.decision)
            .collect()
    }

    /// Completes as soon as `cond` holds over the events (checked now and after every new
    /// event). Panics with the event log if it does not hold within [`PATIENCE`] of virtual time.
    pub fn until(
        &self,
        cond: impl Fn(&[Event<K>]) -> bool + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let rec = self.clone();
        let mut changed = self.changed.subscribe();
        async move {
            let rec2 = rec.clone();
            let wait = async move {
                loop {
                    if cond(&rec2.lock()) {
                        return;
                    }
                    // The sender lives in `rec`, so this cannot fail.
                    let _ = changed.changed().await;
                }
            };
            if tokio::time::timeout(PATIENCE, wait).await.is_err() {
                let log: Vec<String> = rec.lock().iter().map(|e| e.to_string()).collect();
                panic!(
                    "condition not reached within {PATIENCE:?} of virtual time; events:\n{}",
                    log.join("\n")
                );
            }
        }
    }
}

/// Counts events satisfying `pred` in a slice (for `until` conditions).
pub fn count<K>(events: &[Event<K>], pred: impl Fn(&Event<K>) -> bool) -> usize {
    events.iter().filter(|e| pred(e)).count()
}

/// How many messages were handled in `events`: the usual condition of [`Recorder::until`].
pub fn handled(events: &[Event<u64>]) -> usize {
    count(events, |e| e.decision == Decision::Handled)
}

/// A list shared between handlers and the test. Clones share the same list.
pub struct Log<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Clone> Log<T> {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append.
    pub fn push(&self, item: T) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(item);
    }

    /// A copy of the list.
    pub fn get(&self) -> Vec<T> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many items.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}
