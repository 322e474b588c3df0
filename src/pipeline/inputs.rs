//! Where the two input sets come from: the [`Inputs`] trait, the seam between
//! the pipeline and whatever holds the policies and the registry, and
//! [`FileInputs`], the policy directory and endpoint directories of a config.
//!
//! Owns the contract a source keeps (all-or-nothing per kind, what a
//! [`Hint`] promises, what `Unchanged` means); reads through `api` and never
//! compiles, applies or writes anything.
//!
//! Fleet mode (the registry and policies on etcd) plugs in here: its source
//! reads the same local files as [`FileInputs`] (all-or-nothing, as today) and
//! merges them with a remote view it keeps current on its own (a watch, applied
//! on a fixed tick), validating remote entries one by one and reporting the
//! ones it drops among the kind's problems; the policy set becomes the local
//! files ∪ the remote current set. It wakes the daemon through
//! [`Inputs::wakeups`] when the view moved, and reads saved copies merged with
//! the view it cached ([`Inputs::saved`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::api::load::{FileKind, Parsed};
use crate::api::model::{PolicySet, RegistrySet};
use crate::api::{LoadCache, LoadOptions, Problem, Warning};
use crate::config::Config;

/// Which input set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Policies,
    Registry,
}

/// What may have changed since the caller's last read of a kind.
#[derive(Debug, Clone, Copy)]
pub enum Hint<'a> {
    /// The caller holds no set from this source for this kind (its first read,
    /// or it enforces a saved copy): return the whole set or its problems, never
    /// [`Read::Unchanged`].
    Whole,
    /// The caller holds the last valid set this source returned; anything may
    /// have changed (a reload, the resync timer, a retry, lost file events): look
    /// at everything.
    Anything,
    /// The caller holds the last valid set this source returned, and of its
    /// files only these can have changed, as the directory watch named them.
    /// Whatever else the source reads (a remote view) it knows about itself.
    Files(&'a BTreeSet<PathBuf>),
}

/// One read of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// Nothing changed since the last read of this kind, which was valid: the
    /// caller keeps the set it has. Never the answer to [`Hint::Whole`].
    Unchanged,
    /// The whole set, valid as a whole.
    Valid(T),
    /// The set is invalid: every problem, each naming its file (or key) and
    /// field. Nothing of the set may be used.
    Invalid(Vec<Problem>),
}

impl<T> From<Result<T, Vec<Problem>>> for Read<T> {
    fn from(r: Result<T, Vec<Problem>>) -> Read<T> {
        match r {
            Ok(set) => Read::Valid(set),
            Err(problems) => Read::Invalid(problems),
        }
    }
}

/// A source of the daemon's (and `netpolctl`'s) two input sets.
///
/// The contract, for each kind on its own:
/// - **all or nothing**: a read returns one whole valid set or every problem,
///   never a part of a set;
/// - [`Read::Unchanged`] only when the previous read of that kind returned
///   [`Read::Valid`] and nothing changed since, and never for [`Hint::Whole`];
///   after [`Read::Invalid`] the next read answers with the set or the problems
///   again;
/// - reads run on the reconcile loop: they may read local files but must not
///   wait on the network (a remote part is read from the view the source keeps,
///   refreshed elsewhere), and they must not fail for a remote outage (an
///   outage leaves the view as it was);
/// - the same inputs read the same: hosts given the same files (and remote
///   revision) compute the same sets.
pub trait Inputs: Send {
    /// Read the policy set.
    fn policies(&mut self, hint: Hint<'_>) -> Read<PolicySet>;

    /// Read the registry.
    fn registry(&mut self, hint: Hint<'_>) -> Read<RegistrySet>;

    /// Both kinds are about to be read whole (a first pass): a source may
    /// start on both at once (files parsed side by side on the machine's cores).
    fn prefetch(&mut self) {}

    /// Files parsed by the last read of each kind, for the apply log line.
    fn files_parsed(&self) -> usize {
        0
    }

    /// The warnings of the inputs as the last read of each kind saw them,
    /// the policies' first: accepted input worth a look (`netpolctl check
    /// --strict` fails on them); they never refuse a set.
    fn warnings(&self) -> Vec<Warning> {
        Vec::new()
    }

    /// Problems that refuse no set, found by the last reads: a remote part
    /// kept at its last valid state while its current one is invalid. The
    /// daemon reports them with the kinds' problems.
    fn problems(&self) -> Vec<Problem> {
        Vec::new()
    }

    /// How a saved copy of the local directories is read back (the daemon
    /// keeps copies under `state_dir/last-good`): to check a copy before it is
    /// kept (on a thread beside the loop), and to start from it when the live
    /// inputs are invalid. A source with a remote part merges the view it
    /// cached here, as it does for live reads.
    fn saved(&self) -> Arc<dyn SavedReader>;

    /// "Look again" signals for changes no file event shows (a remote view
    /// that moved); `None` when every change is in the watched files. Taken once,
    /// when the daemon starts; each message is a reconcile with [`Hint::Files`].
    fn wakeups(&mut self) -> Option<mpsc::UnboundedReceiver<()>> {
        None
    }
}

/// Reads a kind from a saved copy of its local directories; all-or-nothing
/// like a live read.
pub trait SavedReader: Send + Sync {
    fn policies(&self, dir: &Path) -> Result<PolicySet, Vec<Problem>>;
    fn registry(&self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>>;
}

/// Where a caller keeps its saved copies (the daemon's `last-good`): the
/// directories of a kind's copy, `None` when there is none.
pub trait SavedCopies {
    fn dirs(&self, kind: Kind) -> Option<Vec<PathBuf>>;
}

/// No saved copies (a one-pass caller such as `netpolctl check`).
impl SavedCopies for () {
    fn dirs(&self, _: Kind) -> Option<Vec<PathBuf>> {
        None
    }
}

/// The two input sets as one generic step reads them.
pub trait InputSet: Sized + Send + 'static {
    const KIND: Kind;
    fn read(inputs: &mut dyn Inputs, hint: Hint<'_>) -> Read<Self>;
    fn read_saved(reader: &dyn SavedReader, dirs: &[PathBuf]) -> Result<Self, Vec<Problem>>;
}

impl InputSet for PolicySet {
    const KIND: Kind = Kind::Policies;
    fn read(inputs: &mut dyn Inputs, hint: Hint<'_>) -> Read<Self> {
        inputs.policies(hint)
    }
    fn read_saved(reader: &dyn SavedReader, dirs: &[PathBuf]) -> Result<Self, Vec<Problem>> {
        match dirs.first() {
            Some(d) => reader.policies(d),
            None => Err(Vec::new()),
        }
    }
}

impl InputSet for RegistrySet {
    const KIND: Kind = Kind::Registry;
    fn read(inputs: &mut dyn Inputs, hint: Hint<'_>) -> Read<Self> {
        inputs.registry(hint)
    }
    fn read_saved(reader: &dyn SavedReader, dirs: &[PathBuf]) -> Result<Self, Vec<Problem>> {
        reader.registry(dirs)
    }
}

/// The files of a config: its policy directory and endpoint directories, read
/// with its `strict_file_modes`, through a [`LoadCache`] when the reader reads
/// again (the daemon) and without one for a single read (`netpolctl`).
#[derive(Debug)]
pub struct FileInputs {
    policy_dir: Vec<PathBuf>,
    endpoint_dirs: Vec<PathBuf>,
    opts: LoadOptions,
    cache: Option<LoadCache>,
    /// Files parsed by the last read of each kind.
    parsed: [usize; 2],
    /// The warnings of the last read of each kind that parsed the files.
    warnings: [Vec<Warning>; 2],
}

impl FileInputs {
    /// For a reader that reads again and again: unchanged files keep their parse.
    pub fn new(config: &Config) -> FileInputs {
        FileInputs {
            cache: Some(LoadCache::new()),
            ..FileInputs::once(config)
        }
    }

    /// For one read.
    pub fn once(config: &Config) -> FileInputs {
        FileInputs {
            policy_dir: vec![config.policy_dir.clone()],
            endpoint_dirs: config.endpoint_dirs.clone(),
            opts: config.load_options(),
            cache: None,
            parsed: [0; 2],
            warnings: [Vec::new(), Vec::new()],
        }
    }

    fn read(&mut self, want: FileKind, hint: Hint<'_>) -> Option<Parsed> {
        let (dirs, n) = match want {
            FileKind::Policy => (&self.policy_dir, 0),
            FileKind::Registry => (&self.endpoint_dirs, 1),
        };
        let mut out = match self.cache.as_mut() {
            None => {
                let out = crate::api::load_dirs(dirs, want, &self.opts, None);
                self.parsed[n] = out.files.len();
                Some(out)
            }
            Some(cache) => {
                let out = match hint {
                    Hint::Whole => Some(cache.load(dirs, want, &self.opts)),
                    Hint::Anything => cache.load_if_changed(dirs, want, &self.opts, None),
                    Hint::Files(t) => cache.load_if_changed(dirs, want, &self.opts, Some(t)),
                };
                self.parsed[n] = cache.last_parsed();
                out
            }
        };
        if let Some(out) = out.as_mut() {
            self.warnings[n] = out.take_warnings();
        }
        out
    }
}

impl Inputs for FileInputs {
    fn prefetch(&mut self) {
        if let Some(cache) = self.cache.as_mut() {
            cache.prefetch(
                &[
                    (&self.policy_dir, FileKind::Policy),
                    (&self.endpoint_dirs, FileKind::Registry),
                ],
                &self.opts,
            );
        }
    }

    fn policies(&mut self, hint: Hint<'_>) -> Read<PolicySet> {
        match self.read(FileKind::Policy, hint) {
            None => Read::Unchanged,
            Some(p) => p.into_policy_set().into(),
        }
    }

    fn registry(&mut self, hint: Hint<'_>) -> Read<RegistrySet> {
        match self.read(FileKind::Registry, hint) {
            None => Read::Unchanged,
            Some(p) => p.into_registry_set().into(),
        }
    }

    fn files_parsed(&self) -> usize {
        self.parsed.iter().sum()
    }

    fn warnings(&self) -> Vec<Warning> {
        self.warnings.concat()
    }

    fn saved(&self) -> Arc<dyn SavedReader> {
        Arc::new(SavedFiles)
    }
}

/// Saved copies of files, read strictly (netpold writes them, private).
pub(crate) struct SavedFiles;

impl SavedReader for SavedFiles {
    fn policies(&self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        crate::api::load_policy_dir(dir)
    }
    fn registry(&self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        crate::api::load_endpoint_dirs(dirs)
    }
}
