//! `netpolctl status`, `endpoints`, `monitor`: talk to a running netpold through
//! its runtime socket (line-delimited JSON, see `daemon::server`). Reads only.
//!
//! Exit status: 0 when the daemon answered, 1 when no daemon answers (with a
//! message naming the socket) or it answered with an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::config::{Config, DEFAULT_CONFIG};
use crate::daemon::status::{EndpointView, MonitorEvent, Reason, Status};

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// netpold.toml naming the instance's runtime_dir
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The daemon's socket (default: runtime_dir/netpold.sock)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
}

impl DaemonArgs {
    fn socket_path(&self) -> anyhow::Result<PathBuf> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => Ok(Config::load(&self.config)?.socket_path()),
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// What to try is [`ClientError::hint`], printed after the cause.
    #[error("no netpold answers on {path}")]
    NoDaemon {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the daemon answered: {message}")]
    Daemon { path: PathBuf, message: String },
    #[error("{path}: unexpected answer: {message}")]
    Protocol { path: PathBuf, message: String },
}

impl ClientError {
    /// What the user can do about it, if anything.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::NoDaemon { .. } => {
                Some("is it running? --socket or --config picks another instance")
            }
            _ => None,
        }
    }
}

/// Send one request and return the connection positioned at the answer.
pub fn request(
    path: &Path,
    req: &str,
    timeout: Option<Duration>,
) -> Result<BufReader<UnixStream>, ClientError> {
    let no = |source| ClientError::NoDaemon {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(no)?;
    s.set_read_timeout(timeout).map_err(no)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(no)?;
    s.write_all(format!("{}\n", serde_json::json!({ "request": req })).as_bytes())
        .map_err(no)?;
    Ok(BufReader::new(s))
}

/// One request, one JSON answer.
pub fn query<T: serde::de::DeserializeOwned>(
    path: &Path,
    req: &str,
) -> Result<(T, String), ClientError> {
    let mut r = request(path, req, Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|source| ClientError::NoDaemon {
            path: path.to_path_buf(),
            source,
        })?;
    decode(path, &line).map(|v| (v, line.trim_end().to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(path: &Path, line: &str) -> Result<T, ClientError> {
    if line.is_empty() {
        return Err(ClientError::Protocol {
            path: path.to_path_buf(),
            message: "connection closed".into(),
        });
    }
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(msg) = v.get("error").and_then(|m| m.as_str()) {
        return Err(ClientError::Daemon {
            path: path.to_path_buf(),
            message: msg.to_string(),
        });
    }
    serde_json::from_value(v).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Print the error, its cause and the hint, each once.
fn fail(e: ClientError) -> anyhow::Result<i32> {
    match e.hint() {
        Some(hint) => eprintln!("netpolctl: {} ({hint})", crate::error::Chain(&e)),
        None => eprintln!("netpolctl: {}", crate::error::Chain(&e)),
    }
    Ok(1)
}

pub fn status(args: &DaemonArgs) -> anyhow::Result<i32> {
    let path = args.socket_path()?;
    let (s, raw) = match query::<Status>(&path, "status") {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if args.json {
        println!("{raw}");
    } else {
        print!("{}", format_status(&s));
    }
    Ok(0)
}

pub fn format_status(s: &Status) -> String {
    let mut out = String::new();
    let state = match (s.ready, s.degraded) {
        (true, false) => "ready",
        (true, true) => "ready, DEGRADED",
        (false, _) => "NOT READY",
    };
    out.push_str(&format!(
        "netpold on {}: {state}, generation {}\n",
        s.node, s.generation
    ));
    out.push_str(&format!(
        "  {} endpoints ({} attached, {} pending), {} policies",
        s.endpoints, s.attached, s.pending, s.policies
    ));
    if let Some(ms) = s.last_apply_ms {
        out.push_str(&format!(", last apply {ms:.1} ms"));
    }
    out.push('\n');
    if s.policies_from_last_good {
        out.push_str("  enforcing the last valid policy files saved in state_dir (the live ones are invalid)\n");
    }
    if s.registry_from_last_good {
        out.push_str("  using the last valid registry files saved in state_dir (the live ones are invalid)\n");
    }
    if let Some(e) = &s.datapath_error {
        out.push_str(&format!("  datapath: {e} (retrying)\n"));
    }
    if let Some(e) = &s.state_error {
        out.push_str(&format!("  state_dir: {e}\n"));
    }
    if let Some(e) = &s.etcd {
        out.push_str(&format_etcd(e));
    }
    let mut list = |what: &str, lines: Vec<&str>| {
        if !lines.is_empty() {
            out.push_str(&format!("  {} {what}:\n", lines.len()));
            for l in lines {
                out.push_str(&format!("    {l}\n"));
            }
        }
    };
    list(
        "problem(s) in the input files; the last valid set stays in force",
        s.errors.iter().map(|e| e.message.as_str()).collect(),
    );
    list(
        "warning(s) in the input files (applied as they are)",
        s.warnings.iter().map(|w| w.message.as_str()).collect(),
    );
    out
}

/// The fleet-mode lines of `netpolctl status`.
fn format_etcd(e: &crate::daemon::status::EtcdStatus) -> String {
    let link = match (e.connected, e.in_sync) {
        (true, true) => "connected, in sync".to_string(),
        (true, false) => "connected, listing".to_string(),
        (false, _) if e.from_cache => "NOT CONNECTED, enforcing the cached view".to_string(),
        (false, _) => "NOT CONNECTED, keeping the view".to_string(),
    };
    let mut out = format!(
        "  etcd: {link}; revision {}, applied {}, {} remote endpoints, {} rejected, {} relists, {} reconnects\n",
        e.revision,
        e.applied_revision,
        e.remote_endpoints,
        e.rejected.len(),
        e.relists,
        e.reconnects
    );
    if e.held_removals > 0 {
        out.push_str(&format!(
            "  etcd: {} endpoint removals held (a mass removal); they apply if etcd still says so when the hold ends\n",
            e.held_removals
        ));
    }
    if let Some(err) = &e.last_error {
        out.push_str(&format!("  etcd: {err}\n"));
    }
    for r in &e.rejected {
        out.push_str(&format!("    rejected: {}\n", r.message));
    }
    out
}

pub fn endpoints(args: &DaemonArgs) -> anyhow::Result<i32> {
    let path = args.socket_path()?;
    let (eps, raw) = match query::<Vec<EndpointView>>(&path, "endpoints") {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if args.json {
        println!("{raw}");
    } else {
        print!("{}", format_endpoints(&eps));
    }
    Ok(0)
}

pub fn format_endpoints(eps: &[EndpointView]) -> String {
    let dd = |on: bool| if on { "default-deny" } else { "open" };
    let mut rows = vec![[
        "ENDPOINT".to_string(),
        "KIND".into(),
        "IDENTITY".into(),
        "INTERFACE".into(),
        "IFINDEX".into(),
        "STATE".into(),
        "INGRESS".into(),
        "EGRESS".into(),
        "ALLOWED".into(),
        "DENIED".into(),
    ]];
    for e in eps {
        let c = &e.counters;
        rows.push([
            match &e.namespace {
                Some(ns) => format!("{ns}/{}", e.name),
                None => e.name.clone(),
            },
            e.kind.to_string(),
            e.identity.to_string(),
            e.interface.clone().unwrap_or_else(|| "-".into()),
            e.ifindex
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            e.state.to_string() + if e.audit { " (audit)" } else { "" },
            dd(e.ingress_default_deny).into(),
            dd(e.egress_default_deny).into(),
            c.allowed.to_string(),
            (c.denied_policy + c.denied_default + c.denied_spoof + c.denied_other).to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn monitor(args: &DaemonArgs) -> anyhow::Result<i32> {
    let path = args.socket_path()?;
    let reader = match request(&path, "monitor", None) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let mut out = stdout.lock();
        let printed = if args.json {
            writeln!(out, "{line}")
        } else {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v.get("lost").is_some() => {
                    writeln!(out, "({} events lost: the reader was too slow)", v["lost"])
                }
                Ok(v) if v.get("error").is_some() => {
                    return fail(ClientError::Daemon {
                        path,
                        message: v["error"].as_str().unwrap_or("").to_string(),
                    })
                }
                _ => match serde_json::from_str::<MonitorEvent>(&line) {
                    Ok(ev) => writeln!(out, "{}", format_event(&ev)),
                    Err(_) => writeln!(out, "{line}"),
                },
            }
        };
        if printed.is_err() {
            break; // stdout closed (e.g. `| head`)
        }
    }
    Ok(0)
}

/// `TIME VERDICT SRC -> DST PROTO/PORT ENDPOINT (DIRECTION) RULE`.
pub fn format_event(ev: &MonitorEvent) -> String {
    let addr = |ip: &str, port: u16| {
        let ip = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        if port == 0 {
            ip
        } else {
            format!("{ip}:{port}")
        }
    };
    let why = match (&ev.rule, ev.reason) {
        (Some(r), _) => format!(
            "{} {} ({}{}) {}{}",
            r.file,
            r.policy,
            r.kind,
            if r.staged { ", staged" } else { "" },
            r.path,
            if r.default_deny { " default deny" } else { "" }
        ),
        (None, Reason::DefaultDeny) => "default deny".into(),
        (None, other) => other.to_string(),
    };
    format!(
        "{} {:<8} {} -> {} {}/{} {} ({}) {}",
        ev.time,
        ev.verdict,
        addr(&ev.src, ev.sport),
        addr(&ev.dst, ev.dport),
        ev.proto,
        ev.dport,
        ev.endpoint.as_deref().unwrap_or("-"),
        ev.direction,
        why
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{
        CountersView, EndpointKind, EndpointState, FileError, FileWarning,
    };

    #[test]
    fn status_text_says_degraded_and_lists_problems() {
        let s = Status {
            ready: true,
            generation: 4,
            degraded: true,
            errors: vec![FileError {
                file: "/etc/netpol.d/a.yaml".into(),
                line: Some(3),
                column: Some(5),
                message: "/etc/netpol.d/a.yaml:3:5: spec: unknown field".into(),
            }],
            endpoints: 4,
            attached: 3,
            pending: 1,
            policies: 2,
            node: "host-a".into(),
            last_apply_ms: Some(1.25),
            policies_from_last_good: true,
            warnings: vec![FileWarning {
                file: "/etc/netpol.d/b.yaml".into(),
                line: Some(7),
                column: Some(5),
                code: "selects-nothing".into(),
                message: "/etc/netpol.d/b.yaml:7:5: warning: spec.endpointSelector: selects nothing [selects-nothing]".into(),
            }],
            ..Status::default()
        };
        assert_eq!(
            format_status(&s),
            "netpold on host-a: ready, DEGRADED, generation 4\n\
             \x20 4 endpoints (3 attached, 1 pending), 2 policies, last apply 1.2 ms\n\
             \x20 enforcing the last valid policy files saved in state_dir (the live ones are invalid)\n\
             \x20 1 problem(s) in the input files; the last valid set stays in force:\n\
             \x20   /etc/netpol.d/a.yaml:3:5: spec: unknown field\n\
             \x20 1 warning(s) in the input files (applied as they are):\n\
             \x20   /etc/netpol.d/b.yaml:7:5: warning: spec.endpointSelector: selects nothing [selects-nothing]\n"
        );
    }

    #[test]
    fn endpoints_table_is_aligned() {
        let ep = |name: &str, state: EndpointState, ifindex: Option<u32>| EndpointView {
            slot: 0,
            name: name.into(),
            namespace: Some("default".into()),
            kind: EndpointKind::Workload,
            identity: 4242,
            interface: Some("veth-be".into()),
            ifindex,
            addresses: vec![],
            local: true,
            state,
            ingress_default_deny: true,
            egress_default_deny: false,
            audit: false,
            counters: CountersView {
                allowed: 7,
                denied_default: 2,
                denied_policy: 1,
                ..CountersView::default()
            },
        };
        let t = format_endpoints(&[
            ep("backend", EndpointState::Attached, Some(13)),
            ep("db", EndpointState::Pending, None),
        ]);
        assert_eq!(
            t,
            "ENDPOINT         KIND      IDENTITY  INTERFACE  IFINDEX  STATE     INGRESS       EGRESS  ALLOWED  DENIED\n\
             default/backend  workload  4242      veth-be    13       attached  default-deny  open    7        3\n\
             default/db       workload  4242      veth-be    -        pending   default-deny  open    7        3\n"
        );
    }
}
