//! Consuming one queue, for as long as the transport runs: riding out connection recoveries,
//! and re-subscribing when the broker ends the consumer (the queue was deleted, or on RabbitMQ
//! 4.3 an acknowledgement timeout on a quorum queue) — never stopping silently.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::acks::Acks;
use super::away::Leave;
use super::broker::answered;
use super::declare::{declare_queue, short};
use super::error::AmqpError;
use super::group::Assignment;
use super::headers;
use super::packed::Packed;
use super::route::{Queue, QueueKind};
use super::shared::{Shared, Unsettled};
use super::via::Vias;
use crate::probe::{self, Stage};
use crate::transport::{Delivery, Source};

/// The first pause before re-subscribing a cancelled consumer; pauses double…
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
/// …up to this.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// The pause before handing a partition over a second time without a change of the group's
/// view; pauses double…
const BOUNCE_PAUSE: Duration = Duration::from_millis(100);
/// …up to this.
const BOUNCE_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Past this many deliveries open on a consumer's channel, the consumer moves on to a fresh
/// channel ([`move_on`]). RabbitMQ finds the delivery an acknowledgement names by walking the
/// channel's unacknowledged deliveries from the oldest, so every acknowledgement behind `n`
/// held messages costs the broker `n` steps (measured: 10 000 held took a consumer from 33 900
/// to 344 messages a second; docs/performance.md). What is held stays behind on the old
/// channel, and acknowledgements on the fresh one walk past at most this many.
const MOVE_ON_AT: usize = 1024;

/// The most channels a transport keeps open after moving on from them (each closes once every
/// delivery it carried is settled); past it, a consumer stays on its channel.
const RETIRED_MAX: usize = 256;

/// What one consumer feeds the transport.
pub(crate) struct Consumption {
    /// The queue.
    pub(crate) queue: Queue,
    /// Messages or registrations.
    pub(crate) source: Source,
    /// Its prefetch.
    pub(crate) prefetch: u16,
    /// For a partition of a group: its index, and the partitions this instance owns.
    pub(crate) partition: Option<(u32, watch::Receiver<Assignment>)>,
}

/// Where deliveries go: the transport's receiver.
pub(crate) type Deliveries = mpsc::Sender<Result<Delivery, AmqpError>>;

/// Consume `c.queue` until the transport is dropped; send an error and stop if the consumer
/// cannot be restored within the reconnect timeout.
pub(crate) async fn consume(shared: Arc<Shared>, c: Consumption, tx: Deliveries) {
    let name = c.queue.name.clone();
    // One consumer active at a time (a queue declared so; every partition's is): it gives back
    // by its channel's close, and is closed rather than cancelled at a stop.
    let one_active = c.queue.single_active;
    // One record per exchange and routing key, shared by the unsettled deliveries.
    let mut vias = Vias::new(
        &name,
        c.queue.kind == QueueKind::Stream,
        c.queue.effective_delivery_limit(),
        c.partition.as_ref().map(|(i, _)| *i),
        one_active,
    );
    let mut c = c;
    // A first subscription that fails (the connection dropped while the channel opened, say)
    // is retried like any later one, within the reconnect timeout.
    let mut subscribed = match subscribe(&shared, &c).await {
        Ok(s) => Some(s),
        Err(e) => {
            if tx.is_closed() || shared.is_stopping() {
                return;
            }
            warn!(target: "prereq", queue = %name, error = %e,
                "could not consume yet; retrying within the reconnect timeout");
            None
        }
    };
    loop {
        if let Some((channel, consumer)) = subscribed.take() {
            shared.health.set(&name, true);
            let ended = forward(&shared, &mut c, channel, consumer, &mut vias, &tx).await;
            if tx.is_closed() || shared.is_stopping() {
                return;
            }
            shared.health.set(&name, false);
            match ended {
                Ended::Cancelled => warn!(target: "prereq", queue = %name,
                    "the broker ended the consumer (queue deleted? ack timeout?); re-subscribing"),
                Ended::Failed(e) => warn!(target: "prereq", queue = %name, error = %e,
                    "the consumer's channel failed; re-subscribing"),
            }
        }
        match resubscribe(&shared, &c, &tx).await {
            Ok((channel, consumer)) if shared.is_stopping() => {
                if one_active {
                    // Closed, not cancelled: a cancel would make the next consumer active while
                    // this channel still holds what it was given (see `Shared::cancel_consumers`).
                    let close = channel.close(200, "prereq: stopping".into());
                    let _ = answered("closing a channel", close).await;
                } else {
                    let cancel =
                        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                    let _ = answered("a consumer's cancel", cancel).await;
                }
                return;
            }
            Ok(s) => {
                info!(target: "prereq", queue = %name, "consuming again");
                subscribed = Some(s);
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

enum Ended {
    /// The stream ended: the broker cancelled the consumer.
    Cancelled,
    /// The channel failed and did not recover.
    Failed(AmqpError),
}

/// Open a channel, set its prefetch and consume.
async fn subscribe(shared: &Shared, c: &Consumption) -> Result<(Channel, Consumer), AmqpError> {
    let channel = open_channel(shared, c).await?;
    let consumer = start_consuming(shared, c, &channel).await?;
    Ok((channel, consumer))
}

/// Open a consumer channel for `c` (kept with the transport's channels, to close with it) and
/// set its prefetch.
async fn open_channel(shared: &Shared, c: &Consumption) -> Result<Channel, AmqpError> {
    let channel = shared.broker.channel("open a consumer channel").await?;
    {
        let mut channels = shared
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Channels closed since (retired ones, handed-over partitions) need no closing.
        channels.retain(|ch| {
            let status = ch.status();
            status.connected() || status.initializing() || status.closing()
        });
        channels.push(channel.clone());
    }
    channel
        .basic_qos(c.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| {
            let addr = shared.broker.addr();
            addr.broker_error(format!("set the prefetch on {}", c.queue.name), &e)
        })?;
    Ok(channel)
}

/// Consume `c.queue` on `channel`; the consumer is tracked as the queue's current one.
async fn start_consuming(
    shared: &Shared,
    c: &Consumption,
    channel: &Channel,
) -> Result<Consumer, AmqpError> {
    let name = &c.queue.name;
    let mut arguments = FieldTable::default();
    if c.queue.kind == QueueKind::Stream {
        // Every key ever registered (within the stream's retention), on every connect.
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    let consumer = channel
        .basic_consume(
            short(name)?,
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| {
            shared
                .broker
                .addr()
                .broker_error(format!("consume {name}"), &e)
        })?;
    shared.track(name, channel, consumer.tag());
    Ok(consumer)
}

/// Re-subscribe with backoff: wait for the connection, declare the queue again if prereq owns
/// it (it may have been deleted), consume. Gives up after the reconnect timeout.
async fn resubscribe(
    shared: &Shared,
    c: &Consumption,
    tx: &Deliveries,
) -> Result<(Channel, Consumer), AmqpError> {
    let limit = shared.broker.options().get_reconnect_timeout();
    let started = tokio::time::Instant::now();
    let mut wait = RESUBSCRIBE_FIRST;
    loop {
        let attempt = async {
            if !shared.broker.connected() {
                return Err(AmqpError::Broker {
                    operation: format!("consume {}", c.queue.name),
                    message: "the connection is recovering".into(),
                });
            }
            let declaring = shared.broker.channel("open a declaring channel").await?;
            // A queue someone else declares is only checked: if it is gone, that is an error
            // prereq may not repair, and it says so.
            declare_queue(&declaring, &c.queue, shared.broker.addr()).await?;
            if c.queue.declare {
                for (exchange, key) in &c.queue.bindings {
                    if exchange.name.is_empty() {
                        continue;
                    }
                    declaring
                        .queue_bind(
                            short(&c.queue.name)?,
                            short(&exchange.name)?,
                            short(key)?,
                            Default::default(),
                            FieldTable::default(),
                        )
                        .await
                        .map_err(|e| {
                            shared
                                .broker
                                .addr()
                                .broker_error(format!("bind {}", c.queue.name), &e)
                        })?;
                }
            }
            let _ = answered("closing a channel", declaring.close(200, "declared".into())).await;
            subscribe(shared, c).await
        };
        match attempt.await {
            Ok(subscribed) => return Ok(subscribed),
            Err(e) if started.elapsed() >= limit => {
                return Err(AmqpError::Broker {
                    operation: format!("consume {}", c.queue.name),
                    message: format!(
                        "the consumer could not be restored within {limit:?} (the reconnect \
                         timeout): {e}"
                    ),
                });
            }
            Err(e) => {
                warn!(target: "prereq", queue = %c.queue.name, error = %e, retry_in = ?wait,
                    "could not consume again yet");
            }
        }
        if tx.is_closed() {
            return Err(AmqpError::Broker {
                operation: format!("consume {}", c.queue.name),
                message: "the transport is gone".into(),
            });
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESUBSCRIBE_MAX);
    }
}

/// What one turn of [`forward`]'s loop does next.
#[allow(
    clippy::large_enum_variant,
    reason = "made and taken apart within one turn, on the stack; boxing the delivery would cost an \
              allocation for each"
)]
enum Turn {
    /// Take what the consumer gave (a delivery, its interruption or its end).
    Next(Option<Result<LapinDelivery, lapin::Error>>),
    /// Hand the partition over, returning these deliveries set aside with it.
    HandOver(Vec<LapinDelivery>),
    /// Nothing to do: wait again.
    Again,
}

/// Move deliveries from one lapin consumer to the transport, riding out connection recoveries,
/// until the consumer ends. A partition's consumer hands the partition over whenever this
/// instance does not own it, once the copies it deferred from it are back and settled.
async fn forward(
    shared: &Arc<Shared>,
    c: &mut Consumption,
    mut channel: Channel,
    mut consumer: Consumer,
    vias: &mut Vias,
    tx: &Deliveries,
) -> Ended {
    let name = Arc::clone(vias.queue());
    // Settles what this life of the channel delivers.
    let mut acks = Acks::new(channel.clone());
    // A partition's or a single-active queue's consumer cannot step aside for a moment (the
    // broker would make another instance's consumer the active one), nor a stream's (it would
    // read the stream again from its start); registrations are not held.
    let may_move_on = c.source == Source::Message
        && c.partition.is_none()
        && !c.queue.single_active
        && c.queue.kind != QueueKind::Stream;
    // Set while this instance no longer owns its partition but keeps it until the copies it
    // deferred from it are back and settled (see `super::away`).
    let mut leave = Leave::default();
    let partition = c.partition.as_ref().map(|(i, _)| *i);
    // One consumer active at a time: it must not be cancelled while its channel holds what it
    // was given (see `gone`).
    let one_active = c.queue.single_active;
    // Hand-overs since the group's assignment last changed: the broker made this consumer
    // active again after each (see `bounce_pause`).
    let mut bounces = 0u32;
    loop {
        let owned = |c: &Consumption| {
            c.partition
                .as_ref()
                .is_none_or(|(i, owned)| owned.borrow().owns(*i))
        };
        let ownership_changed = async {
            match c.partition.as_mut() {
                Some((_, owned)) => {
                    if owned.changed().await.is_err() {
                        // The group is gone (the transport is stopping): no more changes.
                        std::future::pending::<()>().await;
                    }
                    true
                }
                None => std::future::pending().await,
            }
        };
        let back = async {
            match partition {
                Some(p) => copies_back(shared, p, leave.by()).await,
                None => std::future::pending().await,
            }
        };
        let turn = tokio::select! {
            next = consumer.next() => Turn::Next(next),
            changed = ownership_changed => {
                bounces = 0;
                if !changed || owned(c) {
                    leave.end();
                    Turn::Again
                } else if keeps(shared, partition, &mut leave, &name) {
                    Turn::Again
                } else {
                    bounces = 1;
                    Turn::HandOver(Vec::new())
                }
            }
            () = back, if leave.waiting() => {
                leave.end();
                if owned(c) { Turn::Again } else { Turn::HandOver(Vec::new()) }
            }
            () = tx.closed() => return gone(&mut consumer, one_active).await,
        };
        let kept = match turn {
            Turn::Again => continue,
            Turn::HandOver(kept) => kept,
            Turn::Next(next) => {
                let mut open = 0;
                if let Some(Ok(d)) = &next {
                    if acks.is_void() && !d.acker.poisoned() {
                        // The channel failed and recovered in place: a new life, with new
                        // delivery tags (the old life's deliveries are the broker's again).
                        acks = Acks::new(channel.clone());
                    }
                    open = acks.opened(d);
                }
                let mut hand = matches!(next, Some(Ok(_)))
                    && !owned(c)
                    && !keeps(shared, partition, &mut leave, &name);
                if hand && let Some(pause) = bounce_pause(bounces) {
                    // Made active again on a partition this instance does not own, with no
                    // change of the group's view: its owner is not subscribed (it crashed and
                    // has not expired yet, or its consumer failed). Each hand-over returns what
                    // the consumer was given, one more toward the queue's delivery limit: wait
                    // before the next one.
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = tx.closed() => return gone(&mut consumer, one_active).await,
                    }
                    hand = !owned(c) && !keeps(shared, partition, &mut leave, &name);
                }
                match next {
                    Some(Ok(d)) if hand => {
                        // Active on a partition another instance owns: give it up, this
                        // delivery too.
                        bounces = bounces.saturating_add(1);
                        vec![d]
                    }
                    Some(Ok(d)) => {
                        if take(shared, c, vias, &acks, d, tx).await.is_err() {
                            return gone(&mut consumer, one_active).await;
                        }
                        if may_move_on
                            && open >= MOVE_ON_AT
                            && shared.health.retired_channels() < RETIRED_MAX
                        {
                            match move_on(shared, c, &channel, &mut consumer, &acks, vias, tx).await
                            {
                                Ok(Some((ch, fresh))) => {
                                    acks.retire(&shared.health);
                                    acks = Acks::new(ch.clone());
                                    (channel, consumer) = (ch, fresh);
                                }
                                Ok(None) => {}
                                Err(ended) => return ended,
                            }
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        warn!(target: "prereq", queue = %name,
                            error = %shared.broker.addr().scrub(&e.to_string()),
                            "consumer interrupted, waiting for the connection to recover");
                        if let Err(e) = channel.wait_for_recovery(e).await {
                            return Ended::Failed(
                                shared
                                    .broker
                                    .addr()
                                    .broker_error(format!("consume {name}"), &e),
                            );
                        }
                        info!(target: "prereq", queue = %name, "consumer recovered");
                        continue;
                    }
                    None => return Ended::Cancelled,
                }
            }
        };
        // Active on a partition another instance owns, or kept until now for its copies: give
        // it up with what was set aside.
        match hand_over(shared, c, &channel, &acks, consumer, vias, kept).await {
            Ok(Some(handed)) => (channel, consumer, acks) = handed,
            // Handed over as the transport stops: no standby.
            Ok(None) => return Ended::Cancelled,
            Err(e) => return Ended::Failed(e),
        }
    }
}

/// The transport's receiver is gone (the consumer's run was dropped mid-way): the consumer
/// ends. One that is the only active consumer of its queue (a partition, a single-active queue)
/// ends with its channel, which the dropped transport closes in the background: returning now
/// would drop the consumer, and lapin cancels a consumer it drops, so the broker would make the
/// next instance's consumer active while this channel still holds earlier messages of a key.
/// Until the close, what still comes is left unsettled: the close returns it, in order.
async fn gone(consumer: &mut Consumer, one_active: bool) -> Ended {
    if one_active {
        while let Some(Ok(_left_to_the_close)) = consumer.next().await {}
    }
    Ended::Cancelled
}

/// Does this consumer keep `partition`, which this instance no longer owns, because copies it
/// deferred from it are still away (and not past the time they had when the wait began)? Logs
/// when it starts keeping it.
fn keeps(shared: &Shared, partition: Option<u32>, leave: &mut Leave, queue: &str) -> bool {
    let Some(p) = partition else {
        return false;
    };
    let (was, now) = (leave.waiting(), Instant::now());
    let keeps = leave.keeps(shared.copies_out_until(p), now);
    if keeps && !was {
        info!(target: "prereq", queue = %queue,
            within = ?leave.by().map(|by| by.saturating_duration_since(now)),
            "partition kept until the copies deferred from it are back");
    }
    keeps
}

/// How long to wait before handing a partition over again, after `bounces` hand-overs since the
/// group's assignment last changed: none before the first, then [`BOUNCE_PAUSE`] doubling up to
/// [`BOUNCE_PAUSE_MAX`].
/// A partition whose owner does not consume it then bounces between the other instances a few
/// times a second rather than thousands of times (`tests/amqp_hand_over_bounces.rs`).
fn bounce_pause(bounces: u32) -> Option<Duration> {
    let first = bounces.checked_sub(1)?;
    Some((BOUNCE_PAUSE * 2u32.saturating_pow(first.min(4))).min(BOUNCE_PAUSE_MAX))
}

/// Until the deferred copies of `partition` are back and settled, or `by` passed.
async fn copies_back(shared: &Shared, partition: u32, by: Option<Instant>) {
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (Some(_), Some(by)) = (shared.copies_out_until(partition), by) else {
            return;
        };
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep_until(by) => return,
        }
    }
}

/// Hand one delivery to the transport's receiver; or acknowledge it, if it is a deferred copy
/// the broker delivered twice; or copy it back, if one more return would take it past its
/// queue's delivery limit. `Err` once the receiver is gone.
async fn take(
    shared: &Arc<Shared>,
    c: &Consumption,
    vias: &mut Vias,
    acks: &Arc<Acks>,
    d: LapinDelivery,
    tx: &Deliveries,
) -> Result<(), Ended> {
    if let Some(copy) = shared.delivered_twice(&d) {
        let name = Arc::clone(vias.queue());
        drop_duplicate(shared, acks, d, &name, &copy).await;
        return Ok(());
    }
    let taken = probe::now();
    let via = vias.get(d.exchange.as_str(), d.routing_key.as_str());
    let delivery = shared.register(d, via, c.source, acks);
    probe::stamp(Stage::Taken, c.source, delivery.id, taken);
    if let Some(refresh) = near_limit(shared, &delivery) {
        // One more return would take it past the queue's delivery limit: start a new count
        // now, while the message is in hand.
        tokio::spawn(refresh);
        return Ok(());
    }
    probe::stamp(Stage::Forwarded, c.source, delivery.id, None);
    tx.send(Ok(delivery)).await.map_err(|_| Ended::Cancelled)
}

/// Move the consumer to a fresh channel: open it, cancel the consumer on the old one, take
/// what the old one still delivers (the broker sends nothing on it after `cancel-ok`), then
/// consume on the fresh one. Deliveries reach the engine in the queue's order. The old channel
/// stays open for what it carried (held messages, running handlers) and closes once every
/// delivery of it is settled ([`Acks::retire`]).
///
/// `Ok(None)`: the fresh channel could not be opened, or the cancel failed; the consumer stays
/// where it is. `Err`: the consumer ended meanwhile (the connection failed, the transport
/// stops); the caller re-subscribes or returns.
async fn move_on(
    shared: &Arc<Shared>,
    c: &Consumption,
    channel: &Channel,
    consumer: &mut Consumer,
    acks: &Arc<Acks>,
    vias: &mut Vias,
    tx: &Deliveries,
) -> Result<Option<(Channel, Consumer)>, Ended> {
    let name = &c.queue.name;
    let fresh = match open_channel(shared, c).await {
        Ok(ch) => ch,
        Err(e) => {
            debug!(target: "prereq", queue = %name, error = %e,
                "could not open a fresh consumer channel; staying on this one");
            return Ok(None);
        }
    };
    let close = |reason: &'static str| {
        let fresh = fresh.clone();
        async move {
            let _ = answered("closing a channel", fresh.close(200, reason.into())).await;
        }
    };
    let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
    if let Err(e) = answered("a consumer's cancel", cancel).await {
        debug!(target: "prereq", queue = %name,
            error = %shared.broker.addr().scrub(&e.to_string()),
            "could not cancel the consumer to move it to a fresh channel; staying");
        close("prereq: not needed").await;
        return Ok(None);
    }
    while let Some(next) = consumer.next().await {
        match next {
            Ok(d) => {
                acks.opened(&d);
                take(shared, c, vias, acks, d, tx).await?;
            }
            Err(e) => {
                close("prereq: not needed").await;
                let e = shared
                    .broker
                    .addr()
                    .broker_error(format!("consume {name}"), &e);
                return Err(Ended::Failed(e));
            }
        }
    }
    if shared.is_stopping() {
        close("prereq: stopping").await;
        return Err(Ended::Cancelled);
    }
    let next = start_consuming(shared, c, &fresh)
        .await
        .map_err(Ended::Failed)?;
    if shared.is_stopping() {
        // The stop cancelled the consumers it knew before this one was tracked.
        let cancel = fresh.basic_cancel(next.tag(), BasicCancelOptions::default());
        let _ = answered("a consumer's cancel", cancel).await;
        return Err(Ended::Cancelled);
    }
    debug!(target: "prereq", queue = %name, "consuming on a fresh channel");
    Ok(Some((fresh, next)))
}

/// Hand a partition over: the consumer gives back what it holds of it and lets its handlers
/// finish; meanwhile new deliveries are kept aside; then the channel is closed and the
/// partition consumed again, on a new channel, as a standby (the broker makes it active again
/// only when the active consumer goes). `None` when the transport stops: no standby then.
///
/// What the consumer gives back is not requeued one by one ([`Shared::returned_by_close`]):
/// closing the channel returns everything it was given and did not settle in one step, in the
/// order it was delivered, so a later message of a key does not overtake an earlier one.
async fn hand_over(
    shared: &Arc<Shared>,
    c: &Consumption,
    channel: &Channel,
    acks: &Arc<Acks>,
    mut consumer: Consumer,
    vias: &mut Vias,
    parked: Vec<LapinDelivery>,
) -> Result<Option<(Channel, Consumer, Arc<Acks>)>, AmqpError> {
    let Some((partition, _)) = &c.partition else {
        return Ok(Some((channel.clone(), consumer, Arc::clone(acks))));
    };
    let partition = *partition;
    let addr = shared.broker.addr();
    let name = &c.queue.name;
    // Settles what the channel's current life delivers: a recovery during the wait starts a
    // new one. Each delivery kept aside is kept with the settler of its life.
    let mut life = Arc::clone(acks);
    let mut parked: Vec<(LapinDelivery, Arc<Acks>)> =
        parked.into_iter().map(|d| (d, Arc::clone(&life))).collect();
    let mut park = |d: LapinDelivery, life: &mut Arc<Acks>| {
        if life.is_void() && !d.acker.poisoned() {
            // The channel failed and recovered in place: a new life, with new delivery tags.
            *life = Acks::new(channel.clone());
        }
        life.opened(&d);
        parked.push((d, Arc::clone(life)));
    };
    shared.revoke(partition);
    // Until the broker ends the consumer (then nothing more comes).
    let mut consuming = true;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if shared.handed_over(partition) {
            break;
        }
        tokio::select! {
            () = changed => {}
            next = consumer.next(), if consuming => match next {
                Some(Ok(d)) => park(d, &mut life),
                Some(Err(e)) => {
                    channel
                        .wait_for_recovery(e)
                        .await
                        .map_err(|e| addr.broker_error(format!("consume {name}"), &e))?;
                    info!(target: "prereq", queue = %name, "consumer recovered during a hand-over");
                }
                None => consuming = false,
            },
        }
    }
    // What lapin has received already: the close would return it unseen.
    while let Some(Some(next)) = consumer.next().now_or_never() {
        if let Ok(d) = next {
            park(d, &mut life);
        }
    }
    let given_back = parked.len();
    refresh_near_limit(shared, vias, &mut parked).await;
    let close = channel.close(200, "prereq: partition handed over".into());
    let _ = answered("closing a channel", close).await;
    drop(parked);
    drop(consumer);
    shared.unrevoke(partition);
    if shared.is_stopping() {
        // Leaving: no standby (a consumer subscribed now could be made active and would be
        // dropped, so cancelled, at the end of the run while holding what it was given).
        info!(target: "prereq", queue = %name, given_back, "partition handed over at the stop");
        return Ok(None);
    }
    info!(target: "prereq", queue = %name, given_back, "partition handed over; standing by");
    let (channel, standby) = subscribe(shared, c).await?;
    shared.track(name, &channel, standby.tag());
    let acks = Acks::new(channel.clone());
    Ok(Some((channel, standby, acks)))
}

/// Of the deliveries kept aside during a hand-over, copy those one return away from their
/// queue's delivery limit to the back of the queue (a new count) and acknowledge them: the
/// channel's close would bring them to the limit, and the broker would drop them. A copy that
/// fails leaves its original to the close. Each is settled through the settler of the channel's
/// life it came in; those of a life that failed are the broker's again, and left alone.
async fn refresh_near_limit(
    shared: &Shared,
    vias: &mut Vias,
    parked: &mut Vec<(LapinDelivery, Arc<Acks>)>,
) {
    let mut kept = Vec::with_capacity(parked.len());
    for (d, acks) in parked.drain(..) {
        if acks.is_void() {
            // From a life of the channel that failed: the broker has it back already, and a
            // copy would make it come twice.
            kept.push((d, acks));
            continue;
        }
        let returns = headers::read_incoming(d.properties.headers().as_ref())
            .delivery_count
            .unwrap_or(0);
        let via = vias.get(d.exchange.as_str(), d.routing_key.as_str());
        if !via.near_limit(returns) {
            kept.push((d, acks));
            continue;
        }
        let p = Unsettled {
            via,
            acks,
            tag: d.delivery_tag,
            properties: Packed::pack(d.properties),
            body: d.data,
            returns,
            received_ms: headers::now_ms(),
            is_copy: false,
        };
        match shared.copy_back(&p).await {
            Ok(()) => {
                if let Err(e) = p.acks.ack(p.tag).await {
                    warn!(target: "prereq", queue = %p.via.queue,
                        error = %shared.broker.addr().scrub(&e.to_string()),
                        "could not acknowledge a message copied back (it comes twice)");
                }
            }
            Err(e) => warn!(target: "prereq", queue = %p.via.queue, error = %e,
                "could not copy back a message near its queue's delivery limit"),
        }
    }
    *parked = kept;
}

/// Acknowledge a deferred copy the broker delivered twice (see [`super::copies`]), without
/// handing it to the consumer. If the ack is lost with its channel, the broker delivers the
/// copy again, and it is recognised again.
async fn drop_duplicate(shared: &Shared, acks: &Acks, d: LapinDelivery, queue: &str, copy: &str) {
    debug!(target: "prereq", queue, copy,
        "a deferred copy delivered twice by the broker: acknowledged, not handled again");
    #[cfg(feature = "metrics")]
    crate::metrics::duplicate_copy_dropped();
    if let Err(e) = acks.ack(d.delivery_tag).await {
        warn!(target: "prereq", queue,
            error = %shared.broker.addr().scrub(&e.to_string()),
            "could not acknowledge a duplicate copy (the broker delivers it again)");
    }
}

/// A task that gives `delivery` back by a copy, if it came back so often that one more return
/// (a dropped connection, a give-back) would take it past its queue's delivery limit.
fn near_limit(
    shared: &Arc<Shared>,
    delivery: &Delivery,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    if !shared.is_near_limit(delivery.id) {
        return None;
    }
    let shared = Arc::clone(shared);
    let id = delivery.id;
    Some(async move {
        if let Err(e) = shared.settle(id, crate::transport::Settle::Requeue).await {
            warn!(target: "prereq", error = %e,
                "could not refresh a message near its queue's delivery limit");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_handed_over_at_once_then_after_longer_and_longer_pauses() {
        let pauses: Vec<_> = (0..8).map(bounce_pause).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            pauses,
            vec![
                None,
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000),
                ms(1000)
            ]
        );
        assert_eq!(bounce_pause(u32::MAX), ms(1000));
    }
}
