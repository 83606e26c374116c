//! The payment demo's consumer on prereq, wire-compatible with the classic Go demo: a payment
//! whose client is not registered yet is held (unacknowledged), released the moment the client
//! is registered, else deferred through a broker delay with a linear 1 s backoff, and
//! dead-lettered to `payment-processor.dead` after its last attempt (`x-retry-limit`, 10).
//!
//! ```text
//! cargo run --example consumer          # until Ctrl-C / SIGTERM
//! cargo run --example producer -- p 5   # in another terminal: held
//! cargo run --example producer -- c 5   # released and processed
//! ```
//!
//! Registered clients are kept in an SQLite file, as the Go demo keeps them in `mydb.db`: a
//! restarted consumer still knows every client. Environment:
//!
//! * `AMQP_ADDR`: the broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`); for an
//!   `amqps://` one, `AMQP_TLS_CA_FILE` (an authority to trust besides the system's),
//!   `AMQP_TLS_CERT_FILE` and `AMQP_TLS_KEY_FILE` (a client certificate, PEM);
//! * `PREREQ_DB`: the client store: an SQLite file (default `prereq-demo.db` in the working
//!   directory), or a `postgres://` URL for several instances sharing it (build with
//!   `--features postgres`): a client registered through any instance wakes the payments every
//!   instance holds;
//! * `PREREQ_DB_TABLE`: the clients' table (default `clients`; with PostgreSQL also the
//!   notification channel);
//! * `PREREQ_PREFIX`: a prefix for every exchange and queue name (default none: the demo's own
//!   names), to run separate demos on one broker;
//! * `PREREQ_PARTITIONS`: run as one instance of a partitioned group (see `docs/scaling.md`):
//!   payments are spread over that many partition queues by client, each instance is the
//!   active consumer of its share, and one instance at a time routes the demo's
//!   `payment-processor` queue into the partitions. Needs a PostgreSQL `PREREQ_DB`; every
//!   instance must be given the same number.
//!
//! On Ctrl-C or SIGTERM it stops taking deliveries, lets running handlers finish and gives every
//! held message back to the broker before exiting. With `--features metrics` it also prints
//! prereq's metrics on exit.

mod payments;

use std::process::ExitCode;

use payments::{Clients, Payment};
use prereq::amqp::DelayMechanism;
use prereq::{Decision, Event, HandlerError, Report};

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // lapin logs the plugin probe's expected `503 unknown exchange type` as an error;
                // prereq logs its own warnings (reconnects, failed copies). RUST_LOG overrides.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off")),
        )
        .try_init();
    let result = run().await;
    match result {
        Ok(report) => {
            println!("stopped: {report:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("consumer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<Report, Box<dyn std::error::Error>> {
    let clients = Clients::from_env().await?;
    println!("clients kept in {clients}");
    let names = payments::names();
    let broker = payments::connect("prereq-consumer-example").await?;
    println!("connected to {}", broker.addr());
    let (transport, instance) = payments::Instance::start(&broker, &names, &clients).await?;
    match (broker.mechanism(), &instance.partitions) {
        (DelayMechanism::DelayedExchange, None) => println!(
            "delayed payments go through `{}` (x-delayed-message, the delayed-message plugin)",
            names.payments_exchange
        ),
        (_, None) => println!(
            "this broker has no delayed-message plugin: delayed payments wait in TTL delay \
             queues ({}.<ms>ms), then come back through `{}` to `{}` (the Go demo itself \
             needs the plugin to run)",
            names.delay_queue_prefix, names.payments_exchange, names.reprocess_queue
        ),
        (DelayMechanism::DelayedExchange, Some(p)) => println!(
            "delayed payments go back to their partition through `{}.retry` (x-delayed-message)",
            p.exchange().name()
        ),
        (_, Some(p)) => println!(
            "this broker has no delayed-message plugin: delayed payments wait in TTL delay \
             queues ({}.delay.<ms>ms), then go back to their partition",
            p.exchange().name()
        ),
    }
    match &instance.partitions {
        None => println!(
            "consuming {} and {}, clients from {}, dead letters to {}; Ctrl-C to stop",
            names.payments_queue,
            names.reprocess_queue,
            names.clients_queue,
            names.dead_letter_queue
        ),
        Some(p) => println!(
            "one instance of a group over {} partitions ({}.0 … {}.{}), clients from {}, \
             payments routed from {} by client; Ctrl-C to stop",
            p.count(),
            p.exchange().name(),
            p.exchange().name(),
            p.count() - 1,
            names.clients_queue,
            names.payments_queue
        ),
    }
    let consumer = payments::consumer(clients, process)
        .on_event(print_decision)
        .build();

    #[cfg(feature = "metrics")]
    let snapshotter = {
        // Any `metrics` exporter works; this one keeps the figures to print them on exit.
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install()?;
        snapshotter
    };
    let report = consumer.run(transport, shutdown()).await;
    if let Some(routed) = instance.finish().await? {
        println!("router: {routed:?}");
    }
    let report = report?;
    #[cfg(feature = "metrics")]
    print_metrics(&snapshotter);
    Ok(report)
}

/// Process a payment: its client is registered (prereq guarantees it).
async fn process(p: Payment) -> Result<(), HandlerError> {
    println!(
        "  -> processing payment {} of client {}: {} on {}",
        p.id, p.client_id, p.value, p.operation_date
    );
    Ok(())
}

/// The `metrics` feature's counters, gauges and histogram, one line each.
#[cfg(feature = "metrics")]
fn print_metrics(snapshotter: &metrics_util::debugging::Snapshotter) {
    use metrics_util::debugging::DebugValue;
    println!("metrics:");
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let value = match value {
            DebugValue::Counter(n) => n.to_string(),
            DebugValue::Gauge(g) => g.into_inner().to_string(),
            DebugValue::Histogram(v) => {
                let mut ms: Vec<f64> = v.iter().map(|x| x.into_inner() * 1e3).collect();
                ms.sort_by(f64::total_cmp);
                match (ms.first(), ms.get(ms.len() / 2), ms.last()) {
                    (Some(min), Some(p50), Some(max)) => format!(
                        "{} samples, min/p50/max {min:.2}/{p50:.2}/{max:.2} ms",
                        ms.len()
                    ),
                    _ => "no samples".to_owned(),
                }
            }
        };
        println!("  {}{{{}}} {value}", key.name(), labels.join(","));
    }
}

/// One readable line per decision: payment, client, attempt, what happened.
fn print_decision(e: &Event<u64>) {
    let client = e.key.map_or_else(|| "?".to_owned(), |k| k.to_string());
    match (&e.decision, e.message_id.as_deref()) {
        (Decision::Registered, _) => println!("client {client}: registered"),
        (decision, id) => println!(
            "payment {} client {client} attempt {}: {decision}",
            id.unwrap_or("(bad body)"),
            e.attempt
        ),
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("shutting down: giving held messages back to the broker");
}
