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

use crate::api::load::{self, FileKind, Parsed};
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

#[derive(Debug)]
pub struct LoadCache {
    files: HashMap<PathBuf, (FileId, Piece)>,
    /// Parsed in the last load (for logs and tests).
    pub last_parsed: usize,
    settled: Duration,
}

impl Default for LoadCache {
    fn default() -> Self {
        LoadCache::with_margin(SETTLED)
    }
}

impl LoadCache {
    /// A cache that keeps a file once its timestamps are `settled` old.
    pub fn with_margin(settled: Duration) -> LoadCache {
        LoadCache { files: HashMap::new(), last_parsed: 0, settled }
    }

    pub fn policies(&mut self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        self.load(std::slice::from_ref(&dir.to_path_buf()), FileKind::Policy).into_policy_set()
    }

    pub fn registry(&mut self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        self.load(dirs, FileKind::Registry).into_registry_set()
    }

    /// `api::load::load_dirs`, reusing the parse of unchanged files.
    fn load(&mut self, dirs: &[PathBuf], want: FileKind) -> Parsed {
        let what = match want {
            FileKind::Policy => "policy directory",
            FileKind::Registry => "endpoint directory",
        };
        let mut out = Parsed::default();
        let mut parsed = 0;
        let mut live = std::collections::HashSet::new();
        for dir in dirs {
            let files = match load::list_dir(dir, what) {
                Ok(f) => f,
                Err(p) => {
                    out.problems.push(p);
                    continue;
                }
            };
            for f in files {
                live.insert(f.clone());
                let id = FileId::of(&f);
                if let (Some(id), Some((cached, piece))) = (id, self.files.get(&f)) {
                    if *cached == id {
                        piece.append_to(&mut out);
                        continue;
                    }
                }
                let read_at = SystemTime::now();
                let mut piece = Piece::default();
                match load::read_file(&f) {
                    Ok(text) => load::parse_text(&f, &text, want, &mut piece.parsed),
                    Err(p) => {
                        piece.parsed.files.push(f.clone());
                        piece.parsed.problems.push(p);
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
