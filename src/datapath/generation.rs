//! The content of one generation (ipcache, endpoint table, policy trie and
//! exact policy hash) as the raw
//! key/value bytes the kernel maps hold, and the difference between two such
//! contents. The kernel datapath keeps one [`Contents`] per generation as a
//! shadow of its inner maps, so an apply writes only the keys that changed.
//! Pure: no syscalls, unit-tested without root.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::mem::size_of;

use super::layout::{
    self, EndpointValue, IpcacheKey, IpcacheValue, KernelSlots, PolicyKey, PolicyValue,
};
use super::{Attachment, DatapathError};
use crate::hash::FastMap;
use crate::policy::types::{Compiled, IpcacheEntry};

pub const IPCACHE_KEY: usize = size_of::<IpcacheKey>();
pub const IPCACHE_VALUE: usize = size_of::<IpcacheValue>();
pub const ENDPOINT_KEY: usize = 4;
pub const ENDPOINT_VALUE: usize = size_of::<EndpointValue>();
pub const POLICY_KEY: usize = size_of::<PolicyKey>();
pub const POLICY_VALUE: usize = size_of::<PolicyValue>();

/// One map's content: key bytes → value bytes. With the fast hasher: a
/// fleet's ipcache is 200,000 keys built and compared on every change.
pub type Table<const K: usize, const V: usize> = FastMap<[u8; K], [u8; V]>;

/// Everything one generation holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    pub ipcache: Table<IPCACHE_KEY, IPCACHE_VALUE>,
    pub endpoints: Table<ENDPOINT_KEY, ENDPOINT_VALUE>,
    /// The policy entries with a prefix (port ranges, any port, any
    /// protocol): the LPM trie netpol_policy_v1.
    pub policy: Table<POLICY_KEY, POLICY_VALUE>,
    /// The policy entries with every key bit significant (one port, or one
    /// ICMP type): the hash netpol_policy_exact_v1, looked up first (a hit
    /// there is the longest match; netpol_abi.h, struct np_policy_key).
    pub policy_exact: Table<POLICY_KEY, POLICY_VALUE>,
}

/// One ipcache entry as the kernel map holds it.
fn ipcache_entry(
    e: &IpcacheEntry,
    slots: &KernelSlots,
) -> ([u8; IPCACHE_KEY], [u8; IPCACHE_VALUE]) {
    let k = layout::ipcache_key(&e.net);
    let v = layout::ipcache_value(e, slots);
    (arr(layout::bytes_of(&k)), arr(layout::bytes_of(&v)))
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(b);
    out
}

impl Contents {
    /// What a generation must hold for `state` enforced on `attachments`
    /// (the same entries a full fill writes; a later duplicate key wins).
    pub fn build(
        state: &Compiled,
        attachments: &[Attachment],
        slots: &KernelSlots,
    ) -> Result<Contents, DatapathError> {
        let mut c = Contents::default();
        c.ipcache.reserve(state.ipcache.len());
        for e in &state.ipcache {
            let (k, v) = ipcache_entry(e, slots);
            c.ipcache.insert(k, v);
        }
        c.build_local(state, attachments, slots)?;
        Ok(c)
    }

    /// [`Contents::build`] of `state` from `prev`, the contents built for a
    /// state whose ipcache was `prev_ipcache` with the slots `prev_slots`:
    /// `prev`'s ipcache table with what differs between the two ipcaches
    /// written over it (both sorted by prefix, one entry per prefix, as a
    /// compile gives them; else it is built whole), the endpoint and policy
    /// tables (this host's endpoints') built. A registry change among
    /// 200,000 prefixes costs a walk of both lists, not 200,000 inserts.
    pub fn build_from(
        prev: &Contents,
        prev_ipcache: &[IpcacheEntry],
        prev_slots: &KernelSlots,
        state: &Compiled,
        attachments: &[Attachment],
        slots: &KernelSlots,
    ) -> Result<Contents, DatapathError> {
        let sorted = |v: &[IpcacheEntry]| v.windows(2).all(|w| w[0].net < w[1].net);
        if !sorted(prev_ipcache)
            || !sorted(&state.ipcache)
            || prev.ipcache.len() != prev_ipcache.len()
        {
            return Contents::build(state, attachments, slots);
        }
        let mut c = Contents {
            ipcache: prev.ipcache.clone(),
            ..Contents::default()
        };
        let (mut old, mut new) = (
            prev_ipcache.iter().peekable(),
            state.ipcache.iter().peekable(),
        );
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(o), Some(n)) => o.net.cmp(&n.net),
            };
            match order {
                // Gone from the ipcache.
                Ordering::Less => {
                    let o = old.next().expect("peeked");
                    c.ipcache.remove(&ipcache_entry(o, prev_slots).0);
                }
                // New in it.
                Ordering::Greater => {
                    let (k, v) = ipcache_entry(new.next().expect("peeked"), slots);
                    c.ipcache.insert(k, v);
                }
                // In both: written when its value changed.
                Ordering::Equal => {
                    let (o, n) = (old.next().expect("peeked"), new.next().expect("peeked"));
                    let (k, v) = ipcache_entry(n, slots);
                    if ipcache_entry(o, prev_slots).1 != v {
                        c.ipcache.insert(k, v);
                    }
                }
            }
        }
        c.build_local(state, attachments, slots)?;
        Ok(c)
    }

    /// The endpoint table and the policy maps of `state` on `attachments`.
    fn build_local(
        &mut self,
        state: &Compiled,
        attachments: &[Attachment],
        slots: &KernelSlots,
    ) -> Result<(), DatapathError> {
        let c = self;
        let unknown = |a: &Attachment| DatapathError::UnknownSlot {
            ifindex: a.ifindex,
            slot: a.slot,
            endpoints: state.endpoints.len(),
        };
        for a in attachments {
            let kslot = slots.kernel(a.slot).ok_or_else(|| unknown(a))?;
            let v = layout::endpoint_value(state, a.slot, kslot).ok_or_else(|| unknown(a))?;
            c.endpoints
                .insert(a.ifindex.to_ne_bytes(), arr(layout::bytes_of(&v)));
        }
        for e in layout::installed_entries(state, attachments) {
            let Some(kslot) = slots.kernel(e.endpoint) else {
                continue;
            };
            let k = layout::policy_key_in(e, kslot);
            let v = layout::policy_value(e);
            let table = if k.prefixlen == layout::POLICY_FULL_PREFIX {
                &mut c.policy_exact
            } else {
                &mut c.policy
            };
            table.insert(arr(layout::bytes_of(&k)), arr(layout::bytes_of(&v)));
        }
        Ok(())
    }

    /// Marks every endpoint value with the generation number these contents
    /// are installed as (its low 32 bits; `struct np_endpoint_value`): the
    /// number a packet caches in a conntrack entry comes from the maps it
    /// used, never from a state word that may be half written.
    pub fn stamp(&mut self, generation: u64) {
        let at = std::mem::offset_of!(EndpointValue, generation);
        for v in self.endpoints.values_mut() {
            v[at..at + 4].copy_from_slice(&(generation as u32).to_ne_bytes());
        }
    }

    /// Number of writes (deletes + upserts) turning `self` into `want`.
    pub fn changes_to(&self, want: &Contents) -> usize {
        fn n<K: Hash + Eq + Ord + Copy, V: PartialEq + Copy, S: BuildHasher>(
            a: &HashMap<K, V, S>,
            b: &HashMap<K, V, S>,
        ) -> usize {
            let (d, u) = diff(a, b);
            d.len() + u.len()
        }
        n(&self.ipcache, &want.ipcache)
            + n(&self.endpoints, &want.endpoints)
            + n(&self.policy, &want.policy)
            + n(&self.policy_exact, &want.policy_exact)
    }
}

/// Keys to delete (in `old`, not in `new`) and entries to write (new, or
/// with another value), each sorted so the kernel sees a deterministic order.
pub fn diff<K: Hash + Eq + Ord + Copy, V: PartialEq + Copy, S: BuildHasher>(
    old: &HashMap<K, V, S>,
    new: &HashMap<K, V, S>,
) -> (Vec<K>, Vec<(K, V)>) {
    let mut deletes: Vec<K> = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    let mut upserts: Vec<(K, V)> = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    deletes.sort();
    upserts.sort_by_key(|e| e.0);
    (deletes, upserts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_deletes_missing_and_writes_new_or_changed() {
        let old: HashMap<u8, u8> = [(1, 1), (2, 2), (3, 3)].into_iter().collect();
        let new: HashMap<u8, u8> = [(2, 2), (3, 4), (5, 5)].into_iter().collect();
        let (del, up) = diff(&old, &new);
        assert_eq!(del, vec![1]);
        assert_eq!(up, vec![(3, 4), (5, 5)]);
        assert_eq!(diff(&new, &new), (vec![], vec![]));
    }

    /// Over random sequences of ipcaches (prefixes of both families coming,
    /// going and changing identity or endpoint) and kernel slots (endpoints
    /// attached and detached), contents built from the last ones are the
    /// contents built whole.
    #[test]
    fn contents_built_from_the_last_are_the_contents_built_whole() {
        use crate::datapath::Attachment;
        use crate::policy::types::IpcacheEntry;
        let mut rand = crate::hash::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..50 {
            let mut prev: Option<(Contents, Vec<IpcacheEntry>, KernelSlots)> = None;
            let mut slots = KernelSlots::default();
            for step in 0..30 {
                let mut ipcache: Vec<IpcacheEntry> = (0..rand(40))
                    .map(|_| {
                        let k = rand(64);
                        let net: ipnet::IpNet = match rand(3) {
                            0 => format!("fd00::{k:x}/128"),
                            1 => format!("10.{k}.0.0/16"),
                            _ => format!("10.0.0.{k}/32"),
                        }
                        .parse()
                        .unwrap();
                        IpcacheEntry {
                            net,
                            identity: 256 + rand(3) as u32,
                            endpoint: (rand(2) == 0).then(|| rand(6) as u32),
                        }
                    })
                    .collect();
                ipcache.sort_by_key(|e| e.net);
                ipcache.dedup_by_key(|e| e.net);
                let state = Compiled {
                    ipcache,
                    ..Compiled::default()
                };
                if rand(3) == 0 {
                    let atts: Vec<Attachment> = (0..6)
                        .filter(|_| rand(2) == 0)
                        .map(|slot| Attachment {
                            slot,
                            ifindex: 100 + slot,
                        })
                        .collect();
                    slots = KernelSlots::assign(&slots, &atts);
                }
                let whole = Contents::build(&state, &[], &slots).unwrap();
                if let Some((c, ipc, s)) = &prev {
                    let from = Contents::build_from(c, ipc, s, &state, &[], &slots).unwrap();
                    assert_eq!(from, whole, "step {step}");
                }
                prev = Some((whole, state.ipcache.clone(), slots.clone()));
            }
        }
    }

    #[test]
    fn empty_state_builds_empty_contents() {
        let c = Contents::build(&Compiled::default(), &[], &KernelSlots::default()).unwrap();
        assert_eq!(c, Contents::default());
        assert_eq!(c.changes_to(&c), 0);
    }

    #[test]
    fn stamp_writes_the_generation_into_every_endpoint_value() {
        let mut c = Contents::default();
        c.endpoints
            .insert(1u32.to_ne_bytes(), [0xaa; ENDPOINT_VALUE]);
        c.stamp(0x1_0000_0007);
        let v = c.endpoints[&1u32.to_ne_bytes()];
        assert_eq!(&v[..12], &[0xaa; 12], "slot, identity, flags untouched");
        assert_eq!(&v[12..], &7u32.to_ne_bytes(), "the low 32 bits");
    }

    #[test]
    fn full_prefix_entries_go_to_the_exact_table_and_prefixes_to_the_trie() {
        use crate::api::model::EndpointKind;
        use crate::policy::types::{CompiledEndpoint, Direction, EntryVerdict, PolicyEntry};
        let mut c = Compiled::default();
        c.endpoints.push(CompiledEndpoint {
            slot: 0,
            name: "a".into(),
            namespace: None,
            kind: EndpointKind::Workload,
            identity: 1000,
            local: true,
            interface: None,
            addresses: vec![],
            default_deny_ingress: false,
            default_deny_egress: true,
            enforced_ingress: true,
            enforced_egress: true,
            audit: false,
        });
        let entry = |proto, port, port_prefix, verdict, rule| PolicyEntry {
            endpoint: 0,
            direction: Direction::Egress,
            identity: 1001,
            proto,
            port,
            port_prefix,
            verdict,
            rule,
        };
        // One port inside a range, the range, any TCP port, any protocol.
        c.entries = vec![
            entry(6, 1001, 16, EntryVerdict::Deny, 0),
            entry(6, 1000, 8, EntryVerdict::Allow, 1),
            entry(6, 0, 0, EntryVerdict::Allow, 2),
            entry(0, 0, 0, EntryVerdict::Allow, 3),
        ];
        let att = [Attachment {
            slot: 0,
            ifindex: 7,
        }];
        let slots = KernelSlots::assign(&KernelSlots::default(), &att);
        let got = Contents::build(&c, &att, &slots).unwrap();
        let key = |e: &PolicyEntry| arr(layout::bytes_of(&layout::policy_key_in(e, 0)));
        assert_eq!(got.policy_exact.len(), 1);
        assert!(got.policy_exact.contains_key(&key(&c.entries[0])));
        assert_eq!(got.policy.len(), 3);
        for e in &c.entries[1..] {
            assert!(got.policy.contains_key(&key(e)), "{e:?} in the trie");
        }
        let mut moved = got.clone();
        moved.policy_exact.clear();
        assert_eq!(
            moved.changes_to(&got),
            1,
            "the exact table counts in the diff"
        );
    }

    #[test]
    fn attachment_of_a_missing_slot_is_an_error() {
        let att = [Attachment {
            slot: 3,
            ifindex: 7,
        }];
        let slots = KernelSlots::assign(&KernelSlots::default(), &att);
        let e = Contents::build(&Compiled::default(), &att, &slots).unwrap_err();
        assert!(e.to_string().contains("slot 3"), "{e}");
    }
}
