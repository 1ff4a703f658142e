//! One destination's adaptive state and the pure rules that move it.
//!
//! No clock reads, no I/O: every function takes `now` (engine seconds) and the
//! destination's parameters, so the policy is tested with plain tables.

use super::stage::{stage_of, Outcome, Stage, Window};
use crate::classify::Class;

/// A tier of the ladder as the state machine needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct TierSpec {
    pub name: String,
    pub rate: f64,
    pub concurrency: u32,
    pub lanes: u32,
    pub burst: u32,
}

/// The numbers that govern one site (provider defaults merged with overrides), in
/// engine units (seconds, tier indexes).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub start_tier: u8,
    pub max_tier: u8,
    pub floor_tier: u8,
    pub increase_after: u32,
    pub decrease_factor: f64,
    pub probe_after: u32,
    /// Replies to mail admitted before a decrease keep arriving after it; throttles
    /// within this many seconds of a decrease belong to the same episode.
    pub decrease_holdoff: u32,
    pub backoff_base: u32,
    pub backoff_max: u32,
    pub suspend_after: u32,
    pub suspend_for: u32,
    pub suspend_max: u32,
    pub greylist_delay: u32,
    pub defer_blocks: bool,
    /// Half of the stage window, in seconds.
    pub window_half: u32,
}

const NO_CEILING: u8 = u8::MAX;
/// Rate-limit replies a forgiven episode may hold before it decreases after all.
const FORGIVEN_THROTTLES: u8 = 2;

/// Adaptive state of one destination (site × sending identity). Kept compact: a
/// million of these must fit in well under 256 bytes each, with their keys.
#[derive(Clone, Debug, PartialEq)]
pub struct DestState {
    pub tier: u8,
    /// Tier at which the destination was last throttled (the rate the provider refused).
    pub ceiling: u8,
    pub stage: Stage,
    pub suspensions: u8,
    /// Deliveries since the last step or the last trouble.
    pub streak: u16,
    /// Deferrals in a row (backoff exponent).
    pub deferrals: u16,
    pub lane: u16,
    /// Rate-limit replies in the current episode (see `apply`).
    pub episode: u8,
    /// The current episode is forgiven: it holds the rate unless it grows.
    pub forgiving: bool,
    pub last_seen: u32,
    pub last_decrease: u32,
    /// Last step up the ladder (engine seconds).
    pub last_step: u32,
    pub ceiling_at: u32,
    /// Engine seconds until which the destination is suspended; 0 = not suspended.
    pub suspended_until: u32,
    pub window: Window,
}

impl DestState {
    pub fn new(p: &Params, now: u32) -> DestState {
        DestState {
            tier: p.start_tier,
            ceiling: NO_CEILING,
            stage: Stage::Trusted,
            suspensions: 0,
            streak: 0,
            deferrals: 0,
            lane: 0,
            episode: 0,
            forgiving: false,
            last_seen: now,
            last_decrease: 0,
            last_step: now,
            ceiling_at: 0,
            suspended_until: 0,
            window: Window::default(),
        }
    }

    pub fn is_suspended(&self, now: u32) -> bool {
        self.suspended_until > now
    }

    pub fn ceiling(&self) -> Option<u8> {
        (self.ceiling != NO_CEILING).then_some(self.ceiling)
    }

    /// Counts over the stage window.
    pub fn counts(&self, now: u32, p: &Params) -> [u32; 4] {
        self.window.counts(now, p.window_half)
    }
}

/// What a report did to its destination.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Effect {
    /// Seconds until this message should be retried; `None` = do not retry.
    pub retry_after: Option<u32>,
    pub tier_changed: Option<(u8, u8)>,
    pub suspended_for: Option<u32>,
    pub stage_changed: Option<(Stage, Stage)>,
}

/// Exponential backoff: base × 2^(n−1), capped.
pub fn backoff(n: u16, base: u32, max: u32) -> u32 {
    let shift = n.saturating_sub(1).min(20) as u32;
    base.saturating_mul(1u32 << shift).min(max)
}

/// The tier a multiplicative decrease lands in: the fastest whose rate fits
/// `rate × factor`, never below the floor.
pub fn decreased_tier(tiers: &[TierSpec], from: u8, factor: f64, floor: u8) -> u8 {
    let target = tiers[from as usize].rate * factor;
    let mut t = floor;
    for (i, spec) in tiers.iter().enumerate().take(from as usize) {
        if i as u8 >= floor && spec.rate <= target + 1e-9 {
            t = i as u8;
        }
    }
    t.min(from)
}

/// Applies one classified reply to the destination.
pub fn apply(
    s: &mut DestState,
    class: Class,
    permanent: bool,
    tiers: &[TierSpec],
    p: &Params,
    now: u32,
) -> Effect {
    let mut e = Effect::default();
    s.last_seen = now;
    let before_stage = s.stage;
    if s.suspended_until != 0 && !s.is_suspended(now) {
        // A suspension that ran out resumes at the floor rate.
        s.suspended_until = 0;
    }
    match class {
        Class::Delivered => {
            s.window.record(Outcome::Delivered, now, p.window_half);
            s.deferrals = 0;
            s.streak = s.streak.saturating_add(1);
            if s.ceiling != NO_CEILING && now.saturating_sub(s.ceiling_at) >= p.probe_after {
                s.ceiling = NO_CEILING;
            }
            // One step per feedback delay at most: the replies to the faster rate must
            // have a chance to arrive before the next step.
            let settled = now.saturating_sub(s.last_step) >= p.decrease_holdoff;
            if s.streak as u32 >= p.increase_after && s.tier < p.max_tier && settled {
                let next = s.tier + 1;
                let capped = s.ceiling != NO_CEILING
                    && tiers[next as usize].rate > 0.9 * tiers[s.ceiling as usize].rate;
                // Under the ceiling the streak keeps counting: it is the evidence that
                // lets a later lone throttle pass without a decrease (below).
                if !capped {
                    e.tier_changed = Some((s.tier, next));
                    s.tier = next;
                    s.streak = 0;
                    s.last_step = now;
                    // Throttles from now on answer the faster tier: a new episode.
                    s.last_decrease = 0;
                }
            }
            e.retry_after = None;
        }
        Class::RateLimited => {
            s.window.record(Outcome::Throttled, now, p.window_half);
            // Replies within `decrease_holdoff` of an episode's first belong to it. A
            // sender paced at the provider's rate meets a small episode now and then:
            // Postfix starts deliveries on whole-second timers, and their jitter lets
            // two seconds' batches meet in one window of the provider. So an episode
            // after a clean run of `increase_after` deliveries, or a destination's first
            // one, is forgiven while it stays small: the rate holds and stops climbing
            // (the ceiling). Its third reply, or an episode without a clean run before
            // it, decreases the rate. Halving on every lone 421 settled far below it.
            let clean_run = s.streak as u32 >= p.increase_after;
            let first = s.episode == 0;
            s.streak = 0;
            s.deferrals = s.deferrals.saturating_add(1);
            // A new episode starts `decrease_holdoff` after the last one began (or at
            // once after a step up); later replies within it are stragglers of the same
            // episode. The tier that drew an episode is the rate the provider refused.
            let fresh =
                s.last_decrease == 0 || now.saturating_sub(s.last_decrease) >= p.decrease_holdoff;
            let decrease = if fresh {
                s.episode = 1;
                s.forgiving = first || clean_run;
                s.ceiling = s.tier;
                s.ceiling_at = now;
                // 0 means "never"; engine time starts at 0.
                s.last_decrease = now.max(1);
                !s.forgiving
            } else {
                s.episode = s.episode.saturating_add(1);
                let grew = s.forgiving && s.episode > FORGIVEN_THROTTLES;
                if grew {
                    s.forgiving = false;
                }
                grew
            };
            if decrease {
                let to = decreased_tier(tiers, s.tier, p.decrease_factor, p.floor_tier);
                if to != s.tier {
                    e.tier_changed = Some((s.tier, to));
                    s.tier = to;
                }
            }
            e.retry_after = Some(backoff(s.deferrals, p.backoff_base, p.backoff_max));
        }
        Class::ReputationBlock | Class::SpamRejected => {
            s.window.record(Outcome::Rejected, now, p.window_half);
            s.streak = 0;
            s.deferrals = s.deferrals.saturating_add(1);
            let rejected = s.window.counts(now, p.window_half)[Outcome::Rejected as usize];
            if rejected >= p.suspend_after && !s.is_suspended(now) {
                let grow = 1u32 << (s.suspensions.min(16) as u32);
                let dur = p.suspend_for.saturating_mul(grow).min(p.suspend_max);
                s.suspended_until = now + dur;
                s.suspensions = s.suspensions.saturating_add(1);
                if s.tier != p.floor_tier {
                    e.tier_changed = Some((s.tier, p.floor_tier));
                    s.tier = p.floor_tier;
                }
                e.suspended_for = Some(dur);
            }
            e.retry_after = if s.is_suspended(now) {
                Some(s.suspended_until - now)
            } else if permanent && !p.defer_blocks {
                None
            } else {
                Some(backoff(s.deferrals, p.backoff_base, p.backoff_max))
            };
        }
        Class::Greylisted => {
            e.retry_after = Some(p.greylist_delay);
        }
        Class::TempFailure | Class::MailboxFull => {
            s.window.record(Outcome::Deferred, now, p.window_half);
            s.deferrals = s.deferrals.saturating_add(1);
            e.retry_after =
                (!permanent).then(|| backoff(s.deferrals, p.backoff_base, p.backoff_max));
        }
        Class::NetworkError => {
            // The MX host's circuit breaker owns network trouble; the provider is not penalised.
            e.retry_after = Some(backoff(1, p.backoff_base, p.backoff_max));
        }
        Class::PolicyRejected | Class::AuthFailure => {
            s.window.record(
                if permanent {
                    Outcome::Rejected
                } else {
                    Outcome::Deferred
                },
                now,
                p.window_half,
            );
            e.retry_after =
                (!permanent).then(|| backoff(s.deferrals.max(1), p.backoff_base, p.backoff_max));
        }
        Class::RecipientUnknown | Class::DomainInvalid | Class::MailboxDisabled => {
            e.retry_after = None;
        }
        Class::ContentRejected
        | Class::MessageTooLarge
        | Class::RelayDenied
        | Class::ProtocolError
        | Class::Unknown => {
            e.retry_after = (!permanent).then(|| backoff(1, p.backoff_base, p.backoff_max));
        }
    }
    let counts = s.window.counts(now, p.window_half);
    s.stage = stage_of(counts, s.is_suspended(now));
    if s.stage != before_stage {
        e.stage_changed = Some((before_stage, s.stage));
    }
    e
}

/// Time-based additive increase for destinations whose deliveries are not reported
/// individually: a quiet `probe_after` without trouble earns one step.
pub fn quiet_increase(s: &mut DestState, p: &Params, now: u32) -> Option<(u8, u8)> {
    let quiet_since = s.last_decrease.max(s.ceiling_at).max(s.last_step);
    if s.tier < p.max_tier
        && s.deferrals == 0
        && !s.is_suspended(now)
        && now.saturating_sub(quiet_since) >= p.probe_after
        && now.saturating_sub(s.last_seen) < p.probe_after
    {
        let from = s.tier;
        // A deliberate probe one step up; the ceiling stays, so deliveries alone do
        // not race further up before the provider has answered the probe.
        s.tier += 1;
        s.last_step = now;
        s.last_decrease = 0;
        return Some((from, s.tier));
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn tiers() -> Vec<TierSpec> {
        [1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 50.0, 100.0]
            .iter()
            .enumerate()
            .map(|(i, &rate)| TierSpec {
                name: format!("t{}", i + 1),
                rate,
                concurrency: 5,
                lanes: 0,
                burst: 1,
            })
            .collect()
    }

    pub fn params() -> Params {
        Params {
            start_tier: 6,
            max_tier: 8,
            floor_tier: 0,
            increase_after: 3,
            decrease_factor: 0.5,
            probe_after: 600,
            decrease_holdoff: 2,
            backoff_base: 60,
            backoff_max: 3600,
            suspend_after: 3,
            suspend_for: 1800,
            suspend_max: 6 * 3600,
            greylist_delay: 300,
            defer_blocks: false,
            window_half: 300,
        }
    }

    #[test]
    fn decrease_lands_on_half_rate() {
        let t = tiers();
        assert_eq!(decreased_tier(&t, 6, 0.5, 0), 4, "20/s → 8/s (≤ 10)");
        assert_eq!(decreased_tier(&t, 3, 0.5, 0), 1, "5/s → 2/s (≤ 2.5)");
        assert_eq!(decreased_tier(&t, 0, 0.5, 0), 0, "floor");
        assert_eq!(decreased_tier(&t, 6, 0.5, 5), 5, "never below floor");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(
            [1, 2, 3, 7, 30].map(|n| backoff(n, 60, 3600)),
            [60, 120, 240, 3600, 3600]
        );
    }

    #[test]
    fn aimd_with_ceiling() {
        let (t, p) = (tiers(), params());
        let mut s = DestState::new(&p, 0);
        // The first episode is forgiven until its third reply.
        let e: Vec<_> = (0..3)
            .map(|_| apply(&mut s, Class::RateLimited, false, &t, &p, 10))
            .map(|e| (e.tier_changed, e.retry_after))
            .collect();
        assert_eq!(
            e,
            [
                (None, Some(60)),
                (None, Some(120)),
                (Some((6, 4)), Some(240))
            ]
        );
        // More 421s from the same burst do not halve again.
        let e = apply(&mut s, Class::RateLimited, false, &t, &p, 11);
        assert_eq!((e.tier_changed, e.retry_after), (None, Some(480)));
        // Repeated throttling later keeps halving.
        apply(&mut s, Class::RateLimited, false, &t, &p, 14);
        assert_eq!(s.tier, 2);
        // Deliveries climb back, but not above 90% of the throttled rate before probe_after.
        for i in 0..120 {
            apply(&mut s, Class::Delivered, false, &t, &p, 20 + i / 2);
        }
        assert_eq!(s.tier, 3, "climbs to 5/s, the tier below the ceiling 8/s");
        assert_eq!(s.deferrals, 0);
        for i in 0..3 {
            apply(&mut s, Class::Delivered, false, &t, &p, 700 + i);
        }
        assert_eq!(s.tier, 4, "probes upward after probe_after");
    }

    #[test]
    fn small_throttle_episodes_are_forgiven_after_clean_runs() {
        let (t, p) = (tiers(), params());
        let p = Params { max_tier: 3, ..p };
        let mut s = DestState::new(&p, 0);
        s.tier = 3;
        // The first episode is forgiven while it stays small: two replies hold the rate.
        for now in [1, 1] {
            let e = apply(&mut s, Class::RateLimited, false, &t, &p, now);
            assert_eq!((e.tier_changed, s.tier), (None, 3));
            assert!(e.retry_after.is_some(), "the throttled message still waits");
        }
        assert_eq!(s.ceiling(), Some(3));
        // An episode without a clean run before it decreases at once.
        apply(&mut s, Class::Delivered, false, &t, &p, 4);
        let e = apply(&mut s, Class::RateLimited, false, &t, &p, 5);
        assert_eq!(e.tier_changed, Some((3, 1)));
        // Under the ceiling the streak keeps counting, so after a clean run a small
        // episode is forgiven again ...
        let p = Params { max_tier: 8, ..p };
        for i in 0..2 * p.increase_after {
            apply(&mut s, Class::Delivered, false, &t, &p, 10 + i);
        }
        assert_eq!(
            s.tier, 2,
            "climbed to 3/s; the ceiling caps 5/s (> 0.9 × 5/s)"
        );
        for now in [20, 21] {
            let e = apply(&mut s, Class::RateLimited, false, &t, &p, now);
            assert_eq!((e.tier_changed, s.tier), (None, 2));
        }
        // ... until it grows: the third reply of the episode decreases.
        let e = apply(&mut s, Class::RateLimited, false, &t, &p, 21);
        assert_eq!(e.tier_changed, Some((2, 0)));
        // Heavy overload at the start: the third reply decreases within the episode.
        let mut fresh = DestState::new(&p, 0);
        let changes: Vec<_> = (0..6)
            .map(|_| apply(&mut fresh, Class::RateLimited, false, &t, &p, 1).tier_changed)
            .collect();
        assert_eq!(changes, [None, None, Some((6, 4)), None, None, None]);
    }

    #[test]
    fn blocks_suspend_and_grow() {
        let (t, p) = (tiers(), params());
        let mut s = DestState::new(&p, 0);
        let e1 = apply(&mut s, Class::ReputationBlock, true, &t, &p, 1);
        assert_eq!(e1.retry_after, None, "a permanent block is not retried");
        let e2 = apply(&mut s, Class::ReputationBlock, true, &t, &p, 2);
        assert_eq!(e2.stage_changed, Some((Stage::Trusted, Stage::Rejecting)));
        let e3 = apply(&mut s, Class::ReputationBlock, true, &t, &p, 3);
        assert_eq!(e3.suspended_for, Some(1800));
        assert_eq!(e3.retry_after, Some(1800));
        assert_eq!(s.tier, 0, "resumes at the floor");
        assert_eq!(s.stage, Stage::Rejecting);
        // After it ends, the next block episode suspends for twice as long.
        let later = 1803 + 700;
        for i in 0..3 {
            apply(&mut s, Class::ReputationBlock, true, &t, &p, later + i);
        }
        assert_eq!(s.suspended_until, later + 2 + 3600, "{s:?}");
    }

    #[test]
    fn greylist_and_recipient_classes_do_not_penalise() {
        let (t, p) = (tiers(), params());
        let mut s = DestState::new(&p, 0);
        let e = apply(&mut s, Class::Greylisted, false, &t, &p, 1);
        assert_eq!(e.retry_after, Some(300));
        let e = apply(&mut s, Class::RecipientUnknown, true, &t, &p, 1);
        assert_eq!(e.retry_after, None);
        assert_eq!((s.tier, s.stage), (6, Stage::Trusted));
    }

    #[test]
    fn quiet_time_earns_a_step() {
        let p = params();
        let mut s = DestState::new(&p, 0);
        s.tier = 2;
        s.last_step = 0;
        s.last_seen = 900;
        assert_eq!(quiet_increase(&mut s, &p, 900), Some((2, 3)));
        assert_eq!(
            quiet_increase(&mut s, &p, 901),
            None,
            "one step per quiet period"
        );
    }
}
