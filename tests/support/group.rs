//! One instance of a partitioned group in a broker test: a connection of its own, named so that
//! the broker's consumer list maps consumers to instances, and a consumer running on the group's
//! route until stopped; a ghost member; and a drain of the group's queues. Include with
//! `#[path = "support/group.rs"] mod group;` beside `mod support;`.
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use prereq::amqp::{Broker, BrokerOptions, Membership, Partitions, Route};
use prereq::{DependentConsumer, Key};
use tokio::task::JoinHandle;

/// A payment of the group tests: its client (the key) and its place among the client's payments.
#[derive(serde::Deserialize)]
pub struct Payment {
    /// The client, the payment's prerequisite key.
    #[serde(rename = "clientId")]
    pub client_id: u64,
    /// The payment's number among its client's, from 0.
    pub seq: u64,
}

/// A running instance.
pub struct Instance {
    /// Its connection's name (and so its name in the broker's lists).
    pub name: String,
    /// Its connection, closed by [`Instance::stop`].
    pub broker: Broker,
    /// Ends its consumer's run.
    stop: tokio::sync::oneshot::Sender<()>,
    /// Its consumer's run; panics if the run fails.
    run: JoinHandle<()>,
}

impl Instance {
    /// Connect as `name` (delay queues forced: the tests run on brokers with and without the
    /// delayed-message plugin) and run `consumer` on `route`.
    pub async fn start<K: Key, M: Send + 'static>(
        name: &str,
        route: &Route,
        consumer: DependentConsumer<K, M>,
    ) -> Self {
        let broker = crate::support::connect(name).await;
        let transport = broker.transport(route.clone()).await.expect("transport");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let who = name.to_owned();
        let run = tokio::spawn(async move {
            let report = consumer
                .run(transport, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = report {
                panic!("instance {who} failed: {e}");
            }
        });
        Self {
            name: name.to_owned(),
            broker,
            stop,
            run,
        }
    }

    /// Drop the consumer's run mid-way, as a `select!` or a timeout around `run` does (no
    /// shutdown, no give-back by the engine); the connection stays open, returned.
    pub async fn abandon(self) -> Broker {
        self.run.abort();
        let _ = self.run.await;
        self.broker
    }

    /// Stop the consumer (it gives back what it holds and leaves the group), then close the
    /// connection.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.run.await.expect("instance ran");
        let _ = self.broker.close().await;
    }
}

/// A member of a partitioned group that beats and never consumes: the group gives it partitions
/// nobody but the other instances is subscribed to, as to a member that crashed and has not
/// expired yet. Its member queue is `<members exchange>.ghost` (for cleanup).
pub struct Ghost {
    /// Its own connection.
    broker: Broker,
    /// Its heartbeats.
    pub membership: Membership,
}

impl Ghost {
    /// Join the group of `partitions` (connection named `<p>ghost`), beating every `beat`.
    pub async fn join(p: &str, partitions: &Partitions, beat: Duration) -> Self {
        let broker = Broker::connect(
            BrokerOptions::new(crate::support::addr()).connection_name(format!("{p}ghost")),
        )
        .await
        .expect("connect the ghost");
        let membership = Membership::join(
            &broker,
            &partitions.members_exchange(),
            "ghost".into(),
            beat,
        )
        .await
        .expect("the ghost joins");
        Self { broker, membership }
    }

    /// Leave the group and close the connection.
    pub async fn leave(self) {
        self.membership.leave().await;
        let _ = self.broker.close().await;
    }
}

/// Take (and acknowledge) everything left in the group's partition queues, each read until it
/// stays quiet for a second. (`basic.get` is refused on a single-active-consumer quorum queue;
/// a consumer is made active once the group's own are gone.)
pub async fn drain(conn: &lapin::Connection, partitions: &Partitions) -> Vec<Delivery> {
    let channel = conn.create_channel().await.expect("channel");
    let mut left = Vec::new();
    for i in 0..partitions.count() {
        let mut consumer = channel
            .basic_consume(
                partitions.queue_name(i).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume a partition");
        while let Ok(next) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            let m = next.expect("the consumer ended").expect("a message");
            m.ack(BasicAckOptions::default()).await.expect("ack");
            left.push(m);
        }
        channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .expect("cancel");
    }
    let _ = channel.close(200, "drained".into()).await;
    left
}
