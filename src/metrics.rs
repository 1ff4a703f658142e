//! Prometheus metrics: names, labels and the exporter.
//!
//! Label values are bounded by construction: protocol and request kinds are fixed
//! sets, sites are the configured providers plus `other`, classes and stages are enums.
//! A recipient address or an arbitrary domain never becomes a label.

use crate::shaping::Engine;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

pub const OTHER: &str = "other";

/// Installs the recorder and serves `GET /metrics` on `addr`; returns the bound address
/// (port 0 picks a free one). Must run inside the tokio runtime.
pub async fn install(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("mxpace_request_duration_seconds".into()),
            &[
                0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005,
                0.01, 0.05, 0.1,
            ],
        )?
        .install_recorder()?;
    describe();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(serve_scrape(stream, handle));
        }
    });
    Ok(local)
}

/// A minimal HTTP/1.1 responder: enough for Prometheus, curl and promtool.
async fn serve_scrape(
    mut stream: tokio::net::TcpStream,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while n < buf.len() {
            let k = stream.read(&mut buf[n..]).await?;
            if k == 0 {
                break;
            }
            n += k;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "see /metrics\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn describe() {
    // Series with fixed labels exist from the start, so alerts see 0 rather than nothing.
    for result in ["ok", "error"] {
        counter!("mxpace_config_reloads_total", "result" => result).absolute(0);
    }
    counter!("mxpace_store_errors_total").absolute(0);
    counter!("mxpace_suppressions_added_total").absolute(0);
    describe_counter!(
        "mxpace_outcomes_total",
        "Replies by site and outcome: delivered, deferred (4xx or no reply) or rejected (5xx)."
    );
    describe_counter!(
        "mxpace_replies_total",
        "Classified SMTP replies by site (configured provider or other) and class."
    );
    describe_counter!(
        "mxpace_decisions_total",
        "Answers by request kind and action."
    );
    describe_counter!(
        "mxpace_suppressions_added_total",
        "Recipients added to the suppression list."
    );
    describe_gauge!("mxpace_suppressions", "Recipients on the suppression list.");
    describe_gauge!(
        "mxpace_destination_rate",
        "Current admitted rate of a destination, messages per second."
    );
    describe_gauge!(
        "mxpace_destination_concurrency",
        "Current concurrency limit of a destination."
    );
    describe_gauge!(
        "mxpace_destination_suspended",
        "1 while a destination is suspended."
    );
    describe_gauge!(
        "mxpace_destination_stage",
        "Stage of a destination: trusted=0, hesitating=1, throttled=2, rejecting=3."
    );
    describe_gauge!(
        "mxpace_other_destinations",
        "Destinations of unlisted sites by stage."
    );
    describe_histogram!(
        "mxpace_request_duration_seconds",
        Unit::Seconds,
        "Time to answer one request, by protocol."
    );
    describe_gauge!(
        "mxpace_open_connections",
        "Open client connections by protocol."
    );
    describe_counter!(
        "mxpace_protocol_errors_total",
        "Bad requests and connection errors by protocol and kind."
    );
    describe_counter!(
        "mxpace_connection_limit_waits_total",
        "Times every connection permit was taken (server.max_connections), so that new connections waited."
    );
    describe_counter!(
        "mxpace_config_reloads_total",
        "Config reloads by result (ok, error)."
    );
    describe_gauge!(
        "mxpace_destinations_tracked",
        "Destinations (site × identity) with adaptive state."
    );
    describe_counter!(
        "mxpace_destination_evictions_total",
        "Destinations forgotten because idle or at capacity."
    );
    describe_counter!(
        "mxpace_stage_changes_total",
        "Stage changes by site and new stage."
    );
    describe_counter!(
        "mxpace_suspensions_total",
        "Destination suspensions by site."
    );
    describe_counter!(
        "mxpace_store_errors_total",
        "Failed writes to the state store."
    );
    describe_fleet();
}

pub fn protocol_error(protocol: &'static str, kind: &'static str) {
    counter!("mxpace_protocol_errors_total", "protocol" => protocol, "kind" => kind).increment(1);
}

pub fn connection_limit_wait() {
    counter!("mxpace_connection_limit_waits_total").increment(1);
}

pub fn request(protocol: &'static str, kind: &'static str, took: Duration) {
    histogram!("mxpace_request_duration_seconds", "protocol" => protocol)
        .record(took.as_secs_f64());
    let _ = kind;
}

pub fn decision(kind: &'static str, action: &'static str) {
    counter!("mxpace_decisions_total", "kind" => kind, "action" => action).increment(1);
}

/// Outcome of a reply for `mxpace_outcomes_total`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered = 0,
    Deferred = 1,
    Rejected = 2,
}

const OUTCOMES: [&str; 3] = ["delivered", "deferred", "rejected"];

/// Counter handles for every (site label × class) and (site label × outcome), registered
/// once per config load: the per-report path then only increments atomics, with no label
/// vector built and no registry lookup. Handles made before the recorder is installed
/// count nowhere, so the daemon installs the recorder before it builds the engine.
pub struct ReplyCounters {
    replies: Vec<metrics::Counter>,
    outcomes: Vec<metrics::Counter>,
}

impl ReplyCounters {
    pub fn new(site_labels: &[&'static str]) -> ReplyCounters {
        let classes = crate::classify::Class::ALL;
        let mut replies = Vec::with_capacity(site_labels.len() * classes.len());
        let mut outcomes = Vec::with_capacity(site_labels.len() * OUTCOMES.len());
        for &site in site_labels {
            for class in classes {
                replies.push(
                    counter!("mxpace_replies_total", "site" => site, "class" => class.as_str()),
                );
            }
            for outcome in OUTCOMES {
                outcomes
                    .push(counter!("mxpace_outcomes_total", "site" => site, "outcome" => outcome));
            }
        }
        ReplyCounters { replies, outcomes }
    }

    /// Counts one reply; `site` is the index into the labels given to `new`.
    pub fn count(&self, site: usize, class: crate::classify::Class, outcome: Outcome) {
        let n = crate::classify::Class::ALL.len();
        if let Some(c) = self.replies.get(site * n + class as usize) {
            c.increment(1);
        }
        if let Some(c) = self.outcomes.get(site * OUTCOMES.len() + outcome as usize) {
            c.increment(1);
        }
    }
}

pub fn reload(ok: bool) {
    counter!("mxpace_config_reloads_total", "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

pub fn suppression_added() {
    counter!("mxpace_suppressions_added_total").increment(1);
}

pub fn stage_change(site: &'static str, stage: &'static str) {
    counter!("mxpace_stage_changes_total", "site" => site, "stage" => stage).increment(1);
}

pub fn suspension(site: &'static str) {
    counter!("mxpace_suspensions_total", "site" => site).increment(1);
}

pub fn store_error() {
    counter!("mxpace_store_errors_total").increment(1);
}

/// Counts an open connection for as long as it lives.
pub struct ConnectionGuard(&'static str);

impl ConnectionGuard {
    pub fn new(protocol: &'static str) -> ConnectionGuard {
        gauge!("mxpace_open_connections", "protocol" => protocol).increment(1.0);
        ConnectionGuard(protocol)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        gauge!("mxpace_open_connections", "protocol" => self.0).decrement(1.0);
    }
}

/// Label sets exported last time, so that forgotten destinations are zeroed, not left stale.
static EXPORTED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);
/// At most this many per-destination label sets (named sites × identities).
const MAX_DESTINATION_SERIES: usize = 2000;

/// Refreshes the per-destination gauges from the engine (run periodically, off the hot path).
pub fn export_destinations(engine: &Engine) {
    let setup = engine.setup();
    let views = engine.destinations();
    let stats = engine.stats();
    gauge!("mxpace_destinations_tracked").set(stats.destinations as f64);
    gauge!("mxpace_suppressions").set(stats.suppressions as f64);
    counter!("mxpace_destination_evictions_total").absolute(stats.evictions);
    let mut other = [0u64; 4];
    let mut now = HashSet::new();
    for v in &views {
        if setup.sites.named(&v.site).is_none() {
            other[v.stage as usize] += 1;
            continue;
        }
        if now.len() >= MAX_DESTINATION_SERIES {
            continue;
        }
        let labels = [("site", v.site.clone()), ("identity", v.identity.clone())];
        gauge!("mxpace_destination_rate", &labels).set(v.rate);
        gauge!("mxpace_destination_concurrency", &labels).set(v.concurrency as f64);
        gauge!("mxpace_destination_suspended", &labels).set(if v.suspended_until.is_some() {
            1.0
        } else {
            0.0
        });
        gauge!("mxpace_destination_stage", &labels).set(v.stage as u8 as f64);
        now.insert((v.site.clone(), v.identity.clone()));
    }
    for (i, stage) in crate::shaping::Stage::ALL.iter().enumerate() {
        gauge!("mxpace_other_destinations", "stage" => stage.as_str()).set(other[i] as f64);
    }
    let mut prev = EXPORTED.lock().unwrap();
    if let Some(prev) = prev.as_ref() {
        for (site, identity) in prev.difference(&now) {
            let labels = [("site", site.clone()), ("identity", identity.clone())];
            gauge!("mxpace_destination_suspended", &labels).set(0.0);
            gauge!("mxpace_destination_stage", &labels).set(0.0);
        }
    }
    *prev = Some(now);
}

fn describe_fleet() {
    describe_gauge!(
        "mxpace_fleet_connected",
        "Fleet mode: 1 while the shared Redis answers, 0 while this instance uses local limits."
    );
    describe_counter!(
        "mxpace_fleet_fallbacks_total",
        "Fleet mode: outages of the shared Redis (each one switched this instance to local limits)."
    );
    describe_counter!(
        "mxpace_fleet_admissions_total",
        "Fleet mode: rate decisions by where they were taken (redis, or local during an outage)."
    );
    describe_counter!(
        "mxpace_fleet_events_total",
        "Fleet mode: shared changes (suppressions, suspensions, stages) sent to and received from the fleet."
    );
}

/// Fleet mode: whether the shared Redis answers; registers the fleet series at 0.
pub fn fleet_connected(up: bool) {
    gauge!("mxpace_fleet_connected").set(if up { 1.0 } else { 0.0 });
    counter!("mxpace_fleet_fallbacks_total").increment(0);
    for via in ["redis", "local"] {
        counter!("mxpace_fleet_admissions_total", "via" => via).increment(0);
    }
    for direction in ["sent", "received"] {
        counter!("mxpace_fleet_events_total", "direction" => direction).increment(0);
    }
}

/// Fleet mode: an outage began; decisions are local until Redis answers again.
pub fn fleet_fallback() {
    counter!("mxpace_fleet_fallbacks_total").increment(1);
    gauge!("mxpace_fleet_connected").set(0.0);
}

/// Fleet mode: one rate decision, taken in Redis (`true`) or locally.
pub fn fleet_admission(shared: bool) {
    counter!("mxpace_fleet_admissions_total", "via" => if shared { "redis" } else { "local" })
        .increment(1);
}

/// Fleet mode: shared changes sent (`true`) or received.
pub fn fleet_events(sent: bool, n: usize) {
    counter!("mxpace_fleet_events_total", "direction" => if sent { "sent" } else { "received" })
        .increment(n as u64);
}
