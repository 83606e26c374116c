//! A mixed fleet: prereq's consumer (the `consumer` example's configuration, run as the
//! `drill_consumer` child process) beside two consumers that behave like the Go demo's
//! (`tests/support/go_demo.rs`: auto-ack; an unknown client's payment re-published to
//! `reprocess.payment` with `x-delay` + 1000 and `x-retry` + 1), on the same queues, sharing the
//! client store (the example's SQLite file, `PREREQ_DB`).
//!
//! * 50 payments racing their clients' registrations, and 3 whose client never comes: each of
//!   the 50 processed exactly once by someone, nothing dead-lettered for its format, the 3
//!   dead-lettered by prereq with at least its limit of attempts (the Go side never enforces
//!   one);
//! * a copy prereq deferred is readable by a Go consumer: `x-delay` and `x-retry` 32-bit
//!   integers, `x-retry-limit` kept.
//!
//! Correct with and without the delayed-message plugin. Without it the Go consumers'
//! re-publications are not delayed at all (the Go demo needs the plugin): they circle until
//! prereq takes them, which only makes the 3 reach the limit sooner.
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/drill.rs"]
mod drill;
#[path = "support/go_demo.rs"]
mod go_demo;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drill::{DrillChild, Line, Rng};

use go_demo::{GoConsumer, GoNames, GoRecord, int32_headers};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use prereq::amqp::payment_demo::{self, PaymentNames};

/// A Go-like payment id: a non-negative 63-bit integer.
fn go_id(rng: &mut Rng) -> u64 {
    rng.next() >> 1
}

const PATIENCE: Duration = Duration::from_secs(120);
const RACING: u64 = 50;
/// prereq's limit (the example's policy: 10 attempts).
const LIMIT: i64 = 10;

struct Fleet {
    child: DrillChild,
    names: GoNames,
    prereq_names: PaymentNames,
    db: std::path::PathBuf,
    _dir: drill::TempDir,
    cleanup: support::Cleanup,
}

impl Fleet {
    async fn start(tag: &str, extra_env: &[(&str, String)]) -> Self {
        let cleanup = support::Cleanup::new();
        let prefix = support::unique(tag);
        let prereq_names = PaymentNames::with_prefix(&prefix);
        let route = payment_demo::route(&prereq_names);
        cleanup
            .route(&route)
            .delay_queues(&route, &support::EXAMPLE_POLICY);
        let dir = drill::TempDir::new(tag);
        let log = dir.path("drill.log");
        let db = dir.path("clients.db");
        let mut env = vec![
            ("PREREQ_PREFIX", prefix.clone()),
            ("PREREQ_DB", db.display().to_string()),
        ];
        env.extend(extra_env.iter().cloned());
        let mut child = DrillChild::spawn(&log, &env);
        child.wait_ready(1, PATIENCE).await;
        Self {
            child,
            names: GoNames::with_prefix(&prefix),
            prereq_names,
            db,
            _dir: dir,
            cleanup,
        }
    }

    async fn stop(mut self) -> (Vec<Line>, Self) {
        self.child.signal("TERM");
        let status = self.child.wait_exit(PATIENCE).await;
        assert!(
            status.success(),
            "consumer exit: {status}; {}",
            self.child.stderr()
        );
        (drill::read_log(&self.child.log), self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prereq_beside_go_consumers_processes_each_payment_once_and_caps_the_retries() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let fleet = Fleet::start("go-fleet", &[]).await;
    let names = fleet.names.clone();
    let record = Arc::new(Mutex::new(GoRecord::default()));
    let go_a = GoConsumer::start(&conn, &names, &fleet.db, record.clone()).await;
    let go_b = GoConsumer::start(&conn, &names, &fleet.db, record.clone()).await;

    let ch = go_demo::channel(&conn).await;
    let mut rng = Rng(0x60DE_3000_0000_0001);
    let racing: Vec<(u64, u64)> = (0..RACING).map(|i| (go_id(&mut rng), 1_000 + i)).collect();
    // Three whose client never comes; already re-published 8 times by Go consumers, so that the
    // limit is near even where the plugin makes every round last seconds.
    let never: Vec<(u64, u64)> = (0..3).map(|i| (go_id(&mut rng), 2_000 + i)).collect();
    for (i, (id, client)) in racing.iter().enumerate() {
        if i % 2 == 0 {
            go_demo::publish_payment(&ch, &names, *id, *client).await;
            go_demo::publish_client(&ch, &names, *client).await;
        } else {
            go_demo::publish_client(&ch, &names, *client).await;
            go_demo::publish_payment(&ch, &names, *id, *client).await;
        }
    }
    for (id, client) in &never {
        go_demo::publish(
            &ch,
            &names.payments,
            go_demo::PROCESS_KEY,
            &go_demo::payment_body(*id, *client),
            int32_headers(&[("x-delay", 0), ("x-retry", 8), ("x-retry-limit", 10)]),
        )
        .await;
    }

    let log = fleet.child.log.clone();
    let racing_ids: BTreeSet<u64> = racing.iter().map(|(id, _)| *id).collect();
    let never_ids: BTreeSet<u64> = never.iter().map(|(id, _)| *id).collect();
    let rec = record.clone();
    drill::wait_until(
        "every racing payment processed and the 3 dead-lettered",
        PATIENCE,
        async || {
            let lines = drill::read_log(&log);
            let mut done: BTreeSet<u64> = rec.lock().unwrap().processed.iter().copied().collect();
            done.extend(lines.iter().filter_map(|l| match l {
                Line::Handled { payment, .. } => Some(*payment),
                _ => None,
            }));
            let dead = lines
                .iter()
                .filter(|l| matches!(l, Line::DeadLettered(_)))
                .count();
            let missing = racing_ids.difference(&done).count();
            // A Go consumer that could not read a message lost it (auto-ack): checked below.
            let crashed = !rec.lock().unwrap().crashes.is_empty();
            if crashed || (missing == 0 && dead >= never.len()) {
                Ok(())
            } else {
                Err(format!(
                    "{missing} payments not processed, {dead} dead letters"
                ))
            }
        },
    )
    .await;
    go_a.stop().await;
    go_b.stop().await;
    let (lines, fleet) = fleet.stop().await;
    let record = record.lock().unwrap().clone();

    // Each racing payment processed exactly once, by someone; prereq's only with the client
    // known.
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for id in &record.processed {
        *times.entry(*id).or_default() += 1;
    }
    let mut by_prereq = 0;
    for l in &lines {
        if let Line::Handled { payment, known, .. } = l {
            assert!(known, "prereq handled {payment} before its client: {l:?}");
            *times.entry(*payment).or_default() += 1;
            by_prereq += 1;
        }
    }
    for id in &racing_ids {
        assert_eq!(times.get(id), Some(&1), "payment {id}: {times:?}");
    }
    assert!(
        never_ids.iter().all(|id| !times.contains_key(id)),
        "a payment without client was processed: {times:?}"
    );
    assert!(
        record.crashes.is_empty(),
        "the Go consumers could not read: {:?}",
        record.crashes
    );
    println!(
        "processed by prereq: {by_prereq}, by the Go consumers: {}; Go re-publications: {}",
        record.processed.len(),
        record.republished
    );

    // Only the 3 dead-lettered, by prereq, for their client, with at least its limit of
    // attempts; nothing for its format.
    let dead_lines: Vec<&String> = lines
        .iter()
        .filter_map(|l| match l {
            Line::DeadLettered(x) => Some(x),
            _ => None,
        })
        .collect();
    let expected: BTreeSet<String> = never_ids
        .iter()
        .map(|id| format!("X {id} key-never-arrived"))
        .collect();
    assert_eq!(
        dead_lines
            .iter()
            .map(|x| (*x).clone())
            .collect::<BTreeSet<_>>(),
        expected,
        "{lines:?}"
    );
    assert_eq!(dead_lines.len(), 3, "{lines:?}");
    let get = conn.create_channel().await.expect("channel");
    let n = &fleet.prereq_names;
    for _ in 0..3 {
        let m = support::get_one(&get, &n.dead_letter_queue, PATIENCE)
            .await
            .expect("a dead letter");
        let h = m.delivery.properties.headers().as_ref();
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).expect("JSON");
        let id = body["id"].as_u64().expect("numeric id");
        let client = never
            .iter()
            .find(|(p, _)| *p == id)
            .expect("one of the 3")
            .1;
        assert_eq!(m.delivery.data, go_demo::payment_body(id, client));
        assert_eq!(
            support::header_str(h, "x-prereq-dead-letter-kind").as_deref(),
            Some("key-never-arrived")
        );
        let attempts = support::header_int(h, "x-prereq-attempts").expect("attempts");
        assert!(attempts >= LIMIT, "dead-lettered after {attempts} attempts");
    }
    for q in [
        &n.payments_queue,
        &n.reprocess_queue,
        &n.clients_queue,
        &n.dead_letter_queue,
    ] {
        assert_eq!(drill::depth(&conn, q).await, 0, "{q} not empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_prereq_deferred_is_readable_by_a_go_consumer() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let fleet = Fleet::start("go-copy", &[("PREREQ_HOLD_MS", "200".to_owned())]).await;
    let names = fleet.names.clone();
    // A Go consumer's view of what arrives for `reprocess.payment`: a queue of the test's
    // own, bound like `payment-reprocessor`.
    let spy = format!(
        "{}go-spy",
        names.payments.trim_end_matches(go_demo::PAYMENTS)
    );
    fleet.cleanup.queue(spy.clone());
    let ch = go_demo::channel(&conn).await;
    ch.queue_declare(
        spy.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the spy queue");
    ch.queue_bind(
        spy.as_str().into(),
        names.payments.as_str().into(),
        go_demo::REPROCESS_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the spy queue");

    const ID: u64 = 6_129_484_611_666_145_821;
    go_demo::publish_payment(&ch, &names, ID, 31_337).await;
    let copy = support::get_one(&ch, &spy, PATIENCE)
        .await
        .expect("prereq's deferred copy");
    let props = &copy.delivery.properties;
    let h = props.headers().as_ref();
    let inner = h.map(|h| h.inner()).expect("headers");
    assert_eq!(copy.delivery.data, go_demo::payment_body(ID, 31_337));
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    // The first deferral: 1 s (the example's linear backoff), attempt 1; the limit kept.
    assert_eq!(inner.get("x-delay"), Some(&AMQPValue::LongInt(1000)));
    assert_eq!(inner.get("x-retry"), Some(&AMQPValue::LongInt(1)));
    assert_eq!(inner.get("x-retry-limit"), Some(&AMQPValue::LongInt(10)));
    // What the Go consumer reads of it, and would re-publish.
    assert_eq!(go_demo::go_read_headers(h), Ok((1000, 1)));
    let (_lines, _fleet) = fleet.stop().await;
}
