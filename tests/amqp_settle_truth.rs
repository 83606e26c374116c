//! Events tell the truth: when the connection drops while handlers run (a TCP proxy between
//! the consumer and the broker, cut), the acknowledgement and the deferral that follow cannot
//! reach the broker. They are reported as settle failures — no `Handled` or `Deferred` for
//! them, no deferred copy stored — and the broker's redeliveries are handled. The `Report`
//! counts only what the broker accepted. The delay mechanism is forced to delay queues.
//!
//! The route is the examples' (the payment demo's, under a unique prefix).
#![cfg(feature = "amqp")]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Connection;
use prereq::amqp::payment_demo::{self, PaymentNames};
use prereq::amqp::{Broker, BrokerOptions, DelayMode};
use prereq::{Backoff, Decision, DependentConsumer, Event, HandlerError, HoldBudget};
use support::payments::{Client, Payment, publish_payment, register};
use tokio::sync::{mpsc, oneshot, watch};

fn policy() -> Backoff {
    Backoff::linear(Duration::from_secs(1)).max_attempts(5)
}

/// Messages ready in `queue`; 0 if it does not exist.
async fn ready_or_absent(conn: &Connection, queue: &str) -> u32 {
    support::ready_if_exists(conn, queue).await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_cut_off_by_a_dropped_connection_are_reported_as_failures() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let addr = support::addr();
    let proxy = support::Proxy::start(&addr).await;
    let names = PaymentNames::with_prefix(&support::unique("settle-truth"));
    let route = payment_demo::route(&names);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route).delay_queues(&route, &policy());
    let transport =
        Broker::connect(BrokerOptions::new(proxy.addr(&addr)).delay_mode(DelayMode::DelayQueues))
            .await
            .expect("connect through the proxy")
            .transport(route)
            .await
            .expect("transport");
    let health = transport.health();

    // The first run of each payment waits for the gate, then "ok" succeeds and "retry" asks
    // for a retry; later runs (the redeliveries) succeed at once.
    let (gate, gate_rx) = watch::channel(false);
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (started, mut started_rx) = mpsc::unbounded_channel::<String>();
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event<u64>>();
    let handler = {
        let calls = calls.clone();
        move |p: Payment| {
            let first = {
                let mut calls = calls.lock().unwrap();
                let n = calls.entry(p.id.clone()).or_default();
                *n += 1;
                *n == 1
            };
            let mut gate = gate_rx.clone();
            let started = started.clone();
            async move {
                if !first {
                    return Ok(());
                }
                let _ = started.send(p.id.clone());
                let _ = gate.wait_for(|open| *open).await;
                if p.id == "retry" {
                    Err(HandlerError::retry("busy"))
                } else {
                    Ok(())
                }
            }
        }
    };
    let consumer = DependentConsumer::builder(|p: &Payment| p.client_id, handler)
        .id(|p: &Payment| p.id.clone())
        .registrations(|c: &Client| c.id)
        .policy(policy())
        .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(60)))
        .concurrency(4)
        .on_event(move |e: &Event<u64>| {
            let _ = events_tx.send(e.clone());
        })
        .build();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async move {
        let _ = stop_rx.await;
    }));

    let ch = support::confirm_channel(&conn).await;
    let mut seen = Vec::new();
    for client in [1, 2] {
        register(&ch, &names, client).await;
    }
    let mut registered = 0;
    support::wait_for(
        &mut events,
        Duration::from_secs(10),
        |e| {
            registered += usize::from(e.decision == Decision::Registered);
            registered == 2
        },
        &mut seen,
    )
    .await;
    // Two clients: the two payments run at once.
    publish_payment(&ch, &names, "ok", 1).await;
    publish_payment(&ch, &names, "retry", 2).await;
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await
            .expect("both handlers running")
            .expect("handler");
    }

    // Cut the connection under the running handlers; wait until the broker delivered the
    // payments again (the connection recovered: the running handlers' deliveries are void).
    let before = health.last_delivery();
    assert!(
        proxy.cut() >= 1,
        "the consumer's connection went through the proxy"
    );
    support::eventually(
        "the broker to deliver the running payments again",
        Duration::from_secs(20),
        || health.last_delivery() != before,
    )
    .await;
    gate.send_replace(true);

    // Both settles fail; the redeliveries are handled. The redelivered "retry" is not held
    // behind the deferral of its void original (the broker delivered it again already): well
    // within 20 s, where a deferral wrongly kept would block its key for 30 s.
    let mut handled = 0;
    support::wait_for(
        &mut events,
        Duration::from_secs(20),
        |e| {
            handled += usize::from(e.decision == Decision::Handled);
            handled == 2
        },
        &mut seen,
    )
    .await;
    let decisions = |id: &str| -> Vec<Decision> {
        seen.iter()
            .filter(|e| e.message_id.as_deref() == Some(id))
            .map(|e| e.decision.clone())
            .collect()
    };
    for id in ["ok", "retry"] {
        let d = decisions(id);
        assert!(
            matches!(
                d.as_slice(),
                [Decision::SettleFailed { .. }, Decision::Handled]
            ),
            "{id}: the cut-off settle reported as a failure, then the redelivery handled: {:?}",
            decisions(id)
        );
    }
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e.decision, Decision::Deferred { .. })),
        "no deferral reported: {seen:#?}"
    );
    // No deferred copy: nothing in the delay queue of the retry's delay, nor in the queue
    // deferred copies come back to.
    let delay_queue = format!("{}.1000ms", names.delay_queue_prefix);
    assert_eq!(ready_or_absent(&conn, &delay_queue).await, 0);
    assert_eq!(ready_or_absent(&conn, &names.reprocess_queue).await, 0);

    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("stops in time")
        .expect("task")
        .expect("run");
    assert_eq!(
        report.handled, 2,
        "only the redeliveries were handled: {report:?}"
    );
    assert_eq!(report.deferred, 0, "{report:?}");
    assert_eq!(report.settle_failures, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.get("retry"), Some(&2), "no copy came back: {calls:?}");
    assert_eq!(calls.get("ok"), Some(&2), "{calls:?}");
    assert_eq!(support::ready_count(&ch, &names.payments_queue).await, 0);
}
