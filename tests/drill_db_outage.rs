//! Database outage drill: the `consumer` example (what a user runs) keeps its clients in a
//! **private** PostgreSQL cluster (its own data directory and port: the shared server is never
//! touched), which is stopped for about 15 s while payments and registrations arrive, then
//! started again. Afterwards:
//!
//! * payments of clients registered before the outage were handled during it (positive answers
//!   are cached: keys never disappear);
//! * payments of clients registered during it were held — never run, never deferred (the hold,
//!   `PREREQ_HOLD_MS`, is longer than the outage), never dead-lettered — and all handled once the
//!   database is back (their registrations, unacknowledged while the database refused them, are
//!   recorded, and the held keys looked up again);
//! * the consumer warned once that the key source is unavailable, the listener once that it
//!   lost its connection, and it reconnected (after which held keys are re-checked: notifications
//!   sent meanwhile are lost by PostgreSQL's design);
//! * the consumer stops cleanly, nothing dead-lettered.
//!
//! Opt-in (`#[ignore]`): it starts a PostgreSQL server of its own and takes about 30 s. CI runs
//! it with `cargo test --all-features -- --ignored` under `PREREQ_REQUIRE_DB=1` (and
//! `PREREQ_REQUIRE_BROKER=1`); without the server binaries or a broker it skips with a printed
//! reason, or fails under those flags:
//!
//! ```sh
//! cargo test --all-features --test drill_db_outage -- --ignored --nocapture
//! ```
#![cfg(all(feature = "amqp", feature = "sqlite", feature = "postgres"))]

#[path = "support/db.rs"]
mod db;
#[path = "support/drill.rs"]
mod drill;
mod support;

use std::time::{Duration, Instant};

use db::ExampleChild;
use drill::Out;
use prereq::Backoff;
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};

/// Clients registered before the outage, and clients registered during it (one payment each).
const CLIENTS: u64 = 20;
/// How long the database stays down once every new payment is held (a lookup waits up to the
/// source's connect timeout, 10 s, before it counts as failed: the outage lasts longer).
const DOWN_WHILE_HELD: Duration = Duration::from_secs(5);
/// The consumer's hold: longer than the outage, so that payments stay held through it.
const HOLD: Duration = Duration::from_secs(90);
/// Bound on waiting for something that must happen: a failure bound, not a speed claim.
const PATIENCE: Duration = Duration::from_secs(60);

fn payment(names: &PaymentNames, id: u64, client: u64) -> Out {
    Out {
        exchange: names.payments_exchange.clone(),
        routing_key: PROCESS_KEY.to_owned(),
        body: format!(
            r#"{{"id":{id},"clientId":{client},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#
        )
        .into_bytes(),
        properties: drill::persistent(format!("pay-{id}")),
    }
}

fn registration(names: &PaymentNames, client: u64) -> Out {
    Out {
        exchange: names.clients_exchange.clone(),
        routing_key: payment_demo::CLIENT_KEY.to_owned(),
        body: format!(r#"{{"id":{client},"name":"novo client"}}"#).into_bytes(),
        properties: drill::persistent(format!("client-{client}")),
    }
}

/// Wait until the consumer printed a line containing each of `texts`.
async fn printed(consumer: &mut ExampleChild, what: &str, texts: &[String]) {
    drill::wait_until(what, PATIENCE, async || {
        consumer.assert_running();
        let out = consumer.output();
        let missing = texts.iter().filter(|t| !out.contains(t.as_str())).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} of {} missing", texts.len()))
        }
    })
    .await;
}

fn processing(ids: impl IntoIterator<Item = u64>) -> Vec<String> {
    ids.into_iter()
        .map(|id| format!("-> processing payment {id} of client"))
        .collect()
}

#[ignore = "starts a private PostgreSQL cluster and stops it for about 15 s: about 30 s"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_payments_and_everything_is_handled_after_it() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let Some(pg) = db::PrivatePg::start() else {
        return;
    };
    let prefix = support::unique("dboutage");
    let names = PaymentNames::with_prefix(&prefix);
    let cleanup = support::Cleanup::new();
    let route = payment_demo::route(&names);
    cleanup.route(&route);
    cleanup.delay_queues(
        &route,
        &Backoff::linear(Duration::from_secs(1)).max_attempts(10),
    );
    let dir = drill::TempDir::new("dboutage");
    let env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("PREREQ_DB", pg.url()),
        ("PREREQ_HOLD_MS", HOLD.as_millis().to_string()),
        ("RUST_LOG", "warn,prereq=info,lapin=off".to_owned()),
    ];
    let mut consumer = ExampleChild::spawn("consumer", &dir.0, "consumer.out", &env);
    consumer.wait_for_line("Ctrl-C to stop", PATIENCE).await;
    let ch = support::confirm_channel(&conn).await;

    // Before the outage: clients 0..CLIENTS registered.
    let before = 0..CLIENTS;
    drill::publish_all(
        &ch,
        before.clone().map(|c| registration(&names, c)),
        64,
        |_| {},
    )
    .await;
    let registered: Vec<String> = before
        .clone()
        .map(|c| format!("client {c}: registered"))
        .collect();
    printed(&mut consumer, "the first clients registered", &registered).await;

    // The outage: payments of known clients, payments of new clients, and the new clients'
    // registrations.
    pg.stop_server();
    let down = Instant::now();
    let during = 100..100 + CLIENTS;
    drill::publish_all(
        &ch,
        before.clone().map(|c| payment(&names, c, c)),
        64,
        |_| {},
    )
    .await;
    drill::publish_all(
        &ch,
        during.clone().map(|c| payment(&names, c, c)),
        64,
        |_| {},
    )
    .await;
    drill::publish_all(
        &ch,
        during.clone().map(|c| registration(&names, c)),
        64,
        |_| {},
    )
    .await;
    printed(
        &mut consumer,
        "the known clients' payments handled during the outage (cache)",
        &processing(before.clone()),
    )
    .await;
    let held: Vec<String> = during
        .clone()
        .map(|c| format!("payment {c} client {c} attempt 0: held"))
        .collect();
    printed(&mut consumer, "the new clients' payments held", &held).await;
    // Down a while longer, the held keys' re-checks failing (a duration, not a
    // synchronisation: the state above is already reached).
    tokio::time::sleep(DOWN_WHILE_HELD).await;
    let out = consumer.output();
    for line in processing(during.clone()) {
        assert!(
            !out.contains(&line),
            "a payment ran while its client could not be recorded: {line}"
        );
    }

    pg.start_server();
    let up = Instant::now();
    printed(
        &mut consumer,
        "the held payments handled after the restart",
        &processing(during.clone()),
    )
    .await;
    let recovered = up.elapsed();
    // The held payments may all be handled through the hold's own re-checks before the
    // listener's reconnection backoff ends: wait for it too before stopping.
    printed(
        &mut consumer,
        "the listener reconnected",
        &["key source listener reconnected".to_owned()],
    )
    .await;

    consumer.signal("INT");
    let status = consumer.wait_exit(PATIENCE).await;
    // The example logs to stdout, between its decisions.
    let (out, log) = (consumer.output(), consumer.output());
    assert!(status.success(), "{status}\n{out}\n{}", consumer.stderr());
    assert!(!out.contains(": dead-lettered"), "{out}");
    assert!(
        !out.contains(": deferred"),
        "held through the outage:\n{out}"
    );
    assert!(out.contains("dead_lettered: 0"), "{out}");
    let count = |text: &str| log.matches(text).count();
    assert_eq!(
        count("key source unavailable: holding messages"),
        1,
        "one warning per outage:\n{log}"
    );
    assert_eq!(
        count("listener lost its connection"),
        1,
        "the listener's connection was lost once:\n{log}"
    );
    assert!(
        count("listener reconnected; held keys are looked up again") >= 1,
        "the listener reconnected:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("key source")) {
        println!("{line}");
    }
    println!(
        "database outage drill: down for {:?}; {CLIENTS} payments of known clients handled \
         during it; {CLIENTS} held through it, all handled {recovered:?} after the server \
         accepted connections again; 0 deferred, 0 dead-lettered",
        up.duration_since(down)
    );
}
