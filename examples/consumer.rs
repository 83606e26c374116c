//! The payment demo's consumer on prereq: a payment whose client is not registered yet is held
//! (unacknowledged), released the moment the client arrives, else deferred through a broker
//! delay with a linear 1 s backoff, and dead-lettered to `payment-processor.dead` after its
//! last attempt (`x-retry-limit`, 10 for the demo's payments).
//!
//! ```text
//! cargo run --example consumer          # until Ctrl-C / SIGTERM
//! cargo run --example producer -- p 5   # in another terminal: held
//! cargo run --example producer -- c 5   # released and processed
//! ```
//!
//! On Ctrl-C or SIGTERM it stops taking deliveries, lets running handlers finish and gives
//! every held message back to the broker before exiting. With `--features metrics` it also
//! prints prereq's metrics on exit.

use std::process::ExitCode;
use std::time::Duration;

use prereq::amqp::topology::{self, PaymentNames};
use prereq::amqp::{AmqpAddr, AmqpTransport, prefetch_for};
use prereq::{Backoff, Decision, DependentConsumer, Event, HandlerError, HoldBudget};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Payment {
    id: String,
    client_id: u64,
    value: f64,
    operation_date: String,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Client {
    id: u64,
    name: String,
}

const CONCURRENCY: usize = 8;

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
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consumer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // A short hold keeps the walk-through brisk: a payment whose client does not come within
    // 5 s is deferred through the broker (1 s, 2 s, … by the policy) and held again on return.
    let budget = HoldBudget::default().with_max_time(Duration::from_secs(5));
    let config = topology::payments(&PaymentNames::default())
        .with_addr(AmqpAddr::from_env())
        .with_prefetch(prefetch_for(budget.max_messages, CONCURRENCY))
        .with_connection_name("prereq-consumer-example");
    let transport = AmqpTransport::connect(config).await?;
    println!(
        "connected to {}; delay mechanism: {}",
        transport.config().addr(),
        transport.mechanism()
    );
    println!(
        "consuming {:?}, registrations from {}, dead letters to {}; Ctrl-C to stop",
        transport.config().queues(),
        transport.config().registration_queue(),
        transport.config().dead_letter_queue()
    );

    let consumer = DependentConsumer::<u64, Payment>::builder()
        .key(|p: &Payment| p.client_id)
        .id(|p: &Payment| p.id.clone())
        .registrations(|c: &Client| c.id)
        .handler(|p: Payment| async move {
            println!(
                "  -> processing payment {} of client {}: {:.2} on {}",
                p.id, p.client_id, p.value, p.operation_date
            );
            Ok::<(), HandlerError>(())
        })
        .policy(Backoff::linear(Duration::from_secs(1)).build()?)
        .budget(budget)
        .concurrency(CONCURRENCY)
        .on_event(print_decision)
        .build()?;

    #[cfg(feature = "metrics")]
    let snapshotter = {
        // Any `metrics` exporter works; this one keeps the figures to print them on exit.
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install()?;
        snapshotter
    };
    let report = consumer.run(transport, shutdown()).await?;
    println!("stopped: {report:?}");
    #[cfg(feature = "metrics")]
    print_metrics(&snapshotter);
    Ok(())
}

/// The `metrics` feature's counters, gauge and histogram, one line each.
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
            id.unwrap_or("(no id)"),
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
