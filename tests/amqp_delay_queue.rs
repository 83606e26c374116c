//! A deferral through the plugin-free delay queues comes back after its delay: never earlier,
//! and at most `TOLERANCE` later (RabbitMQ typically adds 1–15 ms; the margin is for a loaded
//! 2-core CI machine).
#![cfg(feature = "amqp")]

mod support;

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use prereq::Transport;
use prereq::amqp::delay::{delay_bucket, delay_queue_name};
use prereq::amqp::{AmqpConfig, AmqpTransport, DelayMechanism, DelayMode};
use prereq::transport::{Settle, Source};

const TOLERANCE: Duration = Duration::from_millis(2000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferral_through_a_delay_queue_arrives_after_its_delay() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("delayq");
    let work = format!("{p}work");
    let config = AmqpConfig::new(work.clone(), format!("{p}keys"))
        .with_addr(support::addr())
        .with_delay_mode(DelayMode::DelayQueues)
        .with_prefetch(16);
    cleanup.config(&config);
    let delay = Duration::from_millis(1500);
    let bucket = delay_bucket(delay, config.max_delay());
    assert_eq!(bucket, delay, "1.5 s is on the delay grid");
    let delay_queue = delay_queue_name(config.delay_queue_prefix(), bucket);
    cleanup.queue(delay_queue.clone());

    let transport = AmqpTransport::connect(config).await.expect("connect");
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
    assert!(elapsed >= delay, "came back early: {elapsed:?} < {delay:?}");
    assert!(
        elapsed <= delay + TOLERANCE,
        "came back late: {elapsed:?} > {delay:?} + {TOLERANCE:?}"
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
