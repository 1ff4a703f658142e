//! Classifier throughput over the real corpus and the seed replies, one thread.
//!
//! Criterion measures the batch with throughput in replies; the bench also prints a plain
//! `classify: N replies/s, X ns/reply` line from its own timed loop, for notes and
//! `benches/RESULTS.md`.

use criterion::{criterion_group, Criterion, Throughput};
use mxpace::classify::{Classifier, Hints};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "../integration/common/replies.rs"]
mod replies;

/// Nanoseconds this thread has spent on a CPU (Linux `schedstat`), so the figure is not
/// inflated by time the thread waited for a core on a shared machine.
fn on_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn plain_figure(c: &Classifier, replies: &[&str]) {
    // Warm the regex caches, then run whole passes for at least three seconds.
    for r in replies {
        black_box(c.classify(r, Hints::default()));
    }
    let cpu0 = on_cpu_ns();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        for r in replies {
            black_box(c.classify(black_box(r), Hints::default()));
        }
        n += replies.len() as u64;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, on_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    println!(
        "classify: {:.0} replies/s, {:.0} ns/reply (on-CPU time; wall clock: {:.0} replies/s, {:.0} ns/reply; {} replies, {} distinct, one thread)",
        n as f64 / cpu,
        cpu * 1e9 / n as f64,
        n as f64 / wall,
        wall * 1e9 / n as f64,
        n,
        replies.len()
    );
}

fn bench(cr: &mut Criterion) {
    let c = Classifier::builtin();
    let replies = replies::all();
    plain_figure(&c, &replies);

    let mut g = cr.benchmark_group("classify");
    g.throughput(Throughput::Elements(replies.len() as u64));
    g.bench_function("corpus+seed", |b| {
        b.iter(|| {
            for r in &replies {
                black_box(c.classify(black_box(r), Hints::default()));
            }
        })
    });
    let postfix: Vec<String> = replies
        .iter()
        .take(100)
        .map(|r| {
            format!("4.0.0 host mx.example.net[192.0.2.1] said: {r} (in reply to RCPT TO command)")
        })
        .collect();
    g.throughput(Throughput::Elements(postfix.len() as u64));
    g.bench_function("status-filter keys", |b| {
        b.iter(|| {
            for r in &postfix {
                black_box(c.classify(black_box(r), Hints::default()));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

/// `MXPACE_BENCH_PASSES=N` runs exactly N passes (after one warm-up pass) and skips
/// criterion, so an instruction-counting profiler sees a fixed, small amount of work.
fn main() {
    if let Some(n) = std::env::var("MXPACE_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let c = Classifier::builtin();
        let replies = replies::all();
        for r in &replies {
            black_box(c.classify(r, Hints::default()));
        }
        for _ in 0..n {
            for r in &replies {
                black_box(c.classify(black_box(r), Hints::default()));
            }
        }
        println!("classify: {} passes of {} replies", n, replies.len());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
