//! When the hold is full (by count or by bytes) a new message whose key is unknown is deferred
//! through the broker at once (`DeferCause::HoldFull`), and messages of other keys keep flowing:
//! a full hold never stalls the consumer. `HoldBudget::NONE` defers every unknown-key message.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, DeferCause, Event, HoldBudget};
use tokio::time::Instant;

fn consumer(rec: &Recorder<u64>, budget: HoldBudget) -> prereq::DependentConsumer<u64, Payment> {
    builder(rec, |_p: Payment| async { Ok(()) })
        .policy(linear(1, 3))
        .budget(budget)
        .build()
}

fn hold_full(delay_secs: u64) -> Decision {
    Decision::Deferred {
        delay: Duration::from_secs(delay_secs),
        cause: DeferCause::HoldFull,
    }
}

fn n(ev: &[Event<u64>], d: &Decision) -> usize {
    count(ev, |e| e.decision == *d)
}

#[tokio::test(start_paused = true)]
async fn full_by_count_defers_at_once_and_other_keys_flow() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 100));
    broker.publish(payment(2, 101));
    broker.publish(payment(3, 102)); // the hold (2 messages) is full
    broker.register(client(5));
    broker.publish(payment(4, 5)); // a known key, behind a full hold

    let rec = Recorder::new();
    let start = Instant::now();
    let budget = HoldBudget::DEFAULT.max_messages(2);
    let report = run_until(consumer(&rec, budget), &broker, &rec, |ev| {
        n(ev, &Decision::Handled) == 1 && n(ev, &hold_full(1)) == 1
    })
    .await;

    assert_eq!(
        rec.decisions_of("1"),
        vec![Decision::Held, Decision::Requeued]
    );
    assert_eq!(
        rec.decisions_of("2"),
        vec![Decision::Held, Decision::Requeued]
    );
    let third = rec.of("3");
    assert_eq!(third.len(), 1, "{third:?}");
    assert_eq!(third[0].decision, hold_full(1));
    assert_eq!(third[0].attempt, 0);
    assert_eq!(third[0].at, start, "deferred at once");
    let fourth = rec.of("4");
    assert_eq!(fourth.len(), 1);
    assert_eq!(fourth[0].decision, Decision::Handled);
    assert_eq!(fourth[0].at, start, "not stalled by the full hold");

    assert_eq!(report.peak_held, 2);
    assert_eq!((report.held, report.deferred), (2, 1));
    assert_eq!(broker.stats().deferred, 1);
}

#[tokio::test(start_paused = true)]
async fn full_by_bytes_defers_at_once() {
    let broker = MemoryBroker::new();
    let (a, b, c) = (payment(1, 100), payment(2, 101), payment(3, 102));
    let budget = HoldBudget::DEFAULT.max_bytes(a.len() + b.len());
    broker.publish(a);
    broker.publish(b); // exactly fills the byte budget
    broker.publish(c);
    broker.register(client(5));
    broker.publish(payment(4, 5));

    let rec = Recorder::new();
    let report = run_until(consumer(&rec, budget), &broker, &rec, |ev| {
        n(ev, &Decision::Handled) == 1 && n(ev, &hold_full(1)) == 1
    })
    .await;
    assert_eq!(rec.decisions_of("1")[0], Decision::Held);
    assert_eq!(rec.decisions_of("2")[0], Decision::Held);
    assert_eq!(rec.decisions_of("3"), vec![hold_full(1)]);
    assert_eq!(rec.decisions_of("4"), vec![Decision::Handled]);
    assert_eq!(report.peak_held, 2);
}

#[tokio::test(start_paused = true)]
async fn a_message_bigger_than_the_byte_budget_is_never_held() {
    let broker = MemoryBroker::new();
    let big = payment(1_000_000, 100);
    let budget = HoldBudget::DEFAULT.max_bytes(big.len() - 1);
    broker.publish(big);

    let rec = Recorder::new();
    let report = run_until(consumer(&rec, budget), &broker, &rec, |ev| {
        n(ev, &hold_full(1)) == 1
    })
    .await;
    assert_eq!(rec.decisions_of("1000000"), vec![hold_full(1)]);
    assert_eq!(report.peak_held, 0);
}

/// Releasing a key frees its place in the hold for the next unknown-key message.
#[tokio::test(start_paused = true)]
async fn release_frees_the_budget() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 100));
    broker.register(client(100));
    broker.publish(payment(2, 101));

    let rec = Recorder::new();
    let budget = HoldBudget::DEFAULT.max_messages(1);
    let report = run_until(consumer(&rec, budget), &broker, &rec, |ev| {
        n(ev, &Decision::Handled) == 1 && n(ev, &Decision::Held) == 2
    })
    .await;
    assert_eq!(report.deferred, 0, "{:#?}", rec.events());
    assert_eq!(report.peak_held, 1);
}

#[tokio::test(start_paused = true)]
async fn no_budget_defers_every_unknown_key_and_handles_it_when_it_comes_back() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 100));
    broker.publish(payment(2, 100));
    broker.register(client(5));
    broker.publish(payment(3, 5));

    let rec = Recorder::new();
    let start = Instant::now();
    let run = tokio::spawn(consumer(&rec, HoldBudget::NONE).run(
        broker.transport(),
        rec.until(|ev| n(ev, &Decision::Handled) == 3),
    ));
    rec.until(|ev| n(ev, &hold_full(1)) == 2 && n(ev, &Decision::Handled) == 1)
        .await;
    assert_eq!(Instant::now(), start, "deferred at once, not held");
    broker.register(client(100));
    let report = run.await.unwrap().unwrap();

    for id in [1, 2] {
        let ev = rec.of(&id.to_string());
        assert_eq!(
            ev.iter()
                .map(|e| (e.at - start, e.attempt, e.decision.clone()))
                .collect::<Vec<_>>(),
            vec![
                (Duration::ZERO, 0, hold_full(1)),
                (Duration::from_secs(1), 1, Decision::Handled)
            ],
            "payment {id}"
        );
    }
    assert_eq!((report.held, report.peak_held), (0, 0));
    assert_eq!(report.deferred, 2);
    assert_eq!(broker.stats().deferred, 2);
}
