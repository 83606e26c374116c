//! With `AmqpConfig::with_registration_stream`, registrations live in a RabbitMQ stream that
//! every consumer reads from its first message: a restarted consumer (with a fresh in-memory key
//! store) and a second instance running beside the first both learn every key registered
//! before they started, so their payments run without waiting for a registration that already
//! came and went.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use prereq::amqp::{AmqpError, Broker, BrokerOptions, DelayMode, Queue, Route};
use prereq::{Decision, DependentConsumer, Event, Report, RunError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);

#[derive(serde::Deserialize)]
struct Payment {
    id: String,
    #[serde(rename = "clientId")]
    client_id: u64,
}

#[derive(serde::Deserialize)]
struct Client {
    id: u64,
}

struct Running {
    events: mpsc::UnboundedReceiver<Event<u64>>,
    seen: Vec<Event<u64>>,
    stop: oneshot::Sender<()>,
    run: JoinHandle<Result<Report, RunError<AmqpError>>>,
}

impl Running {
    async fn start(route: &Route) -> Self {
        let transport =
            Broker::connect(BrokerOptions::new(support::addr()).delay_mode(DelayMode::DelayQueues))
                .await
                .expect("connect")
                .transport(route.clone())
                .await
                .expect("declare");
        let (tx, events) = mpsc::unbounded_channel();
        let consumer =
            DependentConsumer::builder(|p: &Payment| p.client_id, |_p: Payment| async { Ok(()) })
                .id(|p: &Payment| p.id.clone())
                .registrations(|c: &Client| c.id)
                .on_event(move |e: &Event<u64>| {
                    let _ = tx.send(e.clone());
                })
                .build();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let run = tokio::spawn(consumer.run(transport, async {
            let _ = stop_rx.await;
        }));
        Self {
            events,
            seen: Vec::new(),
            stop,
            run,
        }
    }

    /// Wait until this consumer has learnt `n` keys.
    async fn registered(&mut self, n: usize) {
        for _ in 0..n {
            support::wait_for(
                &mut self.events,
                WAIT,
                |e| e.decision == Decision::Registered,
                &mut self.seen,
            )
            .await;
        }
    }

    /// Take the events emitted so far.
    fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
    }

    fn count(&self, pred: impl Fn(&Event<u64>) -> bool) -> usize {
        self.seen.iter().filter(|e| pred(e)).count()
    }

    async fn stop(self) -> Report {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.run)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("run")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_and_parallel_consumers_learn_every_key_from_the_stream() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let prefix = support::unique("stream");
    let route = Route::new(Queue::classic(format!("{prefix}payments")))
        .registrations(Queue::stream(format!("{prefix}clients")));
    let cleanup = support::Cleanup::new();
    cleanup.route(&route);
    let ch = support::confirm_channel(&conn).await;
    let publish = |queue: String, body: String| {
        let ch = ch.clone();
        async move {
            support::publish(
                &ch,
                "",
                &queue,
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await;
        }
    };

    // The first consumer declares the stream; three clients register while it runs.
    let mut first = Running::start(&route).await;
    for id in 1..=3 {
        publish(
            route
                .registration_queue()
                .map(|q| q.name().to_owned())
                .unwrap_or_default(),
            format!(r#"{{"id":{id}}}"#),
        )
        .await;
    }
    first.registered(3).await;
    let report = first.stop().await;
    assert_eq!(report.registered, 3);

    // A restart and a second instance: each reads the stream from the start.
    let mut restarted = Running::start(&route).await;
    let mut beside = Running::start(&route).await;
    restarted.registered(3).await;
    beside.registered(3).await;

    // Payments of clients registered before either started run at once, never held, on
    // whichever instance the broker gives them to.
    let payments = [
        ("p-1", 1),
        ("p-2", 2),
        ("p-3", 3),
        ("p-4", 1),
        ("p-5", 2),
        ("p-6", 3),
    ];
    for (id, client) in payments {
        publish(
            route.consumed()[0].name().to_owned(),
            format!(r#"{{"id":"{id}","clientId":{client}}}"#),
        )
        .await;
    }
    let handled = |r: &Running| r.count(|e| e.decision == Decision::Handled);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        restarted.drain();
        beside.drain();
        if handled(&restarted) + handled(&beside) == payments.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all handled: {:#?} {:#?}",
            restarted.seen,
            beside.seen
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in [&restarted, &beside] {
        assert_eq!(
            r.count(|e| e.decision == Decision::Held),
            0,
            "a payment waited for a key it should have known: {:#?}",
            r.seen
        );
    }
    let (a, b) = (restarted.stop().await, beside.stop().await);
    assert_eq!((a.registered, b.registered), (3, 3));
    assert_eq!(a.handled + b.handled, payments.len() as u64);
    assert_eq!(a.settle_failures + b.settle_failures, 0);
    // The stream still holds every registration: the next start learns them again.
    drop(cleanup);
}
