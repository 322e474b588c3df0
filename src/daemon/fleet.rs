//! Fleet mode in the daemon (DESIGN §5a): with `[etcd] endpoints` set, the
//! sync engine and the publisher run beside the loop ([`crate::fleet::Engine`]),
//! the inputs are this host's files merged with the remote view
//! ([`FleetInputs`]), and after each reconcile the daemon hands the engine its
//! valid local registry (to publish) and what it enforces (for its status key).
//!
//! Owns the daemon's side of that contract: which revision the installed state
//! stands for, when the host is degraded for fleet reasons (etcd away, not in
//! sync, a cached view, a held removal), and the `etcd` part of `status`.
//! Never waits on etcd on the loop: every call here is a channel send or a
//! look at the engine's state.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::Logger;
use tokio::sync::watch;

use super::status::{EtcdStatus, FileError};
use crate::config::Config;
use crate::fleet::inputs::{FleetInputs, Merged};
use crate::fleet::publish::enforced_revision;
use crate::fleet::{
    Engine, FleetSettings, Publication, PublishState, RemoteView, Store, SyncState,
};
use crate::pipeline::FileInputs;

/// Why fleet mode could not start (a file the `[etcd]` table names cannot be read,
/// or a build without etcd).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    Settings(#[from] crate::fleet::etcd::SettingsError),
    #[error("etcd.endpoints: this netpold was built without fleet mode (Cargo feature `etcd`)")]
    NotBuilt,
    #[error("cannot start the etcd thread")]
    Thread(#[from] std::io::Error),
}

/// The engine and what the daemon last told it.
pub struct FleetLink {
    engine: Engine,
    merged: Arc<Mutex<Merged>>,
    view: watch::Receiver<Arc<RemoteView>>,
    state: watch::Receiver<SyncState>,
    publish_state: watch::Receiver<PublishState>,
    /// Where the local registry (from the inputs) and the host's addresses
    /// (from here) go to the publisher.
    publication: Publication,
    /// The view revision the installed state was built from, and the number
    /// of the local registry it includes ([`Publication::local`]).
    installed_revision: Option<(i64, u64)>,
    /// What was last reported with `applied`.
    reported: Option<(i64, u64, bool, bool, u64)>,
}

/// Start fleet mode when the config asks for it: the engine on `store` (or on
/// the etcd the `[etcd]` table names) and the inputs that merge its view.
pub fn start(
    config: &Config,
    store: Option<Arc<dyn Store>>,
    log: &Logger,
) -> Result<Option<(FleetLink, FleetInputs)>, FleetError> {
    let Some(settings) = FleetSettings::from_config(config) else {
        return Ok(None);
    };
    let store = match store {
        Some(s) => s,
        None => connect(config)?,
    };
    slog::info!(log, "fleet mode: registry and policies from etcd";
        "endpoints" => config.etcd.endpoints.join(","), "prefix" => &config.etcd.prefix,
        "node" => &settings.publish.node);
    let engine =
        Engine::start_on_thread(settings, store, log.new(slog::o!("component" => "etcd")))?;
    let inputs =
        FleetInputs::new(FileInputs::new(config), engine.view()).publishing(engine.publication());
    let link = FleetLink {
        merged: inputs.merged(),
        view: engine.view(),
        state: engine.state(),
        publish_state: engine.publish_state(),
        publication: engine.publication(),
        engine,
        installed_revision: None,
        reported: None,
    };
    Ok(Some((link, inputs)))
}

#[cfg(feature = "etcd")]
fn connect(config: &Config) -> Result<Arc<dyn Store>, FleetError> {
    Ok(crate::fleet::connect(&config.etcd)?)
}

#[cfg(not(feature = "etcd"))]
fn connect(_: &Config) -> Result<Arc<dyn Store>, FleetError> {
    Err(FleetError::NotBuilt)
}

/// Addresses worth naming in this host's Node: none another host also has
/// (loopback, link-local, unspecified, multicast).
fn node_addresses(host: &[IpAddr]) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = host
        .iter()
        .copied()
        .filter(|a| match a {
            IpAddr::V4(v) => {
                !(v.is_loopback() || v.is_link_local() || v.is_unspecified() || v.is_multicast())
            }
            IpAddr::V6(v) => {
                !(v.is_loopback()
                    || v.is_unspecified()
                    || v.is_multicast()
                    || (v.segments()[0] & 0xffc0) == 0xfe80)
            }
        })
        .collect();
    set.into_iter().collect()
}

impl FleetLink {
    /// The engine's state changes (connection, sync, revision): for the loop
    /// to refresh status.
    pub fn state_rx(&mut self) -> &mut watch::Receiver<SyncState> {
        &mut self.state
    }

    /// Wait (at most `limit`) for the first list when no view is there to
    /// start from (no cache): a first apply without the remote endpoints
    /// would treat them as `world` for a moment.
    pub async fn initial_sync(&mut self, limit: Duration, log: &Logger) {
        if self.view.borrow().from_cache || self.state.borrow().in_sync {
            return;
        }
        let mut st = self.state.clone();
        let r = tokio::time::timeout(limit, st.wait_for(|s| s.in_sync)).await;
        if r.is_err() {
            slog::warn!(log, "etcd not reached and no cached view; enforcing the local files only until it is";
                "waited_ms" => limit.as_millis() as u64);
        }
    }

    /// The reconcile installed (or kept) the state of the sets held now.
    pub fn installed(&mut self) {
        let m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        self.installed_revision = Some((m.revision, self.publication.local()));
    }

    /// Nothing installed stands for a revision (a datapath error).
    pub fn uninstalled(&mut self) {
        self.installed_revision = None;
    }

    /// Degraded for fleet reasons: etcd away or not in sync, the cached view
    /// in force, removals held.
    pub fn degraded(&self) -> bool {
        let st = self.state.borrow();
        let m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        !st.connected || !st.in_sync || m.from_cache || st.held_removals > 0
    }

    /// The `etcd` part of status.
    pub fn status(&self) -> EtcdStatus {
        let st = self.state.borrow().clone();
        let p = self.publish_state.borrow().clone();
        let m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        let view = self.view.borrow().clone();
        let applied = self.installed_revision.map_or(0, |(r, _)| {
            enforced_revision(r, view.revision, st.view_revision)
        });
        let mut rejected: Vec<FileError> = view.rejected.iter().map(FileError::from).collect();
        rejected.extend(m.conflicts.iter().map(FileError::from));
        EtcdStatus {
            connected: st.connected,
            in_sync: st.in_sync,
            revision: st.revision,
            applied_revision: applied,
            remote_endpoints: st.remote_endpoints,
            rejected,
            from_cache: m.from_cache,
            held_removals: st.held_removals,
            hold_until_ms: st.hold_until_ms,
            relists: st.relists,
            reconnects: st.reconnects,
            last_contact_ms: self.engine.last_contact_ms(),
            published: p.published,
            writes: p.writes,
            status_writes: p.status_writes,
            last_error: st.last_error.or(p.last_error),
        }
    }

    /// After a reconcile (or a status change): the host's addresses to the
    /// publisher (the inputs handed it the local registry at the read), and
    /// report what is enforced.
    pub fn report(&mut self, host: &[IpAddr], generation: u64, ready: bool, degraded: bool) {
        self.publication.addresses(node_addresses(host));
        if let Some((rev, local)) = self.installed_revision {
            let now = (rev, generation, ready, degraded, local);
            if self.reported != Some(now) {
                self.engine
                    .applied_local(rev, generation, ready, degraded, local);
                self.reported = Some(now);
            }
        }
    }

    /// Stop the engine (keys stay; the cache is written).
    pub async fn stop(self) {
        self.engine.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::api::model::{PolicySet, RegistrySet};
    use crate::daemon::netlink::{fake_links, LinkTable};
    use crate::daemon::sdnotify::Notifier;
    use crate::daemon::status::Status;
    use crate::daemon::{run_with, Options};
    use crate::datapath::fake::FakeDatapath;
    use crate::fleet::mem::MemStore;
    use crate::policy::compile::{CompileError, CompileOptions};
    use crate::policy::types::Compiled;

    fn config(root: &Path, node: &str) -> Config {
        let at = |d: &str| root.join(d);
        for d in ["pol", "ep"] {
            std::fs::create_dir_all(at(d)).unwrap();
        }
        let mut c = Config {
            policy_dir: at("pol"),
            endpoint_dirs: vec![at("ep")],
            runtime_dir: at("run"),
            state_dir: at("state"),
            node_name: node.into(),
            resync_interval_s: 0,
            debounce_ms: 20,
            strict_file_modes: false,
            ..Config::default()
        };
        c.etcd.endpoints = vec!["http://127.0.0.1:1".into()];
        c.etcd.batch_ms = 20;
        c.etcd.lease_ttl_s = 5;
        c.etcd.status_interval_s = 1;
        c.etcd.request_timeout_ms = 300;
        c.etcd.progress_interval_ms = 300;
        c
    }

    fn endpoint(root: &Path, name: &str, addr: &str) {
        let y = format!("apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec: {{interface: veth-{name}, addresses: [{addr}]}}\n");
        let tmp = root.join(format!("ep/.{name}.tmp"));
        std::fs::write(&tmp, y).unwrap();
        std::fs::rename(tmp, root.join(format!("ep/{name}.yaml"))).unwrap();
    }

    /// What each compile of one daemon saw: the registry's endpoint names.
    type Seen = Arc<Mutex<Vec<Vec<String>>>>;

    fn options(store: &MemStore, seen: &Seen) -> Options {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut o = Options::new(crate::logging::discard(), Notifier::recorder().0, rx);
        o.store = Some(Arc::new(store.clone()));
        let seen = seen.clone();
        o.compiler = Box::new(
            move |_: &PolicySet,
                  r: &RegistrySet,
                  _: &CompileOptions|
                  -> Result<Compiled, CompileError> {
                let mut names: Vec<String> =
                    r.endpoints.iter().map(|e| e.name.to_string()).collect();
                names.sort();
                seen.lock().unwrap().push(names);
                // A state per registry, so a change is an apply.
                let ipcache = r
                    .endpoints
                    .iter()
                    .flat_map(|e| e.addresses.iter())
                    .map(|a| crate::policy::types::IpcacheEntry {
                        net: (*a).into(),
                        identity: 256,
                        endpoint: None,
                    })
                    .collect();
                let c = Compiled {
                    ipcache,
                    ..Compiled::default()
                };
                Ok(c)
            },
        );
        o
    }

    fn last(seen: &Seen) -> Vec<String> {
        seen.lock().unwrap().last().cloned().unwrap_or_default()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn status(cfg: &Config) -> Option<Status> {
        let path = cfg.socket_path();
        tokio::task::spawn_blocking(move || {
            crate::cli::daemonctl::query::<Status>(&path, "status")
                .ok()
                .map(|(s, _)| s)
        })
        .await
        .unwrap()
    }

    /// Two daemons on one in-memory etcd: each enforces the other's endpoint
    /// by its files' publish, reports its applied revision in its status key
    /// and in `status`; a restart while etcd is down starts from the cached
    /// view, ready and degraded, and removes nothing.
    #[tokio::test]
    async fn two_daemons_share_their_endpoints_through_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let (ra, rb) = (tmp.path().join("a"), tmp.path().join("b"));
        let (ca, cb) = (config(&ra, "node-a"), config(&rb, "node-b"));
        endpoint(&ra, "web", "10.1.0.1");
        endpoint(&rb, "db", "10.2.0.1");
        let m = MemStore::new();
        let (sa, sb): (Seen, Seen) = Default::default();
        let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
        let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
        let run = |cfg: Config, seen: &Seen, stopped: tokio::sync::oneshot::Receiver<()>| {
            let (_l, links) = fake_links(LinkTable::default());
            run_with(cfg, FakeDatapath::new(), links, options(&m, seen), async {
                let _ = stopped.await;
            })
        };
        let a = run(ca.clone(), &sa, stopped_a);
        let b = run(cb.clone(), &sb, stopped_b);
        let first = async {
            until("b enforces a's endpoint", || last(&sb) == ["db", "web"]).await;
            until("a enforces b's endpoint", || last(&sa) == ["db", "web"]).await;
            // A new endpoint file on a reaches b.
            endpoint(&ra, "api", "10.1.0.2");
            until("b sees a's new endpoint", || {
                last(&sb) == ["api", "db", "web"]
            })
            .await;
            // b's status key says it enforces the head revision.
            let head = m.revision();
            until("b's status key reaches the head", || {
                m.value("/netpol/v1/status/node-b").is_some_and(|kv| {
                    let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
                    v["applied_revision"].as_i64() >= Some(head)
                })
            })
            .await;
            let s = status(&cb).await.unwrap();
            let e = s.etcd.clone().unwrap();
            assert!(s.ready && !s.degraded, "{s:?}");
            assert!(e.connected && e.in_sync, "{e:?}");
            assert_eq!(e.remote_endpoints, 2, "{e:?}");
            assert!(e.applied_revision >= head, "{e:?}");
            let _ = stop_b.send(());
        };
        let rest = async {
            let (r, ()) = tokio::join!(b, first);
            r.unwrap();
            // b again, etcd down: the cached view, ready and degraded.
            m.set_down(true);
            let sb2: Seen = Default::default();
            let (stop_b2, stopped_b2) = tokio::sync::oneshot::channel::<()>();
            let b2 = run(cb.clone(), &sb2, stopped_b2);
            let second = async {
                until("b starts from its cache", || {
                    last(&sb2) == ["api", "db", "web"]
                })
                .await;
                let s = status(&cb).await.unwrap();
                let e = s.etcd.clone().unwrap();
                assert!(s.ready && s.degraded, "{s:?}");
                assert!(!e.connected && e.from_cache, "{e:?}");
                // Back: in sync, not degraded, nothing changed.
                m.set_down(false);
                let t0 = std::time::Instant::now();
                loop {
                    let s = status(&cb).await.unwrap();
                    if !s.degraded {
                        break;
                    }
                    assert!(t0.elapsed() < Duration::from_secs(10), "{s:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert_eq!(last(&sb2), ["api", "db", "web"]);
                let _ = stop_b2.send(());
            };
            let (r, ()) = tokio::join!(b2, second);
            r.unwrap();
            let _ = stop_a.send(());
        };
        let (r, ()) = tokio::join!(a, rest);
        r.unwrap();
    }

    #[test]
    fn a_node_names_only_addresses_no_other_host_has() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let got = node_addresses(&[
            a("127.0.0.1"),
            a("::1"),
            a("fe80::1"),
            a("169.254.0.3"),
            a("10.0.0.5"),
            a("fd00::5"),
            a("10.0.0.5"),
        ]);
        assert_eq!(got, vec![a("10.0.0.5"), a("fd00::5")]);
    }
}
