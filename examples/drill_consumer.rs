//! The consumer the reliability drills run as a child process (`tests/drill_crash.rs`,
//! `tests/amqp_graceful_shutdown.rs`): a payment consumer on RabbitMQ that writes down what it
//! does, so that a test can check it after killing it.
//!
//! It keeps two things across restarts, both in one append-only log file (`DRILL_OUT`):
//!
//! * the known clients (`R` lines): a [`KeyStore`] that appends the key *before* the engine
//!   acknowledges the registration, and reloads the file when the process starts. A consumer
//!   that only kept its keys in memory would forget, after a crash, every client registered
//!   before it, and its payments would wait for a registration that already came and went.
//! * the handled payments (`P` lines). The handler's "effect" is that line, and the set of
//!   payment ids already in the file is its deduplication record: the effect and the record are
//!   one write, so a redelivered payment (at-least-once) is recognised as a duplicate even when
//!   the process died between the write and the acknowledgement. This is how a service dedupes
//!   by message id: record the id in the same transaction as the effect.
//!
//! Log lines (one `write` each, unbuffered, so a SIGKILL loses none that was written):
//!
//! ```text
//! READY <pid>                                   consuming, signal handlers installed
//! R <client> <unix-ns>                          a client became known (before its ack)
//! P <payment> <client> <known 0|1> <first 0|1> <unix-ns>
//!                                               the handler ran: was the client known to
//!                                               this process's key store at that moment,
//!                                               and is this the first time the payment ran
//! H <payment> | D <payment> | Q <payment>       held | deferred | given back at shutdown
//! X <payment or -> <reason kind>                dead-lettered
//! EXIT handled=… held=… requeued=… …            clean shutdown (SIGINT or SIGTERM), exit 0
//! ```
//!
//! Configuration (environment): `AMQP_ADDR`, `DRILL_QUEUE`, `DRILL_KEYS` (registration queue),
//! `DRILL_OUT`, and optionally `DRILL_HOLD_MS` (default 500), `DRILL_HOLD_MAX` (200 messages),
//! `DRILL_DELAY_MS` (constant backoff, 200), `DRILL_ATTEMPTS` (1000), `DRILL_CONCURRENCY` (16),
//! `DRILL_WORK_MS` (simulated work after the effect of each payment, 0).
//!
//! ```sh
//! DRILL_QUEUE=pay DRILL_KEYS=clients DRILL_OUT=/tmp/drill.log cargo run --example drill_consumer
//! ```

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prereq::amqp::{AmqpConfig, AmqpError, AmqpTransport, DelayMode, prefetch_for};
use prereq::{
    Backoff, Decision, Delivery, DeliveryId, DependentConsumer, HandlerError, HoldBudget, KeyStore,
    Settle, Transport,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(serde::Deserialize)]
struct Payment {
    id: u64,
    #[serde(rename = "clientId")]
    client_id: u64,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

/// The append-only log, and what it already says.
struct Log {
    file: Mutex<File>,
    clients: Mutex<HashSet<u64>>,
    handled: Mutex<HashSet<u64>>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Log {
    /// Open (create) the log and load the clients and payments of earlier runs.
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut clients = HashSet::new();
        let mut handled = HashSet::new();
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                let mut words = line.split(' ');
                let tag = words.next();
                let n = words.next().and_then(|w| w.parse::<u64>().ok());
                match (tag, n) {
                    (Some("R"), Some(c)) => {
                        clients.insert(c);
                    }
                    (Some("P"), Some(p)) => {
                        handled.insert(p);
                    }
                    _ => {}
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Mutex::new(file),
            clients: Mutex::new(clients),
            handled: Mutex::new(handled),
        })
    }

    /// Append one line with a single unbuffered write.
    fn line(&self, text: &str) {
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        f.write_all(format!("{text}\n").as_bytes())
            .expect("write the drill log");
    }

    /// The handler's effect and its dedupe record, in one write.
    fn handled(&self, payment: u64, client: u64, known: bool) {
        let mut handled = self.handled.lock().unwrap_or_else(PoisonError::into_inner);
        let first = handled.insert(payment);
        self.line(&format!(
            "P {payment} {client} {} {} {}",
            u8::from(known),
            u8::from(first),
            now_ns()
        ));
    }
}

/// Known clients, persisted to the log before the engine acknowledges their registration.
struct FileKeys(Arc<Log>);

impl KeyStore<u64> for FileKeys {
    fn contains(&self, key: &u64) -> bool {
        self.0
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    fn insert(&self, key: u64) -> bool {
        let mut clients = self
            .0
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let new = clients.insert(key);
        if new {
            self.0.line(&format!("R {key} {}", now_ns()));
        }
        new
    }
}

/// The transport behind an `Arc`, so that the connection can be closed after the run.
struct Shared(Arc<AmqpTransport>);

impl Transport for Shared {
    type Error = AmqpError;

    async fn recv(&self) -> Result<Option<Delivery>, AmqpError> {
        self.0.recv().await
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), AmqpError> {
        self.0.settle(id, settle).await
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set"))
}

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number")),
        Err(_) => default,
    }
}

#[tokio::main]
async fn main() {
    let queue = env("DRILL_QUEUE");
    let keys = env("DRILL_KEYS");
    let out = PathBuf::from(env("DRILL_OUT"));
    let hold = Duration::from_millis(env_or("DRILL_HOLD_MS", 500));
    let hold_max = env_or("DRILL_HOLD_MAX", 200) as usize;
    let delay = Duration::from_millis(env_or("DRILL_DELAY_MS", 200));
    let attempts = env_or("DRILL_ATTEMPTS", 1000) as u32;
    let concurrency = env_or("DRILL_CONCURRENCY", 16) as usize;
    let work = Duration::from_millis(env_or("DRILL_WORK_MS", 0));

    let log = Arc::new(Log::open(&out).expect("open the drill log"));
    let config = AmqpConfig::new(queue, keys)
        .with_delay_mode(DelayMode::DelayQueues)
        .with_prefetch(prefetch_for(hold_max, concurrency))
        .with_connection_name(format!("prereq-drill-{}", std::process::id()));
    let transport = Arc::new(
        AmqpTransport::connect(config)
            .await
            .expect("connect to RabbitMQ"),
    );

    let store = FileKeys(log.clone());
    let handler_log = log.clone();
    let observer_log = log.clone();
    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client_id)
        .id(|p: &Payment| p.id.to_string())
        .registrations(|c: &Client| c.id)
        .key_store(store)
        .policy(
            Backoff::constant(delay)
                .with_max_attempts(attempts)
                .build()
                .expect("a valid policy"),
        )
        .budget(
            HoldBudget::default()
                .with_max_messages(hold_max)
                .with_max_time(hold),
        )
        .concurrency(concurrency)
        .on_event(move |e| {
            let id = e.message_id.as_deref().unwrap_or("-");
            match &e.decision {
                Decision::Held => observer_log.line(&format!("H {id}")),
                Decision::Deferred { .. } => observer_log.line(&format!("D {id}")),
                Decision::Requeued => observer_log.line(&format!("Q {id}")),
                Decision::DeadLettered(dl) => observer_log.line(&format!("X {id} {}", dl.kind)),
                _ => {}
            }
        })
        .handler(move |p: Payment| {
            let log = handler_log.clone();
            async move {
                // "Was the client known when the payment ran?", asked of this process's store
                // at the moment the handler runs: the engine must never make it say no.
                let known = log
                    .clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&p.client_id);
                log.handled(p.id, p.client_id, known);
                // Work after the effect (a follow-up call, say): a crash in this window
                // leaves an effect whose message is not acknowledged, hence a redelivery.
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .expect("a valid consumer");

    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    log.line(&format!("READY {}", std::process::id()));

    let report = consumer
        .run(Shared(transport.clone()), shutdown)
        .await
        .expect("the consumer stopped on a transport error");
    transport.close().await.expect("close the connection");
    log.line(&format!(
        "EXIT handled={} held={} released={} deferred={} dead_lettered={} requeued={} \
         settle_failures={}",
        report.handled,
        report.held,
        report.released,
        report.deferred,
        report.dead_lettered,
        report.requeued,
        report.settle_failures
    ));
}
