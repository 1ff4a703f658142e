//! The suppression list: recipients that must not be mailed again, with when and why.

use crate::classify::Class;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suppression {
    /// Unix seconds when the address was suppressed.
    pub since: u64,
    pub class: Class,
    /// The reply that caused it (normalised, at most `MAX_REPLY` bytes).
    pub reply: String,
}

const MAX_REPLY: usize = 300;
/// Addresses tracked for repeated `mailbox_full`; beyond it the oldest are dropped.
const MAX_FULL_TRACKED: usize = 100_000;

#[derive(Default, Debug)]
pub struct SuppressionList {
    entries: HashMap<Box<str>, Suppression>,
    /// `mailbox_full` count and first time (unix secs) per address.
    full: HashMap<Box<str>, (u32, u64)>,
}

/// Addresses compare case-insensitively (the local part is case-sensitive in theory,
/// never in practice at the providers that matter).
pub fn normalise_address(addr: &str) -> String {
    addr.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_ascii_lowercase()
}

/// Single-line, bounded reply text for storage and messages.
pub fn clip_reply(reply: &str) -> String {
    let mut out: String = reply
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_REPLY {
        let mut end = MAX_REPLY;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

impl SuppressionList {
    pub fn get(&self, addr: &str) -> Option<&Suppression> {
        if addr.bytes().any(|b| b.is_ascii_uppercase() || b == b'<') {
            self.entries.get(normalise_address(addr).as_str())
        } else {
            self.entries.get(addr)
        }
    }

    /// Adds an address; returns false when it was already suppressed.
    pub fn add(&mut self, addr: &str, entry: Suppression) -> bool {
        let key = normalise_address(addr);
        if key.is_empty() || self.entries.contains_key(key.as_str()) {
            return false;
        }
        self.full.remove(key.as_str());
        self.entries.insert(key.into_boxed_str(), entry);
        true
    }

    pub fn remove(&mut self, addr: &str) -> Option<Suppression> {
        self.entries.remove(normalise_address(addr).as_str())
    }

    /// Counts a `mailbox_full`; true when the address reached `limit` within `window` seconds.
    pub fn note_full(&mut self, addr: &str, now: u64, limit: u32, window: u64) -> bool {
        let key = normalise_address(addr);
        if self.full.len() >= MAX_FULL_TRACKED && !self.full.contains_key(key.as_str()) {
            let cutoff = now.saturating_sub(window);
            self.full.retain(|_, (_, first)| *first >= cutoff);
            if self.full.len() >= MAX_FULL_TRACKED {
                return false;
            }
        }
        let e = self.full.entry(key.into_boxed_str()).or_insert((0, now));
        if now.saturating_sub(e.1) > window {
            *e = (0, now);
        }
        e.0 += 1;
        e.0 >= limit
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Suppression)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_get_remove_case_insensitive() {
        let mut l = SuppressionList::default();
        let e = Suppression {
            since: 5,
            class: Class::RecipientUnknown,
            reply: clip_reply("550 5.1.1 no\r\nsuch user"),
        };
        assert!(l.add("<Bob@Example.com>", e.clone()));
        assert!(!l.add("bob@example.com", e));
        assert_eq!(
            l.get("BOB@example.com").unwrap().reply,
            "550 5.1.1 no  such user"
        );
        assert!(l.get("bob@example.com").is_some());
        assert!(l.remove("bob@EXAMPLE.com").is_some());
        assert!(l.is_empty());
    }

    #[test]
    fn mailbox_full_needs_repeats_within_window() {
        let mut l = SuppressionList::default();
        assert!(!l.note_full("a@x", 0, 3, 100));
        assert!(!l.note_full("a@x", 10, 3, 100));
        assert!(l.note_full("a@x", 20, 3, 100));
        assert!(!l.note_full("b@x", 0, 2, 100));
        assert!(!l.note_full("b@x", 500, 2, 100), "window restarted");
    }
}
