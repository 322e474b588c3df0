//! `netpolctl fqdn list`: what netpold's DNS proxy has learned — each name an
//! endpoint looked up, its addresses with the TTL left, and the FQDN
//! selectors that allowed it — read from the learned set file netpold keeps
//! in `state_dir` (`dns-learned.json`, written after each learn and read
//! back at start). Reading the file, not the socket, works while netpold is
//! stopped too (what a restarted netpold will enforce).
//!
//! Owns the arguments and the output; reads, never writes, the file.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::common::columns;
use crate::config::{Config, DEFAULT_CONFIG};
use crate::dns::learned::{LearnedConfig, LearnedSet, STATE_FILE};
use crate::policy::fqdn::{selector_json, selector_text, FqdnAddrs};

#[derive(Debug, Args)]
pub struct FqdnArgs {
    #[command(subcommand)]
    pub command: FqdnCommand,
}

#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    /// Names the DNS proxy learned: name, endpoint, addresses with TTL left, selectors
    List(FqdnListArgs),
}

/// Where the learned set is: `--state-dir`, or the config's `state_dir`.
#[derive(Debug, Clone, Args)]
pub struct LearnedArgs {
    /// netpold.toml naming the instance's state_dir
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The daemon's state directory holding dns-learned.json (default: the config's state_dir)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl LearnedArgs {
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.state_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(Config::load(&self.config)?.state_dir),
        }
    }
}

const LIST_EXAMPLES: &str = "\
Examples:
  netpolctl fqdn list
  netpolctl fqdn list --state-dir /var/lib/netpol --json

Each line is one address an endpoint learned for a name: allowed to that endpoint's
toFQDNs rules whose selectors match the name, until the TTL left runs out (at least the
proxy's minimum TTL) and while a connection to it is open. \"expired\": the TTL is over;
netpold drops the address at its next sweep unless a connection holds it.";

#[derive(Debug, Args)]
#[command(after_help = LIST_EXAMPLES)]
pub struct FqdnListArgs {
    #[command(flatten)]
    pub learned: LearnedArgs,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
}

/// Read the learned set netpold saved in `state_dir` (empty when there is none).
pub fn read_learned(state_dir: &Path) -> anyhow::Result<LearnedSet> {
    // Every entry saved, whatever caps this netpold.toml would set.
    let all = LearnedConfig {
        min_ttl_s: 0,
        max_per_endpoint: usize::MAX,
        max_total: usize::MAX,
    };
    Ok(LearnedSet::load(state_dir, all)?)
}

/// The learned set of `state_dir` as compile reads it, at the current time.
pub fn learned_view(state_dir: &Path) -> anyhow::Result<FqdnAddrs> {
    Ok(FqdnAddrs::from_learned(&read_learned(state_dir)?, now()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Serialize)]
struct JsonAddr {
    address: std::net::IpAddr,
    /// Unix time the TTL ends.
    expires: u64,
    /// Seconds left (0: expired).
    ttl_left: u64,
}

#[derive(Debug, Serialize)]
struct JsonName {
    name: String,
    endpoint: String,
    selectors: Vec<serde_json::Value>,
    addresses: Vec<JsonAddr>,
}

/// The table (or JSON) of `set` at time `now`.
pub fn format_list(set: &LearnedSet, now: u64, json: bool) -> String {
    if json {
        let names: Vec<JsonName> = set
            .entries()
            .map(|e| JsonName {
                name: e.name.clone(),
                endpoint: e.endpoint.clone(),
                selectors: e.selectors.iter().map(selector_json).collect(),
                addresses: e
                    .addrs
                    .iter()
                    .map(|l| JsonAddr {
                        address: l.ip,
                        expires: l.expires,
                        ttl_left: l.expires.saturating_sub(now),
                    })
                    .collect(),
            })
            .collect();
        let v = serde_json::json!({
            "learned_addresses": set.len(),
            "names": names,
        });
        return format!("{v:#}\n");
    }
    if set.is_empty() {
        return "no names learned\n".into();
    }
    let mut rows = vec![vec![
        "NAME".to_string(),
        "ENDPOINT".into(),
        "ADDRESS".into(),
        "TTL".into(),
        "SELECTORS".into(),
    ]];
    for e in set.entries() {
        let sels: Vec<String> = e.selectors.iter().map(selector_text).collect();
        let sels = if sels.is_empty() {
            "-".to_string()
        } else {
            sels.join(", ")
        };
        for l in &e.addrs {
            let ttl = match l.expires.checked_sub(now) {
                Some(left) if left > 0 => format!("{left}s"),
                _ => "expired".into(),
            };
            rows.push(vec![
                e.name.clone(),
                e.endpoint.clone(),
                l.ip.to_string(),
                ttl,
                sels.clone(),
            ]);
        }
    }
    let names = set.entries().count();
    format!(
        "{}{} learned for {}\n",
        columns(&rows),
        crate::text::count(set.len(), "address", "addresses"),
        crate::text::count(names, "name", "names"),
    )
}

pub fn run(args: &FqdnArgs) -> anyhow::Result<i32> {
    match &args.command {
        FqdnCommand::List(a) => {
            let dir = a.learned.state_dir()?;
            let set = read_learned(&dir)?;
            print!("{}", format_list(&set, now(), a.json));
            Ok(0)
        }
    }
}

/// The file the learned set is kept in, for messages.
pub fn learned_file(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::FqdnSelector;
    use crate::dns::message::Addr;

    #[test]
    fn lists_names_addresses_ttl_left_and_selectors() {
        let mut set = LearnedSet::new(LearnedConfig {
            min_ttl_s: 0,
            ..LearnedConfig::default()
        });
        let a = |ip: &str, ttl| Addr {
            ip: ip.parse().unwrap(),
            ttl,
        };
        set.learn(
            "shop/checkout-1",
            "api.stripe.com.",
            &[
                FqdnSelector::Name("api.stripe.com.".into()),
                FqdnSelector::Pattern("*.stripe.com.".into()),
            ],
            &[a("192.0.2.1", 30), a("2001:db8::1", 5)],
            1000,
        )
        .unwrap();
        let t = format_list(&set, 1010, false);
        assert_eq!(
            t,
            "NAME             ENDPOINT         ADDRESS      TTL      SELECTORS\n\
             api.stripe.com.  shop/checkout-1  192.0.2.1    20s      matchName: api.stripe.com., matchPattern: *.stripe.com.\n\
             api.stripe.com.  shop/checkout-1  2001:db8::1  expired  matchName: api.stripe.com., matchPattern: *.stripe.com.\n\
             2 addresses learned for 1 name\n"
        );
        let j: serde_json::Value = serde_json::from_str(&format_list(&set, 1010, true)).unwrap();
        assert_eq!(j["learned_addresses"], 2);
        assert_eq!(
            j["names"][0]["selectors"][1]["matchPattern"],
            "*.stripe.com."
        );
        assert_eq!(j["names"][0]["addresses"][0]["ttl_left"], 20);
        assert_eq!(j["names"][0]["addresses"][1]["ttl_left"], 0);
        assert_eq!(
            format_list(&LearnedSet::default(), 0, false),
            "no names learned\n"
        );
    }

    #[test]
    fn reads_the_file_netpold_saves_and_names_it_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_learned(dir.path()).unwrap().is_empty());
        let mut set = LearnedSet::new(LearnedConfig::default());
        set.learn(
            "web",
            "a.example.",
            &[],
            &[Addr {
                ip: "192.0.2.9".parse().unwrap(),
                ttl: 3600,
            }],
            now(),
        )
        .unwrap();
        set.save(dir.path()).unwrap();
        let view = learned_view(dir.path()).unwrap();
        assert_eq!(view.addrs_of("a.example").map(|a| a.len()), Some(1));
        std::fs::write(learned_file(dir.path()), "[").unwrap();
        let e = format!("{:#}", read_learned(dir.path()).unwrap_err());
        assert!(
            e.contains("dns-learned.json is not a learned set of version 1"),
            "{e}"
        );
    }
}
