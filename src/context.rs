//! What a handler may want to know about the delivery besides the message itself.

/// The delivery a handler runs for: a handler that takes it as a second argument receives it.
///
/// The usual use is idempotence: delivery is at-least-once, so a handler can see a message again
/// after a crash or a reconnect (`redelivered` is then set by the broker); record `message_id`
/// in the same transaction as the handler's effect and skip ids already recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Context<K> {
    /// The message's prerequisite key (known, or the handler would not run).
    pub key: K,
    /// The message id: from the consumer's `.id(..)` extractor, else the transport's (the AMQP
    /// `message_id` property), if any.
    pub message_id: Option<String>,
    /// Which attempt this is: 0 for the first delivery, `n` for the `n`-th retry after a
    /// deferral (the numbering of [`crate::Policy`]).
    pub attempt: u32,
    /// The broker delivered this message before, to a consumer that did not settle it.
    pub redelivered: bool,
}
