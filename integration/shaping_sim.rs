//! Deterministic convergence tests of the shaping engine against a simulated provider,
//! on a fake clock: no sleeping, same result every run.
//!
//! The simulated provider accepts `x` messages per second over a sliding one-second
//! window, answers `421 4.7.28` above it, and blocks (`550 5.7.1 … blocked`) for the
//! rest of the run once it has throttled more than `block_after` attempts within a
//! minute. The simulated MTA has an endless backlog and asks for admission every tick,
//! as Postfix's queue manager does when it resolves recipients.

use mxpace::classify::Classifier;
use mxpace::config::Config;
use mxpace::shaping::engine::ReportInput;
use mxpace::shaping::{Admission, Engine, EngineClock};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

const TICK_MS: u64 = 10;
const THROTTLE: &str = "421-4.7.28 [203.0.113.7] Our system has detected an unusual rate of unsolicited mail originating from your IP address. 421 4.7.28 To protect our users from spam, mail sent from your IP address has been temporarily rate limited. - gsmtp";
const BLOCK: &str = "550-5.7.1 [203.0.113.7] Our system has detected that this message is likely unsolicited mail. 550 5.7.1 To reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp";
const OK: &str = "250 2.0.0 OK 1732468912 a1si123456plg.99 - gsmtp";

struct Provider {
    x: usize,
    accepted: VecDeque<u64>,
    throttled: VecDeque<u64>,
    block_after: usize,
    blocked: bool,
    /// Answer every attempt with a reputation block (a provider that has had enough).
    rejecting: bool,
}

impl Provider {
    fn new(x: usize) -> Provider {
        Provider {
            x,
            accepted: VecDeque::new(),
            throttled: VecDeque::new(),
            block_after: 30,
            blocked: false,
            rejecting: false,
        }
    }

    fn attempt(&mut self, now_ms: u64) -> &'static str {
        while self.accepted.front().is_some_and(|&t| t + 1000 <= now_ms) {
            self.accepted.pop_front();
        }
        while self
            .throttled
            .front()
            .is_some_and(|&t| t + 60_000 <= now_ms)
        {
            self.throttled.pop_front();
        }
        if self.blocked || self.rejecting {
            return BLOCK;
        }
        if self.accepted.len() >= self.x {
            self.throttled.push_back(now_ms);
            if self.throttled.len() > self.block_after {
                self.blocked = true;
            }
            return THROTTLE;
        }
        self.accepted.push_back(now_ms);
        OK
    }
}

struct Sim {
    engine: Engine,
    clock: EngineClock,
    now_ms: u64,
    n: u64,
    /// Postfix's lane transports: when each can send next (rate delay 1 s each).
    lanes: HashMap<Arc<str>, u64>,
    /// Admitted messages waiting for their transport: (send at ms, recipient number).
    queued: BinaryHeap<Reverse<(u64, u64)>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    delivered: u64,
    throttled: u64,
    blocked: u64,
    held: u64,
}

impl Sim {
    fn new(extra: &str) -> Sim {
        let toml = format!(
            "[providers.gmail]\ndomains = [\"sim.test\"]\nnexthop = \"[127.0.0.1]:2525\"\nstart_tier = \"t7\"\nmax_tier = \"t9\"\nprobe_after = \"5m\"\n{extra}"
        );
        let config = Arc::new(Config::from_toml(&toml, "sim").unwrap());
        let clock = EngineClock::fake(1_800_000_000);
        let engine = Engine::new(config, Arc::new(Classifier::builtin()), clock.clone());
        Sim {
            engine,
            clock,
            now_ms: 0,
            n: 0,
            lanes: HashMap::new(),
            queued: BinaryHeap::new(),
        }
    }

    /// Runs `secs` simulated seconds. Each tick the MTA asks for admission until it is
    /// held; admitted mail goes out through its transport: a lane transport (name ending
    /// in `_N`) sends one message per second, like Postfix with a 1 s rate delay; other
    /// transports send at once.
    fn run(&mut self, p: &mut Provider, secs: u64) -> Tally {
        let mut t = Tally::default();
        for _ in 0..secs * 1000 / TICK_MS {
            loop {
                self.n += 1;
                let rcpt = format!("u{}@sim.test", self.n % 5000);
                match self.engine.admit(&rcpt, None) {
                    Admission::Route { transport, .. } => {
                        let is_lane = transport
                            .rsplit('_')
                            .next()
                            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
                        let at = if is_lane {
                            let next = self.lanes.entry(transport.clone()).or_insert(0);
                            let at = (*next).max(self.now_ms);
                            *next = at + 1000;
                            at
                        } else {
                            self.now_ms
                        };
                        self.queued.push(Reverse((at, self.n)));
                    }
                    Admission::Hold { .. } => {
                        t.held += 1;
                        break;
                    }
                    Admission::Default => panic!("a configured provider is always shaped"),
                }
            }
            while self
                .queued
                .peek()
                .is_some_and(|Reverse((at, _))| *at <= self.now_ms)
            {
                let Reverse((_, n)) = self.queued.pop().unwrap();
                let rcpt = format!("u{}@sim.test", n % 5000);
                let reply = p.attempt(self.now_ms);
                match reply {
                    OK => t.delivered += 1,
                    THROTTLE => t.throttled += 1,
                    _ => t.blocked += 1,
                }
                self.engine.report(&ReportInput {
                    reply,
                    recipient: Some(&rcpt),
                    site_hint: Some("gmail"),
                    ..Default::default()
                });
            }
            self.clock.advance(Duration::from_millis(TICK_MS));
            self.now_ms += TICK_MS;
        }
        t
    }
}

#[test]
fn settles_below_the_provider_rate_without_a_block_and_recovers() {
    let mut sim = Sim::new("");
    let mut p = Provider::new(10);
    // Converge: 20 minutes, then measure 10 minutes of steady state.
    let warm = sim.run(&mut p, 20 * 60);
    let steady = sim.run(&mut p, 10 * 60);
    let rate = steady.delivered as f64 / 600.0;
    println!(
        "X=10 msg/s: convergence {warm:?}; steady state {steady:?} = {rate:.2} msg/s ({:.0}% of X), throttled {:.2}% of attempts",
        rate * 10.0,
        100.0 * steady.throttled as f64 / (steady.delivered + steady.throttled).max(1) as f64
    );
    assert!(
        !p.blocked,
        "the engine must never push the provider into a block"
    );
    assert!(
        (7.0..=10.0).contains(&rate),
        "steady rate {rate} outside 70–100% of X"
    );

    // The provider relaxes to 25 msg/s: the engine climbs back up.
    p.x = 25;
    let _ = sim.run(&mut p, 15 * 60);
    let relaxed = sim.run(&mut p, 10 * 60);
    let rate2 = relaxed.delivered as f64 / 600.0;
    println!(
        "X=25 msg/s after relaxing: {relaxed:?} = {rate2:.2} msg/s ({:.0}% of X)",
        rate2 * 4.0
    );
    assert!(!p.blocked);
    assert!(
        (17.5..=25.0).contains(&rate2),
        "after relaxing {rate2} outside 70–100% of X"
    );
}

#[test]
fn reputation_blocks_suspend_and_the_suspension_is_obeyed() {
    let mut sim = Sim::new("suspend_after = 3\nsuspend_for = \"10m\"\nsuspend_max = \"1h\"\n");
    let mut p = Provider::new(10);
    sim.run(&mut p, 60);
    p.rejecting = true;
    let during = sim.run(&mut p, 5);
    assert!(during.blocked >= 3 && during.blocked <= 30, "{during:?}");
    // Suspended: nothing is admitted for the rest of the suspension.
    let held = sim.run(&mut p, 9 * 60);
    assert_eq!(
        held.delivered + held.throttled + held.blocked,
        0,
        "{held:?}"
    );
    let views = sim.engine.query("gmail");
    assert!(
        views.iter().any(|v| v.suspended_until.is_some()),
        "{views:?}"
    );
    // After it ends the destination resumes at its floor rate (t1 = 1 msg/s).
    p.rejecting = false;
    let after = sim.run(&mut p, 70);
    assert!(after.delivered > 0, "{after:?}");
    let first_minute = after.delivered as f64 / 70.0;
    println!(
        "suspended for 10 min after {} blocks; resumed at {first_minute:.2} msg/s",
        during.blocked
    );
    assert!(
        first_minute <= 3.0,
        "resumes slowly, not at full speed: {first_minute}"
    );
}

#[test]
fn operator_suspension_holds_everything_until_resume() {
    let mut sim = Sim::new("");
    let mut p = Provider::new(10);
    sim.engine.suspend("gmail", 3600).unwrap();
    let held = sim.run(&mut p, 30);
    assert_eq!(held.delivered, 0);
    sim.engine.resume("gmail").unwrap();
    let after = sim.run(&mut p, 30);
    assert!(after.delivered > 0);
    assert!(!p.blocked);
}
