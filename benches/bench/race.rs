//! The race: payments whose clients register at random times after them, through prereq (hold,
//! or a given hold budget) or the seed-style strategy (no hold); release latency, where it goes,
//! re-publishes, and the memory the held payments cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prereq::{Decision, DependentConsumer, HoldBudget, Report};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cleanup::lock;
use crate::cpu::{Cpu, PerMsg};
use crate::data::{Client, Payment, RaceData, payment_body};
use crate::env::{Env, clients_queue, payments_queue};
use crate::heap;
use crate::publish::{confirm_channel, publish_all, register_on_schedule};
use crate::rss::{peak_rss_mb, reset_peak_rss, rss_mb};
use crate::shadow::Shadow;
use crate::shared::Running;
use crate::{Res, STUCK, timeout};

/// When a client became known, and through which delivery.
type Known = (Instant, u64);

/// What one race measured.
pub struct Race {
    /// Release latency per payment, in ms: handler run minus the later of the payment's and its
    /// registration's publish.
    pub latencies_ms: Vec<f64>,
    /// The same, for the first payment of each client only (no wait behind the key's others).
    pub first_of_key_ms: Vec<f64>,
    /// Registration published → `Registered` in the engine (broker and transport), per client.
    pub key_path_ms: Vec<f64>,
    /// `Released` → handler run (lane and handler slot), per released payment.
    pub lane_ms: Vec<f64>,
    /// The key path hop by hop ([`HOPS`]), each sorted, per registration; empty unless the
    /// probe is compiled in (`--cfg prereq_probe`).
    pub hops_ms: Vec<Vec<f64>>,
    /// Bare lapin beside the consumer ([`Shadow`], when asked for): the same registrations'
    /// publish → delivery, in ms, sorted; empty without it.
    pub shadow_ms: Vec<f64>,
    /// Per registration, prereq's key path minus the shadow's delivery of the same
    /// registration, in ms (negative where prereq was first), sorted; empty without it.
    pub over_shadow_ms: Vec<f64>,
    /// Handler runs before the registration was even published (must be 0).
    pub early: u64,
    pub drain: Duration,
    /// CPU from the first registration's publish to the last handler run, per payment.
    pub release_cpu: PerMsg,
    pub deferred: u64,
    pub report: Report,
    pub peak_rss_mb: f64,
    pub rss_before_mb: f64,
    /// Net heap growth (process-wide) from just before the payments were published to the
    /// moment every payment had reached the consumer, in bytes.
    pub intake_heap_bytes: i64,
    /// Payments held at that moment.
    pub held_at_intake: u64,
}

#[derive(Default)]
struct RaceCounters {
    /// Payments taken in once (held, or deferred on their first delivery).
    taken_in: AtomicU64,
    /// Payments held right now.
    held: AtomicU64,
    deferred: AtomicU64,
    handled: AtomicU64,
}

/// One race of `scenario` with this hold budget and payment bodies of `body_bytes`; with
/// `shadow`, bare lapin receives the same registrations beside the consumer.
pub async fn race(
    env: &Env,
    scenario: &str,
    data: &RaceData,
    budget: HoldBudget,
    body_bytes: usize,
    shadow: bool,
) -> Res<Race> {
    let n = data.client_of.len();
    let prefix = env.prefix(scenario);
    let route = env.route(&prefix);
    let payments_q = payments_queue(&prefix);
    let clients_q = clients_queue(&prefix);

    let handled_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let released_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    // When each client became known, and through which delivery.
    let known_at: Arc<Vec<Mutex<Option<Known>>>> =
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
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client,
        move |p: Payment| {
            let now = Instant::now();
            if let Some(slot) = handled_h.get(p.id as usize) {
                lock(slot).get_or_insert(now);
            }
            async { Ok(()) }
        },
    )
    .registrations(|c: &Client| c.id)
    .budget(budget)
    .id(|p: &Payment| p.id.to_string())
    .on_event(move |e| {
        let first_time = e.attempt == 0;
        match e.decision {
            Decision::Held => {
                c.held.fetch_add(1, Ordering::Relaxed);
                if first_time && c.taken_in.fetch_add(1, Ordering::Relaxed) + 1 == n64 {
                    in_o.notify_one();
                }
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
                c.held.fetch_sub(1, Ordering::Relaxed);
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
                    lock(slot).get_or_insert((e.at, e.delivery.0));
                }
            }
            _ => {}
        }
    })
    .build();

    // Allocated before the heap is measured: the bench's own data.
    let bodies: Vec<Vec<u8>> = data
        .client_of
        .iter()
        .enumerate()
        .map(|(i, c)| payment_body(i as u64, *c, body_bytes))
        .collect();
    let mut paid_at = vec![Instant::now(); n];
    let rss_before_mb = rss_mb();
    reset_peak_rss();
    let transport = env.transport(&prefix, route).await?;
    let shadow = if shadow {
        Some(Shadow::start(env, scenario, &clients_q, data.reg_at.len()).await?)
    } else {
        None
    };
    let running = Running::start(consumer, &transport.transport);

    let outcome = async {
        let ch = confirm_channel(env.conn()).await?;
        // The payments, all before any registration; the heap counted until each reached the
        // consumer.
        let window = heap::Window::open();
        publish_all(&ch, &payments_q, &bodies, |i| paid_at[i] = Instant::now()).await?;
        // Every payment has reached the consumer (held, or deferred once): the registrations
        // start now, at random times within 0..T.
        timeout(
            &format!("{scenario}: taking in payments"),
            STUCK,
            all_in.notified(),
        )
        .await?;
        let intake_heap_bytes = window.grown();
        let held_at_intake = counters.held.load(Ordering::Relaxed);
        drop(window);
        let t0 = Instant::now();
        let cpu = Cpu::now(env.broker_pid);
        #[cfg(prereq_probe)]
        prereq::probe::record(true);
        let exchange = shadow.as_ref().map_or("", Shadow::exchange);
        let registered_at = register_on_schedule(&ch, exchange, &clients_q, data, t0).await?;
        timeout(&format!("{scenario}: draining"), STUCK, all_done.notified()).await?;
        let release_cpu = cpu.per_msg(n);
        #[cfg(prereq_probe)]
        prereq::probe::record(false);
        let _ = ch.close(200, "done".into()).await;
        Res::Ok((
            t0,
            registered_at,
            release_cpu,
            intake_heap_bytes,
            held_at_intake,
        ))
    }
    .await;
    let report = running.stop().await;
    transport.close().await;
    let report = report?;
    let peak_rss_mb = peak_rss_mb();
    let (t0, registered_at, release_cpu, intake_heap_bytes, held_at_intake) = outcome?;
    let shadow_at = match shadow {
        Some(shadow) => shadow.finish().await?,
        None => Vec::new(),
    };

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
    let known: Vec<Option<Known>> = known_at.iter().map(|k| *lock(k)).collect();
    let mut key_path_ms: Vec<f64> = known
        .iter()
        .zip(&registered_at)
        .filter_map(|(k, r)| k.map(|(k, _)| ms(k.saturating_duration_since(*r))))
        .collect();
    let hops_ms = hops(&known, &registered_at);
    // Both after the same publish: prereq's key path minus the shadow's is their difference.
    let since_publish =
        |at: &Option<Instant>, r: &Instant| at.map(|at| ms(at.saturating_duration_since(*r)));
    let mut shadow_ms: Vec<f64> = shadow_at
        .iter()
        .zip(&registered_at)
        .filter_map(|(s, r)| since_publish(s, r))
        .collect();
    let mut over_shadow_ms: Vec<f64> = known
        .iter()
        .zip(&shadow_at)
        .zip(&registered_at)
        .filter_map(|((k, s), r)| {
            Some(since_publish(&k.map(|(k, _)| k), r)? - since_publish(s, r)?)
        })
        .collect();
    for v in [
        &mut latencies_ms,
        &mut first_of_key_ms,
        &mut lane_ms,
        &mut key_path_ms,
        &mut shadow_ms,
        &mut over_shadow_ms,
    ] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Race {
        latencies_ms,
        first_of_key_ms,
        key_path_ms,
        lane_ms,
        hops_ms,
        shadow_ms,
        over_shadow_ms,
        early,
        drain: last - t0,
        release_cpu,
        deferred: counters.deferred.load(Ordering::Relaxed),
        report,
        peak_rss_mb,
        rss_before_mb,
        intake_heap_bytes,
        held_at_intake,
    })
}

/// The key path's hops, as [`Race::hops_ms`] lists them.
pub const HOPS: [&str; 4] = [
    "publish -> transport (broker, lapin)",
    "transport: record unsettled",
    "transport -> engine loop",
    "engine loop -> key known",
];

/// The probe's stamps of each registration, as hops (empty without the probe).
#[cfg(prereq_probe)]
fn hops(known: &[Option<Known>], registered_at: &[Instant]) -> Vec<Vec<f64>> {
    use std::collections::HashMap;
    let stamps: HashMap<(u64, usize), std::time::Instant> = prereq::probe::take()
        .into_iter()
        .map(|(stage, id, at)| ((id, stage as usize), at))
        .collect();
    let mut hops = vec![Vec::new(); HOPS.len()];
    for (k, sent) in known.iter().zip(registered_at) {
        let Some((at, id)) = *k else { continue };
        let mut points = vec![sent.into_std()];
        // The stamps, in the order of `Stage` (one fewer than the hops).
        points.extend((0..HOPS.len() - 1).filter_map(|i| stamps.get(&(id, i)).copied()));
        points.push(at.into_std());
        if points.len() != HOPS.len() + 1 {
            continue;
        }
        for (i, w) in points.windows(2).enumerate() {
            hops[i].push(w[1].saturating_duration_since(w[0]).as_secs_f64() * 1e3);
        }
    }
    for h in &mut hops {
        h.sort_by(f64::total_cmp);
    }
    hops
}

#[cfg(not(prereq_probe))]
fn hops(_: &[Option<Known>], _: &[Instant]) -> Vec<Vec<f64>> {
    Vec::new()
}
