//! netpold: the netpol daemon. Runs in the foreground, as systemd wants it.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "netpold", version, about = "Enforce netpol network policy with eBPF")]
struct Args {
    /// Configuration file
    #[arg(long, value_name = "FILE", default_value = netpol::config::DEFAULT_CONFIG)]
    config: PathBuf,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = netpol::config::Config::load(&args.config) {
        eprintln!("netpold: {e:#}");
        std::process::exit(1);
    }
}
