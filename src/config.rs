//! `netpold.toml` (docs/daemon.md, "Configuration"): every key optional,
//! defaults in code, unknown keys and wrong values are errors naming the file,
//! the position and the key.
//!
//! Owns the file's keys and their defaults (map sizes come from
//! [`crate::sizes`]), and derives the settings other modules take
//! ([`DatapathSettings`], [`CompileOptions`], [`LoadOptions`]): config builds
//! their options, never the other way round. It reads only the file it is
//! given and starts nothing. The shipped `etc/netpol/netpold.toml` lists every
//! key commented out with its default, and a test keeps it equal to
//! [`Config::default`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::LoadOptions;
use crate::datapath::{DatapathSettings, Stage};
use crate::policy::compile::{CompileOptions, Limits};
use crate::policy::types::{proto, Direction};
use crate::sizes::{MapKind, MapSizes};

pub const DEFAULT_CONFIG: &str = "/etc/netpol/netpold.toml";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub endpoint_dirs: Vec<PathBuf>,
    pub pin_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Empty = the hostname.
    pub node_name: String,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub established: Established,
    /// Global policy audit mode: would-be drops pass and are reported as audit.
    pub audit: bool,
    pub allow_localhost: AllowLocalhost,
    /// Quiet time after the last file event before a reconcile, for a burst; a
    /// single change waits a fifth of it, or 1 ms when its files are complete
    /// (renamed into place or closed after writing; see `watch::Debouncer`).
    pub debounce_ms: u64,
    /// Full re-read even without events (safety net for a missed event); 0 = never.
    pub resync_interval_s: u64,
    /// Group allowed to use the runtime socket (mode 0660); empty = root only (0600).
    pub socket_group: String,
    /// Refuse policy and registry files that are group/world-writable or not owned by root.
    pub strict_file_modes: bool,
    /// Serve Prometheus metrics on this address ("127.0.0.1:9962"); empty = off.
    pub metrics_listen: String,
    pub events: EventsConfig,
    pub conntrack: ConntrackConfig,
    pub maps: MapsConfig,
    pub failsafe: FailsafeConfig,
    pub etcd: EtcdConfig,
    pub datapath: DatapathConfig,
    pub dns: DnsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy_dir: "/etc/netpol.d".into(),
            endpoint_dirs: vec!["/etc/netpol/endpoints.d".into()],
            pin_dir: "/sys/fs/bpf/netpol".into(),
            runtime_dir: "/run/netpol".into(),
            state_dir: "/var/lib/netpol".into(),
            node_name: String::new(),
            log_level: LogLevel::Info,
            log_format: LogFormat::Auto,
            established: Established::Recheck,
            audit: false,
            allow_localhost: AllowLocalhost::Policy,
            debounce_ms: 50,
            resync_interval_s: 60,
            socket_group: String::new(),
            strict_file_modes: true,
            metrics_listen: String::new(),
            events: EventsConfig::default(),
            conntrack: ConntrackConfig::default(),
            maps: MapsConfig::default(),
            failsafe: FailsafeConfig::default(),
            etcd: EtcdConfig::default(),
            datapath: DatapathConfig::default(),
            dns: DnsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when started by systemd (`JOURNAL_STREAM` set), terminal otherwise.
    Auto,
    Terminal,
    Json,
    Journald,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Established {
    /// Established connections are judged again after a policy change.
    Recheck,
    /// Established connections survive a policy change.
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowLocalhost {
    /// Host → local workload is subject to policy (`fromEntities: [host]`).
    Policy,
    /// Host → local workload always passes.
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Report 1 in N allowed new flows (0 = none); drops are always reported.
    pub allow_sample_rate: u32,
    /// At most this many verdict events per second per CPU.
    pub events_per_sec: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            allow_sample_rate: 0,
            events_per_sec: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConntrackConfig {
    pub max_entries: u32,
    /// TCP before the first reply.
    pub tcp_syn_timeout_s: u32,
    /// Established TCP.
    pub tcp_established_timeout_s: u32,
    /// TCP after FIN or RST.
    pub tcp_close_timeout_s: u32,
    /// UDP, ICMP and every other protocol.
    pub other_timeout_s: u32,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        // Cilium's defaults: 6 h for established TCP, 60 s for SYN and non-TCP, 10 s after FIN.
        ConntrackConfig {
            max_entries: MapSizes::DEFAULT.conntrack,
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21600,
            tcp_close_timeout_s: 10,
            other_timeout_s: 60,
        }
    }
}

/// `[datapath]`: settings of the BPF programs that are not policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Benchmarks only: where the programs stop (docs/benchmarks.md). Anything
    /// but `full` passes every packet and enforces nothing; netpold logs a
    /// warning and `netpolctl status` says so.
    pub stage: Stage,
    /// A flow between two local endpoints that the receiver's hook passed
    /// within the last second passes there with one lookup (bpf/README.md,
    /// "Both ends local"); false: that hook judges every packet in full.
    pub local_bypass: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            stage: Stage::Full,
            local_bypass: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapsConfig {
    pub ipcache_max_entries: u32,
    pub policy_max_entries: u32,
    pub endpoint_max_entries: u32,
}

impl Default for MapsConfig {
    fn default() -> Self {
        let d = MapSizes::DEFAULT;
        MapsConfig {
            ipcache_max_entries: d.ipcache,
            policy_max_entries: d.policy,
            endpoint_max_entries: d.endpoints,
        }
    }
}

/// Ports a host endpoint always passes, whatever the host policy says (Calico's
/// failsafe ports), written `"tcp:22"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailsafeConfig {
    pub inbound: Vec<ProtoPort>,
    pub outbound: Vec<ProtoPort>,
}

impl Default for FailsafeConfig {
    fn default() -> Self {
        let pp = |proto, port| ProtoPort { proto, port };
        FailsafeConfig {
            inbound: vec![pp(proto::TCP, 22), pp(proto::UDP, 68)],
            outbound: vec![pp(proto::UDP, 53), pp(proto::UDP, 67), pp(proto::TCP, 53)],
        }
    }
}

/// The DNS proxy (docs/policy.md, "DNS names"): started when some policy
/// has DNS rules; its learned set's lifetime and caps, and how the datapath
/// hands it a workload's DNS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// An answer's TTL below this counts as this, in seconds.
    pub min_ttl_s: u32,
    /// Addresses one endpoint may have learned at once.
    pub max_per_endpoint: usize,
    /// Addresses all endpoints may have learned at once.
    pub max_total: usize,
    /// The proxy's port on 127.0.0.1 and ::1, TCP and UDP; 0 = a free one.
    pub proxy_port: u16,
    /// How long an upstream server may take to answer, in milliseconds.
    pub upstream_timeout_ms: u64,
    /// The packet mark of redirected DNS, and the routing table (with a
    /// `local` default route) its `ip rule` sends it to, at this priority.
    pub redirect_mark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        let l = crate::dns::learned::LearnedConfig::default();
        DnsConfig {
            min_ttl_s: l.min_ttl_s,
            max_per_endpoint: l.max_per_endpoint,
            max_total: l.max_total,
            proxy_port: 0,
            upstream_timeout_ms: 2000,
            redirect_mark: 0x4e53_0000,
            route_table: 2053,
            rule_priority: 100,
        }
    }
}

impl DnsConfig {
    pub fn learned(&self) -> crate::dns::learned::LearnedConfig {
        crate::dns::learned::LearnedConfig {
            min_ttl_s: self.min_ttl_s,
            max_per_endpoint: self.max_per_endpoint,
            max_total: self.max_total,
        }
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_per_endpoint == 0 {
            return Err(("dns.max_per_endpoint", "must be at least 1".into()));
        }
        if self.max_total == 0 {
            return Err(("dns.max_total", "must be at least 1".into()));
        }
        if self.redirect_mark == 0 {
            return Err((
                "dns.redirect_mark",
                "must not be 0 (unmarked packets would be routed to the proxy)".into(),
            ));
        }
        // 0 and 253-255 are unspec, default, main and local.
        if matches!(self.route_table, 0 | 253..=255) {
            return Err((
                "dns.route_table",
                format!(
                    "{} is a reserved table (unspec, default, main or local)",
                    self.route_table
                ),
            ));
        }
        if self.upstream_timeout_ms == 0 {
            return Err(("dns.upstream_timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Fleet mode (DESIGN §5a): the registry and policies on etcd. Off unless
/// `endpoints` is set. Read by `fleet::FleetSettings`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// `["http://10.0.0.5:2379"]`; empty = files only.
    pub endpoints: Vec<String>,
    /// Every key netpol reads or writes starts with it.
    pub prefix: String,
    /// This host's published entries live under one lease of this TTL, kept
    /// alive every third of it; a dead host's entries go when it expires.
    pub lease_ttl_s: u64,
    /// Publish this host's Node, endpoints and host endpoints.
    pub publish: bool,
    /// Remote changes reach the reconcile loop at most once per this tick (a
    /// change after a quiet tick at once).
    pub batch_ms: u64,
    /// This host's `status/<node>` key is written at most this often.
    pub status_interval_s: u64,
    /// A removal of more than a fifth of the remote endpoints within a minute
    /// (at least 10) is held this long before it applies; 0 = never held.
    pub mass_removal_hold_s: u64,
    /// mTLS: CA bundle, client certificate and key (PEM). Needed for https endpoints.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// etcd user; its password is the first line of `password_file`.
    pub username: String,
    pub password_file: PathBuf,
    /// Connecting to an endpoint.
    pub connect_timeout_ms: u64,
    /// Every request (a page of a list, a transaction, a lease call).
    pub request_timeout_ms: u64,
    /// A watch idle this long is asked for progress; no answer within
    /// `request_timeout_ms` counts as a broken connection.
    pub progress_interval_ms: u64,
    /// Full relists (after a compaction or a restore) at most this often, jittered.
    pub relist_min_interval_s: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/netpol/v1".into(),
            lease_ttl_s: 60,
            publish: true,
            batch_ms: 50,
            status_interval_s: 2,
            mass_removal_hold_s: 120,
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            username: String::new(),
            password_file: PathBuf::new(),
            connect_timeout_ms: 3000,
            request_timeout_ms: 5000,
            progress_interval_ms: 2000,
            relist_min_interval_s: 30,
        }
    }
}

impl EtcdConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The TCP ports of the endpoints (valid ones), in order, once each.
    pub fn ports(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for e in &self.endpoints {
            let hostport = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
            let hostport = hostport.trim_end_matches('/');
            if let Some(p) = hostport
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
            {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// The first problem found, as `(key, message)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let mut schemes = std::collections::BTreeSet::new();
        for e in &self.endpoints {
            let ok = ["http://", "https://"].iter().find_map(|s| {
                let rest = e.strip_prefix(s)?;
                let hostport = rest.strip_suffix('/').unwrap_or(rest);
                let (host, port) = hostport.rsplit_once(':')?;
                (!host.is_empty()
                    && !hostport.contains('/')
                    && port.parse::<u16>().is_ok_and(|p| p > 0))
                .then_some(*s)
            });
            match ok {
                Some(s) => {
                    schemes.insert(s);
                }
                None => {
                    return Err((
                        "etcd.endpoints",
                        format!("{e:?} is not a URL such as \"http://10.0.0.5:2379\" or \"https://etcd1:2379\""),
                    ))
                }
            }
        }
        if schemes.len() > 1 {
            return Err((
                "etcd.endpoints",
                "mixes http:// and https://; use one scheme for every endpoint".into(),
            ));
        }
        let p = &self.prefix;
        if !p.starts_with('/')
            || p.len() < 2
            || p.ends_with('/')
            || p.contains("//")
            || p.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err((
                "etcd.prefix",
                format!("{p:?} must start with '/', not end with '/', and hold no empty segment or whitespace (e.g. \"/netpol/v1\")"),
            ));
        }
        if !(2..=86400).contains(&self.lease_ttl_s) {
            return Err((
                "etcd.lease_ttl_s",
                format!("{} is not between 2 and 86400", self.lease_ttl_s),
            ));
        }
        if !(1..=10_000).contains(&self.batch_ms) {
            return Err((
                "etcd.batch_ms",
                format!("{} is not between 1 and 10000", self.batch_ms),
            ));
        }
        if !(1..=3600).contains(&self.status_interval_s) {
            return Err((
                "etcd.status_interval_s",
                format!("{} is not between 1 and 3600", self.status_interval_s),
            ));
        }
        if self.mass_removal_hold_s > 86400 {
            return Err((
                "etcd.mass_removal_hold_s",
                format!("{} is more than 86400", self.mass_removal_hold_s),
            ));
        }
        for (key, v) in [
            ("etcd.connect_timeout_ms", self.connect_timeout_ms),
            ("etcd.request_timeout_ms", self.request_timeout_ms),
            ("etcd.progress_interval_ms", self.progress_interval_ms),
        ] {
            if !(10..=600_000).contains(&v) {
                return Err((key, format!("{v} is not between 10 and 600000")));
            }
        }
        if self.relist_min_interval_s > 3600 {
            return Err((
                "etcd.relist_min_interval_s",
                format!("{} is more than 3600", self.relist_min_interval_s),
            ));
        }
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if set(&self.cert_file) != set(&self.key_file) {
            let key = if set(&self.cert_file) {
                "etcd.key_file"
            } else {
                "etcd.cert_file"
            };
            return Err((
                key,
                "cert_file and key_file go together (the client certificate and its key)".into(),
            ));
        }
        let tls = set(&self.ca_file) || set(&self.cert_file);
        if schemes.contains("https://") && !set(&self.ca_file) {
            return Err((
                "etcd.ca_file",
                "https endpoints need the CA that signed etcd's certificate".into(),
            ));
        }
        if tls && schemes.contains("http://") {
            return Err((
                "etcd.endpoints",
                "ca_file, cert_file and key_file need https:// endpoints".into(),
            ));
        }
        if set(&self.password_file) == self.username.is_empty() {
            let key = if self.username.is_empty() {
                "etcd.username"
            } else {
                "etcd.password_file"
            };
            return Err((key, "username and password_file go together".into()));
        }
        Ok(())
    }
}

/// `"tcp:22"`, `"udp:53"`, `"sctp:9"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProtoPort {
    pub proto: u8,
    pub port: u16,
}

impl TryFrom<String> for ProtoPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!("{s:?} is not PROTOCOL:PORT with PROTOCOL tcp, udp or sctp (e.g. \"tcp:22\")")
        };
        let (p, port) = s.split_once(':').ok_or_else(bad)?;
        let proto = match p.to_ascii_lowercase().as_str() {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "sctp" => proto::SCTP,
            _ => return Err(bad()),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(ProtoPort { proto, port })
    }
}

impl From<ProtoPort> for String {
    fn from(p: ProtoPort) -> String {
        p.to_string()
    }
}

impl fmt::Display for ProtoPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::SCTP => "sctp",
            _ => "?",
        };
        write!(f, "{name}:{}", self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Displayed as the path alone: `{:#}` adds why it could not be read.
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `path:line:column: key: message`, the parts known.
    #[error("{}", fmt_parse(.path, *.line, *.column, .key.as_deref(), .message))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        key: Option<String>,
        message: String,
    },
}

fn fmt_parse(
    path: &Path,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut s = path.display().to_string();
    if let (Some(l), Some(c)) = (line, column) {
        s.push_str(&format!(":{l}:{c}"));
    }
    s.push_str(": ");
    if let Some(k) = key {
        s.push_str(k);
        s.push_str(": ");
    }
    s.push_str(message);
    s
}

impl Config {
    /// How files are loaded: `strict_file_modes` refuses files and directories
    /// writable by group or others or owned by another user.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            strict_modes: self.strict_file_modes,
        }
    }

    /// Load `path`; a missing file at the default path gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG) =>
            {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(path, &text)
    }

    /// Parse config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            line: None,
            column: None,
            key: Some(key.to_string()),
            message,
        };
        for (key, p) in [
            ("policy_dir", &self.policy_dir),
            ("pin_dir", &self.pin_dir),
            ("runtime_dir", &self.runtime_dir),
            ("state_dir", &self.state_dir),
        ] {
            if p.as_os_str().is_empty() {
                return Err(err(key, "must not be empty".into()));
            }
        }
        if self.endpoint_dirs.iter().any(|d| d.as_os_str().is_empty()) {
            return Err(err("endpoint_dirs", "an entry is empty".into()));
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(err(
                "metrics_listen",
                format!(
                    "{:?} is not an address:port such as \"127.0.0.1:9962\"",
                    self.metrics_listen
                ),
            ));
        }
        if self.debounce_ms > 10_000 {
            return Err(err(
                "debounce_ms",
                format!("{} is more than 10000", self.debounce_ms),
            ));
        }
        let sizes = self.map_sizes();
        for map in [
            MapKind::Conntrack,
            MapKind::Ipcache,
            MapKind::Policy,
            MapKind::Endpoints,
        ] {
            if sizes.get(map) == 0 {
                return Err(err(map.key(), "must be at least 1".into()));
            }
        }
        self.etcd.check().map_err(|(key, m)| err(key, m))?;
        self.dns.check().map_err(|(key, m)| err(key, m))?;
        Ok(())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir.join("netpold.sock")
    }

    /// `node_name`, or the hostname when it is empty.
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        hostname()
    }

    /// The sizes of the maps (`[maps]`, `conntrack.max_entries`).
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            ipcache: self.maps.ipcache_max_entries,
            policy: self.maps.policy_max_entries,
            endpoints: self.maps.endpoint_max_entries,
            conntrack: self.conntrack.max_entries,
        }
    }

    pub fn datapath_settings(&self) -> DatapathSettings {
        let mut failsafe = Vec::new();
        for p in &self.failsafe.inbound {
            failsafe.push((Direction::Ingress, p.proto, p.port));
        }
        for p in &self.failsafe.outbound {
            failsafe.push((Direction::Egress, p.proto, p.port));
        }
        // Fleet mode: no host policy may cut this host off from its etcd.
        for port in self.etcd.ports() {
            let e = (Direction::Egress, proto::TCP, port);
            if !failsafe.contains(&e) {
                failsafe.push(e);
            }
        }
        let sizes = self.map_sizes();
        DatapathSettings {
            recheck_established: self.established == Established::Recheck,
            allow_sample_rate: self.events.allow_sample_rate,
            events_per_sec: self.events.events_per_sec,
            ct_max_entries: sizes.conntrack,
            ipcache_max_entries: sizes.ipcache,
            policy_max_entries: sizes.policy,
            endpoint_max_entries: sizes.endpoints,
            failsafe,
            ct_timeout_syn_secs: self.conntrack.tcp_syn_timeout_s,
            ct_timeout_established_secs: self.conntrack.tcp_established_timeout_s,
            ct_timeout_close_secs: self.conntrack.tcp_close_timeout_s,
            ct_timeout_other_secs: self.conntrack.other_timeout_s,
            stage: self.datapath.stage,
            local_bypass: self.datapath.local_bypass,
        }
    }

    #[allow(clippy::needless_update)] // the core may add fields with defaults
    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            node_name: self.node_name(),
            audit: self.audit,
            allow_localhost: self.allow_localhost == AllowLocalhost::Always,
            limits: self.compile_limits(),
            ..CompileOptions::default()
        }
    }

    /// The map sizes compile keeps a state within: a set that would need more is
    /// refused before anything is applied.
    pub fn compile_limits(&self) -> Limits {
        Limits::of(&self.map_sizes())
    }
}

/// The host's name as the kernel reports it (UTS namespace).
pub fn hostname() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => "localhost".to_string(),
    }
}

/// Turn a toml error into `file:line:col: key: message`. The key is the dotted path
/// of the table and key on the line the error points at.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (mut line, mut column, mut key) = (None, None, None);
    if let Some(span) = e.span() {
        let start = span.start.min(text.len());
        let before = &text[..start];
        let l = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        line = Some(l);
        column = Some(before[line_start..].chars().count() + 1);
        let line_text = text[line_start..].lines().next().unwrap_or("");
        let table = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        if let Some((k, _)) = line_text.split_once('=') {
            let k = k.trim().trim_matches('"');
            if !k.is_empty() && !k.starts_with('#') {
                key = Some(match &table {
                    Some(t) => format!("{t}.{k}"),
                    None => k.to_string(),
                });
            }
        }
    }
    let message = e.message().trim().to_string();
    // serde names an unknown key itself ("unknown field `x`"); qualify it by its table.
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/netpol/netpold.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let e = parse("policy_dir = \"/x\"\npolicy_dri = \"/y\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/netpol/netpold.toml:2:1: policy_dri: unknown field `policy_dri`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_a_table_is_named() {
        let e = parse("[maps]\npolicy_entries = 3\n").unwrap_err();
        assert!(
            e.starts_with(
                "/etc/netpol/netpold.toml:2:1: maps.policy_entries: unknown field `policy_entries`"
            ),
            "{e}"
        );
    }

    #[test]
    fn wrong_value_is_named() {
        let e = parse("log_level = \"loud\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/netpol/netpold.toml:1:13: log_level: unknown variant `loud`"),
            "{e}"
        );
        let e = parse("debounce_ms = \"fast\"\n").unwrap_err();
        assert!(
            e.contains(": debounce_ms: invalid type: string \"fast\""),
            "{e}"
        );
        let e = parse("[failsafe]\ninbound = [\"tcp:22\", \"icmp:1\"]\n").unwrap_err();
        assert!(
            e.contains("failsafe.inbound: \"icmp:1\" is not PROTOCOL:PORT"),
            "{e}"
        );
        let e = parse("[maps]\nipcache_max_entries = 0\n").unwrap_err();
        assert_eq!(
            e,
            "/etc/netpol/netpold.toml: maps.ipcache_max_entries: must be at least 1"
        );
    }

    #[test]
    fn etcd_table_errors_name_the_key() {
        let c =
            parse("[etcd]\nendpoints = [\"http://127.0.0.1:23790\"]\nlease_ttl_s = 5\n").unwrap();
        assert!(c.etcd.enabled());
        assert!(!Config::default().etcd.enabled());
        let cases = [
            ("lease_ttl_s = 1", "etcd.lease_ttl_s: 1 is not between 2 and 86400"),
            ("batch_ms = 0", "etcd.batch_ms: 0 is not between 1 and 10000"),
            ("status_interval_s = 0", "etcd.status_interval_s: 0 is not between 1 and 3600"),
            ("prefix = \"netpol\"", "etcd.prefix: \"netpol\" must start with '/', not end with '/', and hold no empty segment or whitespace (e.g. \"/netpol/v1\")"),
            ("prefix = \"/netpol/\"", "etcd.prefix: \"/netpol/\" must start with '/', not end with '/', and hold no empty segment or whitespace (e.g. \"/netpol/v1\")"),
            ("endpoints = [\"10.0.0.5:2379\"]", "etcd.endpoints: \"10.0.0.5:2379\" is not a URL such as \"http://10.0.0.5:2379\" or \"https://etcd1:2379\""),
            ("endpoints = [\"http://a:1\", \"https://b:2\"]", "etcd.endpoints: mixes http:// and https://; use one scheme for every endpoint"),
            ("endpoints = [\"https://a:1\"]", "etcd.ca_file: https endpoints need the CA that signed etcd's certificate"),
            ("cert_file = \"/c.pem\"", "etcd.key_file: cert_file and key_file go together (the client certificate and its key)"),
            ("endpoints = [\"http://a:1\"]\nca_file = \"/ca.pem\"", "etcd.endpoints: ca_file, cert_file and key_file need https:// endpoints"),
            ("username = \"node-a\"", "etcd.password_file: username and password_file go together"),
            ("request_timeout_ms = 0", "etcd.request_timeout_ms: 0 is not between 10 and 600000"),
        ];
        for (line, want) in cases {
            let e = parse(&format!("[etcd]\n{line}\n")).unwrap_err();
            assert_eq!(e, format!("/etc/netpol/netpold.toml: {want}"), "{line}");
        }
        let e = parse("[etcd]\nlease_ttl = 5\n").unwrap_err();
        assert!(
            e.starts_with(
                "/etc/netpol/netpold.toml:2:1: etcd.lease_ttl: unknown field `lease_ttl`"
            ),
            "{e}"
        );
        let c = parse("[etcd]\nendpoints = [\"https://etcd1:2379/\"]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nusername = \"a\"\npassword_file = \"/p\"\n");
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn failsafe_may_be_emptied() {
        let c = parse("[failsafe]\ninbound = []\noutbound = []\n").unwrap();
        assert!(c.datapath_settings().failsafe.is_empty());
        let d = Config::default().datapath_settings();
        assert_eq!(
            d.failsafe,
            vec![
                (Direction::Ingress, proto::TCP, 22),
                (Direction::Ingress, proto::UDP, 68),
                (Direction::Egress, proto::UDP, 53),
                (Direction::Egress, proto::UDP, 67),
                (Direction::Egress, proto::TCP, 53),
            ]
        );
        assert!(d.recheck_established);
    }

    /// Fleet mode: no host policy may cut the host off from its etcd, even
    /// with the failsafe emptied; each port once.
    #[test]
    fn etcd_ports_join_the_outbound_failsafe() {
        let c = parse("[failsafe]\ninbound = []\noutbound = [\"tcp:2379\"]\n[etcd]\nendpoints = [\"https://10.0.0.5:2379\", \"https://[fd00::6]:2379/\", \"https://etcd3:12379\"]\nca_file = \"/ca.pem\"\n").unwrap();
        assert_eq!(
            c.datapath_settings().failsafe,
            vec![
                (Direction::Egress, proto::TCP, 2379),
                (Direction::Egress, proto::TCP, 12379),
            ]
        );
    }

    #[test]
    fn settings_follow_the_keys() {
        let c = parse("established = \"keep\"\naudit = true\nallow_localhost = \"always\"\nnode_name = \"n1\"\n[events]\nallow_sample_rate = 7\n").unwrap();
        let d = c.datapath_settings();
        assert!(!d.recheck_established);
        assert_eq!(d.allow_sample_rate, 7);
        let o = c.compile_options();
        assert_eq!(
            (o.node_name.as_str(), o.audit, o.allow_localhost),
            ("n1", true, true)
        );
        assert!(!parse("").unwrap().node_name().is_empty());
    }

    /// `[dns]` reaches the learned set's limits; a bad value names its key.
    #[test]
    fn dns_table_sets_the_learned_limits_and_names_bad_keys() {
        let c = parse(
            "[dns]
min_ttl_s = 1
max_per_endpoint = 3
max_total = 9
",
        )
        .unwrap();
        let l = c.dns.learned();
        assert_eq!((l.min_ttl_s, l.max_per_endpoint, l.max_total), (1, 3, 9));
        assert_eq!(
            parse(
                "[dns]
max_total = 0
"
            )
            .unwrap_err(),
            "/etc/netpol/netpold.toml: dns.max_total: must be at least 1"
        );
        assert_eq!(
            parse("[dns]
route_table = 254
").unwrap_err(),
            "/etc/netpol/netpold.toml: dns.route_table: 254 is a reserved table (unspec, default, main or local)"
        );
        let e = parse(
            "[dns]
min_ttl = 1
",
        )
        .unwrap_err();
        assert!(
            e.starts_with("/etc/netpol/netpold.toml:2:1: dns.min_ttl: unknown field `min_ttl`"),
            "{e}"
        );
    }

    /// `[datapath] stage` reaches the datapath settings; a stage that does not
    /// exist is an error naming the key.
    #[test]
    fn datapath_stage_is_a_setting_and_full_by_default() {
        assert_eq!(Config::default().datapath_settings().stage, Stage::Full);
        let c = parse("[datapath]\nstage = \"entry\"\n").unwrap();
        assert_eq!(c.datapath_settings().stage, Stage::Entry);
        let e = parse("[datapath]\nstage = \"half\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/netpol/netpold.toml:2:9: datapath.stage: unknown variant `half`"),
            "{e}"
        );
    }

    /// `[datapath] local_bypass` is on by default and reaches the settings.
    #[test]
    fn local_bypass_is_on_by_default_and_can_be_turned_off() {
        assert!(Config::default().datapath_settings().local_bypass);
        let c = parse("[datapath]\nlocal_bypass = false\n").unwrap();
        assert!(!c.datapath_settings().local_bypass);
    }

    /// Every map size has one key, named as `sizes` names it, and its default
    /// is the one definition in `sizes`, which every layer reads.
    #[test]
    fn map_sizes_have_one_key_and_one_default() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (i, map) in MapKind::ALL.into_iter().enumerate() {
            let (table, key) = map.key().split_once('.').unwrap();
            assert_eq!(
                defaults[table][key].as_integer(),
                Some(i64::from(MapSizes::DEFAULT.get(map))),
                "{map}"
            );
            let n = 1000 + i as u32;
            let c = parse(&format!("[{table}]\n{key} = {n}\n")).unwrap();
            assert_eq!(c.map_sizes().get(map), n, "{map}");
            assert_eq!(
                parse(&format!("[{table}]\n{key} = 0\n")).unwrap_err(),
                format!("/etc/netpol/netpold.toml: {map}: must be at least 1")
            );
        }
        assert_eq!(Config::default().map_sizes(), MapSizes::DEFAULT);
        let d = DatapathSettings::default();
        assert_eq!(
            (
                d.ipcache_max_entries,
                d.policy_max_entries,
                d.endpoint_max_entries,
                d.ct_max_entries
            ),
            (
                MapSizes::DEFAULT.ipcache,
                MapSizes::DEFAULT.policy,
                MapSizes::DEFAULT.endpoints,
                MapSizes::DEFAULT.conntrack
            )
        );
        assert_eq!(Config::default().compile_limits(), Limits::default());
    }

    /// A file that cannot be read is named, and its cause printed once.
    #[test]
    fn unreadable_config_prints_its_cause_once() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("netpold.toml");
        let e = Config::load(&missing).unwrap_err();
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            format!(
                "{}: No such file or directory (os error 2)",
                missing.display()
            )
        );
    }

    /// The shipped file, with its `#key = value` lines uncommented, is exactly the
    /// defaults, and names every key.
    #[test]
    fn shipped_file_lists_every_key_with_its_default() {
        let shipped = include_str!("../etc/netpol/netpold.toml");
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if !rest.starts_with(' ') && !rest.starts_with('#') && !rest.is_empty() =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed = parse(&uncommented).unwrap();
        assert_eq!(parsed, Config::default());
        // Every key of the defaults appears in the file (serde fills missing ones).
        let written: toml::Table = toml::from_str(&uncommented).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        fn keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                let name = format!("{prefix}{k}");
                if let toml::Value::Table(sub) = v {
                    keys(sub, &format!("{name}."), out);
                }
                out.push(name);
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(&defaults, "", &mut want);
        keys(&written, "", &mut have);
        want.sort();
        have.sort();
        assert_eq!(have, want);
        // And nothing in it is live: the shipped file itself parses to the defaults too.
        assert_eq!(parse(shipped).unwrap(), Config::default());
    }
}
