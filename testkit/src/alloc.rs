//! A global allocator for tests of hostile inputs: the system allocator, remembering the
//! largest single request and refusing absurd ones, so that a size read from a forged field
//! fails the test instead of exhausting the machine.
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
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOCATION_REFUSED {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        if new_size > ALLOCATION_REFUSED {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
