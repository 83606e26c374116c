//! A consumer's topology described by roles: which queues it consumes, where they are fed from,
//! where registrations come from, where dead letters go, and how deferred copies come back.
//!
//! [`Route`] is checked before anything is declared: a route from which deferred copies could
//! not come back to a consumed queue is refused with a clear error ([`Route::check`]).

use std::fmt;

use super::error::AmqpError;

/// The type of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    Direct,
    /// Routes by routing-key pattern (`*` one word, `#` zero or more words).
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by message headers (not allowed as a retry exchange: prereq cannot tell where a
    /// copy would go).
    Headers,
    /// `x-consistent-hash` (plugin `rabbitmq_consistent_hash_exchange`, bundled with RabbitMQ:
    /// `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`): routes each routing key to
    /// one bound queue, always the same while the bindings do not change.
    ConsistentHash,
}

impl ExchangeKind {
    /// The AMQP name (`direct`, `topic`, `fanout`, `headers`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Headers => "headers",
            Self::ConsistentHash => "x-consistent-hash",
        }
    }

    /// Would a message published with `routing_key` reach a binding made with `binding_key`?
    /// (`None` for headers exchanges: it depends on the headers.)
    pub fn routes(self, binding_key: &str, routing_key: &str) -> Option<bool> {
        match self {
            Self::Direct => Some(binding_key == routing_key),
            Self::Fanout => Some(true),
            Self::Topic => Some(topic_matches(binding_key, routing_key)),
            // Every key reaches one of the bound queues.
            Self::ConsistentHash => Some(true),
            Self::Headers => None,
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Does a topic binding key (`*` one word, `#` zero or more words, `.`-separated) match a
/// routing key?
fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&word, rest)) => match k.split_first() {
                Some((first, k_rest)) => (word == "*" || word == *first) && go(rest, k_rest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    let p: Vec<&str> = if pattern.is_empty() { Vec::new() } else { p };
    go(&p, &k)
}

/// An exchange: declared durable by the transport (idempotent; the declaration fails if one of
/// the name exists with another type), or only checked if it is [`Exchange::existing`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Exchange {
    pub(crate) name: String,
    pub(crate) kind: ExchangeKind,
    pub(crate) declare: bool,
}

impl Exchange {
    /// A durable direct exchange.
    pub fn direct(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Direct)
    }

    /// A durable topic exchange.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Topic)
    }

    /// A durable fanout exchange.
    pub fn fanout(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Fanout)
    }

    /// A durable exchange of this kind.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Self {
            name: name.into(),
            kind,
            declare: true,
        }
    }

    /// An exchange someone else declares: prereq only checks that it exists (a passive
    /// declaration) and trusts `kind`.
    pub fn existing(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Self {
            declare: false,
            ..Self::new(name, kind)
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The type.
    pub fn kind(&self) -> ExchangeKind {
        self.kind
    }
}

/// What kind of queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueKind {
    /// A classic queue, declared with no arguments (what most producers declare).
    Classic,
    /// A quorum queue (replicated; it counts deliveries, see [`Queue::delivery_limit`]).
    Quorum,
    /// A stream, read from its first message on every connect (for registrations).
    Stream,
}

/// The delivery limit prereq gives the quorum queues it declares, unless told otherwise: past
/// it the broker dead-letters (or drops) a message returned that many times. prereq gives
/// messages back by a confirmed copy before they reach it (see `docs/guarantees.md`).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// A durable queue with the bindings that feed it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Queue {
    pub(crate) name: String,
    pub(crate) kind: QueueKind,
    pub(crate) bindings: Vec<(Exchange, String)>,
    pub(crate) declare: bool,
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) single_active: bool,
}

impl Queue {
    /// A durable classic queue, declared with no arguments.
    pub fn classic(name: impl Into<String>) -> Self {
        Self::new(name, QueueKind::Classic)
    }

    /// A durable quorum queue, declared with `x-delivery-limit` [`DEFAULT_DELIVERY_LIMIT`].
    pub fn quorum(name: impl Into<String>) -> Self {
        Self::new(name, QueueKind::Quorum).delivery_limit(DEFAULT_DELIVERY_LIMIT)
    }

    /// A stream (`x-queue-type: stream`), for registrations replayed on every connect: every
    /// instance and every restart learns every key. Give it a retention policy on the broker.
    pub fn stream(name: impl Into<String>) -> Self {
        Self::new(name, QueueKind::Stream)
    }

    fn new(name: impl Into<String>, kind: QueueKind) -> Self {
        Self {
            name: name.into(),
            kind,
            bindings: Vec::new(),
            declare: true,
            delivery_limit: None,
            single_active: false,
        }
    }

    /// A queue someone else declares: prereq only checks that it exists (a passive
    /// declaration), with its arguments as they are. `kind` says what it is; for a quorum queue,
    /// give its delivery limit with [`Queue::delivery_limit`] if it is not the broker's default
    /// ([`DEFAULT_DELIVERY_LIMIT`] on RabbitMQ 4.0+); if it has `x-single-active-consumer`, say
    /// so with [`Queue::single_active_consumer`].
    pub fn existing(name: impl Into<String>, kind: QueueKind) -> Self {
        Self {
            declare: false,
            ..Self::new(name, kind)
        }
    }

    /// Feed the queue from `exchange` with `binding_key` (declared with the queue).
    pub fn bound_to(mut self, exchange: Exchange, binding_key: impl Into<String>) -> Self {
        self.bindings.push((exchange, binding_key.into()));
        self
    }

    /// The queue's delivery limit (quorum queues): declared as `x-delivery-limit` for a queue
    /// prereq declares, and the limit prereq keeps give-backs under.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit.max(1));
        self
    }

    /// Declared with `x-single-active-consumer: true`: of all its consumers, one receives, the
    /// others wait and take over when it goes. Its consumer then never moves to a fresh channel
    /// while it holds many messages (that would hand the queue to another consumer; see
    /// `docs/scaling.md`): say so for an [existing](Queue::existing) queue declared that way.
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active = true;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind.
    pub fn kind(&self) -> QueueKind {
        self.kind
    }

    /// The delivery limit prereq assumes: the configured one, else the broker's default for a
    /// quorum queue, else none (classic queues and streams do not count deliveries).
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        match (self.delivery_limit, self.kind) {
            (Some(limit), _) => Some(limit),
            (None, QueueKind::Quorum) => Some(DEFAULT_DELIVERY_LIMIT),
            (None, _) => None,
        }
    }
}

/// How deferred copies come back to a consumed queue: through an exchange, with a fixed routing
/// key ([`Retry::via`]) or each to the queue it came from ([`Retry::to_source_queue`]).
///
/// Its exchange is declared by the transport with the delay mechanism's type: `x-delayed-message`
/// (with `x-delayed-type` of its kind) where the broker has the plugin, its own kind otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Retry {
    pub(crate) exchange: Exchange,
    /// `None`: each copy goes back with the name of the queue it was consumed from.
    pub(crate) routing_key: Option<String>,
}

impl Retry {
    /// Deferred copies come back through `exchange` with `routing_key`.
    pub fn via(exchange: Exchange, routing_key: impl Into<String>) -> Self {
        Self {
            exchange,
            routing_key: Some(routing_key.into()),
        }
    }

    /// Each deferred copy comes back to the queue it was consumed from: through the direct
    /// `exchange`, to which every consumed queue is bound with its own name (the route adds the
    /// bindings). For routes whose queues each own a share of the keys (partitions).
    pub fn to_source_queue(exchange: Exchange) -> Self {
        Self {
            exchange,
            routing_key: None,
        }
    }

    /// The exchange.
    pub fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    /// The routing key of deferred copies; `None` when each goes back to its own queue.
    pub fn routing_key(&self) -> Option<&str> {
        self.routing_key.as_deref()
    }
}

/// P partition queues behind an `x-consistent-hash` exchange: every key always reaches the same
/// partition, and one instance of a group is active on each ([`Route::partitioned`]).
///
/// | object | name | declared as |
/// |---|---|---|
/// | exchange | `name` | `x-consistent-hash`, durable; producers publish with the key as routing key |
/// | queues | `name.0` … `name.{P-1}` | quorum, `x-single-active-consumer`, delivery limit; bound to `name` with weight `"1"`, in index order |
/// | exchange | `name.members` | fanout: the instances' heartbeats |
///
/// P is fixed when the partitions are first declared: the hash maps keys to queues by their
/// binding order, so changing P moves keys (see `docs/scaling.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Partitions {
    pub(crate) name: String,
    pub(crate) count: u32,
    pub(crate) delivery_limit: u32,
}

/// The most partitions a group may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition queues' default delivery limit: far above a quorum queue's usual 20, because
/// every hand-over returns each message the outgoing instance had been given (an unacknowledged
/// delivery counts as a return when its channel closes), and a group hands partitions over on
/// every join and leave. prereq still dead-letters a message it gives up on itself, with a
/// reason; the broker's limit is only a safety net.
pub const PARTITION_DELIVERY_LIMIT: u32 = 1000;

impl Partitions {
    /// `count` partitions named after `name` (clamped to `1..=MAX_PARTITIONS`).
    pub fn new(name: impl Into<String>, count: u32) -> Self {
        Self {
            name: name.into(),
            count: count.clamp(1, MAX_PARTITIONS),
            delivery_limit: PARTITION_DELIVERY_LIMIT,
        }
    }

    /// The partition queues' delivery limit (default [`PARTITION_DELIVERY_LIMIT`]).
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    /// The exchange producers publish to, with the key as routing key.
    pub fn exchange(&self) -> Exchange {
        Exchange::new(&self.name, ExchangeKind::ConsistentHash)
    }

    /// How many partitions.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The name of partition `index`'s queue.
    pub fn queue_name(&self, index: u32) -> String {
        format!("{}.{index}", self.name)
    }

    /// The heartbeat exchange of the group's instances.
    pub fn members_exchange(&self) -> String {
        format!("{}.members", self.name)
    }

    /// Partition `index`'s queue, bound to the exchange.
    pub fn queue(&self, index: u32) -> Queue {
        Queue::quorum(self.queue_name(index))
            .delivery_limit(self.delivery_limit)
            .single_active_consumer()
            .bound_to(self.exchange(), "1")
    }

    /// The partition a consumed queue name is, if it is one.
    pub(crate) fn index_of(&self, queue: &str) -> Option<u32> {
        let i: u32 = queue
            .strip_prefix(&self.name)?
            .strip_prefix('.')?
            .parse()
            .ok()?;
        (i < self.count).then_some(i)
    }
}

/// A consumer's topology, by roles. Built from the queue it consumes; everything else has a
/// default derived from that queue's name (`q`):
///
/// | role | default |
/// |---|---|
/// | retry | direct exchange `q.retry`, routing key `q`, bound to `q` (added to the route) |
/// | dead letters | quorum queue `q.dead` (published to through the default exchange) |
/// | delay queues (no plugin) | `q.delay.<ms>ms`, quorum, dead-lettering to the retry exchange |
/// | registrations | none: keys come from the key source only |
///
/// ```
/// use prereq::amqp::{Exchange, Queue, Retry, Route};
///
/// // Orders from a topic exchange; customers registered through a fanout exchange.
/// let route = Route::new(Queue::classic("orders").bound_to(Exchange::topic("shop"), "order.*"))
///     .registrations(Queue::classic("orders.customers").bound_to(Exchange::fanout("customers"), ""));
/// assert!(route.check().is_ok());
/// assert_eq!(route.retry_route().exchange().name(), "orders.retry");
///
/// // Deferred copies sent back through the topic exchange with a key nothing consumed matches:
/// // refused before anything is declared.
/// let lost = Route::new(Queue::classic("orders").bound_to(Exchange::topic("shop"), "order.*"))
///     .retry(Retry::via(Exchange::topic("shop"), "retry.order"));
/// assert!(lost.check().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Route {
    pub(crate) consume: Vec<Queue>,
    pub(crate) registrations: Option<Queue>,
    pub(crate) dead_letters: Queue,
    pub(crate) retry: Retry,
    /// Whether the retry route is the derived default, whose binding prereq adds to the first
    /// consumed queue (`false` once the user chose their own).
    pub(crate) derived_retry: bool,
    pub(crate) delay_queue_prefix: String,
    pub(crate) registration_prefetch: u16,
    /// The partitions consumed, for a partitioned route.
    pub(crate) partitions: Option<Partitions>,
}

/// The default prefetch of the registration consumer.
pub const DEFAULT_REGISTRATION_PREFETCH: u16 = 256;

impl Route {
    /// Consume `queue`; everything else derived from its name (see the table above).
    pub fn new(queue: Queue) -> Self {
        let name = queue.name.clone();
        Self {
            retry: Retry::via(Exchange::direct(format!("{name}.retry")), name.clone()),
            derived_retry: true,
            dead_letters: Queue::quorum(format!("{name}.dead")),
            delay_queue_prefix: format!("{name}.delay"),
            consume: vec![queue],
            registrations: None,
            registration_prefetch: DEFAULT_REGISTRATION_PREFETCH,
            partitions: None,
        }
    }

    /// Consume `partitions` as one instance of a group: the transport joins the group's
    /// heartbeats and is the active consumer of its share of the partitions, handing partitions
    /// over as instances come and go. Deferred copies come back to the partition they came from
    /// (exchange `name.retry`); dead letters go to `name.dead`. Keys must be known through a
    /// source every instance shares (a database): a partition's new owner asks it.
    pub fn partitioned(partitions: Partitions) -> Self {
        let name = partitions.name.clone();
        let mut queues = (0..partitions.count).map(|i| partitions.queue(i));
        let Some(first) = queues.next() else {
            unreachable!("at least one partition");
        };
        let mut route = Self::new(first)
            .retry(Retry::to_source_queue(Exchange::direct(format!(
                "{name}.retry"
            ))))
            .dead_letters(Queue::quorum(format!("{name}.dead")))
            .delay_queue_prefix(format!("{name}.delay"));
        route.consume.extend(queues);
        route.partitions = Some(partitions);
        route
    }

    /// Also consume `queue` (e.g. the queue deferred copies come back to).
    pub fn also_consume(mut self, queue: Queue) -> Self {
        self.consume.push(queue);
        self
    }

    /// Registrations come from `queue` (a [`Queue::stream`] replays them on every connect).
    pub fn registrations(mut self, queue: Queue) -> Self {
        self.registrations = Some(queue);
        self
    }

    /// Deferred copies come back this way; a consumed queue must be bound to receive them (it
    /// is checked). Replaces the derived `q.retry` exchange and its binding.
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self.derived_retry = false;
        self
    }

    /// Dead letters go to `queue` (through the default exchange).
    pub fn dead_letters(mut self, queue: Queue) -> Self {
        self.dead_letters = queue;
        self
    }

    /// The prefix of delay queue names (`<prefix>.<ms>ms`), when there is no plugin.
    pub fn delay_queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.delay_queue_prefix = prefix.into();
        self
    }

    /// The prefetch of the registration consumer (default
    /// [`DEFAULT_REGISTRATION_PREFETCH`]; zero is raised to 1).
    pub fn registration_prefetch(mut self, prefetch: u16) -> Self {
        self.registration_prefetch = prefetch.max(1);
        self
    }

    /// The consumed queues, the retry bindings prereq derives included.
    pub fn consumed(&self) -> Vec<Queue> {
        let mut queues = self.consume.clone();
        match &self.retry.routing_key {
            Some(key) if self.derived_retry => {
                if let Some(first) = queues.first_mut() {
                    first
                        .bindings
                        .push((self.retry.exchange.clone(), key.clone()));
                }
            }
            None if !self.retry.exchange.name.is_empty() => {
                for q in &mut queues {
                    let name = q.name.clone();
                    q.bindings.push((self.retry.exchange.clone(), name));
                }
            }
            _ => {}
        }
        queues
    }

    /// The partitions, for a partitioned route.
    pub fn partitions(&self) -> Option<&Partitions> {
        self.partitions.as_ref()
    }

    /// Every queue the route names: consumed, registrations, dead letters (not the delay
    /// queues, which are made on demand: see [`crate::amqp::AmqpTransport::delay_queues`]).
    pub fn queue_names(&self) -> Vec<String> {
        self.consume
            .iter()
            .chain(&self.registrations)
            .chain([&self.dead_letters])
            .map(|q| q.name.clone())
            .collect()
    }

    /// Every exchange the route names (the default exchange left out).
    pub fn exchange_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .consume
            .iter()
            .chain(&self.registrations)
            .flat_map(|q| q.bindings.iter().map(|(e, _)| e.name.clone()))
            .chain([self.retry.exchange.name.clone()])
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Where registrations come from, if anywhere.
    pub fn registration_queue(&self) -> Option<&Queue> {
        self.registrations.as_ref()
    }

    /// Where dead letters go.
    pub fn dead_letter_queue(&self) -> &Queue {
        &self.dead_letters
    }

    /// How deferred copies come back.
    pub fn retry_route(&self) -> &Retry {
        &self.retry
    }

    /// The prefix of delay queue names.
    pub fn delay_prefix(&self) -> &str {
        &self.delay_queue_prefix
    }

    /// Check the route before touching the broker: names fit AMQP, a queue is consumed, nothing
    /// is consumed twice, and deferred copies can come back to a consumed queue.
    pub fn check(&self) -> Result<(), AmqpError> {
        let config = |m: String| Err(AmqpError::Config(m));
        let consumed = self.consumed();
        if consumed.is_empty() {
            return config("no queue to consume".into());
        }
        let mut names: Vec<&str> = consumed.iter().map(|q| q.name.as_str()).collect();
        if let Some(r) = &self.registrations {
            names.push(&r.name);
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return config(format!("queue {name:?} is consumed twice"));
            }
        }
        if names.contains(&self.dead_letters.name.as_str()) {
            return config(format!(
                "the dead-letter queue {:?} is also consumed: dead letters would come back",
                self.dead_letters.name
            ));
        }
        let exchanges = consumed
            .iter()
            .chain(&self.registrations)
            .flat_map(|q| {
                q.bindings
                    .iter()
                    .map(|(e, k)| (e.name.as_str(), k.as_str()))
            })
            .chain([(
                self.retry.exchange.name.as_str(),
                self.retry.routing_key.as_deref().unwrap_or_default(),
            )]);
        for (what, name) in names
            .iter()
            .map(|n| ("queue", *n))
            .chain([
                ("dead-letter queue", self.dead_letters.name.as_str()),
                ("delay queue prefix", self.delay_queue_prefix.as_str()),
            ])
            .chain(exchanges.flat_map(|(e, k)| [("exchange", e), ("routing key", k)]))
        {
            if name.len() > 255 {
                return config(format!(
                    "{what} {:?}… is longer than 255 bytes",
                    name.chars().take(32).collect::<String>()
                ));
            }
            if name.is_empty() && what.ends_with("queue") {
                return config(format!("the {what} name is empty"));
            }
        }
        self.check_retry(&consumed)
    }

    /// Deferred copies must reach a consumed queue through the retry exchange.
    fn check_retry(&self, consumed: &[Queue]) -> Result<(), AmqpError> {
        let Retry {
            exchange,
            routing_key,
        } = &self.retry;
        let Some(routing_key) = routing_key else {
            // Back to its own queue: by name through the default exchange, or through a direct
            // exchange every consumed queue is bound to by name (`consumed` adds the bindings).
            return match exchange.kind {
                ExchangeKind::Direct => Ok(()),
                other => Err(AmqpError::Config(format!(
                    "deferred copies go back to their own queue by name: the retry exchange {:?} \
                     must be direct, not {other}",
                    exchange.name
                ))),
            };
        };
        if exchange.name.is_empty() {
            // The default exchange routes to the queue named by the key.
            if consumed.iter().any(|q| q.name == *routing_key) {
                return Ok(());
            }
            return Err(AmqpError::Config(format!(
                "deferred copies would be published to the default exchange with key \
                 {routing_key:?}, which names no consumed queue: they could never come back"
            )));
        }
        if exchange.kind == ExchangeKind::Headers {
            return Err(AmqpError::Config(format!(
                "the retry exchange {:?} is a headers exchange: prereq cannot check that deferred \
                 copies come back; use a direct, topic or fanout exchange",
                exchange.name
            )));
        }
        let back = consumed.iter().any(|q| {
            q.bindings.iter().any(|(e, key)| {
                e.name == exchange.name && exchange.kind.routes(key, routing_key) == Some(true)
            })
        });
        if back {
            return Ok(());
        }
        Err(AmqpError::Config(format!(
            "deferred copies go back through exchange {:?} ({}) with routing key {:?}, but no \
             consumed queue is bound to it with a matching key ({}): they could never come back. \
             Bind a consumed queue to it (Queue::bound_to) or change Route::retry",
            exchange.name,
            exchange.kind,
            routing_key,
            consumed
                .iter()
                .map(|q| q.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        for (p, k, m) in [
            ("order.*", "order.new", true),
            ("order.*", "order.new.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.new.eu", true),
            ("#", "", true),
            ("#", "a.b", true),
            ("*.new", "order.new", true),
            ("*", "", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
            ("", "", true),
            ("a", "", false),
        ] {
            assert_eq!(topic_matches(p, k), m, "{p:?} ~ {k:?}");
        }
    }

    #[test]
    fn the_derived_route_comes_back_to_the_queue() {
        let r = Route::new(Queue::classic("orders"));
        assert!(r.check().is_ok());
        let consumed = r.consumed();
        assert_eq!(
            consumed[0].bindings,
            vec![(Exchange::direct("orders.retry"), "orders".to_owned())]
        );
        assert_eq!(r.dead_letter_queue().name(), "orders.dead");
        assert_eq!(r.dead_letter_queue().kind(), QueueKind::Quorum);
        assert_eq!(
            r.dead_letter_queue().effective_delivery_limit(),
            Some(DEFAULT_DELIVERY_LIMIT)
        );
        assert_eq!(r.delay_prefix(), "orders.delay");
        assert!(r.registration_queue().is_none());
    }

    #[test]
    fn a_retry_route_without_a_way_back_is_refused() {
        let feed = Exchange::direct("payments");
        let base = || Route::new(Queue::classic("p").bound_to(feed.clone(), "process"));
        let ok = base()
            .also_consume(Queue::classic("re").bound_to(feed.clone(), "reprocess"))
            .retry(Retry::via(feed.clone(), "reprocess"));
        assert!(ok.check().is_ok());
        let e = base()
            .retry(Retry::via(feed.clone(), "reprocess"))
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("could never come back"), "{e}");
        assert!(
            base()
                .retry(Retry::via(Exchange::fanout("everyone"), "x"))
                .check()
                .is_err(),
            "not bound at all"
        );
        assert!(
            base()
                .retry(Retry::via(Exchange::new("h", ExchangeKind::Headers), "x"))
                .check()
                .is_err()
        );
        // The default exchange: the key must name a consumed queue.
        assert!(
            base()
                .retry(Retry::via(Exchange::direct(""), "p"))
                .check()
                .is_ok()
        );
        assert!(
            base()
                .retry(Retry::via(Exchange::direct(""), "elsewhere"))
                .check()
                .is_err()
        );
        // Topic and fanout exchanges route by their own rules.
        let topic = Exchange::topic("t");
        assert!(
            Route::new(Queue::classic("q").bound_to(topic.clone(), "retry.#"))
                .retry(Retry::via(topic, "retry.q.1"))
                .check()
                .is_ok()
        );
        let fan = Exchange::fanout("f");
        assert!(
            Route::new(Queue::classic("q").bound_to(fan.clone(), ""))
                .retry(Retry::via(fan, "anything"))
                .check()
                .is_ok()
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Route::new(Queue::classic("")).check().is_err());
        assert!(Route::new(Queue::classic("q".repeat(256))).check().is_err());
        assert!(
            Route::new(Queue::classic("q"))
                .also_consume(Queue::classic("q"))
                .check()
                .is_err(),
            "twice"
        );
        assert!(
            Route::new(Queue::classic("q"))
                .registrations(Queue::classic("q"))
                .check()
                .is_err()
        );
        assert!(
            Route::new(Queue::classic("q"))
                .dead_letters(Queue::quorum("q"))
                .check()
                .is_err(),
            "dead letters into a consumed queue"
        );
    }

    #[test]
    fn delivery_limits() {
        assert_eq!(Queue::classic("c").effective_delivery_limit(), None);
        assert_eq!(
            Queue::existing("q", QueueKind::Quorum).effective_delivery_limit(),
            Some(DEFAULT_DELIVERY_LIMIT)
        );
        assert_eq!(
            Queue::quorum("q")
                .delivery_limit(3)
                .effective_delivery_limit(),
            Some(3)
        );
        assert_eq!(
            Queue::quorum("q")
                .delivery_limit(0)
                .effective_delivery_limit(),
            Some(1)
        );
    }
}
