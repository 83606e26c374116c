//! The in-memory broker's prefetch: a transport holds at most that many unsettled deliveries;
//! settling one lets the next through, and each transport has its own allowance.

use std::time::Duration;

use prereq::memory::MemoryBroker;
use prereq::transport::{Settle, Transport};

#[tokio::test(start_paused = true)]
async fn prefetch_caps_unsettled_deliveries_per_transport() {
    let broker = MemoryBroker::new().with_prefetch(2);
    for i in 0..5 {
        broker.publish(format!("{i}"));
    }
    let a = broker.transport();
    let first = a.recv().await.unwrap().unwrap();
    let second = a.recv().await.unwrap().unwrap();
    // A third delivery waits for a settle (the paused clock jumps the whole timeout at once).
    let blocked = tokio::time::timeout(Duration::from_secs(3600), a.recv()).await;
    assert!(blocked.is_err(), "a third unsettled delivery: {blocked:?}");

    // Another transport has its own allowance.
    let b = broker.transport();
    let other = b.recv().await.unwrap().unwrap();
    assert_eq!(other.body, b"2");

    a.settle(first.id, Settle::Ack).await.unwrap();
    let third = a.recv().await.unwrap().unwrap();
    assert_eq!(third.body, b"3");
    // Settling another transport's delivery is refused and frees nothing.
    assert!(a.settle(other.id, Settle::Ack).await.is_err());
    let blocked = tokio::time::timeout(Duration::from_secs(3600), a.recv()).await;
    assert!(blocked.is_err(), "still two unsettled: {blocked:?}");

    // A dropped transport gives its deliveries back, and its allowance goes with it.
    drop(a);
    assert_eq!(broker.stats().requeued, 2);
    let c = broker.transport();
    let again = c.recv().await.unwrap().unwrap();
    assert_eq!(again.body, b"1");
    assert!(again.redelivered);
    let _ = (second, b);
}
