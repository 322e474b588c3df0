//! Loading the same directories again without re-parsing files that did not
//! change: an option of the one load ([`super::load_dirs`] given
//! `Some(&mut cache)`, or [`LoadCache::load_if_changed`]), not a second copy of
//! its steps. A load
//! with a cache lists, checks trust, reads and runs the cross-file checks exactly
//! as one without; the cache only decides, per file, whether a parse it kept
//! stands for the file, by the file's identity (device, inode, size, mtime,
//! ctime). The result is always exactly what a load without the cache returns.
//!
//! A file modified within the timestamp granularity of its last read could look
//! unchanged, so (like git's "racy clean" rule) a file is only kept when its
//! timestamps are at least [`SETTLED`] older than the moment it was read.
//!
//! Between full looks, a caller can say which files changed since its last load
//! (`touched`, from watch events): then only those files (and symlinks, whose
//! targets change without an event here) are looked at again, and every other
//! file keeps its parse without even a stat. A full look (list and stat every
//! file) happens whenever no such list is given, and whenever the last load of
//! those directories was not valid.
//!
//! Owns only the kept parses; reads nothing but the files a load lists.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::load::{self, DirListing, FileKind, LoadOptions, Parsed};

/// How old a file's timestamps must be for its parse to be kept.
pub const SETTLED: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }

    fn settled(&self, read_at: SystemTime, margin: Duration) -> bool {
        let now = read_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let newest = self.mtime_ns.max(self.ctime_ns);
        now - newest >= margin.as_nanos() as i128
    }
}

/// The parse of one file.
#[derive(Debug, Default)]
struct Piece {
    parsed: Parsed,
    /// Its timestamps told it apart from a later write when it was read, so a
    /// full look may keep it when its identity is unchanged.
    settled: bool,
}

impl Piece {
    fn append_to(&self, out: &mut Parsed) {
        let p = &self.parsed;
        out.policies.extend(p.policies.iter().cloned());
        out.endpoints.extend(p.endpoints.iter().cloned());
        out.nodes.extend(p.nodes.iter().cloned());
        out.namespaces.extend(p.namespaces.iter().cloned());
        out.problems.extend(p.problems.iter().cloned());
        out.warnings.extend(p.warnings.iter().cloned());
        out.files.extend(p.files.iter().cloned());
    }
}

/// The files a load saw, and whether its result was valid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    dirs: Vec<PathBuf>,
    files: Vec<(PathBuf, FileId)>,
    ok: bool,
}

/// The listing of the last load, kept up to date by loads that look only at
/// the touched files.
#[derive(Debug, Clone, Default)]
struct Listed {
    dirs: Vec<PathBuf>,
    /// Per directory, sorted as a load lists them.
    files: Vec<Vec<PathBuf>>,
    /// Entries that are symlinks.
    links: HashSet<PathBuf>,
    /// The load's result was valid.
    ok: bool,
}

impl Listed {
    /// The listing of a load, when every directory could be listed.
    fn of(dirs: &[PathBuf], listing: &[DirListing]) -> Option<Listed> {
        let mut links = HashSet::new();
        let files = listing
            .iter()
            .map(|d| {
                let files = d.files.as_ref().ok()?;
                links.extend(files.iter().filter(|(_, l)| *l).map(|(f, _)| f.clone()));
                Some(files.iter().map(|(f, _)| f.clone()).collect())
            })
            .collect::<Option<Vec<Vec<PathBuf>>>>()?;
        Some(Listed {
            dirs: dirs.to_vec(),
            files,
            links,
            ok: false,
        })
    }

    /// The listing as a load takes it (no trust problem: a valid load had none).
    fn listing(&self) -> Vec<DirListing> {
        self.dirs
            .iter()
            .zip(&self.files)
            .map(|(dir, files)| DirListing {
                dir: dir.clone(),
                files: Ok(files
                    .iter()
                    .map(|f| (f.clone(), self.links.contains(f)))
                    .collect()),
                distrust: Vec::new(),
            })
            .collect()
    }
}

/// Index of a kind in the per-kind arrays (`seen`, `listed`).
fn slot(want: FileKind) -> usize {
    match want {
        FileKind::Policy => 0,
        FileKind::Registry => 1,
    }
}

/// The kept parses of one caller's loads (both kinds).
#[derive(Debug)]
pub struct LoadCache {
    files: HashMap<PathBuf, (FileId, Piece)>,
    /// What the last load of each kind saw (policies, registry).
    seen: [Option<Seen>; 2],
    /// The last listing of each kind, for loads given the touched files.
    listed: [Option<Listed>; 2],
    /// Files parsed in the last load.
    last_parsed: usize,
    settled: Duration,
    /// The options the kept parses were read with: a load with other options
    /// starts afresh (a parse read without the trust check must not stand for
    /// one read with it).
    opts: Option<LoadOptions>,
    /// Parses made ahead by [`LoadCache::prefetch`] with the identity each
    /// file had before it was read: a load uses one for a file whose identity
    /// it lists the same, as if it had read the file itself.
    prefetched: HashMap<PathBuf, (Option<FileId>, Read)>,
    /// Per kind, the cross-file keys of the last load when it was valid and
    /// looked only at the touched files (built by the first such load): the
    /// next one checks its files against them, not the whole set again.
    set_index: [Option<load::SetIndex>; 2],
    /// The last load given the touched files checked the whole set (no
    /// index, or a key it added was held): for the tests.
    checked_whole: bool,
}

impl Default for LoadCache {
    fn default() -> Self {
        LoadCache::with_margin(SETTLED)
    }
}

impl LoadCache {
    pub fn new() -> LoadCache {
        LoadCache::default()
    }

    /// A cache that keeps a file once its timestamps are `settled` old.
    fn with_margin(settled: Duration) -> LoadCache {
        LoadCache {
            files: HashMap::new(),
            seen: [None, None],
            listed: [None, None],
            last_parsed: 0,
            settled,
            opts: None,
            prefetched: HashMap::new(),
            set_index: [None, None],
            checked_whole: false,
        }
    }

    /// Parse ahead, side by side, every file of these directories that a load
    /// of them would parse (both kinds at once at start): the loads that
    /// follow take the parses instead of reading the files one after another.
    pub fn prefetch(&mut self, sets: &[(&[PathBuf], FileKind)], opts: &LoadOptions) {
        self.use_options(opts);
        let mut todo: Vec<(PathBuf, Option<FileId>, FileKind)> = Vec::new();
        for (dirs, want) in sets {
            let listing = load::list_dirs(dirs, *want, opts);
            for (f, id) in identities(&listing) {
                if !is_kept(&self.files, &f, id) {
                    todo.push((f, id, *want));
                }
            }
        }
        let items: Vec<(&Path, FileKind)> =
            todo.iter().map(|(f, _, w)| (f.as_path(), *w)).collect();
        let mut reads = parse_in_parallel(&items, opts);
        for (f, id, _) in todo {
            if let Some(read) = reads.remove(&f) {
                self.prefetched.insert(f, (id, read));
            }
        }
    }

    /// How many files the last load read and parsed (the others kept their parse).
    pub fn last_parsed(&self) -> usize {
        self.last_parsed
    }

    fn use_options(&mut self, opts: &LoadOptions) {
        if self.opts != Some(*opts) {
            *self = LoadCache {
                opts: Some(*opts),
                ..LoadCache::with_margin(self.settled)
            };
        }
    }

    fn record_ok(&mut self, want: FileKind, out: &Parsed) {
        let ok = out.problems.is_empty();
        let kind = slot(want);
        if let Some(s) = self.seen[kind].as_mut() {
            s.ok = ok;
        }
        if let Some(l) = self.listed[kind].as_mut() {
            l.ok = ok;
        }
    }

    /// [`super::load_dirs`] through this cache: a full look (list and stat
    /// every file), reusing the parse of every file whose identity is unchanged.
    pub fn load(&mut self, dirs: &[PathBuf], want: FileKind, opts: &LoadOptions) -> Parsed {
        self.use_options(opts);
        let listing = load::list_dirs(dirs, want, opts);
        self.listed[slot(want)] = Listed::of(dirs, &listing);
        let ids = identities(&listing);
        let out = self.load_listed(dirs, &listing, &ids, want, opts);
        self.record_ok(want, &out);
        out
    }

    /// Like [`LoadCache::load`], but `None` when the last load of these
    /// directories through this cache was valid and no file changed since (the
    /// caller keeps that result). With `touched`, only those files can have
    /// changed since the last load (`None`: any file may have).
    pub fn load_if_changed(
        &mut self,
        dirs: &[PathBuf],
        want: FileKind,
        opts: &LoadOptions,
        touched: Option<&BTreeSet<PathBuf>>,
    ) -> Option<Parsed> {
        self.use_options(opts);
        if let Some(r) = touched.and_then(|t| self.load_touched(dirs, want, opts, t)) {
            if let Some(out) = &r {
                self.record_ok(want, out);
            }
            return r;
        }
        let kind = slot(want);
        let listing = load::list_dirs(dirs, want, opts);
        self.listed[kind] = Listed::of(dirs, &listing);
        let ids = identities(&listing);
        // Every directory listed and trusted, every file stat'ed and kept with
        // that identity: the load can be recognised.
        let whole = listing
            .iter()
            .all(|d| d.files.is_ok() && d.distrust.is_empty());
        let kept = |files: &HashMap<PathBuf, (FileId, Piece)>| -> Option<Vec<(PathBuf, FileId)>> {
            if !whole {
                return None;
            }
            ids.iter()
                .map(|(f, id)| {
                    let id = (*id)?;
                    matches!(files.get(f), Some((c, p)) if *c == id && p.settled)
                        .then(|| (f.clone(), id))
                })
                .collect()
        };
        if let (Some(now), Some(seen)) = (kept(&self.files), &self.seen[kind]) {
            if seen.ok && seen.dirs == dirs && seen.files == now {
                self.last_parsed = 0;
                if let Some(l) = self.listed[kind].as_mut() {
                    l.ok = true;
                }
                return None;
            }
        }
        let out = self.load_listed(dirs, &listing, &ids, want, opts);
        // Only a load made entirely of kept parses can be recognised later.
        self.seen[kind] = kept(&self.files).map(|files| Seen {
            dirs: dirs.to_vec(),
            files,
            ok: false,
        });
        self.record_ok(want, &out);
        Some(out)
    }

    /// Only the touched files (and symlinks) looked at again: `None` when that
    /// cannot answer (no valid load of the same directories to start from), else
    /// `Some(None)` for "nothing changed" or the new parse.
    fn load_touched(
        &mut self,
        dirs: &[PathBuf],
        want: FileKind,
        opts: &LoadOptions,
        touched: &BTreeSet<PathBuf>,
    ) -> Option<Option<Parsed>> {
        let kind = slot(want);
        let prev = self.listed[kind]
            .as_ref()
            .filter(|l| l.ok && l.dirs == dirs)?;
        let mine: Vec<(usize, &PathBuf)> = touched
            .iter()
            .filter_map(|p| {
                Some((
                    dirs.iter().position(|d| Some(d.as_path()) == p.parent())?,
                    p,
                ))
            })
            .collect();
        if mine.is_empty() && prev.links.is_empty() {
            self.last_parsed = 0;
            return Some(None);
        }
        let mut listed = self.listed[kind].take().expect("checked above");
        // The set's keys less those of the files read again or gone:
        // each such file's kept parse is what the keys hold of it (one
        // without is a file whose keys cannot be taken out: no index).
        let mut index = self.set_index[kind].take();
        let unkeyed = |index: &mut Option<load::SetIndex>, piece: Option<&Piece>| match (
            index.as_mut(),
            piece,
        ) {
            (Some(ix), Some(piece)) => ix.remove(&piece.parsed),
            _ => *index = None,
        };
        let mut new_files: HashSet<PathBuf> = HashSet::new();
        for (di, p) in mine {
            let list = &mut listed.files[di];
            match std::fs::symlink_metadata(p) {
                Ok(m) => {
                    if let Err(i) = list.binary_search(p) {
                        list.insert(i, p.clone());
                        new_files.insert(p.clone());
                    }
                    if m.file_type().is_symlink() {
                        listed.links.insert(p.clone());
                    } else {
                        listed.links.remove(p);
                    }
                }
                Err(_) => {
                    if let Ok(i) = list.binary_search(p) {
                        list.remove(i);
                        let gone = self.files.remove(p);
                        unkeyed(&mut index, gone.as_ref().map(|(_, piece)| piece));
                    }
                    listed.links.remove(p);
                    self.files.remove(p);
                }
            }
        }
        let reread = |f: &Path, files: &HashMap<PathBuf, (FileId, Piece)>| {
            touched.contains(f) || listed.links.contains(f) || !files.contains_key(f)
        };
        if index.is_some() {
            for f in listed.files.iter().flatten() {
                if reread(f, &self.files) && !new_files.contains(f) {
                    unkeyed(&mut index, self.files.get(f).map(|(_, piece)| piece));
                }
            }
        }
        // Every listed file from its kept parse, except the touched ones and
        // symlinks (read again) and any without one; the keys of those read
        // again added to the index (all of them new: nothing to check).
        let mut parsed = 0;
        let mut fresh = true;
        let mut out = load::assemble_files(&listed.listing(), |f, out| {
            if !reread(f, &self.files) {
                if let Some((_, piece)) = self.files.get(f) {
                    piece.append_to(out);
                    return;
                }
            }
            let id = FileId::of(f);
            let read = parse_piece(f, want, opts);
            if let Some(ix) = index.as_mut() {
                fresh &= ix.add(&read.0.parsed);
            }
            keep_piece(&mut self.files, self.settled, f, id, read, out);
            parsed += 1;
        });
        self.checked_whole = !(index.is_some() && fresh && out.problems.is_empty());
        match index {
            Some(ix) if fresh && out.problems.is_empty() => self.set_index[kind] = Some(ix),
            _ => {
                load::check_set(want, &mut out);
                if out.problems.is_empty() {
                    self.set_index[kind] = load::SetIndex::of(want, &out);
                }
            }
        }
        self.last_parsed = parsed;
        // Symlinks are read again every time: without a change there is nothing to report.
        self.seen[kind] = None;
        self.listed[kind] = Some(listed);
        Some(Some(out))
    }

    /// The parse of the listed files: a kept parse stands for a file only when
    /// the file's identity at listing time is the one it was kept with, and it
    /// was settled when read.
    fn load_listed(
        &mut self,
        dirs: &[PathBuf],
        listing: &[DirListing],
        ids: &[(PathBuf, Option<FileId>)],
        want: FileKind,
        opts: &LoadOptions,
    ) -> Parsed {
        self.set_index[slot(want)] = None;
        let mut parsed = 0;
        // Parses made ahead stand for files whose identity is the same now.
        let mut fresh: HashMap<PathBuf, Read> = HashMap::new();
        for (f, id) in ids {
            if let Some((before, read)) = self.prefetched.remove(f) {
                if before.is_some() && before == *id {
                    fresh.insert(f.clone(), read);
                }
            }
        }
        // The other files to parse, parsed side by side first when there are
        // several (a fleet registry comes as many files; each parse is
        // independent).
        let files = &mut self.files;
        let todo: Vec<(&Path, FileKind)> = ids
            .iter()
            .filter(|(f, id)| !is_kept(files, f, *id) && !fresh.contains_key(f))
            .map(|(f, _)| (f.as_path(), want))
            .collect();
        fresh.extend(parse_in_parallel(&todo, opts));
        let mut ids = ids.iter();
        let out = load::assemble(listing, want, |f, out| {
            let id = match ids.next() {
                Some((p, id)) if p == f => *id,
                _ => FileId::of(f),
            };
            if let (Some(id), Some((cached, piece))) = (id, files.get(f)) {
                if *cached == id && piece.settled {
                    piece.append_to(out);
                    return;
                }
            }
            let read = fresh
                .remove(f)
                .unwrap_or_else(|| parse_piece(f, want, opts));
            keep_piece(files, self.settled, f, id, read, out);
            parsed += 1;
        });
        // Forget files that are gone (of these directories: the same cache
        // serves both kinds).
        let live: HashSet<&PathBuf> = listing
            .iter()
            .filter_map(|d| d.files.as_ref().ok())
            .flatten()
            .map(|(f, _)| f)
            .collect();
        self.files
            .retain(|p, _| live.contains(p) || !dirs.iter().any(|d| p.starts_with(d)));
        self.last_parsed = parsed;
        out
    }
}

/// Each listed file (of the directories that could be listed) with its
/// identity now (`None`: cannot stat), in listing order.
fn identities(listing: &[DirListing]) -> Vec<(PathBuf, Option<FileId>)> {
    listing
        .iter()
        .filter_map(|d| d.files.as_ref().ok())
        .flatten()
        .map(|(f, _)| (f.clone(), FileId::of(f)))
        .collect()
}

/// A file read and parsed, and when its read began.
type Read = (Piece, SystemTime);

/// Read and parse `f` into a piece of its own.
fn parse_piece(f: &Path, want: FileKind, opts: &LoadOptions) -> Read {
    let read_at = SystemTime::now();
    let mut piece = Piece::default();
    load::read_into(f, want, opts, &mut piece.parsed);
    (piece, read_at)
}

/// A kept parse stands for `f` with identity `id`.
fn is_kept(files: &HashMap<PathBuf, (FileId, Piece)>, f: &Path, id: Option<FileId>) -> bool {
    matches!((id, files.get(f)), (Some(id), Some((cached, piece))) if *cached == id && piece.settled)
}

/// [`parse_piece`] for each of `files`, on as many threads as the machine
/// has cores (at most 4; none but this one for fewer than two files).
fn parse_in_parallel(files: &[(&Path, FileKind)], opts: &LoadOptions) -> HashMap<PathBuf, Read> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(files.len());
    if threads < 2 {
        return HashMap::new();
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    files
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|(f, want)| (f.to_path_buf(), parse_piece(f, *want, opts)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a parse thread panicked"))
            .collect()
    })
}

/// Append a file's parse to `out`, and keep it in `files` when the file
/// (whose identity was `id` before) did not change while it was read.
fn keep_piece(
    files: &mut HashMap<PathBuf, (FileId, Piece)>,
    settled: Duration,
    f: &Path,
    id: Option<FileId>,
    (mut piece, read_at): Read,
    out: &mut Parsed,
) {
    piece.append_to(out);
    // A full look uses a kept parse again only if the file's timestamps also
    // tell it apart from a later write (loads given the touched files rely on
    // the events instead).
    match (id, FileId::of(f)) {
        (Some(before), Some(after)) if before == after => {
            piece.settled = after.settled(read_at, settled);
            files.insert(f.to_path_buf(), (after, piece));
        }
        _ => {
            files.remove(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{PolicySet, RegistrySet};
    use crate::api::Problem;

    const STRICT: LoadOptions = LoadOptions { strict_modes: true };

    /// The typed loads the tests below were written against.
    impl LoadCache {
        fn policies(&mut self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
            self.load(&[dir.to_path_buf()], FileKind::Policy, &STRICT)
                .into_policy_set()
        }
        fn registry(&mut self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
            self.load(dirs, FileKind::Registry, &STRICT)
                .into_registry_set()
        }
        fn policies_if_touched(
            &mut self,
            dir: &Path,
            touched: Option<&BTreeSet<PathBuf>>,
        ) -> Option<Result<PolicySet, Vec<Problem>>> {
            self.load_if_changed(&[dir.to_path_buf()], FileKind::Policy, &STRICT, touched)
                .map(Parsed::into_policy_set)
        }
        fn policies_if_changed(&mut self, dir: &Path) -> Option<Result<PolicySet, Vec<Problem>>> {
            self.policies_if_touched(dir, None)
        }
    }

    const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: NAME}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n";

    #[test]
    fn unchanged_files_are_not_parsed_again_and_results_match_the_parser() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for n in ["a", "b", "c"] {
            std::fs::write(d.join(format!("{n}.yaml")), POLICY.replace("NAME", n)).unwrap();
        }
        let mut c = LoadCache::with_margin(Duration::ZERO);
        let first = c.policies(d).unwrap();
        assert_eq!(c.last_parsed(), 3);
        assert_eq!(Ok(first.clone()), crate::api::load_policy_dir(d));
        let again = c.policies(d).unwrap();
        assert_eq!(c.last_parsed(), 0);
        assert_eq!(again, first);

        // A changed file is parsed again, a removed one dropped; cross-file checks run.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        std::fs::remove_file(d.join("c.yaml")).unwrap();
        let e = c.policies(d).unwrap_err();
        assert_eq!(c.last_parsed(), 1);
        assert_eq!(Err(e), crate::api::load_policy_dir(d));
        assert_eq!(c.files.len(), 2);
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b")).unwrap();
        assert_eq!(c.policies(d), crate::api::load_policy_dir(d));
        assert_eq!(c.last_parsed(), 1);
    }

    /// Files parsed ahead (side by side, both kinds) give the loads that
    /// follow what reading them gives; a file that changed since is read again.
    #[test]
    fn prefetched_parses_stand_for_unchanged_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (pd, ed) = (tmp.path().join("p"), tmp.path().join("e"));
        std::fs::create_dir(&pd).unwrap();
        std::fs::create_dir(&ed).unwrap();
        for n in ["a", "b", "c"] {
            std::fs::write(pd.join(format!("{n}.yaml")), POLICY.replace("NAME", n)).unwrap();
        }
        let ep = "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: NAME}\nspec: {addresses: [ADDR]}\n";
        std::fs::write(
            ed.join("x.yaml"),
            ep.replace("NAME", "x").replace("ADDR", "10.0.0.1"),
        )
        .unwrap();
        let (pds, eds) = ([pd.clone()], [ed.clone()]);
        let mut c = LoadCache::with_margin(Duration::ZERO);
        c.prefetch(
            &[(&pds, FileKind::Policy), (&eds, FileKind::Registry)],
            &STRICT,
        );
        assert_eq!(c.prefetched.len(), 4);
        // b.yaml changes after it was parsed ahead: its parse is not used.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(pd.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        assert_eq!(c.policies(&pd), crate::api::load_policy_dir(&pd));
        assert!(
            c.policies(&pd).is_err(),
            "b.yaml as it is now: a duplicate name"
        );
        assert_eq!(c.registry(&eds), crate::api::load_endpoint_dirs(&eds));
        assert!(
            c.prefetched.is_empty(),
            "every parse made ahead was taken or dropped"
        );
    }

    #[test]
    fn if_changed_reports_unchanged_only_after_a_valid_load_of_the_same_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("a.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let mut c = LoadCache::with_margin(Duration::ZERO);
        assert!(c.policies_if_changed(d).unwrap().is_ok());
        assert!(c.policies_if_changed(d).is_none(), "nothing changed");
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b")).unwrap();
        assert_eq!(
            c.policies_if_changed(d).unwrap(),
            crate::api::load_policy_dir(d),
            "a new file"
        );
        assert!(c.policies_if_changed(d).is_none());
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let e = c.policies_if_changed(d).unwrap();
        assert!(e.is_err(), "duplicate name");
        assert_eq!(
            c.policies_if_changed(d).unwrap(),
            e,
            "an invalid set is always loaded again"
        );
        std::fs::remove_file(d.join("b.yaml")).unwrap();
        assert!(c.policies_if_changed(d).unwrap().is_ok(), "a removed file");
        assert!(c.policies_if_changed(d).is_none());
        // Unsettled files are never taken as unchanged.
        let mut fresh = LoadCache::default();
        std::fs::write(d.join("c.yaml"), POLICY.replace("NAME", "c")).unwrap();
        assert!(fresh.policies_if_changed(d).is_some());
        assert!(fresh.policies_if_changed(d).is_some());
    }

    #[test]
    fn touched_files_are_read_again_and_the_others_kept_unseen() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for n in ["a", "b"] {
            std::fs::write(d.join(format!("{n}.yaml")), POLICY.replace("NAME", n)).unwrap();
        }
        let mut c = LoadCache::default();
        let none = BTreeSet::new();
        let only = |p: &str| BTreeSet::from([d.join(p)]);
        assert!(c.policies_if_touched(d, None).unwrap().is_ok());
        assert!(
            c.policies_if_touched(d, Some(&none)).is_none(),
            "nothing named: nothing changed"
        );
        assert_eq!(c.last_parsed(), 0);
        // A touched file is read again even when written within the same tick.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let r = c.policies_if_touched(d, Some(&only("b.yaml"))).unwrap();
        assert_eq!(c.last_parsed(), 1);
        assert!(r.is_err(), "duplicate name");
        assert_eq!(r, crate::api::load_policy_dir(d));
        // After an invalid load, everything is looked at again.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b")).unwrap();
        assert_eq!(
            c.policies_if_touched(d, Some(&none)).unwrap(),
            crate::api::load_policy_dir(d)
        );
        // New and removed files.
        std::fs::write(d.join("c.yaml"), POLICY.replace("NAME", "c")).unwrap();
        std::fs::remove_file(d.join("a.yaml")).unwrap();
        let touched = BTreeSet::from([
            d.join("c.yaml"),
            d.join("a.yaml"),
            d.join("elsewhere/x.yaml"),
        ]);
        let r = c.policies_if_touched(d, Some(&touched)).unwrap();
        assert_eq!(c.last_parsed(), 1, "only c.yaml is read");
        assert_eq!(r, crate::api::load_policy_dir(d));
        assert_eq!(r.unwrap().policies.len(), 2);
        // A change no event named is not seen until a full look.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b2")).unwrap();
        assert!(c.policies_if_touched(d, Some(&none)).is_none());
        let r = c.policies_if_touched(d, None).unwrap();
        assert_eq!(r, crate::api::load_policy_dir(d));
        assert!(r.unwrap().policies.iter().any(|p| p.origin.name == "b2"));
    }

    /// Random changes to the files of `subdirs` (one of `files` files per
    /// step, rewritten with what `write` gives or removed), each loaded given
    /// the touched file: every load answers as a full load (`summary` of
    /// each), an index is kept only for a set `keeps` allows one, and one
    /// kept stays over such a change; most `valid` changes over an index are
    /// checked against it rather than the whole set.
    #[allow(clippy::too_many_arguments)]
    fn touched_loads_answer_as_full_loads<S: PartialEq + std::fmt::Debug>(
        want: FileKind,
        subdirs: &[&str],
        files: u64,
        seed: u64,
        write: impl Fn(&mut dyn FnMut(u64) -> u64) -> String,
        summary: impl Fn(Parsed) -> S,
        valid: impl Fn(&S) -> bool,
        keeps: impl Fn(&S) -> bool,
    ) {
        let mut rand = crate::hash::xorshift(seed);
        let kind = slot(want);
        let (mut indexed, mut valid_changes) = (0, 0);
        for _ in 0..40 {
            let tmp = tempfile::tempdir().unwrap();
            let dirs: Vec<PathBuf> = subdirs.iter().map(|d| tmp.path().join(d)).collect();
            for d in &dirs {
                std::fs::create_dir_all(d).unwrap();
            }
            let mut c = LoadCache::default();
            let opts = LoadOptions {
                strict_modes: false,
            };
            let full = |dirs: &[PathBuf]| summary(crate::api::load_dirs(dirs, want, &opts, None));
            let first = c.load_if_changed(&dirs, want, &opts, None).map(&summary);
            assert_eq!(first, Some(full(&dirs)));
            for step in 0..30 {
                let dir = &dirs[rand(dirs.len() as u64) as usize];
                let f = dir.join(format!("f{}.yaml", rand(files)));
                if rand(6) == 0 {
                    let _ = std::fs::remove_file(&f);
                } else {
                    std::fs::write(&f, write(&mut rand)).unwrap();
                }
                let had_index = c.set_index[kind].is_some();
                let touched = BTreeSet::from([f.clone()]);
                let got = c
                    .load_if_changed(&dirs, want, &opts, Some(&touched))
                    .map(&summary);
                let now = full(&dirs);
                if let Some(got) = &got {
                    assert_eq!(got, &now, "step {step}: {}", f.display());
                    if valid(got) && had_index {
                        valid_changes += 1;
                        indexed += usize::from(!c.checked_whole);
                    }
                }
                if !keeps(&now) {
                    assert!(
                        c.set_index[kind].is_none(),
                        "step {step}: an index of a set that may not have one"
                    );
                } else if had_index {
                    assert!(
                        c.set_index[kind].is_some(),
                        "step {step}: the index dropped"
                    );
                }
            }
        }
        assert!(
            valid_changes > 100,
            "{valid_changes} valid changes over an index"
        );
        assert!(
            indexed * 10 > valid_changes * 7,
            "{indexed} of {valid_changes} checked against the index"
        );
    }

    /// Over random registry files in two directories (names, addresses and
    /// interfaces that clash across files and within one, HostEndpoints
    /// sharing their Node's address), a load given the touched file answers
    /// as a full load, problems included, and an invalid registry keeps no
    /// index.
    #[test]
    fn a_registry_change_checked_against_the_index_answers_as_a_full_load() {
        touched_loads_answer_as_full_loads(
            FileKind::Registry,
            &["a", "b"],
            3,
            0x9e37_79b9_7f4a_7c15,
            |rand| {
                let mut docs = Vec::new();
                for _ in 0..rand(4) {
                    let (n, a) = (rand(40), rand(60));
                    let doc = match rand(8) {
                        0 => format!("kind: Node\nmetadata: {{name: node{}}}\nspec: {{addresses: [10.0.0.{a}]}}", n % 3),
                        1 => format!("kind: HostEndpoint\nmetadata: {{name: h{n}}}\nspec: {{node: node{}, addresses: [10.0.0.{a}]}}", n % 3),
                        _ => {
                            let iface = match rand(3) {
                                0 => format!(", interface: veth{}", rand(6)),
                                _ => String::new(),
                            };
                            format!("kind: Endpoint\nmetadata: {{name: e{n}, labels: {{app: a{}}}}}\nspec: {{addresses: [10.0.0.{a}, 10.0.1.{}]{iface}}}", n % 3, rand(64))
                        }
                    };
                    docs.push(format!("apiVersion: netpol/v1\n{doc}\n"));
                }
                docs.join("---\n")
            },
            Parsed::into_registry_set,
            Result::is_ok,
            Result::is_ok,
        );
    }

    /// The same for policy files: names that clash within a kind (a
    /// problem) and across kinds (a warning, which a set with one keeps no
    /// index for), problems and warnings as a full load gives them.
    #[test]
    fn a_policy_change_checked_against_the_index_answers_as_a_full_load() {
        let duplicate = |w: &crate::api::Warning| w.code == crate::api::WarningCode::DuplicateName;
        touched_loads_answer_as_full_loads(
            FileKind::Policy,
            &["p"],
            4,
            0x2545_f491_4f6c_dd1d,
            |rand| {
                let docs: Vec<String> = (0..rand(4))
                    .map(|_| {
                        let n = rand(30);
                        match rand(6) {
                            0 => format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{n}}}\nspec: {{podSelector: {{}}}}\n"),
                            1 => format!("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: p{n}}}\nspec: {{endpointSelector: {{}}}}\n"),
                            _ => format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{n}}}\nspec: {{endpointSelector: {{}}, ingress: [{{}}]}}\n"),
                        }
                    })
                    .collect();
                docs.join("---\n")
            },
            |p| (p.warnings.clone(), p.into_policy_set()),
            |s| s.1.is_ok(),
            |s| s.1.is_ok() && !s.0.iter().any(duplicate),
        );
    }

    #[test]
    fn symlinked_files_are_read_again_without_events() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("netpol.d");
        std::fs::create_dir(&d).unwrap();
        let target = tmp.path().join("real.yaml");
        std::fs::write(&target, POLICY.replace("NAME", "one")).unwrap();
        std::os::unix::fs::symlink(&target, d.join("l.yaml")).unwrap();
        std::fs::write(d.join("a.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let mut c = LoadCache::default();
        assert!(c.policies_if_touched(&d, None).unwrap().is_ok());
        std::fs::write(&target, POLICY.replace("NAME", "two")).unwrap();
        let r = c.policies_if_touched(&d, Some(&BTreeSet::new())).unwrap();
        assert_eq!(c.last_parsed(), 1, "the symlink only");
        assert_eq!(r, crate::api::load_policy_dir(&d));
        assert!(r.unwrap().policies.iter().any(|p| p.origin.name == "two"));
    }

    #[test]
    fn freshly_written_files_are_not_trusted_to_their_timestamps() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let mut c = LoadCache::default();
        c.policies(tmp.path()).unwrap();
        c.policies(tmp.path()).unwrap();
        assert_eq!(
            c.last_parsed(),
            1,
            "written less than a second ago: parsed every time"
        );
    }

    #[test]
    fn missing_directory_is_the_parsers_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = LoadCache::default();
        let missing = tmp.path().join("nope");
        assert_eq!(c.policies(&missing), crate::api::load_policy_dir(&missing));
        assert_eq!(
            c.registry(std::slice::from_ref(&missing)),
            crate::api::load_endpoint_dirs(&[missing])
        );
    }
}

#[cfg(test)]
mod trust_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A group-writable directory (strict modes) holding an invalid file: the
    /// load with a cache reports what the load without one does, the
    /// directory's trust problem first and the file's own problem after it,
    /// on every kind of look; and a directory made untrusted after a valid
    /// load is never taken as unchanged.
    #[test]
    fn untrusted_directory_is_reported_the_same_with_and_without_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("netpol.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(d.join("a.yaml"), "kind: Nonsense\n").unwrap();
        let dirs = vec![d.clone()];
        let opts = LoadOptions { strict_modes: true };
        let uncached =
            || crate::api::load_dirs(&dirs, FileKind::Policy, &opts, None).into_policy_set();
        let mut c = LoadCache::with_margin(Duration::ZERO);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        let want = uncached().unwrap_err();
        assert_eq!(want.len(), 2, "{want:?}");
        assert!(
            want[0]
                .message
                .starts_with("policy directory is writable by group (mode 0770)"),
            "{}",
            want[0]
        );
        assert_eq!(want[1].file, d.join("a.yaml"));
        let with = |c: &mut LoadCache| {
            crate::api::load_dirs(&dirs, FileKind::Policy, &opts, Some(c)).into_policy_set()
        };
        assert_eq!(with(&mut c), Err(want.clone()));
        assert_eq!(
            c.last_parsed(),
            1,
            "the untrusted directory's file is read too"
        );
        assert_eq!(
            c.load_if_changed(&dirs, FileKind::Policy, &opts, None)
                .map(Parsed::into_policy_set),
            Some(Err(want.clone()))
        );
        assert_eq!(
            c.load_if_changed(&dirs, FileKind::Policy, &opts, Some(&BTreeSet::new()))
                .map(Parsed::into_policy_set),
            Some(Err(want.clone())),
            "an invalid load is never a start for touched-only looks"
        );
        // Valid and trusted, then untrusted again without any file changing.
        std::fs::write(
            d.join("a.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n",
        )
        .unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(with(&mut c).is_ok());
        assert!(c
            .load_if_changed(&dirs, FileKind::Policy, &opts, None)
            .unwrap()
            .into_policy_set()
            .is_ok());
        assert!(
            c.load_if_changed(&dirs, FileKind::Policy, &opts, None)
                .is_none(),
            "unchanged"
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        let now = uncached().unwrap_err();
        assert_eq!(now.len(), 1);
        assert_eq!(
            c.load_if_changed(&dirs, FileKind::Policy, &opts, None)
                .map(Parsed::into_policy_set),
            Some(Err(now))
        );
    }
}

#[cfg(test)]
mod warning_tests {
    use super::*;

    /// A kept parse keeps its warnings: a load through the cache warns as a
    /// load without it does, whether it read the file or kept its parse.
    #[test]
    fn kept_parses_keep_their_warnings() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("p.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n    - toPorts: [{ports: [{port: 80}]}]\n",
        )
        .unwrap();
        let dirs = vec![d.to_path_buf()];
        let opts = LoadOptions { strict_modes: true };
        let warnings = |c: Option<&mut LoadCache>| {
            crate::api::load_dirs(&dirs, FileKind::Policy, &opts, c).take_warnings()
        };
        let want = warnings(None);
        assert_eq!(want.len(), 1, "{want:?}");
        let mut c = LoadCache::with_margin(Duration::ZERO);
        assert_eq!(warnings(Some(&mut c)), want);
        assert_eq!(c.last_parsed(), 1);
        assert_eq!(warnings(Some(&mut c)), want);
        assert_eq!(c.last_parsed(), 0, "the kept parse");
        let touched = BTreeSet::from([d.join("p.yaml")]);
        let again = c.load_if_changed(&dirs, FileKind::Policy, &opts, Some(&touched));
        assert_eq!(again.map(|mut p| p.take_warnings()), Some(want));
        assert_eq!(c.last_parsed(), 1, "the touched file, read again");
    }
}
