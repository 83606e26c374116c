//! The consumer's loop runs in a task of its own on the runtime, not in the future that awaits
//! `run`: where that future is polled outside the runtime's workers (`block_on`, as in
//! `#[tokio::main]`), the loop still runs on a worker. Dropping `run` ends the loop as dropping
//! the loop itself did (everything unsettled goes back to the broker); a loop that panics makes
//! `run` panic; a runtime that shuts down under the loop is an error, not a hang or a panic.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, RunError};

/// Every event is emitted by the loop: none on the thread that awaits `run` in `block_on`.
#[test]
fn the_loop_runs_on_the_runtimes_workers_not_on_the_thread_awaiting_run() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7));
    broker.register(client(7));
    broker.publish(payment(2, 7));
    let threads = Log::new();
    let seen = threads.clone();
    let rec = Recorder::new();
    let record = rec.observer();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) })
        .on_event(move |e: &prereq::Event<u64>| {
            seen.push(std::thread::current().id());
            record(e);
        })
        .build();
    let report = rt
        .block_on(consumer.run(
            broker.transport(),
            rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 2),
        ))
        .unwrap();
    assert_eq!(report.handled, 2, "{report:?}");
    let awaiting = std::thread::current().id();
    let threads = threads.get();
    assert!(!threads.is_empty(), "events were observed");
    assert!(
        threads.iter().all(|t| *t != awaiting),
        "an event was emitted on the thread awaiting `run`: {threads:?} (awaiting: {awaiting:?})"
    );
}

/// `run` dropped mid-way (a timeout around it): the loop's task ends, its transport is dropped,
/// and the broker has every unsettled delivery back.
#[tokio::test(start_paused = true)]
async fn a_dropped_run_ends_its_loop_and_the_broker_has_everything_back() {
    let broker = MemoryBroker::new();
    for id in 1..=3 {
        broker.publish(payment(id, 9)); // client 9 never comes: held
    }
    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) }).build();
    let held = rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 3);
    let run = consumer.run(broker.transport(), std::future::pending::<()>());
    tokio::select! {
        _ = run => panic!("the run ended on its own"),
        () = held => {}
    }
    // The run is dropped: its loop's task is cancelled and dropped on the runtime's next turns.
    let mut turns = 0;
    while broker.stats().requeued < 3 {
        turns += 1;
        assert!(turns < 1_000, "the loop did not end: {:?}", broker.stats());
        tokio::task::yield_now().await;
    }
    assert_eq!(broker.pending(), 3, "{:?}", broker.stats());
}

/// An observer that panics panics the loop; `run` panics with the same message, as it did when
/// the loop ran in its own future.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "an observer that panics")]
async fn a_panic_in_the_loop_is_a_panic_of_run() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 1));
    let consumer =
        prereq::DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .on_event(|_e: &prereq::Event<u64>| panic!("an observer that panics"))
            .build();
    let _ = consumer
        .run(broker.transport(), std::future::pending::<()>())
        .await;
}

/// `run` polled by another executor, its loop spawned on a runtime that then shuts down: `run`
/// returns `RunError::Cancelled`.
#[test]
fn a_runtime_shut_down_under_the_loop_is_an_error_of_run() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 5)); // held: the loop waits for client 5
    let (held_tx, held_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let consumer =
        prereq::DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .on_event(move |e: &prereq::Event<u64>| {
                if e.decision == Decision::Held {
                    let _ = held_tx.send(());
                }
            })
            .build();
    let transport = broker.transport();
    let waiting = std::thread::spawn(move || {
        let _entered = handle.enter();
        let result =
            futures::executor::block_on(consumer.run(transport, std::future::pending::<()>()));
        let _ = done_tx.send(result.map(|r| r.handled));
    });
    held_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the payment was held");
    rt.shutdown_background();
    let result = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("run returned");
    waiting.join().unwrap();
    match result {
        Err(RunError::Cancelled { reason, report }) => {
            assert!(reason.contains("cancelled"), "{reason}");
            assert_eq!(report.handled, 0);
        }
        other => panic!("expected RunError::Cancelled, got {other:?}"),
    }
}
