//! A destination's story over time: windowed counts per outcome and the stage they imply.
//!
//! Two fixed half-windows approximate a sliding window without storing events, so a
//! destination's counts cost 20 bytes however busy it is.

use serde::Serialize;

#[derive(
    Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Stage {
    #[default]
    Trusted = 0,
    Hesitating = 1,
    Throttled = 2,
    Rejecting = 3,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Trusted,
        Stage::Hesitating,
        Stage::Throttled,
        Stage::Rejecting,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Trusted => "trusted",
            Stage::Hesitating => "hesitating",
            Stage::Throttled => "throttled",
            Stage::Rejecting => "rejecting",
        }
    }
    pub fn from_u8(v: u8) -> Stage {
        match v {
            1 => Stage::Hesitating,
            2 => Stage::Throttled,
            3 => Stage::Rejecting,
            _ => Stage::Trusted,
        }
    }
}

/// What a reply counts as for the destination's stage.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered = 0,
    Deferred = 1,
    Throttled = 2,
    Rejected = 3,
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Start (engine seconds) of the current half-window.
    start: u32,
    cur: [u16; 4],
    prev: [u16; 4],
}

impl Window {
    /// Counts `outcome` at `now`, rolling the halves when `half` seconds passed.
    pub fn record(&mut self, outcome: Outcome, now: u32, half: u32) {
        self.roll(now, half);
        let c = &mut self.cur[outcome as usize];
        *c = c.saturating_add(1);
    }

    fn roll(&mut self, now: u32, half: u32) {
        let half = half.max(1);
        let elapsed = now.saturating_sub(self.start);
        if elapsed >= 2 * half {
            self.prev = [0; 4];
            self.cur = [0; 4];
            self.start = now - now % half;
        } else if elapsed >= half {
            self.prev = self.cur;
            self.cur = [0; 4];
            self.start += half;
        }
    }

    /// Seeds the window with counts saved earlier (they count as the previous half).
    pub fn restore(&mut self, counts: [u32; 4], now: u32, half: u32) {
        let half = half.max(1);
        self.start = now - now % half;
        self.cur = [0; 4];
        for (p, c) in self.prev.iter_mut().zip(counts) {
            *p = c.min(u16::MAX as u32) as u16;
        }
    }

    /// Estimated counts over the last full window (delivered, deferred, throttled, rejected).
    pub fn counts(&self, now: u32, half: u32) -> [u32; 4] {
        let mut w = *self;
        w.roll(now, half);
        let half = half.max(1);
        let into = now.saturating_sub(w.start).min(half);
        let weight = (half - into) as u64;
        let mut out = [0u32; 4];
        for (i, o) in out.iter_mut().enumerate() {
            *o = w.cur[i] as u32 + ((w.prev[i] as u64 * weight) / half as u64) as u32;
        }
        out
    }
}

/// Stage from windowed counts: the share of trouble, with a floor of events so a single
/// unlucky reply does not move a quiet destination.
pub fn stage_of(counts: [u32; 4], suspended: bool) -> Stage {
    let [ok, deferred, throttled, rejected] = counts;
    let total = ok + deferred + throttled + rejected;
    let share = |n: u32, pct: u32| n * 100 >= total * pct;
    if suspended || (rejected >= 2 && share(rejected, 5)) {
        Stage::Rejecting
    } else if throttled >= 2 && share(throttled, 2) {
        Stage::Throttled
    } else if deferred + throttled >= 3 && share(deferred + throttled, 5) {
        Stage::Hesitating
    } else {
        Stage::Trusted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_by_share() {
        let cases = [
            ([100, 0, 0, 0], false, Stage::Trusted),
            ([100, 2, 0, 0], false, Stage::Trusted),
            ([50, 3, 0, 0], false, Stage::Hesitating),
            ([50, 1, 2, 0], false, Stage::Throttled),
            ([1000, 0, 2, 0], false, Stage::Trusted),
            ([1000, 0, 3, 0], false, Stage::Trusted),
            ([40, 0, 3, 0], false, Stage::Throttled),
            ([60, 0, 0, 40], false, Stage::Rejecting),
            ([1000, 0, 0, 1], false, Stage::Trusted),
            ([0, 0, 0, 0], true, Stage::Rejecting),
        ];
        for (counts, suspended, want) in cases {
            assert_eq!(stage_of(counts, suspended), want, "{counts:?}");
        }
    }

    #[test]
    fn window_forgets_old_events() {
        let mut w = Window::default();
        for _ in 0..10 {
            w.record(Outcome::Throttled, 5, 300);
        }
        assert_eq!(w.counts(5, 300)[2], 10);
        // Half a window later the old half is weighted down, not dropped at once.
        let later = w.counts(300 + 150, 300)[2];
        assert!(later > 0 && later < 10, "{later}");
        assert_eq!(w.counts(2000, 300), [0; 4]);
        w.record(Outcome::Delivered, 2000, 300);
        assert_eq!(w.counts(2000, 300), [1, 0, 0, 0]);
    }
}
