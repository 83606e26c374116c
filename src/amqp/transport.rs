//! [`AmqpTransport`]: the engine's [`Transport`] over RabbitMQ, through lapin.
//!
//! At-least-once, end to end:
//! * every consumer uses manual acknowledgements and an explicit prefetch;
//! * a message is acknowledged only when the engine says [`Settle::Ack`], or after its deferred
//!   or dead-lettered copy was confirmed by the broker (publisher confirms; a confirm carrying
//!   a returned message means unroutable and counts as a failure);
//! * a copy that is not confirmed leaves the original with the broker (it is given back with
//!   `basic.nack(requeue)`), so the worst case is a duplicate, never a loss;
//! * the connection recovers by itself (lapin auto-recover); deliveries that were in flight
//!   when it dropped are redelivered by the broker, so a handler may see a message twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::addr::AmqpAddr;
use super::config::AmqpConfig;
use super::delay::{self, DelayMechanism};
use super::error::AmqpError;
use super::headers::{self, Origin};
use crate::transport::{DeadLetter, Delivery, DeliveryId, Settle, Source, Transport};

/// How long a settle waits for the publisher channel to recover before giving up on a copy.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// A [`Transport`] over RabbitMQ.
///
/// Created with [`AmqpTransport::connect`]; consumes every message queue of the
/// [`AmqpConfig`] (one channel each) and the registration queue (its own channel), and publishes
/// deferred and dead-lettered copies on a separate channel in confirm mode.
///
/// Dropping the transport closes the connection; the broker then requeues every delivery that
/// was not settled.
pub struct AmqpTransport {
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Result<Delivery, AmqpError>>>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

struct Shared {
    config: AmqpConfig,
    mechanism: DelayMechanism,
    connection: Connection,
    publisher: Channel,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    delay_queues: tokio::sync::Mutex<BTreeSet<Duration>>,
}

/// What settling a delivery needs from the original message.
struct Pending {
    acker: Acker,
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
    /// From a stream: it cannot be requeued (a nack closes the connection with
    /// `540 NOT_IMPLEMENTED`), and needs not be: every connect reads the stream again.
    stream: bool,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("addr", self.shared.config.addr())
            .field("mechanism", &self.shared.mechanism)
            .field("queues", &self.shared.config.queues())
            .field(
                "registration_queue",
                &self.shared.config.registration_queue(),
            )
            .finish_non_exhaustive()
    }
}

fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|e| AmqpError::Config(format!("{e}")))
}

impl Shared {
    fn broker(&self, operation: impl Into<String>, e: &lapin::Error) -> AmqpError {
        broker_error(self.config.addr(), operation, e)
    }
}

fn broker_error(addr: &AmqpAddr, operation: impl Into<String>, e: &lapin::Error) -> AmqpError {
    AmqpError::Broker {
        operation: operation.into(),
        message: addr.scrub(&e.to_string()),
    }
}

/// How long the first connection may take before connecting fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Open a connection with lapin's auto-recovery on; errors never show the credentials.
///
/// With auto-recovery, lapin retries even the *first* connection for minutes (exponential
/// backoff up to 60 s) when the broker is unreachable or refuses the login. A misconfigured
/// service should fail at start instead: so a plain connection is tried first, within
/// [`CONNECT_TIMEOUT`], and only once it succeeded is the recovering one opened.
pub async fn connect(addr: &AmqpAddr, connection_name: &str) -> Result<Connection, AmqpError> {
    let failed = |message: String| AmqpError::Connect {
        addr: addr.redacted(),
        message,
    };
    let open = |properties: ConnectionProperties| async move {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(addr.expose(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(failed(addr.scrub(&e.to_string()))),
            Err(_) => Err(failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
    };
    let preflight = open(
        ConnectionProperties::default()
            .with_connection_name(format!("{connection_name}-preflight").into()),
    )
    .await?;
    let _ = preflight.close(200, "prereq: preflight done".into()).await;
    open(
        ConnectionProperties::default()
            .enable_auto_recover()
            .with_connection_name(connection_name.into()),
    )
    .await
}

/// Declare everything `config` needs on `channel`: the retry exchange (typed by `mechanism`),
/// the topology's exchanges, queues and bindings, and the dead-letter queue (durable quorum).
/// Idempotent; a name that exists with other arguments fails with `406 PRECONDITION_FAILED`.
pub async fn declare_topology(
    channel: &Channel,
    config: &AmqpConfig,
    mechanism: DelayMechanism,
) -> Result<(), AmqpError> {
    let addr = config.addr();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(config.retry_exchange())?,
            match mechanism {
                DelayMechanism::DelayedExchange => {
                    ExchangeKind::Custom(delay::DELAYED_EXCHANGE_TYPE.to_owned())
                }
                DelayMechanism::DelayQueues => ExchangeKind::Direct,
            },
            durable,
            mechanism.retry_exchange_arguments(),
        )
        .await
        .map_err(|e| {
            broker_error(
                addr,
                format!("declare retry exchange {}", config.retry_exchange()),
                &e,
            )
        })?;
    let topology = config.topology();
    for name in &topology.exchanges {
        channel
            .exchange_declare(
                short(name)?,
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(addr, format!("declare exchange {name}"), &e))?;
    }
    let stream = config
        .registration_stream()
        .then_some(config.registration_queue());
    let queues = topology
        .queues
        .iter()
        .filter(|(q, _)| Some(q.as_str()) != stream)
        .map(|(q, quorum)| (q.as_str(), Some(*quorum)))
        .chain([(config.dead_letter_queue(), Some(true))])
        .chain(stream.map(|q| (q, None)));
    for (name, quorum) in queues {
        let mut args = FieldTable::default();
        // `None`: the registration stream.
        let kind = match quorum {
            Some(true) => Some("quorum"),
            Some(false) => None,
            None => Some("stream"),
        };
        if let Some(kind) = kind {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(kind)),
            );
        }
        channel
            .queue_declare(
                short(name)?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|e| broker_error(addr, format!("declare queue {name}"), &e))?;
    }
    for (queue, exchange, key) in &topology.bindings {
        channel
            .queue_bind(
                short(queue)?,
                short(exchange)?,
                short(key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(addr, format!("bind {queue} to {exchange}/{key}"), &e))?;
    }
    Ok(())
}

impl AmqpTransport {
    /// Resolve the delay mechanism (probing for the plugin under [`delay::DelayMode::Auto`]),
    /// connect with auto-recovery, declare the topology, and start consuming.
    pub async fn connect(config: AmqpConfig) -> Result<Self, AmqpError> {
        config.validate()?;
        let addr = config.addr().clone();
        let mechanism = delay::resolve(config.delay_mode(), &addr).await?;
        info!(mechanism = %mechanism, addr = %addr, "prereq: delay mechanism selected");
        let connection = connect(&addr, config.connection_name()).await?;
        let channel = |what: &'static str| {
            let connection = &connection;
            let addr = &addr;
            async move {
                connection
                    .create_channel()
                    .await
                    .map_err(|e| broker_error(addr, what, &e))
            }
        };
        let publisher = channel("open publisher channel").await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker_error(&addr, "enable publisher confirms", &e))?;
        declare_topology(&publisher, &config, mechanism).await?;

        let mut consumers = Vec::new();
        for queue in config.queues() {
            let ch = channel("open consumer channel").await?;
            let consumer =
                consume(&ch, queue, config.prefetch(), FieldTable::default(), &addr).await?;
            consumers.push((ch, consumer, Source::Message, false));
        }
        let ch = channel("open registration channel").await?;
        let mut arguments = FieldTable::default();
        if config.registration_stream() {
            // Every key ever registered (within the stream's retention), on every connect.
            arguments.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString(LongString::from("first")),
            );
        }
        let consumer = consume(
            &ch,
            config.registration_queue(),
            config.registration_prefetch,
            arguments,
            &addr,
        )
        .await?;
        consumers.push((
            ch,
            consumer,
            Source::Registration,
            config.registration_stream(),
        ));

        let capacity = usize::from(config.prefetch)
            .saturating_mul(config.queues().len())
            .saturating_add(usize::from(config.registration_prefetch))
            .max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            config,
            mechanism,
            connection,
            publisher,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            delay_queues: tokio::sync::Mutex::new(BTreeSet::new()),
        });
        let pumps = consumers
            .into_iter()
            .map(|(ch, consumer, source, stream)| {
                tokio::spawn(pump(
                    shared.clone(),
                    ch,
                    consumer,
                    source,
                    stream,
                    tx.clone(),
                ))
            })
            .collect();
        Ok(Self {
            shared,
            rx: tokio::sync::Mutex::new(rx),
            pumps,
        })
    }

    /// The delay mechanism in use.
    pub fn mechanism(&self) -> DelayMechanism {
        self.shared.mechanism
    }

    /// The configuration this transport runs with.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Deliveries handed out and not settled yet.
    pub fn in_flight(&self) -> usize {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The delay queues this transport declared so far (names), e.g. to delete them in tests.
    pub async fn delay_queues(&self) -> Vec<String> {
        let prefix = self.shared.config.delay_queue_prefix();
        self.shared
            .delay_queues
            .lock()
            .await
            .iter()
            .map(|d| delay::delay_queue_name(prefix, *d))
            .collect()
    }

    /// Close the connection (`200 OK`). Unsettled deliveries go back to their queues.
    pub async fn close(&self) -> Result<(), AmqpError> {
        for pump in &self.pumps {
            pump.abort();
        }
        self.shared
            .connection
            .close(200, "prereq: closing".into())
            .await
            .map_err(|e| self.shared.broker("close connection", &e))
    }
}

impl Drop for AmqpTransport {
    fn drop(&mut self) {
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

async fn consume(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    arguments: FieldTable,
    addr: &AmqpAddr,
) -> Result<Consumer, AmqpError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| broker_error(addr, format!("set prefetch on {queue}"), &e))?;
    channel
        .basic_consume(
            short(queue)?,
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| broker_error(addr, format!("consume {queue}"), &e))
}

/// Move deliveries from one lapin consumer into the transport's channel, riding out
/// connection recoveries.
async fn pump(
    shared: Arc<Shared>,
    channel: Channel,
    mut consumer: Consumer,
    source: Source,
    stream: bool,
    tx: mpsc::Sender<Result<Delivery, AmqpError>>,
) {
    let queue = consumer.queue();
    while let Some(next) = consumer.next().await {
        match next {
            Ok(d) => {
                let delivery = shared.register(d, source, stream);
                if tx.send(Ok(delivery)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(queue = %queue, error = %shared.config.addr().scrub(&e.to_string()),
                    "prereq: consumer interrupted, waiting for recovery");
                match channel.wait_for_recovery(e).await {
                    Ok(()) => info!(queue = %queue, "prereq: consumer recovered"),
                    Err(e) => {
                        let _ = tx
                            .send(Err(shared.broker(format!("consume {queue}"), &e)))
                            .await;
                        return;
                    }
                }
            }
        }
    }
}

impl Shared {
    fn register(&self, d: LapinDelivery, source: Source, stream: bool) -> Delivery {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let incoming = headers::read_incoming(d.properties.headers().as_ref());
        let delivery = Delivery {
            id: DeliveryId(id),
            source,
            body: d.data.clone(),
            attempt: incoming.attempt,
            max_attempts: incoming.max_attempts,
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            redelivered: d.redelivered,
        };
        let pending = Pending {
            acker: d.acker,
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            properties: d.properties,
            body: d.data,
            stream,
        };
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, pending);
        delivery
    }

    async fn ack(&self, p: &Pending) -> Result<(), AmqpError> {
        match p.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                warn!("prereq: delivery from before a reconnect, the broker redelivers it");
                Ok(())
            }
            Err(e) if p.acker.poisoned() => {
                warn!(error = %self.config.addr().scrub(&e.to_string()),
                    "prereq: ack after the channel failed, the broker redelivers the message");
                Ok(())
            }
            Err(e) => Err(self.broker("ack", &e)),
        }
    }

    async fn requeue(&self, p: &Pending) -> Result<(), AmqpError> {
        if p.stream {
            // Acknowledged instead (it frees the stream consumer's credit); the next connect
            // reads it again from the stream.
            return self.ack(p).await;
        }
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        match p.acker.nack(options).await {
            Ok(_) => Ok(()),
            // A failed channel requeues every unacknowledged delivery by itself.
            Err(_) if p.acker.poisoned() => Ok(()),
            Err(e) => Err(self.broker("nack (requeue)", &e)),
        }
    }

    /// Publish a copy and wait for the broker's confirm; retried once after a channel recovery.
    async fn publish_confirmed(
        &self,
        what: &'static str,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let mut recovered = false;
        loop {
            let attempt = self
                .publisher
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    body,
                    properties.clone(),
                )
                .await;
            let confirm = match attempt {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            let not_confirmed = |message: String| AmqpError::NotConfirmed { what, message };
            return match confirm {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => Err(not_confirmed(format!(
                    "returned as unroutable ({} {}) from exchange {exchange:?} with key \
                     {routing_key:?}",
                    returned.reply_code, returned.reply_text
                ))),
                Ok(Confirmation::Nack(_)) => Err(not_confirmed("nacked by the broker".into())),
                Ok(Confirmation::NotRequested) => {
                    Err(not_confirmed("publisher confirms are off".into()))
                }
                Err(e) if !recovered => {
                    let message = self.config.addr().scrub(&e.to_string());
                    match tokio::time::timeout(RECOVERY_WAIT, self.publisher.wait_for_recovery(e))
                        .await
                    {
                        Ok(Ok(())) => {
                            recovered = true;
                            continue;
                        }
                        _ => Err(not_confirmed(message)),
                    }
                }
                Err(e) => Err(not_confirmed(self.config.addr().scrub(&e.to_string()))),
            };
        }
    }

    async fn ensure_delay_queue(&self, delay: Duration) -> Result<String, AmqpError> {
        let name = delay::delay_queue_name(self.config.delay_queue_prefix(), delay);
        let mut declared = self.delay_queues.lock().await;
        if !declared.contains(&delay) {
            let args = delay::delay_queue_arguments(
                delay,
                self.config.retry_exchange(),
                self.config.retry_routing_key(),
            );
            self.publisher
                .queue_declare(
                    short(&name)?,
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(|e| self.broker(format!("declare delay queue {name}"), &e))?;
            declared.insert(delay);
        }
        Ok(name)
    }

    async fn defer(&self, p: &Pending, delay: Duration, attempt: u32) -> Result<(), AmqpError> {
        let original = p.properties.headers().as_ref();
        let origin = Origin::of(original, &p.exchange, &p.routing_key, headers::now_ms());
        let retry_exchange = self.config.retry_exchange();
        let retry_key = self.config.retry_routing_key();
        match self.mechanism {
            DelayMechanism::DelayedExchange => {
                let delay = delay.min(self.config.max_delay());
                let h = headers::defer_headers(original, &origin, attempt, delay, true);
                // No `mandatory`: the plugin returns every delayed message as unroutable at
                // once, although it routes it later.
                self.publish_confirmed(
                    "defer",
                    retry_exchange,
                    retry_key,
                    false,
                    &p.body,
                    copy_properties(&p.properties, h),
                )
                .await
            }
            DelayMechanism::DelayQueues => {
                let bucket = delay::delay_bucket(delay, self.config.max_delay());
                let h = headers::defer_headers(original, &origin, attempt, bucket, false);
                let props = copy_properties(&p.properties, h);
                if bucket.is_zero() {
                    self.publish_confirmed("defer", retry_exchange, retry_key, true, &p.body, props)
                        .await
                } else {
                    let queue = self.ensure_delay_queue(bucket).await?;
                    self.publish_confirmed("defer", "", &queue, true, &p.body, props)
                        .await
                }
            }
        }
    }

    async fn dead_letter(&self, p: &Pending, dead: &DeadLetter) -> Result<(), AmqpError> {
        let original = p.properties.headers().as_ref();
        let now = headers::now_ms();
        let origin = Origin::of(original, &p.exchange, &p.routing_key, now);
        let h = headers::dead_letter_headers(original, &origin, dead, now);
        self.publish_confirmed(
            "dead-letter",
            "",
            self.config.dead_letter_queue(),
            true,
            &p.body,
            copy_properties(&p.properties, h),
        )
        .await
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), AmqpError> {
        let p = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id.0)
            .ok_or(AmqpError::UnknownDelivery(id))?;
        let copied = match &settle {
            Settle::Ack => return self.ack(&p).await,
            Settle::Requeue => return self.requeue(&p).await,
            // The channel of the original failed: the broker redelivers it; a copy now would
            // only add a duplicate.
            _ if !p.acker.usable() => {
                warn!("prereq: delivery from before a reconnect, the broker redelivers it");
                return Ok(());
            }
            Settle::Defer { delay, attempt } => self.defer(&p, *delay, *attempt).await,
            Settle::DeadLetter(dead) => self.dead_letter(&p, dead).await,
        };
        match copied {
            Ok(()) => self.ack(&p).await,
            Err(e) => {
                warn!(error = %e, "prereq: copy not stored, giving the original back to the broker");
                if let Err(requeue) = self.requeue(&p).await {
                    warn!(error = %requeue, "prereq: requeue failed too");
                }
                Err(e)
            }
        }
    }
}

/// The original's properties for a copy: same metadata, new headers, persistent; without
/// `expiration` (it would drop the copy from a queue with no dead-letter exchange) and without
/// `user-id` (the broker refuses a user id other than the connection's).
fn copy_properties(p: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

impl Transport for AmqpTransport {
    type Error = AmqpError;

    async fn recv(&self) -> Result<Option<Delivery>, AmqpError> {
        match self.rx.lock().await.recv().await {
            Some(Ok(d)) => Ok(Some(d)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), AmqpError> {
        self.shared.settle(id, settle).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_drop_expiration_and_user_id_and_are_persistent() {
        let p = BasicProperties::default()
            .with_expiration("1000".into())
            .with_user_id("someone".into())
            .with_message_id("m1".into())
            .with_content_type("application/json".into());
        let c = copy_properties(&p, FieldTable::default());
        assert_eq!(c.expiration(), &None);
        assert_eq!(c.user_id(), &None);
        assert_eq!(c.delivery_mode(), &Some(2));
        assert_eq!(c.message_id().as_ref().map(|m| m.as_str()), Some("m1"));
        assert_eq!(
            c.content_type().as_ref().map(|m| m.as_str()),
            Some("application/json")
        );
    }
}
