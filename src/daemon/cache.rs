//! Re-reading the input directories on every trigger without re-parsing files
//! that did not change: the parser's own steps (`api::load`: list, read, parse one
//! file, cross-file checks), with each file's parse kept by its identity (device,
//! inode, size, mtime, ctime).
//!
//! A file modified within the timestamp granularity of its last read could look
//! unchanged, so (like git's "racy clean" rule) a file is only kept when its
//! timestamps are at least [`SETTLED`] older than the moment it was read. The
//! result is always exactly what `api::load_policy_dir` / `load_endpoint_dirs`
//! would return; the cross-file checks always run on the whole set.
//!
//! Between full looks, the daemon can say which files its watch events named
//! since the last load (`touched`): then only those files (and symlinks, whose
//! targets change without an event here) are looked at again, and every other
//! file keeps its parse without even a stat. A full look (list and stat every
//! file) happens whenever no such list is given: at start, on a reload, on the
//! resync timer, and when events were lost.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::load::{self, FileKind, LoadOptions, Parsed};
use crate::api::model::{PolicySet, RegistrySet};
use crate::api::Problem;

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
        out.files.extend(p.files.iter().cloned());
    }
}

/// Each directory's files with their identity at listing time, or why it
/// could not be listed (or, with strict modes, cannot be trusted).
type Listing = Vec<Result<Vec<(PathBuf, Option<FileId>)>, Vec<Problem>>>;

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
    /// Per directory, sorted as `load::list_dir` lists them.
    files: Vec<Vec<PathBuf>>,
    /// Entries that are symlinks.
    links: HashSet<PathBuf>,
    /// The load's result was valid.
    ok: bool,
}

/// Index of a kind in the per-kind arrays (`seen`, `listed`).
fn slot(want: FileKind) -> usize {
    match want {
        FileKind::Policy => 0,
        FileKind::Registry => 1,
    }
}

#[derive(Debug)]
pub struct LoadCache {
    files: HashMap<PathBuf, (FileId, Piece)>,
    /// What the last load of each kind saw (policies, registry).
    seen: [Option<Seen>; 2],
    /// The last listing of each kind, for loads given the touched files.
    listed: [Option<Listed>; 2],
    /// Parsed in the last load (for logs and tests).
    pub last_parsed: usize,
    settled: Duration,
    /// How files are read: `strict_modes` as in the config's `strict_file_modes`.
    opts: LoadOptions,
}

impl Default for LoadCache {
    fn default() -> Self {
        LoadCache::with_margin(SETTLED)
    }
}

impl LoadCache {
    /// A cache that keeps a file once its timestamps are `settled` old.
    pub fn with_margin(settled: Duration) -> LoadCache {
        LoadCache {
            files: HashMap::new(),
            seen: [None, None],
            listed: [None, None],
            last_parsed: 0,
            settled,
            opts: LoadOptions::default(),
        }
    }

    /// Read files with `opts` (the config's `strict_file_modes`), exactly as
    /// `api::load_policy_dir_with` / `load_endpoint_dirs_with` do.
    pub fn with_options(mut self, opts: LoadOptions) -> LoadCache {
        self.opts = opts;
        self
    }

    /// Like [`LoadCache::policies`], but `None` when the last call returned a
    /// valid set and no file changed since (the caller keeps that set).
    pub fn policies_if_changed(&mut self, dir: &Path) -> Option<Result<PolicySet, Vec<Problem>>> {
        self.policies_if_touched(dir, None)
    }

    /// [`LoadCache::policies_if_changed`] when only the files in `touched` can
    /// have changed since the last call (`None`: any file may have).
    pub fn policies_if_touched(
        &mut self,
        dir: &Path,
        touched: Option<&BTreeSet<PathBuf>>,
    ) -> Option<Result<PolicySet, Vec<Problem>>> {
        let dirs = vec![dir.to_path_buf()];
        let parsed = self.load_if_changed(&dirs, FileKind::Policy, touched)?;
        let r = parsed.into_policy_set();
        self.record_ok(0, r.is_ok());
        Some(r)
    }

    /// Like [`LoadCache::registry`], but `None` when the last call returned a
    /// valid set and no file changed since.
    pub fn registry_if_changed(
        &mut self,
        dirs: &[PathBuf],
    ) -> Option<Result<RegistrySet, Vec<Problem>>> {
        self.registry_if_touched(dirs, None)
    }

    /// [`LoadCache::registry_if_changed`] when only the files in `touched` can
    /// have changed since the last call (`None`: any file may have).
    pub fn registry_if_touched(
        &mut self,
        dirs: &[PathBuf],
        touched: Option<&BTreeSet<PathBuf>>,
    ) -> Option<Result<RegistrySet, Vec<Problem>>> {
        let parsed = self.load_if_changed(dirs, FileKind::Registry, touched)?;
        let r = parsed.into_registry_set();
        self.record_ok(1, r.is_ok());
        Some(r)
    }

    fn record_ok(&mut self, kind: usize, ok: bool) {
        if let Some(s) = self.seen[kind].as_mut() {
            s.ok = ok;
        }
        if let Some(l) = self.listed[kind].as_mut() {
            l.ok = ok;
        }
    }

    /// Only the touched files (and symlinks) looked at again: `None` when that
    /// cannot answer (no valid load of the same directories to start from), else
    /// `Some(None)` for "nothing changed" or the new parse.
    fn load_touched(
        &mut self,
        dirs: &[PathBuf],
        want: FileKind,
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
        for (di, p) in mine {
            let list = &mut listed.files[di];
            match std::fs::symlink_metadata(p) {
                Ok(m) => {
                    if let Err(i) = list.binary_search(p) {
                        list.insert(i, p.clone());
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
                    }
                    listed.links.remove(p);
                    self.files.remove(p);
                }
            }
        }
        // Every listed file from its kept parse, except the touched ones and
        // symlinks (read again) and any without one.
        let mut out = Parsed::default();
        let mut parsed = 0;
        for f in listed.files.iter().flatten() {
            if !touched.contains(f) && !listed.links.contains(f) {
                if let Some((_, piece)) = self.files.get(f) {
                    piece.append_to(&mut out);
                    continue;
                }
            }
            let id = FileId::of(f);
            self.read_into(f, id, want, &mut out);
            parsed += 1;
        }
        self.finish(&mut out, parsed, want);
        // Symlinks are read again every time: without a change there is nothing to report.
        self.seen[kind] = None;
        self.listed[kind] = Some(listed);
        Some(Some(out))
    }

    fn load_if_changed(
        &mut self,
        dirs: &[PathBuf],
        want: FileKind,
        touched: Option<&BTreeSet<PathBuf>>,
    ) -> Option<Parsed> {
        if let Some(r) = touched.and_then(|t| self.load_touched(dirs, want, t)) {
            return r;
        }
        let kind = slot(want);
        let (listing, listed) = self.list(dirs, want);
        self.listed[kind] = listed;
        // Every file listed, stat'ed, and a kept parse with that identity.
        let now: Option<Vec<(PathBuf, FileId)>> = listing
            .iter()
            .map(|d| d.as_ref().ok())
            .collect::<Option<Vec<_>>>()
            .and_then(|ds| {
                ds.into_iter()
                    .flatten()
                    .map(|(f, id)| {
                        let id = (*id)?;
                        matches!(self.files.get(f), Some((c, p)) if *c == id && p.settled)
                            .then(|| (f.clone(), id))
                    })
                    .collect()
            });
        if let (Some(now), Some(seen)) = (&now, &self.seen[kind]) {
            if seen.ok && seen.dirs == dirs && seen.files == *now {
                self.last_parsed = 0;
                if let Some(l) = self.listed[kind].as_mut() {
                    l.ok = true;
                }
                return None;
            }
        }
        let snapshot: Option<Vec<(PathBuf, Option<FileId>)>> = listing
            .iter()
            .map(|d| d.as_ref().ok().cloned())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        let out = self.load_listed(dirs, listing, want);
        // Only a load made entirely of kept parses can be recognised later (the
        // caller records whether it was valid).
        let files: Option<Vec<(PathBuf, FileId)>> = snapshot.and_then(|fs| {
            fs.into_iter()
                .map(|(f, id)| {
                    let id = id?;
                    matches!(self.files.get(&f), Some((c, p)) if *c == id && p.settled)
                        .then_some((f, id))
                })
                .collect()
        });
        self.seen[kind] = files.map(|files| Seen {
            dirs: dirs.to_vec(),
            files,
            ok: false,
        });
        Some(out)
    }

    pub fn policies(&mut self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        let r = self
            .load(std::slice::from_ref(&dir.to_path_buf()), FileKind::Policy)
            .into_policy_set();
        self.record_ok(0, r.is_ok());
        r
    }

    pub fn registry(&mut self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        let r = self.load(dirs, FileKind::Registry).into_registry_set();
        self.record_ok(1, r.is_ok());
        r
    }

    /// `api::load::load_dirs`, reusing the parse of unchanged files.
    fn load(&mut self, dirs: &[PathBuf], want: FileKind) -> Parsed {
        let (listing, listed) = self.list(dirs, want);
        self.listed[slot(want)] = listed;
        self.load_listed(dirs, listing, want)
    }

    /// Each directory's files with their identity now (`None`: cannot stat),
    /// and the same listing to start loads given the touched files from (`None`
    /// when a directory could not be listed).
    fn list(&self, dirs: &[PathBuf], want: FileKind) -> (Listing, Option<Listed>) {
        let what = match want {
            FileKind::Policy => "policy directory",
            FileKind::Registry => "endpoint directory",
        };
        let mut links = HashSet::new();
        let listing: Listing = dirs
            .iter()
            .map(|dir| {
                let files = load::list_dir_entries(dir, what).map_err(|p| vec![p])?;
                if self.opts.strict_modes {
                    let distrust = load::check_dir_trust(dir, what);
                    if !distrust.is_empty() {
                        return Err(distrust);
                    }
                }
                Ok(files
                    .into_iter()
                    .map(|(f, link)| {
                        if link {
                            links.insert(f.clone());
                        }
                        let id = FileId::of(&f);
                        (f, id)
                    })
                    .collect())
            })
            .collect();
        let files: Option<Vec<Vec<PathBuf>>> = listing
            .iter()
            .map(|d| Some(d.as_ref().ok()?.iter().map(|(f, _)| f.clone()).collect()))
            .collect();
        let listed = files.map(|files| Listed {
            dirs: dirs.to_vec(),
            files,
            links,
            ok: false,
        });
        (listing, listed)
    }

    /// Assemble the parse of the listed files. With `reread`, the listing came
    /// from the touched files: those in `reread` are read again and the others
    /// keep their parse unseen (no stat); without it, a kept parse is used only
    /// when its file's identity is unchanged and it was settled when read.
    fn load_listed(&mut self, dirs: &[PathBuf], listing: Listing, want: FileKind) -> Parsed {
        let mut out = Parsed::default();
        let mut parsed = 0;
        let mut live = HashSet::new();
        for files in listing {
            let files = match files {
                Ok(f) => f,
                Err(ps) => {
                    out.problems.extend(ps);
                    continue;
                }
            };
            for (f, id) in files {
                live.insert(f.clone());
                if let (Some(id), Some((cached, piece))) = (id, self.files.get(&f)) {
                    if *cached == id && piece.settled {
                        piece.append_to(&mut out);
                        continue;
                    }
                }
                self.read_into(&f, id, want, &mut out);
                parsed += 1;
            }
        }
        // Forget files that are gone (of this kind: the same cache serves both).
        let prefix_dirs = dirs.to_vec();
        self.files
            .retain(|p, _| live.contains(p) || !prefix_dirs.iter().any(|d| p.starts_with(d)));
        self.finish(&mut out, parsed, want);
        out
    }

    /// The end of every load: how many files were parsed, then the cross-file checks.
    fn finish(&mut self, out: &mut Parsed, parsed: usize, want: FileKind) {
        self.last_parsed = parsed;
        match want {
            FileKind::Policy => load::check_policies(out),
            FileKind::Registry => load::check_registry(out),
        }
    }

    /// Read and parse `f` (whose identity was `id` before), add it to `out`,
    /// and keep its parse when the file did not change while it was read.
    fn read_into(&mut self, f: &Path, id: Option<FileId>, want: FileKind, out: &mut Parsed) {
        let read_at = SystemTime::now();
        let mut piece = Piece::default();
        match load::read_file_with(f, &self.opts) {
            Ok(text) => load::parse_text(f, &text, want, &mut piece.parsed),
            Err(ps) => {
                piece.parsed.files.push(f.to_path_buf());
                piece.parsed.problems.extend(ps);
            }
        }
        piece.append_to(out);
        // A full look uses a kept parse again only if the file's timestamps also
        // tell it apart from a later write (loads given the touched files rely
        // on the events instead).
        match (id, FileId::of(f)) {
            (Some(before), Some(after)) if before == after => {
                piece.settled = after.settled(read_at, self.settled);
                self.files.insert(f.to_path_buf(), (after, piece));
            }
            _ => {
                self.files.remove(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.last_parsed, 3);
        assert_eq!(Ok(first.clone()), crate::api::load_policy_dir(d));
        let again = c.policies(d).unwrap();
        assert_eq!(c.last_parsed, 0);
        assert_eq!(again, first);

        // A changed file is parsed again, a removed one dropped; cross-file checks run.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        std::fs::remove_file(d.join("c.yaml")).unwrap();
        let e = c.policies(d).unwrap_err();
        assert_eq!(c.last_parsed, 1);
        assert_eq!(Err(e), crate::api::load_policy_dir(d));
        assert_eq!(c.files.len(), 2);
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b")).unwrap();
        assert_eq!(c.policies(d), crate::api::load_policy_dir(d));
        assert_eq!(c.last_parsed, 1);
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
        assert_eq!(c.last_parsed, 0);
        // A touched file is read again even when written within the same tick.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let r = c.policies_if_touched(d, Some(&only("b.yaml"))).unwrap();
        assert_eq!(c.last_parsed, 1);
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
        assert_eq!(c.last_parsed, 1, "only c.yaml is read");
        assert_eq!(r, crate::api::load_policy_dir(d));
        assert_eq!(r.unwrap().policies.len(), 2);
        // A change no event named is not seen until a full look.
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "b2")).unwrap();
        assert!(c.policies_if_touched(d, Some(&none)).is_none());
        let r = c.policies_if_touched(d, None).unwrap();
        assert_eq!(r, crate::api::load_policy_dir(d));
        assert!(r.unwrap().policies.iter().any(|p| p.origin.name == "b2"));
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
        assert_eq!(c.last_parsed, 1, "the symlink only");
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
            c.last_parsed, 1,
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
