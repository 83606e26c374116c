//! [`Policy`]: the seam every backoff shape implements.

use std::time::Duration;

/// Decides the delay before attempt `attempt` (counted from 1: the first retry), or `None` to
/// give up.
///
/// Object-safe, so a consumer holds any policy. `seed` identifies the message (a stable hash of
/// its id): a policy with jitter must derive it from `seed` and `attempt` only, so that every
/// process computes the same delay for the same message.
pub trait Policy: Send + Sync + std::fmt::Debug + 'static {
    /// The delay before attempt `attempt` of the message identified by `seed`; `None`: give up.
    fn delay_for(&self, attempt: u32, seed: u64) -> Option<Duration>;

    /// How many retries the policy allows (the last `attempt` with a delay).
    fn max_attempts(&self) -> u32;
}
