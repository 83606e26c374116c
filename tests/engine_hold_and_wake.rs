//! A message whose key is unknown is held (unacknowledged), and released with zero virtual
//! time once the key arrives, in receive order, before any later message of that key: whether
//! the key comes from a registration message or from the service's own code (`MemoryKeys::insert`).

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, MemoryKeys};
use tokio::time::Instant;

fn recording_consumer(
    rec: &Recorder<u64>,
    seen: &Log<(u64, Instant)>,
) -> prereq::DependentConsumer<u64, Payment> {
    recording_consumer_with(rec, seen, MemoryKeys::new())
}

fn recording_consumer_with(
    rec: &Recorder<u64>,
    seen: &Log<(u64, Instant)>,
    keys: MemoryKeys<u64>,
) -> prereq::DependentConsumer<u64, Payment> {
    let log = seen.clone();
    builder(rec, move |p: Payment| {
        log.push((p.id, Instant::now()));
        // Take some virtual time, so that a later message of the key would overtake a
        // released one if the engine let it.
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        }
    })
    .concurrency(4)
    .keys(keys)
    .build()
}

#[tokio::test(start_paused = true)]
async fn registration_releases_held_messages_at_once_in_receive_order() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.publish(payment(2, 8)); // another unknown key, stays held
    broker.publish(payment(3, 7));
    broker.publish(payment(4, 7));

    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = recording_consumer(&rec, &seen);
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 4);
    let run = tokio::spawn(consumer.run(broker.transport(), done));

    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 4)
        .await;
    let start = Instant::now();
    // Held means unacknowledged: the broker still owns all four.
    assert_eq!(broker.stats().acked, 0);
    assert_eq!(broker.pending(), 4);
    assert!(
        seen.get().is_empty(),
        "handled before its key: {:?}",
        seen.get()
    );

    // The client arrives 3 s later, followed at once by a later payment of the same client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let registered_at = Instant::now();
    assert_eq!(registered_at - start, Duration::from_secs(3));
    broker.register(client(7));
    broker.publish(payment(5, 7));

    let report = run.await.unwrap().unwrap();

    let seen = seen.get();
    let order: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        order,
        vec![1, 3, 4, 5],
        "client 7's payments in receive order"
    );
    // Woken with zero virtual time: the first released payment runs the instant the
    // registration arrives (the others follow, one handler at a time, 10 ms each).
    assert_eq!(seen[0].1, registered_at);
    assert_eq!(seen[1].1, registered_at + Duration::from_millis(10));
    assert_eq!(seen[2].1, registered_at + Duration::from_millis(20));
    for id in [1, 3, 4] {
        assert_eq!(
            rec.decisions_of(&id.to_string()),
            vec![
                Decision::Held,
                Decision::Released {
                    waited: Duration::from_secs(3)
                },
                Decision::Handled
            ],
            "payment {id}"
        );
    }
    assert_eq!(rec.decisions_of("5"), vec![Decision::Handled]);
    assert_eq!(
        rec.decisions_of("2"),
        vec![Decision::Held, Decision::Requeued]
    );
    assert_eq!((report.held, report.released, report.handled), (4, 3, 4));
    assert_eq!(report.peak_held, 4);
    // Never deferred: released from memory, no broker round-trip.
    assert_eq!(broker.stats().deferred, 0);
}

/// The registration alone wakes the held messages: nothing else needs to arrive.
#[tokio::test(start_paused = true)]
async fn registration_alone_wakes_held_messages_with_zero_virtual_time() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.publish(payment(2, 7));

    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = recording_consumer(&rec, &seen);
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 2);
    let run = tokio::spawn(consumer.run(broker.transport(), done));

    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let registered_at = Instant::now();
    broker.register(client(7));
    let report = run.await.unwrap().unwrap();

    assert_eq!(
        seen.get(),
        vec![
            (1, registered_at),
            (2, registered_at + Duration::from_millis(10))
        ]
    );
    assert_eq!((report.held, report.released, report.deferred), (2, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn key_handle_insert_releases_held_messages_at_once_in_order() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.publish(payment(2, 7));

    let rec = Recorder::new();
    let seen = Log::new();
    let keys = MemoryKeys::new();
    let consumer = recording_consumer_with(&rec, &seen, keys.clone());
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 3);
    let run = tokio::spawn(consumer.run(broker.transport(), done));

    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(seen.get().is_empty());
    assert!(!keys.contains(&7));

    // Your own code learns that client 7 exists: the handle alone wakes the held payments.
    let inserted_at = Instant::now();
    assert!(keys.insert(7), "the key was new");
    rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 2)
        .await;
    assert_eq!(
        seen.get(),
        vec![
            (1, inserted_at),
            (2, inserted_at + Duration::from_millis(10))
        ],
        "released with zero virtual time, in order"
    );
    // A later payment of client 7 is handled directly.
    broker.publish(payment(3, 7));

    let report = run.await.unwrap().unwrap();
    assert_eq!(seen.get().last().map(|(id, _)| *id), Some(3));
    assert_eq!(
        rec.decisions_of("1")[1],
        Decision::Released {
            waited: Duration::from_secs(5)
        }
    );
    assert_eq!(rec.decisions_of("3"), vec![Decision::Handled]);
    assert_eq!((report.held, report.released, report.handled), (2, 2, 3));
    assert!(!keys.insert(7), "the key was known already");
}

/// A key put straight into a shared store (not through a `KeyHandle`, so nothing wakes the
/// engine): the next message of that key finds it known, and the messages held for it go
/// first, in order.
#[tokio::test(start_paused = true)]
async fn key_known_without_a_wake_releases_held_messages_before_the_new_one() {
    use prereq::MemoryKeys;
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.publish(payment(2, 7));

    let keys = MemoryKeys::new();
    let rec = Recorder::new();
    let seen = Log::new();
    let log = seen.clone();
    let consumer = builder(&rec, move |p: Payment| {
        log.push(p.id);
        async { Ok(()) }
    })
    .keys(keys.clone())
    .build();
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 3);
    let run = tokio::spawn(consumer.run(broker.transport(), done));
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;

    keys.insert(7); // e.g. another consumer sharing the store learnt it
    let at = Instant::now();
    broker.publish(payment(3, 7));
    let report = run.await.unwrap().unwrap();

    assert_eq!(seen.get(), vec![1, 2, 3]);
    assert_eq!(rec.of("1")[1].at, at, "released when the next message came");
    assert_eq!((report.released, report.deferred), (2, 0));
}

/// A registration that arrives before its payments (the usual order) holds nothing.
#[tokio::test(start_paused = true)]
async fn messages_after_their_registration_are_never_held() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.register(client(7));
    broker.publish(payment(2, 7));

    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = recording_consumer(&rec, &seen);
    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    })
    .await;
    assert_eq!(
        seen.get().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(rec.decisions_of("2"), vec![Decision::Handled]);
    assert_eq!((report.held, report.released), (1, 1));
}

/// A large release (100 held payments of one client, handled one at a time, slowly) must not
/// stall the intake: the next registration, for another client, still wakes that client's held
/// payment at once.
#[tokio::test(start_paused = true)]
async fn a_large_release_does_not_stall_other_keys() {
    let broker = MemoryBroker::new();
    for id in 0..100 {
        broker.publish(payment(id, 1));
    }
    broker.publish(payment(1_000, 2));
    broker.register(client(1));
    broker.register(client(2));
    let rec = Recorder::new();
    let consumer = builder(&rec, |p: Payment| async move {
        if p.client == 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    })
    .concurrency(2)
    .build();
    let start = Instant::now();
    run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 101
    })
    .await;
    let handled_2 = rec
        .of("1000")
        .into_iter()
        .find(|e| e.decision == Decision::Handled)
        .unwrap();
    assert_eq!(
        handled_2.at - start,
        Duration::ZERO,
        "client 2's payment waited for client 1's release"
    );
}
