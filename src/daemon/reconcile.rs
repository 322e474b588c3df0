//! One reconcile: read the inputs and compile within the map budget (one
//! [`pipeline::load_and_compile`] pass over what is held), resolve each local
//! endpoint's interface, and apply when the state or the attachments differ
//! from what is installed; then report (status, systemd, metrics) and schedule
//! the save of the files that applied.
//!
//! Owns what is installed, the retry of a datapath error and the problems
//! reported. Reads and compiles only through the pipeline, touches the kernel
//! only through [`Datapath`], never blocks on a client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use slog::Logger;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::dnsproxy::{unix_now, Dns, LearnRequest};
use super::metrics;
use super::netlink::LinkTable;
use super::save::Saver;
use super::sdnotify::Notifier;
use super::status::{display_name, EndpointView, FileError, FileWarning, MonitorEvent, Status};
use crate::api::model::Interface;
use crate::api::{Problem, Warning};
use crate::datapath::{Attachment, Counters, Datapath};
use crate::error::chain;
use crate::pipeline::{self, Compile, Held, Hint, Inputs, Kind};
use crate::policy::compile::CompileOptions;
use crate::policy::types::Compiled;
use crate::sizes::MapSizes;
use crate::text::count;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// How long the inputs must be quiet after an apply before the warnings
/// about the new sets are looked for (`policy::lint`): at 10,000 policies
/// the lint costs more than the change itself, so a burst of changes pays
/// for one lint at its end, and no change waits behind one.
pub const LINT_DELAY: Duration = Duration::from_millis(1000);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a reconcile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The daemon started.
    Start,
    /// Input files changed (after the debounce), or the inputs' source said
    /// its view moved.
    Change,
    /// A reload was asked for (SIGHUP).
    Reload,
    /// The periodic full re-read.
    Resync,
    /// The datapath failed before; try again.
    Retry,
    /// The DNS proxy learned addresses (to enforce before it releases the
    /// answer), or learned addresses expired.
    Learned,
}

impl Cause {
    pub const fn as_str(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::Change => "change",
            Cause::Reload => "reload",
            Cause::Resync => "resync",
            Cause::Retry => "retry",
            Cause::Learned => "learned",
        }
    }
}

/// What the datapath holds: the state, the attachments, and how many
/// policies the set behind them has.
struct Installed {
    compiled: Compiled,
    attachments: Vec<Attachment>,
    policies: usize,
}

/// Where the loop's reports go.
pub struct Outputs {
    pub log: Logger,
    pub notifier: Notifier,
    pub status: tokio::sync::watch::Sender<Status>,
    /// Serialized monitor events.
    pub events: broadcast::Sender<Arc<str>>,
    /// Prometheus metrics, when `metrics_listen` is set.
    pub metrics: Option<metrics::Metrics>,
    /// Why `metrics_listen` is set but nothing serves it (reported in status).
    pub metrics_error: Option<String>,
}

pub struct Reconciler<D> {
    pub out: Outputs,
    copts: CompileOptions,
    map_sizes: MapSizes,
    inputs: Box<dyn Inputs>,
    compiler: Box<dyn Compile>,
    /// The input sets in force.
    held: Held,
    pub saver: Saver,
    /// The interfaces now.
    pub links: LinkTable,
    /// The link table changed since attachments were last checked.
    pub links_changed: bool,
    /// A generation was applied since the heap was last trimmed.
    trim_due: bool,
    /// When the lint of the sets in force is due (they applied, and their
    /// warnings are not found yet): [`LINT_DELAY`] after the last apply.
    pub lint_at: Option<Instant>,
    pub datapath: D,
    installed: Option<Installed>,
    /// When to try the datapath again, and the backoff that got us there.
    pub retry: Option<(Instant, Duration)>,
    datapath_error: Option<String>,
    /// A generation has been applied since start.
    pub ready: bool,
    last_apply_ms: Option<f64>,
    problems: Vec<Problem>,
    logged_problems: Vec<Problem>,
    /// The inputs' warnings now, and those last logged.
    warnings: Vec<Warning>,
    logged_warnings: Vec<Warning>,
    /// When the datapath counters were last copied into the metrics.
    counters_at: Option<Instant>,
    /// Fleet mode: the etcd engine this daemon reports to.
    pub fleet: Option<super::fleet::FleetLink>,
    /// The DNS proxy's side: learned set, proxy, redirect.
    pub dns: Option<Dns>,
}

impl<D: Datapath> Reconciler<D> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: Outputs,
        copts: CompileOptions,
        map_sizes: MapSizes,
        inputs: Box<dyn Inputs>,
        compiler: Box<dyn Compile>,
        saver: Saver,
        links: LinkTable,
        datapath: D,
    ) -> Self {
        Reconciler {
            out,
            copts,
            map_sizes,
            inputs,
            compiler,
            held: Held::deferring_lint(),
            saver,
            links,
            links_changed: true,
            trim_due: false,
            lint_at: None,
            datapath,
            installed: None,
            retry: None,
            datapath_error: None,
            ready: false,
            last_apply_ms: None,
            problems: Vec::new(),
            logged_problems: Vec::new(),
            warnings: Vec::new(),
            logged_warnings: Vec::new(),
            counters_at: None,
            fleet: None,
            dns: None,
        }
    }

    /// The inputs' "look again" signals, taken once.
    pub fn take_wakeups(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        self.inputs.wakeups()
    }

    /// Drop the sets replaced by the last reconcile (after it: freeing
    /// thousands of policies is not on the way to enforcement).
    /// Drop the sets the last reconcile replaced, and after an apply, a lint
    /// or a save give the freed heap back (every one alike, so the resident
    /// size follows what is in use rather than which step ran last).
    pub fn drop_retired(&mut self) {
        self.held.retired.clear();
        if std::mem::take(&mut self.trim_due) {
            trim_heap();
        }
    }

    pub fn start_save(&mut self) {
        self.saver.start(&self.held, self.inputs.saved());
    }

    pub fn save_finished(
        &mut self,
        r: Result<super::save::Saves, tokio::sync::oneshot::error::RecvError>,
    ) {
        self.saver.finished(r, &self.out.log);
        // Copying every file leaves freed buffers: given back too.
        self.trim_due = true;
        self.publish();
    }

    /// Stopping: finish saving, stop the fleet engine (its keys stay).
    pub async fn stop(&mut self) {
        let reader = self.inputs.saved();
        self.saver.stop(&self.held, reader, &self.out.log).await;
        self.publish();
        if let Some(f) = self.fleet.take() {
            f.stop().await;
        }
    }

    pub fn reconcile(&mut self, cause: Cause, hint: Hint<'_>) {
        let t0 = std::time::Instant::now();
        // This host's addresses are identity host, whatever interface they are on.
        self.copts.host_addresses = self.links.addresses.iter().copied().collect();
        // The learned DNS addresses this pass compiles with.
        self.learned_into_options();
        let learned = self.dns.is_some().then(|| self.copts.fqdn.clone());
        let pass = pipeline::load_and_compile(
            &mut *self.inputs,
            hint,
            self.saver.last_good(),
            &mut self.held,
            &mut *self.compiler,
            &self.copts,
        );
        for kind in &pass.from_saved {
            let dirs = self.saver.last_good().dirs(*kind).unwrap_or_default();
            let dir = dirs
                .first()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            match kind {
                Kind::Policies => {
                    slog::warn!(self.out.log, "policy files are invalid; enforcing the last valid copy"; "dir" => dir)
                }
                Kind::Registry => {
                    slog::warn!(self.out.log, "registry files are invalid; using the last valid copy"; "dir" => dir)
                }
            }
        }
        for kind in &pass.kept {
            match kind {
                Kind::Policies => {
                    slog::warn!(self.out.log, "the policy set does not fit the maps; enforcing the last policy set that fit")
                }
                Kind::Registry => {
                    slog::warn!(self.out.log, "the registry makes the policies overflow a map; enforcing the last registry that fit")
                }
            }
        }
        let mut problems = pass.problems;
        problems.sort();
        problems.dedup();
        // STATUS= counts them: told again even when nothing else changes.
        let problems_changed = self.problems != problems;
        self.problems = problems;
        self.warnings = pass.warnings;
        if !pass.lint_due {
            // The sets in force did not compile: nothing to lint.
            self.lint_at = None;
            // Else logged with the lint's, once the state is applied.
            self.log_warnings();
        }
        if self.held.policies.is_none() || self.held.registry.is_none() {
            self.log_problems();
            slog::error!(self.out.log, "no valid policy set or registry and none saved; nothing applied";
                "problems" => self.problems.len(), "cause" => cause.as_str());
            self.publish();
            return;
        }
        if pass.refused {
            // The files in place are not saved as the last valid copy.
            self.saver.refused();
        }
        self.log_problems();
        let Some(compiled) = pass.compiled else {
            self.publish();
            self.out.notifier.status(&self.status_line());
            return;
        };
        let (load, compile, parsed, n_policies) =
            (pass.load, pass.compile, pass.files_parsed, pass.policies);
        let attachments = self.attachments(&compiled);
        if self.retry.is_none() {
            if let Some(i) = self
                .installed
                .as_mut()
                .filter(|i| i.compiled == compiled && i.attachments == attachments)
            {
                i.policies = n_policies;
                if let (Some(d), Some(l)) = (&mut self.dns, &learned) {
                    d.installed = l.clone();
                }
                if let Some(f) = &mut self.fleet {
                    f.installed();
                }
                slog::debug!(self.out.log, "nothing changed"; "cause" => cause.as_str(), "load_ms" => ms(load), "files_parsed" => parsed);
                self.lint_later(pass.lint_due);
                self.publish();
                if problems_changed {
                    self.out.notifier.status(&self.status_line());
                }
                return;
            }
        }
        // Attachments are checked against the kernel (a link per device and
        // hook) when they or the interfaces changed, and on every trigger other
        // than a file change (reload, resync, retry, start).
        let check_links = self.links_changed
            || (cause != Cause::Change && cause != Cause::Learned)
            || self
                .installed
                .as_ref()
                .is_none_or(|i| i.attachments != attachments);
        let t2 = std::time::Instant::now();
        let mut attach = Duration::ZERO;
        let result = self.datapath.apply(&compiled, &attachments).and_then(|g| {
            if check_links {
                let t3 = std::time::Instant::now();
                let r = self.datapath.sync_attachments(&attachments);
                attach = t3.elapsed();
                r?;
            }
            Ok(g)
        });
        let apply = t2.elapsed();
        match result {
            Ok(generation) => {
                if check_links {
                    self.links_changed = false;
                }
                self.retry = None;
                self.datapath_error = None;
                self.last_apply_ms = Some(ms(t0.elapsed()));
                if let (Some(d), Some(l)) = (&mut self.dns, &learned) {
                    d.installed = l.clone();
                }
                if let Some(f) = &mut self.fleet {
                    f.installed();
                }
                let local = compiled.endpoints.iter().filter(|e| e.local).count();
                let kept = self.compiler.stats().unwrap_or_default();
                slog::info!(self.out.log, "applied generation {}: {}, {} ({} attached, {} pending), {}, {}, {:.1} ms",
                    generation, count(n_policies, "policy", "policies"), count(compiled.endpoints.len(), "endpoint", "endpoints"),
                    attachments.len(), local - attachments.len(), count(compiled.entries.len(), "entry", "entries"),
                    count(self.problems.len(), "problem", "problems"), ms(t0.elapsed());
                    "generation" => generation, "cause" => cause.as_str(),
                    "policies" => n_policies, "endpoints" => compiled.endpoints.len(),
                    "local" => local, "attached" => attachments.len(), "pending" => local - attachments.len(),
                    "entries" => compiled.entries.len(), "problems" => self.problems.len(),
                    "load_ms" => ms(load), "files_parsed" => parsed, "compile_ms" => ms(compile), "apply_ms" => ms(apply), "attach_ms" => ms(attach),
                    "identities_changed" => kept.identities_changed, "subjects_selected" => kept.subjects_selected,
                    "templates_built" => kept.templates_built, "templates_kept" => kept.templates_kept,
                    "endpoints_resolved" => kept.endpoints_resolved);
                for a in &attachments {
                    if let Some(ep) = compiled.endpoints.get(a.slot as usize) {
                        slog::debug!(self.out.log, "attached"; "endpoint" => display_name(ep.namespace.as_deref(), &ep.name),
                            "ifindex" => a.ifindex, "identity" => ep.identity, "generation" => generation);
                    }
                }
                if let Some(m) = &self.out.metrics {
                    m.applied(generation, t0.elapsed().as_secs_f64());
                    let limits = metrics::MapLimits {
                        ipcache: self.map_sizes.ipcache.into(),
                        policy: self.map_sizes.policy.into(),
                        endpoints: self.map_sizes.endpoints.into(),
                    };
                    m.record_state(&compiled, &attachments, limits);
                }
                self.installed = Some(Installed {
                    compiled,
                    attachments,
                    policies: n_policies,
                });
                // The warnings about the state are found once it is enforced
                // and the inputs are quiet (they never change a verdict, and
                // at scale they cost more than a compile).
                self.lint_later(pass.lint_due);
                // Saved once things have been quiet for a while: copying every file
                // must not delay the next change.
                self.saver.applied(!pass.refused);
                let first = !self.ready;
                self.ready = true;
                self.publish();
                let line = self.status_line();
                self.trim_due = true;
                if first {
                    self.out.notifier.ready(&line);
                } else {
                    self.out.notifier.status(&line);
                }
            }
            Err(e) => {
                // Nothing is installed to find them in later: now.
                self.lint_at = None;
                self.lint_after(pass.lint_due, &compiled);
                let backoff = self
                    .retry
                    .map(|(_, b)| (b * 2).min(BACKOFF_MAX))
                    .unwrap_or(BACKOFF_MIN);
                self.retry = Some((Instant::now() + backoff, backoff));
                let error = chain(&e);
                slog::error!(self.out.log, "datapath refused the new state; the running state is kept";
                    "error" => &error, "retry_in_ms" => backoff.as_millis() as u64, "cause" => cause.as_str());
                self.datapath_error = Some(error);
                if let Some(m) = &self.out.metrics {
                    m.apply_failed();
                }
                // What the kernel holds now is unknown after a failed sync: apply again next time.
                self.installed = None;
                if let Some(f) = &mut self.fleet {
                    f.uninstalled();
                }
                self.publish();
                self.out.notifier.status(&self.status_line());
            }
        }
    }

    /// Log the input problems once each time the set of problems changes.
    fn log_problems(&mut self) {
        if self.problems == self.logged_problems {
            return;
        }
        for p in &self.problems {
            slog::error!(self.out.log, "{}", p; "file" => %p.file.display());
        }
        if self.problems.is_empty() && !self.logged_problems.is_empty() {
            slog::info!(self.out.log, "input files are valid again");
        } else if !self.problems.is_empty() {
            slog::warn!(self.out.log, "invalid input; the last valid set stays in force"; "problems" => self.problems.len());
        }
        self.logged_problems = self.problems.clone();
    }

    /// The lint of the sets in force, due: found now when it is at hand
    /// (the sets did not change since it was last found), else once the
    /// inputs have been quiet for [`LINT_DELAY`] ([`Reconciler::lint_due`]).
    fn lint_later(&mut self, due: bool) {
        if !due {
            return;
        }
        if pipeline::lint_known(&self.held, &self.copts.node_name) {
            if let Some(i) = self.installed.take() {
                self.lint_after(true, &i.compiled);
                self.installed = Some(i);
            }
            self.lint_at = None;
        } else {
            self.lint_at = Some(Instant::now() + LINT_DELAY);
        }
    }

    /// The inputs have been quiet since the last apply: find the warnings
    /// about the state in force, and report them.
    pub fn lint_due(&mut self) {
        self.lint_at = None;
        let Some(i) = self.installed.take() else {
            return;
        };
        self.lint_after(true, &i.compiled);
        self.installed = Some(i);
        // At scale the lint's scratch is more than the state in force: given
        // back like a replaced set's.
        self.trim_due = true;
        self.publish();
        self.out.notifier.status(&self.status_line());
    }

    /// Log the input warnings once each time the set of warnings changes.
    /// Add the lint warnings of the sets in force to the inputs' own (when
    /// `due`: `compiled` is their state) and log what is new.
    fn lint_after(&mut self, due: bool, compiled: &Compiled) {
        if due {
            let found = pipeline::lint_warnings(&mut self.held, compiled, &self.copts.node_name);
            self.warnings.extend(found);
            self.log_warnings();
        }
    }

    fn log_warnings(&mut self) {
        if self.warnings == self.logged_warnings {
            return;
        }
        for w in &self.warnings {
            slog::warn!(self.out.log, "{}", w; "file" => %w.at.file.display(), "code" => w.code.code());
        }
        self.logged_warnings = self.warnings.clone();
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
                slog::warn!(self.out.log, "interface already enforced for another endpoint; skipped";
                    "endpoint" => display_name(ep.namespace.as_deref(), &ep.name), "ifindex" => ifindex);
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
            // The device the first address is routed through (docs/policy.md,
            // "The registry": `interface: auto`).
            Interface::Auto => self.links.route_device(*addresses.first()?),
        }
    }

    pub fn status(&self) -> Status {
        let (endpoints, attached, local) = match &self.installed {
            Some(i) => (
                i.compiled.endpoints.len(),
                i.attachments.len(),
                i.compiled.endpoints.iter().filter(|e| e.local).count(),
            ),
            None => (0, 0, 0),
        };
        let policies_from_last_good = self.held.policies.as_ref().is_some_and(|p| p.from_saved);
        let registry_from_last_good = self.held.registry.as_ref().is_some_and(|r| r.from_saved);
        let fleet_degraded = self.fleet.as_ref().is_some_and(|f| f.degraded());
        Status {
            ready: self.ready,
            generation: self.datapath.generation(),
            degraded: fleet_degraded
                || !self.problems.is_empty()
                || self.datapath_error.is_some()
                || self.held.policies.is_none()
                || self.held.registry.is_none()
                || policies_from_last_good
                || registry_from_last_good,
            errors: self.problems.iter().map(FileError::from).collect(),
            warnings: self.warnings.iter().map(FileWarning::from).collect(),
            endpoints,
            attached,
            pending: local - attached,
            // The set in force: while a newer set is refused for not fitting the
            // maps, the last one that fit.
            policies: self
                .installed
                .as_ref()
                .map(|i| i.policies)
                .or(self.held.policies.as_ref().map(|p| p.set.policies.len()))
                .unwrap_or(0),
            node: self.copts.node_name.clone(),
            last_apply_ms: self.last_apply_ms,
            policies_from_last_good,
            registry_from_last_good,
            datapath_error: self.datapath_error.clone(),
            state_error: self.saver.error().map(str::to_string),
            metrics_error: self.out.metrics_error.clone(),
            datapath_stage: self.datapath.stage(),
            etcd: self.fleet.as_ref().map(|f| f.status()),
        }
    }

    /// Hand the status out (socket, metrics) and, in fleet mode, to the engine.
    pub fn publish(&mut self) {
        let s = self.status();
        if let Some(m) = &self.out.metrics {
            m.record_status(s.ready, s.degraded, &self.problems);
            if let Some(e) = &s.etcd {
                m.record_etcd(e);
            }
        }
        if let Some(f) = &mut self.fleet {
            f.report(
                &self.copts.host_addresses,
                s.generation,
                s.ready,
                s.degraded,
            );
        }
        self.out.status.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    /// The systemd STATUS= line.
    pub fn status_line(&self) -> String {
        let s = self.status();
        let mut line = format!(
            "generation {}: {} ({} attached, {} pending), {}, {}",
            s.generation,
            count(s.endpoints, "endpoint", "endpoints"),
            s.attached,
            s.pending,
            count(s.policies, "policy", "policies"),
            count(s.errors.len(), "problem", "problems")
        );
        if s.degraded {
            line.push_str(" (degraded)");
        }
        if !s.datapath_stage.enforcing() {
            line.push_str(&format!(
                " (datapath stage {}: NOT ENFORCING)",
                s.datapath_stage
            ));
        }
        line
    }

    pub fn endpoint_views(&self) -> Vec<EndpointView> {
        let Some(i) = &self.installed else {
            return Vec::new();
        };
        let counters = self.datapath.counters();
        let none = Counters::default();
        i.compiled
            .endpoints
            .iter()
            .map(|ep| {
                // Sorted by slot (`attachments`): a search, not a scan per endpoint.
                let att = i
                    .attachments
                    .binary_search_by_key(&ep.slot, |a| a.slot)
                    .ok()
                    .map(|at| &i.attachments[at]);
                EndpointView::of(ep, att, counters.get(&ep.slot).unwrap_or(&none))
            })
            .collect()
    }

    /// Finish the datapath's background work, drain its events (a bounded
    /// amount per tick, so a flood cannot hold the loop) and hand them to
    /// monitor clients.
    pub fn poll_events(&mut self) {
        if let Some(msg) = self.datapath.maintain() {
            slog::info!(self.out.log, "{}", msg);
        }
        if let (Some(m), Some(i)) = (&self.out.metrics, &self.installed) {
            // The counters are per-CPU map reads: at most once a second.
            if self
                .counters_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                m.record_counters(&i.compiled, &self.datapath.counters());
                self.counters_at = Some(Instant::now());
            }
        }
        for _ in 0..16 {
            let batch = self.datapath.poll_events(1024);
            if let Some(m) = &self.out.metrics {
                m.record_events(&batch, self.installed.as_ref().map(|i| &i.compiled));
            }
            if batch.is_empty() {
                return;
            }
            if self.out.events.receiver_count() == 0 {
                continue;
            }
            let now = SystemTime::now();
            let installed = self.installed.as_ref().map(|i| &i.compiled);
            for ev in &batch {
                let line = serde_json::to_string(&MonitorEvent::of(ev, installed, now))
                    .unwrap_or_default();
                let _ = self.out.events.send(line.into());
            }
            if batch.len() < 1024 {
                return;
            }
        }
    }
}

impl<D: Datapath> Reconciler<D> {
    /// Hand the learned set to the compile.
    fn learned_into_options(&mut self) {
        if let Some(d) = &self.dns {
            self.copts.fqdn = Arc::new(crate::policy::fqdn::FqdnAddrs::from_learned(
                &d.learned,
                unix_now(),
            ));
        }
    }

    /// Learn a batch of allowed answers and enforce them; each request is
    /// answered once its addresses are in the installed state (or with why
    /// not), so the proxy releases an answer only after that.
    pub fn learn_batch(&mut self, reqs: Vec<LearnRequest>) {
        let Some(dns) = self.dns.as_mut() else {
            for r in reqs {
                let _ = r.reply.send(Err("the DNS proxy is off".into()));
            }
            return;
        };
        let (now, learned_at) = (unix_now(), super::dnsproxy::unix_now_ceil());
        let mut waiting = Vec::new();
        let before = dns.learned.clone();
        for r in reqs {
            match dns
                .learned
                .learn(&r.endpoint, &r.name, &r.selectors, &r.addrs, learned_at)
            {
                Ok(_) => waiting.push(r),
                Err(cap) => {
                    slog::warn!(self.out.log, "{cap}"; "endpoint" => &r.endpoint, "name" => &r.name);
                    *dns.cap_reached.entry(metrics::cap_key(&cap)).or_default() += 1;
                    let _ = r.reply.send(Err(cap.to_string()));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        // A renewed TTL is a change to save, not always one to enforce.
        dns.dirty = true;
        // Compiled when what is in force lacks an answer's address: new,
        // renewed after its TTL ended, or left out by a compile since.
        let in_force = |d: &Dns| {
            waiting
                .iter()
                .all(|r| r.addrs.iter().all(|a| d.installed.contains(&r.name, a.ip)))
        };
        let changed = !in_force(dns)
            || crate::policy::fqdn::FqdnAddrs::from_learned(&dns.learned, now) != *dns.installed;
        if changed {
            self.reconcile(Cause::Learned, Hint::Files(&Default::default()));
        }
        let enforced = self.installed.is_some() && self.dns.as_ref().is_some_and(in_force);
        if !enforced {
            // Not enforceable (the ipcache budget, a datapath error): not
            // learned either, and the state in force is the one without it.
            if let Some(d) = self.dns.as_mut() {
                d.learned = before;
                *d.cap_reached.entry(metrics::CAP_IPCACHE).or_default() += 1;
            }
            slog::warn!(
                self.out.log,
                "learned DNS addresses could not be enforced; the answers get SERVFAIL"
            );
            self.reconcile(Cause::Learned, Hint::Files(&Default::default()));
        }
        for r in waiting {
            let _ = r.reply.send(if enforced {
                Ok(())
            } else {
                Err("the learned addresses could not be applied".into())
            });
        }
    }

    /// The DNS proxy's figures, the learned set and the datapath's redirect
    /// counters into the metrics (each second, and after each learn).
    pub fn record_dns_metrics(&self) {
        let (Some(m), Some(dns)) = (&self.out.metrics, &self.dns) else {
            return;
        };
        if let Some(p) = &dns.proxy {
            m.record_dns(metrics::DnsFigures::of(
                &p.stats,
                &dns.learned,
                dns.cap_reached.clone(),
                self.datapath.dns_redirect_stats(),
            ));
        }
    }

    /// Expire learned addresses whose TTL ended, except those a connection
    /// still uses (a live conntrack entry at the endpoint's device), and
    /// enforce the smaller set.
    pub fn expire_learned(&mut self) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let now = unix_now();
        if dns.learned.next_expiry().is_none_or(|t| t > now + 2) {
            return;
        }
        self.refresh_dns_holds(now);
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let gone = dns.learned.expire(now);
        for (endpoint, name, ip) in &gone {
            slog::debug!(self.out.log, "learned address expired"; "endpoint" => endpoint, "name" => name, "address" => %ip);
        }
        dns.dirty |= !gone.is_empty();
        // Compiled when what is in force differs from what is alive now: an
        // address expired, ended under a connection that closed, or held by
        // one after a compile left it out.
        if crate::policy::fqdn::FqdnAddrs::from_learned(&dns.learned, now) != *dns.installed {
            self.reconcile(Cause::Learned, Hint::Files(&Default::default()));
        }
    }

    /// Hold the learned addresses (expiring within the next seconds) that a
    /// live conntrack entry at their endpoint's device uses; release those
    /// no longer used.
    pub fn refresh_dns_holds(&mut self, now: u64) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        // Addresses a connection uses, among those expiring within the next
        // seconds (held before their TTL ends, so no compile in between
        // drops them), stay held while the connection lives.
        let live = self.datapath.live_flows();
        let soon = now + 2;
        let mut held = std::collections::BTreeSet::new();
        for e in dns.learned.entries() {
            // Before the first apply (a restart) no device is known yet:
            // a connection at any device holds the address.
            let dev = dns.devices.get(&e.endpoint).copied();
            for l in e.addrs.iter().filter(|l| l.expires <= soon) {
                if live
                    .iter()
                    .any(|(i, a, b)| dev.is_none_or(|d| *i == d) && (*a == l.ip || *b == l.ip))
                {
                    held.insert((e.endpoint.clone(), l.ip));
                }
            }
        }
        for (e, ip) in held.difference(&dns.held) {
            dns.learned.hold(e, *ip);
        }
        for (e, ip) in dns.held.difference(&held) {
            dns.learned.release(e, *ip);
        }
        dns.held = held;
    }

    /// Bring the datapath's redirect and the proxy's view to the installed
    /// state. True when the state has DNS rules and no proxy runs yet.
    pub fn dns_sync(&mut self) -> bool {
        let (Some(dns), Some(i)) = (self.dns.as_mut(), self.installed.as_ref()) else {
            return false;
        };
        let (redirects, view, devices) = dns.plan(&i.compiled, &i.attachments, &self.links);
        dns.wanted = !view.by_ip.is_empty() || !redirects.is_empty();
        dns.devices = devices;
        if let Some(p) = &dns.proxy {
            p.set_view(view);
        }
        let want = (dns.target(), redirects);
        if dns.redirect.as_ref() != Some(&want) {
            match self.datapath.set_dns_redirect(want.0, &want.1) {
                Ok(()) => {
                    slog::debug!(self.out.log, "DNS redirect set"; "redirects" => want.1.len(), "proxy_port" => want.0.port);
                    dns.redirect = Some(want);
                }
                Err(e) => {
                    let msg = chain(&e);
                    slog::error!(self.out.log, "cannot set the DNS redirect"; "error" => &msg);
                    dns.error = Some(msg);
                }
            }
        }
        dns.wanted && dns.proxy.is_none()
    }
}

/// Give the heap pages freed by replaced sets back to the system: glibc keeps
/// them otherwise (and a start that parsed on several threads leaves freed
/// pages in each thread's arena), so the resident size would stay at its peak.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it
    // touches no memory in use and takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
