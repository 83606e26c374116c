//! The restart walk-through of the README, with the example binaries a user runs, as child
//! processes on a real RabbitMQ: start `consumer`, register client 77 with `producer c 77`,
//! stop the consumer with Ctrl-C (SIGINT), start it again, send `producer p 77`: the payment
//! is processed at once — its first and only decision is `handled`, never `held` or `deferred`
//! — because the restarted consumer finds client 77 in its client store.
//!
//! Twice: with the default store (`prereq-demo.db`, an SQLite file in the working directory:
//! here a temporary directory) and with PostgreSQL (`PREREQ_DB=postgres://…`, a table of the
//! test's own through `PREREQ_DB_TABLE`, dropped at the end). Without a broker (or, for the
//! second, a database) the tests are skipped with a printed reason, or fail under
//! `PREREQ_REQUIRE_BROKER=1` / `PREREQ_REQUIRE_DB=1`.
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/db.rs"]
mod db;
#[path = "support/drill.rs"]
mod drill;
mod support;

use std::path::Path;
use std::time::Duration;

use db::ExampleChild;
use prereq::Backoff;
use prereq::amqp::payment_demo::{self, PaymentNames};

/// Bound on waiting for something that must happen (a start, a line): a failure bound, not a
/// speed claim.
const PATIENCE: Duration = Duration::from_secs(60);

/// The consumer prints this once it consumes.
const CONSUMING: &str = "Ctrl-C to stop";

/// Queues and exchanges of the demo under `prefix`, deleted when the returned guard drops.
fn cleanup(prefix: &str) -> support::Cleanup {
    let cleanup = support::Cleanup::new();
    let route = payment_demo::route(&PaymentNames::with_prefix(prefix));
    cleanup.route(&route);
    // The example's policy, for its delay queues (without the plugin).
    cleanup.delay_queues(
        &route,
        &Backoff::linear(Duration::from_secs(1)).max_attempts(10),
    );
    cleanup
}

/// Start the `consumer` example and wait until it consumes.
async fn start_consumer(dir: &Path, out: &str, env: &[(&str, String)]) -> ExampleChild {
    let mut consumer = ExampleChild::spawn("consumer", dir, out, env);
    consumer.wait_for_line(CONSUMING, PATIENCE).await;
    consumer
}

/// Ctrl-C, and a clean exit.
async fn stop(mut consumer: ExampleChild) -> String {
    consumer.signal("INT");
    let status = consumer.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "the consumer exited with {status}; stderr:\n{}",
        consumer.stderr()
    );
    consumer.output()
}

/// The walk-through, in `dir`, with the client store `env` selects.
async fn walk_through(dir: &Path, store: &[(&str, String)]) {
    let prefix = support::unique("dbrestart");
    let _cleanup = cleanup(&prefix);
    let mut env = vec![("PREREQ_PREFIX", prefix.clone())];
    env.extend(store.iter().cloned());

    let mut first = start_consumer(dir, "consumer-1.out", &env).await;
    let confirmed = db::run_example("producer", dir, &["c", "77"], &env).await;
    assert!(confirmed.contains("registered client 77"), "{confirmed}");
    first.wait_for_line("client 77: registered", PATIENCE).await;
    let before = stop(first).await;
    assert!(before.contains("stopped:"), "{before}");

    let mut second = start_consumer(dir, "consumer-2.out", &env).await;
    let published = db::run_example("producer", dir, &["p", "77"], &env).await;
    let id = db::published_id(&published);
    second
        .wait_for_line(
            &format!("-> processing payment {id} of client 77"),
            PATIENCE,
        )
        .await;
    let out = stop(second).await;
    let decisions: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("payment {id} ")))
        .collect();
    assert_eq!(
        decisions,
        [format!("payment {id} client 77 attempt 0: handled").as_str()],
        "the restarted consumer knew client 77: the payment ran at once, neither held nor \
         deferred\n{out}"
    );
    println!("--- first run\n{before}--- after the restart\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registered_before_a_restart_is_known_after_it_sqlite_by_default() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    let dir = drill::TempDir::new("dbrestart-sqlite");
    // No PREREQ_DB: the default file, `prereq-demo.db` in the working directory.
    walk_through(&dir.0, &[]).await;
    assert!(
        dir.path("prereq-demo.db").exists(),
        "the default client store is prereq-demo.db in the working directory"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registered_before_a_restart_is_known_after_it_postgres() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    let Some(mut pg) = db::pg().await else {
        return;
    };
    let dir = drill::TempDir::new("dbrestart-pg");
    let table = db::Table::named("restart");
    walk_through(
        &dir.0,
        &[
            ("PREREQ_DB", db::url()),
            ("PREREQ_DB_TABLE", table.name.clone()),
        ],
    )
    .await;
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", table.name))
        .fetch_one(&mut pg)
        .await
        .expect("count the clients");
    assert_eq!(rows, 1, "client 77 is the table's one row");
    assert!(
        !dir.path("prereq-demo.db").exists(),
        "a postgres:// PREREQ_DB uses no SQLite file"
    );
}

/// Clients registered before the restart of the bulk drill, and payments per client after it.
const BULK_CLIENTS: u64 = 1_000;
const BULK_PER_CLIENT: u64 = 10;

/// The bulk drills run one at a time: each loads the machine on its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The issue's restart proof in bulk, with `drill_consumer` (the example's configuration and a
/// journal): register 1 000 clients, stop the consumer (SIGTERM), start it again, publish
/// 10 000 payments for them: every one handled while the store knew its client, none held,
/// none deferred, none dead-lettered.
async fn bulk(dir: &Path, store: &[(&str, String)]) {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(conn) = support::broker().await else {
        return;
    };
    let prefix = support::unique("dbrestartbulk");
    let names = PaymentNames::with_prefix(&prefix);
    let _cleanup = cleanup(&prefix);
    let journal = dir.join("drill.log");
    let mut env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("DRILL_OUT", journal.display().to_string()),
    ];
    env.extend(store.iter().cloned());
    let ch = support::confirm_channel(&conn).await;
    let started = std::time::Instant::now();

    let run = async |n: usize,
                     publish: Vec<drill::Out>,
                     done: &dyn Fn(&[drill::Line]) -> Result<(), String>| {
        let mut child = ExampleChild::spawn("drill_consumer", dir, &format!("run-{n}.out"), &env);
        drill::wait_until("the consumer to start", PATIENCE, async || {
            child.assert_running();
            match drill::count(&journal, |l| *l == drill::Line::Ready) {
                r if r >= n => Ok(()),
                r => Err(format!("{r} READY lines")),
            }
        })
        .await;
        drill::publish_all(&ch, publish, 256, |_| {}).await;
        drill::wait_until("the run's messages handled", PATIENCE * 2, async || {
            child.assert_running();
            done(&drill::read_log(&journal))
        })
        .await;
        child.signal("TERM");
        let status = child.wait_exit(PATIENCE).await;
        assert!(status.success(), "{status}\n{}", child.stderr());
    };

    let registrations = (0..BULK_CLIENTS)
        .map(|c| drill::Out {
            exchange: names.clients_exchange.clone(),
            routing_key: payment_demo::CLIENT_KEY.to_owned(),
            body: format!(r#"{{"id":{c},"name":"novo client"}}"#).into_bytes(),
            properties: drill::persistent(format!("client-{c}")),
        })
        .collect();
    run(1, registrations, &|lines| {
        let n = lines
            .iter()
            .filter(|l| matches!(l, drill::Line::Registered { .. }))
            .count();
        if n as u64 >= BULK_CLIENTS {
            Ok(())
        } else {
            Err(format!("{n} registered"))
        }
    })
    .await;
    let before_restart = drill::read_log(&journal).len();

    let payments = (0..BULK_CLIENTS * BULK_PER_CLIENT)
        .map(|id| drill::Out {
            exchange: names.payments_exchange.clone(),
            routing_key: payment_demo::PROCESS_KEY.to_owned(),
            body: format!(
                r#"{{"id":{id},"clientId":{},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#,
                id / BULK_PER_CLIENT
            )
            .into_bytes(),
            properties: drill::persistent(format!("pay-{id}")),
        })
        .collect();
    run(2, payments, &|lines| {
        // Fail at the first sign of a forgotten client, rather than wait for the timeout.
        if let Some(l) = lines[before_restart..].iter().find(|l| {
            matches!(
                l,
                drill::Line::Held(_) | drill::Line::Deferred(_) | drill::Line::DeadLettered(_)
            )
        }) {
            panic!("after the restart: {l:?}");
        }
        let n = lines
            .iter()
            .filter(|l| matches!(l, drill::Line::Handled { .. }))
            .count();
        if n as u64 >= BULK_CLIENTS * BULK_PER_CLIENT {
            Ok(())
        } else {
            Err(format!("{n} handled"))
        }
    })
    .await;

    let after: Vec<drill::Line> = drill::read_log(&journal).split_off(before_restart);
    let mut handled = std::collections::HashSet::new();
    for line in &after {
        match line {
            drill::Line::Handled { payment, known, .. } => {
                assert!(
                    known,
                    "payment {payment} ran while the store did not know its client"
                );
                handled.insert(*payment);
            }
            drill::Line::Held(p) => panic!("payment {p} held after the restart"),
            drill::Line::Deferred(p) => panic!("payment {p} deferred after the restart"),
            drill::Line::DeadLettered(l) => panic!("dead-lettered after the restart: {l}"),
            _ => {}
        }
    }
    assert_eq!(handled.len() as u64, BULK_CLIENTS * BULK_PER_CLIENT);
    println!(
        "bulk restart drill: {BULK_CLIENTS} clients registered, consumer restarted, {} payments \
         handled: 0 held, 0 deferred, 0 dead-lettered; {:?}",
        handled.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_ten_thousand_payments_of_known_clients_run_at_once_sqlite() {
    let dir = drill::TempDir::new("dbrestartbulk-sqlite");
    let store = dir.path("clients.db").display().to_string();
    bulk(&dir.0, &[("PREREQ_DB", store)]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_ten_thousand_payments_of_known_clients_run_at_once_postgres() {
    let Some(_pg) = db::pg().await else {
        return;
    };
    let dir = drill::TempDir::new("dbrestartbulk-pg");
    let table = db::Table::named("restartbulk");
    bulk(
        &dir.0,
        &[
            ("PREREQ_DB", db::url()),
            ("PREREQ_DB_TABLE", table.name.clone()),
        ],
    )
    .await;
}
