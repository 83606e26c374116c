//! One instance of a partitioned group in a broker test: a connection of its own, named so that
//! the broker's consumer list maps consumers to instances, and a consumer running on the group's
//! route until stopped. Include with `#[path = "support/group.rs"] mod group;` beside
//! `mod support;`.

use prereq::amqp::{Broker, BrokerOptions, DelayMode, Route};
use prereq::{DependentConsumer, Key};
use tokio::task::JoinHandle;

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
        let broker = Broker::connect(
            BrokerOptions::new(crate::support::addr())
                .delay_mode(DelayMode::DelayQueues)
                .connection_name(name),
        )
        .await
        .expect("connect");
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

    /// Stop the consumer (it gives back what it holds and leaves the group), then close the
    /// connection.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.run.await.expect("instance ran");
        let _ = self.broker.close().await;
    }
}
