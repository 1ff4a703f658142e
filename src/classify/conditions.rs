//! The rules' conditions other than text — provider scope, base code, enhanced code, SMTP
//! stage — as bit masks over the rules. The hot path ANDs four masks into the candidate set
//! instead of testing each candidate rule in turn: most candidates (the enhanced-code
//! rules of the generic layer, above all) fail a condition, and a test per candidate is a
//! branch the processor cannot predict, since which rules fail depends on the reply.

use super::rules::{stage_bit, EnhancedPattern, Range, Rule};
use super::{Enhanced, ProviderId, SmtpStage};

/// Values of one numeric field cut into intervals on which every range of the rules
/// either holds throughout or nowhere: one mask per interval.
#[derive(Debug)]
struct Intervals {
    /// Interval `i` is `starts[i - 1]..starts[i]` (interval 0 starts at 0).
    starts: Vec<u16>,
}

impl Intervals {
    fn new<'a>(ranges: impl Iterator<Item = &'a Range>) -> Intervals {
        let mut starts: Vec<u16> = ranges
            .flat_map(|r| [Some(r.lo), r.hi.checked_add(1)])
            .flatten()
            .filter(|&s| s > 0)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        Intervals { starts }
    }

    fn len(&self) -> usize {
        self.starts.len() + 1
    }

    #[inline]
    fn of(&self, v: u16) -> usize {
        self.starts.partition_point(|&s| s <= v)
    }

    /// A value inside interval `i`.
    fn sample(&self, i: usize) -> u16 {
        if i == 0 {
            0
        } else {
            self.starts[i - 1]
        }
    }
}

/// `n` rows of `words` words: bit `k` of row `i` is set when `holds(i, &items[k])`.
fn rows<T>(n: usize, items: &[T], words: usize, holds: &dyn Fn(usize, &T) -> bool) -> Vec<u64> {
    let mut out = vec![0u64; n * words];
    for i in 0..n {
        for (k, item) in items.iter().enumerate() {
            if holds(i, item) {
                out[i * words + k / 64] |= 1 << (k % 64);
            }
        }
    }
    out
}

/// Masks over the rules (rule `r` is bit `r % 64` of word `r / 64`), `words` words each.
#[derive(Debug)]
pub(crate) struct Conditions {
    words: usize,
    /// Per provider id: the rules without a scope or scoped to that provider.
    scope: Vec<u64>,
    code: Intervals,
    /// Per code interval: the rules without a code condition or whose codes hold there;
    /// then, last, the rules without a code condition (a reply without a code).
    by_code: Vec<u64>,
    /// The distinct enhanced-code patterns of all rules, and where each component's
    /// ranges change.
    class: Intervals,
    subject: Intervals,
    detail: Intervals,
    /// Words of a set of patterns.
    pattern_words: usize,
    /// Per interval of each component: the patterns that hold on it.
    by_class: Vec<u64>,
    by_subject: Vec<u64>,
    by_detail: Vec<u64>,
    /// Per pattern: the rules that list it.
    pattern_rules: Vec<u64>,
    /// The rules without an enhanced-code condition.
    any_enhanced: Vec<u64>,
    /// Per stage index: the rules without a stage condition or naming that stage; then,
    /// last, the rules without a stage condition (no stage known).
    by_stage: Vec<u64>,
}

impl Conditions {
    pub(crate) fn new(rules: &[Rule], providers: usize) -> Conditions {
        let words = rules.len().div_ceil(64);
        let masks = |n: usize, holds: &dyn Fn(usize, &Rule) -> bool| rows(n, rules, words, holds);

        let scope = masks(providers, &|p, rule| {
            rule.scope.is_none() || rule.scope == ProviderId(p as u16)
        });

        let code = Intervals::new(rules.iter().flat_map(|r| r.code.iter()));
        let by_code = masks(code.len() + 1, &|i, rule| {
            rule.code.is_empty()
                || (i < code.len() && rule.code.iter().any(|c| c.contains(code.sample(i))))
        });

        let mut patterns = Vec::new();
        for p in rules.iter().flat_map(|r| r.enhanced.iter()) {
            if !patterns.contains(p) {
                patterns.push(*p);
            }
        }
        let pattern_words = patterns.len().div_ceil(64).max(1);
        let class = Intervals::new(patterns.iter().map(|p| &p.class));
        let subject = Intervals::new(patterns.iter().map(|p| &p.subject));
        let detail = Intervals::new(patterns.iter().map(|p| &p.detail));
        let component = |iv: &Intervals, range: fn(&EnhancedPattern) -> Range| {
            rows(iv.len(), &patterns, pattern_words, &|i, p| {
                range(p).contains(iv.sample(i))
            })
        };
        let by_class = component(&class, |p| p.class);
        let by_subject = component(&subject, |p| p.subject);
        let by_detail = component(&detail, |p| p.detail);
        let pattern_rules = masks(patterns.len(), &|k, rule| {
            rule.enhanced.contains(&patterns[k])
        });
        let any_enhanced = masks(1, &|_, rule| rule.enhanced.is_empty());

        let stages = SmtpStage::ALL.len();
        let by_stage = masks(stages + 1, &|i, rule| {
            rule.stages == 0 || (i < stages && rule.stages & stage_bit(SmtpStage::ALL[i]) != 0)
        });

        Conditions {
            words,
            scope,
            code,
            by_code,
            class,
            subject,
            detail,
            pattern_words,
            by_class,
            by_subject,
            by_detail,
            pattern_rules,
            any_enhanced,
            by_stage,
        }
    }

    /// Clears in `rules` the rules whose conditions do not hold. `W` is at least the number
    /// of rule words (the candidate set's size).
    #[inline]
    pub(crate) fn restrict<const W: usize>(
        &self,
        rules: &mut [u64],
        code: Option<u16>,
        enhanced: Option<Enhanced>,
        stage: Option<SmtpStage>,
        provider: ProviderId,
    ) {
        let w = self.words;
        let rules = &mut rules[..w];
        fn row(masks: &[u64], w: usize, i: usize) -> &[u64] {
            &masks[i * w..(i + 1) * w]
        }
        let scope = row(&self.scope, w, provider.0 as usize);
        let code = row(
            &self.by_code,
            w,
            code.map_or(self.code.len(), |c| self.code.of(c)),
        );
        let stage = row(
            &self.by_stage,
            w,
            stage.map_or(SmtpStage::ALL.len(), |s| s as usize),
        );
        for (i, word) in rules.iter_mut().enumerate() {
            *word &= scope[i] & code[i] & stage[i];
        }
        // Enhanced codes: the rules without a condition, or listing a pattern that holds.
        let mut allowed = [0u64; W];
        let allowed = &mut allowed[..w];
        allowed.copy_from_slice(&self.any_enhanced);
        if let Some(e) = enhanced {
            let pw = self.pattern_words;
            let (c, s, d) = (
                self.class.of(e.class as u16),
                self.subject.of(e.subject),
                self.detail.of(e.detail),
            );
            for k in 0..pw {
                let mut bits = self.by_class[c * pw + k]
                    & self.by_subject[s * pw + k]
                    & self.by_detail[d * pw + k];
                while bits != 0 {
                    let p = k * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    for (a, m) in allowed.iter_mut().zip(row(&self.pattern_rules, w, p)) {
                        *a |= m;
                    }
                }
            }
        }
        for (word, a) in rules.iter_mut().zip(allowed.iter()) {
            *word &= a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Classifier;

    /// The masks agree with each rule's own test of its conditions, for every code, the
    /// enhanced codes around every boundary the patterns draw, every stage and provider.
    #[test]
    fn masks_agree_with_the_rules_conditions() {
        let c = Classifier::builtin();
        let compiled = &*c.inner;
        let (rules, cond) = (&compiled.rules, &compiled.conditions);
        let words = rules.len().div_ceil(64);
        let check = |code, enhanced, stage, provider| {
            let mut set = vec![u64::MAX; words];
            cond.restrict::<64>(&mut set, code, enhanced, stage, provider);
            for (r, rule) in rules.iter().enumerate() {
                let want = rule.conditions_hold(code, enhanced, stage, provider);
                let got = set[r / 64] >> (r % 64) & 1 != 0;
                assert_eq!(
                    got, want,
                    "rule {} code {code:?} enhanced {enhanced:?} stage {stage:?} provider {provider:?}",
                    rule.id
                );
            }
        };
        let near = |iv: &Intervals| -> Vec<u16> {
            let mut v: Vec<u16> = iv
                .starts
                .iter()
                .flat_map(|&s| [s.saturating_sub(1), s, s.saturating_add(1)])
                .chain([0, 1, 2, 999])
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let providers = (0..compiled.providers.len()).map(|p| ProviderId(p as u16));
        let stages = std::iter::once(None).chain(SmtpStage::ALL.iter().copied().map(Some));
        let some_enhanced = [None, Enhanced::parse("5.7.1"), Enhanced::parse("4.7.28")];
        for p in providers {
            for s in stages.clone() {
                for e in some_enhanced {
                    for code in std::iter::once(None).chain((0..1000).map(Some)) {
                        check(code, e, s, p);
                    }
                }
            }
        }
        let mut tried = 0;
        for class in near(&cond.class) {
            for subject in near(&cond.subject) {
                for detail in near(&cond.detail) {
                    let e = Enhanced {
                        class: class as u8,
                        subject,
                        detail,
                    };
                    for code in [None, Some(421), Some(550)] {
                        check(code, Some(e), None, ProviderId::NONE);
                        tried += 1;
                    }
                }
            }
        }
        assert!(tried > 1000, "{tried}");
    }
}
