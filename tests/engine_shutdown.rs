//! Graceful shutdown: running handlers finish, held and queued messages go back to the broker
//! (none lost), and a new consumer on the same broker handles them all. A consumer that goes
//! away without a graceful shutdown (its transport dropped, its `run` future dropped) loses
//! nothing either: the broker redelivers what it had not settled, marked redelivered.

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::transport::{Settle, Transport};
use prereq::{Decision, HandlerError, MemoryKeys};
use tokio::sync::{oneshot, watch};

/// A consumer whose handler logs each payment it starts, then runs `work`, with `grace` to stop;
/// the log; and a shutdown that completes once a handler started (looked at every 10 ms of
/// virtual time).
fn stopped_at_first_start<W>(
    rec: &Recorder<u64>,
    grace: Duration,
    work: fn() -> W,
) -> (
    prereq::DependentConsumer<u64, Payment>,
    Log<u64>,
    impl Future<Output = ()> + Send + 'static,
)
where
    W: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let started = Log::new();
    let consumer = {
        let started = started.clone();
        builder(rec, move |p: Payment| {
            started.push(p.id);
            work()
        })
        .shutdown_grace(grace)
        .build()
    };
    let stop = {
        let started = started.clone();
        async move {
            while started.len() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    (consumer, started, stop)
}

/// Payments 1 to 3 of client 1, then client 1's registration: held, then released together.
fn three_payments_then_their_client(broker: &MemoryBroker) {
    for id in 1..=3 {
        broker.publish(payment(id, 1));
    }
    broker.register(client(1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_running_handlers_and_gives_back_everything_else() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(1, 1)); // running when the shutdown comes
    broker.publish(payment(2, 1)); // queued behind it (same key)
    broker.publish(payment(3, 1)); // queued
    broker.publish(payment(4, 2)); // held: client 2 unknown
    broker.publish(payment(5, 3)); // held: client 3 unknown

    let keys = MemoryKeys::new();
    let rec = Recorder::new();
    let seen = Log::new();
    let (gate, _) = watch::channel(false);
    let consumer = {
        let (seen, gate) = (seen.clone(), gate.clone());
        builder(&rec, move |p: Payment| {
            let (seen, mut open) = (seen.clone(), gate.subscribe());
            async move {
                let _ = open.wait_for(|o| *o).await;
                seen.push(p.id);
                Ok(())
            }
        })
        .keys(keys.clone())
        .concurrency(1)
        .build()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(broker.transport(), async {
        let _ = stopped.await;
    }));

    // Everything delivered: one handler running, two queued, two held.
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(broker.stats().delivered, 6);
    assert_eq!(broker.pending(), 5, "all unsettled");

    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!run.is_finished(), "waits for the running handler");
    gate.send_replace(true);
    let report = run.await.unwrap().unwrap();

    assert_eq!(
        seen.get(),
        vec![1],
        "the running handler finished; nothing new started"
    );
    assert_eq!(report.handled, 1);
    assert_eq!(report.requeued, 4, "{report:?}");
    assert_eq!(
        rec.count(|e| e.decision == Decision::Requeued),
        4,
        "{:#?}",
        rec.events()
    );
    let stats = broker.stats();
    assert_eq!(stats.requeued, 4, "{stats:?}");
    assert_eq!(stats.acked, 2, "the registration and payment 1");
    assert_eq!((stats.deferred, stats.dead_lettered), (0, 0));
    assert_eq!(broker.pending(), 4, "none lost");

    // A new consumer on the same broker (and the same key store) handles them all, once.
    broker.register(client(2));
    broker.register(client(3));
    let rec2 = Recorder::new();
    let consumer2 = {
        let seen = seen.clone();
        builder(&rec2, move |p: Payment| {
            seen.push(p.id);
            async { Ok(()) }
        })
        .keys(keys)
        .build()
    };
    let report2 = run_until(consumer2, &broker, &rec2, |ev| handled(ev) == 4).await;
    let mut all = seen.get();
    let client_1: Vec<u64> = all.iter().copied().filter(|id| *id <= 3).collect();
    assert_eq!(client_1, vec![1, 2, 3], "client 1's payments in order");
    all.sort_unstable();
    assert_eq!(all, vec![1, 2, 3, 4, 5], "each handled exactly once");
    assert_eq!(report2.requeued, 0);
    assert_eq!(broker.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_closed_transport_also_gives_back_held_messages() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 9));
    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) }).build();
    let run = tokio::spawn(consumer.run(broker.transport(), std::future::pending::<()>()));
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;
    broker.close();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.requeued, 1);
    assert_eq!(broker.stats().requeued, 1);
    assert_eq!(broker.pending(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_transport_returns_its_unsettled_deliveries_marked_redelivered() {
    let broker = MemoryBroker::new();
    for id in 1..=3 {
        broker.publish(payment(id, 1));
    }
    let first = broker.transport();
    let a = first.recv().await.unwrap().unwrap();
    let b = first.recv().await.unwrap().unwrap();
    assert!(!a.redelivered && !b.redelivered);
    first.settle(a.id, Settle::Ack).await.unwrap();
    drop(first); // b was never settled

    let second = broker.transport();
    let again = second.recv().await.unwrap().unwrap();
    assert_eq!(again.body, b.body, "given back at the front of the queue");
    assert!(again.redelivered);
    let next = second.recv().await.unwrap().unwrap();
    assert_eq!(next.body, payment(3, 1));
    assert!(!next.redelivered);
    let stats = broker.stats();
    assert_eq!((stats.requeued, stats.acked), (1, 1));
}

/// Dropping the `run` future (a `select!` or `timeout` around it, a cancelled task) is a crash
/// as far as the broker is concerned: every unsettled delivery, held ones included, must come
/// back, redelivered, without waiting for anything else to happen on the broker.
#[tokio::test(start_paused = true)]
async fn dropping_the_run_future_gives_back_held_messages() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 1));
    broker.publish(payment(2, 2));

    let keys = MemoryKeys::new();
    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) })
        .keys(keys.clone())
        .build();
    let run = tokio::spawn(consumer.run(broker.transport(), std::future::pending::<()>()));
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // No new publish: nothing on the broker may be needed to free the old deliveries.
    keys.insert(1);
    keys.insert(2);
    let redelivered = Log::new();
    let rec2 = Recorder::new();
    let consumer2 = {
        let seen = redelivered.clone();
        builder(&rec2, move |p: Payment| {
            seen.push(p.id);
            async { Ok(()) }
        })
        .keys(keys)
        .build()
    };
    let transport = broker.transport();
    let report = consumer2
        .run(transport, rec2.until(|ev| handled(ev) == 2))
        .await
        .unwrap();
    assert_eq!(redelivered.get(), vec![1, 2]);
    assert_eq!(report.handled, 2);
    assert_eq!(broker.stats().requeued, 2, "{:?}", broker.stats());
    assert_eq!(broker.pending(), 0);
}

/// A broker puts a requeued message back at its position: requeuing a batch (as a shutdown
/// does, in any order) must not reverse it, or a key's messages would change order.
#[tokio::test(start_paused = true)]
async fn requeued_deliveries_come_back_in_delivery_order() {
    let broker = MemoryBroker::new();
    for id in 1..=4 {
        broker.publish(payment(id, 1));
    }
    let first = broker.transport();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(first.recv().await.unwrap().unwrap());
    }
    // Give back 3, then 1, then 2.
    for i in [2, 0, 1] {
        first.settle(got[i].id, Settle::Requeue).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = first.recv().await.unwrap().unwrap();
        order.push((
            serde_json::from_slice::<Payment>(&d.body).unwrap().id,
            d.redelivered,
        ));
    }
    assert_eq!(order, vec![(1, true), (2, true), (3, true), (4, false)]);
}

/// A handler that never returns cannot block shutdown past the grace period: it is abandoned,
/// its message stays unsettled, and the broker gives it to the next consumer.
#[tokio::test(start_paused = true)]
async fn shutdown_abandons_a_stuck_handler_after_the_grace_and_loses_nothing() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(1, 1));
    let rec = Recorder::new();
    let (consumer, _, stop) =
        stopped_at_first_start(&rec, Duration::from_secs(5), std::future::pending);
    let start = tokio::time::Instant::now();
    let report = consumer.run(broker.transport(), stop).await.unwrap();
    // The stuck handler started at once; shutdown returned exactly one grace later.
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(10) + Duration::from_secs(5)
    );
    assert_eq!(report.handled, 0);
    // The transport went away with the consumer: the unsettled message went back.
    assert_eq!(broker.pending(), 1, "the message is still the broker's");
    assert_eq!(broker.stats().requeued, 1);

    let rec2 = Recorder::new();
    let keys = prereq::MemoryKeys::new();
    keys.insert(1);
    let consumer = builder(&rec2, |_p: Payment| async { Ok(()) })
        .keys(keys)
        .build();
    let report = run_until(consumer, &broker, &rec2, |ev| handled(ev) == 1).await;
    assert_eq!(report.handled, 1);
    assert_eq!(broker.pending(), 0);
}

/// A stuck handler abandoned at the end of the grace does not take its key's later messages
/// with it: released together, they were given to the same handler job, which never ran them;
/// the consumer gives them back itself (in order), and only the stuck one is left unsettled.
#[tokio::test(start_paused = true)]
async fn a_stuck_handler_s_key_gives_back_the_messages_it_did_not_run() {
    let broker = MemoryBroker::new();
    three_payments_then_their_client(&broker);
    let rec = Recorder::new();
    let (consumer, started, stop) =
        stopped_at_first_start(&rec, Duration::from_secs(5), std::future::pending);
    let report = consumer.run(broker.transport(), stop).await.unwrap();
    assert_eq!(started.get(), vec![1], "only the first ran");
    assert_eq!(
        report.released, 3,
        "the three were held, then released together"
    );
    assert_eq!(
        report.requeued, 2,
        "the two it did not run were given back: {report:?}"
    );
    assert_eq!(rec.ids_with(Decision::Requeued), ["2", "3"], "in order");
    assert_eq!(broker.pending(), 3, "every message is still the broker's");

    let rec2 = Recorder::new();
    let keys = MemoryKeys::new();
    keys.insert(1);
    let ran = Log::new();
    let consumer = {
        let ran = ran.clone();
        builder(&rec2, move |p: Payment| {
            ran.push(p.id);
            async { Ok(()) }
        })
        .keys(keys)
        .build()
    };
    let report = run_until(consumer, &broker, &rec2, |ev| handled(ev) == 3).await;
    assert_eq!(report.handled, 3);
    let mut ran = ran.get();
    ran.sort_unstable();
    assert_eq!(ran, vec![1, 2, 3]);
    assert_eq!(broker.pending(), 0);
}

/// At a stop, a handler job finishes the handler it runs and starts none of the key's other
/// messages it was given (released together): those are given back, in order.
#[tokio::test(start_paused = true)]
async fn a_stop_lets_a_job_finish_its_handler_and_gives_back_the_rest_of_its_messages() {
    let broker = MemoryBroker::new();
    three_payments_then_their_client(&broker);
    let rec = Recorder::new();
    let (consumer, started, stop) =
        stopped_at_first_start(&rec, Duration::from_secs(30), || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        });
    let report = consumer.run(broker.transport(), stop).await.unwrap();
    assert_eq!(
        started.get(),
        vec![1],
        "the running handler finished, nothing else started"
    );
    assert_eq!(report.handled, 1);
    assert_eq!(report.requeued, 2, "{report:?}");
    assert_eq!(rec.ids_with(Decision::Requeued), ["2", "3"]);
    assert_eq!(broker.pending(), 2);
}
