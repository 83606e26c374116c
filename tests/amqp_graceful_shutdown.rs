//! Graceful shutdown on a real RabbitMQ: a consumer process holds messages whose keys are
//! unknown (unacknowledged, in memory); on SIGINT, and on SIGTERM, it gives every one of them
//! back to the broker (`basic.nack` with requeue, confirmed one by one in its log) and exits
//! with status 0. Afterwards every held message is back in the queue, ready, with its body and
//! id: none lost, none dead-lettered, none deferred.
//!
//! The process is the drill consumer (`examples/drill_consumer.rs`), which handles both signals.
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use drill::{DrillChild, Line, Out};
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};

const HELD: u64 = 100;

async fn held_messages_go_back_on(signal: &str) {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let prefix = support::unique(&format!("shutdown-{}", signal.to_lowercase()));
    let names = PaymentNames::with_prefix(&prefix);
    let route = payment_demo::route(&names);
    cleanup.route(&route);
    let queue = names.payments_queue.clone();

    let dir = drill::TempDir::new("shutdown");
    let log = dir.path("drill.log");
    let mut child = DrillChild::spawn(
        &log,
        &[
            ("PREREQ_PREFIX", prefix.clone()),
            ("PREREQ_DB", dir.path("clients.db").display().to_string()),
            // Held for a minute: only the signal ends the hold.
            ("PREREQ_HOLD_MS", "60000".to_owned()),
        ],
    );
    let log_r = log.clone();
    drill::wait_until(
        "the consumer to start",
        Duration::from_secs(60),
        async || {
            if drill::count(&log_r, |l| *l == Line::Ready) == 1 {
                Ok(())
            } else {
                Err("no READY line".into())
            }
        },
    )
    .await;

    // Payments of clients that never register: all held.
    let ch = support::confirm_channel(&conn).await;
    let body = |id: u64| {
        format!(
            r#"{{"id":{id},"clientId":{},"value":200,"operationDate":"2026-11-28T08:31:01Z"}}"#,
            10_000 + id
        )
        .into_bytes()
    };
    let out = (0..HELD).map(|id| Out {
        exchange: names.payments_exchange.clone(),
        routing_key: PROCESS_KEY.to_owned(),
        body: body(id),
        properties: drill::persistent(id.to_string()),
    });
    drill::publish_all(&ch, out, 64, |_| {}).await;
    let log_h = log.clone();
    drill::wait_until("every payment held", Duration::from_secs(30), async || {
        let held = drill::count(&log_h, |l| matches!(l, Line::Held(_)));
        if held as u64 == HELD {
            Ok(())
        } else {
            Err(format!("{held} held"))
        }
    })
    .await;
    // They sit unacknowledged with the consumer, nothing ready in the queue.
    if let Some(counts) = drill::queue_counts(&prefix) {
        assert_eq!(
            counts[&queue],
            (0, HELD),
            "held = unacknowledged: {counts:?}"
        );
    }
    assert_eq!(support::ready_count(&ch, &queue).await, 0);

    child.signal(signal);
    let status = child.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIG{signal} must end the consumer cleanly: {status}\n{}",
        child.stderr()
    );

    // The consumer's own account: every held message given back, nothing else done.
    let lines = drill::read_log(&log);
    let requeued: BTreeSet<u64> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Requeued(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(
        requeued,
        (0..HELD).collect(),
        "every held message given back"
    );
    let exit = lines
        .iter()
        .find_map(|l| match l {
            Line::Exit(c) => Some(c.clone()),
            _ => None,
        })
        .expect("EXIT line");
    assert_eq!(exit["requeued"], HELD, "{exit:?}");
    assert_eq!(exit["held"], HELD, "{exit:?}");
    assert_eq!(exit["handled"], 0, "{exit:?}");
    assert_eq!(exit["deferred"], 0, "{exit:?}");
    assert_eq!(exit["dead_lettered"], 0, "{exit:?}");
    assert_eq!(exit["settle_failures"], 0, "{exit:?}");

    // The broker's account: all back, ready, intact.
    if let Some(counts) = drill::queue_counts(&prefix) {
        assert_eq!(counts[&queue], (HELD, 0), "{counts:?}");
    }
    let mut back = BTreeSet::new();
    while let Some(msg) = support::get_one(&ch, &queue, Duration::from_millis(500)).await {
        let id: u64 = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .expect("message id")
            .as_str()
            .parse()
            .expect("numeric id");
        assert_eq!(msg.delivery.data, body(id), "body of {id} intact");
        assert!(msg.delivery.redelivered, "{id} went back as a redelivery");
        assert!(back.insert(id), "{id} twice in the queue");
    }
    assert_eq!(back, (0..HELD).collect(), "every held message is back");
    assert_eq!(support::ready_count(&ch, &names.dead_letter_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_gives_every_held_message_back_and_exits_0() {
    held_messages_go_back_on("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_every_held_message_back_and_exits_0() {
    held_messages_go_back_on("TERM").await;
}
