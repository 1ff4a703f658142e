//! MX rollup: unlisted recipient domains grouped by the MX hosts that serve them.
//!
//! Postfix's status-filter key names the MX host while transport and policy lookups
//! name the recipient domain. For configured providers the two are linked by config
//! (domains and MX patterns); for every other domain this cache learns the link from
//! DNS. Lookups never wait for DNS: a miss answers "not known yet", queues the domain
//! for a background task and the next request finds the answer. The cache is bounded
//! and entries expire, so a flood of random domains costs a bounded queue and table.

use super::site::SiteTable;
use crate::classify::Classifier;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Where an unlisted domain's mail goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxTarget {
    /// Its MX hosts belong to a configured provider site.
    Provider(u16),
    /// Its preferred MX host, as a group key (`mx:HOST`) shared by every domain it serves.
    Group(Box<str>),
    /// No MX (or a lookup failure): the domain is its own site.
    Itself,
}

struct Entry {
    target: MxTarget,
    expires: u64,
}

pub struct MxCache {
    entries: Mutex<HashMap<Box<str>, Entry>>,
    queue: mpsc::Sender<Box<str>>,
    ttl: u64,
    capacity: usize,
}

/// Domains waiting for resolution beyond this are dropped (retried on a later miss).
const QUEUE: usize = 1024;

impl MxCache {
    /// The cache and the receiving end of its resolution queue.
    pub fn new(ttl_secs: u64, capacity: usize) -> (MxCache, mpsc::Receiver<Box<str>>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            MxCache {
                entries: Mutex::new(HashMap::new()),
                queue: tx,
                ttl: ttl_secs,
                capacity: capacity.max(1),
            },
            rx,
        )
    }

    /// The known target of a lowercased domain, or `None` (and a queued resolution).
    pub fn lookup(&self, domain: &str, now: u64) -> Option<MxTarget> {
        {
            let entries = self.entries.lock().unwrap();
            if let Some(e) = entries.get(domain) {
                if e.expires > now {
                    return Some(e.target.clone());
                }
            }
        }
        // Full queue: drop; the domain is asked for again on a later miss.
        let _ = self.queue.try_send(domain.into());
        None
    }

    /// True when a live entry exists (no queueing).
    pub fn lookup_fresh(&self, domain: &str, now: u64) -> bool {
        self.entries
            .lock()
            .unwrap()
            .get(domain)
            .is_some_and(|e| e.expires > now)
    }

    pub fn insert(&self, domain: &str, target: MxTarget, now: u64) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.capacity && !entries.contains_key(domain) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.capacity {
                // Still full of live entries: forget an arbitrary eighth.
                let drop: Vec<Box<str>> = entries
                    .keys()
                    .take(self.capacity / 8 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(
            domain.into(),
            Entry {
                target,
                expires: now + self.ttl,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decides a domain's target from its MX hosts, most preferred first.
pub fn target_of(mx_hosts: &[String], sites: &SiteTable, classifier: &Classifier) -> MxTarget {
    for h in mx_hosts {
        if let Some(site) = sites.for_mx(h, classifier) {
            return MxTarget::Provider(site);
        }
    }
    match mx_hosts.first() {
        Some(h) if !h.is_empty() && h != "." => MxTarget::Group(
            format!("mx:{}", h.trim_end_matches('.').to_ascii_lowercase()).into_boxed_str(),
        ),
        _ => MxTarget::Itself,
    }
}

/// Builds the DNS resolver: the given name servers (`IP:PORT`), or the system's.
pub fn resolver(nameservers: &[String]) -> anyhow::Result<hickory_resolver::TokioResolver> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;
    let provider = TokioConnectionProvider::default();
    let mut builder = if nameservers.is_empty() {
        hickory_resolver::TokioResolver::builder_tokio()?
    } else {
        let mut config = ResolverConfig::new();
        for ns in nameservers {
            let addr: std::net::SocketAddr = ns
                .parse()
                .map_err(|_| anyhow::anyhow!("shaping.mx_nameservers: {ns:?} is not IP:PORT"))?;
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
        }
        hickory_resolver::TokioResolver::builder_with_config(config, provider)
    };
    let mut opts = ResolverOpts::default();
    opts.timeout = std::time::Duration::from_secs(3);
    opts.attempts = 1;
    *builder.options_mut() = opts;
    Ok(builder.build())
}

/// Resolves queued domains in the background (at most 16 at a time) and fills the cache.
pub async fn resolve_loop(
    engine: std::sync::Arc<super::Engine>,
    cache: std::sync::Arc<MxCache>,
    mut rx: mpsc::Receiver<Box<str>>,
    resolver: hickory_resolver::TokioResolver,
) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let resolver = std::sync::Arc::new(resolver);
    while let Some(domain) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (engine, cache, resolver) = (engine.clone(), cache.clone(), resolver.clone());
        tokio::spawn(async move {
            let now = engine.clock().unix_now();
            if cache.lookup_fresh(&domain, now) {
                return;
            }
            let hosts: Vec<String> = match resolver.mx_lookup(&*domain).await {
                Ok(lookup) => {
                    let mut mx: Vec<(u16, String)> = lookup
                        .iter()
                        .map(|m| (m.preference(), m.exchange().to_utf8()))
                        .collect();
                    mx.sort();
                    mx.into_iter().map(|(_, h)| h).collect()
                }
                Err(e) => {
                    tracing::debug!(domain = %domain, error = %e, "MX lookup failed");
                    Vec::new()
                }
            };
            let setup = engine.setup();
            let target = target_of(&hosts, &setup.sites, &setup.classifier);
            tracing::debug!(domain = %domain, ?target, "MX rollup");
            cache.insert(&domain, target, now);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn targets_from_mx_hosts() {
        let config =
            Config::from_toml("[providers.gmail]\nmx = [\"*.google.com\"]\n", "t").unwrap();
        let c = Classifier::builtin();
        let sites = SiteTable::new(&config, &c);
        let g = sites.named("gmail").unwrap();
        let t = target_of(&["alt1.aspmx.l.google.com.".into()], &sites, &c);
        assert_eq!(t, MxTarget::Provider(g));
        let t = target_of(
            &["MX1.Hosting.example.".into(), "mx2.hosting.example".into()],
            &sites,
            &c,
        );
        assert_eq!(t, MxTarget::Group("mx:mx1.hosting.example".into()));
        assert_eq!(target_of(&[], &sites, &c), MxTarget::Itself);
    }

    #[tokio::test]
    async fn misses_queue_and_capacity_is_bounded() {
        let (cache, mut rx) = MxCache::new(60, 16);
        assert_eq!(cache.lookup("a.example", 0), None);
        assert_eq!(rx.recv().await.as_deref(), Some("a.example"));
        cache.insert("a.example", MxTarget::Itself, 0);
        assert_eq!(cache.lookup("a.example", 10), Some(MxTarget::Itself));
        assert_eq!(cache.lookup("a.example", 61), None, "expired");
        for i in 0..100 {
            cache.insert(&format!("d{i}.example"), MxTarget::Itself, 0);
        }
        assert!(cache.len() <= 16);
    }
}
