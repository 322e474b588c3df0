//! `netpolctl trace`.

use clap::Args;

use super::common::FileArgs;

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub files: FileArgs,
}

pub fn run(args: &TraceArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
