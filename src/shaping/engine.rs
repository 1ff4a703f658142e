//! The shaping engine: every report updates its destination, every answer carries its limits.
//!
//! One `Engine` per daemon, shared behind an `Arc`. Classification runs outside the
//! lock; the lock covers only table lookups and the pure state transitions of
//! `state::apply`, never I/O or an `.await`. The per-tier governor limiters are
//! concurrent by themselves.

use super::clock::EngineClock;
use super::intern::{IdMap, Interner};
use super::site::{Site, SiteTable};
use super::stage::Stage;
use super::state::{self, DestState, Effect, Params, TierSpec};
use super::suppress::{clip_reply, normalise_address, Suppression, SuppressionList};
use crate::classify::{Blamed, Class, Classifier, Hints, Verdict};
use crate::config::{parse_date, Config};
use arc_swap::ArcSwap;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Limiter = RateLimiter<
    u32,
    HashMapStateStore<u32>,
    EngineClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// Domain-blamed identities tracked per site (a site rarely has more sending domains).
const MAX_DOMAIN_IDENTITIES: usize = 16;
const RECENT_REPLIES: usize = 128;

/// What a report carries, borrowed from the request.
#[derive(Copy, Clone, Debug, Default)]
pub struct ReportInput<'a> {
    pub reply: &'a str,
    pub status: Option<&'a str>,
    pub recipient: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub mx_host: Option<&'a str>,
    pub source_ip: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub dkim_domain: Option<&'a str>,
    /// Site named by the lookup's context (socketmap map name `status/SITE/...`).
    pub site_hint: Option<&'a str>,
}

/// Retry verdict for the reported message.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Delivered; nothing to do.
    Ok,
    /// Retry after `retry_after` seconds.
    Retry,
    /// Do not retry (permanent failure or suppressed recipient).
    Bounce,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ok => "ok",
            Action::Retry => "retry",
            Action::Bounce => "bounce",
        }
    }
}

/// The answer to a report.
#[derive(Clone, Debug)]
pub struct Decision {
    pub verdict: Verdict,
    pub site: Site,
    pub action: Action,
    /// Seconds; 0 when not retrying.
    pub retry_after: u32,
    pub tier: u8,
    pub rate: f64,
    pub concurrency: u32,
    pub stage: Stage,
    /// Unix seconds when the destination's suspension ends.
    pub suspended_until: Option<u64>,
    /// The recipient was added to the suppression list by this report.
    pub suppressed: bool,
    /// The answer promises state (a suppression or suspension) that must be durable first.
    pub durable: bool,
    /// Status-filter rewrite: turn this 5xx block into a 4xx deferral.
    pub defer_block: bool,
}

/// The transport decision for one recipient (Postfix `transport_maps`).
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Not shaped: Postfix's default transport.
    Default,
    /// Send through this tier transport now.
    Route {
        transport: Arc<str>,
        nexthop: Arc<str>,
    },
    /// Not now: the message waits in the deferred queue.
    Hold { retry_after: u32, reason: Hold },
}

/// A destination that needs a token before its recipient is routed: what
/// [`Engine::plan_admission`] found, for whoever decides the token.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmitPlan {
    /// Site name (a configured provider or the recipient domain).
    pub site: String,
    /// Sending identity (pool or source IP).
    pub identity: String,
    /// The governing tier, its rate (messages per second) and burst.
    pub tier: u8,
    pub rate: f64,
    pub burst: u32,
    /// The slowest tier of the destination: the safe limit without the shared limiter.
    pub floor_tier: u8,
    slot: u32,
    key: u64,
    site_id: Site,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Hold {
    Paced { rate: f64 },
    Suspended { until: u64 },
    Warmup { limit: u64 },
}

/// Answer to `smtpd_access_policy`.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyVerdict {
    Dunno,
    Suspended { site: String, until: u64 },
    Suppressed(Suppression),
}

/// One destination, for `ctl status`, `destination_query` and metrics.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DestinationView {
    pub site: String,
    pub identity: String,
    pub tier: String,
    pub rate: f64,
    pub concurrency: u32,
    pub stage: Stage,
    pub suspended_until: Option<u64>,
    pub ceiling_rate: Option<f64>,
    pub deferrals: u32,
    /// Delivered, deferred, throttled, rejected over the stage window.
    pub counts: [u32; 4],
    pub last_seen: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RecentReply {
    pub at: u64,
    pub site: String,
    pub class: Class,
    pub reply: String,
}

/// Config compiled for the engine; swapped whole on reload.
pub struct Setup {
    pub config: Arc<Config>,
    pub classifier: Arc<Classifier>,
    pub sites: SiteTable,
    pub tiers: Vec<TierSpec>,
    /// Index = named site; 0 = the defaults (used by domain sites).
    params: Vec<Params>,
    limiters: Vec<Arc<Limiter>>,
    /// `[site][tier]` → lane transport names; site 0 = the shared tiers.
    transports: Vec<Vec<Vec<Arc<str>>>>,
    nexthops: Vec<Arc<str>>,
    empty: Arc<str>,
    /// Metric label of each named site; index 0 is `other`. Leaked once per config load
    /// (a handful of short names) so that labels never allocate per request.
    labels: Vec<&'static str>,
    counters: crate::metrics::ReplyCounters,
    default_pool: String,
    mailbox_full: (u32, u64),
}

fn to_params(config: &Config, provider: &str) -> Params {
    let p = config.params_for(provider);
    let tier = |n: &str| config.tier_index(n).unwrap_or(0) as u8;
    let secs = |d: crate::config::Dur| d.get().as_secs().min(u32::MAX as u64) as u32;
    Params {
        start_tier: tier(&p.start_tier),
        max_tier: tier(&p.max_tier),
        floor_tier: tier(&p.floor_tier),
        increase_after: p.increase_after,
        decrease_factor: p.decrease_factor,
        probe_after: secs(p.probe_after),
        decrease_holdoff: secs(p.decrease_holdoff),
        backoff_base: secs(p.backoff_base),
        backoff_max: secs(p.backoff_max),
        suspend_after: p.suspend_after,
        suspend_for: secs(p.suspend_for),
        suspend_max: secs(p.suspend_max),
        greylist_delay: secs(p.greylist_delay),
        defer_blocks: p.defer_blocks,
        window_half: (secs(config.shaping.stage_window) / 2).max(1),
    }
}

/// Transport names for a site's tier: one per lane, or a single one.
pub fn tier_transport_names(
    prefix: &str,
    site: Option<&str>,
    tier: &str,
    lanes: u32,
) -> Vec<String> {
    let base = match site {
        Some(s) => format!("{prefix}_{}_{tier}", sanitize(s)),
        None => format!("{prefix}_{tier}"),
    };
    if lanes == 0 {
        vec![base]
    } else {
        (0..lanes).map(|l| format!("{base}_{l}")).collect()
    }
}

/// Postfix service names allow letters, digits, `-` and `_`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Setup {
    pub fn new(config: Arc<Config>, classifier: Arc<Classifier>, clock: &EngineClock) -> Setup {
        let sites = SiteTable::new(&config, &classifier);
        let tiers: Vec<TierSpec> = config
            .tiers
            .iter()
            .map(|t| TierSpec {
                name: t.name.clone(),
                rate: t.rate,
                concurrency: t.concurrency,
                lanes: t.lanes,
                burst: t.burst,
            })
            .collect();
        let mut params = vec![to_params(&config, "")];
        for (_, name) in sites.names() {
            params.push(to_params(&config, name));
        }
        let limiters = tiers
            .iter()
            .map(|t| Arc::new(limiter_for(t, clock)))
            .collect();
        let prefix = &config.postfix.transport_prefix;
        let mut transports = Vec::with_capacity(sites.len());
        let mut nexthops = Vec::with_capacity(sites.len());
        for site in 0..sites.len() as u16 {
            let name = (site != 0 && sites.is_dedicated(site)).then(|| sites.name(site));
            transports.push(
                tiers
                    .iter()
                    .map(|t| {
                        tier_transport_names(prefix, name, &t.name, t.lanes)
                            .into_iter()
                            .map(Arc::from)
                            .collect()
                    })
                    .collect(),
            );
            nexthops.push(Arc::from(sites.nexthop(site)));
        }
        let mut labels: Vec<&'static str> = vec![crate::metrics::OTHER];
        for (_, name) in sites.names() {
            labels.push(Box::leak(name.to_string().into_boxed_str()));
        }
        let defaults = &config.shaping.defaults;
        Setup {
            counters: crate::metrics::ReplyCounters::new(&labels),
            labels,
            default_pool: config.shaping.default_pool.clone(),
            mailbox_full: (
                defaults.mailbox_full_limit,
                defaults.mailbox_full_window.get().as_secs(),
            ),
            config,
            classifier,
            sites,
            tiers,
            params,
            limiters,
            transports,
            nexthops,
            empty: Arc::from(""),
        }
    }

    /// Metric label of a site: its name when configured, else `other`.
    pub fn label(&self, site: Site) -> &'static str {
        match site {
            Site::Named(n) => self
                .labels
                .get(n as usize)
                .copied()
                .unwrap_or(crate::metrics::OTHER),
            _ => crate::metrics::OTHER,
        }
    }

    pub fn params(&self, site: Site) -> &Params {
        match site {
            Site::Named(n) => &self.params[n as usize],
            _ => &self.params[0],
        }
    }

    fn transport(&self, site: Site, tier: u8, lane: u16) -> (&Arc<str>, &Arc<str>) {
        let (s, hop) = match site {
            Site::Named(n) if self.sites.is_dedicated(n) => {
                (n as usize, &self.nexthops[n as usize])
            }
            _ => (0, &self.empty),
        };
        let lanes = &self.transports[s][tier as usize];
        (&lanes[lane as usize % lanes.len()], hop)
    }
}

fn limiter_for(t: &TierSpec, clock: &EngineClock) -> Limiter {
    let period = Duration::from_secs_f64(1.0 / t.rate).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .expect("tier rate is validated > 0")
        .allow_burst(NonZeroU32::new(t.burst.max(1)).unwrap());
    RateLimiter::new(quota, HashMapStateStore::default(), clock.clone())
}

struct Slot {
    /// `site key << 32 | identity id`; `FREE` when the slot is unused.
    key: u64,
    state: DestState,
    /// Changed since the last periodic flush to the store.
    dirty: bool,
}

/// A persisted destination: names instead of ids, Unix times instead of engine time.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct DestRecord {
    pub site: String,
    pub identity: String,
    pub tier: String,
    pub ceiling: Option<String>,
    pub stage: u8,
    pub suspensions: u8,
    pub streak: u16,
    pub deferrals: u16,
    /// Unix seconds; 0 = not suspended.
    pub suspended_until: u64,
    pub last_seen: u64,
    /// Delivered, deferred, throttled, rejected over the stage window at save time.
    pub counts: [u32; 4],
}

/// A change the store must make durable.
#[derive(Debug)]
pub enum Change {
    Suppress(String, Suppression),
    Unsuppress(String),
    Dest(DestRecord),
}

/// A change made by another instance of the fleet, applied here without being
/// journaled again.
#[derive(Debug)]
pub enum Shared {
    Suppress(String, Suppression),
    Unsuppress(String),
    /// Tier, ceiling and stage; local counters and any suspension stay.
    Adaptive(DestRecord),
    /// A suspension: the later end wins, so a stale record never shortens one.
    Suspend(DestRecord),
    /// A resume: lifts the suspension whatever its end.
    Resume(DestRecord),
}

const FREE: u64 = u64::MAX;

#[derive(Default)]
struct Circuit {
    failures: u32,
    open_until: u32,
}

#[derive(Default)]
struct Inner {
    index: IdMap<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    domains: Interner,
    identities: Interner,
    mx_hosts: Interner,
    circuits: HashMap<u32, Circuit>,
    /// Destinations of a site whose identity is a blamed domain.
    domain_dests: HashMap<u32, Vec<u32>>,
    suppressions: SuppressionList,
    recent: VecDeque<RecentReply>,
    /// Messages admitted per identity on the current UTC day (warm-up).
    sent_today: HashMap<u32, (u64, u64)>,
    evictions: u64,
    /// Authentication-failure lines: one a minute per destination (key).
    auth_log: crate::telemetry::LogThrottle,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub destinations: usize,
    pub suppressions: usize,
    pub evictions: u64,
    pub domains: usize,
    pub identities: usize,
}

pub struct Engine {
    setup: ArcSwap<Setup>,
    inner: Mutex<Inner>,
    clock: EngineClock,
    /// Where durable changes go (the store's writer), once a store is attached.
    journal: std::sync::OnceLock<std::sync::mpsc::Sender<Change>>,
    /// MX rollup of unlisted domains, when enabled.
    mx: std::sync::OnceLock<Arc<super::mx::MxCache>>,
}

fn key_of(site: Site, identity: u32) -> u64 {
    ((site.key() as u64) << 32) | identity as u64
}

/// The domain part of an address (`user@Example.com` → `Example.com`).
pub fn domain_of(addr: &str) -> Option<&str> {
    let a = addr.trim().trim_start_matches('<').trim_end_matches('>');
    let (_, d) = a.rsplit_once('@')?;
    (!d.is_empty()).then_some(d)
}

/// The blamed domain a reply names, as Gmail does: `… your SPF domain [bounces.example.com]`.
fn domain_in_text(text: &str) -> Option<&str> {
    let i = text.find("domain [")?;
    let rest = &text[i + 8..];
    let end = rest.find(']')?;
    let d = &rest[..end];
    (d.contains('.') && !d.bytes().all(|b| b.is_ascii_digit() || b == b'.')).then_some(d)
}

impl Engine {
    pub fn new(config: Arc<Config>, classifier: Arc<Classifier>, clock: EngineClock) -> Engine {
        let setup = Setup::new(config, classifier, &clock);
        Engine {
            setup: ArcSwap::from_pointee(setup),
            inner: Mutex::new(Inner::default()),
            clock,
            journal: std::sync::OnceLock::new(),
            mx: std::sync::OnceLock::new(),
        }
    }

    pub fn clock(&self) -> &EngineClock {
        &self.clock
    }

    pub fn setup(&self) -> arc_swap::Guard<Arc<Setup>> {
        self.setup.load()
    }

    /// Swaps in a new config. Destinations keep their state; when the tier ladder changed,
    /// tiers are clamped to the new ladder and the limiters start afresh.
    pub fn reload(&self, config: Arc<Config>, classifier: Arc<Classifier>) {
        let old = self.setup.load_full();
        let mut new = Setup::new(config, classifier, &self.clock);
        if new.tiers == old.tiers {
            new.limiters = old.limiters.clone();
        }
        let max = new.tiers.len().saturating_sub(1) as u8;
        {
            let mut inner = self.inner.lock().unwrap();
            for slot in inner.slots.iter_mut().filter(|s| s.key != FREE) {
                slot.state.tier = slot.state.tier.min(max);
                if slot.state.ceiling != u8::MAX {
                    slot.state.ceiling = slot.state.ceiling.min(max);
                }
            }
        }
        self.setup.store(Arc::new(new));
    }

    /// Classifies a reply and applies it to its destination.
    pub fn report(&self, r: &ReportInput<'_>) -> Decision {
        let setup = self.setup.load();
        let verdict = setup.classifier.classify(
            r.reply,
            Hints {
                mx_host: r.mx_host,
                status: r.status,
            },
        );
        self.apply_verdict(&setup, verdict, r)
    }

    fn resolve_site(
        &self,
        setup: &Setup,
        inner: &mut Inner,
        r: &ReportInput<'_>,
        v: &Verdict,
    ) -> Site {
        let sites = &setup.sites;
        let cls = &setup.classifier;
        if let Some(n) = r.site_hint.and_then(|h| sites.named(h)) {
            return Site::Named(n);
        }
        if let Some(n) = r.mx_host.and_then(|h| sites.for_mx(h, cls)) {
            return Site::Named(n);
        }
        if let Some(d) = r.recipient.and_then(domain_of) {
            if let Some(n) = sites.for_domain(d, cls) {
                return Site::Named(n);
            }
            if let Some(n) = sites.for_provider(v.provider) {
                return Site::Named(n);
            }
            let mut buf = [0u8; 256];
            if d.len() <= buf.len() {
                for (o, i) in buf.iter_mut().zip(d.as_bytes()) {
                    *o = i.to_ascii_lowercase();
                }
                if let Ok(lower) = std::str::from_utf8(&buf[..d.len()]) {
                    // One reference for `slot_for`, which keeps or releases it.
                    return match self.rolled_up(lower) {
                        Some(Ok(n)) => Site::Named(n),
                        Some(Err(group)) => Site::Domain(inner.domains.acquire(&group)),
                        None => Site::Domain(inner.domains.acquire(lower)),
                    };
                }
            }
        }
        match sites.for_provider(v.provider) {
            Some(n) => Site::Named(n),
            None => Site::None,
        }
    }

    fn identity_name<'a>(
        &self,
        setup: &'a Setup,
        r: &ReportInput<'a>,
        v: &Verdict,
    ) -> (&'a str, bool) {
        let domain = match v.blamed {
            Blamed::SpfDomain => domain_in_text(r.reply).or(r.sender.and_then(domain_of)),
            Blamed::DkimDomain => domain_in_text(r.reply).or(r.dkim_domain),
            Blamed::FromDomain => domain_in_text(r.reply).or(r.sender.and_then(domain_of)),
            _ => None,
        };
        if let Some(d) = domain {
            return (d, true);
        }
        (
            r.source_ip
                .or(r.pool)
                .unwrap_or(setup.default_pool.as_str()),
            false,
        )
    }

    /// Empties the destination's bucket in `tier` but for one message, so that a new or
    /// changed tier starts at its steady rate instead of with a full burst: a burst right
    /// after stepping up is exactly what draws a provider's 421s.
    fn settle_bucket(setup: &Setup, slot: u32, tier: u8) {
        if let (Some(l), Some(t)) = (
            setup.limiters.get(tier as usize),
            setup.tiers.get(tier as usize),
        ) {
            if let Some(n) = NonZeroU32::new(t.burst.saturating_sub(1)) {
                let _ = l.check_key_n(&slot, n);
            }
        }
    }

    /// Looks up or creates the destination slot for `(site, identity)`. For a domain
    /// site the caller holds one reference to the domain, which this consumes: it is
    /// kept by a new destination and released when the destination already existed.
    fn slot_for(
        &self,
        setup: &Setup,
        inner: &mut Inner,
        site: Site,
        identity: &str,
        now: u32,
    ) -> u32 {
        let id = inner.identities.acquire(identity);
        let key = key_of(site, id);
        if let Some(&slot) = inner.index.get(&key) {
            inner.identities.release(id);
            if let Site::Domain(d) = site {
                inner.domains.release(d);
            }
            return slot;
        }
        if inner.index.len() >= setup.config.shaping.max_destinations {
            self.evict_oldest(inner, setup.config.shaping.max_destinations);
        }
        let state = DestState::new(setup.params(site), now);
        let tier = state.tier;
        let slot = match inner.free.pop() {
            Some(s) => {
                inner.slots[s as usize] = Slot {
                    key,
                    state,
                    dirty: true,
                };
                s
            }
            None => {
                inner.slots.push(Slot {
                    key,
                    state,
                    dirty: true,
                });
                (inner.slots.len() - 1) as u32
            }
        };
        inner.index.insert(key, slot);
        Self::settle_bucket(setup, slot, tier);
        slot
    }

    fn apply_verdict(&self, setup: &Setup, verdict: Verdict, r: &ReportInput<'_>) -> Decision {
        let now = self.clock.secs();
        let unix_now = self.clock.unix_now();
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let site = self.resolve_site(setup, inner, r, &verdict);
        let params = setup.params(site);
        let mut decision = Decision {
            verdict,
            site,
            action: Action::Ok,
            retry_after: 0,
            tier: params.start_tier,
            rate: setup.tiers[params.start_tier as usize].rate,
            concurrency: setup.tiers[params.start_tier as usize].concurrency,
            stage: Stage::Trusted,
            suspended_until: None,
            suppressed: false,
            durable: false,
            defer_block: false,
        };
        let class = verdict.class;
        let outcome = match (class, verdict.permanent) {
            (Class::Delivered, _) => crate::metrics::Outcome::Delivered,
            (_, true) => crate::metrics::Outcome::Rejected,
            (_, false) => crate::metrics::Outcome::Deferred,
        };
        let label_index = match site {
            Site::Named(n) if (n as usize) < setup.labels.len() => n as usize,
            _ => 0,
        };
        setup.counters.count(label_index, class, outcome);

        // Recipient-level outcomes: the suppression list, not the destination.
        if let Some(rcpt) = r.recipient {
            let suppress = class.is_address_failure() && verdict.permanent
                || class == Class::MailboxFull
                    && inner.suppressions.note_full(
                        rcpt,
                        unix_now,
                        setup.mailbox_full.0,
                        setup.mailbox_full.1,
                    );
            if suppress {
                let entry = Suppression {
                    since: unix_now,
                    class,
                    reply: clip_reply(r.reply),
                };
                if inner.suppressions.add(rcpt, entry.clone()) {
                    self.journal(Change::Suppress(normalise_address(rcpt), entry));
                    crate::metrics::suppression_added();
                    decision.suppressed = true;
                    decision.durable = true;
                    tracing::info!(
                        target: "mxpace::suppression",
                        recipient = %normalise_address(rcpt),
                        class = class.as_str(),
                        reply = %clip_reply(r.reply),
                        "recipient suppressed"
                    );
                }
            }
        }

        // Network trouble belongs to the MX host's circuit breaker.
        let mut circuit_wait = None;
        if class == Class::NetworkError {
            if let Some(host) = r.mx_host {
                let id = match inner.mx_hosts.get(host) {
                    Some(id) => id,
                    None => inner.mx_hosts.acquire(host),
                };
                let c = inner.circuits.entry(id).or_default();
                c.failures += 1;
                let d = &setup.config.shaping.defaults;
                if c.failures >= d.circuit_failures {
                    let open = d.circuit_open_for.get().as_secs() as u32;
                    if c.open_until <= now {
                        tracing::warn!(target: "mxpace::circuit", mx_host = host, failures = c.failures, "MX host circuit opened");
                    }
                    c.open_until = now + open;
                    circuit_wait = Some(open);
                }
            }
        } else if let Some(host) = r.mx_host {
            if let Some(id) = inner.mx_hosts.get(host) {
                if let Some(c) = inner.circuits.get_mut(&id) {
                    c.failures = 0;
                    c.open_until = 0;
                }
            }
        }

        let effect = if site != Site::None {
            let (identity, is_domain) = self.identity_name(setup, r, &verdict);
            let slot = self.slot_for(setup, inner, site, identity, now);
            if is_domain {
                let list = inner.domain_dests.entry(site.key()).or_default();
                if !list.contains(&slot) && list.len() < MAX_DOMAIN_IDENTITIES {
                    list.push(slot);
                }
            }
            inner.slots[slot as usize].dirty = true;
            let st = &mut inner.slots[slot as usize].state;
            let effect = state::apply(st, class, verdict.permanent, &setup.tiers, params, now);
            decision.tier = st.tier;
            decision.stage = st.stage;
            if st.is_suspended(now) {
                decision.suspended_until = Some(self.clock.to_unix(st.suspended_until));
            }
            // Every block reply is deferred, not only those after the suspension: the
            // state machine already answers "retry" for the ones before it, and the
            // first blocks are the ones that would otherwise bounce.
            decision.defer_block = params.defer_blocks
                && verdict.permanent
                && matches!(class, Class::ReputationBlock | Class::SpamRejected);
            let st = st.clone();
            if let Some((_, to)) = effect.tier_changed {
                Self::settle_bucket(setup, slot, to);
            }
            if effect.suspended_for.is_some() {
                self.journal(Change::Dest(self.record(
                    setup,
                    inner,
                    &inner.slots[slot as usize],
                )));
            }
            let dest = inner.slots[slot as usize].key;
            self.log_effect(
                setup, inner, site, dest, identity, &effect, &st, r, &verdict,
            );
            Some(effect)
        } else {
            // Unattributed: classified and counted, but no destination to adapt.
            let mut scratch = DestState::new(params, now);
            Some(state::apply(
                &mut scratch,
                class,
                verdict.permanent,
                &setup.tiers,
                params,
                now,
            ))
        };
        if class != Class::Delivered {
            self.remember(setup, inner, site, r, class, unix_now);
        }

        let effect = effect.unwrap_or_default();
        if effect.suspended_for.is_some() {
            decision.durable = true;
        }
        let tier = &setup.tiers[decision.tier as usize];
        decision.rate = tier.rate;
        decision.concurrency = tier.concurrency;
        let retry = if decision.suppressed {
            None
        } else {
            effect.retry_after
        };
        let retry = match (retry, circuit_wait) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, _) => a,
        };
        decision.action = match (class, retry) {
            (Class::Delivered, _) => Action::Ok,
            (_, Some(_)) => Action::Retry,
            (_, None) => Action::Bounce,
        };
        decision.retry_after = retry
            .map(|s| self.jitter(s, setup.config.shaping.jitter))
            .unwrap_or(0);
        decision
    }

    #[allow(clippy::too_many_arguments)]
    fn log_effect(
        &self,
        setup: &Setup,
        inner: &mut Inner,
        site: Site,
        dest: u64,
        identity: &str,
        effect: &Effect,
        st: &DestState,
        r: &ReportInput<'_>,
        v: &Verdict,
    ) {
        if effect.stage_changed.is_none()
            && effect.suspended_for.is_none()
            && effect.tier_changed.is_none()
        {
            if v.class == Class::AuthFailure {
                let due = inner.auth_log.due(dest, self.clock.secs());
                if let Some(repeated) = due {
                    tracing::warn!(
                        target: "mxpace::auth",
                        site = %self.site_name(setup, inner, site),
                        blamed = v.blamed.as_str(),
                        identity,
                        repeated,
                        reply = %clip_reply(r.reply),
                        "authentication failure: fix {} for {}", v.blamed.as_str(), identity
                    );
                }
            }
            return;
        }
        let name = self.site_name(setup, inner, site);
        let counts = st
            .window
            .counts(self.clock.secs(), setup.params(site).window_half);
        if let Some((from, to)) = effect.stage_changed {
            crate::metrics::stage_change(setup.label(site), to.as_str());
            let rising = to > from;
            let level = if rising {
                tracing::Level::WARN
            } else {
                tracing::Level::INFO
            };
            if level == tracing::Level::WARN {
                tracing::warn!(target: "mxpace::stage", site = %name, identity, from = from.as_str(), to = to.as_str(),
                    delivered = counts[0], deferred = counts[1], throttled = counts[2], rejected = counts[3],
                    class = v.class.as_str(), reply = %clip_reply(r.reply), "destination stage rose");
            } else {
                tracing::info!(target: "mxpace::stage", site = %name, identity, from = from.as_str(), to = to.as_str(),
                    delivered = counts[0], deferred = counts[1], throttled = counts[2], rejected = counts[3],
                    "destination stage fell");
            }
        }
        if let Some(secs) = effect.suspended_for {
            crate::metrics::suspension(setup.label(site));
            tracing::warn!(target: "mxpace::suspension", site = %name, identity, seconds = secs,
                rejected = counts[3], class = v.class.as_str(), reply = %clip_reply(r.reply), "destination suspended");
        }
        if let Some((from, to)) = effect.tier_changed {
            tracing::info!(target: "mxpace::tier", site = %name, identity,
                from = %setup.tiers[from as usize].name, to = %setup.tiers[to as usize].name,
                rate = setup.tiers[to as usize].rate, class = v.class.as_str(), "destination tier changed");
        }
    }

    fn remember(
        &self,
        setup: &Setup,
        inner: &mut Inner,
        site: Site,
        r: &ReportInput<'_>,
        class: Class,
        at: u64,
    ) {
        let name = self.site_name(setup, inner, site);
        // Reuse the oldest entry's buffers once the ring is full.
        let mut entry = if inner.recent.len() >= RECENT_REPLIES {
            inner.recent.pop_front().unwrap()
        } else {
            RecentReply {
                at,
                site: String::new(),
                class,
                reply: String::new(),
            }
        };
        entry.at = at;
        entry.class = class;
        entry.site.clear();
        entry.site.push_str(&name);
        entry.reply.clear();
        let mut end = r.reply.len().min(200);
        while !r.reply.is_char_boundary(end) {
            end -= 1;
        }
        entry.reply.push_str(&r.reply[..end]);
        inner.recent.push_back(entry);
    }

    fn site_name(&self, setup: &Setup, inner: &Inner, site: Site) -> String {
        match site {
            Site::None => String::new(),
            Site::Named(n) => setup.sites.name(n).to_string(),
            Site::Domain(d) => inner.domains.name(d).to_string(),
        }
    }

    fn jitter(&self, secs: u32, jitter: f64) -> u32 {
        if secs == 0 || jitter <= 0.0 {
            return secs;
        }
        // A cheap per-call pseudo-random fraction; retries only need to be spread, not secret.
        let n = self.clock.elapsed().subsec_nanos() as u64;
        let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let frac = (x as f64 / (1u64 << 24) as f64) * jitter;
        secs + (secs as f64 * frac) as u32
    }

    /// Admission for Postfix's `transport_maps`: route the recipient through the tier
    /// transport that enforces its destination's limits, or hold it back.
    pub fn admit(&self, recipient: &str, pool: Option<&str>) -> Admission {
        match self.plan(recipient, pool, false) {
            Ok(plan) => self.admit_local(&plan, plan.tier),
            Err(decided) => decided,
        }
    }

    /// The part of admission that needs no token: which destination, whether it is
    /// suspended or over its warm-up volume, and otherwise the limits a token must be
    /// taken under. `Err` is an answer already; an `Ok` plan is settled with a token
    /// from the local limiters ([`Engine::admit_local`]) or from elsewhere (fleet mode:
    /// [`Engine::route`] or a paced hold).
    pub fn plan_admission(
        &self,
        recipient: &str,
        pool: Option<&str>,
    ) -> Result<AdmitPlan, Admission> {
        self.plan(recipient, pool, true)
    }

    /// `names`: fill in the site and identity names (they cost an allocation each,
    /// which the local path does not need).
    fn plan(
        &self,
        recipient: &str,
        pool: Option<&str>,
        names: bool,
    ) -> Result<AdmitPlan, Admission> {
        let Some(domain) = domain_of(recipient) else {
            return Err(Admission::Default);
        };
        let setup = self.setup.load();
        let now = self.clock.secs();
        let named = setup.sites.for_domain(domain, &setup.classifier);
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let site = match named {
            Some(n) => Site::Named(n),
            None => {
                let mut buf = [0u8; 256];
                if domain.len() > buf.len() {
                    return Err(Admission::Default);
                }
                for (o, i) in buf.iter_mut().zip(domain.as_bytes()) {
                    *o = i.to_ascii_lowercase();
                }
                let Ok(lower) = std::str::from_utf8(&buf[..domain.len()]) else {
                    return Err(Admission::Default);
                };
                let rolled = self.rolled_up(lower);
                match rolled {
                    Some(Ok(n)) => Site::Named(n),
                    Some(Err(group)) => match inner.domains.get(&group) {
                        Some(d) => Site::Domain(d),
                        None => return Err(Admission::Default),
                    },
                    None => match inner.domains.get(lower) {
                        Some(d) => Site::Domain(d),
                        None => return Err(Admission::Default),
                    },
                }
            }
        };
        let params = setup.params(site);
        let dedicated = matches!(site, Site::Named(n) if setup.sites.is_dedicated(n));
        let identity = pool.unwrap_or(setup.default_pool.as_str());
        let existing = inner
            .identities
            .get(identity)
            .and_then(|id| inner.index.get(&key_of(site, id)).copied());
        let slot = match existing {
            Some(s) => s,
            None => {
                // Shared sites are shaped only once they have state (from feedback).
                let blamed = inner
                    .domain_dests
                    .get(&site.key())
                    .is_some_and(|l| !l.is_empty());
                if !dedicated && !blamed {
                    return Err(Admission::Default);
                }
                if let Site::Domain(d) = site {
                    inner.domains.add_ref(d);
                }
                self.slot_for(&setup, inner, site, identity, now)
            }
        };
        // The governing state: the pool's own, tightened by any blamed sending domain.
        let (mut tier, mut until) = {
            let st = &mut inner.slots[slot as usize].state;
            if st.suspended_until != 0 && !st.is_suspended(now) {
                st.suspended_until = 0;
            }
            if let Some((_, to)) = state::quiet_increase(st, params, now) {
                Self::settle_bucket(&setup, slot, to);
            }
            (st.tier, st.suspended_until)
        };
        if let Some(list) = inner.domain_dests.get(&site.key()) {
            for &d in list {
                let s = &inner.slots[d as usize];
                if s.key == FREE {
                    continue;
                }
                tier = tier.min(s.state.tier);
                if s.state.is_suspended(now) {
                    until = until.max(s.state.suspended_until);
                }
            }
        }
        if until > now {
            return Err(Admission::Hold {
                retry_after: until - now,
                reason: Hold::Suspended {
                    until: self.clock.to_unix(until),
                },
            });
        }
        if !dedicated && tier >= params.start_tier {
            let st = &inner.slots[slot as usize].state;
            if st.stage == Stage::Trusted {
                return Err(Admission::Default);
            }
        }
        if let Some(limit) = self.warmup_limit(&setup) {
            let id = inner.identities.get(identity).unwrap_or(0);
            let day = self.clock.unix_now() / 86400;
            let e = inner.sent_today.entry(id).or_insert((day, 0));
            if e.0 != day {
                *e = (day, 0);
            }
            if e.1 >= limit {
                let until_midnight = 86400 - self.clock.unix_now() % 86400;
                return Err(Admission::Hold {
                    retry_after: until_midnight as u32,
                    reason: Hold::Warmup { limit },
                });
            }
            e.1 += 1;
        }
        let tier_spec = &setup.tiers[tier as usize];
        let (site_name, identity) = if names {
            (self.site_name(&setup, inner, site), identity.to_string())
        } else {
            (String::new(), String::new())
        };
        Ok(AdmitPlan {
            site: site_name,
            identity,
            tier,
            rate: tier_spec.rate,
            burst: tier_spec.burst.max(1),
            floor_tier: params.floor_tier.min(tier),
            key: inner.slots[slot as usize].key,
            slot,
            site_id: site,
        })
    }

    /// Settles a plan with a token from this instance's limiter of `tier` (the plan's
    /// own tier, or its floor when the fleet's shared limiter is out of reach).
    pub fn admit_local(&self, plan: &AdmitPlan, tier: u8) -> Admission {
        let setup = self.setup.load();
        let Some(limiter) = setup.limiters.get(tier as usize) else {
            return Admission::Default;
        };
        match limiter.check_key(&plan.slot) {
            Ok(()) => self.route_in(&setup, plan, tier),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.elapsed());
                Admission::Hold {
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u32,
                    reason: Hold::Paced {
                        rate: setup.tiers[tier as usize].rate,
                    },
                }
            }
        }
    }

    /// Settles a plan whose token was granted elsewhere (the fleet's shared limiter).
    pub fn route(&self, plan: &AdmitPlan) -> Admission {
        let setup = self.setup.load();
        self.route_in(&setup, plan, plan.tier)
    }

    fn route_in(&self, setup: &Setup, plan: &AdmitPlan, tier: u8) -> Admission {
        let tier = tier.min(setup.tiers.len().saturating_sub(1) as u8);
        let now = self.clock.secs();
        let mut inner = self.inner.lock().unwrap();
        // The slot may have been evicted and reused since the plan: then no lane to turn.
        let lane = match inner.slots.get_mut(plan.slot as usize) {
            Some(s) if s.key == plan.key => {
                s.state.last_seen = now;
                let lane = s.state.lane;
                s.state.lane = s.state.lane.wrapping_add(1);
                lane
            }
            _ => 0,
        };
        let (transport, nexthop) = setup.transport(plan.site_id, tier, lane);
        Admission::Route {
            transport: transport.clone(),
            nexthop: nexthop.clone(),
        }
    }

    fn warmup_limit(&self, setup: &Setup) -> Option<u64> {
        let w = &setup.config.warmup;
        if !w.enabled {
            return None;
        }
        let start = parse_date(&w.start_date)?;
        let today = (self.clock.unix_now() / 86400) as i64;
        Some(warmup_quota(
            &w.schedule,
            w.double_every_days,
            w.target_per_day,
            today - start + 1,
        ))
    }

    /// `smtpd_access_policy`: suppressed recipients and suspended destinations.
    pub fn policy(&self, recipient: &str, enforce_suppression: bool) -> PolicyVerdict {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let inner = self.inner.lock().unwrap();
        if enforce_suppression {
            if let Some(s) = inner.suppressions.get(recipient) {
                return PolicyVerdict::Suppressed(s.clone());
            }
        }
        let Some(domain) = domain_of(recipient) else {
            return PolicyVerdict::Dunno;
        };
        let site = match setup.sites.for_domain(domain, &setup.classifier) {
            Some(n) => Site::Named(n),
            None => {
                // Lowercased on the stack: this runs for every RCPT of every message.
                let mut buf = [0u8; 256];
                if domain.len() > buf.len() {
                    return PolicyVerdict::Dunno;
                }
                for (o, i) in buf.iter_mut().zip(domain.as_bytes()) {
                    *o = i.to_ascii_lowercase();
                }
                let Ok(lower) = std::str::from_utf8(&buf[..domain.len()]) else {
                    return PolicyVerdict::Dunno;
                };
                let key = match self.rolled_up(lower) {
                    Some(Ok(n)) => Some(Site::Named(n)),
                    Some(Err(group)) => inner.domains.get(&group).map(Site::Domain),
                    None => inner.domains.get(lower).map(Site::Domain),
                };
                match key {
                    Some(s) => s,
                    None => return PolicyVerdict::Dunno,
                }
            }
        };
        let sk = site.key() as u64;
        let mut until = 0;
        let mut note = |slot: u32| {
            let st = &inner.slots[slot as usize].state;
            if st.is_suspended(now) {
                until = until.max(st.suspended_until);
            }
        };
        // The index is keyed by (site, identity) and there are few identities (pools,
        // IPs, blamed domains) but up to a million destinations: look up the site's key
        // for each identity instead of scanning every destination on every request.
        if inner.identities.len() < inner.index.len() / 4 {
            for id in inner.identities.ids() {
                if let Some(&slot) = inner.index.get(&key_of(site, id)) {
                    note(slot);
                }
            }
        } else {
            for (_, &slot) in inner.index.iter().filter(|(k, _)| *k >> 32 == sk) {
                note(slot);
            }
        }
        if until > now {
            PolicyVerdict::Suspended {
                site: self.site_name(&setup, &inner, site),
                until: self.clock.to_unix(until),
            }
        } else {
            PolicyVerdict::Dunno
        }
    }

    fn view(&self, setup: &Setup, inner: &Inner, slot: &Slot, now: u32) -> DestinationView {
        let site = Site::from_key((slot.key >> 32) as u32);
        let st = &slot.state;
        let tier = &setup.tiers[(st.tier as usize).min(setup.tiers.len() - 1)];
        DestinationView {
            site: self.site_name(setup, inner, site),
            identity: inner.identities.name(slot.key as u32).to_string(),
            tier: tier.name.clone(),
            rate: tier.rate,
            concurrency: tier.concurrency,
            stage: if st.is_suspended(now) {
                Stage::Rejecting
            } else {
                st.stage
            },
            suspended_until: st
                .is_suspended(now)
                .then(|| self.clock.to_unix(st.suspended_until)),
            ceiling_rate: st
                .ceiling()
                .and_then(|c| setup.tiers.get(c as usize))
                .map(|t| t.rate),
            deferrals: st.deferrals as u32,
            counts: st.counts(now, setup.params(site)),
            last_seen: self.clock.to_unix(st.last_seen),
        }
    }

    /// Every tracked destination (for `ctl status` and metrics), most troubled first.
    pub fn destinations(&self) -> Vec<DestinationView> {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let inner = self.inner.lock().unwrap();
        let mut out: Vec<_> = inner
            .slots
            .iter()
            .filter(|s| s.key != FREE)
            .map(|s| self.view(&setup, &inner, s, now))
            .collect();
        out.sort_by(|a, b| {
            b.stage
                .cmp(&a.stage)
                .then(a.site.cmp(&b.site))
                .then(a.identity.cmp(&b.identity))
        });
        out
    }

    /// Destinations of the site that owns `name` (a site name or a recipient domain/address).
    pub fn query(&self, name: &str) -> Vec<DestinationView> {
        let setup = self.setup.load();
        let inner = self.inner.lock().unwrap();
        let Some(site) = self.site_by_name(&setup, &inner, name) else {
            return Vec::new();
        };
        let now = self.clock.secs();
        let sk = site.key() as u64;
        inner
            .slots
            .iter()
            .filter(|s| s.key != FREE && s.key >> 32 == sk)
            .map(|s| self.view(&setup, &inner, s, now))
            .collect()
    }

    fn site_by_name(&self, setup: &Setup, inner: &Inner, name: &str) -> Option<Site> {
        let name = domain_of(name).unwrap_or(name);
        if let Some(n) = setup.sites.named(name) {
            return Some(Site::Named(n));
        }
        if let Some(n) = setup.sites.for_domain(name, &setup.classifier) {
            return Some(Site::Named(n));
        }
        inner
            .domains
            .get(&name.to_ascii_lowercase())
            .map(Site::Domain)
    }

    /// Start values of a site that has no state yet (for `destination_query`).
    pub fn site_defaults(&self, name: &str) -> (String, f64, u32) {
        let setup = self.setup.load();
        let inner = self.inner.lock().unwrap();
        let site = self
            .site_by_name(&setup, &inner, name)
            .unwrap_or(Site::None);
        let p = setup.params(site);
        let t = &setup.tiers[p.start_tier as usize];
        (t.name.clone(), t.rate, t.concurrency)
    }

    /// Operator: suspend a site (every identity) for `secs`. Returns the site's name.
    pub fn suspend(&self, name: &str, secs: u32) -> Result<String, String> {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let site = match self.site_by_name(&setup, inner, name) {
            Some(Site::Domain(d)) => {
                inner.domains.add_ref(d);
                Site::Domain(d)
            }
            Some(s) => s,
            None if name.contains('.') => {
                let lower = domain_of(name).unwrap_or(name).to_ascii_lowercase();
                Site::Domain(inner.domains.acquire(&lower))
            }
            None => return Err(format!("unknown site {name:?}")),
        };
        let pool = setup.default_pool.clone();
        self.slot_for(&setup, inner, site, &pool, now);
        let sk = site.key() as u64;
        let floor = setup.params(site).floor_tier;
        for slot in inner
            .slots
            .iter_mut()
            .filter(|s| s.key != FREE && s.key >> 32 == sk)
        {
            slot.state.suspended_until = now + secs;
            slot.state.tier = floor;
            slot.state.stage = Stage::Rejecting;
        }
        // A promise to the operator: durable (and shared with the fleet) before answered.
        self.journal_site(&setup, inner, sk);
        let name = self.site_name(&setup, inner, site);
        tracing::warn!(target: "mxpace::suspension", site = %name, seconds = secs, "destination suspended by operator");
        Ok(name)
    }

    /// Operator: lift a site's suspension; it resumes at its floor tier.
    pub fn resume(&self, name: &str) -> Result<String, String> {
        let setup = self.setup.load();
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let site = self
            .site_by_name(&setup, inner, name)
            .ok_or_else(|| format!("unknown site {name:?}"))?;
        let sk = site.key() as u64;
        let mut n = 0;
        for slot in inner
            .slots
            .iter_mut()
            .filter(|s| s.key != FREE && s.key >> 32 == sk)
        {
            if slot.state.suspended_until != 0 {
                n += 1;
            }
            slot.state.suspended_until = 0;
            slot.state.stage = Stage::Throttled;
        }
        self.journal_site(&setup, inner, sk);
        let name = self.site_name(&setup, inner, site);
        tracing::info!(target: "mxpace::suspension", site = %name, destinations = n, "destination resumed by operator");
        Ok(name)
    }

    pub fn suppression(&self, addr: &str) -> Option<Suppression> {
        self.inner.lock().unwrap().suppressions.get(addr).cloned()
    }

    pub fn suppress(&self, addr: &str, entry: Suppression) -> bool {
        let added = self
            .inner
            .lock()
            .unwrap()
            .suppressions
            .add(addr, entry.clone());
        if added {
            self.journal(Change::Suppress(normalise_address(addr), entry));
        }
        added
    }

    pub fn unsuppress(&self, addr: &str) -> Option<Suppression> {
        let r = self.inner.lock().unwrap().suppressions.remove(addr);
        if r.is_some() {
            self.journal(Change::Unsuppress(normalise_address(addr)));
            tracing::info!(target: "mxpace::suppression", recipient = %normalise_address(addr), "recipient unsuppressed by operator");
        }
        r
    }

    pub fn suppressions(&self) -> Vec<(String, Suppression)> {
        let inner = self.inner.lock().unwrap();
        let mut v: Vec<_> = inner
            .suppressions
            .iter()
            .map(|(k, s)| (k.to_string(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn recent_replies(&self) -> Vec<RecentReply> {
        self.inner.lock().unwrap().recent.iter().cloned().collect()
    }

    pub fn stats(&self) -> EngineStats {
        let inner = self.inner.lock().unwrap();
        EngineStats {
            destinations: inner.index.len(),
            suppressions: inner.suppressions.len(),
            evictions: inner.evictions,
            domains: inner.domains.len(),
            identities: inner.identities.len(),
        }
    }

    /// Enables the MX rollup of unlisted domains through this cache.
    pub fn attach_mx(&self, cache: Arc<super::mx::MxCache>) {
        let _ = self.mx.set(cache);
    }

    /// The site an unlisted (lowercased) domain rolls up to, when its MX is known:
    /// `Ok(named)`, `Err(group key)`; `None` when unknown or the domain is its own site.
    fn rolled_up(&self, domain: &str) -> Option<Result<u16, Box<str>>> {
        let mx = self.mx.get()?;
        match mx.lookup(domain, self.clock.unix_now())? {
            super::mx::MxTarget::Provider(n) => Some(Ok(n)),
            super::mx::MxTarget::Group(key) => Some(Err(key)),
            super::mx::MxTarget::Itself => None,
        }
    }

    /// Attaches the store's writer; durable changes are sent there from now on.
    pub fn attach_journal(&self, tx: std::sync::mpsc::Sender<Change>) {
        let _ = self.journal.set(tx);
    }

    fn journal(&self, change: Change) {
        if let Some(tx) = self.journal.get() {
            let _ = tx.send(change);
        }
    }

    fn journal_site(&self, setup: &Setup, inner: &Inner, site_key: u64) {
        for slot in inner
            .slots
            .iter()
            .filter(|s| s.key != FREE && s.key >> 32 == site_key)
        {
            self.journal(Change::Dest(self.record(setup, inner, slot)));
        }
    }

    fn record(&self, setup: &Setup, inner: &Inner, slot: &Slot) -> DestRecord {
        let site = Site::from_key((slot.key >> 32) as u32);
        let st = &slot.state;
        let tier_name = |t: u8| setup.tiers.get(t as usize).map(|t| t.name.clone());
        DestRecord {
            site: self.site_name(setup, inner, site),
            identity: inner.identities.name(slot.key as u32).to_string(),
            tier: tier_name(st.tier).unwrap_or_default(),
            ceiling: st.ceiling().and_then(tier_name),
            stage: st.stage as u8,
            suspensions: st.suspensions,
            streak: st.streak,
            deferrals: st.deferrals,
            suspended_until: if st.suspended_until != 0 {
                self.clock.to_unix(st.suspended_until)
            } else {
                0
            },
            last_seen: self.clock.to_unix(st.last_seen),
            counts: st.counts(self.clock.secs(), setup.params(site)),
        }
    }

    /// Destinations changed since the last call (for the periodic flush).
    pub fn take_dirty(&self) -> Vec<DestRecord> {
        let setup = self.setup.load();
        let mut inner = self.inner.lock().unwrap();
        let dirty: Vec<usize> = inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dirty && s.key != FREE)
            .map(|(i, _)| i)
            .collect();
        let mut out = Vec::with_capacity(dirty.len());
        for i in dirty {
            out.push(self.record(&setup, &inner, &inner.slots[i]));
            inner.slots[i].dirty = false;
        }
        out
    }

    /// Every tracked destination as a record (to seed a shared store).
    pub fn records(&self) -> Vec<DestRecord> {
        let setup = self.setup.load();
        let inner = self.inner.lock().unwrap();
        inner
            .slots
            .iter()
            .filter(|s| s.key != FREE)
            .map(|s| self.record(&setup, &inner, s))
            .collect()
    }

    /// Applies changes made by other instances of the fleet. Destinations unknown here
    /// are created (idle ones skipped, as at restore); nothing is journaled. Returns the
    /// number of changes that touched state.
    pub fn apply_shared(&self, changes: Vec<Shared>) -> usize {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let unix_now = self.clock.unix_now();
        let idle = setup.config.shaping.idle_after.get().as_secs();
        let mut applied = 0;
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        for change in changes {
            let (r, how) = match change {
                Shared::Suppress(addr, s) => {
                    applied += inner.suppressions.add(&addr, s) as usize;
                    continue;
                }
                Shared::Unsuppress(addr) => {
                    applied += inner.suppressions.remove(&addr).is_some() as usize;
                    continue;
                }
                Shared::Adaptive(r) => (r, 0),
                Shared::Suspend(r) => (r, 1),
                Shared::Resume(r) => (r, 2),
            };
            let suspends = how == 1 && r.suspended_until > unix_now;
            if !suspends && how != 2 && unix_now.saturating_sub(r.last_seen) > idle {
                continue;
            }
            let site = match setup.sites.named(&r.site) {
                Some(n) => Site::Named(n),
                None if r.site.is_empty() => continue,
                None => Site::Domain(inner.domains.acquire(&r.site.to_ascii_lowercase())),
            };
            let slot = self.slot_for(&setup, inner, site, &r.identity, now);
            let tier_of = |n: &str| {
                setup
                    .tiers
                    .iter()
                    .position(|t| t.name == n)
                    .map(|i| i as u8)
            };
            let st = &mut inner.slots[slot as usize].state;
            let old_tier = st.tier;
            st.tier = tier_of(&r.tier).unwrap_or(st.tier);
            st.stage = Stage::from_u8(r.stage);
            match how {
                0 => {
                    let ceiling = r.ceiling.as_deref().and_then(tier_of).unwrap_or(u8::MAX);
                    if ceiling != st.ceiling {
                        st.ceiling = ceiling;
                        st.ceiling_at = now;
                    }
                }
                1 => {
                    if suspends {
                        let until = self.clock.from_unix(r.suspended_until).max(1);
                        st.suspended_until = st.suspended_until.max(until);
                    }
                    st.suspensions = st.suspensions.max(r.suspensions);
                }
                _ => st.suspended_until = 0,
            }
            if st.tier != old_tier {
                let tier = st.tier;
                Self::settle_bucket(&setup, slot, tier);
            }
            applied += 1;
        }
        applied
    }

    /// Restores persisted destinations and suppressions (at start, before serving).
    pub fn restore(
        &self,
        dests: Vec<DestRecord>,
        suppressions: Vec<(String, Suppression)>,
    ) -> usize {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let unix_now = self.clock.unix_now();
        let idle = setup.config.shaping.idle_after.get().as_secs();
        let mut restored = 0;
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        for (addr, s) in suppressions {
            inner.suppressions.add(&addr, s);
        }
        for r in dests {
            let still_suspended = r.suspended_until > unix_now;
            if !still_suspended && unix_now.saturating_sub(r.last_seen) > idle {
                continue;
            }
            let site = match setup.sites.named(&r.site) {
                Some(n) => Site::Named(n),
                None if r.site.is_empty() => continue,
                None => Site::Domain(inner.domains.acquire(&r.site.to_ascii_lowercase())),
            };
            let slot = self.slot_for(&setup, inner, site, &r.identity, now);
            let params = setup.params(site);
            let st = &mut inner.slots[slot as usize].state;
            let tier = |n: &str| {
                setup
                    .tiers
                    .iter()
                    .position(|t| t.name == n)
                    .map(|i| i as u8)
            };
            st.tier = tier(&r.tier).unwrap_or(params.start_tier);
            st.ceiling = r.ceiling.as_deref().and_then(tier).unwrap_or(u8::MAX);
            st.ceiling_at = now;
            st.stage = Stage::from_u8(r.stage);
            st.suspensions = r.suspensions;
            st.streak = r.streak;
            st.deferrals = r.deferrals;
            st.suspended_until = if still_suspended {
                self.clock.from_unix(r.suspended_until).max(1)
            } else {
                0
            };
            st.last_seen = now;
            st.window.restore(r.counts, now, params.window_half);
            inner.slots[slot as usize].dirty = false;
            restored += 1;
        }
        restored
    }

    /// Periodic upkeep: evict idle destinations, let limiters forget idle keys.
    pub fn housekeeping(&self) {
        let setup = self.setup.load();
        let now = self.clock.secs();
        let idle = setup.config.shaping.idle_after.get().as_secs() as u32;
        {
            let mut inner = self.inner.lock().unwrap();
            let victims: Vec<u32> = inner
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.key != FREE
                        && now.saturating_sub(s.state.last_seen) >= idle
                        && !s.state.is_suspended(now)
                })
                .map(|(i, _)| i as u32)
                .collect();
            for v in victims {
                Self::evict(&mut inner, v);
            }
            inner
                .circuits
                .retain(|_, c| c.open_until > now || c.failures > 0);
            if inner.slots.len() > 1024 && inner.free.len() > inner.slots.len() / 2 {
                inner.index.shrink_to_fit();
                inner.domains.shrink_to_fit();
            }
        }
        for l in &setup.limiters {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    fn evict(inner: &mut Inner, slot: u32) {
        let key = inner.slots[slot as usize].key;
        if key == FREE {
            return;
        }
        inner.index.remove(&key);
        inner.slots[slot as usize].key = FREE;
        inner.free.push(slot);
        inner.identities.release(key as u32);
        if let Site::Domain(d) = Site::from_key((key >> 32) as u32) {
            inner.domains.release(d);
        }
        let sk = (key >> 32) as u32;
        if let Some(list) = inner.domain_dests.get_mut(&sk) {
            list.retain(|&s| s != slot);
            if list.is_empty() {
                inner.domain_dests.remove(&sk);
            }
        }
        inner.evictions += 1;
    }

    /// At capacity: evict the least recently seen sixteenth, sparing suspended destinations.
    fn evict_oldest(&self, inner: &mut Inner, max: usize) {
        let now = self.clock.secs();
        let mut ages: Vec<(u32, u32)> = inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key != FREE && !s.state.is_suspended(now))
            .map(|(i, s)| (s.state.last_seen, i as u32))
            .collect();
        let n = (max / 16).max(1).min(ages.len());
        if n == 0 {
            return;
        }
        ages.select_nth_unstable(n - 1);
        for &(_, slot) in &ages[..n] {
            Self::evict(inner, slot);
        }
        tracing::debug!(evicted = n, "destination table at capacity");
    }
}

/// Daily volume for day `day` (1-based) of a warm-up schedule.
pub fn warmup_quota(schedule: &[[u64; 2]], double_every: u64, target: u64, day: i64) -> u64 {
    if day < 1 {
        return schedule.first().map(|s| s[1]).unwrap_or(target).min(target);
    }
    let day = day as u64;
    let mut quota = target;
    let mut last = None;
    for step in schedule {
        if day >= step[0] {
            quota = step[1];
            last = Some(step[0]);
        }
    }
    let Some(last_day) = last else {
        return schedule.first().map(|s| s[1]).unwrap_or(target).min(target);
    };
    let is_last_step = schedule.last().map(|s| s[0]) == Some(last_day);
    if is_last_step && double_every > 0 {
        let span = schedule
            .windows(2)
            .last()
            .map(|w| w[1][0] - w[0][0])
            .unwrap_or(double_every);
        let extra = day.saturating_sub(last_day + span - 1);
        let doublings = extra.div_ceil(double_every).min(40);
        quota = quota.saturating_mul(1u64 << doublings);
    }
    quota.min(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(toml: &str) -> Engine {
        let config = Arc::new(Config::from_toml(toml, "test").unwrap());
        Engine::new(
            config,
            Arc::new(Classifier::builtin()),
            EngineClock::fake(1_700_000_000),
        )
    }

    #[test]
    fn warmup_schedule_is_the_classic_table() {
        let s = [[1, 200], [3, 500], [5, 1000], [7, 2000]];
        let q: Vec<u64> = (1..=14).map(|d| warmup_quota(&s, 2, 100_000, d)).collect();
        assert_eq!(
            q,
            [200, 200, 500, 500, 1000, 1000, 2000, 2000, 4000, 4000, 8000, 8000, 16000, 16000]
        );
        assert_eq!(warmup_quota(&s, 2, 5000, 40), 5000, "capped at the target");
    }

    #[test]
    fn domain_in_gmail_text() {
        assert_eq!(
            domain_in_text("originating from your SPF domain [bounces.example.com]. To protect"),
            Some("bounces.example.com")
        );
        assert_eq!(domain_in_text("The mail server [203.0.113.7] has"), None);
    }

    #[test]
    fn dedicated_site_is_paced_by_its_tier() {
        let e = engine(
            "[providers.gmail]\ndomains = [\"gmail.test\"]\nnexthop = \"[127.0.0.2]:2525\"\nstart_tier = \"t1\"\n",
        );
        let a = e.admit("u1@gmail.test", None);
        match a {
            Admission::Route { transport, nexthop } => {
                assert_eq!(&*transport, "mxp_gmail_t1_0");
                assert_eq!(&*nexthop, "[127.0.0.2]:2525");
            }
            other => panic!("{other:?}"),
        }
        // t1 admits 1/s with burst 1: the next one waits.
        assert!(matches!(
            e.admit("u2@gmail.test", None),
            Admission::Hold {
                reason: Hold::Paced { .. },
                ..
            }
        ));
        e.clock().advance(Duration::from_millis(1000));
        assert!(matches!(
            e.admit("u3@gmail.test", None),
            Admission::Route { .. }
        ));
        // Unlisted domains without feedback are not shaped.
        assert_eq!(e.admit("x@example.org", None), Admission::Default);
        assert_eq!(e.admit("*", None), Admission::Default);
    }

    #[test]
    fn suspension_holds_and_resume_releases() {
        let e = engine("[providers.gmail]\ndomains = [\"gmail.test\"]\n");
        assert_eq!(e.suspend("gmail", 600).unwrap(), "gmail");
        match e.admit("a@gmail.test", None) {
            Admission::Hold {
                reason: Hold::Suspended { .. },
                retry_after,
            } => assert_eq!(retry_after, 600),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            e.policy("a@gmail.test", true),
            PolicyVerdict::Suspended { .. }
        ));
        e.resume("gmail").unwrap();
        assert!(matches!(
            e.admit("a@gmail.test", None),
            Admission::Route { .. }
        ));
        assert_eq!(e.policy("a@gmail.test", true), PolicyVerdict::Dunno);
    }

    #[test]
    fn warmup_caps_the_daily_volume_per_source() {
        // Day 1 of the schedule: 200 messages a day, whatever the tier allows.
        let today = crate::config::format_date(
            (EngineClock::fake(1_700_000_000).unix_now() / 86400) as i64,
        );
        let e = engine(&format!(
            "[warmup]\nenabled = true\nstart_date = \"{today}\"\n[providers.gmail]\ndomains = [\"gmail.test\"]\nstart_tier = \"t9\"\n"
        ));
        let mut routed = 0;
        for i in 0..400 {
            e.clock().advance(Duration::from_millis(20));
            match e.admit(&format!("u{i}@gmail.test"), None) {
                Admission::Route { .. } => routed += 1,
                Admission::Hold {
                    reason: Hold::Warmup { limit },
                    ..
                } => assert_eq!(limit, 200),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(routed, 200);
    }

    #[test]
    fn policy_finds_a_suspended_site_among_many_destinations() {
        // One sending IP (few identities: looked up per identity) and one IP per
        // destination (as many identities as destinations: scanned).
        for ips in [1, 40] {
            let e = engine("");
            for i in 0..40 {
                let rcpt = format!("u@d{i}.example");
                let ip = format!("192.0.2.{}", i % ips);
                e.report(&ReportInput {
                    reply: "250 2.0.0 OK",
                    recipient: Some(&rcpt),
                    source_ip: Some(&ip),
                    ..Default::default()
                });
            }
            e.suspend("d7.example", 600).unwrap();
            assert!(
                matches!(
                    e.policy("x@D7.example", true),
                    PolicyVerdict::Suspended { ref site, .. } if site == "d7.example"
                ),
                "{ips} IPs"
            );
            assert_eq!(
                e.policy("x@d8.example", true),
                PolicyVerdict::Dunno,
                "{ips} IPs"
            );
            assert_eq!(
                e.policy("x@d99.example", true),
                PolicyVerdict::Dunno,
                "{ips} IPs"
            );
            e.resume("d7.example").unwrap();
            assert_eq!(
                e.policy("x@d7.example", true),
                PolicyVerdict::Dunno,
                "{ips} IPs"
            );
        }
    }

    #[test]
    fn defer_blocks_covers_the_blocks_before_the_suspension() {
        const BLOCK: &str = "host 127.0.0.2[127.0.0.2] said: 550-5.7.1 Our system has detected an unusual rate of unsolicited mail 550 5.7.1 sent from your IP address has been blocked. - gsmtp (in reply to RCPT TO command)";
        let report = |e: &Engine| {
            e.report(&ReportInput {
                reply: BLOCK,
                status: Some("5.7.1"),
                recipient: Some("a@gmail.test"),
                site_hint: Some("gmail"),
                ..Default::default()
            })
        };
        for (defer_blocks, want) in [
            (true, (true, Action::Retry)),
            (false, (false, Action::Bounce)),
        ] {
            let e = engine(&format!(
                "[providers.gmail]\ndomains = [\"gmail.test\"]\nsuspend_after = 3\ndefer_blocks = {defer_blocks}\n"
            ));
            // The first block: not yet suspended.
            let d = report(&e);
            assert_eq!(d.suspended_until, None);
            assert_eq!(
                (d.defer_block, d.action),
                want,
                "defer_blocks = {defer_blocks}"
            );
            report(&e);
            // The third suspends; its reply is deferred only with the safety net.
            let d = report(&e);
            assert!(d.suspended_until.is_some());
            assert_eq!(d.defer_block, defer_blocks);
        }
    }

    #[test]
    fn shared_changes_never_shorten_a_suspension_unless_resumed() {
        let e = engine("[providers.gmail]\ndomains = [\"gmail.test\"]\n");
        let now = e.clock().unix_now();
        let rec = |until: u64, tier: &str| DestRecord {
            site: "gmail".into(),
            identity: "default".into(),
            tier: tier.into(),
            ceiling: None,
            stage: Stage::Rejecting as u8,
            suspensions: 1,
            streak: 0,
            deferrals: 0,
            suspended_until: until,
            last_seen: now,
            counts: [0; 4],
        };
        let suspended = |e: &Engine| {
            matches!(
                e.policy("a@gmail.test", true),
                PolicyVerdict::Suspended { .. }
            )
        };
        // (change, suspended afterwards)
        let steps: Vec<(Shared, bool)> = vec![
            (Shared::Suspend(rec(now + 600, "t1")), true),
            (Shared::Suspend(rec(now + 10, "t1")), true),
            (Shared::Adaptive(rec(0, "t3")), true),
            (Shared::Resume(rec(0, "t1")), false),
            (Shared::Suspend(rec(now.saturating_sub(5), "t1")), false),
        ];
        for (i, (change, want)) in steps.into_iter().enumerate() {
            assert_eq!(e.apply_shared(vec![change]), 1, "step {i}");
            assert_eq!(suspended(&e), want, "step {i}");
        }
        e.clock().advance(Duration::from_secs(11));
        assert_eq!(
            e.apply_shared(vec![Shared::Suspend(rec(now + 600, "t1"))]),
            1
        );
        assert!(suspended(&e), "the later end wins");
        let s = Suppression {
            since: now,
            class: Class::RecipientUnknown,
            reply: "550 5.1.1".into(),
        };
        assert_eq!(
            e.apply_shared(vec![Shared::Suppress("X@Example.org".into(), s)]),
            1
        );
        assert!(e.suppression("x@example.org").is_some());
        assert_eq!(
            e.apply_shared(vec![Shared::Unsuppress("x@example.org".into())]),
            1
        );
        assert!(e.suppression("x@example.org").is_none());
    }

    #[test]
    fn eviction_bounds_destinations() {
        let e = engine("[shaping]\nmax_destinations = 64\n");
        for i in 0..1000 {
            let rcpt = format!("u@d{i}.example");
            e.report(&ReportInput {
                reply: "250 2.0.0 OK",
                recipient: Some(&rcpt),
                ..Default::default()
            });
        }
        let s = e.stats();
        assert!(s.destinations <= 64, "{s:?}");
        assert!(s.domains <= 64, "interned domains are released: {s:?}");
        assert!(s.evictions >= 900);
    }
}
