//! Steady state: N payments whose clients are all known, through `DependentConsumer` on the
//! AMQP transport, timed from connecting to the N-th acknowledged message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prereq::{Decision, DependentConsumer, MemoryKeys, Report};
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
    pub report: Report,
}

/// Pre-load N payments, then consume them with every client known.
pub async fn steady(env: &Env, s: &Sizes) -> Res<Steady> {
    let prefix = env.prefix("steady");
    let route = env.route(&prefix);
    // Declare and fill the queue before the consumer starts, as for raw.
    env.broker.declare(&route).await?;
    let payments = payments_queue(&prefix);
    let ch = confirm_channel(env.conn()).await?;
    let bodies: Vec<Vec<u8>> = (0..s.n as u64)
        .map(|i| payment_body(i, i % s.k, BODY_BYTES))
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
    lock(&first).ok_or("steady: no handler ran")?;
    Ok(Steady {
        per_s: n as f64 / (end - start).as_secs_f64(),
        cpu,
        report,
    })
}
