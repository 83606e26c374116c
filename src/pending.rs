//! [`Pending`]: a decoded message on its way through the engine, and [`Meta`], what it takes to
//! settle and describe it without the message itself.

use std::sync::Arc;

use crate::hold::{Held, Stamp};
use crate::transport::DeliveryId;

/// A decoded message on its way through the engine.
pub(crate) struct Pending<M> {
    /// The decoded body, handed to the handler.
    pub(crate) msg: M,
    /// Everything else.
    pub(crate) meta: Meta,
}

/// What the engine knows of a message besides its body.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    /// The transport's handle to settle it.
    pub(crate) id: DeliveryId,
    /// Its position among the messages of its key: arrival order, kept when it comes back
    /// from a deferral (so it goes before the messages that arrived after it).
    pub(crate) pos: u64,
    /// Which attempt this delivery is (0 the first time).
    pub(crate) attempt: u32,
    /// The sender's limit on retries, if any (it can only lower the policy's).
    pub(crate) max_attempts: Option<u32>,
    /// The message id (from the consumer's extractor, else the transport's), shared with the
    /// hold's index by id.
    pub(crate) message_id: Option<Arc<str>>,
    /// The broker delivered it before, to a consumer that did not settle it.
    pub(crate) redelivered: bool,
    /// A stable hash of the message id (or body): seeds jitter, recognises a deferred message
    /// when it comes back.
    pub(crate) seed: u64,
    /// Body bytes, counted against the hold's byte budget (saturating: a body past 4 GiB
    /// counts as 4 GiB, more than any budget a broker's frame limit leaves room for).
    pub(crate) size: u32,
    /// When it was first held ([`crate::hold::Stamp`]), for the release latency.
    pub(crate) held_at: Option<Stamp>,
    /// The partition it came from, if the transport consumes partitions.
    pub(crate) partition: Option<u32>,
}

impl<M> Held for Pending<M> {
    fn id(&self) -> Option<&Arc<str>> {
        self.meta.message_id.as_ref()
    }

    fn size(&self) -> usize {
        self.meta.size as usize
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_metadata_stays_small() {
        // One per held message, inside the hold's boxed entry: 80 bytes (it was 96 with a
        // `usize` size and an `Instant` hold time).
        let size = std::mem::size_of::<super::Meta>();
        assert!(size <= 80, "Meta is {size} bytes");
    }
}
