//! The learned set: per endpoint, name → addresses → the FQDN selectors that
//! allow them, each address until its TTL ends (at least
//! [`LearnedConfig::min_ttl_s`]) and for as long as a connection to it is open
//! ([`LearnedSet::hold`] / [`LearnedSet::release`], the hook the datapath's
//! conntrack will call).
//!
//! Bounded: at most [`LearnedConfig::max_per_endpoint`] addresses per endpoint
//! and [`LearnedConfig::max_total`] in all; an answer that would pass a cap
//! is refused whole ([`CapReached`], a message naming the cap and the key that
//! raises it), so what is learned is never a silent subset of an answer.
//!
//! Persisted to `state_dir/dns-learned.json` ([`LearnedSet::save`]: a
//! temporary file, fsync, rename, so a crash leaves the old file or the new
//! one) and reloaded at start ([`LearnedSet::load`]), so a restart does not
//! cut connections that were allowed. Time is passed in (seconds since the
//! Unix epoch), so expiry survives a restart and tests need no clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::message::Addr;
use crate::api::model::FqdnSelector;

/// File name of the learned set in `state_dir`.
pub const STATE_FILE: &str = "dns-learned.json";
const VERSION: u32 = 1;

/// Limits of the learned set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedConfig {
    /// An answer's TTL below this counts as this (seconds): a 0-second TTL
    /// must still let the connection that follows the lookup through.
    pub min_ttl_s: u32,
    /// Addresses one endpoint may have learned at once.
    pub max_per_endpoint: usize,
    /// Addresses all endpoints may have learned at once.
    pub max_total: usize,
}

impl Default for LearnedConfig {
    fn default() -> Self {
        LearnedConfig {
            min_ttl_s: 5,
            max_per_endpoint: 1024,
            max_total: 65536,
        }
    }
}

/// An answer was not learned: a cap would be passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapReached {
    #[error("endpoint {endpoint} has {have} learned addresses and the answer for {name} adds {adding}: over the cap of {cap} per endpoint (max_per_endpoint); the answer is not released until some expire")]
    Endpoint {
        endpoint: String,
        name: String,
        have: usize,
        adding: usize,
        cap: usize,
    },
    #[error("{have} addresses are learned and the answer for {name} adds {adding}: over the cap of {cap} in all (max_total); the answer is not released until some expire")]
    Total {
        name: String,
        have: usize,
        adding: usize,
        cap: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a learned set of version {VERSION}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One learned address of a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    pub ip: IpAddr,
    /// When the TTL ends (seconds since the epoch).
    pub expires: u64,
}

/// One name an endpoint looked up, what it answered and which selectors allow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub endpoint: String,
    /// Normal form (lower case, trailing dot).
    pub name: String,
    pub selectors: BTreeSet<FqdnSelector>,
    pub addrs: Vec<Learned>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    entries: Vec<NameEntry>,
}

/// The learned set (see the module's doc).
#[derive(Debug, Clone, Default)]
pub struct LearnedSet {
    config: LearnedConfig,
    /// By (endpoint, name).
    names: BTreeMap<(String, String), NameEntry>,
    /// Open connections per (endpoint, address).
    open: BTreeMap<(String, IpAddr), u32>,
    total: usize,
}

impl LearnedSet {
    pub fn new(config: LearnedConfig) -> LearnedSet {
        LearnedSet {
            config,
            ..LearnedSet::default()
        }
    }

    fn per_endpoint(&self, endpoint: &str) -> usize {
        self.names
            .range((endpoint.to_string(), String::new())..)
            .take_while(|((e, _), _)| e == endpoint)
            .map(|(_, n)| n.addrs.len())
            .sum()
    }

    /// Learn an answer's addresses for `name`, allowed to `endpoint` by
    /// `selectors`, before the answer is released. Refused whole when a cap
    /// would be passed. Returns how many addresses are new.
    pub fn learn(
        &mut self,
        endpoint: &str,
        name: &str,
        selectors: &[FqdnSelector],
        addrs: &[Addr],
        now: u64,
    ) -> Result<usize, CapReached> {
        let key = (endpoint.to_string(), name.to_string());
        let known: BTreeSet<IpAddr> = self
            .names
            .get(&key)
            .map(|e| e.addrs.iter().map(|a| a.ip).collect())
            .unwrap_or_default();
        let adding = addrs
            .iter()
            .map(|a| a.ip)
            .collect::<BTreeSet<_>>()
            .difference(&known)
            .count();
        let have = self.per_endpoint(endpoint);
        if have + adding > self.config.max_per_endpoint {
            return Err(CapReached::Endpoint {
                endpoint: endpoint.into(),
                name: name.into(),
                have,
                adding,
                cap: self.config.max_per_endpoint,
            });
        }
        if self.total + adding > self.config.max_total {
            return Err(CapReached::Total {
                name: name.into(),
                have: self.total,
                adding,
                cap: self.config.max_total,
            });
        }
        let entry = self.names.entry(key).or_insert_with(|| NameEntry {
            endpoint: endpoint.into(),
            name: name.into(),
            selectors: BTreeSet::new(),
            addrs: Vec::new(),
        });
        entry.selectors.extend(selectors.iter().cloned());
        for a in addrs {
            let expires = now + u64::from(a.ttl.max(self.config.min_ttl_s));
            match entry.addrs.iter_mut().find(|l| l.ip == a.ip) {
                // A new answer can lengthen a lifetime, never shorten it.
                Some(l) => l.expires = l.expires.max(expires),
                None => entry.addrs.push(Learned { ip: a.ip, expires }),
            }
        }
        entry.addrs.sort_by_key(|l| l.ip);
        self.total += adding;
        Ok(adding)
    }

    /// The selectors that allow `endpoint` to reach `ip` now: from every name
    /// whose answer gave it and has not expired (or is held open).
    pub fn selectors_for(&self, endpoint: &str, ip: IpAddr, now: u64) -> BTreeSet<FqdnSelector> {
        let held = self.open.contains_key(&(endpoint.to_string(), ip));
        self.names
            .range((endpoint.to_string(), String::new())..)
            .take_while(|((e, _), _)| e == endpoint)
            .filter(|(_, n)| {
                n.addrs
                    .iter()
                    .any(|l| l.ip == ip && (held || l.expires > now))
            })
            .flat_map(|(_, n)| n.selectors.iter().cloned())
            .collect()
    }

    /// A connection from `endpoint` to `ip` opened: keep the address while it lasts.
    pub fn hold(&mut self, endpoint: &str, ip: IpAddr) {
        *self.open.entry((endpoint.to_string(), ip)).or_default() += 1;
    }

    /// Whether an open connection from `endpoint` holds `ip`.
    pub fn held(&self, endpoint: &str, ip: IpAddr) -> bool {
        self.open.contains_key(&(endpoint.to_string(), ip))
    }

    /// A connection from `endpoint` to `ip` closed.
    pub fn release(&mut self, endpoint: &str, ip: IpAddr) {
        let key = (endpoint.to_string(), ip);
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// Drop every address whose TTL has ended and that no open connection
    /// holds; returns them as (endpoint, name, address).
    pub fn expire(&mut self, now: u64) -> Vec<(String, String, IpAddr)> {
        let mut gone = Vec::new();
        let open = &self.open;
        self.names.retain(|(endpoint, name), entry| {
            entry.addrs.retain(|l| {
                let keep = l.expires > now || open.contains_key(&(endpoint.clone(), l.ip));
                if !keep {
                    gone.push((endpoint.clone(), name.clone(), l.ip));
                }
                keep
            });
            !entry.addrs.is_empty()
        });
        self.total -= gone.len();
        gone
    }

    /// The earliest end of a TTL among the learned addresses (held ones
    /// included): nothing expires before it.
    pub fn next_expiry(&self) -> Option<u64> {
        self.names
            .values()
            .flat_map(|n| n.addrs.iter().map(|l| l.expires))
            .min()
    }

    /// Every name entry, by endpoint and name.
    pub fn entries(&self) -> impl Iterator<Item = &NameEntry> {
        self.names.values()
    }

    /// Learned addresses in all.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Write the set to `state_dir/dns-learned.json`, atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let path = state_dir.join(STATE_FILE);
        let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
        let file = File {
            version: VERSION,
            entries: self.names.values().cloned().collect(),
        };
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&file).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable once the directory is.
            fs::File::open(state_dir)?.sync_all()
        };
        write().map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }

    /// Read the set saved in `state_dir` (an empty set when there is none).
    /// Each address keeps the expiry it was saved with. Caps lowered since
    /// the save drop what no longer fits (the entries read first stay).
    pub fn load(state_dir: &Path, config: LearnedConfig) -> Result<LearnedSet, StateError> {
        let path = state_dir.join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LearnedSet::new(config))
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let file: File = serde_json::from_slice(&text).map_err(|source| StateError::Format {
            path: path.clone(),
            source,
        })?;
        if file.version != VERSION {
            return Err(StateError::Format {
                path,
                source: serde::de::Error::custom(format!("version {}", file.version)),
            });
        }
        let mut set = LearnedSet::new(config);
        for e in file.entries {
            let selectors: Vec<FqdnSelector> = e.selectors.into_iter().collect();
            for l in &e.addrs {
                // Each address keeps its own expiry: learn with now = 0 and
                // the remaining lifetime as its TTL.
                let ttl = u32::try_from(l.expires).unwrap_or(u32::MAX);
                let saved = LearnedConfig {
                    min_ttl_s: 0,
                    ..set.config
                };
                let cfg = std::mem::replace(&mut set.config, saved);
                let _ = set.learn(
                    &e.endpoint,
                    &e.name,
                    &selectors,
                    &[Addr { ip: l.ip, ttl }],
                    0,
                );
                set.config = cfg;
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, ttl: u32) -> Addr {
        Addr {
            ip: ip.parse().unwrap(),
            ttl,
        }
    }

    fn sel(n: &str) -> FqdnSelector {
        FqdnSelector::Name(n.into())
    }

    #[test]
    fn ttl_with_a_minimum_and_held_connections() {
        let mut s = LearnedSet::new(LearnedConfig {
            min_ttl_s: 10,
            ..LearnedConfig::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let n = s
            .learn(
                "web",
                "a.example.",
                &[sel("a.example.")],
                &[addr("192.0.2.1", 1), addr("192.0.2.2", 30)],
                1000,
            )
            .unwrap();
        assert_eq!((n, s.len()), (2, 2));
        // TTL 1 counts as the minimum, 10.
        assert_eq!(
            s.selectors_for("web", ip, 1009),
            BTreeSet::from([sel("a.example.")])
        );
        assert!(s.selectors_for("web", ip, 1010).is_empty());
        assert!(s.selectors_for("other", ip, 1000).is_empty());
        // An open connection keeps it past its TTL; closed, it expires.
        s.hold("web", ip);
        assert!(s.expire(1020).is_empty());
        assert_eq!(s.selectors_for("web", ip, 1020).len(), 1);
        s.release("web", ip);
        assert_eq!(
            s.expire(1020),
            vec![("web".into(), "a.example.".into(), ip)]
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.selectors_for("web", other, 1020).len(), 1);
        assert_eq!(s.expire(1031).len(), 1);
        assert!(s.is_empty() && s.entries().next().is_none());
    }

    #[test]
    fn caps_refuse_a_whole_answer_with_a_clear_report() {
        let mut s = LearnedSet::new(LearnedConfig {
            min_ttl_s: 0,
            max_per_endpoint: 2,
            max_total: 3,
        });
        s.learn(
            "a",
            "x.",
            &[],
            &[addr("10.0.0.1", 60), addr("10.0.0.2", 60)],
            0,
        )
        .unwrap();
        // The same addresses again add nothing, so fit.
        assert_eq!(s.learn("a", "x.", &[], &[addr("10.0.0.1", 60)], 0), Ok(0));
        let e = s
            .learn("a", "y.", &[], &[addr("10.0.0.3", 60)], 0)
            .unwrap_err();
        assert_eq!(e.to_string(), "endpoint a has 2 learned addresses and the answer for y. adds 1: over the cap of 2 per endpoint (max_per_endpoint); the answer is not released until some expire");
        s.learn("b", "y.", &[], &[addr("10.0.0.3", 60)], 0).unwrap();
        let e = s
            .learn("c", "z.", &[], &[addr("10.0.0.4", 60)], 0)
            .unwrap_err();
        assert!(
            matches!(
                e,
                CapReached::Total {
                    have: 3,
                    cap: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn saved_atomically_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let empty = LearnedSet::load(dir.path(), LearnedConfig::default()).unwrap();
        assert!(empty.is_empty());
        let mut s = LearnedSet::new(LearnedConfig::default());
        s.learn(
            "web",
            "a.example.",
            &[sel("a.example.")],
            &[addr("192.0.2.1", 60), addr("2001:db8::1", 600)],
            1000,
        )
        .unwrap();
        s.save(dir.path()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        let back = LearnedSet::load(dir.path(), LearnedConfig::default()).unwrap();
        assert_eq!(
            back.entries().collect::<Vec<_>>(),
            s.entries().collect::<Vec<_>>()
        );
        assert_eq!(back.len(), 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(back.selectors_for("web", ip, 1059).len(), 1);
        assert!(back.selectors_for("web", ip, 1060).is_empty());
        fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        let e = LearnedSet::load(dir.path(), LearnedConfig::default()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("dns-learned.json is not a learned set of version 1"),
            "{e}"
        );
    }
}
