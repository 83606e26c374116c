//! Conformance with the classic Go payment demo's wire format, against the `consumer`
//! example's configuration (the `drill_consumer` example run as a child process: the same
//! route, client store, policy and hold, plus a journal of what it does).
//!
//! The messages are the Go demo's exact bytes and header types, built here with lapin's own
//! typed `AMQPValue`s and the Go demo's literal names (`tests/support/go_demo.rs`), published
//! without `mandatory` as the Go producer does — not through prereq's producer code.
//!
//! * a payment published before its client, one after it, and a payment the Go consumer
//!   re-published (`reprocess.payment`, `x-delay: 3000`, `x-retry: 4`): each handled exactly
//!   once, after its registration, its 63-bit id intact; nothing dead-lettered, queues empty;
//! * a payment whose client never comes is dead-lettered `key-never-arrived` at the consumer's
//!   limit (10) even when its `x-retry-limit` header asks for 1000, and at the header's limit
//!   when that is lower; the dead letters keep the exact body and the Go headers.
//!
//! Correct with and without the delayed-message plugin: the consumer uses whichever mechanism
//! the broker offers; nothing here depends on which.
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/drill.rs"]
mod drill;
#[path = "support/go_demo.rs"]
mod go_demo;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use drill::{DrillChild, Line};
use go_demo::{GoNames, int32_headers};
use lapin::types::AMQPValue;
use prereq::amqp::payment_demo::{self, PaymentNames};

/// The most a step may take (the broker's delays are at most 10 s per attempt here).
const PATIENCE: Duration = Duration::from_secs(90);

/// Go `rand.Int()` values: 63-bit, the largest one included.
const PAYMENT_FIRST: u64 = 5_577_006_791_947_779_410;
const CLIENT_FIRST: u64 = 9_223_372_036_854_775_807;
const REPUBLISHED: u64 = 8_674_665_223_082_153_551;

/// A consumer running the example's configuration on a fresh prefixed topology.
struct Run {
    child: DrillChild,
    names: GoNames,
    prereq_names: PaymentNames,
    _dir: drill::TempDir,
    _cleanup: support::Cleanup,
}

impl Run {
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
        let mut env = vec![
            ("PREREQ_PREFIX", prefix.clone()),
            ("PREREQ_DB", dir.path("clients.db").display().to_string()),
        ];
        env.extend(extra_env.iter().cloned());
        let mut child = DrillChild::spawn(&log, &env);
        child.wait_ready(1, PATIENCE).await;
        Self {
            child,
            names: GoNames::with_prefix(&prefix),
            prereq_names,
            _dir: dir,
            _cleanup: cleanup,
        }
    }

    fn log(&self) -> Vec<Line> {
        drill::read_log(&self.child.log)
    }

    /// Wait for a journal line `pred` accepts.
    async fn wait_line(&mut self, what: &str, pred: impl Fn(&Line) -> bool) {
        let log = self.child.log.clone();
        drill::wait_until(what, PATIENCE, async || {
            let lines = drill::read_log(&log);
            if lines.iter().any(&pred) {
                Ok(())
            } else {
                Err(format!("journal: {lines:?}"))
            }
        })
        .await;
        self.child.assert_running();
    }

    /// SIGTERM, then the clean exit's counters.
    async fn stop(mut self) -> (Vec<Line>, BTreeMap<String, u64>, Self) {
        self.child.signal("TERM");
        let status = self.child.wait_exit(PATIENCE).await;
        assert!(
            status.success(),
            "consumer exit: {status}; {}",
            self.child.stderr()
        );
        let lines = self.log();
        let exit = lines
            .iter()
            .find_map(|l| match l {
                Line::Exit(c) => Some(c.clone()),
                _ => None,
            })
            .expect("EXIT line");
        (lines, exit, self)
    }
}

fn handled(lines: &[Line], payment: u64) -> Vec<&Line> {
    lines
        .iter()
        .filter(|l| matches!(l, Line::Handled { payment: p, .. } if *p == payment))
        .collect()
}

/// The payment was handled exactly once, with its client known to the client store when the
/// handler ran, and the client was registered. (Not "after the registration's line": the
/// journal writes that line once the store recorded the client, and the store's wake may
/// release the payment a moment before.)
fn assert_once_after_client(lines: &[Line], payment: u64, client: u64) {
    let h = handled(lines, payment);
    assert_eq!(
        h.len(),
        1,
        "payment {payment} handled {} times: {lines:?}",
        h.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| matches!(l, Line::Registered { client: c, .. } if *c == client)),
        "client {client} never registered: {lines:?}"
    );
    assert!(
        matches!(h[0], Line::Handled { client: c, known: true, first: true, .. } if *c == client),
        "{:?}",
        h[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_payments_are_handled_once_after_their_client_in_either_order() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let mut run = Run::start("go-wire", &[]).await;
    let ch = go_demo::channel(&conn).await;
    let names = run.names.clone();

    // Payment first: held, then released by the registration.
    go_demo::publish_payment(&ch, &names, PAYMENT_FIRST, 5).await;
    run.wait_line("the payment to be held", |l| {
        *l == Line::Held(PAYMENT_FIRST)
    })
    .await;
    go_demo::publish_client(&ch, &names, 5).await;
    run.wait_line(
        "the payment to be handled",
        |l| matches!(l, Line::Handled { payment, .. } if *payment == PAYMENT_FIRST),
    )
    .await;

    // Client first: handled at once.
    go_demo::publish_client(&ch, &names, 6).await;
    run.wait_line("client 6 to be registered", |l| {
        matches!(l, Line::Registered { client: 6, .. })
    })
    .await;
    go_demo::publish_payment(&ch, &names, CLIENT_FIRST, 6).await;
    run.wait_line(
        "the payment to be handled",
        |l| matches!(l, Line::Handled { payment, .. } if *payment == CLIENT_FIRST),
    )
    .await;

    // A payment the Go consumer re-published: reprocess.payment, x-delay 3000, x-retry 4, no
    // x-retry-limit. (Held for 3 s by the plugin where the broker has it.)
    go_demo::publish(
        &ch,
        &names.payments,
        go_demo::REPROCESS_KEY,
        &go_demo::payment_body(REPUBLISHED, 7),
        int32_headers(&[("x-delay", 3000), ("x-retry", 4)]),
    )
    .await;
    run.wait_line("the re-published payment to be held", |l| {
        *l == Line::Held(REPUBLISHED)
    })
    .await;
    go_demo::publish_client(&ch, &names, 7).await;
    run.wait_line(
        "the re-published payment to be handled",
        |l| matches!(l, Line::Handled { payment, .. } if *payment == REPUBLISHED),
    )
    .await;

    let (lines, exit, run) = run.stop().await;
    assert_once_after_client(&lines, PAYMENT_FIRST, 5);
    assert_once_after_client(&lines, CLIENT_FIRST, 6);
    assert_once_after_client(&lines, REPUBLISHED, 7);
    assert!(
        !lines.iter().any(|l| matches!(l, Line::DeadLettered(_))),
        "dead-lettered: {lines:?}"
    );
    assert_eq!(exit.get("handled"), Some(&3), "{exit:?}");
    assert_eq!(exit.get("dead_lettered"), Some(&0), "{exit:?}");
    let n = &run.prereq_names;
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
async fn a_go_payment_whose_client_never_comes_is_dead_lettered_at_the_consumer_s_limit() {
    let Some(conn) = support::broker().await else {
        return;
    };
    // A short hold: the payments are deferred through the broker quickly.
    let mut run = Run::start("go-never", &[("PREREQ_HOLD_MS", "300".to_owned())]).await;
    let ch = go_demo::channel(&conn).await;
    let names = run.names.clone();

    // Nine attempts behind it, and a header asking for 1000: the consumer's 10 caps it — one
    // more deferral (attempt 10), then the dead letter.
    const CAPPED: u64 = 4_037_200_794_235_010_051;
    let capped_headers = int32_headers(&[("x-delay", 0), ("x-retry", 9), ("x-retry-limit", 1000)]);
    go_demo::publish(
        &ch,
        &names.payments,
        go_demo::PROCESS_KEY,
        &go_demo::payment_body(CAPPED, 77),
        capped_headers,
    )
    .await;
    // A header limit lower than the consumer's is honoured: 2 deferrals, then the dead letter.
    const LOWERED: u64 = 3_916_589_616_287_113_937;
    go_demo::publish(
        &ch,
        &names.payments,
        go_demo::PROCESS_KEY,
        &go_demo::payment_body(LOWERED, 78),
        int32_headers(&[("x-delay", 0), ("x-retry", 0), ("x-retry-limit", 2)]),
    )
    .await;

    run.wait_line(
        "the first dead letter",
        |l| matches!(l, Line::DeadLettered(x) if x.contains(&CAPPED.to_string())),
    )
    .await;
    run.wait_line(
        "the second dead letter",
        |l| matches!(l, Line::DeadLettered(x) if x.contains(&LOWERED.to_string())),
    )
    .await;
    let (lines, _exit, run) = run.stop().await;
    let deferrals = |p: u64| lines.iter().filter(|l| **l == Line::Deferred(p)).count();
    assert_eq!(deferrals(CAPPED), 1, "{lines:?}");
    assert_eq!(deferrals(LOWERED), 2, "{lines:?}");
    for p in [CAPPED, LOWERED] {
        assert!(handled(&lines, p).is_empty(), "{lines:?}");
        assert!(
            lines.contains(&Line::DeadLettered(format!("X {p} key-never-arrived"))),
            "{lines:?}"
        );
    }

    // The dead letters: the exact bytes, the Go headers, prereq's reason.
    let n = &run.prereq_names;
    let get = conn.create_channel().await.expect("channel");
    let mut dead = BTreeMap::new();
    for _ in 0..2 {
        let m = support::get_one(&get, &n.dead_letter_queue, PATIENCE)
            .await
            .expect("a dead letter");
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).expect("JSON");
        dead.insert(body["id"].as_u64().expect("numeric id"), m);
    }
    for (p, client, attempts, limit) in [(CAPPED, 77, 10, 1000), (LOWERED, 78, 2, 2)] {
        let m = &dead[&p];
        assert_eq!(
            m.delivery.data,
            go_demo::payment_body(p, client),
            "body of {p}"
        );
        let props = &m.delivery.properties;
        let h = props.headers().as_ref();
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            support::header_str(h, "x-prereq-dead-letter-kind").as_deref(),
            Some("key-never-arrived")
        );
        assert!(
            support::header_str(h, "x-prereq-dead-letter-reason")
                .is_some_and(|r| r.contains(&client.to_string())),
            "{h:?}"
        );
        assert_eq!(support::header_int(h, "x-prereq-attempts"), Some(attempts));
        let inner = h.map(|h| h.inner()).expect("headers");
        // The Go headers, as 32-bit integers: the attempt count, the message's own limit.
        assert_eq!(
            inner.get("x-retry"),
            Some(&AMQPValue::LongInt(attempts as i32))
        );
        assert_eq!(inner.get("x-retry-limit"), Some(&AMQPValue::LongInt(limit)));
        assert_eq!(
            support::header_str(h, "x-prereq-original-exchange").as_deref(),
            Some(names.payments.as_str())
        );
        assert_eq!(
            support::header_str(h, "x-prereq-original-routing-key").as_deref(),
            Some(go_demo::PROCESS_KEY)
        );
    }
    for q in [&n.payments_queue, &n.reprocess_queue, &n.dead_letter_queue] {
        assert_eq!(drill::depth(&conn, q).await, 0, "{q} not empty");
    }
}
