//! Acknowledgements in batches, on the broker: a burst of payments, most of them for known
//! clients and a few for a client that never comes, all on one consumer channel. The handled
//! ones are acknowledged in batches (one `basic.ack` with `multiple` where it may); the held
//! ones stay unsettled among them, and at the stop they are given back to the queue, all of them
//! and nothing else.
//!
//! The route is the examples' (the payment demo's, under a unique prefix).
#![cfg(feature = "amqp")]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use prereq::amqp::payment_demo::{self, CLIENT_KEY, PROCESS_KEY, PaymentNames};
use prereq::amqp::{Broker, BrokerOptions, DelayMode};
use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Client, Running, payment};

const CLIENTS: u64 = 20;
const PAYMENTS: usize = 400;
/// Every this many payments, one for the client that never comes.
const HELD_EVERY: usize = 37;
const NEVER: u64 = 999_999;
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acknowledgements_never_cover_a_held_payment() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = PaymentNames::with_prefix(&support::unique("acks"));
    let route = payment_demo::route(&names);
    let policy = Backoff::linear(Duration::from_secs(1));
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy);
    let transport =
        Broker::connect(BrokerOptions::new(support::addr()).delay_mode(DelayMode::Auto))
            .await
            .expect("connect")
            .transport(route)
            .await
            .expect("transport");
    let ch = support::confirm_channel(&conn).await;

    // Everything is in the queues before the consumer starts: it arrives in a burst, and the
    // handlers' acknowledgements pile up behind one another.
    for id in 1..=CLIENTS {
        let body = serde_json::to_vec(&Client {
            id,
            name: format!("client {id}"),
        })
        .unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        support::publish(&ch, &names.clients_exchange, CLIENT_KEY, &body, props).await;
    }
    let mut held = BTreeSet::new();
    for i in 0..PAYMENTS {
        let (id, client) = if i % HELD_EVERY == 5 {
            held.insert(format!("held-{i}"));
            (format!("held-{i}"), NEVER)
        } else {
            (format!("pay-{i}"), i as u64 % CLIENTS + 1)
        };
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&payment(&id, client)).unwrap();
        support::publish(&ch, &names.payments_exchange, PROCESS_KEY, &body, props).await;
    }
    let expected_handled = PAYMENTS - held.len();

    // Held long enough that nothing is deferred during the test.
    let budget = HoldBudget::DEFAULT.max_time(Duration::from_secs(120));
    let mut run = Running::start(transport, policy, budget, true);
    let mut handled = 0;
    run.wait(WAIT, |e| {
        handled += usize::from(e.decision == Decision::Handled);
        handled == expected_handled
    })
    .await;
    let handled_ids: BTreeSet<String> = run.handled().into_iter().collect();
    assert_eq!(handled_ids.len(), expected_handled, "each handled once");
    assert!(
        handled_ids.is_disjoint(&held),
        "a payment of the client that never came was handled"
    );
    let report = run.stop().await.expect("the consumer stops cleanly");
    assert_eq!(report.handled, expected_handled as u64);
    assert_eq!(report.settle_failures, 0, "{report:?}");
    assert_eq!(report.deferred, 0, "{report:?}");
    assert_eq!(
        report.requeued,
        held.len() as u64,
        "the held payments are given back at the stop: {report:?}"
    );

    // In the queue now: the held payments, every one, and nothing else (an acknowledgement
    // that covered one of them would have taken it from the broker for good).
    let mut back = BTreeSet::new();
    while let Some(m) = support::get_one(&ch, &names.payments_queue, Duration::from_secs(2)).await {
        let id = m
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        assert!(back.insert(id.clone()), "{id} is in the queue twice");
    }
    assert_eq!(back, held, "what the broker holds after the stop");
}
