//! A dead-lettered message lands in `<queue>.dead` with its reason headers, and the original
//! is acknowledged only after that copy is confirmed.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use prereq::amqp::headers;
use prereq::amqp::{AmqpError, DelayMode, Queue, QueueKind, Route};
use prereq::transport::{Demand, Settle, Transport};
use prereq::{DeadLetter, DeadLetterKind};
use support::{header_int as get_int, header_str as get_str};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_lands_in_dot_dead_with_reason_headers() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("dead");
    let work = format!("{p}work");
    let route =
        Route::new(Queue::classic(work.clone())).registrations(Queue::classic(format!("{p}keys")));
    assert_eq!(route.dead_letter_queue().name(), format!("{work}.dead"));
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(8, 1)).await;

    let ch = support::confirm_channel(&conn).await;
    let mut h = FieldTable::default();
    h.insert("x-retry".into(), AMQPValue::LongInt(3));
    h.insert("x-retry-limit".into(), AMQPValue::LongInt(3));
    h.insert("custom".into(), AMQPValue::LongString("kept".into()));
    let props = BasicProperties::default()
        .with_headers(h)
        .with_message_id("pay-9".into())
        .with_expiration("600000".into());
    support::publish(&ch, "", &work, br#"{"id":"pay-9"}"#, props).await;

    let d = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("delivery in time")
        .expect("recv")
        .expect("open");
    assert_eq!(d.attempt, 3);
    assert_eq!(d.max_attempts, Some(3));
    let dead = DeadLetter::new(
        DeadLetterKind::KeyNeverArrived,
        "client 9 never registered",
        3,
    );
    transport
        .settle(d.id, Settle::DeadLetter(dead))
        .await
        .expect("dead-letter confirmed");
    assert_eq!(transport.in_flight(), 0);

    // Settling the same delivery twice is refused, not silently accepted.
    let again = transport.settle(d.id, Settle::Ack).await;
    assert_eq!(again, Err(AmqpError::UnknownDelivery(d.id)));

    let msg = support::get_one(&ch, &format!("{work}.dead"), Duration::from_secs(10))
        .await
        .expect("a message in the dead-letter queue");
    assert_eq!(msg.delivery.data, br#"{"id":"pay-9"}"#);
    let props = &msg.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some("pay-9")
    );
    assert_eq!(props.expiration(), &None, "a dead letter must not expire");
    let h = props.headers().as_ref();
    assert_eq!(
        get_str(h, headers::DEAD_LETTER_KIND).as_deref(),
        Some("key-never-arrived")
    );
    assert_eq!(
        get_str(h, headers::DEAD_LETTER_REASON).as_deref(),
        Some("client 9 never registered")
    );
    assert_eq!(
        get_str(h, headers::LAST_ERROR).as_deref(),
        Some("client 9 never registered")
    );
    assert_eq!(get_int(h, headers::ATTEMPTS), Some(3));
    assert_eq!(get_str(h, headers::ORIGINAL_EXCHANGE).as_deref(), Some(""));
    assert_eq!(
        get_str(h, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some(work.as_str())
    );
    let first_seen = get_int(h, headers::FIRST_SEEN).expect("first seen");
    let dead_at = get_int(h, headers::DEAD_LETTERED_AT).expect("dead-lettered at");
    assert!(first_seen > 1_600_000_000_000 && first_seen <= dead_at);
    assert_eq!(get_str(h, "custom").as_deref(), Some("kept"));
    assert_eq!(get_int(h, "x-retry-limit"), Some(3));

    assert_eq!(support::ready_count(&ch, &work).await, 0, "original acked");
    transport.close().await.expect("close");
}

/// Dead-letter one delivery of `transport` (published to `work` as `id`); the settlement's
/// result.
async fn dead_letter_one(
    ch: &lapin::Channel,
    transport: &prereq::amqp::AmqpTransport,
    work: &str,
    id: &str,
) -> Result<(), AmqpError> {
    let props = BasicProperties::default().with_message_id(id.into());
    support::publish(ch, "", work, br#"{"id":"x"}"#, props).await;
    let d = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("delivery in time")
        .expect("recv")
        .expect("open");
    let dead = DeadLetter::new(DeadLetterKind::Rejected, "refused", 0);
    transport.settle(d.id, Settle::DeadLetter(dead)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_deleted_under_the_consumer_is_declared_again() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("dead-again");
    let work = format!("{p}work");
    let dead = format!("{work}.dead");
    let route = Route::new(Queue::classic(work.clone()));
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(8, 1)).await;
    let ch = support::confirm_channel(&conn).await;
    dead_letter_one(&ch, &transport, &work, "first")
        .await
        .expect("dead-lettered");
    ch.queue_delete(dead.as_str().into(), Default::default())
        .await
        .expect("delete the dead-letter queue");

    dead_letter_one(&ch, &transport, &work, "second")
        .await
        .expect("dead-lettered to the queue declared again");
    let msg = support::get_one(&ch, &dead, Duration::from_secs(10))
        .await
        .expect("the dead letter in the queue declared again");
    assert_eq!(
        msg.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("second")
    );
    assert_eq!(support::ready_count(&ch, &work).await, 0, "original acked");
    transport.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_someone_else_declares_is_not_declared_again() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("dead-theirs");
    let work = format!("{p}work");
    let dead = format!("{p}theirs.dead");
    let ch = support::confirm_channel(&conn).await;
    ch.queue_declare(
        dead.as_str().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("their dead-letter queue");
    cleanup.queue(dead.clone());
    let route = Route::new(Queue::classic(work.clone()))
        .dead_letters(Queue::existing(dead.clone(), QueueKind::Classic));
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(8, 1)).await;
    ch.queue_delete(dead.as_str().into(), Default::default())
        .await
        .expect("delete their dead-letter queue");

    let refused = dead_letter_one(&ch, &transport, &work, "lost").await;
    assert!(
        matches!(&refused, Err(AmqpError::NotConfirmed { message, .. }) if message.contains("unroutable")),
        "a queue prereq does not own is not made again: {refused:?}"
    );
    assert_eq!(
        support::ready_if_exists(&conn, &dead).await,
        None,
        "their queue stays deleted"
    );
    transport.close().await.expect("close");
}
