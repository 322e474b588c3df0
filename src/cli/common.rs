//! Arguments shared by every command that reads files, and the one way they
//! read them ([`load_compiled`]: the daemon's pipeline, once).

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, DEFAULT_CONFIG};
use crate::pipeline;
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

/// Read, validate and compile the files named by `files` as netpold does (node
/// name, audit, allow_localhost, map sizes; only the host's own addresses,
/// which netpold learns from netlink, are not known here). On invalid files,
/// or a set that would not fit the maps, every problem is printed to stderr and
/// `Ok(None)` returned (exit 2 for callers).
pub fn load_compiled(files: &FileArgs) -> anyhow::Result<Option<Compiled>> {
    let cfg = files.resolve()?;
    let (_, pass) = pipeline::load_files(&cfg);
    if let (Some(c), true) = (pass.compiled, pass.problems.is_empty()) {
        return Ok(Some(c));
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
