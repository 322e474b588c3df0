//! Arguments shared by every command that reads files, and the one way they
//! read them ([`load_compiled`]: the daemon's pipeline, once).

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::api::Problem;
use crate::config::{Config, DEFAULT_CONFIG};
use crate::pipeline;
use crate::policy::compile::{CompileOptions, Compiler};
use crate::policy::fqdn::FqdnAddrs;
use crate::policy::types::Compiled;

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// netpold.toml to take default paths, node name, audit, allow_localhost and map sizes from
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Policy directory (default: the config's policy_dir)
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Endpoint registry directory; repeatable (default: the config's endpoint_dirs)
    #[arg(long = "endpoint-dir", value_name = "DIR")]
    pub endpoint_dirs: Vec<PathBuf>,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
    /// Merge the files with the registry and current policy set in etcd (the
    /// config's [etcd] table), as netpold in fleet mode does for this node
    #[arg(long)]
    pub from_etcd: bool,
}

impl FileArgs {
    /// The config with the command-line overrides applied.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::load(&self.config)?;
        if let Some(d) = &self.policy_dir {
            cfg.policy_dir = d.clone();
        }
        if !self.endpoint_dirs.is_empty() {
            cfg.endpoint_dirs = self.endpoint_dirs.clone();
        }
        Ok(cfg)
    }
}

/// One pass over the inputs `files` names, as netpold makes it: the files, or
/// with `--from-etcd` the files merged with etcd's view for this node. The
/// last value: remote entries netpold would leave out (invalid, not matching
/// their key, losing a claim, or to a file), each under its `etcd:` origin.
pub fn load(
    files: &FileArgs,
) -> anyhow::Result<(Config, pipeline::Held, pipeline::Pass, Vec<Problem>)> {
    let cfg = files.resolve()?;
    if !files.from_etcd {
        let (held, pass) = pipeline::load_files(&cfg);
        return Ok((cfg, held, pass, Vec::new()));
    }
    if !cfg.etcd.enabled() {
        anyhow::bail!(
            "--from-etcd: no etcd endpoints in {} ([etcd] endpoints)",
            files.config.display()
        );
    }
    let store = super::fleet::connect(&cfg)?;
    let keys = crate::fleet::keys::Keys::new(&cfg.etcd.prefix);
    let node = cfg.node_name();
    let view = super::fleet::runtime()?
        .block_on(crate::fleet::sync::read_view(store.as_ref(), &keys, &node))
        .map_err(|e| anyhow::anyhow!("--from-etcd: {}", crate::error::Chain(&e)))?;
    let mut rejected = view.rejected.clone();
    rejected.extend(view.policy_problems.iter().cloned());
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(view));
    let mut inputs = crate::fleet::inputs::FleetInputs::new(pipeline::FileInputs::once(&cfg), rx);
    let (held, pass) = pipeline::load_once(&cfg, &mut inputs);
    rejected.extend(
        inputs
            .merged()
            .lock()
            .map(|m| m.conflicts.clone())
            .unwrap_or_default(),
    );
    Ok((cfg, held, pass, rejected))
}

/// Read, validate and compile the files named by `files` as netpold does (node
/// name, audit, allow_localhost, map sizes; only the host's own addresses,
/// which netpold learns from netlink, are not known here). On invalid files,
/// or a set that would not fit the maps, every problem is printed to stderr and
/// `Ok(None)` returned (exit 2 for callers).
pub fn load_compiled(files: &FileArgs) -> anyhow::Result<Option<Compiled>> {
    Ok(load_in_force(files)?.map(|(_, _, c)| c))
}

/// [`load_compiled`], with the config and the sets in force, to compile them
/// again with what the DNS proxy learned ([`compile_with_learned`]).
pub fn load_in_force(
    files: &FileArgs,
) -> anyhow::Result<Option<(Config, pipeline::Held, Compiled)>> {
    let (cfg, held, pass, _) = load(files)?;
    if let (Some(c), true) = (pass.compiled, pass.problems.is_empty()) {
        return Ok(Some((cfg, held, c)));
    }
    let mut err = std::io::stderr().lock();
    for p in &pass.problems {
        let _ = writeln!(err, "{p}");
    }
    let _ = writeln!(
        err,
        "netpolctl: {} in the policy or registry files",
        crate::text::count(pass.problems.len(), "problem", "problems")
    );
    Ok(None)
}

/// The sets in force of `held` compiled as netpold compiles them, with
/// `learned` (the DNS proxy's learned addresses) for the toFQDNs rules.
pub fn compile_with_learned(
    cfg: &Config,
    held: &pipeline::Held,
    learned: FqdnAddrs,
) -> anyhow::Result<Compiled> {
    let (Some(pol), Some(reg)) = (&held.policies, &held.registry) else {
        anyhow::bail!("no policy or registry set in force");
    };
    let opts = CompileOptions {
        fqdn: std::sync::Arc::new(learned),
        ..cfg.compile_options()
    };
    Ok(Compiler::new().compile(&pol.set, &reg.set, &opts)?)
}

/// Rows as left-aligned columns two spaces apart, each line without trailing
/// blanks (the tables of `endpoints` and `fqdn list`).
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
