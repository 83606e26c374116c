//! prereq's benchmark: release latency, throughput and broker cost, side by side with bare lapin
//! and with the seed-style strategy (no hold, every miss re-published with a linear 1 s
//! backoff), on the same broker in the same run.
//!
//! `cargo bench` runs the quick mode (under a minute once built); `PREREQ_BENCH=full cargo bench`
//! runs larger N. The broker is `AMQP_ADDR`, else `amqp://guest:guest@127.0.0.1:5672/%2f`; when
//! it is unreachable only the in-memory engine scenario runs.
//!
//! Scenarios (see `docs/performance.md`):
//! - *raw*: bare lapin, N persistent messages published with confirms, then consumed with an
//!   awaited manual ack per message: the ceiling on this machine;
//! - *steady*: N payments whose clients are all known, through `DependentConsumer` on
//!   `AmqpTransport`;
//! - *race*: N payments over K clients whose registrations arrive at random times in 0..T after
//!   the payments (fixed seed), run with prereq's defaults (hold) and with the seed-style
//!   strategy on the same data; *bounded*: the same race with a hold budget of N/4;
//! - *engine*: the engine's cost per message on the in-memory transport.
//!
//! Every queue and exchange has a unique name (`prereq-bench.<pid>.<nanos>.…`) and is deleted
//! at the end, also on error, panic or Ctrl-C.
//!
//! Output: a table, then, last, one JSON line with every figure. The release-latency CDF is
//! written to `docs/release-latency.svg`.

use std::collections::HashMap;
use std::error::Error;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use prereq::amqp::delay::{delay_bucket, delay_queue_name};
use prereq::amqp::{
    AmqpAddr, AmqpConfig, AmqpError, AmqpTransport, DEFAULT_MAX_DELAY, DEFAULT_PREFETCH,
    DelayMechanism, DelayMode, declare_topology,
};
use prereq::memory::MemoryBroker;
use prereq::transport::{Delivery, DeliveryId, Settle, Transport};
use prereq::{Decision, DependentConsumer, HandlerError, HoldBudget, Report};
use serde::Deserialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Body size of every payment, as in the reference numbers (80-byte persistent messages).
const BODY_BYTES: usize = 80;
/// Confirms awaited per batch when publishing.
const PUBLISH_WINDOW: usize = 1000;
/// Guard against a stuck scenario (an error, never a measurement).
const STUCK: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Sizes

#[derive(Clone, Copy, Debug)]
struct Sizes {
    mode: &'static str,
    /// Messages in raw and steady.
    n: usize,
    /// Clients in raw and steady.
    k: u64,
    /// Payments in the race.
    race_n: usize,
    /// Clients in the race.
    race_k: u64,
    /// Registrations arrive within 0..race_t after the payments.
    race_t: Duration,
    /// Messages per engine run (steady path).
    engine_n: usize,
    /// Messages per engine run (hold-then-release path).
    engine_hold_n: usize,
    /// Engine runs per path (the median is reported).
    engine_runs: usize,
}

impl Sizes {
    fn from_env() -> Self {
        match std::env::var("PREREQ_BENCH").as_deref() {
            Ok("full") => Self {
                mode: "full",
                n: 100_000,
                k: 10_000,
                race_n: 10_000,
                race_k: 1_000,
                race_t: Duration::from_secs(5),
                engine_n: 500_000,
                engine_hold_n: 100_000,
                engine_runs: 5,
            },
            // For profiling (e.g. under callgrind): the engine scenario only, one run each.
            Ok("engine") => Self {
                mode: "engine",
                engine_n: 20_000,
                engine_hold_n: 10_000,
                engine_runs: 1,
                ..Self::quick()
            },
            _ => Self::quick(),
        }
    }

    fn quick() -> Self {
        Self {
            mode: "quick",
            n: 20_000,
            k: 2_000,
            race_n: 5_000,
            race_k: 500,
            race_t: Duration::from_secs(2),
            engine_n: 50_000,
            engine_hold_n: 10_000,
            engine_runs: 3,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

#[derive(Deserialize)]
struct Payment {
    id: u64,
    client: u64,
}

#[derive(Deserialize)]
struct Client {
    id: u64,
}

/// A payment body of exactly [`BODY_BYTES`] bytes (padded with a memo the consumer ignores).
fn payment_body(id: u64, client: u64) -> Vec<u8> {
    let mut s = format!(r#"{{"id":{id},"client":{client},"memo":""#);
    let pad = BODY_BYTES.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

fn client_body(id: u64) -> Vec<u8> {
    format!(r#"{{"id":{id}}}"#).into_bytes()
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// A small deterministic generator (splitmix64): the race data is the same in every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The race: which client each payment needs, and when (after the payments) each client's
/// registration is published.
struct RaceData {
    client_of: Vec<u64>,
    reg_at: Vec<Duration>,
}

impl RaceData {
    fn new(n: usize, k: u64, t: Duration, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let client_of = (0..n).map(|_| rng.below(k)).collect();
        let t_us = t.as_micros().max(1) as u64;
        let reg_at = (0..k)
            .map(|_| Duration::from_micros(rng.below(t_us)))
            .collect();
        Self { client_of, reg_at }
    }
}

// ---------------------------------------------------------------------------------------------
// Broker helpers: unique names, cleanup, publishing

/// Everything declared on the shared broker, deleted by [`Cleanup::run`] or, failing that, on
/// drop (also when a scenario panics).
struct Cleanup {
    addr: AmqpAddr,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Cleanup {
    fn new(addr: AmqpAddr) -> Self {
        Self {
            addr,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    fn queue(&self, name: impl Into<String>) {
        lock(&self.queues).push(name.into());
    }

    fn exchange(&self, name: impl Into<String>) {
        lock(&self.exchanges).push(name.into());
    }

    /// Everything a transport configuration declares, its delay queues (1 to 10 s, the
    /// linear policy's) included.
    fn config(&self, c: &AmqpConfig) {
        for q in c.queues() {
            self.queue(q.clone());
        }
        self.queue(c.registration_queue());
        self.queue(c.dead_letter_queue());
        self.exchange(c.retry_exchange());
        for e in &c.topology().exchanges {
            self.exchange(e.clone());
        }
        for (q, _) in &c.topology().queues {
            self.queue(q.clone());
        }
        for s in 1..=10 {
            let bucket = delay_bucket(Duration::from_secs(s), DEFAULT_MAX_DELAY);
            self.queue(delay_queue_name(c.delay_queue_prefix(), bucket));
        }
    }

    fn take(&self) -> (Vec<String>, Vec<String>) {
        let mut q = std::mem::take(&mut *lock(&self.queues));
        let mut x = std::mem::take(&mut *lock(&self.exchanges));
        q.sort();
        q.dedup();
        x.sort();
        x.dedup();
        (q, x)
    }

    /// Delete everything registered so far; returns how many queues were deleted.
    async fn run(&self) -> usize {
        let (queues, exchanges) = self.take();
        delete_all(&self.addr, &queues, &exchanges).await
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchanges) = self.take();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let addr = self.addr.clone();
        // Its own thread and runtime: works from any context, also while unwinding.
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(delete_all(&addr, &queues, &exchanges));
            }
        });
        let _ = worker.join();
    }
}

async fn delete_all(addr: &AmqpAddr, queues: &[String], exchanges: &[String]) -> usize {
    if queues.is_empty() && exchanges.is_empty() {
        return 0;
    }
    let Ok(conn) = Connection::connect(addr.expose(), ConnectionProperties::default()).await else {
        eprintln!("cleanup: broker unreachable, left queues {queues:?}, exchanges {exchanges:?}");
        return 0;
    };
    let mut deleted = 0;
    for q in queues {
        // A fresh channel each time: a failed delete closes its channel.
        if let Ok(ch) = conn.create_channel().await {
            match ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                Ok(_) => deleted += 1,
                Err(e) => eprintln!("cleanup: queue {q}: {e}"),
            }
            let _ = ch.close(200, "cleanup".into()).await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                eprintln!("cleanup: exchange {x}: {e}");
            }
            let _ = ch.close(200, "cleanup".into()).await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
    deleted
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `prereq-bench.<pid>.<nanos>.<scenario>.`
fn unique(run: &str, scenario: &str) -> String {
    format!("prereq-bench.{run}.{scenario}.")
}

async fn confirm_channel(conn: &Connection) -> Res<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publish every client's registration to `queue` at `t0 + data.reg_at[client]`, in time order,
/// and wait for the confirms; returns when each was sent, by client.
async fn register_on_schedule(
    ch: &Channel,
    queue: &str,
    data: &RaceData,
    t0: Instant,
) -> Res<Vec<Instant>> {
    let mut order: Vec<u64> = (0..data.reg_at.len() as u64).collect();
    order.sort_by_key(|c| data.reg_at[*c as usize]);
    let mut sent_at = vec![t0; data.reg_at.len()];
    let mut confirms = Vec::with_capacity(order.len());
    for c in order {
        tokio::time::sleep_until(t0 + data.reg_at[c as usize]).await;
        sent_at[c as usize] = Instant::now();
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &client_body(c),
                persistent(),
            )
            .await?,
        );
    }
    check_confirms(join_all(confirms).await)?;
    Ok(sent_at)
}

fn check_confirms(confirms: Vec<lapin::Result<Confirmation>>) -> Res<()> {
    for c in confirms {
        match c? {
            Confirmation::Ack(None) => {}
            other => return Err(format!("publish not confirmed: {other:?}").into()),
        }
    }
    Ok(())
}

/// Publish persistent messages to a queue (default exchange), awaiting confirms in windows of
/// [`PUBLISH_WINDOW`]. Calls `sent(i)` just before publishing message `i`.
async fn publish_all(
    ch: &Channel,
    queue: &str,
    bodies: &[Vec<u8>],
    mut sent: impl FnMut(usize),
) -> Res<()> {
    let mut window: Vec<PublisherConfirm> = Vec::with_capacity(PUBLISH_WINDOW);
    for (i, body) in bodies.iter().enumerate() {
        sent(i);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await?;
        window.push(confirm);
        if window.len() == PUBLISH_WINDOW {
            check_confirms(join_all(window.drain(..)).await)?;
        }
    }
    check_confirms(join_all(window).await)
}

/// An [`AmqpTransport`] shared with the bench, so that it can be closed after the consumer ran.
struct Shared(Arc<AmqpTransport>);

impl Transport for Shared {
    type Error = AmqpError;

    fn recv(&self) -> impl Future<Output = Result<Option<Delivery>, AmqpError>> + Send {
        self.0.recv()
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
    ) -> impl Future<Output = Result<(), AmqpError>> + Send {
        self.0.settle(id, settle)
    }
}

/// A transport configuration with unique names, registered for cleanup.
fn bench_config(addr: &AmqpAddr, prefix: &str, cleanup: &Cleanup) -> AmqpConfig {
    let config = AmqpConfig::new(format!("{prefix}payments"), format!("{prefix}clients"))
        .with_addr(addr.clone())
        .with_delay_mode(DelayMode::DelayQueues)
        .with_connection_name(format!("{prefix}consumer"));
    cleanup.config(&config);
    config
}

async fn timeout<T>(what: &str, d: Duration, f: impl Future<Output = T>) -> Res<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("{what}: no progress within {d:?}").into())
}

// ---------------------------------------------------------------------------------------------
// Memory

/// `VmHWM` (peak resident set) of this process, in MiB.
fn peak_rss_mb() -> f64 {
    proc_status_kb("VmHWM:") / 1024.0
}

/// `VmRSS` of this process, in MiB.
fn rss_mb() -> f64 {
    proc_status_kb("VmRSS:") / 1024.0
}

fn proc_status_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Reset `VmHWM` to the current RSS (Linux `clear_refs` 5), so each scenario's peak is its own.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// raw

struct Raw {
    publish_per_s: f64,
    consume_per_s: f64,
    consume_pipelined_per_s: f64,
}

/// A durable classic queue of its own for a bare-lapin scenario (deleted by `cleanup`), and a
/// confirm channel to publish to it.
async fn scratch_queue(
    conn: &Connection,
    run: &str,
    tag: &str,
    cleanup: &Cleanup,
) -> Res<(String, Channel)> {
    let queue = format!("{}queue", unique(run, tag));
    cleanup.queue(queue.clone());
    let ch = confirm_channel(conn).await?;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok((queue, ch))
}

async fn raw(conn: &Connection, run: &str, cleanup: &Cleanup, s: &Sizes) -> Res<Raw> {
    let (queue, ch) = scratch_queue(conn, run, "raw", cleanup).await?;
    let bodies: Vec<Vec<u8>> = (0..s.n as u64).map(|i| payment_body(i, i % s.k)).collect();
    let t = Instant::now();
    publish_all(&ch, &queue, &bodies, |_| {}).await?;
    let publish = t.elapsed();
    let consume = raw_consume(conn, &queue, s.n, false).await?;
    // The same messages again, for the pipelined variant.
    publish_all(&ch, &queue, &bodies, |_| {}).await?;
    let pipelined = raw_consume(conn, &queue, s.n, true).await?;
    let _ = ch.close(200, "done".into()).await;
    Ok(Raw {
        publish_per_s: s.n as f64 / publish.as_secs_f64(),
        consume_per_s: s.n as f64 / consume.as_secs_f64(),
        consume_pipelined_per_s: s.n as f64 / pipelined.as_secs_f64(),
    })
}

/// Consume `n` messages with a manual ack each, from the first delivery to the last ack: each
/// ack awaited before the next delivery, or (`pipelined`) acks sent without waiting for one
/// another, awaited in windows of [`PUBLISH_WINDOW`].
async fn raw_consume(conn: &Connection, queue: &str, n: usize, pipelined: bool) -> Res<Duration> {
    // The same prefetch as prereq's consumer gets by default.
    let cch = conn.create_channel().await?;
    cch.basic_qos(DEFAULT_PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = cch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut first = None;
    let consumed = timeout("raw consume", STUCK, async {
        let mut acks = futures::stream::FuturesUnordered::new();
        for _ in 0..n {
            let d = consumer.next().await.ok_or("raw consumer closed")??;
            first.get_or_insert_with(Instant::now);
            if pipelined {
                let acker = d.acker;
                acks.push(async move { acker.ack(BasicAckOptions::default()).await });
                if acks.len() >= PUBLISH_WINDOW {
                    while let Some(r) = acks.next().await {
                        r?;
                    }
                }
            } else {
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        Res::Ok(())
    })
    .await?;
    consumed?;
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = cch.close(200, "done".into()).await;
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// steady

struct Steady {
    per_s: f64,
    report: Report,
}

async fn steady(
    conn: &Connection,
    addr: &AmqpAddr,
    run: &str,
    cleanup: &Cleanup,
    s: &Sizes,
) -> Res<Steady> {
    let prefix = unique(run, "steady");
    let config = bench_config(addr, &prefix, cleanup);
    // Declare and fill the queue before the consumer starts, as for raw.
    let ch = confirm_channel(conn).await?;
    declare_topology(&ch, &config, DelayMechanism::DelayQueues).await?;
    let bodies: Vec<Vec<u8>> = (0..s.n as u64).map(|i| payment_body(i, i % s.k)).collect();
    publish_all(&ch, &config.queues()[0], &bodies, |_| {}).await?;
    let _ = ch.close(200, "done".into()).await;

    let n = s.n as u64;
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handled = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = oneshot::channel::<Instant>();
    let done_tx = Mutex::new(Some(done_tx));
    let first_h = Arc::clone(&first);
    let handled_o = Arc::clone(&handled);
    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client)
        .registrations(|c: &Client| c.id)
        .handler(move |_p: Payment| {
            lock(&first_h).get_or_insert_with(Instant::now);
            async { Ok::<_, HandlerError>(()) }
        })
        .on_event(move |e| {
            if e.decision == Decision::Handled
                && handled_o.fetch_add(1, Ordering::Relaxed) + 1 == n
                && let Some(tx) = lock(&done_tx).take()
            {
                let _ = tx.send(Instant::now());
            }
        })
        .build()?;
    let keys = consumer.keys();
    for c in 0..s.k {
        keys.insert(c);
    }
    // The clock starts before the transport connects: it starts consuming (and buffering up to
    // the prefetch) inside `connect`, so timing from the first handler run would flatter prereq.
    // This charges prereq its connection set-up (a pre-flight connection, the topology), which
    // raw does not pay: a conservative comparison.
    let start = Instant::now();
    let transport = Arc::new(AmqpTransport::connect(config).await?);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(Shared(Arc::clone(&transport)), async {
        let _ = stop_rx.await;
    }));
    let finished = timeout("steady", STUCK, done_rx).await;
    let _ = stop_tx.send(());
    let report = running.await??;
    let _ = transport.close().await;
    let end = finished??;
    lock(&first).ok_or("steady: no handler ran")?;
    Ok(Steady {
        per_s: n as f64 / (end - start).as_secs_f64(),
        report,
    })
}

// ---------------------------------------------------------------------------------------------
// race

struct Race {
    /// Release latency per payment, in ms: handler run minus the later of the payment's and its
    /// registration's publish.
    latencies_ms: Vec<f64>,
    /// The same, for the first payment of each client only (no wait behind the key's others).
    first_of_key_ms: Vec<f64>,
    /// Registration published → `Registered` in the engine (broker and transport), per client.
    key_path_ms: Vec<f64>,
    /// `Released` → handler run (lane and handler slot), per released payment.
    lane_ms: Vec<f64>,
    /// Handler runs before the registration was even published (must be 0).
    early: u64,
    drain: Duration,
    deferred: u64,
    report: Report,
    peak_rss_mb: f64,
    rss_before_mb: f64,
}

#[derive(Default)]
struct RaceCounters {
    /// Payments taken in once (held, or deferred on their first delivery).
    taken_in: AtomicU64,
    deferred: AtomicU64,
    handled: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
async fn race(
    conn: &Connection,
    addr: &AmqpAddr,
    run: &str,
    scenario: &str,
    cleanup: &Cleanup,
    data: &RaceData,
    budget: HoldBudget,
) -> Res<Race> {
    let n = data.client_of.len();
    let prefix = unique(run, scenario);
    let config = bench_config(addr, &prefix, cleanup);
    let payments_q = config.queues()[0].clone();
    let clients_q = config.registration_queue().to_owned();

    let handled_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let released_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let known_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..data.reg_at.len()).map(|_| Mutex::new(None)).collect());
    let (released_o, known_o) = (Arc::clone(&released_at), Arc::clone(&known_at));
    let counters = Arc::new(RaceCounters::default());
    let all_in = Arc::new(Notify::new());
    let all_done = Arc::new(Notify::new());

    let handled_h = Arc::clone(&handled_at);
    let (c, in_o, done_o) = (
        Arc::clone(&counters),
        Arc::clone(&all_in),
        Arc::clone(&all_done),
    );
    let n64 = n as u64;
    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client)
        .registrations(|c: &Client| c.id)
        .budget(budget)
        .id(|p: &Payment| p.id.to_string())
        .handler(move |p: Payment| {
            let now = Instant::now();
            if let Some(slot) = handled_h.get(p.id as usize) {
                lock(slot).get_or_insert(now);
            }
            async { Ok::<_, HandlerError>(()) }
        })
        .on_event(move |e| {
            let first_time = e.attempt == 0;
            match e.decision {
                Decision::Held
                    if first_time && c.taken_in.fetch_add(1, Ordering::Relaxed) + 1 == n64 =>
                {
                    in_o.notify_one();
                }
                Decision::Deferred { .. } => {
                    c.deferred.fetch_add(1, Ordering::Relaxed);
                    if first_time && c.taken_in.fetch_add(1, Ordering::Relaxed) + 1 == n64 {
                        in_o.notify_one();
                    }
                }
                Decision::Handled if c.handled.fetch_add(1, Ordering::Relaxed) + 1 == n64 => {
                    done_o.notify_one();
                }
                Decision::Released { .. } => {
                    let id = e
                        .message_id
                        .as_deref()
                        .and_then(|m| m.parse::<usize>().ok());
                    if let Some(slot) = id.and_then(|i| released_o.get(i)) {
                        *lock(slot) = Some(e.at);
                    }
                }
                Decision::Registered => {
                    if let Some(slot) = e.key.and_then(|k| known_o.get(k as usize)) {
                        lock(slot).get_or_insert(e.at);
                    }
                }
                _ => {}
            }
        })
        .build()?;

    let rss_before_mb = rss_mb();
    reset_peak_rss();
    let transport = Arc::new(AmqpTransport::connect(config).await?);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(Shared(Arc::clone(&transport)), async {
        let _ = stop_rx.await;
    }));

    let outcome = async {
        // The payments, all before any registration.
        let ch = confirm_channel(conn).await?;
        let bodies: Vec<Vec<u8>> = data
            .client_of
            .iter()
            .enumerate()
            .map(|(i, c)| payment_body(i as u64, *c))
            .collect();
        let mut paid_at = vec![Instant::now(); n];
        publish_all(&ch, &payments_q, &bodies, |i| paid_at[i] = Instant::now()).await?;
        // Every payment has reached the consumer (held, or deferred once): the registrations
        // start now, at random times within 0..T.
        timeout(
            &format!("{scenario}: taking in payments"),
            STUCK,
            all_in.notified(),
        )
        .await?;
        let t0 = Instant::now();
        let registered_at = register_on_schedule(&ch, &clients_q, data, t0).await?;
        timeout(&format!("{scenario}: draining"), STUCK, all_done.notified()).await?;
        let _ = ch.close(200, "done".into()).await;
        Res::Ok((t0, paid_at, registered_at))
    }
    .await;
    let _ = stop_tx.send(());
    let report = running.await??;
    let _ = transport.close().await;
    let peak_rss_mb = peak_rss_mb();
    let (t0, paid_at, registered_at) = outcome?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut latencies_ms = Vec::with_capacity(n);
    let mut first_of_key_ms = Vec::new();
    let mut lane_ms = Vec::new();
    let mut seen = vec![false; data.reg_at.len()];
    let mut early = 0;
    let mut last = t0;
    for (i, slot) in handled_at.iter().enumerate() {
        let ran = lock(slot).ok_or_else(|| format!("{scenario}: payment {i} never ran"))?;
        last = last.max(ran);
        let client = data.client_of[i] as usize;
        let arrived = registered_at[client].max(paid_at[i]);
        if ran < arrived {
            early += 1;
        }
        let latency = ms(ran.saturating_duration_since(arrived));
        latencies_ms.push(latency);
        if !std::mem::replace(&mut seen[client], true) {
            first_of_key_ms.push(latency);
        }
        if let Some(released) = *lock(&released_at[i]) {
            lane_ms.push(ms(ran.saturating_duration_since(released)));
        }
    }
    let mut key_path_ms: Vec<f64> = known_at
        .iter()
        .zip(&registered_at)
        .filter_map(|(k, r)| lock(k).map(|k| ms(k.saturating_duration_since(*r))))
        .collect();
    for v in [
        &mut latencies_ms,
        &mut first_of_key_ms,
        &mut lane_ms,
        &mut key_path_ms,
    ] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Race {
        latencies_ms,
        first_of_key_ms,
        key_path_ms,
        lane_ms,
        early,
        drain: last - t0,
        deferred: counters.deferred.load(Ordering::Relaxed),
        report,
        peak_rss_mb,
        rss_before_mb,
    })
}

/// The floor of the key path: registrations published on the race's schedule into a queue that
/// bare lapin consumes (on its own connection, as prereq's transport does), latency from
/// publish to delivery, in ms, sorted.
async fn raw_latency(
    conn: &Connection,
    addr: &AmqpAddr,
    run: &str,
    cleanup: &Cleanup,
    data: &RaceData,
) -> Res<Vec<f64>> {
    let (queue, ch) = scratch_queue(conn, run, "rawlat", cleanup).await?;
    let k = data.reg_at.len();
    let consumer_conn = Connection::connect(addr.expose(), ConnectionProperties::default()).await?;
    let cch = consumer_conn.create_channel().await?;
    cch.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let receiver = tokio::spawn(async move {
        let mut got = vec![None; k];
        for _ in 0..k {
            let d = consumer.next().await.ok_or("raw consumer closed")??;
            let now = Instant::now();
            let c: Client = serde_json::from_slice(&d.data)?;
            got[c.id as usize] = Some(now);
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Res::Ok(got)
    });
    let t0 = Instant::now() + Duration::from_millis(50);
    let sent_at = register_on_schedule(&ch, &queue, data, t0).await?;
    let got = timeout("raw latency", STUCK, receiver).await???;
    let _ = consumer_conn.close(200, "done".into()).await;
    let _ = ch.close(200, "done".into()).await;
    let mut v: Vec<f64> = got
        .iter()
        .zip(&sent_at)
        .filter_map(|(g, s)| g.map(|g| g.saturating_duration_since(*s).as_secs_f64() * 1e3))
        .collect();
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// engine (in-memory transport)

/// ns per message through the engine and the in-memory transport: `hold` = every message is
/// held first (keys unknown), then released by its registration; otherwise all keys are known.
async fn engine(n: usize, k: u64, hold: bool) -> Res<f64> {
    let broker = MemoryBroker::new();
    for i in 0..n as u64 {
        broker.publish(payment_body(i, i % k));
    }
    if hold {
        // One queue: every payment arrives (and is held) before the first registration.
        for c in 0..k {
            broker.register(client_body(c));
        }
    }
    let n64 = n as u64;
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (h, d) = (Arc::clone(&handled), Arc::clone(&done));
    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client)
        .registrations(|c: &Client| c.id)
        .budget(HoldBudget::default().with_max_messages(n.max(1)))
        .handler(|_p: Payment| async { Ok::<_, HandlerError>(()) })
        .on_event(move |e| {
            if e.decision == Decision::Handled && h.fetch_add(1, Ordering::Relaxed) + 1 == n64 {
                d.notify_one();
            }
        })
        .build()?;
    if !hold {
        let keys = consumer.keys();
        for c in 0..k {
            keys.insert(c);
        }
    }
    let t = Instant::now();
    let report = timeout(
        "engine",
        STUCK,
        consumer.run(broker.transport(), done.notified()),
    )
    .await??;
    let elapsed = t.elapsed();
    if report.handled != n64 || (hold && report.released != n64) {
        return Err(format!("engine: unexpected report {report:?}").into());
    }
    Ok(elapsed.as_nanos() as f64 / n as f64)
}

async fn engine_median(s: &Sizes, hold: bool) -> Res<f64> {
    let n = if hold { s.engine_hold_n } else { s.engine_n };
    let mut v = Vec::with_capacity(s.engine_runs);
    for _ in 0..s.engine_runs {
        v.push(engine(n, 1_000, hold).await?);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

// ---------------------------------------------------------------------------------------------
// Figures, table, plot

#[derive(Default)]
struct Figures(Vec<(String, serde_json::Value)>);

impl Figures {
    fn set(&mut self, name: &str, v: impl Into<serde_json::Value>) {
        self.0.push((name.to_owned(), v.into()));
    }

    fn num(&mut self, name: &str, v: f64, decimals: i32) {
        let scale = 10f64.powi(decimals);
        let v = (v * scale).round() / scale;
        self.set(
            name,
            serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into),
        );
    }

    fn json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{v}", serde_json::Value::from(k.as_str()));
        }
        out.push('}');
        out
    }
}

fn plot(path: &std::path::Path, prereq: &[f64], seed: &[f64], title: &str) -> Res<()> {
    use plotters::prelude::*;
    const FLOOR_MS: f64 = 0.1;
    let max = prereq
        .iter()
        .chain(seed)
        .copied()
        .fold(1.0, f64::max)
        .max(10.0);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d((FLOOR_MS..max * 1.5).log_scale(), 0.0..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("release latency after the key arrived (ms, log scale)")
        .y_desc("fraction of payments released")
        .x_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .draw()?;
    // A step CDF sampled at 500 quantiles: the file stays small whatever N is.
    let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
        const STEPS: usize = 500;
        let mut pts = vec![(FLOOR_MS, 0.0)];
        if v.is_empty() {
            return pts;
        }
        let mut prev_y = 0.0;
        for j in 1..=STEPS {
            let y = j as f64 / STEPS as f64;
            let idx = ((y * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            let x = v[idx].max(FLOOR_MS);
            pts.push((x, prev_y));
            pts.push((x, y));
            prev_y = y;
        }
        pts
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(230, 120, 20);
    chart
        .draw_series(LineSeries::new(cdf(prereq), blue.stroke_width(2)))?
        .label("prereq (default hold)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(cdf(seed), orange.stroke_width(2)))?
        .label("seed-style (no hold, linear 1 s re-publish)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// main

fn main() {
    let sizes = Sizes::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        tokio::select! {
            r = bench(sizes) => match r {
                Ok(()) => 0,
                Err(e) => { eprintln!("bench failed: {e}"); 1 }
            },
            _ = tokio::signal::ctrl_c() => { eprintln!("interrupted"); 130 }
        }
    });
    // The cleanup guard inside `bench` has run (or its drop did, on the way out of select!).
    drop(rt);
    std::process::exit(code);
}

async fn bench(s: Sizes) -> Res<()> {
    let mut f = Figures::default();
    let mut table: Vec<(String, String)> = Vec::new();
    let row = |t: &mut Vec<(String, String)>, k: &str, v: String| t.push((k.to_owned(), v));
    f.set("mode", s.mode);

    let addr = AmqpAddr::from_env();
    let conn = if s.mode == "engine" {
        None
    } else {
        connect_or_explain(&addr).await
    };
    f.set("broker", conn.is_some());

    let mut overall_peak = 0f64;
    if let Some(conn) = &conn {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let run = format!("{}.{nanos}", std::process::id());
        let cleanup = Cleanup::new(addr.clone());
        let result = broker_scenarios(conn, &addr, &run, &cleanup, &s, &mut f, &mut table).await;
        let deleted = cleanup.run().await;
        eprintln!("cleanup: deleted {deleted} queues (every queue and exchange of run {run})");
        let _ = conn.close(200, "bench done".into()).await;
        overall_peak = result?;
    }

    // engine
    let steady_ns = engine_median(&s, false).await?;
    let hold_ns = engine_median(&s, true).await?;
    row(
        &mut table,
        "engine, known key (in-memory)",
        format!(
            "{steady_ns:.0} ns/msg ({} msgs, median of {})",
            s.engine_n, s.engine_runs
        ),
    );
    row(
        &mut table,
        "engine, held then released",
        format!(
            "{hold_ns:.0} ns/msg ({} msgs, median of {})",
            s.engine_hold_n, s.engine_runs
        ),
    );
    f.num("engine_ns_per_msg", steady_ns, 0);
    f.num("engine_hold_ns_per_msg", hold_ns, 0);
    f.num("peak_rss_mb", overall_peak.max(peak_rss_mb()), 1);

    let width = table
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!("prereq benchmark ({} mode)", s.mode);
    println!("{}", "-".repeat(width + 40));
    for (k, v) in &table {
        println!("{k:<width$}  {v}");
    }
    println!("{}", "-".repeat(width + 40));
    println!("{}", f.json());
    Ok(())
}

/// A connection to the broker, or `None` with the reason printed.
async fn connect_or_explain(addr: &AmqpAddr) -> Option<Connection> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(addr.expose(), ConnectionProperties::default()),
    )
    .await;
    let why = match attempt {
        Ok(Ok(c)) => return Some(c),
        Ok(Err(e)) => format!("unreachable ({})", addr.scrub(&e.to_string())),
        Err(_) => "did not answer within 5 s".to_owned(),
    };
    println!("RabbitMQ at {addr} {why}: running the engine scenario only");
    None
}

/// raw, steady, race (prereq and seed-style) and bounded; returns the highest peak RSS seen.
async fn broker_scenarios(
    conn: &Connection,
    addr: &AmqpAddr,
    run: &str,
    cleanup: &Cleanup,
    s: &Sizes,
    f: &mut Figures,
    table: &mut Vec<(String, String)>,
) -> Res<f64> {
    let mut row = |k: &str, v: String| table.push((k.to_owned(), v));
    let r = raw(conn, run, cleanup, s).await?;
    row(
        "raw lapin publish (confirms)",
        format!("{:.0} msg/s ({} msgs)", r.publish_per_s, s.n),
    );
    row(
        "raw lapin consume (each ack awaited)",
        format!("{:.0} msg/s", r.consume_per_s),
    );
    row(
        "raw lapin consume (acks pipelined)",
        format!("{:.0} msg/s", r.consume_pipelined_per_s),
    );
    f.set("n", s.n as u64);
    f.num("raw_publish_per_s", r.publish_per_s, 0);
    f.num("raw_consume_per_s", r.consume_per_s, 0);
    f.num("raw_consume_pipelined_per_s", r.consume_pipelined_per_s, 0);

    let st = steady(conn, addr, run, cleanup, s).await?;
    let ratio = st.per_s / r.consume_per_s;
    let ratio_pipelined = st.per_s / r.consume_pipelined_per_s;
    row(
        "steady (prereq, keys known)",
        format!(
            "{:.0} msg/s = {ratio:.2}x raw (awaited), {ratio_pipelined:.2}x raw (pipelined)",
            st.per_s
        ),
    );
    f.num("steady_per_s", st.per_s, 0);
    f.num("steady_ratio", ratio, 3);
    f.num("steady_ratio_pipelined", ratio_pipelined, 3);
    if st.report.handled != s.n as u64 || st.report.deferred != 0 {
        return Err(format!("steady: unexpected report {:?}", st.report).into());
    }

    let data = RaceData::new(s.race_n, s.race_k, s.race_t, 0x5EED_5EED);
    let n = s.race_n as f64;
    let floor = raw_latency(conn, addr, run, cleanup, &data).await?;
    let (f50, f99, fmax) = (
        percentile(&floor, 50.0),
        percentile(&floor, 99.0),
        percentile(&floor, 100.0),
    );
    row(
        "raw lapin publish -> delivery (race schedule)",
        format!("p50/p99/max {f50:.2} / {f99:.2} / {fmax:.2} ms"),
    );
    f.num("raw_latency_p50_ms", f50, 3);
    f.num("raw_latency_p99_ms", f99, 3);
    f.num("raw_latency_max_ms", fmax, 3);
    let mut peak = peak_rss_mb();
    let mut runs: HashMap<&str, Race> = HashMap::new();
    for (name, budget) in [
        ("race", HoldBudget::default()),
        ("seed", HoldBudget::NONE),
        (
            "bounded",
            HoldBudget::default().with_max_messages((s.race_n / 4).max(1)),
        ),
    ] {
        let r = race(conn, addr, run, name, cleanup, &data, budget).await?;
        if r.early > 0 {
            return Err(
                format!("{name}: {} handlers ran before their key arrived", r.early).into(),
            );
        }
        peak = peak.max(r.peak_rss_mb);
        runs.insert(name, r);
    }
    f.set("race_n", s.race_n as u64);
    f.set("race_k", s.race_k);
    f.num("race_t_s", s.race_t.as_secs_f64(), 3);
    for (name, label, prefix) in [
        ("race", "race, prereq default (hold)", "race"),
        ("seed", "race, seed-style (no hold)", "seed"),
    ] {
        let r = &runs[name];
        let (p50, p99, max) = (
            percentile(&r.latencies_ms, 50.0),
            percentile(&r.latencies_ms, 99.0),
            percentile(&r.latencies_ms, 100.0),
        );
        row(
            &format!("{label}: release p50/p99/max"),
            format!("{p50:.2} / {p99:.2} / {max:.2} ms"),
        );
        row(
            &format!("{label}: drain, re-publish/msg"),
            format!(
                "{:.2} s, {:.3} ({} deferred)",
                r.drain.as_secs_f64(),
                r.deferred as f64 / n,
                r.deferred
            ),
        );
        row(
            &format!("{label}: peak held, peak RSS"),
            format!(
                "{}, {:.1} MiB (RSS before {:.1} MiB)",
                r.report.peak_held, r.peak_rss_mb, r.rss_before_mb
            ),
        );
        f.num(&format!("{prefix}_release_p50_ms"), p50, 3);
        f.num(&format!("{prefix}_release_p99_ms"), p99, 3);
        f.num(&format!("{prefix}_release_max_ms"), max, 3);
        f.num(&format!("{prefix}_drain_s"), r.drain.as_secs_f64(), 3);
        f.num(&format!("{prefix}_peak_rss_mb"), r.peak_rss_mb, 1);
        f.set(&format!("{prefix}_peak_held"), r.report.peak_held as u64);
    }
    f.num("republish_per_msg", runs["race"].deferred as f64 / n, 4);
    f.num(
        "seed_republish_per_msg",
        runs["seed"].deferred as f64 / n,
        4,
    );
    let b = &runs["bounded"];
    let budget = (s.race_n / 4).max(1);
    row(
        "bounded (hold budget N/4): peak held",
        format!(
            "{} of budget {budget}, {:.1} MiB peak RSS, {:.3} re-publish/msg, release p99 {:.2} ms",
            b.report.peak_held,
            b.peak_rss_mb,
            b.deferred as f64 / n,
            percentile(&b.latencies_ms, 99.0)
        ),
    );
    f.set("bounded_budget", budget as u64);
    f.set("bounded_peak_held", b.report.peak_held as u64);
    f.num("bounded_peak_rss_mb", b.peak_rss_mb, 1);
    f.num("bounded_republish_per_msg", b.deferred as f64 / n, 4);
    f.num(
        "bounded_release_p99_ms",
        percentile(&b.latencies_ms, 99.0),
        3,
    );
    let race = &runs["race"];
    let (first_p99, key_p50, key_p99, lane_p50, lane_p99) = (
        percentile(&race.first_of_key_ms, 99.0),
        percentile(&race.key_path_ms, 50.0),
        percentile(&race.key_path_ms, 99.0),
        percentile(&race.lane_ms, 50.0),
        percentile(&race.lane_ms, 99.0),
    );
    row(
        "race, prereq: where the release time goes",
        format!(
            "registration publish -> engine p50/p99 {key_p50:.2} / {key_p99:.2} ms; \
             released -> handler p50/p99 {lane_p50:.2} / {lane_p99:.2} ms; \
             first payment of each key p99 {first_p99:.2} ms"
        ),
    );
    f.num("race_key_path_p50_ms", key_p50, 3);
    f.num("race_key_path_p99_ms", key_p99, 3);
    f.num("race_lane_p50_ms", lane_p50, 3);
    f.num("race_lane_p99_ms", lane_p99, 3);
    f.num("race_first_of_key_p99_ms", first_p99, 3);
    if race.report.peak_held > 0 {
        let per_msg_kb = (race.peak_rss_mb - race.rss_before_mb).max(0.0) * 1024.0
            / race.report.peak_held as f64;
        f.num("held_kb_per_msg", per_msg_kb, 2);
    }

    let svg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/release-latency.svg");
    let title = format!(
        "Release latency, {} payments / {} clients, keys within {:.0} s ({} mode)",
        s.race_n,
        s.race_k,
        s.race_t.as_secs_f64(),
        s.mode
    );
    match plot(&svg, &race.latencies_ms, &runs["seed"].latencies_ms, &title) {
        Ok(()) => row("plot", "docs/release-latency.svg".to_owned()),
        Err(e) => row("plot", format!("not written: {e}")),
    }
    Ok(peak)
}
