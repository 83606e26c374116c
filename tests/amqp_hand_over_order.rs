//! A key's order across a partition's hand-over while a copy of the key is in a delay, on a
//! real RabbitMQ.
//!
//! Instance A owns every partition. Each client's payment 1 fails once and is deferred (15 s,
//! through the delay queues); payment 2 of the client arrives and waits behind it on A. Then
//! instance B joins, and the group gives about half the partitions to B. A keeps each such
//! partition until its deferred copies are back and settled (payment 1 then payment 2 run on
//! A), then B takes it (checked: B runs later payments). Before the transport kept partitions
//! for their copies, A gave the payments 2 back at once and B ran them while the payments 1
//! were still in their delay, for every client on a moved partition. The engine-level twin is
//! `tests/engine_partitions.rs` →
//! `a_key_s_later_message_waits_for_its_deferred_copy_across_a_hand_over`.
#![cfg(feature = "amqp")]

#[path = "support/group.rs"]
mod group;
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use group::Instance;
use prereq::amqp::{Broker, BrokerOptions, Message, Partitions, Route};
use prereq::{Backoff, Decision, DependentConsumer, HandlerError, HoldBudget, MemoryKeys};

/// Partitions in the group.
const P: u32 = 4;
/// Clients paying (spread over the partitions by the consistent-hash exchange).
const CLIENTS: u64 = 8;
/// How long a deferred payment stays in its delay: longer than a rebalance takes here.
const DELAY: Duration = Duration::from_secs(15);

#[derive(serde::Deserialize)]
struct Payment {
    #[serde(rename = "clientId")]
    client_id: u64,
    seq: u64,
}

/// What the handlers saw, across instances.
#[derive(Default)]
struct Seen {
    /// (client, seq, instance) in the order handled.
    handled: Vec<(u64, u64, String)>,
    /// Clients whose payment 1 failed once already.
    failed: Vec<u64>,
    /// Deferrals.
    deferred: usize,
    /// Holds (a payment waiting behind its key's deferred one).
    held: usize,
}

/// An instance of the group whose handler fails each payment 1 once and records the rest.
async fn start(
    name: &str,
    route: &Route,
    keys: &MemoryKeys<u64>,
    seen: &Arc<Mutex<Seen>>,
) -> Instance {
    let (handler_seen, event_seen, me) = (seen.clone(), seen.clone(), name.to_owned());
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment| {
            let (seen, me) = (handler_seen.clone(), me.clone());
            async move {
                let mut seen = seen.lock().unwrap();
                if p.seq == 1 && !seen.failed.contains(&p.client_id) {
                    seen.failed.push(p.client_id);
                    return Err(HandlerError::retry("payment 1 fails once"));
                }
                seen.handled.push((p.client_id, p.seq, me));
                Ok(())
            }
        },
    )
    .keys(keys.clone())
    .policy(Backoff::constant(DELAY))
    // Payment 2 waits behind payment 1 in the hold for as long as the test runs.
    .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(300)))
    .on_event(move |e| {
        let mut seen = event_seen.lock().unwrap();
        match e.decision {
            Decision::Deferred { .. } => seen.deferred += 1,
            Decision::Held => seen.held += 1,
            _ => {}
        }
    })
    .build();
    Instance::start(name, route, consumer).await
}

/// Poll `cond` on what was seen until it holds; panics with `what` after `limit`.
async fn until(seen: &Arc<Mutex<Seen>>, what: &str, limit: Duration, cond: impl Fn(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond(&seen.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Payment `seq` of every client, keyed by client.
async fn publish(publisher: &prereq::amqp::Publisher, partitions: &Partitions, seq: u64) {
    for client in 0..CLIENTS {
        let body = format!(r#"{{"clientId":{client},"seq":{seq}}}"#);
        publisher
            .publish_keyed(
                partitions,
                &client.to_string(),
                body.as_bytes(),
                &Message::new(),
            )
            .await
            .expect("publish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_later_payment_waits_for_its_deferred_copy_when_the_partition_moves() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    let p = support::unique("handover");
    let partitions = Partitions::new(format!("{p}pay"), P);
    let route = Route::partitioned(partitions.clone());
    let cleanup = support::Cleanup::new();
    cleanup.route(&route);
    cleanup.exchange(partitions.members_exchange());
    cleanup.delay_queues(&route, &Backoff::constant(DELAY));

    let keys = MemoryKeys::new();
    for client in 0..CLIENTS {
        keys.insert(client);
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let a = start(&format!("{p}a"), &route, &keys, &seen).await;

    let producer = Broker::connect(
        BrokerOptions::new(support::addr()).connection_name(format!("{p}producer")),
    )
    .await
    .expect("producer connection");
    producer.declare(&route).await.expect("declare");
    let publisher = producer.publisher().await.expect("publisher");
    // A alone: payment 0 of every client runs, then every payment 1 fails once and is deferred,
    // and every payment 2 waits behind it.
    publish(&publisher, &partitions, 0).await;
    until(&seen, "payments 0 handled", Duration::from_secs(30), |s| {
        s.handled.len() == CLIENTS as usize
    })
    .await;
    publish(&publisher, &partitions, 1).await;
    until(&seen, "payments 1 deferred", Duration::from_secs(30), |s| {
        s.deferred == CLIENTS as usize
    })
    .await;
    publish(&publisher, &partitions, 2).await;
    until(&seen, "payments 2 held", Duration::from_secs(30), |s| {
        s.held == CLIENTS as usize
    })
    .await;
    assert_eq!(
        seen.lock().unwrap().handled.len(),
        CLIENTS as usize,
        "payments 2 wait"
    );

    // B joins while the payments 1 are in their delay.
    let b = start(&format!("{p}b"), &route, &keys, &seen).await;
    until(&seen, "every payment handled", DELAY * 3, |s| {
        s.handled.len() == 3 * CLIENTS as usize
    })
    .await;
    // Then B takes its partitions: one more payment a client, round after round, until B has
    // run some.
    let started = tokio::time::Instant::now();
    for seq in 3.. {
        publish(&publisher, &partitions, seq).await;
        until(
            &seen,
            "the next round handled",
            Duration::from_secs(30),
            |s| s.handled.len() == (seq as usize + 1) * CLIENTS as usize,
        )
        .await;
        if seen
            .lock()
            .unwrap()
            .handled
            .iter()
            .any(|(_, _, who)| *who == b.name)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no partition moved to B within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.stop().await;
    b.stop().await;
    let _ = producer.close().await;

    let seen = seen.lock().unwrap();
    let mut order: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for (client, seq, who) in &seen.handled {
        order.entry(*client).or_default().push((*seq, who.clone()));
    }
    let moved_out_of_order: Vec<_> = order
        .iter()
        .filter(|(_, runs)| !runs.iter().map(|(seq, _)| *seq).is_sorted())
        .collect();
    assert!(
        moved_out_of_order.is_empty(),
        "clients whose payments ran out of order: {moved_out_of_order:?}"
    );
}
