//! An [`AmqpTransport`] shared with the bench, so that after the consumer ran (it takes its
//! transport) the bench can still list its delay queues and close it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prereq::amqp::{AmqpError, AmqpTransport};
use prereq::transport::{Delivery, DeliveryId, Demand, Settle, Transport};
use prereq::{DependentConsumer, Key, Report, RunError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::Res;

/// A consumer running in a task on a shared transport, until [`Running::stop`].
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Report, RunError<AmqpError>>>,
}

impl Running {
    /// Run `consumer` on `transport`.
    pub fn start<K: Key, M: Send + 'static>(
        consumer: DependentConsumer<K, M>,
        transport: &Arc<AmqpTransport>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(Shared(Arc::clone(transport)), async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Stop the consumer; its report.
    pub async fn stop(self) -> Res<Report> {
        let _ = self.stop.send(());
        Ok(self.task.await??)
    }
}

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

    fn try_recv(&self) -> Option<Result<Option<Delivery>, AmqpError>> {
        self.0.try_recv()
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
    ) -> impl Future<Output = Result<(), AmqpError>> + Send {
        self.0.settle(id, settle)
    }
}
