//! `netpolctl status`, `endpoints`, `monitor`: talk to a running netpold through
//! its runtime socket.

use std::path::PathBuf;

use clap::Args;

use crate::config::DEFAULT_CONFIG;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// netpold.toml naming the instance's runtime_dir
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The daemon's socket (default: runtime_dir/netpold.sock)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
}

pub fn status(args: &DaemonArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}

pub fn endpoints(args: &DaemonArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}

pub fn monitor(args: &DaemonArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
