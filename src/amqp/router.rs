//! [`route_by_key`]: the ingress router for producers that cannot route by key themselves — it
//! consumes their queue and re-publishes every message to a group's [`Partitions`] with its key
//! as routing key, confirmed before the original is acknowledged.
//!
//! Only one router consumes the queue at a time (an exclusive consumer), so messages keep their
//! order; the others wait and take over when it goes. The router is an extra hop: one publish
//! and one confirm per message, up to [`ROUTER_PREFETCH`] of them in flight, and one
//! acknowledgement for every run of copies confirmed by the time it looks (see
//! `docs/scaling.md`).

use std::future::Future;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties, Channel, Confirmation};

use super::addr::AmqpAddr;
use super::broker::{Broker, answered};
use super::declare::{declare_queue, short};
use super::error::AmqpError;
use super::headers;
use super::publish::{Copy, confirmed, confirmed_channel, publish};
use super::route::{Partitions, Queue};
use super::settle::copy_properties;

/// How long a waiting router waits before trying to become the active one again.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// How often a router whose channel or connection failed looks whether it is back.
const RECONNECT_POLL: Duration = Duration::from_millis(100);
/// How long a failed session's channel may take to come back, and to close.
const RETIRE_WAIT: Duration = Duration::from_secs(5);
/// Messages the router takes at once, and copies it has in flight: re-published in order, each
/// original acknowledged once its copy is confirmed.
const ROUTER_PREFETCH: u16 = 256;

/// What a router did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterReport {
    /// Messages re-published to their partition.
    pub routed: u64,
    /// Messages without a usable key, sent to the partitions' dead-letter queue.
    pub dead_lettered: u64,
}

/// Consume `from` and re-publish each message to `partitions` with the key `key` finds in its
/// body, until `shutdown` completes. A body `key` cannot read (its error text is the reason),
/// or whose key is longer than a routing key may be (255 bytes), goes to the partitions'
/// dead-letter queue (`<name>.dead`). Each original is acknowledged only
/// after its copy was confirmed as routed. A failed channel or connection makes the router
/// start over once the connection is back (the originals not acknowledged come back and are
/// routed again: at least once); it returns an error when the broker refuses a copy, or when
/// the connection is lost for good (the broker's reconnect timeout).
///
/// ```no_run
/// use prereq::amqp::{Broker, BrokerOptions, Partitions, Queue, route_by_key};
///
/// # async fn f() -> Result<(), prereq::amqp::AmqpError> {
/// let broker = Broker::connect(BrokerOptions::from_env()).await?;
/// let partitions = Partitions::new("payments-by-client", 32);
/// // The Go demo's payments carry their client only in the body.
/// route_by_key(&broker, Queue::classic("payment-processor"), &partitions, |body: &[u8]| {
///     let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
///     v["clientId"].as_u64().map(|c| c.to_string()).ok_or_else(|| "no clientId".to_owned())
/// }, tokio::signal::ctrl_c())
/// .await?;
/// # Ok(()) }
/// ```
pub async fn route_by_key<F, S>(
    broker: &Broker,
    from: Queue,
    partitions: &Partitions,
    key: F,
    shutdown: S,
) -> Result<RouterReport, AmqpError>
where
    F: Fn(&[u8]) -> Result<String, String>,
    S: Future,
{
    let addr = broker.addr();
    let dead = Queue::quorum(format!("{}.dead", partitions.name));
    let declaring = broker.channel("open a declaring channel").await?;
    declare_queue(&declaring, &from, addr).await?;
    declare_queue(&declaring, &dead, addr).await?;
    let _ = declaring.close(200, "declared".into()).await;
    let mut publisher = confirmed_channel(broker, "open the router's publisher channel").await?;
    let exchange = partitions.name.clone();
    let mut report = RouterReport::default();
    // Set when a channel or the connection failed: why, and the failed session's channels.
    // Routing starts over once the connection is back, on fresh channels.
    let mut lost: Option<(AmqpError, Vec<Channel>)> = None;
    // The connection lost for good (past the broker's reconnect timeout): the router stops with
    // it, also when lapin's recovery never tells the channels.
    let mut gone = broker.lost();
    tokio::pin!(shutdown);
    'standby: loop {
        if let Some((cause, retired)) = lost.take() {
            tracing::warn!(target: "prereq", queue = %from.name, error = %cause,
                "the router's channel or connection failed; routing again once it is back");
            while !broker.connected() {
                if let Some(e) = gone.borrow_and_update().clone() {
                    // Lost for good (past the broker's reconnect timeout).
                    return Err(e);
                }
                tokio::select! {
                    _ = &mut shutdown => return Ok(report),
                    () = tokio::time::sleep(RECONNECT_POLL) => {}
                }
            }
            for channel in retired {
                retire(channel).await;
            }
            publisher = match confirmed_channel(broker, "open the router's publisher channel").await
            {
                Ok(p) => p,
                Err(e) => {
                    tokio::select! {
                        _ = &mut shutdown => return Ok(report),
                        () = tokio::time::sleep(RECONNECT_POLL) => {}
                    }
                    lost = Some((e, Vec::new()));
                    continue 'standby;
                }
            };
        }
        // Become the one active router, or wait for the active one to go.
        let channel = match broker.channel("open the router's channel").await {
            Ok(c) => c,
            Err(e) => {
                lost = Some((e, Vec::new()));
                continue 'standby;
            }
        };
        let prefetch = channel.basic_qos(ROUTER_PREFETCH, BasicQosOptions::default());
        if let Err(e) = answered("setting the prefetch", prefetch).await {
            lost = Some((
                addr.broker_error("set the router's prefetch", &e),
                vec![channel],
            ));
            continue 'standby;
        }
        let consumer = channel.basic_consume(
            short(&from.name)?,
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        );
        let consumer = answered("subscribing", consumer).await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(_) => {
                // Another router is active: the refusal closed this channel.
                tokio::select! {
                    _ = &mut shutdown => return Ok(report),
                    () = tokio::time::sleep(STANDBY_RETRY) => continue 'standby,
                }
            }
        };
        tracing::info!(target: "prereq", queue = %from.name, "routing by key");
        // Copies published and not confirmed yet, oldest first: each original is acknowledged
        // once its copy is confirmed, in order. Publishes on the one channel keep their order.
        let mut unconfirmed = FuturesOrdered::new();
        // Why this session of routing ended, if not by a shutdown or a refusal.
        let failed = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    // What was published is acknowledged before the channel closes (else it
                    // would come back and be routed twice).
                    match settle_all(&channel, &mut unconfirmed, &exchange, addr, &mut report)
                        .await
                    {
                        // A failed channel gave back what it had not acknowledged.
                        Ok(()) | Err(Failed::Lost(_)) => {}
                        Err(Failed::Refused(e)) => return Err(e),
                    }
                    let close = channel.close(200, "router stopping".into());
                    let _ = answered("closing a channel", close).await;
                    return Ok(report);
                }
                Ok(()) = gone.changed() => {
                    if let Some(e) = gone.borrow_and_update().clone() {
                        return Err(e);
                    }
                }
                Some(done) = unconfirmed.next(), if !unconfirmed.is_empty() => {
                    // With every confirmation already in: one acknowledgement for them all.
                    let mut batch = vec![done];
                    while let Some(Some(more)) = unconfirmed.next().now_or_never() {
                        batch.push(more);
                    }
                    match settle_routed(&channel, batch, &exchange, addr, &mut report).await {
                        Ok(()) => {}
                        Err(Failed::Refused(e)) => return Err(e),
                        Err(Failed::Lost(e)) => break e,
                    }
                }
                // No bound of its own on the copies in flight: the prefetch bounds them (each is
                // an original not acknowledged yet), and a consumer polled even then tells of
                // its channel's failure, which the copies' confirms may never do.
                next = consumer.next() => {
                    let d = match next {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => break addr.broker_error(format!("consume {}", from.name), &e),
                        // Cancelled (the queue was deleted?): settle what is in flight, start
                        // over.
                        None => {
                            match settle_all(&channel, &mut unconfirmed, &exchange, addr, &mut report)
                                .await
                            {
                                Ok(()) => continue 'standby,
                                Err(Failed::Refused(e)) => return Err(e),
                                Err(Failed::Lost(e)) => break e,
                            }
                        }
                    };
                    let (to_exchange, routing_key, properties) = match usable(key(&d.data)) {
                        Ok(k) => (exchange.as_str(), k, d.properties.clone()),
                        Err(reason) => (
                            "",
                            dead.name.clone(),
                            with_reason(
                                &d.properties,
                                &d.exchange.to_string(),
                                &d.routing_key.to_string(),
                                &reason,
                            ),
                        ),
                    };
                    let dead_lettered = to_exchange.is_empty();
                    let confirm = match publish(
                        &publisher,
                        short(to_exchange)?,
                        short(&routing_key)?,
                        true,
                        &d.data,
                        properties,
                    )
                    .await
                    {
                        Ok(confirm) => confirm,
                        Err(e) => break addr.broker_error("route by key", &e),
                    };
                    let (acker, tag) = (d.acker, d.delivery_tag);
                    unconfirmed.push_back(async move {
                        Routed {
                            confirmation: confirm.await,
                            acker,
                            tag,
                            routing_key,
                            dead_lettered,
                        }
                    });
                }
            }
        };
        // Start over. The copies in flight are forgotten: closing the consumer's channel (once
        // back) gives back every original not acknowledged, those whose copies were confirmed
        // too (they are routed again: at least once).
        drop(unconfirmed);
        lost = Some((failed, vec![channel, publisher.clone()]));
    }
}

/// Close a failed session's channel once lapin brought it back with its connection (or gave up
/// on it): a recovered channel has its consumer again, which would take deliveries nobody reads;
/// its close gives what it was given back to the queue.
async fn retire(channel: Channel) {
    let deadline = tokio::time::Instant::now() + RETIRE_WAIT;
    while (channel.status().reconnecting() || channel.status().initializing())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(RECONNECT_POLL).await;
    }
    if channel.status().connected() {
        let _ = tokio::time::timeout(
            RETIRE_WAIT,
            channel.close(200, "router starting over".into()),
        )
        .await;
    }
}

/// How routing went wrong.
enum Failed {
    /// The broker refused a copy (unroutable, nacked): the router stops with the error.
    Refused(AmqpError),
    /// A channel or the connection failed: the router starts over once the connection is back.
    Lost(AmqpError),
}

/// A copy the router published, with what settles its original.
struct Routed {
    /// The broker's answer.
    confirmation: Result<Confirmation, lapin::Error>,
    /// Tells whether the original's channel failed since (then it comes back by itself).
    acker: Acker,
    /// The original's delivery tag.
    tag: u64,
    /// The copy's routing key: the message's key, or the dead-letter queue's name.
    routing_key: String,
    /// It went to the dead-letter queue (no key found), through the default exchange.
    dead_lettered: bool,
}

/// Settle every copy in flight, oldest first.
async fn settle_all(
    channel: &Channel,
    unconfirmed: &mut FuturesOrdered<impl Future<Output = Routed>>,
    exchange: &str,
    addr: &AmqpAddr,
    report: &mut RouterReport,
) -> Result<(), Failed> {
    let mut batch = Vec::with_capacity(unconfirmed.len());
    while let Some(done) = unconfirmed.next().await {
        batch.push(done);
    }
    settle_routed(channel, batch, exchange, addr, report).await
}

/// The copies of `batch` (to `exchange`, the partitions', unless dead-lettered), oldest first,
/// were answered: acknowledge the originals of those confirmed, up to the first that was not,
/// with one `basic.ack` (`multiple`: every original before them on the channel was settled
/// already, in order). A copy the broker refused is [`Failed::Refused`] (the router stops, and
/// its original, unacknowledged, goes back to its queue); one whose answer was lost with its
/// channel, or an acknowledgement that failed, is [`Failed::Lost`].
async fn settle_routed(
    channel: &Channel,
    batch: Vec<Routed>,
    exchange: &str,
    addr: &AmqpAddr,
    report: &mut RouterReport,
) -> Result<(), Failed> {
    let mut failed = None;
    // The last original whose copy was confirmed, and what the batch counts up to it.
    let mut last = None;
    let (mut routed, mut dead_lettered) = (0, 0);
    for done in batch {
        let to = Copy {
            what: "route by key",
            exchange: if done.dead_lettered { "" } else { exchange },
            routing_key: &done.routing_key,
            mandatory: true,
        };
        let checked = match done.confirmation {
            Err(e) => Err(Failed::Lost(addr.broker_error("route by key", &e))),
            Ok(confirmation) => confirmed(to, confirmation).map_err(Failed::Refused),
        };
        if let Err(e) = checked {
            failed = Some(e);
            break;
        }
        if done.dead_lettered {
            dead_lettered += 1;
        } else {
            routed += 1;
        }
        last = Some((done.tag, done.acker));
    }
    // A failed channel gives its unacknowledged deliveries back by itself.
    if let Some((tag, acker)) = last
        && !acker.poisoned()
    {
        let all = BasicAckOptions { multiple: true };
        if let Err(e) = answered("an acknowledgement", channel.basic_ack(tag, all)).await
            && !acker.poisoned()
        {
            return Err(Failed::Lost(addr.broker_error("ack routed messages", &e)));
        }
    }
    report.routed += routed;
    report.dead_lettered += dead_lettered;
    failed.map_or(Ok(()), Err)
}

/// The key `key` found, if a routing key can carry it (at most 255 bytes); else why not. A key
/// too long is the message's fault, like one not found: dead-lettered, not a reason for the
/// router to stop (it would meet the same message again at its next start).
fn usable(key: Result<String, String>) -> Result<String, String> {
    let key = key?;
    if key.len() > MAX_ROUTING_KEY {
        return Err(format!(
            "its key is {} bytes long, more than a routing key's {MAX_ROUTING_KEY}",
            key.len()
        ));
    }
    Ok(key)
}

/// The longest routing key AMQP carries, in bytes (a short string).
const MAX_ROUTING_KEY: usize = 255;

/// The properties of a message the router could not find a key in, for the dead-letter queue.
fn with_reason(
    p: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    reason: &str,
) -> BasicProperties {
    let mut h = p.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    h.insert(headers::DEAD_LETTER_KIND.into(), text("undecodable"));
    h.insert(
        headers::DEAD_LETTER_REASON.into(),
        text(&format!("the router found no usable key: {reason}")),
    );
    h.insert(headers::ORIGINAL_EXCHANGE.into(), text(exchange));
    h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(routing_key));
    copy_properties(p, h)
}
