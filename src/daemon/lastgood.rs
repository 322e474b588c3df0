//! The last valid input files, kept under `state_dir/last-good/` so a daemon that
//! starts with invalid files enforces the last set that applied (docs/daemon.md,
//! "Invalid files and the last valid set").
//!
//! Owns the copies and their layout; does not decide when to save (the daemon's
//! `save` does) nor what a copy means (the inputs' `SavedReader` reads it).
//!
//! Layout: `last-good/policies` and `last-good/endpoints` are symlinks to
//! complete copies (`policies.<stamp>/`, `endpoints.<stamp>/<n>/` for the n-th
//! endpoint directory). A copy is written in full and fsynced, then the symlink is
//! replaced by rename, so a crash leaves either the old or the new copy, never half
//! of one. Only this module writes there.

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::pipeline::Kind;
use crate::pipeline::SavedCopies;

#[derive(Debug, thiserror::Error)]
pub enum LastGoodError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> LastGoodError + 'a {
    move |source| LastGoodError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The name of a kind's symlink and the prefix of its copies.
fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Policies => "policies",
        Kind::Registry => "endpoints",
    }
}

#[derive(Debug, Clone)]
pub struct LastGood {
    root: PathBuf,
}

/// A complete, verified copy not yet made the saved one ([`LastGood::commit`]).
#[derive(Debug)]
pub struct Prepared {
    kind: Kind,
    stamp: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl LastGood {
    pub fn new(state_dir: &Path) -> LastGood {
        LastGood {
            root: state_dir.join("last-good"),
        }
    }

    /// The saved copy of a kind, if there is one: the policy directory, or the list of
    /// endpoint directories.
    pub fn dirs(&self, kind: Kind) -> Option<Vec<PathBuf>> {
        let link = self.root.join(name(kind));
        let target = fs::canonicalize(&link).ok()?;
        match kind {
            Kind::Policies => Some(vec![target]),
            Kind::Registry => {
                let mut dirs: Vec<(usize, PathBuf)> = fs::read_dir(&target)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        Some((e.file_name().to_str()?.parse::<usize>().ok()?, e.path()))
                    })
                    .collect();
                dirs.sort();
                Some(dirs.into_iter().map(|(_, p)| p).collect())
            }
        }
    }

    /// Save copies of the input files of `sources`, then check the copy with
    /// `verify` (a file may have changed since it was validated) before it replaces
    /// the previous copy. [`LastGood::prepare`], [`LastGood::commit`] and
    /// [`LastGood::remove_old`] in one. The daemon runs those steps apart (the
    /// copy on a thread, the commit on its loop); this is for tests.
    #[cfg(test)]
    pub fn save(
        &self,
        kind: Kind,
        sources: &[PathBuf],
        verify: impl FnOnce(&[PathBuf]) -> bool,
    ) -> Result<bool, LastGoodError> {
        let Some(p) = self.prepare(kind, sources, verify)? else {
            return Ok(false);
        };
        self.commit(&p)?;
        self.remove_old(kind);
        Ok(true)
    }

    /// Write a complete copy of the input files of `sources` and check it with
    /// `verify`: `None` (and nothing left behind) when the check fails. The slow
    /// part of a save (copy, flush, verify); it does not touch the saved copy.
    pub fn prepare(
        &self,
        kind: Kind,
        sources: &[PathBuf],
        verify: impl FnOnce(&[PathBuf]) -> bool,
    ) -> Result<Option<Prepared>, LastGoodError> {
        fs::create_dir_all(&self.root).map_err(io(&self.root, "create directory"))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let stamp = format!(
            "{}.{nanos}-{}-{}",
            name(kind),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let copy = self.root.join(&stamp);
        match self.write_copy(kind, sources, &copy, verify) {
            Ok(true) => Ok(Some(Prepared { kind, stamp })),
            other => {
                let _ = fs::remove_dir_all(&copy);
                other.map(|_| None)
            }
        }
    }

    /// Make a prepared copy the saved one: the symlink is replaced by rename, so
    /// a crash leaves the old copy or this one. Quick (no file is copied).
    pub fn commit(&self, p: &Prepared) -> Result<(), LastGoodError> {
        let link = self.root.join(name(p.kind));
        let tmp_link = self.root.join(format!(".{}.link", p.stamp));
        symlink(&p.stamp, &tmp_link).map_err(io(&tmp_link, "create symlink"))?;
        fs::rename(&tmp_link, &link).map_err(io(&link, "replace symlink"))?;
        sync_dir(&self.root)
    }

    /// Remove a prepared copy that will not be committed.
    pub fn discard(&self, p: Prepared) {
        let _ = fs::remove_dir_all(self.root.join(&p.stamp));
    }

    /// Remove the copies of `kind` other than the saved one (and any left by an
    /// interrupted save).
    pub fn remove_old(&self, kind: Kind) {
        let current = fs::read_link(self.root.join(name(kind))).ok();
        if let Ok(entries) = fs::read_dir(&self.root) {
            let prefix = format!("{}.", name(kind));
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name();
                if name.to_string_lossy().starts_with(&prefix)
                    && current.as_deref() != Some(Path::new(&name))
                {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    fn write_copy(
        &self,
        kind: Kind,
        sources: &[PathBuf],
        copy: &Path,
        verify: impl FnOnce(&[PathBuf]) -> bool,
    ) -> Result<bool, LastGoodError> {
        fs::create_dir(copy).map_err(io(copy, "create directory"))?;
        let mut dirs = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let dst = match kind {
                Kind::Policies => copy.to_path_buf(),
                Kind::Registry => {
                    let d = copy.join(i.to_string());
                    fs::create_dir(&d).map_err(io(&d, "create directory"))?;
                    d
                }
            };
            copy_inputs(src, &dst)?;
            dirs.push(dst);
        }
        // One flush of the whole filesystem instead of an fsync per file: the copy
        // is on disk before the symlink points at it.
        syncfs(copy)?;
        Ok(verify(&dirs))
    }
}

impl SavedCopies for LastGood {
    fn dirs(&self, kind: Kind) -> Option<Vec<PathBuf>> {
        LastGood::dirs(self, kind)
    }
}

/// Copy the input files directly in `src` (a missing directory copies nothing).
fn copy_inputs(src: &Path, dst: &Path) -> Result<(), LastGoodError> {
    let entries = match fs::read_dir(src) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(src, "read directory")(e)),
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if !crate::api::load::wanted_name(n) || !e.path().is_file() {
            continue;
        }
        let data = fs::read(e.path()).map_err(io(&e.path(), "read"))?;
        let out = dst.join(n);
        let mut f = fs::File::create(&out).map_err(io(&out, "create"))?;
        f.write_all(&data).map_err(io(&out, "write"))?;
    }
    Ok(())
}

fn syncfs(path: &Path) -> Result<(), LastGoodError> {
    let f = fs::File::open(path).map_err(io(path, "open"))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(io(path, "syncfs")(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LastGoodError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir, "fsync"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_the_copy_atomically_and_keeps_one() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a.yaml"), "one").unwrap();
        fs::write(src.join(".hidden.yaml"), "x").unwrap();
        fs::write(src.join("a.yaml~"), "x").unwrap();
        let lg = LastGood::new(&tmp.path().join("state"));
        assert_eq!(lg.dirs(Kind::Policies), None);
        assert!(lg
            .save(Kind::Policies, std::slice::from_ref(&src), |_| true)
            .unwrap());
        let d = lg.dirs(Kind::Policies).unwrap();
        assert_eq!(fs::read_to_string(d[0].join("a.yaml")).unwrap(), "one");
        assert!(!d[0].join(".hidden.yaml").exists() && !d[0].join("a.yaml~").exists());
        fs::write(src.join("a.yaml"), "two").unwrap();
        // A copy that fails verification leaves the previous one in place.
        assert!(!lg
            .save(Kind::Policies, std::slice::from_ref(&src), |_| false)
            .unwrap());
        assert_eq!(
            fs::read_to_string(lg.dirs(Kind::Policies).unwrap()[0].join("a.yaml")).unwrap(),
            "one"
        );
        assert!(lg
            .save(Kind::Policies, std::slice::from_ref(&src), |_| true)
            .unwrap());
        assert_eq!(
            fs::read_to_string(lg.dirs(Kind::Policies).unwrap()[0].join("a.yaml")).unwrap(),
            "two"
        );
        let copies = fs::read_dir(tmp.path().join("state/last-good"))
            .unwrap()
            .count();
        assert_eq!(copies, 2, "the symlink and one copy");
    }

    #[test]
    fn endpoint_dirs_keep_their_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("x.yaml"), "a").unwrap();
        fs::write(b.join("x.yaml"), "b").unwrap();
        let lg = LastGood::new(&tmp.path().join("state"));
        lg.save(Kind::Registry, &[a, b, tmp.path().join("missing")], |d| {
            d.len() == 3
        })
        .unwrap();
        let d = lg.dirs(Kind::Registry).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(fs::read_to_string(d[1].join("x.yaml")).unwrap(), "b");
    }
}
