//! `netpolctl status`, `endpoints`, `monitor`: talk to a running netpold through
//! its runtime socket (line-delimited JSON, see `daemon::server`). Reads only.
//!
//! Exit status: 0 when the daemon answered, 1 when no daemon answers (with a
//! message naming the socket) or it answered with an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use crate::config::{Config, DEFAULT_CONFIG};
use crate::daemon::status::{EndpointView, MonitorEvent, Reason, Status};
use crate::text::count;

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
        "  {} ({} attached, {} pending), {}",
        count(s.endpoints, "endpoint", "endpoints"),
        s.attached,
        s.pending,
        count(s.policies, "policy", "policies")
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
    if !s.datapath_stage.enforcing() {
        out.push_str(&format!(
            "  datapath stage \"{}\": the programs pass every packet after that step and ENFORCE NOTHING (netpold.toml [datapath] stage, for benchmarks)\n",
            s.datapath_stage
        ));
    }
    if let Some(e) = &s.state_error {
        out.push_str(&format!("  state_dir: {e}\n"));
    }
    if let Some(e) = &s.metrics_error {
        out.push_str(&format!("  no metrics: {e}\n"));
    }
    if let Some(e) = &s.etcd {
        out.push_str(&format_etcd(e));
    }
    let mut list = |one: &str, many: &str, what: &str, lines: Vec<&str>| {
        if !lines.is_empty() {
            out.push_str(&format!("  {} {what}:\n", count(lines.len(), one, many)));
            for l in lines {
                out.push_str(&format!("    {l}\n"));
            }
        }
    };
    list(
        "problem",
        "problems",
        "in the input files; the last valid set stays in force",
        s.errors.iter().map(|e| e.message.as_str()).collect(),
    );
    list(
        "warning",
        "warnings",
        "in the input files (applied as they are)",
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
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    super::common::columns(&rows)
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// One line per event the datapath reports (each packet, SYN retransmits
    /// included) instead of one line per flow decision with a repeat count
    #[arg(long)]
    pub packets: bool,
}

/// A packet of a flow decision printed no more than this long after the previous
/// one counts on that one's line: TCP retransmits an unanswered SYN after 1 s,
/// then 2 s later, then 4 s.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(3);
/// A flow decision's line is printed at the latest this long after its first
/// packet, even while packets keep coming (the next ones start a new line).
pub const REPEAT_HOLD: Duration = Duration::from_secs(10);

/// One line per flow decision: events that print the same (all but the time)
/// within [`REPEAT_WINDOW`] of each other are one line, with the first one's
/// time and the number of events (`(3 packets)`).
pub struct Flows {
    window: Duration,
    hold: Duration,
    open: std::collections::HashMap<String, Open>,
    seq: u64,
}

struct Open {
    time: String,
    first: Instant,
    last: Instant,
    count: u64,
    seq: u64,
}

impl Open {
    fn due(&self, now: Instant, window: Duration, hold: Duration) -> bool {
        now.duration_since(self.last) >= window || now.duration_since(self.first) >= hold
    }

    fn line(&self, body: &str) -> String {
        match self.count {
            1 => format!("{} {body}", self.time),
            n => format!("{} {body} ({n} packets)", self.time),
        }
    }
}

impl Flows {
    pub fn new(window: Duration, hold: Duration) -> Flows {
        Flows {
            window,
            hold,
            open: Default::default(),
            seq: 0,
        }
    }

    /// Count `ev`, read at `now`, on its flow decision's line. A line of the same
    /// decision that is already complete comes back to be printed first.
    pub fn add(&mut self, ev: &MonitorEvent, now: Instant) -> Option<String> {
        let body = event_body(ev);
        let (window, hold) = (self.window, self.hold);
        if let Some(o) = self.open.get_mut(&body) {
            if !o.due(now, window, hold) {
                o.count += 1;
                o.last = now;
                return None;
            }
        }
        self.seq += 1;
        let new = Open {
            time: ev.time.clone(),
            first: now,
            last: now,
            count: 1,
            seq: self.seq,
        };
        self.open.insert(body.clone(), new).map(|o| o.line(&body))
    }

    /// The lines complete at `now` (no repeat for the window, or held as long
    /// as allowed), in the order their first events came.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let (window, hold) = (self.window, self.hold);
        self.take(|o| o.due(now, window, hold))
    }

    /// Every line still open (the stream ended).
    pub fn finish(&mut self) -> Vec<String> {
        self.take(|_| true)
    }

    /// When the next line may become complete.
    pub fn next_due(&self) -> Option<Instant> {
        self.open
            .values()
            .map(|o| (o.last + self.window).min(o.first + self.hold))
            .min()
    }

    fn take(&mut self, pred: impl Fn(&Open) -> bool) -> Vec<String> {
        let keys: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| pred(o))
            .map(|(k, _)| k.clone())
            .collect();
        let mut done: Vec<(u64, String)> = keys
            .into_iter()
            .filter_map(|k| {
                let o = self.open.remove(&k)?;
                Some((o.seq, o.line(&k)))
            })
            .collect();
        done.sort();
        done.into_iter().map(|(_, l)| l).collect()
    }
}

pub fn monitor(a: &MonitorArgs) -> anyhow::Result<i32> {
    let args = &a.daemon;
    let path = args.socket_path()?;
    let reader = match request(&path, "monitor", None) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // The socket is read on its own thread, so that a flow's line is printed
    // when its window closes even if no other event comes.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut flows = (!a.packets && !args.json).then(|| Flows::new(REPEAT_WINDOW, REPEAT_HOLD));
    let stdout = std::io::stdout();
    let print = |lines: Vec<String>| -> bool {
        let mut out = stdout.lock();
        lines.iter().all(|l| writeln!(out, "{l}").is_ok())
    };
    loop {
        let wait = flows
            .as_ref()
            .and_then(Flows::next_due)
            .map(|t| t.saturating_duration_since(Instant::now()));
        let line = match wait {
            Some(w) => rx.recv_timeout(w),
            None => rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        let now = Instant::now();
        if let Some(f) = flows.as_mut() {
            if !print(f.due(now)) {
                break; // stdout closed (e.g. `| head`)
            }
        }
        let line = match line {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(f) = flows.as_mut() {
                    print(f.finish());
                }
                break;
            }
        };
        let mut out = stdout.lock();
        let printed = if args.json {
            writeln!(out, "{line}")
        } else {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v.get("lost").is_some() => {
                    writeln!(
                        out,
                        "({} lost: the reader was too slow)",
                        count(v["lost"].as_u64().unwrap_or(0) as usize, "event", "events")
                    )
                }
                // A DNS verdict of the proxy: one line per query, as it comes.
                Ok(v) if v.get("dns").is_some() => {
                    match serde_json::from_value::<crate::dns::event::DnsEvent>(v["dns"].clone()) {
                        Ok(ev) => writeln!(out, "{}", crate::dns::event::format_dns_event(&ev)),
                        Err(_) => writeln!(out, "{line}"),
                    }
                }
                Ok(v) if v.get("error").is_some() => {
                    return fail(ClientError::Daemon {
                        path,
                        message: v["error"].as_str().unwrap_or("").to_string(),
                    })
                }
                _ => match (serde_json::from_str::<MonitorEvent>(&line), flows.as_mut()) {
                    (Ok(ev), Some(f)) => match f.add(&ev, now) {
                        Some(done) => writeln!(out, "{done}"),
                        None => Ok(()),
                    },
                    (Ok(ev), None) => writeln!(out, "{}", format_event(&ev)),
                    (Err(_), _) => writeln!(out, "{line}"),
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
    format!("{} {}", ev.time, event_body(ev))
}

/// [`format_event`] without the time: what tells flow decisions apart.
fn event_body(ev: &MonitorEvent) -> String {
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
        "{:<8} {} -> {} {}/{} {} ({}) {}",
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
        CountersView, Direction, EndpointKind, EndpointState, FileError, FileWarning, Verdict,
    };

    /// database -> backend:80 from source port `sport`, denied by default deny.
    fn syn(time: &str, sport: u16) -> MonitorEvent {
        MonitorEvent {
            time: time.into(),
            verdict: Verdict::Denied,
            reason: Reason::DefaultDeny,
            direction: Direction::Ingress,
            src: "10.0.1.31".into(),
            dst: "10.0.1.21".into(),
            proto: "tcp".into(),
            sport,
            dport: 80,
            endpoint: Some("default/backend".into()),
            ifindex: 7,
            src_identity: 1000,
            dst_identity: 1001,
            rule: None,
        }
    }

    const LINE: &str =
        "denied   10.0.1.31:40000 -> 10.0.1.21:80 tcp/80 default/backend (ingress) default deny";

    /// A blocked connect(): the SYN and its retransmits 1 s and 3 s later are
    /// one line, printed once the window passes with no further retransmit.
    #[test]
    fn retransmits_of_one_flow_are_one_line_with_a_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Flows::new(REPEAT_WINDOW, REPEAT_HOLD);
        assert_eq!(f.add(&syn("T0", 40000), t0), None);
        assert_eq!(f.add(&syn("T1", 40000), t0 + s(1)), None);
        assert_eq!(f.add(&syn("T3", 40000), t0 + s(3)), None);
        assert_eq!(f.next_due(), Some(t0 + s(6)));
        assert!(
            f.due(t0 + s(5)).is_empty(),
            "printed before the window closed"
        );
        assert_eq!(f.due(t0 + s(6)), vec![format!("T0 {LINE} (3 packets)")]);
        assert!(f.finish().is_empty());
        assert_eq!(f.next_due(), None);
    }

    /// A single event prints as before, without a count; the raw line is the
    /// time and the same text.
    #[test]
    fn a_single_event_prints_as_the_packet_line() {
        let t0 = Instant::now();
        let mut f = Flows::new(REPEAT_WINDOW, REPEAT_HOLD);
        f.add(&syn("T0", 40000), t0);
        let line = f.due(t0 + REPEAT_WINDOW);
        assert_eq!(line, vec![format_event(&syn("T0", 40000))]);
        assert_eq!(line, vec![format!("T0 {LINE}")]);
    }

    /// Another source port is another connection attempt: its own line; lines
    /// come out in the order of their first events.
    #[test]
    fn different_flows_are_separate_lines_in_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = Flows::new(REPEAT_WINDOW, REPEAT_HOLD);
        f.add(&syn("A", 40000), t0);
        f.add(&syn("B", 40001), t0 + ms(100));
        f.add(&syn("A2", 40000), t0 + ms(200));
        let mut allowed = syn("C", 40002);
        allowed.verdict = Verdict::Allowed;
        allowed.reason = Reason::PolicyAllow;
        f.add(&allowed, t0 + ms(300));
        let lines = f.finish();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].starts_with("A denied") && lines[0].ends_with("(2 packets)"));
        assert!(lines[1].starts_with("B denied") && lines[1].contains(":40001 ->"));
        assert!(!lines[1].contains("packets)"));
        assert!(lines[2].starts_with("C allowed"));
    }

    /// A retransmit after the window (TCP's fourth SYN, 4 s after the third)
    /// starts a new line; a flow that never pauses is printed after the hold.
    #[test]
    fn the_window_and_the_hold_bound_a_line() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Flows::new(REPEAT_WINDOW, REPEAT_HOLD);
        f.add(&syn("T0", 40000), t0);
        // Late, and nobody asked due() in between: the old line comes back first.
        assert_eq!(
            f.add(&syn("T7", 40000), t0 + s(7)),
            Some(format!("T0 {LINE}"))
        );
        assert_eq!(f.finish(), vec![format!("T7 {LINE}")]);

        // One packet a second for 12 s: T0..T9 on one line, printed at the hold.
        let mut f = Flows::new(REPEAT_WINDOW, REPEAT_HOLD);
        let mut printed = Vec::new();
        for i in 0..12 {
            printed.extend(f.due(t0 + s(i)));
            f.add(&syn(&format!("T{i}"), 40000), t0 + s(i));
        }
        printed.extend(f.finish());
        assert_eq!(
            printed,
            vec![
                format!("T0 {LINE} (10 packets)"),
                format!("T10 {LINE} (2 packets)")
            ]
        );
    }

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
             \x20 1 problem in the input files; the last valid set stays in force:\n\
             \x20   /etc/netpol.d/a.yaml:3:5: spec: unknown field\n\
             \x20 1 warning in the input files (applied as they are):\n\
             \x20   /etc/netpol.d/b.yaml:7:5: warning: spec.endpointSelector: selects nothing [selects-nothing]\n"
        );
    }

    #[test]
    fn status_text_says_a_stage_enforces_nothing() {
        let s = Status {
            ready: true,
            node: "host-a".into(),
            datapath_stage: crate::datapath::Stage::Parse,
            ..Status::default()
        };
        assert_eq!(
            format_status(&s),
            "netpold on host-a: ready, generation 0\n\
             \x20 0 endpoints (0 attached, 0 pending), 0 policies\n\
             \x20 datapath stage \"parse\": the programs pass every packet after that step and ENFORCE NOTHING (netpold.toml [datapath] stage, for benchmarks)\n"
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
