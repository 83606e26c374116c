//! A graceful stop of the active consumer of a single-active-consumer queue keeps each key's
//! order, on a real RabbitMQ: the next consumer receives what the stopping one held before
//! anything published meanwhile.
//!
//! Instance A is the queue's active consumer and holds a client's payments (the client is not
//! known yet); instance B waits as the standby; payments of the client keep coming while A
//! stops. Before, A's stop cancelled its consumer (`basic.cancel`) and gave its held payments
//! back one by one: the broker made B active at once, B took the payments published meanwhile,
//! and the held ones reached B after them. Now A's channel stays subscribed until it closes at
//! the end of A's run (lapin would cancel a consumer it drops first, which is the same race in
//! a smaller window: `tests/amqp_group_balance.rs` failed about one run in 50 on it), and the
//! close returns everything A held, in order, ahead of the rest.
#![cfg(feature = "amqp")]

#[path = "support/group.rs"]
mod group;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use group::{Instance, Payment};
use prereq::amqp::{Message, Publisher, Queue, Route};
use prereq::{Backoff, Decision, DependentConsumer, HoldBudget, MemoryKeys};

/// The client whose payments are held, then released.
const CLIENT: u64 = 7;
/// Payments A holds before it stops.
const HELD: u64 = 30;

/// What the handlers saw.
#[derive(Default)]
struct Seen {
    /// (seq, instance) in the order handled.
    handled: Vec<(u64, String)>,
    /// Payments held, by instance name.
    held: Vec<String>,
}

async fn start(
    name: &str,
    route: &Route,
    keys: &MemoryKeys<u64>,
    seen: &Arc<Mutex<Seen>>,
) -> Instance {
    let (on_run, on_event, me, them) =
        (seen.clone(), seen.clone(), name.to_owned(), name.to_owned());
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment| {
            let (seen, me) = (on_run.clone(), me.clone());
            async move {
                seen.lock().unwrap().handled.push((p.seq, me));
                Ok(())
            }
        },
    )
    .keys(keys.clone())
    .policy(Backoff::constant(Duration::from_millis(500)))
    // Held for as long as the test runs, never deferred.
    .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(300)))
    .on_event(move |e| {
        if matches!(e.decision, Decision::Held) {
            on_event.lock().unwrap().held.push(them.clone());
        }
    })
    .build();
    Instance::start(name, route, consumer).await
}

/// Publish payment `seq` of [`CLIENT`] to `queue` (through the default exchange).
async fn publish(publisher: &Publisher, queue: &str, seq: u64) {
    let body = format!(r#"{{"clientId":{CLIENT},"seq":{seq}}}"#);
    publisher
        .publish("", queue, body.as_bytes(), &Message::new())
        .await
        .expect("publish");
}

/// How instance A ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// Its shutdown future resolves: a graceful stop.
    Stop,
    /// Its run future is dropped mid-way, the connection left open.
    Drop,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_receives_what_the_stopping_consumer_held_before_later_messages() {
    a_ends_while_payments_keep_coming(End::Stop).await;
}

/// The same when A's run is dropped instead (a `select!` or a timeout around `run`) and its
/// connection stays open: its consumer is not cancelled before its channel closes, and the
/// channel does close (the held payments do not wait for the connection's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_when_the_run_is_dropped_and_its_connection_stays_open() {
    a_ends_while_payments_keep_coming(End::Drop).await;
}

async fn a_ends_while_payments_keep_coming(end: End) {
    let Some(_conn) = support::broker().await else {
        return;
    };
    let p = support::unique(if end == End::Stop {
        "sac-stop"
    } else {
        "sac-drop"
    });
    let queue = Queue::quorum(format!("{p}pay")).single_active_consumer();
    let route = Route::new(queue.clone());
    let cleanup = support::Cleanup::new();
    cleanup.route(&route);
    cleanup.delay_queues(&route, &Backoff::constant(Duration::from_millis(500)));

    let keys = MemoryKeys::new();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let a = start(&format!("{p}instance-a"), &route, &keys, &seen).await;

    let producer = support::connect(format!("{p}producer")).await;
    let publisher = Arc::new(producer.publisher().await.expect("publisher"));
    let name = queue.name().to_owned();
    let sent = Arc::new(AtomicU64::new(0));
    for seq in 0..HELD {
        publish(&publisher, &name, seq).await;
    }
    sent.store(HELD, Ordering::SeqCst);
    support::eventually("A holds every payment", Duration::from_secs(30), || {
        seen.lock().unwrap().held.len() as u64 >= HELD
    })
    .await;
    let b = start(&format!("{p}instance-b"), &route, &keys, &seen).await;

    // Payments keep coming while A stops: some reach the queue between the moment A's consumer
    // would have been cancelled and the moment its channel closes.
    let publishing = Arc::new(AtomicBool::new(true));
    let more = tokio::spawn({
        let (publishing, sent) = (publishing.clone(), sent.clone());
        let (publisher, name) = (publisher.clone(), name.clone());
        async move {
            while publishing.load(Ordering::SeqCst) {
                let seq = sent.load(Ordering::SeqCst);
                publish(&publisher, &name, seq).await;
                sent.store(seq + 1, Ordering::SeqCst);
                // Pacing: a payment every millisecond or so, not a signal waited for.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    // Let some payments reach A before it stops.
    twenty_more(&sent, "payments published beside A").await;
    // Kept open until the end: the held payments must not wait for the connection's close.
    let a_connection = match end {
        End::Stop => {
            a.stop().await;
            None
        }
        End::Drop => Some(a.abandon().await),
    };
    twenty_more(&sent, "payments published after A stopped").await;
    publishing.store(false, Ordering::SeqCst);
    more.await.expect("publisher task");
    let total = sent.load(Ordering::SeqCst);

    keys.insert(CLIENT);
    support::eventually("every payment handled", Duration::from_secs(30), || {
        seen.lock().unwrap().handled.len() as u64 >= total
    })
    .await;
    b.stop().await;
    let _ = producer.close().await;
    if let Some(a) = a_connection {
        let _ = a.close().await;
    }

    let seen = seen.lock().unwrap();
    let order: Vec<u64> = seen.handled.iter().map(|(s, _)| *s).collect();
    let want: Vec<u64> = (0..total).collect();
    assert_eq!(
        order, want,
        "every payment once, in order (A held {HELD} and more arrived while it stopped)"
    );
    assert!(
        seen.handled.iter().all(|(_, i)| i.ends_with("instance-b")),
        "the client became known after A stopped: B ran every payment"
    );
}

/// Until 20 more payments than now were published (`sent` counts them).
async fn twenty_more(sent: &AtomicU64, what: &str) {
    let from = sent.load(Ordering::SeqCst);
    support::eventually(what, Duration::from_secs(10), || {
        sent.load(Ordering::SeqCst) >= from + 20
    })
    .await;
}
