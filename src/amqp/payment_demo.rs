//! The classic Go payment demo's topology and wire format, so that prereq's consumer and the
//! Go demo's programs run side by side on the same broker (see `docs/payment-demo.md`).
//!
//! | object | name | declared as |
//! |---|---|---|
//! | exchange | `clients` | direct, durable |
//! | exchange | `payments` | `x-delayed-message` (`x-delayed-type: direct`) where the broker has the plugin; direct where it has not |
//! | queue | `clients-processor` | classic, no arguments; bound to `clients` with `""` |
//! | queue | `payment-processor` | classic, no arguments; bound to `payments` with `process.payment` |
//! | queue | `payment-reprocessor` | classic, no arguments; bound to `payments` with `reprocess.payment` |
//!
//! prereq adds only its dead-letter queue `payment-processor.dead` and, without the plugin, its
//! delay queues `payment-reprocessor.delay.<ms>ms`. Deferred payments come back through
//! `payments` with `reprocess.payment`, as the Go consumer's re-published ones do.
//!
//! ```
//! use prereq::amqp::payment_demo::{self, PaymentNames};
//!
//! let route = payment_demo::route(&PaymentNames::default());
//! assert!(route.check().is_ok());
//! assert_eq!(route.retry_route().routing_key(), Some("reprocess.payment"));
//! ```

use super::publish::{HeaderValue, Message};
use super::route::{Exchange, Queue, Retry, Route};

/// The client exchange (direct).
pub const CLIENTS_EXCHANGE: &str = "clients";
/// The payment exchange, also the retry exchange.
pub const PAYMENTS_EXCHANGE: &str = "payments";
/// The queue client registrations are consumed from.
pub const CLIENTS_QUEUE: &str = "clients-processor";
/// The queue new payments arrive in.
pub const PAYMENTS_QUEUE: &str = "payment-processor";
/// The queue re-processed (deferred) payments arrive in.
pub const REPROCESS_QUEUE: &str = "payment-reprocessor";
/// The routing key of a new payment.
pub const PROCESS_KEY: &str = "process.payment";
/// The routing key of a re-processed payment.
pub const REPROCESS_KEY: &str = "reprocess.payment";
/// The routing key of a client registration: empty.
pub const CLIENT_KEY: &str = "";
/// The retry limit a new payment carries (`x-retry-limit`).
pub const RETRY_LIMIT: i32 = 10;
/// The `x-delay` a client registration carries (no effect on a direct exchange).
pub const CLIENT_DELAY_MS: i32 = 5000;

/// The demo's names, each with a `prefix` (empty for the real names; tests use a unique one so
/// that runs never share queues).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PaymentNames {
    /// [`CLIENTS_EXCHANGE`] with the prefix.
    pub clients_exchange: String,
    /// [`PAYMENTS_EXCHANGE`] with the prefix.
    pub payments_exchange: String,
    /// [`CLIENTS_QUEUE`] with the prefix.
    pub clients_queue: String,
    /// [`PAYMENTS_QUEUE`] with the prefix.
    pub payments_queue: String,
    /// [`REPROCESS_QUEUE`] with the prefix.
    pub reprocess_queue: String,
    /// prereq's dead-letter queue: `<payments_queue>.dead`.
    pub dead_letter_queue: String,
    /// prereq's delay queue prefix: `<reprocess_queue>.delay`.
    pub delay_queue_prefix: String,
}

impl PaymentNames {
    /// The names with `prefix` in front of each (`""` for the demo's own).
    pub fn with_prefix(prefix: &str) -> Self {
        let p = |n: &str| format!("{prefix}{n}");
        Self {
            clients_exchange: p(CLIENTS_EXCHANGE),
            payments_exchange: p(PAYMENTS_EXCHANGE),
            clients_queue: p(CLIENTS_QUEUE),
            payments_queue: p(PAYMENTS_QUEUE),
            reprocess_queue: p(REPROCESS_QUEUE),
            dead_letter_queue: p(&format!("{PAYMENTS_QUEUE}.dead")),
            delay_queue_prefix: p(&format!("{REPROCESS_QUEUE}.delay")),
        }
    }

    /// The `clients` exchange.
    pub fn clients(&self) -> Exchange {
        Exchange::direct(&self.clients_exchange)
    }

    /// The `payments` exchange.
    pub fn payments(&self) -> Exchange {
        Exchange::direct(&self.payments_exchange)
    }
}

impl Default for PaymentNames {
    fn default() -> Self {
        Self::with_prefix("")
    }
}

/// The demo's route: payments consumed from `payment-processor` and `payment-reprocessor`,
/// clients from `clients-processor`; deferred payments back through `payments` with
/// `reprocess.payment`; dead letters to `payment-processor.dead`.
pub fn route(names: &PaymentNames) -> Route {
    let n = names;
    Route::new(Queue::classic(&n.payments_queue).bound_to(n.payments(), PROCESS_KEY))
        .also_consume(Queue::classic(&n.reprocess_queue).bound_to(n.payments(), REPROCESS_KEY))
        .registrations(Queue::classic(&n.clients_queue).bound_to(n.clients(), CLIENT_KEY))
        .retry(Retry::via(n.payments(), REPROCESS_KEY))
        .dead_letters(Queue::quorum(&n.dead_letter_queue))
        .delay_queue_prefix(&n.delay_queue_prefix)
}

/// The properties and headers of a new payment as the Go producer publishes it:
/// `application/json`, transient, no message id, `x-delay: 0`, `x-retry: 0`,
/// `x-retry-limit: 10`, each a 32-bit integer. `mandatory`, unlike the Go producer: a payment
/// nothing would receive is an error.
pub fn payment_message() -> Message {
    Message::new()
        .content_type("application/json")
        .header("x-delay", HeaderValue::Int32(0))
        .header("x-retry", HeaderValue::Int32(0))
        .header("x-retry-limit", HeaderValue::Int32(RETRY_LIMIT))
}

/// The properties and headers of a client registration as the Go producer publishes it:
/// `application/json`, `x-delay: 5000` (a 32-bit integer). `mandatory`, unlike the Go producer.
pub fn client_message() -> Message {
    Message::new()
        .content_type("application/json")
        .header("x-delay", HeaderValue::Int32(CLIENT_DELAY_MS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::route::QueueKind;

    #[test]
    fn the_route_is_the_demo_s() {
        let r = route(&PaymentNames::default());
        assert!(r.check().is_ok());
        let consumed = r.consumed();
        assert_eq!(consumed[0].name(), "payment-processor");
        assert_eq!(consumed[1].name(), "payment-reprocessor");
        assert!(consumed.iter().all(|q| q.kind() == QueueKind::Classic));
        assert_eq!(
            r.registration_queue().map(Queue::name),
            Some("clients-processor")
        );
        assert_eq!(r.retry_route().exchange().name(), "payments");
        assert_eq!(r.dead_letter_queue().name(), "payment-processor.dead");
        assert_eq!(
            PaymentNames::with_prefix("t.").dead_letter_queue,
            "t.payment-processor.dead"
        );
    }
}
