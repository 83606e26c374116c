//! The way a delivery came: its queue and that queue's traits, the exchange and routing key it
//! was published with. Every delivery of one consumer from one exchange and routing key shares
//! one record ([`Via`]), so an unsettled delivery pays a pointer for all of it.

use std::collections::HashMap;
use std::sync::Arc;

/// How many distinct exchange and routing key pairs one consumer stores once; past that, each
/// delivery of a new pair gets its own record (routing keys may be unbounded).
const KEPT: usize = 4096;

/// What the deliveries of one consumer, from one exchange and routing key, have in common.
#[derive(Debug)]
pub(crate) struct Via {
    /// The exchange it was published to.
    pub(crate) exchange: Box<str>,
    /// The routing key it was published with.
    pub(crate) routing_key: Box<str>,
    /// The queue it came from.
    pub(crate) queue: Arc<str>,
    /// From a stream: it cannot be requeued (a nack closes the connection with
    /// `540 NOT_IMPLEMENTED`), and needs not be: every connect reads the stream again.
    pub(crate) stream: bool,
    /// The queue's delivery limit (quorum queues): a give-back that would take a message past
    /// it is made by a copy instead.
    pub(crate) delivery_limit: Option<u32>,
    /// The partition the queue is, for a partitioned route.
    pub(crate) partition: Option<u32>,
    /// The queue has one active consumer at a time (a partition's, or one declared with
    /// `x-single-active-consumer`): what the consumer gives back goes back with its channel's
    /// close, in delivery order, not one by one (see `Shared::returned_by_close`).
    pub(crate) single_active: bool,
}

impl Via {
    /// Would one more return of a message the broker got back `returns` times take it past
    /// the queue's delivery limit? (Never without a limit.)
    pub(crate) fn near_limit(&self, returns: u32) -> bool {
        self.delivery_limit
            .is_some_and(|limit| one_more_return_exceeds(returns, limit))
    }
}

/// The [`Via`] records of one consumer, by exchange then routing key.
pub(crate) struct Vias {
    /// The queue consumed.
    queue: Arc<str>,
    /// Is it a stream?
    stream: bool,
    /// Its delivery limit, if prereq knows one.
    delivery_limit: Option<u32>,
    /// Its partition index, for a partitioned route.
    partition: Option<u32>,
    /// One active consumer at a time (see [`Via::single_active`]).
    single_active: bool,
    /// The records handed out so far (up to [`KEPT`]).
    kept: HashMap<Box<str>, HashMap<Box<str>, Arc<Via>>>,
    /// How many records `kept` holds.
    len: usize,
}

impl Vias {
    /// The records of a consumer of `queue`.
    pub(crate) fn new(
        queue: &str,
        stream: bool,
        delivery_limit: Option<u32>,
        partition: Option<u32>,
        single_active: bool,
    ) -> Self {
        Self {
            queue: Arc::from(queue),
            stream,
            delivery_limit,
            partition,
            single_active,
            kept: HashMap::new(),
            len: 0,
        }
    }

    /// The queue's name, shared by the records.
    pub(crate) fn queue(&self) -> &Arc<str> {
        &self.queue
    }

    /// The record of deliveries from `exchange` with `routing_key`.
    pub(crate) fn get(&mut self, exchange: &str, routing_key: &str) -> Arc<Via> {
        if let Some(via) = self
            .kept
            .get(exchange)
            .and_then(|keys| keys.get(routing_key))
        {
            return Arc::clone(via);
        }
        let via = Arc::new(Via {
            exchange: Box::from(exchange),
            routing_key: Box::from(routing_key),
            queue: Arc::clone(&self.queue),
            stream: self.stream,
            delivery_limit: self.delivery_limit,
            partition: self.partition,
            single_active: self.single_active,
        });
        if self.len < KEPT {
            self.kept
                .entry(Box::from(exchange))
                .or_default()
                .insert(Box::from(routing_key), Arc::clone(&via));
            self.len += 1;
        }
        via
    }
}

/// Would one more return of a message the broker got back `count` times
/// (`x-delivery-count`) take it past the queue's delivery `limit`? The broker dead-letters (or
/// drops) a message once it was returned MORE than `limit` times (`x-delivery-limit: 3`: on the
/// 4th return), so a new message (count 0) may always be given back once, even with a limit
/// of 1.
fn one_more_return_exceeds(count: u32, limit: u32) -> bool {
    count >= limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_give_back_is_a_copy_only_once_the_count_reached_the_limit() {
        // x-delivery-limit 3: the broker dead-letters on the 4th return.
        assert!(!one_more_return_exceeds(0, 3));
        assert!(!one_more_return_exceeds(2, 3));
        assert!(one_more_return_exceeds(3, 3));
        // A limit of 1: a new message may go back once, a returned one may not.
        assert!(!one_more_return_exceeds(0, 1));
        assert!(one_more_return_exceeds(1, 1));
    }

    #[test]
    fn one_record_per_exchange_and_routing_key() {
        let mut vias = Vias::new("payments", false, Some(20), Some(3), true);
        let a = vias.get("shop", "order.created");
        let b = vias.get("shop", "order.created");
        let c = vias.get("shop", "order.paid");
        let d = vias.get("", "order.created");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(&*c.routing_key, "order.paid");
        assert_eq!(&*d.exchange, "");
        assert_eq!(&*a.queue, "payments");
        assert_eq!(
            (a.stream, a.delivery_limit, a.partition, a.single_active),
            (false, Some(20), Some(3), true)
        );
        assert!(
            Arc::ptr_eq(&a.queue, &d.queue),
            "the queue's name is shared"
        );
    }

    #[test]
    fn past_the_bound_records_are_still_right_but_not_kept() {
        let mut vias = Vias::new("q", false, None, None, false);
        for i in 0..KEPT {
            vias.get("x", &i.to_string());
        }
        let first = vias.get("x", "0");
        assert!(Arc::ptr_eq(&first, &vias.get("x", "0")), "kept");
        let late = vias.get("x", "late");
        assert_eq!(&*late.routing_key, "late");
        assert!(!Arc::ptr_eq(&late, &vias.get("x", "late")), "not kept");
        assert_eq!(vias.len, KEPT);
    }
}
