//! Two consumers in one process on one broker connection: each holds its own messages and
//! releases them only on its own registrations (two routes, two key sources), and the broker
//! sees exactly one connection.
#![cfg(feature = "amqp")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use prereq::amqp::{Broker, BrokerOptions, DelayMode, Exchange, Queue, Route};
use prereq::{DependentConsumer, HoldBudget, MemoryKeys};

#[derive(serde::Deserialize)]
struct Item {
    id: u64,
    client: u64,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

const N: u64 = 20;

/// How many of the connections the broker lists carry `name` (`None` where `rabbitmqctl`
/// cannot see the broker under test: only the local default node is asked).
fn connections_named(name: &str) -> Option<usize> {
    let addr = std::env::var("AMQP_ADDR").unwrap_or_default();
    if !(addr.is_empty() || addr.contains("@127.0.0.1:5672/") || addr.contains("@localhost:5672/"))
    {
        return None;
    }
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!(r#"{{"connection_name","{name}"}}"#)))
            .count()
    })
}

/// Poll `count` until it reaches `n`; panics with `what` after 30 s.
async fn reach(what: &str, n: u64, count: impl Fn() -> u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {n} after 30 s",
            count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routes_on_one_connection_release_only_on_their_own_registrations() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let name = support::unique("two");
    let cleanup = support::Cleanup::new();
    let connection_name = format!("{name}connection");
    let broker = Broker::connect(
        BrokerOptions::from_env()
            .delay_mode(DelayMode::DelayQueues)
            .connection_name(&connection_name),
    )
    .await
    .expect("connect");

    // Orders and refunds, each with its own registrations, keyed by the same client ids.
    let route = |what: &str| {
        Route::new(
            Queue::classic(format!("{name}{what}"))
                .bound_to(Exchange::direct(format!("{name}x")), what),
        )
        .registrations(Queue::classic(format!("{name}{what}.clients")).bound_to(
            Exchange::direct(format!("{name}x")),
            format!("{what}.client"),
        ))
    };
    let (orders, refunds) = (route("orders"), route("refunds"));
    cleanup.route(&orders).route(&refunds);
    let policy = prereq::Backoff::DEFAULT;
    cleanup
        .delay_queues(&orders, &policy)
        .delay_queues(&refunds, &policy);

    let ch = support::confirm_channel(&conn).await;
    let exchange = format!("{name}x");
    let mut runs = Vec::new();
    let mut seen = Vec::new();
    let mut stops = Vec::new();
    for (what, route) in [("orders", orders), ("refunds", refunds)] {
        let transport = broker.transport(route).await.expect("declare the route");
        let handled: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let h = handled.clone();
        let consumer = DependentConsumer::builder(
            |i: &Item| i.client,
            move |i: Item| {
                let h = h.clone();
                async move {
                    h.lock().unwrap().push((i.client, i.id));
                    Ok::<(), prereq::HandlerError>(())
                }
            },
        )
        .registrations(|c: &Client| c.id)
        .keys(MemoryKeys::new())
        .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(60)))
        .build();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runs.push((
            what,
            tokio::spawn(consumer.run(transport, async {
                let _ = stopped.await;
            })),
        ));
        seen.push(handled);
        stops.push(stop);
    }

    // N items for each route, their clients not registered yet: both hold everything.
    for what in ["orders", "refunds"] {
        for id in 0..N {
            let body = format!(r#"{{"id":{id},"client":{id}}}"#);
            support::publish(
                &ch,
                &exchange,
                what,
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await;
        }
    }
    // Only the orders' clients are registered.
    for id in 0..N {
        let body = format!(r#"{{"id":{id}}}"#);
        support::publish(
            &ch,
            &exchange,
            "orders.client",
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    reach("orders handled", N, || seen[0].lock().unwrap().len() as u64).await;
    // The refunds are still held: their clients were registered with the orders only. While
    // both consumers run, one connection carries them.
    assert!(
        seen[1].lock().unwrap().is_empty(),
        "refunds released by the orders' registrations: {:?}",
        seen[1].lock().unwrap()
    );
    match connections_named(&connection_name) {
        Some(n) => assert_eq!(n, 1, "connections named {connection_name}"),
        None => println!("connection count not checked: rabbitmqctl does not see this broker"),
    }
    // Now the refunds' clients: the refunds run.
    for id in 0..N {
        let body = format!(r#"{{"id":{id}}}"#);
        support::publish(
            &ch,
            &exchange,
            "refunds.client",
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    reach("refunds handled", N, || {
        seen[1].lock().unwrap().len() as u64
    })
    .await;
    for stop in stops {
        let _ = stop.send(());
    }
    for (what, run) in runs {
        let report = run.await.expect("join").expect("clean stop");
        assert_eq!(report.handled, N, "{what}: {report:?}");
        assert_eq!(report.deferred, 0, "{what}: {report:?}");
    }
    for handled in &seen {
        let mut got = handled.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(got, (0..N).map(|i| (i, i)).collect::<Vec<_>>());
    }
    broker.close().await.expect("close the connection");
}
