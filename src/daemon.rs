//! `mxpace serve`: load and validate the config, bind every listener, then run until a
//! signal. SIGHUP reloads atomically; SIGTERM/SIGINT drain in-flight requests, flush
//! state and exit 0.

use crate::classify::Classifier;
use crate::config::{Config, ListenerConfig, ListenerProtocol};
use crate::protocol::Limits;
use crate::server::connection::ConnConfig;
use crate::server::service::Service;
use crate::server::{listener, spawn_listeners};
use crate::shaping::{Engine, EngineClock};
use crate::store::Store;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    pub config: Option<PathBuf>,
    pub listen: Vec<String>,
    pub metrics_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub state: Option<String>,
    pub log_json: bool,
    /// Move an unreadable state file aside and start fresh instead of refusing to start.
    pub quarantine_bad_state: bool,
}

/// Reads the config file (or the embedded default) and applies command-line overrides.
pub fn load_config(opts: &ServeOptions) -> anyhow::Result<Config> {
    let mut config = match &opts.config {
        Some(p) => Config::from_file(p)?,
        None => Config::builtin(),
    };
    if !opts.listen.is_empty() {
        config.server.listeners = opts
            .listen
            .iter()
            .map(|a| ListenerConfig {
                address: a.clone(),
                protocol: ListenerProtocol::Auto,
                ..Default::default()
            })
            .collect();
    }
    if let Some(m) = &opts.metrics_listen {
        config.metrics.listen = m.clone();
    }
    if let Some(a) = &opts.admin_listen {
        config.admin.listen = a.clone();
    }
    if let Some(s) = &opts.state {
        config.state.path = s.clone();
        if config.state.backend == "memory" {
            config.state.backend = "embedded".into();
        }
    }
    // Re-validate: overrides must obey the same rules as the file.
    let text = toml::to_string(&config).context("serialising the effective config")?;
    Config::from_toml(&text, "effective config (file + command line)")?;
    Ok(config)
}

/// Builds the classifier: the built-in rules plus the config's extra rule files.
pub fn load_classifier(config: &Config) -> anyhow::Result<Classifier> {
    if config.classifier.rules.is_empty() {
        return Ok(Classifier::builtin());
    }
    let paths: Vec<PathBuf> = config.classifier.rules.iter().map(PathBuf::from).collect();
    Classifier::from_files(&paths).map_err(|e| anyhow::anyhow!("{e}"))
}

fn limits(config: &Config) -> Limits {
    let s = &config.server;
    let mut l = Limits::default();
    l.policy.max_line = s.max_line_bytes;
    l.policy.max_attributes = s.max_attributes;
    l.policy.max_request = s.max_request_bytes;
    l.socketmap.max_netstring = s.max_netstring_bytes;
    l.jsonl.max_line = s.max_json_bytes;
    l
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let config = Arc::new(load_config(&opts)?);
    let classifier = Arc::new(load_classifier(&config)?);
    // The recorder first: the engine registers its counter handles when it is built.
    if !config.metrics.listen.is_empty() {
        let addr = config.metrics.listen.parse().context("metrics.listen")?;
        let bound = crate::metrics::install(addr)
            .await
            .with_context(|| format!("starting metrics endpoint on {addr}"))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let engine = Arc::new(Engine::new(config.clone(), classifier, EngineClock::real()));
    let store = Store::open(&config, &engine, opts.quarantine_bad_state)?;
    if config.shaping.mx_rollup {
        let (cache, rx) = crate::shaping::mx::MxCache::new(
            config.shaping.mx_cache_ttl.get().as_secs(),
            config.shaping.mx_cache_size,
        );
        let cache = Arc::new(cache);
        let resolver = crate::shaping::mx::resolver(&config.shaping.mx_nameservers)?;
        engine.attach_mx(cache.clone());
        tokio::spawn(crate::shaping::mx::resolve_loop(
            engine.clone(),
            cache,
            rx,
            resolver,
        ));
    }
    store.wait_ready().await;
    let service = Arc::new(Service::new(engine.clone(), config.clone(), store.clone()));

    // Handlers first: scripts signal as soon as `listening on` appears, and an
    // unhandled SIGTERM/SIGHUP would kill the process instead of stopping or reloading it.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // Bind everything before announcing anything: a half-started daemon helps no one.
    let mut bound = Vec::new();
    for l in &config.server.listeners {
        bound.push(listener::bind(l).await?);
    }
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    if !config.admin.listen.is_empty() {
        let a = crate::admin::spawn(
            &config.admin.listen,
            engine.clone(),
            store.clone(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!("admin interface on {a}");
    }
    let addrs: Vec<(String, ListenerProtocol)> = bound
        .iter()
        .map(|b| (b.local.clone(), b.protocol))
        .collect();
    // Read per connection: a reload's limits and timeouts apply to new connections.
    let conn_cfg = {
        let service = service.clone();
        move |b: &listener::BoundListener| {
            let config = service.config.load();
            ConnConfig {
                protocol: b.protocol,
                limits: limits(&config),
                idle_timeout: config.server.idle_timeout.get(),
                request_timeout: config.server.request_timeout.get(),
            }
        }
    };
    spawn_listeners(
        bound,
        service.clone(),
        conn_cfg,
        config.server.max_connections,
        shutdown.clone(),
        &tracker,
    );
    // The `listening on ADDR` lines are a contract: scripts and tests wait for them.
    for (a, p) in &addrs {
        tracing::info!(protocol = ?p, "listening on {a}");
    }

    let housekeeping = {
        let engine = engine.clone();
        let store = store.clone();
        let every = config.shaping.housekeeping_interval.get();
        let flush_every = config.state.flush_interval.get();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut hk = tokio::time::interval(every);
            let mut flush = tokio::time::interval(flush_every);
            loop {
                tokio::select! {
                    _ = hk.tick() => {
                        engine.housekeeping();
                        crate::metrics::export_destinations(&engine);
                    }
                    _ = flush.tick() => store.flush_adaptive(&engine).await,
                    _ = shutdown.cancelled() => break,
                }
            }
        })
    };

    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading config");
                reload(&opts, &engine, &service);
            }
            _ = term.recv() => { tracing::info!(signal = "SIGTERM", "shutting down"); break; }
            _ = int.recv() => { tracing::info!(signal = "SIGINT", "shutting down"); break; }
        }
    }
    shutdown.cancel();
    tracker.close();
    let grace = service.config.load().server.shutdown_grace.get();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_seconds = grace.as_secs_f64(),
            "connections still open after the grace period; exiting anyway"
        );
    }
    let _ = housekeeping.await;
    store.flush_adaptive(&engine).await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Settings bound at startup (sockets, the connection cap, the store, logging), by
/// name, that differ between `old` and `new`.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.server.listeners != new.server.listeners {
        changed.push("server.listeners");
    }
    if old.server.max_connections != new.server.max_connections {
        changed.push("server.max_connections");
    }
    if old.shaping.housekeeping_interval != new.shaping.housekeeping_interval {
        changed.push("shaping.housekeeping_interval");
    }
    if old.metrics != new.metrics {
        changed.push("metrics");
    }
    if old.admin != new.admin {
        changed.push("admin");
    }
    if old.state != new.state {
        changed.push("state");
    }
    if old.log != new.log {
        changed.push("log");
    }
    changed
}

/// Loads the new config and swaps it in whole, or keeps the old one and says why.
fn reload(opts: &ServeOptions, engine: &Engine, service: &Service) {
    let result = load_config(opts).and_then(|c| {
        let cls = load_classifier(&c)?;
        Ok((c, cls))
    });
    match result {
        Ok((config, classifier)) => {
            let old = service.config.load();
            let restart = restart_needed(&old, &config);
            if !restart.is_empty() {
                tracing::warn!(
                    settings = %restart.join(", "),
                    "changed settings take effect at the next restart; the rest is reloaded"
                );
            }
            let config = Arc::new(config);
            engine.reload(config.clone(), Arc::new(classifier));
            service.config.store(config);
            crate::metrics::reload(true);
            tracing::info!("config reloaded");
        }
        Err(e) => {
            crate::metrics::reload(false);
            tracing::error!(error = %format!("{e:#}"), "config reload refused; the previous config stays in force");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_need_a_restart() {
        type Edit = fn(&mut Config);
        let cases: &[(Edit, &[&str])] = &[
            (|_| {}, &[]),
            // Applied on reload: limits and timeouts (new connections), policy, shaping.
            (
                |c| {
                    c.server.max_line_bytes = 100;
                    c.server.idle_timeout = crate::config::Dur::secs(1);
                    c.server.shutdown_grace = crate::config::Dur::secs(1);
                    c.policy.suppressed_action = "REJECT 5.7.1".into();
                    c.shaping.defaults.start_tier = "t1".into();
                },
                &[],
            ),
            (
                |c| c.server.max_connections = 1,
                &["server.max_connections"],
            ),
            (
                |c| c.server.listeners[0].address = "unix:/x".into(),
                &["server.listeners"],
            ),
            (
                |c| {
                    c.metrics.listen = String::new();
                    c.state.path = "other".into();
                    c.log.level = "debug".into();
                },
                &["metrics", "state", "log"],
            ),
            (
                |c| c.shaping.housekeeping_interval = crate::config::Dur::secs(1),
                &["shaping.housekeeping_interval"],
            ),
        ];
        let old = Config::builtin();
        for (i, (edit, want)) in cases.iter().enumerate() {
            let mut new = old.clone();
            edit(&mut new);
            assert_eq!(restart_needed(&old, &new), *want, "case {i}");
        }
    }
}
