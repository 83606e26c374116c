//! End to end: a payment whose body is not valid JSON for a payment is dead-lettered at once
//! as `undecodable`, and the consumer keeps running (a valid payment after it is handled).
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::DeadLetterKind;
use prereq::amqp::headers;
use prereq::{Backoff, Decision, HoldBudget};
use support::header_str as get_str;
use support::payments::{Client, Scenario, payment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_body_is_dead_lettered() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let policy = Backoff::constant(Duration::from_secs(1));
    let mut s = Scenario::start(&conn, "malformed", policy, HoldBudget::DEFAULT).await;

    s.publish_raw_payment(
        b"{\"id\": \"bad\", \"clientId\": ",
        "bad-1",
        support::payments::demo_headers(10),
    )
    .await;
    let (_, dl) = s.dead_letter(Duration::from_secs(60)).await;
    assert_eq!(dl.kind, DeadLetterKind::Undecodable);
    assert_eq!(dl.attempts, 0);

    let msg = support::get_one(
        &s.publisher,
        &s.names.dead_letter_queue,
        Duration::from_secs(10),
    )
    .await
    .expect("the malformed payment is in the dead-letter queue");
    assert_eq!(msg.delivery.data, b"{\"id\": \"bad\", \"clientId\": ");
    let h = msg.delivery.properties.headers().as_ref();
    assert_eq!(
        get_str(h, headers::DEAD_LETTER_KIND).as_deref(),
        Some("undecodable")
    );
    assert!(get_str(h, headers::DEAD_LETTER_REASON).is_some_and(|r| !r.is_empty()));

    // Still consuming.
    s.register(&Client {
        id: 1,
        name: "C".into(),
    })
    .await;
    s.wait(Duration::from_secs(60), |e| {
        matches!(e.decision, Decision::Registered)
    })
    .await;
    s.publish_payment(&payment("good-1", 1), 10).await;
    s.wait(Duration::from_secs(60), |e| {
        matches!(e.decision, Decision::Handled)
    })
    .await;
    let report = s.stop().await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.handled, 1);
}
