//! A consumer whose connection drops mid-run loses nothing: lapin reconnects by itself, every
//! delivery that was not settled comes back (flagged redelivered) and is handled; settling a
//! delivery from before the drop does nothing and says so (`AmqpError::Stale`).
#![cfg(feature = "amqp")]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use prereq::amqp::{AmqpError, Broker, BrokerOptions, DelayMode, Queue, Route};
use prereq::transport::{Demand, Settle, Transport};

const N: usize = 20;
const SETTLED_BEFORE_DROP: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_loses_nothing() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("drop");
    let work = format!("{p}work");
    let proxy = support::Proxy::start(&support::addr()).await;
    let route =
        Route::new(Queue::classic(work.clone())).registrations(Queue::classic(format!("{p}keys")));
    cleanup.route(&route);
    let broker = Broker::connect(
        BrokerOptions::new(proxy.addr(&support::addr())).delay_mode(DelayMode::DelayQueues),
    )
    .await
    .expect("connect via proxy");
    let transport = broker.transport(route).await.expect("declare");
    transport.start(Demand::new(N, 1)).await.expect("consume");

    let ch = support::confirm_channel(&conn).await;
    for i in 0..N {
        let props = BasicProperties::default().with_message_id(format!("m{i}").into());
        support::publish(&ch, "", &work, format!("{i}").as_bytes(), props).await;
    }
    let recv = || async {
        tokio::time::timeout(Duration::from_secs(60), transport.recv())
            .await
            .expect("delivery in time")
            .expect("recv")
            .expect("open")
    };
    let mut before = Vec::new();
    for _ in 0..N {
        before.push(recv().await);
    }
    let mut done: BTreeSet<String> = BTreeSet::new();
    for d in &before[..SETTLED_BEFORE_DROP] {
        transport.settle(d.id, Settle::Ack).await.expect("ack");
        done.insert(d.message_id.clone().unwrap());
    }
    let unsettled: BTreeSet<String> = before[SETTLED_BEFORE_DROP..]
        .iter()
        .map(|d| d.message_id.clone().unwrap())
        .collect();
    assert_eq!(unsettled.len(), N - SETTLED_BEFORE_DROP);

    // The network drops: both sockets of the transport's connection close.
    assert!(
        proxy.cut() >= 1,
        "the transport's connection went through the proxy"
    );

    // Everything unsettled comes back on the recovered connection.
    let mut back = BTreeSet::new();
    while !unsettled.is_subset(&back) {
        let d = recv().await;
        let id = d.message_id.clone().unwrap();
        assert!(d.redelivered, "{id} after the drop must be a redelivery");
        transport
            .settle(d.id, Settle::Ack)
            .await
            .expect("ack after recovery");
        back.insert(id.clone());
        done.insert(id);
    }
    // A decision on a delivery from before the drop does nothing, duplicates nothing, and
    // says so: it is never counted as done.
    let stale = &before[SETTLED_BEFORE_DROP];
    assert!(transport.is_stale(stale.id), "void since the drop");
    assert_eq!(
        transport
            .settle(
                stale.id,
                Settle::Defer {
                    delay: Duration::from_millis(100),
                    attempt: 1,
                },
            )
            .await,
        Err(AmqpError::Stale)
    );
    assert!(
        transport.delay_queues().await.is_empty(),
        "no copy of a stale delivery"
    );
    for d in &before[SETTLED_BEFORE_DROP + 1..] {
        assert_eq!(
            transport.settle(d.id, Settle::Ack).await,
            Err(AmqpError::Stale),
            "a stale ack is void"
        );
    }

    // Acks of the first five may have been lost in the drop: at-least-once allows them back.
    while support::ready_count(&ch, &work).await > 0 || transport.in_flight() > 0 {
        let d = recv().await;
        let id = d.message_id.clone().unwrap();
        assert!(done.contains(&id), "unexpected {id}");
        transport.settle(d.id, Settle::Ack).await.expect("ack");
    }
    assert_eq!(done.len(), N, "every message handled");
    broker.close().await.expect("close");
    assert_eq!(
        support::ready_count(&ch, &work).await,
        0,
        "nothing left behind"
    );
}
