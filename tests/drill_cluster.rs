//! Partitioned consumption on a three-node RabbitMQ cluster that loses a node mid-run. The test
//! starts its own cluster on loopback (three private nodes, one Erlang cookie, the
//! consistent-hash exchange plugin, quorum queue leaders spread over the nodes) and runs the
//! `consumer` example's configuration in-process: the payment demo's consumer (linear 1 s
//! backoff, 10 attempts, 5 s hold, concurrency 8, clients registered from the demo's
//! `clients-processor` queue into an SQLite client store) on a partitioned route of 8 quorum
//! partition queues, connected to node 1. A publisher, also on node 1, publishes 3 000 keyed
//! payments of 600 clients (each with its client's sequence number) racing their clients'
//! registrations (every 20th client registers only at the end, once each of its payments was
//! deferred through the delay queues at least once); meanwhile a node other than node 1 that
//! leads partition queues is stopped (`rabbitmqctl stop`), the publishing goes on while it is
//! down, and the node is started again. Afterwards:
//!
//! * every partition queue had 3 members, and none is led by the node while it is down;
//! * every payment was handled (at least once: duplicates are counted and printed), none
//!   dead-lettered, every queue of the run empty at the end;
//! * none was handled before its client's registration was published, nor before the client
//!   store knew the client;
//! * each client's payments first ran in sequence order;
//! * no copy of a payment (a payment at one attempt) ran more than twice: duplicates are
//!   allowed (at least once), an unbounded multiplication of deferred copies is not.
//!
//! The node stop and start, the run and the whole drill are timed and printed. Opt-in
//! (`#[ignore]`): 70 to 150 s on two shared cores: 17 to 45 s to start the cluster, 10 to 25 s
//! to stop it, 25 to 35 s for the run itself (most of it waiting for the stopped node, which
//! takes 4 s to stop and 7 to 14 s to come back).
//! CI runs it alone, after the other tests:
//!
//! ```text
//! cargo test --all-features --test drill_cluster -- --ignored --nocapture
//! ```
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../examples/payments/mod.rs"]
mod payments;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prereq::amqp::payment_demo::{self, CLIENT_KEY, PaymentNames};
use prereq::amqp::{Broker, BrokerOptions, Partitions, Publisher};
use prereq::{Decision, KeySource};

use cluster::Cluster;
use payments::{Clients, Payment, PaymentId};

const CLIENTS: u64 = 600;
const PER_CLIENT: u64 = 5;
const PAYMENTS: u64 = CLIENTS * PER_CLIENT;
const PARTITIONS: u32 = 8;
/// Every `LATE`-th client registers only after all of its payments were deferred through the
/// broker at least once (their 5 s hold ran out), at the end of the stream: their payments go
/// round the delay queues, and come back in order.
const LATE: u64 = 20;
/// How long the run may take once everything is published.
const DRAIN_WITHIN: Duration = Duration::from_secs(180);

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
    /// Payment `seq` of `client` (its id is `client * PER_CLIENT + seq`).
    Payment {
        client: u64,
        seq: u64,
    },
    Client(u64),
}

/// The publish order: each client's payments spread over a window of the stream, numbered in
/// the order they are published; its registration up to a few hundred messages after its first
/// payment (most payments race ahead of their client and are held until it comes); every
/// [`LATE`]-th client's registration at the very end.
fn race() -> Vec<Ev> {
    let mut rng = Rng(0xC1A5_7E12_5EED_0003);
    // (position, tie-breaker, client, is a payment)
    let mut positioned: Vec<(u64, u64, u64, bool)> = Vec::new();
    for client in 0..CLIENTS {
        let base = client * 6_000;
        let mut first = u64::MAX;
        for _ in 0..PER_CLIENT {
            let at = base + rng.below(60_000);
            first = first.min(at);
            positioned.push((at, rng.next(), client, true));
        }
        let at = if client % LATE == 0 {
            u64::MAX
        } else {
            first + rng.below(200_000)
        };
        positioned.push((at, rng.next(), client, false));
    }
    positioned.sort_by_key(|(at, tie, _, _)| (*at, *tie));
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    positioned
        .into_iter()
        .map(|(_, _, client, payment)| {
            if payment {
                let seq = next_seq.entry(client).or_default();
                *seq += 1;
                Ev::Payment {
                    client,
                    seq: *seq - 1,
                }
            } else {
                Ev::Client(client)
            }
        })
        .collect()
}

/// The decisions about one client's payments, in order.
type Trail = Vec<prereq::Event<u64>>;

/// How long after its deferral a copy may take to come back before the engine stops keeping
/// its key's later messages behind it (its delay plus this): past it, order is not promised.
const AWAY_GRACE: Duration = Duration::from_secs(30);

/// A payment of `trail` whose deferred copy was not back (no later decision about it) within
/// its delay plus `AWAY_GRACE`, by `end`: the documented exception to per-key order (a copy
/// RabbitMQ kept in a broken delay queue).
fn copy_not_back_in_time(trail: &Trail, end: Instant) -> Option<String> {
    trail.iter().enumerate().find_map(|(i, e)| {
        let Decision::Deferred { delay, .. } = e.decision else {
            return None;
        };
        let back = trail[i + 1..]
            .iter()
            .find(|later| later.message_id == e.message_id)
            .map_or(end, |later| later.at.into_std());
        let late = back.saturating_duration_since(e.at.into_std());
        (late > delay + AWAY_GRACE).then(|| format!("{e}: next decision {late:?} later"))
    })
}

/// One handler run.
#[derive(Clone, Copy, Debug)]
struct Run {
    id: u64,
    client: u64,
    attempt: u32,
    /// The client's registration had been published when the handler ran.
    registration_published: bool,
    /// The client store knew the client when the handler ran.
    known: bool,
}

/// Where the publisher stands: it tells the drill when to stop and start the node, and waits
/// for it at the next gate.
enum Gate {
    /// Stop the node now (publishing goes on).
    StopNow,
    /// Start the node again now (publishing goes on).
    StartNow,
}

/// A message for the publisher.
enum Out<'a> {
    /// A payment, keyed by its client.
    Payment { key: &'a str, body: &'a str },
    /// A client registration.
    Registration { body: &'a str },
}

/// Publish with confirms, as a producer that must not lose a payment does: on an error (a
/// nack, a closed channel while a leader moves), open a new channel and publish again (a
/// duplicate is possible: the consumer is at-least-once anyway). How many retries it took.
async fn publish(
    broker: &Broker,
    publisher: &mut Publisher,
    partitions: &Partitions,
    names: &PaymentNames,
    out: Out<'_>,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retries = 0;
    loop {
        let sent = match out {
            Out::Payment { key, body } => {
                publisher
                    .publish_keyed(
                        partitions,
                        key,
                        body.as_bytes(),
                        &payment_demo::payment_message(),
                    )
                    .await
            }
            Out::Registration { body } => {
                publisher
                    .publish(
                        &names.clients_exchange,
                        CLIENT_KEY,
                        body.as_bytes(),
                        &payment_demo::client_message(),
                    )
                    .await
            }
        };
        match sent {
            Ok(()) => return retries,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "a publish still failed after 60 s: {e}"
                );
                retries += 1;
                eprintln!("publish failed, publishing again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(p) = broker.publisher().await {
                    *publisher = p;
                }
            }
        }
    }
}

/// Wait until every payment of the late clients was deferred at least once.
async fn late_payments_deferred(deferred: &Mutex<HashSet<String>>) {
    let late: Vec<String> = (0..CLIENTS)
        .filter(|c| c % LATE == 0)
        .flat_map(|c| (0..PER_CLIENT).map(move |s| (c * PER_CLIENT + s).to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let deferred = deferred.lock().unwrap();
            late.iter().filter(|id| !deferred.contains(*id)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of the late clients' payments never deferred in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Partition queues with their leader, as node `i` lists them.
fn leaders(cluster: &Cluster, i: usize, partitions: &Partitions) -> BTreeMap<String, String> {
    cluster
        .queues(i, &format!("{}.", partitions.exchange().name()))
        .into_iter()
        .filter(|q| {
            (0..partitions.count()).any(|p| q.name == partitions.queue_name(p))
                && q.kind == "quorum"
        })
        .map(|q| (q.name, q.leader))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private three-node RabbitMQ cluster (70 to 150 s): run with --ignored"]
async fn a_partitioned_group_loses_nothing_when_a_cluster_node_stops_mid_run() {
    let drill_started = Instant::now();
    let Some(cluster) = Cluster::start("cluster") else {
        return;
    };
    let cluster = Arc::new(cluster);
    let cluster_up = drill_started.elapsed();

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let prefix = format!("prereq-test.cluster.{}.{nanos}.", std::process::id());
    let names = PaymentNames::with_prefix(&prefix);
    // As `payments::partitions()` names them for `PREREQ_PARTITIONS=8`.
    let partitions = Partitions::new(format!("{prefix}payment-partitions"), PARTITIONS);
    let store = tempfile::tempdir().expect("a directory for the client store");
    let clients = Clients::Sqlite(
        prereq::sql::SqliteKeys::builder(store.path().join("clients.db"))
            .table("clients")
            .open()
            .await
            .expect("open the client store"),
    );

    // The consumer, on node 1.
    let broker = Broker::connect(
        BrokerOptions::new(cluster.addr(0)).connection_name(format!("{prefix}consumer")),
    )
    .await
    .expect("connect the consumer to node 1");
    let transport = broker
        .transport(payments::partitioned_route(&names, &partitions))
        .await
        .expect("declare the partitioned route on the cluster");
    println!("delay mechanism: {:?}", broker.mechanism());

    // Each partition queue is a quorum queue on all three nodes.
    let partition_queues: Vec<_> = cluster
        .queues(0, &prefix)
        .into_iter()
        .filter(|q| (0..PARTITIONS).any(|p| q.name == partitions.queue_name(p)))
        .collect();
    assert_eq!(partition_queues.len(), PARTITIONS as usize);
    for q in &partition_queues {
        assert_eq!(q.kind, "quorum", "{q:?}");
        let mut members = q.members.clone();
        members.sort();
        let mut all = cluster.names();
        all.sort();
        assert_eq!(members, all, "{} is not on all three nodes: {q:?}", q.name);
    }
    let before = leaders(&cluster, 0, &partitions);
    println!("partition leaders before: {before:#?}");
    // The node to stop: not node 1 (the clients' node); node 3 if it leads a partition, else
    // node 2.
    let led_by = |i: usize| {
        before
            .values()
            .filter(|l| **l == cluster.nodes[i].name)
            .count()
    };
    let victim = if led_by(2) > 0 { 2 } else { 1 };
    let victim_name = cluster.nodes[victim].name.clone();
    assert!(
        led_by(victim) > 0,
        "no partition is led by node2 or node3 (leaders: {before:?}): stopping either would \
         move no leadership"
    );
    println!(
        "will stop node{} ({victim_name}), leader of {} of {PARTITIONS} partitions",
        victim + 1,
        led_by(victim)
    );

    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let registrations_published: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let handled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let handler = {
        let runs = runs.clone();
        let registered = registrations_published.clone();
        let handled = handled.clone();
        let clients = clients.clone();
        move |p: Payment, ctx: prereq::Context<u64>| {
            let runs = runs.clone();
            let registered = registered.clone();
            let handled = handled.clone();
            let clients = clients.clone();
            async move {
                let known = clients.contains(&p.client_id).await.unwrap_or(false);
                let registration_published = registered.lock().unwrap().contains(&p.client_id);
                let PaymentId::Number(id) = p.id else {
                    panic!("the drill publishes numeric ids, got {}", p.id);
                };
                runs.lock().unwrap().push(Run {
                    id,
                    client: p.client_id,
                    attempt: ctx.attempt,
                    registration_published,
                    known,
                });
                handled.lock().unwrap().insert(id);
                Ok(())
            }
        }
    };
    let dead: Arc<Mutex<Vec<String>>> = Arc::default();
    let deferred: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Every decision about each client's payments, in order and dated, to show what happened
    // to a client whose payments run out of order.
    let trails: Arc<Mutex<HashMap<u64, Trail>>> = Arc::default();
    let consumer = {
        let dead = dead.clone();
        let deferred = deferred.clone();
        let trails = trails.clone();
        payments::consumer(clients.clone(), handler)
            .on_event(move |e| {
                if let Some(client) = e.key {
                    trails
                        .lock()
                        .unwrap()
                        .entry(client)
                        .or_default()
                        .push(e.clone());
                }
                match &e.decision {
                    Decision::DeadLettered(_) => dead.lock().unwrap().push(e.to_string()),
                    Decision::Deferred { .. } => {
                        if let Some(id) = &e.message_id {
                            deferred.lock().unwrap().insert(id.clone());
                        }
                    }
                    _ => {}
                }
            })
            .build()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stop_rx.await;
    }));

    // The publisher, on node 1 too, with gates at 1/5 (stop the node), 2/5 (wait until it is
    // down), 3/5 (start it again), 4/5 (wait until it is back).
    let events = race();
    let total = events.len();
    let (gate_tx, mut gate_rx) = tokio::sync::mpsc::unbounded_channel::<Gate>();
    let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel::<()>();
    let pub_broker = Broker::connect(
        BrokerOptions::new(cluster.addr(0)).connection_name(format!("{prefix}publisher")),
    )
    .await
    .expect("connect the publisher to node 1");
    let run_started = Instant::now();
    let publishing = {
        let registered = registrations_published.clone();
        let deferred = deferred.clone();
        let partitions = partitions.clone();
        let names = names.clone();
        tokio::spawn(async move {
            let mut publisher = pub_broker.publisher().await.expect("a publisher");
            let mut down_rx = Some(down_rx);
            let mut up_rx = Some(up_rx);
            let mut retries = 0;
            for (n, ev) in events.into_iter().enumerate() {
                if n == total / 5 {
                    let _ = gate_tx.send(Gate::StopNow);
                } else if n == 2 * total / 5 {
                    if let Some(rx) = down_rx.take() {
                        let _ = rx.await;
                    }
                } else if n == 3 * total / 5 {
                    let _ = gate_tx.send(Gate::StartNow);
                } else if n == 4 * total / 5
                    && let Some(rx) = up_rx.take()
                {
                    let _ = rx.await;
                }
                retries += match ev {
                    Ev::Payment { client, seq } => {
                        let body = format!(
                            r#"{{"id":{},"clientId":{client},"value":200,"operationDate":"2026-12-04T06:00:00Z"}}"#,
                            client * PER_CLIENT + seq
                        );
                        let key = client.to_string();
                        let out = Out::Payment {
                            key: &key,
                            body: &body,
                        };
                        publish(&pub_broker, &mut publisher, &partitions, &names, out).await
                    }
                    Ev::Client(client) => {
                        if client % LATE == 0 {
                            late_payments_deferred(&deferred).await;
                        }
                        registered.lock().unwrap().insert(client);
                        let body = format!(r#"{{"id":{client},"name":"client {client}"}}"#);
                        let out = Out::Registration { body: &body };
                        publish(&pub_broker, &mut publisher, &partitions, &names, out).await
                    }
                };
            }
            let _ = pub_broker.close().await;
            retries
        })
    };

    // The node stop and start, at the publisher's gates.
    assert!(matches!(gate_rx.recv().await, Some(Gate::StopNow)));
    let stop_at = run_started.elapsed();
    let stopped_in = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop_node(victim))
            .await
            .expect("stop the node")
    };
    println!(
        "node{} stopping from {stop_at:?} (run time), stopped in {stopped_in:?}, {} payments \
         handled so far",
        victim + 1,
        handled.lock().unwrap().len()
    );
    // Its partitions get new leaders among the two nodes left.
    let moved = {
        let cluster = cluster.clone();
        let partitions = partitions.clone();
        let victim_name = victim_name.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let now = leaders(&cluster, 0, &partitions);
                if now.len() == PARTITIONS as usize
                    && now.values().all(|l| !l.is_empty() && *l != victim_name)
                {
                    return now;
                }
                assert!(
                    Instant::now() < deadline,
                    "partitions still without a leader on the nodes left 60 s after the stop: \
                     {now:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .expect("leaders")
    };
    println!("partition leaders with node{} down: {moved:#?}", victim + 1);
    let _ = down_tx.send(());

    assert!(matches!(gate_rx.recv().await, Some(Gate::StartNow)));
    let start_at = run_started.elapsed();
    let started_in = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start_node(victim))
            .await
            .expect("start the node")
    };
    println!(
        "node{} starting from {start_at:?} (run time), back in the cluster in {started_in:?}, \
         {} payments handled so far",
        victim + 1,
        handled.lock().unwrap().len()
    );
    let _ = up_tx.send(());

    let publish_retries = publishing.await.expect("the publisher");
    let published_in = run_started.elapsed();
    println!("{total} messages published in {published_in:?} ({publish_retries} publish retries)");

    // Every payment handled.
    let deadline = Instant::now() + DRAIN_WITHIN;
    loop {
        let done = handled.lock().unwrap().len() as u64;
        if done == PAYMENTS {
            break;
        }
        assert!(
            !run.is_finished(),
            "the consumer stopped mid-run: {:?}",
            run.await
        );
        if Instant::now() >= deadline {
            let queues: Vec<_> = cluster
                .queues(0, &prefix)
                .into_iter()
                .filter(|q| q.ready != 0 || q.unacked != 0)
                .collect();
            panic!(
                "{done} of {PAYMENTS} payments handled {DRAIN_WITHIN:?} after the last publish; \
                 dead-lettered: {:?}; queues holding messages: {queues:#?}",
                dead.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run_length = run_started.elapsed();

    // Every queue of the run empty (settlements may trail the last handler a little), but for
    // a delay queue RabbitMQ itself broke: its leader was elected on node3 as it came back,
    // before the node's dead-letter supervisor ran, and its expired copies stay in it (its own
    // race, seen in about one run in four on a fast machine, where the first 2 s deferrals
    // come as node3 returns). Every payment was handled in those runs (checked below): the
    // copies left are extra ones, and say so.
    let (empty, stuck) = {
        let cluster = cluster.clone();
        let prefix = prefix.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(60);
            loop {
                let queues = cluster.queues(0, &prefix);
                let mut busy: Vec<_> = queues
                    .iter()
                    .filter(|q| q.ready != 0 || q.unacked != 0)
                    .cloned()
                    .collect();
                let mut stuck = Vec::new();
                if started.elapsed() >= Duration::from_secs(10) {
                    let (s, b): (Vec<_>, Vec<_>) = busy.into_iter().partition(|q| {
                        q.name.contains(".delay.")
                            && q.unacked == 0
                            && cluster.dead_letter_worker_failed(&q.name)
                    });
                    (stuck, busy) = (s, b);
                }
                if busy.is_empty() {
                    return (queues, stuck);
                }
                assert!(
                    Instant::now() < deadline,
                    "queues not empty 60 s after the last payment was handled: {busy:#?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .expect("queue counts")
    };
    for q in &stuck {
        eprintln!(
            "delay queue {} keeps {} expired copies: RabbitMQ did not start its dead-letter \
             worker (see the cluster's logs)",
            q.name, q.ready
        );
    }
    let _ = stop_tx.send(());
    let report = run
        .await
        .expect("the consumer task")
        .expect("the consumer stopped cleanly");
    broker
        .close()
        .await
        .expect("close the consumer's connection");

    let runs = runs.lock().unwrap().clone();
    let distinct: HashSet<u64> = runs.iter().map(|r| r.id).collect();
    let duplicates = runs.len() - distinct.len();
    println!(
        "run: {run_length:?} for {PAYMENTS} payments of {CLIENTS} clients ({} handler runs, \
         {duplicates} duplicates); report: handled {} held {} released {} deferred {} \
         dead-lettered {} requeued {} settle failures {}; {} queues of the run, {} of them \
         delay queues RabbitMQ broke",
        runs.len(),
        report.handled,
        report.held,
        report.released,
        report.deferred,
        report.dead_lettered,
        report.requeued,
        report.settle_failures,
        empty.len(),
        stuck.len()
    );
    // Duplicates: which payments ran more than once, at which attempts.
    let mut by_id: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for r in &runs {
        by_id.entry(r.id).or_default().push(r.attempt);
    }
    let mut repeated: Vec<_> = by_id.iter().filter(|(_, a)| a.len() > 1).collect();
    repeated.sort_by_key(|(_, a)| std::cmp::Reverse(a.len()));
    println!(
        "{} payments ran more than once; the most: {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(8)]
    );
    let mut by_attempt: BTreeMap<u32, usize> = BTreeMap::new();
    for r in &runs {
        *by_attempt.entry(r.attempt).or_default() += 1;
    }
    println!("handler runs by attempt: {by_attempt:?}");
    assert_eq!(distinct.len() as u64, PAYMENTS, "every payment handled");
    // At least once, not without bound: neither connection drops in this drill, so a copy (a
    // payment at one attempt) may run a second time only where the broker re-sent a
    // dead-lettered copy whose confirm was lost with the stopped node.
    let mut copies: HashMap<(u64, u32), usize> = HashMap::new();
    for r in &runs {
        *copies.entry((r.id, r.attempt)).or_default() += 1;
    }
    let multiplied: Vec<_> = copies.iter().filter(|(_, n)| **n > 2).collect();
    assert!(
        multiplied.is_empty(),
        "{} copies (payment, attempt) ran more than twice, e.g. {:?}",
        multiplied.len(),
        &multiplied[..multiplied.len().min(5)]
    );
    assert!(
        dead.lock().unwrap().is_empty(),
        "dead-lettered: {:?}",
        dead.lock().unwrap()
    );
    assert_eq!(report.dead_lettered, 0);
    let early: Vec<_> = runs
        .iter()
        .filter(|r| !r.registration_published || !r.known)
        .collect();
    assert!(
        early.is_empty(),
        "{} payments handled before their client was known, e.g. {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
    // Each client's payments first ran in sequence order.
    let mut first_runs: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut seen = HashSet::new();
    for r in &runs {
        if seen.insert(r.id) {
            first_runs
                .entry(r.client)
                .or_default()
                .push(r.id - r.client * PER_CLIENT);
        }
    }
    let out_of_order: Vec<_> = first_runs
        .iter()
        .filter(|(_, seqs)| seqs.windows(2).any(|w| w[0] > w[1]))
        .collect();
    let trails = trails.lock().unwrap();
    let no_trail = Trail::new();
    let trail_of = |client: &u64| trails.get(client).unwrap_or(&no_trail);
    let ended = Instant::now();
    // Each with the decisions about its payments, on the run's clock (as the node's stop and
    // start are printed), and what excuses it if anything does.
    let mut unexcused = Vec::new();
    for (n, (client, seqs)) in out_of_order.iter().enumerate() {
        let trail = trail_of(client);
        let excuse = copy_not_back_in_time(trail, ended);
        if n < 3 {
            eprintln!("client {client}'s payments first ran as {seqs:?}; its decisions:");
            for e in trail {
                let at = e.at.into_std().saturating_duration_since(run_started);
                eprintln!("  {at:?} {e}");
            }
        }
        match excuse {
            Some(why) => eprintln!(
                "client {client}: order not promised (a copy not back within its delay plus \
                 {AWAY_GRACE:?}: {why})"
            ),
            None => unexcused.push((**client, (*seqs).clone())),
        }
    }
    assert!(
        unexcused.is_empty(),
        "{} clients' payments first ran out of order, e.g. {:?} ({} settle failures in the run, \
         {} delay queues RabbitMQ broke; the first clients' decisions are printed above)",
        unexcused.len(),
        &unexcused[..unexcused.len().min(5)],
        report.settle_failures,
        stuck.len()
    );
    let retried = runs.iter().filter(|r| r.attempt > 0).count();

    // The stopped node is a member of every partition again.
    let after = cluster.queues(0, &prefix);
    for q in after
        .iter()
        .filter(|q| (0..PARTITIONS).any(|p| q.name == partitions.queue_name(p)))
    {
        assert!(
            q.members.contains(&victim_name),
            "node{} is no longer a member of {}: {q:?}",
            victim + 1,
            q.name
        );
    }
    println!(
        "partition leaders after: {:#?}",
        leaders(&cluster, 0, &partitions)
    );
    println!(
        "timings: cluster up in {cluster_up:?}; node{} stopped in {stopped_in:?}, started again \
         in {started_in:?}; run {run_length:?} ({retried} handler runs after a deferral, {} \
         payments deferred); whole drill {:?} before the cluster's teardown",
        victim + 1,
        deferred.lock().unwrap().len(),
        drill_started.elapsed()
    );
    drop(cluster);
    println!("whole drill with teardown: {:?}", drill_started.elapsed());
}
