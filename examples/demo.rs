//! The payment race on the in-memory broker, under tokio's paused clock: a minute of broker
//! time runs in milliseconds, and the timeline is exactly the same on every run. The times
//! printed are that simulated broker time, not the wall clock.
//!
//! `cargo run --example demo`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prereq::memory::{MemoryBroker, Stored};
use prereq::{Backoff, Decision, DependentConsumer, Event, HandlerError, HoldBudget};
use tokio::time::{Instant, sleep};

#[derive(serde::Deserialize)]
struct Payment {
    id: String,
    #[serde(rename = "clientId")]
    client_id: u64,
    value: f64,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

fn payment(id: &str, client: u64) -> Stored {
    Stored::message(format!(
        r#"{{"id":"{id}","clientId":{client},"value":10.5,"operationDate":"2026-11-26T10:00:00Z"}}"#
    ))
    .with_id(id)
}

fn client(id: u64) -> Stored {
    Stored::registration(format!(r#"{{"id":{id},"name":"client {id}"}}"#))
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let broker = MemoryBroker::new();
    let start = Instant::now();
    let policy = Backoff::linear(Duration::from_secs(1)).max_attempts(3);
    let budget = HoldBudget::DEFAULT.max_time(Duration::from_secs(2));
    println!(
        "prereq demo: payments racing their clients (linear 1 s backoff, 3 attempts, hold 2 s)"
    );
    println!(
        "times are simulated broker time (tokio's paused clock): the run takes milliseconds\n"
    );
    println!(
        "{:>8}  {:<10} {:<8} {:<7} decision",
        "time", "message", "client", "attempt"
    );

    let flaky_once = Arc::new(AtomicBool::new(true));
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        move |p: Payment| {
            // p5's database is busy the first time: a retryable error.
            let fail = p.id == "p5" && flaky_once.swap(false, Ordering::SeqCst);
            async move {
                if fail {
                    return Err(HandlerError::retry("database busy"));
                }
                let _ = p.value;
                Ok(())
            }
        },
    )
    .id(|p: &Payment| p.id.clone())
    .registrations(|c: &Client| c.id)
    .policy(policy)
    .budget(budget)
    .on_event(move |e: &Event<u64>| print_line(start, e))
    .build();

    let producer = {
        let broker = broker.clone();
        async move {
            broker.publish_stored(payment("p1", 1)); // before its client
            broker.publish_stored(client(2));
            sleep(Duration::from_millis(200)).await;
            broker.publish_stored(payment("p2", 2)); // after its client
            broker.publish_stored(payment("p3", 3)); // client 3 never comes
            broker.publish(b"{\"id\": \"p4\", \"clientId\": ".to_vec()); // malformed
            broker.publish_stored(payment("p5", 2)); // fails once
            broker.publish_stored(payment("p6", 4)); // client 4 comes late
            sleep(Duration::from_millis(300)).await;
            broker.publish_stored(client(1)); // p1 is released at once
            sleep(Duration::from_millis(3500)).await;
            broker.publish_stored(client(4)); // p6 was deferred once, then held again
        }
    };
    let shutdown = {
        let broker = broker.clone();
        async move {
            // Run until the broker is empty, checking once per virtual second.
            loop {
                sleep(Duration::from_secs(1)).await;
                if broker.pending() == 0 {
                    break;
                }
            }
        }
    };
    let (report, ()) = tokio::join!(consumer.run(broker.transport(), shutdown), producer);
    let report = report.expect("the in-memory transport does not fail");

    println!(
        "\nsummary after {:.1} s of broker time:",
        start.elapsed().as_secs_f64()
    );
    println!(
        "  {} payments handled, {} dead-lettered; {} times a payment was held ({} released by \
         its client's registration, at most {} held at once), {} deferrals through the broker",
        report.handled,
        report.dead_lettered,
        report.held,
        report.released,
        report.peak_held,
        report.deferred,
    );
    let stats = broker.stats();
    println!(
        "  broker: {} published, {} delayed re-publishes",
        stats.published, stats.deferred
    );
    for dl in broker.dead_letters() {
        let id = dl.message.message_id.as_deref().unwrap_or("(bad body)");
        println!(
            "  dead letter {id}: {} — {}",
            dl.dead_letter.kind, dl.dead_letter.reason
        );
    }
}

fn print_line(start: Instant, e: &Event<u64>) {
    let message = e.message_id.as_deref().unwrap_or(match e.decision {
        Decision::Registered => "-",
        // A body that does not decode has no payment id to show.
        _ => "(bad body)",
    });
    let client = e.key.map_or_else(|| "?".to_owned(), |k| k.to_string());
    println!(
        "{:>7.3}s  {:<10} {:<8} {:<7} {}",
        (e.at - start).as_secs_f64(),
        message,
        client,
        e.attempt,
        e.decision
    );
}
