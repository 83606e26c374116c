//! A message whose key is already known is handled at once, acknowledged, and never held.

mod common;

use common::*;
use prereq::Decision;
use prereq::memory::MemoryBroker;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn known_key_is_handled_at_once_and_acked_without_hold() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 1));

    let rec = Recorder::new();
    let seen = Log::new();
    let log = seen.clone();
    let consumer = builder(&rec, move |p: Payment| {
        log.push((p.id, Instant::now()));
        async { Ok(()) }
    })
    .build();

    let start = Instant::now();
    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    })
    .await;

    // Handled once each, in order, with no virtual time passing.
    assert_eq!(seen.get(), vec![(10, start), (11, start)]);
    for id in ["10", "11"] {
        assert_eq!(
            rec.decisions_of(id),
            vec![Decision::Handled],
            "message {id}"
        );
    }
    assert_eq!(report.handled, 2);
    assert_eq!(report.registered, 1);
    assert_eq!(
        (report.held, report.released, report.peak_held),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        (report.deferred, report.dead_lettered),
        (0, 0),
        "{report:?}"
    );

    // The broker saw three acks (the registration and both payments) and has nothing left.
    let stats = broker.stats();
    assert_eq!(stats.acked, 3, "{stats:?}");
    assert_eq!(
        (stats.deferred, stats.dead_lettered, stats.requeued),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(broker.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn key_inserted_before_run_counts_as_known() {
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let keys = prereq::MemoryKeys::new();
    assert!(keys.insert(1));
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) })
        .keys(keys)
        .build();

    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 1
    })
    .await;
    assert_eq!(rec.decisions_of("10"), vec![Decision::Handled]);
    assert_eq!(report.held, 0);
    assert_eq!(broker.stats().acked, 1);
    assert_eq!(broker.pending(), 0);
}

/// Acknowledging a registration is not a requeue: the report and the event stream must say
/// exactly what happened to each delivery.
#[tokio::test(start_paused = true)]
async fn registration_ack_is_reported_as_registered_only() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.register(client(2));
    broker.publish(payment(10, 2));

    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) }).build();
    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 1
    })
    .await;

    assert_eq!(report.registered, 2);
    assert_eq!(report.requeued, 0, "{report:?}");
    assert_eq!(
        rec.count(|e| e.decision == Decision::Requeued),
        0,
        "{:#?}",
        rec.events()
    );
    assert_eq!(rec.count(|e| e.decision == Decision::Registered), 2);
    assert_eq!(broker.stats().requeued, 0);
}

/// A message handled at once is reported when it was handled, not when the loop last heard from
/// a handler job: its `Handled` event is dated no earlier than its handler's return, also when
/// the loop ran the handler itself (`engine::here`) long after its last news from a job.
#[tokio::test(start_paused = true)]
async fn a_message_handled_at_once_is_dated_when_it_was_handled() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    let rec = Recorder::new();
    let returned = Log::new();
    let log = returned.clone();
    let consumer = builder(&rec, move |p: Payment| {
        log.push((p.id, Instant::now()));
        async { Ok(()) }
    })
    .build();
    let b = broker.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        b.publish(payment(10, 1));
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        b.publish(payment(11, 1));
    });
    run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    })
    .await;
    for (id, ran) in returned.get() {
        let handled = rec
            .of(&id.to_string())
            .into_iter()
            .find(|e| e.decision == Decision::Handled)
            .expect("handled");
        assert!(
            handled.at >= ran,
            "payment {id}: handled at {:?}, its handler returned at {ran:?}",
            handled.at
        );
    }
}
