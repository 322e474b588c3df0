//! Fleet mode's input source: this host's files (all-or-nothing, as
//! [`FileInputs`] reads them) merged with the remote view the sync engine keeps
//! ([`merge_registry`], [`merge_policies`]: the file wins; remote entries were
//! validated one by one; the current policy set is all-or-nothing, its last
//! valid version kept while a newer one is invalid).
//!
//! - Reads never wait on the network: the remote part is the view as the
//!   engine last delivered it (at most once per `batch_ms` tick).
//! - One pass reads the policies, then the registry: both merge the same
//!   view, taken at the policy read, so a generation stands for one revision.
//! - [`Inputs::wakeups`] fires once per delivered view (the engine delivers
//!   only when the content changed), so a batch of remote changes is one
//!   reconcile and at most one generation flip.
//! - [`Inputs::saved`] merges saved copies of the files with the view as it is
//!   (the cached one while etcd is away).
//! - A valid read of the local registry is handed to the publisher at once
//!   ([`FleetInputs::publishing`]): this host's own change goes out while the
//!   daemon compiles it.
//! - What the daemon reports comes through [`Merged`]: the revision the sets
//!   in force stand for, the last valid local registry (to publish), the
//!   remote entries left out because a file has the object or the address.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::publish::Publication;
use super::sync::RemoteView;
use super::view::{merge_policies, merge_registry};
use crate::api::model::{PolicySet, RegistrySet};
use crate::api::{Problem, Warning};
use crate::pipeline::inputs::SavedFiles;
use crate::pipeline::{FileInputs, Hint, Inputs, Read, SavedReader};

/// What the last reads merged, for the daemon's reports.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// The view revision the sets in force were merged with: the lower of the
    /// two kinds' (a kind whose files are invalid keeps an older merge).
    pub revision: i64,
    /// The merged view was read from the cache (etcd not heard from yet).
    pub from_cache: bool,
    /// The local registry of the last valid read (this host's files only).
    pub local_registry: Option<Arc<RegistrySet>>,
    /// Remote documents left out because a file defines the object or claims
    /// the address (the file wins), policies' first.
    pub conflicts: Vec<Problem>,
}

/// One kind's last merge: the view it used and what it reported.
#[derive(Default)]
struct KindState {
    view: Option<Arc<RemoteView>>,
    conflicts: Vec<Problem>,
}

/// Local files + the remote view.
pub struct FleetInputs {
    files: FileInputs,
    view: watch::Receiver<Arc<RemoteView>>,
    /// The view this pass merges (taken at the policy read).
    pass_view: Option<Arc<RemoteView>>,
    local_policies: Option<PolicySet>,
    local_registry: Option<Arc<RegistrySet>>,
    kinds: [KindState; 2],
    merged: Arc<Mutex<Merged>>,
    wake: Option<watch::Receiver<Arc<RemoteView>>>,
    publication: Option<Publication>,
}

const POLICIES: usize = 0;
const REGISTRY: usize = 1;

impl FleetInputs {
    pub fn new(files: FileInputs, view: watch::Receiver<Arc<RemoteView>>) -> FleetInputs {
        FleetInputs {
            files,
            wake: Some(view.clone()),
            view,
            pass_view: None,
            local_policies: None,
            local_registry: None,
            kinds: Default::default(),
            merged: Arc::new(Mutex::new(Merged::default())),
            publication: None,
        }
    }

    /// Hand every valid read of the local registry to `p` (the publisher).
    pub fn publishing(mut self, p: Publication) -> FleetInputs {
        self.publication = Some(p);
        self
    }

    /// What the reads merged, shared with the daemon.
    pub fn merged(&self) -> Arc<Mutex<Merged>> {
        self.merged.clone()
    }

    fn report(&self) {
        let revision = self
            .kinds
            .iter()
            .map(|k| k.view.as_ref().map_or(0, |v| v.revision))
            .min()
            .unwrap_or(0);
        let from_cache = self
            .kinds
            .iter()
            .any(|k| k.view.as_ref().is_some_and(|v| v.from_cache));
        let mut m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        m.revision = revision;
        m.from_cache = from_cache;
        m.local_registry = self.local_registry.clone();
        m.conflicts = self
            .kinds
            .iter()
            .flat_map(|k| k.conflicts.iter().cloned())
            .collect();
    }

    /// The view of this pass (for the registry read: the one the policy read took).
    fn view_now(&mut self, kind: usize) -> Arc<RemoteView> {
        if kind == POLICIES || self.pass_view.is_none() {
            self.pass_view = Some(self.view.borrow_and_update().clone());
        }
        self.pass_view.clone().unwrap_or_default()
    }
}

/// Whether the remote part of `kind` is the same in both views.
fn same_remote(kind: usize, a: &RemoteView, b: &RemoteView) -> bool {
    match kind {
        POLICIES => match (&a.policies, &b.policies) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y) || x == y,
            (None, None) => true,
            _ => false,
        },
        _ => a.registry == b.registry,
    }
}

/// The local policies with the view's current set (the file wins).
fn with_remote_policies(local: &PolicySet, view: &RemoteView) -> (PolicySet, Vec<Problem>) {
    match view.policies.as_deref() {
        Some(remote) => merge_policies(local, remote),
        None => (local.clone(), Vec::new()),
    }
}

/// The local registry with the view's entries (the file wins).
fn with_remote_registry(local: &RegistrySet, view: &RemoteView) -> (RegistrySet, Vec<Problem>) {
    merge_registry(local, &view.registry)
}

impl FleetInputs {
    /// One kind's read, the same for both: the files' read `files` (kept by
    /// `keep` when valid), merged by `merge` with `view` unless the files and
    /// the remote part are as they were (only the revision moved).
    fn merge_kind<T>(
        &mut self,
        kind: usize,
        view: Arc<RemoteView>,
        files: Read<T>,
        keep: impl FnOnce(&mut Self, T),
        merge: impl FnOnce(&Self, &RemoteView) -> Option<(T, Vec<Problem>)>,
    ) -> Read<T> {
        let prev = match files {
            Read::Invalid(p) => return Read::Invalid(p),
            Read::Valid(set) => {
                keep(self, set);
                None
            }
            Read::Unchanged => self.kinds[kind].view.clone(),
        };
        if let Some(prev) = prev {
            if same_remote(kind, &prev, &view) {
                self.kinds[kind].view = Some(view);
                self.report();
                return Read::Unchanged;
            }
        }
        let Some((set, conflicts)) = merge(self, &view) else {
            return Read::Invalid(Vec::new());
        };
        let st = &mut self.kinds[kind];
        st.view = Some(view);
        st.conflicts = conflicts;
        self.report();
        Read::Valid(set)
    }
}

impl Inputs for FleetInputs {
    fn policies(&mut self, hint: Hint<'_>) -> Read<PolicySet> {
        let view = self.view_now(POLICIES);
        let files = self.files.policies(hint);
        self.merge_kind(
            POLICIES,
            view,
            files,
            |me, set| me.local_policies = Some(set),
            |me, view| Some(with_remote_policies(me.local_policies.as_ref()?, view)),
        )
    }

    fn registry(&mut self, hint: Hint<'_>) -> Read<RegistrySet> {
        let view = self.view_now(REGISTRY);
        let files = self.files.registry(hint);
        self.merge_kind(
            REGISTRY,
            view,
            files,
            |me, set| {
                let set = Arc::new(set);
                if let Some(p) = &me.publication {
                    p.registry(set.clone());
                }
                me.local_registry = Some(set);
            },
            |me, view| Some(with_remote_registry(me.local_registry.as_deref()?, view)),
        )
    }

    fn files_parsed(&self) -> usize {
        self.files.files_parsed()
    }

    fn warnings(&self) -> Vec<Warning> {
        self.files.warnings()
    }

    /// The current remote policy set is invalid: the last valid one stays,
    /// and every problem of the new one is reported, as for files.
    fn problems(&self) -> Vec<Problem> {
        self.pass_view
            .as_ref()
            .map(|v| v.policy_problems.clone())
            .unwrap_or_default()
    }

    fn saved(&self) -> Arc<dyn SavedReader> {
        Arc::new(SavedMerged {
            view: self.view.clone(),
        })
    }

    fn wakeups(&mut self) -> Option<mpsc::UnboundedReceiver<()>> {
        let mut view = self.wake.take()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while view.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }
}

/// Saved copies of the files merged with the view as it is now.
struct SavedMerged {
    view: watch::Receiver<Arc<RemoteView>>,
}

impl SavedReader for SavedMerged {
    fn policies(&self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        let local = SavedFiles.policies(dir)?;
        let view = self.view.borrow().clone();
        Ok(with_remote_policies(&local, &view).0)
    }

    fn registry(&self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        let local = SavedFiles.registry(dirs)?;
        let view = self.view.borrow().clone();
        Ok(with_remote_registry(&local, &view).0)
    }
}
