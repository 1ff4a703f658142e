//! Literal prefilter: one Aho-Corasick pass per reply names the few rules worth running.
//!
//! At load, each rule's regex is reduced to a set of literals of which every match must
//! contain one (prefixes of some suffix of its top-level concatenation, via
//! `regex-syntax`'s extractor). All literals of all rules and provider tokens go into one
//! ASCII-case-insensitive automaton; a reply then costs one overlapping scan plus the
//! regexes of the candidates it lit up, instead of every rule's regex. Rules whose regex
//! yields no useful literal (or that have no regex) are candidates for every reply.

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind};
use std::collections::HashMap;

/// Literals shorter than this light up too many replies to be worth indexing.
const MIN_LITERAL: usize = 3;
/// A rule needing more literals than this is cheaper to keep as an always-candidate.
const MAX_LITERALS_PER_RULE: usize = 64;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    Rule(u32),
    Token(u32),
}

#[derive(Debug)]
pub(crate) struct Prefilter {
    pub ac: Option<AhoCorasick>,
    /// Per automaton pattern: the range of `targets` it lights up.
    pub spans: Vec<(u32, u32)>,
    pub targets: Vec<Target>,
    /// Rules that are candidates for every reply (bitset over rule indices).
    pub always_rules: Vec<u64>,
    /// Tokens that must always be checked.
    pub always_tokens: Vec<u32>,
}

pub(crate) fn build(inputs: &[(Target, Option<&str>)], n_rules: usize) -> Prefilter {
    let mut by_literal: HashMap<Vec<u8>, Vec<Target>> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    let mut always_rules = vec![0u64; n_rules.div_ceil(64)];
    let mut always_tokens = Vec::new();
    for &(target, pattern) in inputs {
        match pattern.and_then(required_literals) {
            Some(lits) => {
                for lit in lits {
                    let key = lit.to_ascii_lowercase();
                    let entry = by_literal.entry(key.clone()).or_insert_with(|| {
                        order.push(key);
                        Vec::new()
                    });
                    if !entry.contains(&target) {
                        entry.push(target);
                    }
                }
            }
            None => match target {
                Target::Rule(r) => always_rules[r as usize / 64] |= 1 << (r % 64),
                Target::Token(t) => always_tokens.push(t),
            },
        }
    }
    let mut spans = Vec::with_capacity(order.len());
    let mut targets = Vec::new();
    for lit in &order {
        let t = &by_literal[lit];
        spans.push((targets.len() as u32, (targets.len() + t.len()) as u32));
        targets.extend_from_slice(t);
    }
    let ac = if order.is_empty() {
        None
    } else {
        Some(
            AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .kind(Some(AhoCorasickKind::DFA))
                .build(&order)
                .or_else(|_| {
                    AhoCorasick::builder()
                        .ascii_case_insensitive(true)
                        .match_kind(MatchKind::Standard)
                        .build(&order)
                })
                .expect("literal automaton within default limits"),
        )
    };
    Prefilter {
        ac,
        spans,
        targets,
        always_rules,
        always_tokens,
    }
}

/// Literals one of which occurs in every match of `pattern`, or `None` if there is no
/// useful set. Extraction is case-sensitive and the automaton ASCII-case-insensitive, so the
/// pair over-approximates the case-insensitive regex; literals are cut at their first
/// non-ASCII byte, whose case variants the automaton would not see.
pub(crate) fn required_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .ok()?;
    let lits = necessary(&hir)?;
    (lits.len() <= MAX_LITERALS_PER_RULE).then_some(lits)
}

fn necessary(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    match hir.kind() {
        HirKind::Capture(c) => necessary(&c.sub),
        HirKind::Alternation(alts) => {
            let mut all = Vec::new();
            for a in alts {
                all.extend(necessary(a)?);
            }
            all.sort();
            all.dedup();
            Some(all)
        }
        HirKind::Concat(parts) => {
            // Any suffix of a concatenation matches inside every match of the whole, so
            // the prefixes of each suffix are all valid; keep the most selective set.
            let mut best: Option<Vec<Vec<u8>>> = None;
            for i in 0..parts.len() {
                let sub = Hir::concat(parts[i..].to_vec());
                for cand in [prefixes(&sub), necessary_part(&parts[i])]
                    .into_iter()
                    .flatten()
                {
                    if better(&cand, best.as_ref()) {
                        best = Some(cand);
                    }
                }
            }
            best
        }
        _ => prefixes(hir),
    }
}

/// A single concatenation element that is itself a group or alternation.
fn necessary_part(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    match hir.kind() {
        HirKind::Capture(_) | HirKind::Alternation(_) => necessary(hir),
        _ => None,
    }
}

fn score(lits: &[Vec<u8>]) -> (usize, std::cmp::Reverse<usize>) {
    let min = lits.iter().map(|l| l.len()).min().unwrap_or(0);
    (min.min(8), std::cmp::Reverse(lits.len()))
}

fn better(cand: &[Vec<u8>], best: Option<&Vec<Vec<u8>>>) -> bool {
    match best {
        None => true,
        Some(b) => score(cand) > score(b),
    }
}

fn prefixes(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    let mut seq = Extractor::new().kind(ExtractKind::Prefix).extract(hir);
    if seq.len().is_some_and(|n| n > MAX_LITERALS_PER_RULE) {
        seq.keep_first_bytes(MIN_LITERAL + 3);
        seq.dedup();
    }
    let lits = seq.literals()?;
    if lits.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(lits.len());
    for l in lits {
        let b = l.as_bytes();
        let ascii = b.iter().position(|c| !c.is_ascii()).unwrap_or(b.len());
        if ascii < MIN_LITERAL {
            return None;
        }
        out.push(b[..ascii].to_vec());
    }
    out.sort();
    out.dedup();
    (out.len() <= MAX_LITERALS_PER_RULE).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(p: &str) -> Option<Vec<String>> {
        required_literals(p).map(|v| {
            v.into_iter()
                .map(|l| String::from_utf8(l).unwrap())
                .collect()
        })
    }

    #[test]
    fn extraction() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("user unknown", Some(&["user unknown"])),
            ("(spf|dkim) domain", Some(&["dkim domain", "spf domain"])),
            (r"\bAS\(\d{3,5}\)", Some(&["AS("])),
            (r".*over quota", Some(&["over quota"])),
            (r"\d+ bytes exceeds", Some(&[" bytes exceeds"])),
            ("a|bc", None),
            (".*", None),
            ("bloqu[ée]", Some(&["bloqu", "bloque"])),
            (
                "mailbox (is )?full",
                Some(&["mailbox full", "mailbox is full"]),
            ),
        ];
        for (p, want) in cases {
            let got = lits(p);
            let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "{p}");
        }
    }

    #[test]
    fn every_match_contains_a_literal() {
        // Soundness on a few tricky patterns: whatever the regex matches, a literal is inside.
        let cases = [
            (r"(?:spf|dkim) (?:domain|record)", "your SPF Domain is bad"),
            (
                r"unusual rate.{0,80}\bIP\b",
                "an Unusual Rate of mail from your IP",
            ),
            (r"\[TSS?0\d\]", "421 [TSS04] deferred"),
            (
                r"mailbox (?:is )?(?:full|over quota)",
                "MAILBOX IS OVER QUOTA",
            ),
        ];
        for (p, hay) in cases {
            let re = regex::RegexBuilder::new(p)
                .case_insensitive(true)
                .build()
                .unwrap();
            assert!(re.is_match(hay), "{p} on {hay}");
            let l = required_literals(p).expect(p);
            let low = hay.to_ascii_lowercase();
            assert!(
                l.iter()
                    .any(|l| low.contains(&String::from_utf8_lossy(l).to_ascii_lowercase())),
                "{p}: {l:?} not in {hay}"
            );
        }
    }
}
