//! What a transport's consumers and settlements share: the broker, the route, the publisher
//! channel, and every delivery handed out and not settled yet.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Channel;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::BasicCancelOptions;
use lapin::types::ShortString;
use tokio::sync::{Notify, mpsc};

use super::acks::Acks;
use super::away::Away;
use super::broker::{Broker, answered};
use super::copies::{Arrival, Copies};
use super::headers;
use super::health::Health;
use super::packed::Packed;
use super::route::Route;
use super::via::Via;
use crate::transport::{Delivery, DeliveryId, Source};

/// What settling a delivery needs from the original message.
pub(crate) struct Unsettled {
    /// Settles it on the channel it came on.
    pub(crate) acks: Arc<Acks>,
    /// Its delivery tag on that channel.
    pub(crate) tag: u64,
    /// Its queue, exchange and routing key (shared with the deliveries that came the same way).
    pub(crate) via: Arc<Via>,
    /// Its properties and headers (packed), copied onto deferred and dead-lettered copies.
    pub(crate) properties: Packed,
    /// The body, for copies.
    pub(crate) body: Vec<u8>,
    /// How many times the broker got it back (`x-delivery-count`, quorum queues), against its
    /// queue's delivery limit.
    pub(crate) returns: u32,
    /// When it was received (milliseconds since the Unix epoch): its first-seen time if no
    /// earlier deferral recorded one.
    pub(crate) received_ms: i64,
    /// A deferred copy: its properties carry a copy identity ([`headers::COPY`]).
    pub(crate) is_copy: bool,
}

impl Unsettled {
    /// Would one more return take it past its queue's delivery limit?
    pub(crate) fn near_limit(&self) -> bool {
        self.via.near_limit(self.returns)
    }

    /// Its copy identity, for a deferred copy (read again from its properties: copies are
    /// few, and the record stays smaller for every other delivery).
    pub(crate) fn copy(&self) -> Option<String> {
        if !self.is_copy {
            return None;
        }
        let props = self.properties.unpack().ok()?;
        headers::get_str(props.headers().as_ref(), headers::COPY)
    }

    /// The partition it came from, for a partitioned route.
    pub(crate) fn partition(&self) -> Option<u32> {
        self.via.partition
    }
}

/// The state of one transport.
pub(crate) struct Shared {
    /// The connection.
    pub(crate) broker: Broker,
    /// The topology.
    pub(crate) route: Route,
    /// Copies (deferred, dead-lettered, given back) are published on it, in confirm mode.
    pub(crate) publisher: Channel,
    /// Deliveries handed out and not settled, by id. Boxed: the table's empty slots then cost a
    /// pointer each, not a whole record (its capacity runs up to twice its length).
    pending: Mutex<HashMap<u64, Box<Unsettled>>>,
    /// The next delivery id.
    next_id: AtomicU64,
    /// The delay queues declared so far, by delay.
    pub(crate) delay_queues: tokio::sync::Mutex<BTreeSet<Duration>>,
    /// What the transport consumes.
    pub(crate) health: Health,
    /// Partitions being handed over: their deliveries are stale to the consumer.
    revoked: Mutex<HashSet<u32>>,
    /// Partitions the consumer released (it holds and runs nothing of them any more).
    released: Mutex<HashSet<u32>>,
    /// Woken when a delivery is settled or a partition released.
    pub(crate) changed: Notify,
    /// Tells the consumer which partitions to give back ([`crate::transport::Transport::revoked`]).
    pub(crate) revocations: mpsc::UnboundedSender<u32>,
    /// The consumers' channels, to close with the transport.
    pub(crate) channels: Mutex<Vec<Channel>>,
    /// The current consumer of each queue (its channel and tag), to cancel at a graceful stop.
    consumers: Mutex<HashMap<String, (Channel, ShortString)>>,
    /// Set at a graceful stop: consumers the broker ends are not re-subscribed.
    stopping: AtomicBool,
    /// Deferred copies in hand and settled, to drop the ones the broker delivers twice.
    copies: Mutex<Copies>,
    /// Deferred copies of partitions' messages not back and settled yet: a partition is kept
    /// until its copies are back (see [`super::away`]).
    away: Mutex<Away>,
}

impl Shared {
    pub(crate) fn new(
        broker: Broker,
        route: Route,
        publisher: Channel,
        revocations: mpsc::UnboundedSender<u32>,
    ) -> Self {
        Self {
            revoked: Mutex::default(),
            released: Mutex::default(),
            changed: Notify::new(),
            revocations,
            channels: Mutex::default(),
            consumers: Mutex::default(),
            stopping: AtomicBool::new(false),
            copies: Mutex::default(),
            away: Mutex::default(),
            broker,
            route,
            publisher,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            delay_queues: tokio::sync::Mutex::new(BTreeSet::new()),
            health: Health::default(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Box<Unsettled>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep what settling `d`, which came by `via`, needs, and describe it to the engine.
    pub(crate) fn register(
        &self,
        d: LapinDelivery,
        via: Arc<Via>,
        source: Source,
        acks: &Arc<Acks>,
    ) -> Delivery {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let incoming = headers::read_incoming(d.properties.headers().as_ref());
        let copy = headers::get_str(d.properties.headers().as_ref(), headers::COPY);
        let received_ms = headers::now_ms();
        self.health.delivered(received_ms);
        let delivery = Delivery {
            id: DeliveryId(id),
            source,
            body: d.data.clone(),
            attempt: incoming.attempt,
            max_attempts: incoming.max_attempts,
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            redelivered: d.redelivered,
            partition: via.partition,
        };
        let pending = Box::new(Unsettled {
            acks: Arc::clone(acks),
            tag: d.delivery_tag,
            via,
            properties: Packed::pack(d.properties),
            body: d.data,
            returns: incoming.delivery_count.unwrap_or(0),
            received_ms,
            is_copy: copy.is_some(),
        });
        if let Some(copy) = &copy {
            lock(&self.copies).in_hand(copy, id);
        }
        self.pending().insert(id, pending);
        delivery
    }

    /// Is `d` a deferred copy delivered twice by the broker: one this transport settled for
    /// good, or still holds on a live channel? Its copy identity if so. See [`super::copies`].
    pub(crate) fn delivered_twice(&self, d: &LapinDelivery) -> Option<String> {
        let copy = headers::get_str(d.properties.headers().as_ref(), headers::COPY)?;
        let live = |holder: u64| match self.pending().get(&holder) {
            Some(u) => !u.acks.is_void(),
            // Taken out to be acknowledged, deferred or dead-lettered: a fresh delivery of the
            // copy is the broker's duplicate; a redelivered one means that settle did not take
            // (its channel failed), and the broker gives the copy back.
            None => !d.redelivered,
        };
        let twice = lock(&self.copies).arrives(&copy, live) == Arrival::Duplicate;
        twice.then_some(copy)
    }

    /// Delivery `id` (`copy`, if a deferred copy) was settled: for good (`done`) or not.
    pub(crate) fn copy_settled(&self, copy: Option<&str>, id: DeliveryId, done: bool) {
        if let Some(copy) = copy {
            lock(&self.copies).settled(copy, id.0, done);
            if lock(&self.away).settled(copy) {
                self.changed.notify_waiters();
            }
        }
    }

    /// A deferred copy of a message of `partition` was published, to come back after `delay`.
    pub(crate) fn copy_away(&self, copy: String, partition: u32, delay: Duration) {
        lock(&self.away).sent(copy, partition, delay, tokio::time::Instant::now());
    }

    /// Until when the deferred copies of `partition` still away may be waited for; `None` when
    /// none is.
    pub(crate) fn copies_out_until(&self, partition: u32) -> Option<tokio::time::Instant> {
        lock(&self.away).out_until(partition, tokio::time::Instant::now())
    }

    /// Take the delivery `id` out of the pending set, to settle it.
    pub(crate) fn take(&self, id: DeliveryId) -> Option<Box<Unsettled>> {
        let taken = self.pending().remove(&id.0);
        if taken.as_ref().is_some_and(|u| u.partition().is_some()) {
            self.changed.notify_waiters();
        }
        taken
    }

    /// Has the channel of delivery `id` failed since it was delivered (the broker delivers it
    /// again), or is its partition being handed over?
    pub(crate) fn is_stale(&self, id: DeliveryId) -> bool {
        let partition = match self.pending().get(&id.0) {
            Some(u) if u.acks.is_void() => return true,
            Some(u) => u.partition(),
            None => None,
        };
        partition.is_some_and(|p| lock(&self.revoked).contains(&p))
    }

    /// Start handing `partition` over: its deliveries are stale from now on, and the consumer
    /// is told to give back what it holds of it.
    pub(crate) fn revoke(&self, partition: u32) {
        lock(&self.released).remove(&partition);
        lock(&self.revoked).insert(partition);
        let _ = self.revocations.send(partition);
    }

    /// Is `p` from a partition queue, and so given back by its channel's close rather than by
    /// a requeue of its own?
    ///
    /// The engine gives a partition's messages back only when the partition is handed over,
    /// or when the consumer stops. A requeue one by one breaks a key's order on a quorum queue:
    /// the broker hands a returned message out again before anything else, to this consumer
    /// while it is still the active one (behind later messages it holds already), and to the
    /// next one otherwise (which may have taken later messages already). Left unsettled, it goes
    /// back with the channel's close (the hand-over's, or the transport's when it stops) with
    /// everything else the channel was given, in the order it was delivered, before the next
    /// consumer is served. Not when a return would reach its queue's delivery limit: that one
    /// is given back by a copy.
    pub(crate) fn returned_by_close(&self, p: &Unsettled) -> bool {
        !p.via.stream && !p.near_limit() && p.via.single_active
    }

    /// The consumer released `partition`.
    pub(crate) fn release(&self, partition: u32) {
        lock(&self.released).insert(partition);
        self.changed.notify_waiters();
    }

    /// Is the hand-over of `partition` done on the consumer's side: released, and none of its
    /// deliveries unsettled?
    pub(crate) fn handed_over(&self, partition: u32) -> bool {
        lock(&self.released).contains(&partition)
            && !self
                .pending()
                .values()
                .any(|u| u.partition() == Some(partition))
    }

    /// The hand-over of `partition` is complete: its new deliveries are the consumer's again.
    pub(crate) fn unrevoke(&self, partition: u32) {
        lock(&self.revoked).remove(&partition);
        lock(&self.released).remove(&partition);
    }

    /// Did delivery `id` come back so often that one more return would take it past its
    /// queue's delivery limit?
    pub(crate) fn is_near_limit(&self, id: DeliveryId) -> bool {
        self.pending().get(&id.0).is_some_and(|p| p.near_limit())
    }

    /// `queue` is consumed on `channel` by the consumer `tag` now.
    pub(crate) fn track(&self, queue: &str, channel: &Channel, tag: ShortString) {
        lock(&self.consumers).insert(queue.to_owned(), (channel.clone(), tag));
    }

    /// Is the transport stopping (its consumers cancelled on purpose)?
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The transport stops: a consumer that ends from now on is not subscribed again.
    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Cancel every consumer (`basic.cancel`, waiting for the broker's `cancel-ok`): from now on
    /// the broker delivers nothing more to this transport, and what it is given back stays in
    /// the queue. Their channels stay open: what was delivered can still be settled.
    ///
    /// Except the consumer of a partition or of another single-active-consumer queue:
    /// cancelling the active consumer of such a queue makes the next one active at once, and it
    /// would receive later messages while this one still holds earlier messages of their keys
    /// (returned only when its channel closes). Its channel is closed instead, at the end
    /// ([`super::AmqpTransport::close`]), which returns what it holds at the head of the queue,
    /// in delivery order, as the next consumer becomes active.
    pub(crate) async fn cancel_consumers(&self) {
        self.stopping();
        let consumers: Vec<(String, (Channel, ShortString))> =
            lock(&self.consumers).drain().collect();
        for (queue, (channel, tag)) in consumers {
            // Every partition's queue is declared single-active too (`Partitions::queue`).
            let one_active = self
                .route
                .consume
                .iter()
                .any(|q| q.name == queue && q.single_active);
            if one_active || !channel.status().connected() {
                continue;
            }
            let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
            if let Err(e) = answered("a consumer's cancel", cancel).await {
                tracing::debug!(target: "prereq", queue = %queue,
                    error = %self.broker.addr().scrub(&e.to_string()),
                    "could not cancel a consumer at stop");
            }
        }
    }

    /// Deliveries handed out and not settled yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending().len()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unsettled_record_fits_a_96_byte_allocation() {
        // Boxed, one per held message: past 88 bytes the allocator hands out 112 (glibc's
        // 16-byte steps, 8 of them its own). 120 bytes before the channel's settlements went
        // to one task per channel (`acks`): a handle and a tag instead of lapin's `Acker`.
        let size = std::mem::size_of::<super::Unsettled>();
        assert!(size <= 88, "Unsettled is {size} bytes");
    }
}
