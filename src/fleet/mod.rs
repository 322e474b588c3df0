//! Fleet mode (DESIGN §5a): the registry and policies on etcd.
//!
//! Owns the key layout ([`keys`]), the store seam ([`store`], with a real etcd
//! adapter in [`etcd`] behind the Cargo feature `etcd` and an in-memory store in
//! [`mem`] for tests), the per-entry validation of remote documents and the merge
//! with local files ([`view`]), the sync engine that keeps a remote view
//! ([`sync`]), its on-disk cache ([`cache`]), the publisher of this host's
//! entries and status ([`publish`]), and the operator side: policy sets, pushes,
//! node removal, fleet status ([`admin`]).
//!
//! Must not: touch the kernel, read the local files itself (the daemon hands it
//! its validated registry), or turn any store error into an empty view.

pub mod admin;
pub mod cache;
pub mod doc;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod inputs;
pub mod keys;
pub mod mem;
pub mod publish;
pub mod store;
pub mod sync;
pub mod view;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use slog::Logger;
use tokio::sync::{mpsc, watch};

use crate::api::model::RegistrySet;
use crate::config::Config;

pub use publish::{Applied, NodeStatus, Publication, PublishSettings, PublishState};
pub use store::Store;
pub use sync::{RemoteView, SyncSettings, SyncState};
pub use view::{merge_policies, merge_registry};

/// Everything the engine needs, resolved from netpold.toml.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub sync: SyncSettings,
    pub publish: PublishSettings,
}

impl FleetSettings {
    /// `None` when the `[etcd]` table names no endpoints (files only).
    pub fn from_config(cfg: &Config) -> Option<FleetSettings> {
        let e = &cfg.etcd;
        if !e.enabled() {
            return None;
        }
        let node = cfg.node_name();
        let dir = cfg.state_dir.join("etcd");
        let mut sync = SyncSettings::new(&e.prefix, &node);
        sync.batch = Duration::from_millis(e.batch_ms);
        sync.progress_interval = Duration::from_millis(e.progress_interval_ms);
        sync.request_timeout = Duration::from_millis(e.request_timeout_ms);
        sync.relist_min_interval = Duration::from_secs(e.relist_min_interval_s);
        sync.mass_removal_hold = Duration::from_secs(e.mass_removal_hold_s);
        sync.cache_dir = Some(dir.clone());
        let mut publish = PublishSettings::new(&e.prefix, &node);
        publish.lease_ttl = Duration::from_secs(e.lease_ttl_s);
        publish.publish = e.publish;
        publish.status_interval = Duration::from_secs(e.status_interval_s);
        publish.request_timeout = Duration::from_millis(e.request_timeout_ms);
        publish.state_dir = Some(dir);
        Some(FleetSettings { sync, publish })
    }
}

/// The store the `[etcd]` table points at (connects lazily; never fails for
/// etcd being away, only for files it names that cannot be read).
#[cfg(feature = "etcd")]
pub fn connect(cfg: &crate::config::EtcdConfig) -> Result<Arc<dyn Store>, etcd::SettingsError> {
    let s = etcd::ConnectSettings::from_config(cfg)?;
    Ok(Arc::new(etcd::EtcdStore::new(s)))
}

/// Fleet mode running: the sync engine and the publisher, on one store.
///
/// For the daemon: [`Engine::view`] is the remote view, changed at most once
/// per tick and only when its content changed; merge it with the files
/// ([`merge_registry`], [`merge_policies`]), apply, then report the view's
/// revision with [`Engine::applied`]. [`Engine::publish`] after every load of
/// the local registry. [`Engine::state`] for status and metrics.
pub struct Engine {
    sync: sync::SyncHandle,
    pub(crate) publisher: publish::PublisherHandle,
    /// The thread of [`Engine::start_on_thread`]: told to end, then joined.
    thread: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Engine {
    /// Start both tasks. The cache in `state_dir/etcd` is read first, so the
    /// first [`Engine::view`] is the last view this host had (or empty).
    pub fn start(s: FleetSettings, store: Arc<dyn Store>, log: Logger) -> Engine {
        let cached = match &s.sync.cache_dir {
            Some(d) => match cache::load(d, s.sync.keys.prefix()) {
                Ok(c) => c,
                Err(e) => {
                    slog::warn!(log, "etcd view cache unreadable; starting without it"; "error" => %e);
                    None
                }
            },
            None => None,
        };
        let (own_tx, own_rx) = mpsc::unbounded_channel();
        let sync = sync::spawn(
            s.sync,
            store.clone(),
            log.new(slog::o!("part" => "etcd-sync")),
            cached,
            Some(own_tx),
        );
        let publisher = publish::spawn(
            s.publish,
            store,
            log.new(slog::o!("part" => "etcd-publish")),
            own_rx,
            sync.view.clone(),
            sync.state.clone(),
        );
        Engine {
            sync,
            publisher,
            thread: None,
        }
    }

    /// [`Engine::start`] on a thread and runtime of its own, for the daemon,
    /// whose loop compiles and applies without yielding: the engine hears
    /// etcd, runs its ticks and publishes meanwhile, so this host's own change
    /// goes out while the host compiles it, and a remote change is taken in
    /// (and its tick kept) while a compile of the last one runs.
    pub fn start_on_thread(
        s: FleetSettings,
        store: Arc<dyn Store>,
        log: Logger,
    ) -> std::io::Result<Engine> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netpol-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let _ = tx.send(Ok(Engine::start(s, store, log)));
                    // Until stopped (or the engine dropped).
                    let _ = end_rx.await;
                });
            })?;
        let mut engine = rx
            .recv()
            .map_err(|_| std::io::Error::other("the etcd thread ended before it started"))??;
        engine.thread = Some((end_tx, thread));
        Ok(engine)
    }

    /// Where the inputs hand over the local registry of a valid read.
    pub fn publication(&self) -> Publication {
        self.publisher.publication.clone()
    }

    /// The remote view; `changed()` fires on a tick that changed it.
    pub fn view(&self) -> watch::Receiver<Arc<RemoteView>> {
        self.sync.view.clone()
    }

    pub fn state(&self) -> watch::Receiver<SyncState> {
        self.sync.state.clone()
    }

    pub fn publish_state(&self) -> watch::Receiver<PublishState> {
        self.publisher.state.clone()
    }

    /// Unix ms of the last answer from etcd, if any.
    pub fn last_contact_ms(&self) -> Option<u64> {
        match self
            .sync
            .last_contact
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            t => Some(t as u64),
        }
    }

    /// The local registry (valid as a whole) to publish this host's part of.
    /// `host_addresses` make its Node when the files have none of its name.
    pub fn publish(&self, registry: Arc<RegistrySet>, host_addresses: Vec<IpAddr>) {
        self.publisher.publish(registry, host_addresses);
    }

    /// The daemon applied a generation built from the view of `revision`.
    /// Every local registry handed over so far counts as applied; the daemon
    /// says which one with [`Engine::applied_local`].
    pub fn applied(&self, revision: i64, generation: u64, ready: bool, degraded: bool) {
        let local = self.publisher.publication.local();
        self.applied_local(revision, generation, ready, degraded, local);
    }

    /// [`Engine::applied`], with the [`Publication::local`] number of the
    /// local registry the applied generation includes.
    pub fn applied_local(
        &self,
        revision: i64,
        generation: u64,
        ready: bool,
        degraded: bool,
        local: u64,
    ) {
        self.publisher.applied(Applied {
            revision,
            generation,
            ready,
            degraded,
            local,
        });
    }

    /// Stop both tasks; published keys stay (a restart within the lease TTL
    /// takes them over), the cache is written.
    pub async fn stop(self) {
        self.publisher.stop().await;
        self.sync.stop().await;
        if let Some((end, thread)) = self.thread {
            let _ = end.send(());
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests;
