//! The opt-in Prometheus endpoint (`metrics_listen` in netpold.toml): a shared
//! snapshot the daemon updates after each apply and counter poll, rendered in the
//! Prometheus text exposition format (version 0.0.4), and a tiny HTTP/1.1 server
//! on a std `TcpListener` thread that serves `GET /metrics`.
//!
//! Owns only the numbers and their rendering. It never reads files, the kernel or
//! the daemon's state by itself: the daemon pushes values in through [`Metrics`].
//! The server answers one request per connection (`Connection: close`), reads at
//! most 8 KiB of request head with a 2 s timeout, and refuses everything but
//! `GET`/`HEAD` of `/metrics` and `/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::Problem;
use crate::datapath::{Attachment, Counters, EventVerdict, VerdictEvent};
use crate::policy::types::Compiled;

/// The address the docs suggest for `metrics_listen` (loopback); the daemon
/// serves nothing unless the key is set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9962";

/// Upper bounds of the apply latency histogram, in seconds.
pub const APPLY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_listen {addr}: cannot listen")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics_listen {0:?} is not an address:port")]
    Address(String),
}

impl MetricsError {
    /// What to do about it, when the cause says: the shipped netpold.service
    /// allows no IP sockets (`RestrictAddressFamilies=AF_UNIX AF_NETLINK`), so
    /// `socket()` fails with EAFNOSUPPORT until a drop-in allows them.
    pub fn hint(&self) -> Option<&'static str> {
        let MetricsError::Bind { source, .. } = self else {
            return None;
        };
        match source.raw_os_error() {
            Some(libc::EAFNOSUPPORT) => Some(
                "netpold.service allows no IP sockets (RestrictAddressFamilies=AF_UNIX AF_NETLINK, \
                 IPAddressDeny=any); add the drop-in /etc/systemd/system/netpold.service.d/metrics.conf \
                 with RestrictAddressFamilies=AF_INET AF_INET6 and IPAddressAllow=localhost \
                 (/usr/share/doc/netpol/bare-metal.md, \"Metrics\"), then \
                 systemctl daemon-reload && systemctl restart netpold",
            ),
            Some(libc::EADDRINUSE) => Some(
                "another process listens on that port (ss -ltnp shows which); pick another port for metrics_listen in netpold.toml",
            ),
            Some(libc::EACCES) => Some(
                "a port below 1024 needs CAP_NET_BIND_SERVICE, which netpold.service does not grant; use a port above 1023 (9962)",
            ),
            Some(libc::EADDRNOTAVAIL) => Some(
                "no interface of this host has that address; use one it has (127.0.0.1) for metrics_listen in netpold.toml",
            ),
            _ => None,
        }
    }

    /// The error, its cause and what to do, on one line.
    pub fn explain(&self) -> String {
        let chain = crate::error::chain(self);
        match self.hint() {
            Some(h) => format!("{chain}; {h}"),
            None => chain,
        }
    }
}

/// Capacities of the maps whose fill level is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapLimits {
    pub ipcache: u64,
    pub policy: u64,
    pub endpoints: u64,
}

/// A cumulative histogram with fixed upper bounds (+Inf implied).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// Count of observations ≤ each bound (not cumulative here; rendered cumulative).
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Fill level of one BPF map (entries in the active generation vs its capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapFill {
    pub entries: u64,
    pub max_entries: u64,
}

/// Everything the endpoint exposes. The daemon owns the values; this module owns
/// their names and rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub ready: bool,
    pub degraded: bool,
    pub generation: u64,
    pub applies: u64,
    pub apply_errors: u64,
    pub apply_seconds: Histogram,
    /// Unix time of the last successful apply.
    pub last_apply_unix: Option<f64>,
    /// Datapath counters by endpoint (`namespace/name` or host endpoint name).
    pub verdicts: BTreeMap<String, Counters>,
    /// By map name (`ipcache`, `policy`, `endpoints`, `conntrack`).
    pub maps: BTreeMap<String, MapFill>,
    /// Problems per file in the last read of the policy and registry directories.
    pub file_errors: BTreeMap<String, u64>,
    /// Local endpoints by state (`attached`, `pending`), remote endpoints as `remote`.
    pub endpoints: BTreeMap<String, u64>,
    /// Verdict events read from the ring buffer, by verdict.
    pub events: BTreeMap<String, u64>,
    /// Audit events with a deciding rule, by that rule's policy: (kind,
    /// `namespace/name` or `name`, staged).
    pub policy_audits: BTreeMap<(String, String, bool), u64>,
    /// Fleet mode's figures; `None` for a files-only daemon (no `netpol_etcd_*`).
    pub etcd: Option<EtcdFigures>,
    /// The DNS proxy's figures; `None` while no proxy runs (no `netpol_dns_*`).
    pub dns: Option<DnsFigures>,
}

/// The `netpol_dns_*` figures: the proxy's counters (`dns::proxy::Stats`),
/// the learned set's size and the caps reached. The daemon fills them with
/// [`DnsFigures::of`] and [`Metrics::record_dns`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsFigures {
    /// Queries received from workloads.
    pub queries: u64,
    /// Queries allowed by a DNS rule and forwarded.
    pub forwarded: u64,
    /// Queries no DNS rule allows, answered REFUSED.
    pub refused: u64,
    /// Answers released to workloads (their addresses learned first).
    pub answered: u64,
    /// SERVFAIL sent because the upstream was silent or unreachable.
    pub servfail_upstream: u64,
    /// SERVFAIL sent because the answer could not be learned (a cap).
    pub servfail_learn: u64,
    /// Addresses handed to the learned set (counting repeats).
    pub learn_addresses: u64,
    /// Messages dropped, by `dns::message::DropReason::name`.
    pub drops: BTreeMap<&'static str, u64>,
    /// Addresses learned now (the learned set's size).
    pub learned_addresses: u64,
    /// (endpoint, name) entries learned now.
    pub learned_names: u64,
    /// Answers refused whole because a cap would be passed, by the cap's key
    /// ([`cap_key`]: `max_per_endpoint`, `max_total`, `ipcache`).
    pub cap_reached: BTreeMap<&'static str, u64>,
    /// The datapath's redirect counters (`netpol_dns_stats_v1`).
    pub redirect: crate::datapath::DnsRedirectStats,
}

/// The key a cap is counted under in `netpol_dns_cap_reached_total`.
pub fn cap_key(cap: &crate::dns::learned::CapReached) -> &'static str {
    match cap {
        crate::dns::learned::CapReached::Endpoint { .. } => "max_per_endpoint",
        crate::dns::learned::CapReached::Total { .. } => "max_total",
    }
}

/// The cap key of a learn refused because compile would overflow the
/// ipcache with the learned addresses (`policy::compile`'s budget).
pub const CAP_IPCACHE: &str = "ipcache";

impl DnsFigures {
    /// The proxy's counters and the learned set now; `cap_reached` is the
    /// daemon's own count (it sees why a learn failed), passed through.
    pub fn of(
        stats: &crate::dns::proxy::Stats,
        learned: &crate::dns::learned::LearnedSet,
        cap_reached: BTreeMap<&'static str, u64>,
        redirect: crate::datapath::DnsRedirectStats,
    ) -> DnsFigures {
        use crate::dns::proxy::Stats as S;
        DnsFigures {
            queries: S::get(&stats.queries),
            forwarded: S::get(&stats.forwarded),
            refused: S::get(&stats.refused),
            answered: S::get(&stats.answered),
            servfail_upstream: S::get(&stats.upstream_failed),
            servfail_learn: S::get(&stats.learn_failed),
            learn_addresses: S::get(&stats.learned_addrs),
            drops: crate::dns::message::DropReason::ALL
                .iter()
                .map(|d| (d.name(), stats.drops.get(*d)))
                .collect(),
            learned_addresses: learned.len() as u64,
            learned_names: learned.entries().count() as u64,
            cap_reached,
            redirect,
        }
    }
}

/// The `netpol_etcd_*` figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EtcdFigures {
    pub connected: bool,
    pub in_sync: bool,
    pub revision: i64,
    pub applied_revision: i64,
    pub remote_endpoints: u64,
    pub rejected: u64,
    pub held_removals: u64,
    pub relists: u64,
    pub reconnects: u64,
    pub writes: u64,
    pub status_writes: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            ready: false,
            degraded: false,
            generation: 0,
            applies: 0,
            apply_errors: 0,
            apply_seconds: Histogram::new(&APPLY_BUCKETS),
            last_apply_unix: None,
            verdicts: BTreeMap::new(),
            maps: BTreeMap::new(),
            file_errors: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            events: BTreeMap::new(),
            policy_audits: BTreeMap::new(),
            etcd: None,
            dns: None,
        }
    }
}

/// The shared handle: cheap to clone, updated by the daemon, read by the server.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<Mutex<Snapshot>>);

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A panic while holding the lock leaves plain numbers behind: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change anything; the closure runs under the lock.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.lock());
    }

    /// A successful apply of `generation` that took `seconds`.
    pub fn applied(&self, generation: u64, seconds: f64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok();
        self.update(|s| {
            s.generation = generation;
            s.applies += 1;
            s.apply_seconds.observe(seconds);
            s.last_apply_unix = now;
        });
    }

    pub fn apply_failed(&self) {
        self.update(|s| s.apply_errors += 1);
    }

    /// After an apply: map fill levels and endpoint states. `limits` are the
    /// configured capacities of the ipcache, policy and endpoint maps. Only the
    /// entries of attached endpoints are installed, so only those count.
    pub fn record_state(&self, c: &Compiled, attachments: &[Attachment], limits: MapLimits) {
        let attached: std::collections::BTreeSet<u32> =
            attachments.iter().map(|a| a.slot).collect();
        let policy = c
            .entries
            .iter()
            .filter(|e| attached.contains(&e.endpoint))
            .count() as u64;
        let local = c.endpoints.iter().filter(|e| e.local).count() as u64;
        self.update(|s| {
            s.maps.insert(
                "ipcache".into(),
                MapFill {
                    entries: c.ipcache.len() as u64,
                    max_entries: limits.ipcache,
                },
            );
            s.maps.insert(
                "policy".into(),
                MapFill {
                    entries: policy,
                    max_entries: limits.policy,
                },
            );
            s.maps.insert(
                "endpoints".into(),
                MapFill {
                    entries: attached.len() as u64,
                    max_entries: limits.endpoints,
                },
            );
            s.endpoints.insert("attached".into(), attached.len() as u64);
            s.endpoints.insert(
                "pending".into(),
                local.saturating_sub(attached.len() as u64),
            );
            s.endpoints.insert(
                "remote".into(),
                (c.endpoints.len() as u64).saturating_sub(local),
            );
        });
    }

    /// The datapath's per-slot counters, named by the endpoints of `c`.
    pub fn record_counters(&self, c: &Compiled, counters: &BTreeMap<u32, Counters>) {
        let named: BTreeMap<String, Counters> = counters
            .iter()
            .filter_map(|(slot, n)| {
                let e = c.endpoints.get(*slot as usize)?;
                let name = match &e.namespace {
                    Some(ns) if e.kind == crate::api::model::EndpointKind::Workload => {
                        format!("{ns}/{}", e.name)
                    }
                    _ => e.name.to_string(),
                };
                Some((name, n.clone()))
            })
            .collect();
        self.update(|s| s.verdicts = named);
    }

    /// Health and the problems of the last read: every file that ever had a
    /// problem stays listed (at 0 once fixed), so a fix is visible as a drop to 0.
    pub fn record_status(&self, ready: bool, degraded: bool, problems: &[Problem]) {
        self.update(|s| {
            s.ready = ready;
            s.degraded = degraded;
            for v in s.file_errors.values_mut() {
                *v = 0;
            }
            for p in problems {
                *s.file_errors
                    .entry(p.file.display().to_string())
                    .or_default() += 1;
            }
        });
    }

    /// Fleet mode's state, as `status` reports it.
    pub fn record_etcd(&self, e: &crate::daemon::status::EtcdStatus) {
        let f = EtcdFigures {
            connected: e.connected,
            in_sync: e.in_sync,
            revision: e.revision,
            applied_revision: e.applied_revision,
            remote_endpoints: e.remote_endpoints as u64,
            rejected: e.rejected.len() as u64,
            held_removals: e.held_removals as u64,
            relists: e.relists,
            reconnects: e.reconnects,
            writes: e.writes,
            status_writes: e.status_writes,
        };
        self.update(|s| s.etcd = Some(f));
    }

    /// The DNS proxy's figures (after each proxied query batch, or each poll).
    pub fn record_dns(&self, f: DnsFigures) {
        self.update(|s| s.dns = Some(f));
    }

    /// Verdict events read from the ring buffer; an audit event's rule is
    /// resolved against the `installed` state to count it for its policy.
    pub fn record_events(&self, events: &[VerdictEvent], installed: Option<&Compiled>) {
        if events.is_empty() {
            return;
        }
        self.update(|s| {
            for e in events {
                let v = match e.verdict {
                    EventVerdict::Allowed => "allowed",
                    EventVerdict::Denied => "denied",
                    EventVerdict::Audit => "audit",
                };
                *s.events.entry(v.to_string()).or_default() += 1;
                let rule = e.rule.and_then(|r| installed?.rules.get(r as usize));
                if let (EventVerdict::Audit, Some(r)) = (e.verdict, rule) {
                    let key = (r.kind.to_string(), r.policy.to_string(), r.staged);
                    *s.policy_audits.entry(key).or_default() += 1;
                }
            }
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    pub fn render(&self) -> String {
        render(&self.lock())
    }
}

/// Escape a label value (exposition format: backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// A float as the exposition format writes it.
fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One family with one label: its HELP and TYPE, then a sample per (label
/// value, count).
fn labelled<'a, V: std::fmt::Display>(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    label: &str,
    rows: impl IntoIterator<Item = (&'a str, V)>,
) {
    family(out, name, kind, help);
    for (value, n) in rows {
        let _ = writeln!(out, "{name}{} {n}", labels(&[(label, value)]));
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The snapshot in the Prometheus text exposition format.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "netpol_build_info",
        "gauge",
        "netpold build information",
    );
    let _ = writeln!(
        o,
        "netpol_build_info{} 1",
        labels(&[("version", env!("CARGO_PKG_VERSION"))])
    );

    family(
        &mut o,
        "netpol_ready",
        "gauge",
        "1 once the first policy generation has been applied",
    );
    let _ = writeln!(o, "netpol_ready {}", u8::from(s.ready));
    family(
        &mut o,
        "netpol_degraded",
        "gauge",
        "1 while some file is invalid and the last valid set is enforced",
    );
    let _ = writeln!(o, "netpol_degraded {}", u8::from(s.degraded));
    family(
        &mut o,
        "netpol_generation",
        "gauge",
        "Active datapath generation number",
    );
    let _ = writeln!(o, "netpol_generation {}", s.generation);

    family(
        &mut o,
        "netpol_applies_total",
        "counter",
        "Policy generations applied",
    );
    let _ = writeln!(o, "netpol_applies_total {}", s.applies);
    family(
        &mut o,
        "netpol_apply_errors_total",
        "counter",
        "Applies that failed before the flip (running state kept)",
    );
    let _ = writeln!(o, "netpol_apply_errors_total {}", s.apply_errors);

    let h = &s.apply_seconds;
    family(
        &mut o,
        "netpol_apply_duration_seconds",
        "histogram",
        "Time to compile and apply a generation",
    );
    let mut cum = 0u64;
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        cum += c;
        let _ = writeln!(
            o,
            "netpol_apply_duration_seconds_bucket{} {cum}",
            labels(&[("le", &num(*b))])
        );
    }
    let _ = writeln!(
        o,
        "netpol_apply_duration_seconds_bucket{} {}",
        labels(&[("le", "+Inf")]),
        h.count
    );
    let _ = writeln!(o, "netpol_apply_duration_seconds_sum {}", num(h.sum));
    let _ = writeln!(o, "netpol_apply_duration_seconds_count {}", h.count);

    if let Some(t) = s.last_apply_unix {
        family(
            &mut o,
            "netpol_last_apply_timestamp_seconds",
            "gauge",
            "Unix time of the last successful apply",
        );
        let _ = writeln!(o, "netpol_last_apply_timestamp_seconds {}", num(t));
    }

    family(
        &mut o,
        "netpol_verdicts_total",
        "counter",
        "Packets judged by the datapath, by endpoint, verdict and reason",
    );
    for (ep, c) in &s.verdicts {
        let rows: [(&str, &str, u64); 6] = [
            ("allowed", "policy", c.allowed),
            ("denied", "policy-deny", c.denied_policy),
            ("denied", "default-deny", c.denied_default),
            ("denied", "spoofed", c.denied_spoof),
            ("denied", "other", c.denied_other),
            ("audit", "audit", c.audit),
        ];
        for (verdict, reason, n) in rows {
            let l = labels(&[("endpoint", ep), ("verdict", verdict), ("reason", reason)]);
            let _ = writeln!(o, "netpol_verdicts_total{l} {n}");
        }
    }

    labelled(
        &mut o,
        (
            "netpol_events_total",
            "counter",
            "Verdict events read from the ring buffer, by verdict",
        ),
        "verdict",
        s.events.iter().map(|(v, n)| (v.as_str(), n)),
    );

    family(
        &mut o,
        "netpol_policy_audit_events_total",
        "counter",
        "Audit events read from the ring buffer, by the policy whose rule would have denied the flow (staged: not enforced)",
    );
    for ((kind, policy, staged), n) in &s.policy_audits {
        let l = labels(&[
            ("kind", kind),
            ("policy", policy),
            ("staged", if *staged { "true" } else { "false" }),
        ]);
        let _ = writeln!(o, "netpol_policy_audit_events_total{l} {n}");
    }

    family(
        &mut o,
        "netpol_map_entries",
        "gauge",
        "Entries in the active generation of each BPF map",
    );
    for (m, f) in &s.maps {
        let _ = writeln!(
            o,
            "netpol_map_entries{} {}",
            labels(&[("map", m)]),
            f.entries
        );
    }
    family(
        &mut o,
        "netpol_map_max_entries",
        "gauge",
        "Capacity of each BPF map",
    );
    for (m, f) in &s.maps {
        let _ = writeln!(
            o,
            "netpol_map_max_entries{} {}",
            labels(&[("map", m)]),
            f.max_entries
        );
    }
    family(
        &mut o,
        "netpol_map_fill_ratio",
        "gauge",
        "entries / max_entries of each BPF map",
    );
    for (m, f) in &s.maps {
        let r = if f.max_entries == 0 {
            0.0
        } else {
            f.entries as f64 / f.max_entries as f64
        };
        let _ = writeln!(
            o,
            "netpol_map_fill_ratio{} {}",
            labels(&[("map", m)]),
            num(r)
        );
    }

    family(
        &mut o,
        "netpol_file_errors",
        "gauge",
        "Problems found in each policy or registry file (0 = valid)",
    );
    for (f, n) in &s.file_errors {
        let _ = writeln!(o, "netpol_file_errors{} {n}", labels(&[("file", f)]));
    }

    family(
        &mut o,
        "netpol_endpoints",
        "gauge",
        "Registry endpoints by state (attached, pending, remote)",
    );
    for (st, n) in &s.endpoints {
        let _ = writeln!(o, "netpol_endpoints{} {n}", labels(&[("state", st)]));
    }
    if let Some(e) = &s.etcd {
        render_etcd(&mut o, e);
    }
    if let Some(d) = &s.dns {
        render_dns(&mut o, d);
    }
    o
}

/// The DNS proxy's families (docs/policy.md, "DNS names").
fn render_dns(o: &mut String, d: &DnsFigures) {
    let rows: [(&str, &str, &str, u64); 8] = [
        (
            "netpol_dns_redirected_packets_total",
            "counter",
            "DNS packets of endpoints with DNS rules the datapath handed to the proxy",
            d.redirect.redirected,
        ),
        (
            "netpol_dns_queries_total",
            "counter",
            "DNS queries the proxy received from workloads",
            d.queries,
        ),
        (
            "netpol_dns_forwarded_total",
            "counter",
            "DNS queries a DNS rule allowed, forwarded to the server the workload asked",
            d.forwarded,
        ),
        (
            "netpol_dns_refused_total",
            "counter",
            "DNS queries no DNS rule of the endpoint allows, answered REFUSED",
            d.refused,
        ),
        (
            "netpol_dns_answers_total",
            "counter",
            "DNS answers released to workloads after their addresses were learned",
            d.answered,
        ),
        (
            "netpol_dns_learn_addresses_total",
            "counter",
            "Addresses of allowed answers handed to the learned set (repeats included)",
            d.learn_addresses,
        ),
        (
            "netpol_dns_learned_addresses",
            "gauge",
            "Addresses learned now (each allowed to its endpoint until its TTL ends or its last connection closes)",
            d.learned_addresses,
        ),
        (
            "netpol_dns_learned_names",
            "gauge",
            "Names learned now, per endpoint",
            d.learned_names,
        ),
    ];
    for (name, kind, help, v) in rows {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    labelled(
        o,
        (
            "netpol_dns_servfail_total",
            "counter",
            "SERVFAIL answers the proxy sent, by reason (upstream: silent or unreachable; learn: the answer could not be learned)",
        ),
        "reason",
        [("upstream", d.servfail_upstream), ("learn", d.servfail_learn)],
    );
    labelled(
        o,
        (
            "netpol_dns_dropped_total",
            "counter",
            "Malformed or hostile DNS messages dropped, by reason",
        ),
        "reason",
        d.drops.iter().map(|(r, n)| (*r, n)),
    );
    labelled(
        o,
        (
            "netpol_dns_cap_reached_total",
            "counter",
            "Answers refused whole (SERVFAIL) because learning them would pass a cap, by cap",
        ),
        "cap",
        ["max_per_endpoint", "max_total", CAP_IPCACHE]
            .map(|cap| (cap, d.cap_reached.get(cap).copied().unwrap_or(0))),
    );
    labelled(
        o,
        (
            "netpol_dns_redirect_dropped_total",
            "counter",
            "DNS packets of endpoints with DNS rules the datapath dropped instead of redirecting (no_proxy: no proxy socket, netpold or its proxy down; other: the assignment refused, or a fragment)",
        ),
        "reason",
        [
            ("no_proxy", d.redirect.dropped_no_proxy),
            ("other", d.redirect.dropped_other),
        ],
    );
}

/// Fleet mode's families (docs/fleet.md, "Watching it").
fn render_etcd(o: &mut String, e: &EtcdFigures) {
    let rows: [(&str, &str, &str, i64); 11] = [
        (
            "netpol_etcd_connected",
            "gauge",
            "1 while the last call to etcd succeeded and the watch is up",
            e.connected.into(),
        ),
        (
            "netpol_etcd_in_sync",
            "gauge",
            "1 while the remote view is a complete list plus every event since",
            e.in_sync.into(),
        ),
        (
            "netpol_etcd_revision",
            "gauge",
            "Latest etcd revision seen in the watched range",
            e.revision,
        ),
        (
            "netpol_etcd_applied_revision",
            "gauge",
            "This host enforces etcd's watched range as of this revision",
            e.applied_revision,
        ),
        (
            "netpol_etcd_remote_endpoints",
            "gauge",
            "Remote endpoints in the view",
            e.remote_endpoints as i64,
        ),
        (
            "netpol_etcd_rejected",
            "gauge",
            "Remote entries left out (invalid, key mismatch, lost claim, file wins)",
            e.rejected as i64,
        ),
        (
            "netpol_etcd_held_removals",
            "gauge",
            "Removed remote endpoints kept by the mass-removal hold",
            e.held_removals as i64,
        ),
        (
            "netpol_etcd_relists_total",
            "counter",
            "Full lists of the watched range (the first included)",
            e.relists as i64,
        ),
        (
            "netpol_etcd_reconnects_total",
            "counter",
            "Connections to etcd lost",
            e.reconnects as i64,
        ),
        (
            "netpol_etcd_writes_total",
            "counter",
            "Writes of this host's own entries",
            e.writes as i64,
        ),
        (
            "netpol_etcd_status_writes_total",
            "counter",
            "Writes of this host's status key",
            e.status_writes as i64,
        ),
    ];
    for (name, kind, help, v) in rows {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
}

/// A running metrics server. Dropping it (or [`MetricsServer::stop`]) stops the
/// thread and closes the socket.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the blocking accept.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Parse `metrics_listen` ("127.0.0.1:9962", "[::1]:9962").
pub fn parse_listen(s: &str) -> Result<SocketAddr, MetricsError> {
    s.parse().map_err(|_| MetricsError::Address(s.to_string()))
}

/// Bind `addr` and serve `metrics` on a background thread.
pub fn serve(addr: SocketAddr, metrics: Metrics) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("netpol-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    let _ = handle(stream, &metrics);
                }
            }
        })
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    Ok(MetricsServer {
        addr: bound,
        stop,
        thread: Some(thread),
    })
}

const MAX_HEAD: usize = 8192;

fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() >= MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request head too large\n",
                true,
            );
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics.render();
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
                with_body,
            )
        }
        ("GET" | "HEAD", "/") => respond(
            &mut stream,
            "200 OK",
            "text/plain; charset=utf-8",
            b"netpold metrics: GET /metrics\n",
            with_body,
        ),
        ("GET" | "HEAD", _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"not found\n",
            with_body,
        ),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET and HEAD\n",
            true,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit events count for the policy whose rule decided them, staged or
    /// not; events without a rule or of another verdict do not.
    #[test]
    fn audit_events_are_counted_by_policy() {
        use crate::datapath::EventReason;
        use crate::policy::types::{Direction, RuleRef};
        let rule = |policy: &str, staged: bool| RuleRef {
            file: std::path::Path::new("p.yaml").into(),
            kind: "CiliumNetworkPolicy".into(),
            policy: policy.into(),
            path: "spec".into(),
            staged,
            default_deny: staged,
        };
        let c = Compiled {
            rules: vec![rule("default/lock", true), rule("default/web", false)],
            ..Compiled::default()
        };
        let ev = |verdict, rule| VerdictEvent {
            ifindex: 1,
            slot: 0,
            direction: Direction::Ingress,
            verdict,
            reason: EventReason::DefaultDeny,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 6,
            sport: 1,
            dport: 80,
            src_identity: 2,
            dst_identity: 300,
            rule,
        };
        let m = Metrics::new();
        m.record_events(
            &[
                ev(EventVerdict::Audit, Some(0)),
                ev(EventVerdict::Audit, Some(0)),
                ev(EventVerdict::Audit, Some(1)),
                ev(EventVerdict::Audit, None),
                ev(EventVerdict::Denied, Some(1)),
            ],
            Some(&c),
        );
        let t = m.render();
        for line in [
            "netpol_policy_audit_events_total{kind=\"CiliumNetworkPolicy\",policy=\"default/lock\",staged=\"true\"} 2\n",
            "netpol_policy_audit_events_total{kind=\"CiliumNetworkPolicy\",policy=\"default/web\",staged=\"false\"} 1\n",
            "netpol_events_total{verdict=\"audit\"} 4\n",
        ] {
            assert!(t.contains(line), "{line}{t}");
        }
        assert_eq!(
            t.matches("netpol_policy_audit_events_total{").count(),
            2,
            "{t}"
        );
    }

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let m = Metrics::new();
        m.applied(3, 0.002);
        m.applied(4, 0.2);
        m.applied(5, 10.0);
        let t = m.render();
        assert!(
            t.contains("netpol_apply_duration_seconds_bucket{le=\"0.0025\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("netpol_apply_duration_seconds_bucket{le=\"0.25\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("netpol_apply_duration_seconds_bucket{le=\"2.5\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("netpol_apply_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("netpol_apply_duration_seconds_count 3\n"), "{t}");
        assert!(t.contains("netpol_generation 5\n"), "{t}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = Metrics::new();
        m.update(|s| {
            s.file_errors.insert("/etc/netpol.d/we\"ird.yaml".into(), 2);
        });
        assert!(m
            .render()
            .contains("netpol_file_errors{file=\"/etc/netpol.d/we\\\"ird.yaml\"} 2\n"));
    }

    #[test]
    fn serves_get_metrics_and_refuses_the_rest() {
        let m = Metrics::new();
        m.applied(7, 0.01);
        let srv = serve("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(srv.local_addr()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let r = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("\r\n\r\n# HELP netpol_build_info"), "{r}");
        assert!(r.contains("netpol_generation 7\n"), "{r}");
        assert!(get("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let head = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let addr = srv.local_addr();
        srv.stop();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "stopped server still listens"
        );
    }

    /// The sandbox's refusal names the unit's address families and the drop-in;
    /// a port in use says so; other causes print as they are.
    #[test]
    fn a_listen_error_names_the_cause_and_the_fix() {
        let bind = |errno| MetricsError::Bind {
            addr: "127.0.0.1:9962".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let e = bind(libc::EAFNOSUPPORT).explain();
        assert!(
            e.starts_with("metrics_listen 127.0.0.1:9962: cannot listen: Address family not supported by protocol (os error 97); netpold.service allows no IP sockets (RestrictAddressFamilies=AF_UNIX AF_NETLINK"),
            "{e}"
        );
        assert!(
            e.contains("/etc/systemd/system/netpold.service.d/metrics.conf"),
            "{e}"
        );
        assert!(
            e.ends_with("then systemctl daemon-reload && systemctl restart netpold"),
            "{e}"
        );
        assert!(bind(libc::EADDRINUSE)
            .explain()
            .contains("; another process listens on that port"));
        let other = bind(libc::ENOMEM);
        assert_eq!(other.hint(), None);
        assert_eq!(other.explain(), crate::error::chain(&other));
        // A real one: a port already taken.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let Err(err) = serve(taken.local_addr().unwrap(), Metrics::new()) else {
            panic!("a second listener on one port");
        };
        assert!(
            err.explain()
                .contains("(os error 98); another process listens"),
            "{}",
            err.explain()
        );
    }

    /// The DNS families appear once a proxy's figures are recorded: the
    /// proxy's counters, drops by reason, the learned set and caps by key.
    #[test]
    fn dns_figures_render_from_the_proxy_and_the_learned_set() {
        use crate::dns::learned::{LearnedConfig, LearnedSet};
        use crate::dns::message::{Addr, DropReason};
        use crate::dns::proxy::Stats;
        use std::sync::atomic::Ordering;
        let m = Metrics::new();
        assert!(!m.render().contains("netpol_dns_"), "no proxy, no families");
        let stats = Stats::default();
        stats.queries.store(5, Ordering::Relaxed);
        stats.refused.store(2, Ordering::Relaxed);
        stats.learn_failed.store(1, Ordering::Relaxed);
        stats.drops.count(DropReason::IdMismatch);
        stats.drops.count(DropReason::IdMismatch);
        let mut set = LearnedSet::new(LearnedConfig {
            max_per_endpoint: 1,
            ..LearnedConfig::default()
        });
        let a = |ip: &str| Addr {
            ip: ip.parse().unwrap(),
            ttl: 60,
        };
        set.learn("web", "a.example.", &[], &[a("192.0.2.1")], 0)
            .unwrap();
        let cap = set
            .learn("web", "b.example.", &[], &[a("192.0.2.2")], 0)
            .unwrap_err();
        let caps = BTreeMap::from([(cap_key(&cap), 1)]);
        let redirect = crate::datapath::DnsRedirectStats {
            redirected: 7,
            dropped_no_proxy: 3,
            dropped_other: 0,
        };
        m.record_dns(DnsFigures::of(&stats, &set, caps, redirect));
        let t = m.render();
        for line in [
            "netpol_dns_queries_total 5\n",
            "netpol_dns_refused_total 2\n",
            "netpol_dns_servfail_total{reason=\"learn\"} 1\n",
            "netpol_dns_servfail_total{reason=\"upstream\"} 0\n",
            "netpol_dns_dropped_total{reason=\"id_mismatch\"} 2\n",
            "netpol_dns_dropped_total{reason=\"malformed\"} 0\n",
            "netpol_dns_learned_addresses 1\n",
            "netpol_dns_learned_names 1\n",
            "netpol_dns_cap_reached_total{cap=\"max_per_endpoint\"} 1\n",
            "netpol_dns_cap_reached_total{cap=\"max_total\"} 0\n",
            "netpol_dns_cap_reached_total{cap=\"ipcache\"} 0\n",
            "# TYPE netpol_dns_learned_addresses gauge\n",
            "netpol_dns_redirected_packets_total 7\n",
            "netpol_dns_redirect_dropped_total{reason=\"no_proxy\"} 3\n",
            "netpol_dns_redirect_dropped_total{reason=\"other\"} 0\n",
        ] {
            assert!(t.contains(line), "{line}{t}");
        }
        assert_eq!(t.matches("netpol_dns_dropped_total{").count(), 7, "{t}");
    }
}
