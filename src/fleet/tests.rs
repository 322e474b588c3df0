//! The sync engine and the publisher against the in-memory store: every fault
//! of DESIGN §5a and reference/fleet-etcd.md §6 that needs no real etcd. Time
//! is tokio's paused clock, so leases, backoff and ticks run in simulated time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::keys::Keys;
use super::mem::MemStore;
use super::store::Store;
use super::sync::{self, OwnEvent, RemoteView, SyncHandle, SyncSettings, SyncState};

const P: &str = "/netpol/v1";

fn keys() -> Keys {
    Keys::new(P)
}

fn settings() -> SyncSettings {
    let mut s = SyncSettings::new(P, "host-a");
    s.batch = Duration::from_millis(50);
    s.progress_interval = Duration::from_millis(500);
    s.request_timeout = Duration::from_millis(500);
    s.relist_min_interval = Duration::from_secs(2);
    s.mass_removal_hold = Duration::from_secs(120);
    s.backoff_min = Duration::from_millis(100);
    s.backoff_max = Duration::from_secs(2);
    s
}

fn ep(node: &str, name: &str, addr: &str) -> String {
    format!(
        r#"{{"apiVersion":"netpol/v1","kind":"Endpoint","metadata":{{"name":"{name}","labels":{{"app":"{name}"}}}},"spec":{{"node":"{node}","interface":"veth-{name}","addresses":["{addr}"]}}}}"#
    )
}

fn put_ep(m: &MemStore, node: &str, name: &str, addr: &str) -> i64 {
    m.put(
        &keys().endpoint(node, "default", name),
        &ep(node, name, addr),
    )
}

fn start(m: &MemStore, s: SyncSettings) -> (SyncHandle, mpsc::UnboundedReceiver<OwnEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let store: Arc<dyn Store> = Arc::new(m.clone());
    (
        sync::spawn(s, store, crate::logging::discard(), None, Some(tx)),
        rx,
    )
}

/// Wait (in simulated time) until `f` holds for the channel's value.
async fn until<T: Clone>(rx: &mut watch::Receiver<T>, what: &str, f: impl Fn(&T) -> bool) -> T {
    let r = tokio::time::timeout(Duration::from_secs(3600), async {
        loop {
            {
                let v = rx.borrow_and_update();
                if f(&v) {
                    return v.clone();
                }
            }
            rx.changed().await.expect("sync task alive");
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn names(v: &RemoteView) -> Vec<String> {
    let mut n: Vec<String> = v
        .registry
        .endpoints
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    n.sort();
    n
}

async fn synced(h: &mut SyncHandle) -> SyncState {
    until(&mut h.state, "in sync", |s| s.in_sync && s.connected).await
}

#[tokio::test(start_paused = true)]
async fn lists_then_watches_and_leaves_its_own_prefix_out() {
    let m = MemStore::new();
    put_ep(&m, "host-b", "web", "10.0.0.2");
    put_ep(&m, "host-a", "mine", "10.0.0.1");
    m.put(&format!("{P}/status/host-b"), "{}");
    let (mut h, mut own) = start(&m, settings());
    synced(&mut h).await;
    let v = until(&mut h.view, "web", |v| names(v) == ["web"]).await;
    assert!(!v.from_cache);
    match own.recv().await.unwrap() {
        OwnEvent::Listed(_, kvs) => {
            assert_eq!(kvs.len(), 1);
            assert!(kvs[0].key.ends_with("/nodes/host-a/endpoints/default/mine"));
        }
        e => panic!("{e:?}"),
    }
    let r = put_ep(&m, "host-b", "db", "10.0.0.3");
    let v = until(&mut h.view, "db", |v| names(v) == ["db", "web"]).await;
    assert_eq!(v.revision, r);
    // An own key's events go to the publisher, not into the view.
    m.delete(&keys().endpoint("host-a", "default", "mine"));
    assert!(matches!(own.recv().await.unwrap(), OwnEvent::Delete(k, _) if k.ends_with("/mine")));
    // A status write is outside the watched range: no event at all.
    m.put(&format!("{P}/status/host-c"), "{}");
    assert_eq!(m.open_watches(), 1);
    assert_eq!(h.state.borrow().relists, 1);
    h.stop().await;
    assert_eq!(m.open_watches(), 0);
}

#[tokio::test(start_paused = true)]
async fn compaction_past_the_revision_forces_a_relist_and_converges() {
    let m = MemStore::new();
    for i in 0..5 {
        put_ep(
            &m,
            "host-b",
            &format!("e{i}"),
            &format!("10.0.0.{}", i + 10),
        );
    }
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    until(&mut h.view, "5", |v| v.registry.endpoints.len() == 5).await;
    m.set_down(true);
    until(&mut h.state, "disconnected", |s| !s.connected).await;
    m.delete(&keys().endpoint("host-b", "default", "e0"));
    put_ep(&m, "host-b", "late", "10.0.0.99");
    m.compact(m.revision());
    m.set_down(false);
    let st = until(&mut h.state, "second list", |s| s.relists == 2 && s.in_sync).await;
    assert_eq!(st.revision, m.revision());
    let v = until(&mut h.view, "converged", |v| {
        v.registry.endpoints.len() == 5
    })
    .await;
    assert!(names(&v).contains(&"late".to_string()));
    assert!(!names(&v).contains(&"e0".to_string()));
    until(&mut h.state, "watching", |s| s.connected).await;
    assert_eq!(m.open_watches(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_plain_reconnect_resumes_without_relist_and_outage_removes_nothing() {
    let m = MemStore::new();
    for i in 0..3 {
        put_ep(
            &m,
            "host-b",
            &format!("e{i}"),
            &format!("10.0.0.{}", i + 10),
        );
    }
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    let before = until(&mut h.view, "3", |v| v.registry.endpoints.len() == 3).await;
    m.set_down(true);
    until(&mut h.state, "disconnected", |s| !s.connected).await;
    // Minutes away: many backoff rounds, every call failing.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(
        *h.view.borrow_and_update().as_ref(),
        *before,
        "an outage changed the view"
    );
    assert!(h.state.borrow().reconnects > 5);
    let created = m.watches_created();
    m.set_down(false);
    put_ep(&m, "host-b", "after", "10.0.0.50");
    until(&mut h.view, "after", |v| v.registry.endpoints.len() == 4).await;
    let st = h.state.borrow().clone();
    assert_eq!(st.relists, 1, "a plain reconnect relisted");
    assert!(st.connected && st.in_sync);
    assert_eq!(m.open_watches(), 1);
    // Backoff kept the retries sparse: 300 s with a 2 s cap is at most ~300/0.2.
    assert!(m.watches_created() - created <= 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_frozen_etcd_is_noticed_within_seconds_and_one_watcher_remains() {
    let m = MemStore::new();
    put_ep(&m, "host-b", "web", "10.0.0.2");
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    let t0 = tokio::time::Instant::now();
    m.freeze();
    let st = until(&mut h.state, "disconnected", |s| !s.connected).await;
    let noticed = t0.elapsed();
    // Progress interval (0.5 s) + request timeout (0.5 s), with slack.
    assert!(
        noticed <= Duration::from_millis(1500),
        "noticed after {noticed:?}"
    );
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("did not answer a progress request"),
        "{st:?}"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        m.open_watches() <= 1,
        "{} watches open while frozen",
        m.open_watches()
    );
    m.thaw();
    put_ep(&m, "host-b", "db", "10.0.0.3");
    until(&mut h.view, "db", |v| v.registry.endpoints.len() == 2).await;
    until(&mut h.state, "connected", |s| s.connected).await;
    // Give stale attempts time to finish: still exactly one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(m.open_watches(), 1);
    assert_eq!(h.state.borrow().relists, 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_removes_a_dead_nodes_endpoints() {
    let m = MemStore::new();
    for i in 0..20 {
        put_ep(&m, "host-c", &format!("c{i}"), &format!("10.0.3.{i}"));
    }
    let (lease, _) = m.lease_grant(5).await.unwrap();
    for i in 0..2 {
        let k = keys().endpoint("host-b", "default", &format!("b{i}"));
        m.put_lease(
            &k,
            &ep("host-b", &format!("b{i}"), &format!("10.0.2.{i}")),
            lease,
        );
    }
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    until(&mut h.view, "22", |v| v.registry.endpoints.len() == 22).await;
    // Nobody keeps the lease alive: after its TTL the keys go.
    let t0 = tokio::time::Instant::now();
    until(&mut h.view, "b gone", |v| v.registry.endpoints.len() == 20).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took <= Duration::from_secs(7),
        "{took:?}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_mass_removal_is_held_then_applied() {
    let m = MemStore::new();
    for i in 0..40 {
        put_ep(&m, "host-b", &format!("e{i}"), &format!("10.0.1.{i}"));
    }
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    until(&mut h.view, "40", |v| v.registry.endpoints.len() == 40).await;
    // Three of forty: applied at once.
    for i in 0..3 {
        m.delete(&keys().endpoint("host-b", "default", &format!("e{i}")));
    }
    until(&mut h.view, "37", |v| v.registry.endpoints.len() == 37).await;
    // Ten more within the minute: 13 of 40 is more than a fifth. Held.
    for i in 3..13 {
        m.delete(&keys().endpoint("host-b", "default", &format!("e{i}")));
    }
    let v = until(&mut h.view, "held", |v| v.held_removals == 10).await;
    assert_eq!(v.registry.endpoints.len(), 37);
    let st = h.state.borrow().clone();
    assert_eq!(st.held_removals, 10);
    assert!(st.hold_until_ms.is_some());
    // One of them comes back during the hold: it stays, unheld.
    put_ep(&m, "host-b", "e5", "10.0.1.5");
    let v = until(&mut h.view, "e5 back", |v| v.held_removals == 9).await;
    assert_eq!(v.registry.endpoints.len(), 37);
    let t0 = tokio::time::Instant::now();
    let v = until(&mut h.view, "applied", |v| v.held_removals == 0).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(100),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(v.registry.endpoints.len(), 28);
    assert_eq!(h.state.borrow().hold_until_ms, None);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_empty_relist_after_a_large_view_is_held() {
    let m = MemStore::new();
    for i in 0..30 {
        put_ep(&m, "host-b", &format!("e{i}"), &format!("10.0.1.{i}"));
    }
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    until(&mut h.view, "30", |v| v.registry.endpoints.len() == 30).await;
    // etcd replaced by an empty one (restored, or a calico#3187 accident).
    m.set_down(true);
    until(&mut h.state, "down", |s| !s.connected).await;
    for i in 0..30 {
        m.delete(&keys().endpoint("host-b", "default", &format!("e{i}")));
    }
    m.set_cluster_id(0xbeef);
    m.set_down(false);
    let v = until(&mut h.view, "held", |v| v.held_removals == 30).await;
    assert_eq!(v.registry.endpoints.len(), 30);
    assert_eq!(h.state.borrow().cluster_id, 0xbeef);
    assert_eq!(h.state.borrow().relists, 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_revision_that_goes_backwards_relists() {
    let m = MemStore::new();
    let r = put_ep(&m, "host-b", "a", "10.0.0.2");
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    put_ep(&m, "host-b", "b", "10.0.0.3");
    put_ep(&m, "host-b", "c", "10.0.0.4");
    until(&mut h.view, "3", |v| v.registry.endpoints.len() == 3).await;
    // Restored from a snapshot taken at revision r.
    m.rewind(r);
    let st = until(&mut h.state, "relisted", |s| s.relists == 2 && s.in_sync).await;
    assert_eq!(st.revision, r);
    let v = until(&mut h.view, "back to 1", |v| {
        v.registry.endpoints.len() == 1
    })
    .await;
    assert_eq!(names(&v), ["a"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_entries_are_rejected_one_by_one() {
    let m = MemStore::new();
    put_ep(&m, "host-b", "ok", "10.0.0.2");
    m.put(&keys().endpoint("host-b", "default", "bad"), "{not json");
    m.put(
        &keys().endpoint("host-b", "default", "other"),
        &ep("host-c", "other", "10.0.0.4"),
    );
    // Two claims of one address: the first one (lower create_revision) wins.
    put_ep(&m, "host-c", "second", "10.0.0.2");
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    let v = until(&mut h.view, "ok", |v| names(v) == ["ok"]).await;
    let msgs: Vec<String> = v.rejected.iter().map(|p| p.to_string()).collect();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(
        msgs[0].starts_with(
            "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/bad@3:1:2: JSON syntax error"
        ),
        "{msgs:?}"
    );
    assert_eq!(msgs[1], "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/other@4: document 1 (Endpoint default/other): spec.node: \"host-c\" does not match the node of the key (\"host-b\")");
    assert_eq!(msgs[2], "etcd:/netpol/v1/registry/nodes/host-c/endpoints/default/second@5: document 1 (Endpoint default/second): address 10.0.0.2 is already claimed by Endpoint default/ok (/netpol/v1/registry/nodes/host-b/endpoints/default/ok, created at revision 2); the first claim wins");
    assert_eq!(h.state.borrow().rejected, 3);
    // Fixing the entry makes it apply.
    m.put(
        &keys().endpoint("host-b", "default", "bad"),
        &ep("host-b", "bad", "10.0.0.9"),
    );
    until(&mut h.view, "fixed", |v| names(v) == ["bad", "ok"]).await;
    h.stop().await;
}

/// A change after a quiet tick is delivered at once (no `batch` wait on the
/// path of an isolated change); one right behind it waits for the next tick.
#[tokio::test(start_paused = true)]
async fn a_change_after_a_quiet_tick_is_delivered_at_once() {
    let m = MemStore::new();
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = tokio::time::Instant::now();
    put_ep(&m, "host-b", "web", "10.0.0.2");
    until(&mut h.view, "web", |v| names(v) == ["web"]).await;
    let first = t0.elapsed();
    assert!(
        first < Duration::from_millis(5),
        "delivered after {first:?}"
    );
    put_ep(&m, "host-b", "db", "10.0.0.3");
    until(&mut h.view, "db", |v| names(v) == ["db", "web"]).await;
    let second = t0.elapsed();
    assert!(
        second >= Duration::from_millis(50) && second < Duration::from_millis(60),
        "the second change was delivered after {second:?}"
    );
    h.stop().await;
}

/// Steady churn: deliveries follow the tick (at most one per batch), and keep
/// coming during the churn rather than waiting for a quiet moment.
#[tokio::test(start_paused = true)]
async fn remote_changes_are_delivered_on_a_fixed_tick() {
    let m = MemStore::new();
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    let mut rx = h.view.clone();
    rx.borrow_and_update();
    let counter = tokio::spawn(async move {
        let mut times = Vec::new();
        while rx.changed().await.is_ok() {
            times.push(tokio::time::Instant::now());
        }
        times
    });
    let t0 = tokio::time::Instant::now();
    // 100 writes/s for 2 s.
    for i in 0..200 {
        put_ep(
            &m,
            "host-b",
            &format!("e{i}"),
            &format!("10.1.{}.{}", i / 200, i % 200),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let end = tokio::time::Instant::now();
    assert_eq!(h.view.borrow().registry.endpoints.len(), 200);
    h.stop().await;
    let times = counter.await.unwrap();
    let during: Vec<_> = times
        .iter()
        .filter(|t| **t < t0 + Duration::from_secs(2))
        .collect();
    // 2 s of churn at a 50 ms tick: ~40 deliveries, none closer than a tick.
    assert!(
        during.len() >= 30,
        "only {} deliveries during the churn",
        during.len()
    );
    assert!(times.len() <= 2000 / 50 + 2, "{} deliveries", times.len());
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(50),
            "two deliveries {:?} apart",
            w[1] - w[0]
        );
    }
    assert!(times.last().unwrap() < &end);
}

#[tokio::test(start_paused = true)]
async fn a_start_while_etcd_is_down_delivers_the_cached_view() {
    let dir = tempfile::tempdir().unwrap();
    let m = MemStore::new();
    put_ep(&m, "host-b", "web", "10.0.0.2");
    put_ep(&m, "host-b", "db", "10.0.0.3");
    let mut s = settings();
    s.cache_dir = Some(dir.path().join("etcd"));
    let (mut h, _own) = start(&m, s.clone());
    synced(&mut h).await;
    put_ep(&m, "host-b", "api", "10.0.0.4");
    let live = until(&mut h.view, "3", |v| v.registry.endpoints.len() == 3).await;
    h.stop().await;
    m.set_down(true);
    let cached = super::cache::load(&dir.path().join("etcd"), P)
        .unwrap()
        .unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let store: Arc<dyn Store> = Arc::new(m.clone());
    let mut h = sync::spawn(s, store, crate::logging::discard(), Some(cached), Some(tx));
    let v = h.view.borrow_and_update().clone();
    assert!(v.from_cache);
    assert_eq!(v.registry, live.registry);
    let st = h.state.borrow().clone();
    assert!(st.from_cache && !st.in_sync && !st.connected);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        h.view.borrow().registry,
        live.registry,
        "an error emptied the view"
    );
    m.set_down(false);
    let v = until(&mut h.view, "live", |v| !v.from_cache).await;
    assert_eq!(v.registry.endpoints.len(), 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_current_policy_set_follows_the_flip_and_keeps_the_last_valid_one() {
    let m = MemStore::new();
    let k = keys();
    let cnp = |n: &str| {
        format!(
            r#"{{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{{"name":"{n}"}},"spec":{{"endpointSelector":{{}},"ingress":[{{}}]}}}}"#
        )
    };
    m.put(&k.policy_file("s1", "a.yaml"), &cnp("a"));
    m.put(&k.policyset_current(), "s1");
    let (mut h, _own) = start(&m, settings());
    synced(&mut h).await;
    let v = until(&mut h.view, "s1", |v| v.policies.is_some()).await;
    assert_eq!(v.policy_set.as_deref(), Some("s1"));
    m.put(&k.policy_file("s2", "b.yaml"), "{\"kind\": 3}");
    m.put(&k.policyset_current(), "s2");
    let v = until(&mut h.view, "s2 refused", |v| {
        v.policy_set.as_deref() == Some("s2")
    })
    .await;
    assert_eq!(v.policies.as_ref().unwrap().policies[0].origin.name, "a");
    assert!(!v.policy_problems.is_empty());
    m.put(&k.policy_file("s3", "c.yaml"), &cnp("c"));
    m.put(&k.policyset_current(), "s3");
    let v = until(&mut h.view, "s3", |v| v.policy_set.as_deref() == Some("s3")).await;
    assert_eq!(v.policies.as_ref().unwrap().policies[0].origin.name, "c");
    assert!(v.policy_problems.is_empty());
    h.stop().await;
}

// ---------------------------------------------------------------- publisher and engine

use super::{Engine, FleetSettings, PublishSettings, PublishState};
use crate::api::model::RegistrySet;

fn fleet(node: &str, state_dir: Option<&std::path::Path>) -> FleetSettings {
    let mut s = settings();
    s.node = node.into();
    let mut p = PublishSettings::new(P, node);
    p.lease_ttl = Duration::from_secs(6);
    p.status_interval = Duration::from_secs(2);
    p.request_timeout = Duration::from_millis(500);
    p.backoff_min = Duration::from_millis(100);
    p.backoff_max = Duration::from_secs(2);
    if let Some(d) = state_dir {
        s.cache_dir = Some(d.join("etcd"));
        p.state_dir = Some(d.join("etcd"));
    }
    FleetSettings {
        sync: s,
        publish: p,
    }
}

fn engine(m: &MemStore, node: &str, dir: Option<&std::path::Path>) -> Engine {
    let store: Arc<dyn Store> = Arc::new(m.clone());
    Engine::start(fleet(node, dir), store, crate::logging::discard())
}

/// A host's files: `n` endpoints of its own (no `spec.node`), one host
/// endpoint, its Node, and one copied remote endpoint it must not publish.
fn files(node: &str, n: usize, label: &str) -> Arc<RegistrySet> {
    let mut y = format!(
        "apiVersion: netpol/v1\nkind: Node\nmetadata: {{name: {node}}}\nspec: {{addresses: [192.0.2.{}]}}\n---\napiVersion: netpol/v1\nkind: HostEndpoint\nmetadata: {{name: {node}-eth0}}\nspec: {{interface: eth0, addresses: [192.0.2.{}]}}\n---\napiVersion: netpol/v1\nkind: Endpoint\nmetadata: {{name: copied-{node}}}\nspec: {{node: elsewhere, addresses: [10.99.0.{}]}}\n",
        node.len(),
        node.len(),
        node.len()
    );
    let base = if node == "host-a" { 1 } else { 2 };
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: netpol/v1\nkind: Endpoint\nmetadata: {{name: {node}-w{i}, labels: {{app: {label}}}}}\nspec: {{interface: veth{i}, addresses: [10.{base}.0.{i}]}}\n"
        ));
    }
    Arc::new(crate::api::parse_registry(std::path::Path::new("/f.yaml"), &y).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_host_publishes_its_own_entries_under_one_lease_and_only_changes() {
    let m = MemStore::new();
    let a = engine(&m, "host-a", None);
    a.publish(files("host-a", 3, "web"), vec![]);
    let mut ps = a.publish_state();
    let st = until(&mut ps, "published", |s| s.published == 5).await;
    let lease = st.lease.unwrap();
    let keys_a = m.keys_with_prefix(&keys().node_prefix("host-a"));
    assert_eq!(keys_a.len(), 5, "{keys_a:?}");
    assert!(keys_a.iter().all(|k| k.lease == lease));
    let node_ep = m
        .value(&keys().endpoint("host-a", "default", "host-a-w0"))
        .unwrap();
    assert!(String::from_utf8_lossy(&node_ep.value).contains(r#""node":"host-a""#));
    assert!(m
        .value(&keys().host_endpoint("host-a", "host-a-eth0"))
        .is_some());
    assert!(m.value(&keys().node("host-a")).is_some());
    // One label changes: one key is written, nothing else.
    let rev = m.revision();
    let mut changed = files("host-a", 3, "web").as_ref().clone();
    Arc::make_mut(&mut changed.endpoints[3]).labels[0].value = "api".into();
    a.publish(Arc::new(changed), vec![]);
    until(&mut ps, "second write", |s| s.writes == 2).await;
    assert_eq!(m.revision(), rev + 1);
    // The same files again: nothing.
    let rev = m.revision();
    a.publish(files("host-a", 3, "web"), vec![]);
    until(&mut ps, "third write", |s| s.writes == 3).await;
    assert_eq!(m.revision(), rev + 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(m.revision(), rev + 1, "writes without a change");
    // The lease is kept alive all along.
    assert!(m.lease_time_to_live(lease).await.unwrap().is_some());
    a.stop().await;
}

/// The `applied_revision` of `node`'s status key, if written.
fn applied_revision(m: &MemStore, node: &str) -> Option<i64> {
    m.value(&keys().status(node)).map(|kv| {
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        v["applied_revision"].as_i64().unwrap()
    })
}

/// Wait (simulated time, at most 30 s) for `node`'s status to claim `rev`.
async fn status_reaches(m: &MemStore, node: &str, rev: i64) {
    let t0 = tokio::time::Instant::now();
    while applied_revision(m, node).is_none_or(|r| r < rev) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{node}'s status never reached {rev}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A host's own registry goes out as soon as the daemon's read hands it over,
/// before the daemon has applied it; until the daemon reports an apply that
/// includes it, the host's status does not claim the revision of that write
/// (so `fleet wait` for it waits for the host's own apply too).
#[tokio::test(start_paused = true)]
async fn an_own_write_goes_out_at_once_and_is_claimed_only_once_applied() {
    let m = MemStore::new();
    let a = engine(&m, "host-a", None);
    let p = a.publication();
    p.addresses(vec![]);
    p.registry(files("host-a", 1, "web"));
    let mut ps = a.publish_state();
    until(&mut ps, "published", |s| s.writes == 1).await;
    let mut st = a.state();
    until(&mut st, "in sync", |s| s.in_sync).await;
    let first = m
        .value(&keys().endpoint("host-a", "default", "host-a-w0"))
        .unwrap()
        .mod_revision;
    a.applied_local(a.view().borrow().revision, 1, true, false, p.local());
    status_reaches(&m, "host-a", first).await;
    // A new local registry: written with no apply reported, no wait.
    p.registry(files("host-a", 2, "web"));
    until(&mut ps, "second write", |s| s.writes == 2).await;
    let w = m
        .value(&keys().endpoint("host-a", "default", "host-a-w1"))
        .unwrap()
        .mod_revision;
    // Its own event moves the view's clean revision past it, status writes
    // are due meanwhile: still not claimed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        applied_revision(&m, "host-a").unwrap() < w,
        "claimed before applied"
    );
    // The daemon applied it.
    a.applied_local(a.view().borrow().revision, 2, true, false, p.local());
    status_reaches(&m, "host-a", w).await;
    a.stop().await;
}

/// host-a with two endpoints of its own (four keys), published: its engine,
/// its publish state and its lease.
async fn published_host(m: &MemStore) -> (Engine, watch::Receiver<PublishState>, i64) {
    let a = engine(m, "host-a", None);
    a.publish(files("host-a", 2, "web"), vec![]);
    let mut ps = a.publish_state();
    let lease = until(&mut ps, "published", |s| s.published == 4)
        .await
        .lease
        .unwrap();
    (a, ps, lease)
}

/// A put under a lease does not renew it (only a keep-alive does): a host
/// whose endpoints change more often than its keep-alive interval keeps
/// its one lease, and its keys never lapse, however long that goes on.
#[tokio::test(start_paused = true)]
async fn a_host_that_publishes_often_still_keeps_its_lease_alive() {
    let m = MemStore::new();
    let (a, _, lease) = published_host(&m).await;
    // A change every 0.5 s for four lease TTLs (the TTL is 6 s, the
    // keep-alive interval 2 s).
    for i in 0..48 {
        let label = if i % 2 == 0 { "api" } else { "web" };
        a.publish(files("host-a", 2, label), vec![]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        m.expire_leases();
        assert_eq!(
            m.keys_with_prefix(&keys().node_prefix("host-a")).len(),
            4,
            "keys lapsed after {} s",
            (i + 1) as f64 / 2.0
        );
    }
    let st = a.publish_state().borrow().clone();
    assert_eq!(st.lease, Some(lease));
    assert_eq!(st.leases_granted, 1);
    assert!(st.writes > 40, "{} writes", st.writes);
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn lost_keys_and_a_lost_lease_are_published_again() {
    let m = MemStore::new();
    let (a, mut ps, lease) = published_host(&m).await;
    let k = keys().endpoint("host-a", "default", "host-a-w1");
    m.delete(&k);
    until(&mut ps, "restored", |_| m.value(&k).is_some()).await;
    let got = loop {
        if let Some(v) = m.value(&k) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.lease, lease);
    // Someone overwrites one: put back.
    m.put(&k, "{}");
    loop {
        if m.value(&k)
            .is_some_and(|v| v.lease == lease && v.value != b"{}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The lease is revoked (an admin, or a partition longer than the TTL).
    m.lease_revoke(lease).await.unwrap();
    let st = until(&mut ps, "new lease", |s| {
        s.lease.is_some_and(|l| l != lease) && s.published == 4
    })
    .await;
    assert_eq!(st.leases_granted, 2);
    let now = m.keys_with_prefix(&keys().node_prefix("host-a"));
    assert_eq!(now.len(), 4);
    assert!(now.iter().all(|k| Some(k.lease) == st.lease));
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn peers_see_a_hosts_endpoints_and_drop_them_after_its_lease() {
    let m = MemStore::new();
    let a = engine(&m, "host-a", None);
    let b = engine(&m, "host-b", None);
    a.publish(files("host-a", 3, "web"), vec![]);
    b.publish(files("host-b", 1, "db"), vec![]);
    let mut vb = b.view();
    let v = until(&mut vb, "a's entries on b", |v| {
        v.registry.endpoints.len() == 4
    })
    .await;
    // b sees a's three workloads and its host endpoint, never the copy a holds.
    assert!(v
        .registry
        .endpoints
        .iter()
        .all(|e| e.node.as_deref() == Some("host-a")));
    assert_eq!(v.registry.nodes.len(), 1);
    let mut va = a.view();
    until(&mut va, "b's entries on a", |v| {
        v.registry.endpoints.len() == 2
    })
    .await;
    // a dies (no clean anything: its tasks just stop keeping the lease).
    a.stop().await;
    let t0 = tokio::time::Instant::now();
    until(&mut vb, "a gone", |v| v.registry.endpoints.is_empty()).await;
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(8), "{took:?}");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_within_the_ttl_reuses_the_lease_and_peers_see_no_flap() {
    let m = MemStore::new();
    let dir = tempfile::tempdir().unwrap();
    let a = engine(&m, "host-a", Some(dir.path()));
    let b = engine(&m, "host-b", None);
    a.publish(files("host-a", 3, "web"), vec![]);
    let mut vb = b.view();
    until(&mut vb, "a on b", |v| v.registry.endpoints.len() == 4).await;
    let lease = a.publish_state().borrow().lease.unwrap();
    a.stop().await;
    // Back two seconds later, well within the 6 s TTL.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rev = m.revision();
    vb.borrow_and_update();
    let a = engine(&m, "host-a", Some(dir.path()));
    a.publish(files("host-a", 3, "web"), vec![]);
    let mut ps = a.publish_state();
    let st = until(&mut ps, "lease reused", |s| s.lease.is_some()).await;
    assert_eq!(st.lease, Some(lease));
    assert_eq!(st.leases_granted, 0);
    // Well past the old TTL: still there, never rewritten, b never changed.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(m.revision(), rev, "the restart wrote to etcd");
    assert!(!vb.has_changed().unwrap(), "b saw a flap");
    assert_eq!(vb.borrow().registry.endpoints.len(), 4);
    a.stop().await;
    b.stop().await;
}

/// Churn on one host, three hosts watching: each applies at most once per
/// tick, writes status at most every status_interval, and once the churn stops
/// nothing moves any more — no traffic that sustains itself.
#[tokio::test(start_paused = true)]
async fn status_is_written_rarely_and_a_quiet_fleet_stays_quiet() {
    let m = MemStore::new();
    let hosts: Vec<Engine> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|n| engine(&m, n, None))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        h.publish(files(["host-a", "host-b", "host-c"][i], 1, "x"), vec![]);
    }
    // A stand-in daemon per host: apply each delivered view, report it.
    let mut daemons = Vec::new();
    for h in &hosts {
        let mut v = h.view();
        let applies = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = applies.clone();
        let tx = h.publisher.tx.clone();
        daemons.push((
            applies,
            tokio::spawn(async move {
                let mut generation = 0;
                loop {
                    let rev = v.borrow_and_update().revision;
                    generation += 1;
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tx.send(super::publish::Control::Applied(super::Applied {
                        revision: rev,
                        generation,
                        ready: true,
                        degraded: false,
                        local: u64::MAX,
                    }));
                    if v.changed().await.is_err() {
                        return;
                    }
                }
            }),
        ));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let count = |d: &Vec<(Arc<std::sync::atomic::AtomicUsize>, _)>| -> Vec<usize> {
        d.iter()
            .map(|(a, _)| a.load(std::sync::atomic::Ordering::SeqCst))
            .collect()
    };
    let before = count(&daemons);
    let status_before: Vec<u64> = hosts
        .iter()
        .map(|h| h.publish_state().borrow().status_writes)
        .collect();
    // 5 registry writes/s for 30 s, all by an admin tool (static entries).
    for i in 0..150 {
        m.put(
            &keys().static_endpoint("default", &format!("s{}", i % 20)),
            &format!(
                r#"{{"apiVersion":"netpol/v1","kind":"Endpoint","metadata":{{"name":"s{}","labels":{{"gen":"g{i}"}}}},"spec":{{"node":"appliance","addresses":["10.50.0.{}"]}}}}"#,
                i % 20,
                i % 20
            ),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after_churn = count(&daemons);
    let status_after: Vec<u64> = hosts
        .iter()
        .map(|h| h.publish_state().borrow().status_writes)
        .collect();
    for i in 0..3 {
        let applies = after_churn[i] - before[i];
        // 150 writes, 200 ms apart, 50 ms tick: one apply per write at most.
        assert!(applies <= 151, "host {i}: {applies} applies");
        assert!(applies >= 100, "host {i}: only {applies} applies");
        let writes = status_after[i] - status_before[i];
        // 30 s at one status write per 2 s at most.
        assert!(writes <= 16, "host {i}: {writes} status writes");
        assert!(writes >= 5, "host {i}: {writes} status writes");
    }
    // Quiet now: settle, then nothing at all for a minute.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rev = m.revision();
    let settled = count(&daemons);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(m.revision(), rev, "writes after the churn stopped");
    assert_eq!(count(&daemons), settled, "applies after the churn stopped");
    // And every host reports the last revision as applied.
    for h in &hosts {
        let st = h.state().borrow().clone();
        assert!(st.view_revision >= rev - 3, "{st:?}");
    }
    let statuses = m.keys_with_prefix(&keys().status_prefix());
    assert_eq!(statuses.len(), 3);
    let last_churn = m
        .keys_with_prefix(&keys().static_prefix())
        .iter()
        .map(|k| k.mod_revision)
        .max()
        .unwrap();
    for s in statuses {
        let st: super::NodeStatus = serde_json::from_slice(&s.value).unwrap();
        assert!(st.applied_revision >= last_churn, "{st:?} < {last_churn}");
        assert!(st.ready && !st.degraded);
    }
    for h in hosts {
        h.stop().await;
    }
}
