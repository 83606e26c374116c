//! The engine's cost per message on the in-memory transport: known keys (the steady path),
//! every message held then released by its registration, and known keys with one message each;
//! and the heap a held message costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prereq::memory::MemoryBroker;
use prereq::{Decision, DependentConsumer, HoldBudget, MemoryKeys};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::data::{BODY_BYTES, Client, Payment, client_body, payment_body};
use crate::heap;
use crate::sizes::Sizes;
use crate::{Res, STUCK, timeout};

/// ns per message through the engine and the in-memory transport: `hold` = every message is
/// held first (keys unknown), then released by its registration; otherwise all keys are known.
async fn engine(n: usize, k: u64, hold: bool) -> Res<f64> {
    let broker = MemoryBroker::new();
    for i in 0..n as u64 {
        broker.publish(payment_body(i, i % k, BODY_BYTES));
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
    let keys = MemoryKeys::new();
    if !hold {
        for c in 0..k {
            keys.insert(c);
        }
    }
    let consumer =
        DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .registrations(|c: &Client| c.id)
            .keys(keys)
            .budget(HoldBudget::DEFAULT.max_messages(n.max(1)))
            .on_event(move |e| {
                if e.decision == Decision::Handled && h.fetch_add(1, Ordering::Relaxed) + 1 == n64 {
                    d.notify_one();
                }
            })
            .build();
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

/// The median of `s.engine_runs` runs of one path.
pub async fn engine_median(s: &Sizes, hold: bool) -> Res<f64> {
    let n = if hold { s.engine_hold_n } else { s.engine_n };
    let mut v = Vec::with_capacity(s.engine_runs);
    for _ in 0..s.engine_runs {
        v.push(engine(n, 1_000, hold).await?);
    }
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2)
        .copied()
        .ok_or_else(|| "engine: no run".into())
}

/// ns per message through the engine on the known-key path where every one of the `n` messages
/// has its own key (a key never has a second message waiting).
pub async fn engine_unique(n: usize) -> Res<f64> {
    engine(n, n.max(1) as u64, false).await
}

/// KiB of heap per held message in the engine and the in-memory transport: `n` payments of
/// `body_bytes` whose keys are unknown, heap growth from the start of the run to the moment the
/// n-th is held (the in-memory broker keeps its own copy of each body, published before).
pub async fn engine_held_kb(n: usize, body_bytes: usize) -> Res<f64> {
    let broker = MemoryBroker::new();
    for i in 0..n as u64 {
        broker.publish(payment_body(i, i % 1_000, body_bytes));
    }
    let n64 = n as u64;
    let held = Arc::new(AtomicU64::new(0));
    let grown = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let done = Arc::new(Notify::new());
    let window = Arc::new(heap::Window::open());
    let (h, g, d, w) = (
        Arc::clone(&held),
        Arc::clone(&grown),
        Arc::clone(&done),
        Arc::clone(&window),
    );
    let consumer =
        DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .registrations(|c: &Client| c.id)
            // Room for every body (the default 64 MiB would hold 65 536 of 1 KiB, not 100 000).
            .budget(
                HoldBudget::DEFAULT
                    .max_messages(n.max(1))
                    .max_bytes(usize::MAX),
            )
            .on_event(move |e| {
                if e.decision == Decision::Held && h.fetch_add(1, Ordering::Relaxed) + 1 == n64 {
                    g.store(w.grown(), Ordering::Relaxed);
                    d.notify_one();
                }
            })
            .build();
    let report = timeout(
        "engine held memory",
        STUCK,
        consumer.run(broker.transport(), done.notified()),
    )
    .await??;
    drop(window);
    if report.peak_held != n {
        return Err(format!("engine held memory: unexpected report {report:?}").into());
    }
    Ok(grown.load(Ordering::Relaxed) as f64 / 1024.0 / n as f64)
}
