//! Carrying out the engine's decisions: acknowledge; give back (a requeue, or a confirmed copy
//! near a quorum queue's delivery limit); defer (a confirmed copy through the delay mechanism,
//! then the ack); dead-letter (a confirmed copy to the dead-letter queue, then the ack).
//!
//! A copy that is not confirmed leaves the original with the broker (given back with
//! `basic.nack(requeue)`): the worst case is a duplicate, never a loss. A delivery whose channel
//! failed since it was delivered is void: the broker delivers it again, and settling it is
//! reported as such ([`AmqpError::Stale`]), never as done.

use lapin::BasicProperties;
use lapin::types::FieldTable;
use tracing::warn;

use super::acks::AckError;
use super::broker::answered;
use super::copies::new_copy_id;
use super::declare::{declare_delay_queue, declare_queue};
use super::delay::{self, DelayMechanism};
use super::error::AmqpError;
use super::headers::{self, Origin};
use super::publish::{Copy, is_unroutable, publish_confirmed};
use super::shared::{Shared, Unsettled};
use crate::DeadLetter;
use crate::transport::{DeliveryId, Settle};

impl Shared {
    /// Carry out `settle` for delivery `id`.
    pub(crate) async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), AmqpError> {
        let p = self.take(id).ok_or(AmqpError::UnknownDelivery(id))?;
        if matches!(settle, Settle::Requeue) {
            // Given back (requeued, copied back, left to a channel's close): the broker's again
            // before it can come back.
            self.copy_settled(p.copy().as_deref(), id, false);
            return self.settle_taken(&p, settle).await;
        }
        let settled = self.settle_taken(&p, settle).await;
        // A deferred copy is settled for good only once the ack was sent: one whose settle
        // failed is the broker's again.
        self.copy_settled(p.copy().as_deref(), id, settled.is_ok());
        settled
    }

    async fn settle_taken(&self, p: &Unsettled, settle: Settle) -> Result<(), AmqpError> {
        if matches!(settle, Settle::Requeue) && self.returned_by_close(p) {
            // Left unsettled: closing the partition's channel returns it, in order.
            return Ok(());
        }
        if p.acks.is_void() {
            // Its channel failed: the broker has it back and delivers it again (a requeue is
            // what already happened; anything else did not).
            return match settle {
                Settle::Requeue => Ok(()),
                _ => Err(AmqpError::Stale),
            };
        }
        self.carry_out(p, settle).await
    }

    async fn carry_out(&self, p: &Unsettled, settle: Settle) -> Result<(), AmqpError> {
        let copied = match &settle {
            Settle::Ack => return self.ack(p).await,
            Settle::Requeue => return self.give_back(p).await,
            Settle::Defer { delay, attempt } => self.defer(p, *delay, *attempt).await,
            Settle::DeadLetter(dead) => self.dead_letter(p, dead).await,
        };
        match copied {
            Ok(()) => self.ack(p).await,
            Err(e) => {
                warn!(target: "prereq", error = %e,
                    "copy not stored, giving the original back to the broker");
                if let Err(requeue) = self.requeue(p).await {
                    warn!(target: "prereq", error = %requeue, "requeue failed too");
                }
                Err(e)
            }
        }
    }

    async fn ack(&self, p: &Unsettled) -> Result<(), AmqpError> {
        match p.acks.ack(p.tag).await {
            Ok(()) => Ok(()),
            // From a channel that failed since: void.
            Err(AckError::Void) => Err(AmqpError::Stale),
            Err(AckError::Broker(e)) => Err(self.broker.addr().broker_error("ack", &e)),
        }
    }

    /// Give the message back unchanged: a requeue, unless that would take a quorum queue's
    /// delivery count past its limit (the broker would then dead-letter or drop it): a confirmed
    /// copy, which starts a new count, then the ack.
    async fn give_back(&self, p: &Unsettled) -> Result<(), AmqpError> {
        if p.near_limit() {
            self.copy_back(p).await?;
            return self.ack(p).await;
        }
        self.requeue(p).await
    }

    /// A copy of `p` at the back of the queue it came from (its delivery count starts over).
    pub(crate) async fn copy_back(&self, p: &Unsettled) -> Result<(), AmqpError> {
        let props = p.properties.unpack()?;
        let h = headers::given_back_headers(props.headers().as_ref());
        publish_confirmed(
            &self.publisher,
            self.broker.addr(),
            Copy {
                what: "give back",
                exchange: "",
                routing_key: &p.via.queue,
                mandatory: true,
            },
            &p.body,
            copy_properties(&props, h),
        )
        .await
    }

    async fn requeue(&self, p: &Unsettled) -> Result<(), AmqpError> {
        if p.via.stream {
            // Acknowledged instead (it frees the stream consumer's credit); the next connect
            // reads it again from the stream.
            return self.ack(p).await;
        }
        match p.acks.requeue(p.tag).await {
            Ok(()) => Ok(()),
            // A failed channel requeues every unacknowledged delivery by itself.
            Err(AckError::Void) => Ok(()),
            Err(AckError::Broker(e)) => Err(self.broker.addr().broker_error("nack (requeue)", &e)),
        }
    }

    fn origin(&self, p: &Unsettled, props: &BasicProperties) -> Origin {
        Origin::of(
            props.headers().as_ref(),
            &p.via.exchange,
            &p.via.routing_key,
            p.received_ms,
        )
    }

    async fn defer(
        &self,
        p: &Unsettled,
        delay: std::time::Duration,
        attempt: u32,
    ) -> Result<(), AmqpError> {
        let props = p.properties.unpack()?;
        let original = props.headers().as_ref();
        let origin = self.origin(p, &props);
        let retry = &self.route.retry;
        // A fixed key, or back to the queue it came from.
        let key = retry.routing_key.as_deref().unwrap_or(&p.via.queue);
        let max_delay = self.broker.options().get_max_delay();
        let (delay, to) = match self.broker.mechanism() {
            // No `mandatory`: the plugin reports a message with a positive `x-delay` as
            // unroutable at once, although it routes it later. The route was checked instead.
            DelayMechanism::DelayedExchange => (delay.min(max_delay), None),
            DelayMechanism::DelayQueues => {
                let bucket = delay::delay_bucket(delay, max_delay);
                let queue = if bucket.is_zero() {
                    None
                } else {
                    Some(self.ensure_delay_queue(bucket).await?)
                };
                (bucket, Some(queue))
            }
        };
        let copy_id = new_copy_id();
        let mut h = headers::defer_headers(original, &origin, attempt, delay, &copy_id);
        let copy = match &to {
            None => Copy {
                what: "defer",
                exchange: &retry.exchange.name,
                routing_key: key,
                mandatory: false,
            },
            Some(None) => Copy {
                what: "defer",
                exchange: &retry.exchange.name,
                routing_key: key,
                mandatory: true,
            },
            Some(Some(queue)) if retry.routing_key.is_some() => Copy {
                what: "defer",
                exchange: "",
                routing_key: queue,
                mandatory: true,
            },
            // To the delay queue by a header, keeping the key it goes back with.
            Some(Some(queue)) => {
                headers::set_delay_queue(&mut h, queue);
                Copy {
                    what: "defer",
                    exchange: &self.route.delay_queue_prefix,
                    routing_key: key,
                    mandatory: true,
                }
            }
        };
        let props = copy_properties(&props, h);
        let published =
            publish_confirmed(&self.publisher, self.broker.addr(), copy, &p.body, props).await;
        if published.is_err() && matches!(to, Some(Some(_))) {
            // The delay queue may be gone (deleted, lost with a broker): declared again next
            // time, not trusted for good.
            self.delay_queues.lock().await.remove(&delay);
        }
        published?;
        if let Some(partition) = p.partition() {
            self.copy_away(copy_id, partition, delay);
        }
        Ok(())
    }

    async fn ensure_delay_queue(&self, delay: std::time::Duration) -> Result<String, AmqpError> {
        let mut declared = self.delay_queues.lock().await;
        if declared.contains(&delay) {
            return Ok(delay::delay_queue_name(
                &self.route.delay_queue_prefix,
                delay,
            ));
        }
        let name =
            declare_delay_queue(&self.publisher, &self.route, delay, self.broker.addr()).await?;
        declared.insert(delay);
        Ok(name)
    }

    async fn dead_letter(&self, p: &Unsettled, dead: &DeadLetter) -> Result<(), AmqpError> {
        let props = p.properties.unpack()?;
        let original = props.headers().as_ref();
        let origin = self.origin(p, &props);
        let h = headers::dead_letter_headers(original, &origin, dead, headers::now_ms());
        let props = copy_properties(&props, h);
        let to = || Copy {
            what: "dead-letter",
            exchange: "",
            routing_key: &self.route.dead_letters.name,
            mandatory: true,
        };
        let addr = self.broker.addr();
        let first = publish_confirmed(&self.publisher, addr, to(), &p.body, props.clone()).await;
        if !first.as_ref().is_err_and(is_unroutable) || !self.route.dead_letters.declare {
            return first;
        }
        // A dead-letter queue prereq declares may have been deleted under it (the copy came back
        // unroutable): declared again, and the copy sent once more; else every dead letter
        // would fail, its original going round between the consumer and its queue.
        if let Err(e) = self.declare_dead_letters().await {
            warn!(target: "prereq", error = %e, "could not declare the dead-letter queue again");
            return first;
        }
        publish_confirmed(&self.publisher, addr, to(), &p.body, props).await
    }

    /// Declare the route's dead-letter queue, on a channel of its own (a failed declaration
    /// closes its channel).
    async fn declare_dead_letters(&self) -> Result<(), AmqpError> {
        let declaring = self.broker.channel("open a declaring channel").await?;
        let declared =
            declare_queue(&declaring, &self.route.dead_letters, self.broker.addr()).await;
        let _ = answered("closing a channel", declaring.close(200, "declared".into())).await;
        declared
    }
}

/// The original's properties for a copy: same metadata, new headers, persistent; without
/// `expiration` (it would drop the copy from a queue with no dead-letter exchange) and without
/// `user-id` (the broker refuses a user id other than the connection's).
pub(crate) fn copy_properties(p: &BasicProperties, headers: FieldTable) -> BasicProperties {
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
