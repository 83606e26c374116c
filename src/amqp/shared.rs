//! What a transport's consumers and settlements share: the broker, the route, the publisher
//! channel, and every delivery handed out and not settled yet.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::message::Delivery as LapinDelivery;
use lapin::options::BasicCancelOptions;
use lapin::types::ShortString;
use lapin::{Acker, Channel};
use tokio::sync::{Notify, mpsc};

use super::broker::Broker;
use super::copies::{Arrival, Copies};
use super::headers;
use super::health::Health;
use super::packed::Packed;
use super::route::Route;
use crate::transport::{Delivery, DeliveryId, Source};

/// What settling a delivery needs from the original message.
pub(crate) struct Unsettled {
    /// Acknowledges or rejects it on the channel it came on.
    pub(crate) acker: Acker,
    /// The exchange it was published to (shared with the other deliveries of that name).
    pub(crate) exchange: Arc<str>,
    /// The routing key it was published with (shared likewise).
    pub(crate) routing_key: Arc<str>,
    /// Its properties and headers (packed), copied onto deferred and dead-lettered copies.
    pub(crate) properties: Packed,
    /// The body, for copies.
    pub(crate) body: Vec<u8>,
    /// The queue it came from (one name per consumer, shared by its deliveries).
    pub(crate) queue: Arc<str>,
    /// From a stream: it cannot be requeued (a nack closes the connection with
    /// `540 NOT_IMPLEMENTED`), and needs not be: every connect reads the stream again.
    pub(crate) stream: bool,
    /// How many times the broker got it back (quorum queues), and the queue's delivery limit:
    /// a give-back that would reach it is made by a copy instead.
    pub(crate) returns: Option<(u32, u32)>,
    /// When it was received (milliseconds since the Unix epoch): its first-seen time if no
    /// earlier deferral recorded one.
    pub(crate) received_ms: i64,
    /// The partition it came from, for a partitioned route.
    pub(crate) partition: Option<u32>,
    /// Its copy identity ([`headers::COPY`]), for a deferred copy.
    pub(crate) copy: Option<Box<str>>,
}

/// How many distinct exchange and routing key names a transport stores once.
const NAMES_KEPT: usize = 4096;

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
    /// Exchange and routing key names of deliveries, stored once each (up to [`NAMES_KEPT`]).
    names: Mutex<HashSet<Arc<str>>>,
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
            broker,
            route,
            publisher,
            pending: Mutex::new(HashMap::new()),
            names: Mutex::default(),
            next_id: AtomicU64::new(1),
            delay_queues: tokio::sync::Mutex::new(BTreeSet::new()),
            health: Health::default(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Box<Unsettled>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep what settling `d` needs, and describe it to the engine.
    pub(crate) fn register(
        &self,
        d: LapinDelivery,
        queue: &Arc<str>,
        source: Source,
        stream: bool,
        delivery_limit: Option<u32>,
        partition: Option<u32>,
    ) -> Delivery {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let incoming = headers::read_incoming(d.properties.headers().as_ref());
        let copy = headers::get_str(d.properties.headers().as_ref(), headers::COPY)
            .map(String::into_boxed_str);
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
            partition,
        };
        let pending = Box::new(Unsettled {
            acker: d.acker,
            exchange: self.name(d.exchange.as_str()),
            routing_key: self.name(d.routing_key.as_str()),
            properties: Packed::pack(d.properties),
            body: d.data,
            queue: Arc::clone(queue),
            stream,
            returns: delivery_limit.map(|limit| (incoming.delivery_count.unwrap_or(0), limit)),
            received_ms,
            partition,
            copy,
        });
        if let Some(copy) = &pending.copy {
            lock(&self.copies).in_hand(copy, id);
        }
        self.pending().insert(id, pending);
        delivery
    }

    /// `name`, stored once: the stored copy if there is one, else a new one (kept, unless
    /// [`NAMES_KEPT`] names are kept already: routing keys may be unbounded).
    fn name(&self, name: &str) -> Arc<str> {
        let mut names = lock(&self.names);
        if let Some(kept) = names.get(name) {
            return Arc::clone(kept);
        }
        let new: Arc<str> = Arc::from(name);
        if names.len() < NAMES_KEPT {
            names.insert(Arc::clone(&new));
        }
        new
    }

    /// Is `d` a deferred copy delivered twice by the broker: one this transport settled for
    /// good, or still holds on a live channel? Its copy identity if so. See [`super::copies`].
    pub(crate) fn delivered_twice(&self, d: &LapinDelivery) -> Option<String> {
        let copy = headers::get_str(d.properties.headers().as_ref(), headers::COPY)?;
        let live = |holder: u64| match self.pending().get(&holder) {
            Some(u) => u.acker.usable(),
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
        }
    }

    /// Take the delivery `id` out of the pending set, to settle it.
    pub(crate) fn take(&self, id: DeliveryId) -> Option<Box<Unsettled>> {
        let taken = self.pending().remove(&id.0);
        if taken.as_ref().is_some_and(|u| u.partition.is_some()) {
            self.changed.notify_waiters();
        }
        taken
    }

    /// Has the channel of delivery `id` failed since it was delivered (the broker delivers it
    /// again), or is its partition being handed over?
    pub(crate) fn is_stale(&self, id: DeliveryId) -> bool {
        let partition = match self.pending().get(&id.0) {
            Some(u) if !u.acker.usable() => return true,
            Some(u) => u.partition,
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
        let near_limit = p
            .returns
            .is_some_and(|(count, limit)| count.saturating_add(1) >= limit);
        !p.stream && !near_limit && p.partition.is_some()
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
                .any(|u| u.partition == Some(partition))
    }

    /// The hand-over of `partition` is complete: its new deliveries are the consumer's again.
    pub(crate) fn unrevoke(&self, partition: u32) {
        lock(&self.revoked).remove(&partition);
        lock(&self.released).remove(&partition);
    }

    /// Did delivery `id` come back so often that one more return would take it past its
    /// queue's delivery limit?
    pub(crate) fn is_near_limit(&self, id: DeliveryId) -> bool {
        self.pending()
            .get(&id.0)
            .and_then(|p| p.returns)
            .is_some_and(|(count, limit)| one_more_return_exceeds(count, limit))
    }

    /// `queue` is consumed on `channel` by the consumer `tag` now.
    pub(crate) fn track(&self, queue: &str, channel: &Channel, tag: ShortString) {
        lock(&self.consumers).insert(queue.to_owned(), (channel.clone(), tag));
    }

    /// Is the transport stopping (its consumers cancelled on purpose)?
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Cancel every consumer (`basic.cancel`, waiting for the broker's `cancel-ok`): from now on
    /// the broker delivers nothing more to this transport, and what it is given back stays in
    /// the queue. Their channels stay open: what was delivered can still be settled.
    ///
    /// Except a partition's consumer: cancelling the active consumer of a single-active-consumer
    /// queue makes the next one active at once, and it would receive the partition's later
    /// messages while this one still holds earlier messages of their keys (returned only when
    /// its channel closes). A partition's channel is closed instead, at the end, which returns
    /// what it holds at the head of the queue, in delivery order, as the next consumer becomes
    /// active.
    pub(crate) async fn cancel_consumers(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let consumers: Vec<(String, (Channel, ShortString))> =
            lock(&self.consumers).drain().collect();
        for (queue, (channel, tag)) in consumers {
            let partition = self
                .route
                .partitions
                .as_ref()
                .is_some_and(|p| p.index_of(&queue).is_some());
            if partition || !channel.status().connected() {
                continue;
            }
            if let Err(e) = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
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

/// Would one more return of a message the broker got back `count` times
/// (`x-delivery-count`) take it past the queue's delivery `limit`? The broker dead-letters (or
/// drops) a message once it was returned MORE than `limit` times (`x-delivery-limit: 3`: on the
/// 4th return), so a new message (count 0) may always be given back once, even with a limit
/// of 1.
pub(crate) fn one_more_return_exceeds(count: u32, limit: u32) -> bool {
    count >= limit
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::one_more_return_exceeds;

    #[test]
    fn a_give_back_is_a_copy_only_once_the_count_reached_the_limit() {
        // x-delivery-limit 3: the broker dead-letters on the 4th return.
        assert!(!one_more_return_exceeds(0, 3));
        assert!(!one_more_return_exceeds(2, 3));
        assert!(one_more_return_exceeds(3, 3));
        // A limit of 1: a new message may go back once, a returned one may not.
        assert!(!one_more_return_exceeds(0, 1));
        assert!(one_more_return_exceeds(1, 1));
    }
}
