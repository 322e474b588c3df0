//! netpold: the run loop, level-triggered, one task, owning the datapath.
//!
//! Every trigger — a file event (debounced), a link event, a reload, the resync
//! timer, a datapath retry, a "look again" from the inputs — is a [`Cause`] for
//! one reconcile ([`reconcile`]): read both input sets and compile within the
//! map budget (the [`crate::pipeline`]), and apply when the state or the
//! attachments differ from what is installed. Invalid input keeps the last
//! valid set of that kind; the files that applied are saved beside `lastgood`
//! ([`save`]) and used at start when the live files are invalid (docs/daemon.md,
//! "How it reconciles" and "Invalid files and the last valid set"). Datapath
//! errors are retried with backoff and never stop the loop. Shutdown and
//! reload are parameters, and the inputs and the compiler are [`Options`], so
//! tests drive the real loop ([`run_with`]) with fakes.
//!
//! Layout: this module owns the loop and its triggers; [`reconcile`] one pass
//! and what is installed; [`save`] when the last valid files are copied;
//! [`lastgood`] the copies; [`status`] the socket's wire types; [`server`] the
//! socket; [`watch`], [`netlink`], [`sdnotify`] and [`metrics`] the daemon's
//! other contacts with the system.
//!
//! Must not: block on a client (the socket server runs in its own tasks), touch
//! the kernel other than through [`Datapath`] and [`Links`], or tear enforcement
//! down on exit (pins stay; `netpold --detach` removes them).

pub mod dnsproxy;
pub mod fleet;
pub mod lastgood;
pub mod metrics;
pub mod netlink;
pub mod reconcile;
pub mod save;
pub mod sdnotify;
pub mod server;
pub mod status;
pub mod watch;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slog::Logger;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use self::netlink::{Links, NetlinkError};
use self::watch::{Debouncer, DirWatcher, FileChange, WatchError, WatchEvent};
use crate::config::Config;
use crate::datapath::Datapath;
use crate::pipeline::{Compile, FileInputs, Hint, Inputs};
use crate::policy::compile::{CompileOptions, Compiler};

pub use reconcile::Cause;
use reconcile::{Outputs, Reconciler};
use sdnotify::Notifier;
use server::{Query, ServerError, Shared};
use status::Status;

/// Why the daemon could not start. Each variant says which part failed; the
/// cause is its source (`{:#}` prints the chain, each cause once).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("runtime socket")]
    Server(#[from] ServerError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("interfaces")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
}

/// Everything [`run_with`] takes besides the config, the kernel sides and shutdown.
pub struct Options {
    pub log: Logger,
    pub notifier: Notifier,
    /// One message per reload request (SIGHUP in the binary).
    pub reload: mpsc::UnboundedReceiver<()>,
    /// Where the input sets come from; `None`: the config's files, read through
    /// a cache ([`FileInputs::new`]).
    pub inputs: Option<Box<dyn Inputs>>,
    /// What compiles them: the real core by default (a [`Compiler`] the daemon
    /// keeps for its whole life).
    pub compiler: Box<dyn Compile>,
    /// How often verdict events are read from the datapath.
    pub event_poll: Duration,
    /// Fleet mode's store; `None`: the etcd the `[etcd]` table names (tests
    /// put an in-memory store here). Unused without `[etcd] endpoints`.
    pub store: Option<Arc<dyn crate::fleet::Store>>,
    /// The channel the directory watcher reports on.
    watch_tx: mpsc::UnboundedSender<WatchEvent>,
    watch_rx: mpsc::UnboundedReceiver<WatchEvent>,
}

impl Options {
    pub fn new(log: Logger, notifier: Notifier, reload: mpsc::UnboundedReceiver<()>) -> Options {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        Options {
            log,
            notifier,
            reload,
            inputs: None,
            compiler: Box::new(Compiler::new()),
            event_poll: Duration::from_millis(100),
            store: None,
            watch_tx,
            watch_rx,
        }
    }

    /// Report watch events as the directory watcher does (tests: a lost-events
    /// `Rescan` that no file change can provoke on demand).
    #[cfg(any(test, feature = "test-support"))]
    pub fn watch_sender(&self) -> mpsc::UnboundedSender<WatchEvent> {
        self.watch_tx.clone()
    }
}

/// At most this many touched files are remembered; more is a full read.
const MAX_TOUCHED: usize = 4096;

/// The files watch events named since the last reconcile; `None` when an
/// event did not name one (or events were lost): the next read looks at every
/// file.
struct Touched(Option<BTreeSet<PathBuf>>);

impl Touched {
    fn note(&mut self, ev: &WatchEvent) {
        match ev {
            WatchEvent::File(
                FileChange::Writing(p) | FileChange::Written(p) | FileChange::Gone(p),
            ) => {
                if let Some(t) = self.0.as_mut() {
                    t.insert(p.clone());
                    if t.len() > MAX_TOUCHED {
                        self.0 = None;
                    }
                }
            }
            WatchEvent::Changed | WatchEvent::Rescan => self.0 = None,
        }
    }

    /// What a reconcile for `cause` may assume changed: a file change reads only
    /// the files its events named; every other cause (and lost events) reads
    /// everything. Starts the next period.
    fn take(&mut self, cause: Cause) -> Option<BTreeSet<PathBuf>> {
        self.0
            .replace(BTreeSet::new())
            .filter(|_| cause == Cause::Change)
    }
}

/// Fix glibc's allocation thresholds at their defaults (128 KiB) before the
/// first allocation of note. Left dynamic, freeing the first large buffer
/// (a file's text) raises the mmap threshold to its size and the trim
/// threshold to twice that, so later scratch of a few MiB is carved from a
/// thread's arena, and an arena's free top is given back only above that
/// threshold. By hand at 10k x 10k with the probe servers beside it, one run
/// without this kept 35 MiB of free memory resident in one arena (93 MiB
/// RSS, 47 MiB in use) and the runs with it settled at 61-62 MiB; the
/// bench's own read of the same case still gave 92 MiB, so this is not the
/// whole story (docs/benchmarks.md).
///
/// The rest of it was the thread arenas: glibc gives each new thread an arena
/// of its own (up to eight per core), and the free pages left between kept
/// objects in them stayed resident: the bench's settled read at 10k x 10k was
/// 75.7-79.0 MiB in three runs with 47 MiB in use, and with every thread on
/// the main arena 56.4-56.7 in seven (two arenas: 57-58 or 81-84 by which
/// arena the workers drew). With one arena the threads of a parse in parts
/// wait on its lock (its load took 565 ms instead of 510 without parts), so
/// the daemon parses each file whole (`api::load::set_parse_in_parts`); its
/// start at 10k x 10k went from 0.52-0.56 s to 0.82-0.96 s, under the 1 s
/// target, for 19 MiB less resident; with 100k remote endpoints (11 files,
/// parsed side by side before) from 2.4 s to 3.2 s, for 200 -> 161 MiB
/// (2026-12-08).
pub fn fix_allocator_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; it takes no pointer.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        crate::api::load::set_parse_in_parts(false);
    }
}

/// Run the daemon until `shutdown` resolves. Enforcement stays in place afterwards.
pub async fn run_with<D: Datapath, L: Links>(
    config: Config,
    datapath: D,
    mut links: L,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let Options {
        log,
        notifier,
        mut reload,
        inputs,
        compiler,
        event_poll,
        store,
        watch_tx: fs_tx,
        watch_rx: mut fs_rx,
    } = opts;
    // The daemon installs the entries of its own endpoints only.
    let copts = CompileOptions {
        local_entries_only: true,
        ..config.compile_options()
    };
    let node = copts.node_name.clone();
    let socket_path = config.socket_path();
    let listener = server::bind(&socket_path, &config.socket_group)?;
    let (status_tx, status_rx) = tokio::sync::watch::channel(Status {
        node: node.clone(),
        ..Status::default()
    });
    let (events_tx, _) = broadcast::channel::<Arc<str>>(4096);
    let (query_tx, mut query_rx) = mpsc::channel::<Query>(16);
    let server_task = tokio::spawn(server::serve(
        listener,
        Shared {
            status: status_rx,
            events: events_tx.clone(),
            queries: query_tx,
        },
        log.new(slog::o!("component" => "socket")),
    ));
    // From here on the socket must go away whatever happens.
    let _socket_guard = RemoveOnDrop(socket_path.clone(), server_task);

    // Prometheus metrics (opt-in): the server thread stops when this is dropped.
    // A socket that cannot listen is reported (log, status) and the daemon runs
    // on without metrics: enforcement and its updates matter more than the
    // numbers about them, and exiting would leave systemd restarting it in a
    // loop with no policy change applied meanwhile.
    let (metrics, _metrics_server, metrics_error) = match config.metrics_listen.as_str() {
        "" => (None, None, None),
        addr => {
            let m = metrics::Metrics::new();
            match metrics::serve(metrics::parse_listen(addr)?, m.clone()) {
                Ok(s) => {
                    slog::info!(log, "serving metrics"; "url" => format!("http://{}/metrics", s.local_addr()));
                    (Some(m), Some(s), None)
                }
                Err(e) => {
                    let msg = e.explain();
                    slog::error!(log, "{msg}; running without metrics");
                    (None, None, Some(msg))
                }
            }
        }
    };

    let mut link_rx = links.subscribe(&log).await?;
    let mut targets = vec![config.policy_dir.clone()];
    targets.extend(config.endpoint_dirs.iter().cloned());
    let mut watcher = DirWatcher::new(targets, fs_tx)?;

    let log = log.new(slog::o!("component" => "reconcile"));
    slog::info!(log, "netpold starting"; "node" => &node, "policy_dir" => %config.policy_dir.display(),
        "pin_dir" => %config.pin_dir.display(), "socket" => %socket_path.display(), "generation" => datapath.generation());
    // Fleet mode: the engine starts now (its cached view is there at once);
    // the inputs merge the files with its view unless a test gave its own.
    let (fleet, fleet_inputs) = match fleet::start(&config, store, &log)? {
        Some((link, fi)) => (Some(link), Some(fi)),
        None => (None, None),
    };
    let inputs: Box<dyn Inputs> = match (inputs, fleet_inputs) {
        (Some(i), _) => i,
        (None, Some(fi)) => Box::new(fi),
        (None, None) => Box::new(FileInputs::new(&config)),
    };
    let saver = save::Saver::new(
        lastgood::LastGood::new(&config.state_dir),
        config.policy_dir.clone(),
        config.endpoint_dirs.clone(),
    );
    let out = Outputs {
        log,
        notifier,
        status: status_tx,
        events: events_tx,
        metrics,
        metrics_error,
    };
    let links_now = link_rx.borrow_and_update().clone();
    let mut d = Reconciler::new(
        out,
        copts,
        config.map_sizes(),
        inputs,
        compiler,
        saver,
        links_now,
        datapath,
    );
    d.fleet = fleet;
    // The DNS proxy's side: its learned set is reloaded before the first
    // compile, so a restart keeps what was allowed; the proxy starts once a
    // state with DNS rules is installed.
    let (learn_tx, mut learn_rx) = mpsc::unbounded_channel::<dnsproxy::LearnRequest>();
    d.dns = Some(dnsproxy::Dns::new(
        config.dns.clone(),
        config.state_dir.clone(),
        learn_tx,
        &d.out.log,
    ));
    if let Some(f) = d.fleet.as_mut() {
        let limit = Duration::from_millis(config.etcd.request_timeout_ms);
        f.initial_sync(limit, &d.out.log).await;
    }
    let mut fleet_state = d.fleet.as_mut().map(|f| f.state_rx().clone());
    let mut wakeups = d.take_wakeups();
    let mut touched = Touched(None);
    let mut debouncer = Debouncer::new(Duration::from_millis(config.debounce_ms));
    let resync = Duration::from_secs(config.resync_interval_s);
    // Learned addresses an open connection still uses stay in the first state.
    d.refresh_dns_holds(dnsproxy::unix_now());
    reconcile(&mut d, &mut watcher, &mut touched, Cause::Start);
    dns_after(&mut d).await;
    let mut dns_tick = tokio::time::interval(Duration::from_secs(1));
    dns_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut shutdown = std::pin::pin!(shutdown);
    let mut links_open = true;
    let mut reload_open = true;
    let mut queries_open = true;
    let mut next_resync = (resync > Duration::ZERO).then(|| Instant::now() + resync);
    let mut events = tokio::time::interval(event_poll);
    events.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog_every = d.out.notifier.watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    loop {
        let debounce_at = debouncer.deadline().map(Instant::from_std);
        let retry_at = d.retry.map(|(at, _)| at);
        let save_at = d.saver.due();
        let lint_at = d.lint_at;
        let cause = tokio::select! {
            _ = &mut shutdown => break,
            ev = fs_rx.recv() => {
                let ev = ev.unwrap_or(WatchEvent::Changed);
                if ev == WatchEvent::Rescan {
                    slog::info!(d.out.log, "file events were lost; rescanning");
                }
                touched.note(&ev);
                debouncer.event(std::time::Instant::now(), &ev);
                continue;
            }
            r = link_rx.changed(), if links_open => {
                match r {
                    Ok(()) => {
                        d.links = link_rx.borrow_and_update().clone();
                        d.links_changed = true;
                        debouncer.poke(std::time::Instant::now());
                    }
                    Err(_) => links_open = false,
                }
                continue;
            }
            r = reload.recv(), if reload_open => {
                if r.is_none() {
                    reload_open = false;
                    continue;
                }
                Cause::Reload
            }
            w = recv_opt(&mut wakeups), if wakeups.is_some() => {
                if w.is_none() {
                    wakeups = None;
                    continue;
                }
                // One reconcile reads the newest view: wakeups queued behind a
                // slow pass add nothing.
                if let Some(rx) = wakeups.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
                Cause::Change
            }
            r = changed_opt(&mut fleet_state), if fleet_state.is_some() => {
                // etcd came or went, the view got in sync: status and the
                // status key follow; nothing is read or applied for it.
                if r.is_err() {
                    fleet_state = None;
                } else {
                    d.publish();
                }
                continue;
            }
            _ = sleep_until_opt(debounce_at), if debounce_at.is_some() => Cause::Change,
            _ = sleep_until_opt(retry_at), if retry_at.is_some() => Cause::Retry,
            _ = sleep_until_opt(next_resync), if next_resync.is_some() => Cause::Resync,
            _ = sleep_until_opt(lint_at), if lint_at.is_some() => {
                d.lint_due();
                continue;
            }
            _ = sleep_until_opt(save_at), if save_at.is_some() => {
                d.start_save();
                continue;
            }
            r = d.saver.result(), if d.saver.busy() => {
                d.save_finished(r);
                continue;
            }
            _ = events.tick() => {
                d.poll_events();
                continue;
            }
            Some(first) = learn_rx.recv() => {
                // Everything learned meanwhile in one compile and apply.
                let mut batch = vec![first];
                while let Ok(r) = learn_rx.try_recv() {
                    batch.push(r);
                }
                d.learn_batch(batch);
                d.drop_retired();
                dns_after(&mut d).await;
                d.record_dns_metrics();
                continue;
            }
            _ = dns_tick.tick() => {
                d.expire_learned();
                d.drop_retired();
                dns_after(&mut d).await;
                d.record_dns_metrics();
                if let Some(dns) = d.dns.as_mut() {
                    dns.save(&d.out.log);
                }
                continue;
            }
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                d.out.notifier.watchdog();
                continue;
            }
            q = query_rx.recv(), if queries_open => {
                match q {
                    Some(Query::Endpoints(tx)) => { let _ = tx.send(d.endpoint_views()); }
                    None => queries_open = false,
                }
                continue;
            }
        };
        if cause == Cause::Reload {
            d.out.notifier.reloading();
        }
        debouncer.fired(std::time::Instant::now());
        // A full read restarts the safety net's period (a file change reads only
        // the files its events named).
        if cause != Cause::Change || touched.0.is_none() {
            next_resync = (resync > Duration::ZERO).then(|| Instant::now() + resync);
        }
        reconcile(&mut d, &mut watcher, &mut touched, cause);
        dns_after(&mut d).await;
        if cause == Cause::Reload {
            let line = d.status_line();
            if d.ready {
                d.out.notifier.ready(&line);
            } else {
                d.out.notifier.status(&line);
            }
        }
    }
    d.out.notifier.stopping();
    if let Some(dns) = d.dns.as_mut() {
        dns.save(&d.out.log);
    }
    d.stop().await;
    slog::info!(d.out.log, "netpold stopping; enforcement stays in place"; "generation" => d.datapath.generation());
    Ok(())
}

/// One reconcile for `cause`, on what the watch events named when it is a change.
fn reconcile<D: Datapath>(
    d: &mut Reconciler<D>,
    watcher: &mut DirWatcher,
    touched: &mut Touched,
    cause: Cause,
) {
    if let Err(e) = watcher.refresh() {
        slog::warn!(d.out.log, "cannot watch a directory; relying on the periodic resync"; "error" => %crate::error::Chain(&e));
    }
    let files = touched.take(cause);
    let hint = match &files {
        Some(f) => Hint::Files(f),
        None => Hint::Anything,
    };
    d.reconcile(cause, hint);
    d.drop_retired();
}

/// After a reconcile: the DNS redirect and the proxy's view follow the
/// installed state, and the proxy starts when it first has DNS rules (a
/// failure is logged and tried again after the next reconcile; meanwhile the
/// redirect drops those endpoints' DNS: fail closed).
async fn dns_after<D: Datapath>(d: &mut Reconciler<D>) {
    if !d.dns_sync() {
        return;
    }
    let Some(dns) = d.dns.as_mut() else {
        return;
    };
    let log = d.out.log.new(slog::o!("component" => "dns"));
    match dnsproxy::DnsProxy::start(
        &dns.config,
        dns.learn_tx.clone(),
        d.out.events.clone(),
        &log,
    )
    .await
    {
        Ok(p) => {
            dns.proxy = Some(p);
            dns.error = None;
            d.dns_sync();
        }
        Err(e) => {
            let msg = crate::error::chain(&e);
            if dns.error.as_deref() != Some(msg.as_str()) {
                slog::error!(log, "cannot start the DNS proxy; DNS of endpoints with DNS rules is dropped until it runs"; "error" => &msg);
            }
            dns.error = Some(msg);
        }
    }
}

/// Removes the socket file and stops the server when the loop ends, however it ends.
struct RemoveOnDrop(PathBuf, tokio::task::JoinHandle<()>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.1.abort();
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn changed_opt<T>(
    rx: &mut Option<tokio::sync::watch::Receiver<T>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::netlink::{fake_links, LinkTable};
    use super::*;
    use crate::api::model::{
        EndpointDef, EndpointKind, Interface, Origin, Policy, PolicyKind, PolicySet, RegistrySet,
    };
    use crate::api::Problem;
    use crate::datapath::fake::FakeDatapath;
    use crate::pipeline::{Read, SavedReader};
    use crate::policy::compile::{CompileError, CompileOptions};
    use crate::policy::types::Compiled;

    /// Every path under `root`; no resync timer (only the test's triggers).
    fn config(root: &std::path::Path) -> Config {
        let at = |d: &str| root.join(d);
        Config {
            policy_dir: at("pol"),
            endpoint_dirs: vec![at("ep")],
            runtime_dir: at("run"),
            state_dir: at("state"),
            resync_interval_s: 0,
            ..Config::default()
        }
    }

    fn options() -> Options {
        let (_tx, rx) = mpsc::unbounded_channel();
        Options::new(crate::logging::discard(), Notifier::recorder().0, rx)
    }

    /// An error with an OS cause is printed with that cause once: a
    /// runtime_dir that cannot be created (its parent is a file).
    #[tokio::test]
    async fn an_os_error_is_printed_with_its_cause_once() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let mut cfg = config(tmp.path());
        cfg.runtime_dir = file.join("run");
        let (_links, fake) = fake_links(LinkTable::default());
        let e = run_with(
            cfg,
            FakeDatapath::new(),
            fake,
            options(),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            text,
            format!(
                "runtime socket: {}: create runtime directory: Not a directory (os error 20)",
                file.join("run/netpold.sock").display()
            )
        );
        assert_eq!(text.matches("Not a directory").count(), 1, "{text}");
    }

    /// A source whose sets live in memory and that says when they moved, as a
    /// remote view would.
    struct Remote {
        policies: Arc<Mutex<Vec<String>>>,
        wakeups: Option<mpsc::UnboundedReceiver<()>>,
    }

    fn origin(kind: &str, name: &str) -> Origin {
        Origin {
            file: PathBuf::from(format!("etcd:/netpol/v1/{name}")).into(),
            doc: 0,
            kind: kind.into(),
            namespace: Some("default".into()),
            name: name.into(),
        }
    }

    impl Inputs for Remote {
        fn policies(&mut self, _: Hint<'_>) -> Read<PolicySet> {
            let names = self.policies.lock().unwrap().clone();
            Read::Valid(PolicySet {
                policies: names
                    .iter()
                    .map(|n| {
                        Arc::new(Policy {
                            origin: origin("CiliumNetworkPolicy", n),
                            kind: PolicyKind::CiliumNetworkPolicy,
                            rules: vec![].into(),
                            staged: false,
                            source: Default::default(),
                        })
                    })
                    .collect(),
            })
        }
        fn registry(&mut self, _: Hint<'_>) -> Read<RegistrySet> {
            Read::Valid(RegistrySet {
                endpoints: vec![Arc::new(EndpointDef {
                    origin: origin("Endpoint", "web"),
                    kind: EndpointKind::Workload,
                    name: "web".into(),
                    namespace: Some("default".into()),
                    labels: vec![],
                    node: None,
                    interface: Some(Interface::Name("veth-web".into())),
                    addresses: vec![],
                    ports: vec![],
                    audit: false,
                })],
                ..RegistrySet::default()
            })
        }
        fn saved(&self) -> Arc<dyn SavedReader> {
            Arc::new(NoCopies)
        }
        fn wakeups(&mut self) -> Option<mpsc::UnboundedReceiver<()>> {
            self.wakeups.take()
        }
    }

    struct NoCopies;

    impl SavedReader for NoCopies {
        fn policies(&self, _: &std::path::Path) -> Result<PolicySet, Vec<Problem>> {
            Err(Vec::new())
        }
        fn registry(&self, _: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
            Err(Vec::new())
        }
    }

    /// The seam a remote source plugs into: a "look again" from the inputs is
    /// a reconcile (no file changed) that reads them again, and nothing else is.
    #[tokio::test]
    async fn a_wakeup_from_the_inputs_is_a_reconcile_that_reads_them_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let names = Arc::new(Mutex::new(vec!["a".to_string()]));
        let (wake, wakeups) = mpsc::unbounded_channel();
        let mut opts = options();
        opts.inputs = Some(Box::new(Remote {
            policies: names.clone(),
            wakeups: Some(wakeups),
        }));
        // What each reconcile compiled: the policies it read.
        let compiled = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
        let seen = compiled.clone();
        opts.compiler = Box::new(
            move |p: &PolicySet,
                  _: &RegistrySet,
                  _: &CompileOptions|
                  -> Result<Compiled, CompileError> {
                let names = p
                    .policies
                    .iter()
                    .map(|p| p.origin.name.to_string())
                    .collect();
                seen.lock().unwrap().push(names);
                Ok(Compiled::default())
            },
        );
        let (_links, fake) = fake_links(LinkTable::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let until = |what: &'static str, want: Vec<Vec<String>>| {
            let compiled = compiled.clone();
            async move {
                let t0 = Instant::now();
                while *compiled.lock().unwrap() != want {
                    assert!(
                        t0.elapsed() < Duration::from_secs(5),
                        "{what}: {:?}",
                        compiled.lock().unwrap()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let body = async {
            until("the first reconcile", vec![vec!["a".into()]]).await;
            names.lock().unwrap().push("b".into());
            wake.send(()).unwrap();
            until(
                "the reconcile after the wakeup",
                vec![vec!["a".into()], vec!["a".into(), "b".into()]],
            )
            .await;
            let _ = stop.send(());
        };
        let (r, ()) = tokio::join!(
            run_with(cfg, FakeDatapath::new(), fake, opts, async {
                let _ = stopped.await;
            }),
            body
        );
        r.unwrap();
    }
}
