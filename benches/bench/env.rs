//! The broker the bench runs against: the bench's own connection (declaring, publishing, the
//! bare-lapin baselines), unique names, cleanup, and the consumers' transports.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lapin::Connection;
use prereq::amqp::{AmqpAddr, AmqpTransport, Broker, BrokerOptions, DelayMode, Queue, Route};
use prereq::transport::Demand;
use prereq::{DEFAULT_CONCURRENCY, HoldBudget};

use crate::Res;
use crate::cleanup::Cleanup;

/// How long connecting to the broker may take before the bench gives up on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bench's broker, its run's name and what to clean up.
pub struct Env {
    /// The bench's own connection (not the consumers').
    pub broker: Broker,
    /// `<pid>.<nanos>`: in every name the run declares.
    pub run: String,
    pub cleanup: Cleanup,
    /// The broker's process, when it runs on this machine (found once, by its port), for the
    /// CPU figures ([`crate::cpu`]).
    pub broker_pid: Option<u32>,
}

impl Env {
    /// Connect to the broker at `addr`, or say why not.
    pub async fn connect(addr: &AmqpAddr) -> Result<Self, String> {
        let broker = Broker::connect(options(addr, "prereq-bench"))
            .await
            .map_err(|e| e.to_string())?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let port = addr
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.authority.port)
            .unwrap_or(5672);
        Ok(Self {
            broker_pid: crate::cpu::listener_pid(port),
            run: format!("{}.{nanos}", std::process::id()),
            cleanup: Cleanup::new(addr.clone()),
            broker,
        })
    }

    /// The bench's lapin connection.
    pub fn conn(&self) -> &Connection {
        self.broker.connection()
    }

    /// `prereq-bench.<pid>.<nanos>.<scenario>.`
    pub fn prefix(&self, scenario: &str) -> String {
        format!("prereq-bench.{}.{scenario}.", self.run)
    }

    /// A consumer's route under `prefix`: classic queues `payments` and `clients`, the derived
    /// retry exchange and dead-letter queue; registered for cleanup.
    pub fn route(&self, prefix: &str) -> Route {
        let route = Route::new(Queue::classic(payments_queue(prefix)))
            .registrations(Queue::classic(clients_queue(prefix)));
        self.cleanup.route(&route);
        route
    }

    /// A consumer's transport for `route`, on a connection of its own (as a consumer service
    /// has), deferring through delay queues whatever the broker offers.
    pub async fn transport(&self, prefix: &str, route: Route) -> Res<Opened<'_>> {
        let broker =
            Broker::connect(options(self.broker.addr(), &format!("{prefix}consumer"))).await?;
        Ok(Opened {
            transport: Arc::new(broker.transport(route).await?),
            cleanup: &self.cleanup,
        })
    }
}

/// A consumer's transport. The delay queues it declared are registered for cleanup when it is
/// closed, and (as far as they can be listed without waiting) when it is dropped, also when a
/// scenario is interrupted.
pub struct Opened<'a> {
    pub transport: Arc<AmqpTransport>,
    cleanup: &'a Cleanup,
}

impl Opened<'_> {
    /// Register the delay queues, stop consuming and close the transport's connection.
    pub async fn close(&self) {
        for q in self.transport.delay_queues().await {
            self.cleanup.queue(q);
        }
        let _ = self.transport.close().await;
        let _ = self.transport.broker().close().await;
    }
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        if let Some(queues) = self.transport.delay_queues().now_or_never() {
            for q in queues {
                self.cleanup.queue(q);
            }
        }
    }
}

/// The payments queue of the route under `prefix`.
pub fn payments_queue(prefix: &str) -> String {
    format!("{prefix}payments")
}

/// The registrations queue of the route under `prefix`.
pub fn clients_queue(prefix: &str) -> String {
    format!("{prefix}clients")
}

fn options(addr: &AmqpAddr, name: &str) -> BrokerOptions {
    BrokerOptions::new(addr.clone())
        .connection_name(name)
        .delay_mode(DelayMode::DelayQueues)
        .connect_timeout(CONNECT_TIMEOUT)
}

/// The prefetch prereq's transport asks for with the default hold budget and concurrency (the
/// bare-lapin consumers use the same).
pub fn default_prefetch() -> u16 {
    let demand = Demand::new(HoldBudget::DEFAULT.max_messages, DEFAULT_CONCURRENCY);
    u16::try_from(demand.in_flight()).unwrap_or(u16::MAX)
}
