//! The lookup contract shared with the kernel: how one flow is decided against the
//! compiled entries of one endpoint and direction, and how an address resolves to
//! an identity through the ipcache. `trace` decides flows only through this module;
//! the BPF datapath implements exactly the same steps (keep them in sync).
//!
//! Entry lookup for endpoint E, direction D, remote identity R, protocol P, port N
//! (for ICMP/ICMPv6 N is the ICMP type):
//! 1. L1 = the longest matching entry among entries with identity R, L2 = the
//!    longest among entries with identity 0; both match E and D exactly. "Longest"
//!    orders protocol before port: an entry with protocol 0 (any) is the shortest,
//!    then protocol P with port prefix 0, then longer port prefixes up to 16.
//! 2. If L1 or L2 is a Deny → denied (by L1's rule if L1 denies, else L2's).
//! 3. Else if L1 (else L2) is a StagedDeny or AllowStagedDeny: when L1 or L2 is
//!    an Allow or AllowStagedDeny, or E is not default-deny in D, allowed as
//!    audit by that staged rule; otherwise denied by default deny.
//! 4. Else if L1 or L2 is an Allow → allowed (by L1's rule if L1 allows, else L2's).
//! 5. Else if E is not default-deny in D and L1 (else L2) is a StagedDefaultDeny
//!    → allowed as audit by that staged rule's default deny.
//! 6. Else denied by default deny if E is default-deny in D, otherwise allowed.
//!
//! Staged policies reach the lookup only through those verdicts (compile folds
//! them in: `compile::staged`): the flow gets the enforced policies' verdict,
//! and steps 3 and 5 say when a staged one would deny it.
//!
//! The ipcache is longest-prefix-match; it always holds `0.0.0.0/0` and `::/0`
//! (world-ipv4 / world-ipv6) so a lookup never misses, but a miss is world (2).
//!
//! Pure; no I/O.

use std::net::IpAddr;

use serde::Serialize;

use super::types::{Compiled, Direction, EntryVerdict, Identity, PolicyEntry};
use crate::policy::identity;

/// Does this entry's (proto, port/prefix) cover the packet's proto and port?
pub fn entry_covers(e: &PolicyEntry, proto: u8, port: u16) -> bool {
    if e.proto == 0 {
        return true;
    }
    if e.proto != proto {
        return false;
    }
    prefix_covers(e.port, e.port_prefix, port)
}

/// Does the port block `base/prefix` contain `port`?
pub fn prefix_covers(base: u16, prefix: u8, port: u16) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask: u16 = if prefix >= 16 {
        0xFFFF
    } else {
        !(0xFFFFu16 >> prefix)
    };
    (port & mask) == (base & mask)
}

/// The LPM length of an entry's protocol/port part (0 = any protocol, 8 = protocol
/// with any port, 8 + n = protocol and n port bits), as the kernel's trie sees it.
pub fn specificity(e: &PolicyEntry) -> u8 {
    if e.proto == 0 {
        0
    } else {
        8 + e.port_prefix
    }
}

/// The entries of one endpoint and direction (a slice of the sorted entries).
pub fn entries_for(c: &Compiled, slot: u32, dir: Direction) -> &[PolicyEntry] {
    let lo = c
        .entries
        .partition_point(|e| (e.endpoint, e.direction) < (slot, dir));
    let hi = c
        .entries
        .partition_point(|e| (e.endpoint, e.direction) <= (slot, dir));
    &c.entries[lo..hi]
}

/// The longest entry with exactly `id` in `entries` (one endpoint and direction)
/// that covers the packet.
pub fn longest_match(
    entries: &[PolicyEntry],
    id: Identity,
    proto: u8,
    port: u16,
) -> Option<&PolicyEntry> {
    let lo = entries.partition_point(|e| e.identity < id);
    let hi = entries.partition_point(|e| e.identity <= id);
    entries[lo..hi]
        .iter()
        .filter(|e| entry_covers(e, proto, port))
        .max_by_key(|e| specificity(e))
}

/// How a direction was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// An allow entry matched and no deny did.
    AllowedByEntry,
    /// A deny entry matched.
    DeniedByEntry,
    /// Nothing matched and the endpoint is default-deny in this direction.
    DefaultDeny,
    /// Nothing matched; no policy selects the endpoint in this direction.
    NotEnforced,
    /// Nothing matched; policies select it but none enables default deny.
    NoDefaultDeny,
    /// Allowed by the enforced policies; a staged policy's deny rule would deny
    /// it: passes, reported as audit.
    StagedDeny,
    /// Allowed by the enforced policies (nothing matched, no default deny); the
    /// default deny of a staged policy would deny it: passes, reported as audit.
    StagedDefaultDeny,
}

impl Outcome {
    /// The flow passes (staged denials pass).
    pub fn allowed(self) -> bool {
        !matches!(self, Outcome::DeniedByEntry | Outcome::DefaultDeny)
    }

    /// A staged policy would deny the flow once enforced.
    pub fn staged(self) -> bool {
        matches!(self, Outcome::StagedDeny | Outcome::StagedDefaultDeny)
    }
}

/// The result of the two lookups for one endpoint and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub outcome: Outcome,
    /// The entry that decided (for `AllowedByEntry` / `DeniedByEntry`).
    pub entry: Option<&'a PolicyEntry>,
    pub l1: Option<&'a PolicyEntry>,
    pub l2: Option<&'a PolicyEntry>,
}

impl Decision<'_> {
    pub fn allowed(&self) -> bool {
        self.outcome.allowed()
    }
}

/// Decide a flow at endpoint `slot` in direction `dir` from remote identity
/// `remote`, exactly as the datapath does (see the module doc).
pub fn decide(
    c: &Compiled,
    slot: u32,
    dir: Direction,
    remote: Identity,
    proto: u8,
    port: u16,
) -> Decision<'_> {
    let entries = entries_for(c, slot, dir);
    let l1 = if remote == identity::ANY {
        None
    } else {
        longest_match(entries, remote, proto, port)
    };
    let l2 = longest_match(entries, identity::ANY, proto, port);
    let is =
        |e: Option<&PolicyEntry>, v: &[EntryVerdict]| e.is_some_and(|e| v.contains(&e.verdict));
    let first = |v: &[EntryVerdict]| {
        if is(l1, v) {
            l1
        } else if is(l2, v) {
            l2
        } else {
            None
        }
    };
    use EntryVerdict::{Allow, AllowStagedDeny, Deny, StagedDefaultDeny, StagedDeny};
    let ep = c.endpoints.get(slot as usize);
    let (dd, enforced) = match (ep, dir) {
        (Some(ep), Direction::Ingress) => (ep.default_deny_ingress, ep.enforced_ingress),
        (Some(ep), Direction::Egress) => (ep.default_deny_egress, ep.enforced_egress),
        (None, _) => (false, false),
    };
    let enforced_allow = is(l1, &[Allow, AllowStagedDeny]) || is(l2, &[Allow, AllowStagedDeny]);
    let (outcome, entry) = if let Some(d) = first(&[Deny]) {
        (Outcome::DeniedByEntry, Some(d))
    } else if let Some(s) = first(&[StagedDeny, AllowStagedDeny]) {
        if enforced_allow || !dd {
            (Outcome::StagedDeny, Some(s))
        } else {
            (Outcome::DefaultDeny, None)
        }
    } else if let Some(a) = first(&[Allow]) {
        (Outcome::AllowedByEntry, Some(a))
    } else if dd {
        (Outcome::DefaultDeny, None)
    } else if let Some(s) = first(&[StagedDefaultDeny]) {
        (Outcome::StagedDefaultDeny, Some(s))
    } else if enforced {
        (Outcome::NoDefaultDeny, None)
    } else {
        (Outcome::NotEnforced, None)
    };
    Decision {
        outcome,
        entry,
        l1,
        l2,
    }
}

impl Compiled {
    /// The identity of an address: longest matching ipcache prefix; world (2) on a
    /// miss (the ipcache normally has `/0` entries, so misses do not happen).
    pub fn lookup_ip(&self, addr: IpAddr) -> Identity {
        self.lookup_ip_entry(addr)
            .map(|e| e.identity)
            .unwrap_or(identity::WORLD)
    }

    /// The longest ipcache entry covering `addr`.
    pub fn lookup_ip_entry(&self, addr: IpAddr) -> Option<&super::types::IpcacheEntry> {
        self.ipcache
            .iter()
            .filter(|e| e.net.contains(&addr))
            .max_by_key(|e| e.net.prefix_len())
    }

    /// The endpoint slot whose registered address is exactly `addr`.
    pub fn endpoint_by_ip(&self, addr: IpAddr) -> Option<u32> {
        self.ipcache
            .iter()
            .find(|e| e.net.prefix_len() == e.net.max_prefix_len() && e.net.addr() == addr)
            .and_then(|e| e.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::EndpointKind;
    use crate::policy::types::{proto, CompiledEndpoint};

    fn ent(id: Identity, p: u8, port: u16, prefix: u8, v: EntryVerdict, rule: u32) -> PolicyEntry {
        PolicyEntry {
            endpoint: 0,
            direction: Direction::Ingress,
            identity: id,
            proto: p,
            port,
            port_prefix: prefix,
            verdict: v,
            rule,
        }
    }

    fn compiled(mut entries: Vec<PolicyEntry>, dd: bool) -> Compiled {
        entries.sort();
        Compiled {
            endpoints: vec![CompiledEndpoint {
                slot: 0,
                name: "x".into(),
                namespace: None,
                kind: EndpointKind::Workload,
                identity: 300,
                local: true,
                interface: None,
                addresses: vec![],
                default_deny_ingress: dd,
                default_deny_egress: false,
                enforced_ingress: dd,
                enforced_egress: false,
                audit: false,
            }],
            entries,
            ..Default::default()
        }
    }

    #[test]
    fn prefix_matching() {
        assert!(prefix_covers(80, 12, 95));
        assert!(!prefix_covers(80, 12, 96));
        assert!(prefix_covers(444, 16, 444));
        assert!(prefix_covers(0, 0, 12345));
    }

    #[test]
    fn longest_wins_within_identity_and_deny_wins_across() {
        use EntryVerdict::*;
        let c = compiled(
            vec![
                ent(500, 0, 0, 0, Allow, 1),
                ent(500, proto::TCP, 80, 16, Deny, 2),
                ent(0, proto::TCP, 443, 16, Deny, 3),
            ],
            true,
        );
        assert_eq!(
            decide(&c, 0, Direction::Ingress, 500, proto::TCP, 22).outcome,
            Outcome::AllowedByEntry
        );
        let d = decide(&c, 0, Direction::Ingress, 500, proto::TCP, 80);
        assert_eq!(d.outcome, Outcome::DeniedByEntry);
        assert_eq!(d.entry.unwrap().rule, 2);
        let d = decide(&c, 0, Direction::Ingress, 500, proto::TCP, 443);
        assert_eq!(
            (d.outcome, d.entry.unwrap().rule),
            (Outcome::DeniedByEntry, 3)
        );
        assert_eq!(
            decide(&c, 0, Direction::Ingress, 501, proto::TCP, 22).outcome,
            Outcome::DefaultDeny
        );
        assert_eq!(
            decide(&c, 0, Direction::Egress, 501, proto::TCP, 22).outcome,
            Outcome::NotEnforced
        );
    }
}
