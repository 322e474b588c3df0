//! The sync engine: keeps this host's view of the watched key range (DESIGN §5a)
//! and hands it out on a fixed tick.
//!
//! - **List, then watch.** A paged list at one revision R, then a watch from
//!   R+1 without `prev_kv` (the view holds the previous values). A list
//!   replaces the view by mark-and-sweep: keys it lacks become removals.
//! - **Relist** only when the watch cannot resume: its start revision was
//!   compacted, the revision went backwards, or the cluster id changed (etcd
//!   restored or replaced). Relists are rate-limited (`relist_min_interval`)
//!   and jittered, since any node can compact and every host would relist at
//!   once. A plain reconnect resumes the watch from the last revision seen.
//! - **Faults** (a stream error, a call over the request timeout, a progress
//!   request unanswered within it — a frozen etcd) drop the watch and make a
//!   new one after a jittered exponential backoff: never more than one watch,
//!   never a tight loop. An error never becomes an empty view, and nothing is
//!   removed while etcd is away: the view only changes by what etcd said.
//! - **Tick.** A change after a quiet tick is delivered at once; what arrives
//!   within `batch` of a delivery waits for the next tick, `batch` after it,
//!   whatever arrives meanwhile: at most one delivery per tick under any churn,
//!   never a wait for a quiet moment.
//! - **Mass removal.** Removing more than a fifth of the remote endpoints
//!   within a minute (at least 10) is held for `mass_removal_hold` and
//!   reported; the removals apply when the hold ends if etcd still says so.
//!   Removals of other kinds (nodes, namespaces, policies) are never held.
//! - Entries under this host's own prefix are not in the view; their events go
//!   to the publisher (it restores what someone else deleted or changed).
//! - The view is cached in `state_dir` ([`super::cache`]) so a start while etcd
//!   is away begins with the last view.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use slog::Logger;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::cache::{CacheMsg, CacheWriter, Cached};
use super::keys::Keys;
use super::store::{
    bounded, get_all, sleep_opt, EventKind, Kv, Range, Store, StoreError, WatchMsg, WatchStream,
};
use super::view::{self, Parsed, RawEntry};
use crate::api::model::{PolicySet, RegistrySet};
use crate::api::Problem;

/// How the engine syncs; from the `[etcd]` table ([`super::FleetSettings`]).
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub keys: Keys,
    /// This host's node name: its prefix is left out of the view.
    pub node: String,
    pub batch: Duration,
    pub progress_interval: Duration,
    pub request_timeout: Duration,
    pub relist_min_interval: Duration,
    /// 0 = removals are never held.
    pub mass_removal_hold: Duration,
    /// Keys per page of a list.
    pub page_size: i64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// `state_dir/etcd`; `None` = no cache.
    pub cache_dir: Option<PathBuf>,
    /// Cache writes at most this often.
    pub cache_interval: Duration,
}

impl SyncSettings {
    /// Defaults of the `[etcd]` table for `prefix` and `node`, no cache.
    pub fn new(prefix: &str, node: &str) -> SyncSettings {
        let d = crate::config::EtcdConfig::default();
        SyncSettings {
            keys: Keys::new(prefix),
            node: node.to_string(),
            batch: Duration::from_millis(d.batch_ms),
            progress_interval: Duration::from_millis(d.progress_interval_ms),
            request_timeout: Duration::from_millis(d.request_timeout_ms),
            relist_min_interval: Duration::from_secs(d.relist_min_interval_s),
            mass_removal_hold: Duration::from_secs(d.mass_removal_hold_s),
            page_size: 500,
            backoff_min: Duration::from_millis(200),
            // Reconnects are jittered up to this: short enough that a
            // host is back within seconds of etcd (docs/fleet.md, "Outages").
            backoff_max: Duration::from_secs(4),
            cache_dir: None,
            cache_interval: Duration::from_secs(1),
        }
    }
}

/// The window the mass-removal guard counts removals over.
const REMOVAL_WINDOW: Duration = Duration::from_secs(60);
/// Fewer removals than this within the window are never held.
const REMOVAL_MIN: usize = 10;

/// The remote view as delivered on a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteView {
    /// The view is etcd's watched range at this revision (held removals aside).
    pub revision: i64,
    /// Accepted remote registry documents (this host's prefix excluded).
    pub registry: RegistrySet,
    /// The id `policyset-current` names, if any.
    pub policy_set: Option<String>,
    /// The last valid current policy set: `None` when there is no current set,
    /// or none was valid yet. A set with an invalid document does not replace it.
    pub policies: Option<Arc<PolicySet>>,
    /// Why the current set is not the one in `policies` (all its problems).
    pub policy_problems: Vec<Problem>,
    /// Entries dropped one by one, each with its `etcd:<key>@<rev>` origin.
    pub rejected: Vec<Problem>,
    /// Removed endpoints kept in the view by the mass-removal hold.
    pub held_removals: usize,
    /// Read from the cache, not (yet) from etcd.
    pub from_cache: bool,
}

impl Default for RemoteView {
    fn default() -> Self {
        RemoteView::empty()
    }
}

impl RemoteView {
    fn empty() -> RemoteView {
        RemoteView {
            revision: 0,
            registry: RegistrySet::default(),
            policy_set: None,
            policies: None,
            policy_problems: Vec::new(),
            rejected: Vec::new(),
            held_removals: 0,
            from_cache: false,
        }
    }

    /// Equal apart from the revision: nothing to apply.
    fn same_content(&self, o: &RemoteView) -> bool {
        self.registry == o.registry
            && self.policy_set == o.policy_set
            && self.policies == o.policies
            && self.policy_problems == o.policy_problems
            && self.rejected == o.rejected
            && self.held_removals == o.held_removals
            && self.from_cache == o.from_cache
    }
}

/// The engine's connection and sync state, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncState {
    /// The last call to etcd succeeded and the watch is up.
    pub connected: bool,
    /// The view is a complete list plus every event since (it may lag while
    /// disconnected, but is whole): false before the first list and while a
    /// required relist waits.
    pub in_sync: bool,
    /// The latest revision seen in the watched range.
    pub revision: i64,
    /// The delivered view is etcd's watched range at this revision.
    pub view_revision: i64,
    pub cluster_id: u64,
    pub from_cache: bool,
    pub relists: u64,
    pub reconnects: u64,
    pub remote_endpoints: usize,
    pub rejected: usize,
    pub held_removals: usize,
    /// When held removals apply (unix ms).
    pub hold_until_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// An event of this host's own prefix, for the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnEvent {
    Put(Kv),
    /// The key and the revision of its deletion.
    Delete(String, i64),
    /// Every own key, from a full list at a revision.
    Listed(i64, Vec<Kv>),
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// xorshift64*: jitter only, no security.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: &str) -> Jitter {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in seed.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Jitter((h ^ t ^ std::process::id() as u64) | 1)
    }

    /// A uniform fraction in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, d).
    pub fn upto(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.fraction())
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    n: u32,
}

impl Backoff {
    fn next(&mut self, j: &mut Jitter) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.n.min(16))
            .min(self.max);
        self.n += 1;
        // Never less than a tenth of the minimum: no tight loop on a fast failure.
        (self.min / 10).max(j.upto(cap))
    }
    fn reset(&mut self) {
        self.n = 0;
    }
}

struct Slot {
    raw: RawEntry,
    parsed: Parsed,
    endpoint: bool,
}

/// Why a watch ended.
enum WatchEnd {
    Shutdown,
    Fault(String),
    Relist(String),
}

struct Sync {
    s: SyncSettings,
    store: Arc<dyn Store>,
    log: Logger,
    range: Range,
    view: BTreeMap<String, Slot>,
    /// In the view but deleted in etcd: waiting for the tick, or held.
    removed: BTreeSet<String>,
    held: BTreeSet<String>,
    hold_until: Option<Instant>,
    /// Endpoint removals applied within the last minute.
    window: VecDeque<(Instant, usize)>,
    /// Latest event revision, and the revision up to which the delivered view
    /// reflects every event.
    revision: i64,
    clean_revision: i64,
    /// Resume a watch after this (events and progress answers).
    resume: i64,
    cluster_id: Option<u64>,
    dirty: bool,
    /// The view's content changed since it was last delivered.
    changed: bool,
    flush_at: Option<Instant>,
    /// When the last tick ran: the next one is not before `batch` after it.
    last_flush: Option<Instant>,
    last_good_policies: Option<Arc<PolicySet>>,
    delta_put: BTreeMap<String, RawEntry>,
    delta_delete: BTreeSet<String>,
    view_tx: watch::Sender<Arc<RemoteView>>,
    state_tx: watch::Sender<SyncState>,
    own_tx: Option<mpsc::UnboundedSender<OwnEvent>>,
    cache: Option<CacheWriter>,
    last_contact: Arc<AtomicI64>,
    last_relist: Option<Instant>,
    jitter: Jitter,
    backoff: Backoff,
    shutdown: watch::Receiver<bool>,
}

/// The running sync task.
pub struct SyncHandle {
    pub view: watch::Receiver<Arc<RemoteView>>,
    pub state: watch::Receiver<SyncState>,
    /// Unix ms of the last answer from etcd (0 = never).
    pub last_contact: Arc<AtomicI64>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SyncHandle {
    /// Stop the task (the cache gets what it has) and wait for it.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }
}

/// Start the sync task. `cached`: a view read from the cache, delivered at
/// once (`from_cache`, not in sync) so enforcement starts from it.
pub fn spawn(
    s: SyncSettings,
    store: Arc<dyn Store>,
    log: Logger,
    cached: Option<Cached>,
    own_tx: Option<mpsc::UnboundedSender<OwnEvent>>,
) -> SyncHandle {
    let (start, end) = s.keys.watched();
    let (view_tx, view_rx) = watch::channel(Arc::new(RemoteView::empty()));
    let (state_tx, state_rx) = watch::channel(SyncState::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let last_contact = Arc::new(AtomicI64::new(0));
    let cache = s.cache_dir.as_ref().map(|d| {
        CacheWriter::start(
            d.clone(),
            s.keys.prefix().to_string(),
            s.cache_interval,
            log.clone(),
        )
    });
    let mut sync = Sync {
        jitter: Jitter::new(&s.node),
        backoff: Backoff {
            min: s.backoff_min,
            max: s.backoff_max,
            n: 0,
        },
        range: Range::new(start, end),
        s,
        store,
        log,
        view: BTreeMap::new(),
        removed: BTreeSet::new(),
        held: BTreeSet::new(),
        hold_until: None,
        window: VecDeque::new(),
        revision: 0,
        clean_revision: 0,
        resume: 0,
        cluster_id: None,
        dirty: false,
        changed: false,
        flush_at: None,
        last_flush: None,
        last_good_policies: None,
        delta_put: BTreeMap::new(),
        delta_delete: BTreeSet::new(),
        view_tx,
        state_tx,
        own_tx,
        cache,
        last_contact: last_contact.clone(),
        last_relist: None,
        shutdown: shutdown_rx,
    };
    if let Some(c) = cached {
        sync.load_cached(c);
    }
    let task = tokio::spawn(sync.run());
    SyncHandle {
        view: view_rx,
        state: state_rx,
        last_contact,
        shutdown: shutdown_tx,
        task,
    }
}

impl Sync {
    fn load_cached(&mut self, c: Cached) {
        for (k, e) in c.entries {
            let parsed = view::parse_entry(&self.s.keys, &self.s.node, &e);
            if matches!(parsed, Parsed::Own | Parsed::Ignored) {
                continue;
            }
            let endpoint = self
                .s
                .keys
                .parse(&k)
                .ok()
                .flatten()
                .is_some_and(|k| k.is_endpoint());
            self.view.insert(
                k,
                Slot {
                    raw: e,
                    parsed,
                    endpoint,
                },
            );
        }
        self.revision = c.revision;
        self.clean_revision = c.revision;
        self.resume = c.revision;
        self.cluster_id = Some(c.cluster_id);
        slog::info!(self.log, "etcd view read from the cache"; "revision" => c.revision, "entries" => self.view.len());
        self.state_tx.send_modify(|st| {
            st.from_cache = true;
            st.revision = c.revision;
        });
        self.changed = true;
        self.deliver(true);
    }

    async fn run(mut self) {
        let mut need_list = true;
        let mut first = true;
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            if need_list {
                if !first && !self.wait_for_relist().await {
                    break;
                }
                first = false;
                match self.list().await {
                    Ok(()) => need_list = false,
                    Err(e) => {
                        self.fault(format!("list: {e}"));
                        if !self.pause().await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let stream = bounded(
                self.s.request_timeout,
                self.store.watch(&self.range, self.resume + 1),
            )
            .await;
            let end = match stream {
                Ok(stream) => self.watch(stream).await,
                Err(e) => WatchEnd::Fault(format!("watch: {e}")),
            };
            match end {
                WatchEnd::Shutdown => break,
                WatchEnd::Relist(why) => {
                    slog::warn!(self.log, "etcd view must be listed again"; "reason" => &why);
                    self.state_tx.send_modify(|st| {
                        st.in_sync = false;
                        st.last_error = Some(why);
                    });
                    need_list = true;
                }
                WatchEnd::Fault(why) => {
                    self.fault(why);
                    if !self.pause().await {
                        break;
                    }
                }
            }
        }
        if self.dirty {
            self.flush(Instant::now(), false);
        }
        if let Some(c) = &self.cache {
            c.flush().await;
        }
    }

    fn fault(&mut self, why: String) {
        slog::warn!(self.log, "etcd connection lost; keeping the view"; "error" => &why);
        self.state_tx.send_modify(|st| {
            st.connected = false;
            st.reconnects += 1;
            st.last_error = Some(why);
        });
    }

    /// Sleep a backoff step, still delivering ticks. `false`: shutdown.
    async fn pause(&mut self) -> bool {
        let d = self.backoff.next(&mut self.jitter);
        self.sleep_serving(Instant::now() + d).await
    }

    /// Wait out the relist rate limit and jitter. `false`: shutdown.
    async fn wait_for_relist(&mut self) -> bool {
        // No list has completed yet (etcd was away at start): nothing to
        // rate-limit; the fault backoff already spaced the attempts.
        let Some(last) = self.last_relist else {
            return true;
        };
        let now = Instant::now();
        let earliest = last + self.s.relist_min_interval;
        let jitter = self.jitter.upto(self.s.relist_min_interval / 2);
        self.sleep_serving(earliest.max(now) + jitter).await
    }

    /// Sleep until `until`, delivering ticks meanwhile (what arrived before a
    /// fault is still etcd's word); a hold is not released while away.
    async fn sleep_serving(&mut self, until: Instant) -> bool {
        loop {
            if self.dirty && self.flush_at.is_none() {
                self.flush_at = Some(self.next_tick());
            }
            let tick = self.flush_at;
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.shutdown.changed() => return false,
                _ = sleep_opt(tick) => self.flush(Instant::now(), false),
            }
        }
    }

    fn contact(&self) {
        self.last_contact.store(unix_ms() as i64, Ordering::Relaxed);
    }

    fn check_cluster(&mut self, cluster_id: u64, revision: i64) -> Option<String> {
        match self.cluster_id {
            Some(c) if c != cluster_id => {
                return Some(format!(
                    "etcd cluster id changed from {c:x} to {cluster_id:x}"
                ))
            }
            _ => {}
        }
        if revision > 0 && revision < self.resume {
            return Some(format!(
                "etcd revision went backwards from {} to {revision}",
                self.resume
            ));
        }
        None
    }

    /// A full paged list at one revision; replaces the view (mark and sweep).
    async fn list(&mut self) -> Result<(), StoreError> {
        let store = self.store.clone();
        let page = bounded(
            // The whole list, page by page, within a generous bound.
            self.s.request_timeout * 20,
            get_all(store.as_ref(), &self.range, self.s.page_size),
        )
        .await?;
        self.contact();
        let rev = page.header.revision;
        if self.cluster_id.is_some_and(|c| c != page.header.cluster_id) {
            slog::warn!(self.log, "etcd cluster id changed; the list replaces the view"; "cluster_id" => format!("{:x}", page.header.cluster_id));
        }
        self.cluster_id = Some(page.header.cluster_id);
        let mut seen = BTreeSet::new();
        let mut own = Vec::new();
        for kv in page.kvs {
            seen.insert(kv.key.clone());
            if let Some(kv) = self.put(kv) {
                own.push(kv);
            }
        }
        let gone: Vec<String> = self
            .view
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.removed.insert(k);
            self.dirty = true;
        }
        if let Some(tx) = &self.own_tx {
            let _ = tx.send(OwnEvent::Listed(rev, own));
        }
        self.revision = rev;
        self.resume = rev;
        self.last_relist = Some(Instant::now());
        let n = self.view.len();
        slog::info!(self.log, "etcd view listed"; "revision" => rev, "entries" => n);
        // A list is delivered at once (before the state says in sync: a
        // reader that waits for that finds the listed view), a snapshot
        // written for the cache.
        self.dirty = true;
        self.flush(Instant::now(), true);
        self.state_tx.send_modify(|st| {
            st.connected = true;
            st.in_sync = true;
            st.from_cache = false;
            st.relists += 1;
            st.revision = rev;
            st.cluster_id = page.header.cluster_id;
        });
        if let Some(c) = &self.cache {
            self.delta_put.clear();
            self.delta_delete.clear();
            c.send(CacheMsg::Replace(Cached {
                cluster_id: page.header.cluster_id,
                revision: rev,
                entries: self
                    .view
                    .iter()
                    .map(|(k, s)| (k.clone(), s.raw.clone()))
                    .collect(),
            }));
        }
        Ok(())
    }

    /// A put from a list or an event. Returns own keys (for the publisher's list).
    fn put(&mut self, kv: Kv) -> Option<Kv> {
        let raw = RawEntry::from_kv(&kv);
        if let Some(slot) = self.view.get(&raw.key) {
            if slot.raw.mod_revision >= raw.mod_revision {
                // Seen already (a replay after a reconnect).
                if self.removed.remove(&raw.key) && self.held.remove(&raw.key) {
                    self.changed = true;
                }
                return None;
            }
        }
        let parsed = view::parse_entry(&self.s.keys, &self.s.node, &raw);
        match parsed {
            Parsed::Own => return Some(kv),
            Parsed::Ignored => return None,
            _ => {}
        }
        let endpoint = self
            .s
            .keys
            .parse(&raw.key)
            .ok()
            .flatten()
            .is_some_and(|k| k.is_endpoint());
        self.removed.remove(&raw.key);
        self.held.remove(&raw.key);
        self.delta_delete.remove(&raw.key);
        self.delta_put.insert(raw.key.clone(), raw.clone());
        self.view.insert(
            raw.key.clone(),
            Slot {
                raw,
                parsed,
                endpoint,
            },
        );
        self.dirty = true;
        self.changed = true;
        None
    }

    fn delete(&mut self, key: &str, revision: i64) {
        if self
            .s
            .keys
            .parse(key)
            .ok()
            .flatten()
            .and_then(|k| k.node().map(str::to_string))
            .as_deref()
            == Some(self.s.node.as_str())
        {
            if let Some(tx) = &self.own_tx {
                let _ = tx.send(OwnEvent::Delete(key.to_string(), revision));
            }
            return;
        }
        if let Some(slot) = self.view.get(key) {
            if slot.raw.mod_revision < revision && self.removed.insert(key.to_string()) {
                self.dirty = true;
            }
        }
    }

    async fn watch(&mut self, mut stream: Box<dyn WatchStream>) -> WatchEnd {
        let mut last_msg = Instant::now();
        let mut progress_deadline: Option<Instant> = None;
        let mut healthy = false;
        loop {
            if self.dirty && self.flush_at.is_none() {
                self.flush_at = Some(self.next_tick());
            }
            let tick = self.flush_at.into_iter().chain(self.hold_until).min();
            let next_progress = last_msg + self.s.progress_interval;
            tokio::select! {
                m = stream.next() => {
                    last_msg = Instant::now();
                    progress_deadline = None;
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => return WatchEnd::Fault(format!("watch: {e}")),
                    };
                    self.contact();
                    match m {
                        WatchMsg::Created { header } => {
                            if let Some(why) = self.check_cluster(header.cluster_id, header.revision) {
                                return WatchEnd::Relist(why);
                            }
                            self.state_tx.send_modify(|st| {
                                st.connected = true;
                                st.last_error = None;
                            });
                        }
                        WatchMsg::Progress { header } => {
                            if let Some(why) = self.check_cluster(header.cluster_id, header.revision) {
                                return WatchEnd::Relist(why);
                            }
                            self.resume = self.resume.max(header.revision);
                            if !healthy {
                                healthy = true;
                                self.backoff.reset();
                            }
                        }
                        WatchMsg::Events { header, events } => {
                            if let Some(why) = self.check_cluster(header.cluster_id, 0) {
                                return WatchEnd::Relist(why);
                            }
                            if !healthy {
                                healthy = true;
                                self.backoff.reset();
                            }
                            self.events(events);
                        }
                        WatchMsg::Compacted { compact_revision } => {
                            return WatchEnd::Relist(format!(
                                "revision {} was compacted (etcd kept revisions from {compact_revision})",
                                self.resume + 1
                            ));
                        }
                        WatchMsg::Canceled { reason } => {
                            return WatchEnd::Fault(format!("watch canceled by etcd: {reason}"));
                        }
                    }
                }
                _ = sleep_opt(tick) => self.flush(Instant::now(), true),
                _ = tokio::time::sleep_until(next_progress), if progress_deadline.is_none() => {
                    if let Err(e) = bounded(self.s.request_timeout, stream.request_progress()).await {
                        return WatchEnd::Fault(format!("progress request: {e}"));
                    }
                    progress_deadline = Some(Instant::now() + self.s.request_timeout);
                }
                _ = sleep_opt(progress_deadline) => {
                    return WatchEnd::Fault(format!(
                        "etcd did not answer a progress request within {} ms",
                        self.s.request_timeout.as_millis()
                    ));
                }
                _ = self.shutdown.changed() => return WatchEnd::Shutdown,
            }
        }
    }

    fn events(&mut self, events: Vec<super::store::Event>) {
        let was_dirty = self.dirty;
        for e in events {
            let rev = e.kv.mod_revision;
            match e.kind {
                EventKind::Put => {
                    if let Some(kv) = self.put(e.kv) {
                        if let Some(tx) = &self.own_tx {
                            let _ = tx.send(OwnEvent::Put(kv));
                        }
                    }
                }
                EventKind::Delete => self.delete(&e.kv.key, rev),
            }
            self.revision = self.revision.max(rev);
            self.resume = self.resume.max(rev);
        }
        if !was_dirty && !self.dirty {
            // Nothing of the view changed: it is current at this revision too.
            self.clean_revision = self.revision;
        }
        self.state_tx.send_modify(|st| {
            st.revision = self.revision;
            if !self.dirty {
                st.view_revision = self.clean_revision;
            }
        });
    }

    /// When the tick for a change seen now runs: at once after a quiet tick,
    /// else `batch` after the last one — at most one delivery per `batch`
    /// however steady the churn, and no wait for a quiet moment.
    fn next_tick(&self) -> Instant {
        let now = Instant::now();
        self.last_flush.map_or(now, |t| (t + self.s.batch).max(now))
    }

    /// Decide removals, release an expired hold, deliver the view if it changed.
    /// `release`: an expired hold may end (only while connected).
    fn flush(&mut self, now: Instant, release: bool) {
        self.flush_at = None;
        self.last_flush = Some(now);
        // Removals not held yet.
        let new: Vec<String> = self.removed.difference(&self.held).cloned().collect();
        let (eps, others): (Vec<String>, Vec<String>) = new
            .into_iter()
            .partition(|k| self.view.get(k).is_some_and(|s| s.endpoint));
        for k in others {
            self.remove(&k);
        }
        if !eps.is_empty() {
            if self.hold_until.is_some() {
                self.held.extend(eps);
                self.changed = true;
            } else {
                while self
                    .window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > REMOVAL_WINDOW)
                {
                    self.window.pop_front();
                }
                let recent: usize = self.window.iter().map(|(_, n)| n).sum();
                let total = recent + eps.len();
                let endpoints = self.view.values().filter(|s| s.endpoint).count();
                // The population the minute started with, roughly: what is
                // there now plus what the minute already removed.
                let population = endpoints + recent;
                if !self.s.mass_removal_hold.is_zero()
                    && total >= REMOVAL_MIN
                    && total * 5 > population
                {
                    let until = now + self.s.mass_removal_hold;
                    slog::warn!(self.log, "mass removal held";
                        "removed" => total, "remote_endpoints" => population,
                        "hold_s" => self.s.mass_removal_hold.as_secs());
                    self.hold_until = Some(until);
                    self.held.extend(eps);
                    self.changed = true;
                } else {
                    self.window.push_back((now, eps.len()));
                    for k in eps {
                        self.remove(&k);
                    }
                }
            }
        }
        if let Some(until) = self.hold_until {
            if now >= until && release {
                let held = std::mem::take(&mut self.held);
                slog::warn!(self.log, "mass removal hold over; applying"; "removed" => held.len());
                for k in held {
                    if self.removed.contains(&k) {
                        self.remove(&k);
                    }
                }
                self.hold_until = None;
                self.window.clear();
            }
        }
        self.dirty = false;
        self.clean_revision = self.revision;
        self.deliver(false);
        if let (Some(c), false) = (
            &self.cache,
            self.delta_put.is_empty() && self.delta_delete.is_empty(),
        ) {
            c.send(CacheMsg::Delta {
                revision: self.revision,
                cluster_id: self.cluster_id.unwrap_or(0),
                put: std::mem::take(&mut self.delta_put).into_values().collect(),
                delete: std::mem::take(&mut self.delta_delete).into_iter().collect(),
            });
        }
    }

    fn remove(&mut self, key: &str) {
        self.changed = true;
        self.view.remove(key);
        self.removed.remove(key);
        self.held.remove(key);
        self.delta_put.remove(key);
        self.delta_delete.insert(key.to_string());
    }

    /// Build the view and hand it out if its content changed.
    fn deliver(&mut self, from_cache: bool) {
        let clean = self.clean_revision;
        if !self.changed && self.view_tx.borrow().from_cache == from_cache {
            self.state_tx.send_modify(|st| st.view_revision = clean);
            return;
        }
        self.changed = false;
        let built = view::build(self.view.values().map(|s| (&s.raw, &s.parsed)));
        let policy_problems = match built.policies {
            Ok(set) if built.policy_set.is_some() => {
                let same = self.last_good_policies.as_deref() == Some(&set);
                if !same {
                    self.last_good_policies = Some(Arc::new(set));
                }
                Vec::new()
            }
            Ok(_) => {
                self.last_good_policies = None;
                Vec::new()
            }
            Err(p) => p,
        };
        let v = RemoteView {
            revision: self.clean_revision,
            registry: built.registry,
            policy_set: built.policy_set,
            policies: self.last_good_policies.clone(),
            policy_problems,
            rejected: built.rejected,
            held_removals: self.held.len(),
            from_cache,
        };
        let hold_until_ms = self
            .hold_until
            .map(|t| unix_ms() + t.saturating_duration_since(Instant::now()).as_millis() as u64);
        let (eps, rejected, held) = (
            v.registry.endpoints.len(),
            v.rejected.len(),
            v.held_removals,
        );
        self.view_tx.send_if_modified(|cur| {
            // A change that came and went within one tick is no change.
            if cur.same_content(&v) {
                return false;
            }
            *cur = Arc::new(v);
            true
        });
        self.state_tx.send_modify(|st| {
            st.view_revision = clean;
            st.remote_endpoints = eps;
            st.rejected = rejected;
            st.held_removals = held;
            st.hold_until_ms = hold_until_ms;
        });
    }
}

/// The remote view as one list of the watched range shows it now, for a
/// one-shot reader (`netpolctl check --from-etcd`): what a host named `node`
/// would build from it (its own prefix left out). An invalid current policy
/// set has no last valid one to keep here: `policies` is `None` and its
/// problems are in `policy_problems`.
pub async fn read_view(
    store: &dyn Store,
    keys: &Keys,
    node: &str,
) -> Result<RemoteView, StoreError> {
    let (start, end) = keys.watched();
    let page = get_all(store, &Range::new(start, end), 500).await?;
    let entries: Vec<(RawEntry, Parsed)> = page
        .kvs
        .iter()
        .map(|kv| {
            let raw = RawEntry::from_kv(kv);
            let parsed = view::parse_entry(keys, node, &raw);
            (raw, parsed)
        })
        .collect();
    let built = view::build(entries.iter().map(|(r, p)| (r, p)));
    let (policies, policy_problems) = match built.policies {
        Ok(set) if built.policy_set.is_some() => (Some(Arc::new(set)), Vec::new()),
        Ok(_) => (None, Vec::new()),
        Err(p) => (None, p),
    };
    Ok(RemoteView {
        revision: page.header.revision,
        registry: built.registry,
        policy_set: built.policy_set,
        policies,
        policy_problems,
        rejected: built.rejected,
        ..RemoteView::empty()
    })
}
