//! mxpace: a sidecar that classifies SMTP replies and paces delivery per destination.
//!
//! # Layout
//! - [`classify`]: reply parsing and rule matching (pure).
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`shaping`]: per-destination adaptive limits, stages, suspensions, suppressions.
//! - [`postfix`]: the main.cf / master.cf lines that wire Postfix to the daemon.
pub mod classify;
pub mod config;
pub mod postfix;
pub mod shaping;
