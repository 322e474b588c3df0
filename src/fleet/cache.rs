//! The view cache in `state_dir/etcd/`: a snapshot (`view.snapshot.json`) and
//! a delta log (`view.log`, one JSON record per line), so a netpold started
//! while etcd is away enforces the last view it had.
//!
//! Writes never rewrite the whole view per change: deltas are appended (and
//! synced) at most once per [`CacheWriter`] interval; the snapshot is rewritten
//! after a full relist and when the log has grown past the snapshot's size.
//! Every snapshot and every fresh log is written to a temporary file, synced
//! and renamed into place. Reading takes the snapshot, then every log record
//! after its revision in order, and stops at the first record that does not
//! parse (a write cut short by a crash): the view is then the last one
//! written whole.
//!
//! The writer runs the file work on tokio's blocking pool, one job at a time,
//! so the sync task never waits for a disk.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::view::RawEntry;

const SNAPSHOT: &str = "view.snapshot.json";
const LOG: &str = "view.log";
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    prefix: String,
    cluster_id: u64,
    revision: i64,
    entries: Vec<RawEntry>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    revision: i64,
    cluster_id: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    put: Vec<RawEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    delete: Vec<String>,
}

/// A view read back from the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cached {
    pub cluster_id: u64,
    pub revision: i64,
    pub entries: BTreeMap<String, RawEntry>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CacheError {
    pub path: PathBuf,
    pub message: String,
}

fn cerr(path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Read the cache of `prefix` in `dir`. `Ok(None)`: no cache, or one of another
/// prefix. A damaged snapshot is an error (the caller starts without a view
/// and says so); a damaged log tail is not.
pub fn load(dir: &Path, prefix: &str) -> Result<Option<Cached>, CacheError> {
    let snap_path = dir.join(SNAPSHOT);
    let text = match fs::read_to_string(&snap_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cerr(&snap_path, e)),
    };
    let snap: Snapshot = serde_json::from_str(&text).map_err(|e| cerr(&snap_path, e))?;
    if snap.format != FORMAT || snap.prefix != prefix {
        return Ok(None);
    }
    let mut c = Cached {
        cluster_id: snap.cluster_id,
        revision: snap.revision,
        entries: snap
            .entries
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect(),
    };
    let log_path = dir.join(LOG);
    let f = match fs::File::open(&log_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(c)),
        Err(e) => return Err(cerr(&log_path, e)),
    };
    for line in std::io::BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Ok(r) = serde_json::from_str::<Record>(&line) else {
            break;
        };
        if r.revision <= c.revision && r.cluster_id == c.cluster_id {
            continue;
        }
        for k in r.delete {
            c.entries.remove(&k);
        }
        for e in r.put {
            c.entries.insert(e.key.clone(), e);
        }
        c.revision = c.revision.max(r.revision);
        c.cluster_id = r.cluster_id;
    }
    Ok(Some(c))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let r = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(cerr(path, e));
    }
    sync_dir(dir);
    Ok(())
}

fn write_snapshot(dir: &Path, prefix: &str, c: &Cached) -> Result<u64, CacheError> {
    fs::create_dir_all(dir).map_err(|e| cerr(dir, e))?;
    let snap = Snapshot {
        format: FORMAT,
        prefix: prefix.to_string(),
        cluster_id: c.cluster_id,
        revision: c.revision,
        entries: c.entries.values().cloned().collect(),
    };
    let bytes = serde_json::to_vec(&snap).map_err(|e| cerr(dir, e))?;
    write_atomic(&dir.join(SNAPSHOT), &bytes)?;
    // The log's records are all in the snapshot now.
    write_atomic(&dir.join(LOG), b"")?;
    Ok(bytes.len() as u64)
}

fn append(dir: &Path, r: &Record) -> Result<u64, CacheError> {
    let path = dir.join(LOG);
    let mut line = serde_json::to_vec(r).map_err(|e| cerr(&path, e))?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| cerr(&path, e))?;
    f.write_all(&line).map_err(|e| cerr(&path, e))?;
    f.sync_data().map_err(|e| cerr(&path, e))?;
    f.metadata().map(|m| m.len()).map_err(|e| cerr(&path, e))
}

/// What the sync task sends the writer.
#[derive(Debug)]
pub enum CacheMsg {
    /// Changes of the view up to `revision`.
    Delta {
        revision: i64,
        cluster_id: u64,
        put: Vec<RawEntry>,
        delete: Vec<String>,
    },
    /// The whole view (after a full list): a new snapshot.
    Replace(Cached),
    /// Write everything pending, then answer.
    Flush(oneshot::Sender<()>),
}

/// The writer task's handle.
pub struct CacheWriter {
    tx: mpsc::UnboundedSender<CacheMsg>,
}

impl CacheWriter {
    /// Start the writer for `dir`; `interval` bounds how often it writes.
    pub fn start(
        dir: PathBuf,
        prefix: String,
        interval: Duration,
        log: slog::Logger,
    ) -> CacheWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(dir, prefix, interval, rx, log));
        CacheWriter { tx }
    }

    pub fn send(&self, m: CacheMsg) {
        // The writer ends only when every sender is gone.
        let _ = self.tx.send(m);
    }

    /// Wait until everything sent so far is on disk.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(CacheMsg::Flush(tx));
        let _ = rx.await;
    }
}

#[derive(Default)]
struct Pending {
    revision: i64,
    cluster_id: u64,
    put: BTreeMap<String, RawEntry>,
    delete: std::collections::BTreeSet<String>,
    replace: Option<Cached>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.replace.is_none() && self.put.is_empty() && self.delete.is_empty()
    }

    fn add(&mut self, m: CacheMsg) {
        match m {
            CacheMsg::Delta {
                revision,
                cluster_id,
                put,
                delete,
            } => {
                self.revision = self.revision.max(revision);
                self.cluster_id = cluster_id;
                for k in delete {
                    self.put.remove(&k);
                    if let Some(r) = &mut self.replace {
                        r.entries.remove(&k);
                    } else {
                        self.delete.insert(k);
                    }
                }
                for e in put {
                    if let Some(r) = &mut self.replace {
                        r.entries.insert(e.key.clone(), e);
                    } else {
                        self.delete.remove(&e.key);
                        self.put.insert(e.key.clone(), e);
                    }
                }
                if let Some(r) = &mut self.replace {
                    r.revision = r.revision.max(revision);
                    r.cluster_id = cluster_id;
                }
            }
            CacheMsg::Replace(c) => {
                self.put.clear();
                self.delete.clear();
                self.revision = c.revision;
                self.cluster_id = c.cluster_id;
                self.replace = Some(c);
            }
            CacheMsg::Flush(_) => unreachable!("handled by the writer"),
        }
    }
}

async fn writer(
    dir: PathBuf,
    prefix: String,
    interval: Duration,
    mut rx: mpsc::UnboundedReceiver<CacheMsg>,
    log: slog::Logger,
) {
    let mut pending = Pending::default();
    let mut snapshot_size: u64 = 0;
    let mut last_write = tokio::time::Instant::now() - interval;
    let write = |p: Pending, size: u64| {
        let (dir, prefix, log) = (dir.clone(), prefix.clone(), log.clone());
        let mut s = size;
        async move {
            if let Err(e) = write_job(&dir, &prefix, p, &mut s).await {
                slog::warn!(log, "etcd view cache not written"; "error" => %e);
            }
            s
        }
    };
    loop {
        let msg = if pending.is_empty() {
            rx.recv().await
        } else {
            tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(last_write + interval) => {
                    snapshot_size = write(std::mem::take(&mut pending), snapshot_size).await;
                    last_write = tokio::time::Instant::now();
                    continue;
                }
            }
        };
        match msg {
            None => {
                // Every sender is gone: write what is left and stop.
                if !pending.is_empty() {
                    write(std::mem::take(&mut pending), snapshot_size).await;
                }
                return;
            }
            Some(CacheMsg::Flush(w)) => {
                if !pending.is_empty() {
                    snapshot_size = write(std::mem::take(&mut pending), snapshot_size).await;
                    last_write = tokio::time::Instant::now();
                }
                let _ = w.send(());
            }
            Some(m) => pending.add(m),
        }
    }
}

/// One write on the blocking pool; `snapshot_size` is the snapshot's size after it.
async fn write_job(
    dir: &Path,
    prefix: &str,
    p: Pending,
    snapshot_size: &mut u64,
) -> Result<(), CacheError> {
    let dir = dir.to_path_buf();
    let prefix = prefix.to_string();
    let size = *snapshot_size;
    let r = tokio::task::spawn_blocking(move || -> Result<u64, CacheError> {
        if let Some(c) = p.replace {
            return write_snapshot(&dir, &prefix, &c);
        }
        fs::create_dir_all(&dir).map_err(|e| cerr(&dir, e))?;
        let rec = Record {
            revision: p.revision,
            cluster_id: p.cluster_id,
            put: p.put.into_values().collect(),
            delete: p.delete.into_iter().collect(),
        };
        let log_len = append(&dir, &rec)?;
        if log_len > size.max(1 << 20) {
            // Fold the log into a new snapshot.
            if let Some(c) = load(&dir, &prefix)? {
                return write_snapshot(&dir, &prefix, &c);
            }
        }
        Ok(size)
    })
    .await
    .map_err(|e| cerr(Path::new("view cache"), e))?;
    *snapshot_size = r?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str, v: &str, rev: i64) -> RawEntry {
        RawEntry {
            key: key.into(),
            value: v.into(),
            create_revision: rev,
            mod_revision: rev,
            binary: false,
        }
    }

    #[tokio::test]
    async fn snapshot_and_log_read_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("etcd");
        assert_eq!(load(&dir, "/p").unwrap(), None);
        let w = CacheWriter::start(
            dir.clone(),
            "/p".into(),
            Duration::from_millis(5),
            crate::logging::discard(),
        );
        let mut c = Cached {
            cluster_id: 7,
            revision: 10,
            ..Cached::default()
        };
        c.entries.insert("/p/a".into(), e("/p/a", "1", 3));
        c.entries.insert("/p/b".into(), e("/p/b", "2", 4));
        w.send(CacheMsg::Replace(c.clone()));
        w.flush().await;
        assert_eq!(load(&dir, "/p").unwrap().unwrap(), c);
        w.send(CacheMsg::Delta {
            revision: 11,
            cluster_id: 7,
            put: vec![e("/p/c", "3", 11)],
            delete: vec!["/p/a".into()],
        });
        w.send(CacheMsg::Delta {
            revision: 12,
            cluster_id: 7,
            put: vec![e("/p/b", "2b", 12)],
            delete: vec![],
        });
        w.flush().await;
        let got = load(&dir, "/p").unwrap().unwrap();
        assert_eq!(got.revision, 12);
        assert_eq!(
            got.entries
                .values()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect::<Vec<_>>(),
            vec![("/p/b", "2b"), ("/p/c", "3")]
        );
        // Another prefix's cache is not this view.
        assert_eq!(load(&dir, "/other").unwrap(), None);
        // A record cut short by a crash is the end of the log.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.join(LOG))
            .unwrap();
        f.write_all(br#"{"revision":13,"cluster_id":7,"delete":["/p/b""#)
            .unwrap();
        assert_eq!(load(&dir, "/p").unwrap().unwrap(), got);
        // Nothing but the two files and no temporary left behind.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![LOG, SNAPSHOT]);
    }

    #[tokio::test]
    async fn a_long_log_is_folded_into_the_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let w = CacheWriter::start(
            dir.clone(),
            "/p".into(),
            Duration::from_millis(1),
            crate::logging::discard(),
        );
        w.send(CacheMsg::Replace(Cached::default()));
        w.flush().await;
        let big = "x".repeat(200_000);
        for i in 0..8 {
            w.send(CacheMsg::Delta {
                revision: i + 1,
                cluster_id: 0,
                put: vec![e(&format!("/p/{i}"), &big, i + 1)],
                delete: vec![],
            });
            w.flush().await;
        }
        assert!(fs::metadata(dir.join(LOG)).unwrap().len() < 1 << 20);
        let got = load(&dir, "/p").unwrap().unwrap();
        assert_eq!(got.entries.len(), 8);
        assert_eq!(got.revision, 8);
    }
}
