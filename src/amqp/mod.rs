//! RabbitMQ transport (feature `amqp`, lapin 4).
//!
//! * [`AmqpTransport`]: the engine's [`crate::transport::Transport`] over RabbitMQ, at least
//!   once: manual acks, publisher confirms for every deferred or dead-lettered copy, explicit
//!   prefetch, automatic connection recovery (after which in-flight deliveries come back:
//!   handlers may see duplicates).
//! * [`AmqpConfig`]: queue and exchange names and knobs with documented defaults;
//!   [`topology::payments`] is the original payment demo's layout.
//! * [`DelayMode`] / [`DelayMechanism`]: the delayed-message exchange plugin when present,
//!   TTL delay queues otherwise (see `docs/delays.md`).
//! * [`headers`]: tolerant header decoding (every integer width) and the headers of copies.
//! * [`AmqpAddr`]: the broker address; credentials never show in logs, errors or `Debug`.
//!
//! Sizing: held messages are unacknowledged deliveries, so the prefetch must exceed the hold
//! budget plus the handler concurrency ([`prefetch_for`]), or a full hold stalls delivery.
//!
//! ```no_run
//! use prereq::amqp::topology::{self, PaymentNames};
//! use prereq::amqp::{AmqpAddr, AmqpTransport, prefetch_for};
//! use prereq::{DependentConsumer, HandlerError, HoldBudget};
//!
//! #[derive(serde::Deserialize)]
//! struct Payment { id: String, #[serde(rename = "clientId")] client_id: u64 }
//! #[derive(serde::Deserialize)]
//! struct Client { id: u64 }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let budget = HoldBudget::default();
//! // The payment demo's exchanges and queues; `AMQP_ADDR` or the local default broker.
//! let config = topology::payments(&PaymentNames::default())
//!     .with_addr(AmqpAddr::from_env())
//!     .with_prefetch(prefetch_for(budget.max_messages, 8));
//! let transport = AmqpTransport::connect(config).await?; // fails at once if unreachable
//! println!("delay mechanism: {}", transport.mechanism());
//!
//! let consumer = DependentConsumer::<u64, Payment>::builder()
//!     .key(|p: &Payment| p.client_id)
//!     .id(|p: &Payment| p.id.clone())
//!     .registrations(|c: &Client| c.id)
//!     .handler(|_p: Payment| async move { Ok::<_, HandlerError>(()) })
//!     .budget(budget)
//!     .concurrency(8)
//!     .build()?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! let report = consumer.run(transport, shutdown).await?;
//! println!("{report:?}");
//! # Ok(()) }
//! ```

mod addr;
mod config;
pub mod delay;
mod error;
pub mod headers;
pub mod topology;
mod transport;

pub use addr::{AMQP_ADDR_ENV, AmqpAddr, DEFAULT_AMQP_ADDR, redact_uri};
pub use config::{
    AmqpConfig, DEFAULT_MAX_DELAY, DEFAULT_PREFETCH, DEFAULT_REGISTRATION_PREFETCH,
    PREFETCH_HEADROOM, prefetch_for,
};
pub use delay::{DelayMechanism, DelayMode};
pub use error::AmqpError;
pub use topology::Topology;
pub use transport::{AmqpTransport, CONNECT_TIMEOUT, connect, declare_topology};

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
