//! `netpolctl matrix`.

use clap::Args;

use super::common::FileArgs;

#[derive(Debug, Args)]
pub struct MatrixArgs {
    #[command(flatten)]
    pub files: FileArgs,
}

pub fn run(args: &MatrixArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
