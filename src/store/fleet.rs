//! Fleet mode: instances beside several MTA hosts share one Redis — each destination's
//! rate, suspensions, suppressions and stages.
//!
//! # The rate
//! A transport lookup that needs a token costs one round trip: `EVALSHA` of a GCRA
//! script keyed by site, identity and tier (emission interval from the tier's rate,
//! burst from its burst), timed by Redis's own clock so instances need no clock
//! agreement. The round trip is bounded by `redis_timeout`. An error or a timeout
//! starts an *outage*: this instance takes its decisions from its local limiter at the
//! destination's floor tier (logged once, counted in `mxpace_fleet_fallbacks_total`)
//! until the sync task sees Redis answer again and rejoins.
//!
//! # Shared state
//! The engine's journal (suppressions, suspensions, resumes) is written through by one
//! sync task: a hash per kind (`sup`, `dest`, `susp`) holds the current state for
//! instances that join later, and an entry on the `events` stream tells the running
//! ones. A request whose answer promises state awaits [`Fleet::sync`], which resolves
//! once the write is done or after `redis_timeout` (during an outage changes queue
//! here and are written on rejoin). Stage and tier changes go out every
//! `flush_interval`, only when they changed. Every [`POLL_EVERY`] the task reads the
//! stream from where it left off, so a change on one instance reaches the others
//! within that plus a round trip.
//!
//! # Restarts of Redis
//! `epoch` is a random token set when absent. A changed epoch means Redis lost its
//! data (a restart without persistence) or is another server: the instance then seeds
//! it with its own suppressions and destinations before reading everything back.

use crate::classify::Class;
use crate::config::Config;
use crate::metrics;
use crate::shaping::engine::{Change, DestRecord};
use crate::shaping::suppress::Suppression;
use crate::shaping::{Admission, AdmitPlan, Engine, Hold, Shared};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::streams::StreamReadReply;
use ::redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};

/// How often the stream of other instances' changes is read (and Redis probed during
/// an outage).
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// Events kept on the stream; an instance that falls further behind reads the hashes.
const STREAM_LEN: usize = 100_000;
/// Changes queued during an outage; past it the oldest are dropped (and counted).
const MAX_PENDING: usize = 200_000;
/// Events per pipelined write.
const BATCH: usize = 256;
/// Destinations whose last shared (tier, ceiling, stage) is remembered to skip echoes.
const MAX_REMEMBERED: usize = 200_000;
/// An outage lasts at least this long, so a Redis that answers only now and then
/// does not flip every decision between shared and local (nor flood the log).
const MIN_OUTAGE: Duration = Duration::from_secs(1);
/// How long a start waits for the first join before serving on local limits.
const JOIN_WAIT: Duration = Duration::from_secs(2);
/// Rate keys outlive their last use by this long, so a destination idle for less keeps
/// its refilled burst, as a local limiter would.
const RATE_KEY_SLACK_MS: u64 = 60_000;

const PREFIX: &str = "mxpace:";

/// GCRA with Redis's clock. KEYS[1] = rate key; ARGV[1] = emission interval (µs);
/// ARGV[2] = burst. Returns `{1, 0}` for a token, `{0, µs until the next one}`.
/// A missing key starts *settled* — one token, then the steady rate — so a new or
/// changed tier never opens with a full burst (the burst a provider answers with 421s).
/// TAT is written with `%d`: Lua's default number formatting would round µs away.
pub const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat
if stored then
  tat = tonumber(stored)
  if tat < now then tat = now end
else
  tat = now + interval * (burst - 1)
end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX',
  math.floor((new_tat - now) / 1000) + tonumber(ARGV[3]))
return {1, 0}
"#;

/// One shared change, as it travels on the stream and sits in the hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Event {
    Suppress {
        address: String,
        since: u64,
        class: String,
        reply: String,
    },
    Unsuppress {
        address: String,
    },
    Adaptive {
        dest: DestRecord,
    },
    Suspend {
        dest: DestRecord,
    },
    Resume {
        dest: DestRecord,
    },
}

impl Event {
    fn suppress(address: String, s: &Suppression) -> Event {
        Event::Suppress {
            address,
            since: s.since,
            class: s.class.as_str().to_string(),
            reply: s.reply.clone(),
        }
    }

    /// A journaled destination is a suspension, or a resume when it carries none.
    fn from_change(change: Change, unix_now: u64) -> Event {
        match change {
            Change::Suppress(a, s) => Event::suppress(a, &s),
            Change::Unsuppress(address) => Event::Unsuppress { address },
            Change::Dest(dest) if dest.suspended_until > unix_now => Event::Suspend { dest },
            Change::Dest(dest) => Event::Resume { dest },
        }
    }

    fn into_shared(self) -> Shared {
        match self {
            Event::Suppress {
                address,
                since,
                class,
                reply,
            } => Shared::Suppress(
                address,
                Suppression {
                    since,
                    class: Class::parse(&class).unwrap_or(Class::Unknown),
                    reply,
                },
            ),
            Event::Unsuppress { address } => Shared::Unsuppress(address),
            Event::Adaptive { dest } => Shared::Adaptive(dest),
            Event::Suspend { dest } => Shared::Suspend(dest),
            Event::Resume { dest } => Shared::Resume(dest),
        }
    }

    fn dest(&self) -> Option<&DestRecord> {
        match self {
            Event::Adaptive { dest } | Event::Suspend { dest } | Event::Resume { dest } => {
                Some(dest)
            }
            _ => None,
        }
    }
}

/// Hash field of a destination.
fn dest_field(d: &DestRecord) -> String {
    format!("{}\t{}", d.site, d.identity)
}

/// What another instance needs to follow a destination's adaptation.
type Shape = (String, Option<String>, u8);

fn shape(d: &DestRecord) -> Shape {
    (d.tier.clone(), d.ceiling.clone(), d.stage)
}

/// Redis key of a destination's rate in one tier.
pub fn rate_key(site: &str, identity: &str, tier: u8) -> String {
    format!("{PREFIX}rate:{site}:{identity}:{tier}")
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

enum Msg {
    Dests(Vec<DestRecord>),
    Barrier(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// Handle to the fleet: the hot-path rate decision and the sync task's mailbox.
pub struct Fleet {
    timeout: Duration,
    conn: OnceLock<ConnectionManager>,
    /// Redis answered the last time it was asked; false during an outage.
    up: AtomicBool,
    gcra: Script,
    tx: mpsc::UnboundedSender<Msg>,
    joined: Notify,
    outage_since: std::sync::Mutex<Option<Instant>>,
}

/// Outcome of one shared rate decision.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Granted,
    /// No token; the next one in this many microseconds.
    Wait(u64),
}

impl Fleet {
    /// Starts the sync task (which connects in the background) and attaches it to the
    /// engine's journal. Must run inside the tokio runtime.
    pub fn start(config: &Config, engine: &Arc<Engine>) -> anyhow::Result<Arc<Fleet>> {
        let client = ::redis::Client::open(config.state.redis_url.as_str())
            .map_err(|e| anyhow::anyhow!("state.redis_url {:?}: {e}", config.state.redis_url))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (jtx, jrx) = std_mpsc::channel::<Change>();
        engine.attach_journal(jtx);
        let fleet = Arc::new(Fleet {
            timeout: config.state.redis_timeout.get(),
            conn: OnceLock::new(),
            up: AtomicBool::new(false),
            gcra: Script::new(GCRA_LUA),
            tx,
            joined: Notify::new(),
            outage_since: std::sync::Mutex::new(None),
        });
        let task = SyncTask {
            fleet: fleet.clone(),
            engine: engine.clone(),
            client,
            url: redact(&config.state.redis_url),
            origin: origin_id(),
            journal: jrx,
            rx,
            pending: VecDeque::new(),
            last_id: "0-0".into(),
            epoch: None,
            shared: HashMap::new(),
            dropped: 0,
            warned_start: false,
        };
        tokio::spawn(task.run());
        Ok(fleet)
    }

    /// True while decisions go through Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Waits (at most [`JOIN_WAIT`]) for the first join, so that a start with Redis
    /// reachable serves with the fleet's suppressions and suspensions loaded.
    pub async fn wait_joined(&self) {
        let wait = async {
            loop {
                let n = self.joined.notified();
                if self.is_up() {
                    return;
                }
                n.await;
            }
        };
        if tokio::time::timeout(JOIN_WAIT, wait).await.is_err() {
            tracing::warn!(target: "mxpace::fleet", "Redis not reachable at start: serving on local limits (each destination's floor tier) until it is");
        }
    }

    /// One token from the destination's shared GCRA, or `None` when Redis did not
    /// answer within `redis_timeout` (the outage is then begun).
    pub async fn take_token(&self, plan: &AdmitPlan) -> Option<Token> {
        if !self.is_up() {
            return None;
        }
        let mut conn = self.conn.get()?.clone();
        let interval_us = (1e6 / plan.rate.max(1e-6)).round().max(1.0) as u64;
        let mut inv = self.gcra.prepare_invoke();
        inv.key(rate_key(&plan.site, &plan.identity, plan.tier))
            .arg(interval_us)
            .arg(plan.burst.max(1))
            .arg(RATE_KEY_SLACK_MS);
        match tokio::time::timeout(self.timeout, inv.invoke_async::<(i64, i64)>(&mut conn)).await {
            Ok(Ok((1, _))) => Some(Token::Granted),
            Ok(Ok((_, wait))) => Some(Token::Wait(wait.max(0) as u64)),
            Ok(Err(e)) => {
                self.outage(&e.to_string());
                None
            }
            Err(_) => {
                self.outage("no answer within redis_timeout");
                None
            }
        }
    }

    /// Transport admission in fleet mode: the shared limiter, or the local one at the
    /// destination's floor tier during an outage. Never waits longer than `redis_timeout`.
    pub async fn admit(&self, engine: &Engine, plan: &AdmitPlan) -> Admission {
        match self.take_token(plan).await {
            Some(Token::Granted) => {
                metrics::fleet_admission(true);
                engine.route(plan)
            }
            Some(Token::Wait(us)) => {
                metrics::fleet_admission(true);
                Admission::Hold {
                    retry_after: us.div_ceil(1_000_000).max(1) as u32,
                    reason: Hold::Paced { rate: plan.rate },
                }
            }
            None => {
                metrics::fleet_admission(false);
                engine.admit_local(plan, plan.floor_tier)
            }
        }
    }

    /// Begins an outage (once): decisions are local until the sync task rejoins.
    fn outage(&self, reason: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            *self.outage_since.lock().unwrap() = Some(Instant::now());
            metrics::fleet_fallback();
            tracing::warn!(target: "mxpace::fleet", reason, "Redis unreachable: using local limits at each destination's floor tier until it answers again");
        }
    }

    fn rejoined(&self) {
        let since = self.outage_since.lock().unwrap().take();
        self.up.store(true, Ordering::Release);
        metrics::fleet_connected(true);
        self.joined.notify_waiters();
        tracing::info!(target: "mxpace::fleet",
            outage_seconds = since.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0),
            "Redis answers: shared limits and state in force");
    }

    /// Resolves once every change journaled before it is written to Redis, or after
    /// `redis_timeout` (then the change is queued and written on rejoin).
    pub async fn sync(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Barrier(done)).is_ok() {
            let _ = tokio::time::timeout(self.timeout, wait).await;
        }
    }

    /// Hands destinations changed since the last flush to the sync task.
    pub fn flush(&self, engine: &Engine) {
        let dirty = engine.take_dirty();
        if !dirty.is_empty() {
            let _ = self.tx.send(Msg::Dests(dirty));
        }
    }

    /// Writes what is pending (bounded by `redis_timeout`) and stops the sync task.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = tokio::time::timeout(self.timeout + Duration::from_secs(1), wait).await;
        }
    }
}

/// `redis://user:secret@host/` → `redis://user:***@host/` for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// Names this instance on the stream: host, process and start time.
fn origin_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{host}-{}-{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// Stream ids `MS-SEQ` in order.
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

struct SyncTask {
    fleet: Arc<Fleet>,
    engine: Arc<Engine>,
    client: ::redis::Client,
    url: String,
    origin: String,
    journal: std_mpsc::Receiver<Change>,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// Changes not yet written to Redis, oldest first.
    pending: VecDeque<Event>,
    /// Last stream entry read.
    last_id: String,
    /// The Redis data set this instance last synchronised with.
    epoch: Option<String>,
    /// Last shape sent or received per destination, so unchanged ones are not resent.
    shared: HashMap<String, Shape>,
    dropped: u64,
    warned_start: bool,
}

type RResult<T> = ::redis::RedisResult<T>;

impl SyncTask {
    async fn run(mut self) {
        metrics::fleet_connected(false);
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut barriers = Vec::new();
        loop {
            let mut close = None;
            let mut polled = false;
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => self.take(m, &mut barriers, &mut close),
                    None => break,
                },
                _ = tick.tick() => polled = true,
            }
            while let Ok(m) = self.rx.try_recv() {
                self.take(m, &mut barriers, &mut close);
            }
            self.drain_journal();
            if polled || close.is_some() {
                if self.fleet.conn.get().is_none() {
                    self.connect().await;
                }
                if !self.fleet.is_up() && self.fleet.conn.get().is_some() {
                    self.rejoin().await;
                }
            }
            if self.fleet.is_up() && !self.pending.is_empty() {
                if let Err(e) = self.bounded(Self::write_pending).await {
                    self.fleet.outage(&e);
                }
            }
            for b in barriers.drain(..) {
                let _ = b.send(());
            }
            if let Some(done) = close {
                let _ = done.send(());
                break;
            }
            if polled && self.fleet.is_up() {
                if let Err(e) = self.bounded(Self::poll).await {
                    self.fleet.outage(&e);
                }
            }
            // Gauge refresh: the recorder may be installed after this task started.
            if polled {
                metrics::fleet_connected(self.fleet.is_up());
            }
        }
    }

    fn take(
        &mut self,
        m: Msg,
        barriers: &mut Vec<oneshot::Sender<()>>,
        close: &mut Option<oneshot::Sender<()>>,
    ) {
        match m {
            Msg::Barrier(b) => barriers.push(b),
            Msg::Close(c) => *close = Some(c),
            Msg::Dests(ds) => {
                for d in ds {
                    let field = dest_field(&d);
                    let s = shape(&d);
                    if self.shared.get(&field) == Some(&s) {
                        continue;
                    }
                    self.remember(field, s);
                    self.push(Event::Adaptive { dest: d });
                }
            }
        }
    }

    fn remember(&mut self, field: String, s: Shape) {
        if self.shared.len() >= MAX_REMEMBERED && !self.shared.contains_key(&field) {
            // Forgetting only costs a resend of an unchanged shape.
            self.shared.clear();
        }
        self.shared.insert(field, s);
    }

    fn push(&mut self, e: Event) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_power_of_two() {
                tracing::warn!(target: "mxpace::fleet", dropped = self.dropped, "too many changes queued during the outage: dropping the oldest");
            }
        }
        self.pending.push_back(e);
    }

    fn drain_journal(&mut self) {
        let now = self.engine.clock().unix_now();
        while let Ok(c) = self.journal.try_recv() {
            let e = Event::from_change(c, now);
            if let Some(d) = e.dest() {
                let (f, s) = (dest_field(d), shape(d));
                self.remember(f, s);
            }
            self.push(e);
        }
    }

    /// Runs one Redis exchange within `redis_timeout`; the error says why it failed.
    async fn bounded<'a, F, Fut>(&'a mut self, f: F) -> Result<(), String>
    where
        F: FnOnce(&'a mut SyncTask, ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = RResult<()>> + 'a,
    {
        let Some(conn) = self.fleet.conn.get().cloned() else {
            return Err("not connected".into());
        };
        let limit = self.fleet.timeout.max(Duration::from_millis(250));
        match tokio::time::timeout(limit, f(self, conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within redis_timeout".into()),
        }
    }

    async fn connect(&mut self) {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(self.fleet.timeout.max(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_factor(50)
            .set_max_delay(500);
        let made = tokio::time::timeout(
            Duration::from_secs(1),
            ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                let _ = self.fleet.conn.set(c);
            }
            Ok(Err(e)) if !self.warned_start => {
                self.warned_start = true;
                tracing::warn!(target: "mxpace::fleet", url = %self.url, error = %e, "cannot reach Redis yet; retrying");
            }
            Err(_) if !self.warned_start => {
                self.warned_start = true;
                tracing::warn!(target: "mxpace::fleet", url = %self.url, "cannot reach Redis yet (connect timed out); retrying");
            }
            _ => {}
        }
    }

    /// Redis answers again (or for the first time): seed it if it lost its data, write
    /// what queued up, catch up with the others, then resume shared decisions.
    async fn rejoin(&mut self) {
        let Some(mut conn) = self.fleet.conn.get().cloned() else {
            return;
        };
        if let Some(since) = *self.fleet.outage_since.lock().unwrap() {
            if since.elapsed() < MIN_OUTAGE {
                return;
            }
        }
        // Back only when Redis answers within the bound every decision is held to.
        let ping = tokio::time::timeout(
            self.fleet.timeout,
            ::redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        if !matches!(ping, Ok(Ok(_))) {
            return;
        }
        // Seeding and catching up may take longer than one decision may wait: allow
        // them time, but never with shared decisions waiting on them.
        let steps = async {
            self.fleet.gcra.load_async(&mut conn).await?;
            let fresh = format!("{:x}", rand_u64());
            let _: Option<String> = ::redis::cmd("SET")
                .arg(key("epoch"))
                .arg(&fresh)
                .arg("NX")
                .query_async(&mut conn)
                .await?;
            let epoch: String = conn.get(key("epoch")).await?;
            let lost = self.epoch.as_deref() != Some(epoch.as_str());
            if lost {
                self.seed(&mut conn).await?;
            }
            self.write_pending(conn.clone()).await?;
            let first: ::redis::streams::StreamRangeReply = ::redis::cmd("XRANGE")
                .arg(key("events"))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await?;
            let trimmed = first
                .ids
                .first()
                .is_some_and(|f| id_key(&f.id) > id_key(&self.last_id));
            if lost || (trimmed && self.last_id != "0-0") || self.epoch.is_none() {
                self.resync(&mut conn).await?;
            }
            self.epoch = Some(epoch);
            Ok::<_, ::redis::RedisError>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), steps).await {
            Ok(Ok(())) => self.fleet.rejoined(),
            Ok(Err(e)) => {
                tracing::debug!(target: "mxpace::fleet", error = %e, "rejoin failed; retrying")
            }
            Err(_) => tracing::warn!(target: "mxpace::fleet", "rejoin took over 30s; retrying"),
        }
    }

    /// Writes this instance's suppressions and destinations into a Redis that lost them
    /// (set-if-absent: what others wrote first stays).
    async fn seed(&mut self, conn: &mut ConnectionManager) -> RResult<()> {
        let sups = self.engine.suppressions();
        let dests = self.engine.records();
        let now = self.engine.clock().unix_now();
        let (nsup, ndest) = (sups.len(), dests.len());
        for chunk in sups.chunks(BATCH * 4) {
            let mut p = ::redis::pipe();
            for (addr, s) in chunk {
                let json = serde_json::to_string(&Event::suppress(addr.clone(), s)).unwrap();
                p.hset_nx(key("sup"), addr, json).ignore();
            }
            p.query_async::<()>(conn).await?;
        }
        for chunk in dests.chunks(BATCH * 4) {
            let mut p = ::redis::pipe();
            for d in chunk {
                let field = dest_field(d);
                if d.suspended_until > now {
                    let json = serde_json::to_string(&Event::Suspend { dest: d.clone() }).unwrap();
                    p.hset_nx(key("susp"), &field, json).ignore();
                }
                let json = serde_json::to_string(&Event::Adaptive { dest: d.clone() }).unwrap();
                p.hset_nx(key("dest"), field, json).ignore();
            }
            p.query_async::<()>(conn).await?;
        }
        if nsup + ndest > 0 {
            tracing::info!(target: "mxpace::fleet", suppressions = nsup, destinations = ndest, "seeded a Redis that had lost the fleet's state");
        }
        Ok(())
    }

    /// Reads the whole shared state back (first join, lost data, or fell behind the stream).
    async fn resync(&mut self, conn: &mut ConnectionManager) -> RResult<()> {
        let last: ::redis::streams::StreamRangeReply = ::redis::cmd("XREVRANGE")
            .arg(key("events"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let mut events = Vec::new();
        for name in ["sup", "dest", "susp"] {
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<(String, String)>) = ::redis::cmd("HSCAN")
                    .arg(key(name))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(conn)
                    .await?;
                for (_, json) in page {
                    if let Ok(e) = serde_json::from_str::<Event>(&json) {
                        events.push(e);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let n = events.len();
        let applied = self.apply(events);
        if let Some(l) = last.ids.first() {
            self.last_id = l.id.clone();
        }
        tracing::info!(target: "mxpace::fleet", records = n, applied, "shared state read from Redis");
        Ok(())
    }

    fn apply(&mut self, events: Vec<Event>) -> usize {
        let mut changes = Vec::with_capacity(events.len());
        for e in events {
            if let Some(d) = e.dest() {
                let (f, s) = (dest_field(d), shape(d));
                self.remember(f, s);
            }
            changes.push(e.into_shared());
        }
        self.engine.apply_shared(changes)
    }

    async fn write_pending(&mut self, mut conn: ConnectionManager) -> RResult<()> {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(BATCH);
            let mut p = ::redis::pipe();
            for e in self.pending.iter().take(n) {
                let json = serde_json::to_string(e).unwrap_or_default();
                match e {
                    Event::Suppress { address, .. } => {
                        p.hset(key("sup"), address, &json).ignore();
                    }
                    Event::Unsuppress { address } => {
                        p.hdel(key("sup"), address).ignore();
                    }
                    Event::Adaptive { dest } => {
                        p.hset(key("dest"), dest_field(dest), &json).ignore();
                    }
                    Event::Suspend { dest } => {
                        p.hset(key("susp"), dest_field(dest), &json).ignore();
                    }
                    Event::Resume { dest } => {
                        p.hdel(key("susp"), dest_field(dest)).ignore();
                    }
                }
                p.cmd("XADD")
                    .arg(key("events"))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_LEN)
                    .arg("*")
                    .arg("o")
                    .arg(&self.origin)
                    .arg("e")
                    .arg(json)
                    .ignore();
            }
            p.query_async::<()>(&mut conn).await?;
            self.pending.drain(..n);
            metrics::fleet_events(true, n);
        }
        Ok(())
    }

    /// Reads other instances' changes from the stream.
    async fn poll(&mut self, mut conn: ConnectionManager) -> RResult<()> {
        loop {
            let reply: Option<StreamReadReply> = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(key("events"))
                .arg(&self.last_id)
                .query_async(&mut conn)
                .await?;
            let Some(reply) = reply else {
                return Ok(());
            };
            let mut events = Vec::new();
            let mut read = 0;
            for sk in reply.keys {
                for entry in sk.ids {
                    read += 1;
                    self.last_id = entry.id.clone();
                    let field = |name: &str| -> Option<String> {
                        entry
                            .map
                            .get(name)
                            .and_then(|v| ::redis::from_redis_value::<String>(v).ok())
                    };
                    if field("o").as_deref() == Some(self.origin.as_str()) {
                        continue;
                    }
                    match field("e").map(|j| serde_json::from_str::<Event>(&j)) {
                        Some(Ok(e)) => events.push(e),
                        _ => {
                            tracing::debug!(target: "mxpace::fleet", id = %entry.id, "ignored an unreadable fleet event")
                        }
                    }
                }
            }
            if !events.is_empty() {
                metrics::fleet_events(false, events.len());
                self.apply(events);
            }
            if read < 1000 {
                return Ok(());
            }
        }
    }
}

/// A random-enough token for the epoch (no cryptographic need: it only has to differ).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(until: u64) -> DestRecord {
        DestRecord {
            site: "gmail".into(),
            identity: "default".into(),
            tier: "t3".into(),
            ceiling: Some("t4".into()),
            stage: 2,
            suspensions: 1,
            streak: 0,
            deferrals: 0,
            suspended_until: until,
            last_seen: 1_700_000_000,
            counts: [1, 2, 3, 4],
        }
    }

    #[test]
    fn journaled_destinations_are_suspensions_or_resumes() {
        let now = 1_700_000_000;
        let cases = [(now + 60, "suspend"), (now, "resume"), (0, "resume")];
        for (until, kind) in cases {
            let e = Event::from_change(Change::Dest(dest(until)), now);
            let json = serde_json::to_value(&e).unwrap();
            assert_eq!(json["k"], kind, "suspended_until {until}");
        }
    }

    #[test]
    fn events_round_trip_through_json() {
        let events = [
            Event::suppress(
                "a@example.org".into(),
                &Suppression {
                    since: 5,
                    class: Class::RecipientUnknown,
                    reply: "550 5.1.1 no".into(),
                },
            ),
            Event::Unsuppress {
                address: "a@example.org".into(),
            },
            Event::Adaptive { dest: dest(0) },
            Event::Suspend { dest: dest(9) },
            Event::Resume { dest: dest(0) },
        ];
        for e in events {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e, "{json}");
        }
        match Event::suppress(
            "b@x".into(),
            &Suppression {
                since: 1,
                class: Class::RecipientUnknown,
                reply: String::new(),
            },
        )
        .into_shared()
        {
            Shared::Suppress(a, s) => {
                assert_eq!(a, "b@x");
                assert_eq!(s.class, Class::RecipientUnknown);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stream_ids_order_numerically() {
        assert!(id_key("1700000000000-10") > id_key("1700000000000-9"));
        assert!(id_key("1700000000001-0") > id_key("1700000000000-99"));
        assert_eq!(id_key("0-0"), (0, 0));
    }

    #[test]
    fn credentials_never_reach_the_log() {
        let cases = [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "redis://:secret@r.example:6379/0",
                "redis://:***@r.example:6379/0",
            ),
            (
                "redis://app:secret@r.example/",
                "redis://app:***@r.example/",
            ),
            ("redis://app@r.example/", "redis://app@r.example/"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want);
        }
    }

    #[test]
    fn rate_keys_name_site_identity_and_tier() {
        assert_eq!(
            rate_key("gmail", "203.0.113.7", 4),
            "mxpace:rate:gmail:203.0.113.7:4"
        );
    }
}
