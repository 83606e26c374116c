//! The consumer the reliability drills run as a child process (`tests/drill_crash.rs`,
//! `tests/amqp_graceful_shutdown.rs`, …): the `consumer` example's configuration exactly (the
//! same route, client store, policy and hold, from `examples/payments`), plus a journal of what
//! it does, so that a test can check it after killing it.
//!
//! The journal (`DRILL_OUT`) is an append-only file; one `write` per line, unbuffered, so a
//! SIGKILL loses none that was written:
//!
//! ```text
//! READY <pid>                                   consuming, signal handlers installed
//! R <client> <unix-ns>                          a client became known (recorded in the store)
//! P <payment> <client> <known 0|1> <first 0|1> <unix-ns>
//!                                               the handler ran: did the client store know
//!                                               the client at that moment, and is this the
//!                                               first time the payment ran (the journal's
//!                                               payment ids are the dedupe record)
//! E <payment> <client> <start-ns> <end-ns>     the handler returned: when it was entered, when
//!                                               it returned (a killed process's last handlers
//!                                               have a `P` line and no `E` line)
//! H <payment> | D <payment> | Q <payment>       held | deferred | given back at shutdown
//! X <payment or -> <reason kind>                dead-lettered
//! EXIT handled=… held=… requeued=… …            clean shutdown (SIGINT or SIGTERM), exit 0
//! ```
//!
//! The handler's "effect" is its `P` line, and the payment ids already in the journal are its
//! deduplication record: effect and record are one write, so a redelivered payment
//! (at-least-once) is recognised as a duplicate even when the process died between the write and
//! the acknowledgement. This is how a service dedupes by message id: record the id in the same
//! transaction as the effect.
//!
//! Configuration (environment), as for the `consumer` example: `AMQP_ADDR`, `PREREQ_PREFIX`,
//! `PREREQ_DB`, `PREREQ_DB_TABLE`, `PREREQ_HOLD_MS`, `PREREQ_PARTITIONS`; plus `DRILL_OUT` (the
//! journal) and `DRILL_WORK_MS` (simulated work after the effect of each payment, default 0).

mod payments;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use payments::{Clients, Payment, PaymentId};
use prereq::{Decision, KeySource};
use tokio::signal::unix::{SignalKind, signal};

/// The append-only journal, and the payments it already holds.
struct Journal {
    file: Mutex<File>,
    handled: Mutex<HashSet<String>>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Journal {
    /// Open (create) the journal and load the payments of earlier runs.
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut handled = HashSet::new();
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                let mut words = line.split(' ');
                if let (Some("P"), Some(p)) = (words.next(), words.next()) {
                    handled.insert(p.to_owned());
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Mutex::new(file),
            handled: Mutex::new(handled),
        })
    }

    /// Append one line with a single unbuffered write.
    fn line(&self, text: &str) {
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        f.write_all(format!("{text}\n").as_bytes())
            .expect("write the drill journal");
    }

    /// The handler's effect and its dedupe record, in one write.
    fn handled(&self, payment: &PaymentId, client: u64, known: bool) {
        let mut handled = self.handled.lock().unwrap_or_else(PoisonError::into_inner);
        let first = handled.insert(payment.to_string());
        self.line(&format!(
            "P {payment} {client} {} {} {}",
            u8::from(known),
            u8::from(first),
            now_ns()
        ));
    }
}

#[tokio::main]
async fn main() {
    let out = PathBuf::from(std::env::var("DRILL_OUT").expect("DRILL_OUT must be set"));
    let work = Duration::from_millis(
        std::env::var("DRILL_WORK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let journal = Arc::new(Journal::open(&out).expect("open the drill journal"));
    let clients = Clients::from_env().await.expect("open the client store");
    let names = payments::names();
    let broker = payments::connect(&format!("prereq-drill-{}", std::process::id()))
        .await
        .expect("connect to RabbitMQ");
    let (transport, instance) = payments::Instance::start(&broker, &names, &clients)
        .await
        .expect("declare the route");

    let handler = {
        let journal = Arc::clone(&journal);
        let clients = clients.clone();
        move |p: Payment| {
            let journal = Arc::clone(&journal);
            let clients = clients.clone();
            async move {
                let entered = now_ns();
                // "Was the client known when the payment ran?", asked of the client store at the
                // moment the handler runs, as the Go demo's consumer asks its database: prereq
                // must never make it say no.
                let known = clients.contains(&p.client_id).await.unwrap_or(false);
                journal.handled(&p.id, p.client_id, known);
                // Work after the effect (a follow-up call, say): a crash in this window leaves
                // an effect whose message is not acknowledged, hence a redelivery.
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                journal.line(&format!(
                    "E {} {} {entered} {}",
                    p.id,
                    p.client_id,
                    now_ns()
                ));
                Ok(())
            }
        }
    };
    let observer = Arc::clone(&journal);
    let consumer = payments::consumer(clients, handler)
        .on_event(move |e| {
            let id = e.message_id.as_deref().unwrap_or("-");
            match &e.decision {
                Decision::Registered => {
                    if let Some(client) = e.key {
                        observer.line(&format!("R {client} {}", now_ns()));
                    }
                }
                Decision::Held => observer.line(&format!("H {id}")),
                Decision::Deferred { .. } => observer.line(&format!("D {id}")),
                Decision::Requeued => observer.line(&format!("Q {id}")),
                Decision::DeadLettered(dl) => observer.line(&format!("X {id} {}", dl.kind)),
                _ => {}
            }
        })
        .build();

    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    journal.line(&format!("READY {}", std::process::id()));

    let report = consumer
        .run(transport, shutdown)
        .await
        .expect("the consumer stopped on a transport error");
    let routed = instance.finish().await.expect("the router");
    broker.close().await.expect("close the connection");
    journal.line(&format!(
        "EXIT handled={} held={} released={} deferred={} dead_lettered={} requeued={} \
         settle_failures={} routed={}",
        report.handled,
        report.held,
        report.released,
        report.deferred,
        report.dead_lettered,
        report.requeued,
        report.settle_failures,
        routed.map_or(0, |r| r.routed)
    ));
}
