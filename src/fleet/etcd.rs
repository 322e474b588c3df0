//! [`Store`] on a real etcd through the `etcd-client` crate (Cargo feature `etcd`).
//!
//! The client connects lazily and is kept: `etcd-client`'s channel reconnects
//! by itself, but a watch must be made again by its caller (the sync engine
//! does). Every unary call is bounded by the request timeout, so a frozen etcd
//! answers `Timeout` instead of hanging a caller; watch streams are not (their
//! liveness is the engine's progress requests). Lists are paged by the caller
//! and the decode limit is raised above tonic's 4 MiB for large pages and
//! catch-up watch responses.
//!
//! Error mapping: a compacted revision → [`StoreError::Compacted`], an unknown
//! lease → [`StoreError::LeaseNotFound`], RBAC refusals → `PermissionDenied`,
//! transport and availability failures → `Unavailable`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as ECompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, Identity, PutOptions, TlsOptions, Txn as ETxn, TxnOp, WatchOptions,
};
use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::store::{
    Event, EventKind, Header, Kv, Op, Page, Range, Store, StoreError, Target, Txn, TxnResult,
    WatchMsg, WatchStream,
};
use crate::config::EtcdConfig;

/// Largest message decoded from etcd (a page, a watch response).
const MAX_DECODE: usize = 64 * 1024 * 1024;

/// How to reach etcd, resolved from the `[etcd]` table (files read).
#[derive(Clone)]
pub struct ConnectSettings {
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    tls: Option<TlsOptions>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|u| &u.0))
            .finish()
    }
}

/// A file the `[etcd]` table names could not be read: `etcd.<key>: <path>: <why>`.
#[derive(Debug, thiserror::Error)]
#[error("etcd.{key}: {}: {source}", path.display())]
pub struct SettingsError {
    pub key: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn read(key: &'static str, path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|source| SettingsError {
        key,
        path: path.to_path_buf(),
        source,
    })
}

impl ConnectSettings {
    /// Read the TLS files and the password file the table names.
    pub fn from_config(cfg: &EtcdConfig) -> Result<ConnectSettings, SettingsError> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let tls = if set(&cfg.ca_file) || set(&cfg.cert_file) {
            let mut t = TlsOptions::new();
            if set(&cfg.ca_file) {
                t = t.ca_certificate(Certificate::from_pem(read("ca_file", &cfg.ca_file)?));
            }
            if set(&cfg.cert_file) {
                let cert = read("cert_file", &cfg.cert_file)?;
                let key = read("key_file", &cfg.key_file)?;
                t = t.identity(Identity::from_pem(cert, key));
            }
            Some(t)
        } else {
            None
        };
        let user = if cfg.username.is_empty() {
            None
        } else {
            let text = read("password_file", &cfg.password_file)?;
            let password = text.lines().next().unwrap_or("").to_string();
            Some((cfg.username.clone(), password))
        };
        Ok(ConnectSettings {
            endpoints: cfg.endpoints.clone(),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            tls,
            user,
        })
    }

    /// Plain http endpoints, default timeouts (tests, tools).
    pub fn plain(endpoints: Vec<String>) -> ConnectSettings {
        ConnectSettings {
            endpoints,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
        }
    }
}

/// The etcd store. Connecting never fails here: the first call connects, and
/// a call while etcd is away fails with `Unavailable` and is tried again later.
pub struct EtcdStore {
    settings: ConnectSettings,
    client: Mutex<Option<Client>>,
}

impl EtcdStore {
    pub fn new(settings: ConnectSettings) -> EtcdStore {
        EtcdStore {
            settings,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut g = self.client.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let s = &self.settings;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(s.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), s.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_auto_token_refresh(true);
        if let Some(t) = &s.tls {
            opts = opts.with_tls(t.clone());
        }
        if let Some((u, p)) = &s.user {
            opts = opts.with_user(u.clone(), p.clone());
        }
        // With a user, connect authenticates and so needs etcd to answer.
        let c = bounded(s.request_timeout, Client::connect(&s.endpoints, Some(opts)))
            .await?
            .map_err(|e| map_err(e, Ctx::None))?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn call<T, F>(&self, ctx: Ctx, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let c = self.client().await?;
        bounded(self.settings.request_timeout, f(c))
            .await?
            .map_err(|e| map_err(e, ctx))
    }
}

async fn bounded<T>(d: Duration, f: impl std::future::Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| StoreError::Timeout(d.as_millis() as u64))
}

#[derive(Clone, Copy)]
enum Ctx {
    None,
    Revision(i64),
    Lease(i64),
}

fn map_err(e: etcd_client::Error, ctx: Ctx) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            if msg.contains("compacted") {
                let revision = match ctx {
                    Ctx::Revision(r) => r,
                    _ => 0,
                };
                return StoreError::Compacted {
                    revision,
                    compacted: 0,
                };
            }
            if msg.contains("lease not found") {
                if let Ctx::Lease(id) = ctx {
                    return StoreError::LeaseNotFound(id);
                }
            }
            // gRPC status codes (grpc/status.proto), named here to spare a
            // direct dependency on tonic for its enum.
            const CANCELLED: i32 = 1;
            const UNKNOWN: i32 = 2;
            const DEADLINE_EXCEEDED: i32 = 4;
            const PERMISSION_DENIED: i32 = 7;
            const ABORTED: i32 = 10;
            const UNAVAILABLE: i32 = 14;
            const UNAUTHENTICATED: i32 = 16;
            match i32::from(s.code()) {
                PERMISSION_DENIED | UNAUTHENTICATED => StoreError::PermissionDenied(msg),
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED => {
                    StoreError::Unavailable(msg)
                }
                UNKNOWN if msg.contains("transport") || msg.contains("connect") => {
                    StoreError::Unavailable(msg)
                }
                _ => StoreError::Other(msg),
            }
        }
        E::LeaseKeepAliveError(m) if m.contains("not found") => match ctx {
            Ctx::Lease(id) => StoreError::LeaseNotFound(id),
            _ => StoreError::Other(m),
        },
        E::TransportError(t) => StoreError::Unavailable(format!("{t}")),
        E::IoError(io) => StoreError::Unavailable(io.to_string()),
        E::WatchError(m) => StoreError::Unavailable(m),
        other => StoreError::Other(other.to_string()),
    }
}

fn header(h: Option<&etcd_client::ResponseHeader>) -> Header {
    h.map_or(Header::default(), |h| Header {
        revision: h.revision(),
        cluster_id: h.cluster_id(),
    })
}

fn kv(k: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        version: k.version(),
        lease: k.lease(),
    }
}

fn op(o: &Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            TxnOp::put(key.as_bytes(), value.clone(), opts)
        }
        Op::Delete { key } => TxnOp::delete(key.as_bytes(), None),
        Op::DeletePrefix { prefix } => {
            TxnOp::delete(prefix.as_bytes(), Some(DeleteOptions::new().with_prefix()))
        }
    }
}

struct EtcdWatch {
    stream: etcd_client::WatchStream,
    request_timeout: Duration,
}

impl WatchStream for EtcdWatch {
    fn next(&mut self) -> BoxFuture<'_, Result<WatchMsg, StoreError>> {
        Box::pin(async move {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(StoreError::Unavailable("watch stream ended".into())),
                Err(e) => return Err(map_err(e, Ctx::None)),
            };
            let h = header(resp.header());
            if resp.compact_revision() > 0 {
                return Ok(WatchMsg::Compacted {
                    compact_revision: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Ok(WatchMsg::Canceled {
                    reason: resp.cancel_reason().to_string(),
                });
            }
            if resp.created() {
                return Ok(WatchMsg::Created { header: h });
            }
            if resp.events().is_empty() {
                return Ok(WatchMsg::Progress { header: h });
            }
            let events = resp
                .events()
                .iter()
                .filter_map(|e| {
                    let k = kv(e.kv()?);
                    Some(Event {
                        kind: match e.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        },
                        kv: k,
                    })
                })
                .collect();
            Ok(WatchMsg::Events { header: h, events })
        })
    }

    fn request_progress(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            bounded(self.request_timeout, self.stream.request_progress())
                .await?
                .map_err(|e| map_err(e, Ctx::None))
        })
    }
}

impl Store for EtcdStore {
    fn get_range(
        &self,
        range: &Range,
        revision: i64,
        limit: i64,
    ) -> BoxFuture<'_, Result<Page, StoreError>> {
        let range = range.clone();
        Box::pin(async move {
            self.call(Ctx::Revision(revision), |c| async move {
                let mut opts = GetOptions::new().with_range(range.end.as_bytes());
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                if limit > 0 {
                    opts = opts.with_limit(limit);
                }
                let r = c
                    .kv_client()
                    .max_decoding_message_size(MAX_DECODE)
                    .get(range.start.as_bytes(), Some(opts))
                    .await?;
                Ok(Page {
                    header: header(r.header()),
                    kvs: r.kvs().iter().map(kv).collect(),
                    more: r.more(),
                })
            })
            .await
        })
    }

    fn watch(
        &self,
        range: &Range,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<Box<dyn WatchStream>, StoreError>> {
        let range = range.clone();
        Box::pin(async move {
            let timeout = self.settings.request_timeout;
            let stream = self
                .call(Ctx::Revision(start_revision), |c| async move {
                    let mut opts = WatchOptions::new()
                        .with_range(range.end.as_bytes())
                        .with_progress_notify();
                    if start_revision > 0 {
                        opts = opts.with_start_revision(start_revision);
                    }
                    c.watch_client()
                        .max_decoding_message_size(MAX_DECODE)
                        .watch(range.start.as_bytes(), Some(opts))
                        .await
                })
                .await?;
            Ok(Box::new(EtcdWatch {
                stream,
                request_timeout: timeout,
            }) as Box<dyn WatchStream>)
        })
    }

    fn lease_grant(&self, ttl: i64) -> BoxFuture<'_, Result<(i64, i64), StoreError>> {
        Box::pin(async move {
            self.call(Ctx::None, |mut c| async move {
                let r = c.lease_grant(ttl, None).await?;
                Ok((r.id(), r.ttl()))
            })
            .await
        })
    }

    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // One refresh: `keep_alive` sends the first request and reads its
            // answer (an error when the lease is gone); the stream is dropped.
            self.call(Ctx::Lease(id), |mut c| async move {
                c.lease_keep_alive(id).await.map(|_| ())
            })
            .await
        })
    }

    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, Result<Option<(i64, i64)>, StoreError>> {
        Box::pin(async move {
            let r = self
                .call(Ctx::Lease(id), |mut c| async move {
                    c.lease_time_to_live(id, None).await
                })
                .await;
            match r {
                Ok(r) if r.ttl() > 0 => Ok(Some((r.ttl(), r.granted_ttl()))),
                Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.call(Ctx::Lease(id), |mut c| async move {
                c.lease_revoke(id).await.map(|_| ())
            })
            .await
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
        Box::pin(async move {
            let lease = txn
                .success
                .iter()
                .chain(&txn.failure)
                .find_map(|o| match o {
                    Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                    _ => None,
                })
                .unwrap_or(0);
            let compares: Vec<ECompare> = txn
                .compares
                .iter()
                .map(|c| {
                    let cmp = if c.equal {
                        CompareOp::Equal
                    } else {
                        CompareOp::NotEqual
                    };
                    match &c.target {
                        Target::Version(v) => ECompare::version(c.key.as_bytes(), cmp, *v),
                        Target::ModRevision(r) => ECompare::mod_revision(c.key.as_bytes(), cmp, *r),
                        Target::Value(v) => ECompare::value(c.key.as_bytes(), cmp, v.clone()),
                    }
                })
                .collect();
            let t = ETxn::new()
                .when(compares)
                .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
                .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
            self.call(Ctx::Lease(lease), |mut c| async move {
                let r = c.txn(t).await?;
                Ok(TxnResult {
                    header: header(r.header()),
                    succeeded: r.succeeded(),
                })
            })
            .await
        })
    }
}
