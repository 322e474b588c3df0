//! What the runtime socket answers: the wire types of `status`, `endpoints` and
//! `monitor`, shared by the daemon (serializes) and `netpolctl` (deserializes).
//! Plain data; no I/O.

use serde::{Deserialize, Serialize};

/// A request: one JSON line `{"request": "status"}` (or `endpoints`, `monitor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request: String,
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

/// One endpoint as `netpolctl endpoints` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub slot: u32,
    pub name: String,
    pub namespace: Option<String>,
    /// `workload` or `host`.
    pub kind: String,
    pub identity: u32,
    pub interface: Option<String>,
    pub ifindex: Option<u32>,
    pub addresses: Vec<String>,
    /// Enforced on this host.
    pub local: bool,
    /// `attached`, `pending` (interface missing) or `remote`.
    pub state: String,
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    pub audit: bool,
    pub counters: CountersView,
}

/// The deciding rule of a verdict event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub file: String,
    pub kind: String,
    pub policy: String,
    pub path: String,
}

/// One verdict event (`netpolctl monitor`), one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// RFC 3339, UTC, when the daemon read the event.
    pub time: String,
    pub verdict: String,
    pub reason: String,
    pub direction: String,
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

/// `2026-11-26T06:17:00.123Z` for a time since the Unix epoch.
pub fn rfc3339(t: std::time::SystemTime) -> String {
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
