//! Crash drill on a real RabbitMQ: 10 000 payments race the registrations of their 1 000
//! clients into a consumer process running the `consumer` example's configuration (its route,
//! its SQLite client store, its policy and hold: `examples/drill_consumer.rs` only adds a
//! journal); the process is killed with SIGKILL in the middle of the run and a new one takes
//! over, on the same client store. Afterwards:
//!
//! * every payment was handled at least once (none lost, none dead-lettered, queues empty);
//! * no payment was handled before its client: the client store (SQLite) knew the client at
//!   every handle, every handle happened after the test started publishing that client's
//!   registration — also for the clients the killed process had registered — and the journal
//!   records the client's registration (not necessarily before the handle: the store knows a
//!   client from the moment its row is committed, and a payment looked up then runs at once,
//!   while the registration's journal line is written when the consumer acknowledges it);
//! * duplicates exist only because of the crash (at-least-once), at most one per delivery that
//!   was unacknowledged when the process died (bounded by the prefetch), and deduplicating by
//!   the payment id (recorded in the same write as the effect) leaves exactly one effect each.
//!
//! The test prints how many payments were handled twice.
#![cfg(feature = "amqp")]

#[path = "support/drill.rs"]
mod drill;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drill::{DrillChild, Line, Out, Rng};
use prereq::HoldBudget;
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};
use prereq::transport::Demand;

const CLIENTS: u64 = 1_000;
const PER_CLIENT: u64 = 10;
const PAYMENTS: u64 = CLIENTS * PER_CLIENT;
/// Kill the first consumer once it handled this many distinct payments.
const KILL_AT: usize = 3_500;
/// The `consumer` example's concurrency.
const CONCURRENCY: usize = 8;

/// The drills of this file run one at a time: each loads the machine on its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
enum Ev {
    Payment { id: u64, client: u64 },
    Client(u64),
}

/// The publish order: each client's payments spread around its position in the stream, and
/// its registration from 100 messages before its first payment to 1 400 after it (most
/// payments race ahead of their client; a few wait long enough to be deferred).
fn race() -> Vec<Ev> {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut positioned: Vec<(u64, u64, Ev)> = Vec::new();
    for client in 0..CLIENTS {
        let base = client * (PER_CLIENT + 1) * 1_000;
        for k in 0..PER_CLIENT {
            let at = base + rng.below(30_000);
            positioned.push((
                at,
                rng.next(),
                Ev::Payment {
                    id: client * PER_CLIENT + k,
                    client,
                },
            ));
        }
        // Offsets in thousandths of a message slot: -100 .. +1 400 messages.
        let lag = if rng.below(20) == 0 {
            400_000 + rng.below(1_000_000)
        } else {
            rng.below(400_000)
        };
        let at = (base + lag).saturating_sub(100_000);
        positioned.push((at, rng.next(), Ev::Client(client)));
    }
    positioned.sort_by_key(|(at, tie, _)| (*at, *tie));
    positioned.into_iter().map(|(_, _, ev)| ev).collect()
}

fn distinct_handled(log: &std::path::Path) -> usize {
    let mut seen = std::collections::HashSet::new();
    for l in drill::read_log(log) {
        if let Line::Handled { payment, .. } = l {
            seen.insert(payment);
        }
    }
    seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_never_handles_before_the_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(conn) = support::broker().await else {
        return;
    };
    let started = Instant::now();
    let cleanup = support::Cleanup::new();
    let prefix = support::unique("crash");
    let names = PaymentNames::with_prefix(&prefix);
    let route = payment_demo::route(&names);
    cleanup
        .route(&route)
        .delay_queues(&route, &support::EXAMPLE_POLICY);

    let dir = drill::TempDir::new("crash");
    let log = dir.path("drill.log");
    let env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("PREREQ_DB", dir.path("clients.db").display().to_string()),
        // Work after each payment's effect: the window in which a crash makes a duplicate.
        ("DRILL_WORK_MS", "5".to_owned()),
    ];
    let mut first = DrillChild::spawn(&log, &env);
    first.wait_ready(1, Duration::from_secs(60)).await;

    // The producer: the race, published at about 1 400 messages a second (a load shape, not a
    // synchronisation: nothing below depends on its timing). It records when it started
    // publishing each client's registration.
    let registration_sent: Arc<Mutex<HashMap<u64, u128>>> = Arc::default();
    let sent = registration_sent.clone();
    let (payments_x, clients_x) = (
        names.payments_exchange.clone(),
        names.clients_exchange.clone(),
    );
    let ch = support::confirm_channel(&conn).await;
    let producer = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(40));
        for batch in race().chunks(55) {
            pace.tick().await;
            let outs: Vec<Out> = batch
                .iter()
                .map(|ev| match *ev {
                    // The Go demo's bodies, exchanges and routing keys.
                    Ev::Payment { id, client } => Out {
                        exchange: payments_x.clone(),
                        routing_key: PROCESS_KEY.to_owned(),
                        body: format!(
                            r#"{{"id":{id},"clientId":{client},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#
                        )
                        .into_bytes(),
                        properties: drill::persistent(format!("pay-{id}")),
                    },
                    Ev::Client(c) => Out {
                        exchange: clients_x.clone(),
                        routing_key: payment_demo::CLIENT_KEY.to_owned(),
                        body: format!(r#"{{"id":{c},"name":"novo client"}}"#).into_bytes(),
                        properties: drill::persistent(format!("client-{c}")),
                    },
                })
                .collect();
            drill::publish_all(&ch, outs, 64, |m| {
                if let Some(c) = m
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|id| id.as_str().strip_prefix("client-"))
                {
                    let c: u64 = c.parse().unwrap();
                    sent.lock().unwrap().insert(c, drill::now_ns());
                }
            })
            .await;
        }
    });

    // Kill the first consumer in the middle of the run.
    let log_k = log.clone();
    drill::wait_until(
        "the first consumer to handle enough payments",
        Duration::from_secs(40),
        async || {
            let n = distinct_handled(&log_k);
            if n >= KILL_AT {
                Ok(())
            } else {
                Err(format!("{n} handled"))
            }
        },
    )
    .await;
    first.assert_running();
    let status = first.kill();
    let killed_at = Instant::now();
    let lines_at_kill = drill::read_log(&log).len();
    let handled_at_kill = distinct_handled(&log);
    assert!(
        handled_at_kill < PAYMENTS as usize,
        "the kill came after the end ({handled_at_kill} handled): not mid-run"
    );
    assert!(!status.success(), "SIGKILL'd process reported success");

    let mut second = DrillChild::spawn(&log, &env);
    second.wait_ready(2, Duration::from_secs(60)).await;
    let restart = killed_at.elapsed();
    producer.await.expect("the producer");

    // Wait until every payment is handled and nothing is left anywhere on the broker.
    let log_w = log.clone();
    let all_queues: Vec<String> = route
        .queue_names()
        .into_iter()
        .chain((1..=10).map(|secs| format!("{}.{}ms", names.delay_queue_prefix, secs * 1000)))
        .collect();
    drill::wait_until(
        "every payment handled and the queues drained",
        Duration::from_secs(50),
        async || {
            second.assert_running();
            let n = distinct_handled(&log_w);
            if n < PAYMENTS as usize {
                return Err(format!("{n} handled"));
            }
            // Ready and unacknowledged, from rabbitmqctl when it runs here (it sees a late
            // duplicate in a handler); else the ready counts.
            if let Some(counts) = drill::queue_counts(&prefix) {
                return if counts.values().all(|c| *c == (0, 0)) {
                    Ok(())
                } else {
                    Err(format!("{n} handled, (ready, unacked): {counts:?}"))
                };
            }
            let mut depths = Vec::new();
            for name in &all_queues {
                depths.push(drill::depth(&conn, name).await);
            }
            if depths.iter().all(|d| *d == 0) {
                Ok(())
            } else {
                Err(format!("{n} handled, ready in the queues: {depths:?}"))
            }
        },
    )
    .await;
    // A clean stop: the second consumer exits 0 with nothing to give back.
    second.signal("TERM");
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "second consumer: {status}\n{}",
        second.stderr()
    );

    // --- The record. ---
    let lines = drill::read_log(&log);
    let sent = registration_sent.lock().unwrap().clone();
    assert_eq!(
        sent.len(),
        CLIENTS as usize,
        "every registration was published"
    );
    let registered: std::collections::HashSet<u64> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Registered { client, .. } => Some(*client),
            _ => None,
        })
        .collect();
    let mut handles: BTreeMap<u64, u32> = BTreeMap::new();
    let mut effects: BTreeMap<u64, u32> = BTreeMap::new();
    let (mut held, mut deferred, mut after_kill) = ([0usize; 2], [0usize; 2], 0usize);
    for (i, line) in lines.iter().enumerate() {
        let run = usize::from(i >= lines_at_kill);
        match line {
            Line::Handled {
                payment,
                client,
                known,
                first,
                at_ns,
            } => {
                assert_eq!(*client, payment / PER_CLIENT, "payment {payment} decoded");
                assert!(
                    *known,
                    "payment {payment} ran while the client store did not know client {client}"
                );
                assert!(
                    registered.contains(client),
                    "payment {payment} (line {i}) handled, client {client} never registered"
                );
                let sent_at = sent[client];
                assert!(
                    *at_ns > sent_at,
                    "payment {payment} handled {} ns before the registration of client \
                     {client} was even published",
                    sent_at - at_ns
                );
                *handles.entry(*payment).or_default() += 1;
                if *first {
                    *effects.entry(*payment).or_default() += 1;
                }
                after_kill += run;
            }
            Line::Held(_) => held[run] += 1,
            Line::Deferred(_) => deferred[run] += 1,
            Line::DeadLettered(l) => panic!("dead-lettered: {l}"),
            Line::Ready
            | Line::Registered { .. }
            | Line::Ended { .. }
            | Line::Requeued(_)
            | Line::Exit(_) => {}
        }
    }
    assert_eq!(
        handles.len(),
        PAYMENTS as usize,
        "every payment handled at least once"
    );
    assert!(
        handles.keys().copied().eq(0..PAYMENTS),
        "exactly the published payment ids"
    );
    assert!(after_kill > 0, "the second consumer handled the rest");
    assert!(
        effects.len() == PAYMENTS as usize && effects.values().all(|n| *n == 1),
        "deduplicating by payment id leaves one effect per payment"
    );
    let twice = handles.values().filter(|n| **n > 1).count();
    let extra: u32 = handles.values().map(|n| n - 1).sum();
    // What one consumer can hold unacknowledged: its prefetch.
    let prefetch = Demand::new(HoldBudget::DEFAULT.max_messages, CONCURRENCY).in_flight();
    assert!(
        (extra as usize) <= prefetch,
        "{extra} duplicate handles, more than the {prefetch} deliveries a consumer can hold \
         unacknowledged: duplicates must come only from the crash"
    );
    let exit = lines
        .iter()
        .rev()
        .find_map(|l| match l {
            Line::Exit(c) => Some(c.clone()),
            _ => None,
        })
        .expect("the second consumer's EXIT line");
    if drill::queue_counts(&prefix).is_some() {
        assert_eq!(
            exit["requeued"], 0,
            "nothing was left to give back: {exit:?}"
        );
    }
    assert_eq!(exit["dead_lettered"], 0, "{exit:?}");

    println!(
        "crash drill: {PAYMENTS} payments over {CLIENTS} clients; SIGKILL after {handled_at_kill} \
         handled; restart took {restart:?}; handled twice: {twice} payments ({extra} extra \
         handles, bound {prefetch}); held {held:?} / deferred {deferred:?} (before/after the \
         kill); total {:?}",
        started.elapsed()
    );
}

/// Clients per round of the registration kill drill (one payment each).
const ROUND_CLIENTS: u64 = 200;
/// At least this many rounds end with a SIGKILL…
const MIN_KILLS: u64 = 3;
/// …and more, up to this many, until a kill fell between a registration's record and its ack.
const MAX_KILLS: u64 = 40;

/// Runs of the journal (counted by READY lines) in which each client was registered.
fn registration_runs(log: &std::path::Path) -> HashMap<u64, std::collections::BTreeSet<usize>> {
    let mut run = 0usize;
    let mut runs: HashMap<u64, std::collections::BTreeSet<usize>> = HashMap::new();
    for line in drill::read_log(log) {
        match line {
            Line::Ready => run += 1,
            Line::Registered { client, .. } => {
                runs.entry(client).or_default().insert(run);
            }
            _ => {}
        }
    }
    runs
}

/// SIGKILL between recording a registration in the client store (SQLite, the example's) and
/// acknowledging it: round after round, a consumer is started, payments of new clients are
/// published then their registrations, and the consumer is killed the moment a random number
/// of them is recorded; a last one runs to the end. A registration recorded but not
/// acknowledged comes again and is recorded again (inserting is idempotent): the journal shows
/// its client registered by two processes. The rounds go on (up to [`MAX_KILLS`]) until that
/// happened at least once. Afterwards: every payment handled while the store knew its client,
/// nothing dead-lettered (no `key-never-arrived` for a registered client), no consumer failed
/// (a duplicate key error would have stopped it), every client once in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_the_record_and_the_ack_loses_no_registration() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let prefix = support::unique("crashreg");
    let names = PaymentNames::with_prefix(&prefix);
    let route = payment_demo::route(&names);
    cleanup.route(&route);
    cleanup.delay_queues(
        &route,
        &prereq::Backoff::linear(Duration::from_secs(1)).max_attempts(10),
    );
    let dir = drill::TempDir::new("crashreg");
    let log = dir.path("drill.log");
    let store = dir.path("clients.db");
    let env = vec![
        ("PREREQ_PREFIX", prefix.clone()),
        ("PREREQ_DB", store.display().to_string()),
    ];
    let ch = support::confirm_channel(&conn).await;
    let mut rng = Rng(0x5EED_0000_DB00_0002);
    let started = Instant::now();

    let mut round = 0u64;
    let kills = loop {
        let mut child = DrillChild::spawn(&log, &env);
        let readies = round as usize + 1;
        let log_r = log.clone();
        drill::wait_until("a consumer to start", Duration::from_secs(60), async || {
            let n = drill::count(&log_r, |l| *l == Line::Ready);
            if n >= readies {
                Ok(())
            } else {
                Err(format!("{n} READY lines"))
            }
        })
        .await;
        // Have the kills so far fallen between a record and its ack? (The killed consumer's
        // unacknowledged registrations came before this round's, and are recorded by now.)
        let again = registration_runs(&log)
            .values()
            .filter(|r| r.len() > 1)
            .count();
        let last = round >= MAX_KILLS || (round >= MIN_KILLS && again > 0);
        let clients = round * ROUND_CLIENTS..(round + 1) * ROUND_CLIENTS;
        let payments = clients.clone().map(|c| Out {
            exchange: names.payments_exchange.clone(),
            routing_key: PROCESS_KEY.to_owned(),
            body: format!(
                r#"{{"id":{c},"clientId":{c},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#
            )
            .into_bytes(),
            properties: drill::persistent(format!("pay-{c}")),
        });
        drill::publish_all(&ch, payments, 64, |_| {}).await;
        let registrations = clients.clone().map(|c| Out {
            exchange: names.clients_exchange.clone(),
            routing_key: payment_demo::CLIENT_KEY.to_owned(),
            body: format!(r#"{{"id":{c},"name":"novo client"}}"#).into_bytes(),
            properties: drill::persistent(format!("client-{c}")),
        });
        if last {
            drill::publish_all(&ch, registrations, 64, |_| {}).await;
            let log_w = log.clone();
            let total = clients.end as usize;
            drill::wait_until(
                "every payment handled",
                Duration::from_secs(90),
                async || {
                    child.assert_running();
                    let n = distinct_handled(&log_w);
                    if n >= total {
                        Ok(())
                    } else {
                        Err(format!("{n} of {total} handled"))
                    }
                },
            )
            .await;
            // Every registration acknowledged too: none stuck retrying its record.
            let queue = names.clients_queue.clone();
            drill::wait_until(
                "the registrations acknowledged",
                Duration::from_secs(30),
                async || {
                    child.assert_running();
                    match drill::queue_counts(&queue) {
                        Some(c) if c.values().all(|c| *c == (0, 0)) => Ok(()),
                        Some(c) => Err(format!("(ready, unacked): {c:?}")),
                        None => match drill::depth(&conn, &queue).await {
                            0 => Ok(()),
                            n => Err(format!("{n} ready")),
                        },
                    }
                },
            )
            .await;
            child.signal("TERM");
            let status = child.wait_exit(Duration::from_secs(30)).await;
            assert!(status.success(), "{status}\n{}", child.stderr());
            break round;
        }
        // Kill the moment a random number of this round's registrations is recorded: the
        // journal's line comes right before the ack, and is polled without a pause.
        let kill_at = 10 + rng.below(ROUND_CLIENTS - 20) as usize;
        let publish = drill::publish_all(&ch, registrations, 64, |_| {});
        let (log_k, from) = (log.clone(), clients.start);
        let kill = async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = std::fs::read_to_string(&log_k).unwrap_or_default();
                let n = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("R "))
                    .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
                    .filter(|c| *c >= from)
                    .count();
                if n >= kill_at {
                    break;
                }
                child.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "{n} of {kill_at} registrations recorded"
                );
                tokio::task::yield_now().await;
            }
            child.kill()
        };
        let ((), status) = tokio::join!(publish, kill);
        assert!(!status.success(), "a SIGKILL'd process reported success");
        round += 1;
    };

    // --- The record. ---
    let runs_of = registration_runs(&log);
    let mut handled: HashMap<u64, u32> = HashMap::new();
    for line in drill::read_log(&log) {
        match line {
            Line::Handled {
                payment,
                client,
                known,
                ..
            } => {
                assert!(
                    known,
                    "payment {payment} ran while the store did not know client {client}"
                );
                *handled.entry(payment).or_default() += 1;
            }
            Line::DeadLettered(l) => panic!("dead-lettered: {l}"),
            _ => {}
        }
    }
    let exit = drill::read_log(&log)
        .into_iter()
        .rev()
        .find_map(|l| match l {
            Line::Exit(c) => Some(c),
            _ => None,
        })
        .expect("the last consumer's EXIT line");
    assert_eq!(exit["requeued"], 0, "nothing left to give back: {exit:?}");
    let total = (kills + 1) * ROUND_CLIENTS;
    assert_eq!(handled.len() as u64, total, "every payment handled");
    assert_eq!(runs_of.len() as u64, total, "every client registered");
    let again = runs_of.values().filter(|r| r.len() > 1).count();
    assert!(
        again > 0,
        "in {kills} kills, no registration was recorded by a killed consumer and again by the \
         next: no kill fell between the record and the ack"
    );
    let stored: i64 = {
        use sqlx::Connection as _;
        let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", store.display()))
            .await
            .expect("open the client store");
        sqlx::query_scalar("SELECT count(*) FROM clients")
            .fetch_one(&mut db)
            .await
            .expect("count the clients")
    };
    assert_eq!(stored as u64, total, "every client once in the store");
    println!(
        "registration kill drill: {kills} SIGKILLs mid-stream; {again} registrations recorded \
         by a killed consumer and recorded again (idempotently) by the next; {total} payments \
         handled, 0 dead-lettered; {:?}",
        started.elapsed()
    );
}
