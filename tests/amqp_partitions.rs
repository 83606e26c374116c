//! Partitioned consumption on a real RabbitMQ (consistent-hash exchange, quorum partition
//! queues with a single active consumer): keyed messages are handled after their key, a
//! deferred message comes back to its own partition (through the delay queues' headers
//! exchange, keeping its routing key), and the ingress router re-publishes a keyless producer's
//! messages by key.
#![cfg(feature = "amqp")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Connection;
use prereq::amqp::{
    Broker, BrokerOptions, DelayMode, Message, Partitions, Queue, Route, route_by_key,
};
use prereq::{Backoff, Decision, DependentConsumer, HandlerError, HoldBudget, MemoryKeys};
use support::ready_if_exists;

#[derive(serde::Deserialize)]
struct Payment {
    id: u64,
    #[serde(rename = "clientId")]
    client_id: u64,
}

/// A name of this run's own (`support::unique` without its trailing dot: the test's names
/// are made by appending `.suffix`).
fn unique(tag: &str) -> String {
    support::unique(tag).trim_end_matches('.').to_owned()
}

/// The ingress router from the classic queue `ingress` to `partitions`, reading the key from the
/// body's `clientId` (a number or a string), in a task until the returned sender is used.
fn start_router(
    broker: &Broker,
    partitions: &Partitions,
    ingress: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<prereq::amqp::RouterReport, prereq::amqp::AmqpError>>,
) {
    let broker = broker.clone();
    let partitions = partitions.clone();
    let ingress = ingress.to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        route_by_key(
            &broker,
            Queue::classic(&ingress),
            &partitions,
            |body: &[u8]| {
                let v: serde_json::Value =
                    serde_json::from_slice(body).map_err(|e| e.to_string())?;
                let client = &v["clientId"];
                client
                    .as_u64()
                    .map(|c| c.to_string())
                    .or_else(|| client.as_str().map(str::to_owned))
                    .ok_or_else(|| "no clientId".to_owned())
            },
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_messages_are_held_released_retried_to_their_partition_and_routed() {
    if support::broker().await.is_none() {
        return;
    }
    let name = unique("partitions");
    let partitions = Partitions::new(&name, 4);
    let route = Route::partitioned(partitions.clone());
    let ingress = format!("{name}.ingress");
    let policy = Backoff::constant(Duration::from_millis(200));
    // Deleted when the test ends, also when it fails.
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .queue(ingress.as_str())
        .delay_queues(&route, &policy)
        .exchange(partitions.members_exchange());
    let broker = Broker::connect(
        BrokerOptions::from_env()
            .delay_mode(DelayMode::DelayQueues)
            .connection_name(format!("{name}.instance")),
    )
    .await
    .expect("connect");
    let transport = match broker.transport(route.clone()).await {
        Ok(t) => t,
        Err(e) => panic!("{e} (is rabbitmq_consistent_hash_exchange enabled?)"),
    };

    let keys = MemoryKeys::new();
    let handled: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let h = handled.clone();
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment, ctx: prereq::Context<u64>| {
            let h = h.clone();
            async move {
                // Payment 2 fails once: deferred, it must come back to its partition.
                if p.id == 2 && ctx.attempt == 0 {
                    return Err(HandlerError::retry("busy"));
                }
                h.lock().unwrap().push((p.id, ctx.attempt));
                Ok(())
            }
        },
    )
    .keys(keys.clone())
    .policy(policy)
    .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(30)))
    .on_event(|e| {
        if matches!(e.decision, Decision::DeadLettered(_)) {
            eprintln!("dead-lettered: {e}");
        }
    })
    .build();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stop_rx.await;
    }));

    // A producer that cannot route by key publishes into a plain queue; the router does it.
    let publisher = broker.publisher().await.expect("publisher");
    let router = start_router(&broker, &partitions, &ingress);
    // Keyed publishing, for producers that can.
    let body = |id: u64, client: u64| format!(r#"{{"id":{id},"clientId":{client}}}"#);
    publisher
        .publish_keyed(&partitions, "1", body(1, 1).as_bytes(), &Message::new())
        .await
        .expect("publish 1");
    publisher
        .publish_keyed(&partitions, "2", body(2, 2).as_bytes(), &Message::new())
        .await
        .expect("publish 2");
    // Through the router (the ingress queue exists once the router declared it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent = publisher
            .publish("", &ingress, body(3, 3).as_bytes(), &Message::new())
            .await;
        if sent.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingress never appeared: {sent:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    keys.insert(1);
    keys.insert(2);
    keys.insert(3);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = handled.lock().unwrap().len();
        if done == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled so far: {:?}",
            handled.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    let report = run.await.expect("run").expect("clean stop");
    let _ = router.0.send(());
    let routed = router.1.await.expect("router").expect("router ran");
    let mut got = handled.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        vec![(1, 0), (2, 1), (3, 0)],
        "payment 2 came back once"
    );
    assert_eq!(report.deferred, 1);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(routed.routed, 1);

    drop(cleanup);
}

/// A router's scene: a partitioned route declared, the names of the router's queue and of the
/// partitions' dead-letter queue, and the cleanup of all of it (also when the test fails).
struct RouterScene {
    partitions: Partitions,
    broker: Broker,
    ingress: String,
    dead: String,
    _cleanup: support::Cleanup,
}

async fn router_scene(tag: &str, count: u32) -> RouterScene {
    let name = unique(tag);
    let partitions = Partitions::new(&name, count);
    let route = Route::partitioned(partitions.clone());
    let broker = Broker::connect(BrokerOptions::from_env())
        .await
        .expect("connect");
    broker.declare(&route).await.expect("declare");
    let ingress = format!("{name}.ingress");
    let dead = format!("{name}.dead");
    let cleanup = support::Cleanup::new();
    cleanup
        .route(&route)
        .queue(ingress.as_str())
        .queue(dead.as_str())
        .exchange(partitions.members_exchange());
    RouterScene {
        partitions,
        broker,
        ingress,
        dead,
        _cleanup: cleanup,
    }
}

/// Wait until the queue `name` exists (a router declares its queue as it starts).
async fn wait_for_queue(conn: &Connection, name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready_if_exists(conn, name).await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no queue {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages ready in the partitions' queues.
async fn in_partitions(conn: &Connection, partitions: &Partitions) -> u64 {
    let mut n = 0;
    for i in 0..partitions.count() {
        n += ready_if_exists(conn, &partitions.queue_name(i))
            .await
            .unwrap_or(0);
    }
    u64::from(n)
}

/// A burst waiting in the router's queue: every message reaches its partition once (or the
/// dead-letter queue, those without a key), the originals are acknowledged in batches, and
/// nothing is left in or comes back to the router's queue once it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_the_router_arrives_once_each_and_leaves_nothing_behind() {
    const N: u64 = 600;
    let Some(conn) = support::broker().await else {
        return;
    };
    let scene = router_scene("router-burst", 4).await;
    let (partitions, broker, ingress, dead) = (
        &scene.partitions,
        &scene.broker,
        &scene.ingress,
        &scene.dead,
    );
    // A first router declares its queue; it is stopped, the burst published, a second started.
    let (stop, first) = start_router(broker, partitions, ingress);
    wait_for_queue(&conn, ingress).await;
    let _ = stop.send(());
    first.await.expect("router").expect("first router ran");
    let publisher = broker.publisher().await.expect("publisher");
    let keyless = |i: u64| i % 100 == 7;
    for i in 0..N {
        let body = if keyless(i) {
            format!(r#"{{"id":{i}}}"#)
        } else {
            format!(r#"{{"id":{i},"clientId":{}}}"#, i % 50)
        };
        publisher
            .publish("", ingress, body.as_bytes(), &Message::new())
            .await
            .expect("publish to the router's queue");
    }
    let n_keyless = (0..N).filter(|i| keyless(*i)).count() as u64;
    let (stop, second) = start_router(broker, partitions, ingress);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let routed = in_partitions(&conn, partitions).await;
        let dead_lettered = ready_if_exists(&conn, dead).await.unwrap_or(0);
        if routed == N - n_keyless && u64::from(dead_lettered) == n_keyless {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "routed {routed}, dead-lettered {dead_lettered} of {N}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let report = second.await.expect("router").expect("second router ran");
    assert_eq!(report.routed, N - n_keyless);
    assert_eq!(report.dead_lettered, n_keyless);
    // Every original was acknowledged before the router's channel closed: none came back.
    assert_eq!(
        ready_if_exists(&conn, ingress).await,
        Some(0),
        "left in the router's queue"
    );
    // Each message in its partition once (read by a consumer: a single-active-consumer queue
    // refuses `basic.get`).
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..partitions.count() {
        let queue = partitions.queue_name(i);
        let count = ready_if_exists(&conn, &queue).await.unwrap_or(0);
        let ch = conn.create_channel().await.expect("channel");
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("consume a partition");
        for _ in 0..count {
            let d = tokio::time::timeout(
                Duration::from_secs(10),
                futures::StreamExt::next(&mut consumer),
            )
            .await
            .expect("a routed message in time")
            .expect("consumer open")
            .expect("delivery");
            let p: Payment = serde_json::from_slice(&d.data).expect("a payment");
            assert!(ids.insert(p.id), "payment {} routed twice", p.id);
            assert_eq!(p.client_id, p.id % 50);
        }
        let _ = ch.close(200, "read".into()).await;
    }
    assert_eq!(ids.len() as u64, N - n_keyless);

    drop(scene);
}

/// A message whose key is longer than a routing key may be (255 bytes) is the message's fault:
/// the router dead-letters it with the reason and routes what comes after it. Before, it
/// stopped with an error at that message, and so did every router that took over after it (the
/// message was first in the queue again): the group's ingress stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_long_for_a_routing_key_is_dead_lettered_and_the_router_goes_on() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let scene = router_scene("router-long-key", 2).await;
    let (partitions, broker, ingress, dead) = (
        &scene.partitions,
        &scene.broker,
        &scene.ingress,
        &scene.dead,
    );
    let (stop, router) = start_router(broker, partitions, ingress);
    wait_for_queue(&conn, ingress).await;
    let publisher = broker.publisher().await.expect("publisher");
    let long = "x".repeat(300);
    for body in [
        r#"{"id":1,"clientId":1}"#.to_owned(),
        format!(r#"{{"id":2,"clientId":"{long}"}}"#),
        r#"{"id":3,"clientId":3}"#.to_owned(),
    ] {
        publisher
            .publish("", ingress, body.as_bytes(), &Message::new())
            .await
            .expect("publish to the router's queue");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let routed = in_partitions(&conn, partitions).await;
        let dead_lettered = ready_if_exists(&conn, dead).await.unwrap_or(0);
        if routed == 2 && dead_lettered == 1 {
            break;
        }
        assert!(
            !router.is_finished(),
            "the router stopped (routed {routed}, dead-lettered {dead_lettered})"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "routed {routed}, dead-lettered {dead_lettered} of 3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            dead.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("the dead letter");
    let reason = support::header_str(
        got.delivery.properties.headers().as_ref(),
        prereq::amqp::headers::DEAD_LETTER_REASON,
    )
    .unwrap_or_default();
    assert!(
        reason.contains("300 bytes") && reason.contains("255"),
        "the reason names the length and the limit: {reason}"
    );
    assert!(String::from_utf8_lossy(&got.delivery.data).contains(&long));
    let _ = ch.close(200, "read".into()).await;
    let _ = stop.send(());
    let report = router.await.expect("router").expect("the router ran");
    assert_eq!((report.routed, report.dead_lettered), (2, 1));
    drop(scene);
}

/// The router's connection is cut while it routes (a network failure): it rides out the
/// connection's recovery and goes on, and every message reaches its partition, at least once
/// (the originals of copies not confirmed before the cut come back and are routed again).
/// Before, it stopped with the publish's or the confirm's IO error.
///
/// In about one run in three, lapin's recovery never starts (no new connection at all: lapin
/// 4.12, after a write failed as the connection broke). The broker's watcher then finds the
/// broker taking a probe connection while this one stays down, and declares it lost 3 connect
/// timeouts later (3 s here) instead of at the reconnect timeout (2 min here, longer than the
/// test waits): the router stops with that error, which this test accepts, the messages not
/// routed left in the router's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_rides_out_a_connection_cut() {
    const N: u64 = 400;
    let Some(conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let scene = router_scene("router-cut", 2).await;
    let (partitions, direct, ingress, dead) = (
        &scene.partitions,
        &scene.broker,
        &scene.ingress,
        &scene.dead,
    );
    let addr = support::addr();
    let proxy = support::Proxy::start(&addr).await;
    let routing = Broker::connect(
        BrokerOptions::new(proxy.addr(&addr))
            .connect_timeout(Duration::from_secs(1))
            .reconnect_timeout(Duration::from_secs(120)),
    )
    .await
    .expect("connect through the proxy");
    let (stop, mut router) = start_router(&routing, partitions, ingress);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready_if_exists(&conn, ingress).await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no ingress queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let publisher = direct.publisher().await.expect("publisher");
    for i in 0..N {
        let body = format!(r#"{{"id":{i},"clientId":{}}}"#, i % 20);
        publisher
            .publish("", ingress, body.as_bytes(), &Message::new())
            .await
            .expect("publish to the router's queue");
        if i == N / 2 {
            assert!(proxy.cut() >= 1, "the router's connection cut");
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // `n` counts copies, duplicates of the cut included: it can reach N while the router still
    // holds messages it took and has not routed. Done is N or more routed, none ready, and
    // nothing moving for a second (20 polls).
    let (mut last, mut quiet) = (0, 0);
    let recovered = loop {
        let n = in_partitions(&conn, partitions).await;
        let left = ready_if_exists(&conn, ingress).await.unwrap_or(0);
        quiet = if n >= N && left == 0 && n == last {
            quiet + 1
        } else {
            0
        };
        last = n;
        if quiet >= 20 {
            break true;
        }
        if router.is_finished() {
            match (&mut router).await.expect("router") {
                Err(prereq::amqp::AmqpError::Connect { message, .. })
                    if message.contains("not making progress") =>
                {
                    eprintln!("lapin's recovery did not start; the router stopped: {message}");
                    break false;
                }
                ended => panic!("the router stopped ({n} routed, {left} left): {ended:?}"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} routed, {left} left in the router's queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if recovered {
        let _ = stop.send(());
        let report = router.await.expect("router").expect("the router ran");
        assert!(report.routed >= N / 2, "{report:?}");
    }
    assert_eq!(ready_if_exists(&conn, dead).await, Some(0));
    let _ = routing.close().await;
    if !recovered {
        // Nothing lost: what was not routed is back in the router's queue.
        let n = in_partitions(&conn, partitions).await;
        let left = ready_if_exists(&conn, ingress).await.unwrap_or(0);
        assert!(n + u64::from(left) >= N, "{n} routed, {left} left of {N}");
        let _ = direct.close().await;
        return;
    }
    // Nothing was left with a consumer of the failed session (lapin brings a channel back with
    // its consumer): with the router's connection closed, it would be ready again here.
    assert_eq!(
        ready_if_exists(&conn, ingress).await,
        Some(0),
        "left in the router's queue"
    );
    let _ = direct.close().await;
    drop(scene);
}
