//! A settlement the transport did not confirm (the connection dropped, the confirm was refused)
//! did not happen, and is reported as such: never as `Deferred` or `Handled`.
//!
//! - A deferral whose copy the broker did not store is no deferral: the message is not out in
//!   the broker, so it must not block its key. Later messages of the key run at once; the
//!   original, delivered again by the broker, runs as a new arrival.
//! - An acknowledgement that failed leaves the message with the broker, which delivers it again:
//!   it runs again. Every event of a handled message is dated no earlier than the moment its
//!   handler returned and its acknowledgement was made.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prereq::Decision;
use prereq::memory::{MemoryBroker, MemoryTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Source, Transport};

/// When the broker delivers the message of a failed settlement again (the reconnect after a
/// dropped connection).
const REDELIVERY: Duration = Duration::from_secs(5);

/// How long each handler runs where the test dates events.
const HANDLER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("the connection dropped before the settlement was confirmed")]
struct Dropped;

/// The in-memory transport, whose first settlement of a dependent message (not a registration)
/// that `fails` picks fails: nothing is settled, the message stays unacknowledged until the
/// broker takes it back, `REDELIVERY` later.
struct FirstSettleFails {
    inner: Arc<MemoryTransport>,
    fails: fn(&Settle) -> bool,
    /// The deliveries of dependent messages.
    messages: Mutex<HashSet<DeliveryId>>,
    failed: AtomicBool,
}

impl FirstSettleFails {
    fn new(broker: &MemoryBroker, fails: fn(&Settle) -> bool) -> Self {
        Self {
            inner: Arc::new(broker.transport()),
            fails,
            messages: Mutex::new(HashSet::new()),
            failed: AtomicBool::new(false),
        }
    }
}

impl Transport for FirstSettleFails {
    type Error = Dropped;

    async fn start(&self, demand: Demand) -> Result<(), Dropped> {
        self.inner.start(demand).await.map_err(|_| Dropped)
    }

    async fn recv(&self) -> Result<Option<Delivery>, Dropped> {
        let got = self.inner.recv().await.map_err(|_| Dropped)?;
        if let Some(d) = got.as_ref().filter(|d| d.source == Source::Message) {
            self.messages.lock().unwrap().insert(d.id);
        }
        Ok(got)
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), Dropped> {
        let message = self.messages.lock().unwrap().contains(&id);
        if message && (self.fails)(&settle) && !self.failed.swap(true, Ordering::SeqCst) {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                tokio::time::sleep(REDELIVERY).await;
                let _ = inner.settle(id, Settle::Requeue).await;
            });
            return Err(Dropped);
        }
        self.inner.settle(id, settle).await.map_err(|_| Dropped)
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_deferral_does_not_block_its_key() {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = builder(&rec, fails_once(1, seen.clone()))
        .policy(linear(1, 3))
        .build();
    let transport = FirstSettleFails::new(&broker, |s| matches!(s, Settle::Defer { .. }));
    let producer = {
        let broker = broker.clone();
        async move {
            // After payment 1's deferral failed.
            tokio::time::sleep(Duration::from_millis(100)).await;
            broker.publish(payment(2, 5));
        }
    };
    let (report, ()) = tokio::join!(
        consumer.run(transport, rec.until(move |ev| handled(ev) == 2)),
        producer
    );
    let report = report.unwrap();
    assert_eq!(
        rec.decisions_of("2"),
        vec![Decision::Handled],
        "payment 2 did not wait behind a deferral that never happened"
    );
    assert_eq!(
        seen.get(),
        vec![2, 1],
        "payment 1 ran when the broker gave it again"
    );
    let one = rec.decisions_of("1");
    assert!(
        matches!(one.first(), Some(Decision::SettleFailed { .. })),
        "the failed deferral is reported as such: {one:?}"
    );
    assert!(
        !one.iter().any(|d| matches!(d, Decision::Deferred { .. })),
        "no deferral reported: {one:?}"
    );
    assert_eq!(
        (report.deferred, report.settle_failures),
        (0, 1),
        "{report:?}"
    );
    assert_eq!(broker.stats().deferred, 0, "no copy stored");
}

#[tokio::test(start_paused = true)]
async fn a_failed_acknowledgement_is_reported_and_the_message_runs_again() {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let rec = Recorder::new();
    let ran = Log::new();
    let consumer = {
        let ran = ran.clone();
        builder(&rec, move |p: Payment| {
            let ran = ran.clone();
            async move {
                tokio::time::sleep(HANDLER).await;
                // When this handler returned.
                ran.push((p.id, tokio::time::Instant::now()));
                Ok(())
            }
        })
        .build()
    };
    let transport = FirstSettleFails::new(&broker, |s| matches!(s, Settle::Ack));
    let report = consumer
        .run(transport, rec.until(move |ev| handled(ev) == 1))
        .await
        .unwrap();

    let events = rec.of("1");
    let decisions: Vec<Decision> = events.iter().map(|e| e.decision.clone()).collect();
    assert!(
        matches!(
            decisions.as_slice(),
            [Decision::SettleFailed { error }, Decision::Handled] if error.contains("connection dropped")
        ),
        "the failed acknowledgement is reported with the transport's error, then the redelivered \
         copy is handled: {decisions:?}"
    );
    assert!(
        events.iter().all(|e| e.key == Some(5)),
        "both events carry the key: {events:?}"
    );
    let runs = ran.get();
    assert_eq!(runs.len(), 2, "the handler ran again on the redelivery");
    for (event, (_, returned)) in events.iter().zip(&runs) {
        assert!(
            event.at >= *returned,
            "an event is dated after its handler returned: {:?} < {:?}",
            event.at,
            returned
        );
    }
    assert!(
        runs[1].1 >= runs[0].1 + REDELIVERY,
        "the second run waited for the broker's redelivery: {runs:?}"
    );
    assert_eq!(
        (report.handled, report.settle_failures),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(
        broker.stats().acked,
        2,
        "the registration and the payment's second delivery acknowledged"
    );
}
