//! prereq detects whether the broker under test has the delayed-message plugin, and picks its
//! delay mechanism by it: the same answer as an independent probe here, on a broker with the
//! plugin as on one without. `Auto` uses the plugin where it is and the delay queues where it is
//! not (a deferral through what it picked comes back), `DelayQueues` is always honoured, and
//! insisting on the plugin fails clearly exactly where it is missing.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use prereq::amqp::{AmqpError, Broker, BrokerOptions, DelayMechanism, DelayMode, Queue, Route};
use prereq::transport::{Demand, Settle, Transport};

/// Whether the broker knows `x-delayed-message`, asked without prereq: declare one on a
/// throw-away connection (the broker closes it if the type is unknown).
async fn has_plugin() -> bool {
    let addr = support::addr();
    let conn = Connection::connect(addr.expose(), ConnectionProperties::default())
        .await
        .expect("probe connection");
    let ch = conn.create_channel().await.expect("channel");
    let name = format!("{}probe", support::unique("plugin-truth"));
    let mut args = FieldTable::default();
    args.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    let declared = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            args,
        )
        .await;
    if declared.is_ok() {
        let _ = ch
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = conn.close(200, "probe done".into()).await;
    }
    declared.is_ok()
}

fn options(mode: DelayMode) -> BrokerOptions {
    BrokerOptions::new(support::addr()).delay_mode(mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mechanism_follows_the_plugin_and_a_deferral_comes_back() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let plugin = has_plugin().await;
    println!("the broker under test has the delayed-message plugin: {plugin}");
    let expected = if plugin {
        DelayMechanism::DelayedExchange
    } else {
        DelayMechanism::DelayQueues
    };
    let auto = Broker::connect(options(DelayMode::Auto))
        .await
        .expect("connect");
    assert_eq!(auto.mechanism(), expected);
    // The probe's failed declare (without the plugin) closed only its own connection.
    assert!(conn.status().connected());
    assert_eq!(
        Broker::connect(options(DelayMode::DelayQueues))
            .await
            .expect("connect")
            .mechanism(),
        DelayMechanism::DelayQueues
    );
    match Broker::connect(options(DelayMode::DelayedExchange)).await {
        Ok(b) if plugin => assert_eq!(b.mechanism(), DelayMechanism::DelayedExchange),
        Err(AmqpError::Config(msg)) if !plugin => {
            assert!(msg.contains("x-delayed-message"), "{msg}");
        }
        other => panic!("plugin {plugin}, insisting on it gave {other:?}"),
    }

    // A deferral through what `Auto` picked comes back.
    let cleanup = support::Cleanup::new();
    let p = support::unique("plugin");
    let work = format!("{p}work");
    let route = Route::new(Queue::classic(work.clone()));
    let delay = Duration::from_millis(200);
    cleanup
        .route(&route)
        .queue(format!("{}.200ms", route.delay_prefix()));
    let transport = auto.transport(route).await.expect("declare");
    transport.start(Demand::new(8, 1)).await.expect("consume");
    assert_eq!(transport.mechanism(), expected);
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
