//! [`Health`]: whether a transport is consuming every queue it should, and when it last
//! received something, for a service's readiness probe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A transport's consumption, readable from anywhere (cheap to clone): which queues it consumes
/// now, which it should but does not (a consumer the broker cancelled and not yet restored),
/// when the last delivery arrived, and how many channels it keeps open only to settle what
/// they delivered.
///
/// Every change is also a `tracing` event (target `prereq`), and with the `metrics` feature the
/// gauges `prereq_consuming_queues`, `prereq_stopped_queues` and
/// `prereq_last_delivery_timestamp_seconds`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every queue the transport should consume, and whether it does.
    queues: Mutex<BTreeMap<String, bool>>,
    /// Milliseconds since the Unix epoch of the last delivery; 0: none yet.
    last_delivery_ms: AtomicI64,
    /// Channels a consumer moved on from, still open for what they delivered.
    retired: AtomicUsize,
}

/// One retired channel, counted while it lives.
#[derive(Debug)]
pub(crate) struct Retired(Health);

impl Drop for Retired {
    fn drop(&mut self) {
        let n = self.0.inner.retired.fetch_sub(1, Ordering::Relaxed) - 1;
        #[cfg(feature = "metrics")]
        metrics::gauge!("prereq_retired_channels").set(n as f64);
        tracing::debug!(target: "prereq", retired_channels = n,
            "a retired channel settled everything it delivered");
    }
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, bool>> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The queues consumed now.
    pub fn consuming(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, on)| **on)
            .map(|(q, _)| q.clone())
            .collect()
    }

    /// The queues that should be consumed and are not (being restored).
    pub fn stopped(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, on)| !**on)
            .map(|(q, _)| q.clone())
            .collect()
    }

    /// Every queue is consumed (and consumption has started).
    pub fn is_consuming(&self) -> bool {
        let queues = self.lock();
        !queues.is_empty() && queues.values().all(|on| *on)
    }

    /// When the last delivery arrived, if any did.
    pub fn last_delivery(&self) -> Option<SystemTime> {
        let ms = self.inner.last_delivery_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs()))
    }

    /// Channels kept open only to settle what they delivered. A consumer whose channel has
    /// many deliveries open (messages held for their keys) moves on to a fresh channel, so that
    /// the broker's cost of each acknowledgement does not grow with what is held; the old
    /// channel closes once everything it delivered is settled. 0 when nothing is held long.
    pub fn retired_channels(&self) -> usize {
        self.inner.retired.load(Ordering::Relaxed)
    }

    /// Count a channel retired until the guard is dropped.
    pub(crate) fn retire(&self) -> Retired {
        let n = self.inner.retired.fetch_add(1, Ordering::Relaxed) + 1;
        #[cfg(feature = "metrics")]
        metrics::gauge!("prereq_retired_channels").set(n as f64);
        tracing::debug!(target: "prereq", retired_channels = n,
            "a consumer moved on to a fresh channel");
        Retired(self.clone())
    }

    /// Record that `queue` is consumed (`true`) or stopped (`false`).
    pub(crate) fn set(&self, queue: &str, consuming: bool) {
        let (on, off) = {
            let mut queues = self.lock();
            queues.insert(queue.to_owned(), consuming);
            let on = queues.values().filter(|c| **c).count();
            (on, queues.len() - on)
        };
        if consuming {
            tracing::info!(target: "prereq", queue, consuming = on, stopped = off, "consuming");
        } else {
            tracing::warn!(target: "prereq", queue, consuming = on, stopped = off,
                "not consuming");
        }
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!("prereq_consuming_queues").set(on as f64);
            metrics::gauge!("prereq_stopped_queues").set(off as f64);
        }
    }

    /// Record a delivery at `now_ms` (milliseconds since the Unix epoch).
    pub(crate) fn delivered(&self, now_ms: i64) {
        self.inner.last_delivery_ms.store(now_ms, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::gauge!("prereq_last_delivery_timestamp_seconds").set(now_ms as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consuming_means_every_queue() {
        let h = Health::default();
        assert!(!h.is_consuming(), "nothing started yet");
        h.set("a", true);
        h.set("b", true);
        assert!(h.is_consuming());
        h.set("b", false);
        assert!(!h.is_consuming());
        assert_eq!(
            (h.consuming(), h.stopped()),
            (vec!["a".into()], vec!["b".into()])
        );
        assert_eq!(h.last_delivery(), None);
        h.delivered(1_000);
        assert_eq!(h.last_delivery(), Some(UNIX_EPOCH + Duration::from_secs(1)));
    }

    #[test]
    fn a_retired_channel_counts_while_its_guard_lives() {
        let h = Health::default();
        let a = h.retire();
        let b = h.clone().retire();
        assert_eq!(h.retired_channels(), 2);
        drop(a);
        assert_eq!(h.retired_channels(), 1);
        drop(b);
        assert_eq!(h.retired_channels(), 0);
    }
}
