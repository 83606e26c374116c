//! What a handler's failure does: a retryable error defers by the policy and ends as a
//! `RetriesExhausted` dead letter; a permanent error dead-letters at once (`Rejected`); a
//! panicking handler (before or after its first await) counts as retryable, never takes the
//! consumer down, and ends dead-lettered (no infinite loop).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{DeadLetter, DeadLetterKind, Decision, DeferCause, Event, HandlerError};
use tokio::time::Instant;

fn retry(delay_secs: u64) -> Decision {
    Decision::Deferred {
        delay: Duration::from_secs(delay_secs),
        cause: DeferCause::HandlerRetry,
    }
}

fn dead(ev: &[Event<u64>]) -> usize {
    count(ev, |e| matches!(e.decision, Decision::DeadLettered(_)))
}

/// (offset from start, attempt, decision) for message `id`.
fn timeline(rec: &Recorder<u64>, id: &str, start: Instant) -> Vec<(Duration, u32, Decision)> {
    rec.of(id)
        .into_iter()
        .map(|e| (e.at - start, e.attempt, e.decision))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn retryable_error_defers_by_policy_then_dead_letters() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let consumer = builder(&rec, move |_p: Payment| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err(HandlerError::retry("database busy")) }
    })
    .policy(linear(1, 2))
    .build();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| dead(ev) == 1).await;

    let dl = DeadLetter::new(
        DeadLetterKind::RetriesExhausted,
        "handler still failing after 2 attempts: database busy",
        2,
    );
    assert_eq!(
        timeline(&rec, "10", start),
        vec![
            (Duration::ZERO, 0, retry(1)),
            (Duration::from_secs(1), 1, retry(2)),
            (
                Duration::from_secs(3),
                2,
                Decision::DeadLettered(dl.clone())
            ),
        ]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the original and two retries"
    );
    let dead_letters = broker.dead_letters();
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(dead_letters[0].dead_letter, dl);
    assert_eq!(dead_letters[0].message.attempt, 2);
    let stats = broker.stats();
    assert_eq!((stats.deferred, stats.dead_lettered), (2, 1));
    assert_eq!(
        (report.deferred, report.dead_lettered, report.handled),
        (2, 1, 0)
    );
    assert_eq!(broker.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn retryable_error_then_success_is_handled_on_retry() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let consumer = builder(&rec, move |_p: Payment| {
        let first = c.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(HandlerError::retry("timeout"))
            } else {
                Ok(())
            }
        }
    })
    .policy(linear(1, 5))
    .build();
    let start = Instant::now();
    run_until(consumer, &broker, &rec, |ev| handled(ev) == 1).await;
    assert_eq!(
        timeline(&rec, "10", start),
        vec![
            (Duration::ZERO, 0, retry(1)),
            (Duration::from_secs(1), 1, Decision::Handled),
        ]
    );
    assert!(broker.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn permanent_error_dead_letters_at_once() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 1));

    let rec = Recorder::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let consumer = builder(&rec, move |p: Payment| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if p.id == 10 {
                Err(HandlerError::permanent("amount exceeds limit"))
            } else {
                Ok(())
            }
        }
    })
    .build();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| {
        handled(ev) == 1 && dead(ev) == 1
    })
    .await;

    let dl = DeadLetter::new(DeadLetterKind::Rejected, "amount exceeds limit", 0);
    assert_eq!(
        timeline(&rec, "10", start),
        vec![(Duration::ZERO, 0, Decision::DeadLettered(dl.clone()))]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "no retry of the rejected message"
    );
    assert_eq!(broker.dead_letters()[0].dead_letter, dl);
    assert_eq!(broker.stats().deferred, 0);
    assert_eq!((report.handled, report.dead_lettered), (1, 1));
}

/// How a handler panics.
#[derive(Clone, Copy)]
enum Panic {
    /// While building its future (before any `.await`).
    Sync,
    /// Inside its future, after an await.
    Async,
}

async fn panicking_handler_is_retried_then_dead_lettered(how: Panic) {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.register(client(2));
    broker.publish(payment(10, 1)); // panics, every time
    broker.publish(payment(11, 2)); // fine

    let rec = Recorder::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let consumer = builder(&rec, move |p: Payment| {
        if p.id == 10 {
            c.fetch_add(1, Ordering::SeqCst);
            if let Panic::Sync = how {
                panic!("handler bug (sync) for payment {}", p.id);
            }
        }
        async move {
            tokio::task::yield_now().await;
            if p.id == 10 {
                panic!("handler bug (async) for payment {}", p.id);
            }
            Ok(())
        }
    })
    .policy(linear(1, 2))
    .concurrency(1)
    .build();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| {
        handled(ev) == 1 && dead(ev) == 1
    })
    .await;

    let dl = DeadLetter::new(
        DeadLetterKind::RetriesExhausted,
        format!(
            "handler still failing after 2 attempts: handler panicked: handler bug ({}) for payment 10",
            if let Panic::Sync = how {
                "sync"
            } else {
                "async"
            }
        ),
        2,
    );
    assert_eq!(
        timeline(&rec, "10", start),
        vec![
            (Duration::ZERO, 0, retry(1)),
            (Duration::from_secs(1), 1, retry(2)),
            (Duration::from_secs(3), 2, Decision::DeadLettered(dl)),
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // The other message was handled, at once: the panic took nothing else down.
    assert_eq!(
        timeline(&rec, "11", start),
        vec![(Duration::ZERO, 0, Decision::Handled)]
    );
    assert_eq!(
        (report.handled, report.deferred, report.dead_lettered),
        (1, 2, 1)
    );
    assert_eq!(broker.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn sync_panic_is_retryable_and_ends_dead_lettered() {
    panicking_handler_is_retried_then_dead_lettered(Panic::Sync).await;
}

#[tokio::test(start_paused = true)]
async fn async_panic_is_retryable_and_ends_dead_lettered() {
    panicking_handler_is_retried_then_dead_lettered(Panic::Async).await;
}

#[derive(Debug, thiserror::Error)]
#[error("inserting payment {0}")]
struct InsertFailed(u64, #[source] std::io::Error);

/// A handler written like any async function: `?` on a foreign error type.
async fn save(p: Payment) -> Result<(), HandlerError> {
    let io = std::io::Error::other("connection reset by peer");
    Err(InsertFailed(p.id, io))?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn question_mark_on_a_foreign_error_retries_and_keeps_its_source_chain() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let consumer = builder(&rec, save).policy(linear(1, 2)).build();
    run_until(consumer, &broker, &rec, |ev| dead(ev) == 1).await;

    let decisions = rec.decisions_of("10");
    assert_eq!(
        &decisions[..3],
        &[
            Decision::Deferred {
                delay: Duration::from_secs(1),
                cause: DeferCause::HandlerRetry
            },
            retry(2),
            decisions[2].clone()
        ]
    );
    let Decision::DeadLettered(dl) = &decisions[2] else {
        panic!("{decisions:?}");
    };
    assert_eq!(dl.kind, DeadLetterKind::RetriesExhausted);
    assert_eq!(
        dl.reason,
        "handler still failing after 2 attempts: inserting payment 10: connection reset by peer",
        "the source chain is in the reason"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_defers_at_least_as_long_as_asked() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 1));

    let rec = Recorder::new();
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = {
        let calls = Arc::clone(&calls);
        builder(&rec, move |p: Payment| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match (p.id, n) {
                    // Rate limited: longer than the policy's 1 s.
                    (10, 0) => Err(HandlerError::retry_after(
                        Duration::from_secs(30),
                        "429 too many requests",
                    )),
                    // Shorter than the policy's: the policy wins.
                    (11, _) if n < 3 => {
                        Err(HandlerError::retry_after(Duration::from_millis(10), "busy"))
                    }
                    _ => Ok(()),
                }
            }
        })
        .policy(linear(1, 5))
        .keep_key_order(false)
        .build()
    };
    let start = Instant::now();
    run_until(consumer, &broker, &rec, |ev| handled(ev) == 2).await;
    assert_eq!(
        timeline(&rec, "10", start),
        vec![
            (
                Duration::ZERO,
                0,
                Decision::Deferred {
                    delay: Duration::from_secs(30),
                    cause: DeferCause::HandlerRetry
                }
            ),
            (Duration::from_secs(30), 1, Decision::Handled),
        ]
    );
    assert_eq!(
        timeline(&rec, "11", start)[0].2,
        retry(1),
        "the policy's delay when it is longer"
    );
}
