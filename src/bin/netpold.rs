//! netpold: the netpol daemon. Runs in the foreground, as systemd wants it: logs to
//! journald under systemd (stderr otherwise), SIGHUP reloads, SIGTERM/SIGINT stop
//! it and leave enforcement in place. `netpold --detach` removes everything this
//! instance pinned (package purge).
//!
//! Thin: reads the config, builds the logger, the signals and the datapath, and
//! runs `daemon::run_with`; an error reaches here once and is printed once, with
//! its causes (`{:#}`).

use std::path::PathBuf;

use clap::Parser;
use slog::Logger;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use netpol::config::Config;
use netpol::daemon::netlink::NetlinkLinks;
use netpol::daemon::{self, sdnotify::Notifier, Options};
use netpol::datapath::Datapath;
use netpol::sizes::MapKind;

#[derive(Debug, Parser)]
#[command(
    name = "netpold",
    version,
    about = "Enforce netpol network policy with eBPF"
)]
struct Args {
    /// Configuration file
    #[arg(long, value_name = "FILE", default_value = netpol::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Remove every program, link and map this instance pinned (its pin_dir), then
    /// exit: traffic is no longer enforced. Used when the package is purged.
    #[arg(long)]
    detach: bool,
    /// Testing only: run the loop against an in-memory datapath that enforces nothing.
    #[arg(long, hide = true)]
    fake_datapath: bool,
}

fn main() {
    daemon::fix_allocator_thresholds();
    let args = Args::parse();
    // Everything netpold creates (socket, saved copies) starts private; the socket is
    // opened to socket_group explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netpold: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    let log = netpol::logging::build(config.log_level, config.log_format);
    let code = match real_main(args, config, log.clone()) {
        Ok(()) => 0,
        Err(e) => {
            slog::crit!(log, "{:#}", e);
            1
        }
    };
    drop(log);
    std::process::exit(code);
}

fn real_main(args: Args, config: Config, log: Logger) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.detach {
        let mut dp = open_datapath(&config, &args.config)?;
        dp.detach_all()?;
        let _ = std::fs::remove_file(config.socket_path());
        slog::info!(log, "detached: nothing is enforced by this instance any more"; "pin_dir" => %config.pin_dir.display());
        return Ok(());
    }
    rt.block_on(async move {
        // Signals first, so a SIGTERM during start-up is not lost.
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if reload_tx.send(()).is_err() {
                    return;
                }
            }
        });
        let shutdown_log = log.clone();
        let shutdown = async move {
            let sig = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            slog::info!(shutdown_log, "stopping"; "signal" => sig);
        };
        let opts = Options::new(log.clone(), Notifier::Systemd, reload_rx);
        if args.fake_datapath {
            slog::warn!(
                log,
                "running with the in-memory test datapath: NOTHING IS ENFORCED"
            );
            let dp = netpol::datapath::fake::FakeDatapath::new();
            daemon::run_with(config, dp, NetlinkLinks, opts, shutdown).await?;
        } else {
            let dp = open_datapath(&config, &args.config)?;
            if !config.datapath.stage.enforcing() {
                slog::warn!(
                    log,
                    "datapath stage is not full: the programs pass every packet after this step and NOTHING IS ENFORCED (benchmarks only)";
                    "stage" => config.datapath.stage.name(),
                    "file" => args.config.display().to_string()
                );
            }
            daemon::run_with(config, dp, NetlinkLinks, opts, shutdown).await?;
        }
        Ok(())
    })
}

/// The kernel datapath of this instance: adopts what is pinned under pin_dir.
fn open_datapath(config: &Config, path: &std::path::Path) -> anyhow::Result<impl Datapath> {
    netpol::datapath::kernel::KernelDatapath::open(&config.pin_dir, &config.datapath_settings())
        .map_err(|e| map_size_hint(e, config, path))
}

/// A map the kernel will not create (E2BIG: too many entries for its type;
/// ENOMEM: cannot allocate it) comes from a size in netpold.toml: say which.
fn map_size_hint(
    e: netpol::datapath::DatapathError,
    config: &Config,
    path: &std::path::Path,
) -> anyhow::Error {
    if e.map_size_refused() {
        // The whole chain (what failed: why), then the hint, printed once.
        let cause = anyhow::Error::from(e);
        let sizes = config.map_sizes();
        let (ct, ep) = (MapKind::Conntrack, MapKind::Endpoints);
        anyhow::anyhow!(
            "{cause:#}: the kernel refuses a map of the configured size; {}: {ct} = {}, {ep} = {}",
            path.display(),
            sizes.get(ct),
            sizes.get(ep)
        )
    } else {
        e.into()
    }
}
