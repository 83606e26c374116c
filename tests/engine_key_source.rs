//! Keys from an async, fallible source: a lookup error holds the message (never dead-letters
//! it), the hold's expiry asks the source again before deferring, a key the source refuses
//! dead-letters with the reason, a registration is acknowledged only once the source recorded
//! it, slow lookups keep each key's order, and a resync re-checks every held key.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::transport::Source;
use prereq::{
    DeadLetterKind, Decision, DeferCause, HoldBudget, KeyError, KeyNotifier, KeySource, KeyWakes,
};
use tokio::time::Instant;

/// A key source under the test's control: it can be down, slow, silent (no notifications) and
/// refuse keys.
#[derive(Clone, Default)]
struct TestSource(Arc<Inner>);

#[derive(Default)]
struct Inner {
    known: Mutex<HashSet<u64>>,
    invalid: Mutex<HashSet<u64>>,
    down: AtomicBool,
    silent: AtomicBool,
    latency: Mutex<Duration>,
    lookups: AtomicUsize,
    inserts: AtomicUsize,
    notifier: KeyNotifier<u64>,
}

impl TestSource {
    fn down(&self, down: bool) {
        self.0.down.store(down, Ordering::SeqCst);
    }

    fn silent(self) -> Self {
        self.0.silent.store(true, Ordering::SeqCst);
        self
    }

    fn slow(self, latency: Duration) -> Self {
        *self.0.latency.lock().unwrap() = latency;
        self
    }

    fn refuse(&self, key: u64) {
        self.0.invalid.lock().unwrap().insert(key);
    }

    /// Make `key` known behind the consumers' backs (another service wrote it).
    fn add_quietly(&self, key: u64) {
        self.0.known.lock().unwrap().insert(key);
    }

    fn knows(&self, key: u64) -> bool {
        self.0.known.lock().unwrap().contains(&key)
    }

    fn lookups(&self) -> usize {
        self.0.lookups.load(Ordering::SeqCst)
    }

    fn inserts(&self) -> usize {
        self.0.inserts.load(Ordering::SeqCst)
    }

    fn resync(&self) {
        self.0.notifier.resync();
    }
}

impl KeySource<u64> for TestSource {
    type Error = std::io::Error;

    async fn contains(&self, key: &u64) -> Result<bool, KeyError<std::io::Error>> {
        self.0.lookups.fetch_add(1, Ordering::SeqCst);
        let latency = *self.0.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if self.0.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("database down").into());
        }
        if self.0.invalid.lock().unwrap().contains(key) {
            return Err(KeyError::invalid_key("does not fit the column"));
        }
        Ok(self.knows(*key))
    }

    async fn insert(&self, key: &u64) -> Result<(), KeyError<std::io::Error>> {
        self.0.inserts.fetch_add(1, Ordering::SeqCst);
        if self.0.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("database down").into());
        }
        self.add_quietly(*key);
        if !self.0.silent.load(Ordering::SeqCst) {
            self.0.notifier.notify(*key);
        }
        Ok(())
    }

    fn subscribe(&self) -> KeyWakes<u64> {
        if self.0.silent.load(Ordering::SeqCst) {
            KeyWakes::none()
        } else {
            self.0.notifier.subscribe()
        }
    }
}

const HOLD: Duration = Duration::from_secs(10);

fn consumer(
    rec: &Recorder<u64>,
    source: &TestSource,
    seen: &Log<u64>,
) -> prereq::DependentConsumer<u64, Payment> {
    let seen = seen.clone();
    builder(rec, move |p: Payment| {
        seen.push(p.id);
        async { Ok(()) }
    })
    .keys(source.clone())
    .policy(linear(1, 3))
    .budget(HoldBudget::DEFAULT.max_time(HOLD))
    .build()
}

#[tokio::test(start_paused = true)]
async fn a_lookup_error_holds_and_the_message_runs_once_the_source_answers() {
    let source = TestSource::default().silent();
    source.down(true);
    source.add_quietly(1);
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let seen = Log::new();
    let start = Instant::now();
    let run = tokio::spawn(
        consumer(&rec, &source, &seen).run(broker.transport(), rec.until(|ev| handled(ev) == 1)),
    );
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;
    assert!(
        seen.get().is_empty(),
        "not handled while the source is down"
    );
    // Held keys are asked again 1 s, 3 s, 7 s… after the failure; the source is back at 5 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(seen.get().is_empty());
    source.down(false);
    let report = run.await.unwrap().unwrap();
    assert_eq!(seen.get(), vec![10]);
    let back = Duration::from_secs(7);
    assert_eq!(
        rec.decisions_of("10"),
        vec![
            Decision::Held,
            Decision::Released { waited: back },
            Decision::Handled
        ]
    );
    assert_eq!(
        rec.of("10")[2].at - start,
        back,
        "before the hold time ran out"
    );
    assert_eq!((report.dead_lettered, report.deferred), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_hold_defers_without_using_an_attempt() {
    let source = TestSource::default().silent();
    source.down(true);
    source.add_quietly(1);
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let seen = Log::new();
    let run = tokio::spawn(
        consumer(&rec, &source, &seen).run(broker.transport(), rec.until(|ev| handled(ev) == 1)),
    );
    // Three hold times of outage: deferred each time, never dead-lettered, the attempt kept.
    rec.until(|ev| count(ev, |e| matches!(e.decision, Decision::Deferred { .. })) == 3)
        .await;
    source.down(false);
    let report = run.await.unwrap().unwrap();
    let deferrals: Vec<(u32, DeferCause)> = rec
        .of("10")
        .into_iter()
        .filter_map(|e| match e.decision {
            Decision::Deferred { cause, .. } => Some((e.attempt, cause)),
            _ => None,
        })
        .collect();
    assert_eq!(
        &deferrals[..3],
        &[(0, DeferCause::SourceUnavailable); 3],
        "the outage never counts as an attempt"
    );
    assert_eq!(seen.get(), vec![10]);
    assert_eq!(report.dead_lettered, 0);
    assert!(broker.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn hold_expiry_asks_the_source_again_before_deferring() {
    // A key written by another path that does not notify: only the re-check can find it.
    let source = TestSource::default().silent();
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));

    let rec = Recorder::new();
    let seen = Log::new();
    let start = Instant::now();
    let run = tokio::spawn(
        consumer(&rec, &source, &seen).run(broker.transport(), rec.until(|ev| handled(ev) == 1)),
    );
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 1)
        .await;
    let lookups = source.lookups();
    source.add_quietly(1);
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        rec.decisions_of("10"),
        vec![
            Decision::Held,
            Decision::Released { waited: HOLD },
            Decision::Handled
        ],
        "released at the expiry, not deferred as 'key still unknown'"
    );
    assert_eq!(rec.of("10")[1].at - start, HOLD);
    assert_eq!(source.lookups(), lookups + 1, "one re-check");
    assert_eq!(report.deferred, 0);
}

#[tokio::test(start_paused = true)]
async fn a_key_the_source_refuses_is_dead_lettered_with_the_reason() {
    let source = TestSource::default();
    source.refuse(1);
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 2));
    broker.register(client(2));

    let rec = Recorder::new();
    let seen = Log::new();
    run_until(consumer(&rec, &source, &seen), &broker, &rec, |ev| {
        handled(ev) == 1 && count(ev, |e| matches!(e.decision, Decision::DeadLettered(_))) == 1
    })
    .await;
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.kind, DeadLetterKind::InvalidKey);
    assert!(
        dead[0]
            .dead_letter
            .reason
            .contains("key 1: does not fit the column"),
        "{:?}",
        dead[0].dead_letter.reason
    );
    assert_eq!(seen.get(), vec![11]);
}

/// A registration makes its key known once the source recorded it: while the source cannot,
/// the registration stays unacknowledged (retried) and the payment held; when it can, the
/// payment runs and the registration is acknowledged.
#[tokio::test(start_paused = true)]
async fn a_registration_releases_once_recorded_and_is_acknowledged_after() {
    let source = TestSource::default();
    source.down(true);
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));
    broker.register(client(1));

    let rec = Recorder::new();
    let seen = Log::new();
    let start = Instant::now();
    let run = tokio::spawn(
        consumer(&rec, &source, &seen).run(broker.transport(), rec.until(|ev| handled(ev) == 1)),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(seen.get().is_empty(), "not before the key is recorded");
    assert_eq!(
        broker.pending_of(Source::Registration),
        1,
        "not acknowledged"
    );
    assert!(source.inserts() > 5, "retried: {}", source.inserts());
    assert_eq!(
        rec.count(|e| matches!(e.decision, Decision::DeadLettered(_))),
        0
    );
    assert!(
        rec.of("10").iter().all(|e| match e.decision {
            Decision::Deferred { cause, .. } => cause == DeferCause::SourceUnavailable,
            _ => true,
        }),
        "held, or deferred without an attempt while the source is down"
    );
    source.down(false);
    let report = run.await.unwrap().unwrap();
    assert!(source.knows(1));
    assert_eq!(seen.get(), vec![10]);
    let registered = rec.of_key(1, Decision::Registered);
    let handled_at = rec.of("10").last().map(|e| e.at);
    assert!(
        registered.is_some_and(|r| Some(r) <= handled_at),
        "recorded, then handled"
    );
    assert!(handled_at.is_some_and(|t| t - start > Duration::from_secs(60)));
    assert_eq!(report.registered, 1);
    assert_eq!(broker.pending(), 0, "acknowledged once recorded");
}

#[tokio::test(start_paused = true)]
async fn a_registration_not_yet_recorded_is_given_back_at_shutdown() {
    let source = TestSource::default();
    source.down(true);
    let broker = MemoryBroker::new();
    broker.register(client(1));

    let rec = Recorder::new();
    let seen = Log::new();
    let stop = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let report = consumer(&rec, &source, &seen)
        .run(broker.transport(), stop)
        .await
        .unwrap();
    assert_eq!(
        (report.registered, report.requeued),
        (0, 1),
        "never recorded"
    );
    assert_eq!(
        broker.pending_of(Source::Registration),
        1,
        "still the broker's"
    );
    assert_eq!(broker.stats().requeued, 1);
}

#[tokio::test(start_paused = true)]
async fn slow_lookups_keep_each_key_in_order() {
    let source = TestSource::default().slow(Duration::from_millis(50));
    source.add_quietly(1);
    let broker = MemoryBroker::new();
    for id in 0..5 {
        broker.publish(payment(id, 1));
        broker.publish(payment(100 + id, 2)); // an unknown key interleaved
    }
    broker.register(client(2));

    let rec = Recorder::new();
    let seen = Log::new();
    run_until(consumer(&rec, &source, &seen), &broker, &rec, |ev| {
        handled(ev) == 10
    })
    .await;
    let of = |lo: u64, hi: u64| -> Vec<u64> {
        seen.get()
            .into_iter()
            .filter(|id| (lo..hi).contains(id))
            .collect()
    };
    assert_eq!(of(0, 100), vec![0, 1, 2, 3, 4]);
    assert_eq!(of(100, 200), vec![100, 101, 102, 103, 104]);
    assert_eq!(source.lookups(), 2, "one lookup per key, not per message");
}

#[tokio::test(start_paused = true)]
async fn a_resync_rechecks_every_held_key() {
    let source = TestSource::default();
    let broker = MemoryBroker::new();
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 2));

    let rec = Recorder::new();
    let seen = Log::new();
    let start = Instant::now();
    let run = tokio::spawn(
        consumer(&rec, &source, &seen).run(broker.transport(), rec.until(|ev| handled(ev) == 2)),
    );
    rec.until(|ev| count(ev, |e| e.decision == Decision::Held) == 2)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Two keys written while notifications were lost (a listener reconnecting).
    source.add_quietly(1);
    source.add_quietly(2);
    source.resync();
    run.await.unwrap().unwrap();
    let mut ran = seen.get();
    ran.sort_unstable();
    assert_eq!(ran, vec![10, 11]);
    assert_eq!(
        rec.of("10").last().map(|e| e.at - start),
        Some(Duration::from_secs(1)),
        "at the resync, not at the hold's expiry"
    );
}

/// Many keys answered at once (lookups in flight that end at the same instant) make many
/// messages runnable at once, with no job running and nothing more to deliver: the loop runs
/// them all, in as many turns as it takes, and does not wait for news that will not come.
#[tokio::test(start_paused = true)]
async fn many_keys_answered_at_once_all_run() {
    const N: u64 = 300;
    let source = TestSource::default().slow(Duration::from_millis(50));
    let broker = MemoryBroker::new();
    for key in 0..N {
        source.add_quietly(key);
        broker.publish(payment(key, key));
    }
    let rec = Recorder::new();
    let seen = Log::new();
    let report = run_until(consumer(&rec, &source, &seen), &broker, &rec, |ev| {
        handled(ev) == N as usize
    })
    .await;
    assert_eq!(report.handled, N, "{report:?}");
    assert_eq!(seen.len(), N as usize);
}
