//! Errors of the RabbitMQ transport. None of them ever contains the broker's credentials.

use crate::transport::DeliveryId;

/// What can go wrong talking to RabbitMQ.
///
/// Messages are built from lapin's errors with the address's password scrubbed out; the
/// original lapin error is not kept, so no credential can leak through a `source()` chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address, password redacted.
        addr: String,
        /// Why.
        message: String,
    },
    /// A broker operation failed (declare, consume, publish, ack, …).
    #[error("{operation} failed: {message}")]
    Broker {
        /// What was being done.
        operation: String,
        /// Why.
        message: String,
    },
    /// The broker did not confirm a deferred or dead-lettered copy (nacked, returned as
    /// unroutable, or the channel failed before the confirm); the original was not acknowledged
    /// and stays with the broker.
    #[error("copy not confirmed by the broker ({what}): {message}")]
    NotConfirmed {
        /// Which copy: `defer` or `dead-letter`.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The delivery's channel failed since it was delivered (a reconnect): settling it is void,
    /// and the broker delivers the message again.
    #[error("the delivery predates a reconnect: the broker delivers it again")]
    Stale,
    /// `settle` was called with an id this transport never handed out, or settled already.
    #[error("unknown or already settled delivery {0:?}")]
    UnknownDelivery(DeliveryId),
    /// The configuration is unusable (an empty or too long name, a zero prefetch, …).
    #[error("invalid configuration: {0}")]
    Config(String),
}
