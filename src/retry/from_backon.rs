//! A [`Schedule`] from any `backon` builder without jitter (feature `backon`).

use std::time::Duration;

use backon::BackoffBuilder;

use super::backoff::BackoffError;
use super::schedule::Schedule;

/// The most attempts taken from a `backon` builder; an endless one (`without_max_times`) is cut
/// here.
pub(crate) const MAX_BACKON_ATTEMPTS: usize = 1000;

impl Schedule {
    /// The delays a [`backon`] builder produces, as a schedule every instance agrees on.
    ///
    /// The builder is run twice; if the two runs differ (random jitter, which would give each
    /// instance another schedule for the same message), it is refused with
    /// [`BackoffError::NotDeterministic`]: use [`crate::Backoff::jitter`], which derives its
    /// jitter from the message id. An endless builder is cut at 1 000 attempts.
    ///
    /// ```
    /// use std::time::Duration;
    /// use backon::ExponentialBuilder;
    /// use prereq::Schedule;
    ///
    /// let s = Schedule::from_backon(
    ///     ExponentialBuilder::default()
    ///         .with_min_delay(Duration::from_millis(200))
    ///         .with_max_times(4),
    /// )
    /// .unwrap();
    /// assert_eq!(s.delays().len(), 4);
    /// assert_eq!(s.delay(2).map(|d| d.as_millis()), Some(400));
    /// assert!(Schedule::from_backon(ExponentialBuilder::default().with_jitter()).is_err());
    /// ```
    pub fn from_backon<B: BackoffBuilder + Clone>(builder: B) -> Result<Self, BackoffError> {
        let run = |b: B| -> Vec<Duration> { b.build().take(MAX_BACKON_ATTEMPTS).collect() };
        let first = run(builder.clone());
        if first != run(builder) {
            return Err(BackoffError::NotDeterministic);
        }
        Schedule::try_new(first)
    }
}
