//! Reply classification: every SMTP reply → class, provider, blamed identity.
//!
//! Pure and synchronous: no I/O, no clock, no per-reply heap allocation beyond the
//! returned [`Verdict`] (which is `Copy`). Rules are data (`config/rules/*.toml`),
//! compiled once into a matcher that does not scan the rule list per reply: one
//! literal scan over the reply names the candidate rules (`prefilter`), which are
//! then tried in priority order; the first whose conditions and regex hold decides.
//!
//! # Layout
//! - [`types`]: the vocabulary (classes, blamed identities, stages, enhanced codes).
//! - [`parse`](mod@parse): reply forms → codes, text, context ([`Parsed`]).
//! - [`rules`]: rule files → compiled rules and providers, with load errors.
//! - `prefilter`: literal extraction and the automaton.
//! - `conditions`: the rules' code, stage and scope conditions as masks.
//! - [`cli`]: `mxpace classify`.

pub mod cli;
mod conditions;
mod hosts;
pub mod parse;
mod prefilter;
pub mod rules;
pub mod types;

pub use parse::{parse, Form, Parsed};
pub use rules::{RulesError, BUILTIN_SOURCES};
pub use types::{Blamed, Class, Enhanced, SmtpStage};

use rules::Compiled;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Index into the classifier's provider table; `ProviderId::NONE` (0) = not known.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ProviderId(pub u16);

impl ProviderId {
    pub const NONE: ProviderId = ProviderId(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
    fn or(self, other: ProviderId) -> ProviderId {
        if self.is_none() {
            other
        } else {
            self
        }
    }
}

/// Index into the classifier's rule table (for `--explain` and logs); `RuleId(0)` = no rule.
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

/// How the provider of a verdict was found (for `--explain`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProviderSource {
    None,
    MxHint,
    MxInReply,
    Rule,
    RecipientDomain,
    /// Index into the token table.
    Token(u16),
}

/// A cold-path account of one decision: everything `--explain` prints.
#[derive(Clone, Debug)]
pub struct Explanation<'a> {
    pub parsed: Parsed<'a>,
    /// The text the rules were matched against (continuation codes removed).
    pub match_text: String,
    pub verdict: Verdict,
    pub rule_id: String,
    pub rule_origin: String,
    pub rule_priority: Option<i32>,
    pub description: String,
    pub advice: String,
    pub provider: String,
    pub provider_source: String,
    /// Candidate rules tried (a literal of theirs occurred, or they have none, and their
    /// code, stage and scope conditions hold), in priority order, up to and including the
    /// deciding one.
    pub candidates: Vec<String>,
}

/// The compiled rule set. Cheap to clone (shared, immutable).
#[derive(Clone)]
pub struct Classifier {
    inner: Arc<Compiled>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("rules", &self.inner.rules.len())
            .field("providers", &self.inner.providers.len())
            .field("tokens", &self.inner.tokens.len())
            .finish()
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::builtin()
    }
}

use prefilter::{CANDIDATE_WORDS, NO_BIT, NO_KEY, TOKEN_KEY, UNLESS_KEY};

/// Stack copy for stripping continuations from texts up to this length (most multi-line
/// replies); longer ones get a copy of [`parse::MAX_REPLY_LEN`].
const SHORT_COPY: usize = 512;

/// Candidate-set words that fit most rule sets (512 rules and tokens): the set is cleared
/// per reply, and the largest one is 544 bytes.
const SMALL_WORDS: usize = 8;

/// Where the prefilter's literals occurred: (rule or token key, start offset), packed in
/// one word, and a bit per entry for whether the occurrence is by itself a match. Bounded;
/// on overflow every candidate is verified with a whole-text search instead.
#[derive(Default)]
struct Hits {
    at: [u32; 32],
    proven: u32,
    len: usize,
    overflow: bool,
}

impl Hits {
    #[inline]
    fn push(&mut self, key: u16, start: usize, proven: bool) {
        if self.len < self.at.len() && start <= u16::MAX as usize {
            self.at[self.len] = (key as u32) << 16 | start as u32;
            self.proven |= (proven as u32) << self.len;
            self.len += 1;
        } else {
            self.overflow = true;
        }
    }

    /// Did a literal of `key` occur?
    #[inline]
    fn has(&self, key: u16) -> bool {
        self.at[..self.len].iter().any(|&h| (h >> 16) as u16 == key)
    }

    /// Does `re` match `text`? For anchored candidates only at the literal offsets: a match
    /// must start at one, and an anchored search fails within a few bytes elsewhere.
    #[inline]
    fn verify(
        &self,
        re: &regex_automata::meta::Regex,
        anchored: bool,
        key: u16,
        text: &str,
    ) -> bool {
        use regex_automata::{Anchored, Input};
        let mine = || {
            self.at[..self.len]
                .iter()
                .enumerate()
                .filter(move |(_, &h)| (h >> 16) as u16 == key)
        };
        if mine().any(|(i, _)| self.proven >> i & 1 != 0) {
            return true;
        }
        if !anchored || self.overflow {
            return re.is_match(text);
        }
        mine().any(|(_, &h)| {
            re.is_match(
                Input::new(text)
                    .range((h & 0xFFFF) as usize..)
                    .anchored(Anchored::Yes),
            )
        })
    }
}

/// Whether a literal occurrence at `start..end` is a match by itself, given its proof bits.
#[inline]
fn proven(proof: u8, text: &[u8], start: usize, end: usize) -> bool {
    use prefilter::{PROVES, WB_AFTER, WB_BEFORE};
    // ASCII word bytes, as `(?-u:\b)` sees them.
    let word = |i: usize| {
        text.get(i)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_')
    };
    proof & PROVES != 0
        && (proof & WB_BEFORE == 0 || (start > 0 && word(start - 1)) != word(start))
        && (proof & WB_AFTER == 0 || word(end - 1) != word(end))
}

/// What the hot path found before choosing a rule.
struct Decision {
    verdict: Verdict,
    provider_source: ProviderSource,
}

impl Classifier {
    /// The classifier compiled from the embedded default rules (compiled once per process).
    pub fn builtin() -> Classifier {
        static BUILTIN: OnceLock<Classifier> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                Classifier::from_sources(BUILTIN_SOURCES)
                    .unwrap_or_else(|e| panic!("embedded rules are invalid: {e}"))
            })
            .clone()
    }

    /// Compiles exactly these sources, `(origin name, TOML text)`, in order. A source whose
    /// file name equals an earlier one's replaces it; pass [`BUILTIN_SOURCES`] first to
    /// extend or override the defaults.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Classifier, RulesError> {
        Ok(Classifier {
            inner: Arc::new(rules::compile(sources)?),
        })
    }

    /// The embedded rules, extended or overridden by these files (operator `--rules`).
    pub fn from_files(paths: &[PathBuf]) -> Result<Classifier, RulesError> {
        let mut texts = Vec::with_capacity(paths.len());
        for p in paths {
            let origin = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| RulesError::Io {
                origin: origin.clone(),
                source,
            })?;
            texts.push((origin, text));
        }
        let mut sources: Vec<(&str, &str)> = BUILTIN_SOURCES.to_vec();
        sources.extend(texts.iter().map(|(o, t)| (o.as_str(), t.as_str())));
        Classifier::from_sources(&sources)
    }

    /// Classifies one reply in any supported form. Allocation-free.
    pub fn classify(&self, reply: &str, hints: Hints<'_>) -> Verdict {
        let parsed = parse(reply);
        if parse::needs_strip(parsed.text, parsed.code) {
            // Only multi-line replies pay for the copy, on the stack. It is never longer than
            // the text: most need only a small buffer zeroed.
            let mut short = [0u8; SHORT_COPY];
            let mut long;
            let buf: &mut [u8] = if parsed.text.len() <= SHORT_COPY {
                &mut short
            } else {
                long = [0u8; parse::MAX_REPLY_LEN];
                &mut long
            };
            let text = parse::rewrite_continuations(parsed.text, parsed.code, parsed.enhanced, buf);
            self.decide(&parsed, text, hints, |_| {}).verdict
        } else {
            self.decide(&parsed, parsed.text, hints, |_| {}).verdict
        }
    }

    /// Like [`classify`](Self::classify), with the parts and the reasons (cold path).
    pub fn explain<'a>(&self, reply: &'a str, hints: Hints<'_>) -> Explanation<'a> {
        let parsed = parse(reply);
        let mut buf = vec![0u8; parse::MAX_REPLY_LEN];
        let text = parse::strip_continuations(parsed.text, parsed.code, parsed.enhanced, &mut buf);
        let mut candidates = Vec::new();
        let d = self.decide(&parsed, text, hints, |r| candidates.push(r));
        let rule = self.rule(d.verdict.rule);
        let provider_source = match d.provider_source {
            ProviderSource::None => String::new(),
            ProviderSource::MxHint => "mx host given by the MTA".into(),
            ProviderSource::MxInReply => "mx host in the reply".into(),
            ProviderSource::Rule => "the deciding rule's wording".into(),
            ProviderSource::RecipientDomain => "recipient domain".into(),
            ProviderSource::Token(t) => {
                format!("token /{}/", self.inner.tokens[t as usize].source)
            }
        };
        Explanation {
            parsed,
            match_text: text.to_string(),
            verdict: d.verdict,
            rule_id: rule.map(|r| r.id.to_string()).unwrap_or_default(),
            rule_origin: rule
                .map(|r| format!("{}:{}", r.origin, r.line))
                .unwrap_or_default(),
            rule_priority: rule.map(|r| r.priority),
            description: rule.map(|r| r.description.to_string()).unwrap_or_default(),
            advice: rule.map(|r| r.advice.to_string()).unwrap_or_default(),
            provider: self.provider_name(d.verdict.provider).to_string(),
            provider_source,
            candidates: candidates
                .into_iter()
                .map(|r| self.inner.rules[r].id.to_string())
                .collect(),
        }
    }

    fn rule(&self, id: RuleId) -> Option<&rules::Rule> {
        (id.0 as usize)
            .checked_sub(1)
            .and_then(|i| self.inner.rules.get(i))
    }

    /// The hot path proper: prefilter, provider, first matching rule. `seen` is told every
    /// candidate rule tried (for `--explain`).
    fn decide(
        &self,
        parsed: &Parsed<'_>,
        text: &str,
        hints: Hints<'_>,
        seen: impl FnMut(usize),
    ) -> Decision {
        if self.inner.prefilter.always.len() <= SMALL_WORDS {
            self.decide_in::<SMALL_WORDS>(parsed, text, hints, seen)
        } else {
            self.decide_in::<CANDIDATE_WORDS>(parsed, text, hints, seen)
        }
    }

    /// [`decide`](Self::decide) with a candidate set of `W` words.
    #[inline(always)]
    fn decide_in<const W: usize>(
        &self,
        parsed: &Parsed<'_>,
        text: &str,
        hints: Hints<'_>,
        mut seen: impl FnMut(usize),
    ) -> Decision {
        let c = &*self.inner;
        let enhanced = parsed
            .effective_enhanced()
            .or_else(|| hints.status.and_then(|s| Enhanced::parse(s.trim_ascii())));

        // Candidate rules and tokens from one automaton pass. Where each literal occurred is
        // kept (bounded) so anchored rules verify at those offsets only.
        let pf = &c.prefilter;
        // Candidate rules, then tokens (from word `token_word`).
        let mut cand = [0u64; W];
        cand[..pf.always.len()].copy_from_slice(&pf.always);
        let mut hits = Hits::default();
        {
            let bytes = text.as_bytes();
            pf.scanner.for_each(bytes, |lit, start, end| {
                let (lo, hi) = (pf.spans[lit].0 as usize, pf.spans[lit].1 as usize);
                for l in &pf.lights[lo..hi] {
                    if l.bit != NO_BIT {
                        cand[l.bit as usize / 64] |= 1 << (l.bit % 64);
                    }
                    if l.key != NO_KEY {
                        hits.push(
                            l.key,
                            start,
                            l.proof != 0 && proven(l.proof, bytes, start, end),
                        );
                    }
                }
            });
        }
        let (rules, tokens) = cand[..pf.always.len()].split_at_mut(pf.token_word);

        // Provider: the MX host is the strongest evidence, then the recipient's domain,
        // then tokens in the text.
        let mut source = ProviderSource::None;
        let mut detected = ProviderId::NONE;
        if let Some(h) = hints.mx_host {
            detected = self.provider_for_mx(h);
            if !detected.is_none() {
                source = ProviderSource::MxHint;
            }
        }
        if detected.is_none() {
            if let Some(h) = parsed.mx_host {
                detected = self.provider_for_mx(h);
                if !detected.is_none() {
                    source = ProviderSource::MxInReply;
                }
            }
        }
        let by_host = detected;
        let mut by_domain = ProviderId::NONE;
        if let Some(d) = parsed
            .recipient
            .and_then(|r| r.rsplit_once('@'))
            .map(|(_, d)| d)
        {
            by_domain = self.provider_for_domain(d);
        }
        let mut by_token = (ProviderId::NONE, 0u16);
        // Tokens are the weakest evidence: with a provider from the MX host or the
        // recipient's domain they decide nothing, and their regexes need not run.
        let tokens: &[u64] = if by_host.is_none() && by_domain.is_none() {
            tokens
        } else {
            &[]
        };
        'tokens: for (w, &word) in tokens.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let k = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let t = &c.tokens[k];
                if hits.verify(&t.re, pf.token_anchored[k], TOKEN_KEY | k as u16, text)
                    || parsed.mx_host.is_some_and(|h| t.re.is_match(h))
                    || hints.mx_host.is_some_and(|h| t.re.is_match(h))
                {
                    by_token = (t.provider, k as u16);
                    break 'tokens;
                }
            }
        }
        if detected.is_none() {
            detected = by_domain.or(by_token.0);
        }

        // First rule in priority order whose conditions hold: those whose code, stage or
        // scope conditions fail leave the set first.
        c.conditions
            .restrict::<W>(rules, parsed.code, enhanced, parsed.stage, detected);
        let mut chosen: Option<usize> = None;
        'rules: for (w, &word) in rules.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let r = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let rule = &c.rules[r];
                seen(r);
                debug_assert!(rule.conditions_hold(parsed.code, enhanced, parsed.stage, detected));
                if let Some(re) = &rule.text {
                    if !hits.verify(re, pf.rule_anchored[r], r as u16, text) {
                        continue;
                    }
                }
                if let Some(re) = &rule.unless {
                    // An indexed `unless` can only match where one of its literals occurred.
                    let key = UNLESS_KEY | r as u16;
                    let matched = if pf.unless_indexed[r] {
                        (hits.overflow || hits.has(key))
                            && hits.verify(re, pf.unless_anchored[r], key, text)
                    } else {
                        re.is_match(text)
                    };
                    if matched {
                        continue;
                    }
                }
                chosen = Some(r);
                break 'rules;
            }
        }

        let rule = chosen.map(|r| &c.rules[r]);
        let provider = if !by_host.is_none() {
            by_host
        } else if let Some(p) = rule.map(|r| r.provider).filter(|p| !p.is_none()) {
            source = ProviderSource::Rule;
            p
        } else if !by_domain.is_none() {
            source = ProviderSource::RecipientDomain;
            by_domain
        } else if !by_token.0.is_none() {
            source = ProviderSource::Token(by_token.1);
            by_token.0
        } else {
            ProviderId::NONE
        };
        let permanent = match (parsed.code, enhanced) {
            (Some(code), _) => code >= 500,
            (None, Some(e)) => e.is_permanent(),
            (None, None) => rule.and_then(|r| r.permanent).unwrap_or(false),
        };
        Decision {
            verdict: Verdict {
                class: rule.map_or(Class::Unknown, |r| r.class),
                provider,
                blamed: rule.map_or(Blamed::None, |r| r.blamed),
                permanent,
                code: parsed.code,
                enhanced,
                rule: RuleId(chosen.map_or(0, |r| r as u16 + 1)),
            },
            provider_source: source,
        }
    }

    /// Provider names, indexed by `ProviderId` (index 0 is the empty name).
    pub fn provider_name(&self, id: ProviderId) -> &str {
        self.inner
            .providers
            .get(id.0 as usize)
            .map_or("", |p| &p.name)
    }

    /// The provider with this name, if declared.
    pub fn provider_by_name(&self, name: &str) -> Option<ProviderId> {
        self.inner
            .providers
            .iter()
            .position(|p| !p.name.is_empty() && p.name.eq_ignore_ascii_case(name))
            .map(|i| ProviderId(i as u16))
    }

    /// The provider's human description from its rule file.
    pub fn provider_description(&self, id: ProviderId) -> &str {
        self.inner
            .providers
            .get(id.0 as usize)
            .map_or("", |p| &p.description)
    }

    /// Provider whose MX patterns match `host` (case-insensitive).
    pub fn provider_for_mx(&self, host: &str) -> ProviderId {
        self.inner
            .mx_index
            .lookup(host.trim_ascii().trim_end_matches('.').as_bytes())
    }

    /// Provider that owns the recipient `domain` (case-insensitive).
    pub fn provider_for_domain(&self, domain: &str) -> ProviderId {
        self.inner
            .domain_index
            .lookup(domain.trim_ascii().trim_end_matches('.').as_bytes())
    }

    /// Number of providers including the unnamed one at index 0.
    pub fn provider_count(&self) -> usize {
        self.inner.providers.len()
    }

    /// The id string of a rule (`""` for `RuleId(0)`, no rule matched).
    pub fn rule_id_str(&self, id: RuleId) -> &str {
        self.rule(id).map_or("", |r| &r.id)
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.inner.rules.len()
    }

    /// Rule ids in the order they are tried.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.inner.rules.iter().map(|r| &*r.id)
    }

    /// The operator advice attached to a rule.
    pub fn rule_advice(&self, id: RuleId) -> &str {
        self.rule(id).map_or("", |r| &r.advice)
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.parsed;
        let v = &self.verdict;
        let opt = |s: Option<&str>| s.unwrap_or("-").to_string();
        writeln!(f, "form:        {}", p.form.as_str())?;
        writeln!(
            f,
            "code:        {}",
            v.code.map_or("-".into(), |c| c.to_string())
        )?;
        writeln!(
            f,
            "enhanced:    {}",
            v.enhanced.map_or("-".into(), |e| e.to_string())
        )?;
        writeln!(f, "mx host:     {}", opt(p.mx_host))?;
        writeln!(f, "mx ip:       {}", opt(p.mx_ip))?;
        writeln!(f, "stage:       {}", opt(p.stage.map(|s| s.as_str())))?;
        writeln!(f, "recipient:   {}", opt(p.recipient))?;
        writeln!(f, "text:        {}", self.match_text)?;
        writeln!(f, "class:       {}", v.class)?;
        writeln!(
            f,
            "provider:    {}{}",
            if self.provider.is_empty() {
                "-"
            } else {
                &self.provider
            },
            if self.provider_source.is_empty() {
                String::new()
            } else {
                format!(" (from {})", self.provider_source)
            }
        )?;
        writeln!(f, "blamed:      {}", v.blamed)?;
        writeln!(f, "permanent:   {}", v.permanent)?;
        if self.rule_id.is_empty() {
            writeln!(f, "rule:        - (no rule matched)")?;
        } else {
            writeln!(
                f,
                "rule:        {} (priority {}, {})",
                self.rule_id,
                self.rule_priority.unwrap_or_default(),
                self.rule_origin
            )?;
            writeln!(f, "meaning:     {}", self.description)?;
        }
        if !self.advice.is_empty() {
            writeln!(f, "next step:   {}", self.advice)?;
        }
        if self.candidates.len() > 1 {
            writeln!(f, "considered:  {}", self.candidates.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
