//! Partitioned group drill on a real RabbitMQ and PostgreSQL: three consumer processes run the
//! `consumer` example's configuration as one group (`PREREQ_PARTITIONS=16`, clients in a
//! PostgreSQL database of the drill's own, the demo's `payment-processor` routed into the
//! partitions by the group's router). 20 000 payments of 2 000 clients race the clients'
//! registrations, published as the Go demo's producer publishes them; each payment carries its
//! client's sequence number. One process is killed with SIGKILL mid-run, then a fourth joins.
//! Afterwards, over the four processes' journals:
//!
//! * every payment was handled, none dead-lettered, every queue empty;
//! * none was handled before its client was in the shared client store;
//! * each client's payments first ran in sequence order (0, 1, … 9), across processes;
//! * two handlers of one client never overlapped in time (from the journals' enter/return
//!   stamps; a killed process's last handlers end at the kill at the latest);
//! * the group balanced: each live process active on ⌊16/N⌋ or ⌈16/N⌉ partitions, read from the
//!   broker's consumer list, after the start, after the kill and after the join (times printed;
//!   each within 30 s). Where `rabbitmqctl` cannot see the broker under test, that part is
//!   skipped with a printed reason.
//!
//! Opt-in (`#[ignore]`): about a minute; `.ci/run` runs it at the end, alone:
//!
//! ```text
//! cargo test --all-features --test drill_partitions -- --ignored --nocapture
//! ```
#![cfg(all(feature = "amqp", feature = "postgres"))]

#[path = "support/db.rs"]
mod db;
#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use drill::{DrillChild, Line, Out, Rng};
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};
use prereq::amqp::{Partitions, Route};
use sqlx::Connection as _;

const CLIENTS: u64 = 2_000;
const PER_CLIENT: u64 = 10;
const PAYMENTS: u64 = CLIENTS * PER_CLIENT;
const PARTITIONS: u32 = 16;
/// Kill one process once the group handled this many distinct payments.
const KILL_AT: usize = 6_000;
/// How long the group may take to balance after a change (issue's bound).
const BALANCE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Ev {
    /// Payment `seq` of `client` (its id is `client * PER_CLIENT + seq`).
    Payment {
        client: u64,
        seq: u64,
    },
    Client(u64),
}

/// The publish order: each client's payments spread over a window of the stream, numbered in
/// the order they are published; its registration up to 300 messages after its first payment
/// (most payments race ahead of their client and are held until it comes).
fn race() -> Vec<Ev> {
    let mut rng = Rng(0x9A27_7100_5EED_0002);
    let mut positioned: Vec<(u64, u64, Option<u64>)> = Vec::new();
    for client in 0..CLIENTS {
        let base = client * (PER_CLIENT + 1) * 1_000;
        let mut first = u64::MAX;
        for _ in 0..PER_CLIENT {
            let at = base + rng.below(40_000);
            first = first.min(at);
            positioned.push((at, rng.next(), Some(client)));
        }
        positioned.push((first + rng.below(300_000), rng.next(), None));
        // The registration's slot carries the client in the tie-breaker's place below.
        if let Some(last) = positioned.last_mut() {
            last.1 = client;
        }
    }
    positioned.sort_by_key(|(at, tie, _)| (*at, *tie));
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    positioned
        .into_iter()
        .map(|(_, tie, payment_of)| match payment_of {
            Some(client) => {
                let seq = next_seq.entry(client).or_default();
                *seq += 1;
                Ev::Payment {
                    client,
                    seq: *seq - 1,
                }
            }
            None => Ev::Client(tie),
        })
        .collect()
}

/// A PostgreSQL database of the drill's own, dropped when this is dropped (also on failure).
struct Database {
    name: String,
    url: String,
}

impl Database {
    async fn create(conn: &mut sqlx::PgConnection) -> Self {
        let name = db::unique("part");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut *conn)
            .await
            .expect("create the drill's database");
        let mut url = url::Url::parse(&db::url()).expect("the test database URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&db::url()).await {
                    let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    if let Err(e) = sqlx::query(&drop).execute(&mut conn).await {
                        eprintln!("cleanup: database {name}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

/// `rabbitmqctl`'s answer, or `None` when it cannot run or talks to another broker than the
/// one under test (only the local default node is asked).
fn ctl(args: &[&str]) -> Option<String> {
    drill::queue_counts("")?;
    let out = Command::new("rabbitmqctl")
        .args(args)
        .args(["-q", "--no-table-headers"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many of the partitions whose queues start with `queue_prefix` each connection (by its
/// client-given name) is the active consumer of; `None` where `rabbitmqctl` cannot tell.
fn active_by_connection(queue_prefix: &str) -> Option<BTreeMap<String, u32>> {
    let connections = ctl(&["list_connections", "pid", "client_properties"])?;
    let name_of: HashMap<&str, String> = connections
        .lines()
        .filter_map(|l| {
            let (pid, props) = l.split_once('\t')?;
            let start = props.find(r#"{"connection_name",""#)? + r#"{"connection_name",""#.len();
            let end = start + props[start..].find('"')?;
            Some((pid, props[start..end].to_owned()))
        })
        .collect();
    let channels = ctl(&["list_channels", "pid", "connection"])?;
    let connection_of: HashMap<&str, &str> = channels
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let consumers = ctl(&["list_consumers", "queue_name", "channel_pid", "active"])?;
    let mut active = BTreeMap::new();
    for line in consumers.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let [queue, channel, "true"] = cols[..] else {
            continue;
        };
        let Some(index) = queue.strip_prefix(queue_prefix) else {
            continue;
        };
        if index.parse::<u32>().is_err() {
            continue;
        }
        let name = connection_of
            .get(channel)
            .and_then(|c| name_of.get(c))
            .cloned()
            .unwrap_or_else(|| format!("unnamed {channel}"));
        *active.entry(name).or_default() += 1;
    }
    Some(active)
}

/// Wait until exactly the processes `live` are active, each on ⌊P/N⌋ or ⌈P/N⌉ partitions and
/// all P covered; returns how long it took (`None`: not observable here).
async fn balanced(queue_prefix: &str, live: &[u32], what: &str) -> Option<Duration> {
    let started = Instant::now();
    if active_by_connection(queue_prefix).is_none() {
        println!("{what}: balance not checked: rabbitmqctl does not see the broker under test");
        return None;
    }
    let names: HashSet<String> = live.iter().map(|p| format!("prereq-drill-{p}")).collect();
    let n = u32::try_from(live.len()).unwrap_or(1);
    let (low, high) = (PARTITIONS / n, PARTITIONS.div_ceil(n));
    drill::wait_until(what, BALANCE_WITHIN, async || {
        let active = active_by_connection(queue_prefix).unwrap_or_default();
        let total: u32 = active.values().sum();
        let ok = total == PARTITIONS
            && active.len() == live.len()
            && active
                .iter()
                .all(|(name, k)| names.contains(name) && (low..=high).contains(k));
        if ok {
            Ok(())
        } else {
            Err(format!("active partitions by instance: {active:?}"))
        }
    })
    .await;
    let took = started.elapsed();
    println!("{what}: balanced in {took:.1?}");
    Some(took)
}

/// The distinct payments handled in `logs`.
fn distinct_handled(logs: &[PathBuf]) -> usize {
    let mut seen = HashSet::new();
    for log in logs {
        for l in drill::read_log(log) {
            if let Line::Handled { payment, .. } = l {
                seen.insert(payment);
            }
        }
    }
    seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "three to four consumer processes, 22 000 messages, a SIGKILL: about two minutes"]
async fn a_partitioned_group_keeps_key_order_through_a_kill_and_a_join() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let Some(mut pg) = db::pg().await else {
        return;
    };
    let database = Database::create(&mut pg).await;
    let started = Instant::now();

    let prefix = support::unique("part");
    let names = PaymentNames::with_prefix(&prefix);
    let group = format!("{prefix}payment-partitions");
    let cleanup = support::Cleanup::new();
    let plain = payment_demo::route(&names);
    let partitioned = Route::partitioned(Partitions::new(&group, PARTITIONS));
    for route in [&plain, &partitioned] {
        cleanup
            .route(route)
            .delay_queues(route, &support::EXAMPLE_POLICY);
    }
    cleanup.exchange(format!("{group}.members"));

    let dir = drill::TempDir::new("partitions");
    let env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("PREREQ_PARTITIONS", PARTITIONS.to_string()),
        ("PREREQ_DB", database.url.clone()),
        // Work after each payment's effect: handlers last long enough to overlap if they could.
        ("DRILL_WORK_MS", "2".to_owned()),
    ];
    let mut logs: Vec<PathBuf> = Vec::new();
    let spawn = |logs: &mut Vec<PathBuf>| {
        let log = dir.path(&format!("instance-{}.log", logs.len()));
        let child = DrillChild::spawn(&log, &env);
        logs.push(log);
        child
    };
    const READY_WITHIN: Duration = Duration::from_secs(90);
    let mut children: Vec<Option<DrillChild>> = Vec::new();
    for _ in 0..3 {
        children.push(Some(spawn(&mut logs)));
    }
    for child in children.iter_mut().flatten() {
        child.wait_ready(1, READY_WITHIN).await;
    }
    let queue_prefix = format!("{group}.");
    let pids = |children: &[Option<DrillChild>]| -> Vec<u32> {
        children.iter().flatten().map(DrillChild::pid).collect()
    };
    balanced(&queue_prefix, &pids(&children), "three instances").await;

    // The producer: the Go demo's bodies, exchanges and routing keys (payments reach the
    // partitions through the group's router), at about 2 000 messages a second.
    let (payments_x, clients_x) = (
        names.payments_exchange.clone(),
        names.clients_exchange.clone(),
    );
    let ch = support::confirm_channel(&conn).await;
    let producer = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(40));
        for batch in race().chunks(80) {
            pace.tick().await;
            let outs: Vec<Out> = batch
                .iter()
                .map(|ev| match *ev {
                    Ev::Payment { client, seq } => {
                        let id = client * PER_CLIENT + seq;
                        Out {
                            exchange: payments_x.clone(),
                            routing_key: PROCESS_KEY.to_owned(),
                            body: format!(
                                r#"{{"id":{id},"clientId":{client},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#
                            )
                            .into_bytes(),
                            properties: drill::persistent(format!("pay-{id}")),
                        }
                    }
                    Ev::Client(c) => Out {
                        exchange: clients_x.clone(),
                        routing_key: payment_demo::CLIENT_KEY.to_owned(),
                        body: format!(r#"{{"id":{c},"name":"novo client"}}"#).into_bytes(),
                        properties: drill::persistent(format!("client-{c}")),
                    },
                })
                .collect();
            drill::publish_all(&ch, outs, 64, |_| {}).await;
        }
    });

    // Kill one instance mid-run.
    let logs_k = logs.clone();
    drill::wait_until(
        "the group to handle enough payments",
        Duration::from_secs(120),
        async || {
            let n = distinct_handled(&logs_k);
            if n >= KILL_AT {
                Ok(())
            } else {
                Err(format!("{n} handled"))
            }
        },
    )
    .await;
    let victim = children[0].take().expect("the first instance");
    let killed_log = logs[0].clone();
    // A run cut by the kill ends when the process stops running its code, which is before its
    // sockets close and so before the broker can deliver its messages elsewhere; the clock read
    // after `kill()` (which also reaps the process, milliseconds later) would count the next
    // owner's first runs as overlapping. The read just before the signal bounds it: nothing of
    // the victim's is seen by the broker as gone before it.
    let killed_ns = drill::now_ns();
    let _ = victim.kill();
    let handled_at_kill = distinct_handled(&logs);
    assert!(
        handled_at_kill < PAYMENTS as usize,
        "the kill came after the end ({handled_at_kill} handled): not mid-run"
    );
    let after_kill = balanced(&queue_prefix, &pids(&children), "after the kill").await;

    // A fourth instance joins.
    let mut fourth = spawn(&mut logs);
    fourth.wait_ready(1, READY_WITHIN).await;
    children.push(Some(fourth));
    let after_join = balanced(&queue_prefix, &pids(&children), "after the join").await;
    producer.await.expect("the producer");

    // Every payment handled, every queue empty.
    let logs_w = logs.clone();
    let mut alive: Vec<DrillChild> = children.into_iter().flatten().collect();
    drill::wait_until(
        "every payment handled and the queues drained",
        Duration::from_secs(180),
        async || {
            for c in &mut alive {
                c.assert_running();
            }
            let n = distinct_handled(&logs_w);
            if n < PAYMENTS as usize {
                return Err(format!("{n} handled"));
            }
            match drill::queue_counts(&prefix) {
                Some(counts) if counts.values().any(|c| *c != (0, 0)) => {
                    Err(format!("{n} handled, (ready, unacked): {counts:?}"))
                }
                _ => Ok(()),
            }
        },
    )
    .await;
    for c in &alive {
        c.signal("TERM");
    }
    for c in &mut alive {
        let status = c.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "{status}\n{}", c.stderr());
    }

    // --- The record, over every journal. ---
    // (client) → [(entered, returned)] of every handler run; (client) → first runs in time order.
    let mut runs: BTreeMap<u64, Vec<(u128, u128, u64)>> = BTreeMap::new();
    let mut first_runs: BTreeMap<u64, Vec<(u128, u64)>> = BTreeMap::new();
    let mut handled: HashMap<u64, u32> = HashMap::new();
    let (mut deferred, mut dead) = (0usize, Vec::new());
    for log in &logs {
        let lines = drill::read_log(log);
        let mut ended: HashSet<u64> = HashSet::new();
        for line in &lines {
            match line {
                Line::Ended {
                    payment,
                    client,
                    entered_ns,
                    returned_ns,
                } => {
                    ended.insert(*payment);
                    runs.entry(*client)
                        .or_default()
                        .push((*entered_ns, *returned_ns, *payment));
                }
                Line::Deferred(_) => deferred += 1,
                Line::DeadLettered(l) => dead.push(l.clone()),
                _ => {}
            }
        }
        for line in &lines {
            if let Line::Handled {
                payment,
                client,
                known,
                at_ns,
                ..
            } = line
            {
                assert_eq!(*client, payment / PER_CLIENT, "payment {payment} decoded");
                assert!(
                    *known,
                    "payment {payment} ran while the shared client store did not know client \
                     {client}"
                );
                *handled.entry(*payment).or_default() += 1;
                first_runs
                    .entry(*client)
                    .or_default()
                    .push((*at_ns, *payment));
                if *log == killed_log && !ended.contains(payment) {
                    // Cut by the kill: it ran from its effect until the kill at the latest.
                    runs.entry(*client)
                        .or_default()
                        .push((*at_ns, killed_ns, *payment));
                }
            }
        }
    }
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    assert_eq!(handled.len(), PAYMENTS as usize, "every payment handled");
    for (client, mut order) in first_runs {
        order.sort_unstable();
        let mut seen = HashSet::new();
        let seqs: Vec<u64> = order
            .into_iter()
            .filter(|(_, p)| seen.insert(*p))
            .map(|(_, p)| p % PER_CLIENT)
            .collect();
        assert_eq!(
            seqs,
            (0..PER_CLIENT).collect::<Vec<_>>(),
            "client {client}'s payments first ran out of sequence"
        );
    }
    for (client, mut spans) in runs {
        spans.sort_unstable();
        for pair in spans.windows(2) {
            let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
            assert!(
                start >= end,
                "client {client}: payment {b} started {} µs before payment {a} returned",
                (end - start) / 1_000
            );
        }
    }
    let duplicates: u32 = handled.values().map(|n| n - 1).sum();
    println!(
        "partitioned drill: {PAYMENTS} payments, {CLIENTS} clients, {PARTITIONS} partitions; \
         killed one of three at {handled_at_kill} handled, a fourth joined; balance after the \
         kill {after_kill:.1?}, after the join {after_join:.1?}; {duplicates} handled twice \
         (the kill's unacknowledged deliveries), {deferred} deferrals; {:.0?} in all",
        started.elapsed()
    );
    drop(pg);
}
