//! [`Schedule`]: an explicit list of delays.

use std::borrow::Cow;
use std::time::Duration;

use super::backoff::{BackoffError, MIN_DELAY};
use super::policy::Policy;

/// An explicit schedule: attempt `n` waits the `n`-th delay of the list; past its end, give up.
///
/// ```
/// use std::time::Duration;
/// use prereq::Schedule;
///
/// let s = Schedule::new([Duration::from_millis(500), Duration::from_secs(2)]);
/// assert_eq!(s.delay(1), Some(Duration::from_millis(500)));
/// assert_eq!(s.delay(3), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Schedule {
    delays: Cow<'static, [Duration]>,
}

impl Schedule {
    /// A schedule from a static list (usable in a `const`). Delays are used as given; an empty
    /// list dead-letters at the first deferral.
    pub const fn from_static(delays: &'static [Duration]) -> Self {
        Self {
            delays: Cow::Borrowed(delays),
        }
    }

    /// A schedule from these delays; zero delays are raised to [`MIN_DELAY`]; an empty list
    /// dead-letters at the first deferral.
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Self {
        Self {
            delays: Cow::Owned(delays.into_iter().map(|d| d.max(MIN_DELAY)).collect()),
        }
    }

    /// [`Schedule::new`], refusing an empty list and zero delays.
    pub fn try_new(delays: impl IntoIterator<Item = Duration>) -> Result<Self, BackoffError> {
        let delays: Vec<Duration> = delays.into_iter().collect();
        if delays.is_empty() {
            return Err(BackoffError::ZeroAttempts);
        }
        if delays.iter().any(Duration::is_zero) {
            return Err(BackoffError::ZeroDelay);
        }
        Ok(Self {
            delays: Cow::Owned(delays),
        })
    }

    /// The delay before attempt `attempt` (from 1); `None` past the end and for attempt 0.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        self.delays.get(index).copied()
    }

    /// The delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

impl Policy for Schedule {
    fn delay_for(&self, attempt: u32, _seed: u64) -> Option<Duration> {
        self.delay(attempt)
    }

    fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn schedules_follow_their_list() {
        let s = Schedule::new([Duration::ZERO, S]);
        assert_eq!(s.delays(), [MIN_DELAY, S]);
        assert_eq!(s.delay_for(2, 7), Some(S));
        assert_eq!(s.delay_for(3, 7), None);
        assert_eq!(s.delay(0), None);
        assert_eq!(Policy::max_attempts(&s), 2);
        assert_eq!(Schedule::try_new([]), Err(BackoffError::ZeroAttempts));
        assert_eq!(
            Schedule::try_new([S, Duration::ZERO]),
            Err(BackoffError::ZeroDelay)
        );
        assert_eq!(Policy::max_attempts(&Schedule::new([])), 0);
    }
}
