//! Encoding of the compiled state into the kernel's map keys and values, using
//! the layouts the skeleton generated from bpf/lib/netpol_maps.h (never
//! hand-mirrored), plus the capacity check that runs before anything touches
//! the kernel. Pure: no syscalls, unit-tested without root.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::skel::types;
use super::{Attachment, DatapathError, DatapathSettings};
use crate::api::model::EndpointKind;
use crate::policy::types::{Compiled, Direction, EntryVerdict, IpcacheEntry, PolicyEntry};

pub type IpcacheKey = types::np_ipcache_key;
pub type IpcacheValue = types::np_ipcache_value;
pub type EndpointValue = types::np_endpoint_value;
pub type PolicyKey = types::np_policy_key;
pub type PolicyValue = types::np_policy_value;
pub type StateValue = types::np_state;
pub type CtKey = types::np_ct_key;
pub type CtValue = types::np_ct_value;
pub type FailsafeKey = types::np_failsafe_key;
pub type CountersValue = types::np_counters;
pub type EventRecord = types::np_event;

// The sizes below are the C header's; a change to a layout must come with a
// new map version (netpol_*_v2) and a change here.
const _: () = assert!(size_of::<StateValue>() == 16);
const _: () = assert!(size_of::<IpcacheKey>() == 24);
const _: () = assert!(size_of::<IpcacheValue>() == 8);
const _: () = assert!(size_of::<EndpointValue>() == 16);
const _: () = assert!(size_of::<PolicyKey>() == 16);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<CtKey>() == 44);
const _: () = assert!(size_of::<CtValue>() == 16);
const _: () = assert!(size_of::<types::np_frag_key>() == 40);
const _: () = assert!(size_of::<types::np_frag_value>() == 8);
const _: () = assert!(size_of::<FailsafeKey>() == 4);
const _: () = assert!(size_of::<CountersValue>() == 48);
const _: () = assert!(size_of::<EventRecord>() == 72);
const _: () = assert!(size_of::<types::np_ratelimit>() == 16);

/// Layout version stored in the state map; an adopting process refuses others.
pub const LAYOUT_VERSION: u32 = 1;

/// Bits of the ipcache key always matched (family + padding).
pub const IPCACHE_STATIC_PREFIX: u32 = 32;
/// Bits of the policy key always matched (slot + identity + direction).
pub const POLICY_STATIC_PREFIX: u32 = 72;
/// All bits of the policy key (+ protocol + port).
pub const POLICY_FULL_PREFIX: u32 = 96;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const EP_F_HOST: u32 = 0x1;
pub const EP_F_DENY_INGRESS: u32 = 0x2;
pub const EP_F_DENY_EGRESS: u32 = 0x4;
pub const EP_F_AUDIT: u32 = 0x8;

pub const SLOT_NONE: u32 = u32::MAX;
pub const RULE_NONE: u32 = u32::MAX;

pub const VERDICT_ALLOW: u8 = EntryVerdict::Allow as u8;
pub const VERDICT_DENY: u8 = EntryVerdict::Deny as u8;

/// The raw bytes of a skeleton layout type, as the map syscalls want them.
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: every T used here is a #[repr(C)] skeleton type made only of
    // integers and byte arrays with explicit padding fields (sizes asserted
    // above), so all its bytes are initialised and any view of them is valid.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Reads a skeleton layout type back from map bytes; `None` if the size differs.
pub fn from_bytes<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: sizes are equal (checked) and T is plain data: every bit
    // pattern is a valid value.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    Some(v)
}

/// 16 address bytes as the datapath stores them (IPv4 in the first four).
pub fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

/// The address encoded in 16 datapath bytes.
pub fn addr_from_bytes(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

/// ipcache key of a prefix (host bits cleared).
pub fn ipcache_key(net: &IpNet) -> IpcacheKey {
    let net = net.trunc();
    let (family, addr) = addr_bytes(net.addr());
    IpcacheKey {
        prefixlen: IPCACHE_STATIC_PREFIX + u32::from(net.prefix_len()),
        family,
        pad: [0; 3],
        addr,
    }
}

/// ipcache key for looking up one address (full prefix).
pub fn ipcache_lookup_key(addr: IpAddr) -> IpcacheKey {
    ipcache_key(&IpNet::from(addr))
}

pub fn ipcache_value(e: &IpcacheEntry) -> IpcacheValue {
    IpcacheValue {
        identity: e.identity,
        endpoint: e.endpoint.unwrap_or(SLOT_NONE),
    }
}

/// The port with the bits past `prefix` cleared (prefix clamped to 16).
pub fn masked_port(port: u16, prefix: u8) -> u16 {
    match prefix.min(16) {
        0 => 0,
        n => port & (u16::MAX << (16 - u32::from(n))),
    }
}

/// LPM prefix length of a policy entry: the static part, then 8 bits of
/// protocol unless it is the any-protocol entry, then `port_prefix` port bits.
pub fn policy_prefixlen(proto: u8, port_prefix: u8) -> u32 {
    if proto == 0 {
        POLICY_STATIC_PREFIX
    } else {
        POLICY_STATIC_PREFIX + 8 + u32::from(port_prefix.min(16))
    }
}

pub fn policy_key(e: &PolicyEntry) -> PolicyKey {
    let (port, prefix) = if e.proto == 0 {
        (0, 0)
    } else {
        (e.port, e.port_prefix)
    };
    PolicyKey {
        prefixlen: policy_prefixlen(e.proto, prefix),
        slot: e.endpoint,
        identity: e.identity,
        direction: e.direction as u8,
        proto: e.proto,
        port: masked_port(port, prefix).to_be(),
    }
}

/// The key a packet is looked up with (all bits significant).
pub fn policy_lookup_key(
    slot: u32,
    dir: Direction,
    identity: u32,
    proto: u8,
    port: u16,
) -> PolicyKey {
    PolicyKey {
        prefixlen: POLICY_FULL_PREFIX,
        slot,
        identity,
        direction: dir as u8,
        proto,
        port: port.to_be(),
    }
}

pub fn policy_value(e: &PolicyEntry) -> PolicyValue {
    PolicyValue {
        verdict: e.verdict as u8,
        reserved0: 0,
        reserved1: 0,
        rule: e.rule,
    }
}

/// Endpoint table value of the endpoint in `slot` of `state`.
pub fn endpoint_value(state: &Compiled, slot: u32) -> Option<EndpointValue> {
    let ep = state.endpoints.get(slot as usize)?;
    let mut flags = 0;
    if ep.kind == EndpointKind::Host {
        flags |= EP_F_HOST;
    }
    if ep.default_deny_ingress {
        flags |= EP_F_DENY_INGRESS;
    }
    if ep.default_deny_egress {
        flags |= EP_F_DENY_EGRESS;
    }
    if ep.audit {
        flags |= EP_F_AUDIT;
    }
    Some(EndpointValue {
        slot,
        identity: ep.identity,
        flags,
        reserved: 0,
    })
}

/// The policy entries a generation installs: those of attached endpoints
/// (entries of endpoints enforced elsewhere are of no use to this kernel).
pub fn installed_entries<'a>(
    state: &'a Compiled,
    attachments: &[Attachment],
) -> impl Iterator<Item = &'a PolicyEntry> + 'a {
    let slots: BTreeSet<u32> = attachments.iter().map(|a| a.slot).collect();
    state
        .entries
        .iter()
        .filter(move |e| slots.contains(&e.endpoint))
}

/// How many entries one generation needs in each map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ipcache: usize,
    pub endpoints: usize,
    pub policy: usize,
}

/// Checks `state` and `attachments` against the map sizes before anything is
/// written: a state that does not fit is refused whole.
pub fn check_capacity(
    state: &Compiled,
    attachments: &[Attachment],
    settings: &DatapathSettings,
) -> Result<Counts, DatapathError> {
    let ipcache: BTreeSet<(u8, u32, [u8; 16])> = state
        .ipcache
        .iter()
        .map(|e| {
            let k = ipcache_key(&e.net);
            (k.family, k.prefixlen, k.addr)
        })
        .collect();
    let endpoints: BTreeSet<u32> = attachments.iter().map(|a| a.ifindex).collect();
    let policy = installed_entries(state, attachments).count();
    let counts = Counts {
        ipcache: ipcache.len(),
        endpoints: endpoints.len(),
        policy,
    };
    let checks = [
        (
            "ipcache (ipcache_max_entries)",
            counts.ipcache,
            settings.ipcache_max_entries,
        ),
        (
            "endpoint table (endpoint_max_entries)",
            counts.endpoints,
            settings.endpoint_max_entries,
        ),
        (
            "policy map (policy_max_entries)",
            counts.policy,
            settings.policy_max_entries,
        ),
    ];
    for (map, needed, max) in checks {
        if needed > max as usize {
            return Err(DatapathError::Capacity {
                map,
                needed,
                max: max as usize,
            });
        }
    }
    for a in attachments {
        if a.slot as usize >= state.endpoints.len() {
            return Err(DatapathError::Other(format!(
                "attachment of ifindex {} names endpoint slot {} but the state has {} endpoints",
                a.ifindex,
                a.slot,
                state.endpoints.len()
            )));
        }
        if a.slot >= settings.endpoint_max_entries {
            return Err(DatapathError::Capacity {
                map: "counters (endpoint_max_entries, by slot)",
                needed: a.slot as usize + 1,
                max: settings.endpoint_max_entries as usize,
            });
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::types::{CompiledEndpoint, IpcacheEntry};

    fn entry(proto: u8, port: u16, port_prefix: u8) -> PolicyEntry {
        PolicyEntry {
            endpoint: 3,
            direction: Direction::Egress,
            identity: 300,
            proto,
            port,
            port_prefix,
            verdict: EntryVerdict::Allow,
            rule: 7,
        }
    }

    #[test]
    fn any_protocol_entry_is_the_shortest_prefix_and_ignores_port() {
        let k = policy_key(&entry(0, 80, 16));
        assert_eq!(k.prefixlen, 72);
        assert_eq!(k.proto, 0);
        assert_eq!(k.port, 0);
        assert_eq!((k.slot, k.identity, k.direction), (3, 300, 1));
    }

    #[test]
    fn protocol_entry_adds_eight_bits_then_port_bits() {
        assert_eq!(policy_key(&entry(6, 0, 0)).prefixlen, 80);
        let k = policy_key(&entry(6, 443, 16));
        assert_eq!(k.prefixlen, 96);
        assert_eq!(u16::from_be(k.port), 443);
        // 1024-2047 is 1024/6: six port bits.
        let k = policy_key(&entry(17, 1024, 6));
        assert_eq!(k.prefixlen, 86);
        assert_eq!(u16::from_be(k.port), 1024);
    }

    #[test]
    fn port_bits_past_the_prefix_are_cleared_in_network_order() {
        let k = policy_key(&entry(6, 0x1234, 8));
        assert_eq!(k.port, 0x1200u16.to_be());
        assert_eq!(bytes_of(&k)[14..16], [0x12, 0x00]);
        assert_eq!(masked_port(0xffff, 1), 0x8000);
        assert_eq!(masked_port(0xffff, 0), 0);
        assert_eq!(masked_port(0xffff, 16), 0xffff);
        assert_eq!(masked_port(0xffff, 20), 0xffff);
    }

    #[test]
    fn policy_key_bytes_follow_the_c_layout() {
        let k = policy_key(&entry(6, 80, 16));
        let b = bytes_of(&k);
        assert_eq!(b.len(), 16);
        assert_eq!(&b[0..4], &96u32.to_ne_bytes());
        assert_eq!(&b[4..8], &3u32.to_ne_bytes());
        assert_eq!(&b[8..12], &300u32.to_ne_bytes());
        assert_eq!(b[12], 1);
        assert_eq!(b[13], 6);
        assert_eq!(&b[14..16], &[0, 80]);
    }

    #[test]
    fn ipcache_keys_cover_family_then_prefix() {
        let k = ipcache_key(&"10.0.1.0/24".parse().unwrap());
        assert_eq!(k.prefixlen, 56);
        assert_eq!(k.family, 4);
        assert_eq!(&k.addr[..4], &[10, 0, 1, 0]);
        assert_eq!(&k.addr[4..], &[0; 12]);
        let k = ipcache_key(&"10.0.1.77/24".parse().unwrap());
        assert_eq!(&k.addr[..4], &[10, 0, 1, 0], "host bits cleared");
        let k = ipcache_key(&"fd00:1::/64".parse().unwrap());
        assert_eq!((k.prefixlen, k.family), (32 + 64, 6));
        let k = ipcache_lookup_key("fd00::11".parse().unwrap());
        assert_eq!(k.prefixlen, 160);
        let k = ipcache_key(&"0.0.0.0/0".parse().unwrap());
        assert_eq!(k.prefixlen, 32);
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["10.1.2.3", "fd01:201::5"] {
            let ip: IpAddr = a.parse().unwrap();
            let (f, b) = addr_bytes(ip);
            assert_eq!(addr_from_bytes(f, &b), ip);
        }
    }

    fn state(endpoints: usize, ipcache: usize, entries: usize) -> Compiled {
        let mut c = Compiled::default();
        for i in 0..endpoints {
            c.endpoints.push(CompiledEndpoint {
                slot: i as u32,
                name: format!("ep{i}"),
                namespace: None,
                kind: if i == 0 {
                    EndpointKind::Host
                } else {
                    EndpointKind::Workload
                },
                identity: 256 + i as u32,
                local: true,
                interface: None,
                addresses: vec![],
                default_deny_ingress: i % 2 == 1,
                default_deny_egress: false,
                enforced_ingress: false,
                enforced_egress: false,
                audit: i == 2,
            });
        }
        for i in 0..ipcache {
            c.ipcache.push(IpcacheEntry {
                net: format!("10.9.{}.{}/32", i / 256, i % 256).parse().unwrap(),
                identity: 256,
                endpoint: None,
            });
        }
        for i in 0..entries {
            c.entries.push(PolicyEntry {
                endpoint: 0,
                port: i as u16,
                ..entry(6, 0, 16)
            });
        }
        c
    }

    fn settings(ipc: u32, ep: u32, pol: u32) -> DatapathSettings {
        DatapathSettings {
            ipcache_max_entries: ipc,
            endpoint_max_entries: ep,
            policy_max_entries: pol,
            ..DatapathSettings::default()
        }
    }

    #[test]
    fn capacity_check_counts_each_map() {
        let s = state(3, 10, 20);
        let att = [
            Attachment {
                slot: 0,
                ifindex: 11,
            },
            Attachment {
                slot: 1,
                ifindex: 12,
            },
        ];
        let c = check_capacity(&s, &att, &settings(10, 2, 20)).unwrap();
        assert_eq!(
            c,
            Counts {
                ipcache: 10,
                endpoints: 2,
                policy: 20
            }
        );
        let e = check_capacity(&s, &att, &settings(10, 2, 19)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy map (policy_max_entries) needs 20 entries but holds at most 19; the running state was kept"
        );
        let e = check_capacity(&s, &att, &settings(9, 2, 20)).unwrap_err();
        assert!(
            matches!(
                e,
                DatapathError::Capacity {
                    needed: 10,
                    max: 9,
                    ..
                }
            ),
            "{e}"
        );
        let e = check_capacity(&s, &att, &settings(10, 1, 20)).unwrap_err();
        assert!(
            matches!(
                e,
                DatapathError::Capacity {
                    needed: 2,
                    max: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn only_entries_of_attached_endpoints_count() {
        let mut s = state(3, 0, 5);
        s.entries.push(PolicyEntry {
            endpoint: 2,
            ..entry(6, 80, 16)
        });
        let att = [Attachment {
            slot: 0,
            ifindex: 11,
        }];
        assert_eq!(
            check_capacity(&s, &att, &settings(1, 2, 5)).unwrap().policy,
            5
        );
        let att = [Attachment {
            slot: 2,
            ifindex: 12,
        }];
        assert_eq!(
            check_capacity(&s, &att, &settings(1, 4, 5)).unwrap().policy,
            1
        );
    }

    #[test]
    fn duplicate_ipcache_prefixes_count_once() {
        let mut s = state(1, 1, 0);
        s.ipcache.push(s.ipcache[0].clone());
        let c = check_capacity(&s, &[], &settings(1, 1, 1)).unwrap();
        assert_eq!(c.ipcache, 1);
    }

    #[test]
    fn attachment_to_an_unknown_slot_is_refused() {
        let s = state(2, 0, 0);
        let e = check_capacity(
            &s,
            &[Attachment {
                slot: 5,
                ifindex: 3,
            }],
            &settings(1, 8, 1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("slot 5"), "{e}");
    }

    #[test]
    fn endpoint_flags_follow_the_compiled_endpoint() {
        let s = state(3, 0, 0);
        assert_eq!(endpoint_value(&s, 0).unwrap().flags, EP_F_HOST);
        assert_eq!(endpoint_value(&s, 1).unwrap().flags, EP_F_DENY_INGRESS);
        assert_eq!(endpoint_value(&s, 2).unwrap().flags, EP_F_AUDIT);
        assert_eq!(endpoint_value(&s, 2).unwrap().identity, 258);
        assert!(endpoint_value(&s, 3).is_none());
    }
}
