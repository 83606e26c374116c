//! prereq's benchmark: release latency, throughput and broker cost, side by side with bare lapin
//! and with the seed-style strategy (no hold, every miss re-published with a linear 1 s
//! backoff), on the same broker in the same run.
//!
//! `cargo bench` runs the quick mode (about a minute once built); `PREREQ_BENCH=full cargo bench`
//! runs larger N; `PREREQ_BENCH=engine cargo bench` runs the in-memory engine scenario only,
//! once (for profiling), and `PREREQ_BENCH=engine-known` / `engine-held` / `engine-unique` (known
//! keys, every message its own) one path of it with `PREREQ_BENCH_N` messages (for instruction
//! counts); `PREREQ_BENCH=big` the big hold alone (`PREREQ_BENCH_N` payments, 100 000 unless
//! set); `PREREQ_BENCH=race` the race alone, bare lapin releasing the same payments and prereq
//! in turn (`PREREQ_BENCH_ROUNDS` times). Every mode runs on a multi-threaded tokio runtime with
//! 2 workers, `PREREQ_BENCH_WORKERS` unless set. The broker is `AMQP_ADDR`, else
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; when it is unreachable only the in-memory engine
//! scenario runs.
//!
//! Scenarios (see `docs/performance.md`):
//! - *raw*: bare lapin, N persistent messages published with confirms, then consumed with an
//!   awaited manual ack per message: the ceiling on this machine;
//! - *steady*: N payments whose clients are all known, through `DependentConsumer` on the
//!   transport `Broker::transport` makes;
//! - *race*: N payments over K clients whose registrations arrive at random times in 0..T after
//!   the payments (fixed seed), run with prereq's defaults (hold) and with the seed-style
//!   strategy on the same data; *bounded*: the same race with a hold budget of N/4; *race1k*:
//!   prereq's race with 1 KiB bodies (held memory per message); in prereq's race bare lapin
//!   receives the same registrations beside it (a fanout), the broker's latency at the same
//!   instants;
//! - *router*: a partitioned group's ingress router (`route_by_key`) against keyed publishes
//!   straight to the group's exchange: the extra hop's latency and throughput;
//! - *big* (full mode): 100 000 payments held, then released at once, against bare lapin
//!   draining the same;
//! - *engine*: the engine's cost per message on the in-memory transport.
//!
//! Every queue and exchange has a unique name (`prereq-bench.<pid>.<nanos>.…`) and is deleted
//! at the end, also on error, panic, Ctrl-C or SIGTERM.
//!
//! Output: a table, then, last, one JSON line with every figure. The release-latency CDF is
//! written to `docs/release-latency.svg`.

mod big;
mod cleanup;
mod cpu;
mod data;
mod engine;
mod env;
mod figures;
mod heap;
mod plot;
mod publish;
mod race;
mod raw;
mod router;
mod rss;
mod scenarios;
mod shadow;
mod shared;
mod sizes;
mod steady;
mod table;

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use prereq::amqp::AmqpAddr;

use crate::data::{BIG_BODY_BYTES, BODY_BYTES};
use crate::engine::{engine_held_kb, engine_median, engine_unique};
use crate::env::Env;
use crate::figures::Figures;
use crate::rss::peak_rss_mb;
use crate::scenarios::broker_scenarios;
use crate::sizes::Sizes;
use crate::table::Table;

/// Counts heap bytes while a [`heap::Window`] is open.
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// A scenario's result.
pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Guard against a stuck scenario (an error, never a measurement).
pub const STUCK: Duration = Duration::from_secs(180);

/// `f`, or an error naming `what` if it takes longer than `d`.
pub async fn timeout<T>(what: &str, d: Duration, f: impl Future<Output = T>) -> Res<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("{what}: no progress within {d:?}").into())
}

/// The runtime's worker threads: `PREREQ_BENCH_WORKERS`, 2 unless set (or not a positive number).
fn workers() -> usize {
    std::env::var("PREREQ_BENCH_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

fn main() {
    let sizes = Sizes::from_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench failed: no tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        tokio::select! {
            r = bench(sizes) => match r {
                Ok(()) => 0,
                Err(e) => { eprintln!("bench failed: {e}"); 1 }
            },
            _ = tokio::signal::ctrl_c() => { eprintln!("interrupted"); 130 }
            () = terminated() => { eprintln!("terminated"); 143 }
        }
    });
    // The cleanup inside `bench` has run (or its drop did, on the way out of select!).
    drop(rt);
    std::process::exit(code);
}

/// Completes on SIGTERM (`kill`, `timeout`): the bench then cleans up as on Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        term.recv().await;
        return;
    }
    std::future::pending::<()>().await
}

async fn bench(s: Sizes) -> Res<()> {
    let mut f = Figures::default();
    let mut table = Table::default();
    f.set("mode", s.mode);

    let addr = AmqpAddr::from_env();
    let env = if !s.broker() {
        None
    } else {
        match Env::connect(&addr).await {
            Ok(env) => Some(env),
            Err(why) => {
                println!(
                    "RabbitMQ at {addr} unreachable ({why}): running the engine scenario only"
                );
                None
            }
        }
    };
    f.set("broker", env.is_some());

    let mut overall_peak = 0f64;
    if let Some(env) = &env {
        let result = broker_scenarios(env, &s, &mut f, &mut table).await;
        let deleted = env.cleanup.run().await;
        eprintln!(
            "cleanup: deleted {deleted} queues (every queue and exchange of run {})",
            env.run
        );
        let _ = env.broker.close().await;
        overall_peak = result?;
    }

    if s.engine_known() {
        let ns = engine_median(&s, false).await?;
        table.row(
            "engine, known key (in-memory)",
            format!(
                "{ns:.0} ns/msg ({} msgs, median of {})",
                s.engine_n, s.engine_runs
            ),
        );
        f.num("engine_ns_per_msg", ns, 0);
    }
    if s.engine_unique() {
        let ns = engine_unique(s.engine_n).await?;
        table.row(
            "engine, known key, one message per key (in-memory)",
            format!("{ns:.0} ns/msg ({} msgs)", s.engine_n),
        );
        f.num("engine_unique_ns_per_msg", ns, 0);
    }
    if s.engine_held() {
        let ns = engine_median(&s, true).await?;
        table.row(
            "engine, held then released",
            format!(
                "{ns:.0} ns/msg ({} msgs, median of {})",
                s.engine_hold_n, s.engine_runs
            ),
        );
        f.num("engine_hold_ns_per_msg", ns, 0);
    }
    if s.engine_memory() {
        let held_kb = engine_held_kb(s.engine_hold_n, BODY_BYTES).await?;
        let held_kb_1k = engine_held_kb(s.engine_hold_n, BIG_BODY_BYTES).await?;
        table.row(
            "engine, heap per held message (in-memory)",
            format!(
                "{held_kb:.2} KiB ({BODY_BYTES}-byte bodies), {held_kb_1k:.2} KiB ({BIG_BODY_BYTES}-byte bodies)"
            ),
        );
        f.num("engine_held_kb_per_msg", held_kb, 3);
        f.num("engine_held_kb_per_msg_1k", held_kb_1k, 3);
    }
    f.num("peak_rss_mb", overall_peak.max(peak_rss_mb()), 1);

    table.print(&format!("prereq benchmark ({} mode)", s.mode));
    println!("{}", f.json());
    Ok(())
}
