//! An in-memory broker and its transport: test your services (and prereq's engine) without
//! RabbitMQ, under tokio's paused clock.
//!
//! It behaves like a broker where it matters to prereq:
//! - one FIFO queue carrying both messages and registrations, in publish order;
//! - an optional prefetch: at most that many unsettled deliveries per transport;
//! - deferred copies wait on tokio time, then join the back of the queue;
//! - unsettled deliveries go back to the front of the queue, marked redelivered, in the order
//!   they were delivered, when they are requeued or their transport is dropped (a consumer that
//!   goes away loses nothing, and a key's messages keep their order);
//! - dead letters are kept in a list with their reasons;
//! - messages may belong to a partition ([`Stored::with_partition`]); [`MemoryBroker::revoke`]
//!   takes a partition away from every current transport (its consumer gives back what it holds
//!   of it, and the transport stops delivering it), as a partitioned consumer group hands a
//!   partition over to another instance; once the partition's deferred copies are back and
//!   settled, as the AMQP transport hands a partition over (a key's later messages must not
//!   reach the next instance before its deferred copy).
//!
//! ```
//! use prereq::memory::MemoryBroker;
//! use prereq::transport::{Transport, Settle};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let broker = MemoryBroker::new();
//! broker.publish(br#"{"id":1}"#.to_vec());
//! let transport = broker.transport();
//! let d = transport.recv().await.unwrap().unwrap();
//! transport.settle(d.id, Settle::Ack).await.unwrap();
//! assert_eq!(broker.stats().acked, 1);
//! # }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::DeadLetter;
use crate::transport::{Delivery, DeliveryId, Settle, Source, Transport};
use unsettled::Unsettled;

mod unsettled;

/// A message as stored by the in-memory broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Message or registration.
    pub source: Source,
    /// The body.
    pub body: Vec<u8>,
    /// Deferrals so far.
    pub attempt: u32,
    /// The per-message limit on deferrals, if any.
    pub max_attempts: Option<u32>,
    /// The message id, if any.
    pub message_id: Option<String>,
    /// Delivered before and not settled.
    pub redelivered: bool,
    /// The partition it belongs to, if any.
    pub partition: Option<u32>,
}

impl Stored {
    /// A new dependent message with this body.
    pub fn message(body: impl Into<Vec<u8>>) -> Self {
        Self {
            source: Source::Message,
            body: body.into(),
            attempt: 0,
            max_attempts: None,
            message_id: None,
            redelivered: false,
            partition: None,
        }
    }

    /// A new registration with this body.
    pub fn registration(body: impl Into<Vec<u8>>) -> Self {
        Self {
            source: Source::Registration,
            ..Self::message(body)
        }
    }

    /// With this message id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// In this partition.
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// With this per-message deferral limit.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// A dead-lettered message and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLettered {
    /// The message as it was delivered.
    pub message: Stored,
    /// The reason.
    pub dead_letter: DeadLetter,
}

/// Counters of what the broker did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages and registrations published from outside.
    pub published: u64,
    /// Deliveries handed to transports (redeliveries included).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Delayed copies stored (broker re-publishes).
    pub deferred: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Deliveries given back (requeue or a transport dropped).
    pub requeued: u64,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Stored>,
    /// Given back (requeued, or their transport dropped), by delivery tag: they go out before
    /// `ready`, in the order they were first delivered, as a broker puts a requeued message
    /// back at its position (one `push_front` per requeue would reverse a batch).
    requeued: BTreeMap<u64, Stored>,
    delayed: BTreeMap<(Instant, u64), Stored>,
    /// Delivered and not settled, by delivery tag: the transport holding each, and the message.
    unacked: Unsettled,
    /// How many of `unacked` each transport holds (the prefetch check runs on every `recv`).
    unacked_per_transport: FxHashMap<NonZeroU64, usize>,
    dead: Vec<DeadLettered>,
    /// The partitions each transport no longer receives.
    revoked: HashMap<NonZeroU64, std::collections::HashSet<u32>>,
    /// Where each transport hears of a revoked partition.
    revocations: HashMap<NonZeroU64, tokio::sync::mpsc::UnboundedSender<u32>>,
    /// Partitions revoked and not released yet: nobody receives them meanwhile (as no other
    /// consumer of a single-active-consumer queue becomes active before the owner lets go).
    handover: std::collections::HashSet<u32>,
    /// Partitions to revoke once their deferred copies are back and settled, with the
    /// transports that keep receiving them (alone) until then.
    leaving: BTreeMap<u32, std::collections::HashSet<NonZeroU64>>,
    /// The partitions consumers released, in order.
    released: Vec<u32>,
    stats: Stats,
    next_id: u64,
    /// Transports made so far.
    next_transport: u64,
    closed: bool,
}

impl State {
    /// Move the delayed copies that are due into the ready queue.
    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    /// Give back a delivery: ahead of `ready`, in delivery order.
    fn requeue(&mut self, tag: u64, mut m: Stored) {
        m.redelivered = true;
        self.stats.requeued += 1;
        self.requeued.insert(tag, m);
    }

    fn unacked_of(&self, transport: NonZeroU64) -> usize {
        self.unacked_per_transport
            .get(&transport)
            .copied()
            .unwrap_or(0)
    }

    /// The next message `transport` may receive: given-back ones first, in delivery order, then
    /// the ready ones; none of a partition revoked from it, or kept by others until its copies
    /// are back.
    fn next_for(&mut self, transport: NonZeroU64) -> Option<Stored> {
        let revoked = self.revoked.get(&transport);
        let (handover, leaving) = (&self.handover, &self.leaving);
        let ours = |m: &Stored| {
            m.partition.is_none_or(|p| {
                !handover.contains(&p)
                    && revoked.is_none_or(|r| !r.contains(&p))
                    && leaving.get(&p).is_none_or(|t| t.contains(&transport))
            })
        };
        if let Some(tag) = self.requeued.iter().find(|(_, m)| ours(m)).map(|(t, _)| *t) {
            return self.requeued.remove(&tag);
        }
        let at = self.ready.iter().position(ours)?;
        self.ready.remove(at)
    }

    /// Is a deferred copy of a message of `partition` (a later attempt) delayed, waiting or
    /// delivered and not settled?
    fn copies_out(&self, partition: u32) -> bool {
        let copy = |m: &Stored| m.partition == Some(partition) && m.attempt > 0;
        self.delayed.values().any(copy)
            || self.ready.iter().any(copy)
            || self.requeued.values().any(copy)
            || self.unacked.iter().any(|(_, _, m)| copy(m))
    }

    /// Take `partition` away from `transports` now.
    fn revoke_now(&mut self, partition: u32, transports: impl IntoIterator<Item = NonZeroU64>) {
        self.handover.insert(partition);
        for id in transports {
            self.revoked.entry(id).or_default().insert(partition);
            if let Some(tx) = self.revocations.get(&id) {
                let _ = tx.send(partition);
            }
        }
    }

    /// Revoke the leaving partitions whose copies are all back and settled (or whose
    /// transports are all gone).
    fn revoke_when_back(&mut self) {
        let done: Vec<u32> = self
            .leaving
            .iter()
            .filter(|(p, kept_by)| kept_by.is_empty() || !self.copies_out(**p))
            .map(|(p, _)| *p)
            .collect();
        for p in done {
            if let Some(kept_by) = self.leaving.remove(&p)
                && !kept_by.is_empty()
            {
                self.revoke_now(p, kept_by);
            }
        }
    }

    /// Hand a copy of `m` to `transport` as delivery `tag`, unsettled.
    fn deliver(&mut self, tag: u64, transport: NonZeroU64, m: Stored) -> Delivery {
        let d = Delivery {
            id: DeliveryId(tag),
            source: m.source,
            body: m.body.clone(),
            attempt: m.attempt,
            max_attempts: m.max_attempts,
            message_id: m.message_id.clone(),
            redelivered: m.redelivered,
            partition: m.partition,
        };
        self.unacked.insert(tag, transport, m);
        *self.unacked_per_transport.entry(transport).or_default() += 1;
        d
    }

    /// One fewer delivery held by `transport`.
    fn settled_by(&mut self, transport: NonZeroU64) {
        if let Some(n) = self.unacked_per_transport.get_mut(&transport) {
            *n -= 1;
        }
    }

    /// Take back delivery `tag` if `transport` holds it.
    fn take_unacked(&mut self, tag: u64, transport: NonZeroU64) -> Option<Stored> {
        let m = self.unacked.take(tag, transport)?;
        self.settled_by(transport);
        Some(m)
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    /// A partition was revoked at some time (set before the revocation, never cleared): until
    /// then no delivery is stale, and `is_stale` answers without the lock that every `recv`
    /// and settlement takes.
    revoked_any: AtomicBool,
}

/// The in-memory broker. Clones share the same queues.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    prefetch: Option<usize>,
    ack_timeout: Option<std::time::Duration>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// An empty broker with no prefetch limit.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                revoked_any: AtomicBool::new(false),
            }),
            prefetch: None,
            ack_timeout: None,
        }
    }

    /// Transports made from now on hold at most `n` unsettled deliveries each (like AMQP
    /// `basic.qos`).
    pub fn with_prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// Transports made from now on report this acknowledgement timeout (like RabbitMQ's
    /// `consumer_timeout`): a consumer holds messages for at most half of it. The in-memory
    /// broker itself never takes a delivery back.
    pub fn with_ack_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publish a stored message (a message or a registration).
    pub fn publish_stored(&self, message: Stored) {
        let mut s = self.lock();
        s.stats.published += 1;
        s.ready.push_back(message);
        drop(s);
        self.shared.changed.notify_waiters();
    }

    /// Publish a dependent message with this body.
    pub fn publish(&self, body: impl Into<Vec<u8>>) {
        self.publish_stored(Stored::message(body));
    }

    /// Publish a registration with this body.
    pub fn register(&self, body: impl Into<Vec<u8>>) {
        self.publish_stored(Stored::registration(body));
    }

    /// A transport (a consumer's connection) on this broker.
    pub fn transport(&self) -> MemoryTransport {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = {
            let mut s = self.lock();
            let id = NonZeroU64::MIN.saturating_add(s.next_transport);
            s.next_transport += 1;
            s.revocations.insert(id, tx);
            id
        };
        MemoryTransport {
            broker: self.clone(),
            id,
            revocations: tokio::sync::Mutex::new(rx),
        }
    }

    /// Take `partition` away from every transport made so far: each stops delivering its
    /// messages, and its consumer gives back what it holds of it (see [`Transport::revoked`]).
    /// Nobody receives the partition until a consumer released it; then transports made after
    /// the revocation do.
    ///
    /// While a deferred copy of a message of the partition (a later attempt) is delayed,
    /// waiting, or delivered and not settled, the revocation waits: the transports made so far
    /// go on receiving the partition (they alone), until the last such copy is settled. Unlike
    /// the AMQP transport, which waits at most for the copies away when the wait began (plus a
    /// grace), this wait has no bound: a test that goes on deferring the partition's messages
    /// keeps it where it is.
    pub fn revoke(&self, partition: u32) {
        let mut s = self.lock();
        self.shared.revoked_any.store(true, Ordering::Release);
        let ids: Vec<NonZeroU64> = s.revocations.keys().copied().collect();
        if s.copies_out(partition) {
            s.leaving.insert(partition, ids.into_iter().collect());
        } else {
            s.revoke_now(partition, ids);
        }
        drop(s);
        self.shared.changed.notify_waiters();
    }

    /// The partitions consumers released after a [`MemoryBroker::revoke`], in order.
    pub fn released(&self) -> Vec<u32> {
        self.lock().released.clone()
    }

    /// Close the broker: transports' `recv` returns `Ok(None)` from now on.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.changed.notify_waiters();
    }

    /// The dead letters so far.
    pub fn dead_letters(&self) -> Vec<DeadLettered> {
        self.lock().dead.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Messages and registrations waiting: ready, delayed, and delivered but unsettled.
    pub fn pending(&self) -> usize {
        let s = self.lock();
        s.ready.len() + s.requeued.len() + s.delayed.len() + s.unacked.len()
    }

    /// Like [`MemoryBroker::pending`], counting only those from `source`.
    pub fn pending_of(&self, source: Source) -> usize {
        let s = self.lock();
        let of = |m: &Stored| m.source == source;
        s.ready.iter().filter(|m| of(m)).count()
            + s.requeued.values().filter(|m| of(m)).count()
            + s.delayed.values().filter(|m| of(m)).count()
            + s.unacked.iter().filter(|(_, _, m)| of(m)).count()
    }
}

/// A consumer's connection to a [`MemoryBroker`]. Dropping it gives back every delivery it did
/// not settle.
pub struct MemoryTransport {
    broker: MemoryBroker,
    id: NonZeroU64,
    /// Partitions revoked from this transport, as they come.
    revocations: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<u32>>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Errors of the in-memory transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The delivery is not (or no longer) held by this transport.
    #[error("unknown delivery {0:?}")]
    UnknownDelivery(DeliveryId),
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        let mut s = self.broker.lock();
        let mine: Vec<u64> = s
            .unacked
            .iter()
            .filter(|(_, t, _)| *t == self.id)
            .map(|(tag, _, _)| tag)
            .collect();
        for tag in mine {
            if let Some(m) = s.take_unacked(tag, self.id) {
                s.requeue(tag, m);
            }
        }
        s.unacked_per_transport.remove(&self.id);
        for kept_by in s.leaving.values_mut() {
            kept_by.remove(&self.id);
        }
        s.revoke_when_back();
        drop(s);
        self.broker.shared.changed.notify_waiters();
    }
}

impl MemoryTransport {
    /// The next delivery for this transport if there is one now, or when to look again.
    fn take(&self) -> Taken {
        let mut s = self.broker.lock();
        if s.closed {
            return Taken::Ready(Ok(None));
        }
        if !s.delayed.is_empty() {
            // The clock only when something waits for it (a read of it is not free where the
            // clock can be paused).
            s.promote_due(Instant::now());
        }
        let room = self
            .broker
            .prefetch
            .is_none_or(|p| s.unacked_of(self.id) < p);
        if room && let Some(m) = s.next_for(self.id) {
            s.next_id += 1;
            let tag = s.next_id;
            s.stats.delivered += 1;
            return Taken::Ready(Ok(Some(s.deliver(tag, self.id, m))));
        }
        Taken::Wait(s.delayed.keys().next().map(|(due, _)| *due))
    }

    /// `recv` when nothing was ready: wait for a change or the next delayed copy's due time,
    /// then look again.
    async fn wait(&self) -> Result<Option<Delivery>, MemoryError> {
        loop {
            // Only `notify_waiters` is used, which wakes every `Notified` made before it, polled
            // or not: no need to register (`enable`, a lock) before looking.
            let changed = self.broker.shared.changed.notified();
            tokio::pin!(changed);
            match self.take() {
                Taken::Ready(got) => return got,
                Taken::Wait(Some(due)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                Taken::Wait(None) => changed.await,
            }
        }
    }
}

/// What `MemoryTransport::take` found.
enum Taken {
    /// What `recv` returns.
    Ready(Result<Option<Delivery>, MemoryError>),
    /// Nothing for now: look again on a change, or at this delayed copy's due time.
    Wait(Option<Instant>),
}

impl Transport for MemoryTransport {
    type Error = MemoryError;

    fn ack_timeout(&self) -> Option<std::time::Duration> {
        self.broker.ack_timeout
    }

    async fn revoked(&self) -> Option<u32> {
        self.revocations.lock().await.recv().await
    }

    fn released(&self, partition: u32) {
        let mut s = self.broker.lock();
        s.released.push(partition);
        s.handover.remove(&partition);
        drop(s);
        self.broker.shared.changed.notify_waiters();
    }

    fn is_stale(&self, id: DeliveryId) -> bool {
        if !self.broker.shared.revoked_any.load(Ordering::Acquire) {
            return false;
        }
        let s = self.broker.lock();
        // Nothing revoked from this transport (the usual case): nothing to look up.
        let Some(revoked) = s.revoked.get(&self.id) else {
            return false;
        };
        let partition = s
            .unacked
            .get(id.0)
            .filter(|(owner, _)| *owner == self.id)
            .and_then(|(_, m)| m.partition);
        partition.is_some_and(|p| revoked.contains(&p))
    }

    /// Cancel-safe: a delivery is taken from the queue only when it is returned.
    ///
    /// A delivery that is ready is taken without waiting state: the future of a `recv` that
    /// finds one at once holds no `Notified` and no timer (the engine moves it on each
    /// delivery); only one that has to wait does (`wait`).
    async fn recv(&self) -> Result<Option<Delivery>, MemoryError> {
        match self.take() {
            Taken::Ready(got) => got,
            Taken::Wait(_) => Box::pin(self.wait()).await,
        }
    }

    fn try_recv(&self) -> Option<Result<Option<Delivery>, MemoryError>> {
        match self.take() {
            Taken::Ready(got) => Some(got),
            Taken::Wait(_) => None,
        }
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), MemoryError> {
        let mut s = self.broker.lock();
        // What a waiting `recv` could act on: a message to deliver again, a delayed copy, or
        // room under this transport's prefetch.
        let wake = self.broker.prefetch.is_some()
            || matches!(settle, Settle::Defer { .. } | Settle::Requeue);
        // An acknowledged message is not taken back: it is dropped as the window moves past it.
        let taken = match settle {
            Settle::Ack => s.unacked.ack(id.0, self.id).then_some(None),
            _ => s.unacked.take(id.0, self.id).map(Some),
        };
        let m = taken.ok_or(MemoryError::UnknownDelivery(id))?;
        s.settled_by(self.id);
        match (settle, m) {
            (Settle::Defer { delay, attempt }, Some(mut m)) => {
                m.attempt = attempt;
                m.redelivered = false;
                s.stats.deferred += 1;
                s.stats.acked += 1;
                s.next_id += 1;
                let seq = s.next_id;
                s.delayed.insert((Instant::now() + delay, seq), m);
            }
            (Settle::DeadLetter(dead_letter), Some(m)) => {
                s.stats.dead_lettered += 1;
                s.stats.acked += 1;
                s.dead.push(DeadLettered {
                    message: m,
                    dead_letter,
                });
            }
            (Settle::Requeue, Some(m)) => s.requeue(id.0, m),
            // An acknowledgement (every other settlement takes its message back).
            _ => s.stats.acked += 1,
        }
        if !s.leaving.is_empty() {
            s.revoke_when_back();
        }
        drop(s);
        if wake {
            self.broker.shared.changed.notify_waiters();
        }
        Ok(())
    }
}
