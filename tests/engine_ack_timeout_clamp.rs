//! Held messages are unacknowledged deliveries, and a broker closes a channel whose delivery
//! stays unacknowledged past its acknowledgement timeout (RabbitMQ's `consumer_timeout`). So
//! `broker_ack_timeout(T)` clamps the hold time to `T / 2`, and a held message is deferred
//! through the broker well before `T`.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{DEFAULT_ACK_TIMEOUT, Decision, DeferCause, HandlerError, HoldBudget};
use tokio::time::Instant;

fn consumer(
    rec: &Recorder<u64>,
    budget: HoldBudget,
    ack_timeout: Option<Duration>,
) -> prereq::DependentConsumer<u64, Payment> {
    let mut b = builder(rec)
        .budget(budget)
        .handler(|_p: Payment| async { Ok::<_, HandlerError>(()) });
    if let Some(t) = ack_timeout {
        b = b.broker_ack_timeout(t);
    }
    b.build().unwrap()
}

const MIN: Duration = Duration::from_secs(60);

#[test]
fn hold_time_is_clamped_to_half_the_ack_timeout() {
    let rec = Recorder::new();
    let long = HoldBudget::default().with_max_time(60 * MIN);
    // Default ack timeout: 30 min, so at most 15 min.
    assert_eq!(DEFAULT_ACK_TIMEOUT, 30 * MIN);
    assert_eq!(consumer(&rec, long, None).budget().max_time, 15 * MIN);
    assert_eq!(consumer(&rec, long, Some(MIN)).budget().max_time, MIN / 2);
    // A hold time already below the clamp is kept, and so is the rest of the budget.
    let short = HoldBudget::default().with_max_time(Duration::from_secs(5));
    assert_eq!(consumer(&rec, short, Some(MIN)).budget(), short);
    let clamped = consumer(&rec, HoldBudget::default(), Some(Duration::from_secs(20))).budget();
    assert_eq!(
        clamped,
        HoldBudget::default().with_max_time(Duration::from_secs(10))
    );
    // No acknowledgement timeout to speak of: never hold.
    assert_eq!(
        consumer(&rec, long, Some(Duration::ZERO)).budget().max_time,
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn a_held_message_is_deferred_before_the_ack_timeout() {
    let ack_timeout = Duration::from_secs(10);
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 99));

    let rec = Recorder::new();
    let budget = HoldBudget::default().with_max_time(60 * MIN);
    let start = Instant::now();
    let is_deferred = |e: &prereq::Event<u64>| {
        e.decision
            == Decision::Deferred {
                delay: Duration::from_secs(1),
                cause: DeferCause::HoldExpired,
            }
    };
    run_until(
        consumer(&rec, budget, Some(ack_timeout)),
        &broker,
        &rec,
        move |ev| count(ev, is_deferred) == 1,
    )
    .await;

    let ev = rec.of("1");
    assert_eq!(ev[0].decision, Decision::Held);
    assert_eq!(ev[0].at, start);
    assert!(is_deferred(&ev[1]), "{ev:?}");
    assert_eq!(ev[1].at - start, ack_timeout / 2, "deferred at T/2");
    assert!(ev[1].at - start < ack_timeout);
    let stats = broker.stats();
    assert_eq!(
        (stats.deferred, stats.acked),
        (1, 1),
        "settled with the broker"
    );
}
