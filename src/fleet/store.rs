//! The `Store` trait: the part of etcd's v3 API fleet mode uses — a paged range
//! read at one revision, a watch from a revision with progress requests, leases,
//! and transactions with compares — so the sync logic runs the same against a
//! real etcd ([`super::etcd`]) and against the in-memory store of the tests
//! ([`super::mem`]).
//!
//! Dyn-compatible (boxed futures), so the daemon holds an `Arc<dyn Store>` and
//! needs no type parameter. Every call may fail; no error is ever turned into
//! an empty answer here or by a caller.

use futures::future::BoxFuture;

/// What every etcd response carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub revision: i64,
    pub cluster_id: u64,
}

/// One key and its value with etcd's revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// 0 = no lease.
    pub lease: i64,
}

/// A key range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub start: String,
    pub end: String,
}

impl Range {
    pub fn new(start: impl Into<String>, end: impl Into<String>) -> Range {
        Range {
            start: start.into(),
            end: end.into(),
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &str) -> Range {
        Range::new(prefix, super::keys::prefix_end(prefix))
    }

    pub fn contains(&self, key: &str) -> bool {
        key >= self.start.as_str() && key < self.end.as_str()
    }
}

/// One page of a range read, sorted by key.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub header: Header,
    pub kvs: Vec<Kv>,
    /// More keys follow in the range.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A watch event. A delete carries the key and the revision of the deletion as
/// `mod_revision`; its other fields are zero (no `prev_kv` is asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: Kv,
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMsg {
    /// The watch exists; its header's revision is the store's at creation.
    Created {
        header: Header,
    },
    Events {
        header: Header,
        events: Vec<Event>,
    },
    /// An answer to a progress request (or a progress notification): every
    /// event up to `header.revision` has been sent.
    Progress {
        header: Header,
    },
    /// The start revision was compacted: the caller must list again, never
    /// resume at `compact_revision`.
    Compacted {
        compact_revision: i64,
    },
    /// The server ended the watch.
    Canceled {
        reason: String,
    },
}

/// A watch on one key range. Dropping it cancels the watch.
pub trait WatchStream: Send {
    /// The next message; `Err` when the stream broke (the caller makes a new one).
    fn next(&mut self) -> BoxFuture<'_, Result<WatchMsg, StoreError>>;
    /// Ask for a [`WatchMsg::Progress`] as soon as possible.
    fn request_progress(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// What a compare in a transaction looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// 0 = the key does not exist.
    Version(i64),
    ModRevision(i64),
    Value(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub target: Target,
    /// `true`: equal; `false`: not equal.
    pub equal: bool,
}

impl Compare {
    pub fn version(key: impl Into<String>, version: i64) -> Compare {
        Compare {
            key: key.into(),
            target: Target::Version(version),
            equal: true,
        }
    }
    pub fn mod_revision(key: impl Into<String>, rev: i64) -> Compare {
        Compare {
            key: key.into(),
            target: Target::ModRevision(rev),
            equal: true,
        }
    }
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            target: Target::Value(value.into()),
            equal: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `lease` 0 = none.
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// Every key starting with the prefix.
    DeletePrefix {
        prefix: String,
    },
}

impl Op {
    /// Bytes this op adds to a request, roughly (for the 1.5 MiB limit).
    pub fn size(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => key.len() + value.len() + 16,
            Op::Delete { key } => key.len() + 8,
            Op::DeletePrefix { prefix } => 2 * prefix.len() + 8,
        }
    }
}

/// `if compares then success else failure`, applied atomically at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// Writes `key` only if it does not exist yet (its version is 0), without
    /// a lease; `succeeded` says whether it was written.
    pub fn put_if_absent(key: &str, value: &[u8]) -> Txn {
        Txn {
            compares: vec![Compare::version(key, 0)],
            success: vec![Op::Put {
                key: key.into(),
                value: value.to_vec(),
                lease: 0,
            }],
            failure: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub header: Header,
    pub succeeded: bool,
}

/// etcd's server limits (3.4 and 3.5 defaults), which every writer stays within.
pub const MAX_TXN_OPS: usize = 128;
/// `--max-request-bytes` is 1.5 MiB; requests are kept below it with room for
/// the request's own framing.
pub const MAX_TXN_BYTES: usize = 1_400_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (down, partitioned, refused).
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// No answer within the request timeout.
    #[error("etcd did not answer within {0} ms")]
    Timeout(u64),
    /// The revision asked for was compacted.
    #[error("revision {revision} has been compacted (compacted up to {compacted})")]
    Compacted { revision: i64, compacted: i64 },
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Anything else the server or client said.
    #[error("{0}")]
    Other(String),
}

/// The store. Every method is one request (a watch: one stream).
pub trait Store: Send + Sync + 'static {
    /// Up to `limit` keys of `range` (0 = no limit) at `revision` (0 = the latest).
    fn get_range(
        &self,
        range: &Range,
        revision: i64,
        limit: i64,
    ) -> BoxFuture<'_, Result<Page, StoreError>>;

    /// Watch `range` from `start_revision` (events at and after it).
    fn watch(
        &self,
        range: &Range,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<Box<dyn WatchStream>, StoreError>>;

    /// A new lease of `ttl` seconds: its id and granted TTL.
    fn lease_grant(&self, ttl: i64) -> BoxFuture<'_, Result<(i64, i64), StoreError>>;

    /// Refresh a lease once. [`StoreError::LeaseNotFound`] when it is gone.
    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Remaining and granted TTL of a lease; `None` when it does not exist.
    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, Result<Option<(i64, i64)>, StoreError>>;

    /// Revoke a lease: every key attached to it is deleted.
    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>>;

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>>;
}

/// A store call bounded by `d`: past it, [`StoreError::Timeout`] (a frozen
/// etcd answers nothing, and nothing here waits for it forever).
pub async fn bounded<T>(
    d: std::time::Duration,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or(Err(StoreError::Timeout(d.as_millis() as u64)))
}

/// Sleep until `at`, or forever when there is none (a `select!` arm that
/// stays off).
pub async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Read a whole range, paged, at one revision (the first page's). A
/// compaction between pages restarts the read at the latest revision, at most
/// a few times.
pub async fn get_all(store: &dyn Store, range: &Range, page: i64) -> Result<Page, StoreError> {
    let mut attempts = 0;
    'again: loop {
        attempts += 1;
        let mut out = Page::default();
        let mut rev = 0;
        let mut r = range.clone();
        loop {
            let p = match store.get_range(&r, rev, page).await {
                Ok(p) => p,
                Err(StoreError::Compacted { .. }) if attempts < 4 => continue 'again,
                Err(e) => return Err(e),
            };
            if rev == 0 {
                rev = p.header.revision;
                out.header = p.header;
            }
            let more = p.more && !p.kvs.is_empty();
            if let Some(last) = p.kvs.last() {
                r.start = format!("{}\0", last.key);
            }
            out.kvs.extend(p.kvs);
            if !more {
                return Ok(out);
            }
        }
    }
}

/// Split `ops` into transactions within [`MAX_TXN_OPS`] and [`MAX_TXN_BYTES`].
/// An op larger than the byte limit on its own is an error naming its key.
pub fn batches(ops: Vec<Op>) -> Result<Vec<Vec<Op>>, String> {
    let mut out: Vec<Vec<Op>> = Vec::new();
    let mut cur: Vec<Op> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.size();
        if size > MAX_TXN_BYTES {
            let key = match &op {
                Op::Put { key, .. } | Op::Delete { key } => key,
                Op::DeletePrefix { prefix } => prefix,
            };
            return Err(format!(
                "{key}: the value is {size} bytes; etcd takes at most {MAX_TXN_BYTES} in one request"
            ));
        }
        if !cur.is_empty() && (cur.len() == MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(op);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_both_limits() {
        let put = |i: usize, n: usize| Op::Put {
            key: format!("k{i}"),
            value: vec![b'x'; n],
            lease: 0,
        };
        let b = batches((0..300).map(|i| put(i, 10)).collect()).unwrap();
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![128, 128, 44]
        );
        let b = batches((0..5).map(|i| put(i, 500_000)).collect()).unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        for t in &b {
            assert!(t.iter().map(Op::size).sum::<usize>() <= MAX_TXN_BYTES);
        }
        let e = batches(vec![put(7, 2_000_000)]).unwrap_err();
        assert_eq!(
            e,
            "k7: the value is 2000018 bytes; etcd takes at most 1400000 in one request"
        );
        assert!(batches(vec![]).unwrap().is_empty());
    }
}
