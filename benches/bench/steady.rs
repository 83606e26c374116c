//! Steady state: N payments whose clients are all known, through `DependentConsumer` on the
//! AMQP transport, timed from connecting to the N-th acknowledged message; and the same N
//! behind a hold: payments of clients that never come, queued before them and held meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prereq::{Decision, DependentConsumer, HoldBudget, MemoryKeys};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::cleanup::lock;
use crate::cpu::{Cpu, PerMsg};
use crate::data::{BODY_BYTES, Client, Payment, payment_body};
use crate::env::{Env, payments_queue};
use crate::publish::{confirm_channel, publish_all};
use crate::shared::Shared;
use crate::sizes::Sizes;
use crate::{Res, STUCK, timeout};

/// prereq's steady rate.
pub struct Steady {
    pub per_s: f64,
    /// CPU per message, from connecting to the last acknowledgement.
    pub cpu: PerMsg,
    /// From the first handled payment to the N-th: the rate once what is held was taken in.
    pub after_first_per_s: f64,
}

/// Pre-load `held` payments of clients that never come, then N payments, then consume them
/// with the N's clients known.
pub async fn steady(env: &Env, s: &Sizes, held: usize) -> Res<Steady> {
    let prefix = env.prefix(if held == 0 { "steady" } else { "steady-held" });
    let route = env.route(&prefix);
    // Declare and fill the queue before the consumer starts, as for raw.
    env.broker.declare(&route).await?;
    let payments = payments_queue(&prefix);
    let ch = confirm_channel(env.conn()).await?;
    // Clients from `s.k` on are never known: their payments are held.
    let held_bodies = (0..held as u64).map(|i| payment_body(s.n as u64 + i, s.k + i, BODY_BYTES));
    let bodies: Vec<Vec<u8>> = held_bodies
        .chain((0..s.n as u64).map(|i| payment_body(i, i % s.k, BODY_BYTES)))
        .collect();
    publish_all(&ch, &payments, &bodies, |_| {}).await?;
    let _ = ch.close(200, "done".into()).await;

    let n = s.n as u64;
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handled = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = oneshot::channel::<Instant>();
    let done_tx = Mutex::new(Some(done_tx));
    let first_h = Arc::clone(&first);
    let handled_o = Arc::clone(&handled);
    let keys = MemoryKeys::new();
    for c in 0..s.k {
        keys.insert(c);
    }
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client,
        move |_p: Payment| {
            lock(&first_h).get_or_insert_with(Instant::now);
            async { Ok(()) }
        },
    )
    .registrations(|c: &Client| c.id)
    // The default budget, but time enough that nothing held expires during the run.
    .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(600)))
    .on_event(move |e| {
        if e.decision == Decision::Handled
            && handled_o.fetch_add(1, Ordering::Relaxed) + 1 == n
            && let Some(tx) = lock(&done_tx).take()
        {
            let _ = tx.send(Instant::now());
        }
    })
    .keys(keys)
    .build();
    // The clock starts before the consumer's connection: this charges prereq its connection
    // set-up (connection, topology, consumers), which raw does not pay: a conservative
    // comparison.
    let start = Instant::now();
    let cpu = Cpu::now(env.broker_pid);
    let transport = env.transport(&prefix, route).await?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let running = tokio::spawn(
        consumer.run(Shared(Arc::clone(&transport.transport)), async {
            let _ = stop_rx.await;
        }),
    );
    let finished = timeout("steady", STUCK, done_rx).await;
    let _ = stop_tx.send(());
    let report = running.await;
    transport.close().await;
    let report = report??;
    let end = finished??;
    let cpu = cpu.per_msg(s.n);
    let first = lock(&first).ok_or("steady: no handler ran")?;
    if report.handled != n || report.deferred != 0 || report.peak_held != held {
        return Err(format!("steady: unexpected report {report:?}").into());
    }
    Ok(Steady {
        per_s: n as f64 / (end - start).as_secs_f64(),
        cpu,
        after_first_per_s: n as f64 / (end - first).as_secs_f64(),
    })
}
