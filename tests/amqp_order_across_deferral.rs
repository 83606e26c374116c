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

/// The retry's delay: payment 2 arrives (and, in the stop test, the stop comes) well within
/// it, even on a loaded machine.
fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(8)).max_attempts(5)
}

/// A short hold: payment 1 is deferred half a second after it arrives.
fn budget() -> HoldBudget {
    HoldBudget::DEFAULT.max_time(Duration::from_millis(500))
}

/// A scene on the broker: the examples' route under a unique prefix, its delay queues (for
/// `policy`) deleted at the end, and a publishing channel.
struct Scene {
    names: PaymentNames,
    route: prereq::amqp::Route,
    policy: Backoff,
    cleanup: support::Cleanup,
    ch: lapin::Channel,
}

impl Scene {
    async fn new(tag: &str, policy: Backoff) -> Option<Self> {
        let conn = support::broker().await?;
        let names = PaymentNames::with_prefix(&support::unique(tag));
        let route = payment_demo::route(&names);
        let cleanup = support::Cleanup::new();
        cleanup.delay_queues(&route, &policy);
        let ch = support::confirm_channel(&conn).await;
        Some(Self {
            names,
            route,
            policy,
            cleanup,
            ch,
        })
    }

    /// A consumer on the scene's route (delay queues forced), holding for `budget`, with
    /// `more` configuring it further.
    async fn consumer(
        &self,
        budget: HoldBudget,
        more: impl FnOnce(
            prereq::ConsumerBuilder<u64, support::payments::Payment>,
        ) -> prereq::ConsumerBuilder<u64, support::payments::Payment>,
    ) -> Running {
        let transport =
            support::unstarted_transport(&self.cleanup, self.route.clone(), DelayMode::DelayQueues)
                .await;
        Running::start_with(transport, self.policy, budget, true, more)
    }

    /// Payment 1 of K is held, then deferred as its hold runs out (K unknown); then K
    /// registers: payment 1 is out in its delay, K known.
    async fn payment_1_out_and_k_known(&self, run: &mut Running) {
        publish_payment(&self.ch, &self.names, "1", K).await;
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
        register(&self.ch, &self.names, K).await;
        run.wait(Duration::from_secs(10), |e| {
            e.decision == Decision::Registered
        })
        .await;
    }

    /// The next consumer, with its own key store and a hold long enough to keep both payments:
    /// once both reached it, K registers again; the order it held them in, and ran them in.
    async fn next_consumer_runs_both(&self) -> (Vec<String>, Vec<String>) {
        let long_hold = HoldBudget::DEFAULT.max_time(Duration::from_secs(30));
        let mut next = self.consumer(long_hold, |b| b).await;
        let mut held = Vec::new();
        next.wait(Duration::from_secs(30), |e| {
            if e.decision == Decision::Held {
                held.extend(e.message_id.clone());
            }
            held.len() == 2
        })
        .await;
        register(&self.ch, &self.names, K).await;
        let mut handled = 0;
        next.wait(Duration::from_secs(15), |e| {
            handled += usize::from(e.decision == Decision::Handled);
            handled == 2
        })
        .await;
        let ran = next.handled();
        next.stop().await.expect("graceful stop");
        (held, ran)
    }
}

/// Run the scenario; the payments in the order they were handled, and payment 2's decisions.
async fn deferred_then_later(keep_order: bool) -> Option<(Vec<String>, Vec<Decision>)> {
    let scene = Scene::new("order-deferral", policy()).await?;
    let (ch, names) = (&scene.ch, &scene.names);
    let mut run = scene
        .consumer(budget(), |b| b.keep_key_order(keep_order))
        .await;
    scene.payment_1_out_and_k_known(&mut run).await;
    publish_payment(ch, names, "2", K).await;

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

/// A consumer stops while payment 1 of K is out in its delay queue and payment 2 of K waits
/// behind it; another consumer (the next instance) starts on the same queues. Payment 2 is
/// deferred at the stop until after payment 1 can be back, not given back: the next consumer
/// gets 1 before 2 and runs them in that order. (Given back, 2 reached it first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_keeps_the_key_s_order_for_the_next_consumer() {
    let Some(scene) = Scene::new("order-stop", policy()).await else {
        return;
    };
    let (ch, names) = (&scene.ch, &scene.names);
    let mut first = scene.consumer(budget(), |b| b).await;
    scene.payment_1_out_and_k_known(&mut first).await;
    publish_payment(ch, names, "2", K).await;
    first
        .wait(Duration::from_secs(10), |e| {
            e.message_id.as_deref() == Some("2") && e.decision == Decision::Held
        })
        .await;
    let report = first.stop().await.expect("graceful stop");
    assert_eq!(
        (report.deferred, report.requeued, report.handled),
        (2, 0, 0),
        "payment 2 deferred at the stop, behind payment 1: {report:?}"
    );
    let (held, ran) = scene.next_consumer_runs_both().await;
    assert_eq!(
        held,
        ["1", "2"],
        "payment 1 reached the next consumer first"
    );
    assert_eq!(ran, ["1", "2"]);
}

/// As above, but payment 1's copy is back and held again (its client still unknown) when the
/// consumer stops, payment 2 still waiting behind it: the copy came back through the retry
/// queue, payment 2 through the service's queue. The next consumer must still run 1 before 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_keeps_the_order_when_the_deferred_copy_is_back_and_held_again() {
    let short = Backoff::linear(Duration::from_secs(1)).max_attempts(5);
    let Some(scene) = Scene::new("order-stop-back", short).await else {
        return;
    };
    let (ch, names) = (&scene.ch, &scene.names);
    let hold = HoldBudget::DEFAULT.max_time(Duration::from_secs(3));
    let mut first = scene.consumer(hold, |b| b).await;
    publish_payment(ch, names, "1", K).await;
    first
        .wait(Duration::from_secs(15), |e| {
            e.message_id.as_deref() == Some("1") && matches!(e.decision, Decision::Deferred { .. })
        })
        .await;
    publish_payment(ch, names, "2", K).await;
    first
        .wait(Duration::from_secs(15), |e| {
            e.message_id.as_deref() == Some("1") && e.attempt == 1 && e.decision == Decision::Held
        })
        .await;
    let report = first.stop().await.expect("graceful stop");
    assert_eq!(
        (report.handled, report.deferred, report.requeued),
        (0, 3, 0),
        "payment 1's first deferral, then both deferred together at the stop: {report:?}"
    );
    let (held, ran) = scene.next_consumer_runs_both().await;
    assert_eq!(
        ran,
        ["1", "2"],
        "held by the next consumer in the order {held:?}"
    );
}

/// With `wait_for_copies_at_stop`, a consumer told to stop while payment 1 of K is out in its
/// delay goes on until K has nothing out or to run (without it, it stops at once, nothing run).
/// Payment 2 of K, published after the stop, reaches it meanwhile and waits behind payment 1
/// (its hold, half a second here, ends first: it is deferred behind payment 1, and waited for
/// too). Both run on the stopping consumer, 1 then 2, and nothing is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_waits_for_its_copies_runs_them_before_what_is_published_after_it() {
    let Some(scene) = Scene::new("order-stop-wait", policy()).await else {
        return;
    };
    let (ch, names) = (&scene.ch, &scene.names);
    let mut first = scene
        .consumer(budget(), |b| {
            b.wait_for_copies_at_stop(Duration::from_secs(30))
        })
        .await;
    scene.payment_1_out_and_k_known(&mut first).await;
    first.signal_stop();
    publish_payment(ch, names, "2", K).await;
    let report = first.join().await.expect("graceful stop");
    while let Ok(e) = first.events.try_recv() {
        first.seen.push(e);
    }
    let of_2: Vec<Decision> = first
        .seen
        .iter()
        .filter(|e| e.message_id.as_deref() == Some("2"))
        .map(|e| e.decision.clone())
        .collect();
    assert_eq!(
        first.handled(),
        ["1", "2"],
        "the stop waited for payment 1's retry, and for payment 2 behind it: {of_2:?}"
    );
    assert_eq!(
        of_2.first(),
        Some(&Decision::Held),
        "payment 2, published after the stop, reached the stopping consumer: {of_2:?}"
    );
    assert_eq!((report.handled, report.requeued), (2, 0), "{report:?}");
}
