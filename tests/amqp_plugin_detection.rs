//! This broker has no delayed-message plugin: detection says so, `Auto` falls back to the delay
//! queues (and a deferral through them works), and insisting on the plugin fails clearly.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::Transport;
use prereq::amqp::delay::{delay_bucket, delay_queue_name, probe_delayed_exchange, resolve};
use prereq::amqp::{AmqpConfig, AmqpError, AmqpTransport, DelayMechanism, DelayMode};
use prereq::transport::Settle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_absent_is_detected_and_auto_falls_back() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let addr = support::addr();
    assert!(
        !probe_delayed_exchange(&addr).await.expect("probe"),
        "this broker should not have the delayed-message plugin"
    );
    // The probe's failed declare closed only its own throw-away connection.
    assert!(conn.status().connected());
    assert_eq!(
        resolve(DelayMode::Auto, &addr).await.expect("resolve"),
        DelayMechanism::DelayQueues
    );
    assert_eq!(
        resolve(DelayMode::DelayQueues, &addr)
            .await
            .expect("resolve"),
        DelayMechanism::DelayQueues
    );

    let cleanup = support::Cleanup::new();
    let p = support::unique("plugin");
    let work = format!("{p}work");

    // Insisting on the plugin fails before anything is declared.
    let strict = AmqpConfig::new(work.clone(), format!("{p}keys"))
        .with_addr(addr.clone())
        .with_delay_mode(DelayMode::DelayedExchange);
    cleanup.config(&strict);
    match AmqpTransport::connect(strict).await {
        Err(AmqpError::Config(msg)) => assert!(msg.contains("x-delayed-message"), "{msg}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }

    // Auto falls back, and a deferral through the fallback comes back.
    let config = AmqpConfig::new(work.clone(), format!("{p}keys"))
        .with_addr(addr.clone())
        .with_prefetch(8);
    let delay = Duration::from_millis(200);
    cleanup.queue(delay_queue_name(
        config.delay_queue_prefix(),
        delay_bucket(delay, config.max_delay()),
    ));
    let transport = AmqpTransport::connect(config).await.expect("connect");
    assert_eq!(transport.mechanism(), DelayMechanism::DelayQueues);
    let ch = support::confirm_channel(&conn).await;
    support::publish(&ch, "", &work, b"x", Default::default()).await;
    let d = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("in time")
        .expect("recv")
        .expect("open");
    transport
        .settle(d.id, Settle::Defer { delay, attempt: 1 })
        .await
        .expect("defer");
    let back = tokio::time::timeout(Duration::from_secs(30), transport.recv())
        .await
        .expect("copy back in time")
        .expect("recv")
        .expect("open");
    assert_eq!(back.attempt, 1);
    transport.settle(back.id, Settle::Ack).await.expect("ack");
    transport.close().await.expect("close");
}
