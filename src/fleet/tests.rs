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
        .map(|e| e.name.clone())
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
        OwnEvent::Listed(kvs) => {
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
    assert!(matches!(own.recv().await.unwrap(), OwnEvent::Delete(k) if k.ends_with("/mine")));
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
