//! Messages of one key never run two handlers at once (and run in receive order); different
//! keys run concurrently, up to the concurrency limit and never above it.
//!
//! Handlers count themselves in flight and then wait on a gate the test opens. Before opening
//! it, the test lets virtual time pass: the paused clock only moves when every task is idle, so
//! by then the engine has started every handler it was going to start.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use prereq::Decision;
use prereq::memory::{MemoryBroker, MemoryTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Transport};
use tokio::sync::watch;
use tokio::time::Instant;

/// Counts handlers in flight and the most ever seen at once, and holds them at a gate.
#[derive(Clone)]
struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    started: Log<u64>,
}

impl Gauge {
    fn new() -> Self {
        Self {
            now: Arc::default(),
            peak: Arc::default(),
            gate: watch::channel(false).0,
            started: Log::new(),
        }
    }

    fn consumer(
        &self,
        rec: &Recorder<u64>,
        limit: usize,
    ) -> prereq::DependentConsumer<u64, Payment> {
        let g = self.clone();
        builder(rec, move |p: Payment| {
            let g = g.clone();
            async move {
                g.started.push(p.id);
                let n = g.now.fetch_add(1, Ordering::SeqCst) + 1;
                g.peak.fetch_max(n, Ordering::SeqCst);
                let mut open = g.gate.subscribe();
                let _ = open.wait_for(|o| *o).await;
                // Stay in flight a little longer, so overlaps would show.
                tokio::time::sleep(Duration::from_millis(1)).await;
                g.now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .concurrency(limit)
        .build()
    }

    /// Let every task run until idle (virtual time passes only then).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

#[tokio::test(start_paused = true)]
async fn one_key_never_runs_two_handlers_at_once() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7)); // held…
    broker.publish(payment(2, 7));
    broker.register(client(7)); // …released together
    for id in 3..=6 {
        broker.publish(payment(id, 7)); // queued behind them
    }

    let rec = Recorder::new();
    let gauge = Gauge::new();
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 6);
    let run = tokio::spawn(gauge.consumer(&rec, 4).run(broker.transport(), done));

    gauge.settle().await;
    assert_eq!(gauge.now.load(Ordering::SeqCst), 1, "one handler for key 7");
    assert_eq!(gauge.started.get(), vec![1]);
    assert_eq!(
        broker.stats().delivered,
        7,
        "the engine took all the deliveries"
    );
    gauge.open();

    run.await.unwrap().unwrap();
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 1);
    assert_eq!(gauge.started.get(), vec![1, 2, 3, 4, 5, 6], "receive order");
}

#[tokio::test(start_paused = true)]
async fn different_keys_run_concurrently_up_to_the_limit() {
    const LIMIT: usize = 3;
    let broker = MemoryBroker::new();
    for key in 1..=10 {
        broker.register(client(key));
    }
    for id in 1..=10 {
        broker.publish(payment(id, id)); // ten different keys
    }

    let rec = Recorder::new();
    let gauge = Gauge::new();
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 10);
    let run = tokio::spawn(gauge.consumer(&rec, LIMIT).run(broker.transport(), done));

    gauge.settle().await;
    assert_eq!(
        gauge.now.load(Ordering::SeqCst),
        LIMIT,
        "exactly the limit at once"
    );
    assert_eq!(gauge.started.len(), LIMIT);
    gauge.open();

    let report = run.await.unwrap().unwrap();
    assert_eq!(report.handled, 10);
    assert_eq!(
        gauge.peak.load(Ordering::SeqCst),
        LIMIT,
        "never above the limit"
    );
    let mut started = gauge.started.get();
    started.sort_unstable();
    assert_eq!(started, (1..=10).collect::<Vec<_>>());
}

/// A busy key does not take the other keys' slots: with two keys and a limit of two, the
/// second key runs while the first one's messages wait their turn.
#[tokio::test(start_paused = true)]
async fn a_busy_key_does_not_block_other_keys() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.register(client(2));
    for id in 1..=5 {
        broker.publish(payment(id, 1));
    }
    broker.publish(payment(6, 2));

    let rec = Recorder::new();
    let gauge = Gauge::new();
    let done = rec.until(|ev| count(ev, |e| e.decision == Decision::Handled) == 6);
    let run = tokio::spawn(gauge.consumer(&rec, 2).run(broker.transport(), done));

    gauge.settle().await;
    assert_eq!(gauge.started.get(), vec![1, 6]);
    gauge.open();
    run.await.unwrap().unwrap();
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 2);
}

/// How long an acknowledgement takes to reach the broker in `SlowAcks`.
const ACK_TRAVEL: Duration = Duration::from_secs(1);

/// The in-memory transport, whose acknowledgements take [`ACK_TRAVEL`] (a busy connection).
struct SlowAcks(MemoryTransport);

impl Transport for SlowAcks {
    type Error = <MemoryTransport as Transport>::Error;

    async fn start(&self, demand: Demand) -> Result<(), Self::Error> {
        self.0.start(demand).await
    }

    async fn recv(&self) -> Result<Option<Delivery>, Self::Error> {
        self.0.recv().await
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), Self::Error> {
        if matches!(settle, Settle::Ack) {
            tokio::time::sleep(ACK_TRAVEL).await;
        }
        self.0.settle(id, settle).await
    }
}

#[tokio::test(start_paused = true)]
async fn the_next_message_of_a_key_does_not_wait_for_the_acknowledgement() {
    let broker = MemoryBroker::new();
    broker.register(client(7));
    for id in 1..=3 {
        broker.publish(payment(id, 7));
    }
    let rec = Recorder::new();
    let t0 = Instant::now();
    let started: Log<(u64, Duration)> = Log::new();
    let running = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let (started, running, overlap) = (started.clone(), running.clone(), overlap.clone());
        builder(&rec, move |p: Payment| {
            started.push((p.id, t0.elapsed()));
            if running.fetch_add(1, Ordering::SeqCst) > 0 {
                overlap.fetch_add(1, Ordering::SeqCst);
            }
            let running = running.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
    };
    // Each starts once the one before returned (10 ms), not once its acknowledgement arrived
    // (1 s later).
    three_run_in_turn_without_waiting_for_acks(consumer, &broker, &rec, &started).await;
    assert_eq!(
        overlap.load(Ordering::SeqCst),
        0,
        "one handler of the key at a time"
    );
}

/// Run `consumer` on `broker` through [`SlowAcks`] until key 7's three messages were handled:
/// they started in order (as `started` logged them, with the time since the start), the third
/// less than an acknowledgement's travel after the first, and every acknowledgement arrived.
async fn three_run_in_turn_without_waiting_for_acks(
    consumer: prereq::DependentConsumer<u64, Payment>,
    broker: &MemoryBroker,
    rec: &Recorder<u64>,
    started: &Log<(u64, Duration)>,
) {
    let report = consumer
        .run(
            SlowAcks(broker.transport()),
            rec.until(move |ev| handled(ev) == 3),
        )
        .await
        .unwrap();
    let started = started.get();
    assert_eq!(
        started.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "in order"
    );
    let last = started[2].1 - started[0].1;
    assert!(
        last < ACK_TRAVEL,
        "the third started {last:?} after the first: it waited for acknowledgements"
    );
    assert_eq!(
        report.handled, 3,
        "every acknowledgement arrived: {report:?}"
    );
    assert_eq!(broker.pending(), 0, "nothing left unsettled");
}

/// As above, with handlers that return at once: the loop runs each itself (`engine::here`), and
/// what waits is the acknowledgement alone. The key's next message still does not wait for it.
#[tokio::test(start_paused = true)]
async fn a_handler_done_at_once_does_not_make_the_next_message_wait_for_its_acknowledgement() {
    let broker = MemoryBroker::new();
    broker.register(client(7));
    let rec = Recorder::new();
    let t0 = Instant::now();
    let started: Log<(u64, Duration)> = Log::new();
    let log = started.clone();
    let consumer = builder(&rec, move |p: Payment| {
        log.push((p.id, t0.elapsed()));
        std::future::ready(Ok(()))
    })
    .build();
    let b = broker.clone();
    // One at a time, so that each is a job of its own.
    tokio::spawn(async move {
        for id in 1..=3 {
            b.publish(payment(id, 7));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    three_run_in_turn_without_waiting_for_acks(consumer, &broker, &rec, &started).await;
}

/// Keep the thread busy for `d` (a handler that computes, not one that waits).
fn compute_for(d: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Run `consumer` on `broker` until `n` messages were handled (at most 60 s of real time).
async fn run_real(
    consumer: prereq::DependentConsumer<u64, Payment>,
    broker: &MemoryBroker,
    rec: &Recorder<u64>,
    n: usize,
) -> prereq::Report {
    let run = consumer.run(broker.transport(), rec.until(move |ev| handled(ev) == n));
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("every message handled within a minute")
        .unwrap()
}

/// Handlers that compute (keep their thread busy) still run side by side on a runtime of
/// several threads: the loop runs a job itself only while that is quick, and sends the next
/// jobs to workers after one that took long (`engine::here`). Real time: the paused clock
/// does not see a thread kept busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handlers_that_compute_run_side_by_side() {
    let broker = MemoryBroker::new();
    for key in 1..=16 {
        broker.register(client(key));
    }
    for id in 1..=16 {
        broker.publish(payment(id, id)); // sixteen keys, one message each
    }
    let rec = Recorder::new();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (Arc::clone(&now), Arc::clone(&peak));
    let consumer = builder(&rec, move |_p: Payment| {
        let m = n.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(m, Ordering::SeqCst);
        compute_for(Duration::from_millis(20));
        n.fetch_sub(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    })
    .concurrency(8)
    .build();
    let report = run_real(consumer, &broker, &rec, 16).await;
    assert_eq!(report.handled, 16);
    assert!(
        peak.load(Ordering::SeqCst) >= 2,
        "handlers that compute ran one at a time: the loop ran them all itself"
    );
}

/// A job of handlers that compute does not hold the loop for all its messages: past its budget
/// it goes on in a worker, and the loop starts the next key's job meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_handlers_that_compute_lets_the_loop_go() {
    let broker = MemoryBroker::new();
    for id in 1..=8 {
        broker.publish(payment(id, 1)); // held, then released together: one job of key 1
    }
    broker.publish(payment(9, 2));
    broker.register(client(1));
    broker.register(client(2));
    let rec = Recorder::new();
    let t0 = std::time::Instant::now();
    let ran: Log<(u64, Duration, Duration)> = Log::new();
    let r = ran.clone();
    let consumer = builder(&rec, move |p: Payment| {
        let started = t0.elapsed();
        // 8 × 20 ms for key 1's job: a wide margin for the loop to start key 2's meanwhile,
        // even on a loaded machine that leaves its thread unscheduled for a while.
        compute_for(Duration::from_millis(20));
        r.push((p.id, started, t0.elapsed()));
        std::future::ready(Ok(()))
    })
    .concurrency(8)
    .build();
    let report = run_real(consumer, &broker, &rec, 9).await;
    assert_eq!(report.handled, 9);
    let ran = ran.get();
    let of = |id| ran.iter().find(|(i, ..)| *i == id).copied().unwrap();
    let (_, nine_started, _) = of(9);
    let (_, _, eight_ended) = of(8);
    assert!(
        nine_started < eight_ended,
        "key 2's message waited for key 1's whole job ({nine_started:?} ≥ {eight_ended:?}): {ran:?}"
    );
    let ids: Vec<u64> = ran
        .iter()
        .map(|(id, ..)| *id)
        .filter(|id| *id != 9)
        .collect();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>(), "key 1's in order");
}
