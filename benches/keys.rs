//! What a key source costs, against a baseline measured in the same run:
//!
//! * the steady path (every key known and in the engine's cache) with `SqliteKeys` and
//!   `PgKeys`, per message, as a ratio to `MemoryKeys`;
//! * a miss resolved from PostgreSQL (a key the cache has not seen, present in the table):
//!   publish → handler, p50/p99, against a bare sqlx `SELECT EXISTS` on a pool;
//! * a wake by NOTIFY: a held message, its key inserted by a plain SQL `INSERT` (the trigger
//!   notifies): insert → handler, p50/p99, against a bare `PgListener` round trip of the same
//!   operation (an `INSERT` into a table with the same trigger → notification received).
//!
//! One JSON line on stdout (`{"keys_…": …}`), a table on stderr. Needs PostgreSQL
//! (`PREREQ_PG_URL`, default the local server's `test` database); without it, only the
//! SQLite figures are measured (said on stderr).
//!
//! ```text
//! cargo bench --all-features --bench keys
//! ```

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prereq::memory::MemoryBroker;
use prereq::sql::{PgKeys, SqliteKeys};
use prereq::{Decision, DependentConsumer, HoldBudget, KeySource, MemoryKeys};
use sqlx::Connection as _;
use tokio::sync::{Notify, mpsc};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(serde::Deserialize)]
struct Payment {
    client: u64,
}

/// Messages per steady run; keys they spread over (each key misses the cache once).
const STEADY_N: u64 = 40_000;
const STEADY_KEYS: u64 = 100;
/// Steady runs per source (the median is kept).
const STEADY_RUNS: usize = 5;
/// Samples of each latency.
const SAMPLES: u64 = 200;
/// A stuck run fails instead of hanging.
const STUCK: Duration = Duration::from_secs(120);

fn pg_url() -> String {
    std::env::var("PREREQ_PG_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn body(client: u64) -> Vec<u8> {
    format!(r#"{{"client":{client}}}"#).into_bytes()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// ns per message through the engine on the in-memory transport, every key known to `keys`
/// and already in the engine's cache: one message per key first (the cache's misses, not
/// timed), then `STEADY_N` messages timed from their publication to the last handled.
async fn steady(keys: impl KeySource<u64>) -> Res<f64> {
    let broker = MemoryBroker::new();
    let handled = Arc::new(AtomicU64::new(0));
    let (warm, done) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (h, w, d) = (handled.clone(), warm.clone(), done.clone());
    let consumer =
        DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .keys(keys)
            .on_event(move |e| {
                if e.decision == Decision::Handled {
                    let n = h.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == STEADY_KEYS {
                        w.notify_one();
                    }
                    if n == STEADY_KEYS + STEADY_N {
                        d.notify_one();
                    }
                }
            })
            .build();
    for k in 0..STEADY_KEYS {
        broker.publish(body(k));
    }
    let run = tokio::spawn(consumer.run(broker.transport(), done.notified_owned()));
    tokio::time::timeout(STUCK, warm.notified()).await?;
    let t = Instant::now();
    for i in 0..STEADY_N {
        broker.publish(body(i % STEADY_KEYS));
    }
    let report = tokio::time::timeout(STUCK, run).await???;
    let elapsed = t.elapsed();
    if report.handled != STEADY_KEYS + STEADY_N {
        return Err(format!("steady: unexpected report {report:?}").into());
    }
    Ok(elapsed.as_nanos() as f64 / STEADY_N as f64)
}

async fn steady_median<S: KeySource<u64> + Clone>(keys: &S) -> Res<f64> {
    let mut v = Vec::new();
    for _ in 0..STEADY_RUNS {
        v.push(steady(keys.clone()).await?);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// A consumer on `keys` that reports each handled payment's client, and the broker to feed it.
struct Running {
    broker: MemoryBroker,
    handled: mpsc::UnboundedReceiver<u64>,
    held: mpsc::UnboundedReceiver<u64>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

fn start(keys: PgKeys<u64>) -> Running {
    let broker = MemoryBroker::new();
    let (handled_tx, handled) = mpsc::unbounded_channel();
    let (held_tx, held) = mpsc::unbounded_channel();
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client,
        move |p: Payment| {
            let tx = handled_tx.clone();
            async move {
                let _ = tx.send(p.client);
                Ok(())
            }
        },
    )
    .keys(keys)
    .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(60)))
    .on_event(move |e| {
        if e.decision == Decision::Held
            && let Some(k) = e.key
        {
            let _ = held_tx.send(k);
        }
    })
    .build();
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let transport = broker.transport();
    let task = tokio::spawn(async move {
        let _ = consumer.run(transport, s.notified_owned()).await;
    });
    Running {
        broker,
        handled,
        held,
        stop,
        task,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<u64>, want: u64, what: &str) -> Res<()> {
    loop {
        match tokio::time::timeout(STUCK, rx.recv()).await {
            Ok(Some(k)) if k == want => return Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{what}: the consumer stopped").into()),
            Err(_) => return Err(format!("{what}: nothing for key {want}").into()),
        }
    }
}

struct PgFigures {
    miss: Vec<f64>,
    select: Vec<f64>,
    wake: Vec<f64>,
    listen: Vec<f64>,
}

async fn pg_latencies(url: &str, schema: &str) -> Res<PgFigures> {
    let keys: PgKeys<u64> = PgKeys::builder(url)
        .schema(schema)
        .table("keys")
        .channel(format!("{schema}_keys"))
        .connect()
        .await?;
    keys.install_notify_trigger().await?;
    let table = format!("\"{schema}\".\"keys\"");
    let mut plain = sqlx::PgConnection::connect(url).await?;
    // Misses: every key in the table before its message, none in the cache.
    for k in 0..SAMPLES {
        sqlx::query(&format!("INSERT INTO {table} (key) VALUES ($1)"))
            .bind(k as i64)
            .execute(&mut plain)
            .await?;
    }
    let mut run = start(keys.clone());
    let mut miss = Vec::new();
    for k in 0..SAMPLES {
        let t = Instant::now();
        run.broker.publish(body(k));
        next(&mut run.handled, k, "miss").await?;
        miss.push(ms(t.elapsed()));
    }
    // The bare query on a pool, as the source asks it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await?;
    let mut select = Vec::new();
    for k in 0..SAMPLES {
        let t = Instant::now();
        let (_known,): (bool,) = sqlx::query_as(&format!(
            "SELECT EXISTS(SELECT 1 FROM {table} WHERE key = $1)"
        ))
        .bind(k as i64)
        .fetch_one(&pool)
        .await?;
        select.push(ms(t.elapsed()));
    }
    // Wakes: the message held first, then its key inserted by a plain INSERT.
    let mut wake = Vec::new();
    for k in SAMPLES..2 * SAMPLES {
        run.broker.publish(body(k));
        next(&mut run.held, k, "held").await?;
        let t = Instant::now();
        sqlx::query(&format!("INSERT INTO {table} (key) VALUES ($1)"))
            .bind(k as i64)
            .execute(&mut plain)
            .await?;
        next(&mut run.handled, k, "wake").await?;
        wake.push(ms(t.elapsed()));
    }
    run.stop.notify_one();
    let _ = run.task.await;
    // The bare round trip of the same operation: an INSERT into a table with the same
    // trigger, the notification received by a bare PgListener.
    let channel = format!("{schema}_bare");
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".\"bare\" (key BIGINT PRIMARY KEY)"
    ))
    .execute(&mut plain)
    .await?;
    let trigger = prereq::sql::notify_trigger_sql(Some(schema), "bare", "key", &channel)?;
    sqlx::raw_sql(&trigger).execute(&mut plain).await?;
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(&channel).await?;
    let mut listen = Vec::new();
    for k in 0..SAMPLES {
        let t = Instant::now();
        sqlx::query(&format!(
            "INSERT INTO \"{schema}\".\"bare\" (key) VALUES ($1)"
        ))
        .bind(k as i64)
        .execute(&mut plain)
        .await?;
        let got = tokio::time::timeout(STUCK, listener.recv()).await??;
        if got.payload() != k.to_string() {
            return Err(format!("bare listener: got {:?}", got.payload()).into());
        }
        listen.push(ms(t.elapsed()));
    }
    for v in [&mut miss, &mut select, &mut wake, &mut listen] {
        v.sort_by(f64::total_cmp);
    }
    Ok(PgFigures {
        miss,
        select,
        wake,
        listen,
    })
}

async fn bench() -> Res<()> {
    let mut json: Vec<(String, f64)> = Vec::new();
    let mut table: Vec<String> = Vec::new();

    let memory = MemoryKeys::new();
    for k in 0..STEADY_KEYS {
        memory.insert(k);
    }
    let memory_ns = steady_median(&memory).await?;
    json.push(("keys_steady_ns_memory".into(), memory_ns));
    table.push(format!("steady, MemoryKeys: {memory_ns:.0} ns/msg"));

    let dir = std::env::temp_dir().join(format!("prereq-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sqlite: SqliteKeys<u64> = SqliteKeys::open(dir.join("keys.db")).await?;
    for k in 0..STEADY_KEYS {
        sqlite.insert(&k).await?;
    }
    let sqlite_ns = steady_median(&sqlite).await?;
    json.push(("keys_steady_ns_sqlite".into(), sqlite_ns));
    json.push(("keys_steady_ratio_sqlite".into(), sqlite_ns / memory_ns));
    table.push(format!(
        "steady, SqliteKeys: {sqlite_ns:.0} ns/msg ({:.2}x MemoryKeys)",
        sqlite_ns / memory_ns
    ));
    drop(sqlite);
    let _ = std::fs::remove_dir_all(&dir);

    let url = pg_url();
    match sqlx::PgConnection::connect(&url).await {
        Err(e) => eprintln!("PostgreSQL unreachable ({e}): its figures are not measured"),
        Ok(mut admin) => {
            let schema = format!("prq_bench_keys_{}", std::process::id());
            sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
                .execute(&mut admin)
                .await?;
            let result = async {
                let pg: PgKeys<u64> = PgKeys::builder(&url)
                    .schema(&schema)
                    .table("steady")
                    .channel(format!("{schema}_steady"))
                    .connect()
                    .await?;
                for k in 0..STEADY_KEYS {
                    pg.insert(&k).await?;
                }
                let pg_ns = steady_median(&pg).await?;
                drop(pg);
                let f = pg_latencies(&url, &schema).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((pg_ns, f))
            }
            .await;
            let dropped = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                .execute(&mut admin)
                .await;
            let (pg_ns, f) = result?;
            dropped?;
            json.push(("keys_steady_ns_pg".into(), pg_ns));
            json.push(("keys_steady_ratio_pg".into(), pg_ns / memory_ns));
            table.push(format!(
                "steady, PgKeys: {pg_ns:.0} ns/msg ({:.2}x MemoryKeys)",
                pg_ns / memory_ns
            ));
            for (name, v) in [
                ("pg_miss", &f.miss),
                ("pg_select", &f.select),
                ("pg_wake", &f.wake),
                ("pg_listen", &f.listen),
            ] {
                json.push((format!("{name}_p50_ms"), percentile(v, 50.0)));
                json.push((format!("{name}_p99_ms"), percentile(v, 99.0)));
            }
            let p99 = |v: &[f64]| percentile(v, 99.0);
            json.push(("pg_miss_ratio_p99".into(), p99(&f.miss) / p99(&f.select)));
            json.push(("pg_wake_ratio_p99".into(), p99(&f.wake) / p99(&f.listen)));
            table.push(format!(
                "miss from PostgreSQL, publish → handler: p50 {:.2} ms, p99 {:.2} ms; bare \
                 SELECT EXISTS: p50 {:.2} ms, p99 {:.2} ms ({:.2}x at p99)",
                percentile(&f.miss, 50.0),
                p99(&f.miss),
                percentile(&f.select, 50.0),
                p99(&f.select),
                p99(&f.miss) / p99(&f.select)
            ));
            table.push(format!(
                "wake by a plain INSERT, insert → handler: p50 {:.2} ms, p99 {:.2} ms; bare \
                 INSERT → PgListener: p50 {:.2} ms, p99 {:.2} ms ({:.2}x at p99)",
                percentile(&f.wake, 50.0),
                p99(&f.wake),
                percentile(&f.listen, 50.0),
                p99(&f.listen),
                p99(&f.wake) / p99(&f.listen)
            ));
        }
    }
    for row in &table {
        eprintln!("{row}");
    }
    let mut out = String::from("{");
    for (i, (k, v)) in json.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let v = (v * 1000.0).round() / 1000.0;
        let _ = write!(out, "\"{k}\":{v}");
    }
    out.push('}');
    println!("{out}");
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(bench()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench failed: {e}");
            1
        }
    };
    drop(rt);
    std::process::exit(code);
}
