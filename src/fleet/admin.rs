//! The operator side of fleet mode: pushing policy sets and registry
//! directories, reading the current policy set, removing a node, and the
//! fleet's status and revision barrier (`netpolctl policy push`, `registry
//! push`, `node remove`, `fleet status`, `fleet wait`).
//!
//! Everything is validated with the same loaders as the daemon's files before
//! anything is written; writes are diffed and kept within etcd's transaction
//! limits. A policy set is written under a new id and `policyset-current` is
//! flipped in one transaction (compared against the value read, so two pushes
//! at once cannot both win); hosts move from one whole set to the next.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::doc;
use super::keys::{KeyKind, Keys};
use super::publish::NodeStatus;
use super::store::{batches, get_all, Compare, Op, Range, Store, StoreError, Txn};
use super::sync::unix_ms;
use super::view::{self, RawEntry};
use crate::api::model::{EndpointKind, PolicySet};
use crate::api::{self, LoadOptions, Problem};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The directory is not valid; nothing was written.
    #[error("{} problem(s); nothing was written", .0.len())]
    Invalid(Vec<Problem>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
}

const PAGE: i64 = 500;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyPush {
    pub id: String,
    pub documents: usize,
    /// The revision every host must reach to enforce the set.
    pub revision: i64,
    /// The directory was the current set already: nothing written.
    pub unchanged: bool,
    /// Old sets deleted.
    pub pruned: Vec<String>,
}

fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// Every document of the policy files of `dir` as `(name, json)`, validated.
pub fn policy_documents(
    dir: &Path,
    opts: &LoadOptions,
) -> Result<Vec<(String, String)>, AdminError> {
    // The loader first: every file and every cross-file rule, and the
    // directory's trust under strict modes.
    api::load_policy_dir_with(dir, opts).map_err(AdminError::Invalid)?;
    let listing = api::load::list_dirs(&[dir.to_path_buf()], api::FileKind::Policy, opts);
    let files = match listing.into_iter().next().map(|l| l.files) {
        Some(Ok(f)) => f,
        Some(Err(p)) => return Err(AdminError::Invalid(vec![p])),
        None => Vec::new(),
    };
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for (f, _) in files {
        // Read again for the conversion; each file is parsed again there, so
        // a file changed since the check above is checked too.
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem {
                    file: f.clone(),
                    line: None,
                    column: None,
                    document: None,
                    object: None,
                    field: None,
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match doc::policy_file_docs(&f, &text) {
            Ok(d) => docs.extend(d),
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(AdminError::Invalid(problems));
    }
    Ok(docs)
}

/// The current policy set: its id, its policies (all valid) and the revision
/// read at. `None` when no set is current.
pub async fn current_policy_set(
    store: &dyn Store,
    keys: &Keys,
) -> Result<Option<(String, PolicySet, i64)>, AdminError> {
    let start = format!("{}/policyset", keys.prefix());
    let range = Range::new(start, super::keys::prefix_end(&keys.policysets()));
    let page = get_all(store, &range, PAGE).await?;
    let entries: Vec<(RawEntry, view::Parsed)> = page
        .kvs
        .iter()
        .map(RawEntry::from_kv)
        .map(|e| {
            // No node's prefix is in this range: the node name does not matter.
            let p = view::parse_entry(keys, "", &e);
            (e, p)
        })
        .collect();
    let built = view::build(entries.iter().map(|(e, p)| (e, p)));
    match (built.policy_set, built.policies) {
        (None, _) => Ok(None),
        (Some(id), Ok(set)) => Ok(Some((id, set, page.header.revision))),
        (Some(_), Err(p)) => Err(AdminError::Invalid(p)),
    }
}

/// `netpolctl policy push DIR`.
pub async fn push_policies(
    store: &dyn Store,
    keys: &Keys,
    dir: &Path,
    opts: &LoadOptions,
) -> Result<PolicyPush, AdminError> {
    let docs = policy_documents(dir, opts)?;
    let cur_key = keys.policyset_current();
    // What is current now, and its documents.
    let page = get_all(store, &Range::prefix(&keys.policysets()), PAGE).await?;
    let cur = get_all(
        store,
        &Range::new(cur_key.clone(), format!("{cur_key}\0")),
        1,
    )
    .await?;
    let (cur_id, cur_mod) = match cur.kvs.first() {
        Some(kv) => (
            Some(String::from_utf8_lossy(&kv.value).trim().to_string()),
            kv.mod_revision,
        ),
        None => (None, 0),
    };
    let mut sets: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for kv in &page.kvs {
        if let Ok(Some(KeyKind::PolicyFile { id, file })) = keys.parse(&kv.key) {
            sets.entry(id).or_default().insert(file, kv.value.clone());
        }
    }
    let want: BTreeMap<String, Vec<u8>> = docs
        .iter()
        .map(|(n, j)| (n.clone(), j.as_bytes().to_vec()))
        .collect();
    if let Some(id) = &cur_id {
        if sets.get(id) == Some(&want) {
            return Ok(PolicyPush {
                id: id.clone(),
                documents: docs.len(),
                revision: cur.header.revision.max(cur_mod),
                unchanged: true,
                pruned: Vec::new(),
            });
        }
    }
    let hash = fnv(want
        .iter()
        .flat_map(|(k, v)| k.bytes().chain(v.iter().copied())));
    let id = format!("{}-{:08x}", unix_ms() / 1000, hash as u32);
    let mut ops: Vec<Op> = want
        .iter()
        .map(|(n, v)| Op::Put {
            key: keys.policy_file(&id, n),
            value: v.clone(),
            lease: 0,
        })
        .collect();
    let flip = Op::Put {
        key: cur_key.clone(),
        value: id.as_bytes().to_vec(),
        lease: 0,
    };
    let guard = match cur_id {
        Some(_) => Compare::mod_revision(&cur_key, cur_mod),
        None => Compare::version(&cur_key, 0),
    };
    let mut txns = batches(std::mem::take(&mut ops)).map_err(AdminError::Refused)?;
    // The flip rides with the last batch when it fits, else alone after it.
    let last = txns.pop().unwrap_or_default();
    let mut flip_txn = last.clone();
    flip_txn.push(flip.clone());
    let fits = batches(flip_txn.clone()).is_ok_and(|b| b.len() == 1);
    if !fits {
        txns.push(last);
        flip_txn = vec![flip];
    }
    for t in txns {
        store
            .txn(Txn {
                success: t,
                ..Txn::default()
            })
            .await?;
    }
    let r = store
        .txn(Txn {
            compares: vec![guard],
            success: flip_txn,
            failure: vec![],
        })
        .await?;
    if !r.succeeded {
        // Someone pushed meanwhile: take back what this push wrote.
        let _ = store
            .txn(Txn {
                success: vec![Op::DeletePrefix {
                    prefix: keys.policyset(&id),
                }],
                ..Txn::default()
            })
            .await;
        return Err(AdminError::Refused(format!(
            "{cur_key} changed while pushing (another push?); nothing changed, push again"
        )));
    }
    let revision = r.header.revision;
    // Keep the new set and the one it replaced (a host that lags a revision
    // still finds it whole); older ones go.
    let pruned: Vec<String> = sets
        .keys()
        .filter(|s| **s != id && Some(*s) != cur_id.as_ref())
        .cloned()
        .collect();
    if !pruned.is_empty() {
        let ops: Vec<Op> = pruned
            .iter()
            .map(|s| Op::DeletePrefix {
                prefix: keys.policyset(s),
            })
            .collect();
        for t in batches(ops).map_err(AdminError::Refused)? {
            store
                .txn(Txn {
                    success: t,
                    ..Txn::default()
                })
                .await?;
        }
    }
    Ok(PolicyPush {
        id,
        documents: docs.len(),
        revision,
        unchanged: false,
        pruned,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegistryPush {
    pub written: usize,
    pub unchanged: usize,
    pub deleted: usize,
    pub revision: i64,
}

fn need_node(file: &Path, doc: usize, object: String, msg: &str) -> Problem {
    Problem {
        file: file.to_path_buf(),
        line: None,
        column: None,
        document: Some(doc + 1),
        object: Some(object),
        field: Some("spec.node".into()),
        message: msg.into(),
    }
}

/// The keys and values `registry push` writes for `dir`.
pub fn registry_documents(
    keys: &Keys,
    dir: &Path,
    static_: bool,
    opts: &LoadOptions,
) -> Result<BTreeMap<String, String>, AdminError> {
    let reg =
        api::load_endpoint_dirs_with(&[dir.to_path_buf()], opts).map_err(AdminError::Invalid)?;
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for n in &reg.namespaces {
        out.insert(keys.namespace(&n.name), doc::namespace_json(n));
    }
    for n in &reg.nodes {
        out.insert(keys.node(&n.name), doc::node_json(n));
    }
    for e in &reg.endpoints {
        let ns = e.namespace.as_deref().unwrap_or("default");
        let o = &e.origin;
        let node = match (&e.node, e.kind, static_) {
            (_, EndpointKind::Host, true) => {
                problems.push(need_node(
                    &o.file,
                    o.doc,
                    format!("HostEndpoint {}", e.name),
                    "a HostEndpoint is published by its own host; push it without --static",
                ));
                continue;
            }
            (Some(n), _, _) => n.clone(),
            (None, EndpointKind::Workload, true) => {
                problems.push(need_node(&o.file, o.doc, format!("Endpoint {ns}/{}", e.name),
                    "a static endpoint names the host it lives on; without it every host would take it for its own"));
                continue;
            }
            (None, kind, false) => {
                let obj = match kind {
                    EndpointKind::Host => format!("HostEndpoint {}", e.name),
                    EndpointKind::Workload => format!("Endpoint {ns}/{}", e.name),
                };
                problems.push(need_node(
                    &o.file,
                    o.doc,
                    obj,
                    "names no node: say which node's prefix it goes under (or push it with --static)",
                ));
                continue;
            }
        };
        let key = match (e.kind, static_) {
            (EndpointKind::Workload, true) => keys.static_endpoint(ns, &e.name),
            (EndpointKind::Workload, false) => keys.endpoint(&node, ns, &e.name),
            (EndpointKind::Host, _) => keys.host_endpoint(&node, &e.name),
        };
        out.insert(key, doc::endpoint_json(e, None));
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(AdminError::Invalid(problems));
    }
    Ok(out)
}

/// `netpolctl registry push DIR [--static] [--prune]`: write what differs;
/// `prune` (with `static_`) deletes static endpoints and namespaces DIR lacks.
pub async fn push_registry(
    store: &dyn Store,
    keys: &Keys,
    dir: &Path,
    static_: bool,
    prune: bool,
    opts: &LoadOptions,
) -> Result<RegistryPush, AdminError> {
    if prune && !static_ {
        return Err(AdminError::Refused(
            "--prune works with --static only (a node's own prefix is its netpold's)".into(),
        ));
    }
    let want = registry_documents(keys, dir, static_, opts)?;
    let page = get_all(store, &Range::prefix(&keys.registry()), PAGE).await?;
    let have: BTreeMap<&str, &[u8]> = page
        .kvs
        .iter()
        .map(|k| (k.key.as_str(), k.value.as_slice()))
        .collect();
    let mut ops = Vec::new();
    let mut report = RegistryPush::default();
    for (k, v) in &want {
        if have.get(k.as_str()) == Some(&v.as_bytes()) {
            report.unchanged += 1;
        } else {
            report.written += 1;
            ops.push(Op::Put {
                key: k.clone(),
                value: v.as_bytes().to_vec(),
                lease: 0,
            });
        }
    }
    if prune {
        for k in have.keys() {
            let pruned = matches!(
                keys.parse(k),
                Ok(Some(
                    KeyKind::StaticEndpoint { .. } | KeyKind::Namespace { .. }
                ))
            );
            if pruned && !want.contains_key(*k) {
                report.deleted += 1;
                ops.push(Op::Delete { key: k.to_string() });
            }
        }
    }
    report.revision = page.header.revision;
    for t in batches(ops).map_err(AdminError::Refused)? {
        let r = store
            .txn(Txn {
                success: t,
                ..Txn::default()
            })
            .await?;
        report.revision = r.header.revision;
    }
    Ok(report)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeRemoval {
    pub node: String,
    pub keys: usize,
    pub leases_revoked: Vec<String>,
    pub revision: i64,
}

/// `netpolctl node remove NODE`: revoke its lease and delete its prefix and
/// status. A netpold still running there publishes again; stop it first.
pub async fn remove_node(
    store: &dyn Store,
    keys: &Keys,
    node: &str,
) -> Result<NodeRemoval, AdminError> {
    if !super::keys::valid_segment(node) {
        return Err(AdminError::Refused(format!("{node:?} is not a node name")));
    }
    let prefix = keys.node_prefix(node);
    let status = keys.status(node);
    let mine = get_all(store, &Range::prefix(&prefix), PAGE).await?;
    let st = get_all(store, &Range::new(status.clone(), format!("{status}\0")), 1).await?;
    let leases: BTreeSet<i64> = mine
        .kvs
        .iter()
        .chain(&st.kvs)
        .map(|k| k.lease)
        .filter(|l| *l != 0)
        .collect();
    let mut out = NodeRemoval {
        node: node.to_string(),
        keys: mine.kvs.len() + st.kvs.len(),
        ..NodeRemoval::default()
    };
    for l in leases {
        match store.lease_revoke(l).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => out.leases_revoked.push(format!("{l:x}")),
            Err(e) => return Err(e.into()),
        }
    }
    let r = store
        .txn(Txn {
            success: vec![Op::DeletePrefix { prefix }, Op::Delete { key: status }],
            ..Txn::default()
        })
        .await?;
    out.revision = r.header.revision;
    Ok(out)
}

/// One node in `fleet status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub node: String,
    /// `None`: the node has entries but no status yet (or its status expired).
    pub ready: Option<bool>,
    pub degraded: Option<bool>,
    pub applied_revision: Option<i64>,
    pub generation: Option<u64>,
    /// Seconds since the node last kept its lease alive (from the lease's TTL).
    pub last_contact_s: Option<i64>,
    /// Keys under the node's prefix.
    pub entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetStatus {
    /// etcd's revision when read.
    pub revision: i64,
    pub nodes: Vec<NodeRow>,
}

/// `netpolctl fleet status`.
pub async fn fleet_status(store: &dyn Store, keys: &Keys) -> Result<FleetStatus, AdminError> {
    let st = get_all(store, &Range::prefix(&keys.status_prefix()), PAGE).await?;
    let reg = get_all(
        store,
        &Range::prefix(&format!("{}/registry/nodes/", keys.prefix())),
        PAGE,
    )
    .await?;
    let mut rows: BTreeMap<String, NodeRow> = BTreeMap::new();
    let row = |n: &str| NodeRow {
        node: n.to_string(),
        ready: None,
        degraded: None,
        applied_revision: None,
        generation: None,
        last_contact_s: None,
        entries: 0,
    };
    for kv in &reg.kvs {
        if let Ok(Some(k)) = keys.parse(&kv.key) {
            if let Some(n) = k.node() {
                rows.entry(n.to_string()).or_insert_with(|| row(n)).entries += 1;
            }
        }
    }
    for kv in &st.kvs {
        let Ok(Some(KeyKind::Status { node })) = keys.parse(&kv.key) else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<NodeStatus>(&kv.value) else {
            continue;
        };
        let r = rows.entry(node.clone()).or_insert_with(|| row(&node));
        r.ready = Some(s.ready);
        r.degraded = Some(s.degraded);
        r.applied_revision = Some(s.applied_revision);
        r.generation = Some(s.generation);
        r.last_contact_s = Some(((unix_ms().saturating_sub(s.written_ms)) / 1000) as i64);
        if kv.lease != 0 {
            if let Ok(Some((left, granted))) = store.lease_time_to_live(kv.lease).await {
                // Kept alive `granted - left` seconds ago at the latest.
                r.last_contact_s = Some((granted - left).max(0));
            }
        }
    }
    Ok(FleetStatus {
        revision: st.header.revision.max(reg.header.revision),
        nodes: rows.into_values().collect(),
    })
}

/// The newest revision at or below `r` at which the watched range changed,
/// given that nothing before `from` matters (every node is at `from` or past
/// it): read from a watch of the range from `from + 1`, ended by an event past
/// `r` or a progress answer (etcd sends one only once the history is out).
/// `from` itself when nothing changed in between; `None` when that history is
/// compacted or etcd says nothing in time (the caller then asks for `r`).
async fn last_change_at_or_below(
    store: &dyn Store,
    keys: &Keys,
    from: i64,
    r: i64,
    within: Duration,
) -> Option<i64> {
    use super::store::WatchMsg;
    if from >= r {
        return Some(r);
    }
    let (start, end) = keys.watched();
    let deadline = tokio::time::Instant::now() + within;
    let work = async {
        let mut w = store.watch(&Range::new(start, end), from + 1).await.ok()?;
        let mut last = from;
        loop {
            let ask = tokio::time::sleep(Duration::from_millis(100));
            tokio::select! {
                m = w.next() => match m.ok()? {
                    WatchMsg::Created { .. } => { w.request_progress().await.ok()?; }
                    WatchMsg::Events { events, .. } => {
                        for e in events {
                            if e.kv.mod_revision > r {
                                return Some(last);
                            }
                            last = last.max(e.kv.mod_revision);
                        }
                    }
                    // A progress answer comes once every older event is out.
                    WatchMsg::Progress { header } => {
                        return (header.revision >= r).then_some(last);
                    }
                    WatchMsg::Compacted { .. } | WatchMsg::Canceled { .. } => return None,
                },
                _ = ask => { w.request_progress().await.ok()?; }
            }
        }
    };
    tokio::time::timeout_at(deadline, work).await.ok().flatten()
}

/// `netpolctl fleet wait --revision R`: until every node enforces the watched
/// range (registry and policies) as of R. R may be any revision, etcd's head
/// included: the nodes' status writes move the head but not the range, so a
/// node at the range's last change at or below R has applied R.
/// `Err` with the nodes still behind when `timeout` passes.
pub async fn fleet_wait(
    store: &dyn Store,
    keys: &Keys,
    revision: i64,
    timeout: Duration,
) -> Result<FleetStatus, (FleetStatus, Vec<String>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = FleetStatus {
        revision: 0,
        nodes: Vec::new(),
    };
    // (from, the range's last change at or below R as seen from there)
    let mut target: Option<(i64, i64)> = None;
    loop {
        match fleet_status(store, keys).await {
            Ok(s) => {
                let lowest = s.nodes.iter().filter_map(|n| n.applied_revision).min();
                let behind_r = s
                    .nodes
                    .iter()
                    .any(|n| n.applied_revision.is_none_or(|a| a < revision));
                if let (true, Some(from)) = (behind_r, lowest) {
                    if target.is_none_or(|(f, _)| from < f) {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        target = last_change_at_or_below(store, keys, from, revision, left)
                            .await
                            .map(|t| (from, t));
                    }
                }
                let need = target.map_or(revision, |(_, t)| t.min(revision));
                // No node at all is not "every node": a wrong prefix or
                // endpoint must not pass the barrier.
                let none = s
                    .nodes
                    .is_empty()
                    .then(|| format!("no node has entries or a status under {}/", keys.prefix()));
                let behind: Vec<String> = none
                    .into_iter()
                    .chain(
                        s.nodes
                            .iter()
                            .filter(|n| n.applied_revision.is_none_or(|r| r < need))
                            .map(|n| match n.applied_revision {
                                Some(r) => format!("{} at revision {r}", n.node),
                                None => format!("{} has no status", n.node),
                            }),
                    )
                    .collect();
                if behind.is_empty() {
                    return Ok(s);
                }
                last = s;
                if tokio::time::Instant::now() >= deadline {
                    return Err((last, behind));
                }
            }
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err((last, vec![format!("etcd: {e}")]));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::mem::MemStore;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn opts() -> LoadOptions {
        LoadOptions {
            strict_modes: false,
        }
    }

    const CNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: NAME}\nspec: {endpointSelector: {}, ingress: [{}]}\n";

    #[tokio::test]
    async fn policy_push_flips_the_current_set_and_prunes_old_ones() {
        let m = MemStore::new();
        let k = Keys::new("/netpol/v1");
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.yaml", &CNP.replace("NAME", "a"));
        let p1 = push_policies(&m, &k, d.path(), &opts()).await.unwrap();
        assert_eq!(p1.documents, 1);
        let (id, set, _) = current_policy_set(&m, &k).await.unwrap().unwrap();
        assert_eq!(id, p1.id);
        assert_eq!(set.policies[0].origin.name, "a");
        assert_eq!(
            &*set.policies[0].origin.file,
            Path::new(&format!(
                "etcd:/netpol/v1/policysets/{id}/a.yaml@{}",
                p1.revision
            ))
        );
        // The same directory again: nothing written.
        let rev = m.revision();
        let again = push_policies(&m, &k, d.path(), &opts()).await.unwrap();
        assert!(again.unchanged);
        assert_eq!(m.revision(), rev);
        // 200 documents: more than one transaction, one flip at the end.
        let mut text = String::new();
        for i in 0..200 {
            text.push_str(&format!("---\n{}", CNP.replace("NAME", &format!("p{i}"))));
        }
        write(d.path(), "many.yaml", &text);
        let p2 = push_policies(&m, &k, d.path(), &opts()).await.unwrap();
        assert_eq!(p2.documents, 201);
        let (id2, set, _) = current_policy_set(&m, &k).await.unwrap().unwrap();
        assert_eq!(id2, p2.id);
        assert_eq!(set.policies.len(), 201);
        // A third set: the first one is pruned, the one it replaced kept.
        write(d.path(), "b.yaml", &CNP.replace("NAME", "b"));
        let p3 = push_policies(&m, &k, d.path(), &opts()).await.unwrap();
        assert_eq!(p3.pruned, vec![p1.id.clone()]);
        let ids: BTreeSet<String> = m
            .keys_with_prefix(&k.policysets())
            .iter()
            .filter_map(|kv| match k.parse(&kv.key) {
                Ok(Some(KeyKind::PolicyFile { id, .. })) => Some(id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [p2.id.clone(), p3.id.clone()].into());
        // An invalid directory writes nothing.
        write(d.path(), "bad.yaml", "kind: Nope\n");
        let rev = m.revision();
        match push_policies(&m, &k, d.path(), &opts()).await {
            Err(AdminError::Invalid(p)) => assert!(p[0].file.ends_with("bad.yaml")),
            r => panic!("{r:?}"),
        }
        assert_eq!(m.revision(), rev);
    }

    #[tokio::test]
    async fn registry_push_places_each_document_under_its_key() {
        let m = MemStore::new();
        let k = Keys::new("/netpol/v1");
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "r.yaml",
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: vm1, namespace: prod}\nspec: {node: hv-1, addresses: [10.0.0.5]}\n---\napiVersion: netpol/v1\nkind: Namespace\nmetadata: {name: prod}\n",
        );
        let r = push_registry(&m, &k, d.path(), true, false, &opts())
            .await
            .unwrap();
        assert_eq!((r.written, r.unchanged), (2, 0));
        assert!(m.value(&k.static_endpoint("prod", "vm1")).is_some());
        assert!(m.value(&k.namespace("prod")).is_some());
        let r = push_registry(&m, &k, d.path(), false, false, &opts())
            .await
            .unwrap();
        assert_eq!((r.written, r.unchanged), (1, 1));
        assert!(m.value(&k.endpoint("hv-1", "prod", "vm1")).is_some());
        // Prune: the namespace leaves the directory.
        write(
            d.path(),
            "r.yaml",
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: vm1, namespace: prod}\nspec: {node: hv-1, addresses: [10.0.0.5]}\n",
        );
        let r = push_registry(&m, &k, d.path(), true, true, &opts())
            .await
            .unwrap();
        assert_eq!((r.written, r.unchanged, r.deleted), (0, 1, 1));
        assert!(m.value(&k.namespace("prod")).is_none());
        // No node: refused, with the file named.
        write(
            d.path(),
            "r.yaml",
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: x}\nspec: {addresses: [10.0.0.6]}\n",
        );
        let f = d.path().join("r.yaml");
        match push_registry(&m, &k, d.path(), true, false, &opts()).await {
            Err(AdminError::Invalid(p)) => assert_eq!(
                p[0].to_string(),
                format!("{}: document 1 (Endpoint default/x): spec.node: a static endpoint names the host it lives on; without it every host would take it for its own", f.display())
            ),
            r => panic!("{r:?}"),
        }
    }

    #[tokio::test]
    async fn node_remove_revokes_the_lease_and_clears_the_prefix() {
        let m = MemStore::new();
        let k = Keys::new("/netpol/v1");
        let (lease, _) = m.lease_grant(60).await.unwrap();
        m.put_lease(&k.node("host-b"), "{}", lease);
        m.put_lease(&k.endpoint("host-b", "default", "w"), "{}", lease);
        m.put(&k.endpoint("host-b", "default", "pushed"), "{}");
        m.put_lease(&k.status("host-b"), "{}", lease);
        m.put(&k.node("host-c"), "{}");
        let r = remove_node(&m, &k, "host-b").await.unwrap();
        assert_eq!(r.keys, 4);
        assert_eq!(r.leases_revoked, vec![format!("{lease:x}")]);
        assert!(m.keys_with_prefix(&k.node_prefix("host-b")).is_empty());
        assert!(m.value(&k.status("host-b")).is_none());
        assert!(m.value(&k.node("host-c")).is_some());
        assert_eq!(m.lease_time_to_live(lease).await.unwrap(), None);
    }

    #[tokio::test]
    async fn fleet_status_and_wait() {
        let m = MemStore::new();
        let k = Keys::new("/netpol/v1");
        let status = |n: &str, rev: i64| {
            serde_json::to_string(&NodeStatus {
                node: n.into(),
                ready: true,
                degraded: false,
                applied_revision: rev,
                generation: 3,
                written_ms: unix_ms(),
            })
            .unwrap()
        };
        let (lease, _) = m.lease_grant(60).await.unwrap();
        m.put_lease(&k.node("host-a"), "{}", lease);
        m.put_lease(&k.status("host-a"), &status("host-a", 10), lease);
        m.put(&k.node("host-b"), "{}");
        let s = fleet_status(&m, &k).await.unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[0].applied_revision, Some(10));
        // The lease was granted (kept alive) just now; TTLs are whole seconds.
        assert!(s.nodes[0].last_contact_s.unwrap() <= 1, "{:?}", s.nodes[0]);
        assert_eq!(s.nodes[1].ready, None);
        let e = fleet_wait(&m, &k, 10, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(e.1, vec!["host-b has no status".to_string()]);
        m.put(&k.status("host-b"), &status("host-b", 12));
        fleet_wait(&m, &k, 10, Duration::from_secs(5))
            .await
            .unwrap();
        let e = fleet_wait(&m, &k, 11, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e.1, vec!["host-a at revision 10".to_string()]);
    }

    /// `fleet wait` for etcd's head: the nodes' status writes move it but not
    /// the watched range, so nodes at the range's last change have applied
    /// it; a put or a delete in the range past them, or a compacted history
    /// (nothing to tell), still holds them back.
    #[tokio::test]
    async fn fleet_wait_for_the_head_counts_changes_of_the_watched_range_only() {
        let m = MemStore::new();
        let k = Keys::new("/netpol/v1");
        let at = |rev: i64| {
            for n in ["host-a", "host-b"] {
                let s = NodeStatus {
                    node: n.into(),
                    ready: true,
                    degraded: false,
                    applied_revision: rev,
                    generation: 1,
                    written_ms: unix_ms(),
                };
                m.put(&k.status(n), &serde_json::to_string(&s).unwrap());
            }
        };
        let web = m.put(&k.static_endpoint("default", "web"), "{}");
        for _ in 0..3 {
            at(web);
        }
        let wait = |ms: u64| fleet_wait(&m, &k, m.revision(), Duration::from_millis(ms));
        assert!(m.revision() > web + 5);
        wait(5000)
            .await
            .expect("the head moved by status writes only");
        let db = m.put(&k.static_endpoint("default", "db"), "{}");
        at(web);
        let e = wait(300).await.unwrap_err();
        assert_eq!(
            e.1,
            vec![
                format!("host-a at revision {web}"),
                format!("host-b at revision {web}")
            ]
        );
        at(db);
        wait(5000).await.expect("the nodes applied the put");
        let gone = m.delete(&k.static_endpoint("default", "db"));
        at(db);
        assert_eq!(
            wait(300).await.unwrap_err().1.len(),
            2,
            "a deletion is a change"
        );
        at(gone);
        wait(5000).await.expect("the nodes applied the deletion");
        m.compact(m.revision());
        at(gone);
        assert_eq!(
            wait(300).await.unwrap_err().1.len(),
            2,
            "a compacted history tells nothing: the head itself is needed"
        );
    }
}
