//! A route from which deferred copies could not come back is refused on a real broker, before
//! anything is declared: no queue, no exchange left behind.
#![cfg(feature = "amqp")]

mod support;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use prereq::amqp::{AmqpError, Broker, BrokerOptions, Exchange, Queue, Retry, Route};

/// Whether the broker has a queue of that name (a passive declare, on a channel of its own:
/// a miss closes the channel).
async fn queue_exists(conn: &Connection, name: &str) -> bool {
    support::ready_if_exists(conn, name).await.is_some()
}

/// Whether the broker has an exchange of that name.
async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        passive,
        FieldTable::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn a_retry_key_no_consumed_queue_receives_is_refused_before_declaring_anything() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let name = support::unique("no-way-back");
    let cleanup = support::Cleanup::new();
    let (shop, orders, customers, dead) = (
        format!("{name}shop"),
        format!("{name}orders"),
        format!("{name}customers"),
        format!("{name}orders.dead"),
    );
    for q in [&orders, &customers, &dead] {
        cleanup.queue(q.clone());
    }
    cleanup.exchange(shop.clone());
    cleanup.exchange(format!("{name}customers.x"));

    // Orders come from a topic exchange with `order.*`; deferred copies would be sent back
    // through it with `reprocess.order`, which nothing consumed is bound to: they would vanish.
    let route = Route::new(Queue::classic(&orders).bound_to(Exchange::topic(&shop), "order.*"))
        .registrations(
            Queue::classic(&customers).bound_to(Exchange::fanout(format!("{name}customers.x")), ""),
        )
        .retry(Retry::via(Exchange::topic(&shop), "reprocess.order"))
        .dead_letters(Queue::quorum(&dead));

    let broker = Broker::connect(BrokerOptions::from_env().connection_name(format!("{name}conn")))
        .await
        .expect("connect");
    let refused = broker.transport(route.clone()).await;
    let Err(AmqpError::Config(reason)) = refused else {
        panic!(
            "a route without a way back was accepted: {:?}",
            refused.map(|_| ())
        );
    };
    assert!(
        reason.contains(&shop) && reason.contains("reprocess.order"),
        "the refusal names the exchange and the key: {reason}"
    );
    // `declare` refuses it the same way.
    assert!(matches!(
        broker.declare(&route).await,
        Err(AmqpError::Config(_))
    ));
    // Nothing was declared.
    for q in [&orders, &customers, &dead] {
        assert!(!queue_exists(&conn, q).await, "queue {q} was declared");
    }
    assert!(
        !exchange_exists(&conn, &shop).await,
        "exchange {shop} was declared"
    );

    // The same route with a retry key the orders queue receives is accepted: the refusal was
    // about the way back, not the rest of the route.
    let fixed = route.retry(Retry::via(Exchange::topic(&shop), "order.retry"));
    let transport = broker
        .transport(fixed)
        .await
        .expect("a route with a way back");
    assert!(queue_exists(&conn, &orders).await);
    transport.close().await.expect("close the transport");
    broker.close().await.expect("close the connection");
}
