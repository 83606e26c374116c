//! Declaring a [`Route`] on the broker: its exchanges (the retry exchange with the delay
//! mechanism's type), its queues, their bindings; and the delay queues, one per delay value.
//!
//! Everything is durable and declared idempotently, with the arguments the original producers
//! use (classic queues with none), so that prereq and other programs can declare the same
//! topology in any order. A name that exists with other arguments fails with a clear error.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind as LapinKind};

use super::addr::AmqpAddr;
use super::delay::{self, DelayMechanism};
use super::error::AmqpError;
use super::headers;
use super::route::{Exchange, ExchangeKind, Queue, QueueKind, Route};

/// A name as AMQP carries it.
pub(crate) fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|e| AmqpError::Config(format!("{e}")))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The exchange type and arguments of `exchange`, which is the retry exchange under
/// `mechanism` if `retry` is set.
fn exchange_type(kind: ExchangeKind, retry: Option<DelayMechanism>) -> (LapinKind, FieldTable) {
    let plain = match kind {
        ExchangeKind::Direct => LapinKind::Direct,
        ExchangeKind::Topic => LapinKind::Topic,
        ExchangeKind::Fanout => LapinKind::Fanout,
        ExchangeKind::Headers => LapinKind::Headers,
        ExchangeKind::ConsistentHash => LapinKind::Custom(kind.as_str().to_owned()),
    };
    match retry {
        Some(DelayMechanism::DelayedExchange) => {
            let mut args = FieldTable::default();
            args.insert("x-delayed-type".into(), long(kind.as_str()));
            (
                LapinKind::Custom(delay::DELAYED_EXCHANGE_TYPE.to_owned()),
                args,
            )
        }
        _ => (plain, FieldTable::default()),
    }
}

/// The arguments a queue prereq declares gets.
pub(crate) fn queue_arguments(queue: &Queue) -> FieldTable {
    let mut args = FieldTable::default();
    if queue.single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    match queue.kind {
        QueueKind::Classic => {}
        QueueKind::Quorum => {
            args.insert("x-queue-type".into(), long("quorum"));
            if let Some(limit) = queue.delivery_limit {
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
                );
            }
        }
        QueueKind::Stream => {
            args.insert("x-queue-type".into(), long("stream"));
        }
    }
    args
}

/// Explain a failed declaration: a 406 means the name exists with other arguments.
fn declare_error(addr: &AmqpAddr, what: String, e: &lapin::Error) -> AmqpError {
    let text = addr.scrub(&e.to_string());
    let hint = if text.contains("PRECONDITION_FAILED") || text.contains("406") {
        " (it exists with another type or other arguments: declare it as existing, or delete it)"
    } else if text.contains("NOT_FOUND") || text.contains("404") {
        " (it does not exist, and prereq was told not to declare it)"
    } else {
        ""
    };
    AmqpError::Broker {
        operation: what,
        message: format!("{text}{hint}"),
    }
}

/// Declare everything `route` names, on `channel` (a failed declaration closes the channel: use
/// one for declaring only). The retry exchange gets the type of `mechanism`.
pub(crate) async fn declare_route(
    channel: &Channel,
    route: &Route,
    mechanism: DelayMechanism,
    addr: &AmqpAddr,
) -> Result<(), AmqpError> {
    route.check()?;
    let retry = &route.retry.exchange;
    let consumed = route.consumed();
    let queues: Vec<&Queue> = consumed
        .iter()
        .chain(&route.registrations)
        .chain([&route.dead_letters])
        .collect();
    // Every exchange once, by name; the retry exchange's declaration wins over a plain mention.
    let mut exchanges: BTreeMap<&str, (&Exchange, bool)> = BTreeMap::new();
    for e in queues
        .iter()
        .flat_map(|q| q.bindings.iter().map(|(e, _)| e))
    {
        let seen = exchanges.entry(e.name.as_str()).or_insert((e, false));
        if seen.0.kind != e.kind {
            return Err(AmqpError::Config(format!(
                "exchange {:?} is named both as {} and as {}",
                e.name, seen.0.kind, e.kind
            )));
        }
    }
    if let Some((seen, _)) = exchanges.get(retry.name.as_str())
        && seen.kind != retry.kind
    {
        return Err(AmqpError::Config(format!(
            "exchange {:?} is named both as {} and as the retry exchange ({})",
            retry.name, seen.kind, retry.kind
        )));
    }
    exchanges.insert(retry.name.as_str(), (retry, true));
    for (name, (exchange, is_retry)) in exchanges {
        // The default exchange always exists; `amq.*` ones are the broker's own.
        if name.is_empty() {
            continue;
        }
        let (kind, arguments) = exchange_type(exchange.kind, is_retry.then_some(mechanism));
        let passive = !exchange.declare || name.starts_with("amq.");
        let options = ExchangeDeclareOptions {
            durable: true,
            passive,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(short(name)?, kind, options, arguments)
            .await
            .map_err(|e| declare_error(addr, format!("declare exchange {name}"), &e))?;
    }
    for queue in &queues {
        declare_queue(channel, queue, addr).await?;
    }
    for queue in &queues {
        for (exchange, key) in &queue.bindings {
            if exchange.name.is_empty() {
                // Every queue is bound to the default exchange by its name.
                continue;
            }
            channel
                .queue_bind(
                    short(&queue.name)?,
                    short(&exchange.name)?,
                    short(key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    declare_error(
                        addr,
                        format!("bind {} to {} with {key:?}", queue.name, exchange.name),
                        &e,
                    )
                })?;
        }
    }
    Ok(())
}

/// Declare one queue (passively if it is someone else's).
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &Queue,
    addr: &AmqpAddr,
) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions {
        durable: true,
        passive: !queue.declare,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(&queue.name)?, options, queue_arguments(queue))
        .await
        .map(|_| ())
        .map_err(|e| declare_error(addr, format!("declare queue {}", queue.name), &e))
}

/// Declare the delay queue of a (bucketed) delay: deferred copies wait in it, then the broker
/// dead-letters them to the retry exchange, with the route's fixed retry key, or (for copies
/// that go back to their own queue) with the routing key they were published with: those are
/// published through the headers exchange named by the delay prefix, which keeps their key,
/// and reach the delay queue by the [`headers::DELAY_QUEUE`] header.
pub(crate) async fn declare_delay_queue(
    channel: &Channel,
    route: &Route,
    delay: Duration,
    addr: &AmqpAddr,
) -> Result<String, AmqpError> {
    let name = delay::delay_queue_name(&route.delay_queue_prefix, delay);
    let arguments = delay::delay_queue_arguments(
        delay,
        &route.retry.exchange.name,
        route.retry.routing_key.as_deref(),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(&name)?, options, arguments)
        .await
        .map_err(|e| declare_error(addr, format!("declare delay queue {name}"), &e))?;
    if route.retry.routing_key.is_none() {
        let exchange = &route.delay_queue_prefix;
        channel
            .exchange_declare(
                short(exchange)?,
                LapinKind::Headers,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_error(addr, format!("declare exchange {exchange}"), &e))?;
        let mut match_bucket = FieldTable::default();
        match_bucket.insert("x-match".into(), long("all"));
        match_bucket.insert(headers::DELAY_QUEUE.into(), long(&name));
        channel
            .queue_bind(
                short(&name)?,
                short(exchange)?,
                "".into(),
                QueueBindOptions::default(),
                match_bucket,
            )
            .await
            .map_err(|e| declare_error(addr, format!("bind {name} to {exchange}"), &e))?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_exchange_takes_the_mechanism_s_type() {
        let (kind, args) =
            exchange_type(ExchangeKind::Direct, Some(DelayMechanism::DelayedExchange));
        assert_eq!(kind, LapinKind::Custom("x-delayed-message".into()));
        assert_eq!(args.inner().get("x-delayed-type"), Some(&long("direct")));
        let (kind, args) = exchange_type(ExchangeKind::Topic, Some(DelayMechanism::DelayQueues));
        assert_eq!(kind, LapinKind::Topic);
        assert!(args.inner().is_empty());
        let (kind, _) = exchange_type(ExchangeKind::Fanout, None);
        assert_eq!(kind, LapinKind::Fanout);
    }

    #[test]
    fn classic_queues_have_no_arguments_and_quorum_ones_a_delivery_limit() {
        assert!(queue_arguments(&Queue::classic("q")).inner().is_empty());
        let q = queue_arguments(&Queue::quorum("q").delivery_limit(3));
        assert_eq!(q.inner().get("x-queue-type"), Some(&long("quorum")));
        assert_eq!(
            q.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(3))
        );
        let s = queue_arguments(&Queue::stream("s"));
        assert_eq!(s.inner().get("x-queue-type"), Some(&long("stream")));
    }
}
