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

use std::collections::HashMap;
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
        let now = read_at.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        let newest = self.mtime_ns.max(self.ctime_ns);
        now - newest >= margin.as_nanos() as i128
    }
}

/// The parse of one file.
#[derive(Debug, Default)]
struct Piece {
    parsed: Parsed,
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

#[derive(Debug)]
pub struct LoadCache {
    files: HashMap<PathBuf, (FileId, Piece)>,
    /// What the last load of each kind saw (policies, registry).
    seen: [Option<Seen>; 2],
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
        LoadCache { files: HashMap::new(), seen: [None, None], last_parsed: 0, settled, opts: LoadOptions::default() }
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
        let dirs = vec![dir.to_path_buf()];
        let parsed = self.load_if_changed(&dirs, FileKind::Policy)?;
        let r = parsed.into_policy_set();
        if let Some(s) = self.seen[0].as_mut() {
            s.ok = r.is_ok();
        }
        Some(r)
    }

    /// Like [`LoadCache::registry`], but `None` when the last call returned a
    /// valid set and no file changed since.
    pub fn registry_if_changed(&mut self, dirs: &[PathBuf]) -> Option<Result<RegistrySet, Vec<Problem>>> {
        let parsed = self.load_if_changed(dirs, FileKind::Registry)?;
        let r = parsed.into_registry_set();
        if let Some(s) = self.seen[1].as_mut() {
            s.ok = r.is_ok();
        }
        Some(r)
    }

    fn load_if_changed(&mut self, dirs: &[PathBuf], want: FileKind) -> Option<Parsed> {
        let kind = match want {
            FileKind::Policy => 0,
            FileKind::Registry => 1,
        };
        let listing = self.list(dirs, want);
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
                        matches!(self.files.get(f), Some((c, _)) if *c == id).then(|| (f.clone(), id))
                    })
                    .collect()
            });
        if let (Some(now), Some(seen)) = (&now, &self.seen[kind]) {
            if seen.ok && seen.dirs == dirs && seen.files == *now {
                self.last_parsed = 0;
                return None;
            }
        }
        let snapshot: Option<Vec<(PathBuf, Option<FileId>)>> =
            listing.iter().map(|d| d.as_ref().ok().cloned()).collect::<Option<Vec<_>>>().map(|v| v.concat());
        let out = self.load_listed(dirs, listing, want);
        // Only a load made entirely of kept parses can be recognised later (the
        // caller records whether it was valid).
        let files: Option<Vec<(PathBuf, FileId)>> = snapshot.and_then(|fs| {
            fs.into_iter()
                .map(|(f, id)| {
                    let id = id?;
                    matches!(self.files.get(&f), Some((c, _)) if *c == id).then_some((f, id))
                })
                .collect()
        });
        self.seen[kind] = files.map(|files| Seen { dirs: dirs.to_vec(), files, ok: false });
        Some(out)
    }

    pub fn policies(&mut self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        self.load(std::slice::from_ref(&dir.to_path_buf()), FileKind::Policy).into_policy_set()
    }

    pub fn registry(&mut self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        self.load(dirs, FileKind::Registry).into_registry_set()
    }

    /// `api::load::load_dirs`, reusing the parse of unchanged files.
    fn load(&mut self, dirs: &[PathBuf], want: FileKind) -> Parsed {
        let listing = self.list(dirs, want);
        self.load_listed(dirs, listing, want)
    }

    /// Each directory's files with their identity now (`None`: cannot stat).
    fn list(&self, dirs: &[PathBuf], want: FileKind) -> Listing {
        let what = match want {
            FileKind::Policy => "policy directory",
            FileKind::Registry => "endpoint directory",
        };
        dirs.iter()
            .map(|dir| {
                let files = load::list_dir(dir, what).map_err(|p| vec![p])?;
                if self.opts.strict_modes {
                    let distrust = load::check_dir_trust(dir, what);
                    if !distrust.is_empty() {
                        return Err(distrust);
                    }
                }
                Ok(files.into_iter().map(|f| {
                    let id = FileId::of(&f);
                    (f, id)
                }).collect())
            })
            .collect()
    }

    fn load_listed(
        &mut self,
        dirs: &[PathBuf],
        listing: Listing,
        want: FileKind,
    ) -> Parsed {
        let mut out = Parsed::default();
        let mut parsed = 0;
        let mut live = std::collections::HashSet::new();
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
                    if *cached == id {
                        piece.append_to(&mut out);
                        continue;
                    }
                }
                let read_at = SystemTime::now();
                let mut piece = Piece::default();
                match load::read_file_with(&f, &self.opts) {
                    Ok(text) => load::parse_text(&f, &text, want, &mut piece.parsed),
                    Err(ps) => {
                        piece.parsed.files.push(f.clone());
                        piece.parsed.problems.extend(ps);
                    }
                }
                parsed += 1;
                piece.append_to(&mut out);
                // Only a file that did not change while it was read, and whose
                // timestamps tell it apart from a later write, is kept.
                match (id, FileId::of(&f)) {
                    (Some(before), Some(after)) if before == after && after.settled(read_at, self.settled) => {
                        self.files.insert(f, (after, piece));
                    }
                    _ => {
                        self.files.remove(&f);
                    }
                }
            }
        }
        // Forget files that are gone (of this kind: the same cache serves both).
        let prefix_dirs = dirs.to_vec();
        self.files.retain(|p, _| live.contains(p) || !prefix_dirs.iter().any(|d| p.starts_with(d)));
        self.last_parsed = parsed;
        match want {
            FileKind::Policy => load::check_policies(&mut out),
            FileKind::Registry => load::check_registry(&mut out),
        }
        out
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
        assert_eq!(c.policies_if_changed(d).unwrap(), crate::api::load_policy_dir(d), "a new file");
        assert!(c.policies_if_changed(d).is_none());
        std::fs::write(d.join("b.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let e = c.policies_if_changed(d).unwrap();
        assert!(e.is_err(), "duplicate name");
        assert_eq!(c.policies_if_changed(d).unwrap(), e, "an invalid set is always loaded again");
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
    fn freshly_written_files_are_not_trusted_to_their_timestamps() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.yaml"), POLICY.replace("NAME", "a")).unwrap();
        let mut c = LoadCache::default();
        c.policies(tmp.path()).unwrap();
        c.policies(tmp.path()).unwrap();
        assert_eq!(c.last_parsed, 1, "written less than a second ago: parsed every time");
    }

    #[test]
    fn missing_directory_is_the_parsers_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = LoadCache::default();
        let missing = tmp.path().join("nope");
        assert_eq!(c.policies(&missing), crate::api::load_policy_dir(&missing));
        assert_eq!(c.registry(std::slice::from_ref(&missing)), crate::api::load_endpoint_dirs(&[missing]));
    }
}
