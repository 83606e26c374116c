//! [`Report`]: what a consumer did, counted from what the transport confirmed.

/// What a consumer did, returned by [`crate::DependentConsumer::run`] (also inside its error).
///
/// Decisions are counted once the transport carried them out: a deferral whose copy the broker
/// did not confirm counts as a settle failure, not as a deferral.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Messages handled successfully (and acknowledged).
    pub handled: u64,
    /// Times a message was held because its key was unknown.
    pub held: u64,
    /// Held messages released when their key became known.
    pub released: u64,
    /// Messages deferred through the broker.
    pub deferred: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages given back to the broker at shutdown.
    pub requeued: u64,
    /// Registrations that made a key known.
    pub registered: u64,
    /// Decisions the transport failed to carry out (the broker redelivers those messages).
    pub settle_failures: u64,
    /// The most messages held at once.
    pub peak_held: usize,
}
