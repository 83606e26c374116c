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
