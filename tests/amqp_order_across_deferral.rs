//! Per-key order across a deferral, end to end on the broker: payment 1 of client K is held too
//! long and deferred through the broker (delay queues forced); K registers; payment 2 of K
//! arrives while 1 is out in its delay queue. With key order kept (the default), 2 waits behind
//! 1 and runs after 1's retry; with `keep_key_order(false)` (the control), 2 overtakes.
//!
//! The route is the examples' (the payment demo's, under a unique prefix).
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::amqp::DelayMode;
use prereq::amqp::payment_demo::{self, PaymentNames};
use prereq::{Backoff, Decision, DeferCause, HoldBudget};
use support::payments::{Running, publish_payment, register};

const K: u64 = 42;

/// The retry's delay: payment 2 arrives well within it.
fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(3)).max_attempts(5)
}

/// A short hold: payment 1 is deferred half a second after it arrives.
fn budget() -> HoldBudget {
    HoldBudget::DEFAULT.max_time(Duration::from_millis(500))
}

/// Run the scenario; the payments in the order they were handled, and payment 2's decisions.
async fn deferred_then_later(keep_order: bool) -> Option<(Vec<String>, Vec<Decision>)> {
    let conn = support::broker().await?;
    let names = PaymentNames::with_prefix(&support::unique("order-deferral"));
    let route = payment_demo::route(&names);
    let cleanup = support::Cleanup::new();
    cleanup.delay_queues(&route, &policy());
    let transport = support::unstarted_transport(&cleanup, route, DelayMode::DelayQueues).await;
    let mut run = Running::start(transport, policy(), budget(), keep_order);
    let ch = support::confirm_channel(&conn).await;

    publish_payment(&ch, &names, "1", K).await;
    run.wait(Duration::from_secs(15), |e| {
        e.message_id.as_deref() == Some("1")
            && matches!(
                e.decision,
                Decision::Deferred {
                    cause: DeferCause::HoldExpired,
                    ..
                }
            )
    })
    .await;
    register(&ch, &names, K).await;
    run.wait(Duration::from_secs(10), |e| {
        e.decision == Decision::Registered
    })
    .await;
    publish_payment(&ch, &names, "2", K).await;

    let mut handled = 0;
    run.wait(Duration::from_secs(30), |e| {
        handled += usize::from(e.decision == Decision::Handled);
        handled == 2
    })
    .await;
    let order = run.handled();
    let of_2: Vec<Decision> = run
        .seen
        .iter()
        .filter(|e| e.message_id.as_deref() == Some("2"))
        .map(|e| e.decision.clone())
        .collect();
    let report = run.stop().await.expect("graceful stop");
    assert_eq!((report.handled, report.dead_lettered), (2, 0), "{report:?}");
    Some((order, of_2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_message_of_the_key_runs_after_the_deferred_one() {
    let Some((order, of_2)) = deferred_then_later(true).await else {
        return;
    };
    assert_eq!(order, ["1", "2"], "2 waited for 1's retry");
    assert_eq!(
        of_2.first(),
        Some(&Decision::Held),
        "2 waited behind 1: {of_2:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_key_order_the_later_message_overtakes() {
    let Some((order, of_2)) = deferred_then_later(false).await else {
        return;
    };
    assert_eq!(
        order,
        ["2", "1"],
        "2 ran while 1 was out in its delay queue"
    );
    assert_eq!(of_2, [Decision::Handled], "{of_2:?}");
}
