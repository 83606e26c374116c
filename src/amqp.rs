//! RabbitMQ (feature `amqp`, lapin 4): a [`Broker`] connection hands out an [`AmqpTransport`]
//! per [`Route`], the consumer's own topology described by roles.
//!
//! * [`Broker`] / [`BrokerOptions`]: one connection (one plugin probe), a deadline on every
//!   connection attempt, bounded reconnection; credentials never printed ([`AmqpAddr`]).
//! * [`Route`]: the queues a consumer consumes ([`Queue`], bound to [`Exchange`]s of any
//!   [`ExchangeKind`]), where registrations come from (optional), where dead letters go, and how
//!   deferred copies come back ([`Retry`]): checked before anything is declared.
//! * [`AmqpTransport`]: the engine's [`crate::transport::Transport`], at least once: manual
//!   acks, a prefetch sized from the consumer's budget, publisher confirms for every copy,
//!   consumers re-subscribed when the broker ends them ([`Health`]).
//! * [`DelayMode`] / [`DelayMechanism`]: the delayed-message exchange plugin when present, TTL
//!   delay queues otherwise (see `docs/delays.md`).
//! * [`Membership`]: the live instances of a group, from heartbeats (partitioned routes use
//!   it; see [`Partitions`]).
//! * [`Publisher`]: confirmed, `mandatory` publishing of a service's own messages.
//! * [`headers`]: the header names prereq reads and writes; [`payment_demo`]: the classic Go
//!   demo's topology and wire format.
//!
//! ```no_run
//! use prereq::amqp::{Broker, BrokerOptions, Exchange, Queue, Route};
//! use prereq::{DependentConsumer, HandlerError};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64, customer: u64 }
//! #[derive(serde::Deserialize)]
//! struct Customer { id: u64 }
//!
//! async fn ship(order: Order) -> Result<(), HandlerError> {
//!     println!("shipping order {} of customer {}", order.id, order.customer);
//!     Ok(())
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `AMQP_ADDR`, or the local default broker; fails at once if unreachable.
//! let broker = Broker::connect(BrokerOptions::from_env()).await?;
//! let route = Route::new(Queue::classic("orders").bound_to(Exchange::topic("shop"), "order.*"))
//!     .registrations(Queue::classic("orders.customers").bound_to(Exchange::fanout("customers"), ""));
//! let transport = broker.transport(route).await?; // refused if copies could not come back
//!
//! let consumer = DependentConsumer::builder(|o: &Order| o.customer, ship)
//!     .registrations(|c: &Customer| c.id)
//!     .build();
//! let report = consumer.run(transport, tokio::signal::ctrl_c()).await?;
//! println!("{report:?}");
//! # Ok(()) }
//! ```

mod acks;
mod addr;
mod assign;
mod away;
mod broker;
mod connect;
mod consume;
mod copies;
mod declare;
mod delay;
mod error;
mod group;
pub mod headers;
mod health;
mod members;
mod packed;
pub mod payment_demo;
mod publish;
pub mod replay;
mod route;
mod router;
mod settle;
mod shared;
mod tls;
mod transport;
mod via;

pub use addr::{AMQP_ADDR_ENV, AmqpAddr, DEFAULT_AMQP_ADDR, redact_uri};
pub use broker::{
    Broker, BrokerOptions, DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_DELAY, DEFAULT_RECONNECT_TIMEOUT,
};
pub use connect::CONNECT_TIMEOUT;
pub use delay::{DelayMechanism, DelayMode, MAX_BROKER_DELAY};
pub use error::AmqpError;
pub use health::Health;
pub use members::{EXPIRY_BEATS, Membership};
pub use publish::{HeaderValue, Message, Publisher};
pub use route::{
    DEFAULT_DELIVERY_LIMIT, DEFAULT_REGISTRATION_PREFETCH, Exchange, ExchangeKind, MAX_PARTITIONS,
    PARTITION_DELIVERY_LIMIT, Partitions, Queue, QueueKind, Retry, Route,
};
pub use router::{RouterReport, route_by_key};
pub use tls::{AMQP_TLS_CA_FILE_ENV, AMQP_TLS_CERT_FILE_ENV, AMQP_TLS_KEY_FILE_ENV, Tls};
pub use transport::AmqpTransport;

/// A suffix unique within this process and, with the pid, across processes: nanoseconds since
/// the epoch and a counter.
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos}.{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
