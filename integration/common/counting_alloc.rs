//! A global allocator that counts allocation calls and live bytes, for the tests and
//! benchmarks that check what a hot path allocates. Include it with
//! `#[path = "…/counting_alloc.rs"] mod counting_alloc;`: the test or bench binary then
//! counts everything it does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as u64, Relaxed);
        CALLS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as u64, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as u64, Relaxed);
        LIVE.fetch_sub(l.size() as u64, Relaxed);
        CALLS.fetch_add(1, Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocation and reallocation calls so far.
pub fn calls() -> u64 {
    CALLS.load(Relaxed)
}

/// Bytes allocated and not yet freed.
#[allow(dead_code)]
pub fn live() -> u64 {
    LIVE.load(Relaxed)
}
