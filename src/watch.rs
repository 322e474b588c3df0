//! Watching the policy and registry directories with notify (inotify): directories,
//! never files, because editors and package managers replace files by rename.
//!
//! An event only says "look again": the reconcile loop re-reads everything. A
//! directory that does not exist yet is watched through its nearest existing
//! ancestor until it appears ([`DirWatcher::refresh`]). A queue overflow (notify's
//! `Rescan` flag) or a watcher error asks for a full rescan, which the loop does
//! anyway. [`Debouncer`] turns a burst of events into one reconcile.
//!
//! Reads no file contents and never blocks the caller.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// What the watcher tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// Something under a watched directory changed.
    Changed,
    /// Events were lost (queue overflow) or the watcher failed: read everything.
    Rescan,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher: {0}")]
    Start(#[source] notify::Error),
    #[error("{path}: cannot watch: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Watches a set of directories; see the module doc.
pub struct DirWatcher {
    inner: notify::RecommendedWatcher,
    targets: Vec<PathBuf>,
    /// Watch point → (device, inode) it had when the watch was added.
    watching: BTreeMap<PathBuf, (u64, u64)>,
    /// Set by the event handler when a watch may have died.
    stale: Arc<AtomicBool>,
}

impl DirWatcher {
    /// Watch `targets` (directories, existing or not); events go to `tx`.
    pub fn new(targets: Vec<PathBuf>, tx: mpsc::UnboundedSender<WatchEvent>) -> Result<DirWatcher, WatchError> {
        let filter_targets = targets.clone();
        let stale = Arc::new(AtomicBool::new(false));
        let stale_flag = stale.clone();
        let handler = move |res: notify::Result<Event>| {
            // A watched directory (or one on the way to it) removed or renamed: its
            // watch is dead even if a new directory reuses the inode number.
            if let Ok(ev) = &res {
                if matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_)))
                    && ev.paths.iter().any(|p| filter_targets.iter().any(|t| t.starts_with(p)))
                {
                    stale_flag.store(true, Ordering::SeqCst);
                }
            }
            let ev = match res {
                Ok(ev) if ev.need_rescan() => WatchEvent::Rescan,
                Ok(ev) if is_relevant(&ev, &filter_targets) => WatchEvent::Changed,
                Ok(_) => return,
                Err(_) => WatchEvent::Rescan,
            };
            let _ = tx.send(ev);
        };
        let inner = notify::recommended_watcher(handler).map_err(WatchError::Start)?;
        let mut w = DirWatcher { inner, targets, watching: BTreeMap::new(), stale };
        w.refresh()?;
        Ok(w)
    }

    /// Re-point the watches: each target directory is watched itself when it
    /// exists (again if it was replaced), through its nearest existing ancestor
    /// otherwise. Cheap; the loop calls it before every reconcile.
    pub fn refresh(&mut self) -> Result<(), WatchError> {
        if self.stale.swap(false, Ordering::SeqCst) {
            for p in std::mem::take(&mut self.watching).into_keys() {
                let _ = self.inner.unwatch(&p);
            }
        }
        let mut want: BTreeMap<PathBuf, (u64, u64)> = BTreeMap::new();
        for t in &self.targets {
            if let Some((p, id)) = watch_point(t) {
                want.insert(p, id);
            }
        }
        let stale: Vec<PathBuf> =
            self.watching.iter().filter(|(p, id)| want.get(*p) != Some(*id)).map(|(p, _)| p.clone()).collect();
        for p in stale {
            let _ = self.inner.unwatch(&p);
            self.watching.remove(&p);
        }
        for (p, id) in want {
            if self.watching.contains_key(&p) {
                continue;
            }
            match self.inner.watch(&p, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watching.insert(p, id);
                }
                // Gone between the stat and the watch: the next refresh tries again.
                Err(e) if matches!(&e.kind, notify::ErrorKind::PathNotFound) => {}
                Err(e) if matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) => {}
                Err(source) => return Err(WatchError::Watch { path: p, source }),
            }
        }
        Ok(())
    }

    /// The directories watched now (for status and tests).
    pub fn watching(&self) -> Vec<PathBuf> {
        self.watching.keys().cloned().collect()
    }
}

/// The directory to watch for `target`: itself, or its nearest existing ancestor.
fn watch_point(target: &Path) -> Option<(PathBuf, (u64, u64))> {
    let mut p = Some(target);
    while let Some(dir) = p {
        if let Ok(m) = std::fs::metadata(dir) {
            if m.is_dir() {
                return Some((dir.to_path_buf(), (m.dev(), m.ino())));
            }
        }
        p = dir.parent();
    }
    None
}

/// An event matters when it is inside a target directory, or on a path leading
/// to one (a parent watched while the target does not exist yet).
fn is_relevant(ev: &Event, targets: &[PathBuf]) -> bool {
    if matches!(ev.kind, EventKind::Access(notify::event::AccessKind::Open(_)) | EventKind::Access(notify::event::AccessKind::Read)) {
        return false;
    }
    if ev.paths.is_empty() {
        return true;
    }
    ev.paths.iter().any(|p| targets.iter().any(|t| p.starts_with(t) || t.starts_with(p)))
}

/// Turns a burst of triggers into one. A change that comes as one short flurry of
/// events (an editor's save, a rename) fires `settle` (a fifth of `quiet`) after
/// its last event, so it is enforced quickly; a burst that goes on longer than
/// that (a package unpacking many files) waits for `quiet` without events. Never
/// later than `max_delay` after the first event, so a continuous stream still
/// reconciles.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    settle: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debouncer {
    pub fn new(quiet: Duration) -> Debouncer {
        let max_delay = (quiet * 10).clamp(Duration::from_millis(200), Duration::from_secs(2)).max(quiet);
        let settle = (quiet / 5).max(Duration::from_millis(1)).min(quiet);
        Debouncer { quiet, settle, max_delay, first: None, last: None }
    }

    pub fn poke(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to fire, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (f, l) = (self.first?, self.last?);
        let quiet = if l.duration_since(f) < self.settle { self.settle } else { self.quiet };
        Some((l + quiet).min(f + self.max_delay))
    }

    pub fn is_pending(&self) -> bool {
        self.first.is_some()
    }

    /// Forget the pending trigger (the reconcile is about to run).
    pub fn clear(&mut self) {
        self.first = None;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debouncer_waits_for_quiet_but_is_bounded() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::from_millis(50));
        assert_eq!(d.deadline(), None);
        // One short flurry: 10 ms after its last event.
        d.poke(t0);
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(10)));
        d.poke(t0 + Duration::from_millis(3));
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(13)));
        // Still going after the settle time: wait for 50 ms of quiet.
        d.poke(t0 + Duration::from_millis(30));
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(80)));
        // A continuous stream: never more than max_delay (500 ms) after the first.
        for i in 0..100 {
            d.poke(t0 + Duration::from_millis(10 * i));
        }
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(500)));
        d.clear();
        assert!(!d.is_pending());
    }

    #[tokio::test]
    async fn missing_directory_is_watched_through_its_parent_then_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("a/b");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = DirWatcher::new(vec![target.clone()], tx).unwrap();
        assert_eq!(w.watching(), vec![tmp.path().to_path_buf()]);
        std::fs::create_dir_all(&target).unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(ev, Some(WatchEvent::Changed));
        w.refresh().unwrap();
        assert_eq!(w.watching(), vec![target.clone()]);
        while rx.try_recv().is_ok() {}
        std::fs::write(target.join("x.yaml"), "a").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(ev, Some(WatchEvent::Changed));
        // Replaced directory: the watch follows the new inode.
        std::fs::remove_dir_all(&target).unwrap();
        std::fs::create_dir(&target).unwrap();
        // The loop refreshes after the removal's event, as here.
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(ev, Some(WatchEvent::Changed));
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.refresh().unwrap();
        while rx.try_recv().is_ok() {}
        std::fs::write(target.join("y.yaml"), "a").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(ev, Some(WatchEvent::Changed));
    }

    #[test]
    fn unrelated_siblings_are_ignored() {
        let targets = vec![PathBuf::from("/etc/netpol.d")];
        let ev = |p: &str| Event::new(EventKind::Create(notify::event::CreateKind::File)).add_path(p.into());
        assert!(is_relevant(&ev("/etc/netpol.d/a.yaml"), &targets));
        assert!(is_relevant(&ev("/etc/netpol.d"), &targets));
        assert!(is_relevant(&ev("/etc"), &targets));
        assert!(!is_relevant(&ev("/etc/passwd"), &targets));
    }
}
