//! Fleet mode's operator commands (DESIGN §5a, §6): `policy push`, `registry
//! push`, `node remove`, `fleet status`, `fleet wait`. They talk to etcd as
//! the `[etcd]` table of `--config` says (endpoints, prefix, TLS, user);
//! `--etcd-endpoints` replaces its endpoints.
//!
//! Exit codes: 0 done; 1 invalid input (nothing written) or `fleet wait` timed
//! out; 2 etcd or I/O error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::fleet::admin::{self, AdminError};
use crate::fleet::keys::Keys;
use crate::fleet::Store;
use crate::text::count;

/// How to reach etcd.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// netpold.toml to take the [etcd] table (endpoints, prefix, TLS, user) from
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// etcd endpoints instead of the config's (comma-separated or repeated)
    #[arg(long = "etcd-endpoints", value_name = "URL", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
}

impl EtcdArgs {
    fn resolve(&self) -> anyhow::Result<(Config, Arc<dyn Store>, Keys)> {
        let mut cfg = Config::load(&self.config)?;
        if !self.etcd_endpoints.is_empty() {
            cfg.etcd.endpoints = self.etcd_endpoints.clone();
            if let Err((key, m)) = cfg.etcd.check() {
                bail!("--etcd-endpoints: {m} ({key})");
            }
        }
        if !cfg.etcd.enabled() {
            bail!(
                "no etcd endpoints: set [etcd] endpoints in {} or pass --etcd-endpoints",
                self.config.display()
            );
        }
        let store = connect(&cfg)?;
        let keys = Keys::new(&cfg.etcd.prefix);
        Ok((cfg, store, keys))
    }
}

#[cfg(feature = "etcd")]
pub(crate) fn connect(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(crate::fleet::connect(&cfg.etcd)?)
}

#[cfg(not(feature = "etcd"))]
pub(crate) fn connect(_cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    bail!("this netpolctl was built without the `etcd` feature")
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Problems go to stdout one per line (as `check` prints them), a count to stderr.
fn invalid(cmd: &str, problems: &[crate::api::Problem]) -> i32 {
    for p in problems {
        println!("{p}");
    }
    eprintln!(
        "netpolctl {cmd}: {}; nothing was written",
        count(problems.len(), "problem", "problems")
    );
    1
}

fn admin_result<T>(cmd: &str, r: Result<T, AdminError>) -> anyhow::Result<Result<T, i32>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(AdminError::Invalid(p)) => Ok(Err(invalid(cmd, &p))),
        Err(AdminError::Refused(m)) => {
            eprintln!("netpolctl {cmd}: {m}");
            Ok(Err(1))
        }
        Err(AdminError::Store(e)) => Err(anyhow::anyhow!("etcd: {e}")),
    }
}

// ---------------------------------------------------------------- policy push

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate DIR, write it to etcd as a new policy set and make it current
    #[command(
        after_help = "Every host enforces its own policy directory plus the current set.\nThe printed revision is what `netpolctl fleet wait --revision R` waits for."
    )]
    Push(PolicyPushArgs),
}

#[derive(Debug, Args)]
pub struct PolicyPushArgs {
    /// The policy directory to push
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn policy(args: &PolicyArgs) -> anyhow::Result<i32> {
    match &args.command {
        PolicyCommand::Push(a) => policy_push(a),
    }
}

fn policy_push(a: &PolicyPushArgs) -> anyhow::Result<i32> {
    let (cfg, store, keys) = a.etcd.resolve()?;
    let r = runtime()?.block_on(admin::push_policies(
        store.as_ref(),
        &keys,
        &a.dir,
        &cfg.load_options(),
    ));
    let p = match admin_result("policy push", r)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if a.etcd.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else if p.unchanged {
        println!(
            "policy set {} ({}) is current already; revision {}",
            p.id,
            count(p.documents, "document", "documents"),
            p.revision
        );
    } else {
        println!(
            "policy set {} ({}) is current at revision {}",
            p.id,
            count(p.documents, "document", "documents"),
            p.revision
        );
        if !p.pruned.is_empty() {
            println!("removed old sets: {}", p.pruned.join(", "));
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------- registry push

#[derive(Debug, Args)]
pub struct RegistryPushArgs {
    /// The registry directory to push
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Write endpoints as static entries (registry/static/, for hosts without
    /// netpold; each names its host in spec.node) instead of under their node
    #[arg(long = "static")]
    pub static_: bool,
    /// With --static: delete static endpoints and namespaces DIR does not have
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn registry_push(a: &RegistryPushArgs) -> anyhow::Result<i32> {
    let (cfg, store, keys) = a.etcd.resolve()?;
    let r = runtime()?.block_on(admin::push_registry(
        store.as_ref(),
        &keys,
        &a.dir,
        a.static_,
        a.prune,
        &cfg.load_options(),
    ));
    let p = match admin_result("registry push", r)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if a.etcd.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!(
            "registry push: {} written, {} unchanged, {} deleted; revision {}",
            p.written, p.unchanged, p.deleted, p.revision
        );
    }
    Ok(0)
}

// ---------------------------------------------------------------- node remove

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Decommission a node: revoke its lease, delete its entries and status
    #[command(after_help = "Stop netpold on the node first: a running netpold publishes again.")]
    Remove(NodeRemoveArgs),
}

#[derive(Debug, Args)]
pub struct NodeRemoveArgs {
    #[arg(value_name = "NODE")]
    pub node: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn node(args: &NodeArgs) -> anyhow::Result<i32> {
    let NodeCommand::Remove(a) = &args.command;
    let (_, store, keys) = a.etcd.resolve()?;
    let r = runtime()?.block_on(admin::remove_node(store.as_ref(), &keys, &a.node));
    let r = match admin_result("node remove", r)? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    if a.etcd.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let leases = if r.leases_revoked.is_empty() {
            "no lease".to_string()
        } else {
            format!("lease {} revoked", r.leases_revoked.join(", "))
        };
        println!(
            "node {}: {} deleted, {leases}; revision {}",
            r.node,
            count(r.keys, "key", "keys"),
            r.revision
        );
    }
    Ok(0)
}

// ---------------------------------------------------------------- fleet status / wait

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every node: ready, degraded, applied revision, generation, last contact
    Status(FleetStatusArgs),
    /// Wait until every node has applied revision R (exit 1 on timeout)
    Wait(FleetWaitArgs),
}

#[derive(Debug, Args)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Args)]
pub struct FleetWaitArgs {
    /// The etcd revision every node must have applied (etcd's head will do:
    /// nodes enforcing the registry and policies as of R pass)
    #[arg(long, value_name = "R")]
    pub revision: i64,
    /// Give up after this many seconds
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn fleet(args: &FleetArgs) -> anyhow::Result<i32> {
    match &args.command {
        FleetCommand::Status(a) => fleet_status(a),
        FleetCommand::Wait(a) => fleet_wait(a),
    }
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

/// The `fleet status` table.
pub fn format_status(s: &admin::FleetStatus) -> String {
    let mut out = format!("etcd revision {}\n", s.revision);
    out.push_str(&format!(
        "{:<24} {:<6} {:<9} {:>10} {:>10} {:>13}\n",
        "NODE", "READY", "DEGRADED", "APPLIED", "GENERATION", "LAST-CONTACT"
    ));
    for n in &s.nodes {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<24} {:<6} {:<9} {:>10} {:>10} {:>13}\n",
            n.node,
            yes_no(n.ready),
            yes_no(n.degraded),
            opt(n.applied_revision.map(|r| r.to_string())),
            opt(n.generation.map(|g| g.to_string())),
            opt(n.last_contact_s.map(|s| format!("{s}s ago"))),
        ));
    }
    out
}

fn fleet_status(a: &FleetStatusArgs) -> anyhow::Result<i32> {
    let (_, store, keys) = a.etcd.resolve()?;
    let r = runtime()?.block_on(admin::fleet_status(store.as_ref(), &keys));
    let s = match admin_result("fleet status", r)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if a.etcd.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(0)
}

fn fleet_wait(a: &FleetWaitArgs) -> anyhow::Result<i32> {
    if !(a.timeout.is_finite() && a.timeout >= 0.0) {
        bail!("--timeout: {} is not a number of seconds", a.timeout);
    }
    let (_, store, keys) = a.etcd.resolve()?;
    let r = runtime()?.block_on(admin::fleet_wait(
        store.as_ref(),
        &keys,
        a.revision,
        Duration::from_secs_f64(a.timeout),
    ));
    match r {
        Ok(s) => {
            if a.etcd.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "every node ({}) has applied revision {}",
                    s.nodes.len(),
                    a.revision
                );
            }
            Ok(0)
        }
        Err((s, behind)) => {
            if a.etcd.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            }
            eprintln!(
                "netpolctl fleet wait: revision {} not applied everywhere after {} s: {}",
                a.revision,
                a.timeout,
                behind.join(", ")
            );
            Ok(1)
        }
    }
}
