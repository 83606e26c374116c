//! Shutdown is any future, whatever its output: `tokio::signal::ctrl_c()` (an
//! `io::Result<()>`) as a service passes it. A real SIGINT sent to this test process stops the
//! consumer gracefully: the held message goes back to the broker, and `run` returns its report.
//! (Its own test binary: the signal handler is process-wide.)

mod common;

use std::time::Duration;

use common::*;
use prereq::Decision;
use prereq::memory::MemoryBroker;

#[tokio::test]
async fn ctrl_c_stops_the_consumer_gracefully() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(10, 1));
    broker.publish(payment(11, 2)); // held: client 2 never comes

    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) }).build();
    let run = tokio::spawn(consumer.run(broker.transport(), tokio::signal::ctrl_c()));
    // The consumer is running (so the signal handler is installed) once it decided.
    tokio::time::timeout(
        Duration::from_secs(30),
        rec.until(|ev| {
            count(ev, |e| e.decision == Decision::Handled) == 1
                && count(ev, |e| e.decision == Decision::Held) == 1
        }),
    )
    .await
    .expect("the consumer decided");

    let status = std::process::Command::new("kill")
        .args(["-INT", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());

    let report = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("SIGINT stopped the consumer")
        .expect("the run task")
        .expect("a clean stop");
    assert_eq!((report.handled, report.requeued), (1, 1));
    assert_eq!(
        broker.pending(),
        1,
        "the held payment went back to the broker"
    );
}
