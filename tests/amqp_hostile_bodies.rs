//! Hostile bodies end to end through a real RabbitMQ: a 10 MB payment is held, released and
//! handled; a 10 MB body that is not JSON, 10 MB of JSON of the wrong type (whose decode error
//! quotes the whole 10 MB), an empty body and an empty registration are each
//! dead-lettered with the reason `undecodable` and a bounded reason text, body kept intact; the
//! consumer keeps running and handles a normal payment afterwards. (Malformed JSON and wrong
//! types are covered on the in-memory transport by `tests/engine_bad_input.rs`.)
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prereq::amqp::headers;
use prereq::amqp::{DelayMode, Queue, Route};
use prereq::{Decision, DependentConsumer, HoldBudget};
use support::{header_int as get_int, header_str as get_str};

const TEN_MB: usize = 10 * 1024 * 1024;

#[derive(serde::Deserialize)]
struct Payment {
    id: String,
    #[serde(rename = "clientId")]
    client_id: u64,
    #[serde(default)]
    memo: String,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_empty_bodies_are_handled_or_dead_lettered_with_a_reason() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("hostile");
    let queue = format!("{p}payments");
    let keys = format!("{p}clients");
    let budget = HoldBudget::DEFAULT
        .max_messages(100)
        .max_bytes(64 << 20)
        .max_time(Duration::from_secs(60));
    let route =
        Route::new(Queue::classic(queue.clone())).registrations(Queue::classic(keys.clone()));
    let dead_queue = route.dead_letter_queue().name().to_owned();

    // message id → (decision, memo length when handled)
    let decisions: Arc<Mutex<HashMap<String, Vec<Decision>>>> = Arc::default();
    let memo_len: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (d, m) = (decisions.clone(), memo_len.clone());
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment| {
            m.lock().unwrap().insert(p.id.clone(), p.memo.len());
            async { Ok(()) }
        },
    )
    .registrations(|c: &Client| c.id)
    .budget(budget)
    .concurrency(4)
    .on_event(move |e| {
        let id = e.message_id.clone().unwrap_or_default();
        d.lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push(e.decision.clone());
    })
    .build();
    // The consumer itself sizes the prefetch from its budget when it starts the transport.
    let transport = support::unstarted_transport(&cleanup, route, DelayMode::DelayQueues).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stop_rx.await;
    }));

    let ch = support::confirm_channel(&conn).await;
    let props = |id: &str| lapin::BasicProperties::default().with_message_id(id.into());
    // A valid 10 MB payment whose client is not known yet: held (10 MB within the budget).
    let memo = "m".repeat(TEN_MB);
    let big = format!(r#"{{"id":"big","clientId":7,"memo":"{memo}"}}"#);
    support::publish(&ch, "", &queue, big.as_bytes(), props("big")).await;
    // 10 MB that is not JSON, and nothing at all.
    let pattern = b"{[\"\\\x00\xff";
    let garbage: Vec<u8> = (0..TEN_MB).map(|i| pattern[i % pattern.len()]).collect();
    support::publish(&ch, "", &queue, &garbage, props("garbage")).await;
    // Valid JSON of the wrong type, whose error quotes the whole 10 MB string: the reason must
    // still fit in a header.
    let wrong = format!(r#"{{"id":"wrong","clientId":"{memo}"}}"#);
    support::publish(&ch, "", &queue, wrong.as_bytes(), props("wrong-type")).await;
    support::publish(&ch, "", &queue, b"", props("empty")).await;
    support::publish(&ch, "", &keys, b"", props("empty-registration")).await;

    let decided = |id: &'static str, want: fn(&Decision) -> bool| {
        let decisions = decisions.clone();
        async move || {
            let seen = decisions
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .unwrap_or_default();
            if seen.iter().any(want) {
                Ok(())
            } else {
                Err(format!("{id}: {seen:?}"))
            }
        }
    };
    let wait = Duration::from_secs(60);
    drill::wait_until("big held", wait, decided("big", |d| *d == Decision::Held)).await;
    // Its client registers: released and handled, all 10 MB of it.
    support::publish(&ch, "", &keys, br#"{"id":7}"#, props("client-7")).await;
    drill::wait_until(
        "big handled",
        wait,
        decided("big", |d| *d == Decision::Handled),
    )
    .await;
    assert_eq!(memo_len.lock().unwrap()["big"], TEN_MB);
    for id in ["garbage", "wrong-type", "empty", "empty-registration"] {
        drill::wait_until(
            id,
            wait,
            decided(id, |d| matches!(d, Decision::DeadLettered(_))),
        )
        .await;
    }
    // Still consuming: a normal payment afterwards is handled.
    support::publish(
        &ch,
        "",
        &queue,
        br#"{"id":"after","clientId":7}"#,
        props("after"),
    )
    .await;
    drill::wait_until(
        "after handled",
        wait,
        decided("after", |d| *d == Decision::Handled),
    )
    .await;

    // The dead letters, with their reasons and intact bodies.
    let mut dead: HashMap<String, (usize, String, String)> = HashMap::new();
    while dead.len() < 4 {
        let msg = support::get_one(&ch, &dead_queue, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("dead letters so far: {:?}", dead.keys()));
        let props = &msg.delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .expect("message id kept");
        let h = props.headers().as_ref();
        let kind = get_str(h, headers::DEAD_LETTER_KIND).expect("kind header");
        let reason = get_str(h, headers::DEAD_LETTER_REASON).expect("reason header");
        assert_eq!(get_int(h, headers::ATTEMPTS), Some(0), "{id}");
        if id == "garbage" {
            assert_eq!(msg.delivery.data, garbage, "the 10 MB body is kept intact");
        }
        dead.insert(id, (msg.delivery.data.len(), kind, reason));
    }
    for (id, len) in [
        ("garbage", TEN_MB),
        ("wrong-type", wrong.len()),
        ("empty", 0),
        ("empty-registration", 0),
    ] {
        let (got_len, kind, reason) = &dead[id];
        assert_eq!(*got_len, len, "{id}: body length");
        assert_eq!(kind, "undecodable", "{id}");
        assert!(
            !reason.is_empty() && reason.len() <= 2 * 1024,
            "{id}: a short, non-empty reason, got {} bytes: {reason:.200}",
            reason.len()
        );
        println!("{id}: dead-lettered, reason: {reason:.300}");
    }
    assert_eq!(support::ready_count(&ch, &dead_queue).await, 0);

    stop_tx.send(()).expect("consumer still running");
    let report = run.await.expect("task").expect("no transport error");
    assert_eq!(report.handled, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 4, "{report:?}");
    assert_eq!(report.settle_failures, 0, "{report:?}");
    assert_eq!(support::ready_count(&ch, &queue).await, 0);
}
