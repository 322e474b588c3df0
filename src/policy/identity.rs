//! Security identities: the reserved numbers, label set → numeric identity for
//! workloads, and CIDR identities for prefixes named in policies (docs/policy.md,
//! "Identities").
//!
//! Owns numbering only; which endpoint or prefix gets which label set is decided by
//! `registry` and `policy::compile`. Pure, no I/O, no persisted state: numbers are a
//! function of the label sets, so two hosts given the same files agree, and a label
//! set keeps its number as long as it exists.
//!
//! Decisions recorded here:
//! - Workload identities are `256 + fnv1a64(canonical sorted labels) mod (2^24 - 256)`,
//!   i.e. in `[256, 2^24)`. On a collision the label sets are taken in the order of
//!   their canonical text and the later one probes linearly (+1, wrapping inside the
//!   range) to the next free number. So a number only depends on other label sets in
//!   the (rare) case of a hash collision.
//! - CIDR identities are `0x01000000 | n`, `n = 1, 2, ...` in the sorted order of the
//!   prefixes; their labels are `cidr:<prefix>` and `reserved:world` plus
//!   `reserved:world-ipv4` or `reserved:world-ipv6`, so the `world` entity and a
//!   `reserved:world` selector match them. (n depends on the set of prefixes in the
//!   policies; CIDR identities are node-local in Cilium too.)
//! - World is family specific in the ipcache: an IPv4 address matching no more
//!   specific prefix is `world-ipv4` (9), IPv6 is `world-ipv6` (10). The ipcache
//!   carries explicit `0.0.0.0/0 → 9` and `::/0 → 10` entries so the datapath never
//!   misses; identity 2 (`world`) is kept for a datapath that does miss. The entity
//!   `world` therefore means {2, 9, 10} and every CIDR identity; `world-ipv4` means
//!   {9} and the IPv4 CIDR identities; `world-ipv6` {10} and the IPv6 ones. Identities
//!   9 and 10 carry `reserved:world` besides their own label, so a `reserved:world`
//!   selector matches every address outside the registry.

use std::collections::{BTreeMap, HashSet};

use ipnet::IpNet;

use crate::api::model::{Entity, Label};
use crate::policy::labels;
use crate::policy::types::Identity;

pub const ANY: Identity = 0;
pub const HOST: Identity = 1;
pub const WORLD: Identity = 2;
pub const UNMANAGED: Identity = 3;
pub const HEALTH: Identity = 4;
pub const INIT: Identity = 5;
pub const REMOTE_NODE: Identity = 6;
pub const KUBE_APISERVER: Identity = 7;
pub const INGRESS: Identity = 8;
pub const WORLD_IPV4: Identity = 9;
pub const WORLD_IPV6: Identity = 10;

/// First and one-past-last workload identity.
pub const WORKLOAD_MIN: Identity = 256;
pub const WORKLOAD_END: Identity = 1 << 24;
/// Scope bit of node-local CIDR identities.
pub const CIDR_SCOPE: Identity = 0x0100_0000;

/// Every reserved identity with its `reserved:` label name.
pub const RESERVED: &[(Identity, &str)] = &[
    (HOST, "host"),
    (WORLD, "world"),
    (UNMANAGED, "unmanaged"),
    (HEALTH, "health"),
    (INIT, "init"),
    (REMOTE_NODE, "remote-node"),
    (KUBE_APISERVER, "kube-apiserver"),
    (INGRESS, "ingress"),
    (WORLD_IPV4, "world-ipv4"),
    (WORLD_IPV6, "world-ipv6"),
];

/// The name of a reserved identity, if `id` is one.
pub fn reserved_name(id: Identity) -> Option<&'static str> {
    RESERVED.iter().find(|(n, _)| *n == id).map(|(_, s)| *s)
}

/// True for `0x01000000 | n` identities.
pub fn is_cidr(id: Identity) -> bool {
    id & 0xFF00_0000 == CIDR_SCOPE
}

/// The identities of the cluster's reserved members (entity `cluster` without the
/// workloads: Cilium's entity `cluster`, docs/policy.md "Semantics").
pub const CLUSTER_RESERVED: &[Identity] = &[
    HOST,
    UNMANAGED,
    HEALTH,
    INIT,
    REMOTE_NODE,
    KUBE_APISERVER,
    INGRESS,
];

/// Reserved identities an entity stands for (without the CIDR or workload identities
/// that `world` / `cluster` also cover, and `None` for `all` = the wildcard 0).
pub fn entity_reserved(e: Entity) -> Option<Vec<Identity>> {
    Some(match e {
        Entity::All => return None,
        Entity::World => vec![WORLD, WORLD_IPV4, WORLD_IPV6],
        Entity::WorldIpv4 => vec![WORLD_IPV4],
        Entity::WorldIpv6 => vec![WORLD_IPV6],
        Entity::Host => vec![HOST],
        Entity::RemoteNode => vec![REMOTE_NODE],
        Entity::Cluster => CLUSTER_RESERVED.to_vec(),
        Entity::Init => vec![INIT],
        Entity::Health => vec![HEALTH],
        Entity::Unmanaged => vec![UNMANAGED],
        Entity::Ingress => vec![INGRESS],
        Entity::KubeApiserver => vec![KUBE_APISERVER],
        Entity::None => vec![],
    })
}

/// 64-bit FNV-1a: small, stable across Rust versions and platforms.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The preferred number of a workload label set (before collision probing).
pub fn preferred_workload_id(labels: &[Label]) -> Identity {
    preferred_id_of_text(&labels::canonical(labels))
}

/// [`preferred_workload_id`] of a canonical label text.
fn preferred_id_of_text(text: &str) -> Identity {
    let span = u64::from(WORKLOAD_END - WORKLOAD_MIN);
    WORKLOAD_MIN + (fnv1a64(text.as_bytes()) % span) as Identity
}

/// Assign numbers to distinct workload label sets (each sorted). Returns the
/// identity of each canonical label text.
pub fn allocate_workloads<'a>(
    sets: impl IntoIterator<Item = &'a [Label]>,
) -> BTreeMap<String, Identity> {
    let texts: Vec<String> = sets.into_iter().map(labels::canonical).collect();
    allocate_workload_texts(texts.iter().map(String::as_str))
}

/// [`allocate_workloads`] of label sets given by their canonical texts.
pub fn allocate_workload_texts<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, Identity> {
    let by_text: std::collections::BTreeSet<&str> = texts.into_iter().collect();
    let mut used: HashSet<Identity> = HashSet::new();
    let mut out = BTreeMap::new();
    for text in by_text {
        let mut id = preferred_id_of_text(text);
        while used.contains(&id) {
            id += 1;
            if id >= WORKLOAD_END {
                id = WORKLOAD_MIN;
            }
        }
        used.insert(id);
        out.insert(text.to_string(), id);
    }
    out
}

/// Number the CIDR prefixes (deduplicated, sorted): `0x01000000 | n`, n from 1.
pub fn allocate_cidrs(prefixes: impl IntoIterator<Item = IpNet>) -> BTreeMap<IpNet, Identity> {
    let mut v: Vec<IpNet> = prefixes.into_iter().map(|n| n.trunc()).collect();
    v.sort();
    v.dedup();
    v.into_iter()
        .enumerate()
        .map(|(i, n)| (n, CIDR_SCOPE | (i as Identity + 1)))
        .collect()
}

/// Labels of a CIDR identity: `cidr:<prefix>` (`:` written as `-` for IPv6, as
/// Cilium does), `reserved:world` and the family's world label.
pub fn cidr_labels(net: &IpNet) -> Vec<Label> {
    let text = net.to_string().replace(':', "-");
    let fam = match net {
        IpNet::V4(_) => "world-ipv4",
        IpNet::V6(_) => "world-ipv6",
    };
    vec![
        labels::label(labels::SOURCE_CIDR, &text, ""),
        labels::label(labels::SOURCE_RESERVED, "world", ""),
        labels::label(labels::SOURCE_RESERVED, fam, ""),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_are_stable_and_in_range() {
        let a = vec![labels::label("k8s", "app", "web")];
        let b = vec![labels::label("k8s", "app", "db")];
        let m1 = allocate_workloads([a.as_slice(), b.as_slice()]);
        let m2 = allocate_workloads([b.as_slice()]);
        let ida = m1[&labels::canonical(&a)];
        let idb = m1[&labels::canonical(&b)];
        assert_ne!(ida, idb);
        assert_eq!(
            idb,
            m2[&labels::canonical(&b)],
            "a set keeps its number when others change"
        );
        for id in [ida, idb] {
            assert!((WORKLOAD_MIN..WORKLOAD_END).contains(&id));
        }
        // Known value: catches an accidental change of the hash.
        assert_eq!(preferred_workload_id(&a), preferred_workload_id(&a.clone()));
    }

    #[test]
    fn collisions_probe_deterministically() {
        // Many sets: all distinct numbers.
        let sets: Vec<Vec<Label>> = (0..5000)
            .map(|i| vec![labels::label("k8s", "app", &format!("a{i}"))])
            .collect();
        let m = allocate_workloads(sets.iter().map(|s| s.as_slice()));
        let ids: HashSet<_> = m.values().collect();
        assert_eq!(ids.len(), 5000);
    }

    #[test]
    fn cidr_ids() {
        let m = allocate_cidrs([
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&"10.0.0.0/8".parse::<IpNet>().unwrap()], 0x0100_0001);
        assert!(is_cidr(0x0100_0002));
        assert!(!is_cidr(300));
    }
}
