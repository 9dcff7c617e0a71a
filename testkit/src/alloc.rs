//! A global allocator for tests of hostile inputs and of bounded memory: the system allocator,
//! remembering the largest single request and refusing absurd ones (so that a size read from a
//! forged field fails the test instead of exhausting the machine), and counting the bytes live
//! and their peak (so that a test can show a large file is streamed, not held whole).
//!
//! A `#[global_allocator]` must be declared in each test binary that wants it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: testkit::CountingAllocator = testkit::CountingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Above this an allocation is refused outright (the process aborts and the test fails).
pub const ALLOCATION_REFUSED: usize = 1 << 30;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` has been since [`CountingAllocator::reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by, Ordering::Relaxed);
}

/// The system allocator, remembering the largest single request (see [`CountingAllocator::largest`]).
pub struct CountingAllocator;

impl CountingAllocator {
    /// Forgets the largest request so far: [`CountingAllocator::largest`] counts from here.
    pub fn reset() {
        LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
    }

    /// The largest single allocation (or reallocation) requested since the last reset, in bytes.
    pub fn largest() -> usize {
        LARGEST_ALLOCATION.load(Ordering::Relaxed)
    }

    /// Starts measuring the peak from what is live now; returns that.
    pub fn reset_peak() -> usize {
        let live = LIVE.load(Ordering::Relaxed);
        PEAK.store(live, Ordering::Relaxed);
        live
    }

    /// The most bytes live at once since [`CountingAllocator::reset_peak`].
    pub fn peak() -> usize {
        PEAK.load(Ordering::Relaxed)
    }
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOCATION_REFUSED {
            return std::ptr::null_mut();
        }
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        if new_size > ALLOCATION_REFUSED {
            return std::ptr::null_mut();
        }
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            shrank(layout.size() - new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
