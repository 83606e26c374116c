//! [`AmqpTransport`]: the engine's [`Transport`] over RabbitMQ, for one [`super::Route`].
//!
//! At-least-once, end to end:
//! * every consumer uses manual acknowledgements and a prefetch sized from the consumer's hold
//!   budget and concurrency ([`Transport::start`]);
//! * a message is acknowledged only when the engine says [`Settle::Ack`], or after its deferred
//!   or dead-lettered copy was confirmed by the broker (publisher confirms; a confirm carrying
//!   a returned message means unroutable and counts as a failure);
//! * the connection recovers by itself; deliveries that were in flight when it dropped are
//!   redelivered by the broker, so a handler may see a message twice;
//! * a consumer the broker ends is re-subscribed ([`AmqpTransport::health`] tells).

use std::fmt;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, watch};

use super::broker::{Broker, answered};
use super::consume::{Consumption, consume};
use super::delay::{self, DelayMechanism};
use super::error::AmqpError;
use super::group::Group;
use super::health::Health;
use super::publish::confirmed_channel;
use super::route::Route;
use super::shared::Shared;
use crate::transport::{Delivery, DeliveryId, Demand, Settle, Source, Transport};

/// A [`Transport`] over RabbitMQ for one [`Route`], made by [`Broker::transport`].
///
/// It consumes every queue of the route (one channel each) and its registration queue, and
/// publishes deferred and dead-lettered copies on a channel of its own, in confirm mode.
/// Consumption starts when the consumer runs ([`Transport::start`]).
pub struct AmqpTransport {
    shared: Arc<Shared>,
    /// What `recv` waits on, behind one lock.
    inputs: Mutex<Inputs>,
    /// The sending side, until consumption starts.
    tx: std::sync::Mutex<Option<mpsc::Sender<Result<Delivery, AmqpError>>>>,
    /// The consumers' tasks, stopped when the transport goes.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Partitions to give back, for a partitioned route ([`Transport::revoked`]).
    revocations: Mutex<mpsc::UnboundedReceiver<u32>>,
    /// This instance's group membership, for a partitioned route.
    group: std::sync::Mutex<Option<Group>>,
}

/// What [`AmqpTransport::recv`](Transport::recv) waits on.
struct Inputs {
    /// Deliveries from every consumer (and their errors).
    rx: mpsc::Receiver<Result<Delivery, AmqpError>>,
    /// The connection lost for good.
    lost: watch::Receiver<Option<AmqpError>>,
}

impl Inputs {
    /// The next delivery, the consumers' error, `None` once they ended (the transport closed),
    /// or the connection's loss for good, which comes first: what is still buffered came on it,
    /// and could not be settled.
    async fn next(&mut self) -> Result<Option<Delivery>, AmqpError> {
        // Looked at once here, so that a delivery that is ready is taken without registering
        // for news of the loss (and dropping the registration again).
        if let Some(got) = self.ready() {
            return got;
        }
        let Self { rx, lost } = self;
        let got = tokio::select! {
            biased;
            got = rx.recv() => got,
            changed = lost.wait_for(Option::is_some) => {
                return match changed {
                    Ok(e) => Err(e.clone().unwrap_or(AmqpError::Stale)),
                    Err(_) => Ok(None),
                };
            }
        };
        match got {
            Some(got) => got.map(Some),
            None => self.ended(),
        }
    }

    /// What [`Inputs::next`] gives if it would not wait; `None` where it would.
    fn ready(&mut self) -> Option<Result<Option<Delivery>, AmqpError>> {
        if let Some(e) = self.lost.borrow().clone() {
            return Some(Err(e));
        }
        match self.rx.try_recv() {
            Ok(got) => Some(got.map(Some)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(self.ended()),
        }
    }

    /// The consumers ended: because the connection was lost, if it was.
    fn ended(&self) -> Result<Option<Delivery>, AmqpError> {
        self.lost.borrow().clone().map_or(Ok(None), Err)
    }
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = &self.shared.route;
        f.debug_struct("AmqpTransport")
            .field("addr", self.shared.broker.addr())
            .field("mechanism", &self.shared.broker.mechanism())
            .field(
                "queues",
                &route
                    .consumed()
                    .iter()
                    .map(|q| q.name.clone())
                    .collect::<Vec<_>>(),
            )
            .field(
                "registrations",
                &route.registrations.as_ref().map(|q| q.name.clone()),
            )
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Declare `route` (checking first that deferred copies can come back) and return the
    /// transport a consumer runs on. It starts consuming when the consumer starts, with a
    /// prefetch sized from the consumer's hold budget and concurrency.
    pub async fn transport(&self, route: Route) -> Result<AmqpTransport, AmqpError> {
        AmqpTransport::new(self.clone(), route).await
    }
}

impl AmqpTransport {
    pub(crate) async fn new(broker: Broker, route: Route) -> Result<Self, AmqpError> {
        broker.declare(&route).await?;
        let publisher = confirmed_channel(&broker, "open the publisher channel").await?;
        let lost = broker.lost();
        // Deliveries are buffered by the prefetch already; this only decouples the consumers.
        let (tx, rx) = mpsc::channel(1024);
        let (revoke, revocations) = mpsc::unbounded_channel();
        Ok(Self {
            shared: Arc::new(Shared::new(broker, route, publisher, revoke)),
            inputs: Mutex::new(Inputs { rx, lost }),
            tx: std::sync::Mutex::new(Some(tx)),
            tasks: std::sync::Mutex::new(Vec::new()),
            revocations: Mutex::new(revocations),
            group: std::sync::Mutex::new(None),
        })
    }

    /// The delay mechanism in use.
    pub fn mechanism(&self) -> DelayMechanism {
        self.shared.broker.mechanism()
    }

    /// The route this transport consumes.
    pub fn route(&self) -> &Route {
        &self.shared.route
    }

    /// The broker it runs on.
    pub fn broker(&self) -> &Broker {
        &self.shared.broker
    }

    /// Which queues it consumes, and when the last delivery came: for a readiness probe. Take
    /// it before running the consumer (which takes the transport).
    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    /// Deliveries handed out and not settled yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// The delay queues this transport declared so far (names), e.g. to delete them in tests.
    pub async fn delay_queues(&self) -> Vec<String> {
        let prefix = &self.shared.route.delay_queue_prefix;
        self.shared
            .delay_queues
            .lock()
            .await
            .iter()
            .map(|d| delay::delay_queue_name(prefix, *d))
            .collect()
    }

    /// Stop consuming and close this transport's channels (`200 OK`): the broker takes back
    /// every delivery it did not settle. The broker's connection stays open for its other
    /// transports. Each channel's close is bounded (10 s); the first that fails is the error,
    /// and the others are closed all the same.
    ///
    /// The consumers end with their channels, not before: lapin cancels a consumer it drops
    /// (`basic.cancel`), and on a partition's queue the broker then makes the next instance's
    /// consumer active at once, which took later messages of a key before the earlier ones
    /// this channel held came back with its close (about one run in 50 of
    /// `tests/amqp_group_balance.rs`). So: no consumer is subscribed again from here on, the
    /// group is left (if a run's stop has not left it already), the channels close, then the
    /// consumers' tasks stop.
    pub async fn close(&self) -> Result<(), AmqpError> {
        end(&self.shared, self.take_tasks(), self.take_group()).await
    }

    /// The consumers' tasks, taken (none after a close).
    fn take_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The group membership, taken (none after a stop, or for a route without partitions).
    fn take_group(&self) -> Option<Group> {
        self.group
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// End a transport: stopping from here on (no consumer subscribes again), leave the group if
/// still in it, close the channels, then stop the consumers' tasks (see
/// [`AmqpTransport::close`]). The first channel that failed to close is the error.
async fn end(
    shared: &Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    group: Option<Group>,
) -> Result<(), AmqpError> {
    shared.stopping();
    if let Some(group) = group {
        group.leave().await;
    }
    let closed = close_channels(shared).await;
    for task in tasks {
        task.abort();
    }
    closed
}

/// Close the transport's channels, each bounded (10 s), keeping the first error: the broker
/// takes back every delivery it did not settle, in the order it delivered them.
async fn close_channels(shared: &Shared) -> Result<(), AmqpError> {
    let channels = std::mem::take(
        &mut *shared
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut closed = Ok(());
    for channel in channels.iter().chain([&shared.publisher]) {
        if !channel.status().connected() {
            continue;
        }
        let closing = channel.close(200, "prereq: closing".into());
        if let Err(e) = answered("closing a channel", closing).await
            && closed.is_ok()
        {
            closed = Err(shared.broker.addr().broker_error("close a channel", &e));
        }
    }
    closed
}

impl Drop for AmqpTransport {
    /// Dropped before its close (the consumer's run future was dropped mid-way: a `select!` or
    /// a timeout around `run`), it ends as [`AmqpTransport::close`] does, in the background:
    /// it leaves the group, its channels close, then its consumers' tasks stop. Stopping the
    /// tasks at once would drop their consumers first, and lapin cancels a consumer it drops:
    /// on a partition's or another single-active-consumer queue the broker would make the next
    /// instance active while this one's channel still held earlier messages of a key
    /// (`tests/amqp_single_active_stop.rs`). Outside a runtime the tasks stop at once.
    fn drop(&mut self) {
        let tasks = self.take_tasks();
        let group = self.take_group();
        if tasks.is_empty() && group.is_none() {
            return;
        }
        self.shared.stopping();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            for task in tasks {
                task.abort();
            }
            return;
        };
        let shared = Arc::clone(&self.shared);
        runtime.spawn(async move {
            if let Err(e) = end(&shared, tasks, group).await {
                tracing::debug!(target: "prereq", error = %e,
                    "a channel did not close after the consumer's run was dropped");
            }
        });
    }
}

impl Transport for AmqpTransport {
    type Error = AmqpError;

    /// Consume every queue of the route with a prefetch of `demand.in_flight()` (at most
    /// 65 535, the AMQP limit), registrations with the route's registration prefetch. Only the
    /// first call starts anything. Only the
    /// first call starts anything.
    async fn start(&self, demand: Demand) -> Result<(), AmqpError> {
        let Some(tx) = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            // Started already (by hand, before a consumer ran it): consuming as it was.
            return Ok(());
        };
        let prefetch = u16::try_from(demand.in_flight()).unwrap_or(u16::MAX).max(1);
        let route = &self.shared.route;
        let assignment = match &route.partitions {
            Some(partitions) => {
                let member = format!(
                    "{}-{}-{}",
                    self.shared.broker.connection_name(),
                    std::process::id(),
                    super::unique_suffix()
                );
                let group = Group::join(&self.shared.broker, partitions, member).await?;
                let assignment = group.assignment();
                *self
                    .group
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(group);
                Some(assignment)
            }
            None => None,
        };
        let mut consumptions: Vec<Consumption> = route
            .consumed()
            .into_iter()
            .map(|queue| Consumption {
                partition: route
                    .partitions
                    .as_ref()
                    .and_then(|p| p.index_of(&queue.name))
                    .zip(assignment.clone()),
                queue,
                source: Source::Message,
                prefetch,
            })
            .collect();
        if let Some(queue) = &route.registrations {
            consumptions.push(Consumption {
                queue: queue.clone(),
                source: Source::Registration,
                prefetch: route.registration_prefetch,
                partition: None,
            });
        }
        let mut tasks = Vec::new();
        for c in consumptions {
            tasks.push(tokio::spawn(consume(
                Arc::clone(&self.shared),
                c,
                tx.clone(),
            )));
        }
        *self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tasks;
        Ok(())
    }

    /// Leave the group, if the route is partitioned (the others then own this instance's
    /// partitions by the time its channels close), and cancel every other consumer of the route
    /// (`basic.cancel`, confirmed by the broker), so that what the consumer gives back at its
    /// stop stays in the queue instead of coming straight back to this transport (and going
    /// back a second time when its channel closes). The consumer of a partition, or of another
    /// single-active-consumer queue, is not cancelled: the next instance would receive later
    /// messages before the held ones come back; its channel closes at the end of the run
    /// ([`Transport::finished`]), returning them first.
    async fn stop_receiving(&self) {
        let group = self.take_group();
        // Stopping from here on: the partitions handed over as the group hears of the leave are
        // not subscribed to again as a standby.
        self.shared.stopping();
        if let Some(group) = group {
            group.leave().await;
        }
        self.shared.cancel_consumers().await;
    }

    /// Close the channels before the consumers go ([`AmqpTransport::close`]): a partition's
    /// held messages come back at the head of its queue before the next consumer is active.
    async fn finished(&self) {
        if let Err(e) = self.close().await {
            tracing::warn!(target: "prereq", error = %e,
                "a channel did not close at the end of the run (the broker takes back what it \
                 holds when the connection closes)");
        }
    }

    async fn recv(&self) -> Result<Option<Delivery>, AmqpError> {
        self.inputs.lock().await.next().await
    }

    /// A delivery already received, without waiting; `None` also while a `recv` waits.
    fn try_recv(&self) -> Option<Result<Option<Delivery>, AmqpError>> {
        self.inputs.try_lock().ok()?.ready()
    }

    async fn settle(&self, id: DeliveryId, settle: Settle) -> Result<(), AmqpError> {
        self.shared.settle(id, settle).await
    }

    fn ack_timeout(&self) -> Option<std::time::Duration> {
        Some(self.shared.broker.options().get_ack_timeout())
    }

    fn is_stale(&self, id: DeliveryId) -> bool {
        self.shared.is_stale(id)
    }

    async fn revoked(&self) -> Option<u32> {
        self.revocations.lock().await.recv().await
    }

    fn released(&self, partition: u32) {
        self.shared.release(partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Sent = mpsc::Sender<Result<Delivery, AmqpError>>;

    /// Inputs, and the consumers' and the connection's ends of them.
    fn inputs() -> (Inputs, Sent, watch::Sender<Option<AmqpError>>) {
        let (tx, rx) = mpsc::channel(8);
        let (lose, lost) = watch::channel(None);
        (Inputs { rx, lost }, tx, lose)
    }

    fn delivery(tag: u64) -> Delivery {
        Delivery::message(DeliveryId(tag), b"{}".to_vec())
    }

    fn lost() -> AmqpError {
        AmqpError::Broker {
            operation: "test".to_owned(),
            message: "connection lost for good".to_owned(),
        }
    }

    fn is_lost(got: &Result<Option<Delivery>, AmqpError>) -> bool {
        matches!(got, Err(AmqpError::Broker { message, .. }) if message.contains("for good"))
    }

    #[tokio::test]
    async fn deliveries_come_in_order_then_the_end() {
        let (mut i, tx, _lose) = inputs();
        for tag in 1..=3 {
            tx.send(Ok(delivery(tag))).await.expect("room");
        }
        drop(tx);
        for tag in 1..=3 {
            let got = i.next().await.expect("a delivery").expect("not the end");
            assert_eq!(got.id, DeliveryId(tag));
        }
        assert!(matches!(i.next().await, Ok(None)), "the consumers ended");
    }

    #[tokio::test]
    async fn a_loss_comes_before_what_is_still_buffered() {
        let (mut i, tx, lose) = inputs();
        tx.send(Ok(delivery(1))).await.expect("room");
        lose.send_replace(Some(lost()));
        assert!(is_lost(&i.next().await));
        assert!(is_lost(&i.next().await), "and stays");
    }

    #[tokio::test]
    async fn consumers_that_ended_with_the_loss_report_the_loss() {
        let (mut i, tx, lose) = inputs();
        drop(tx);
        lose.send_replace(Some(lost()));
        assert!(is_lost(&i.next().await), "not a clean end");
    }

    /// One thread: the spawned wait runs, and waits, before the loss is sent.
    #[tokio::test(flavor = "current_thread")]
    async fn a_loss_while_waiting_ends_the_wait() {
        let (mut i, _tx, lose) = inputs();
        let waiting = tokio::spawn(async move { i.next().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing to take yet");
        lose.send_replace(Some(lost()));
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends")
            .expect("the task ran");
        assert!(is_lost(&got));
    }

    #[tokio::test]
    async fn what_is_ready_is_taken_without_waiting_as_next_would_give_it() {
        let (mut i, tx, _lose) = inputs();
        assert!(i.ready().is_none(), "nothing yet: it would wait");
        tx.send(Ok(delivery(1))).await.expect("room");
        tx.send(Err(AmqpError::Config("bad".to_owned())))
            .await
            .expect("room");
        tx.send(Ok(delivery(3))).await.expect("room");
        assert!(matches!(i.ready(), Some(Ok(Some(d))) if d.id == DeliveryId(1)));
        assert!(matches!(i.ready(), Some(Err(AmqpError::Config(_)))));
        assert!(matches!(i.ready(), Some(Ok(Some(d))) if d.id == DeliveryId(3)));
        assert!(i.ready().is_none());
        drop(tx);
        assert!(matches!(i.ready(), Some(Ok(None))), "the consumers ended");

        let (mut i, tx, lose) = inputs();
        tx.send(Ok(delivery(1))).await.expect("room");
        lose.send_replace(Some(lost()));
        let first = i.ready();
        assert!(
            first.is_some_and(|got| is_lost(&got)),
            "the loss before what is buffered"
        );
        drop(tx);
        let end = i.ready();
        assert!(end.is_some_and(|got| is_lost(&got)), "and at the end");
    }

    #[tokio::test]
    async fn the_consumers_error_is_returned_as_it_comes() {
        let (mut i, tx, _lose) = inputs();
        tx.send(Err(AmqpError::Config("bad".to_owned())))
            .await
            .expect("room");
        tx.send(Ok(delivery(2))).await.expect("room");
        assert!(matches!(i.next().await, Err(AmqpError::Config(_))));
        assert!(matches!(i.next().await, Ok(Some(d)) if d.id == DeliveryId(2)));
    }
}
