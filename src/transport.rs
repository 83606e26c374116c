//! The seam between the engine and a broker.
//!
//! The engine never sees AMQP: it receives [`Delivery`] values and answers each one with a
//! [`Settle`] decision. A transport turns those into broker operations (ack, a delayed copy, a
//! dead-letter copy, a requeue). Two transports ship with prereq: [`crate::memory`], an in-memory
//! broker for tests, and `amqp` (feature `amqp`), RabbitMQ through lapin.
//!
//! Why so few methods: everything the engine decides fits in one enum ([`Settle`]), so a new
//! transport is small and the engine stays testable on a fake.

use std::future::Future;
use std::time::Duration;

use crate::dead_letter::DeadLetter;

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
/// crash loses nothing, the broker delivers it again. Build one with [`Delivery::message`] or
/// [`Delivery::registration`], then set fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// Handle to settle this delivery with.
    pub id: DeliveryId,
    /// Message or registration.
    pub source: Source,
    /// The raw body, decoded by the engine (a decode error dead-letters the message).
    pub body: Vec<u8>,
    /// Which attempt this delivery is: 0 for a new message, `n` after `n` deferrals (the
    /// numbering of [`crate::Policy`]).
    pub attempt: u32,
    /// A per-message limit on retries, when the sender set one: it can lower the consumer's
    /// limit, never raise it.
    pub max_attempts: Option<u32>,
    /// A stable identifier of the message, if the sender gave one (seeds deterministic jitter).
    pub message_id: Option<String>,
    /// The broker delivered this message before to a consumer that did not settle it.
    pub redelivered: bool,
    /// The partition it came from, when the transport consumes partitions it may give up
    /// ([`Transport::revoked`]).
    pub partition: Option<u32>,
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
            partition: None,
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

/// What a consumer will keep unsettled at most, given to [`Transport::start`] so that the
/// transport can size its prefetch: held messages are unacknowledged deliveries, and a prefetch
/// at or below the hold budget would stop the broker from delivering the very messages that
/// release them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Demand {
    /// At most this many messages held at once (the hold budget).
    pub hold: usize,
    /// At most this many handlers running at once.
    pub concurrency: usize,
}

/// Deliveries a consumer may keep beyond its hold and its running handlers: those waiting for a
/// handler slot, for a key lookup, or in the buffer between the transport and the engine.
pub const DEMAND_HEADROOM: usize = 64;

impl Demand {
    /// A consumer holding up to `hold` messages with up to `concurrency` handlers.
    pub const fn new(hold: usize, concurrency: usize) -> Self {
        Self { hold, concurrency }
    }

    /// The most deliveries the consumer keeps unsettled at once:
    /// `hold + 5 × concurrency + DEMAND_HEADROOM` (saturating): a prefetch at least this large
    /// never stalls delivery.
    pub const fn in_flight(&self) -> usize {
        self.hold
            .saturating_add(self.concurrency.saturating_mul(5))
            .saturating_add(DEMAND_HEADROOM)
    }
}

/// A broker, as the engine sees it.
///
/// `start` is called once, before the first `recv`. `recv` is called from one task at a time;
/// `settle` may be called from many tasks at once (handlers run concurrently), so
/// implementations take `&self` and synchronise inside.
///
/// A transport must never lose a delivery it handed out: until `settle` returns `Ok`, the
/// message stays with the broker.
pub trait Transport: Send + Sync + 'static {
    /// What can go wrong talking to the broker.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Begin consuming, sized for `demand` (the prefetch). The default does nothing.
    fn start(&self, demand: Demand) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = demand;
        async { Ok(()) }
    }

    /// How long the broker lets a delivery stay unacknowledged before it takes it back
    /// (RabbitMQ's `consumer_timeout`). The consumer holds messages for at most half of it.
    /// `None` (the default): no such limit.
    fn ack_timeout(&self) -> Option<Duration> {
        None
    }

    /// The next partition this transport gives up (it stops owning it): the consumer stops
    /// starting handlers for the partition's messages, gives back every one it holds or queues
    /// (in the order received) and, once the partition's running handlers finished, calls
    /// [`Transport::released`]. From the moment a partition is revoked, [`Transport::is_stale`]
    /// must be true for its deliveries (also those still on their way to the consumer).
    /// Cancel-safe. The default never completes (no partitions).
    fn revoked(&self) -> impl Future<Output = Option<u32>> + Send {
        std::future::pending()
    }

    /// The consumer gave back everything it held of `partition`, and runs none of its handlers
    /// any more (see [`Transport::revoked`]). The default does nothing.
    fn released(&self, partition: u32) {
        let _ = partition;
    }

    /// Should delivery `id` not be processed any more: its channel failed since it was
    /// delivered (the broker delivers the message again), or its partition was revoked? The
    /// consumer then gives it back rather than run its handler. The default: never.
    fn is_stale(&self, id: DeliveryId) -> bool {
        let _ = id;
        false
    }

    /// Stop receiving new deliveries, for a graceful stop: called once the consumer decided to
    /// stop, before it gives back what it holds, so that the broker does not deliver a
    /// given-back message straight back to this consumer (each return counts toward a quorum
    /// queue's delivery limit). Deliveries handed out stay settleable; `recv` may still return
    /// those already received. The default does nothing.
    fn stop_receiving(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The consumer is done with the transport: called once, at the end of a run, after every
    /// delivery it was handed out was settled or given back. A transport closes here what it
    /// consumes on, in the order that keeps its queues' order (the AMQP transport closes a
    /// partition's channel, which returns what the channel still holds to the head of the
    /// queue, before its consumer goes). The default does nothing.
    fn finished(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The next delivery, from either stream; `Ok(None)` when the transport is closed for good.
    ///
    /// The consumer keeps one call in flight across the turns of its loop and drops it
    /// unfinished only when it stops, so it need not be cancel-safe while the consumer runs. A
    /// delivery should be handed out only in the poll that returns it: one recorded as handed
    /// out by a call dropped unfinished stays unsettled until the transport closes.
    fn recv(&self) -> impl Future<Output = Result<Option<Delivery>, Self::Error>> + Send;

    /// The next delivery if one is ready now, as [`Transport::recv`] would give it, without
    /// waiting; `None` when `recv` would wait, or when the transport cannot tell (the default).
    ///
    /// The consumer asks this first while no `recv` call of its own is in flight: a transport
    /// whose deliveries wait in memory hands over a run of ready ones without a future made
    /// and polled for each (docs/performance.md, round 19). It need not be implemented: `recv`
    /// alone is enough.
    fn try_recv(&self) -> Option<Result<Option<Delivery>, Self::Error>> {
        None
    }

    /// Carry out the engine's decision for a delivery.
    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
