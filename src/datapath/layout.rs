//! The datapath's ABI seen from Rust: encoding of the compiled state into the
//! kernel's map keys and values, decoding of what the kernel reports (verdict
//! events), and the capacity check that runs before anything touches the
//! kernel. Layouts and constants (families, directions, verdicts, flags, event
//! codes, prefix lengths) are the skeleton's, generated from
//! bpf/lib/netpol_abi.h; none is written down here a second time. Pure: no
//! syscalls, unit-tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::skel::types::{
    self, np_direction, np_endpoint_flags, np_event_verdict, np_family, np_ipcache_prefix, np_none,
    np_policy_prefix, np_reason, np_verdict,
};
use super::{Attachment, DatapathError, DatapathSettings, EventReason, EventVerdict, VerdictEvent};
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
pub type CtV1Key = types::np_ct_v1_key;
pub type CtV1Value = types::np_ct_v1_value;
pub type FragKey = types::np_frag_key;
pub type FragValue = types::np_frag_value;
pub type FailsafeKey = types::np_failsafe_key;
pub type CountersValue = types::np_counters;
pub type EventRecord = types::np_event;
pub type RatelimitValue = types::np_ratelimit;
pub type DnsProxyValue = types::np_dns_proxy;
pub type DnsRedirectKey = types::np_dns_redirect_key;
pub type DnsRedirectValue = types::np_dns_redirect_value;
pub type DnsStatsValue = types::np_dns_stats;
pub type BypassEntry = types::np_bypass_entry;

// The sizes below are the C header's (which asserts them, and every offset,
// beside each struct); a change to a layout must come with a new map version
// (netpol_*_v2) and a change here.
const _: () = assert!(size_of::<StateValue>() == 16);
const _: () = assert!(size_of::<IpcacheKey>() == 24);
const _: () = assert!(size_of::<IpcacheValue>() == 8);
const _: () = assert!(size_of::<EndpointValue>() == 16);
const _: () = assert!(size_of::<PolicyKey>() == 16);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<CtKey>() == 44);
const _: () = assert!(size_of::<DnsProxyValue>() == 16);
const _: () = assert!(size_of::<DnsRedirectKey>() == 8);
const _: () = assert!(size_of::<DnsRedirectValue>() == 8);
const _: () = assert!(size_of::<DnsStatsValue>() == 24);
const _: () = assert!(size_of::<CtValue>() == 24);
const _: () = assert!(size_of::<CtV1Key>() == 44);
const _: () = assert!(size_of::<CtV1Value>() == 16);
const _: () = assert!(size_of::<FragKey>() == 40);
const _: () = assert!(size_of::<FragValue>() == 8);
const _: () = assert!(size_of::<FailsafeKey>() == 4);
const _: () = assert!(size_of::<CountersValue>() == 48);
const _: () = assert!(size_of::<EventRecord>() == 72);
const _: () = assert!(size_of::<RatelimitValue>() == 16);
const _: () = assert!(size_of::<BypassEntry>() == 64);

/// The clock conntrack expiries are on (bpf_ktime_get_coarse_ns:
/// CLOCK_MONOTONIC_COARSE), in nanoseconds.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The byte a key or event carries for `dir`.
pub fn direction_code(dir: Direction) -> u8 {
    match dir {
        Direction::Ingress => np_direction::NP_DIR_INGRESS.0,
        Direction::Egress => np_direction::NP_DIR_EGRESS.0,
    }
}

/// The byte a policy value carries for `verdict`.
pub fn verdict_code(verdict: EntryVerdict) -> u8 {
    match verdict {
        EntryVerdict::Allow => np_verdict::NP_VERDICT_ALLOW.0,
        EntryVerdict::Deny => np_verdict::NP_VERDICT_DENY.0,
        EntryVerdict::StagedDeny => np_verdict::NP_VERDICT_STAGED_DENY.0,
        EntryVerdict::AllowStagedDeny => np_verdict::NP_VERDICT_ALLOW_STAGED_DENY.0,
        EntryVerdict::StagedDefaultDeny => np_verdict::NP_VERDICT_STAGED_DEFAULT.0,
    }
}

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
            (np_family::NP_FAMILY_V4.0, out)
        }
        IpAddr::V6(a) => (np_family::NP_FAMILY_V6.0, a.octets()),
    }
}

/// The address encoded in 16 datapath bytes.
pub fn addr_from_bytes(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == np_family::NP_FAMILY_V4.0 {
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
        prefixlen: np_ipcache_prefix::NP_IPCACHE_STATIC_PREFIX.0 + u32::from(net.prefix_len()),
        family,
        pad: [0; 3],
        addr,
    }
}

/// ipcache key for looking up one address (full prefix).
pub fn ipcache_lookup_key(addr: IpAddr) -> IpcacheKey {
    ipcache_key(&IpNet::from(addr))
}

/// The ipcache value of `e`: its identity, and the kernel slot of the
/// endpoint owning the address when that endpoint is attached here (the
/// anti-spoofing check compares it with the sending endpoint's slot);
/// `NP_SLOT_ELSEWHERE` for an address of a remote endpoint or of one not
/// attached (no local workload may send from it, link-local or not), none for
/// a CIDR or entity.
pub fn ipcache_value(e: &IpcacheEntry, slots: &KernelSlots) -> IpcacheValue {
    IpcacheValue {
        identity: e.identity,
        endpoint: match e.endpoint {
            Some(s) => slots.kernel(s).unwrap_or(np_none::NP_SLOT_ELSEWHERE.0),
            None => np_none::NP_SLOT_NONE.0,
        },
    }
}

/// Kernel slots: the numbers the datapath's endpoint table, policy keys and
/// per-slot counters use. Only attached endpoints have one, so the endpoint
/// table and the counters are sized by the endpoints enforced on this host,
/// not by the registry (remote endpoints live only in the ipcache). A slot
/// stays with its interface (ifindex) while it stays attached, whatever the
/// registry does around it, so counters keep following their endpoint; a new
/// attachment takes the lowest free slot. Compiled slots ([`Compiled::endpoints`]
/// indexes) are what everything above the datapath sees: events and counters
/// are mapped back through [`KernelSlots::compiled`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSlots {
    /// ifindex → kernel slot.
    by_ifindex: BTreeMap<u32, u32>,
    /// compiled slot → kernel slot.
    by_compiled: crate::hash::FastMap<u32, u32>,
    /// kernel slot → compiled slot.
    to_compiled: BTreeMap<u32, u32>,
}

impl KernelSlots {
    /// Kernel slots for `attachments`: those of `prev` for interfaces that
    /// stay attached, the lowest free ones for the others (in attachment order).
    pub fn assign(prev: &KernelSlots, attachments: &[Attachment]) -> KernelSlots {
        let mut next = KernelSlots::default();
        let mut fresh = Vec::new();
        for a in attachments {
            match prev.by_ifindex.get(&a.ifindex) {
                Some(k) if !next.to_compiled.contains_key(k) => next.insert(a, *k),
                _ => fresh.push(a),
            }
        }
        let mut free = (0u32..).filter(|k| !next.to_compiled.contains_key(k));
        let taken: Vec<(&Attachment, u32)> = fresh
            .into_iter()
            .map(|a| (a, free.next().expect("u32 slots outnumber attachments")))
            .collect();
        for (a, k) in taken {
            next.insert(a, k);
        }
        next
    }

    /// Seed from an endpoint table read back from the kernel (ifindex →
    /// kernel slot), so a restarted daemon keeps the slots it finds.
    pub fn adopted(table: impl IntoIterator<Item = (u32, u32)>) -> KernelSlots {
        KernelSlots {
            by_ifindex: table.into_iter().collect(),
            ..KernelSlots::default()
        }
    }

    fn insert(&mut self, a: &Attachment, k: u32) {
        self.by_ifindex.insert(a.ifindex, k);
        self.by_compiled.insert(a.slot, k);
        self.to_compiled.insert(k, a.slot);
    }

    /// The kernel slot of the endpoint in compiled slot `slot`, if attached.
    pub fn kernel(&self, slot: u32) -> Option<u32> {
        self.by_compiled.get(&slot).copied()
    }

    /// The compiled slot behind kernel slot `k`.
    pub fn compiled(&self, k: u32) -> Option<u32> {
        self.to_compiled.get(&k).copied()
    }

    /// (kernel slot, compiled slot) of every attached endpoint, by kernel slot.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.to_compiled.iter().map(|(k, c)| (*k, *c))
    }

    /// The highest kernel slot in use plus one (0 when none).
    pub fn span(&self) -> u32 {
        self.to_compiled.keys().next_back().map_or(0, |k| k + 1)
    }

    /// Kernel slots given to an interface that did not hold them in `prev`
    /// (their per-slot counters start again from zero).
    pub fn new_since<'a>(&'a self, prev: &'a KernelSlots) -> impl Iterator<Item = u32> + 'a {
        self.by_ifindex
            .iter()
            .filter(move |(ifx, k)| prev.by_ifindex.get(ifx) != Some(k))
            .map(|(_, k)| *k)
    }
}

/// The port with the bits past `prefix` cleared (prefix clamped to 16).
pub fn masked_port(port: u16, prefix: u8) -> u16 {
    match prefix.min(16) {
        0 => 0,
        n => port & (u16::MAX << (16 - u32::from(n))),
    }
}

/// Prefix length of a policy key with every bit significant: such an entry
/// goes to the exact-match hash, not the trie.
pub const POLICY_FULL_PREFIX: u32 = np_policy_prefix::NP_POLICY_FULL_PREFIX.0;

/// LPM prefix length of a policy entry: the static part, then 8 bits of
/// protocol unless it is the any-protocol entry, then `port_prefix` port bits.
pub fn policy_prefixlen(proto: u8, port_prefix: u8) -> u32 {
    let static_prefix = np_policy_prefix::NP_POLICY_STATIC_PREFIX.0;
    if proto == 0 {
        static_prefix
    } else {
        static_prefix + 8 + u32::from(port_prefix.min(16))
    }
}

/// The policy key of `e` with its compiled slot as the key's slot (tests,
/// and a state whose slots are the kernel's).
pub fn policy_key(e: &PolicyEntry) -> PolicyKey {
    policy_key_in(e, e.endpoint)
}

/// The policy key of `e` for the endpoint in kernel slot `kslot`.
pub fn policy_key_in(e: &PolicyEntry, kslot: u32) -> PolicyKey {
    let (port, prefix) = if e.proto == 0 {
        (0, 0)
    } else {
        (e.port, e.port_prefix)
    };
    PolicyKey {
        prefixlen: policy_prefixlen(e.proto, prefix),
        slot: kslot,
        identity: e.identity,
        direction: direction_code(e.direction),
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
        prefixlen: np_policy_prefix::NP_POLICY_FULL_PREFIX.0,
        slot,
        identity,
        direction: direction_code(dir),
        proto,
        port: port.to_be(),
    }
}

pub fn policy_value(e: &PolicyEntry) -> PolicyValue {
    PolicyValue {
        verdict: verdict_code(e.verdict),
        reserved0: 0,
        reserved1: 0,
        rule: e.rule,
    }
}

/// A verdict event as the datapath wrote it into the ring buffer. Codes the
/// datapath never writes read as the most cautious meaning (ingress, denied,
/// malformed).
pub fn verdict_event(r: &EventRecord) -> VerdictEvent {
    VerdictEvent {
        ifindex: r.ifindex,
        slot: r.slot,
        direction: match np_direction(r.direction) {
            np_direction::NP_DIR_EGRESS => Direction::Egress,
            _ => Direction::Ingress,
        },
        verdict: match np_event_verdict(r.verdict) {
            np_event_verdict::NP_EV_ALLOWED => EventVerdict::Allowed,
            np_event_verdict::NP_EV_AUDIT => EventVerdict::Audit,
            _ => EventVerdict::Denied,
        },
        reason: match np_reason(r.reason) {
            np_reason::NP_REASON_POLICY_ALLOW => EventReason::PolicyAllow,
            np_reason::NP_REASON_POLICY_DENY => EventReason::PolicyDeny,
            np_reason::NP_REASON_DEFAULT_DENY => EventReason::DefaultDeny,
            np_reason::NP_REASON_SPOOFED => EventReason::Spoofed,
            np_reason::NP_REASON_FRAGMENT => EventReason::Fragment,
            np_reason::NP_REASON_DNS_PROXY => EventReason::DnsProxy,
            _ => EventReason::Malformed,
        },
        src: addr_from_bytes(r.family, &r.saddr),
        dst: addr_from_bytes(r.family, &r.daddr),
        proto: r.proto,
        sport: r.sport,
        dport: r.dport,
        src_identity: r.src_identity,
        dst_identity: r.dst_identity,
        rule: (r.rule != np_none::NP_RULE_NONE.0).then_some(r.rule),
    }
}

/// Endpoint table value of the endpoint in `slot` of `state`, attached in
/// kernel slot `kslot`.
pub fn endpoint_value(state: &Compiled, slot: u32, kslot: u32) -> Option<EndpointValue> {
    let ep = state.endpoints.get(slot as usize)?;
    let mut flags = 0;
    if ep.kind == EndpointKind::Host {
        flags |= np_endpoint_flags::NP_EP_F_HOST.0;
    }
    if ep.default_deny_ingress {
        flags |= np_endpoint_flags::NP_EP_F_DENY_INGRESS.0;
    }
    if ep.default_deny_egress {
        flags |= np_endpoint_flags::NP_EP_F_DENY_EGRESS.0;
    }
    if ep.audit {
        flags |= np_endpoint_flags::NP_EP_F_AUDIT.0;
    }
    Some(EndpointValue {
        slot: kslot,
        identity: ep.identity,
        flags,
        // The generation number is stamped at apply (Contents::stamp).
        generation: 0,
    })
}

/// True when (s, sport) is side b of a conntrack key: the greater end, words
/// of the address in memory order, then the port (bpf/lib/conntrack.h,
/// np_ct_src_is_b; the kernel compares native-endian words).
fn ct_src_is_b(s: &[u8; 16], d: &[u8; 16], sport: u16, dport: u16) -> bool {
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    for i in (0..16).step_by(4) {
        let (x, y) = (word(s, i), word(d, i));
        if x != y {
            return x > y;
        }
    }
    sport > dport
}

/// A layout-1 conntrack entry (netpol_ct_v1: keyed by its first packet's
/// hook and tuple) as the layout-2 entry of the same flow, its verdict marked
/// as decided by no generation (`stale`: the next packet is judged again
/// under `recheck`, checked for spoofing under `keep`).
pub fn ct_from_v1(k: &CtV1Key, v: &CtV1Value, stale: u32) -> (CtKey, CtValue) {
    let src_b = ct_src_is_b(&k.saddr, &k.daddr, k.sport, k.dport);
    let (a, b, pa, pb) = if src_b {
        (k.daddr, k.saddr, k.dport, k.sport)
    } else {
        (k.saddr, k.daddr, k.sport, k.dport)
    };
    let key = CtKey {
        addr_a: a,
        addr_b: b,
        port_a: pa,
        port_b: pb,
        ifindex: k.ifindex,
        proto: k.proto,
        family: k.family,
        pad: 0,
    };
    let value = CtValue {
        expires_ns: v.expires_ns,
        rule: v.rule,
        generation: stale,
        reply_generation: stale,
        state: v.state,
        flags: if src_b {
            types::np_ct_flags::NP_CT_F_ORIG_B.0
        } else {
            0
        },
        hook: k.hook,
        pad: 0,
    };
    (key, value)
}

/// The policy entries a generation installs: those of attached endpoints
/// (entries of endpoints enforced elsewhere are of no use to this kernel).
pub fn installed_entries<'a>(
    state: &'a Compiled,
    attachments: &[Attachment],
) -> impl Iterator<Item = &'a PolicyEntry> + 'a {
    let slots: BTreeSet<u32> = attachments.iter().map(|a| a.slot).collect();
    // Entries are sorted by endpoint: each attached endpoint's run, not a scan
    // of every entry with a set lookup each.
    slots.into_iter().flat_map(move |slot| {
        let lo = state.entries.partition_point(|e| e.endpoint < slot);
        let hi = lo + state.entries[lo..].partition_point(|e| e.endpoint == slot);
        state.entries[lo..hi].iter()
    })
}

/// How many entries one generation needs in each map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ipcache: usize,
    pub endpoints: usize,
    pub policy: usize,
}

/// Checks `state` and `attachments` (in kernel slots `slots`) against the map
/// sizes before anything is written: a state that does not fit is refused whole.
pub fn check_capacity(
    state: &Compiled,
    attachments: &[Attachment],
    slots: &KernelSlots,
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
            return Err(DatapathError::UnknownSlot {
                ifindex: a.ifindex,
                slot: a.slot,
                endpoints: state.endpoints.len(),
            });
        }
    }
    if slots.span() > settings.endpoint_max_entries {
        return Err(DatapathError::Capacity {
            map: "counters (endpoint_max_entries, by slot)",
            needed: slots.span() as usize,
            max: settings.endpoint_max_entries as usize,
        });
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(s: [u8; 4], d: [u8; 4], sport: u16, dport: u16, hook: u8) -> CtV1Key {
        let mut k = CtV1Key {
            saddr: [0; 16],
            daddr: [0; 16],
            sport,
            dport,
            ifindex: 7,
            proto: 6,
            family: np_family::NP_FAMILY_V4.0,
            hook,
            pad: 0,
        };
        k.saddr[..4].copy_from_slice(&s);
        k.daddr[..4].copy_from_slice(&d);
        k
    }

    /// A flow and its reply map to one layout-2 key; the value remembers
    /// which side and hook originated it, and that no generation decided it.
    #[test]
    fn layout_1_conntrack_entries_become_one_normalised_entry() {
        let val = CtV1Value {
            expires_ns: 99,
            rule: 3,
            state: types::np_ct_state::NP_CT_SEEN_REPLY.0,
            pad: [0; 3],
        };
        let (ka, va) = ct_from_v1(&v1([10, 0, 0, 2], [10, 0, 0, 1], 5, 80, 0), &val, 41);
        let (kb, vb) = ct_from_v1(&v1([10, 0, 0, 1], [10, 0, 0, 2], 80, 5, 1), &val, 41);
        assert_eq!(bytes_of(&ka), bytes_of(&kb), "one key for both directions");
        assert_ne!(va.flags, vb.flags, "the originating side differs");
        assert_eq!((va.hook, vb.hook), (0, 1));
        assert_eq!((va.generation, va.reply_generation, va.rule), (41, 41, 3));
        assert_eq!((va.expires_ns, va.state), (99, val.state));
        // Same addresses: the port decides the side.
        let (kc, _) = ct_from_v1(&v1([10, 0, 0, 1], [10, 0, 0, 1], 9, 8, 0), &val, 0);
        assert_eq!((kc.port_a, kc.port_b), (8, 9));
    }
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
                name: format!("ep{i}").into(),
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

    /// The capacity check with kernel slots assigned from nothing.
    fn cap(
        s: &Compiled,
        att: &[Attachment],
        settings: &DatapathSettings,
    ) -> Result<Counts, DatapathError> {
        let slots = KernelSlots::assign(&KernelSlots::default(), att);
        check_capacity(s, att, &slots, settings)
    }

    fn att(slot: u32, ifindex: u32) -> Attachment {
        Attachment { slot, ifindex }
    }

    #[test]
    fn kernel_slots_number_attached_endpoints_only_and_stay_with_their_interface() {
        // Compiled slots 4000 and 9000 (a registry of remote endpoints around
        // them) take kernel slots 0 and 1: two counters, two table entries.
        let a = [att(4000, 11), att(9000, 12)];
        let k = KernelSlots::assign(&KernelSlots::default(), &a);
        assert_eq!(k.iter().collect::<Vec<_>>(), vec![(0, 4000), (1, 9000)]);
        assert_eq!((k.kernel(9000), k.kernel(5), k.span()), (Some(1), None, 2));
        // The registry moves both (compiled slots change); 11 goes, 13 comes:
        // 12 keeps kernel slot 1, 13 takes the free 0.
        let b = [att(10, 12), att(20, 13)];
        let k2 = KernelSlots::assign(&k, &b);
        assert_eq!(k2.iter().collect::<Vec<_>>(), vec![(0, 20), (1, 10)]);
        assert_eq!(k2.new_since(&k).collect::<Vec<_>>(), vec![0]);
        assert_eq!(k2.compiled(1), Some(10));
        // Seeded from a kernel's endpoint table after a restart.
        let k3 = KernelSlots::assign(&KernelSlots::adopted([(13, 7)]), &b);
        assert_eq!(k3.kernel(20), Some(7));
        assert_eq!(k3.kernel(10), Some(0));
    }

    #[test]
    fn remote_endpoints_cost_no_endpoint_slot() {
        // 5000 endpoints compiled, one attached: an endpoint table of 1 fits.
        let s = state(5000, 0, 0);
        assert!(cap(&s, &[att(4999, 3)], &settings(1, 1, 1)).is_ok());
        let e = cap(&s, &[att(1, 3), att(4999, 4)], &settings(1, 1, 1)).unwrap_err();
        assert!(e.to_string().contains("endpoint_max_entries"), "{e}");
    }

    #[test]
    fn ipcache_values_carry_kernel_slots_of_attached_endpoints_only() {
        let e = IpcacheEntry {
            net: "10.0.0.1/32".parse().unwrap(),
            identity: 300,
            endpoint: Some(4000),
        };
        let k = KernelSlots::assign(&KernelSlots::default(), &[att(4000, 11)]);
        assert_eq!(ipcache_value(&e, &k).endpoint, 0);
        let none = KernelSlots::default();
        assert_eq!(
            ipcache_value(&e, &none).endpoint,
            np_none::NP_SLOT_ELSEWHERE.0
        );
        let cidr = IpcacheEntry {
            endpoint: None,
            ..e.clone()
        };
        assert_eq!(ipcache_value(&cidr, &k).endpoint, np_none::NP_SLOT_NONE.0);
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
        let c = cap(&s, &att, &settings(10, 2, 20)).unwrap();
        assert_eq!(
            c,
            Counts {
                ipcache: 10,
                endpoints: 2,
                policy: 20
            }
        );
        let e = cap(&s, &att, &settings(10, 2, 19)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy map (policy_max_entries) needs 20 entries but holds at most 19; the running state was kept"
        );
        let e = cap(&s, &att, &settings(9, 2, 20)).unwrap_err();
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
        let e = cap(&s, &att, &settings(10, 1, 20)).unwrap_err();
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
        assert_eq!(cap(&s, &att, &settings(1, 2, 5)).unwrap().policy, 5);
        let att = [Attachment {
            slot: 2,
            ifindex: 12,
        }];
        assert_eq!(cap(&s, &att, &settings(1, 4, 5)).unwrap().policy, 1);
    }

    #[test]
    fn duplicate_ipcache_prefixes_count_once() {
        let mut s = state(1, 1, 0);
        s.ipcache.push(s.ipcache[0].clone());
        let c = cap(&s, &[], &settings(1, 1, 1)).unwrap();
        assert_eq!(c.ipcache, 1);
    }

    #[test]
    fn attachment_to_an_unknown_slot_is_refused() {
        let s = state(2, 0, 0);
        let e = cap(
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
    fn codes_are_the_c_headers() {
        // The values pinned maps and events carry today (netpol_abi.h).
        assert_eq!(direction_code(Direction::Ingress), 0);
        assert_eq!(direction_code(Direction::Egress), 1);
        assert_eq!(verdict_code(EntryVerdict::Allow), 1);
        assert_eq!(verdict_code(EntryVerdict::Deny), 2);
        assert_eq!(verdict_code(EntryVerdict::StagedDeny), 3);
        assert_eq!(verdict_code(EntryVerdict::AllowStagedDeny), 4);
        assert_eq!(verdict_code(EntryVerdict::StagedDefaultDeny), 5);
        assert_eq!(types::np_layout::NP_LAYOUT_VERSION.0, 3);
        assert_eq!(types::np_layout::NP_LAYOUT_VERSION_POLICY_TRIE.0, 2);
        assert_eq!(types::np_layout::NP_LAYOUT_VERSION_CT_V1.0, 1);
        assert_eq!(np_none::NP_RULE_NONE.0, u32::MAX);
        assert_eq!(np_none::NP_SLOT_NONE.0, u32::MAX);
        assert_eq!(types::np_action::NP_DROP.0, 2);
        assert_eq!(
            (
                np_family::NP_FAMILY_V4.0,
                np_family::NP_FAMILY_V6.0,
                types::np_hook::NP_HOOK_INGRESS.0,
                types::np_hook::NP_HOOK_EGRESS.0,
            ),
            (4, 6, 0, 1)
        );
        assert_eq!(
            (
                types::np_ct_state::NP_CT_SEEN_SYN.0,
                types::np_ct_state::NP_CT_SEEN_REPLY.0,
                types::np_ct_state::NP_CT_CLOSING.0,
            ),
            (1, 2, 4)
        );
    }

    fn record(direction: u8, verdict: u8, reason: u8, rule: u32) -> EventRecord {
        let (family, saddr) = addr_bytes("10.0.0.1".parse().unwrap());
        let (_, daddr) = addr_bytes("10.0.0.2".parse().unwrap());
        EventRecord {
            ifindex: 7,
            slot: 2,
            src_identity: 300,
            dst_identity: 301,
            rule,
            sport: 40000,
            dport: 80,
            direction,
            verdict,
            reason,
            proto: 6,
            family,
            saddr,
            daddr,
            ..EventRecord::default()
        }
    }

    #[test]
    fn events_decode_every_code_the_datapath_writes() {
        let e = verdict_event(&record(1, 1, 1, 9));
        assert_eq!(
            (e.direction, e.verdict, e.reason, e.rule),
            (
                Direction::Egress,
                EventVerdict::Denied,
                EventReason::PolicyDeny,
                Some(9)
            )
        );
        assert_eq!(e.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((e.ifindex, e.slot, e.sport, e.dport), (7, 2, 40000, 80));
        assert_eq!((e.src_identity, e.dst_identity, e.proto), (300, 301, 6));
        let e = verdict_event(&record(0, 0, 0, u32::MAX));
        assert_eq!(
            (e.direction, e.verdict, e.reason, e.rule),
            (
                Direction::Ingress,
                EventVerdict::Allowed,
                EventReason::PolicyAllow,
                None
            )
        );
        assert_eq!(
            verdict_event(&record(0, 2, 2, 0)).verdict,
            EventVerdict::Audit
        );
        let reasons = [
            EventReason::PolicyAllow,
            EventReason::PolicyDeny,
            EventReason::DefaultDeny,
            EventReason::Spoofed,
            EventReason::Fragment,
            EventReason::Malformed,
            EventReason::DnsProxy,
        ];
        for (code, want) in reasons.into_iter().enumerate() {
            assert_eq!(verdict_event(&record(0, 1, code as u8, 0)).reason, want);
        }
        // Codes the datapath never writes.
        let e = verdict_event(&record(9, 9, 9, 0));
        assert_eq!(
            (e.direction, e.verdict, e.reason),
            (
                Direction::Ingress,
                EventVerdict::Denied,
                EventReason::Malformed
            )
        );
    }

    #[test]
    fn endpoint_flags_follow_the_compiled_endpoint() {
        let s = state(3, 0, 0);
        assert_eq!(endpoint_value(&s, 0, 0).unwrap().flags, 0x1, "host");
        assert_eq!(endpoint_value(&s, 1, 1).unwrap().flags, 0x2, "deny ingress");
        assert_eq!(endpoint_value(&s, 2, 2).unwrap().flags, 0x8, "audit");
        assert_eq!(endpoint_value(&s, 2, 0).unwrap().identity, 258);
        assert!(endpoint_value(&s, 3, 3).is_none());
        assert_eq!(endpoint_value(&s, 2, 9).unwrap().slot, 9, "the kernel slot");
    }
}
