//! The engine's time source: real monotonic time, or a fake one that tests advance.
//!
//! Everything in shaping reads time through this one type, so the governor limiters
//! and the adaptive state agree, and tests never sleep to see backoff.

use governor::clock::Clock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct EngineClock {
    inner: ClockKind,
    /// Unix time (ns) at the clock's zero, to turn engine time into wall time for
    /// persistence and human output.
    unix_epoch_ns: u64,
}

#[derive(Clone, Debug)]
enum ClockKind {
    Real(Instant),
    Fake(Arc<AtomicU64>),
}

impl EngineClock {
    pub fn real() -> EngineClock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        EngineClock {
            inner: ClockKind::Real(Instant::now()),
            unix_epoch_ns: unix,
        }
    }

    /// A clock that stands still until [`EngineClock::advance`]; its zero is `unix_secs`.
    pub fn fake(unix_secs: u64) -> EngineClock {
        EngineClock {
            inner: ClockKind::Fake(Arc::new(AtomicU64::new(0))),
            unix_epoch_ns: unix_secs * 1_000_000_000,
        }
    }

    pub fn advance(&self, by: Duration) {
        match &self.inner {
            ClockKind::Fake(t) => {
                t.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
            }
            ClockKind::Real(_) => panic!("advance() on a real clock"),
        }
    }

    /// Time since the clock's zero.
    pub fn elapsed(&self) -> Duration {
        match &self.inner {
            ClockKind::Real(start) => start.elapsed(),
            ClockKind::Fake(t) => Duration::from_nanos(t.load(Ordering::SeqCst)),
        }
    }

    /// Whole seconds since the clock's zero (the resolution of adaptive state).
    pub fn secs(&self) -> u32 {
        self.elapsed().as_secs() as u32
    }

    /// Current Unix time in seconds.
    pub fn unix_now(&self) -> u64 {
        (self.unix_epoch_ns + self.elapsed().as_nanos() as u64) / 1_000_000_000
    }

    /// Unix seconds of an engine-seconds timestamp.
    pub fn to_unix(&self, engine_secs: u32) -> u64 {
        self.unix_epoch_ns / 1_000_000_000 + engine_secs as u64
    }

    /// Engine seconds of a Unix timestamp (0 when it lies before the clock's zero).
    pub fn from_unix(&self, unix_secs: u64) -> u32 {
        unix_secs
            .saturating_sub(self.unix_epoch_ns / 1_000_000_000)
            .min(u32::MAX as u64) as u32
    }
}

impl Clock for EngineClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.elapsed()
    }
}
