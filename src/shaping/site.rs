//! Sites: which provider group (or recipient domain) a domain, MX host or reply belongs to.
//!
//! Configured domains and MX patterns first, then the classifier's provider table;
//! unlisted domains are their own site. Lookups lowercase into a stack buffer, so the
//! hot path does not allocate.

use crate::classify::{Classifier, ProviderId};
use crate::config::Config;
use std::collections::HashMap;

/// A site id: 0 = unknown, `1..` = a named provider site, or a recipient domain.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    None,
    Named(u16),
    /// An interned recipient domain (see `Engine`).
    Domain(u32),
}

impl Site {
    pub fn key(self) -> u32 {
        match self {
            Site::None => 0,
            Site::Named(n) => n as u32,
            Site::Domain(d) => 0x8000_0000 | d,
        }
    }
    pub fn from_key(k: u32) -> Site {
        if k == 0 {
            Site::None
        } else if k & 0x8000_0000 != 0 {
            Site::Domain(k & 0x7fff_ffff)
        } else {
            Site::Named(k as u16)
        }
    }
}

#[derive(Debug)]
pub struct SiteTable {
    /// Index = named site id; 0 is the empty name.
    names: Vec<String>,
    /// Named site of each classifier provider id.
    by_provider: Vec<u16>,
    domains: HashMap<String, u16>,
    mx_exact: HashMap<String, u16>,
    /// `(suffix with leading dot, site)` for `*.example.net` patterns.
    mx_suffix: Vec<(String, u16)>,
    nexthops: Vec<String>,
    /// Sites with their own tier transports (configured in `[providers]`).
    dedicated: Vec<bool>,
}

/// Lowercases ASCII into `buf`; `None` when the name is too long to be a host name.
fn lower<'b>(s: &str, buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let b = s.as_bytes();
    if b.len() > buf.len() {
        return None;
    }
    for (o, i) in buf.iter_mut().zip(b) {
        *o = i.to_ascii_lowercase();
    }
    std::str::from_utf8(&buf[..b.len()]).ok()
}

impl SiteTable {
    pub fn new(config: &Config, classifier: &Classifier) -> SiteTable {
        let mut names = vec![String::new()];
        let mut by_provider = vec![0u16];
        for id in 1..classifier.provider_count() {
            let name = classifier.provider_name(ProviderId(id as u16)).to_string();
            by_provider.push(names.len() as u16);
            names.push(name);
        }
        for name in config.providers.keys() {
            if !names.iter().any(|n| n == name) {
                names.push(name.clone());
            }
        }
        let idx = |names: &[String], n: &str| names.iter().position(|x| x == n).unwrap() as u16;
        let mut domains = HashMap::new();
        let mut mx_exact = HashMap::new();
        let mut mx_suffix = Vec::new();
        let mut nexthops = vec![String::new(); names.len()];
        let mut dedicated = vec![false; names.len()];
        for (name, p) in &config.providers {
            let site = idx(&names, name);
            for d in &p.domains {
                domains.insert(d.to_ascii_lowercase(), site);
            }
            for m in &p.mx {
                let m = m.to_ascii_lowercase();
                match m.strip_prefix('*') {
                    Some(suffix) => mx_suffix.push((suffix.to_string(), site)),
                    None => {
                        mx_exact.insert(m, site);
                    }
                }
            }
            nexthops[site as usize] = p.nexthop.clone();
            dedicated[site as usize] = true;
        }
        SiteTable {
            names,
            by_provider,
            domains,
            mx_exact,
            mx_suffix,
            nexthops,
            dedicated,
        }
    }

    pub fn name(&self, site: u16) -> &str {
        self.names
            .get(site as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn named(&self, name: &str) -> Option<u16> {
        self.names
            .iter()
            .skip(1)
            .position(|n| n == name)
            .map(|i| (i + 1) as u16)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.len() <= 1
    }

    pub fn nexthop(&self, site: u16) -> &str {
        self.nexthops
            .get(site as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn is_dedicated(&self, site: u16) -> bool {
        self.dedicated.get(site as usize).copied().unwrap_or(false)
    }

    pub fn for_provider(&self, p: ProviderId) -> Option<u16> {
        self.by_provider
            .get(p.0 as usize)
            .copied()
            .filter(|&s| s != 0)
    }

    /// The named site owning a recipient domain.
    pub fn for_domain(&self, domain: &str, classifier: &Classifier) -> Option<u16> {
        let mut buf = [0u8; 256];
        let d = lower(domain, &mut buf)?;
        if let Some(&s) = self.domains.get(d) {
            return Some(s);
        }
        self.for_provider(classifier.provider_for_domain(d))
    }

    /// The named site whose MX patterns match a host name or IP.
    pub fn for_mx(&self, host: &str, classifier: &Classifier) -> Option<u16> {
        let mut buf = [0u8; 256];
        let h = lower(host.trim_end_matches('.'), &mut buf)?;
        if let Some(&s) = self.mx_exact.get(h) {
            return Some(s);
        }
        for (suffix, s) in &self.mx_suffix {
            if h.ends_with(suffix.as_str()) {
                return Some(*s);
            }
        }
        self.for_provider(classifier.provider_for_mx(h))
    }

    pub fn names(&self) -> impl Iterator<Item = (u16, &str)> {
        self.names
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, n)| (i as u16, n.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_domains_and_mx_patterns() {
        let config = Config::from_toml(
            "[providers.gmail]\ndomains = [\"Gmail.test\"]\nmx = [\"127.0.0.2\", \"*.mx.gmail.test\"]\nnexthop = \"[127.0.0.2]:2525\"\n",
            "t",
        )
        .unwrap();
        let c = Classifier::builtin();
        let t = SiteTable::new(&config, &c);
        let g = t.named("gmail").unwrap();
        assert_eq!(t.for_domain("gmail.TEST", &c), Some(g));
        assert_eq!(t.for_mx("127.0.0.2", &c), Some(g));
        assert_eq!(t.for_mx("A.MX.gmail.test.", &c), Some(g));
        assert_eq!(t.for_mx("mx.gmail.test", &c), None);
        assert_eq!(t.nexthop(g), "[127.0.0.2]:2525");
        assert!(t.is_dedicated(g));
        for s in [Site::None, Site::Named(3), Site::Domain(77)] {
            assert_eq!(Site::from_key(s.key()), s);
        }
    }
}
