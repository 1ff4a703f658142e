//! Adaptive shaping: destinations (site × sending identity), their tiers, stages,
//! suspensions and the suppression list.
//!
//! - [`clock`]: the injectable time source shared with the governor limiters.
//! - [`intern`]: compact ids for domains, pools and MX hosts.
//! - [`mx`]: MX rollup of unlisted domains, resolved in the background.
//! - [`site`]: provider groups and recipient domains.
//! - [`stage`]: windowed counts and the trusted → rejecting stage.
//! - [`state`]: one destination's adaptive state and its pure transition rules.
//! - [`suppress`]: the suppression list.
//! - [`engine`]: ties them together behind one lock for the daemon.

pub mod clock;
pub mod engine;
pub mod intern;
pub mod mx;
pub mod site;
pub mod stage;
pub mod state;
pub mod suppress;

pub use clock::EngineClock;
pub use engine::{
    Action, Admission, Decision, DestinationView, Engine, Hold, PolicyVerdict, ReportInput,
};
pub use engine::{AdmitPlan, Shared};
pub use stage::Stage;
