//! [`Health`]: whether a transport is consuming every queue it should, and when it last
//! received something, for a service's readiness probe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A transport's consumption, readable from anywhere (cheap to clone): which queues it consumes
/// now, which it should but does not (a consumer the broker cancelled and not yet restored),
/// and when the last delivery arrived.
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
}
