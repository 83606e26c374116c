//! A message held past `max_time` is deferred through the broker by the policy (attempt + 1),
//! comes back after exactly `delay(attempt)`, and is dead-lettered with `KeyNeverArrived` and
//! its attempt count after the last attempt. A per-message limit (`x-retry-limit`, here
//! `Stored::with_max_attempts`) can lower the policy's limit, never raise it.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::{MemoryBroker, Stored};
use prereq::{DeadLetterKind, Decision, DeferCause, HoldBudget};
use tokio::time::Instant;

const HOLD: Duration = Duration::from_secs(10);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn consumer(rec: &Recorder<u64>, max_attempts: u32) -> prereq::DependentConsumer<u64, Payment> {
    builder(rec, |_p: Payment| async { Ok(()) })
        .policy(linear(1, max_attempts))
        .budget(HoldBudget::DEFAULT.max_time(HOLD))
        .build()
}

fn dead_lettered(ev: &[prereq::Event<u64>]) -> bool {
    count(ev, |e| matches!(e.decision, Decision::DeadLettered(_))) == 1
}

/// The (offset from start, attempt, decision) timeline of a message.
fn timeline(rec: &Recorder<u64>, id: &str, start: Instant) -> Vec<(Duration, u32, Decision)> {
    rec.of(id)
        .into_iter()
        .map(|e| (e.at - start, e.attempt, e.decision))
        .collect()
}

fn deferred(delay: u64) -> Decision {
    Decision::Deferred {
        delay: secs(delay),
        cause: DeferCause::HoldExpired,
    }
}

#[tokio::test(start_paused = true)]
async fn held_too_long_is_deferred_by_policy_then_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 99)); // client 99 never arrives

    let rec = Recorder::new();
    let start = Instant::now();
    let run = tokio::spawn(consumer(&rec, 3).run(broker.transport(), rec.until(dead_lettered)));

    // The first deferral: the broker stored a delayed copy with attempt 1 and acked the
    // original before the engine reported it.
    rec.until(|ev| count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 1)
        .await;
    assert_eq!(Instant::now() - start, HOLD);
    let stats = broker.stats();
    assert_eq!((stats.deferred, stats.acked, stats.delivered), (1, 1, 1));
    assert_eq!(broker.pending(), 1, "the delayed copy");

    let report = run.await.unwrap().unwrap();

    // Held 10 s, deferred 1 s, held 10 s, deferred 2 s, held 10 s, deferred 3 s, held 10 s:
    // the policy allows 3 retries, so the 4th expiry dead-letters.
    let reason = "prerequisite key 99 still unknown after 3 attempts".to_owned();
    let dl = prereq::DeadLetter::new(DeadLetterKind::KeyNeverArrived, reason, 3);
    assert_eq!(
        timeline(&rec, "1", start),
        vec![
            (secs(0), 0, Decision::Held),
            (secs(10), 0, deferred(1)),
            (secs(11), 1, Decision::Held),
            (secs(21), 1, deferred(2)),
            (secs(23), 2, Decision::Held),
            (secs(33), 2, deferred(3)),
            (secs(36), 3, Decision::Held),
            (secs(46), 3, Decision::DeadLettered(dl.clone())),
        ]
    );
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter, dl);
    assert_eq!(dead[0].message.attempt, 3);
    assert_eq!(dead[0].message.body, payment(1, 99));
    let stats = broker.stats();
    assert_eq!((stats.deferred, stats.dead_lettered), (3, 1), "{stats:?}");
    assert_eq!(broker.pending(), 0);
    assert_eq!(
        (report.held, report.deferred, report.dead_lettered),
        (4, 3, 1)
    );
    assert_eq!(report.handled, 0);
}

#[tokio::test(start_paused = true)]
async fn deferred_message_is_handled_when_it_comes_back_after_its_key() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 5));

    let rec = Recorder::new();
    let start = Instant::now();
    let handled = |ev: &[prereq::Event<u64>]| count(ev, |e| e.decision == Decision::Handled) == 1;
    let run = tokio::spawn(consumer(&rec, 3).run(broker.transport(), rec.until(handled)));

    rec.until(|ev| count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 1)
        .await;
    // The client arrives while the copy waits in the broker (t = 10.5 s; it is due at 11 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.register(client(5));
    let report = run.await.unwrap().unwrap();

    assert_eq!(
        timeline(&rec, "1", start),
        vec![
            (secs(0), 0, Decision::Held),
            (secs(10), 0, deferred(1)),
            (secs(11), 1, Decision::Handled),
        ]
    );
    assert_eq!(report.handled, 1);
    assert!(broker.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn per_message_limit_below_the_policy_dead_letters_sooner() {
    let broker = MemoryBroker::new();
    broker.publish_stored(Stored::message(payment(1, 99)).with_max_attempts(1));

    let rec = Recorder::new();
    let start = Instant::now();
    run_until(consumer(&rec, 3), &broker, &rec, dead_lettered).await;

    let tl = timeline(&rec, "1", start);
    assert_eq!(
        tl.iter().map(|(t, a, _)| (*t, *a)).collect::<Vec<_>>(),
        vec![(secs(0), 0), (secs(10), 0), (secs(11), 1), (secs(21), 1)]
    );
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.kind, DeadLetterKind::KeyNeverArrived);
    assert_eq!(dead[0].dead_letter.attempts, 1);
    assert_eq!(broker.stats().deferred, 1);
}

/// A message's own limit can lower the consumer's, never raise it: a header cannot make a
/// message retry for ever.
#[tokio::test(start_paused = true)]
async fn per_message_limit_above_the_policy_is_capped_by_it() {
    let broker = MemoryBroker::new();
    broker.publish_stored(Stored::message(payment(1, 99)).with_max_attempts(u32::MAX));

    let rec = Recorder::new();
    let start = Instant::now();
    run_until(consumer(&rec, 3), &broker, &rec, dead_lettered).await;

    let deferrals: Vec<(Duration, u32, Decision)> = timeline(&rec, "1", start)
        .into_iter()
        .filter(|(_, _, d)| matches!(d, Decision::Deferred { .. }))
        .collect();
    assert_eq!(
        deferrals,
        vec![
            (secs(10), 0, deferred(1)),
            (secs(21), 1, deferred(2)),
            (secs(33), 2, deferred(3)),
        ]
    );
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.kind, DeadLetterKind::KeyNeverArrived);
    assert_eq!(dead[0].dead_letter.attempts, 3);
    assert_eq!(
        rec.of("1").last().map(|e| e.at - start),
        Some(secs(46)),
        "the 4th expiry (36 s + 10 s) dead-letters"
    );
}
