//! End to end on the real broker with the payment demo's topology: a payment published before
//! its client is handled only after the client is registered — released from the hold at once,
//! or at its next retry when it was deferred through the broker.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Client, Scenario, payment};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_payment_is_released_when_its_client_arrives() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let policy = Backoff::linear(Duration::from_secs(1));
    // Hold up to 2 minutes: the release must come from the registration, not from a retry.
    let budget = HoldBudget::DEFAULT.max_time(Duration::from_secs(120));
    let mut s = Scenario::start(&conn, "release", policy, budget).await;

    s.publish_payment(&payment("pay-1", 5), 10).await;
    let held = s.wait(WAIT, |e| matches!(e.decision, Decision::Held)).await;
    assert_eq!(held.key, Some(5));
    assert_eq!(held.message_id.as_deref(), Some("pay-1"));
    assert!(
        s.handled.lock().unwrap().is_empty(),
        "handled before its client"
    );

    s.register(&Client {
        id: 5,
        name: "Ann".into(),
    })
    .await;
    s.wait(WAIT, |e| matches!(e.decision, Decision::Handled))
        .await;
    assert_eq!(*s.handled.lock().unwrap(), ["pay-1"]);
    let order: Vec<_> = s.seen.iter().map(|e| e.decision.clone()).collect();
    let registered = order
        .iter()
        .position(|d| matches!(d, Decision::Registered))
        .expect("registration seen");
    let released = order
        .iter()
        .position(|d| matches!(d, Decision::Released { .. }))
        .expect("release seen");
    assert!(registered < released, "{order:?}");
    assert!(
        !order.iter().any(|d| matches!(d, Decision::Deferred { .. })),
        "{order:?}"
    );
    let report = s.stop().await;
    assert_eq!(report.handled, 1);
    assert_eq!(report.released, 1);
    assert_eq!(report.settle_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_payment_is_handled_at_its_next_retry_after_the_client_arrives() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let policy = Backoff::constant(Duration::from_millis(500));
    // No hold: a payment whose client is unknown goes through the broker's delay queue.
    let mut s = Scenario::start(&conn, "retry", policy, HoldBudget::NONE).await;

    s.publish_payment(&payment("pay-2", 7), 10).await;
    let deferred = s
        .wait(WAIT, |e| matches!(e.decision, Decision::Deferred { .. }))
        .await;
    assert_eq!(deferred.key, Some(7));
    assert_eq!(deferred.attempt, 0);
    assert!(
        s.handled.lock().unwrap().is_empty(),
        "handled before its client"
    );

    s.register(&Client {
        id: 7,
        name: "Bo".into(),
    })
    .await;
    let handled = s
        .wait(WAIT, |e| matches!(e.decision, Decision::Handled))
        .await;
    assert!(handled.attempt >= 1, "handled on a retry: {handled:?}");
    assert_eq!(*s.handled.lock().unwrap(), ["pay-2"]);
    let report = s.stop().await;
    assert_eq!(report.handled, 1);
    assert!(report.deferred >= 1);
    assert_eq!(report.settle_failures, 0);
}
