//! Reply classification: every SMTP reply → class, provider, blamed identity.
//!
//! Pure and synchronous: no I/O, no clock, no per-reply heap allocation beyond the
//! returned [`Verdict`] (which is `Copy`). Rules are data (`config/rules/*.toml`),
//! compiled once into a matcher that does not scan the rule list per reply.

pub mod types;

pub use types::{Blamed, Class, Enhanced, SmtpStage};

/// Index into the classifier's provider table; `ProviderId::NONE` (0) = not known.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ProviderId(pub u16);

impl ProviderId {
    pub const NONE: ProviderId = ProviderId(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

/// Index into the classifier's rule table (for `--explain` and logs).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleId(pub u16);

/// Context an MTA may send beside the reply text (policy / JSON attributes).
#[derive(Copy, Clone, Debug, Default)]
pub struct Hints<'a> {
    /// MX host name that gave the reply, when the MTA knows it.
    pub mx_host: Option<&'a str>,
    /// The enhanced status code the MTA attached (`status=` attribute, status-filter key).
    pub status: Option<&'a str>,
}

/// The decision for one reply.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    pub provider: ProviderId,
    pub blamed: Blamed,
    /// The base code's verdict (5xx, or 5.x.x when there is no base code).
    pub permanent: bool,
    pub code: Option<u16>,
    pub enhanced: Option<Enhanced>,
    pub rule: RuleId,
}

/// Placeholder until the rule engine lands: classifies everything as unknown.
#[derive(Debug, Default)]
pub struct Classifier {}

impl Classifier {
    /// The classifier compiled from the embedded default rules.
    pub fn builtin() -> Classifier {
        Classifier {}
    }

    /// The built-in rules extended by operator files.
    pub fn from_files(_paths: &[std::path::PathBuf]) -> Result<Classifier, String> {
        Ok(Classifier {})
    }

    pub fn classify(&self, _reply: &str, _hints: Hints<'_>) -> Verdict {
        Verdict {
            class: Class::Unknown,
            provider: ProviderId::NONE,
            blamed: Blamed::None,
            permanent: false,
            code: None,
            enhanced: None,
            rule: RuleId(0),
        }
    }

    /// Provider names, indexed by `ProviderId` (index 0 is the empty name).
    pub fn provider_name(&self, _id: ProviderId) -> &str {
        ""
    }

    /// Provider whose MX patterns match `host` (case-insensitive).
    pub fn provider_for_mx(&self, _host: &str) -> ProviderId {
        ProviderId::NONE
    }

    /// Provider that owns the recipient `domain` (case-insensitive).
    pub fn provider_for_domain(&self, _domain: &str) -> ProviderId {
        ProviderId::NONE
    }

    pub fn provider_count(&self) -> usize {
        1
    }
}
