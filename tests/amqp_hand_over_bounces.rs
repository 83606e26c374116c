//! A partition owned (in the group's view) by a member that does not consume it, on a real
//! RabbitMQ: a member that crashed and has not expired yet (3 to 4 beats), or one whose
//! consumers failed. The instance the broker makes active on it hands it over, is made active
//! again at once (nobody else is subscribed), and so on. Every hand-over returns what it was
//! given, one more toward the queue's delivery limit. The consumer waits longer before each
//! hand-over that follows another without a change of the group's view (up to a second), so
//! such a partition bounces a few times a second, not thousands of times.
#![cfg(feature = "amqp")]

#[path = "support/group.rs"]
mod group;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use group::{Ghost, Instance, drain};
use prereq::amqp::{Message, Partitions, Route};
use prereq::{DependentConsumer, MemoryKeys};

/// Partitions in the group: the ghost owns some of them.
const P: u32 = 4;
/// Clients paying, one payment each.
const CLIENTS: u64 = 40;
/// How long the instance runs beside the ghost.
const WINDOW: Duration = Duration::from_secs(6);
/// The ghost's heartbeat.
const GHOST_BEAT: Duration = Duration::from_secs(1);
/// Returns a payment may have taken in the window: a few a second, not thousands.
const MAX_RETURNS: i64 = 40;

#[derive(serde::Deserialize)]
struct Payment {
    #[serde(rename = "clientId")]
    client_id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_owner_does_not_consume_bounces_a_few_times_a_second() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let logs = support::captured_logs();
    let p = support::unique("bounces");
    let partitions = Partitions::new(format!("{p}pay"), P);
    let route = Route::partitioned(partitions.clone());
    let exchange = partitions.members_exchange();
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .exchange(exchange.as_str())
        .queue(format!("{exchange}.ghost"));

    // The ghost beats (once a second: the instance hears it within a second of joining, and a
    // stall of the test's own machine does not expire it) and consumes nothing.
    let ghost = Ghost::join(&p, &partitions, GHOST_BEAT).await;

    let keys = MemoryKeys::new();
    for client in 0..CLIENTS {
        keys.insert(client);
    }
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |_: Payment| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), prereq::HandlerError>(()) }
        },
    )
    .keys(keys)
    .build();
    let instance = Instance::start(&format!("{p}instance"), &route, consumer).await;

    // The instance heard the ghost: it handed the ghost's partitions over.
    support::eventually(
        "the instance hands the ghost's partitions over",
        Duration::from_secs(10),
        || {
            logs.lines_with("partition handed over")
                .iter()
                .any(|l| l.contains(&p))
        },
    )
    .await;
    let publisher = instance.broker.publisher().await.expect("publisher");
    for client in 0..CLIENTS {
        let body = format!(r#"{{"clientId":{client}}}"#);
        publisher
            .publish_keyed(
                &partitions,
                &client.to_string(),
                body.as_bytes(),
                &Message::new(),
            )
            .await
            .expect("publish");
    }
    // The window measured: the instance beside the ghost.
    tokio::time::sleep(WINDOW).await;
    let name = instance.name.clone();
    instance.stop().await;
    ghost.leave().await;

    // What is left is the ghost's: every payment is either handled or still there, and none
    // came back more than a few times a second.
    let left = drain(&conn, &partitions).await;
    let most = left
        .iter()
        .filter_map(|m| support::header_int(m.properties.headers().as_ref(), "x-delivery-count"))
        .max()
        .unwrap_or(0);
    let left = left.len() as u64;
    let handled = handled.load(Ordering::SeqCst);
    eprintln!(
        "{handled} handled by {name}, {left} left on the ghost's partitions, at most {most} \
         returns each"
    );
    assert_eq!(handled + left, CLIENTS, "a payment lost");
    assert!(
        left > 0,
        "the ghost owned no partition with payments: nothing measured"
    );
    assert!(
        most <= MAX_RETURNS,
        "a payment came back {most} times in {WINDOW:?}: the partition bounced"
    );
}
