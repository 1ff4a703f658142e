//! Rule files (TOML) → a compiled rule table, provider table and literal prefilter.
//!
//! Loading is the cold path: every problem is reported with the file, the line, the rule
//! id and what is wrong, and nothing half-valid is ever returned. The format is documented
//! field by field in `config/rules/README.md`.

use super::conditions::Conditions;
use super::hosts::HostIndex;
use super::prefilter::{self, Prefilter, Target};
use super::types::{Blamed, Class, Enhanced, SmtpStage};
use super::ProviderId;
use regex_automata::meta::{self, Regex};
use regex_automata::util::syntax;
use serde::Deserialize;
use toml::Spanned;

/// The rule files shipped in the binary, in load order.
pub const BUILTIN_SOURCES: &[(&str, &str)] = &[
    (
        "config/rules/generic.toml",
        include_str!("../../config/rules/generic.toml"),
    ),
    (
        "config/rules/blocklists.toml",
        include_str!("../../config/rules/blocklists.toml"),
    ),
    (
        "config/rules/gmail.toml",
        include_str!("../../config/rules/gmail.toml"),
    ),
    (
        "config/rules/microsoft.toml",
        include_str!("../../config/rules/microsoft.toml"),
    ),
    (
        "config/rules/yahoo.toml",
        include_str!("../../config/rules/yahoo.toml"),
    ),
    (
        "config/rules/apple.toml",
        include_str!("../../config/rules/apple.toml"),
    ),
    (
        "config/rules/orange.toml",
        include_str!("../../config/rules/orange.toml"),
    ),
    (
        "config/rules/gmx.toml",
        include_str!("../../config/rules/gmx.toml"),
    ),
    (
        "config/rules/comcast.toml",
        include_str!("../../config/rules/comcast.toml"),
    ),
];

/// Upper bound on rules (the per-reply candidate bitset lives on the stack).
pub const MAX_RULES: usize = 4096;
/// Upper bound on provider tokens (same reason).
pub const MAX_TOKENS: usize = 256;

/// Why a rule set was refused. Every variant names the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{origin}: cannot read: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or schema error (unknown field, wrong type); the message carries the line.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}:{line}: rule `{rule}`: {problem}")]
    Rule {
        origin: String,
        line: usize,
        rule: String,
        problem: String,
    },
    #[error("{origin}:{line}: provider `{provider}`: {problem}")]
    Provider {
        origin: String,
        line: usize,
        provider: String,
        problem: String,
    },
    #[error("{origin}: {problem}")]
    File { origin: String, problem: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    provider: Option<Spanned<ProviderDef>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleDef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderDef {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    mx: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    tokens: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    id: String,
    priority: i32,
    #[serde(default)]
    description: String,
    #[serde(default)]
    advice: String,
    text: Option<String>,
    unless: Option<String>,
    code: Option<OneOrMany>,
    enhanced: Option<OneOrMany>,
    stage: Option<OneOrMany>,
    scope: Option<String>,
    class: String,
    blamed: Option<String>,
    provider: Option<String>,
    permanent: Option<bool>,
    #[serde(default, rename = "override")]
    override_: bool,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

/// A numeric range from a pattern component: `550`, `5xx`, `6xx`, `x`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    pub lo: u16,
    pub hi: u16,
}

impl Range {
    const ANY: Range = Range {
        lo: 0,
        hi: u16::MAX,
    };

    fn parse(s: &str) -> Option<Range> {
        if s.is_empty() || s.len() > 3 {
            return None;
        }
        let digits = s.trim_end_matches(['x', 'X', '*']);
        if digits.is_empty() {
            return Some(Range::ANY);
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let scale = 10u16.pow((s.len() - digits.len()) as u32);
        let base: u16 = digits.parse().ok()?;
        Some(Range {
            lo: base * scale,
            hi: base * scale + scale - 1,
        })
    }

    pub fn contains(self, v: u16) -> bool {
        self.lo <= v && v <= self.hi
    }
}

/// `5.7.x`, `x.7.28`, `4.7.5xx`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct EnhancedPattern {
    pub class: Range,
    pub subject: Range,
    pub detail: Range,
}

impl EnhancedPattern {
    fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let p = EnhancedPattern {
            class: Range::parse(it.next()?)?,
            subject: Range::parse(it.next()?)?,
            detail: Range::parse(it.next()?)?,
        };
        it.next().is_none().then_some(p)
    }

    fn matches(self, e: Enhanced) -> bool {
        self.class.contains(e.class as u16)
            && self.subject.contains(e.subject)
            && self.detail.contains(e.detail)
    }
}

/// One compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub id: Box<str>,
    pub origin: Box<str>,
    pub line: usize,
    pub priority: i32,
    pub text: Option<Regex>,
    /// The `text` pattern as written (for the prefilter's literal extraction).
    pub text_source: Option<Box<str>>,
    pub unless: Option<Regex>,
    /// The `unless` pattern as written (prefilter literals, like `text_source`).
    pub unless_source: Option<Box<str>>,
    pub code: Box<[Range]>,
    pub enhanced: Box<[EnhancedPattern]>,
    /// Bit `1 << stage index`; 0 = any stage.
    pub stages: u16,
    pub scope: ProviderId,
    pub class: Class,
    pub blamed: Blamed,
    pub provider: ProviderId,
    pub permanent: Option<bool>,
    pub description: Box<str>,
    pub advice: Box<str>,
}

impl Rule {
    /// Every condition except the regexes. The hot path uses the same conditions as masks
    /// ([`Conditions`]); this is their definition, which the masks are checked against.
    #[inline]
    pub fn conditions_hold(
        &self,
        code: Option<u16>,
        enhanced: Option<Enhanced>,
        stage: Option<SmtpStage>,
        provider: ProviderId,
    ) -> bool {
        if !self.scope.is_none() && self.scope != provider {
            return false;
        }
        if !self.code.is_empty() {
            match code {
                Some(c) if self.code.iter().any(|r| r.contains(c)) => {}
                _ => return false,
            }
        }
        if !self.enhanced.is_empty() {
            match enhanced {
                Some(e) if self.enhanced.iter().any(|p| p.matches(e)) => {}
                _ => return false,
            }
        }
        if self.stages != 0 {
            match stage {
                Some(s) if self.stages & stage_bit(s) != 0 => {}
                _ => return false,
            }
        }
        true
    }
}

const _: () = assert!(SmtpStage::ALL.len() <= 16);

/// A stage's bit in [`Rule::stages`] (its declaration index).
pub(crate) fn stage_bit(s: SmtpStage) -> u16 {
    1 << s as u16
}

/// A host / domain pattern: exact, `*.suffix`, or with `*` anywhere
/// (`mta*.am0.yahoodns.net`). The first two, by far the most common, compare in one pass.
#[derive(Clone, Debug)]
pub(crate) enum Glob {
    Exact(Box<str>),
    /// `*.google.com` stored as `.google.com`.
    Suffix(Box<str>),
    Wild(Box<str>),
}

impl Glob {
    pub(crate) fn new(s: &str) -> Glob {
        let p = s.trim().trim_end_matches('.').to_ascii_lowercase();
        match p.strip_prefix('*') {
            _ if !p.contains('*') => Glob::Exact(p.into()),
            Some(rest) if !rest.contains('*') => Glob::Suffix(rest.into()),
            _ => Glob::Wild(p.into()),
        }
    }

    /// ASCII case-insensitive match without allocation.
    #[cfg(test)]
    pub fn matches(&self, s: &str) -> bool {
        self.matches_trimmed(s.trim_end_matches('.').as_bytes())
    }

    /// [`matches`](Self::matches) for a name whose trailing dots are already gone (the
    /// provider lookups trim once, then try every pattern).
    #[inline]
    pub fn matches_trimmed(&self, s: &[u8]) -> bool {
        match self {
            Glob::Exact(p) => s.eq_ignore_ascii_case(p.as_bytes()),
            Glob::Suffix(p) => {
                s.len() > p.len() && s[s.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
            Glob::Wild(p) => glob_match(p.as_bytes(), s),
        }
    }
}

fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Classic two-pointer wildcard match with backtracking to the last `*`.
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (usize::MAX, 0);
    while i < s.len() {
        if p < pat.len() && pat[p] != b'*' && pat[p] == s[i].to_ascii_lowercase() {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = p;
            mark = i;
            p += 1;
        } else if star != usize::MAX {
            p = star + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

#[derive(Debug)]
pub(crate) struct Provider {
    pub name: Box<str>,
    pub description: Box<str>,
    pub mx: Vec<Glob>,
    pub domains: Vec<Glob>,
}

#[derive(Debug)]
pub(crate) struct Token {
    pub provider: ProviderId,
    pub source: Box<str>,
    pub re: Regex,
}

/// Everything the hot path needs, built once.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// Sorted by (priority, load order); `RuleId(i + 1)` is `rules[i]`.
    pub rules: Vec<Rule>,
    /// Index 0 is the unnamed "no provider".
    pub providers: Vec<Provider>,
    pub tokens: Vec<Token>,
    pub prefilter: Prefilter,
    /// The rules' code, stage and scope conditions as masks.
    pub conditions: Conditions,
    /// Providers' MX host patterns and recipient domain patterns, for one-walk lookups.
    pub mx_index: HostIndex,
    pub domain_index: HostIndex,
}

struct Pending {
    def: RuleDef,
    origin: String,
    line: usize,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Compiles `sources` (origin name, TOML text). A later source whose file name equals an
/// earlier one's replaces it whole; a rule with an id already defined is refused unless it
/// says `override = true`.
pub(crate) fn compile(sources: &[(&str, &str)]) -> Result<Compiled, RulesError> {
    let mut layered: Vec<(&str, &str)> = Vec::new();
    for &(origin, text) in sources {
        let base = file_name(origin);
        match layered.iter_mut().find(|(o, _)| file_name(o) == base) {
            Some(slot) => *slot = (origin, text),
            None => layered.push((origin, text)),
        }
    }

    let mut providers = vec![Provider {
        name: "".into(),
        description: "".into(),
        mx: vec![],
        domains: vec![],
    }];
    let mut token_defs: Vec<(ProviderId, String, String, usize, String)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();

    for &(origin, text) in &layered {
        let file: FileDef = toml::from_str(text).map_err(|e| RulesError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if let Some(p) = file.provider {
            let line = line_of(text, p.span().start);
            let p = p.into_inner();
            let err = |problem: String| RulesError::Provider {
                origin: origin.to_string(),
                line,
                provider: p.name.clone(),
                problem,
            };
            if p.name.is_empty()
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
            {
                return Err(err(
                    "name must be lowercase letters, digits, `_`, `-` or `.`".into(),
                ));
            }
            if providers.iter().any(|q| *q.name == *p.name) {
                return Err(err("defined twice".into()));
            }
            let id = ProviderId(providers.len() as u16);
            for t in &p.tokens {
                token_defs.push((id, t.clone(), origin.to_string(), line, p.name.clone()));
            }
            providers.push(Provider {
                name: p.name.as_str().into(),
                description: p.description.as_str().into(),
                mx: p.mx.iter().map(|s| Glob::new(s)).collect(),
                domains: p.domains.iter().map(|s| Glob::new(s)).collect(),
            });
        }
        for r in file.rule {
            let line = line_of(text, r.span().start);
            let def = r.into_inner();
            let err = |problem: &str| RulesError::Rule {
                origin: origin.to_string(),
                line,
                rule: def.id.clone(),
                problem: problem.to_string(),
            };
            if def.id.is_empty() {
                return Err(err("empty id"));
            }
            match pending.iter().position(|p| p.def.id == def.id) {
                Some(_) if !def.override_ => {
                    let first = &pending[pending.iter().position(|p| p.def.id == def.id).unwrap()];
                    return Err(err(&format!(
                        "duplicate id (first defined at {}:{}); add `override = true` to replace it",
                        first.origin, first.line
                    )));
                }
                Some(i) => {
                    pending[i] = Pending {
                        def,
                        origin: origin.to_string(),
                        line,
                    };
                }
                None if def.override_ => {
                    return Err(err("`override = true` but no earlier rule has this id"));
                }
                None => pending.push(Pending {
                    def,
                    origin: origin.to_string(),
                    line,
                }),
            }
        }
    }

    let provider_id = |name: &str| -> Option<ProviderId> {
        providers
            .iter()
            .position(|p| *p.name == *name)
            .map(|i| ProviderId(i as u16))
    };

    let mut rules = Vec::with_capacity(pending.len());
    for Pending { def, origin, line } in pending {
        if !def.enabled {
            continue;
        }
        let err = |problem: String| RulesError::Rule {
            origin: origin.clone(),
            line,
            rule: def.id.clone(),
            problem,
        };
        let class = Class::parse(&def.class).ok_or_else(|| {
            err(format!(
                "unknown class `{}` (one of: {})",
                def.class,
                names(Class::ALL.iter().map(|c| c.as_str()))
            ))
        })?;
        let blamed = match &def.blamed {
            None => class.default_blamed(),
            Some(b) => Blamed::parse(b).ok_or_else(|| {
                err(format!(
                    "unknown blamed `{b}` (one of: {})",
                    names(Blamed::ALL.iter().map(|c| c.as_str()))
                ))
            })?,
        };
        let regex = |field: &str, p: &Option<String>| -> Result<Option<Regex>, RulesError> {
            match p {
                None => Ok(None),
                Some(p) => build_regex(p)
                    .map(Some)
                    .map_err(|e| err(format!("bad regex in `{field}`: {e}"))),
            }
        };
        let text = regex("text", &def.text)?;
        let unless = regex("unless", &def.unless)?;
        let code = def
            .code
            .as_ref()
            .map(|c| c.items())
            .unwrap_or(&[])
            .iter()
            .map(|c| {
                Range::parse(c)
                    .filter(|r| c.len() == 3 && r.lo >= 200 && r.hi <= 599)
                    .ok_or_else(|| err(format!("bad code `{c}` (e.g. `421`, `45x`, `5xx`)")))
            })
            .collect::<Result<Box<[_]>, _>>()?;
        let enhanced = def
            .enhanced
            .as_ref()
            .map(|c| c.items())
            .unwrap_or(&[])
            .iter()
            .map(|c| {
                EnhancedPattern::parse(c).ok_or_else(|| {
                    err(format!(
                        "bad enhanced code `{c}` (e.g. `5.1.1`, `4.7.x`, `5.7.6xx`)"
                    ))
                })
            })
            .collect::<Result<Box<[_]>, _>>()?;
        let mut stages = 0u16;
        for s in def.stage.as_ref().map(|c| c.items()).unwrap_or(&[]) {
            let st = SmtpStage::parse(s).ok_or_else(|| {
                err(format!(
                    "unknown stage `{s}` (one of: {})",
                    names(SmtpStage::ALL.iter().map(|c| c.as_str()))
                ))
            })?;
            stages |= stage_bit(st);
        }
        let lookup = |field: &str, name: &Option<String>| -> Result<ProviderId, RulesError> {
            match name {
                None => Ok(ProviderId::NONE),
                Some(n) => provider_id(n).filter(|id| !id.is_none()).ok_or_else(|| {
                    err(format!(
                        "unknown provider `{n}` in `{field}` (declared: {})",
                        names(providers.iter().skip(1).map(|p| &*p.name))
                    ))
                }),
            }
        };
        let scope = lookup("scope", &def.scope)?;
        let provider = lookup("provider", &def.provider)?;
        if text.is_none()
            && code.is_empty()
            && enhanced.is_empty()
            && stages == 0
            && scope.is_none()
        {
            return Err(err(
                "no condition: give at least one of text, code, enhanced, stage, scope".into(),
            ));
        }
        if def.description.trim().is_empty() {
            return Err(err("missing `description`".into()));
        }
        rules.push(Rule {
            id: def.id.as_str().into(),
            origin: origin.as_str().into(),
            line,
            priority: def.priority,
            text,
            text_source: def.text.as_deref().map(Into::into),
            unless,
            unless_source: def.unless.as_deref().map(Into::into),
            code,
            enhanced,
            stages,
            scope,
            class,
            blamed,
            provider,
            permanent: def.permanent,
            description: def.description.trim().into(),
            advice: def.advice.trim().into(),
        });
    }
    // Stable: equal priorities keep load order.
    rules.sort_by_key(|r| r.priority);
    if rules.len() > MAX_RULES {
        return Err(RulesError::File {
            origin: "rules".into(),
            problem: format!("{} rules, at most {MAX_RULES} are supported", rules.len()),
        });
    }

    let mut tokens = Vec::with_capacity(token_defs.len());
    for (provider, source, origin, line, name) in token_defs {
        let re = build_regex(&source).map_err(|e| RulesError::Provider {
            origin,
            line,
            provider: name,
            problem: format!("bad regex in `tokens`: {e}"),
        })?;
        tokens.push(Token {
            provider,
            source: source.into(),
            re,
        });
    }
    if tokens.len() > MAX_TOKENS {
        return Err(RulesError::File {
            origin: "rules".into(),
            problem: format!(
                "{} provider tokens, at most {MAX_TOKENS} are supported",
                tokens.len()
            ),
        });
    }

    let mut inputs: Vec<(Target, Option<&str>)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        inputs.push((Target::Rule(i as u32), r.text_source.as_deref()));
        if r.unless_source.is_some() {
            inputs.push((Target::Unless(i as u32), r.unless_source.as_deref()));
        }
    }
    for (i, t) in tokens.iter().enumerate() {
        inputs.push((Target::Token(i as u32), Some(&*t.source)));
    }
    let prefilter = prefilter::build(&inputs, rules.len(), tokens.len());

    let patterns = |f: fn(&Provider) -> &Vec<Glob>| {
        let ps = &providers;
        ps.iter()
            .enumerate()
            .skip(1)
            .flat_map(move |(i, p)| f(p).iter().map(move |g| (ProviderId(i as u16), g)))
    };
    let mx_index = HostIndex::new(patterns(|p| &p.mx));
    let domain_index = HostIndex::new(patterns(|p| &p.domains));

    let conditions = Conditions::new(&rules, providers.len());
    Ok(Compiled {
        rules,
        providers,
        tokens,
        prefilter,
        conditions,
        mx_index,
        domain_index,
    })
}

/// Compiles a rule regex: case-insensitive, bounded in size, and with `\b` / `\B` made
/// ASCII word boundaries. Unicode word boundaries make the fast DFA engines give up on any
/// non-ASCII reply (falling back to a slower engine that allocates); SMTP replies are ASCII
/// by protocol, and the few that are not gain nothing from Unicode-aware boundaries.
pub(crate) fn build_regex(pattern: &str) -> Result<Regex, Box<meta::BuildError>> {
    Regex::builder()
        .syntax(syntax::Config::new().case_insensitive(true))
        .configure(Regex::config().nfa_size_limit(Some(1 << 20)))
        .build(&ascii_word_boundaries(pattern))
        .map_err(Box::new)
}

/// Rewrites `\b` and `\B` (outside character classes) as `(?-u:\b)` and `(?-u:\B)`.
pub(crate) fn ascii_word_boundaries(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars();
    let mut class_depth = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(b @ ('b' | 'B')) if class_depth == 0 => {
                    out.push_str("(?-u:\\");
                    out.push(b);
                    out.push(')');
                }
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            },
            '[' => {
                class_depth += 1;
                out.push(c);
            }
            ']' if class_depth > 0 => {
                class_depth -= 1;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn file_name(origin: &str) -> &str {
    origin.rsplit(['/', '\\']).next().unwrap_or(origin)
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_one(text: &str) -> Result<Compiled, RulesError> {
        compile(&[("test.toml", text)])
    }

    fn err_of(text: &str) -> String {
        match compile_one(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    const OK_RULE: &str = r#"
[[rule]]
id = "a"
priority = 1
text = "user unknown"
class = "recipient_unknown"
description = "x"
"#;

    #[test]
    fn bad_rules_are_refused_with_file_line_rule_and_problem() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[[rule]]\nid = \"r1\"\npriority = 1\ntext = \"(unclosed\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["test.toml:1:", "rule `r1`", "bad regex in `text`"],
            ),
            (
                "\n\n[[rule]]\nid = \"r2\"\npriority = 1\ntext = \"x\"\nclass = \"spam\"\ndescription = \"x\"\n",
                &["test.toml:3:", "rule `r2`", "unknown class `spam`", "spam_rejected"],
            ),
            (
                "[[rule]]\nid = \"r3\"\npriority = 1\ntext = \"x\"\nclass = \"spam_rejected\"\ndescription = \"x\"\ncolour = \"red\"\n",
                &["test.toml", "unknown field `colour`", "line 7"],
            ),
            (
                &format!("{OK_RULE}{OK_RULE}"),
                &["test.toml:9:", "rule `a`", "duplicate id", "test.toml:2"],
            ),
            (
                "[[rule]]\nid = \"r5\"\npriority = 1\ntext = \"x\"\nclass = \"spam_rejected\"\nblamed = \"sender\"\ndescription = \"x\"\n",
                &["rule `r5`", "unknown blamed `sender`"],
            ),
            (
                "[[rule]]\nid = \"r6\"\npriority = 1\ncode = \"6xx\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["rule `r6`", "bad code `6xx`"],
            ),
            (
                "[[rule]]\nid = \"r7\"\npriority = 1\nenhanced = \"5.1\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["rule `r7`", "bad enhanced code `5.1`"],
            ),
            (
                "[[rule]]\nid = \"r8\"\npriority = 1\nscope = \"nowhere\"\ntext = \"x\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["rule `r8`", "unknown provider `nowhere` in `scope`"],
            ),
            (
                "[[rule]]\nid = \"r9\"\npriority = 1\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["rule `r9`", "no condition"],
            ),
            (
                "[[rule]]\nid = \"r10\"\npriority = 1\nstage = \"rcpt\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["rule `r10`", "unknown stage `rcpt`", "rcpt_to"],
            ),
            (
                "[[rule]]\nid = \"r11\"\npriority = 1\ntext = \"x\"\nclass = \"spam_rejected\"\noverride = true\ndescription = \"x\"\n",
                &["rule `r11`", "no earlier rule"],
            ),
            (
                "[[rule]]\nid = \"r12\"\npriority = \"high\"\ntext = \"x\"\nclass = \"spam_rejected\"\ndescription = \"x\"\n",
                &["test.toml", "line 3", "priority"],
            ),
            (
                "[provider]\nname = \"p\"\ntokens = [\"[unclosed\"]\n",
                &["test.toml:1:", "provider `p`", "bad regex in `tokens`"],
            ),
            (
                "[provider]\nname = \"Big Name\"\n",
                &["provider `Big Name`", "lowercase"],
            ),
            ("[[rule]]\nid = \"r13\"\npriority = 1\ntext = \"x\"\nclass = \"spam_rejected\"\n", &["rule `r13`", "missing `description`"]),
            ("this is not toml", &["test.toml", "line 1"]),
        ];
        for (text, wants) in cases {
            let msg = err_of(text);
            for w in *wants {
                assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn override_and_file_replacement() {
        let base = ("rules/base.toml", OK_RULE);
        let over = (
            "extra.toml",
            "[[rule]]\nid = \"a\"\npriority = 5\noverride = true\ntext = \"nobody\"\nclass = \"mailbox_disabled\"\ndescription = \"y\"\n",
        );
        let c = compile(&[base, over]).unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.rules[0].class, Class::MailboxDisabled);
        assert_eq!(&*c.rules[0].origin, "extra.toml");

        // Same file name: the whole file is replaced, so the same id is no duplicate.
        let replaced = (
            "/etc/mxpace/base.toml",
            "[[rule]]\nid = \"a\"\npriority = 5\ntext = \"gone\"\nclass = \"mailbox_full\"\ndescription = \"z\"\n",
        );
        let c = compile(&[base, replaced]).unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.rules[0].class, Class::MailboxFull);

        let disabled = (
            "extra.toml",
            "[[rule]]\nid = \"a\"\npriority = 5\noverride = true\nenabled = false\ntext = \"x\"\nclass = \"unknown\"\ndescription = \"off\"\n",
        );
        assert_eq!(compile(&[base, disabled]).unwrap().rules.len(), 0);
    }

    #[test]
    fn patterns() {
        let cases = [
            ("5xx", 500, true),
            ("5xx", 499, false),
            ("45x", 451, true),
            ("45x", 421, false),
            ("421", 421, true),
            ("x", 7, true),
        ];
        for (p, v, want) in cases {
            assert_eq!(Range::parse(p).unwrap().contains(v), want, "{p} {v}");
        }
        let e = |s| Enhanced::parse(s).unwrap();
        let p = EnhancedPattern::parse("5.7.6xx").unwrap();
        assert!(p.matches(e("5.7.606")) && !p.matches(e("5.7.1")));
        let p = EnhancedPattern::parse("x.7.28").unwrap();
        assert!(p.matches(e("4.7.28")) && p.matches(e("5.7.28")) && !p.matches(e("4.7.2")));
        assert!(EnhancedPattern::parse("5.7").is_none());
        assert!(EnhancedPattern::parse("5.7.1.1").is_none());
    }

    #[test]
    fn word_boundaries_become_ascii() {
        let cases = [
            (r"\bUBE\b", r"(?-u:\b)UBE(?-u:\b)"),
            (r"a\\b", r"a\\b"),
            (r"[\b]x\B", r"[\b]x(?-u:\B)"),
            (r"\[TS\d\]\b", r"\[TS\d\](?-u:\b)"),
        ];
        for (p, want) in cases {
            assert_eq!(ascii_word_boundaries(p), want, "{p}");
        }
        let re = build_regex(r"\bUBE\b").unwrap();
        assert!(re.is_match("rejected, ube, id=1") && !re.is_match("tube"));
        assert!(re.is_match("größe UBE möglich"));
    }

    #[test]
    fn globs() {
        let cases = [
            ("*.google.com", "gmail-smtp-in.l.google.com", true),
            ("*.google.com", "ALT1.Gmail-SMTP-in.L.Google.com.", true),
            ("*.google.com", "google.com", false),
            ("*.google.com", "evilgoogle.com", false),
            ("mta*.am0.yahoodns.net", "mta7.am0.yahoodns.net", true),
            ("mta*.am0.yahoodns.net", "mx.am0.yahoodns.net", false),
            ("gmail.com", "GMAIL.COM", true),
            ("gmail.com", "gmail.co", false),
            ("*.yahoodns.net", ".yahoodns.net", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (p, s, want) in cases {
            assert_eq!(Glob::new(p).matches(s), want, "{p} {s}");
        }
    }
}
