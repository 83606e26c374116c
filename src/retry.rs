//! The backoff policy: how long a deferred message waits before its next attempt.
//!
//! The policy is a pure function of the attempt number (and, for jitter, of a message id),
//! because the attempt count travels *with the message* between processes: whichever consumer
//! receives the n-th deferral computes the same delay, with no shared state and no clock.
//! That is also why prereq has its own policy rather than the `backoff` crate, which keeps
//! mutable state per operation (and is unmaintained: RUSTSEC-2025-0012).
//!
//! Attempts are counted from 1: `delay(1)` is the wait before the first retry. `delay(n)` is
//! `None` for `n > max_attempts`: give up and dead-letter.
//!
//! ```
//! use std::time::Duration;
//! use prereq::Backoff;
//!
//! // The default: linear, step 1 s, 10 attempts (1 s, 2 s, … 10 s).
//! let p = Backoff::default();
//! assert_eq!(p.delay(1), Some(Duration::from_secs(1)));
//! assert_eq!(p.delay(10), Some(Duration::from_secs(10)));
//! assert_eq!(p.delay(11), None);
//!
//! // Exponential from 100 ms, capped at 2 s, 6 attempts.
//! let p = Backoff::exponential(Duration::from_millis(100))
//!     .with_cap(Duration::from_secs(2))
//!     .with_max_attempts(6)
//!     .build()
//!     .unwrap();
//! assert_eq!(p.delay(3), Some(Duration::from_millis(400)));
//! assert_eq!(p.delay(6), Some(Duration::from_secs(2)));
//! ```

use std::time::Duration;

/// Decides the delay before retry number `attempt` (counted from 1), or `None` to give up.
///
/// Object-safe so the engine can hold any policy as `Arc<dyn Policy>`. `seed` identifies the
/// message (a hash of its id): a policy with jitter must derive it from `seed` and `attempt`
/// only, so that every process computes the same delay for the same message.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The delay before retry `attempt` of the message identified by `seed`; `None`: give up.
    fn delay_for(&self, attempt: u32, seed: u64) -> Option<Duration>;

    /// How many retries the policy allows (the last `attempt` with a delay).
    fn max_attempts(&self) -> u32;
}

/// The shape of a [`Backoff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Retry `n` waits `n × step`.
    Linear {
        /// The increment per attempt.
        step: Duration,
    },
    /// Every retry waits `delay`.
    Constant {
        /// The wait.
        delay: Duration,
    },
    /// Retry `n` waits `first × 2^(n-1)`.
    Exponential {
        /// The first wait.
        first: Duration,
    },
}

/// A validated backoff policy. Build it with [`Backoff::linear`], [`Backoff::constant`] or
/// [`Backoff::exponential`], adjust with the `with_*` methods, and finish with
/// [`BackoffBuilder::build`], which rejects nonsense.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    kind: Kind,
    cap: Duration,
    max_attempts: u32,
    jitter: f64,
}

/// A [`Backoff`] under construction. `Copy`: tweak a shared base freely.
///
/// Defaults: cap 1 hour, 10 attempts, no jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use = "call build() to get a Backoff"]
pub struct BackoffBuilder {
    kind: Kind,
    cap: Duration,
    max_attempts: u32,
    jitter: f64,
}

/// Why a backoff policy was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// The step / delay / first delay is zero: retries would spin.
    #[error("the backoff delay must be greater than zero")]
    ZeroDelay,
    /// The cap is below the first delay, so the shape would be meaningless.
    #[error("the cap {cap:?} is below the first delay {first:?}")]
    CapBelowFirst {
        /// The cap given.
        cap: Duration,
        /// The first delay of the shape.
        first: Duration,
    },
    /// Zero attempts: use dead-lettering directly instead of a policy.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
    /// The jitter fraction is not within `0.0..=1.0`.
    #[error("jitter must be a fraction within 0.0..=1.0, got {0}")]
    BadJitter(f64),
}

/// The default cap on a single delay.
pub const DEFAULT_CAP: Duration = Duration::from_secs(3600);
/// The default number of retries before dead-lettering.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

impl Backoff {
    /// Linear backoff: retry `n` waits `n × step`.
    pub fn linear(step: Duration) -> BackoffBuilder {
        BackoffBuilder::new(Kind::Linear { step })
    }

    /// Constant backoff: every retry waits `delay`.
    pub fn constant(delay: Duration) -> BackoffBuilder {
        BackoffBuilder::new(Kind::Constant { delay })
    }

    /// Exponential backoff: retry `n` waits `first × 2^(n-1)`.
    pub fn exponential(first: Duration) -> BackoffBuilder {
        BackoffBuilder::new(Kind::Exponential { first })
    }

    /// The shape.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The cap on a single delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter fraction (0 = none).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The nominal delay before retry `attempt` (from 1), without jitter; `None` past
    /// `max_attempts` (and for attempt 0, which is the original delivery, not a retry).
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        if attempt == 0 || attempt > self.max_attempts {
            return None;
        }
        let raw = match self.kind {
            Kind::Linear { step } => step.checked_mul(attempt),
            Kind::Constant { delay } => Some(delay),
            Kind::Exponential { first } => 2u32
                .checked_pow(attempt - 1)
                .and_then(|factor| first.checked_mul(factor)),
        };
        Some(raw.map_or(self.cap, |d| d.min(self.cap)))
    }
}

impl Default for Backoff {
    /// Linear, step 1 s, 10 attempts, cap 1 h, no jitter: the original payment demo's schedule.
    fn default() -> Self {
        Self {
            kind: Kind::Linear {
                step: Duration::from_secs(1),
            },
            cap: DEFAULT_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }
}

impl Policy for Backoff {
    /// The nominal delay, shortened by up to `jitter × delay`, by an amount derived from
    /// `seed` and `attempt` alone.
    fn delay_for(&self, attempt: u32, seed: u64) -> Option<Duration> {
        let nominal = self.delay(attempt)?;
        if self.jitter == 0.0 {
            return Some(nominal);
        }
        let unit = unit_interval(mix(
            seed ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ));
        Some(nominal.mul_f64(1.0 - self.jitter * unit))
    }

    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

impl BackoffBuilder {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            cap: DEFAULT_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }

    /// No single delay exceeds `cap` (default 1 hour).
    pub fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Give up after this many retries (default 10).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Shorten each delay by a deterministic fraction of up to `fraction` (0.0..=1.0), derived
    /// from the message id and the attempt, so that messages deferred together spread out while
    /// every process still agrees on each message's delay. Default 0 (none).
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<Backoff, BackoffError> {
        let first = match self.kind {
            Kind::Linear { step } => step,
            Kind::Constant { delay } => delay,
            Kind::Exponential { first } => first,
        };
        if first.is_zero() {
            return Err(BackoffError::ZeroDelay);
        }
        if self.cap < first {
            return Err(BackoffError::CapBelowFirst {
                cap: self.cap,
                first,
            });
        }
        if self.max_attempts == 0 {
            return Err(BackoffError::ZeroAttempts);
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BackoffError::BadJitter(self.jitter));
        }
        Ok(Backoff {
            kind: self.kind,
            cap: self.cap,
            max_attempts: self.max_attempts,
            jitter: self.jitter,
        })
    }
}

/// A stable 64-bit hash of a message id (FNV-1a), the same on every platform and Rust version
/// (unlike `std`'s hasher), so that jitter agrees across processes.
pub fn seed_of(id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64 finaliser: spreads the bits of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps 64 random bits to `[0, 1)`.
fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn default_is_linear_one_second_ten_attempts() {
        let p = Backoff::default();
        for n in 1..=10 {
            assert_eq!(p.delay(n), Some(S * n));
        }
        assert_eq!(p.delay(11), None);
        assert_eq!(p.delay(0), None);
        assert_eq!(Policy::max_attempts(&p), 10);
        assert_eq!(p, Backoff::linear(S).build().unwrap());
    }

    #[test]
    fn constructors_reject_nonsense() {
        assert_eq!(
            Backoff::linear(Duration::ZERO).build(),
            Err(BackoffError::ZeroDelay)
        );
        assert_eq!(
            Backoff::exponential(S)
                .with_cap(Duration::from_millis(10))
                .build(),
            Err(BackoffError::CapBelowFirst {
                cap: Duration::from_millis(10),
                first: S
            })
        );
        assert_eq!(
            Backoff::constant(S).with_max_attempts(0).build(),
            Err(BackoffError::ZeroAttempts)
        );
        assert!(matches!(
            Backoff::constant(S).with_jitter(1.5).build(),
            Err(BackoffError::BadJitter(_))
        ));
        assert!(matches!(
            Backoff::constant(S).with_jitter(f64::NAN).build(),
            Err(BackoffError::BadJitter(_))
        ));
    }

    #[test]
    fn exponential_doubles_then_caps_without_overflow() {
        let p = Backoff::exponential(Duration::from_millis(100))
            .with_cap(Duration::from_secs(5))
            .with_max_attempts(u32::MAX)
            .build()
            .unwrap();
        assert_eq!(p.delay(1), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(2), Some(Duration::from_millis(200)));
        assert_eq!(p.delay(6), Some(Duration::from_millis(3200)));
        assert_eq!(p.delay(7), Some(Duration::from_secs(5)));
        assert_eq!(p.delay(200), Some(Duration::from_secs(5)));
        assert_eq!(p.delay(u32::MAX), Some(Duration::from_secs(5)));
    }

    fn any_backoff() -> impl Strategy<Value = Backoff> {
        (
            0u8..3,
            1u64..10_000,
            1u32..50,
            0u64..100_000,
            prop_oneof![Just(0.0), 0.0f64..=1.0],
        )
            .prop_map(|(kind, first_ms, max, extra_cap_ms, jitter)| {
                let first = Duration::from_millis(first_ms);
                let b = match kind {
                    0 => Backoff::linear(first),
                    1 => Backoff::constant(first),
                    _ => Backoff::exponential(first),
                };
                b.with_cap(first + Duration::from_millis(extra_cap_ms))
                    .with_max_attempts(max)
                    .with_jitter(jitter)
                    .build()
                    .unwrap()
            })
    }

    proptest! {
        #[test]
        fn monotone_without_jitter(p in any_backoff()) {
            let mut last = Duration::ZERO;
            for n in 1..=Policy::max_attempts(&p) {
                let d = p.delay(n).unwrap();
                prop_assert!(d >= last, "delay({n}) = {d:?} < {last:?}");
                last = d;
            }
        }

        #[test]
        fn capped_and_gives_up_exactly_at_max(p in any_backoff(), seed: u64) {
            let max = Policy::max_attempts(&p);
            for n in 1..=max {
                let d = p.delay_for(n, seed);
                prop_assert!(d.is_some(), "gave up early at {n} of {max}");
                prop_assert!(d.unwrap() <= p.cap());
            }
            prop_assert_eq!(p.delay_for(max + 1, seed), None);
            prop_assert_eq!(p.delay(max + 1), None);
        }

        #[test]
        fn jitter_is_deterministic_and_bounded(p in any_backoff(), seed: u64, n in 1u32..50) {
            let a = p.delay_for(n, seed);
            prop_assert_eq!(a, p.delay_for(n, seed));
            if let (Some(j), Some(nominal)) = (a, p.delay(n)) {
                prop_assert!(j <= nominal);
                prop_assert!(j >= nominal.mul_f64(1.0 - p.jitter()) - Duration::from_nanos(1));
            }
        }

        #[test]
        fn jitter_spreads_messages(first_ms in 100u64..10_000) {
            let p = Backoff::constant(Duration::from_millis(first_ms)).with_jitter(0.5).build().unwrap();
            let distinct: std::collections::HashSet<_> =
                (0..32u64).map(|i| p.delay_for(1, seed_of(&i.to_le_bytes()))).collect();
            prop_assert!(distinct.len() > 16, "only {} distinct delays", distinct.len());
        }
    }

    #[test]
    fn seed_is_stable() {
        // FNV-1a test vectors: the seed must never change between releases.
        assert_eq!(seed_of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(seed_of(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
