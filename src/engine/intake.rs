//! The transport's deliveries as the loop takes them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::{Stream, StreamExt};

use crate::transport::{Delivery, Transport};

/// What `recv` gives: a delivery, `Ok(None)` once the transport closed for good, or its error.
type Got<T> = Result<Option<Delivery>, <T as Transport>::Error>;

/// The transport's `recv`, one after another. The one in flight lives here, across the turns of
/// the loop, and is dropped only when the loop stops: transports need not be cancel-safe. (It
/// takes the place of a task that passed each delivery on through a channel: one hop, one
/// wake-up and one channel send per delivery less.)
pub(super) struct Intake<T: Transport> {
    /// Each `recv` in turn; the stream owns the transport its futures borrow.
    recv: Pin<Box<dyn Stream<Item = Got<T>> + Send>>,
    /// The transport, for [`Transport::try_recv`].
    transport: Arc<T>,
    /// The stream's `recv` call may be in flight (polled, its delivery not given yet):
    /// `try_recv` is asked only when it is not, so that deliveries come in the transport's
    /// order and none is handed to a call that is not polled again.
    in_flight: bool,
}

impl<T: Transport> Intake<T> {
    pub(super) fn new(transport: Arc<T>) -> Self {
        let recv = futures::stream::unfold(Arc::clone(&transport), |transport| async move {
            let got = transport.recv().await;
            Some((got, transport))
        });
        Self {
            recv: Box::pin(recv),
            transport,
            in_flight: false,
        }
    }

    /// The next delivery.
    pub(super) async fn next(&mut self) -> Got<T> {
        if let Some(got) = self.try_recv() {
            return got;
        }
        // Left set if this future is dropped before `recv` gives its delivery.
        self.in_flight = true;
        let got = self.recv.next().await.unwrap_or(Ok(None));
        self.in_flight = false;
        got
    }

    /// The next delivery if the transport has one ready now; `None` if it would wait.
    ///
    /// Polled without the loop's waker: when it would wait, the loop's next turn polls the same
    /// `recv` again with its own waker before it sleeps.
    pub(super) fn ready(&mut self) -> Option<Got<T>> {
        if let Some(got) = self.try_recv() {
            return Some(got);
        }
        self.in_flight = true;
        let mut cx = Context::from_waker(Waker::noop());
        match self.recv.as_mut().poll_next(&mut cx) {
            Poll::Ready(got) => {
                self.in_flight = false;
                Some(got.unwrap_or(Ok(None)))
            }
            Poll::Pending => None,
        }
    }

    /// A delivery ready at the transport, taken without a `recv` call, if none is in flight.
    fn try_recv(&self) -> Option<Got<T>> {
        if self.in_flight {
            return None;
        }
        self.transport.try_recv()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;
    use crate::transport::{DeliveryId, Settle};

    /// A transport that hands a new delivery straight to a `recv` waiting for one (as a
    /// consumer's channel gives its next delivery to the call in flight), else queues it.
    #[derive(Default)]
    struct Handing {
        /// Ready, not taken.
        queue: Mutex<VecDeque<Delivery>>,
        /// A `recv` waiting.
        waiting: Mutex<Option<oneshot::Sender<Delivery>>>,
        /// Deliveries taken by `try_recv`.
        tried: AtomicUsize,
    }

    impl Handing {
        fn push(&self, id: u64) {
            let d = Delivery::message(DeliveryId(id), Vec::new());
            let d = match self.waiting.lock().unwrap().take() {
                Some(tx) => match tx.send(d) {
                    Ok(()) => return,
                    Err(d) => d,
                },
                None => d,
            };
            self.queue.lock().unwrap().push_back(d);
        }
    }

    impl Transport for Handing {
        type Error = Infallible;

        async fn recv(&self) -> Result<Option<Delivery>, Infallible> {
            let rx = {
                if let Some(d) = self.queue.lock().unwrap().pop_front() {
                    return Ok(Some(d));
                }
                let (tx, rx) = oneshot::channel();
                *self.waiting.lock().unwrap() = Some(tx);
                rx
            };
            Ok(rx.await.ok())
        }

        fn try_recv(&self) -> Option<Result<Option<Delivery>, Infallible>> {
            let d = self.queue.lock().unwrap().pop_front()?;
            self.tried.fetch_add(1, Ordering::SeqCst);
            Some(Ok(Some(d)))
        }

        async fn settle(&self, _: DeliveryId, _: Settle) -> Result<(), Infallible> {
            Ok(())
        }
    }

    fn id(got: Option<Got<Handing>>) -> Option<u64> {
        match got {
            Some(Ok(Some(d))) => Some(d.id.0),
            _ => None,
        }
    }

    #[tokio::test]
    async fn deliveries_come_in_order_whether_taken_ready_or_by_recv() {
        let t = Arc::new(Handing::default());
        let mut intake = Intake::new(Arc::clone(&t));
        t.push(1);
        t.push(2);
        assert_eq!(id(intake.ready()), Some(1));
        assert_eq!(id(intake.ready()), Some(2));
        assert_eq!(t.tried.load(Ordering::SeqCst), 2, "taken without recv");
        assert_eq!(id(intake.ready()), None, "nothing ready: a recv waits");
        // 3 goes to the waiting recv, 4 to the queue: 3 must come first.
        t.push(3);
        t.push(4);
        assert_eq!(id(intake.ready()), Some(3), "the recv in flight first");
        assert_eq!(id(intake.ready()), Some(4));
        assert_eq!(t.tried.load(Ordering::SeqCst), 3, "then ready ones again");
        // The same through `next`, where a waiting recv is dropped unfinished.
        {
            let next = intake.next();
            tokio::pin!(next);
            assert!(futures::poll!(next.as_mut()).is_pending());
        }
        t.push(5);
        t.push(6);
        assert_eq!(id(Some(intake.next().await)), Some(5));
        assert_eq!(id(Some(intake.next().await)), Some(6));
        assert_eq!(t.tried.load(Ordering::SeqCst), 4);
    }
}
