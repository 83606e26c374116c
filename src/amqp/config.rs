//! Names and knobs of the RabbitMQ transport, with documented defaults.

use std::time::Duration;

use super::addr::AmqpAddr;
use super::delay::{DelayMode, MAX_BROKER_DELAY};
use super::error::AmqpError;
use super::topology::Topology;

/// Extra deliveries allowed in flight above the hold and the handlers, so that registrations
/// and settling never starve: see [`prefetch_for`].
pub const PREFETCH_HEADROOM: usize = 32;

/// The default prefetch of each message consumer: [`prefetch_for`] the engine's default hold
/// budget (10 000 messages) and 64 concurrent handlers.
pub const DEFAULT_PREFETCH: u16 = prefetch_for(10_000, 64);

/// The default prefetch of the registration consumer.
pub const DEFAULT_REGISTRATION_PREFETCH: u16 = 256;

/// The default longest delay (one day); longer delays are clamped.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(86_400);

/// The prefetch a message consumer needs so that holding never stalls delivery.
///
/// Held messages stay unacknowledged, so they count against the prefetch: with a prefetch at
/// or below the hold budget, a full hold stops the broker from delivering anything else —
/// including the messages that would be released or handled. Returns
/// `hold_max_messages + concurrency + PREFETCH_HEADROOM`, saturating at `u16::MAX` (the AMQP
/// limit; a hold budget above ~65 000 messages cannot be fully used over one consumer).
pub const fn prefetch_for(hold_max_messages: usize, concurrency: usize) -> u16 {
    let n = hold_max_messages
        .saturating_add(concurrency)
        .saturating_add(PREFETCH_HEADROOM);
    if n > u16::MAX as usize {
        u16::MAX
    } else {
        n as u16
    }
}

/// Where the transport reads from, where it sends deferred and dead-lettered copies, and how.
///
/// Build one with [`AmqpConfig::new`] (generic names derived from the message queue) or
/// [`super::topology::payments`] (the original payment demo), then adjust with the `with_*`
/// methods.
///
/// Defaults for `AmqpConfig::new("orders", "customers")`:
///
/// | setting | default |
/// |---|---|
/// | address | `AMQP_ADDR`, else `amqp://guest:guest@127.0.0.1:5672/%2f` |
/// | message queues consumed | `orders` |
/// | registration queue | `customers` |
/// | retry exchange / routing key | `orders.retry` / `orders` (declared by the transport: `x-delayed-message` with the plugin, `direct` without) |
/// | dead-letter queue | `orders.dead` (durable quorum queue) |
/// | delay queues | `orders.delay.<ms>ms` |
/// | delay mode | [`DelayMode::Auto`] |
/// | max delay | one day |
/// | prefetch | [`DEFAULT_PREFETCH`] per message queue, [`DEFAULT_REGISTRATION_PREFETCH`] for registrations |
/// | topology | durable queues `orders` and `customers`; `orders` bound to `orders.retry` with key `orders` |
/// | registration queue kind | a classic queue, consumed (see [`AmqpConfig::with_registration_stream`]) |
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    pub(crate) addr: AmqpAddr,
    pub(crate) queues: Vec<String>,
    pub(crate) registration_queue: String,
    pub(crate) registration_stream: bool,
    pub(crate) retry_exchange: String,
    pub(crate) retry_routing_key: String,
    pub(crate) dead_letter_queue: String,
    pub(crate) delay_queue_prefix: String,
    pub(crate) delay_mode: DelayMode,
    pub(crate) max_delay: Duration,
    pub(crate) prefetch: u16,
    pub(crate) registration_prefetch: u16,
    pub(crate) topology: Topology,
    pub(crate) connection_name: String,
}

impl AmqpConfig {
    /// Consume dependent messages from `queue` and registrations from `registration_queue`,
    /// with the defaults in the table above.
    pub fn new(queue: impl Into<String>, registration_queue: impl Into<String>) -> Self {
        let queue = queue.into();
        let registration_queue = registration_queue.into();
        let retry_exchange = format!("{queue}.retry");
        let topology = Topology::default()
            .queue(&queue)
            .queue(&registration_queue)
            .bind(&queue, &retry_exchange, &queue);
        Self {
            addr: AmqpAddr::from_env(),
            retry_routing_key: queue.clone(),
            dead_letter_queue: format!("{queue}.dead"),
            delay_queue_prefix: format!("{queue}.delay"),
            queues: vec![queue],
            registration_queue,
            registration_stream: false,
            retry_exchange,
            delay_mode: DelayMode::Auto,
            max_delay: DEFAULT_MAX_DELAY,
            prefetch: DEFAULT_PREFETCH,
            registration_prefetch: DEFAULT_REGISTRATION_PREFETCH,
            topology,
            connection_name: "prereq".to_owned(),
        }
    }

    /// Make the registration queue a RabbitMQ **stream**, read from its first message every
    /// time the transport connects.
    ///
    /// With a plain queue, a registration is consumed once: a consumer that restarts with an
    /// in-memory key store forgets every key registered before, and several consumer instances
    /// on one registration queue each learn only the registrations that reach them (so a
    /// payment can wait at one instance for a client that another one registered). A stream
    /// keeps its messages and every reader gets all of them: each instance, and each restart,
    /// learns every key. The transport declares the queue with `x-queue-type: stream` (instead of
    /// the topology's declaration of it) and consumes it with `x-stream-offset: first`.
    ///
    /// A stream grows until a retention limit removes old segments: set one with a policy
    /// (`rabbitmqctl set_policy … '{"max-age":"30D"}' --apply-to queues`), and keep every key
    /// you still need within it. An existing classic queue of the same name cannot become a
    /// stream (the declaration fails with `406 PRECONDITION_FAILED`): use a new name, bound to
    /// the same exchange.
    pub fn with_registration_stream(mut self) -> Self {
        self.registration_stream = true;
        self
    }

    /// The broker address.
    pub fn with_addr(mut self, addr: impl Into<AmqpAddr>) -> Self {
        self.addr = addr.into();
        self
    }

    /// Also consume dependent messages from this queue (e.g. the queue deferred copies come
    /// back to, when it is not the main one). Each queue gets its own consumer and prefetch.
    pub fn with_extra_queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// The exchange and routing key deferred copies come back through. The transport declares
    /// the exchange (type by delay mechanism); the topology must bind a consumed queue to it.
    pub fn with_retry(
        mut self,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.retry_exchange = exchange.into();
        self.retry_routing_key = routing_key.into();
        self
    }

    /// The dead-letter queue (declared by the transport as a durable quorum queue).
    pub fn with_dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter_queue = queue.into();
        self
    }

    /// The prefix of delay queue names (`<prefix>.<ms>ms`).
    pub fn with_delay_queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.delay_queue_prefix = prefix.into();
        self
    }

    /// How deferred copies are delayed.
    pub fn with_delay_mode(mut self, mode: DelayMode) -> Self {
        self.delay_mode = mode;
        self
    }

    /// The longest delay; longer ones are clamped (and never above [`MAX_BROKER_DELAY`]).
    pub fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max.min(MAX_BROKER_DELAY);
        self
    }

    /// The prefetch of each message consumer. Must exceed the engine's hold budget plus its
    /// handler concurrency, see [`prefetch_for`].
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The prefetch of the registration consumer.
    pub fn with_registration_prefetch(mut self, prefetch: u16) -> Self {
        self.registration_prefetch = prefetch;
        self
    }

    /// Replace what the transport declares at connect time (besides the retry exchange, the
    /// dead-letter queue and the delay queues, which it always declares).
    pub fn with_topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// The connection name shown by `rabbitmqctl list_connections` and the management UI.
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Whether the registration queue is a stream, replayed from the start on every connect.
    pub fn registration_stream(&self) -> bool {
        self.registration_stream
    }

    /// The broker address.
    pub fn addr(&self) -> &AmqpAddr {
        &self.addr
    }

    /// The queues dependent messages are consumed from.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// The registration queue.
    pub fn registration_queue(&self) -> &str {
        &self.registration_queue
    }

    /// The retry exchange.
    pub fn retry_exchange(&self) -> &str {
        &self.retry_exchange
    }

    /// The routing key of deferred copies.
    pub fn retry_routing_key(&self) -> &str {
        &self.retry_routing_key
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> &str {
        &self.dead_letter_queue
    }

    /// The delay queue name prefix.
    pub fn delay_queue_prefix(&self) -> &str {
        &self.delay_queue_prefix
    }

    /// The delay mode.
    pub fn delay_mode(&self) -> DelayMode {
        self.delay_mode
    }

    /// The longest delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The prefetch of each message consumer.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// What is declared at connect time.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The connection name.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// Check names and numbers before touching the broker.
    pub fn validate(&self) -> Result<(), AmqpError> {
        let longest_delay_name =
            super::delay::delay_queue_name(&self.delay_queue_prefix, self.max_delay);
        let mut names: Vec<(&str, &str)> = vec![
            ("registration queue", self.registration_queue.as_str()),
            ("retry exchange", self.retry_exchange.as_str()),
            ("dead-letter queue", self.dead_letter_queue.as_str()),
            ("delay queue name", longest_delay_name.as_str()),
        ];
        names.extend(self.queues.iter().map(|q| ("message queue", q.as_str())));
        if self.queues.is_empty() {
            return Err(AmqpError::Config("no message queue to consume".into()));
        }
        for (what, name) in names {
            if name.is_empty() {
                return Err(AmqpError::Config(format!("{what} name is empty")));
            }
            if name.len() > 255 {
                return Err(AmqpError::Config(format!(
                    "{what} name is longer than 255 bytes"
                )));
            }
        }
        if self.retry_routing_key.len() > 255 {
            return Err(AmqpError::Config(
                "retry routing key is longer than 255 bytes".into(),
            ));
        }
        if self.prefetch == 0 || self.registration_prefetch == 0 {
            return Err(AmqpError::Config(
                "prefetch 0 means unlimited in AMQP; give an explicit bound".into(),
            ));
        }
        self.topology.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_covers_hold_and_concurrency() {
        assert_eq!(prefetch_for(100, 8), 140);
        assert_eq!(prefetch_for(usize::MAX, 1), u16::MAX);
        assert!(usize::from(DEFAULT_PREFETCH) > 10_000 + 64);
    }

    #[test]
    fn defaults_derive_from_the_queue() {
        let c = AmqpConfig::new("orders", "customers");
        assert_eq!(c.queues(), ["orders".to_owned()]);
        assert_eq!(c.retry_exchange(), "orders.retry");
        assert_eq!(c.retry_routing_key(), "orders");
        assert_eq!(c.dead_letter_queue(), "orders.dead");
        assert_eq!(c.delay_queue_prefix(), "orders.delay");
        assert_eq!(c.delay_mode(), DelayMode::Auto);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(AmqpConfig::new("", "r").validate().is_err());
        assert!(
            AmqpConfig::new("q", "r")
                .with_prefetch(0)
                .validate()
                .is_err()
        );
        assert!(AmqpConfig::new("q".repeat(300), "r").validate().is_err());
        assert!(
            AmqpConfig::new("q", "r")
                .with_dead_letter_queue("d".repeat(256))
                .validate()
                .is_err()
        );
    }
}
