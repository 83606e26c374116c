//! A deferral whose copy the broker did not store (its settle failed: the connection dropped,
//! the confirm was refused) is no deferral: the message is not out in the broker, so it must
//! not block its key. Later messages of the key run at once; the original, delivered again by
//! the broker, runs as a new arrival. Reported as a settle failure, never as `Deferred`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use prereq::memory::{MemoryBroker, MemoryTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Transport};
use prereq::{Decision, HandlerError};

/// When the broker delivers the message of a failed deferral again (the reconnect after a
/// dropped connection).
const REDELIVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("the connection dropped before the copy was confirmed")]
struct Dropped;

/// The in-memory transport, whose first deferral fails: the copy is not stored and the original
/// stays unacknowledged until the broker takes it back, `REDELIVERY` later.
struct FirstDeferralFails {
    inner: Arc<MemoryTransport>,
    failed: AtomicBool,
}

impl Transport for FirstDeferralFails {
    type Error = Dropped;

    async fn start(&self, demand: Demand) -> Result<(), Dropped> {
        self.inner.start(demand).await.map_err(|_| Dropped)
    }

    async fn recv(&self) -> Result<Option<Delivery>, Dropped> {
        self.inner.recv().await.map_err(|_| Dropped)
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), Dropped> {
        if matches!(settle, Settle::Defer { .. }) && !self.failed.swap(true, Ordering::SeqCst) {
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
    let failed_once = Arc::new(AtomicBool::new(false));
    let consumer = {
        let seen = seen.clone();
        builder(&rec, move |p: Payment| {
            let fail = p.id == 1 && !failed_once.swap(true, Ordering::SeqCst);
            if !fail {
                seen.push(p.id);
            }
            async move {
                if fail {
                    Err(HandlerError::retry("busy"))
                } else {
                    Ok(())
                }
            }
        })
        .policy(linear(1, 3))
        .build()
    };
    let transport = FirstDeferralFails {
        inner: Arc::new(broker.transport()),
        failed: AtomicBool::new(false),
    };
    let producer = {
        let broker = broker.clone();
        async move {
            // After payment 1's deferral failed.
            tokio::time::sleep(Duration::from_millis(100)).await;
            broker.publish(payment(2, 5));
        }
    };
    let handled = |ev: &[prereq::Event<u64>]| count(ev, |e| e.decision == Decision::Handled);
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
