//! Consumers sharing a key source wake each other's held messages at once: a payment held by
//! consumer B runs the moment consumer A consumes its client's registration (or the service's
//! own code inserts the key) — at the same virtual instant, as B's very next decision, without
//! B receiving anything from its broker.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, DependentConsumer, Event, MemoryKeys};
use tokio::time::Instant;

/// Consumer A: registrations only (its handler never runs).
fn registrar(rec: &Recorder<u64>, keys: &MemoryKeys<u64>) -> DependentConsumer<u64, Payment> {
    builder(rec, |_p: Payment| async { Ok(()) })
        .keys(keys.clone())
        .build()
}

/// Consumer B: payments, no registrations of its own.
fn payments(rec: &Recorder<u64>, keys: &MemoryKeys<u64>) -> DependentConsumer<u64, Payment> {
    DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
        .id(|p: &Payment| p.id.to_string())
        .keys(keys.clone())
        .on_event(rec.observer())
        .build()
}

/// B's events from the instant `t` on.
fn after(rec: &Recorder<u64>, t: Instant) -> Vec<Event<u64>> {
    rec.events().into_iter().filter(|e| e.at >= t).collect()
}

#[tokio::test(start_paused = true)]
async fn a_registration_consumed_by_one_consumer_releases_another_s_held_payment_at_once() {
    let keys = MemoryKeys::new();
    let (a_broker, b_broker) = (MemoryBroker::new(), MemoryBroker::new());
    b_broker.publish(payment(10, 5));
    let (a_rec, b_rec) = (Recorder::new(), Recorder::new());
    let b_done = b_rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 1);
    let b = tokio::spawn(payments(&b_rec, &keys).run(b_broker.transport(), b_done));
    b_rec
        .until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    let a_done = a_rec.until(|ev| count(ev, |e| e.decision == Decision::Registered) == 1);
    let a = tokio::spawn(registrar(&a_rec, &keys).run(a_broker.transport(), a_done));
    a_broker.register(client(5));
    let b_report = b.await.unwrap().unwrap();
    a.await.unwrap().unwrap();

    let registered_at = a_rec.events()[0].at;
    let b_after = after(&b_rec, registered_at);
    assert_eq!(
        b_after[0].decision,
        Decision::Released {
            waited: Duration::from_millis(100)
        },
        "B's very next decision is the release: {b_after:?}"
    );
    assert_eq!(b_after[0].at, registered_at, "zero virtual time");
    assert_eq!(b_report.released, 1);
    assert_eq!(b_broker.stats().delivered, 1, "B received nothing more");
    assert!(keys.contains(&5));
}

#[tokio::test(start_paused = true)]
async fn the_service_s_own_insert_releases_every_consumer_s_held_messages() {
    let keys = MemoryKeys::new();
    let brokers = [MemoryBroker::new(), MemoryBroker::new()];
    let recs = [Recorder::new(), Recorder::new()];
    let mut runs = Vec::new();
    for (i, (broker, rec)) in brokers.iter().zip(&recs).enumerate() {
        broker.publish(payment(i as u64, 7));
        let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 1);
        runs.push(tokio::spawn(
            payments(rec, &keys).run(broker.transport(), done),
        ));
    }
    for rec in &recs {
        rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inserted_at = Instant::now();
    assert!(keys.insert(7));
    for run in runs {
        run.await.unwrap().unwrap();
    }
    for rec in &recs {
        let released = after(rec, inserted_at);
        assert_eq!(released[0].at, inserted_at);
        assert!(
            matches!(released[0].decision, Decision::Released { .. }),
            "{released:?}"
        );
    }
}
