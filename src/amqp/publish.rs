//! Publishing with publisher confirms: [`Publisher`] for a service's own messages, and the
//! confirmed publish the transport stores its copies with.
//!
//! A message the broker cannot route (`mandatory`, returned as unroutable) or does not confirm
//! is an error, never a silent loss.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::addr::AmqpAddr;
use super::broker::{Broker, answered};
use super::declare::short;
use super::error::AmqpError;
use super::route::Partitions;

/// How long a publish waits for its channel to recover before giving up.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// A header value of a [`Message`], with its AMQP type.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HeaderValue {
    /// A signed 32-bit integer (AMQP field type `I`: what Go's `int` becomes in an
    /// `amqp091-go` table).
    Int32(i32),
    /// A signed 64-bit integer (`l`).
    Int64(i64),
    /// A string (`S`).
    Text(String),
    /// A boolean (`t`).
    Bool(bool),
}

impl HeaderValue {
    fn amqp(&self) -> AMQPValue {
        match self {
            Self::Int32(v) => AMQPValue::LongInt(*v),
            Self::Int64(v) => AMQPValue::LongLongInt(*v),
            Self::Text(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
            Self::Bool(b) => AMQPValue::Boolean(*b),
        }
    }
}

/// What goes with a published body: properties, headers, and whether it must be routable.
///
/// Defaults: no message id, no content type, transient, no headers, `mandatory`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
#[must_use]
pub struct Message {
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `content_type` property (e.g. `application/json`).
    pub content_type: Option<String>,
    /// Delivery mode 2 (written to disk by the broker).
    pub persistent: bool,
    /// Headers, in order.
    pub headers: Vec<(String, HeaderValue)>,
    /// Fail if no queue is bound to receive it (default `true`). Off only for a delayed-message
    /// exchange with a positive `x-delay`, which the plugin reports as unroutable at once
    /// although it routes it later.
    pub mandatory: bool,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            message_id: None,
            content_type: None,
            persistent: false,
            headers: Vec::new(),
            mandatory: true,
        }
    }
}

impl Message {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// With this content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Persistent (delivery mode 2).
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// With this header.
    pub fn header(mut self, name: impl Into<String>, value: HeaderValue) -> Self {
        self.headers.push((name.into(), value));
        self
    }

    /// Without `mandatory` (see [`Message::mandatory`]).
    pub fn not_mandatory(mut self) -> Self {
        self.mandatory = false;
        self
    }

    fn properties(&self) -> Result<BasicProperties, AmqpError> {
        let mut p = BasicProperties::default();
        if let Some(id) = &self.message_id {
            p = p.with_message_id(short(id)?);
        }
        if let Some(ct) = &self.content_type {
            p = p.with_content_type(short(ct)?);
        }
        if self.persistent {
            p = p.with_delivery_mode(2);
        }
        if !self.headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in &self.headers {
                table.insert(short(name)?, value.amqp());
            }
            p = p.with_headers(table);
        }
        Ok(p)
    }
}

/// Publishes a service's own messages, confirmed: [`Publisher::publish`] returns once the
/// broker took the message, and fails if it could not route it (`mandatory`) or refused it.
///
/// ```no_run
/// use prereq::amqp::{Broker, BrokerOptions, Message};
///
/// # async fn f() -> Result<(), prereq::amqp::AmqpError> {
/// let broker = Broker::connect(BrokerOptions::from_env()).await?;
/// let publisher = broker.publisher().await?;
/// publisher
///     .publish("clients", "", br#"{"id":5}"#, &Message::new().content_type("application/json"))
///     .await?; // an error if nothing is bound to `clients` with key ""
/// # Ok(()) }
/// ```
pub struct Publisher {
    channel: Channel,
    addr: AmqpAddr,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A publisher on its own channel, with publisher confirms.
    pub async fn publisher(&self) -> Result<Publisher, AmqpError> {
        Publisher::new(self).await
    }
}

impl Publisher {
    pub(crate) async fn new(broker: &Broker) -> Result<Self, AmqpError> {
        Ok(Self {
            channel: confirmed_channel(broker, "open publisher channel").await?,
            addr: broker.addr().clone(),
        })
    }

    /// Publish `body` to the group's partitions, with `key` as routing key: every message of a
    /// key reaches the same partition, in order.
    pub async fn publish_keyed(
        &self,
        partitions: &Partitions,
        key: &str,
        body: &[u8],
        message: &Message,
    ) -> Result<(), AmqpError> {
        self.publish(&partitions.name, key, body, message).await
    }

    /// Publish `body` to `exchange` with `routing_key`, and wait for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message: &Message,
    ) -> Result<(), AmqpError> {
        publish_confirmed(
            &self.channel,
            &self.addr,
            Copy {
                what: "publish",
                exchange,
                routing_key,
                mandatory: message.mandatory,
            },
            body,
            message.properties()?,
        )
        .await
    }
}

/// A channel in confirm mode.
pub(crate) async fn confirmed_channel(broker: &Broker, what: &str) -> Result<Channel, AmqpError> {
    let channel = broker.channel(what).await?;
    answered(
        "enabling publisher confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .map_err(|e| broker.addr().broker_error("enable publisher confirms", &e))?;
    Ok(channel)
}

/// Where a confirmed publish goes.
pub(crate) struct Copy<'a> {
    /// What it is, for errors: `defer`, `dead-letter`, `give back`, `publish`.
    pub(crate) what: &'static str,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) mandatory: bool,
}

/// Publish and wait for the broker's confirm; retried once after a channel recovery. A confirm
/// carrying a returned message means unroutable: an error.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    addr: &AmqpAddr,
    to: Copy<'_>,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    let exchange = short(to.exchange)?;
    let routing_key = short(to.routing_key)?;
    let mut recovered = false;
    loop {
        let attempt = publish(
            channel,
            exchange.clone(),
            routing_key.clone(),
            to.mandatory,
            body,
            properties.clone(),
        )
        .await;
        let confirm = match attempt {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        return match confirm {
            Ok(confirmation) => confirmed(to, confirmation),
            Err(e) if !recovered => {
                let message = addr.scrub(&e.to_string());
                match tokio::time::timeout(RECOVERY_WAIT, channel.wait_for_recovery(e)).await {
                    Ok(Ok(())) => {
                        recovered = true;
                        continue;
                    }
                    _ => Err(not_confirmed(to, message)),
                }
            }
            Err(e) => Err(not_confirmed(to, addr.scrub(&e.to_string()))),
        };
    }
}

/// Publish `body`; the returned future is the broker's confirm. Publishes on one channel reach
/// their queues in the order they are made, whenever their confirms arrive. A publish not
/// written within [`WRITE_WAIT`](super::broker::WRITE_WAIT) is an IO error (`TimedOut`).
pub(crate) async fn publish(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    mandatory: bool,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, lapin::Error> {
    let publishing = channel.basic_publish(
        exchange,
        routing_key,
        BasicPublishOptions {
            mandatory,
            immediate: false,
        },
        body,
        properties,
    );
    answered("a publish", publishing).await
}

/// What the broker's `confirmation` of a publish as `to` means: a confirm carrying a returned
/// message means unroutable, an error.
pub(crate) fn confirmed(to: Copy<'_>, confirmation: Confirmation) -> Result<(), AmqpError> {
    let Copy {
        exchange,
        routing_key,
        ..
    } = to;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(not_confirmed(
            to,
            format!(
                "{UNROUTABLE} ({} {}): nothing is bound to exchange {exchange:?} with key \
                 {routing_key:?}",
                returned.reply_code, returned.reply_text
            ),
        )),
        Confirmation::Nack(_) => Err(not_confirmed(to, "nacked by the broker".into())),
        Confirmation::NotRequested => Err(not_confirmed(to, "publisher confirms are off".into())),
    }
}

/// How the error of a copy the broker returned begins.
const UNROUTABLE: &str = "returned as unroutable";

/// Did the broker return the copy, no queue being bound where it was sent (rather than refuse
/// or lose it)?
pub(crate) fn is_unroutable(e: &AmqpError) -> bool {
    matches!(e, AmqpError::NotConfirmed { message, .. } if message.starts_with(UNROUTABLE))
}

fn not_confirmed(to: Copy<'_>, message: String) -> AmqpError {
    AmqpError::NotConfirmed {
        what: to.what,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_typed_headers_and_properties() {
        let m = Message::new()
            .message_id("m1")
            .content_type("application/json")
            .header("x-retry", HeaderValue::Int32(0))
            .header("x-big", HeaderValue::Int64(1 << 40))
            .header("x-name", HeaderValue::Text("a".into()));
        assert!(m.mandatory && !m.persistent);
        let p = m.properties().unwrap();
        let h = p.headers().clone().unwrap();
        assert_eq!(h.inner().get("x-retry"), Some(&AMQPValue::LongInt(0)));
        assert_eq!(
            h.inner().get("x-big"),
            Some(&AMQPValue::LongLongInt(1 << 40))
        );
        assert_eq!(p.delivery_mode(), &None, "transient unless asked");
        assert!(
            Message::new()
                .persistent()
                .not_mandatory()
                .properties()
                .is_ok()
        );
        assert!(
            Message::new()
                .message_id("x".repeat(300))
                .properties()
                .is_err()
        );
    }
}
