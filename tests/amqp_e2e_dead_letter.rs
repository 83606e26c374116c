//! End to end: a payment whose client never arrives is dead-lettered after its last attempt,
//! with its reason, in `<payment-processor>.dead`; the message's own `x-retry-limit` overrides
//! the policy's limit.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::DeadLetterKind;
use prereq::amqp::headers;
use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Scenario, payment};
use support::{header_int as get_int, header_str as get_str};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_for_a_client_that_never_comes_is_dead_lettered() {
    let Some(conn) = support::broker().await else {
        return;
    };
    // The policy would allow 10 attempts; the message itself says 2.
    let policy = Backoff::constant(Duration::from_millis(300)).max_attempts(10);
    let mut s = Scenario::start(&conn, "never", policy, HoldBudget::NONE).await;
    s.publish_payment(&payment("pay-3", 404), 2).await;

    let (dead, dl) = s.dead_letter(Duration::from_secs(60)).await;
    assert_eq!(dl.kind, DeadLetterKind::KeyNeverArrived);
    assert_eq!(dl.attempts, 2);
    assert_eq!(dead.attempt, 2);
    let deferrals = s
        .seen
        .iter()
        .filter(|e| matches!(e.decision, Decision::Deferred { .. }))
        .count();
    assert_eq!(deferrals, 2, "{:#?}", s.seen);
    assert!(s.handled.lock().unwrap().is_empty());

    let msg = support::get_one(
        &s.publisher,
        &s.names.dead_letter_queue,
        Duration::from_secs(10),
    )
    .await
    .expect("the payment is in the dead-letter queue");
    let body: support::payments::Payment =
        serde_json::from_slice(&msg.delivery.data).expect("body unchanged");
    assert_eq!(body, payment("pay-3", 404));
    let h = msg.delivery.properties.headers().as_ref();
    assert_eq!(
        get_str(h, headers::DEAD_LETTER_KIND).as_deref(),
        Some("key-never-arrived")
    );
    assert!(
        get_str(h, headers::DEAD_LETTER_REASON)
            .unwrap_or_default()
            .contains("404"),
        "reason names the key: {:?}",
        get_str(h, headers::DEAD_LETTER_REASON)
    );
    assert_eq!(get_int(h, headers::ATTEMPTS), Some(2));
    assert_eq!(get_int(h, headers::RETRY), Some(2));
    assert_eq!(
        get_str(h, headers::ORIGINAL_EXCHANGE).as_deref(),
        Some(s.names.payments_exchange.as_str())
    );
    assert_eq!(
        get_str(h, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("process.payment")
    );
    assert!(get_int(h, headers::FIRST_SEEN).is_some());

    let report = s.stop().await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.handled, 0);
}
