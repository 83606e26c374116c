//! The big hold (full mode): `n` payments held, then every registration at once; how fast and
//! how soon they are released, and the memory it takes, against bare lapin draining the same
//! `n` payments from a standing start.
//!
//! One AMQP channel holds at most 65 535 unacknowledged deliveries (the prefetch is 16 bits):
//! of more than that, prereq holds what the prefetch lets through, and takes the rest in as the
//! released ones are acknowledged. Bare lapin gets the same prefetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use prereq::amqp::{Queue, QueueKind, Route};
use prereq::transport::Demand;
use prereq::{DEFAULT_CONCURRENCY, Decision, DependentConsumer, HoldBudget};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cleanup::lock;
use crate::data::{BODY_BYTES, Client, Payment, client_body, payment_body};
use crate::env::{Env, clients_queue, payments_queue};
use crate::figures::percentile;
use crate::publish::{confirm_channel, publish_all};
use crate::raw::{Acks, consume, scratch_queue};
use crate::rss::{peak_rss_mb, reset_peak_rss, rss_mb};
use crate::shared::Running;
use crate::{Res, STUCK, timeout};

/// The hold is full (or the prefetch is) once the held count stayed the same this long.
const SETTLED: Duration = Duration::from_millis(500);

/// One side's figures.
pub struct Drain {
    /// Messages per second, from the start (the first registration published, or the consume
    /// started) to the last handled.
    pub per_s: f64,
    /// Per message, ms from the start to its handling: p50, p99.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Peak resident memory during the scenario, and the resident memory before it, MiB.
    pub peak_rss_mb: f64,
    pub rss_before_mb: f64,
}

/// What the big hold measured.
pub struct Big {
    /// The most payments prereq held at once.
    pub held: u64,
    pub prereq: Drain,
    /// Bare lapin, each delivery acknowledged as it comes.
    pub raw: Drain,
    /// Bare lapin acknowledging as prereq does: every payment taken in, then acknowledged
    /// client by client (the order a release by key acknowledges in). Only where one prefetch
    /// takes them all: of more, the broker's handling of those acknowledgements decides, and it
    /// took longer than the bench waits (see docs/performance.md).
    pub raw_by_key: Option<Drain>,
}

/// The prefetch prereq's transport asks for with a budget of `n` messages (the AMQP limit).
fn prefetch(n: usize) -> u16 {
    u16::try_from(Demand::new(n, DEFAULT_CONCURRENCY).in_flight()).unwrap_or(u16::MAX)
}

/// `n` payments of `k` clients through prereq, then through bare lapin.
pub async fn big_hold(env: &Env, n: usize, k: u64) -> Res<Big> {
    let bodies: Vec<Vec<u8>> = (0..n as u64)
        .map(|i| payment_body(i, i % k, BODY_BYTES))
        .collect();
    let (held, prereq) = through_prereq(env, &bodies, k).await?;
    let raw = through_lapin(env, &bodies, false).await?;
    let raw_by_key = if usize::from(prefetch(n)) >= n {
        Some(through_lapin(env, &bodies, true).await?)
    } else {
        None
    };
    Ok(Big {
        held,
        prereq,
        raw,
        raw_by_key,
    })
}

async fn through_prereq(env: &Env, bodies: &[Vec<u8>], k: u64) -> Res<(u64, Drain)> {
    let n = bodies.len();
    let prefix = env.prefix("big");
    let route = big_route(env, &prefix).await?;
    let handled_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let held = Arc::new(AtomicU64::new(0));
    let peak_held = Arc::new(AtomicU64::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let consumer = {
        let handled_at = Arc::clone(&handled_at);
        let (held, peak_held, handled, done) = (
            Arc::clone(&held),
            Arc::clone(&peak_held),
            Arc::clone(&handled),
            Arc::clone(&done),
        );
        let n64 = n as u64;
        DependentConsumer::builder(
            |p: &Payment| p.client,
            move |p: Payment| {
                if let Some(slot) = handled_at.get(p.id as usize) {
                    lock(slot).get_or_insert_with(Instant::now);
                }
                async { Ok(()) }
            },
        )
        .registrations(|c: &Client| c.id)
        .budget(
            HoldBudget::DEFAULT
                .max_messages(n)
                .max_bytes(usize::MAX)
                .max_time(Duration::from_secs(600)),
        )
        .on_event(move |e| match e.decision {
            Decision::Held => {
                let now = held.fetch_add(1, Ordering::Relaxed) + 1;
                peak_held.fetch_max(now, Ordering::Relaxed);
            }
            Decision::Released { .. } => {
                held.fetch_sub(1, Ordering::Relaxed);
            }
            Decision::Handled if handled.fetch_add(1, Ordering::Relaxed) + 1 == n64 => {
                done.notify_one();
            }
            _ => {}
        })
        .build()
    };
    let rss_before_mb = rss_mb();
    reset_peak_rss();
    let transport = env.transport(&prefix, route).await?;
    let running = Running::start(consumer, &transport.transport);
    let outcome = async {
        let ch = confirm_channel(env.conn()).await?;
        publish_all(&ch, &payments_queue(&prefix), bodies, |_| {}).await?;
        // Held as many as it can: the count stopped growing.
        timeout("big: holding", STUCK, async {
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(SETTLED).await;
                let now = held.load(Ordering::Relaxed);
                if now == last && now > 0 {
                    return;
                }
                last = now;
            }
        })
        .await?;
        let clients: Vec<Vec<u8>> = (0..k).map(client_body).collect();
        let t0 = Instant::now();
        publish_all(&ch, &clients_queue(&prefix), &clients, |_| {}).await?;
        timeout("big: draining", STUCK, done.notified()).await?;
        let _ = ch.close(200, "done".into()).await;
        Res::Ok(t0)
    }
    .await;
    let report = running.stop().await;
    transport.close().await;
    report?;
    let peak_rss_mb = peak_rss_mb();
    let t0 = outcome?;
    let mut ms = Vec::with_capacity(n);
    for (i, slot) in handled_at.iter().enumerate() {
        let at = lock(slot).ok_or_else(|| format!("big: payment {i} never ran"))?;
        ms.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3);
    }
    let drain = Drain::of(ms, peak_rss_mb, rss_before_mb);
    Ok((peak_held.load(Ordering::Relaxed), drain))
}

/// The payments' queue as `PREREQ_BENCH_BIG_QUEUE` asks: `classic` (the default, as every other
/// scenario), `classic2` (a classic queue, version 2: declared by the bench, consumed as an
/// existing queue) or `quorum`. Out-of-order acknowledgements cost each kind differently.
async fn big_route(env: &Env, prefix: &str) -> Res<Route> {
    let payments = payments_queue(prefix);
    let queue = match std::env::var("PREREQ_BENCH_BIG_QUEUE").as_deref() {
        Err(_) | Ok("classic") => return Ok(env.route(prefix)),
        Ok("quorum") => Queue::quorum(&payments),
        Ok("classic2") => {
            let mut args = FieldTable::default();
            args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
            let ch = env.conn().create_channel().await?;
            ch.queue_declare(
                payments.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
            let _ = ch.close(200, "declared".into()).await;
            env.cleanup.queue(payments.clone());
            Queue::existing(&payments, QueueKind::Classic)
        }
        Ok(other) => {
            return Err(format!(
                "PREREQ_BENCH_BIG_QUEUE={other}: expected classic, classic2 or quorum"
            )
            .into());
        }
    };
    let route = Route::new(queue).registrations(Queue::classic(clients_queue(prefix)));
    env.cleanup.route(&route);
    Ok(route)
}

/// Bare lapin: the same payments in a queue of their own, consumed with the same prefetch and
/// pipelined acks; `by_key`: the first prefetch-full acknowledged client by client.
async fn through_lapin(env: &Env, bodies: &[Vec<u8>], by_key: bool) -> Res<Drain> {
    let n = bodies.len();
    let (queue, ch) = scratch_queue(env, if by_key { "bigrawkey" } else { "bigraw" }).await?;
    publish_all(&ch, &queue, bodies, |_| {}).await?;
    let rss_before_mb = rss_mb();
    reset_peak_rss();
    let cch = env.conn().create_channel().await?;
    let window = usize::from(prefetch(n)).min(n);
    cch.basic_qos(prefetch(n), BasicQosOptions::default())
        .await?;
    let t0 = Instant::now();
    let mut consumer = consume(&cch, &queue).await?;
    let mut ms = Vec::with_capacity(n);
    timeout("big: bare lapin", STUCK, async {
        let mut acks = Acks::default();
        let mut first = Vec::new();
        for i in 0..n {
            let d = consumer
                .next()
                .await
                .ok_or("bare lapin consumer closed")??;
            // Decoded, as prereq decodes each payment.
            let p: Payment = serde_json::from_slice(&d.data)?;
            if by_key && i < window {
                first.push((p.client, d.acker));
                if first.len() < window {
                    continue;
                }
                first.sort_by_key(|(client, _)| *client);
                for (_, acker) in first.drain(..) {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                    acks.push(acker).await?;
                }
                continue;
            }
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            acks.push(d.acker).await?;
        }
        acks.drain().await
    })
    .await??;
    let peak_rss_mb = peak_rss_mb();
    let _ = cch.close(200, "done".into()).await;
    let _ = ch.close(200, "done".into()).await;
    Ok(Drain::of(ms, peak_rss_mb, rss_before_mb))
}

impl Drain {
    fn of(mut ms: Vec<f64>, peak_rss_mb: f64, rss_before_mb: f64) -> Self {
        ms.sort_by(f64::total_cmp);
        let last_s = ms.last().copied().unwrap_or(0.0) / 1e3;
        Self {
            per_s: ms.len() as f64 / last_s.max(1e-9),
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            peak_rss_mb,
            rss_before_mb,
        }
    }
}
