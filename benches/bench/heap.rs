//! Live heap bytes, counted by the bench's global allocator while counting is on: what the
//! consumer's heap grows by while it holds messages.
//!
//! Counting is off by default (one relaxed load per allocation), and on only around the
//! measurement, so the latency and throughput figures are not charged for it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed while counting was on.
static NET: AtomicI64 = AtomicI64::new(0);

/// The system allocator, counting the net bytes allocated while [`Window`] is open.
pub struct Counting;

fn count(delta: i64) {
    if COUNTING.load(Ordering::Relaxed) {
        NET.fetch_add(delta, Ordering::Relaxed);
    }
}

fn size(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counting only reads
// the layouts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(size(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(size(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        count(-size(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(size(new_size) - size(layout.size()));
        }
        p
    }
}

/// Counting is on while a window is open (one at a time).
pub struct Window {
    start: i64,
}

impl Window {
    /// Start counting.
    pub fn open() -> Self {
        COUNTING.store(true, Ordering::SeqCst);
        Self {
            start: NET.load(Ordering::SeqCst),
        }
    }

    /// Net bytes allocated (process-wide) since the window opened.
    pub fn grown(&self) -> i64 {
        NET.load(Ordering::SeqCst) - self.start
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}
