//! mxpace: a sidecar that classifies SMTP replies and paces delivery per destination.
//!
//! # Layout
//! - [`classify`]: reply parsing and rule matching (pure).
//! - [`protocol`]: wire codecs (policy, socketmap, JSON lines), the protocol-neutral
//!   request view and answer, protocol detection, and the `proto/` test vectors.
pub mod classify;
pub mod protocol;
