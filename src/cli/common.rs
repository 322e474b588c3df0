//! Arguments shared by every command that reads files.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, DEFAULT_CONFIG};

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
