//! [`Backoff`]: linear, constant or exponential delays with a cap, a number of attempts and
//! deterministic jitter; `const` builders that clamp, `try_*` ones that refuse.

use std::time::Duration;

use super::policy::Policy;
use super::seed::{mix, unit_interval};

/// The shape of a [`Backoff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Attempt `n` waits `n × step`.
    Linear {
        /// The increment per attempt.
        step: Duration,
    },
    /// Every attempt waits `delay`.
    Constant {
        /// The wait.
        delay: Duration,
    },
    /// Attempt `n` waits `first × 2^(n-1)`.
    Exponential {
        /// The first wait.
        first: Duration,
    },
}

impl Kind {
    const fn first(self) -> Duration {
        match self {
            Self::Linear { step } => step,
            Self::Constant { delay } => delay,
            Self::Exponential { first } => first,
        }
    }
}

/// A backoff policy: linear, constant or exponential, with a cap, a number of attempts and an
/// optional deterministic jitter.
///
/// Defaults of every constructor: cap 1 hour ([`DEFAULT_CAP`]), 10 attempts
/// ([`DEFAULT_MAX_ATTEMPTS`]), no jitter. `Copy` and `const`: tweak a shared base freely.
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use]
pub struct Backoff {
    kind: Kind,
    cap: Duration,
    max_attempts: u32,
    jitter: f64,
}

/// Why a `try_*` builder refused a value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackoffError {
    /// A zero delay: retries would spin.
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
    /// Zero attempts: every deferral would dead-letter at once.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
    /// The jitter fraction is not within `0.0..=1.0`.
    #[error("jitter must be a fraction within 0.0..=1.0, got {0}")]
    BadJitter(f64),
    /// A schedule taken from another library differs between two builds (random jitter):
    /// instances would disagree on a message's delays.
    #[error("the schedule is not deterministic (random jitter?); use Backoff::jitter instead")]
    NotDeterministic,
}

/// The default cap on a single delay.
pub const DEFAULT_CAP: Duration = Duration::from_secs(3600);
/// The default number of retries before dead-lettering.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// The shortest delay a builder accepts; shorter ones (zero) are raised to it.
pub const MIN_DELAY: Duration = Duration::from_millis(1);

impl Backoff {
    /// Linear, step 1 s, 10 attempts, cap 1 h, no jitter: the original payment demo's schedule.
    pub const DEFAULT: Self = Self::linear(Duration::from_secs(1));

    const fn new(kind: Kind) -> Self {
        Self {
            kind,
            cap: DEFAULT_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }

    const fn at_least_min(d: Duration) -> Duration {
        if d.as_nanos() < MIN_DELAY.as_nanos() {
            MIN_DELAY
        } else {
            d
        }
    }

    /// Linear backoff: attempt `n` waits `n × step`. A zero step is raised to [`MIN_DELAY`].
    pub const fn linear(step: Duration) -> Self {
        Self::new(Kind::Linear {
            step: Self::at_least_min(step),
        })
    }

    /// Constant backoff: every attempt waits `delay`. A zero delay is raised to [`MIN_DELAY`].
    pub const fn constant(delay: Duration) -> Self {
        Self::new(Kind::Constant {
            delay: Self::at_least_min(delay),
        })
    }

    /// Exponential backoff: attempt `n` waits `first × 2^(n-1)`. A zero first delay is raised
    /// to [`MIN_DELAY`].
    pub const fn exponential(first: Duration) -> Self {
        Self::new(Kind::Exponential {
            first: Self::at_least_min(first),
        })
    }

    /// Give up after this many retries (default 10). Zero is raised to 1.
    pub const fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = if n == 0 { 1 } else { n };
        self
    }

    /// No single delay exceeds `cap` (default 1 hour). A cap below the first delay is raised
    /// to it.
    pub const fn cap(mut self, cap: Duration) -> Self {
        let first = self.kind.first();
        self.cap = if cap.as_nanos() < first.as_nanos() {
            first
        } else {
            cap
        };
        self
    }

    /// Shorten each delay by a deterministic fraction of up to `fraction`, derived from the
    /// message id and the attempt, so that messages deferred together spread out while every
    /// process still agrees on each message's delay. Default 0 (none). Clamped into
    /// `0.0..=1.0`; NaN counts as 0.
    pub const fn jitter(mut self, fraction: f64) -> Self {
        // `fraction != fraction` is NaN.
        #[allow(clippy::eq_op)]
        let nan = fraction != fraction;
        self.jitter = if nan || fraction <= 0.0 {
            0.0
        } else if fraction >= 1.0 {
            1.0
        } else {
            fraction
        };
        self
    }

    /// [`Backoff::linear`], refusing a zero step.
    pub fn try_linear(step: Duration) -> Result<Self, BackoffError> {
        nonzero(step).map(Self::linear)
    }

    /// [`Backoff::constant`], refusing a zero delay.
    pub fn try_constant(delay: Duration) -> Result<Self, BackoffError> {
        nonzero(delay).map(Self::constant)
    }

    /// [`Backoff::exponential`], refusing a zero first delay.
    pub fn try_exponential(first: Duration) -> Result<Self, BackoffError> {
        nonzero(first).map(Self::exponential)
    }

    /// [`Backoff::max_attempts`], refusing zero.
    pub fn try_max_attempts(self, n: u32) -> Result<Self, BackoffError> {
        if n == 0 {
            return Err(BackoffError::ZeroAttempts);
        }
        Ok(self.max_attempts(n))
    }

    /// [`Backoff::cap`], refusing a cap below the first delay.
    pub fn try_cap(self, cap: Duration) -> Result<Self, BackoffError> {
        let first = self.kind.first();
        if cap < first {
            return Err(BackoffError::CapBelowFirst { cap, first });
        }
        Ok(self.cap(cap))
    }

    /// [`Backoff::jitter`], refusing a fraction outside `0.0..=1.0` (and NaN).
    pub fn try_jitter(self, fraction: f64) -> Result<Self, BackoffError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(BackoffError::BadJitter(fraction));
        }
        Ok(self.jitter(fraction))
    }

    /// The shape.
    pub const fn kind(&self) -> Kind {
        self.kind
    }

    /// The cap on a single delay.
    pub const fn max_delay(&self) -> Duration {
        self.cap
    }

    /// The jitter fraction (0 = none).
    pub const fn jitter_fraction(&self) -> f64 {
        self.jitter
    }

    /// The nominal delay before attempt `attempt` (from 1), without jitter; `None` past
    /// `max_attempts` and for attempt 0 (the first delivery, not a retry).
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

fn nonzero(d: Duration) -> Result<Duration, BackoffError> {
    if d.is_zero() {
        Err(BackoffError::ZeroDelay)
    } else {
        Ok(d)
    }
}

impl Default for Backoff {
    /// [`Backoff::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::seed::seed_of;
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
        assert_eq!(p, Backoff::linear(S));
    }

    #[test]
    fn builders_clamp_and_try_builders_refuse() {
        let ms = Duration::from_millis;
        assert_eq!(Backoff::linear(Duration::ZERO).delay(1), Some(MIN_DELAY));
        assert_eq!(
            Backoff::try_linear(Duration::ZERO),
            Err(BackoffError::ZeroDelay)
        );
        assert_eq!(Backoff::exponential(S).cap(ms(10)).max_delay(), S);
        assert_eq!(
            Backoff::exponential(S).try_cap(ms(10)),
            Err(BackoffError::CapBelowFirst {
                cap: ms(10),
                first: S
            })
        );
        assert_eq!(
            Policy::max_attempts(&Backoff::constant(S).max_attempts(0)),
            1
        );
        assert_eq!(
            Backoff::constant(S).try_max_attempts(0),
            Err(BackoffError::ZeroAttempts)
        );
        assert_eq!(Backoff::constant(S).jitter(1.5).jitter_fraction(), 1.0);
        assert_eq!(Backoff::constant(S).jitter(-1.0).jitter_fraction(), 0.0);
        assert_eq!(Backoff::constant(S).jitter(f64::NAN).jitter_fraction(), 0.0);
        assert!(matches!(
            Backoff::constant(S).try_jitter(1.5),
            Err(BackoffError::BadJitter(_))
        ));
        assert!(matches!(
            Backoff::constant(S).try_jitter(f64::NAN),
            Err(BackoffError::BadJitter(_))
        ));
        assert!(
            Backoff::try_constant(S)
                .and_then(|b| b.try_jitter(0.5))
                .is_ok()
        );
    }

    #[test]
    fn exponential_doubles_then_caps_without_overflow() {
        let p = Backoff::exponential(Duration::from_millis(100))
            .cap(Duration::from_secs(5))
            .max_attempts(u32::MAX);
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
                b.cap(first + Duration::from_millis(extra_cap_ms))
                    .max_attempts(max)
                    .jitter(jitter)
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
                prop_assert!(d.unwrap() <= p.max_delay());
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
                prop_assert!(j >= nominal.mul_f64(1.0 - p.jitter_fraction()) - Duration::from_nanos(1));
            }
        }

        #[test]
        fn jitter_spreads_messages(first_ms in 100u64..10_000) {
            let p = Backoff::constant(Duration::from_millis(first_ms)).jitter(0.5);
            let distinct: std::collections::HashSet<_> =
                (0..32u64).map(|i| p.delay_for(1, seed_of(&i.to_le_bytes()))).collect();
            prop_assert!(distinct.len() > 16, "only {} distinct delays", distinct.len());
        }
    }
}
