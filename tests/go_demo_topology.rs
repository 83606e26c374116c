//! The Go payment demo's topology and prereq's, on one broker, both ways: the Go demo's
//! declarations (types, flags, arguments and the `""` client binding exactly as its programs
//! make them, `tests/support/go_demo.rs`), then the `consumer` example's configuration (the
//! `drill_consumer` child process) starts and a payment goes through; and prereq first, then
//! the Go declarations, then prereq again. A mismatch in any type, flag or argument is a
//! `PRECONDITION_FAILED` on one side.
//!
//! The Go names are fixed, so each test runs in a private virtual host (created with
//! `rabbitmqctl`, granted to the test's user, deleted afterwards with everything in it); the
//! child consumer is pointed at it through `AMQP_ADDR`. Skipped, with the reason printed, where
//! `rabbitmqctl` cannot manage the broker under test.
//!
//! Where the broker has the delayed-message plugin (probed here), `payments` is declared as the
//! Go demo declares it: `x-delayed-message` with `x-delayed-type: direct`. Without the plugin
//! that declaration cannot succeed on any broker, so the rest of the Go topology is declared
//! as-is and `payments` as a durable `direct` exchange (what prereq falls back to).
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/drill.rs"]
mod drill;
#[path = "support/go_demo.rs"]
mod go_demo;
mod support;

use std::time::Duration;

use drill::{DrillChild, Line};
use go_demo::{GoNames, Vhost};
use lapin::{Connection, ConnectionProperties};

const PATIENCE: Duration = Duration::from_secs(90);

/// The consumer example's configuration on the vhost, with the demo's own names.
async fn start_consumer(vhost: &Vhost, dir: &drill::TempDir, run: &str) -> DrillChild {
    let log = dir.path(&format!("{run}.log"));
    let env = vec![
        ("AMQP_ADDR", vhost.uri.clone()),
        ("PREREQ_PREFIX", String::new()),
        ("PREREQ_DB", dir.path("clients.db").display().to_string()),
    ];
    let mut child = DrillChild::spawn(&log, &env);
    let ready_log = log.clone();
    let mut exited = None;
    drill::wait_until("the consumer to start", PATIENCE, async || {
        if drill::count(&ready_log, |l| *l == Line::Ready) > 0 {
            return Ok(());
        }
        if exited.is_none() {
            exited = std::fs::read_to_string(ready_log.with_extension("stderr"))
                .ok()
                .filter(|e| e.contains("panicked"));
        }
        match &exited {
            // Fail at once, with the broker's refusal (e.g. PRECONDITION_FAILED).
            Some(e) => panic!("the consumer failed to start: {e}"),
            None => Err(String::from("no READY line")),
        }
    })
    .await;
    child.assert_running();
    child
}

async fn stop(mut child: DrillChild) {
    child.signal("TERM");
    let status = child.wait_exit(PATIENCE).await;
    let stderr = child.stderr();
    assert!(status.success(), "consumer exit: {status}; {stderr}");
    assert!(!stderr.contains("PRECONDITION_FAILED"), "{stderr}");
}

/// A Go payment and its client go through the consumer.
async fn payment_goes_through(conn: &Connection, child: &mut DrillChild, id: u64, client: u64) {
    let names = GoNames::with_prefix("");
    let ch = go_demo::channel(conn).await;
    go_demo::publish_payment(&ch, &names, id, client).await;
    go_demo::publish_client(&ch, &names, client).await;
    let log = child.log.clone();
    drill::wait_until("the payment to be handled", PATIENCE, async || {
        let lines = drill::read_log(&log);
        if lines
            .iter()
            .any(|l| matches!(l, Line::Handled { payment, known: true, .. } if *payment == id))
        {
            Ok(())
        } else {
            Err(format!("journal: {lines:?}"))
        }
    })
    .await;
    child.assert_running();
    let _ = ch.close(200, "done".into()).await;
}

/// The broker is reachable, the vhost could be made, and the connection to it.
async fn setup(tag: &str) -> Option<(Vhost, Connection, bool)> {
    support::broker().await?;
    let vhost = Vhost::create(tag)?;
    let conn = Connection::connect(&vhost.uri, ConnectionProperties::default())
        .await
        .expect("connect to the private vhost");
    let plugin = go_demo::has_delayed_plugin(&vhost.uri).await;
    println!("delayed-message plugin on the broker under test: {plugin}");
    Some((vhost, conn, plugin))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prereq_starts_where_the_go_demo_declared_everything() {
    let Some((vhost, conn, plugin)) = setup("go-topo-go-first").await else {
        return;
    };
    go_demo::declare_topology(&conn, &GoNames::with_prefix(""), plugin)
        .await
        .expect("the Go demo's declarations on an empty vhost");
    let dir = drill::TempDir::new("go-topo-go-first");
    let mut child = start_consumer(&vhost, &dir, "first").await;
    payment_goes_through(&conn, &mut child, 5_577_006_791_947_779_410, 5).await;
    stop(child).await;
    // The Go demo restarts on what is there now.
    go_demo::declare_topology(&conn, &GoNames::with_prefix(""), plugin)
        .await
        .expect("the Go demo's declarations again");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_demo_starts_where_prereq_declared_everything() {
    let Some((vhost, conn, plugin)) = setup("go-topo-prereq-first").await else {
        return;
    };
    let dir = drill::TempDir::new("go-topo-prereq-first");
    let child = start_consumer(&vhost, &dir, "first").await;
    stop(child).await;
    go_demo::declare_topology(&conn, &GoNames::with_prefix(""), plugin)
        .await
        .expect("the Go demo's declarations where prereq declared the topology");
    let mut child = start_consumer(&vhost, &dir, "second").await;
    payment_goes_through(&conn, &mut child, 9_223_372_036_854_775_807, 6).await;
    stop(child).await;
    let _ = conn.close(200, "done".into()).await;
}
