//! A consumer holding many messages moves on to a fresh channel, end to end on the broker with
//! the examples' route. RabbitMQ finds the delivery an acknowledgement names by walking the
//! channel's unacknowledged deliveries from the oldest, so on one channel every acknowledgement
//! behind a large hold costs the broker the whole hold. Once a channel has 1 024 deliveries
//! open, the consumer cancels itself there, takes what the old channel still delivers, and
//! consumes on a fresh channel; the old one stays open for what it carried and closes once all
//! of it is settled.
//!
//! - 1 500 payments of 100 clients not registered yet are held: the transport counts a retired
//!   channel, and payments of a known client behind them are handled meanwhile.
//! - Registering the 100 clients releases all 1 500, each handled once, each client's payments
//!   in the order they were published (they span the old channel and the fresh one).
//! - Then the retired channels have closed (on the broker too, where `rabbitmqctl` reaches the
//!   broker under test), and the report counts exactly what happened.
#![cfg(feature = "amqp")]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use prereq::amqp::payment_demo::{self, PaymentNames};
use prereq::{Backoff, Decision, HoldBudget};
use support::payments::{Running, publish_payment, register};

/// Payments held: more than one channel's worth before the consumer moves on (1 024).
const HELD: u64 = 1_500;
/// Their clients, registered only at the end.
const LATE_CLIENTS: u64 = 100;
/// The client registered first, and its payments, published after the held ones.
const KNOWN: u64 = 1;
const KNOWN_PAYMENTS: u64 = 50;

/// The held payment `i`'s client.
fn late_client(i: u64) -> u64 {
    1_000 + i % LATE_CLIENTS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hold_stays_behind_on_its_channel_and_everything_runs_once_in_key_order() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let names = PaymentNames::with_prefix(&support::unique("held-behind"));
    let conn_name = support::unique("held-behind-connection");
    let route = payment_demo::route(&names);
    let cleanup = support::Cleanup::new();
    cleanup.route(&route);
    let transport = support::connect(&conn_name)
        .await
        .transport(route)
        .await
        .expect("transport");
    let health = transport.health();
    // The default budget (10 000 messages), with time enough that nothing expires here.
    let budget = HoldBudget::DEFAULT.max_time(Duration::from_secs(300));
    let mut run = Running::start(transport, Backoff::default(), budget, true);
    let ch = support::confirm_channel(&conn).await;

    register(&ch, &names, KNOWN).await;
    run.wait(Duration::from_secs(10), |e| {
        e.decision == Decision::Registered
    })
    .await;
    for i in 0..HELD {
        publish_payment(&ch, &names, &format!("late-{i}"), late_client(i)).await;
    }
    for i in 0..KNOWN_PAYMENTS {
        publish_payment(&ch, &names, &format!("known-{i}"), KNOWN).await;
    }
    let (mut held, mut handled) = (0, 0);
    run.wait(Duration::from_secs(60), |e| {
        held += u64::from(e.decision == Decision::Held);
        handled += u64::from(e.decision == Decision::Handled);
        held == HELD && handled == KNOWN_PAYMENTS
    })
    .await;
    let retired = health.retired_channels();
    assert!(
        retired >= 1,
        "with {HELD} held, the consumer moved on to a fresh channel (retired: {retired})"
    );
    // On the broker: what is held sits on channels without a consumer, and the channel
    // consumed now carries fewer than one channel's worth.
    let mid = channels_of(&conn_name);
    if let Some(mid) = &mid {
        let consuming = mid.iter().filter(|(consumers, _)| *consumers > 0);
        let left = mid.iter().filter(|(consumers, _)| *consumers == 0);
        assert!(
            consuming.clone().all(|(_, unacked)| *unacked < 1_024)
                && left.map(|(_, unacked)| *unacked).sum::<u32>() >= 1_024,
            "(consumers, unacknowledged) per channel: {mid:?}"
        );
    }

    for c in 0..LATE_CLIENTS {
        register(&ch, &names, 1_000 + c).await;
    }
    run.wait(Duration::from_secs(60), |e| {
        handled += u64::from(e.decision == Decision::Handled);
        handled == KNOWN_PAYMENTS + HELD
    })
    .await;

    let order = run.handled();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for id in &order {
        *times.entry(id.as_str()).or_default() += 1;
    }
    assert_eq!(
        times.len() as u64,
        HELD + KNOWN_PAYMENTS,
        "every payment ran"
    );
    assert!(times.values().all(|n| *n == 1), "none ran twice");
    let mut per_client: HashMap<u64, Vec<u64>> = HashMap::new();
    for id in &order {
        if let Some(i) = id.strip_prefix("late-").and_then(|i| i.parse::<u64>().ok()) {
            per_client.entry(late_client(i)).or_default().push(i);
        }
    }
    for (client, ran) in &per_client {
        assert!(
            ran.is_sorted(),
            "client {client}'s payments ran in the order published: {ran:?}"
        );
    }
    support::eventually(
        "the retired channels close once everything they delivered is settled",
        Duration::from_secs(20),
        || health.retired_channels() == 0,
    )
    .await;

    if let (Some(mid), Some(end)) = (&mid, channels_of(&conn_name)) {
        assert_eq!(
            end.len(),
            mid.len() - retired,
            "the retired channels are closed on the broker too: {mid:?} then {end:?}"
        );
        assert!(end.iter().all(|(_, unacked)| *unacked == 0), "{end:?}");
    }
    let report = run.stop().await.expect("graceful stop");
    assert_eq!(
        (
            report.handled,
            report.held,
            report.released,
            report.deferred,
            report.requeued,
            report.settle_failures
        ),
        (HELD + KNOWN_PAYMENTS, HELD, HELD, 0, 0, 0),
        "{report:?}"
    );
}

/// The channels of the connection named `name` on the node `rabbitmqctl` reaches: for each, its
/// consumers and unacknowledged deliveries. `None`, with a note, where that node does not have
/// the connection (the broker under test is elsewhere) or `rabbitmqctl` cannot run.
fn channels_of(name: &str) -> Option<Vec<(u32, u32)>> {
    let ctl = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("rabbitmqctl")
            .arg("-q")
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The name the client gave is among the connection's client properties (3.10 has no
    // column of its own for it); the test's name is unique.
    let connections = ctl(&[
        "list_connections",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let pid = connections.as_deref().and_then(|list| {
        list.lines()
            .find(|l| l.contains(&format!("\"{name}\"")))
            .and_then(|l| l.split('\t').next())
            .map(|pid| pid.trim().to_owned())
    });
    let Some(pid) = pid else {
        eprintln!("note: rabbitmqctl does not show connection {name}: channels not checked");
        return None;
    };
    let channels = ctl(&[
        "list_channels",
        "--no-table-headers",
        "connection",
        "consumer_count",
        "messages_unacknowledged",
    ])?;
    Some(
        channels
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (conn, consumers, unacked) = (f.next()?, f.next()?, f.next()?);
                (conn.trim() == pid)
                    .then(|| Some((consumers.trim().parse().ok()?, unacked.trim().parse().ok()?)))?
            })
            .collect(),
    )
}
