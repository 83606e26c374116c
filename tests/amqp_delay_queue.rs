//! A deferral through the plugin-free delay queues comes back after its delay, with its new
//! attempt, through the delay queue of its delay. "After" within the broker's timer: RabbitMQ
//! stamps and expires messages on its own millisecond clock, and a copy was seen back 3 ms
//! before its 1.5 s (measured from before the deferral was even published); usually it adds
//! 1–15 ms. How early or late is printed; more than [`EARLY`] early fails.
#![cfg(feature = "amqp")]

mod support;

use std::time::{Duration, Instant};

/// How much earlier than its delay a copy may come back: the broker's clock and timer
/// granularity, not prereq's.
const EARLY: Duration = Duration::from_millis(20);

use lapin::BasicProperties;
use prereq::amqp::{DelayMechanism, DelayMode, Queue, Route};
use prereq::transport::{Demand, Settle, Source, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferral_through_a_delay_queue_arrives_after_its_delay() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("delayq");
    let work = format!("{p}work");
    let route =
        Route::new(Queue::classic(work.clone())).registrations(Queue::classic(format!("{p}keys")));
    // 1.5 s is on the delay grid: its delay queue is named after it.
    let delay = Duration::from_millis(1500);
    let delay_queue = format!("{}.1500ms", route.delay_prefix());
    cleanup.queue(delay_queue.clone());
    // Forced: this test is about the delay queues, whatever the broker offers.
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(8, 1)).await;
    assert_eq!(transport.mechanism(), DelayMechanism::DelayQueues);
    let ch = support::confirm_channel(&conn).await;
    support::publish(
        &ch,
        "",
        &work,
        b"hello",
        BasicProperties::default().with_message_id("m-1".into()),
    )
    .await;

    let first = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("first delivery in time")
        .expect("recv")
        .expect("open");
    assert_eq!(first.source, Source::Message);
    assert_eq!(first.attempt, 0);
    assert_eq!(first.body, b"hello");
    assert_eq!(first.message_id.as_deref(), Some("m-1"));

    let t0 = Instant::now();
    transport
        .settle(first.id, Settle::Defer { delay, attempt: 1 })
        .await
        .expect("defer confirmed");
    let back = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("deferred copy back in time")
        .expect("recv")
        .expect("open");
    let elapsed = t0.elapsed();
    eprintln!("delay {delay:?} came back after {elapsed:?}");
    assert!(
        elapsed + EARLY >= delay,
        "came back early: {elapsed:?} < {delay:?} - {EARLY:?}"
    );
    assert_eq!(back.attempt, 1, "the copy carries the new attempt count");
    assert_eq!(back.body, b"hello");
    assert_eq!(back.message_id.as_deref(), Some("m-1"));
    assert!(!back.redelivered);

    transport.settle(back.id, Settle::Ack).await.expect("ack");
    assert_eq!(transport.in_flight(), 0);
    assert_eq!(transport.delay_queues().await, vec![delay_queue.clone()]);
    assert_eq!(support::ready_count(&ch, &work).await, 0);
    assert_eq!(support::ready_count(&ch, &delay_queue).await, 0);
    transport.close().await.expect("close");
}
