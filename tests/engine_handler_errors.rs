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

fn handled(ev: &[Event<u64>]) -> usize {
    count(ev, |e| e.decision == Decision::Handled)
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
    let consumer = builder(&rec)
        .policy(linear(1, 2))
        .handler(move |_p: Payment| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retry("database busy")) }
        })
        .build()
        .unwrap();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| dead(ev) == 1).await;

    let dl = DeadLetter {
        kind: DeadLetterKind::RetriesExhausted,
        reason: "handler still failing after 2 deferrals: database busy".into(),
        attempts: 2,
    };
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
    let consumer = builder(&rec)
        .policy(linear(1, 5))
        .handler(move |_p: Payment| {
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err(HandlerError::retry("timeout"))
                } else {
                    Ok(())
                }
            }
        })
        .build()
        .unwrap();
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
    let consumer = builder(&rec)
        .handler(move |p: Payment| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if p.id == 10 {
                    Err(HandlerError::permanent("amount exceeds limit"))
                } else {
                    Ok(())
                }
            }
        })
        .build()
        .unwrap();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| {
        handled(ev) == 1 && dead(ev) == 1
    })
    .await;

    let dl = DeadLetter {
        kind: DeadLetterKind::Rejected,
        reason: "amount exceeds limit".into(),
        attempts: 0,
    };
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
    let consumer = builder(&rec)
        .policy(linear(1, 2))
        .concurrency(1)
        .handler(move |p: Payment| {
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
        .build()
        .unwrap();
    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| {
        handled(ev) == 1 && dead(ev) == 1
    })
    .await;

    let dl = DeadLetter {
        kind: DeadLetterKind::RetriesExhausted,
        reason: format!(
            "handler still failing after 2 deferrals: handler panicked: handler bug ({}) for payment 10",
            if let Panic::Sync = how {
                "sync"
            } else {
                "async"
            }
        ),
        attempts: 2,
    };
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
