//! A deferred copy the broker delivers twice runs once.
//!
//! A quorum delay queue dead-letters *at least once*: on a RabbitMQ cluster its dead-letter
//! worker was seen to forward one expired copy several times (`tests/drill_cluster.rs`). Here
//! the duplicate is made by hand: a spy queue bound to the retry exchange receives every
//! deferred copy as the broker routes it, and the test publishes that exact message (body,
//! properties and headers) into the work queue again. The transport must acknowledge the
//! duplicate without handing it out, whether the first delivery of that copy is still in hand
//! or settled; a copy given back (requeued) is the broker's again and comes back.
//!
//! The give-back control also guards a race: a copy requeued comes back at once, and must not
//! be taken for a duplicate of itself while its requeue is still being carried out (it was,
//! about one run in eight, before a give-back released the copy first).
//!
//! Absence is shown by order, not by waiting: each duplicate is followed by a marker message in
//! the same queue, and the next delivery must be the marker.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use prereq::amqp::{AmqpTransport, DelayMode, Queue, Route, headers};
use prereq::transport::{Delivery, Demand, Settle, Transport};

const WAIT: Duration = Duration::from_secs(30);

async fn next(transport: &AmqpTransport) -> Delivery {
    tokio::time::timeout(WAIT, transport.recv())
        .await
        .expect("a delivery in time")
        .expect("recv")
        .expect("open")
}

/// Defer `d` with no delay (straight through the retry exchange); its copy is the next delivery.
async fn deferred_and_back(transport: &AmqpTransport, d: &Delivery) -> Delivery {
    let defer = Settle::Defer {
        delay: Duration::ZERO,
        attempt: d.attempt + 1,
    };
    transport.settle(d.id, defer).await.expect("deferred");
    next(transport).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_copy_delivered_twice_runs_once() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("dupcopy");
    let work = format!("{p}work");
    let spy = format!("{p}spy");
    let route = Route::new(Queue::classic(work.clone()));
    // The route's derived retry exchange (see `Route::new`).
    let retry = format!("{work}.retry");
    cleanup.queue(spy.clone());
    // Forced: a zero delay goes straight through the retry exchange, on either mechanism.
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(8, 1)).await;
    let ch = support::confirm_channel(&conn).await;
    ch.queue_declare(
        spy.as_str().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the spy");
    ch.queue_bind(
        spy.as_str().into(),
        retry.as_str().into(),
        work.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the spy to the retry exchange");
    let publish = async |body: &[u8], props: BasicProperties| {
        support::publish(&ch, "", &work, body, props).await;
    };
    let spied = async || {
        let m = support::get_one(&ch, &spy, WAIT)
            .await
            .expect("the deferred copy reaches the spy");
        (m.delivery.data.clone(), m.delivery.properties.clone())
    };

    // A message, deferred once: its copy comes back carrying its own identity.
    publish(
        b"one",
        BasicProperties::default().with_message_id("m-1".into()),
    )
    .await;
    let first = next(&transport).await;
    assert_eq!(first.body, b"one");
    let copy = deferred_and_back(&transport, &first).await;
    assert_eq!((copy.body.as_slice(), copy.attempt), (&b"one"[..], 1));
    let (body, props) = spied().await;
    let copy_id = support::header_str(props.headers().as_ref(), headers::COPY);
    assert!(copy_id.is_some(), "a deferred copy carries its identity");

    // The duplicate, then a marker: the next delivery must be the marker.
    let dropped = async |marker: &[u8], why: &str| {
        publish(&body, props.clone()).await;
        publish(marker, BasicProperties::default()).await;
        let after = next(&transport).await;
        assert_eq!(after.body, marker, "{why}");
        transport.settle(after.id, Settle::Ack).await.expect("ack");
    };

    // The broker delivers the copy again while the first delivery is in hand: dropped.
    dropped(
        b"marker-1",
        "the duplicate of a copy in hand is not handed out",
    )
    .await;

    // Settled (handled): a later duplicate is dropped too.
    transport.settle(copy.id, Settle::Ack).await.expect("ack");
    dropped(
        b"marker-2",
        "the duplicate of a handled copy is not handed out",
    )
    .await;
    assert_eq!(transport.in_flight(), 0);

    // Control: a copy given back is the broker's again, and comes back.
    publish(
        b"two",
        BasicProperties::default().with_message_id("m-2".into()),
    )
    .await;
    let second = next(&transport).await;
    let copy2 = deferred_and_back(&transport, &second).await;
    assert_eq!(copy2.body, b"two");
    let (_, props2) = spied().await;
    assert_ne!(
        support::header_str(props2.headers().as_ref(), headers::COPY),
        copy_id,
        "each deferral makes a copy of its own"
    );
    transport
        .settle(copy2.id, Settle::Requeue)
        .await
        .expect("given back");
    let again = next(&transport).await;
    assert_eq!(again.body, b"two", "a copy given back comes back");
    assert!(again.redelivered);
    transport.settle(again.id, Settle::Ack).await.expect("ack");
    transport.close().await.expect("close");
    // Everything, the two duplicates included, was acknowledged: nothing comes back to the
    // queue when the transport's channels close.
    assert_eq!(support::ready_count(&ch, &work).await, 0);
}
