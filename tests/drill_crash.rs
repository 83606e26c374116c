//! Crash drill on a real RabbitMQ: 10 000 payments race the registrations of their 1 000
//! clients into a consumer process (`examples/drill_consumer.rs`); the process is killed with
//! SIGKILL in the middle of the run and a new one takes over. Afterwards:
//!
//! * every payment was handled at least once (none lost, none dead-lettered, queues empty);
//! * no payment was handled before its client: the consumer's key store said "known" at every
//!   handle, the client's registration line precedes the payment's handle line in the log, and
//!   every handle happened after the test started publishing that client's registration;
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

use drill::{DrillChild, Line, Out};
use prereq::amqp::delay::{delay_bucket, delay_queue_name};
use prereq::amqp::{AmqpConfig, DEFAULT_MAX_DELAY, prefetch_for};

const CLIENTS: u64 = 1_000;
const PER_CLIENT: u64 = 10;
const PAYMENTS: u64 = CLIENTS * PER_CLIENT;
/// Kill the first consumer once it handled this many distinct payments.
const KILL_AT: usize = 3_500;
const HOLD_MAX: usize = 200;
const CONCURRENCY: usize = 16;
const DELAY_MS: u64 = 200;

/// A small deterministic generator (xorshift64*), so every run races the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

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
    let Some(conn) = support::broker().await else {
        return;
    };
    let started = Instant::now();
    let cleanup = support::Cleanup::new();
    let prefix = support::unique("crash");
    let queue = format!("{prefix}payments");
    let keys = format!("{prefix}clients");
    let config = AmqpConfig::new(queue.clone(), keys.clone());
    cleanup.config(&config);
    let delay_queue = delay_queue_name(
        config.delay_queue_prefix(),
        delay_bucket(Duration::from_millis(DELAY_MS), DEFAULT_MAX_DELAY),
    );
    cleanup.queue(delay_queue.clone());

    let dir = drill::TempDir::new("crash");
    let log = dir.path("drill.log");
    let env = vec![
        ("DRILL_QUEUE", queue.clone()),
        ("DRILL_KEYS", keys.clone()),
        ("DRILL_HOLD_MS", "500".to_owned()),
        ("DRILL_HOLD_MAX", HOLD_MAX.to_string()),
        ("DRILL_DELAY_MS", DELAY_MS.to_string()),
        ("DRILL_ATTEMPTS", "1000".to_owned()),
        ("DRILL_CONCURRENCY", CONCURRENCY.to_string()),
        // Work after each payment's effect: the window in which a crash makes a duplicate.
        ("DRILL_WORK_MS", "5".to_owned()),
    ];
    let ready = |n: usize| {
        let log = log.clone();
        async move || {
            let got = drill::count(&log, |l| *l == Line::Ready);
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} READY lines"))
            }
        }
    };

    let mut first = DrillChild::spawn(&log, &env);
    drill::wait_until(
        "the first consumer to start",
        Duration::from_secs(60),
        ready(1),
    )
    .await;

    // The producer: the race, published at about 1 400 messages a second (a load shape, not a
    // synchronisation: nothing below depends on its timing). It records when it started
    // publishing each client's registration.
    let registration_sent: Arc<Mutex<HashMap<u64, u128>>> = Arc::default();
    let sent = registration_sent.clone();
    let (q, k) = (queue.clone(), keys.clone());
    let ch = support::confirm_channel(&conn).await;
    let producer = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(40));
        for batch in race().chunks(55) {
            pace.tick().await;
            let outs: Vec<Out> = batch
                .iter()
                .map(|ev| match *ev {
                    Ev::Payment { id, client } => Out {
                        routing_key: q.clone(),
                        body: format!(r#"{{"id":{id},"clientId":{client}}}"#).into_bytes(),
                        properties: drill::persistent(format!("pay-{id}")),
                    },
                    Ev::Client(c) => Out {
                        routing_key: k.clone(),
                        body: format!(r#"{{"id":{c},"name":"client {c}"}}"#).into_bytes(),
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
    drill::wait_until(
        "the second consumer to start",
        Duration::from_secs(60),
        ready(2),
    )
    .await;
    let restart = killed_at.elapsed();
    producer.await.expect("the producer");

    // Wait until every payment is handled and nothing is left anywhere on the broker.
    let log_w = log.clone();
    let dead = config.dead_letter_queue().to_owned();
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
            for name in [&queue, &keys, &dead, &delay_queue] {
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
    let mut registered_at_line: HashMap<u64, usize> = HashMap::new();
    let mut handles: BTreeMap<u64, u32> = BTreeMap::new();
    let mut effects: BTreeMap<u64, u32> = BTreeMap::new();
    let (mut held, mut deferred, mut after_kill) = ([0usize; 2], [0usize; 2], 0usize);
    for (i, line) in lines.iter().enumerate() {
        let run = usize::from(i >= lines_at_kill);
        match line {
            Line::Registered { client, .. } => {
                assert!(
                    registered_at_line.insert(*client, i).is_none(),
                    "client {client} registered twice in the store (it persists)"
                );
            }
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
                    "payment {payment} ran while client {client} was unknown"
                );
                let reg = registered_at_line.get(client).copied();
                assert!(
                    reg.is_some_and(|r| r < i),
                    "payment {payment} (line {i}) handled before client {client}'s \
                     registration (line {reg:?})"
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
            Line::Ready | Line::Requeued(_) | Line::Exit(_) => {}
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
    let prefetch = usize::from(prefetch_for(HOLD_MAX, CONCURRENCY));
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
