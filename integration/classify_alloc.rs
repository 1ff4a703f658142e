//! The classifier's hot path allocates nothing per reply. This test binary has its own
//! counting global allocator, so the count covers everything `classify` does.

use mxpace::classify::{Classifier, Hints};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CORPUS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/corpus/dev.tsv"
));
const SEED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/seed-replies.tsv"
));

#[test]
fn classify_does_not_allocate() {
    let c = Classifier::builtin();
    let mut replies: Vec<&str> = CORPUS
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .collect();
    replies.extend(
        SEED.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split('\t').next()),
    );
    replies.push("4.7.28 host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected an unusual rate 421 4.7.28 from your IP (in reply to end of DATA command)");
    let hints = Hints {
        mx_host: Some("gmail-smtp-in.l.google.com"),
        status: Some("4.7.28"),
    };
    // Warm-up: the regex engines fill their per-thread caches on first use.
    for _ in 0..2 {
        for r in &replies {
            std::hint::black_box(c.classify(r, Hints::default()));
            std::hint::black_box(c.classify(r, hints));
        }
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut classes = 0usize;
    for r in &replies {
        classes += c.classify(r, Hints::default()).class as usize;
        classes += c.classify(r, hints).class as usize;
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(classes > 0);
    assert!(replies.len() > 350);
    assert_eq!(
        after - before,
        0,
        "{} allocations for {} classifications",
        after - before,
        2 * replies.len()
    );

    // The counter works: the cold path does allocate.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    std::hint::black_box(c.explain(replies[0], Hints::default()));
    assert!(ALLOCATIONS.load(Ordering::Relaxed) > before);
}
