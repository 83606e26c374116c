//! Broker outage drill: a consumer runs against a private RabbitMQ node, which is taken down
//! (`rabbitmqctl stop_app`) for 5 s, then for 40 s. Each time the consumer recovers by itself
//! (lapin's auto-recovery in the transport: reconnect, channels, qos, consumers, confirms, with a
//! reconnect backoff capped at a fraction of a second) and loses nothing: messages handled
//! before, messages held (unacknowledged) across each outage, and messages published after are
//! all handled, each held one once; nothing is dead-lettered; the consumer never stops with an
//! error.
//!
//! It measures, and prints, how soon after the broker accepts connections again the consumer is
//! deciding again (measured, not asserted: timings depend on the machine): a second client
//! polls the broker, and the moment it gets in it publishes a probe payment of a known client;
//! the consumer's first decision after the outage is normally that payment handled. The
//! registrations that release the held payments are published once the probe is handled (see
//! [`outage`] for why).
//!
//! The node is the test's own (own name, ports, cookie, data; see `tests/support/node.rs`): the
//! shared broker other tests use is never stopped. Without `rabbitmq-server` installed the
//! drill skips (fails under `PREREQ_REQUIRE_BROKER=1`). Opt-in (`#[ignore]`), as it takes
//! about 75 s (node start ≈ 6–10 s, the two outages 45 s, restarts and checks):
//!
//! ```sh
//! cargo test --all-features --test drill_broker_restart -- --ignored --nocapture
//! ```
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
#[path = "support/node.rs"]
mod node;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drill::Out;
use lapin::{Connection, ConnectionProperties};
use prereq::amqp::{AmqpAddr, Broker, BrokerOptions, DelayMode, Queue, Route};
use prereq::{Decision, DependentConsumer, HoldBudget};

/// Payments whose client registers before the first outage.
const BEFORE: u64 = 300;
/// Payments held across each outage: their clients register only after it.
const HELD: u64 = 50;
/// Payments published after the last outage.
const AFTER: u64 = 300;
/// The outages.
const OUTAGES: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(40)];

#[derive(serde::Deserialize)]
struct Payment {
    id: u64,
    #[serde(rename = "clientId")]
    client_id: u64,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

fn payment(id: u64, client: u64, queue: &str) -> Out {
    Out {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        body: format!(r#"{{"id":{id},"clientId":{client}}}"#).into_bytes(),
        properties: drill::persistent(id.to_string()),
    }
}

fn client(id: u64, queue: &str) -> Out {
    Out {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        body: format!(r#"{{"id":{id}}}"#).into_bytes(),
        properties: drill::persistent(format!("client-{id}")),
    }
}

/// The payments held across outage `n` (0-based), and the client each waits for.
fn held_across(n: usize) -> impl Iterator<Item = (u64, u64)> {
    let first = BEFORE + n as u64 * HELD;
    (first..first + HELD).map(|id| (id, 1_000_000 + id))
}

/// Every decision, when it was made, and about which message.
type Events = Arc<Mutex<Vec<(Instant, Decision, Option<String>)>>>;

/// The id of the probe payment published as the broker comes back from outage `n`; its client
/// (0) is known from the start.
fn probe(n: usize) -> u64 {
    9_000_000 + n as u64
}

/// What one outage looked like.
struct Outage {
    planned: Duration,
    /// From `stop_app` returning to the first AMQP connection the broker accepted again.
    down: Duration,
    /// From the broker accepting connections to `start_app` returning (zero: before).
    start_app_returned: Duration,
    /// From the broker accepting connections to the consumer's first decision after the outage.
    first_decision: Duration,
    /// From the broker accepting connections to the probe payment handled.
    probe_handled: Duration,
}

/// Take the node down for `length`, bring it back, and as soon as it accepts a connection
/// publish the probe payment `n`. Once it is handled, publish `releases`.
///
/// The probe measures the recovery, and orders the releases after the redeliveries: the held
/// payments go back to the head of their queue when the consumer's connection closes, the probe
/// is queued behind them, and the consumer takes deliveries in order, so when the probe is
/// handled every held payment's redelivered copy has taken its original's place in the hold.
/// (A release that came first would run the stale original, whose acknowledgement is void,
/// and then the redelivered copy: a duplicate.)
async fn outage(
    node: &Arc<node::Node>,
    addr: &AmqpAddr,
    (n, length): (usize, Duration),
    queue: &str,
    releases: Vec<Out>,
    events: &Events,
) -> Outage {
    let n_ = node.clone();
    tokio::task::spawn_blocking(move || n_.ctl_ok(&["stop_app"]))
        .await
        .expect("stop_app");
    let stopped = Instant::now();
    // The outage itself: how long the broker stays away (nothing is awaited here).
    tokio::time::sleep(length).await;
    let n_ = node.clone();
    let start_app = tokio::task::spawn_blocking(move || {
        n_.ctl_ok(&["start_app"]);
        Instant::now()
    });
    // The first moment the broker takes an AMQP connection again.
    let (conn, accepting) = loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            Connection::connect(addr.expose(), ConnectionProperties::default()),
        )
        .await;
        if let Ok(Ok(conn)) = attempt {
            break (conn, Instant::now());
        }
        assert!(
            stopped.elapsed() < length + Duration::from_secs(120),
            "the node did not accept connections within 120 s of start_app"
        );
        // Polling pace: a refused connection returns at once.
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let ch = support::confirm_channel(&conn).await;
    drill::publish_all(&ch, [payment(probe(n), 0, queue)], 1, |_| {}).await;
    let start_app_returned = start_app.await.expect("start_app");

    let probe_id = probe(n).to_string();
    let probe_handled = || {
        events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, d, id)| {
                matches!(d, Decision::Handled) && id.as_deref() == Some(probe_id.as_str())
            })
            .map(|(t, _, _)| *t)
    };
    drill::wait_until(
        "the probe payment handled after the outage",
        Duration::from_secs(60),
        async || {
            probe_handled()
                .map(|_| ())
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .await;
    drill::publish_all(&ch, releases, 64, |_| {}).await;
    let _ = conn.close(200, "released".into()).await;

    let first_decision = events
        .lock()
        .unwrap()
        .iter()
        .find(|(t, _, _)| *t > stopped)
        .map(|(t, _, _)| *t)
        .expect("a decision after the outage");
    let since = |t: Instant| t.saturating_duration_since(accepting);
    Outage {
        planned: length,
        down: accepting - stopped,
        start_app_returned: since(start_app_returned),
        first_decision: since(first_decision),
        probe_handled: since(probe_handled().expect("the probe handled")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private RabbitMQ node and stops it for 5 s then 40 s: about 75 s"]
async fn consumer_recovers_from_a_broker_restart_and_loses_nothing() {
    let began = Instant::now();
    let Some(node) = node::Node::start("restart") else {
        return;
    };
    let node = Arc::new(node);
    let addr = node.addr();

    let prefix = support::unique("restart");
    let queue = format!("{prefix}payments");
    let keys = format!("{prefix}clients");
    let connection_name = format!("{prefix}consumer");
    let hold = HoldBudget::DEFAULT
        .max_messages(1_000)
        .max_time(Duration::from_secs(120));
    let options = BrokerOptions::new(addr.clone())
        .delay_mode(DelayMode::DelayQueues)
        .connection_name(connection_name.clone());
    let route =
        Route::new(Queue::classic(queue.clone())).registrations(Queue::classic(keys.clone()));

    let handled: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let events: Events = Arc::default();
    let (h, ev) = (handled.clone(), events.clone());
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment| {
            *h.lock().unwrap().entry(p.id).or_default() += 1;
            async { Ok(()) }
        },
    )
    .id(|p: &Payment| p.id.to_string())
    .registrations(|c: &Client| c.id)
    .budget(hold)
    .on_event(move |e| {
        ev.lock()
            .unwrap()
            .push((Instant::now(), e.decision.clone(), e.message_id.clone()))
    })
    .build();
    let transport = Broker::connect(options)
        .await
        .expect("connect")
        .transport(route)
        .await
        .expect("declare");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stop_rx.await;
    }));

    let publisher = Connection::connect(addr.expose(), ConnectionProperties::default())
        .await
        .expect("publisher connection");
    let ch = support::confirm_channel(&publisher).await;
    let mut out: Vec<Out> = (0..BEFORE / 10).map(|c| client(c, &keys)).collect();
    out.extend((0..BEFORE).map(|id| payment(id, id / 10, &queue)));
    drill::publish_all(&ch, out, 64, |_| {}).await;
    let _ = publisher.close(200, "done".into()).await;
    drill::wait_until(
        "the first payments handled",
        Duration::from_secs(30),
        async || {
            let n = handled.lock().unwrap().len();
            if n == BEFORE as usize {
                Ok(())
            } else {
                Err(format!("{n} handled"))
            }
        },
    )
    .await;

    let mut reports = Vec::new();
    for (n, length) in OUTAGES.into_iter().enumerate() {
        // Payments whose clients are unknown until after this outage: held across it.
        let publisher = Connection::connect(addr.expose(), ConnectionProperties::default())
            .await
            .expect("publisher connection");
        let ch = support::confirm_channel(&publisher).await;
        let held: Vec<(u64, u64)> = held_across(n).collect();
        let out = held.iter().map(|(id, c)| payment(*id, *c, &queue));
        drill::publish_all(&ch, out, 64, |_| {}).await;
        let _ = publisher.close(200, "done".into()).await;
        let ids: BTreeSet<String> = held.iter().map(|(id, _)| id.to_string()).collect();
        drill::wait_until(
            "the payments held across the outage to be held",
            Duration::from_secs(30),
            async || {
                let now_held: BTreeSet<String> = events
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, d, _)| matches!(d, Decision::Held))
                    .filter_map(|(_, _, id)| id.clone())
                    .collect();
                let missing = ids.difference(&now_held).count();
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!("{missing} not held yet"))
                }
            },
        )
        .await;

        let releases = held.iter().map(|(_, c)| client(*c, &keys)).collect();
        let report = outage(&node, &addr, (n, length), &queue, releases, &events).await;
        assert!(
            !run.is_finished(),
            "the consumer stopped during the outage: {:?}",
            run.await
        );
        reports.push(report);
    }

    // After: new payments of new clients.
    let publisher = Connection::connect(addr.expose(), ConnectionProperties::default())
        .await
        .expect("publisher connection");
    let ch = support::confirm_channel(&publisher).await;
    let first_after = BEFORE + OUTAGES.len() as u64 * HELD;
    let total = first_after + AFTER;
    let mut out = Vec::new();
    for id in first_after..total {
        let c = 2_000_000 + id / 10;
        if id % 10 == 0 {
            out.push(client(c, &keys));
        }
        out.push(payment(id, c, &queue));
    }
    drill::publish_all(&ch, out, 64, |_| {}).await;
    let _ = publisher.close(200, "done".into()).await;
    drill::wait_until(
        "every payment handled",
        Duration::from_secs(90),
        async || {
            assert!(!run.is_finished(), "the consumer stopped");
            let n = handled.lock().unwrap().len();
            let all = total as usize + OUTAGES.len();
            if n == all {
                Ok(())
            } else {
                Err(format!("{n} of {all} handled"))
            }
        },
    )
    .await;
    // stop_app closed every connection: the consumer's is a new one, opened by the transport.
    let names = node.connection_names();
    assert!(
        names.contains(&connection_name),
        "the consumer's connection {connection_name} is back: {names:?}"
    );

    stop_tx.send(()).expect("consumer still running");
    let report = run
        .await
        .expect("consumer task")
        .expect("the consumer ran through the outages without a transport error");
    let handled = handled.lock().unwrap().clone();
    let probes = (0..OUTAGES.len()).map(probe);
    assert_eq!(
        handled.keys().copied().collect::<BTreeSet<_>>(),
        (0..total).chain(probes).collect::<BTreeSet<_>>(),
        "every payment handled"
    );
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    // Held across an outage: the broker redelivered them, and each copy took its stale
    // original's place in the hold, so each ran once.
    for (id, _) in (0..OUTAGES.len()).flat_map(held_across) {
        assert_eq!(
            handled[&id], 1,
            "payment {id}, held across an outage, ran twice"
        );
    }
    let counts = node.queue_counts(&prefix);
    assert!(
        !counts.is_empty() && counts.values().all(|c| *c == (0, 0)),
        "left on the broker: {counts:?}"
    );
    let twice = handled.values().filter(|n| **n > 1).count();
    for o in &reports {
        println!(
            "outage drill: {:?} outage (broker away {:?}): the consumer's first decision {:?} \
             (the probe payment handled {:?}) after the broker accepted connections again \
             (start_app returned {:?} after that)",
            o.planned, o.down, o.first_decision, o.probe_handled, o.start_app_returned
        );
    }
    println!(
        "outage drill: {total} payments handled, {twice} twice; {report:?}; drill took {:?}",
        began.elapsed()
    );
}
