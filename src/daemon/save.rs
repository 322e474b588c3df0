//! Saving the last valid set beside `lastgood`: about half a second after an
//! apply (and when stopping), the live input files that applied are copied,
//! flushed and verified on a thread beside the loop, and the loop commits the
//! copy only when nothing was applied or refused since it began (a thousand
//! files take a tenth of a second or more, which must not hold up the next
//! change).
//!
//! Owns when to save and what was saved; the copies and their layout are
//! `lastgood`'s, and what a copy means is the inputs' (their `SavedReader`
//! verifies it). Never touches the running state: a `state_dir` that cannot
//! be written is reported and enforcement goes on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slog::Logger;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lastgood::{Kind, LastGood, Prepared};
use crate::api::model::{PolicySet, RegistrySet};
use crate::error::chain;
use crate::pipeline::{Held, InForce, InputSet, SavedReader};

/// How long after the last apply the applied files are copied to state_dir.
pub const SAVE_DELAY: Duration = Duration::from_millis(500);

/// One kind's copy as a save thread prepared it, and the set it holds
/// (recorded as saved once the copy is committed).
struct KindSave<T> {
    prepared: Result<Option<Prepared>, String>,
    set: T,
}

/// What a save thread prepared, per kind (`None`: that kind was not saved).
pub struct Saves {
    policies: Option<KindSave<PolicySet>>,
    registry: Option<KindSave<RegistrySet>>,
}

/// The directories whose files make up the inputs (the config's).
#[derive(Debug, Clone)]
struct Sources {
    policy_dir: PathBuf,
    endpoint_dirs: Vec<PathBuf>,
}

pub struct Saver {
    last_good: LastGood,
    sources: Sources,
    /// What was last written to state_dir, per kind (live sets only).
    saved_policies: Option<PolicySet>,
    saved_registry: Option<RegistrySet>,
    /// When to copy the applied files.
    at: Option<Instant>,
    /// The save in progress: the epoch it began in, and its result.
    job: Option<(u64, oneshot::Receiver<Saves>)>,
    /// Counts applies and refusals: a save that began in an earlier epoch is
    /// not committed.
    epoch: u64,
    /// Why the last save failed, while it does.
    error: Option<String>,
}

impl Saver {
    pub fn new(last_good: LastGood, policy_dir: PathBuf, endpoint_dirs: Vec<PathBuf>) -> Saver {
        Saver {
            last_good,
            sources: Sources {
                policy_dir,
                endpoint_dirs,
            },
            saved_policies: None,
            saved_registry: None,
            at: None,
            job: None,
            epoch: 0,
            error: None,
        }
    }

    pub fn last_good(&self) -> &LastGood {
        &self.last_good
    }

    /// Why state_dir cannot keep the last valid files, while it cannot.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// A state was applied: its files are saved once things have been quiet
    /// for [`SAVE_DELAY`] unless `save` is false (a refused set is in the
    /// files), and no copy begun before is committed.
    pub fn applied(&mut self, save: bool) {
        self.at = save.then(|| Instant::now() + SAVE_DELAY);
        self.epoch += 1;
    }

    /// The files in place were refused: they are not saved.
    pub fn refused(&mut self) {
        self.at = None;
        self.epoch += 1;
    }

    /// When a save is due.
    pub fn due(&self) -> Option<Instant> {
        self.at
    }

    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Resolves when the save in progress finished (pending without one);
    /// hand the result to [`Saver::finished`].
    pub async fn result(&mut self) -> Result<Saves, oneshot::error::RecvError> {
        match &mut self.job {
            Some((_, rx)) => rx.await,
            None => std::future::pending().await,
        }
    }

    /// The live sets in `held` that differ from the copies already kept.
    fn wanted(&self, held: &Held) -> (Option<PolicySet>, Option<RegistrySet>) {
        fn want<T: Clone + PartialEq>(held: &Option<InForce<T>>, saved: &Option<T>) -> Option<T> {
            held.as_ref()
                .filter(|h| !h.from_saved && saved.as_ref() != Some(&h.set))
                .map(|h| h.set.clone())
        }
        (
            want(&held.policies, &self.saved_policies),
            want(&held.registry, &self.saved_registry),
        )
    }

    /// Begin copying the live files of `held` that differ from the copies
    /// kept, on a thread of its own (one save at a time: when one is under way,
    /// try again later).
    pub fn start(&mut self, held: &Held, reader: Arc<dyn SavedReader>) {
        if self.job.is_some() {
            self.at = Some(Instant::now() + SAVE_DELAY);
            return;
        }
        self.at = None;
        let (policies, registry) = self.wanted(held);
        if policies.is_none() && registry.is_none() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let (last_good, sources) = (self.last_good.clone(), self.sources.clone());
        std::thread::spawn(move || {
            let _ = tx.send(prepare(&last_good, &sources, &*reader, policies, registry));
        });
        self.job = Some((self.epoch, rx));
    }

    /// The save thread's result ([`Saver::result`]): commit its copies if
    /// nothing changed meanwhile.
    pub fn finished(&mut self, r: Result<Saves, oneshot::error::RecvError>, log: &Logger) {
        let Some((epoch, _)) = self.job.take() else {
            return;
        };
        if let Ok(saves) = r {
            self.commit(epoch, saves, log);
        }
    }

    /// Stopping: wait for the save in progress, and save now what is due.
    pub async fn stop(&mut self, held: &Held, reader: Arc<dyn SavedReader>, log: &Logger) {
        if let Some((epoch, rx)) = self.job.take() {
            if let Ok(saves) = rx.await {
                self.commit(epoch, saves, log);
            }
        }
        if self.at.take().is_some() {
            let (policies, registry) = self.wanted(held);
            let saves = prepare(&self.last_good, &self.sources, &*reader, policies, registry);
            self.commit(self.epoch, saves, log);
        }
    }

    fn commit(&mut self, epoch: u64, saves: Saves, log: &Logger) {
        let current = epoch == self.epoch;
        let mut errors = Vec::new();
        let lg = &self.last_good;
        commit_kind(
            lg,
            saves.policies,
            current,
            &mut self.saved_policies,
            &mut errors,
            log,
        );
        commit_kind(
            lg,
            saves.registry,
            current,
            &mut self.saved_registry,
            &mut errors,
            log,
        );
        if errors.is_empty() {
            if self.error.take().is_some() {
                slog::info!(log, "state_dir is writable again");
            }
        } else {
            let msg = errors.join("; ");
            if self.error.as_deref() != Some(&msg) {
                slog::warn!(log, "cannot keep the last valid files; enforcement continues"; "error" => &msg);
            }
            self.error = Some(msg);
        }
    }
}

/// Make one kind's prepared copy the saved one, when it is still current.
fn commit_kind<T: InputSet>(
    lg: &LastGood,
    save: Option<KindSave<T>>,
    current: bool,
    saved: &mut Option<T>,
    errors: &mut Vec<String>,
    log: &Logger,
) {
    let kind = T::KIND;
    let Some(KindSave { prepared, set }) = save else {
        return;
    };
    match prepared {
        Err(e) => errors.push(e),
        Ok(None) => {
            slog::debug!(log, "files changed while being saved; keeping the older copy"; "kind" => ?kind)
        }
        Ok(Some(p)) if !current => {
            slog::debug!(log, "inputs changed while being saved; the copy is dropped"; "kind" => ?kind);
            lg.discard(p);
        }
        Ok(Some(p)) => match lg.commit(&p) {
            Err(e) => {
                errors.push(chain(&e));
                lg.discard(p);
            }
            Ok(()) => *saved = Some(set),
        },
    }
}

/// Copy and verify the inputs of each wanted kind (after removing older
/// copies: saves run one at a time, so none is in progress).
fn prepare(
    last_good: &LastGood,
    sources: &Sources,
    reader: &dyn SavedReader,
    policies: Option<PolicySet>,
    registry: Option<RegistrySet>,
) -> Saves {
    Saves {
        policies: policies.map(|set| {
            prepare_kind(
                last_good,
                std::slice::from_ref(&sources.policy_dir),
                reader,
                set,
            )
        }),
        registry: registry.map(|set| prepare_kind(last_good, &sources.endpoint_dirs, reader, set)),
    }
}

fn prepare_kind<T: InputSet>(
    last_good: &LastGood,
    dirs: &[PathBuf],
    reader: &dyn SavedReader,
    set: T,
) -> KindSave<T> {
    let kind: Kind = T::KIND;
    last_good.remove_old(kind);
    let prepared = last_good
        .prepare(kind, dirs, |d| T::read_saved(reader, d).is_ok())
        .map_err(|e| chain(&e));
    KindSave { prepared, set }
}
