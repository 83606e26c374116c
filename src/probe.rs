//! Timestamps along a registration's way through prereq, for the bench's breakdown of the key
//! path (docs/performance.md). Compiled in only with `RUSTFLAGS="--cfg prereq_probe"`; without
//! it every function here is empty and the calls vanish.

use crate::transport::{DeliveryId, Source};

/// A point on a registration's way from the broker client to the engine's decision, in that
/// order (`stage as usize` counts from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The transport took the delivery from the broker client.
    Taken,
    /// The transport handed it to its receiver (after recording it as unsettled).
    Forwarded,
    /// The engine's loop took it from the transport.
    Decided,
}

/// The clock reading to stamp with later (`None` when the probe is compiled out).
#[inline(always)]
pub(crate) fn now() -> Option<std::time::Instant> {
    #[cfg(prereq_probe)]
    {
        Some(std::time::Instant::now())
    }
    #[cfg(not(prereq_probe))]
    {
        None
    }
}

/// Stamp a registration at `stage`, at `at` (or now); other deliveries are not stamped.
#[inline(always)]
#[cfg_attr(not(prereq_probe), allow(unused_variables))]
pub(crate) fn stamp(stage: Stage, source: Source, id: DeliveryId, at: Option<std::time::Instant>) {
    #[cfg(prereq_probe)]
    if source == Source::Registration {
        on::stamp(stage, id.0, at.unwrap_or_else(std::time::Instant::now));
    }
}

#[cfg(prereq_probe)]
pub use on::{record, take};

#[cfg(prereq_probe)]
mod on {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use super::Stage;

    /// Stamping on or off.
    static RECORDING: AtomicBool = AtomicBool::new(false);
    /// The stamps since the last [`take`]: stage, delivery id, when.
    static STAMPS: Mutex<Vec<(Stage, u64, Instant)>> = Mutex::new(Vec::new());

    pub(super) fn stamp(stage: Stage, id: u64, at: Instant) {
        if RECORDING.load(Ordering::Relaxed) {
            STAMPS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((stage, id, at));
        }
    }

    /// Start or stop stamping.
    pub fn record(on: bool) {
        RECORDING.store(on, Ordering::Relaxed);
    }

    /// The stamps so far (stage, delivery id, when); forgets them.
    pub fn take() -> Vec<(Stage, u64, Instant)> {
        std::mem::take(
            &mut *STAMPS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
