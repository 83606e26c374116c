//! An [`AmqpTransport`] shared with the bench, so that after the consumer ran (it takes its
//! transport) the bench can still list its delay queues and close it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prereq::amqp::{AmqpError, AmqpTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Transport};

/// Every call forwarded to the shared transport.
pub struct Shared(pub Arc<AmqpTransport>);

impl Transport for Shared {
    type Error = AmqpError;

    fn start(&self, demand: Demand) -> impl Future<Output = Result<(), AmqpError>> + Send {
        self.0.start(demand)
    }

    fn ack_timeout(&self) -> Option<Duration> {
        self.0.ack_timeout()
    }

    fn revoked(&self) -> impl Future<Output = Option<u32>> + Send {
        self.0.revoked()
    }

    fn released(&self, partition: u32) {
        self.0.released(partition);
    }

    fn is_stale(&self, id: DeliveryId) -> bool {
        self.0.is_stale(id)
    }

    fn recv(&self) -> impl Future<Output = Result<Option<Delivery>, AmqpError>> + Send {
        self.0.recv()
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
    ) -> impl Future<Output = Result<(), AmqpError>> + Send {
        self.0.settle(id, settle)
    }
}
