//! The shaping engine's steady path and its memory per tracked destination.
//!
//! Prints plain lines for notes and `benches/RESULTS.md`:
//! - `shaping report_delivered`: ns per decision (report in → limits out) for a
//!   successful delivery to a known destination, the most common report;
//! - `shaping report_mix`: the same over a mix of real replies (70 % delivered, the rest
//!   drawn from the corpus), and `classify_mix`, the classifier's share of it;
//! - `shaping admit` (transport lookup) and `shaping policy` (smtpd_access_policy);
//! - allocations per decision on each path (the steady path should allocate nothing);
//! - `shaping memory`: bytes per destination at 1,000,000 destinations, from a
//!   counting allocator (bytes requested) and from the process RSS (what the allocator
//!   really took from the OS).
//!
//! `MXPACE_SHAPING_CASE=NAME MXPACE_SHAPING_ITERS=N` runs only that case's loop N times
//! and exits, for instruction counts under `valgrind --tool=callgrind`: the difference
//! between two runs with N and 2N iterations, divided by N, is the cost of one decision,
//! free of setup and of the machine's noise.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mxpace::classify::{Classifier, Hints};
use mxpace::config::Config;
use mxpace::shaping::engine::ReportInput;
use mxpace::shaping::{Engine, EngineClock};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../integration/common/counting_alloc.rs"]
mod counting_alloc;
#[path = "../integration/common/replies.rs"]
mod replies;

const DELIVERED: &str = "250 2.0.0 Ok: queued as 4XkT2m0Zq5z9";
/// Destinations of the steady-path cases: 1000 domains × 4 sending IPs.
const DOMAINS: usize = 1000;
const IPS: [&str; 4] = ["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13"];
const MEMORY_DESTINATIONS: usize = 1_000_000;

struct Workload {
    recipients: Vec<String>,
    /// (reply, status) per request.
    replies: Vec<&'static str>,
}

/// Requests spread over the destinations; `mix` = share of corpus replies (else delivered).
fn workload(n: usize, mix: f64) -> Workload {
    let corpus = replies::all();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut recipients = Vec::with_capacity(n);
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        let r = next();
        recipients.push(format!(
            "u{}@d{}.example.com",
            r % 100,
            (r >> 8) % DOMAINS as u64
        ));
        let from_corpus = ((r >> 32) % 1000) as f64 / 1000.0 < mix;
        replies.push(if from_corpus {
            corpus[((r >> 40) as usize) % corpus.len()]
        } else {
            DELIVERED
        });
    }
    Workload {
        recipients,
        replies,
    }
}

fn engine() -> Engine {
    engine_with(Config::builtin())
}

fn engine_with(config: Config) -> Engine {
    Engine::new(
        Arc::new(config),
        Arc::new(Classifier::builtin()),
        EngineClock::real(),
    )
}

fn input<'a>(w: &'a Workload, i: usize) -> ReportInput<'a> {
    ReportInput {
        reply: w.replies[i],
        recipient: Some(&w.recipients[i]),
        sender: Some("bounces@sender.example.org"),
        source_ip: Some(IPS[i % IPS.len()]),
        ..Default::default()
    }
}

/// One named steady-path case: the engine with every destination already created, and
/// a step function that makes one decision.
struct Case {
    name: &'static str,
    engine: Engine,
    w: Workload,
}

impl Case {
    fn new(name: &'static str) -> Case {
        let mix = if name == "report_mix" || name == "classify_mix" {
            0.3
        } else {
            0.0
        };
        let w = workload(8192, mix);
        let engine = engine();
        // Create every destination, so the measured loop is the steady path.
        for i in 0..w.recipients.len() {
            engine.report(&input(&w, i));
        }
        Case { name, engine, w }
    }

    #[inline]
    fn step(&self, i: usize) {
        let i = i % self.w.recipients.len();
        match self.name {
            "report_delivered" | "report_mix" => {
                black_box(self.engine.report(black_box(&input(&self.w, i))));
            }
            "classify_mix" => {
                black_box(
                    self.engine
                        .setup()
                        .classifier
                        .classify(black_box(self.w.replies[i]), Hints::default()),
                );
            }
            "admit" => {
                black_box(self.engine.admit(black_box(&self.w.recipients[i]), None));
            }
            "policy" => {
                black_box(self.engine.policy(black_box(&self.w.recipients[i]), true));
            }
            other => panic!("unknown case {other}"),
        }
    }
}

const CASES: [&str; 5] = [
    "report_delivered",
    "report_mix",
    "classify_mix",
    "admit",
    "policy",
];

/// Timed loop for at least `secs`, plus allocations per step.
fn plain_figure(case: &Case, secs: f64) {
    for i in 0..10_000 {
        case.step(i);
    }
    let calls = counting_alloc::calls();
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..1000 {
            case.step(n);
            n += 1;
        }
    }
    let el = start.elapsed().as_secs_f64();
    let allocs = (counting_alloc::calls() - calls) as f64 / n as f64;
    println!(
        "shaping {}: {:.0} ns/decision, {:.0} decisions/s, {:.3} allocations/decision ({} decisions, one thread)",
        case.name,
        el * 1e9 / n as f64,
        n as f64 / el,
        allocs,
        n
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes per destination at a million destinations, each its own recipient domain
/// (the worst case: every destination also interns its domain's name).
fn memory_figure() {
    let names: Vec<String> = (0..MEMORY_DESTINATIONS)
        .map(|i| format!("u@d{i}.example.com"))
        .collect();
    // Room for the million and the warm-up one: the default cap (1,000,000) would
    // start evicting at exactly the figure we measure.
    let config = Config::from_toml("[shaping]\nmax_destinations = 1100000\n", "bench")
        .expect("bench config");
    let engine = engine_with(config);
    // One report first, so that lazily built tables do not count as per-destination.
    engine.report(&ReportInput {
        reply: DELIVERED,
        recipient: Some("u@warmup.example.com"),
        ..Default::default()
    });
    let (live0, rss0) = (counting_alloc::live(), rss_kib());
    let start = Instant::now();
    for n in &names {
        engine.report(&ReportInput {
            reply: DELIVERED,
            recipient: Some(n),
            ..Default::default()
        });
    }
    let el = start.elapsed().as_secs_f64();
    let (live1, rss1) = (counting_alloc::live(), rss_kib());
    let stats = engine.stats();
    let d = stats.destinations.saturating_sub(1).max(1) as f64;
    println!(
        "shaping memory: {:.0} B/destination allocated, {:.0} B/destination RSS, at {} destinations \
         ({} domains interned; {:.1} MiB allocated, RSS {:.1} → {:.1} MiB; created at {:.0} ns each)",
        (live1 - live0) as f64 / d,
        (rss1.saturating_sub(rss0) * 1024) as f64 / d,
        stats.destinations,
        stats.domains,
        (live1 - live0) as f64 / 1048576.0,
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        el * 1e9 / d
    );
    drop(black_box(engine));
}

fn bench(c: &mut Criterion) {
    if let (Ok(name), Ok(iters)) = (
        std::env::var("MXPACE_SHAPING_CASE"),
        std::env::var("MXPACE_SHAPING_ITERS"),
    ) {
        // Instruction-count mode (see the module doc).
        let iters: usize = iters.parse().expect("MXPACE_SHAPING_ITERS is a number");
        let name = CASES
            .into_iter()
            .find(|c| *c == name)
            .expect("MXPACE_SHAPING_CASE names a case");
        let case = Case::new(name);
        for i in 0..iters {
            case.step(i);
        }
        std::process::exit(0);
    }
    let cases: Vec<Case> = CASES.into_iter().map(Case::new).collect();
    for case in &cases {
        plain_figure(case, 2.0);
    }
    memory_figure();

    let mut g = c.benchmark_group("shaping");
    g.throughput(Throughput::Elements(1));
    for case in &cases {
        let mut i = 0usize;
        g.bench_function(case.name, |b| {
            b.iter(|| {
                case.step(i);
                i = i.wrapping_add(1);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
