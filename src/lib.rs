//! mxpace: a sidecar that classifies SMTP replies and paces delivery per destination.
//!
//! Data flows one way: socket → codec → classifier → shaper → reply.
//!
//! # Layout
//! - [`server`]: listeners, connections, dispatch of requests to the engine.
//! - [`protocol`]: wire codecs (policy, socketmap, JSON lines), the protocol-neutral
//!   request view and answer, protocol detection, and the `proto/` test vectors.
//! - [`classify`]: reply parsing and rule matching (pure).
//! - [`shaping`]: per-destination adaptive limits, stages, suspensions, suppressions.
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`store`]: state that survives restarts.
//! - [`metrics`]: Prometheus names, labels and exporter.
//! - [`daemon`], [`admin`], [`cli`], [`telemetry`]: process glue around the library.
//! - [`postfix`]: the main.cf / master.cf lines that wire Postfix to the daemon.
pub mod admin;
pub mod classify;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod idmap;
pub mod metrics;
pub mod postfix;
pub mod protocol;
pub mod server;
pub mod shaping;
pub mod store;
pub mod telemetry;
