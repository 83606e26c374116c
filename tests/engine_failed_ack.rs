//! An acknowledgement the transport did not confirm (the connection dropped while the handler
//! ran) is reported as a settle failure, never as `Handled`; the broker delivers the message
//! again and it runs again. Every event of a handled message is dated no earlier than the moment
//! its handler returned and its acknowledgement was made.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prereq::memory::{MemoryBroker, MemoryTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Source, Transport};
use prereq::{Decision, Event};

/// When the broker delivers the message of the failed acknowledgement again.
const REDELIVERY: Duration = Duration::from_secs(5);

/// How long each handler runs.
const HANDLER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("the connection dropped before the acknowledgement was sent")]
struct Dropped;

/// The in-memory transport, whose first acknowledgement of a dependent message fails: the
/// message stays unsettled until the broker takes it back, `REDELIVERY` later.
struct FirstAckFails {
    inner: Arc<MemoryTransport>,
    /// The deliveries of dependent messages (not registrations).
    messages: Mutex<HashSet<DeliveryId>>,
    failed: AtomicBool,
}

impl Transport for FirstAckFails {
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
        if message && matches!(settle, Settle::Ack) && !self.failed.swap(true, Ordering::SeqCst) {
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
    let transport = FirstAckFails {
        inner: Arc::new(broker.transport()),
        messages: Mutex::new(HashSet::new()),
        failed: AtomicBool::new(false),
    };
    let handled = |ev: &[Event<u64>]| count(ev, |e| e.decision == Decision::Handled);
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
