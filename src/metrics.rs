//! Metrics through the `metrics` facade (feature `metrics`): install any exporter you like.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `prereq_handled_total` | counter | |
//! | `prereq_held_total` | counter | |
//! | `prereq_released_total` | counter | |
//! | `prereq_deferred_total` | counter | `cause`: `hold-full`, `hold-expired`, `handler-retry`, `source-unavailable`, `behind-deferred` |
//! | `prereq_dead_lettered_total` | counter | `reason`: `undecodable`, `rejected`, `key-never-arrived`, `retries-exhausted`, `invalid-key` |
//! | `prereq_requeued_total` | counter | |
//! | `prereq_settle_failed_total` | counter | |
//! | `prereq_duplicate_copies_dropped_total` | counter | (deferred copies the broker delivered twice, acknowledged without running; RabbitMQ transport) |
//! | `prereq_held` | gauge | (messages held now) |
//! | `prereq_release_latency_seconds` | histogram | (time held before the key arrived) |

use crate::event::Decision;

/// Record one decision; `held` is the number of messages held after it.
pub(crate) fn record(decision: &Decision, held: usize) {
    match decision {
        Decision::Registered => {}
        Decision::Held => metrics::counter!("prereq_held_total").increment(1),
        Decision::Released { waited } => {
            metrics::counter!("prereq_released_total").increment(1);
            metrics::histogram!("prereq_release_latency_seconds").record(waited.as_secs_f64());
        }
        Decision::Handled => metrics::counter!("prereq_handled_total").increment(1),
        Decision::Deferred { cause, .. } => {
            metrics::counter!("prereq_deferred_total", "cause" => cause.as_str()).increment(1);
        }
        Decision::DeadLettered(dl) => {
            metrics::counter!("prereq_dead_lettered_total", "reason" => dl.kind.as_str())
                .increment(1);
        }
        Decision::Requeued => metrics::counter!("prereq_requeued_total").increment(1),
        Decision::SettleFailed { .. } => {
            metrics::counter!("prereq_settle_failed_total").increment(1);
        }
    }
    metrics::gauge!("prereq_held").set(held as f64);
}

/// A deferred copy the broker delivered twice was dropped (acknowledged, not handled).
#[cfg(feature = "amqp")]
pub(crate) fn duplicate_copy_dropped() {
    metrics::counter!("prereq_duplicate_copies_dropped_total").increment(1);
}
