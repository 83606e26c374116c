//! Broker restart drill: `rabbitmqctl stop_app` then `start_app` while a consumer runs. The
//! consumer recovers by itself (lapin's auto-recovery in the transport: reconnect, channels,
//! qos, consumers, confirms) and loses nothing: messages handled before the stop, messages held
//! (unacknowledged) across it, and messages published after it are all handled; nothing is
//! dead-lettered; the consumer never stops with an error.
//!
//! Opt-in (`#[ignore]`): stopping the broker's application disturbs every other test that
//! talks to the broker at the same time, so it cannot run inside the parallel test suite. It
//! also needs `rabbitmqctl` (root, or the rabbitmq user) on the broker's machine. `.ci/run`
//! runs it on its own after the main test command:
//!
//! ```sh
//! cargo test --all-features --test drill_broker_restart -- --ignored --test-threads=1
//! ```
//!
//! Before stopping anything, it waits for every other client connection to go away (and fails
//! if one stays), so it never pulls the broker from under someone else.
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drill::Out;
use prereq::amqp::{AmqpConfig, AmqpTransport, DelayMode, prefetch_for};
use prereq::{Decision, DependentConsumer, HandlerError, HoldBudget};

/// Payments whose client registers before the restart.
const BEFORE: u64 = 300;
/// Payments held across the restart: their clients register only after it.
const HELD: u64 = 50;
/// Payments published after the restart.
const AFTER: u64 = 300;

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

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl {args:?} cannot run here ({e}): this drill needs it")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Client connections, by connection name (`-` when unnamed).
fn connections() -> Vec<String> {
    rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "name",
        "client_properties",
    ])
    .lines()
    .map(|l| {
        let name = l.split('\t').next().unwrap_or_default();
        let conn_name = l
            .split("\"connection_name\",\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("-");
        format!("{name} ({conn_name})")
    })
    .collect()
}

fn payment(id: u64, client: u64, queue: &str) -> Out {
    Out {
        routing_key: queue.to_owned(),
        body: format!(r#"{{"id":{id},"clientId":{client}}}"#).into_bytes(),
        properties: drill::persistent(format!("pay-{id}")),
    }
}

fn client(id: u64, queue: &str) -> Out {
    Out {
        routing_key: queue.to_owned(),
        body: format!(r#"{{"id":{id}}}"#).into_bytes(),
        properties: drill::persistent(format!("client-{id}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops and starts the broker application: run alone, as .ci/run does"]
async fn consumer_recovers_from_a_broker_restart_and_loses_nothing() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let _ = conn.close(200, "probe done".into()).await;
    // Safe to restart only when nobody else uses the broker.
    drill::wait_until(
        "the broker to have no other client connection",
        Duration::from_secs(60),
        async || {
            let others = connections();
            if others.is_empty() {
                Ok(())
            } else {
                Err(format!("connected: {others:?}"))
            }
        },
    )
    .await;

    let cleanup = support::Cleanup::new();
    let prefix = support::unique("restart");
    let queue = format!("{prefix}payments");
    let keys = format!("{prefix}clients");
    let hold = HoldBudget::default()
        .with_max_messages(1_000)
        .with_max_time(Duration::from_secs(120));
    let config = AmqpConfig::new(queue.clone(), keys.clone())
        .with_delay_mode(DelayMode::DelayQueues)
        .with_prefetch(prefetch_for(hold.max_messages, 8))
        .with_connection_name(format!("{prefix}consumer"));
    cleanup.config(&config);

    let handled: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let events: Arc<Mutex<Vec<(Instant, Decision)>>> = Arc::default();
    let (h, ev) = (handled.clone(), events.clone());
    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client_id)
        .id(|p: &Payment| p.id.to_string())
        .registrations(|c: &Client| c.id)
        .budget(hold)
        .on_event(move |e| {
            ev.lock()
                .unwrap()
                .push((Instant::now(), e.decision.clone()))
        })
        .handler(move |p: Payment| {
            *h.lock().unwrap().entry(p.id).or_default() += 1;
            async { Ok::<_, HandlerError>(()) }
        })
        .build()
        .expect("consumer");
    let transport = AmqpTransport::connect(config.clone())
        .await
        .expect("connect");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stop_rx.await;
    }));

    // Before: payments of registered clients, and payments whose clients are not known yet.
    let publisher = support::broker().await.expect("broker");
    let ch = support::confirm_channel(&publisher).await;
    let mut out: Vec<Out> = (0..BEFORE / 10).map(|c| client(c, &keys)).collect();
    out.extend((0..BEFORE).map(|id| payment(id, id / 10, &queue)));
    out.extend((BEFORE..BEFORE + HELD).map(|id| payment(id, 1_000 + id, &queue)));
    drill::publish_all(&ch, out, 64, |_| {}).await;
    let count = |d: fn(&Decision) -> bool| {
        let events = events.clone();
        move || events.lock().unwrap().iter().filter(|(_, e)| d(e)).count()
    };
    let handled_n = count(|d| matches!(d, Decision::Handled));
    let held_n = count(|d| matches!(d, Decision::Held));
    drill::wait_until(
        "the first payments handled and the rest held",
        Duration::from_secs(30),
        async || {
            let (h, held) = (handled_n(), held_n());
            if h >= BEFORE as usize && held >= HELD as usize {
                Ok(())
            } else {
                Err(format!("{h} handled, {held} held"))
            }
        },
    )
    .await;
    let _ = publisher.close(200, "restart".into()).await;

    // The restart.
    let stopped_at = Instant::now();
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let started_at = Instant::now();
    let events_at_restart = events.lock().unwrap().len();
    assert!(
        !run.is_finished(),
        "the consumer stopped during the restart: {:?}",
        run.await
    );

    // After: the held payments' clients, and new payments of new clients.
    let publisher = support::broker().await.expect("broker after restart");
    let ch = support::confirm_channel(&publisher).await;
    let mut out: Vec<Out> = (BEFORE..BEFORE + HELD)
        .map(|id| client(1_000 + id, &keys))
        .collect();
    let first_after = BEFORE + HELD;
    for id in first_after..first_after + AFTER {
        let c = 2_000 + id / 10;
        if id % 10 == 0 {
            out.push(client(c, &keys));
        }
        out.push(payment(id, c, &queue));
    }
    drill::publish_all(&ch, out, 64, |_| {}).await;

    let total = BEFORE + HELD + AFTER;
    drill::wait_until(
        "every payment handled after the restart",
        Duration::from_secs(90),
        async || {
            assert!(!run.is_finished(), "the consumer stopped");
            let n = handled.lock().unwrap().len();
            if n == total as usize {
                Ok(())
            } else {
                Err(format!("{n} of {total} handled"))
            }
        },
    )
    .await;
    // The consumer's connection is a new one (stop_app closed every connection), reopened by
    // the transport on its own.
    let name = format!("({prefix}consumer)");
    assert!(
        connections().iter().any(|c| c.ends_with(&name)),
        "the consumer's connection {name} is back: {:?}",
        connections()
    );
    let recovered_at = events.lock().unwrap()[events_at_restart..]
        .iter()
        .find(|(_, d)| matches!(d, Decision::Handled | Decision::Registered))
        .map(|(t, _)| *t)
        .expect("a decision after the restart");

    stop_tx.send(()).expect("consumer still running");
    let report = run
        .await
        .expect("consumer task")
        .expect("the consumer ran through the restart without a transport error");
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled.keys().copied().collect::<BTreeSet<_>>(),
        (0..total).collect::<BTreeSet<_>>(),
        "every payment handled"
    );
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    let twice = handled.values().filter(|n| **n > 1).count();
    // Held across the restart: the broker redelivered them, and each copy took its stale
    // original's place in the hold, so each ran once.
    for id in BEFORE..BEFORE + HELD {
        assert_eq!(
            handled[&id], 1,
            "payment {id}, held across the restart, ran twice"
        );
    }
    // Every queue of this run is empty (ready and unacknowledged).
    let counts = drill::queue_counts(&prefix).expect("rabbitmqctl list_queues");
    assert!(
        counts.values().all(|c| *c == (0, 0)),
        "left on the broker: {counts:?}"
    );
    println!(
        "restart drill: stop_app+start_app took {:?}; first decision {:?} after start_app; \
         {total} payments handled, {twice} twice; {report:?}",
        started_at - stopped_at,
        recovered_at.saturating_duration_since(started_at),
    );
}
