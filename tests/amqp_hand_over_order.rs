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
//!
//! And the wait's bound: copies that never come back hold the partition for their delay plus
//! 30 s, no longer (about 40 s).
#![cfg(feature = "amqp")]

#[path = "support/group.rs"]
mod group;
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use group::{Instance, Payment};
use prereq::amqp::{Broker, BrokerOptions, Message, Partitions, Route};
use prereq::{Backoff, Decision, DependentConsumer, HandlerError, HoldBudget, MemoryKeys};

/// Partitions in the group.
const P: u32 = 4;
/// Clients paying (spread over the partitions by the consistent-hash exchange).
const CLIENTS: u64 = 8;
/// How long a deferred payment stays in its delay: longer than a rebalance takes here.
const DELAY: Duration = Duration::from_secs(15);

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
    /// When each instance first handled a payment.
    first: BTreeMap<String, tokio::time::Instant>,
}

/// An instance of the group whose handler fails each payment 1 once and records the rest.
async fn start(
    name: &str,
    route: &Route,
    keys: &MemoryKeys<u64>,
    seen: &Arc<Mutex<Seen>>,
    delay: Duration,
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
                seen.first
                    .entry(me.clone())
                    .or_insert_with(tokio::time::Instant::now);
                seen.handled.push((p.client_id, p.seq, me));
                Ok(())
            }
        },
    )
    .keys(keys.clone())
    .policy(Backoff::constant(delay))
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

/// [`support::eventually`] over what was seen.
async fn until(seen: &Arc<Mutex<Seen>>, what: &str, limit: Duration, cond: impl Fn(&Seen) -> bool) {
    support::eventually(what, limit, || cond(&seen.lock().unwrap())).await;
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

/// The scene both tests start from: instance A alone in the group; payment 0 of every client
/// handled; every payment 1 failed once and deferred (its copy in a `delay`).
struct Scene {
    /// The run's unique name prefix.
    p: String,
    partitions: Partitions,
    route: Route,
    keys: MemoryKeys<u64>,
    seen: Arc<Mutex<Seen>>,
    /// Deletes the group's queues and exchanges at the end.
    _cleanup: support::Cleanup,
    a: Instance,
    producer: Broker,
    publisher: prereq::amqp::Publisher,
}

async fn a_alone_with_payments_1_deferred(tag: &str, delay: Duration) -> Scene {
    let p = support::unique(tag);
    let partitions = Partitions::new(format!("{p}pay"), P);
    let route = Route::partitioned(partitions.clone());
    let cleanup = support::Cleanup::new();
    cleanup.route(&route);
    cleanup.exchange(partitions.members_exchange());
    cleanup.delay_queues(&route, &Backoff::constant(delay));
    let keys = MemoryKeys::new();
    for client in 0..CLIENTS {
        keys.insert(client);
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let a = start(&format!("{p}a"), &route, &keys, &seen, delay).await;
    let producer = Broker::connect(
        BrokerOptions::new(support::addr()).connection_name(format!("{p}producer")),
    )
    .await
    .expect("producer connection");
    producer.declare(&route).await.expect("declare");
    let publisher = producer.publisher().await.expect("publisher");
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
    Scene {
        p,
        partitions,
        route,
        keys,
        seen,
        _cleanup: cleanup,
        a,
        producer,
        publisher,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_later_payment_waits_for_its_deferred_copy_when_the_partition_moves() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    // A alone: payment 0 of every client ran, every payment 1 failed once and was deferred;
    // every payment 2 waits behind it.
    let Scene {
        p,
        partitions,
        route,
        keys,
        seen,
        _cleanup,
        a,
        producer,
        publisher,
    } = a_alone_with_payments_1_deferred("handover", DELAY).await;
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
    let b = start(&format!("{p}b"), &route, &keys, &seen, DELAY).await;
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

/// The wait for the copies is bounded: a copy that never comes back (here purged from its delay
/// queue, as if lost with a broker) holds its partition for its delay plus 30 s, then the
/// partition moves all the same. About 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moves_without_a_copy_that_never_comes_back_after_its_delay_and_a_grace() {
    /// The copies' delay.
    const LOST_DELAY: Duration = Duration::from_secs(3);
    /// The grace after it (the transport's `COPY_GRACE`).
    const GRACE: Duration = Duration::from_secs(30);
    let Some(conn) = support::broker().await else {
        return;
    };
    // Every payment 1 failed once and was deferred; its copy is then lost in the delay queue.
    let Scene {
        p,
        partitions,
        route,
        keys,
        seen,
        _cleanup,
        a,
        producer,
        publisher,
    } = a_alone_with_payments_1_deferred("handover-lost", LOST_DELAY).await;
    let lost_at = tokio::time::Instant::now();
    let channel = conn.create_channel().await.expect("channel");
    let delay_queue = format!("{}.{}ms", route.delay_prefix(), LOST_DELAY.as_millis());
    let purged = channel
        .queue_purge(delay_queue.as_str().into(), Default::default())
        .await
        .expect("purge the delay queue");
    assert_eq!(
        purged, CLIENTS as u32,
        "purged before their delay (3 s) was up: the copies are lost"
    );
    let _ = channel.close(200, "done".into()).await;

    // B joins: A keeps its partitions for the lost copies, until their delay and the grace.
    // A round of payments every second until B runs one.
    let b = start(&format!("{p}b"), &route, &keys, &seen, LOST_DELAY).await;
    let mut seq = 2;
    let b_first = loop {
        if let Some(at) = seen.lock().unwrap().first.get(&b.name) {
            break *at;
        }
        assert!(
            lost_at.elapsed() < LOST_DELAY + GRACE + Duration::from_secs(25),
            "no partition moved to B within the copies' delay, the grace and 25 s"
        );
        publish(&publisher, &partitions, seq).await;
        seq += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let moved_after = b_first - lost_at;
    a.stop().await;
    b.stop().await;
    let _ = producer.close().await;
    eprintln!("a partition moved to B {moved_after:?} after the copies were lost");
    assert!(
        moved_after >= LOST_DELAY + GRACE - Duration::from_secs(2),
        "B ran payments {moved_after:?} after the copies were lost: A did not wait for them"
    );
}
