//! netpolctl: validate policy files, explain verdicts offline, and inspect a
//! running netpold.
//!
//! Thin: parses the arguments and dispatches to `cli`; an error reaches here
//! once and is printed once, with its causes (`{:#}`).

use clap::{Parser, Subcommand};

use netpol::cli;

#[derive(Debug, Parser)]
#[command(
    name = "netpolctl",
    version,
    about = "Validate, explain and inspect netpol network policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate every policy and registry file
    Check(cli::check::CheckArgs),
    /// Offline verdict for a new connection
    Trace(cli::trace::TraceArgs),
    /// Connectivity table of all endpoints
    Matrix(cli::matrix::MatrixArgs),
    /// Flows whose verdict would change if NEWDIR's policies replaced the current ones
    Diff(cli::diff::DiffArgs),
    /// Health of the running daemon
    Status(cli::daemonctl::DaemonArgs),
    /// Endpoints known to the running daemon
    Endpoints(cli::daemonctl::DaemonArgs),
    /// Live verdicts from the running daemon, one line per flow decision
    Monitor(cli::daemonctl::MonitorArgs),
    /// Registry tools (import from kubectl JSON, push to etcd)
    Registry(cli::registry::RegistryArgs),
    /// Policy sets in etcd (fleet mode)
    Policy(cli::fleet::PolicyArgs),
    /// Nodes in etcd (fleet mode)
    Node(cli::fleet::NodeArgs),
    /// The fleet's status and revision barrier (fleet mode)
    Fleet(cli::fleet::FleetArgs),
    /// What the DNS proxy learned for toFQDNs rules
    Fqdn(cli::fqdn::FqdnArgs),
}

fn main() {
    // Die quietly on a closed pipe (`netpolctl matrix | head`) like other Unix
    // tools, instead of panicking in println!.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check(a) => cli::check::run(a),
        Command::Trace(a) => cli::trace::run(a),
        Command::Matrix(a) => cli::matrix::run(a),
        Command::Diff(a) => cli::diff::run(a),
        Command::Status(a) => cli::daemonctl::status(a),
        Command::Endpoints(a) => cli::daemonctl::endpoints(a),
        Command::Monitor(a) => cli::daemonctl::monitor(a),
        Command::Registry(a) => cli::registry::run(a),
        Command::Policy(a) => cli::fleet::policy(a),
        Command::Node(a) => cli::fleet::node(a),
        Command::Fleet(a) => cli::fleet::fleet(a),
        Command::Fqdn(a) => cli::fqdn::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("netpolctl: {e:#}");
            std::process::exit(2);
        }
    }
}
