//! Logging: human-readable lines by default, JSON with a flag, filter from config or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; logs go to standard error.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
}

/// At most one log line per key and interval, counting the lines it held back. A line per
/// report would flood the log (and cost the hot path) when every message of a busy stream
/// fails the same way; one a minute with the count says the same.
pub struct LogThrottle {
    every: u32,
    seen: crate::idmap::IdMap<(u32, u32)>,
}

/// One line a minute.
impl Default for LogThrottle {
    fn default() -> LogThrottle {
        LogThrottle::new(60)
    }
}

impl LogThrottle {
    /// Keys remembered at most; beyond, the stale ones are forgotten (or all, if none is).
    const MAX_KEYS: usize = 4096;

    pub fn new(every_secs: u32) -> LogThrottle {
        LogThrottle {
            every: every_secs,
            seen: Default::default(),
        }
    }

    /// `Some(held back since the last line)` when a line for `key` is due at `now`
    /// (seconds), `None` when it is held back.
    pub fn due(&mut self, key: u64, now: u32) -> Option<u32> {
        if self.seen.len() >= Self::MAX_KEYS && !self.seen.contains_key(&key) {
            let every = self.every;
            self.seen
                .retain(|_, (at, _)| now.saturating_sub(*at) < every);
            if self.seen.len() >= Self::MAX_KEYS {
                self.seen.clear();
            }
        }
        match self.seen.get_mut(&key) {
            Some((at, held)) if now.saturating_sub(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                *at = now;
                *held = 0;
                Some(n)
            }
            None => {
                self.seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_and_interval_with_the_count_held_back() {
        let mut t = LogThrottle::new(60);
        assert_eq!(t.due(1, 100), Some(0));
        assert_eq!(t.due(1, 101), None);
        assert_eq!(t.due(1, 159), None);
        assert_eq!(t.due(2, 120), Some(0), "another key has its own interval");
        assert_eq!(t.due(1, 160), Some(2));
        assert_eq!(t.due(1, 161), None);
        assert_eq!(t.due(1, 230), Some(1));
    }

    #[test]
    fn keys_stay_bounded() {
        let mut t = LogThrottle::new(60);
        for k in 0..3 * LogThrottle::MAX_KEYS as u64 {
            assert_eq!(t.due(k, 10), Some(0));
        }
        assert!(t.seen.len() <= LogThrottle::MAX_KEYS);
        // Stale keys are forgotten first.
        let mut t = LogThrottle::new(60);
        for k in 0..LogThrottle::MAX_KEYS as u64 {
            t.due(k, 0);
        }
        t.due(7, 100);
        t.due(u64::MAX, 100);
        assert_eq!(t.seen.len(), 2);
    }
}
