//! A consumer that gives a partition up (the transport revokes it, as a partitioned consumer
//! group hands it to another instance): it gives back what it holds and queues of the
//! partition, in the order received, at once; lets the partition's running handler finish; only
//! then releases it. Nothing of the partition runs on two instances at once, its keys keep their
//! order across the handover, and other partitions are not disturbed.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::{MemoryBroker, MemoryError, Stored};
use prereq::{Decision, MemoryKeys};
use tokio::time::Instant;

fn on(partition: u32, id: u64, client_id: u64) -> Stored {
    Stored::message(payment(id, client_id))
        .with_id(id.to_string())
        .with_partition(partition)
}

/// (payment, start, end) of every handler run, across instances.
type Runs = Log<(u64, Instant, Instant)>;

/// An instance of the group; instances share what they know of keys (in a fleet, a database).
fn instance(
    rec: &Recorder<u64>,
    runs: &Runs,
    keys: &MemoryKeys<u64>,
) -> prereq::DependentConsumer<u64, Payment> {
    let runs = runs.clone();
    builder(rec, move |p: Payment| {
        let runs = runs.clone();
        async move {
            let start = Instant::now();
            // Payment 1 is slow: it still runs when its partition is revoked.
            let work = if p.id == 1 { 10 } else { 1 };
            tokio::time::sleep(Duration::from_secs(work)).await;
            runs.push((p.id, start, Instant::now()));
            Ok(())
        }
    })
    .concurrency(4)
    .keys(keys.clone())
    .build()
}

/// An instance running on `broker` in a task of its own until `done` holds over its events.
fn start(
    rec: &Recorder<u64>,
    runs: &Runs,
    keys: &MemoryKeys<u64>,
    broker: &MemoryBroker,
    done: impl Fn(&[prereq::Event<u64>]) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Result<prereq::Report, prereq::RunError<MemoryError>>> {
    tokio::spawn(instance(rec, runs, keys).run(broker.transport(), rec.until(done)))
}

#[tokio::test(start_paused = true)]
async fn a_revoked_partition_is_given_back_in_order_and_released_after_its_running_handler() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.register(client(3));
    broker.publish_stored(on(0, 1, 1)); // runs 10 s
    broker.publish_stored(on(0, 2, 1)); // queued behind payment 1 (same client)
    broker.publish_stored(on(0, 3, 2)); // held: client 2 unknown
    broker.publish_stored(on(1, 4, 3)); // another partition

    let runs = Runs::new();
    let keys = MemoryKeys::new();
    let (a_rec, b_rec) = (Recorder::new(), Recorder::new());
    let a = start(&a_rec, &runs, &keys, &broker, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    });
    a_rec
        .until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let revoked_at = Instant::now();
    broker.revoke(0);
    // Payments 2 and 3 go back at once, in the order received; payment 1 still runs.
    a_rec
        .until(|ev| count(ev, |e| e.decision == Decision::Requeued) == 2)
        .await;
    let given_back: Vec<(String, Instant)> = a_rec
        .events()
        .into_iter()
        .filter(|e| e.decision == Decision::Requeued)
        .map(|e| (e.message_id.unwrap_or_default(), e.at))
        .collect();
    assert_eq!(
        given_back,
        vec![("2".to_owned(), revoked_at), ("3".to_owned(), revoked_at)]
    );
    assert!(broker.released().is_empty(), "payment 1 still runs");

    // Another instance takes the partition over once it is released.
    broker.register(client(2));
    let b = start(&b_rec, &runs, &keys, &broker, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    });
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(broker.released(), vec![0]);

    let runs = runs.get();
    let of = |id: u64| runs.iter().find(|(p, _, _)| *p == id).copied().unwrap();
    let (_, _, one_ended) = of(1);
    let (_, two_started, _) = of(2);
    assert_eq!(
        one_ended - revoked_at,
        Duration::from_secs(8),
        "payment 1 finished on A"
    );
    assert!(
        two_started >= one_ended,
        "payment 2 (client 1) started on B only after payment 1 ended on A"
    );
    assert_eq!(runs.len(), 4, "every payment ran once: {runs:?}");
    assert_eq!(
        b_rec.decisions_of("2").last(),
        Some(&Decision::Handled),
        "B handled the given-back payments"
    );
    assert_eq!(broker.pending(), 0);
}

/// Messages released together run in one handler job; when their partition is revoked while
/// the job runs the first, the job runs none of the others: it hands them back (given back once
/// the running handler ended, before the partition is released), and the next instance runs
/// them.
#[tokio::test(start_paused = true)]
async fn a_revoked_partition_s_messages_waiting_in_a_running_job_are_not_run() {
    let broker = MemoryBroker::new();
    broker.publish_stored(on(0, 1, 1)); // runs 10 s
    broker.publish_stored(on(0, 2, 1)); // same client: released with payment 1, in its job
    let runs = Runs::new();
    let keys = MemoryKeys::new();
    let (a_rec, b_rec) = (Recorder::new(), Recorder::new());
    let a = start(&a_rec, &runs, &keys, &broker, |ev| {
        count(ev, |e| e.decision == Decision::Requeued) == 1
    });
    a_rec
        .until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    broker.register(client(1));
    a_rec
        .until(|ev| count(ev, |e| matches!(e.decision, Decision::Released { .. })) == 2)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let revoked_at = Instant::now();
    broker.revoke(0);
    a.await.unwrap().unwrap();
    assert_eq!(
        a_rec.decisions_of("2").last(),
        Some(&Decision::Requeued),
        "A gave payment 2 back without running it"
    );
    assert_eq!(broker.released(), vec![0]);

    start(&b_rec, &runs, &keys, &broker, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 1
    })
    .await
    .unwrap()
    .unwrap();
    let runs = runs.get();
    let of = |id: u64| runs.iter().find(|(p, _, _)| *p == id).copied().unwrap();
    let (_, _, one_ended) = of(1);
    let (_, two_started, _) = of(2);
    assert_eq!(
        one_ended - revoked_at,
        Duration::from_secs(8),
        "payment 1 ran on A"
    );
    assert!(two_started >= one_ended, "payment 2 ran after payment 1");
    assert_eq!(runs.len(), 2, "each payment ran once: {runs:?}");
    assert_eq!(b_rec.decisions_of("2").last(), Some(&Decision::Handled));
    assert_eq!(broker.pending(), 0);
}

/// A key's later message waits for its deferred copy across a hand-over: the engine keeps a
/// key's later messages behind its deferred copy only in the instance that deferred it, so the
/// partition stays with that instance until the copy is back and settled (the broker's side,
/// here the in-memory one's [`MemoryBroker::revoke`], as the AMQP transport's consumer). Payment
/// 1 fails once and is deferred (1 s); payment 2 of the same client waits behind it on A. The
/// partition is revoked (B is about to take it): A still runs payment 1's copy, then payment 2,
/// and only then lets the partition go; B takes it from there (payment 3).
#[tokio::test(start_paused = true)]
async fn a_key_s_later_message_waits_for_its_deferred_copy_across_a_hand_over() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish_stored(on(0, 1, 1));
    let keys = MemoryKeys::new();
    // (payment, instance) of every run, across instances.
    let ran: Log<(u64, char)> = Log::new();
    let failed_once = Arc::new(AtomicBool::new(false));
    let instance = |rec: &Recorder<u64>, name: char| {
        let (ran, failed_once) = (ran.clone(), Arc::clone(&failed_once));
        builder(rec, move |p: Payment| {
            let fail = p.id == 1 && !failed_once.swap(true, Ordering::SeqCst);
            if !fail {
                ran.push((p.id, name));
            }
            async move {
                if fail {
                    Err(prereq::HandlerError::retry("busy"))
                } else {
                    Ok(())
                }
            }
        })
        .keys(keys.clone())
        .build()
    };
    // One record of both instances' events.
    let rec = Recorder::new();
    let handled = |n: usize| {
        move |ev: &[prereq::Event<u64>]| count(ev, |e| e.decision == Decision::Handled) == n
    };
    let a = tokio::spawn(instance(&rec, 'a').run(broker.transport(), rec.until(handled(3))));
    rec.until(|ev| count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 1)
        .await;
    broker.publish_stored(on(0, 2, 1));
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;
    broker.revoke(0);
    let b = tokio::spawn(instance(&rec, 'b').run(broker.transport(), rec.until(handled(3))));
    rec.until(handled(2)).await;
    assert_eq!(
        broker.released(),
        vec![0],
        "released once its copy was back"
    );
    broker.publish_stored(on(0, 3, 1));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let ran = ran.get();
    assert_eq!(
        ran.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "payment 2 ran before payment 1"
    );
    assert_eq!(
        ran[0],
        (1, 'a'),
        "the copy came back to the instance that deferred it"
    );
    assert_eq!(ran[2], (3, 'b'), "then the partition moved");
}

/// The in-memory broker's side of the above: a partition revoked while a deferred copy of it is
/// out stays with the transports made so far (they alone receive it) until the copy is back
/// and settled, then is revoked from them; and if they are all dropped meanwhile, it is free
/// for the others at once, copy included.
#[tokio::test(start_paused = true)]
async fn a_revoked_partition_waits_for_its_copies_unless_its_transports_are_gone() {
    use prereq::transport::{Settle, Transport};

    let defer = Settle::Defer {
        delay: Duration::from_secs(1),
        attempt: 1,
    };
    // Settled copy: revoked then.
    let broker = MemoryBroker::new();
    broker.publish_stored(on(0, 1, 1));
    let a = broker.transport();
    let first = a.recv().await.unwrap().unwrap();
    a.settle(first.id, defer.clone()).await.unwrap();
    broker.revoke(0);
    let b = broker.transport();
    broker.publish_stored(on(0, 2, 1));
    let second = a.recv().await.unwrap().unwrap();
    assert_eq!(
        second.message_id.as_deref(),
        Some("2"),
        "A keeps the partition"
    );
    assert!(!a.is_stale(second.id));
    let copy = a.recv().await.unwrap().unwrap();
    assert_eq!((copy.message_id.as_deref(), copy.attempt), (Some("1"), 1));
    a.settle(second.id, Settle::Requeue).await.unwrap();
    assert!(
        broker.released().is_empty() && !a.is_stale(copy.id),
        "not revoked while the copy is unsettled"
    );
    a.settle(copy.id, Settle::Ack).await.unwrap();
    assert_eq!(
        a.revoked().await,
        Some(0),
        "revoked once the copy is settled"
    );
    a.released(0);
    let again = b.recv().await.unwrap().unwrap();
    assert_eq!(again.message_id.as_deref(), Some("2"), "then B has it");

    // Its only transport dropped: free at once.
    let broker = MemoryBroker::new();
    broker.publish_stored(on(0, 1, 1));
    let a = broker.transport();
    let first = a.recv().await.unwrap().unwrap();
    a.settle(first.id, defer).await.unwrap();
    broker.revoke(0);
    let b = broker.transport();
    broker.publish_stored(on(0, 2, 1));
    drop(a);
    let second = b.recv().await.unwrap().unwrap();
    let copy = b.recv().await.unwrap().unwrap();
    assert_eq!(
        (second.message_id.as_deref(), copy.message_id.as_deref()),
        (Some("2"), Some("1"))
    );
    assert!(broker.released().is_empty(), "nothing to hand over");
}
