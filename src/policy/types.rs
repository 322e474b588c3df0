//! The compiled policy state: what `compile` produces, `trace` reads and the
//! datapath loads. Designed for the kernel's lookups (the maps of bpf/README.md
//! and bpf/lib/netpol_maps.h): an ipcache
//! (prefix → identity), an endpoint table (slot → identity, flags) and policy
//! entries keyed like an LPM trie (endpoint, direction, remote identity or 0,
//! protocol or 0, port under a prefix mask).
//!
//! Everything here is deterministic and a function of the input files (and the
//! node name), so two hosts with the same files compute identical state.
//!
//! Owns the types only: plain data, no I/O, no logic beyond accessors.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::model::{EndpointKind, Interface, Label};

/// Numeric security identity. 0 is the wildcard ("any identity") in policy entries.
pub type Identity = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// What an entry says (the lookup contract of `super::lookup` decides a flow
/// from the entries the two lookups find). The last three exist only where a
/// staged policy selects the endpoint (docs/policy.md, "Staged policies").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryVerdict {
    /// An enforced allow.
    Allow = 1,
    /// An enforced deny.
    Deny = 2,
    /// A staged deny, and no enforced allow of this identity: the flow passes
    /// as audit if the enforced policies allow it (an allow of the other
    /// lookup, or no default deny), and is dropped by default deny otherwise.
    StagedDeny = 3,
    /// An enforced allow and a staged deny: passes as audit (the staged rule).
    AllowStagedDeny = 4,
    /// Only with identity 0 and any protocol: nothing here but the default deny
    /// of a staged policy (the endpoint is not default-deny under the enforced
    /// ones): a flow nothing else decides passes as audit.
    StagedDefaultDeny = 5,
}

/// IP protocol numbers used in entries; 0 = any protocol.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// A security identity and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityInfo {
    pub id: Identity,
    /// Shared with the registry's resolution (see `compile`).
    pub labels: Arc<[Label]>,
}

/// Address → identity, longest prefix wins; an address matching nothing is world.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct IpcacheEntry {
    pub net: IpNet,
    pub identity: Identity,
    /// The endpoint slot owning this exact address (used for anti-spoofing), if any.
    pub endpoint: Option<u32>,
}

/// One endpoint of the registry, with its compiled enforcement state. Its index in
/// [`Compiled::endpoints`] is its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledEndpoint {
    pub slot: u32,
    /// The registry endpoint's (shared).
    pub name: crate::api::model::Name,
    pub namespace: Option<crate::api::model::Name>,
    pub kind: EndpointKind,
    pub identity: Identity,
    /// Enforced on this host (its node is this host and it names an interface).
    pub local: bool,
    pub interface: Option<Interface>,
    pub addresses: Vec<IpAddr>,
    /// A miss in this direction is a drop (some selecting policy enabled default deny).
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
    /// Some policy selects this endpoint in this direction (informational).
    pub enforced_ingress: bool,
    pub enforced_egress: bool,
    /// Would-be drops pass and are reported as audit.
    pub audit: bool,
}

/// One policy entry, keyed as the kernel looks it up.
///
/// Key: (endpoint, direction, identity, proto, port/port_prefix). `identity` 0 is any
/// identity; `proto` 0 is any protocol (then port must be 0 with prefix 0);
/// `port_prefix` is how many leading bits of `port` must match (16 exact, 0 any).
/// For ICMP/ICMPv6 the port is the ICMP type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyEntry {
    pub endpoint: u32,
    pub direction: Direction,
    pub identity: Identity,
    pub proto: u8,
    pub port: u16,
    pub port_prefix: u8,
    pub verdict: EntryVerdict,
    /// Index into [`Compiled::rules`] of the rule that decided this entry.
    pub rule: u32,
}

/// A reference to the rule item behind an entry, for explanations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
///
/// Its strings are shared: a compile gives every rule item of every policy
/// one, and keeps those of an unchanged policy from the last compile.
pub struct RuleRef {
    pub file: Arc<Path>,
    pub kind: Arc<str>,
    /// `namespace/name` for namespaced policies, `name` otherwise.
    pub policy: Arc<str>,
    /// Field path of the item, e.g. `spec.ingress[0]` (of the rule, `spec`,
    /// for a staged rule's default deny).
    pub path: Arc<str>,
    /// The policy is staged: what this rule denies is reported, not enforced.
    pub staged: bool,
    /// Not an item: the default deny the (staged) rule brings to the endpoints
    /// it selects.
    pub default_deny: bool,
}

/// The whole compiled state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Compiled {
    pub identities: Vec<IdentityInfo>,
    pub ipcache: Vec<IpcacheEntry>,
    pub endpoints: Vec<CompiledEndpoint>,
    /// Sorted, no duplicate keys.
    pub entries: Vec<PolicyEntry>,
    pub rules: Vec<RuleRef>,
    /// The DNS rules of each endpoint (with entries) whose egress has
    /// `toPorts[].rules.dns`, by slot (`policy::fqdn`).
    pub dns: Vec<super::fqdn::EndpointDns>,
}
