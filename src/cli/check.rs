//! `netpolctl check`.

use clap::Args;

use super::common::FileArgs;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub files: FileArgs,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
