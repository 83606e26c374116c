//! Held messages are unacknowledged deliveries, and a broker closes a channel whose delivery
//! stays unacknowledged past its acknowledgement timeout (RabbitMQ's `consumer_timeout`). The
//! transport reports that timeout (`Transport::ack_timeout`; here
//! `MemoryBroker::with_ack_timeout`), and the consumer clamps its hold time to half of it: a held
//! message is deferred through the broker well before the broker would take it back.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, DeferCause, HoldBudget};
use tokio::time::Instant;

const MIN: Duration = Duration::from_secs(60);

fn consumer(rec: &Recorder<u64>, budget: HoldBudget) -> prereq::DependentConsumer<u64, Payment> {
    builder(rec, |_p: Payment| async { Ok(()) })
        .budget(budget)
        .build()
}

fn expired(e: &prereq::Event<u64>) -> bool {
    e.decision
        == Decision::Deferred {
            delay: Duration::from_secs(1),
            cause: DeferCause::HoldExpired,
        }
}

/// Publish one payment whose client never comes, run until it is deferred, and return when
/// (after its first hold) that happened.
async fn deferred_after(broker: MemoryBroker, budget: HoldBudget) -> Duration {
    broker.publish(payment(1, 99));
    let rec = Recorder::new();
    let start = Instant::now();
    run_until(consumer(&rec, budget), &broker, &rec, |ev| {
        count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 1
    })
    .await;
    let ev = rec.of("1");
    assert_eq!(ev[0].decision, Decision::Held, "{ev:?}");
    assert!(expired(&ev[1]), "{ev:?}");
    let stats = broker.stats();
    assert_eq!(
        (stats.deferred, stats.acked),
        (1, 1),
        "settled with the broker"
    );
    ev[1].at - start
}

#[tokio::test(start_paused = true)]
async fn a_held_message_is_deferred_at_half_the_ack_timeout() {
    let ack_timeout = Duration::from_secs(10);
    let broker = MemoryBroker::new().with_ack_timeout(ack_timeout);
    let at = deferred_after(broker, HoldBudget::DEFAULT.max_time(60 * MIN)).await;
    assert_eq!(at, ack_timeout / 2, "deferred at T/2");
}

#[tokio::test(start_paused = true)]
async fn a_hold_time_below_the_clamp_is_kept() {
    let broker = MemoryBroker::new().with_ack_timeout(30 * MIN);
    let at = deferred_after(broker, HoldBudget::DEFAULT.max_time(Duration::from_secs(5))).await;
    assert_eq!(at, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn without_an_ack_timeout_the_hold_time_is_the_budget_s() {
    let at = deferred_after(MemoryBroker::new(), HoldBudget::DEFAULT.max_time(60 * MIN)).await;
    assert_eq!(at, 60 * MIN);
}

#[tokio::test(start_paused = true)]
async fn a_zero_ack_timeout_means_never_hold() {
    let broker = MemoryBroker::new().with_ack_timeout(Duration::ZERO);
    broker.publish(payment(1, 99));
    let rec = Recorder::new();
    run_until(consumer(&rec, HoldBudget::DEFAULT), &broker, &rec, |ev| {
        count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 1
    })
    .await;
    assert_eq!(
        rec.decisions_of("1"),
        vec![Decision::Deferred {
            delay: Duration::from_secs(1),
            cause: DeferCause::HoldFull
        }]
    );
}
