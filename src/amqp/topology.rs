//! What the transport declares on the broker, and the original payment demo's names.

use super::config::AmqpConfig;
use super::error::AmqpError;

/// Exchanges, queues and bindings declared (idempotently) when the transport connects.
///
/// Everything is durable. Queues are classic unless marked quorum. The retry exchange, the
/// dead-letter queue and the delay queues are not listed here: the transport declares them
/// itself from [`AmqpConfig`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Direct exchanges to declare.
    pub exchanges: Vec<String>,
    /// Queues to declare: `(name, quorum)`.
    pub queues: Vec<(String, bool)>,
    /// Bindings: `(queue, exchange, routing key)`.
    pub bindings: Vec<(String, String, String)>,
}

impl Topology {
    /// Add a durable direct exchange.
    pub fn exchange(mut self, name: &str) -> Self {
        self.exchanges.push(name.to_owned());
        self
    }

    /// Add a durable classic queue.
    pub fn queue(mut self, name: &str) -> Self {
        self.queues.push((name.to_owned(), false));
        self
    }

    /// Add a durable quorum queue.
    pub fn quorum_queue(mut self, name: &str) -> Self {
        self.queues.push((name.to_owned(), true));
        self
    }

    /// Bind `queue` to `exchange` with `routing_key`.
    pub fn bind(mut self, queue: &str, exchange: &str, routing_key: &str) -> Self {
        self.bindings.push((
            queue.to_owned(),
            exchange.to_owned(),
            routing_key.to_owned(),
        ));
        self
    }

    /// Every queue and exchange name this topology declares.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.exchanges
            .iter()
            .map(String::as_str)
            .chain(self.queues.iter().map(|(q, _)| q.as_str()))
    }

    pub(crate) fn validate(&self) -> Result<(), AmqpError> {
        let names = self.names().chain(
            self.bindings
                .iter()
                .flat_map(|(q, e, k)| [q.as_str(), e.as_str(), k.as_str()]),
        );
        for name in names {
            if name.len() > 255 {
                return Err(AmqpError::Config(format!(
                    "topology name longer than 255 bytes: {}…",
                    name.chars().take(32).collect::<String>()
                )));
            }
        }
        Ok(())
    }
}

/// The original demo's client exchange (direct).
pub const CLIENTS_EXCHANGE: &str = "clients";
/// The original demo's payment exchange: `x-delayed-message` (`x-delayed-type: direct`) with
/// the plugin, direct without. It is also the retry exchange.
pub const PAYMENTS_EXCHANGE: &str = "payments";
/// The queue client registrations are consumed from.
pub const CLIENTS_QUEUE: &str = "clients-processor";
/// The queue new payments arrive in.
pub const PAYMENTS_QUEUE: &str = "payment-processor";
/// The queue deferred payments come back to.
pub const REPROCESS_QUEUE: &str = "payment-reprocessor";
/// The routing key of a new payment.
pub const PROCESS_KEY: &str = "process.payment";
/// The routing key of a deferred payment.
pub const REPROCESS_KEY: &str = "reprocess.payment";
/// The routing key of a client registration. The demo's task description does not name one;
/// prereq binds `clients-processor` to `clients` with this key.
pub const CLIENT_KEY: &str = "process.client";
/// The per-message retry limit a new payment carries (`x-retry-limit`).
pub const DEMO_RETRY_LIMIT: u32 = 10;

/// The payment demo's names, each with a `prefix` (empty for the real names; tests use a
/// unique one so that runs never share queues).
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// The dead-letter queue: `<payments_queue>.dead`.
    pub dead_letter_queue: String,
    /// The delay queue prefix: `<reprocess_queue>.delay`.
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
            dead_letter_queue: format!("{prefix}{PAYMENTS_QUEUE}.dead"),
            delay_queue_prefix: format!("{prefix}{REPROCESS_QUEUE}.delay"),
        }
    }
}

impl Default for PaymentNames {
    fn default() -> Self {
        Self::with_prefix("")
    }
}

/// The transport configuration of the original payment demo: payments consumed from
/// `payment-processor` and `payment-reprocessor`, clients from `clients-processor`; deferred
/// payments go back through `payments` with `reprocess.payment`; dead letters in
/// `payment-processor.dead`.
pub fn payments(names: &PaymentNames) -> AmqpConfig {
    let n = names;
    let topology = Topology::default()
        .exchange(&n.clients_exchange)
        .queue(&n.clients_queue)
        .queue(&n.payments_queue)
        .queue(&n.reprocess_queue)
        .bind(&n.clients_queue, &n.clients_exchange, CLIENT_KEY)
        .bind(&n.payments_queue, &n.payments_exchange, PROCESS_KEY)
        .bind(&n.reprocess_queue, &n.payments_exchange, REPROCESS_KEY);
    AmqpConfig::new(n.payments_queue.clone(), n.clients_queue.clone())
        .with_extra_queue(n.reprocess_queue.clone())
        .with_retry(n.payments_exchange.clone(), REPROCESS_KEY)
        .with_dead_letter_queue(n.dead_letter_queue.clone())
        .with_delay_queue_prefix(n.delay_queue_prefix.clone())
        .with_topology(topology)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_preset_uses_the_demo_names() {
        let c = payments(&PaymentNames::default());
        assert_eq!(c.queues(), ["payment-processor", "payment-reprocessor"]);
        assert_eq!(c.registration_queue(), "clients-processor");
        assert_eq!(c.retry_exchange(), "payments");
        assert_eq!(c.retry_routing_key(), "reprocess.payment");
        assert_eq!(c.dead_letter_queue(), "payment-processor.dead");
        let t = c.topology();
        assert!(t.bindings.contains(&(
            "payment-processor".into(),
            "payments".into(),
            "process.payment".into()
        )));
        assert!(t.exchanges.contains(&"clients".to_owned()));
        assert!(!t.exchanges.contains(&"payments".to_owned()));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn prefixed_names() {
        let n = PaymentNames::with_prefix("t1.");
        assert_eq!(n.payments_queue, "t1.payment-processor");
        assert_eq!(n.dead_letter_queue, "t1.payment-processor.dead");
    }
}
