//! Quorum queues count returns (`x-delivery-count`) and the broker dead-letters (or drops) a
//! message returned more than `x-delivery-limit` times. A message prereq holds is returned at
//! every graceful stop (given back) and every dropped connection: held across enough restarts it
//! would be taken by the broker, not by prereq. prereq reads the count and, before one more
//! return would take a message past the limit, gives it back by a confirmed copy (a new count).
//!
//! - A held message on a queue with `x-delivery-limit: 3`, across 10 restarts (run → held →
//!   graceful stop): handled exactly once at the end, never taken by the broker.
//! - A delivery limit of 1: a new message reaches the consumer (it is not copied back on
//!   arrival for ever), is held, and survives restarts.
//! - A graceful stop returns a held message once: the consumers are cancelled before the
//!   give-back, so the broker does not deliver it straight back and take it again at the close.
//! - Control: prereq told a far higher limit (20) than the queue has (3, declared by the test
//!   with its own dead-letter exchange): the broker dead-letters the message with
//!   `delivery_limit` within the restarts — the test can see the failure it guards against.
//!
//! The delay mechanism is forced to delay queues (nothing is deferred here; any would do).
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
mod support;

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use prereq::amqp::payment_demo::{CLIENT_KEY, PROCESS_KEY};
use prereq::amqp::{Broker, BrokerOptions, DelayMode, Exchange, Queue, QueueKind, Retry, Route};
use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Client, Running, payment};

const KEY: u64 = 77;
const ID: &str = "p-held";

fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(1)).max_attempts(10)
}

/// Held until the consumer stops: only a registration ends the hold.
fn budget() -> HoldBudget {
    HoldBudget::DEFAULT.max_time(Duration::from_secs(300))
}

struct Names {
    payments: String,
    queue: String,
    clients: String,
    clients_queue: String,
    dead_letters: String,
    delay: String,
}

impl Names {
    fn new(tag: &str) -> Self {
        let p = support::unique(tag);
        Self {
            payments: format!("{p}payments"),
            queue: format!("{p}payment-processor"),
            clients: format!("{p}clients"),
            clients_queue: format!("{p}client-registration"),
            dead_letters: format!("{p}dead-letters"),
            delay: format!("{p}delay"),
        }
    }

    /// The route around the payment queue `queue`, deferred copies going back by `retry`.
    fn route(&self, queue: Queue, retry: Retry) -> Route {
        Route::new(queue)
            .registrations(
                Queue::classic(&self.clients_queue)
                    .bound_to(Exchange::direct(&self.clients), CLIENT_KEY),
            )
            .retry(retry)
            .dead_letters(Queue::quorum(&self.dead_letters))
            .delay_queue_prefix(&self.delay)
    }

    /// A quorum payment queue prereq declares, with `limit`.
    fn declared_route(&self, limit: u32) -> Route {
        self.route(
            Queue::quorum(&self.queue)
                .bound_to(Exchange::direct(&self.payments), PROCESS_KEY)
                .delivery_limit(limit),
            Retry::via(Exchange::direct(&self.payments), PROCESS_KEY),
        )
    }
}

async fn connect() -> Broker {
    Broker::connect(BrokerOptions::new(support::addr()).delay_mode(DelayMode::DelayQueues))
        .await
        .expect("connect")
}

async fn publish_held(conn: &Connection, exchange: &str, routing_key: &str) {
    let ch = support::confirm_channel(conn).await;
    let props = BasicProperties::default()
        .with_message_id(ID.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let body = serde_json::to_vec(&payment(ID, KEY)).unwrap();
    support::publish(&ch, exchange, routing_key, &body, props).await;
}

/// One restart: run a consumer on `route` until it holds the payment, stop it gracefully,
/// close its connection. Returns what it handled.
async fn hold_and_stop(route: &Route) -> Vec<String> {
    let broker = connect().await;
    let transport = broker.transport(route.clone()).await.expect("transport");
    let mut run = Running::start(transport, policy(), budget(), true);
    run.wait(Duration::from_secs(30), |e| {
        e.message_id.as_deref() == Some(ID) && e.decision == Decision::Held
    })
    .await;
    let handled = run.handled();
    let report = run.stop().await.expect("graceful stop");
    assert_eq!(
        report.requeued, 1,
        "the held payment given back: {report:?}"
    );
    broker.close().await.expect("close");
    handled
}

/// Register the key, run until the payment is handled; returns what was handled.
async fn register_and_handle(conn: &Connection, names: &Names, route: &Route) -> Vec<String> {
    let broker = connect().await;
    let transport = broker.transport(route.clone()).await.expect("transport");
    let mut run = Running::start(transport, policy(), budget(), true);
    let ch = support::confirm_channel(conn).await;
    let client = Client {
        id: KEY,
        name: "late client".into(),
    };
    let body = serde_json::to_vec(&client).unwrap();
    support::publish(
        &ch,
        &names.clients,
        CLIENT_KEY,
        &body,
        BasicProperties::default(),
    )
    .await;
    run.wait(Duration::from_secs(30), |e| {
        e.message_id.as_deref() == Some(ID) && e.decision == Decision::Handled
    })
    .await;
    let handled = run.handled();
    let report = run.stop().await.expect("graceful stop");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    broker.close().await.expect("close");
    handled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_across_ten_restarts_survives_a_delivery_limit_of_3() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = Names::new("dlimit3");
    let route = names.declared_route(3);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy());
    // The route is declared by the first run; the payment waits for it.
    connect().await.declare(&route).await.expect("declare");
    publish_held(&conn, &names.payments, PROCESS_KEY).await;

    let mut handled = Vec::new();
    for _ in 0..10 {
        handled.extend(hold_and_stop(&route).await);
    }
    assert!(
        handled.is_empty(),
        "nothing handled while held: {handled:?}"
    );
    handled.extend(register_and_handle(&conn, &names, &route).await);
    assert_eq!(handled, vec![ID.to_owned()], "handled exactly once");

    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(support::ready_count(&ch, &names.queue).await, 0);
    assert_eq!(support::ready_count(&ch, &names.dead_letters).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_limit_of_1_does_not_loop_and_survives_restarts() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = Names::new("dlimit1");
    let route = names.declared_route(1);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy());
    connect().await.declare(&route).await.expect("declare");
    publish_held(&conn, &names.payments, PROCESS_KEY).await;

    let mut handled = Vec::new();
    for _ in 0..3 {
        handled.extend(hold_and_stop(&route).await);
    }
    handled.extend(register_and_handle(&conn, &names, &route).await);
    assert_eq!(handled, vec![ID.to_owned()], "handled exactly once");
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(support::ready_count(&ch, &names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_returns_a_held_message_once() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = Names::new("dlimit-once");
    let route = names.declared_route(20);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy());
    connect().await.declare(&route).await.expect("declare");
    publish_held(&conn, &names.payments, PROCESS_KEY).await;

    hold_and_stop(&route).await;
    let ch = conn.create_channel().await.expect("channel");
    let got = support::get_one(&ch, &names.queue, Duration::from_secs(10))
        .await
        .expect("the held payment is back in its queue");
    let headers = got.delivery.properties.headers().as_ref();
    assert_eq!(
        support::header_int(headers, "x-delivery-count"),
        Some(1),
        "one return for one graceful stop: {headers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_limit_prereq_does_not_know_lets_the_broker_dead_letter() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = Names::new("dlimit-ctl");
    let broker_dlq = format!("{}.broker-dead", names.queue);
    // The queue's owner declares it: limit 3, its own dead-letter queue.
    let ch = conn.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(broker_dlq.as_str().into(), durable, FieldTable::default())
        .await
        .expect("declare the broker's dead-letter queue");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(3));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(broker_dlq.as_str())),
    );
    ch.queue_declare(names.queue.as_str().into(), durable, args)
        .await
        .expect("declare the payment queue");
    // prereq is told the broker's default, not the queue's limit.
    let route = names.route(
        Queue::existing(&names.queue, QueueKind::Quorum).delivery_limit(20),
        Retry::via(Exchange::direct(""), &names.queue),
    );
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .delay_queues(&route, &policy())
        .queue(&names.queue)
        .queue(&broker_dlq);
    publish_held(&conn, "", &names.queue).await;

    let mut restarts = 0;
    loop {
        // After a give-back the broker either puts the payment back in its queue or, past the
        // limit, dead-letters it; the latter is asynchronous, so wait for one or the other.
        drill::wait_until(
            "the payment back in its queue or dead-lettered",
            Duration::from_secs(30),
            async || {
                let back = support::ready_count(&ch, &names.queue).await;
                let dead = support::ready_count(&ch, &broker_dlq).await;
                if back + dead > 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "after {restarts} restarts the payment is neither in its queue nor \
                         dead-lettered"
                    ))
                }
            },
        )
        .await;
        // Once dead-lettered it stays there (nothing consumes the broker's dead-letter queue).
        if support::ready_count(&ch, &broker_dlq).await > 0 {
            break;
        }
        assert!(restarts < 10, "the broker never dead-lettered the payment");
        hold_and_stop(&route).await;
        restarts += 1;
    }
    let got = support::get_one(&ch, &broker_dlq, Duration::from_secs(5))
        .await
        .expect("the payment, dead-lettered by the broker");
    let headers = got.delivery.properties.headers().as_ref();
    assert_eq!(
        support::header_str(headers, "x-first-death-reason").as_deref(),
        Some("delivery_limit"),
        "{headers:?}"
    );
    assert_eq!(restarts, 4, "dead-lettered on the 4th return");
}
