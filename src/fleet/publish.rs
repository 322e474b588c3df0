//! The publisher: this host's own entries and its status, under one lease
//! (DESIGN §5a).
//!
//! - **What**: the Node of this host (its file's Node document, or one made of
//!   the host's addresses) and every Endpoint and HostEndpoint of its files that
//!   lives on this host, with `spec.node` set to this host. With `publish =
//!   false`, none (and what an earlier run published is removed).
//! - **How**: diffed against what etcd holds under the host's prefix (read
//!   once, then followed through the sync engine's own-prefix events), only
//!   changed keys written, in transactions within etcd's limits.
//! - **Lease**: one, kept alive every third of its TTL; its id is kept in
//!   `state_dir/etcd/lease.json` so a restart within the TTL reuses it (checked
//!   with time-to-live) and the other hosts see no delete and add. A lost lease
//!   (expired during a partition, revoked) or a key someone deleted or changed
//!   is published again. A clean stop leaves everything in place.
//! - **Status**: `status/<node>` (outside the watched range) with ready,
//!   degraded, applied revision and generation, written at most every
//!   `status_interval` and only when it changed — never because time passed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slog::Logger;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::doc;
use super::keys::Keys;
use super::store::{batches, bounded, get_all, sleep_opt, Kv, Op, Range, Store, StoreError, Txn};
use super::sync::{unix_ms, Jitter, OwnEvent, RemoteView, SyncState};
use crate::api::model::{EndpointKind, NodeDef, Origin, RegistrySet};

#[derive(Debug, Clone)]
pub struct PublishSettings {
    pub keys: Keys,
    pub node: String,
    pub lease_ttl: Duration,
    pub publish: bool,
    pub status_interval: Duration,
    pub request_timeout: Duration,
    /// `state_dir/etcd`: where the lease id is kept; `None` = not kept.
    pub state_dir: Option<PathBuf>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl PublishSettings {
    pub fn new(prefix: &str, node: &str) -> PublishSettings {
        let d = crate::config::EtcdConfig::default();
        PublishSettings {
            keys: Keys::new(prefix),
            node: node.to_string(),
            lease_ttl: Duration::from_secs(d.lease_ttl_s),
            publish: d.publish,
            status_interval: Duration::from_secs(d.status_interval_s),
            request_timeout: Duration::from_millis(d.request_timeout_ms),
            state_dir: None,
            backoff_min: Duration::from_millis(200),
            // Reconnects are jittered up to this: short enough that a
            // host is back within seconds of etcd (docs/fleet.md, "Outages").
            backoff_max: Duration::from_secs(4),
        }
    }
}

/// The value of `status/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub ready: bool,
    pub degraded: bool,
    /// This host enforces etcd's watched range as of this revision.
    pub applied_revision: i64,
    pub generation: u64,
    /// Unix ms of this write.
    pub written_ms: u64,
}

/// What the daemon reports after an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The [`RemoteView::revision`] of the view the applied generation was built from.
    pub revision: i64,
    pub generation: u64,
    pub ready: bool,
    pub degraded: bool,
    /// The [`Publication`] number of the local registry the applied
    /// generation includes: until then, this host's own writes of a later
    /// one are not claimed as enforced.
    pub local: u64,
}

/// The publisher's state, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublishState {
    pub lease: Option<i64>,
    /// Keys under this host's prefix as published.
    pub published: usize,
    /// The lease was granted anew (not reused) this many times.
    pub leases_granted: u64,
    pub writes: u64,
    pub status_writes: u64,
    pub last_error: Option<String>,
}

/// This host's entries as keys and JSON values. `host_addresses` make its Node
/// when its files have no Node of its own name (none without addresses).
pub fn own_entries(
    keys: &Keys,
    node: &str,
    local: &RegistrySet,
    host_addresses: &[IpAddr],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match local.nodes.iter().find(|n| n.name == node) {
        Some(n) => {
            out.insert(keys.node(node), doc::node_json(n));
        }
        None if !host_addresses.is_empty() => {
            let n = NodeDef {
                origin: Origin {
                    file: std::path::Path::new("").into(),
                    doc: 0,
                    kind: "Node".into(),
                    namespace: None,
                    name: node.into(),
                },
                name: node.into(),
                labels: Vec::new(),
                addresses: host_addresses.to_vec(),
            };
            out.insert(keys.node(node), doc::node_json(&n));
        }
        None => {}
    }
    for e in &local.endpoints {
        if e.node.as_deref().is_some_and(|n| n != node) {
            continue;
        }
        let key = match e.kind {
            EndpointKind::Workload => {
                keys.endpoint(node, e.namespace.as_deref().unwrap_or("default"), &e.name)
            }
            EndpointKind::Host => keys.host_endpoint(node, &e.name),
        };
        out.insert(key, doc::endpoint_json(e, Some(node)));
    }
    out
}

/// The revision a host enforces that applied the view of revision `applied`,
/// when the view delivered now is of `view_revision` and etcd's range is
/// unchanged for the view up to `clean_revision`: having applied the latest
/// view, it enforces the range as of the newest clean revision.
pub fn enforced_revision(applied: i64, view_revision: i64, clean_revision: i64) -> i64 {
    if applied >= view_revision {
        applied.max(clean_revision)
    } else {
        applied
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseFile {
    lease: i64,
    ttl_s: i64,
}

pub(crate) enum Control {
    Publish {
        registry: Arc<RegistrySet>,
        host_addresses: Vec<IpAddr>,
        /// Its [`Publication`] number.
        local: u64,
    },
    Applied(Applied),
}

/// What this host publishes, handed over from two places: the local registry
/// by the input read that found the files valid (so it goes out while the
/// daemon still compiles it, not after), and the host's addresses (a Node made
/// of them) by the daemon after a reconcile. Sent once both are known, and
/// again whenever either changes. Each new registry gets the next number;
/// [`Applied::local`] says which one the enforced state includes.
#[derive(Clone)]
pub struct Publication(Arc<Mutex<Handover>>);

struct Handover {
    tx: mpsc::UnboundedSender<Control>,
    registry: Option<(Arc<RegistrySet>, u64)>,
    addresses: Option<Vec<IpAddr>>,
    sent: Option<(u64, Vec<IpAddr>)>,
}

impl Publication {
    fn new(tx: mpsc::UnboundedSender<Control>) -> Publication {
        Publication(Arc::new(Mutex::new(Handover {
            tx,
            registry: None,
            addresses: None,
            sent: None,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local registry of a valid read (the same `Arc` again is no change).
    pub fn registry(&self, registry: Arc<RegistrySet>) {
        let mut h = self.lock();
        let n = match &h.registry {
            Some((r, n)) if Arc::ptr_eq(r, &registry) => return,
            Some((_, n)) => n + 1,
            None => 1,
        };
        h.registry = Some((registry, n));
        h.send();
    }

    /// The host's addresses worth naming in its Node.
    pub fn addresses(&self, addresses: Vec<IpAddr>) {
        let mut h = self.lock();
        if h.addresses.as_ref() != Some(&addresses) {
            h.addresses = Some(addresses);
            h.send();
        }
    }

    /// The number of the last local registry handed over (0: none yet).
    pub fn local(&self) -> u64 {
        self.lock().registry.as_ref().map_or(0, |(_, n)| *n)
    }
}

impl Handover {
    fn send(&mut self) {
        let (Some((registry, n)), Some(addresses)) = (&self.registry, &self.addresses) else {
            return;
        };
        if self.sent.as_ref() == Some(&(*n, addresses.clone())) {
            return;
        }
        let _ = self.tx.send(Control::Publish {
            registry: registry.clone(),
            host_addresses: addresses.clone(),
            local: *n,
        });
        self.sent = Some((*n, addresses.clone()));
    }
}

/// The running publisher.
pub struct PublisherHandle {
    pub(crate) tx: mpsc::UnboundedSender<Control>,
    pub publication: Publication,
    pub state: watch::Receiver<PublishState>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl PublisherHandle {
    /// This host's files changed: publish what they say now.
    pub fn publish(&self, registry: Arc<RegistrySet>, host_addresses: Vec<IpAddr>) {
        self.publication.registry(registry);
        self.publication.addresses(host_addresses);
    }

    pub fn applied(&self, a: Applied) {
        let _ = self.tx.send(Control::Applied(a));
    }

    /// Stop; published keys and the lease stay (they expire on their own if
    /// this host does not come back).
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    value: Option<(Vec<u8>, i64)>,
    rev: i64,
}

struct Publisher {
    s: PublishSettings,
    store: Arc<dyn Store>,
    log: Logger,
    lease: Option<i64>,
    /// Tried the lease file once.
    lease_file_read: bool,
    /// What etcd holds under this host's prefix, as last seen: value and
    /// lease (`None`: deleted), with the revision it was seen at. Each key
    /// takes only news newer than what it has, so an event or a list that
    /// arrives late does not undo a later write.
    own: BTreeMap<String, Known>,
    published_known: bool,
    desired: Option<BTreeMap<String, String>>,
    need_sync: bool,
    /// The publication number of `desired`.
    desired_local: u64,
    /// Own writes (publication number, revision) of local registries the
    /// daemon has not reported applied yet.
    unapplied: Vec<(u64, i64)>,
    applied: Option<Applied>,
    status_written: Option<NodeStatus>,
    last_status_write: Option<Instant>,
    view: watch::Receiver<Arc<RemoteView>>,
    sync_state: watch::Receiver<SyncState>,
    state_tx: watch::Sender<PublishState>,
    jitter: Jitter,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Start the publisher. `own` carries the sync engine's events of this host's
/// prefix; `view` and `sync_state` tell which revision an apply stands for.
pub fn spawn(
    s: PublishSettings,
    store: Arc<dyn Store>,
    log: Logger,
    own: mpsc::UnboundedReceiver<OwnEvent>,
    view: watch::Receiver<Arc<RemoteView>>,
    sync_state: watch::Receiver<SyncState>,
) -> PublisherHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (state_tx, state_rx) = watch::channel(PublishState::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let p = Publisher {
        jitter: Jitter::new(&s.node),
        s,
        store,
        log,
        lease: None,
        lease_file_read: false,
        own: BTreeMap::new(),
        published_known: false,
        desired: None,
        need_sync: false,
        desired_local: 0,
        unapplied: Vec::new(),
        applied: None,
        status_written: None,
        last_status_write: None,
        view,
        sync_state,
        state_tx,
        failures: 0,
        retry_at: None,
    };
    let task = tokio::spawn(p.run(rx, own, shutdown_rx));
    PublisherHandle {
        publication: Publication::new(tx.clone()),
        tx,
        state: state_rx,
        shutdown: shutdown_tx,
        task,
    }
}

impl Publisher {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Control>,
        mut own: mpsc::UnboundedReceiver<OwnEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let keepalive_every = (self.s.lease_ttl / 3).max(Duration::from_millis(500));
        let mut next_keepalive = Instant::now() + keepalive_every;
        let mut own_open = true;
        let mut state_open = true;
        loop {
            let work_at = if self.need_sync || self.status_due().is_some() {
                let due = self.status_due().unwrap_or_else(Instant::now);
                let due = if self.need_sync {
                    Instant::now().min(due)
                } else {
                    due
                };
                Some(self.retry_at.map_or(due, |r| r.max(due)))
            } else {
                None
            };
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Control::Publish { registry, host_addresses, local }) => {
                        self.desired_local = local;
                        let d = if self.s.publish {
                            own_entries(&self.s.keys, &self.s.node, &registry, &host_addresses)
                        } else {
                            BTreeMap::new()
                        };
                        if self.desired.as_ref() != Some(&d) {
                            self.desired = Some(d);
                            self.need_sync = true;
                        }
                    }
                    Some(Control::Applied(a)) => {
                        self.unapplied.retain(|(n, _)| *n > a.local);
                        self.applied = Some(a);
                    }
                    None => return,
                },
                e = own.recv(), if own_open => match e {
                    Some(e) => self.own_event(e),
                    None => own_open = false,
                },
                r = self.sync_state.changed(), if state_open => state_open = r.is_ok(),
                _ = tokio::time::sleep_until(next_keepalive), if self.lease.is_some() => {
                    next_keepalive = Instant::now() + keepalive_every;
                    self.keep_alive().await;
                }
                _ = sleep_opt(work_at) => {
                    if self.need_sync {
                        match self.sync().await {
                            // No push of `next_keepalive` here: a put under
                            // the lease does not renew it in etcd, only a
                            // keep-alive does (a host publishing more often
                            // than the interval would lose its lease).
                            Ok(()) => {
                                self.need_sync = false;
                                self.ok();
                            }
                            Err(e) => self.failed("publish", e),
                        }
                    }
                    if self.status_due().is_some_and(|t| t <= Instant::now()) && !self.need_sync {
                        if let Err(e) = self.write_status().await {
                            self.failed("status", e);
                        } else {
                            self.ok();
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    fn ok(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.state_tx.send_modify(|s| s.last_error = None);
    }

    fn failed(&mut self, what: &str, e: StoreError) {
        if let StoreError::LeaseNotFound(_) = e {
            self.lease_lost();
        }
        self.failures += 1;
        let cap = self
            .s
            .backoff_min
            .saturating_mul(1 << self.failures.min(16))
            .min(self.s.backoff_max);
        let wait = (self.s.backoff_min / 10).max(self.jitter.upto(cap));
        self.retry_at = Some(Instant::now() + wait);
        slog::warn!(self.log, "etcd write failed; retrying"; "what" => what, "error" => %e);
        let msg = format!("{what}: {e}");
        self.state_tx.send_modify(|s| s.last_error = Some(msg));
    }

    fn lease_lost(&mut self) {
        if let Some(id) = self.lease.take() {
            slog::warn!(self.log, "etcd lease lost; publishing again under a new one"; "lease" => format!("{id:x}"));
            // Every key of it is gone with it.
            for k in self.own.values_mut() {
                if k.value.as_ref().is_some_and(|(_, l)| *l == id) {
                    k.value = None;
                }
            }
        }
        self.status_written = None;
        self.need_sync = true;
        self.state_tx.send_modify(|s| s.lease = None);
    }

    /// Take what etcd said of an own key at `rev`, if newer than what is known.
    fn observe(&mut self, key: &str, value: Option<(Vec<u8>, i64)>, rev: i64) -> bool {
        match self.own.get_mut(key) {
            Some(k) if k.rev > rev => false,
            Some(k) => {
                let changed = k.value != value;
                *k = Known { value, rev };
                changed
            }
            None => {
                self.own.insert(key.to_string(), Known { value, rev });
                true
            }
        }
    }

    fn published(&self) -> impl Iterator<Item = (&String, &(Vec<u8>, i64))> {
        self.own
            .iter()
            .filter_map(|(k, v)| v.value.as_ref().map(|x| (k, x)))
    }

    /// A full read of the prefix at `rev`.
    fn listed(&mut self, rev: i64, kvs: Vec<Kv>) {
        let present: std::collections::BTreeSet<String> =
            kvs.iter().map(|k| k.key.clone()).collect();
        for kv in kvs {
            self.observe(&kv.key, Some((kv.value, kv.lease)), kv.mod_revision);
        }
        let gone: Vec<String> = self
            .own
            .iter()
            .filter(|(k, v)| v.value.is_some() && v.rev <= rev && !present.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.observe(&k, None, rev);
        }
        self.published_known = true;
    }

    fn own_event(&mut self, e: OwnEvent) {
        let changed = match e {
            OwnEvent::Put(kv) => {
                let (key, rev) = (kv.key.clone(), kv.mod_revision);
                self.observe(&key, Some((kv.value, kv.lease)), rev)
            }
            OwnEvent::Delete(key, rev) => {
                let c = self.observe(&key, None, rev);
                if c && self.desired.as_ref().is_some_and(|d| d.contains_key(&key)) {
                    slog::info!(self.log, "own key deleted in etcd; publishing it again"; "key" => &key);
                }
                c
            }
            OwnEvent::Listed(rev, kvs) => {
                let before = self.own.clone();
                self.listed(rev, kvs);
                before != self.own
            }
        };
        if changed && self.desired.is_some() {
            self.need_sync = true;
        }
    }

    fn lease_path(&self) -> Option<PathBuf> {
        self.s.state_dir.as_ref().map(|d| d.join("lease.json"))
    }

    async fn ensure_lease(&mut self) -> Result<i64, StoreError> {
        if let Some(id) = self.lease {
            return Ok(id);
        }
        let t = self.s.request_timeout;
        if !self.lease_file_read {
            self.lease_file_read = true;
            let saved = self
                .lease_path()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| serde_json::from_str::<LeaseFile>(&t).ok());
            if let Some(f) = saved {
                if let Some((left, _)) = bounded(t, self.store.lease_time_to_live(f.lease)).await? {
                    if left > 0
                        && bounded(t, self.store.lease_keep_alive(f.lease))
                            .await
                            .is_ok()
                    {
                        slog::info!(self.log, "etcd lease reused"; "lease" => format!("{:x}", f.lease), "ttl_left_s" => left);
                        self.lease = Some(f.lease);
                        self.state_tx.send_modify(|s| s.lease = Some(f.lease));
                        return Ok(f.lease);
                    }
                }
            }
        }
        let ttl = self.s.lease_ttl.as_secs().max(1) as i64;
        let (id, granted) = bounded(t, self.store.lease_grant(ttl)).await?;
        slog::info!(self.log, "etcd lease granted"; "lease" => format!("{id:x}"), "ttl_s" => granted);
        if let Some(p) = self.lease_path() {
            let f = LeaseFile {
                lease: id,
                ttl_s: granted,
            };
            let r = p
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    let tmp = p.with_extension("json.tmp");
                    std::fs::write(&tmp, serde_json::to_vec(&f).unwrap_or_default())?;
                    std::fs::rename(&tmp, &p)
                });
            if let Err(e) = r {
                slog::warn!(self.log, "lease id not saved; a restart will not reuse it"; "file" => %p.display(), "error" => %e);
            }
        }
        self.lease = Some(id);
        self.state_tx.send_modify(|s| {
            s.lease = Some(id);
            s.leases_granted += 1;
        });
        Ok(id)
    }

    async fn keep_alive(&mut self) {
        let Some(id) = self.lease else { return };
        match bounded(self.s.request_timeout, self.store.lease_keep_alive(id)).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => self.lease_lost(),
            // etcd away: try again next round; the lease may still be alive then.
            Err(e) => slog::debug!(self.log, "lease keep-alive failed"; "error" => %e),
        }
    }

    /// Write what differs between `desired` and `published`.
    async fn sync(&mut self) -> Result<(), StoreError> {
        let Some(desired) = self.desired.clone() else {
            return Ok(());
        };
        let t = self.s.request_timeout;
        if !self.published_known {
            let r = Range::prefix(&self.s.keys.node_prefix(&self.s.node));
            let page = bounded(t * 4, get_all(self.store.as_ref(), &r, 500)).await?;
            self.listed(page.header.revision, page.kvs);
        }
        let lease = if desired.is_empty() && self.published().next().is_none() {
            0
        } else {
            self.ensure_lease().await?
        };
        let mut ops = Vec::new();
        let published: BTreeMap<&String, &(Vec<u8>, i64)> = self.published().collect();
        for (k, v) in &desired {
            if published.get(k).copied() != Some(&(v.as_bytes().to_vec(), lease)) {
                ops.push(Op::Put {
                    key: k.clone(),
                    value: v.as_bytes().to_vec(),
                    lease,
                });
            }
        }
        for k in published.keys() {
            if !desired.contains_key(*k) {
                ops.push(Op::Delete { key: (*k).clone() });
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        let n = ops.len();
        let txns = batches(ops).map_err(StoreError::Other)?;
        let mut first_rev = None;
        for txn in txns {
            let applied = txn.clone();
            let r = bounded(
                t,
                self.store.txn(Txn {
                    success: txn,
                    ..Txn::default()
                }),
            )
            .await?;
            let rev = r.header.revision;
            first_rev.get_or_insert(rev);
            for op in applied {
                match op {
                    Op::Put { key, value, lease } => {
                        self.observe(&key, Some((value, lease)), rev);
                    }
                    Op::Delete { key } => {
                        self.observe(&key, None, rev);
                    }
                    Op::DeletePrefix { .. } => {}
                }
            }
        }
        let local = self.desired_local;
        if let Some(rev) = first_rev.filter(|_| self.applied.is_none_or(|a| a.local < local)) {
            self.unapplied.push((local, rev));
        }
        let count = self.published().count();
        slog::info!(self.log, "published to etcd"; "changed_keys" => n, "keys" => count);
        self.state_tx.send_modify(|s| {
            s.writes += 1;
            s.published = count;
        });
        Ok(())
    }

    /// The status as it should be now, if the daemon has applied anything.
    fn status(&self) -> Option<NodeStatus> {
        let a = self.applied?;
        let rev = enforced_revision(
            a.revision,
            self.view.borrow().revision,
            self.sync_state.borrow().view_revision,
        );
        // This host's own write of a registry it has not applied yet (it is
        // published as soon as it is read): not enforced before that write.
        let rev = self
            .unapplied
            .iter()
            .filter(|(n, _)| *n > a.local)
            .map(|(_, r)| r - 1)
            .fold(rev, i64::min);
        Some(NodeStatus {
            node: self.s.node.clone(),
            ready: a.ready,
            degraded: a.degraded,
            applied_revision: rev,
            generation: a.generation,
            written_ms: 0,
        })
    }

    /// When the status should be written, if it differs from what was.
    fn status_due(&self) -> Option<Instant> {
        let s = self.status()?;
        let same = self.status_written.as_ref().is_some_and(|w| {
            NodeStatus {
                written_ms: 0,
                ..w.clone()
            } == s
        });
        if same {
            return None;
        }
        Some(
            self.last_status_write
                .map_or_else(Instant::now, |t| t + self.s.status_interval),
        )
    }

    async fn write_status(&mut self) -> Result<(), StoreError> {
        let Some(mut s) = self.status() else {
            return Ok(());
        };
        let lease = self.ensure_lease().await?;
        s.written_ms = unix_ms();
        let value = serde_json::to_vec(&s).map_err(|e| StoreError::Other(e.to_string()))?;
        bounded(
            self.s.request_timeout,
            self.store.txn(Txn {
                success: vec![Op::Put {
                    key: self.s.keys.status(&self.s.node),
                    value,
                    lease,
                }],
                ..Txn::default()
            }),
        )
        .await?;
        self.status_written = Some(s);
        self.last_status_write = Some(Instant::now());
        self.state_tx.send_modify(|s| s.status_writes += 1);
        Ok(())
    }
}
