//! What the runtime socket answers: the wire types of `status`, `endpoints` and
//! `monitor`, shared by the daemon (serializes) and `netpolctl` (deserializes),
//! and the `From` conversions of the daemon's own types into them. What has a
//! fixed set of values is an enum whose serde name is its wire text.
//!
//! Owns the wire format only; plain data, no I/O, no state.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::api::{model, Problem, Warning};
use crate::datapath::{Attachment, Counters, EventReason, EventVerdict, Stage, VerdictEvent};
use crate::policy::types::{self, Compiled, CompiledEndpoint, RuleRef};

/// A request: one JSON line `{"request": "status"}` (or `endpoints`, `monitor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request: String,
}

/// What the runtime socket answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Status,
    Endpoints,
    Monitor,
}

/// Enums on the wire: one name per value, the serde name.
macro_rules! wire_names {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            pub const ALL: &'static [$t] = &[$(<$t>::$v),+];
            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),+ }
            }
            /// The value of a wire name.
            pub fn parse(s: &str) -> Option<$t> {
                match s { $($s => Some(<$t>::$v),)+ _ => None }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

wire_names!(Verb { Status => "status", Endpoints => "endpoints", Monitor => "monitor" });

/// A registry endpoint's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    Workload,
    Host,
}

wire_names!(EndpointKind { Workload => "workload", Host => "host" });

impl From<model::EndpointKind> for EndpointKind {
    fn from(k: model::EndpointKind) -> Self {
        match k {
            model::EndpointKind::Workload => EndpointKind::Workload,
            model::EndpointKind::Host => EndpointKind::Host,
        }
    }
}

/// Where an endpoint is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Local, and its interface is attached.
    Attached,
    /// Local, and its interface does not exist (yet).
    Pending,
    /// Enforced on another host.
    Remote,
}

wire_names!(EndpointState { Attached => "attached", Pending => "pending", Remote => "remote" });

/// What happened to a packet (the datapath's [`EventVerdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
    Audit,
}

wire_names!(Verdict { Allowed => "allowed", Denied => "denied", Audit => "audit" });

impl From<EventVerdict> for Verdict {
    fn from(v: EventVerdict) -> Self {
        match v {
            EventVerdict::Allowed => Verdict::Allowed,
            EventVerdict::Denied => Verdict::Denied,
            EventVerdict::Audit => Verdict::Audit,
        }
    }
}

/// Why (the datapath's [`EventReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    PolicyAllow,
    PolicyDeny,
    DefaultDeny,
    Spoofed,
    Fragment,
    Malformed,
    /// DNS of an endpoint with DNS rules that the proxy could not take.
    DnsProxy,
}

wire_names!(Reason {
    PolicyAllow => "policy-allow",
    PolicyDeny => "policy-deny",
    DefaultDeny => "default-deny",
    Spoofed => "spoofed",
    Fragment => "fragment",
    Malformed => "malformed",
    DnsProxy => "dns-proxy",
});

impl From<EventReason> for Reason {
    fn from(r: EventReason) -> Self {
        match r {
            EventReason::PolicyAllow => Reason::PolicyAllow,
            EventReason::PolicyDeny => Reason::PolicyDeny,
            EventReason::DefaultDeny => Reason::DefaultDeny,
            EventReason::Spoofed => Reason::Spoofed,
            EventReason::Fragment => Reason::Fragment,
            EventReason::Malformed => Reason::Malformed,
            EventReason::DnsProxy => Reason::DnsProxy,
        }
    }
}

/// The endpoint's direction a verdict was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

wire_names!(Direction { Ingress => "ingress", Egress => "egress" });

impl From<types::Direction> for Direction {
    fn from(d: types::Direction) -> Self {
        match d {
            types::Direction::Ingress => Direction::Ingress,
            types::Direction::Egress => Direction::Egress,
        }
    }
}

/// One problem in one input file, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The whole message a user reads: `file:line:col: document N (...): field: message`.
    pub message: String,
}

impl From<&Problem> for FileError {
    fn from(p: &Problem) -> Self {
        FileError {
            file: p.file.display().to_string(),
            line: p.line,
            column: p.column,
            message: p.to_string(),
        }
    }
}

/// One warning about one input file, as `status` reports it: the set applied
/// (warnings never refuse it), but something in it deserves a look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWarning {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The warning's code (`selects-nothing`, `int-port`, ...).
    pub code: String,
    /// The whole line a user reads: `file:line:col: warning: ... [code]`.
    pub message: String,
}

impl From<&Warning> for FileWarning {
    fn from(w: &Warning) -> Self {
        FileWarning {
            file: w.at.file.display().to_string(),
            line: w.at.line,
            column: w.at.column,
            code: w.code.code().to_string(),
            message: w.to_string(),
        }
    }
}

/// Health of the daemon (`netpolctl status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// A generation has been applied since this daemon started.
    pub ready: bool,
    /// The datapath's active generation.
    pub generation: u64,
    /// Running on something other than the live files: some input file is invalid
    /// (the last valid set is enforced), the datapath refuses the state, or no
    /// valid input was ever seen.
    pub degraded: bool,
    /// Every problem in the input files now.
    pub errors: Vec<FileError>,
    /// Every warning about the input files now (`netpolctl check` prints the
    /// same); they do not make the daemon degraded.
    #[serde(default)]
    pub warnings: Vec<FileWarning>,
    /// Registry endpoints (local and remote).
    pub endpoints: usize,
    /// Local endpoints whose interface is attached.
    pub attached: usize,
    /// Local endpoints whose interface does not exist (yet).
    pub pending: usize,
    pub policies: usize,
    pub node: String,
    /// Load + compile + apply time of the last applied generation.
    pub last_apply_ms: Option<f64>,
    /// The enforced policies come from state_dir's last valid copy (the live files
    /// were invalid at start).
    pub policies_from_last_good: bool,
    pub registry_from_last_good: bool,
    /// The last datapath failure, while it lasts.
    pub datapath_error: Option<String>,
    /// state_dir could not be written (the last valid set is not kept for a restart).
    pub state_error: Option<String>,
    /// metrics_listen is set but cannot listen (and what to do about it): the
    /// daemon enforces without metrics.
    #[serde(default)]
    pub metrics_error: Option<String>,
    /// Where the datapath's programs stop (`[datapath] stage`): anything but
    /// `full` enforces nothing (benchmarks only).
    #[serde(default)]
    pub datapath_stage: Stage,
    /// Fleet mode (`[etcd]` in netpold.toml); absent for a files-only daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdStatus>,
}

/// Fleet mode's part of `status` (DESIGN §5a).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// The last call to etcd succeeded and the watch is up.
    pub connected: bool,
    /// The remote view is a complete list plus every event since.
    pub in_sync: bool,
    /// The latest revision seen in the watched range.
    pub revision: i64,
    /// This host enforces etcd's watched range as of this revision.
    pub applied_revision: i64,
    /// Remote endpoints in the view (this host's own prefix excluded).
    pub remote_endpoints: usize,
    /// Remote entries left out, each with its `etcd:<key>@<revision>`
    /// origin: invalid, not matching their key, losing an address or a name to
    /// an earlier claim, or to a local file.
    pub rejected: Vec<FileError>,
    /// The view in force was read from state_dir's cache (etcd not heard from
    /// since start).
    pub from_cache: bool,
    /// Removed remote endpoints kept by the mass-removal hold.
    pub held_removals: usize,
    /// Unix ms when held removals apply.
    pub hold_until_ms: Option<u64>,
    /// Full lists of the watched range since start (the first one included).
    pub relists: u64,
    /// Connections lost since start.
    pub reconnects: u64,
    /// Unix ms of the last answer from etcd.
    pub last_contact_ms: Option<u64>,
    /// Keys published under this host's prefix.
    pub published: usize,
    /// Writes of this host's entries, and of its status key, since start.
    pub writes: u64,
    pub status_writes: u64,
    /// The last error talking to etcd, while it lasts.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    pub allowed: u64,
    pub denied_policy: u64,
    pub denied_default: u64,
    pub denied_spoof: u64,
    pub denied_other: u64,
    pub audit: u64,
}

impl From<&Counters> for CountersView {
    fn from(c: &Counters) -> Self {
        CountersView {
            allowed: c.allowed,
            denied_policy: c.denied_policy,
            denied_default: c.denied_default,
            denied_spoof: c.denied_spoof,
            denied_other: c.denied_other,
            audit: c.audit,
        }
    }
}

/// One endpoint as `netpolctl endpoints` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub slot: u32,
    pub name: String,
    pub namespace: Option<String>,
    pub kind: EndpointKind,
    pub identity: u32,
    pub interface: Option<String>,
    pub ifindex: Option<u32>,
    pub addresses: Vec<String>,
    /// Enforced on this host.
    pub local: bool,
    pub state: EndpointState,
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    pub audit: bool,
    pub counters: CountersView,
}

impl EndpointView {
    /// A compiled endpoint with its attachment (if its interface is attached)
    /// and its counters.
    pub fn of(ep: &CompiledEndpoint, att: Option<&Attachment>, counters: &Counters) -> Self {
        EndpointView {
            slot: ep.slot,
            name: ep.name.to_string(),
            namespace: ep.namespace.as_deref().map(str::to_string),
            kind: ep.kind.into(),
            identity: ep.identity,
            interface: ep.interface.as_ref().map(|i| match i {
                model::Interface::Name(n) => n.clone(),
                model::Interface::Auto => "auto".into(),
            }),
            ifindex: att.map(|a| a.ifindex),
            addresses: ep.addresses.iter().map(|a| a.to_string()).collect(),
            local: ep.local,
            state: match (ep.local, att) {
                (false, _) => EndpointState::Remote,
                (true, Some(_)) => EndpointState::Attached,
                (true, None) => EndpointState::Pending,
            },
            ingress_default_deny: ep.default_deny_ingress,
            egress_default_deny: ep.default_deny_egress,
            audit: ep.audit,
            counters: counters.into(),
        }
    }
}

/// The deciding rule of a verdict event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub file: String,
    pub kind: String,
    pub policy: String,
    pub path: String,
    /// The policy is staged: its would-be drops pass as audit.
    #[serde(default)]
    pub staged: bool,
    /// The default deny the rule brings, not one of its items.
    #[serde(default)]
    pub default_deny: bool,
}

impl From<&RuleRef> for RuleView {
    fn from(r: &RuleRef) -> Self {
        RuleView {
            file: r.file.display().to_string(),
            kind: r.kind.to_string(),
            policy: r.policy.to_string(),
            path: r.path.to_string(),
            staged: r.staged,
            default_deny: r.default_deny,
        }
    }
}

/// One verdict event (`netpolctl monitor`), one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// RFC 3339, UTC, when the daemon read the event.
    pub time: String,
    pub verdict: Verdict,
    pub reason: Reason,
    pub direction: Direction,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    /// `namespace/name` of the local endpoint where the verdict was taken.
    pub endpoint: Option<String>,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// `None`: no rule decided (default deny, spoofing, malformed...).
    pub rule: Option<RuleView>,
}

impl MonitorEvent {
    /// A datapath event read at `now`, its slot and rule resolved against the
    /// installed state.
    pub fn of(ev: &VerdictEvent, installed: Option<&Compiled>, now: SystemTime) -> Self {
        MonitorEvent {
            time: rfc3339(now),
            verdict: ev.verdict.into(),
            reason: ev.reason.into(),
            direction: ev.direction.into(),
            src: ev.src.to_string(),
            dst: ev.dst.to_string(),
            proto: crate::policy::trace::proto_name(ev.proto),
            sport: ev.sport,
            dport: ev.dport,
            endpoint: installed
                .and_then(|c| c.endpoints.get(ev.slot as usize))
                .map(|e| display_name(e.namespace.as_deref(), &e.name)),
            ifindex: ev.ifindex,
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            rule: ev
                .rule
                .and_then(|r| installed?.rules.get(r as usize))
                .map(RuleView::from),
        }
    }
}

/// `namespace/name`, or `name` without a namespace.
pub fn display_name(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// `2026-11-26T06:17:00.123Z` for a time since the Unix epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// Verdicts, reasons and directions keep the datapath's and the core's own
    /// serde names, and each wire enum's `as_str` is its serde name.
    #[test]
    fn wire_enums_keep_the_serde_names_of_what_they_carry() {
        fn name<T: Serialize>(v: T) -> String {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        }
        fn round<T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug + Copy>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            for &v in all {
                assert_eq!(name(v), as_str(v));
                assert_eq!(parse(as_str(v)), Some(v));
                let back: T = serde_json::from_value(serde_json::json!(as_str(v))).unwrap();
                assert_eq!(back, v);
            }
        }
        round(Verb::ALL, Verb::as_str, Verb::parse);
        round(EndpointKind::ALL, EndpointKind::as_str, EndpointKind::parse);
        round(
            EndpointState::ALL,
            EndpointState::as_str,
            EndpointState::parse,
        );
        round(Verdict::ALL, Verdict::as_str, Verdict::parse);
        round(Reason::ALL, Reason::as_str, Reason::parse);
        round(Direction::ALL, Direction::as_str, Direction::parse);
        for v in [
            EventVerdict::Allowed,
            EventVerdict::Denied,
            EventVerdict::Audit,
        ] {
            assert_eq!(name(v), Verdict::from(v).as_str());
        }
        for r in [
            EventReason::PolicyAllow,
            EventReason::PolicyDeny,
            EventReason::DefaultDeny,
            EventReason::Spoofed,
            EventReason::Fragment,
            EventReason::Malformed,
            EventReason::DnsProxy,
        ] {
            assert_eq!(name(r), Reason::from(r).as_str());
        }
        for d in [types::Direction::Ingress, types::Direction::Egress] {
            assert_eq!(name(d), Direction::from(d).as_str());
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_587_420_250)),
            "2026-11-25T06:17:00.250Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
