//! The broker ends a consumer (`basic.cancel`) when its queue is deleted (and, on RabbitMQ 4.3,
//! when a delivery on a quorum queue outlives the acknowledgement timeout). prereq never stops
//! silently: it logs a warning, its [`Health`](prereq::amqp::Health) shows the queue stopped,
//! and it re-subscribes — re-declaring the queue and its binding if prereq declares it, waiting
//! for the owner to re-create it otherwise, and ending `run` with an error naming the queue if
//! it cannot within the reconnect timeout.
//!
//! The first test runs the examples' route (the payment demo's topology, under a unique
//! prefix).
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use prereq::amqp::payment_demo::{self, CLIENT_KEY, PROCESS_KEY, PaymentNames};
use prereq::amqp::{Broker, BrokerOptions, DelayMode, Exchange, Queue, QueueKind, Retry, Route};
use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Client, Running, payment};

fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(1)).max_attempts(10)
}

/// Held until its client registers.
fn budget() -> HoldBudget {
    HoldBudget::DEFAULT.max_time(Duration::from_secs(300))
}

async fn connect(reconnect_timeout: Duration) -> Broker {
    Broker::connect(
        BrokerOptions::new(support::addr())
            .delay_mode(DelayMode::DelayQueues)
            .reconnect_timeout(reconnect_timeout),
    )
    .await
    .expect("connect")
}

async fn publish_payment(ch: &Channel, exchange: &str, routing_key: &str, id: &str, client: u64) {
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let body = serde_json::to_vec(&payment(id, client)).unwrap();
    // Mandatory and confirmed: an unroutable payment (a binding missing) fails here.
    support::publish(ch, exchange, routing_key, &body, props).await;
}

async fn register(ch: &Channel, exchange: &str, client: u64) {
    let body = serde_json::to_vec(&Client {
        id: client,
        name: "client".into(),
    })
    .unwrap();
    support::publish(ch, exchange, CLIENT_KEY, &body, BasicProperties::default()).await;
}

async fn delete_queue(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue");
}

/// The index of the first line of `lines` at or after `from` that contains `needle`.
fn find(lines: &[String], from: usize, needle: &str) -> Option<usize> {
    lines[from.min(lines.len())..]
        .iter()
        .position(|l| l.contains(needle))
        .map(|i| i + from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_queue_deleted_under_the_consumer_is_declared_again_and_consumed() {
    let logs = support::captured_logs();
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = PaymentNames::with_prefix(&support::unique("srv-cancel"));
    let queue = names.payments_queue.clone();
    let route = payment_demo::route(&names);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy());
    let transport = connect(Duration::from_secs(60))
        .await
        .transport(route)
        .await
        .expect("transport");
    let health = transport.health();
    let mut run = Running::start(transport, policy(), budget(), true);
    support::eventually("consuming", Duration::from_secs(10), || {
        health.is_consuming()
    })
    .await;
    let ch = support::confirm_channel(&conn).await;
    publish_payment(&ch, &names.payments_exchange, PROCESS_KEY, "held", 1).await;
    run.wait(Duration::from_secs(10), |e| {
        e.message_id.as_deref() == Some("held") && e.decision == Decision::Held
    })
    .await;

    delete_queue(&conn, &queue).await;
    support::eventually(
        "a warning, then consuming again",
        Duration::from_secs(30),
        || {
            let lines = logs.lines_with(&queue);
            find(&lines, 0, "the broker ended the consumer").is_some()
                && find(&lines, 0, "consuming again").is_some()
                && health.is_consuming()
        },
    )
    .await;
    let lines = logs.lines_with(&queue);
    let warned = find(&lines, 0, "the broker ended the consumer").unwrap();
    assert!(lines[warned].contains("WARN"), "{}", lines[warned]);
    let stopped = find(&lines, 0, "prereq: not consuming").expect("health: stopped");
    let again = find(&lines, stopped, "prereq: consuming").expect("health: consuming again");
    assert!(stopped < again, "{lines:#?}");

    // Declared again with its binding: a mandatory publish through the exchange reaches it.
    publish_payment(&ch, &names.payments_exchange, PROCESS_KEY, "new", 1).await;
    run.wait(Duration::from_secs(10), |e| {
        e.message_id.as_deref() == Some("new") && e.decision == Decision::Held
    })
    .await;
    register(&ch, &names.clients_exchange, 1).await;
    let mut done = 0;
    run.wait(Duration::from_secs(30), |e| {
        done += usize::from(e.decision == Decision::Handled);
        done == 2
    })
    .await;
    let mut handled = run.handled();
    let report = run.stop().await.expect("graceful stop");
    handled.sort();
    assert_eq!(handled, ["held", "new"], "each handled once");
    assert_eq!(report.handled, 2, "{report:?}");
}

/// A route around a queue someone else declares (the test), fed through the default exchange.
fn existing_route(prefix: &str, queue: &str) -> Route {
    Route::new(Queue::existing(queue, QueueKind::Classic))
        .registrations(
            Queue::classic(format!("{prefix}clients"))
                .bound_to(Exchange::direct(format!("{prefix}clients")), CLIENT_KEY),
        )
        .retry(Retry::via(Exchange::direct(""), queue))
        .dead_letters(Queue::quorum(format!("{prefix}dead-letters")))
        .delay_queue_prefix(format!("{prefix}delay"))
}

async fn declare_classic(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_queue_deleted_is_consumed_again_once_its_owner_re_creates_it() {
    let logs = support::captured_logs();
    let Some(conn) = support::broker().await else {
        return;
    };
    let prefix = support::unique("srv-cancel-existing");
    let queue = format!("{prefix}owned-elsewhere");
    declare_classic(&conn, &queue).await;
    let route = existing_route(&prefix, &queue);
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .delay_queues(&route, &policy())
        .queue(&queue);
    let transport = connect(Duration::from_secs(60))
        .await
        .transport(route)
        .await
        .expect("transport");
    let health = transport.health();
    let mut run = Running::start(transport, policy(), budget(), true);
    support::eventually("consuming", Duration::from_secs(10), || {
        health.is_consuming()
    })
    .await;
    let ch = support::confirm_channel(&conn).await;
    register(&ch, &format!("{prefix}clients"), 1).await;
    run.wait(Duration::from_secs(10), |e| {
        e.decision == Decision::Registered
    })
    .await;

    delete_queue(&conn, &queue).await;
    support::eventually("the queue shown stopped", Duration::from_secs(10), || {
        health.stopped() == vec![queue.clone()]
    })
    .await;
    // prereq may not declare it: it waits for the owner, saying so, and stays stopped.
    support::eventually("a warning", Duration::from_secs(10), || {
        logs.lines_with(&queue)
            .iter()
            .any(|l| l.contains("could not consume again yet") && l.contains("WARN"))
    })
    .await;
    for _ in 0..10 {
        assert_eq!(health.stopped(), vec![queue.clone()], "still stopped");
        assert!(!health.is_consuming());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    declare_classic(&conn, &queue).await;
    support::eventually("consuming again", Duration::from_secs(15), || {
        health.is_consuming()
    })
    .await;
    publish_payment(&ch, "", &queue, "after", 1).await;
    run.wait(Duration::from_secs(10), |e| {
        e.message_id.as_deref() == Some("after") && e.decision == Decision::Handled
    })
    .await;
    let report = run.stop().await.expect("graceful stop");
    assert_eq!(report.handled, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_queue_that_stays_deleted_ends_run_with_an_error_naming_it() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let prefix = support::unique("srv-cancel-gone");
    let queue = format!("{prefix}owned-elsewhere");
    declare_classic(&conn, &queue).await;
    let route = existing_route(&prefix, &queue);
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .delay_queues(&route, &policy())
        .queue(&queue);
    let transport = connect(Duration::from_secs(2))
        .await
        .transport(route)
        .await
        .expect("transport");
    let health = transport.health();
    let mut run = Running::start(transport, policy(), budget(), true);
    support::eventually("consuming", Duration::from_secs(10), || {
        health.is_consuming()
    })
    .await;

    delete_queue(&conn, &queue).await;
    let ended = run.join().await;
    let error = ended.expect_err("run ends with an error, not silently");
    let text = error.to_string();
    assert!(text.contains(&queue), "the error names the queue: {text}");
    assert_eq!(health.stopped(), vec![queue.clone()]);
}
