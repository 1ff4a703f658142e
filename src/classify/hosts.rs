//! Which provider a host or domain name belongs to: one walk over the name.
//!
//! Providers list MX host and domain patterns (`gmail-smtp-in.l.google.com`,
//! `*.protection.outlook.com`, `mx*.mail.icloud.com`). Trying every pattern of every
//! provider in order cost about 1,500 instructions per MX host. Here exact names and
//! label-aligned suffixes (`*.` patterns) are hashed: the name is walked once from its
//! end, and at its start and at every dot the hash of what lies to the right is looked
//! up. Other patterns (a `*` inside, or a suffix not at a dot) are tried one by one, but
//! only those of providers listed before the best match found so far. The answer is the
//! first provider, in configuration order, with a matching pattern — as before.

use super::rules::Glob;
use super::ProviderId;
use crate::idmap::IdMap;

#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    /// Hash of an exact name (lowercase) or a `.suffix` → candidates with that hash.
    by_hash: IdMap<Vec<Keyed>>,
    /// Patterns the hash cannot serve, in provider order.
    others: Vec<(ProviderId, Glob)>,
}

#[derive(Debug)]
struct Keyed {
    /// Lowercase exact name, or a suffix starting with a dot.
    text: Box<[u8]>,
    suffix: bool,
    /// A pattern with `*` inside whose end is this suffix (`mx*.mail.icloud.com`): the
    /// whole pattern must match too.
    wild: Option<Glob>,
    provider: ProviderId,
}

impl HostIndex {
    /// `patterns`: (provider, pattern) in configuration order.
    pub fn new<'a>(patterns: impl IntoIterator<Item = (ProviderId, &'a Glob)>) -> HostIndex {
        let mut ix = HostIndex::default();
        for (provider, glob) in patterns {
            let (text, suffix, wild) = match glob {
                Glob::Exact(p) => (p.as_bytes(), false, None),
                Glob::Suffix(p) if p.starts_with('.') => (p.as_bytes(), true, None),
                Glob::Wild(p) if dot_tail(p).is_some() => {
                    (dot_tail(p).unwrap_or_default(), true, Some(glob.clone()))
                }
                _ => {
                    ix.others.push((provider, glob.clone()));
                    continue;
                }
            };
            let list = ix.by_hash.entry(hash_rev(text)).or_default();
            // A later provider with the same plain pattern never wins: keep the first.
            if wild.is_some() || !list.iter().any(|k| &*k.text == text && k.suffix == suffix) {
                list.push(Keyed {
                    text: text.into(),
                    suffix,
                    wild,
                    provider,
                });
            }
        }
        ix
    }

    /// The first provider with a pattern matching `name` (ASCII case-insensitive, trailing
    /// dots already trimmed), or none.
    pub fn lookup(&self, name: &[u8]) -> ProviderId {
        let mut best = u16::MAX;
        if !self.by_hash.is_empty() {
            let mut h = SEED;
            for i in (0..name.len()).rev() {
                let b = name[i].to_ascii_lowercase();
                h = step(h, b);
                // A suffix must leave at least one byte before it; an exact name is whole.
                if (b == b'.' && i > 0) || i == 0 {
                    if let Some(list) = self.by_hash.get(&h) {
                        for k in list {
                            if k.provider.0 < best
                                && k.suffix == (i > 0)
                                && name[i..].eq_ignore_ascii_case(&k.text)
                                && k.wild.as_ref().is_none_or(|g| g.matches_trimmed(name))
                            {
                                best = k.provider.0;
                            }
                        }
                    }
                }
            }
        }
        for (p, glob) in &self.others {
            if p.0 >= best {
                break;
            }
            if glob.matches_trimmed(name) {
                best = p.0;
                break;
            }
        }
        if best == u16::MAX {
            ProviderId::NONE
        } else {
            ProviderId(best)
        }
    }
}

/// The label-aligned end of a pattern with `*` inside (`.mail.icloud.com` of
/// `mx*.mail.icloud.com`), which every match ends with.
fn dot_tail(p: &str) -> Option<&[u8]> {
    let tail = &p[p.rfind('*')? + 1..];
    (tail.starts_with('.') && tail.len() > 1).then_some(tail.as_bytes())
}

const SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over the bytes from last to first.
#[inline(always)]
fn step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

fn hash_rev(text: &[u8]) -> u64 {
    text.iter().rev().fold(SEED, |h, &b| step(h, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: first provider in order with any matching pattern.
    fn linear(providers: &[(u16, Vec<Glob>)], name: &[u8]) -> ProviderId {
        providers
            .iter()
            .find(|(_, g)| g.iter().any(|g| g.matches_trimmed(name)))
            .map_or(ProviderId::NONE, |(p, _)| ProviderId(*p))
    }

    #[test]
    fn agrees_with_trying_every_pattern_in_order() {
        let providers: Vec<(u16, Vec<Glob>)> = [
            (1, vec!["mx*.mail.icloud.com", "*.icloud.com"]),
            (
                2,
                vec![
                    "*.google.com",
                    "gmail-smtp-in.l.google.com",
                    "aspmx.l.google.com",
                ],
            ),
            (
                3,
                vec!["*.outlook.com", "*.protection.outlook.com", "outlook.com"],
            ),
            (
                4,
                vec![
                    "*mail.example",
                    "a*b.test",
                    "*.l.google.com",
                    "mx*.in.example",
                ],
            ),
            (5, vec!["google.com", "*.com"]),
        ]
        .into_iter()
        .map(|(p, v)| (p, v.into_iter().map(Glob::new).collect()))
        .collect();
        let ix = HostIndex::new(
            providers
                .iter()
                .flat_map(|(p, g)| g.iter().map(move |g| (ProviderId(*p), g))),
        );
        let names = [
            "gmail-smtp-in.l.google.com",
            "GMAIL-SMTP-IN.L.GOOGLE.COM",
            "alt1.gmail-smtp-in.l.google.com",
            "google.com",
            ".google.com",
            "x.google.com",
            "mx01.mail.icloud.com",
            "icloud.com",
            "x.icloud.com",
            "mail.example",
            "hotmail.example",
            "x.mail.example",
            "axb.test",
            "ab.test",
            "a.b.test",
            "outlook.com",
            "eur.olc.protection.outlook.com",
            "example.com",
            "example.net",
            "com",
            "",
            ".",
            "x..com",
            "münchen.de",
            "mx1.in.example",
            "mx.in.example",
            "x1.in.example",
            ".in.example",
        ];
        let mut matched = 0;
        for n in names {
            let want = linear(&providers, n.as_bytes());
            assert_eq!(ix.lookup(n.as_bytes()), want, "{n}");
            matched += !want.is_none() as usize;
        }
        assert!(matched >= 15, "{matched}");
        assert_eq!(ix.lookup(b"axb.test"), ProviderId(4));
        assert_eq!(ix.lookup(b"mx1.in.example"), ProviderId(4));
        assert_eq!(ix.lookup(b"x1.in.example"), ProviderId::NONE);
        assert_eq!(ix.lookup(b"google.com"), ProviderId(5));
        assert_eq!(ix.lookup(b"x.google.com"), ProviderId(2));
    }
}
