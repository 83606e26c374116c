//! Two instances sharing PostgreSQL, as a user runs them: two `drill_consumer` processes (the
//! `consumer` example's configuration with `PREREQ_DB=postgres://…`, plus a journal) on the
//! same queues and the same client table, on a real RabbitMQ and a real PostgreSQL.
//!
//! 1. Payments for clients nobody registered yet are published and held by both instances;
//!    then the registrations: each is consumed by one instance, and the payments the *other*
//!    instance holds are released through `LISTEN`/`NOTIFY`.
//! 2. With the notify trigger installed (`PgKeys::install_notify_trigger`), more payments are
//!    held, and their clients are inserted by "another service": plain `INSERT`s into the
//!    table from a connection of the test's own, no prereq involved. Every held payment is
//!    released.
//!
//! Both phases: every payment handled, none deferred, none dead-lettered, and every one handled
//! before its hold could have run out (the hold is `PREREQ_HOLD_MS`, 30 s here: a wake that
//! did not come would show as a release after the hold, the lookup the consumer makes when a
//! hold expires). The wake latency (registration recorded by the other instance → handler, and
//! plain insert → handler) is printed; it is a measurement, not an assertion.
//!
//! Skipped (with the reason printed) without a broker or a database, or failing under
//! `PREREQ_REQUIRE_BROKER=1` / `PREREQ_REQUIRE_DB=1`.
#![cfg(all(feature = "amqp", feature = "sqlite", feature = "postgres"))]

#[path = "support/db.rs"]
mod db;
#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use db::ExampleChild;
use drill::{Line, Out};
use prereq::Backoff;
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};
use prereq::sql::PgKeys;

/// Payments (one per client) in each phase.
const PER_PHASE: u64 = 200;
/// The hold both instances run with (`PREREQ_HOLD_MS`).
const HOLD: Duration = Duration::from_secs(30);
/// Bound on waiting for something that must happen: a failure bound, not a speed claim.
const PATIENCE: Duration = Duration::from_secs(90);

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

/// Every journal line of both instances, with the instance (0 or 1) it came from.
fn lines(journals: &[PathBuf; 2]) -> Vec<(usize, Line)> {
    journals
        .iter()
        .enumerate()
        .flat_map(|(i, j)| drill::read_log(j).into_iter().map(move |l| (i, l)))
        .collect()
}

/// How many of `payments` were held (by either instance).
fn held(journals: &[PathBuf; 2], payments: &std::ops::Range<u64>) -> usize {
    lines(journals)
        .iter()
        .filter(|(_, l)| matches!(l, Line::Held(p) if payments.contains(p)))
        .count()
}

/// Wait until every one of `payments` was handled; their (instance, handled-at ns) each.
async fn handled(
    journals: &[PathBuf; 2],
    payments: &std::ops::Range<u64>,
) -> HashMap<u64, (usize, u128)> {
    let mut got = HashMap::new();
    drill::wait_until("every held payment handled", PATIENCE, async || {
        got = lines(journals)
            .into_iter()
            .filter_map(|(i, l)| match l {
                Line::Handled { payment, at_ns, .. } if payments.contains(&payment) => {
                    Some((payment, (i, at_ns)))
                }
                _ => None,
            })
            .collect();
        if got.len() == payments.clone().count() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} handled",
                got.len(),
                payments.clone().count()
            ))
        }
    })
    .await;
    got
}

/// p50, p99 and max of latencies in nanoseconds, in milliseconds.
fn summary(mut ns: Vec<u128>) -> String {
    ns.sort_unstable();
    let ms = |q: f64| {
        let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
        ns.get(i).map_or(f64::NAN, |v| *v as f64 / 1e6)
    };
    format!(
        "{} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ns.len(),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    )
}

/// Nothing deferred or dead-lettered by either instance.
fn assert_clean(journals: &[PathBuf; 2]) {
    for (i, l) in lines(journals) {
        assert!(
            !matches!(l, Line::Deferred(_) | Line::DeadLettered(_)),
            "instance {i}: {l:?}"
        );
    }
}

async fn start(dir: &Path, i: usize, env: &[(&str, String)]) -> (ExampleChild, PathBuf) {
    let journal = dir.join(format!("instance-{i}.log"));
    let mut env = env.to_vec();
    env.push(("DRILL_OUT", journal.display().to_string()));
    let mut child = ExampleChild::spawn("drill_consumer", dir, &format!("instance-{i}.out"), &env);
    drill::wait_until("an instance to start", PATIENCE, async || {
        child.assert_running();
        if drill::count(&journal, |l| *l == Line::Ready) > 0 {
            Ok(())
        } else {
            Err("no READY line".into())
        }
    })
    .await;
    (child, journal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_wake_each_other_and_a_plain_insert_wakes_both() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let Some(mut pg) = db::pg().await else {
        return;
    };
    let prefix = support::unique("dbshared");
    let names = PaymentNames::with_prefix(&prefix);
    let cleanup = support::Cleanup::new();
    let route = payment_demo::route(&names);
    cleanup.route(&route);
    cleanup.delay_queues(
        &route,
        &Backoff::linear(Duration::from_secs(1)).max_attempts(10),
    );
    let table = db::Table::named("shared");
    let dir = drill::TempDir::new("dbshared");
    let env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("PREREQ_DB", db::url()),
        ("PREREQ_DB_TABLE", table.name.clone()),
        ("PREREQ_HOLD_MS", HOLD.as_millis().to_string()),
    ];
    let (mut a, a_log) = start(&dir.0, 0, &env).await;
    let (mut b, b_log) = start(&dir.0, 1, &env).await;
    let journals = [a_log, b_log];
    let ch = support::confirm_channel(&conn).await;

    // --- 1. Registrations consumed by one instance release payments held by the other. ---
    let phase1 = 0..PER_PHASE;
    let t0 = drill::now_ns();
    drill::publish_all(
        &ch,
        phase1.clone().map(|c| payment(&names, c, c)),
        64,
        |_| {},
    )
    .await;
    drill::wait_until("phase 1 payments held", PATIENCE, async || {
        let n = held(&journals, &phase1);
        if n == PER_PHASE as usize {
            Ok(())
        } else {
            Err(format!("{n} held"))
        }
    })
    .await;
    // The broker deals both queues' deliveries out in turns, the same way: one registration
    // of a client without payments first, so that most clients' registrations reach the
    // instance that does *not* hold their payment.
    // One at a time, a few milliseconds apart (pacing, not synchronisation), so that the
    // latency measured is a wake's, not a burst's queueing behind the handlers.
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    for client in std::iter::once(1_000_000).chain(phase1.clone()) {
        pace.tick().await;
        drill::publish_all(&ch, [registration(&names, client)], 1, |_| {}).await;
    }
    let got = handled(&journals, &phase1).await;
    // An instance journals a registration after its key source recorded it, so the other
    // instance may have run the payment (woken by the record) before the line is written:
    // wait for every registration's line too.
    let mut recorded: HashMap<u64, (usize, u128)> = HashMap::new();
    drill::wait_until("every registration journaled", PATIENCE, async || {
        recorded = lines(&journals)
            .into_iter()
            .filter_map(|(i, l)| match l {
                Line::Registered { client, at_ns } if phase1.contains(&client) => {
                    Some((client, (i, at_ns)))
                }
                _ => None,
            })
            .collect();
        if recorded.len() == PER_PHASE as usize {
            Ok(())
        } else {
            Err(format!("{} of {PER_PHASE} journaled", recorded.len()))
        }
    })
    .await;
    let mut cross = Vec::new();
    for (payment, (instance, at)) in &got {
        assert!(
            *at < t0 + HOLD.as_nanos(),
            "payment {payment} handled after its hold could have run out"
        );
        let (by, recorded_at) = recorded[payment];
        if by != *instance {
            cross.push(at.saturating_sub(recorded_at));
        }
    }
    assert!(
        !cross.is_empty(),
        "no payment held by one instance had its registration consumed by the other: \
         the drill proved nothing"
    );
    assert_clean(&journals);
    let cross_summary = summary(cross);

    // --- 2. Plain INSERTs by another service, with the trigger installed. ---
    let installer: PgKeys<u64> = PgKeys::builder(db::url())
        .table(&table.name)
        .connect()
        .await
        .expect("connect the installer");
    installer
        .install_notify_trigger()
        .await
        .expect("install the notify trigger");
    drop(installer);
    let phase2 = 10_000..10_000 + PER_PHASE;
    let t0 = drill::now_ns();
    drill::publish_all(
        &ch,
        phase2.clone().map(|c| payment(&names, c, c)),
        64,
        |_| {},
    )
    .await;
    drill::wait_until("phase 2 payments held", PATIENCE, async || {
        let n = held(&journals, &phase2);
        if n == PER_PHASE as usize {
            Ok(())
        } else {
            Err(format!("{n} held"))
        }
    })
    .await;
    let mut inserted_at = BTreeMap::new();
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    let insert = format!("INSERT INTO \"{}\" (\"key\") VALUES ($1)", table.name);
    for client in phase2.clone() {
        pace.tick().await;
        inserted_at.insert(client, drill::now_ns());
        sqlx::query(&insert)
            .bind(client as i64)
            .execute(&mut pg)
            .await
            .expect("a plain INSERT");
    }
    let got = handled(&journals, &phase2).await;
    let mut per_instance = [0usize; 2];
    let mut latencies = Vec::new();
    for (payment, (instance, at)) in &got {
        assert!(
            *at < t0 + HOLD.as_nanos(),
            "payment {payment} handled after its hold could have run out"
        );
        per_instance[*instance] += 1;
        latencies.push(at.saturating_sub(inserted_at[payment]));
    }
    assert!(
        per_instance.iter().all(|n| *n > 0),
        "both instances held and released some: {per_instance:?}"
    );
    assert_clean(&journals);

    for child in [&mut a, &mut b] {
        child.signal("TERM");
        let status = child.wait_exit(PATIENCE).await;
        assert!(status.success(), "{status}: {}", child.stderr());
    }
    println!(
        "shared PostgreSQL drill: wake on the other instance (registration recorded → \
         handler): {cross_summary}; plain INSERT → handler: {} (released per instance \
         {per_instance:?}); hold {HOLD:?}, 0 deferred, 0 dead-lettered",
        summary(latencies)
    );
}
