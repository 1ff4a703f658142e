//! mxpace: a sidecar that classifies SMTP replies and paces delivery per destination.
//!
//! # Layout
//! - [`classify`]: reply parsing and rule matching (pure).
pub mod classify;
