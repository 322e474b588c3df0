//! An in-memory [`Store`] with etcd's semantics where fleet mode depends on
//! them: one revision per write transaction, reads at a past revision,
//! compaction, watches that replay from a revision and report compaction,
//! progress requests, leases that expire (on tokio's clock, so tests can pause
//! time) and delete their keys.
//!
//! Faults for tests: [`MemStore::set_down`] (every call fails and every watch
//! breaks, as when etcd is killed), [`MemStore::freeze`] (calls and watches hang,
//! as under SIGSTOP), [`MemStore::rewind`] (a restore from an older snapshot:
//! the revision goes backwards) and [`MemStore::set_cluster_id`]. Counters show
//! how many watches are open and how many range reads were made, so a test can
//! assert "exactly one watcher" and "no relist".
//!
//! Lease expiry is checked on every call and by [`MemStore::expire_leases`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::store::{
    Compare, Event, EventKind, Header, Kv, Op, Page, Range, Store, StoreError, Target, Txn,
    TxnResult, WatchMsg, WatchStream,
};

#[derive(Debug)]
struct Lease {
    ttl: i64,
    deadline: Instant,
}

/// A stored event with the value before it, so reads at a past revision can
/// undo it.
#[derive(Debug, Clone)]
struct Historic {
    event: Event,
    prev: Option<Kv>,
}

struct Watcher {
    range: Range,
    tx: mpsc::UnboundedSender<Result<WatchMsg, StoreError>>,
}

struct Inner {
    rev: i64,
    compacted: i64,
    cluster_id: u64,
    keys: BTreeMap<String, Kv>,
    history: Vec<Historic>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    watchers: Vec<Watcher>,
    down: bool,
}

/// The in-memory store. Cheap to clone (shared state).
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    frozen: watch::Sender<bool>,
    open_watches: Arc<AtomicUsize>,
    watches_created: Arc<AtomicUsize>,
    range_reads: Arc<AtomicUsize>,
    progress_requests: Arc<AtomicUsize>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore {
            inner: Arc::new(Mutex::new(Inner {
                rev: 1,
                compacted: 0,
                cluster_id: 0xc1,
                keys: BTreeMap::new(),
                history: Vec::new(),
                leases: HashMap::new(),
                next_lease: 0x1000,
                watchers: Vec::new(),
                down: false,
            })),
            frozen: watch::channel(false).0,
            open_watches: Arc::new(AtomicUsize::new(0)),
            watches_created: Arc::new(AtomicUsize::new(0)),
            range_reads: Arc::new(AtomicUsize::new(0)),
            progress_requests: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock poisons it; the state is
        // still consistent (every mutation completes under the lock).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn revision(&self) -> i64 {
        self.lock().rev
    }

    /// Watches open now (streams not yet dropped).
    pub fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::SeqCst)
    }

    /// Watches ever created.
    pub fn watches_created(&self) -> usize {
        self.watches_created.load(Ordering::SeqCst)
    }

    /// Range reads ever made (every page counts).
    pub fn range_reads(&self) -> usize {
        self.range_reads.load(Ordering::SeqCst)
    }

    pub fn progress_requests(&self) -> usize {
        self.progress_requests.load(Ordering::SeqCst)
    }

    /// Every call fails with `Unavailable` and open watches break (`true`), or
    /// the store answers again (`false`).
    pub fn set_down(&self, down: bool) {
        let mut g = self.lock();
        g.down = down;
        if down {
            for w in g.watchers.drain(..) {
                let _ =
                    w.tx.send(Err(StoreError::Unavailable("connection refused".into())));
            }
        }
    }

    /// Calls and watch messages hang until [`MemStore::thaw`] (SIGSTOP).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn set_cluster_id(&self, id: u64) {
        self.lock().cluster_id = id;
    }

    /// Compact history up to `rev`: reads and watches before it fail.
    pub fn compact(&self, rev: i64) {
        let mut g = self.lock();
        let rev = rev.min(g.rev);
        g.compacted = g.compacted.max(rev);
        let c = g.compacted;
        g.history.retain(|h| h.event.kv.mod_revision > c);
    }

    /// Restore the state of revision `rev` as if from an older snapshot: the
    /// revision goes backwards, history after it is gone, every watch breaks.
    pub fn rewind(&self, rev: i64) {
        let mut g = self.lock();
        let keys = g.state_at(rev).unwrap_or_default();
        g.keys = keys;
        g.rev = rev;
        g.history.clear();
        g.compacted = rev;
        for w in g.watchers.drain(..) {
            let _ =
                w.tx.send(Err(StoreError::Unavailable("member restarted".into())));
        }
    }

    /// Delete the keys of every lease past its deadline.
    pub fn expire_leases(&self) {
        self.lock().expire(Instant::now());
    }

    /// A plain put without lease (test setup); returns the revision.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.put_lease(key, value, 0)
    }

    pub fn put_lease(&self, key: &str, value: &str, lease: i64) -> i64 {
        let mut g = self.lock();
        g.apply(&[Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease,
        }])
        .expect("put");
        g.rev
    }

    pub fn delete(&self, key: &str) -> i64 {
        let mut g = self.lock();
        g.apply(&[Op::Delete { key: key.into() }]).expect("delete");
        g.rev
    }

    /// The current value of `key`.
    pub fn value(&self, key: &str) -> Option<Kv> {
        self.lock().keys.get(key).cloned()
    }

    /// Current keys starting with `prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<Kv> {
        self.lock()
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Wait while frozen, then check availability and leases.
    async fn enter(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let mut rx = self.frozen.subscribe();
        // Err: the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|f| !*f).await;
        let mut g = self.lock();
        if g.down {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        g.expire(Instant::now());
        Ok(g)
    }
}

impl Inner {
    fn header(&self) -> Header {
        Header {
            revision: self.rev,
            cluster_id: self.cluster_id,
        }
    }

    fn expire(&mut self, now: Instant) {
        let mut dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        dead.sort_unstable();
        for id in dead {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<Op> = self
            .keys
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| Op::Delete {
                key: kv.key.clone(),
            })
            .collect();
        if !keys.is_empty() {
            // Cannot fail: deletes need no lease.
            let _ = self.apply(&keys);
        }
    }

    /// The keys as they were at `rev`.
    fn state_at(&self, rev: i64) -> Result<BTreeMap<String, Kv>, StoreError> {
        if rev == 0 || rev >= self.rev {
            return Ok(self.keys.clone());
        }
        if rev < self.compacted {
            return Err(StoreError::Compacted {
                revision: rev,
                compacted: self.compacted,
            });
        }
        let mut keys = self.keys.clone();
        for h in self.history.iter().rev() {
            if h.event.kv.mod_revision <= rev {
                break;
            }
            match &h.prev {
                Some(p) => keys.insert(p.key.clone(), p.clone()),
                None => keys.remove(&h.event.kv.key),
            };
        }
        Ok(keys)
    }

    fn compare(&self, c: &Compare) -> bool {
        let kv = self.keys.get(&c.key);
        let eq = match &c.target {
            Target::Version(v) => kv.map_or(0, |k| k.version) == *v,
            Target::ModRevision(r) => kv.map_or(0, |k| k.mod_revision) == *r,
            Target::Value(v) => kv.is_some_and(|k| &k.value == v),
        };
        eq == c.equal
    }

    /// Apply write ops at one new revision (none if nothing changed).
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && !self.leases.contains_key(lease) {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
            }
        }
        let rev = self.rev + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let prev = self.keys.get(key).cloned();
                    let kv = Kv {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    self.keys.insert(key.clone(), kv.clone());
                    events.push(Historic {
                        event: Event {
                            kind: EventKind::Put,
                            kv,
                        },
                        prev,
                    });
                }
                Op::Delete { key } => {
                    if let Some(prev) = self.keys.remove(key) {
                        events.push(deleted(prev, rev));
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<String> = self
                        .keys
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        if let Some(prev) = self.keys.remove(&k) {
                            events.push(deleted(prev, rev));
                        }
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        self.rev = rev;
        let header = self.header();
        self.watchers.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|h| w.range.contains(&h.event.kv.key))
                .map(|h| h.event.clone())
                .collect();
            mine.is_empty()
                || w.tx
                    .send(Ok(WatchMsg::Events {
                        header,
                        events: mine,
                    }))
                    .is_ok()
        });
        self.history.extend(events);
        Ok(())
    }
}

fn deleted(prev: Kv, rev: i64) -> Historic {
    Historic {
        event: Event {
            kind: EventKind::Delete,
            kv: Kv {
                key: prev.key.clone(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                lease: 0,
            },
        },
        prev: Some(prev),
    }
}

struct MemWatch {
    store: MemStore,
    rx: mpsc::UnboundedReceiver<Result<WatchMsg, StoreError>>,
    tx: mpsc::UnboundedSender<Result<WatchMsg, StoreError>>,
    broken: bool,
    /// A message received but not yet returned (held while frozen): keeps
    /// `next` cancel-safe, as a `select!` needs.
    pending: Option<Result<WatchMsg, StoreError>>,
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.store.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WatchStream for MemWatch {
    fn next(&mut self) -> BoxFuture<'_, Result<WatchMsg, StoreError>> {
        Box::pin(async move {
            if self.broken {
                return Err(StoreError::Unavailable("watch stream closed".into()));
            }
            let mut frozen = self.store.frozen.subscribe();
            if self.pending.is_none() {
                let _ = frozen.wait_for(|f| !*f).await;
                self.pending = Some(match self.rx.recv().await {
                    Some(m) => m,
                    None => Err(StoreError::Unavailable("watch stream closed".into())),
                });
            }
            // A message that arrived while frozen is held until the thaw.
            let _ = frozen.wait_for(|f| !*f).await;
            let msg = self.pending.take().expect("set above");
            if msg.is_err() {
                self.broken = true;
            }
            msg
        })
    }

    fn request_progress(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.store.progress_requests.fetch_add(1, Ordering::SeqCst);
            if *self.store.frozen.borrow() {
                // A stopped server reads nothing: the request is lost.
                return Ok(());
            }
            let mut g = self.store.lock();
            if g.down || self.broken {
                return Err(StoreError::Unavailable("watch stream closed".into()));
            }
            g.expire(Instant::now());
            let header = g.header();
            let _ = self.tx.send(Ok(WatchMsg::Progress { header }));
            Ok(())
        })
    }
}

impl Store for MemStore {
    fn get_range(
        &self,
        range: &Range,
        revision: i64,
        limit: i64,
    ) -> BoxFuture<'_, Result<Page, StoreError>> {
        let range = range.clone();
        Box::pin(async move {
            self.range_reads.fetch_add(1, Ordering::SeqCst);
            let g = self.enter().await?;
            let keys = g.state_at(revision)?;
            // As etcd does: the header names the store's revision, not the one read.
            let header = g.header();
            let mut kvs: Vec<Kv> = keys
                .range(range.start.clone()..range.end.clone())
                .map(|(_, v)| v.clone())
                .collect();
            let more = limit > 0 && kvs.len() > limit as usize;
            if more {
                kvs.truncate(limit as usize);
            }
            Ok(Page { header, kvs, more })
        })
    }

    fn watch(
        &self,
        range: &Range,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<Box<dyn WatchStream>, StoreError>> {
        let range = range.clone();
        Box::pin(async move {
            let mut g = self.enter().await?;
            let (tx, rx) = mpsc::unbounded_channel();
            self.watches_created.fetch_add(1, Ordering::SeqCst);
            self.open_watches.fetch_add(1, Ordering::SeqCst);
            let header = g.header();
            let _ = tx.send(Ok(WatchMsg::Created { header }));
            if start_revision > 0 && start_revision <= g.compacted {
                let _ = tx.send(Ok(WatchMsg::Compacted {
                    compact_revision: g.compacted,
                }));
            } else {
                // Replay, one message per revision, then go live.
                let mut by_rev: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
                for h in &g.history {
                    let r = h.event.kv.mod_revision;
                    if r >= start_revision && range.contains(&h.event.kv.key) {
                        by_rev.entry(r).or_default().push(h.event.clone());
                    }
                }
                for (r, events) in by_rev {
                    let _ = tx.send(Ok(WatchMsg::Events {
                        header: Header {
                            revision: r,
                            cluster_id: g.cluster_id,
                        },
                        events,
                    }));
                }
                g.watchers.push(Watcher {
                    range,
                    tx: tx.clone(),
                });
            }
            drop(g);
            Ok(Box::new(MemWatch {
                store: self.clone(),
                rx,
                tx,
                broken: false,
                pending: None,
            }) as Box<dyn WatchStream>)
        })
    }

    fn lease_grant(&self, ttl: i64) -> BoxFuture<'_, Result<(i64, i64), StoreError>> {
        Box::pin(async move {
            let mut g = self.enter().await?;
            g.next_lease += 1;
            let id = g.next_lease;
            g.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + Duration::from_secs(ttl.max(1) as u64),
                },
            );
            Ok((id, ttl))
        })
    }

    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut g = self.enter().await?;
            match g.leases.get_mut(&id) {
                Some(l) => {
                    l.deadline = Instant::now() + Duration::from_secs(l.ttl.max(1) as u64);
                    Ok(())
                }
                None => Err(StoreError::LeaseNotFound(id)),
            }
        })
    }

    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, Result<Option<(i64, i64)>, StoreError>> {
        Box::pin(async move {
            let g = self.enter().await?;
            Ok(g.leases.get(&id).map(|l| {
                let left = l.deadline.saturating_duration_since(Instant::now());
                (left.as_secs() as i64, l.ttl)
            }))
        })
    }

    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut g = self.enter().await?;
            if !g.leases.contains_key(&id) {
                return Err(StoreError::LeaseNotFound(id));
            }
            g.revoke(id);
            Ok(())
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
        Box::pin(async move {
            let mut g = self.enter().await?;
            let ok = txn.compares.iter().all(|c| g.compare(c));
            g.apply(if ok { &txn.success } else { &txn.failure })?;
            Ok(TxnResult {
                header: g.header(),
                succeeded: ok,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::store::get_all;

    fn s(v: &[Kv]) -> Vec<(&str, &[u8])> {
        v.iter()
            .map(|k| (k.key.as_str(), k.value.as_slice()))
            .collect()
    }

    #[tokio::test]
    async fn reads_at_a_revision_and_compaction() {
        let m = MemStore::new();
        let r1 = m.put("/a/1", "x");
        m.put("/a/2", "y");
        m.put("/a/1", "z");
        m.delete("/a/2");
        let all = Range::prefix("/a/");
        let p = m.get_range(&all, r1, 0).await.unwrap();
        assert_eq!(s(&p.kvs), vec![("/a/1", b"x".as_slice())]);
        let p = m.get_range(&all, 0, 0).await.unwrap();
        assert_eq!(s(&p.kvs), vec![("/a/1", b"z".as_slice())]);
        assert_eq!(p.kvs[0].create_revision, r1);
        m.compact(r1 + 1);
        assert_eq!(
            m.get_range(&all, r1, 0).await.unwrap_err(),
            StoreError::Compacted {
                revision: r1,
                compacted: r1 + 1
            }
        );
        for i in 0..25 {
            m.put(&format!("/b/{i:02}"), "v");
        }
        let page = get_all(&m, &Range::prefix("/b/"), 10).await.unwrap();
        assert_eq!(page.kvs.len(), 25);
        assert_eq!(m.range_reads(), 3 + 3);
    }

    #[tokio::test]
    async fn watch_replays_then_goes_live_and_reports_compaction() {
        let m = MemStore::new();
        let r1 = m.put("/a/1", "x");
        m.put("/b/1", "other");
        let mut w = m.watch(&Range::prefix("/a/"), r1).await.unwrap();
        assert!(matches!(w.next().await.unwrap(), WatchMsg::Created { .. }));
        match w.next().await.unwrap() {
            WatchMsg::Events { events, .. } => assert_eq!(events[0].kv.key, "/a/1"),
            m => panic!("{m:?}"),
        }
        m.put("/a/2", "y");
        match w.next().await.unwrap() {
            WatchMsg::Events { events, .. } => assert_eq!(events[0].kv.key, "/a/2"),
            m => panic!("{m:?}"),
        }
        w.request_progress().await.unwrap();
        assert!(matches!(w.next().await.unwrap(), WatchMsg::Progress { .. }));
        assert_eq!(m.open_watches(), 1);
        drop(w);
        assert_eq!(m.open_watches(), 0);
        m.compact(m.revision());
        let mut w = m.watch(&Range::prefix("/a/"), r1).await.unwrap();
        w.next().await.unwrap();
        assert!(matches!(
            w.next().await.unwrap(),
            WatchMsg::Compacted { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_and_delete_their_keys() {
        let m = MemStore::new();
        let (id, _) = m.lease_grant(3).await.unwrap();
        m.put_lease("/n/a", "1", id);
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.lease_keep_alive(id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.expire_leases();
        assert!(m.value("/n/a").is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.expire_leases();
        assert!(m.value("/n/a").is_none());
        assert_eq!(
            m.lease_keep_alive(id).await.unwrap_err(),
            StoreError::LeaseNotFound(id)
        );
        assert_eq!(m.lease_time_to_live(id).await.unwrap(), None);
        let t = Txn {
            success: vec![Op::Put {
                key: "/n/b".into(),
                value: vec![],
                lease: id,
            }],
            ..Txn::default()
        };
        assert_eq!(m.txn(t).await.unwrap_err(), StoreError::LeaseNotFound(id));
    }

    #[tokio::test]
    async fn txn_compares() {
        let m = MemStore::new();
        let create = |k: &str| Txn::put_if_absent(k, b"v");
        assert!(m.txn(create("/k")).await.unwrap().succeeded);
        assert!(!m.txn(create("/k")).await.unwrap().succeeded);
        m.set_down(true);
        assert!(matches!(
            m.txn(create("/j")).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
