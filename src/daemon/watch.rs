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

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// What the watcher tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Something under a watched directory changed.
    Changed,
    /// Events were lost (queue overflow) or the watcher failed: read everything.
    Rescan,
    /// One of the files netpol reads ([`crate::api::load::wanted_name`]) changed;
    /// what the change says about whether its content is complete.
    File(FileChange),
}

/// A change to one file netpol reads, as far as the event tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// Created or written to: more writes may follow until it is closed.
    Writing(PathBuf),
    /// Closed after writing, or renamed into place: its content is complete.
    Written(PathBuf),
    /// Removed or renamed away (perhaps the first half of a replacement).
    Gone(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher")]
    Start(#[source] notify::Error),
    #[error("{path}: cannot watch")]
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
    pub fn new(
        targets: Vec<PathBuf>,
        tx: mpsc::UnboundedSender<WatchEvent>,
    ) -> Result<DirWatcher, WatchError> {
        let filter_targets = targets.clone();
        let stale = Arc::new(AtomicBool::new(false));
        let stale_flag = stale.clone();
        let handler = move |res: notify::Result<Event>| {
            // A watched directory (or one on the way to it) removed or renamed: its
            // watch is dead even if a new directory reuses the inode number.
            if let Ok(ev) = &res {
                if matches!(
                    ev.kind,
                    EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
                ) && ev
                    .paths
                    .iter()
                    .any(|p| filter_targets.iter().any(|t| t.starts_with(p)))
                {
                    stale_flag.store(true, Ordering::SeqCst);
                }
            }
            let ev = match res {
                Ok(ev) if ev.need_rescan() => WatchEvent::Rescan,
                Ok(ev) if is_relevant(&ev, &filter_targets) => match classify(&ev, &filter_targets)
                {
                    Some(ev) => ev,
                    None => return,
                },
                Ok(_) => return,
                Err(_) => WatchEvent::Rescan,
            };
            let _ = tx.send(ev);
        };
        let inner = notify::recommended_watcher(handler).map_err(WatchError::Start)?;
        let mut w = DirWatcher {
            inner,
            targets,
            watching: BTreeMap::new(),
            stale,
        };
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
        let stale: Vec<PathBuf> = self
            .watching
            .iter()
            .filter(|(p, id)| want.get(*p) != Some(*id))
            .map(|(p, _)| p.clone())
            .collect();
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
                Err(e) if matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) =>
                    {}
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
    if matches!(
        ev.kind,
        EventKind::Access(notify::event::AccessKind::Open(_))
            | EventKind::Access(notify::event::AccessKind::Read)
    ) {
        return false;
    }
    if ev.paths.is_empty() {
        return true;
    }
    ev.paths
        .iter()
        .any(|p| targets.iter().any(|t| p.starts_with(t) || t.starts_with(p)))
}

/// What a relevant event says about a file netpol reads directly inside a
/// target directory; `None` for an entry of a target directory that netpol
/// never reads (an editor's swap file, a staged `.name.new`); anything else
/// (directories, metadata, names that are not UTF-8) is a plain
/// [`WatchEvent::Changed`].
fn classify(ev: &Event, targets: &[PathBuf]) -> Option<WatchEvent> {
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
    let in_target = |p: &PathBuf| p.parent().is_some_and(|d| targets.iter().any(|t| t == d));
    let wanted = |p: &PathBuf| {
        in_target(p)
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(crate::api::load::wanted_name)
    };
    let ignored = |p: &PathBuf| {
        in_target(p)
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !crate::api::load::wanted_name(n))
    };
    if !ev.paths.is_empty() && ev.paths.iter().all(ignored) {
        return None;
    }
    let first = ev.paths.first().filter(|p| wanted(p)).cloned();
    let last = ev.paths.last().filter(|p| wanted(p)).cloned();
    let change = match ev.kind {
        EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
            first.map(FileChange::Writing)
        }
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => first.map(FileChange::Written),
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => first.map(FileChange::Written),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            first.map(FileChange::Gone)
        }
        // The pair of a rename: From and To came as their own events already.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => last.map(FileChange::Written),
        _ => None,
    };
    Some(change.map_or(WatchEvent::Changed, WatchEvent::File))
}

/// Turns a burst of triggers into one. A change that comes as one short flurry of
/// events fires `settle` (a fifth of `quiet`) after its last event, and sooner
/// (`FAST`, 1 ms) when the events say every file involved is complete: the last
/// one closed a file after writing or renamed one into place (how editors and
/// package managers save), and no file netpol reads is still open for writing or
/// gone without a replacement. A burst that goes on longer than `settle` (a
/// package unpacking many files) waits for `quiet` without events. Never later
/// than `max_delay` after the first event, so a continuous stream still
/// reconciles.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    settle: Duration,
    fast: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Files created or written to and not closed since.
    writing: BTreeSet<PathBuf>,
    /// Files removed or renamed away in this burst and not back since.
    gone: BTreeSet<PathBuf>,
    /// The last event completed a file.
    last_written: bool,
    /// Too many files open for writing to track: no fast path until a rescan.
    saturated: bool,
    /// When the last reconcile fired.
    fired: Option<Instant>,
}

/// The wait after a burst whose files are all complete.
pub const FAST: Duration = Duration::from_millis(1);
/// At most this many files open for writing are tracked.
const MAX_WRITING: usize = 4096;

impl Debouncer {
    pub fn new(quiet: Duration) -> Debouncer {
        let max_delay = (quiet * 10)
            .clamp(Duration::from_millis(200), Duration::from_secs(2))
            .max(quiet);
        let settle = (quiet / 5).max(Duration::from_millis(1)).min(quiet);
        Debouncer {
            quiet,
            settle,
            fast: FAST.min(settle),
            max_delay,
            first: None,
            last: None,
            writing: BTreeSet::new(),
            gone: BTreeSet::new(),
            last_written: false,
            saturated: false,
            fired: None,
        }
    }

    /// A trigger that says nothing about files (a directory event, a link change).
    pub fn poke(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.last_written = false;
    }

    /// A watch event: files it names are followed for the fast path.
    pub fn event(&mut self, now: Instant, ev: &WatchEvent) {
        self.poke(now);
        match ev {
            WatchEvent::Changed => {}
            WatchEvent::Rescan => {
                // Closes may have been lost with the other events.
                self.writing.clear();
                self.saturated = false;
            }
            WatchEvent::File(FileChange::Writing(p)) => {
                self.gone.remove(p);
                if self.writing.len() < MAX_WRITING {
                    self.writing.insert(p.clone());
                } else if !self.writing.contains(p) {
                    self.saturated = true;
                }
            }
            WatchEvent::File(FileChange::Written(p)) => {
                self.writing.remove(p);
                self.gone.remove(p);
                self.last_written = true;
            }
            WatchEvent::File(FileChange::Gone(p)) => {
                self.writing.remove(p);
                self.gone.insert(p.clone());
            }
        }
    }

    /// Whether the pending burst ended with every file it touched complete, and
    /// began after a quiet spell (not the tail of a burst the last reconcile cut).
    fn complete(&self) -> bool {
        let after_quiet = match (self.fired, self.first) {
            (Some(fired), Some(first)) => first.saturating_duration_since(fired) >= self.settle,
            _ => true,
        };
        after_quiet
            && self.last_written
            && !self.saturated
            && self.writing.is_empty()
            && self.gone.is_empty()
    }

    /// When to fire, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (f, l) = (self.first?, self.last?);
        let quiet = match l.duration_since(f) < self.settle {
            true if self.complete() => self.fast,
            true => self.settle,
            false => self.quiet,
        };
        Some((l + quiet).min(f + self.max_delay))
    }

    pub fn is_pending(&self) -> bool {
        self.first.is_some()
    }

    /// Forget the pending trigger: the reconcile runs now. Files still open for
    /// writing stay followed.
    pub fn fired(&mut self, now: Instant) {
        self.fired = Some(now);
        self.first = None;
        self.last = None;
        self.gone.clear();
        self.last_written = false;
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
        d.fired(t0 + Duration::from_millis(500));
        assert!(!d.is_pending());
    }

    #[test]
    fn debouncer_fires_fast_only_when_every_file_is_complete() {
        let ms = Duration::from_millis;
        let mut t = Instant::now();
        let f = |p: &str| PathBuf::from(format!("/etc/netpol.d/{p}"));
        let file = |c: FileChange| WatchEvent::File(c);
        let mut d = Debouncer::new(ms(50));
        // Each case starts a second after the last reconcile.
        let mut next = |d: &mut Debouncer| {
            d.fired(t);
            t += Duration::from_secs(1);
            t
        };
        // A file renamed into place (the staged name is not one netpol reads).
        let t0 = next(&mut d);
        d.event(t0, &WatchEvent::Changed);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        // Written in place: fast once closed, not while open.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Writing(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + ms(10)));
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        // A save that moves the old file away first (vim without backupcopy).
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Gone(f("a.yaml"))));
        assert_eq!(
            d.deadline(),
            Some(t0 + ms(10)),
            "removed: maybe half a replacement"
        );
        d.event(t0, &file(FileChange::Writing(f("a.yaml"))));
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        // Another file still open for writing holds the fast path, across reconciles.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Writing(f("b.yaml"))));
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + ms(10)));
        d.event(t0, &file(FileChange::Written(f("b.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        // A removal alone, or a trigger that is not about a file, waits the settle time.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Gone(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + ms(10)));
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        d.poke(t0 + ms(1));
        assert_eq!(d.deadline(), Some(t0 + ms(11)));
        // A long burst waits for quiet even when it ends complete.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        d.event(t0 + ms(30), &file(FileChange::Written(f("b.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + ms(80)));
        // The rest of a burst that a fast reconcile cut short waits the settle time.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        d.fired(t0 + FAST);
        d.event(t0 + ms(3), &file(FileChange::Written(f("b.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + ms(13)));
        // Lost events forget the open files.
        let t0 = next(&mut d);
        d.event(t0, &file(FileChange::Writing(f("c.yaml"))));
        d.event(t0, &WatchEvent::Rescan);
        d.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(d.deadline(), Some(t0 + FAST));
        // debounce_ms = 0: no wait at all.
        let mut z = Debouncer::new(Duration::ZERO);
        z.event(t0, &file(FileChange::Written(f("a.yaml"))));
        assert_eq!(z.deadline(), Some(t0));
    }

    /// The events of a real rename into place and of a write in place end with
    /// the file complete; a removal says it is gone.
    #[tokio::test]
    async fn real_saves_end_with_the_file_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("netpol.d");
        std::fs::create_dir(&dir).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _w = DirWatcher::new(vec![dir.clone()], tx).unwrap();
        let drain = |rx: &mut mpsc::UnboundedReceiver<WatchEvent>| {
            let mut v = Vec::new();
            while let Ok(e) = rx.try_recv() {
                v.push(e);
            }
            v
        };
        let settle = || tokio::time::sleep(Duration::from_millis(100));
        let target = dir.join("a.yaml");
        std::fs::write(dir.join(".a.yaml.new"), "x").unwrap();
        settle().await;
        assert_eq!(drain(&mut rx), vec![], "a dotfile is never read");
        std::fs::rename(dir.join(".a.yaml.new"), &target).unwrap();
        settle().await;
        let ev = drain(&mut rx);
        assert_eq!(
            ev.last(),
            Some(&WatchEvent::File(FileChange::Written(target.clone()))),
            "{ev:?}"
        );
        std::fs::write(&target, "y").unwrap();
        settle().await;
        let ev = drain(&mut rx);
        assert!(
            ev.contains(&WatchEvent::File(FileChange::Writing(target.clone()))),
            "{ev:?}"
        );
        assert_eq!(
            ev.last(),
            Some(&WatchEvent::File(FileChange::Written(target.clone()))),
            "{ev:?}"
        );
        std::fs::remove_file(&target).unwrap();
        settle().await;
        assert_eq!(
            drain(&mut rx),
            vec![WatchEvent::File(FileChange::Gone(target.clone()))]
        );
    }

    #[tokio::test]
    async fn missing_directory_is_watched_through_its_parent_then_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("a/b");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = DirWatcher::new(vec![target.clone()], tx).unwrap();
        assert_eq!(w.watching(), vec![tmp.path().to_path_buf()]);
        std::fs::create_dir_all(&target).unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(ev, Some(WatchEvent::Changed | WatchEvent::File(_))),
            "{ev:?}"
        );
        w.refresh().unwrap();
        assert_eq!(w.watching(), vec![target.clone()]);
        while rx.try_recv().is_ok() {}
        std::fs::write(target.join("x.yaml"), "a").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(ev, Some(WatchEvent::Changed | WatchEvent::File(_))),
            "{ev:?}"
        );
        // Replaced directory: the watch follows the new inode.
        std::fs::remove_dir_all(&target).unwrap();
        std::fs::create_dir(&target).unwrap();
        // The loop refreshes after the removal's event, as here.
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(ev, Some(WatchEvent::Changed | WatchEvent::File(_))),
            "{ev:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.refresh().unwrap();
        while rx.try_recv().is_ok() {}
        std::fs::write(target.join("y.yaml"), "a").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(ev, Some(WatchEvent::Changed | WatchEvent::File(_))),
            "{ev:?}"
        );
    }

    #[test]
    fn unrelated_siblings_are_ignored() {
        let targets = vec![PathBuf::from("/etc/netpol.d")];
        let ev = |p: &str| {
            Event::new(EventKind::Create(notify::event::CreateKind::File)).add_path(p.into())
        };
        assert!(is_relevant(&ev("/etc/netpol.d/a.yaml"), &targets));
        assert!(is_relevant(&ev("/etc/netpol.d"), &targets));
        assert!(is_relevant(&ev("/etc"), &targets));
        assert!(!is_relevant(&ev("/etc/passwd"), &targets));
    }
}
