//! The runtime socket (`runtime_dir/netpold.sock`): a unix stream socket speaking
//! line-delimited JSON. A client sends one request line (`{"request":"status"}`,
//! `endpoints` or `monitor`; a bare word is accepted too) and reads one answer
//! line, or for `monitor` a stream of event lines until it hangs up.
//!
//! Runs in its own tasks and never blocks the reconcile loop: `status` is read from
//! a watch channel, `endpoints` is a query the loop answers from memory, events
//! come through a broadcast channel that drops what a slow reader cannot take.
//! Requests are bounded in size, connections in number and time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slog::Logger;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};

use super::status::{EndpointView, Request, Status, Verb};

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 4096;
/// Time a client has to send its request, and to take each answer line.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are answered `{"error": "too many clients"}`
/// and closed at once (never left waiting in the listen queue, where they would
/// keep a `status` behind idle clients until those time out).
pub const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path}: another netpold answers on this socket")]
    InUse { path: PathBuf },
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("socket_group {group:?}: no such group")]
    NoGroup { group: String },
}

/// What a connection asks the reconcile loop.
#[derive(Debug)]
pub enum Query {
    Endpoints(oneshot::Sender<Vec<EndpointView>>),
}

/// The loop's side of the server.
#[derive(Clone)]
pub struct Shared {
    pub status: watch::Receiver<Status>,
    /// Serialized monitor events, one JSON object each.
    pub events: broadcast::Sender<Arc<str>>,
    pub queries: mpsc::Sender<Query>,
}

/// Create the socket: mode 0600, or 0660 owned by `group` when one is named. A
/// stale socket file is replaced; a live one is an error.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, ServerError> {
    let io = |op: &'static str| {
        move |source| ServerError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(io("create runtime directory"))?;
        // Traversable, so socket_group members reach the socket; the socket's own
        // mode decides who may connect.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod runtime directory"))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io("remove stale socket"))?;
    }
    let gid = match group {
        "" => None,
        g => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| ServerError::NoGroup {
                    group: g.to_string(),
                })?
                .gid,
        ),
    };
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    let secured = gid
        .map_or(Ok(()), |gid| {
            nix::unistd::chown(path, None, Some(gid)).map_err(std::io::Error::from)
        })
        .map_err(io("chown"))
        .and_then(|()| {
            let mode = if gid.is_some() { 0o660 } else { 0o600 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io("chmod"))
        });
    if let Err(e) = secured {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Accept connections until the listener fails or the task is dropped.
pub async fn serve(listener: UnixListener, shared: Shared, log: Logger) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(async move {
                        let (_, mut w) = stream.into_split();
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            write_line(&mut w, &error_line("too many clients")),
                        )
                        .await;
                    });
                    continue;
                };
                let shared = shared.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, shared).await {
                        slog::debug!(log, "runtime socket client"; "error" => %e);
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                slog::warn!(log, "runtime socket accept failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_line(w: &mut (impl AsyncWriteExt + Unpin), line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    match tokio::time::timeout(IO_TIMEOUT, w.write_all(&buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client too slow",
        )),
    }
}

fn error_line(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

async fn handle(stream: UnixStream, shared: Shared) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(MAX_REQUEST + 1));
    let mut raw = Vec::new();
    match tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut raw)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return write_line(&mut w, &error_line("no request within 5 s")).await,
    }
    let Ok(line) = String::from_utf8(raw) else {
        return write_line(&mut w, &error_line("bad request: not UTF-8")).await;
    };
    if line.len() as u64 > MAX_REQUEST
        || !line.ends_with('\n') && line.len() as u64 == MAX_REQUEST + 1
    {
        return write_line(&mut w, &error_line("request longer than 4096 bytes")).await;
    }
    let text = line.trim();
    let request = match serde_json::from_str::<Request>(text) {
        Ok(r) => r.request,
        Err(_)
            if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') =>
        {
            text.to_string()
        }
        Err(e) => return write_line(&mut w, &error_line(&format!("bad request: {e}"))).await,
    };
    match Verb::parse(&request) {
        Some(Verb::Status) => {
            let s = shared.status.borrow().clone();
            write_line(&mut w, &serde_json::to_string(&s).unwrap_or_default()).await
        }
        Some(Verb::Endpoints) => {
            let (tx, rx) = oneshot::channel();
            if shared.queries.send(Query::Endpoints(tx)).await.is_err() {
                return write_line(&mut w, &error_line("daemon is stopping")).await;
            }
            match tokio::time::timeout(IO_TIMEOUT, rx).await {
                Ok(Ok(eps)) => {
                    write_line(&mut w, &serde_json::to_string(&eps).unwrap_or_default()).await
                }
                _ => write_line(&mut w, &error_line("daemon did not answer in time")).await,
            }
        }
        Some(Verb::Monitor) => {
            let mut rx = shared.events.subscribe();
            // The client hanging up ends the stream; anything it sends is ignored.
            let mut r = reader.into_inner().into_inner();
            let mut sink = [0u8; 256];
            loop {
                tokio::select! {
                    n = r.read(&mut sink) => match n {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => {}
                    },
                    ev = rx.recv() => match ev {
                        Ok(line) => write_line(&mut w, &line).await?,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            write_line(&mut w, &serde_json::json!({ "lost": n }).to_string()).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                }
            }
        }
        None => {
            write_line(
                &mut w,
                &error_line(&format!(
                    "unknown request {request:?}; expected status, endpoints or monitor"
                )),
            )
            .await
        }
    }
}
