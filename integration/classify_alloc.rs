//! The classifier's hot path allocates nothing per reply. This test binary has its own
//! counting global allocator, so the count covers everything `classify` does.

use mxpace::classify::{Classifier, Hints};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
#[path = "common/replies.rs"]
mod replies;

#[test]
fn classify_does_not_allocate() {
    let c = Classifier::builtin();
    let mut replies = replies::all();
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
    let before = counting_alloc::calls();
    let mut classes = 0usize;
    for r in &replies {
        classes += c.classify(r, Hints::default()).class as usize;
        classes += c.classify(r, hints).class as usize;
    }
    let after = counting_alloc::calls();
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
    let before = counting_alloc::calls();
    std::hint::black_box(c.explain(replies[0], Hints::default()));
    assert!(counting_alloc::calls() > before);
}
