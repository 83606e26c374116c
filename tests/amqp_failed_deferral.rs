//! A deferral the broker does not store, end to end (delay queues forced; the route is the
//! examples', under a unique prefix): the delay queue prereq declared is deleted under it, so
//! the next copy sent there comes back unroutable.
//!
//! - The failed deferral is reported (`SettleFailed`, "returned as unroutable"), the original
//!   is given back, and it keeps its place among its key's messages: payment 1 of client K,
//!   whose deferral failed, still runs before payment 2 of K, which arrived after it and was
//!   deferred meanwhile. (With the failed deferral's place dropped, as prereq did before, the
//!   given-back payment 1 came after payment 2's copy.)
//! - The delay queue is declared again by the next deferral: a copy is stored after the
//!   failure (without that, every later deferral to that delay failed the same way).
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use prereq::amqp::DelayMode;
use prereq::amqp::payment_demo::{self, PaymentNames};
use prereq::{Backoff, Decision, DeferCause, HoldBudget};
use support::payments::{Running, publish_payment, register};

/// The client whose payments' deferrals are watched.
const K: u64 = 42;
/// The client whose payment makes prereq declare the delay queue first.
const J: u64 = 41;

/// A first deferral waits 2 s, in delay queue `<prefix>.2000ms`.
fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(2)).max_attempts(5)
}

/// A short hold: a payment of an unknown client is deferred half a second after it arrives.
fn budget() -> HoldBudget {
    HoldBudget::DEFAULT.max_time(Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_whose_copy_is_not_stored_keeps_its_place_and_the_delay_queue_comes_back() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = PaymentNames::with_prefix(&support::unique("failed-deferral"));
    let route = payment_demo::route(&names);
    let delay_queue = format!("{}.2000ms", route.delay_prefix());
    let cleanup = support::Cleanup::new();
    cleanup.delay_queues(&route, &policy());
    let transport = support::unstarted_transport(&cleanup, route, DelayMode::DelayQueues).await;
    let mut run = Running::start(transport, policy(), budget(), true);
    let ch = support::confirm_channel(&conn).await;
    let of = |run: &Running, id: &str| -> Vec<Decision> {
        run.seen
            .iter()
            .filter(|e| e.message_id.as_deref() == Some(id))
            .map(|e| e.decision.clone())
            .collect()
    };

    // Payment "j" is deferred (the delay queue declared), comes back, and is handled once its
    // client registers; then the delay queue, empty, is deleted under prereq.
    publish_payment(&ch, &names, "j", J).await;
    run.wait(Duration::from_secs(15), |e| {
        e.message_id.as_deref() == Some("j") && e.attempt == 1
    })
    .await;
    register(&ch, &names, J).await;
    run.wait(Duration::from_secs(15), |e| {
        e.message_id.as_deref() == Some("j") && e.decision == Decision::Handled
    })
    .await;
    ch.queue_delete(delay_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the delay queue");

    // Payments 1 and 2 of K, whose client is not registered yet, a quarter of a second apart:
    // both are held, then deferred as their holds end. Payment 1's copy is returned (no
    // queue) and payment 1 given back, a quarter of a second before payment 2's deferral,
    // which declares the queue again. (A pace, not a synchronisation: were both deferrals to
    // fail, the next ones would declare the queue, and the order must hold all the same.)
    publish_payment(&ch, &names, "1", K).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    publish_payment(&ch, &names, "2", K).await;
    let mut failed = false;
    run.wait(Duration::from_secs(15), |e| {
        if let (Some("1"), Decision::SettleFailed { error }) =
            (e.message_id.as_deref(), &e.decision)
        {
            assert!(error.contains("unroutable"), "{error}");
            failed = true;
        }
        // Payment 2's stored deferral (were its first one to fail too, a later one).
        failed
            && e.message_id.as_deref() == Some("2")
            && matches!(e.decision, Decision::Deferred { .. })
    })
    .await;
    register(&ch, &names, K).await;
    let mut handled = 0;
    run.wait(Duration::from_secs(30), |e| {
        handled += usize::from(
            e.decision == Decision::Handled && matches!(e.message_id.as_deref(), Some("1" | "2")),
        );
        handled == 2
    })
    .await;

    assert_eq!(
        run.handled(),
        ["j", "1", "2"],
        "payment 1, given back after its deferral failed, kept its place before payment 2 \
         (1: {:?}; 2: {:?})",
        of(&run, "1"),
        of(&run, "2")
    );
    assert!(
        of(&run, "2").contains(&Decision::Deferred {
            delay: Duration::from_secs(2),
            cause: DeferCause::HoldExpired
        }),
        "payment 2's copy was stored once the delay queue was declared again: {:?}",
        of(&run, "2")
    );
    let report = run.stop().await.expect("graceful stop");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.handled, 3, "{report:?}");
    assert!(report.settle_failures >= 1, "{report:?}");
}
