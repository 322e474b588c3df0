//! The only code that touches BPF: skeleton, typed maps, attach (tcx with a
//! clsact fallback), pins, the generation swap and the event reader.
//!
//! Everything above this module talks to the kernel through the [`Datapath`]
//! trait; [`fake::FakeDatapath`] implements it in memory so the daemon's reconcile
//! loop is tested without root.

mod error;
pub mod fake;
pub mod generation;
pub mod kernel;
pub mod layout;
pub mod packet;
pub mod skel;
mod upgrade;

pub use error::DatapathError;
pub use kernel::{Hook, KernelDatapath};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::types::{Compiled, Direction};
use crate::sizes::MapSizes;

/// Where one local endpoint is enforced: its slot in [`Compiled::endpoints`] and the
/// ifindex its interface resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Attachment {
    pub slot: u32,
    pub ifindex: u32,
}

/// Where the programs stop (`[datapath] stage`, bpf/lib/netpol_abi.h `enum
/// np_stage`): a benchmark setting that measures the per-packet cost step by
/// step. Anything but [`Stage::Full`] passes every packet after that step and
/// enforces nothing; the daemon says so in its log and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The whole pipeline: enforcing.
    #[default]
    Full,
    /// Return at entry: a no-op tcx program (the cost of having a hook at all).
    Entry,
    /// Return after the generation and endpoint lookup.
    Endpoint,
    /// Return after parsing.
    Parse,
    /// Return after the ipcache lookups (anti-spoofing, remote identity).
    Ipcache,
    /// Return after conntrack (a new flow gets its entry, so the next packet
    /// measures an established one).
    Conntrack,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Entry,
        Stage::Endpoint,
        Stage::Parse,
        Stage::Ipcache,
        Stage::Conntrack,
        Stage::Full,
    ];

    /// The name netpold.toml and `netpolctl status` use.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Full => "full",
            Stage::Entry => "entry",
            Stage::Endpoint => "endpoint",
            Stage::Parse => "parse",
            Stage::Ipcache => "ipcache",
            Stage::Conntrack => "conntrack",
        }
    }

    /// The value of `cfg_stage` (the skeleton's `np_stage`).
    pub fn code(self) -> u32 {
        use skel::types::np_stage;
        match self {
            Stage::Full => np_stage::NP_STAGE_FULL.0,
            Stage::Entry => np_stage::NP_STAGE_ENTRY.0,
            Stage::Endpoint => np_stage::NP_STAGE_ENDPOINT.0,
            Stage::Parse => np_stage::NP_STAGE_PARSE.0,
            Stage::Ipcache => np_stage::NP_STAGE_IPCACHE.0,
            Stage::Conntrack => np_stage::NP_STAGE_CONNTRACK.0,
        }
    }

    /// True when the programs enforce policy.
    pub fn enforcing(self) -> bool {
        self == Stage::Full
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Load-time and run-time settings the datapath needs from the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatapathSettings {
    /// `true`: forward packets of established flows are judged again after a
    /// policy change (`established = "recheck"`); `false`: kept.
    pub recheck_established: bool,
    /// 1 in N allowed new flows is reported as an event (0 = none).
    pub allow_sample_rate: u32,
    /// Maximum verdict events per second per CPU.
    pub events_per_sec: u32,
    /// Map sizes, in entries (defaults: [`MapSizes::DEFAULT`]); every sized map
    /// is created with these, whatever the C header says.
    pub ct_max_entries: u32,
    pub ipcache_max_entries: u32,
    pub policy_max_entries: u32,
    pub endpoint_max_entries: u32,
    /// Failsafe ports for host endpoints: (direction, proto, port).
    pub failsafe: Vec<(Direction, u8, u16)>,
    /// Conntrack timeouts in seconds: TCP before the first reply, established
    /// TCP, TCP after FIN/RST, and every other protocol.
    pub ct_timeout_syn_secs: u32,
    pub ct_timeout_established_secs: u32,
    pub ct_timeout_close_secs: u32,
    pub ct_timeout_other_secs: u32,
    /// Where the programs stop ([`Stage::Full`] but in benchmarks).
    pub stage: Stage,
    /// The egress hook passes a flow it passed within the last second, that
    /// arrives through another enforced endpoint, with one lookup
    /// (bpf/lib/bypass.h); off: it judges every packet in full.
    pub local_bypass: bool,
}

impl Default for DatapathSettings {
    /// The map sizes are [`MapSizes::DEFAULT`], as netpold.toml's defaults are.
    fn default() -> Self {
        let sizes = MapSizes::DEFAULT;
        Self {
            recheck_established: true,
            allow_sample_rate: 0,
            events_per_sec: 1000,
            ct_max_entries: sizes.conntrack,
            ipcache_max_entries: sizes.ipcache,
            policy_max_entries: sizes.policy,
            endpoint_max_entries: sizes.endpoints,
            failsafe: Vec::new(),
            ct_timeout_syn_secs: 60,
            ct_timeout_established_secs: 21600,
            ct_timeout_close_secs: 10,
            ct_timeout_other_secs: 60,
            stage: Stage::Full,
            local_bypass: true,
        }
    }
}

/// What happened to a packet, as reported by the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventVerdict {
    Allowed,
    Denied,
    Audit,
}

/// Why a verdict was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventReason {
    /// An allow entry matched.
    PolicyAllow,
    /// A deny entry matched.
    PolicyDeny,
    /// No entry matched and the direction is default-deny.
    DefaultDeny,
    /// Source address not registered for the sending endpoint.
    Spoofed,
    /// A fragment that could not be matched to its first fragment.
    Fragment,
    /// Malformed or unparseable headers.
    Malformed,
    /// DNS of an endpoint with DNS rules that netpold's proxy could not take
    /// (no proxy socket): dropped, fail closed.
    DnsProxy,
}

/// One verdict event read from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictEvent {
    pub ifindex: u32,
    pub slot: u32,
    pub direction: Direction,
    pub verdict: EventVerdict,
    pub reason: EventReason,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub proto: u8,
    /// Source port; the echo identifier for ICMP echo.
    pub sport: u16,
    /// Destination port, or the ICMP/ICMPv6 type (what the policy matched on).
    pub dport: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Index into `Compiled::rules` of the deciding rule, if known.
    pub rule: Option<u32>,
}

/// Per-endpoint counters, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied_policy: u64,
    pub denied_default: u64,
    pub denied_spoof: u64,
    pub denied_other: u64,
    pub audit: u64,
}

/// One redirect of the DNS proxy (bpf/lib/dnsredirect.h): packets leaving
/// the workload behind `ifindex` with this protocol and destination port go
/// to netpold's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DnsRedirect {
    pub ifindex: u32,
    /// TCP (6) or UDP (17).
    pub proto: u8,
    pub port: u16,
    /// The device is a bridge port: frames are readdressed to its own MAC so
    /// the bridge passes them up to the stack.
    pub bridge_mac: Option<[u8; 6]>,
}

/// Where the DNS proxy listens, as the datapath needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DnsProxyTarget {
    /// Port on 127.0.0.1 and ::1 (TCP and UDP); 0 = no proxy (redirected DNS
    /// is dropped).
    pub port: u16,
    /// The mark netpold's `ip rule` routes locally.
    pub mark: u32,
}

/// The redirect's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsRedirectStats {
    /// Packets handed to the proxy.
    pub redirected: u64,
    /// Dropped: no proxy socket (netpold down or the proxy not listening).
    pub dropped_no_proxy: u64,
    /// Dropped: the kernel refused the assignment, or a fragment.
    pub dropped_other: u64,
}

/// The kernel side as the daemon sees it.
pub trait Datapath {
    /// Fill the inactive generation completely with `state` and the given
    /// attachments' slots, then flip. Returns the new generation number. On any
    /// error before the flip the running generation is untouched.
    fn apply(&mut self, state: &Compiled, attachments: &[Attachment])
        -> Result<u64, DatapathError>;

    /// Make the attached programs match `attachments` exactly: attach where missing
    /// (ingress and egress hook), detach interfaces no longer listed.
    fn sync_attachments(&mut self, attachments: &[Attachment]) -> Result<(), DatapathError>;

    /// Work left over from a sync that finishes in the background (devices
    /// moving from cls_bpf to tcx): called from the daemon's loop between
    /// passes. Returns what is worth a log line.
    fn maintain(&mut self) -> Option<String> {
        None
    }

    /// The active generation number (0 before the first apply).
    fn generation(&self) -> u64;

    /// Drain up to `max` pending verdict events.
    fn poll_events(&mut self, max: usize) -> Vec<VerdictEvent>;

    /// Counters per endpoint slot.
    fn counters(&self) -> BTreeMap<u32, Counters>;

    /// Remove everything: links, programs, maps, pins.
    fn detach_all(&mut self) -> Result<(), DatapathError>;

    /// Where the loaded programs stop ([`Stage::Full`]: they enforce).
    fn stage(&self) -> Stage {
        Stage::Full
    }

    /// Make the DNS redirect exactly `redirects`, to `proxy`.
    fn set_dns_redirect(
        &mut self,
        _proxy: DnsProxyTarget,
        _redirects: &[DnsRedirect],
    ) -> Result<(), DatapathError> {
        Ok(())
    }

    /// The redirect's counters.
    fn dns_redirect_stats(&self) -> DnsRedirectStats {
        DnsRedirectStats::default()
    }

    /// The (ifindex, address, address) of every conntrack entry not expired
    /// yet: which learned addresses a connection still uses.
    fn live_flows(&self) -> Vec<(u32, std::net::IpAddr, std::net::IpAddr)> {
        Vec::new()
    }
}
