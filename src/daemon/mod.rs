//! netpold's reconcile loop: level-triggered, one task, owns the datapath.
//!
//! Every trigger — a file event (debounced), a link event, a reload, the resync
//! timer, a datapath retry — re-reads both input sets, compiles, and when the
//! result (state and attachments) differs from what is installed, applies it and
//! syncs the attachments (checked against the kernel link by link unless the
//! trigger was only a file change that left them as they were). Invalid input keeps the last valid set of that kind
//! (DESIGN §4.1); the last applied files are saved under `state_dir` and used at
//! start when the live files are invalid. Datapath errors are retried with backoff
//! and never stop the loop. Shutdown and reload are parameters, so tests drive the
//! real loop ([`run_with`]) with fakes.
//!
//! Must not: block on a client (the socket server runs in its own tasks), touch
//! the kernel other than through [`Datapath`] and [`Links`], or tear enforcement
//! down on exit (pins stay; `netpold --detach` removes them).

pub mod cache;
pub mod lastgood;
pub mod metrics;
pub mod netlink;
pub mod sdnotify;
pub mod server;
pub mod status;
pub mod watch;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use slog::Logger;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use self::netlink::{LinkTable, Links, NetlinkError};
use self::watch::{Debouncer, DirWatcher, FileChange, WatchError, WatchEvent};
use crate::api::model::{Interface, PolicySet, RegistrySet};
use crate::api::Problem;
use crate::config::Config;
use crate::datapath::{Attachment, Datapath, VerdictEvent};
use crate::policy::compile::{CompileError, CompileOptions};
use crate::policy::types::{Compiled, Direction};

use lastgood::{Kind, LastGood};
use sdnotify::Notifier;
use server::{Query, ServerError, Shared};
use status::{CountersView, EndpointView, FileError, MonitorEvent, RuleView, Status};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("runtime socket: {0}")]
    Server(#[from] ServerError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("interfaces: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

pub type LoadPolicies = fn(&Path) -> Result<PolicySet, Vec<Problem>>;
pub type LoadRegistry = fn(&[PathBuf]) -> Result<RegistrySet, Vec<Problem>>;
pub type CompileFn =
    fn(&PolicySet, &RegistrySet, &CompileOptions) -> Result<Compiled, CompileError>;

/// How the input files are read.
#[derive(Clone, Copy)]
pub enum Loader {
    /// The real parser, re-parsing only files that changed ([`cache::LoadCache`]).
    Parser,
    /// Other functions (tests put simpler stand-ins here).
    Custom(LoadPolicies, LoadRegistry),
}

/// The pure stages the loop runs: the real parser and core by default.
#[derive(Clone, Copy)]
pub struct Pipeline {
    pub loader: Loader,
    pub compile: CompileFn,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            loader: Loader::Parser,
            compile: crate::policy::compile::try_compile,
        }
    }
}

impl Pipeline {
    /// Load without the cache (saved copies, verification).
    fn load_policies(&self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        match self.loader {
            Loader::Parser => crate::api::load_policy_dir(dir),
            Loader::Custom(p, _) => p(dir),
        }
    }

    fn load_registry(&self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        match self.loader {
            Loader::Parser => crate::api::load_endpoint_dirs(dirs),
            Loader::Custom(_, r) => r(dirs),
        }
    }
}

/// Everything [`run_with`] takes besides the config, the kernel sides and shutdown.
pub struct Options {
    pub log: Logger,
    pub notifier: Notifier,
    /// One message per reload request (SIGHUP in the binary).
    pub reload: mpsc::UnboundedReceiver<()>,
    pub pipeline: Pipeline,
    /// How often verdict events are read from the datapath.
    pub event_poll: Duration,
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
            pipeline: Pipeline::default(),
            event_poll: Duration::from_millis(100),
            watch_tx,
            watch_rx,
        }
    }

    /// Report watch events as the directory watcher does (tests: a lost-events
    /// `Rescan` that no file change can provoke on demand).
    pub fn watch_sender(&self) -> mpsc::UnboundedSender<WatchEvent> {
        self.watch_tx.clone()
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
        pipeline,
        event_poll,
        watch_tx: fs_tx,
        watch_rx: mut fs_rx,
    } = opts;
    let copts = config.compile_options();
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
    let (metrics, _metrics_server) = match config.metrics_listen.as_str() {
        "" => (None, None),
        addr => {
            let m = metrics::Metrics::new();
            let s = metrics::serve(metrics::parse_listen(addr)?, m.clone())?;
            slog::info!(log, "serving metrics"; "url" => format!("http://{}/metrics", s.local_addr()));
            (Some(m), Some(s))
        }
    };

    let mut link_rx = links.subscribe(&log).await?;
    let mut targets = vec![config.policy_dir.clone()];
    targets.extend(config.endpoint_dirs.iter().cloned());
    let watcher = DirWatcher::new(targets, fs_tx)?;

    let log = log.new(slog::o!("component" => "reconcile"));
    slog::info!(log, "netpold starting"; "node" => &node, "policy_dir" => %config.policy_dir.display(),
        "pin_dir" => %config.pin_dir.display(), "socket" => %socket_path.display(), "generation" => datapath.generation());
    let mut d = Reconciler {
        copts,
        last_good: LastGood::new(&config.state_dir),
        cache: cache::LoadCache::default().with_options(config.load_options()),
        debouncer: Debouncer::new(Duration::from_millis(config.debounce_ms)),
        resync: Duration::from_secs(config.resync_interval_s),
        config,
        pipeline,
        log,
        datapath,
        notifier,
        watcher,
        status_tx,
        events_tx,
        links: link_rx.borrow_and_update().clone(),
        links_changed: true,
        touched: None,
        policies: None,
        registry: None,
        saved_policies: None,
        fitting_policies: None,
        policies_fit: false,
        retired: Vec::new(),
        saved_registry: None,
        installed: None,
        installed_policies: None,
        problems: Vec::new(),
        logged_problems: Vec::new(),
        ready: false,
        retry: None,
        datapath_error: None,
        state_error: None,
        last_apply_ms: None,
        save_at: None,
        save_job: None,
        save_epoch: 0,
        metrics,
        counters_at: None,
    };
    d.reconcile("start");

    let mut shutdown = std::pin::pin!(shutdown);
    let mut links_open = true;
    let mut reload_open = true;
    let mut queries_open = true;
    let mut next_resync = (d.resync > Duration::ZERO).then(|| Instant::now() + d.resync);
    let mut events = tokio::time::interval(event_poll);
    events.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog_every = d.notifier.watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    loop {
        let debounce_at = d.debouncer.deadline().map(Instant::from_std);
        let retry_at = d.retry.map(|(at, _)| at);
        let save_at = d.save_at;
        let cause = tokio::select! {
            _ = &mut shutdown => break,
            ev = fs_rx.recv() => {
                let ev = ev.unwrap_or(WatchEvent::Changed);
                if ev == WatchEvent::Rescan {
                    slog::info!(d.log, "file events were lost; rescanning");
                }
                d.note_touched(&ev);
                d.debouncer.event(std::time::Instant::now(), &ev);
                continue;
            }
            r = link_rx.changed(), if links_open => {
                match r {
                    Ok(()) => {
                        d.links = link_rx.borrow_and_update().clone();
                        d.links_changed = true;
                        d.debouncer.poke(std::time::Instant::now());
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
                "reload"
            }
            _ = sleep_until_opt(debounce_at), if debounce_at.is_some() => "change",
            _ = sleep_until_opt(retry_at), if retry_at.is_some() => "retry",
            _ = sleep_until_opt(next_resync), if next_resync.is_some() => "resync",
            _ = sleep_until_opt(save_at), if save_at.is_some() => {
                d.start_save();
                continue;
            }
            r = save_result(&mut d.save_job), if d.save_job.is_some() => {
                let (epoch, _) = d.save_job.take().expect("polled above");
                if let Ok(r) = r {
                    d.save_done(epoch, r);
                }
                continue;
            }
            _ = events.tick() => {
                d.poll_events();
                continue;
            }
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                d.notifier.watchdog();
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
        if cause == "reload" {
            d.notifier.reloading();
        }
        d.debouncer.fired(std::time::Instant::now());
        // A full read restarts the safety net's period (a file change reads only
        // the files its events named).
        if cause != "change" || d.touched.is_none() {
            next_resync = (d.resync > Duration::ZERO).then(|| Instant::now() + d.resync);
        }
        d.reconcile(cause);
        d.retired.clear();
        if cause == "reload" {
            let line = d.status_line();
            if d.ready {
                d.notifier.ready(&line);
            } else {
                d.notifier.status(&line);
            }
        }
    }
    d.notifier.stopping();
    if let Some((epoch, rx)) = d.save_job.take() {
        if let Ok(r) = rx.await {
            d.save_done(epoch, r);
        }
    }
    if d.save_at.is_some() {
        d.save_now();
    }
    slog::info!(d.log, "netpold stopping; enforcement stays in place"; "generation" => d.datapath.generation());
    Ok(())
}

/// Removes the socket file and stops the server when the loop ends, however it ends.
struct RemoveOnDrop(PathBuf, tokio::task::JoinHandle<()>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.1.abort();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The set a prepared copy holds, recorded as saved once it is committed.
enum SavedSet {
    Policies(PolicySet),
    Registry(RegistrySet),
}

/// What a save thread prepared, per kind (`None`: that kind was not saved).
struct Saves {
    policies: Option<(Result<Option<lastgood::Prepared>, String>, SavedSet)>,
    registry: Option<(Result<Option<lastgood::Prepared>, String>, SavedSet)>,
}

/// Copy and verify the inputs of each wanted kind (after removing older
/// copies: saves run one at a time, so none is in progress).
fn prepare_saves(
    last_good: &LastGood,
    pipeline: Pipeline,
    policy_dir: &Path,
    endpoint_dirs: &[PathBuf],
    policies: Option<PolicySet>,
    registry: Option<RegistrySet>,
) -> Saves {
    let policies = policies.map(|set| {
        last_good.remove_old(Kind::Policies);
        let r = last_good
            .prepare(Kind::Policies, &[policy_dir.to_path_buf()], |d| {
                pipeline.load_policies(&d[0]).is_ok()
            })
            .map_err(|e| e.to_string());
        (r, SavedSet::Policies(set))
    });
    let registry = registry.map(|set| {
        last_good.remove_old(Kind::Endpoints);
        let r = last_good
            .prepare(Kind::Endpoints, endpoint_dirs, |d| {
                pipeline.load_registry(d).is_ok()
            })
            .map_err(|e| e.to_string());
        (r, SavedSet::Registry(set))
    });
    Saves { policies, registry }
}

/// The result of the save in progress.
async fn save_result(
    job: &mut Option<(u64, tokio::sync::oneshot::Receiver<Saves>)>,
) -> Result<Saves, tokio::sync::oneshot::error::RecvError> {
    match job {
        Some((_, rx)) => rx.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A valid input set and where it came from.
struct Input<T> {
    set: T,
    from_last_good: bool,
}

struct Reconciler<D> {
    config: Config,
    copts: CompileOptions,
    pipeline: Pipeline,
    log: Logger,
    datapath: D,
    notifier: Notifier,
    watcher: DirWatcher,
    status_tx: tokio::sync::watch::Sender<Status>,
    events_tx: broadcast::Sender<Arc<str>>,
    last_good: LastGood,
    cache: cache::LoadCache,
    debouncer: Debouncer,
    resync: Duration,
    links: LinkTable,
    /// The files watch events named since the last reconcile; `None` when an
    /// event did not name one (or events were lost): the next read looks at
    /// every file.
    touched: Option<BTreeSet<PathBuf>>,
    /// The link table changed since attachments were last checked.
    links_changed: bool,
    policies: Option<Input<PolicySet>>,
    registry: Option<Input<RegistrySet>>,
    /// What was last written to state_dir (live files only).
    saved_policies: Option<PolicySet>,
    /// The last policy set that compiled within the map sizes: in force while a
    /// newer one is refused for not fitting.
    fitting_policies: Option<PolicySet>,
    /// The policy set in `policies` compiled within the map sizes.
    policies_fit: bool,
    /// Sets replaced during a reconcile, dropped after it (freeing thousands of
    /// policies is not on the way to enforcement).
    retired: Vec<Box<dyn std::any::Any + Send>>,
    saved_registry: Option<RegistrySet>,
    /// How many policies the set behind `installed` has.
    installed_policies: Option<usize>,
    /// The state and attachments the datapath holds.
    installed: Option<(Compiled, Vec<Attachment>)>,
    problems: Vec<Problem>,
    logged_problems: Vec<Problem>,
    ready: bool,
    /// When to try the datapath again, and the backoff that got us there.
    retry: Option<(Instant, Duration)>,
    datapath_error: Option<String>,
    state_error: Option<String>,
    last_apply_ms: Option<f64>,
    /// When to copy the applied files to state_dir.
    save_at: Option<Instant>,
    /// The save in progress: the epoch it began in, and its result.
    save_job: Option<(u64, tokio::sync::oneshot::Receiver<Saves>)>,
    /// Counts applies and refusals: a save that began in an earlier epoch is
    /// not committed.
    save_epoch: u64,
    /// Prometheus metrics, when `metrics_listen` is set.
    metrics: Option<metrics::Metrics>,
    /// When the datapath counters were last copied into the metrics.
    counters_at: Option<Instant>,
}

/// How long after the last apply the applied files are copied to state_dir.
const SAVE_DELAY: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// At most this many touched files are remembered; more is a full read.
const MAX_TOUCHED: usize = 4096;

impl<D: Datapath> Reconciler<D> {
    fn note_touched(&mut self, ev: &WatchEvent) {
        match ev {
            WatchEvent::File(
                FileChange::Writing(p) | FileChange::Written(p) | FileChange::Gone(p),
            ) => {
                if let Some(t) = self.touched.as_mut() {
                    t.insert(p.clone());
                    if t.len() > MAX_TOUCHED {
                        self.touched = None;
                    }
                }
            }
            WatchEvent::Changed | WatchEvent::Rescan => self.touched = None,
        }
    }

    /// A policy set replaced by a newer one: kept as the last that fit when it
    /// did (and nothing older is kept), else dropped after the reconcile.
    fn retire_policies(&mut self, old: Option<PolicySet>) {
        let Some(old) = old else { return };
        if self.policies_fit {
            if let Some(older) = self.fitting_policies.replace(old) {
                self.retired.push(Box::new(older));
            }
        } else {
            self.retired.push(Box::new(old));
        }
        self.policies_fit = false;
    }

    fn reconcile(&mut self, cause: &str) {
        let t0 = std::time::Instant::now();
        // A file change reads only the files the events named; every other
        // trigger (start, reload, resync, retry, lost events) reads everything.
        let touched = self
            .touched
            .replace(BTreeSet::new())
            .filter(|_| cause == "change");
        if let Err(e) = self.watcher.refresh() {
            slog::warn!(self.log, "cannot watch a directory; relying on the periodic resync"; "error" => %e);
        }
        let mut problems = Vec::new();
        // A set whose files did not change since it loaded valid is kept as is
        // (no clone, no cross-file checks).
        let keep_policies = self.policies.as_ref().is_some_and(|p| !p.from_last_good);
        let policies = match self.pipeline.loader {
            Loader::Parser => match self
                .cache
                .policies_if_touched(&self.config.policy_dir, touched.as_ref())
            {
                None if keep_policies => None,
                None => Some(self.cache.policies(&self.config.policy_dir)),
                r => r,
            },
            Loader::Custom(p, _) => Some(p(&self.config.policy_dir)),
        };
        let parsed = self.cache.last_parsed;
        match policies {
            None => {}
            Some(Ok(set)) => {
                let old = self.policies.replace(Input {
                    set,
                    from_last_good: false,
                });
                self.retire_policies(old.map(|i| i.set));
            }
            Some(Err(p)) => {
                problems.extend(p);
                if self.policies.is_none() {
                    self.policies = self.load_last_good_policies();
                    self.policies_fit = false;
                }
            }
        }
        let keep_registry = self.registry.as_ref().is_some_and(|r| !r.from_last_good);
        let registry = match self.pipeline.loader {
            Loader::Parser => match self
                .cache
                .registry_if_touched(&self.config.endpoint_dirs, touched.as_ref())
            {
                None if keep_registry => None,
                None => Some(self.cache.registry(&self.config.endpoint_dirs)),
                r => r,
            },
            Loader::Custom(_, r) => Some(r(&self.config.endpoint_dirs)),
        };
        let parsed = parsed + self.cache.last_parsed;
        match registry {
            None => {}
            Some(Ok(set)) => {
                if let Some(old) = self.registry.replace(Input {
                    set,
                    from_last_good: false,
                }) {
                    self.retired.push(Box::new(old.set));
                }
            }
            Some(Err(p)) => {
                problems.extend(p);
                if self.registry.is_none() {
                    self.registry = self.load_last_good_registry();
                }
            }
        }
        problems.sort();
        problems.dedup();
        self.problems = problems;
        let load = t0.elapsed();

        let (Some(pol), Some(reg)) = (&self.policies, &self.registry) else {
            self.log_problems();
            slog::error!(self.log, "no valid policy set or registry and none saved; nothing applied";
                "problems" => self.problems.len(), "cause" => cause);
            self.publish();
            return;
        };
        // This host's addresses are identity host, whatever interface they are on.
        self.copts.host_addresses = self.links.addresses.iter().copied().collect();
        let t1 = std::time::Instant::now();
        let mut compiled = (self.pipeline.compile)(&pol.set, &reg.set, &self.copts);
        let mut n_policies = pol.set.policies.len();
        let refused = compiled.is_err();
        if let Err(e) = &compiled {
            // A set that would not fit the maps is invalid input, like a parse
            // error: the last policy set that fit stays in force, with the registry
            // as it is now when that fits (else nothing is applied), and the files
            // in place are not saved as the last valid copy.
            self.problems.push((*e.problem).clone());
            self.problems.sort();
            self.save_at = None;
            self.save_epoch += 1;
            // The set in place fit before (the registry or host grew): there is
            // no other set to fall back to.
            if self.fitting_policies.is_none() && !self.policies_fit {
                self.fitting_policies = self.load_last_good_policies().map(|i| i.set);
            }
            if let Some(old) = self
                .fitting_policies
                .as_ref()
                .filter(|_| !self.policies_fit)
            {
                if let Ok(c) = (self.pipeline.compile)(old, &reg.set, &self.copts) {
                    (compiled, n_policies) = (Ok(c), old.policies.len());
                }
            }
        } else {
            self.policies_fit = true;
            if let Some(old) = self.fitting_policies.take() {
                self.retired.push(Box::new(old));
            }
        }
        let compile = t1.elapsed();
        self.log_problems();
        let Ok(compiled) = compiled else {
            self.publish();
            self.notifier.status(&self.status_line());
            return;
        };
        let attachments = self.attachments(&compiled);
        let unchanged = self
            .installed
            .as_ref()
            .is_some_and(|(c, a)| *c == compiled && *a == attachments)
            && self.retry.is_none();
        if unchanged {
            self.installed_policies = Some(n_policies);
            slog::debug!(self.log, "nothing changed"; "cause" => cause, "load_ms" => ms(load), "files_parsed" => parsed);
            self.publish();
            return;
        }
        // Attachments are checked against the kernel (a link per device and
        // hook) when they or the interfaces changed, and on every trigger other
        // than a file change (reload, resync, retry, start).
        let check_links = self.links_changed
            || cause != "change"
            || self
                .installed
                .as_ref()
                .is_none_or(|(_, a)| *a != attachments);
        let t2 = std::time::Instant::now();
        let result = self.datapath.apply(&compiled, &attachments).and_then(|g| {
            if check_links {
                self.datapath.sync_attachments(&attachments)?;
            }
            Ok(g)
        });
        let apply = t2.elapsed();
        match result {
            Ok(generation) => {
                if check_links {
                    self.links_changed = false;
                }
                self.installed_policies = Some(n_policies);
                self.retry = None;
                self.datapath_error = None;
                self.last_apply_ms = Some(ms(t0.elapsed()));
                let local = compiled.endpoints.iter().filter(|e| e.local).count();
                slog::info!(self.log, "applied generation {}: {} policies, {} endpoints ({} attached, {} pending), {} entries, {} problems, {:.1} ms",
                    generation, n_policies, compiled.endpoints.len(), attachments.len(), local - attachments.len(),
                    compiled.entries.len(), self.problems.len(), ms(t0.elapsed());
                    "generation" => generation, "cause" => cause,
                    "policies" => n_policies, "endpoints" => compiled.endpoints.len(),
                    "local" => local, "attached" => attachments.len(), "pending" => local - attachments.len(),
                    "entries" => compiled.entries.len(), "problems" => self.problems.len(),
                    "load_ms" => ms(load), "files_parsed" => parsed, "compile_ms" => ms(compile), "apply_ms" => ms(apply));
                for a in &attachments {
                    if let Some(ep) = compiled.endpoints.get(a.slot as usize) {
                        slog::debug!(self.log, "attached"; "endpoint" => display_name(&ep.namespace, &ep.name),
                            "ifindex" => a.ifindex, "identity" => ep.identity, "generation" => generation);
                    }
                }
                if let Some(m) = &self.metrics {
                    m.applied(generation, t0.elapsed().as_secs_f64());
                    let limits = metrics::MapLimits {
                        ipcache: self.config.maps.ipcache_max_entries.into(),
                        policy: self.config.maps.policy_max_entries.into(),
                        endpoints: self.config.maps.endpoint_max_entries.into(),
                    };
                    m.record_state(&compiled, &attachments, limits);
                }
                self.installed = Some((compiled, attachments));
                // Saved once things have been quiet for a while: copying every file
                // must not delay the next change.
                self.save_at = (!refused).then(|| Instant::now() + SAVE_DELAY);
                self.save_epoch += 1;
                let first = !self.ready;
                self.ready = true;
                self.publish();
                let line = self.status_line();
                if first {
                    self.notifier.ready(&line);
                } else {
                    self.notifier.status(&line);
                }
            }
            Err(e) => {
                let backoff = self
                    .retry
                    .map(|(_, b)| (b * 2).min(BACKOFF_MAX))
                    .unwrap_or(BACKOFF_MIN);
                self.retry = Some((Instant::now() + backoff, backoff));
                slog::error!(self.log, "datapath refused the new state; the running state is kept";
                    "error" => %e, "retry_in_ms" => backoff.as_millis() as u64, "cause" => cause);
                self.datapath_error = Some(e.to_string());
                if let Some(m) = &self.metrics {
                    m.apply_failed();
                }
                // What the kernel holds now is unknown after a failed sync: apply again next time.
                self.installed = None;
                self.publish();
                self.notifier.status(&self.status_line());
            }
        }
    }

    fn load_last_good_policies(&self) -> Option<Input<PolicySet>> {
        let dirs = self.last_good.dirs(Kind::Policies)?;
        match self.pipeline.load_policies(&dirs[0]) {
            Ok(set) => {
                slog::warn!(self.log, "policy files are invalid; enforcing the last valid copy"; "dir" => %dirs[0].display());
                Some(Input {
                    set,
                    from_last_good: true,
                })
            }
            Err(_) => None,
        }
    }

    fn load_last_good_registry(&self) -> Option<Input<RegistrySet>> {
        let dirs = self.last_good.dirs(Kind::Endpoints)?;
        match self.pipeline.load_registry(&dirs) {
            Ok(set) => {
                slog::warn!(self.log, "registry files are invalid; using the last valid copy";
                    "dir" => %dirs.first().map(|d| d.display().to_string()).unwrap_or_default());
                Some(Input {
                    set,
                    from_last_good: true,
                })
            }
            Err(_) => None,
        }
    }

    /// What to save: the live sets that differ from the copies already kept.
    fn save_wanted(&self) -> (Option<PolicySet>, Option<RegistrySet>) {
        let policies = self
            .policies
            .as_ref()
            .filter(|p| !p.from_last_good && self.saved_policies.as_ref() != Some(&p.set))
            .map(|p| p.set.clone());
        let registry = self
            .registry
            .as_ref()
            .filter(|r| !r.from_last_good && self.saved_registry.as_ref() != Some(&r.set))
            .map(|r| r.set.clone());
        (policies, registry)
    }

    /// Keep a copy of the live files that applied, when they differ from the copy
    /// already kept. The copy is written and verified on a thread of its own (a
    /// thousand files take a tenth of a second or more, which must not hold up
    /// the next change); the loop makes it the saved one ([`Self::save_done`]),
    /// and only when nothing was applied or refused since it began.
    fn start_save(&mut self) {
        if self.save_job.is_some() {
            // One at a time: try again once this one is done.
            self.save_at = Some(Instant::now() + SAVE_DELAY);
            return;
        }
        self.save_at = None;
        let (policies, registry) = self.save_wanted();
        if policies.is_none() && registry.is_none() {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (last_good, pipeline) = (self.last_good.clone(), self.pipeline);
        let (policy_dir, endpoint_dirs) = (
            self.config.policy_dir.clone(),
            self.config.endpoint_dirs.clone(),
        );
        std::thread::spawn(move || {
            let _ = tx.send(prepare_saves(
                &last_good,
                pipeline,
                &policy_dir,
                &endpoint_dirs,
                policies,
                registry,
            ));
        });
        self.save_job = Some((self.save_epoch, rx));
    }

    /// A save thread finished: commit its copies if nothing changed meanwhile.
    fn save_done(&mut self, epoch: u64, r: Saves) {
        let current = epoch == self.save_epoch;
        let mut errors = Vec::new();
        for (kind, outcome) in [(Kind::Policies, r.policies), (Kind::Endpoints, r.registry)] {
            match outcome {
                None => {}
                Some((Err(e), _)) => errors.push(e),
                Some((Ok(None), _)) => {
                    slog::debug!(self.log, "files changed while being saved; keeping the older copy"; "kind" => ?kind)
                }
                Some((Ok(Some(p)), _)) if !current => {
                    slog::debug!(self.log, "inputs changed while being saved; the copy is dropped"; "kind" => ?kind);
                    self.last_good.discard(p);
                }
                Some((Ok(Some(p)), set)) => match (self.last_good.commit(&p), set) {
                    (Err(e), _) => {
                        errors.push(e.to_string());
                        self.last_good.discard(p);
                    }
                    (Ok(()), SavedSet::Policies(set)) => self.saved_policies = Some(set),
                    (Ok(()), SavedSet::Registry(set)) => self.saved_registry = Some(set),
                },
            }
        }
        self.record_state_errors(errors);
    }

    /// The same, all on this thread (shutdown).
    fn save_now(&mut self) {
        self.save_at = None;
        let (policies, registry) = self.save_wanted();
        let r = prepare_saves(
            &self.last_good,
            self.pipeline,
            &self.config.policy_dir,
            &self.config.endpoint_dirs,
            policies,
            registry,
        );
        self.save_done(self.save_epoch, r);
    }

    fn record_state_errors(&mut self, errors: Vec<String>) {
        if errors.is_empty() {
            if self.state_error.take().is_some() {
                slog::info!(self.log, "state_dir is writable again");
            }
        } else {
            let msg = errors.join("; ");
            if self.state_error.as_deref() != Some(&msg) {
                slog::warn!(self.log, "cannot keep the last valid files; enforcement continues"; "error" => &msg);
            }
            self.state_error = Some(msg);
        }
        self.publish();
    }

    /// Log the input problems once each time the set of problems changes.
    fn log_problems(&mut self) {
        if self.problems == self.logged_problems {
            return;
        }
        for p in &self.problems {
            slog::error!(self.log, "{}", p; "file" => %p.file.display());
        }
        if self.problems.is_empty() && !self.logged_problems.is_empty() {
            slog::info!(self.log, "input files are valid again");
        } else if !self.problems.is_empty() {
            slog::warn!(self.log, "invalid input; the last valid set stays in force"; "problems" => self.problems.len());
        }
        self.logged_problems = self.problems.clone();
    }

    /// Local endpoints whose interface exists now, by slot. An interface claimed
    /// twice goes to the first endpoint.
    fn attachments(&self, compiled: &Compiled) -> Vec<Attachment> {
        let mut out: Vec<Attachment> = Vec::new();
        for ep in compiled.endpoints.iter().filter(|e| e.local) {
            let Some(ifindex) = self.resolve(ep.interface.as_ref(), &ep.addresses) else {
                continue;
            };
            if out.iter().any(|a| a.ifindex == ifindex) {
                slog::warn!(self.log, "interface already enforced for another endpoint; skipped";
                    "endpoint" => display_name(&ep.namespace, &ep.name), "ifindex" => ifindex);
                continue;
            }
            out.push(Attachment {
                slot: ep.slot,
                ifindex,
            });
        }
        out.sort();
        out
    }

    fn resolve(&self, iface: Option<&Interface>, addresses: &[std::net::IpAddr]) -> Option<u32> {
        match iface? {
            Interface::Name(n) => self.links.resolve(n),
            // The device the first address is routed through (DESIGN §3.2).
            Interface::Auto => self.links.route_device(*addresses.first()?),
        }
    }

    fn status(&self) -> Status {
        let (endpoints, attached, local) = match &self.installed {
            Some((c, a)) => (
                c.endpoints.len(),
                a.len(),
                c.endpoints.iter().filter(|e| e.local).count(),
            ),
            None => (0, 0, 0),
        };
        let policies_from_last_good = self.policies.as_ref().is_some_and(|p| p.from_last_good);
        let registry_from_last_good = self.registry.as_ref().is_some_and(|r| r.from_last_good);
        Status {
            ready: self.ready,
            generation: self.datapath.generation(),
            degraded: !self.problems.is_empty()
                || self.datapath_error.is_some()
                || self.policies.is_none()
                || self.registry.is_none()
                || policies_from_last_good
                || registry_from_last_good,
            errors: self
                .problems
                .iter()
                .map(|p| FileError {
                    file: p.file.display().to_string(),
                    line: p.line,
                    column: p.column,
                    message: p.to_string(),
                })
                .collect(),
            endpoints,
            attached,
            pending: local - attached,
            // The set in force: while a newer set is refused for not fitting the
            // maps, the last one that fit.
            policies: self
                .installed_policies
                .filter(|_| self.installed.is_some())
                .or(self.policies.as_ref().map(|p| p.set.policies.len()))
                .unwrap_or(0),
            node: self.copts.node_name.clone(),
            last_apply_ms: self.last_apply_ms,
            policies_from_last_good,
            registry_from_last_good,
            datapath_error: self.datapath_error.clone(),
            state_error: self.state_error.clone(),
        }
    }

    fn publish(&self) {
        let s = self.status();
        if let Some(m) = &self.metrics {
            m.record_status(s.ready, s.degraded, &self.problems);
        }
        self.status_tx.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    /// The systemd STATUS= line.
    fn status_line(&self) -> String {
        let s = self.status();
        let mut line = format!(
            "generation {}: {} endpoints ({} attached, {} pending), {} policies, {} problems",
            s.generation,
            s.endpoints,
            s.attached,
            s.pending,
            s.policies,
            s.errors.len()
        );
        if s.degraded {
            line.push_str(" (degraded)");
        }
        line
    }

    fn endpoint_views(&self) -> Vec<EndpointView> {
        let Some((compiled, attachments)) = &self.installed else {
            return Vec::new();
        };
        let counters = self.datapath.counters();
        compiled
            .endpoints
            .iter()
            .map(|ep| {
                let att = attachments.iter().find(|a| a.slot == ep.slot);
                let c = counters.get(&ep.slot).cloned().unwrap_or_default();
                EndpointView {
                    slot: ep.slot,
                    name: ep.name.clone(),
                    namespace: ep.namespace.clone(),
                    kind: match ep.kind {
                        crate::api::model::EndpointKind::Workload => "workload".into(),
                        crate::api::model::EndpointKind::Host => "host".into(),
                    },
                    identity: ep.identity,
                    interface: ep.interface.as_ref().map(|i| match i {
                        Interface::Name(n) => n.clone(),
                        Interface::Auto => "auto".into(),
                    }),
                    ifindex: att.map(|a| a.ifindex),
                    addresses: ep.addresses.iter().map(|a| a.to_string()).collect(),
                    local: ep.local,
                    state: match (ep.local, att) {
                        (false, _) => "remote".into(),
                        (true, Some(_)) => "attached".into(),
                        (true, None) => "pending".into(),
                    },
                    ingress_default_deny: ep.default_deny_ingress,
                    egress_default_deny: ep.default_deny_egress,
                    audit: ep.audit,
                    counters: CountersView {
                        allowed: c.allowed,
                        denied_policy: c.denied_policy,
                        denied_default: c.denied_default,
                        denied_spoof: c.denied_spoof,
                        denied_other: c.denied_other,
                        audit: c.audit,
                    },
                }
            })
            .collect()
    }

    /// Drain the datapath's events (a bounded amount per tick, so a flood cannot
    /// hold the loop) and hand them to monitor clients.
    fn poll_events(&mut self) {
        if let (Some(m), Some((c, _))) = (&self.metrics, &self.installed) {
            // The counters are per-CPU map reads: at most once a second.
            if self
                .counters_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                m.record_counters(c, &self.datapath.counters());
                self.counters_at = Some(Instant::now());
            }
        }
        for _ in 0..16 {
            let batch = self.datapath.poll_events(1024);
            if let Some(m) = &self.metrics {
                m.record_events(&batch);
            }
            if batch.is_empty() {
                return;
            }
            if self.events_tx.receiver_count() == 0 {
                continue;
            }
            let now = SystemTime::now();
            for ev in &batch {
                let line = serde_json::to_string(&self.monitor_event(ev, now)).unwrap_or_default();
                let _ = self.events_tx.send(line.into());
            }
            if batch.len() < 1024 {
                return;
            }
        }
    }

    fn monitor_event(&self, ev: &VerdictEvent, now: SystemTime) -> MonitorEvent {
        let compiled = self.installed.as_ref().map(|(c, _)| c);
        let endpoint = compiled
            .and_then(|c| c.endpoints.get(ev.slot as usize))
            .map(|e| display_name(&e.namespace, &e.name));
        let rule = ev
            .rule
            .and_then(|r| compiled?.rules.get(r as usize))
            .map(|r| RuleView {
                file: r.file.display().to_string(),
                kind: r.kind.clone(),
                policy: r.policy.clone(),
                path: r.path.clone(),
            });
        let json_name = |v: &dyn erased::Name| v.name();
        MonitorEvent {
            time: status::rfc3339(now),
            verdict: json_name(&ev.verdict),
            reason: json_name(&ev.reason),
            direction: match ev.direction {
                Direction::Ingress => "ingress".into(),
                Direction::Egress => "egress".into(),
            },
            src: ev.src.to_string(),
            dst: ev.dst.to_string(),
            proto: crate::policy::trace::proto_name(ev.proto),
            sport: ev.sport,
            dport: ev.dport,
            endpoint,
            ifindex: ev.ifindex,
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            rule,
        }
    }
}

/// The serde names of the datapath's event enums, so the wire text has one source.
mod erased {
    pub trait Name {
        fn name(&self) -> String;
    }
    impl<T: serde::Serialize> Name for T {
        fn name(&self) -> String {
            match serde_json::to_value(self) {
                Ok(serde_json::Value::String(s)) => s,
                _ => String::new(),
            }
        }
    }
}

fn display_name(namespace: &Option<String>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
