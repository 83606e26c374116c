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
}

impl<T: Transport> Intake<T> {
    pub(super) fn new(transport: Arc<T>) -> Self {
        let recv = futures::stream::unfold(transport, |transport| async move {
            let got = transport.recv().await;
            Some((got, transport))
        });
        Self {
            recv: Box::pin(recv),
        }
    }

    /// The next delivery.
    pub(super) async fn next(&mut self) -> Got<T> {
        self.recv.next().await.unwrap_or(Ok(None))
    }

    /// The next delivery if the transport has one ready now; `None` if it would wait.
    ///
    /// Polled without the loop's waker: when it would wait, the loop's next turn polls the same
    /// `recv` again with its own waker before it sleeps.
    pub(super) fn ready(&mut self) -> Option<Got<T>> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.recv.as_mut().poll_next(&mut cx) {
            Poll::Ready(got) => Some(got.unwrap_or(Ok(None))),
            Poll::Pending => None,
        }
    }
}
