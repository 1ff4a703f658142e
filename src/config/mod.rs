//! The daemon's configuration: TOML read with serde, validated before anything binds.
//!
//! `config/mxpace.toml` is the documented example and, embedded, the default. Every
//! error names the file, the line (for syntax and type errors) and the field path.

pub mod duration;

pub use duration::Dur;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The shipped default, documented field by field.
pub const BUILTIN_TOML: &str = include_str!("../../config/mxpace.toml");
pub const BUILTIN_ORIGIN: &str = "<builtin config/mxpace.toml>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}:{}field `{field}`: {message}", line.map(|l| format!(" line {l}: ")).unwrap_or_else(|| " ".into()))]
    Invalid {
        origin: String,
        /// 1-based line of the field in the file, when it is written there.
        line: Option<usize>,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub state: StateConfig,
    pub policy: PolicyConfig,
    pub classifier: ClassifierConfig,
    pub shaping: ShapingConfig,
    pub warmup: WarmupConfig,
    /// The ladder of pacing tiers, slowest first; each maps to one set of Postfix transports.
    pub tiers: Vec<TierConfig>,
    /// Per-provider (site) settings, keyed by provider name.
    pub providers: BTreeMap<String, ProviderConfig>,
    pub postfix: PostfixConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listeners: Vec<ListenerConfig>,
    /// Connections beyond this wait in the kernel backlog rather than exhausting memory.
    pub max_connections: usize,
    /// A connection idle this long between requests is closed (Postfix reconnects).
    pub idle_timeout: Dur,
    /// A request started but not completed within this time is abandoned (slow clients).
    pub request_timeout: Dur,
    pub max_line_bytes: usize,
    pub max_attributes: usize,
    pub max_request_bytes: usize,
    pub max_netstring_bytes: usize,
    pub max_json_bytes: usize,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub shutdown_grace: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// `127.0.0.1:PORT`, `[::1]:PORT` or `unix:/path`.
    pub address: String,
    /// `auto` detects the protocol from a connection's first bytes.
    pub protocol: ListenerProtocol,
    /// Unix socket permission bits, octal text such as `"0660"`.
    pub mode: Option<String>,
    /// Unix socket owner (user name or uid).
    pub owner: Option<String>,
    /// Unix socket group (group name or gid).
    pub group: Option<String>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            address: "127.0.0.1:10027".into(),
            protocol: ListenerProtocol::Auto,
            mode: None,
            owner: None,
            group: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    #[default]
    Auto,
    Policy,
    Socketmap,
    Jsonl,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus `/metrics` endpoint; empty disables it.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Operator interface for `mxpace ctl`; loopback or a Unix socket only.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `mxpace=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// `embedded` (a file), `redis` (fleet mode) or `memory` (nothing survives a restart).
    pub backend: String,
    pub path: String,
    /// Adaptive counters are written at least this often; suppressions and suspensions at once.
    pub flush_interval: Dur,
    pub redis_url: String,
    /// No request waits longer than this on Redis; past it the instance uses local limits.
    pub redis_timeout: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Action for `smtpd_access_policy` while the recipient's destination is suspended.
    pub suspended_action: String,
    /// Reject recipients on the suppression list at RCPT TO.
    pub enforce_suppression: bool,
    pub suppressed_action: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Extra rule files, read after the built-in ones (an operator's rule with the same id replaces it).
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShapingConfig {
    /// Upper bound of tracked destinations; the least recently used idle ones are evicted.
    pub max_destinations: usize,
    /// A destination unseen this long may be evicted (its state is then back to defaults).
    pub idle_after: Dur,
    pub housekeeping_interval: Dur,
    /// Identity used when a request names no source IP or pool.
    pub default_pool: String,
    /// Window of the per-class counts that derive a destination's stage.
    pub stage_window: Dur,
    /// Fraction of random jitter added to every `retry_after` (0.2 = up to +20%).
    pub jitter: f64,
    /// Resolve MX records of unlisted recipient domains in the background to group them by MX.
    pub mx_rollup: bool,
    pub mx_cache_ttl: Dur,
    pub mx_cache_size: usize,
    /// DNS servers (`IP:PORT`) for the MX rollup; empty = the system's resolv.conf.
    pub mx_nameservers: Vec<String>,
    /// Settings every provider inherits unless it overrides them.
    pub defaults: ShapingParams,
}

/// Per-provider shaping numbers. In `[shaping.defaults]` every field applies; in
/// `[providers.NAME]` the same names override the defaults for that provider.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShapingParams {
    /// Tier a destination starts in (and returns to after eviction).
    pub start_tier: String,
    /// Fastest tier the additive increase may reach.
    pub max_tier: String,
    /// Slowest tier; throttling never goes below it and suspensions resume at it.
    pub floor_tier: String,
    /// Deliveries in a row that earn one step up the ladder.
    pub increase_after: u32,
    /// Rate multiplier applied on a rate-limit reply (0.5 halves).
    pub decrease_factor: f64,
    /// After a throttle, climbing back above 90% of the rate that was throttled waits this long.
    pub probe_after: Dur,
    /// Throttles this soon after a decrease answer mail admitted before it: no second decrease.
    pub decrease_holdoff: Dur,
    pub backoff_base: Dur,
    pub backoff_max: Dur,
    /// Reputation/spam blocks within the stage window that suspend the destination.
    pub suspend_after: u32,
    pub suspend_for: Dur,
    /// Repeated suspensions double up to this.
    pub suspend_max: Dur,
    pub greylist_delay: Dur,
    /// `mailbox_full` replies within `mailbox_full_window` that suppress the address.
    pub mailbox_full_limit: u32,
    pub mailbox_full_window: Dur,
    /// Consecutive network failures that open an MX host's circuit breaker.
    pub circuit_failures: u32,
    pub circuit_open_for: Dur,
    /// Turn this provider's 5xx reputation-block replies into 4xx deferrals in the status filter.
    pub defer_blocks: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Recipient domains of this site, in addition to those its rule file declares.
    pub domains: Vec<String>,
    /// MX host patterns (`*.example.net`, exact names or IPs), in addition to the rule file's.
    pub mx: Vec<String>,
    /// Postfix nexthop for this site's tier transports (`[ip]:port`); empty = the recipient domain.
    pub nexthop: String,
    pub start_tier: Option<String>,
    pub max_tier: Option<String>,
    pub floor_tier: Option<String>,
    pub increase_after: Option<u32>,
    pub decrease_factor: Option<f64>,
    pub probe_after: Option<Dur>,
    pub decrease_holdoff: Option<Dur>,
    pub backoff_base: Option<Dur>,
    pub backoff_max: Option<Dur>,
    pub suspend_after: Option<u32>,
    pub suspend_for: Option<Dur>,
    pub suspend_max: Option<Dur>,
    pub greylist_delay: Option<Dur>,
    pub mailbox_full_limit: Option<u32>,
    pub mailbox_full_window: Option<Dur>,
    pub circuit_failures: Option<u32>,
    pub circuit_open_for: Option<Dur>,
    pub defer_blocks: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    /// Messages per second this tier admits per destination.
    pub rate: f64,
    /// Parallel connections per destination (Postfix `*_destination_concurrency_limit`).
    pub concurrency: u32,
    /// Parallel 1-message-per-second transports that smooth the rate inside Postfix;
    /// 0 = one transport without a rate delay (pacing by admission only).
    pub lanes: u32,
    /// Messages admitted at once (per queue scan); small, since admitted mail can no longer be slowed.
    pub burst: u32,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            name: String::new(),
            rate: 1.0,
            concurrency: 1,
            lanes: 0,
            burst: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WarmupConfig {
    pub enabled: bool,
    /// First day of the schedule (`YYYY-MM-DD`, UTC).
    pub start_date: String,
    /// Daily volume per source once warm.
    pub target_per_day: u64,
    /// `[day, per_day]` pairs: from that day (1-based) on, this many messages a day.
    /// After the last step the volume doubles every `double_every_days` up to the target.
    pub schedule: Vec<[u64; 2]>,
    pub double_every_days: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PostfixConfig {
    /// Prefix of the generated tier transports (`mxp_t3`, `mxp_t3_2`, …).
    pub transport_prefix: String,
    /// How Postfix reaches mxpace for socketmap lookups (`inet:127.0.0.1:10027` or `unix:/path`).
    pub socketmap_endpoint: String,
    /// How smtpd reaches mxpace for policy requests (`inet:127.0.0.1:10027` or `unix:/path`).
    pub policy_endpoint: String,
    pub queue_run_delay: Dur,
    pub minimal_backoff_time: Dur,
    pub maximal_backoff_time: Dur,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            metrics: MetricsConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            state: StateConfig::default(),
            policy: PolicyConfig::default(),
            classifier: ClassifierConfig::default(),
            shaping: ShapingConfig::default(),
            warmup: WarmupConfig::default(),
            tiers: default_tiers(),
            providers: BTreeMap::new(),
            postfix: PostfixConfig::default(),
        }
    }
}

fn default_tiers() -> Vec<TierConfig> {
    let t = |name: &str, rate: f64, concurrency: u32, lanes: u32, burst: u32| TierConfig {
        name: name.into(),
        rate,
        concurrency,
        lanes,
        burst,
    };
    vec![
        t("t1", 1.0, 1, 1, 1),
        t("t2", 2.0, 2, 2, 2),
        t("t3", 3.0, 3, 3, 3),
        t("t4", 5.0, 5, 5, 5),
        t("t5", 8.0, 5, 8, 8),
        t("t6", 13.0, 10, 0, 13),
        t("t7", 20.0, 10, 0, 20),
        t("t8", 50.0, 20, 0, 50),
        t("t9", 100.0, 20, 0, 100),
    ]
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listeners: vec![ListenerConfig::default()],
            max_connections: 4096,
            idle_timeout: Dur::secs(300),
            request_timeout: Dur::secs(10),
            max_line_bytes: 4096,
            max_attributes: 64,
            max_request_bytes: 16 * 1024,
            max_netstring_bytes: 100_000,
            max_json_bytes: 16 * 1024,
            shutdown_grace: Dur::secs(5),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:10029".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: "embedded".into(),
            path: "mxpace-state.db".into(),
            flush_interval: Dur::secs(2),
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_timeout: Dur::millis(50),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            suspended_action: "DEFER_IF_PERMIT 4.7.1".into(),
            enforce_suppression: true,
            suppressed_action: "REJECT 5.1.1".into(),
        }
    }
}

impl Default for ShapingConfig {
    fn default() -> Self {
        ShapingConfig {
            max_destinations: 1_000_000,
            idle_after: Dur::secs(3600),
            housekeeping_interval: Dur::secs(10),
            default_pool: "default".into(),
            stage_window: Dur::secs(600),
            jitter: 0.2,
            mx_rollup: false,
            mx_cache_ttl: Dur::secs(3600),
            mx_cache_size: 100_000,
            mx_nameservers: Vec::new(),
            defaults: ShapingParams::default(),
        }
    }
}

impl Default for ShapingParams {
    fn default() -> Self {
        ShapingParams {
            start_tier: "t7".into(),
            max_tier: "t9".into(),
            floor_tier: "t1".into(),
            increase_after: 20,
            decrease_factor: 0.5,
            probe_after: Dur::secs(600),
            decrease_holdoff: Dur::secs(5),
            backoff_base: Dur::secs(60),
            backoff_max: Dur::secs(3600),
            suspend_after: 3,
            suspend_for: Dur::secs(1800),
            suspend_max: Dur::secs(6 * 3600),
            greylist_delay: Dur::secs(300),
            mailbox_full_limit: 3,
            mailbox_full_window: Dur::secs(3 * 86400),
            circuit_failures: 5,
            circuit_open_for: Dur::secs(120),
            defer_blocks: false,
        }
    }
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            enabled: false,
            start_date: String::new(),
            target_per_day: 1_000_000,
            schedule: vec![[1, 200], [3, 500], [5, 1000], [7, 2000]],
            double_every_days: 2,
        }
    }
}

impl Default for PostfixConfig {
    fn default() -> Self {
        PostfixConfig {
            transport_prefix: "mxp".into(),
            socketmap_endpoint: "inet:127.0.0.1:10027".into(),
            policy_endpoint: "inet:127.0.0.1:10027".into(),
            queue_run_delay: Dur::secs(5),
            minimal_backoff_time: Dur::secs(5),
            maximal_backoff_time: Dur::secs(60),
        }
    }
}

impl Config {
    /// The embedded default (`config/mxpace.toml`).
    pub fn builtin() -> Config {
        Config::from_toml(BUILTIN_TOML, BUILTIN_ORIGIN).expect("the embedded config is valid")
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Config::from_toml(&text, &origin)
    }

    /// Parses and validates; the same path `check-config` takes.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(origin).map_err(|e| match e {
            ConfigError::Invalid {
                origin,
                field,
                message,
                ..
            } => ConfigError::Invalid {
                line: locate_field(text, &field),
                origin,
                field,
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// The shaping numbers of one provider: its overrides on top of `[shaping.defaults]`.
    pub fn params_for(&self, provider: &str) -> ShapingParams {
        let mut p = self.shaping.defaults.clone();
        if let Some(o) = self.providers.get(provider) {
            macro_rules! take {
                ($($f:ident),*) => { $( if let Some(v) = &o.$f { p.$f = v.clone(); } )* };
            }
            take!(
                start_tier,
                max_tier,
                floor_tier,
                increase_after,
                decrease_factor,
                probe_after,
                decrease_holdoff,
                backoff_base,
                backoff_max,
                suspend_after,
                suspend_for,
                suspend_max,
                greylist_delay,
                mailbox_full_limit,
                mailbox_full_window,
                circuit_failures,
                circuit_open_for,
                defer_blocks
            );
        }
        p
    }

    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.name == name)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            line: None,
            field: field.to_string(),
            message,
        };
        if self.tiers.is_empty() {
            return Err(bad("tiers", "at least one tier is needed".into()));
        }
        if self.tiers.len() > 32 {
            return Err(bad("tiers", "at most 32 tiers".into()));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            let f = |name: &str| format!("tiers[{i}].{name}");
            if t.name.is_empty()
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad(
                    &f("name"),
                    format!("{:?} must be non-empty letters, digits or _", t.name),
                ));
            }
            if self.tiers[..i].iter().any(|o| o.name == t.name) {
                return Err(bad(&f("name"), format!("duplicate tier {:?}", t.name)));
            }
            if !(t.rate.is_finite() && t.rate > 0.0) {
                return Err(bad(
                    &f("rate"),
                    format!("{} must be > 0 messages per second", t.rate),
                ));
            }
            if i > 0 && t.rate <= self.tiers[i - 1].rate {
                return Err(bad(
                    &f("rate"),
                    "tiers must be ordered slowest first, with rising rates".into(),
                ));
            }
            if t.concurrency == 0 {
                return Err(bad(&f("concurrency"), "must be at least 1".into()));
            }
            if t.burst == 0 {
                return Err(bad(&f("burst"), "must be at least 1".into()));
            }
            if t.lanes > 64 {
                return Err(bad(&f("lanes"), "at most 64 lanes per tier".into()));
            }
        }
        let check_params = |prefix: &str, p: &ShapingParams| -> Result<(), ConfigError> {
            for (name, tier) in [
                ("start_tier", &p.start_tier),
                ("max_tier", &p.max_tier),
                ("floor_tier", &p.floor_tier),
            ] {
                if self.tier_index(tier).is_none() {
                    return Err(bad(
                        &format!("{prefix}.{name}"),
                        format!("unknown tier {tier:?}"),
                    ));
                }
            }
            let (s, m, f) = (
                self.tier_index(&p.start_tier).unwrap(),
                self.tier_index(&p.max_tier).unwrap(),
                self.tier_index(&p.floor_tier).unwrap(),
            );
            if !(f <= s && s <= m) {
                return Err(bad(
                    prefix,
                    "tiers must satisfy floor_tier <= start_tier <= max_tier".into(),
                ));
            }
            if !(p.decrease_factor > 0.0 && p.decrease_factor < 1.0) {
                return Err(bad(
                    &format!("{prefix}.decrease_factor"),
                    format!("{} must be between 0 and 1", p.decrease_factor),
                ));
            }
            if p.increase_after == 0 {
                return Err(bad(
                    &format!("{prefix}.increase_after"),
                    "must be at least 1".into(),
                ));
            }
            if p.backoff_base.get() > p.backoff_max.get() {
                return Err(bad(
                    &format!("{prefix}.backoff_base"),
                    "must not exceed backoff_max".into(),
                ));
            }
            if p.suspend_for.get() > p.suspend_max.get() {
                return Err(bad(
                    &format!("{prefix}.suspend_for"),
                    "must not exceed suspend_max".into(),
                ));
            }
            Ok(())
        };
        check_params("shaping.defaults", &self.shaping.defaults)?;
        for name in self.providers.keys() {
            check_params(&format!("providers.{name}"), &self.params_for(name))?;
        }
        if !(0.0..=1.0).contains(&self.shaping.jitter) {
            return Err(bad("shaping.jitter", "must be between 0 and 1".into()));
        }
        if self.shaping.max_destinations == 0 {
            return Err(bad("shaping.max_destinations", "must be at least 1".into()));
        }
        if self.server.listeners.is_empty() {
            return Err(bad(
                "server.listeners",
                "at least one listener is needed".into(),
            ));
        }
        for (i, l) in self.server.listeners.iter().enumerate() {
            crate::config::parse_listen_address(&l.address)
                .map_err(|m| bad(&format!("server.listeners[{i}].address"), m))?;
            if let Some(mode) = &l.mode {
                u32::from_str_radix(mode, 8).map_err(|_| {
                    bad(
                        &format!("server.listeners[{i}].mode"),
                        format!("{mode:?} is not octal"),
                    )
                })?;
            }
        }
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| bad("metrics.listen", format!("{:?}: {e}", self.metrics.listen)))?;
        }
        if !self.admin.listen.is_empty() {
            parse_listen_address(&self.admin.listen).map_err(|m| bad("admin.listen", m))?;
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(bad(
                "log.format",
                format!("{:?} must be text or json", self.log.format),
            ));
        }
        if !matches!(self.state.backend.as_str(), "embedded" | "redis" | "memory") {
            return Err(bad(
                "state.backend",
                format!("{:?} must be embedded, redis or memory", self.state.backend),
            ));
        }
        if self.state.backend == "redis" {
            // This build speaks plain TCP and Unix sockets to Redis (no TLS).
            let url = self.state.redis_url.as_str();
            if !["redis://", "unix://", "redis+unix://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(bad(
                    "state.redis_url",
                    format!("{url:?} must start with redis://, unix:// or redis+unix://"),
                ));
            }
            let t = self.state.redis_timeout.get();
            if t.is_zero() || t > std::time::Duration::from_secs(5) {
                return Err(bad(
                    "state.redis_timeout",
                    "must be above 0 and at most 5s: every rate decision may wait this long".into(),
                ));
            }
        }
        if self.warmup.enabled {
            parse_date(&self.warmup.start_date).ok_or_else(|| {
                bad(
                    "warmup.start_date",
                    format!("{:?} is not YYYY-MM-DD", self.warmup.start_date),
                )
            })?;
        }
        for (name, field) in [
            ("policy.suspended_action", &self.policy.suspended_action),
            ("policy.suppressed_action", &self.policy.suppressed_action),
        ] {
            if field.trim().is_empty() || field.contains('\n') {
                return Err(bad(name, "must be one non-empty line".into()));
            }
        }
        Ok(())
    }
}

/// The line where a dotted field path (`providers.gmail.start_tier`, `tiers[2].rate`)
/// is written, by following `[table]` / `[[array]]` headers; `None` when it is not
/// written (a default) or cannot be found.
pub fn locate_field(text: &str, path: &str) -> Option<usize> {
    // Split `tiers[2].rate` into table `tiers`, index 2, key `rate`.
    let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
    let (table, index) = match table.split_once('[') {
        Some((t, rest)) => (t, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut seen = 0usize;
    let mut in_target = table.is_empty();
    let mut header_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            current = h.trim().to_string();
            if current == table {
                in_target = index.is_none_or(|want| want == seen);
                seen += 1;
                header_line = Some(i + 1);
            } else {
                in_target = false;
            }
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = h.trim().to_string();
            in_target = current == table;
            if in_target {
                header_line = Some(i + 1);
            }
            continue;
        }
        if in_target {
            let k = line.split('=').next().unwrap_or("").trim();
            if k == key {
                return Some(i + 1);
            }
        }
    }
    // The field itself is a table (`providers.gmail`) or is defaulted inside a written table.
    let _ = current;
    header_line
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub fn parse_listen_address(text: &str) -> Result<ListenAddress, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(ListenAddress::Unix(path.into()));
    }
    text.parse::<std::net::SocketAddr>()
        .map(ListenAddress::Tcp)
        .map_err(|_| format!("{text:?} is neither HOST:PORT with an IP address nor unix:/path"))
}

/// `YYYY-MM-DD` of a day count since 1970-01-01 (inverse of [`parse_date`]).
pub fn format_date(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 for a `YYYY-MM-DD` date (proleptic Gregorian, UTC).
pub fn parse_date(text: &str) -> Option<i64> {
    let mut it = text.split('-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if it.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146097 + doe - 719468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_equals_struct_defaults() {
        // The shipped file documents the defaults; it must not drift from them.
        assert_eq!(Config::builtin().shaping, Config::default().shaping);
        assert_eq!(Config::builtin().tiers, Config::default().tiers);
        assert_eq!(Config::builtin().server, Config::default().server);
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = Config::from_toml("[shaping]\nmax_destinations = \"many\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.toml") && e.contains("line 2") && e.contains("max_destinations"),
            "{e}"
        );
        let e = Config::from_toml("[shaping]\nmax_destinatons = 3\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field") && e.contains("max_destinatons"),
            "{e}"
        );
        let e = Config::from_toml("[providers.gmail]\nstart_tier = \"t99\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("providers.gmail.start_tier") && e.contains("t99"),
            "{e}"
        );
        let e = Config::from_toml("[[tiers]]\nname = \"a\"\nrate = 0.0\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tiers[0].rate") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn fleet_settings_are_checked() {
        let cases = [
            ("redis_url = \"redis://10.0.0.5:6379/0\"", None),
            ("redis_url = \"unix:///run/redis.sock\"", None),
            (
                "redis_url = \"rediss://r.example/\"",
                Some("state.redis_url"),
            ),
            ("redis_url = \"10.0.0.5:6379\"", Some("state.redis_url")),
            ("redis_timeout = \"0s\"", Some("state.redis_timeout")),
            ("redis_timeout = \"30s\"", Some("state.redis_timeout")),
        ];
        for (line, field) in cases {
            let toml = format!("[state]\nbackend = \"redis\"\n{line}\n");
            match (Config::from_toml(&toml, "x"), field) {
                (Ok(_), None) => {}
                (Err(e), Some(f)) => assert!(e.to_string().contains(f), "{line}: {e}"),
                (r, f) => panic!("{line}: {r:?}, expected an error on {f:?}"),
            }
        }
        // Only fleet mode looks at them.
        assert!(Config::from_toml("[state]\nredis_url = \"x\"\n", "x").is_ok());
    }

    #[test]
    fn provider_overrides_merge() {
        let c = Config::from_toml("[providers.yahoo]\nsuspend_for = \"1h\"\n", "x").unwrap();
        let p = c.params_for("yahoo");
        assert_eq!(p.suspend_for.get().as_secs(), 3600);
        assert_eq!(p.backoff_base, c.shaping.defaults.backoff_base);
    }

    #[test]
    fn dates_and_addresses() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2026-11-24"), Some(20781));
        assert_eq!(parse_date("2026-13-01"), None);
        for days in [0, 59, 60, 365, 20781, 40000] {
            assert_eq!(parse_date(&format_date(days)), Some(days));
        }
        assert!(matches!(
            parse_listen_address("127.0.0.1:0"),
            Ok(ListenAddress::Tcp(_))
        ));
        assert!(matches!(
            parse_listen_address("unix:/tmp/x.sock"),
            Ok(ListenAddress::Unix(_))
        ));
        assert!(parse_listen_address("localhost:25").is_err());
    }
}
