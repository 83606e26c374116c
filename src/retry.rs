//! The backoff policy: how long a deferred message waits before its next attempt.
//!
//! A policy is a pure function of the attempt number (and, for jitter, of a message id),
//! because the attempt count travels *with the message* between processes: whichever consumer
//! receives a message computes the same delay, with no shared state and no clock. That is also
//! why prereq has its own policy rather than the `backoff` crate, which keeps mutable state per
//! operation (and is unmaintained: RUSTSEC-2025-0012).
//!
//! **Attempts, one numbering everywhere.** The first delivery of a message is attempt 0; each
//! deferral through the broker makes the next attempt, so attempt `n` is the `n`-th retry.
//! [`Policy::delay_for`]`(n, _)` is the wait *before* attempt `n` (so `n ≥ 1`), and `None` once
//! `n` exceeds [`Policy::max_attempts`]: the message is dead-lettered instead.
//! [`crate::Context::attempt`] and [`crate::Event::attempt`] use the same numbers.
//!
//! Builders are `const` and infallible: out-of-range values are clamped as documented on each
//! method. The `try_*` variants refuse them instead.
//!
//! ```
//! use std::time::Duration;
//! use prereq::{Backoff, Schedule};
//!
//! // The default: linear, step 1 s, 10 attempts (1 s, 2 s, … 10 s).
//! let p = Backoff::default();
//! assert_eq!(p.delay(1), Some(Duration::from_secs(1)));
//! assert_eq!(p.delay(10), Some(Duration::from_secs(10)));
//! assert_eq!(p.delay(11), None);
//!
//! // Exponential from 100 ms, capped at 2 s, 6 attempts: usable as a `const`.
//! const FAST: Backoff = Backoff::exponential(Duration::from_millis(100))
//!     .cap(Duration::from_secs(2))
//!     .max_attempts(6);
//! assert_eq!(FAST.delay(3), Some(Duration::from_millis(400)));
//! assert_eq!(FAST.delay(6), Some(Duration::from_secs(2)));
//!
//! // An explicit schedule: three retries after 1 s, 5 s and 30 s.
//! const STEPS: Schedule = Schedule::from_static(&[
//!     Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30),
//! ]);
//! assert_eq!(STEPS.delay(2), Some(Duration::from_secs(5)));
//! assert_eq!(STEPS.delay(4), None);
//! ```

mod backoff;
#[cfg(feature = "backon")]
mod from_backon;
mod policy;
mod schedule;
mod seed;

pub use backoff::{Backoff, BackoffError, DEFAULT_CAP, DEFAULT_MAX_ATTEMPTS, Kind, MIN_DELAY};
pub use policy::Policy;
pub use schedule::Schedule;
pub(crate) use seed::seed_of;
