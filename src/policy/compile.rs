//! Rules × endpoints → identities, ipcache and per-endpoint entries (the
//! semantics of docs/policy.md, "Semantics" and "How a verdict is decided").
//! The entries are built so that the lookup contract in [`super::lookup`]
//! returns the policy's answer for every flow: in particular deny precedence is
//! materialised here, because a longest-prefix lookup would otherwise let a
//! narrower allow shadow a broader deny of the same identity.
//!
//! Owns: which rules select which endpoint, enforcement and default deny per
//! direction, peer expansion (selectors, CIDRs, entities, named ports), port range
//! decomposition, deny precedence, the rule references behind entries, and the
//! map budget ([`Limits`]). Pure and deterministic: no I/O, no clock, no
//! randomness, no hash-map iteration order in the output, no hidden state (a
//! [`Compiler`] value keeps what it reuses between calls). It reads no
//! configuration: its options are built by whoever read one (`config`), and a
//! refusal names the map by [`MapKind`].
//!
//! Performance: endpoints are grouped by the list of rules selecting them (and
//! their named ports), and the entries of a group are computed once and stamped
//! per endpoint; selectors are evaluated once each over the identities, through an
//! index of `(key, value)` → identities. A [`Compiler`] compiles
//! incrementally: it keeps each part of a compile (the registry's share,
//! the identities and ipcache, each rule's subject selection, each group's
//! entries) keyed by everything it is computed from, so a change computes
//! again only what it touches, and the result is a fresh compile's.
//!
//! Decisions (documented for users in the policy reference, docs/policy.md):
//! - Workload identities come from the label set only (`crate::policy::identity`).
//! - HostEndpoints of this node have identity host (1); those of other nodes (and
//!   Node documents) remote-node (6). A Node document named like this host maps to
//!   host (1). `nodeSelector` rules are compiled for every HostEndpoint (offline
//!   trace judges each as enforced); the datapath attaches only local ones.
//! - Kubernetes ipBlock (`match_endpoints`) also matches the identities of workload
//!   endpoints with an address inside the block (and outside its excepts). Since
//!   policy works on identities, every endpoint sharing that identity is matched.
//! - `allow_localhost`: an allow entry host (1) → every workload's ingress, subject
//!   to deny rules like any allow (as Cilium inserts it).
//! - Staged policies (`netpol.io/audit: "true"`) are expanded like the others and
//!   folded into the group's entries in one place, `compile::staged`: they bring no default
//!   deny and change no verdict; what they would deny gets entries of its own.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use ipnet::IpNet;

use super::fqdn::{self, FqdnIds};
use super::types::{
    proto, Compiled, CompiledEndpoint, Direction, EntryVerdict, Identity, IdentityInfo,
    IpcacheEntry, PolicyEntry, RuleRef,
};
use crate::api::model::{
    EndpointKind, Entity, Family, FqdnSelector, Label, NamedPort, Op, Origin, Peer, Peers, Policy,
    PolicySet, PortSpec, Proto, RegistrySet, Rule, RuleItem, Selector, Subject, L4,
};
use crate::api::Problem;
use crate::hash::{FastHasher, FastMap};
use crate::policy::identity;
use crate::policy::labels;
use crate::policy::registry::ResolvedEndpoint;
use crate::sizes::{MapKind, MapSizes, SETTINGS_FILE};

mod part;
mod staged;

use part::RegistryPart;

/// Inputs to compile that come from the daemon config rather than the files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompileOptions {
    /// This host's node name: endpoints whose `node` is another host are remote.
    pub node_name: String,
    /// Global audit mode.
    pub audit: bool,
    /// `allow_localhost = "always"`: host → local workload is always allowed.
    pub allow_localhost: bool,
    /// Extra addresses of this host (from netlink) that map to identity host (1).
    pub host_addresses: Vec<IpAddr>,
    /// The map sizes the state must fit; [`try_compile`] refuses a set that would
    /// need more. The default is [`MapSizes::DEFAULT`]'s.
    pub limits: Limits,
    /// Build policy entries for this host's enforced endpoints only (what
    /// netpold installs): remote endpoints then cost their identity and
    /// ipcache entries, and the policy budget counted is this host's map
    /// alone. Off (the offline commands): every endpoint's entries, every
    /// node's map counted, so `trace` judges any endpoint as enforced.
    pub local_entries_only: bool,
    /// What the DNS proxy has learned (name → addresses): `toFQDNs`
    /// selectors stand for these addresses' identities (`policy::fqdn`);
    /// empty, they allow nothing. Shared: compile clones its options.
    pub fqdn: Arc<fqdn::FqdnAddrs>,
}

/// The map sizes a compiled state must fit ([`MapKind::Policy`],
/// [`MapKind::Ipcache`]). Compile checks them
/// while it expands, so a policy that would need millions of entries is refused
/// after at most about twice the limit's worth of work, never materialised.
///
/// What counts (each checked as compile goes, the first one exceeded refuses the set):
/// - the ipcache: distinct prefixes of `/0`, this host's, the registry's addresses
///   and the policies' CIDR prefixes (one CIDR identity each) ≤ `ipcache_entries`;
/// - one endpoint's own entries ≤ `policy_entries` (no host could hold them);
/// - the entries of the endpoints of one node ≤ `policy_entries`: the policy map
///   of that host, counted for every node of the registry so that every host
///   given the same files (and map sizes) gives the same answer. Endpoints
///   without `node` (or with this host's name) are this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The size of [`MapKind::Policy`].
    pub policy_entries: usize,
    /// The size of [`MapKind::Ipcache`].
    pub ipcache_entries: usize,
}

impl Limits {
    /// No budget: [`compile`], for callers whose input is already bounded.
    pub const UNLIMITED: Limits = Limits {
        policy_entries: usize::MAX,
        ipcache_entries: usize::MAX,
    };

    /// The budget of maps of these sizes.
    pub fn of(sizes: &MapSizes) -> Limits {
        Limits {
            policy_entries: sizes.policy as usize,
            ipcache_entries: sizes.ipcache as usize,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::of(&MapSizes::DEFAULT)
    }
}

/// The set would need more map entries than the limits allow. Displayed as a
/// [`Problem`] naming the file, document, policy and rule item that pushed it
/// over, and the setting to raise ([`MapKind::key`] in [`SETTINGS_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct CompileError {
    /// The map that would overflow ([`MapKind::Policy`] or [`MapKind::Ipcache`]).
    pub map: MapKind,
    /// Its size.
    pub limit: usize,
    /// Boxed: a `Result` carrying it stays small.
    pub problem: Box<Problem>,
    /// When a policy map overflows: the same refusal named at the registry
    /// endpoint that pushed it over (its document, `metadata.labels`), for
    /// when a registry change is to blame rather than a rule.
    pub endpoint: Option<Box<Problem>>,
}

impl From<CompileError> for Problem {
    fn from(e: CompileError) -> Problem {
        *e.problem
    }
}

/// One port key: protocol (0 = any), port, port prefix bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PortKey {
    pub(crate) proto: u8,
    pub(crate) port: u16,
    pub(crate) prefix: u8,
}

const ANY_KEY: PortKey = PortKey {
    proto: 0,
    port: 0,
    prefix: 0,
};

/// An entry of a group template (no endpoint slot yet). Field order = sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TEntry {
    dir: Direction,
    id: Identity,
    key: PortKey,
    verdict: EntryVerdict,
    rule: u32,
    /// From a staged policy's item (`Allow` or `Deny`), until [`staged::finish`]
    /// turns the entries into what the lookup reads.
    staged: bool,
}

#[derive(Debug, Default)]
struct Template {
    entries: Vec<TEntry>,
    enforced_ingress: bool,
    enforced_egress: bool,
    default_deny_ingress: bool,
    default_deny_egress: bool,
}

/// One item of one rule, flattened.
struct ItemInfo<'a> {
    item: &'a RuleItem,
    /// The policy it belongs to, for a refusal naming the item.
    origin: &'a Origin,
    dir: Direction,
    verdict: EntryVerdict,
    /// Its policy is staged.
    staged: bool,
}

/// One rule, flattened, with the indexes of its items (= their rule refs).
struct RuleInfo<'a> {
    rule: &'a Rule,
    /// The rules of its policy (shared between sets) and its index in them.
    shared: &'a Arc<[Rule]>,
    index: u32,
    /// The rule ref of its first item (its items' are consecutive).
    first_item: u32,
    /// Some item has a Kubernetes ipBlock peer (which matches workload
    /// addresses too).
    uses_addrs: bool,
    items: Vec<u32>,
    /// Its policy is staged; then the rule refs of the default deny it brings
    /// (ingress, egress), if it does.
    staged: bool,
    default_deny_refs: [Option<u32>; 2],
}

impl RuleInfo<'_> {
    /// What a template depends on of this rule.
    fn key(&self) -> RuleKey {
        RuleKey {
            rules: self.shared.as_ptr() as usize,
            index: self.index,
            staged: self.staged,
            first_item: self.first_item,
            default_deny_refs: self.default_deny_refs,
        }
    }
}

/// Protocols of a `Proto` when a port is given.
fn protos(p: Proto) -> &'static [u8] {
    match p {
        Proto::Tcp => &[proto::TCP],
        Proto::Udp => &[proto::UDP],
        Proto::Sctp => &[proto::SCTP],
        Proto::Any => &[proto::TCP, proto::UDP, proto::SCTP],
    }
}

/// Decompose `start..=end` into aligned prefix blocks (how a port range becomes
/// entries: docs/policy.md, "How a verdict is decided").
pub fn port_range_blocks(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let end = u32::from(end.max(start));
    let mut s = u32::from(start);
    while s <= end {
        let mut k = 16u32;
        loop {
            let size = 1u32 << k;
            if s % size == 0 && s + size - 1 <= end {
                break;
            }
            k -= 1;
        }
        out.push((s as u16, (16 - k) as u8));
        s += 1 << k;
    }
    out
}

pub(crate) fn number_keys(p: u16, end: Option<u16>, proto_: Proto, out: &mut Vec<PortKey>) {
    let end = end.filter(|e| *e > p);
    for &pr in protos(proto_) {
        if p == 0 && end.is_none() {
            out.push(PortKey {
                proto: pr,
                port: 0,
                prefix: 0,
            });
            continue;
        }
        for (base, prefix) in port_range_blocks(p, end.unwrap_or(p)) {
            out.push(PortKey {
                proto: pr,
                port: base,
                prefix,
            });
        }
    }
}

/// Keys of a named port resolved against one destination's declared ports.
pub(crate) fn named_keys(name: &str, want: Proto, declared: &[NamedPort], out: &mut Vec<PortKey>) {
    for np in declared
        .iter()
        .filter(|np| np.name.eq_ignore_ascii_case(name))
    {
        let ps: &[u8] = match (want, np.proto) {
            (Proto::Any, p) => protos(p),
            (w, Proto::Any) => protos(w),
            (w, p) if w == p => protos(w),
            _ => &[],
        };
        for &pr in ps {
            out.push(PortKey {
                proto: pr,
                port: np.port,
                prefix: 16,
            });
        }
    }
}

fn net_contains(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(o), IpNet::V4(i)) => o.contains(i),
        (IpNet::V6(o), IpNet::V6(i)) => o.contains(i),
        _ => false,
    }
}

fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

/// The keys of a map sorted by `IpNet` (address, then prefix length) that can be
/// inside `net`: those from its first to its last address.
fn within(net: &IpNet) -> std::ops::RangeInclusive<IpNet> {
    match net {
        IpNet::V4(n) => {
            let lo = ipnet::Ipv4Net::new(n.network(), 0).unwrap_or(*n);
            let hi = ipnet::Ipv4Net::new(n.broadcast(), 32).unwrap_or(*n);
            IpNet::V4(lo)..=IpNet::V4(hi)
        }
        IpNet::V6(n) => {
            let lo = ipnet::Ipv6Net::new(n.network(), 0).unwrap_or(*n);
            let hi = ipnet::Ipv6Net::new(n.broadcast(), 128).unwrap_or(*n);
            IpNet::V6(lo)..=IpNet::V6(hi)
        }
    }
}

/// Selector evaluation over every identity, through an index of `(key,
/// value)` → identities. Owns what it indexes, so a [`Compiler`] keeps it
/// between compiles while the identities stay the same.
#[derive(Debug, Default)]
pub(crate) struct SelectorIndex {
    /// (identity, labels), sorted by identity.
    ids: Vec<(Identity, Arc<[Label]>)>,
    /// hash of (key, value) → positions in `ids`, source ignored (every
    /// candidate is matched against the selector afterwards, so a collision
    /// only costs a candidate).
    by_kv: FastMap<u64, Vec<u32>>,
}

fn kv_hash(key: &str, value: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = FastHasher::default();
    h.write(key.as_bytes());
    h.write_u8(0xff);
    h.write(value.as_bytes());
    h.finish()
}

impl SelectorIndex {
    pub(crate) fn new(ids: Vec<(Identity, Arc<[Label]>)>) -> Self {
        let mut by_kv: FastMap<u64, Vec<u32>> = FastMap::default();
        for (pos, (_, ls)) in ids.iter().enumerate() {
            for l in ls.iter() {
                let v = by_kv.entry(kv_hash(&l.key, &l.value)).or_default();
                if v.last() != Some(&(pos as u32)) {
                    v.push(pos as u32);
                }
            }
        }
        SelectorIndex { ids, by_kv }
    }

    /// The identities `sel` selects, sorted.
    pub(crate) fn select(&self, sel: &Selector) -> Vec<Identity> {
        // The smallest candidate set among the `In` requirements (sized before
        // any is gathered: a namespace requirement names nearly every identity).
        let postings = |req: &crate::api::model::Requirement| {
            let key = req.key.key.as_str();
            req.values
                .iter()
                .filter_map(move |v| self.by_kv.get(&kv_hash(key, v)))
                .collect::<Vec<_>>()
        };
        let best: Option<Vec<u32>> = sel
            .requirements
            .iter()
            .filter(|r| r.op == Op::In)
            .map(postings)
            .min_by_key(|p| p.iter().map(|v| v.len()).sum::<usize>())
            .map(|p| p.into_iter().flatten().copied().collect());
        let matches = |ls: &[Label]| labels::selector_matches(sel, ls);
        let mut out: Vec<Identity> = match best {
            Some(mut cand) => {
                cand.sort_unstable();
                cand.dedup();
                cand.into_iter()
                    .map(|p| &self.ids[p as usize])
                    .filter(|(_, ls)| matches(ls))
                    .map(|(id, _)| *id)
                    .collect()
            }
            None => self
                .ids
                .iter()
                .filter(|(_, ls)| matches(ls))
                .map(|(id, _)| *id)
                .collect(),
        };
        out.sort_unstable();
        out
    }
}

/// A [`SelectorIndex`] with a memo by the selector's address, for one pass
/// over one policy set (selectors live in it for the whole pass, and hashing
/// one by content costs more than selecting).
pub(crate) struct Selections<'a> {
    index: Arc<SelectorIndex>,
    memo: FastMap<*const Selector, Rc<Vec<Identity>>>,
    _set: std::marker::PhantomData<&'a Selector>,
}

impl<'a> Selections<'a> {
    pub(crate) fn new(index: Arc<SelectorIndex>) -> Self {
        Selections {
            index,
            memo: FastMap::default(),
            _set: std::marker::PhantomData,
        }
    }

    pub(crate) fn select(&mut self, sel: &'a Selector) -> Rc<Vec<Identity>> {
        if let Some(r) = self.memo.get(&(sel as *const Selector)) {
            return r.clone();
        }
        let rc = Rc::new(self.index.select(sel));
        self.memo.insert(sel as *const Selector, rc.clone());
        rc
    }
}

struct Ctx<'a, 'w> {
    items: Vec<ItemInfo<'a>>,
    sel: Selections<'a>,
    world: &'w World,
    peer_memo: Vec<Option<Rc<Vec<Identity>>>>,
}

impl<'a> Ctx<'a, '_> {
    fn peer_ids(&mut self, idx: usize) -> Rc<Vec<Identity>> {
        if let Some(r) = &self.peer_memo[idx] {
            return r.clone();
        }
        let item = self.items[idx].item;
        let ids = peer_identities(
            &item.peers,
            &mut self.sel,
            &self.world.cidr_ids,
            &self.world.fqdn_ids,
            &self.world.workload_ids,
            &self.world.workload_addrs,
        );
        let rc = Rc::new(ids);
        self.peer_memo[idx] = Some(rc.clone());
        rc
    }

    /// Raw entries of one item for a subject with the given declared ports,
    /// appended to `out`. `Err` as soon as `out`, deduplicated, holds more than
    /// `limit` entries.
    fn expand(
        &mut self,
        idx: usize,
        subject_ports: &[NamedPort],
        out: &mut Vec<TEntry>,
        limit: usize,
    ) -> Result<(), Over> {
        let ids = self.peer_ids(idx);
        if ids.is_empty() {
            return Ok(());
        }
        let info = &self.items[idx];
        let (dir, verdict, rule, staged) = (info.dir, info.verdict, idx as u32, info.staged);
        let mut keys: Vec<PortKey> = Vec::new();
        let push = |id: Identity, keys: &[PortKey], out: &mut Vec<TEntry>| -> Result<(), Over> {
            for k in keys {
                out.push(TEntry {
                    dir,
                    id,
                    key: *k,
                    verdict,
                    rule,
                    staged,
                });
            }
            check_raw(out, limit)
        };
        match &info.item.l4 {
            L4::Any => keys.push(ANY_KEY),
            L4::Icmps(list) => {
                for t in list {
                    let p = match t.family {
                        Family::V4 => proto::ICMP,
                        Family::V6 => proto::ICMPV6,
                    };
                    keys.push(PortKey {
                        proto: p,
                        port: u16::from(t.ty),
                        prefix: 16,
                    });
                }
            }
            L4::Ports(list) => {
                for pp in list {
                    match &pp.port {
                        PortSpec::Number(n) => number_keys(*n, pp.end_port, pp.proto, &mut keys),
                        PortSpec::Named(name) => match dir {
                            // Ingress: the destination is the subject itself.
                            Direction::Ingress => {
                                named_keys(name, pp.proto, subject_ports, &mut keys)
                            }
                            // Egress: the destination is each peer; per-identity keys.
                            Direction::Egress => {
                                for &id in ids.iter() {
                                    let mut k = Vec::new();
                                    let declared: &[NamedPort] = if id == identity::ANY {
                                        &self.world.all_ports
                                    } else {
                                        self.world
                                            .ports_by_id
                                            .get(&id)
                                            .map(Vec::as_slice)
                                            .unwrap_or(&[])
                                    };
                                    named_keys(name, pp.proto, declared, &mut k);
                                    push(id, &k, out)?;
                                }
                            }
                        },
                    }
                }
            }
        }
        for &id in ids.iter() {
            push(id, &keys, out)?;
        }
        Ok(())
    }
}

/// The identities a rule item's peers stand for, sorted (just 0, any
/// identity, when they include it): selectors through the index over every
/// identity, CIDRs through the sorted CIDR identities (and, for a Kubernetes
/// ipBlock, the workloads' sorted addresses), entities as their reserved
/// identities and what `world` / `cluster` also cover, FQDN selectors as
/// the identities of their learned addresses (`policy::fqdn`). Shared with
/// `policy::lint`, which must expand peers as compile does.
pub(crate) fn peer_identities<'a>(
    peers: &'a Peers,
    index: &mut Selections<'a>,
    cidr_ids: &BTreeMap<IpNet, Identity>,
    fqdn_ids: &FqdnIds,
    workload_ids: &[Identity],
    workload_addrs: &[(IpAddr, Identity)],
) -> Vec<Identity> {
    let mut ids: Vec<Identity> = Vec::new();
    match peers {
        Peers::All => ids.push(identity::ANY),
        Peers::List(list) => {
            for p in list {
                match p {
                    Peer::Endpoints(sel) => ids.extend(index.select(sel).iter().copied()),
                    Peer::Cidr {
                        net,
                        except,
                        match_endpoints,
                    } => {
                        let net = net.trunc();
                        if net.prefix_len() == 0 {
                            ids.push(match net {
                                IpNet::V4(_) => identity::WORLD_IPV4,
                                IpNet::V6(_) => identity::WORLD_IPV6,
                            });
                        }
                        // Only prefixes whose network address lies in `net` can be
                        // inside it: a range of the sorted map, not a scan (thousands
                        // of CIDR peers against thousands of prefixes is quadratic).
                        for (p, id) in cidr_ids.range(within(&net)) {
                            if net_contains(&net, p) && !except.iter().any(|e| net_contains(e, p)) {
                                ids.push(*id);
                            }
                        }
                        if *match_endpoints {
                            // The addresses are sorted: those from the net's first
                            // to its last address, not a scan per peer.
                            let (lo, hi) = (net.network(), net.broadcast());
                            let start = workload_addrs.partition_point(|(a, _)| *a < lo);
                            for (a, id) in
                                workload_addrs[start..].iter().take_while(|(a, _)| *a <= hi)
                            {
                                if net.contains(a) && !except.iter().any(|e| e.contains(a)) {
                                    ids.push(*id);
                                }
                            }
                        }
                    }
                    // The learned addresses of the names it matches; none
                    // learned, it allows nothing.
                    Peer::Fqdn(sel) => ids.extend(fqdn_ids.of(sel).iter().copied()),
                    Peer::Entity(e) => match identity::entity_reserved(*e) {
                        None => ids.push(identity::ANY),
                        Some(r) => {
                            ids.extend(r);
                            match e {
                                Entity::World => ids.extend(cidr_ids.values().copied()),
                                Entity::WorldIpv4 => ids.extend(
                                    cidr_ids
                                        .iter()
                                        .filter(|(n, _)| matches!(n, IpNet::V4(_)))
                                        .map(|(_, i)| *i),
                                ),
                                Entity::WorldIpv6 => ids.extend(
                                    cidr_ids
                                        .iter()
                                        .filter(|(n, _)| matches!(n, IpNet::V6(_)))
                                        .map(|(_, i)| *i),
                                ),
                                Entity::Cluster => ids.extend(workload_ids.iter().copied()),
                                _ => {}
                            }
                        }
                    },
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.first() == Some(&identity::ANY) {
        ids.truncate(1);
    }
    ids
}

/// A template went over the entry limit.
#[derive(Debug)]
struct Over;

/// Compact `out` (as [`finish_entries`] does at the end) once it holds twice the
/// limit, so duplicates alone never refuse a set; `Err` when even the compacted
/// entries exceed the limit. Compacting only at twice the limit keeps the cost
/// amortised: at least `limit` pushes separate two compactions.
fn check_raw(out: &mut Vec<TEntry>, limit: usize) -> Result<(), Over> {
    if out.len() > limit.saturating_mul(2) {
        let n = if out.iter().any(|e| e.staged) {
            staged::compact(out)
        } else {
            finish_entries(out);
            out.len()
        };
        if n > limit {
            return Err(Over);
        }
    }
    Ok(())
}

/// Deduplicate keys (deny wins, then the lowest rule) and drop allows that a deny of
/// the same identity covers (they would shadow it under longest-prefix match).
fn finish_entries(raw: &mut Vec<TEntry>) {
    raw.sort_unstable_by(|a, b| {
        (a.dir, a.id, a.key, std::cmp::Reverse(a.verdict), a.rule).cmp(&(
            b.dir,
            b.id,
            b.key,
            std::cmp::Reverse(b.verdict),
            b.rule,
        ))
    });
    raw.dedup_by(|b, a| a.dir == b.dir && a.id == b.id && a.key == b.key);
    // Per (dir, id) group: remove allows covered by a deny of the same group.
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let mut j = i;
        while j < raw.len() && raw[j].dir == raw[i].dir && raw[j].id == raw[i].id {
            j += 1;
        }
        let group = &raw[i..j];
        let denies: Vec<PortKey> = group
            .iter()
            .filter(|e| e.verdict == EntryVerdict::Deny)
            .map(|e| e.key)
            .collect();
        for e in group {
            if e.verdict == EntryVerdict::Allow && denies.iter().any(|d| key_covers(d, &e.key)) {
                continue;
            }
            out.push(*e);
        }
        i = j;
    }
    *raw = out;
}

/// Does key `outer` cover every packet key `inner` covers?
fn key_covers(outer: &PortKey, inner: &PortKey) -> bool {
    if outer.proto == 0 {
        return true;
    }
    if outer.proto != inner.proto || outer.prefix > inner.prefix {
        return false;
    }
    super::lookup::prefix_covers(outer.port, outer.prefix, inner.port)
}

/// Compiles policy sets against registries incrementally (Cilium's selector
/// cache is the model): a `Compiler` keeps what one compile computed from
/// each part of its inputs, and the next one computes again only what its
/// change touches:
/// - the registry's share (resolution and identity numbering, `RegistryPart`)
///   while the registry and the node name stay equal;
/// - the identities, the ipcache and the selector index over the identities
///   (`World`) while those, the policies' CIDR prefixes and this host's
///   addresses stay equal;
/// - each rule's subject selection while its policy's rules stay the same
///   (`Policy::rules`, shared between the sets a loader builds) and the
///   identities do;
/// - the entries of each group of endpoints (a template: the endpoints one
///   list of rules selects, with the same named ports) while those rules,
///   their rule references and the identities stay the same.
///
/// So a policy change expands again only the endpoints the changed policy
/// selects or selected, and a registry change that keeps every identity
/// (an endpoint replaced under a label set that already has one) costs its
/// ipcache and endpoint table, not a selection or an expansion. Whatever it
/// kept, the result is the one a fresh compile ([`try_compile`]) gives (the
/// property test `incremental_compile_equals_full_compile` holds it). The
/// daemon owns one; each `netpolctl` command makes its own (or calls
/// [`try_compile`]).
#[derive(Debug, Default)]
pub struct Compiler {
    kept: Option<RegistryPart>,
    cache: Cache,
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// Compile the whole state within `opts.limits` (see [`Limits`] for what
    /// counts). Deterministic; a refused set costs at most about twice the
    /// limit's worth of entries in time and memory.
    pub fn compile(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        let print = fingerprint(registry);
        self.compile_as(policies, registry, print, opts)
    }

    /// [`Compiler::compile`] of a registry its caller numbers: the same
    /// `revision` stands for the same registry (the pipeline's count of the
    /// registries it held), so it is not looked at again to be recognised.
    /// Revisions and the contents [`Compiler::compile`] recognises never
    /// stand for each other.
    pub fn compile_revision(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        revision: u64,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        // A fingerprint is this number with a chance of 2^-128.
        let id = (1u128 << 127) | u128::from(revision);
        self.compile_as(policies, registry, id, opts)
    }

    fn compile_as(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        print: u128,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        let fresh = !self
            .kept
            .as_ref()
            .is_some_and(|p| p.node_name == opts.node_name && p.registry == print);
        if fresh {
            // From the last registry's share where the node and namespaces
            // are the same: only the endpoints the change added are resolved.
            let mut part = match self.kept.take() {
                Some(prev) => prev.update(registry, &opts.node_name),
                None => RegistryPart::of(registry, &opts.node_name),
            };
            part.registry = print;
            self.kept = Some(part);
        }
        let part = self.kept.as_ref().expect("kept above");
        let result = compile_with(policies, registry, part, opts, &mut self.cache);
        self.cache.stats.endpoints_resolved = if fresh { part.resolved_now } else { 0 };
        result
    }

    /// What the last compile computed again and what it kept.
    pub fn stats(&self) -> CompileStats {
        self.cache.stats
    }
}

/// Compile the whole state without the map budget ([`Limits::UNLIMITED`]):
/// for tests and callers whose input is already bounded. Whatever reads user
/// files uses [`try_compile`] or a [`Compiler`].
pub fn compile(policies: &PolicySet, registry: &RegistrySet, opts: &CompileOptions) -> Compiled {
    // Never an error (no count exceeds usize::MAX); an empty state would be the safe answer.
    try_compile(
        policies,
        registry,
        &CompileOptions {
            limits: Limits::UNLIMITED,
            ..opts.clone()
        },
    )
    .unwrap_or_default()
}

/// One compile within `opts.limits`, with nothing kept ([`Compiler::compile`]
/// from nothing).
pub fn try_compile(
    policies: &PolicySet,
    registry: &RegistrySet,
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let part = RegistryPart::of(registry, &opts.node_name);
    compile_with(policies, registry, &part, opts, &mut Cache::default())
}

/// What a [`Compiler`] keeps between compiles besides the registry's share.
/// Everything in it is keyed by all it was computed from, so a hit is what a
/// fresh compile would compute.
#[derive(Debug, Default)]
struct Cache {
    world: Option<World>,
    /// Worlds built so far: a world's number, in what was computed over it.
    worlds: u64,
    /// Compiles so far: what the last successful one did not use is dropped.
    passes: u64,
    /// Per policy, by the address of its shared rules (kept alive here, so
    /// the address names these rules while the entry lives).
    subjects: FastMap<usize, SubjectMemo>,
    /// Group templates, with the pass that last used each.
    templates: FastMap<TemplateKey, (Arc<Template>, u64)>,
    /// Per policy, by its address (kept alive here): the rule refs of its
    /// items, in item order, and the pass that last used them.
    refs: FastMap<usize, PolicyRefs>,
    /// The files, kinds and item paths those refs share.
    names: Names,
    stats: CompileStats,
}

/// What the last compile of a [`Compiler`] computed again and what it kept
/// (for the daemon's log and the tests that hold the kept parts to be used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompileStats {
    /// The identities and ipcache were built again (the registry, this
    /// host's addresses or the policies' CIDR prefixes changed).
    pub world_built: bool,
    /// ... and their identities, named ports and CIDR identities were not
    /// those of the last world (so every selection was made again).
    pub identities_changed: bool,
    /// Rule subjects selected (the others were kept).
    pub subjects_selected: usize,
    /// Group templates expanded, and those kept from an earlier compile.
    pub templates_built: usize,
    pub templates_kept: usize,
    /// Registry endpoints resolved (labels, placement) for this compile: all
    /// of them from nothing, the added ones when the last registry's share
    /// was updated, none for the same registry.
    pub endpoints_resolved: usize,
}

/// The subject selections of one policy's rules.
#[derive(Debug)]
struct SubjectMemo {
    /// Held so that the address it is found by names these rules.
    _rules: Arc<[Rule]>,
    /// The world they were selected in.
    world: u64,
    /// Per rule: the workload identities its endpointSelector selects
    /// (`None` for a nodeSelector or one not selected yet).
    selected: Vec<Option<Arc<[u32]>>>,
    used: u64,
}

/// What a group template is a function of (with the world's number standing
/// for the identities, named ports and prefixes the peers expand over).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TemplateKey {
    rules: Vec<RuleKey>,
    ports: Vec<NamedPort>,
    workload: bool,
    localhost: Option<u32>,
    world: u64,
    /// The world's `addrs_version` when a rule has an ipBlock peer (else 0).
    addrs: u64,
    limit: usize,
}

/// One rule as a template depends on it: its content (the address of its
/// policy's shared rules, alive while a template refers to it, and its index
/// there), its policy's staging and the rule references its items and
/// default deny get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RuleKey {
    rules: usize,
    index: u32,
    staged: bool,
    first_item: u32,
    default_deny_refs: [Option<u32>; 2],
}

/// What a world is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WorldKey {
    /// The registry's fingerprint (0: not kept, never reused).
    registry: u128,
    node_name: String,
    host_addresses: Vec<IpAddr>,
    /// The policies' CIDR prefixes (and excepts), sorted, distinct.
    cidrs: Vec<IpNet>,
    /// The DNS proxy's learned addresses of the policies' FQDN selectors.
    learned: fqdn::LearnedPrefixes,
    ipcache_limit: usize,
}

/// One claim on an ipcache prefix: (prefix, priority (highest first), order
/// among equal claims, identity, endpoint slot). An endpoint's claims are
/// ordered by (slot, address index): `(slot << 32) | index`.
type Claim = (IpNet, std::cmp::Reverse<u8>, u64, Identity, Option<u32>);

/// The priority of an endpoint's claim (the highest: see [`World::build`]).
const ENDPOINT_CLAIM: u8 = 4;

/// The identities and the ipcache of one registry, node and set of CIDR
/// prefixes, with what peers are expanded through.
#[derive(Debug)]
struct World {
    key: WorldKey,
    /// The number of its identities, named ports and CIDR identities
    /// ([`Cache::worlds`]): a world computed from another registry that
    /// gives the same has the same number, so what was selected and
    /// expanded over the one holds for the other.
    version: u64,
    /// The same for its workload addresses (what a Kubernetes ipBlock peer
    /// also matches).
    addrs_version: u64,
    cidr_ids: BTreeMap<IpNet, Identity>,
    /// The identities each FQDN selector stands for (among `cidr_ids`).
    fqdn_ids: FqdnIds,
    identities: Vec<IdentityInfo>,
    /// Every claim on a prefix, sorted: the first of each prefix is its
    /// ipcache entry. Kept so that a registry change patches it.
    claims: Vec<Claim>,
    /// The Node entries' claims (priority 2), in registry order.
    node_claims: Vec<(IpNet, Identity)>,
    ipcache: Vec<IpcacheEntry>,
    workload_ids: Vec<Identity>,
    /// (address, identity) of every workload endpoint, for ipBlock; sorted.
    workload_addrs: Vec<(IpAddr, Identity)>,
    /// Named ports declared by endpoints with each identity.
    ports_by_id: FastMap<Identity, Vec<NamedPort>>,
    all_ports: Vec<NamedPort>,
    index: Arc<SelectorIndex>,
}

impl World {
    /// The same identities (labels included), named ports and CIDR
    /// identities as `other`.
    fn same_identities(&self, other: &World) -> bool {
        self.cidr_ids == other.cidr_ids
            && self.fqdn_ids == other.fqdn_ids
            && self.workload_ids == other.workload_ids
            && self.all_ports == other.all_ports
            && self.ports_by_id == other.ports_by_id
            && self.identities.len() == other.identities.len()
            && self.identities.iter().zip(&other.identities).all(|(a, b)| {
                a.id == b.id && (Arc::ptr_eq(&a.labels, &b.labels) || a.labels == b.labels)
            })
    }

    /// Build the world of `key`, numbered as `prev` where it gives the same
    /// (and from `worlds` where not). Where `prev` was built over the share
    /// `part` was updated from, with the same node, host addresses, CIDR
    /// prefixes and Node entries, its ipcache claims and workload addresses
    /// are patched with the endpoints the update removed and added (and its
    /// identities kept when no label set appeared or went): what a build
    /// from nothing gives, at the cost of the change.
    #[allow(clippy::too_many_arguments)]
    fn build(
        key: WorldKey,
        prev: Option<&World>,
        worlds: &mut u64,
        part: &RegistryPart,
        resolved: &[ResolvedEndpoint<'_>],
        ep_ids: &[Identity],
        registry: &RegistrySet,
        opts: &CompileOptions,
    ) -> World {
        let mut node_claims = Vec::new();
        for node in &registry.nodes {
            let id = if !opts.node_name.is_empty() && node.name == opts.node_name {
                identity::HOST
            } else {
                identity::REMOTE_NODE
            };
            node_claims.extend(node.addresses.iter().map(|a| (host_net(*a), id)));
        }
        let patch = part.delta.as_ref().and_then(|d| {
            let p = prev?;
            (p.key.registry != 0
                && p.key.registry == d.from
                && p.key.node_name == key.node_name
                && p.key.host_addresses == key.host_addresses
                && p.key.cidrs == key.cidrs
                && p.key.learned == key.learned
                && p.node_claims == node_claims)
                .then_some((p, d))
        });

        // --- identities: the workloads' label sets, the reserved ones and
        // the CIDR prefixes'.
        // A patch that keeps the last world's identities (no label set came
        // or went).
        let same_ids = patch.filter(|(_, d)| d.same_sets);
        let (cidr_ids, fqdn_ids, identities, workload_ids) = match same_ids {
            Some((p, _)) => (
                p.cidr_ids.clone(),
                p.fqdn_ids.clone(),
                p.identities.clone(),
                p.workload_ids.clone(),
            ),
            None => {
                let mut cidr_ids = identity::allocate_cidrs(key.cidrs.iter().copied());
                let fqdn_ids = fqdn::allocate(&mut cidr_ids, &key.learned);
                // Every identity's labels, shared (not copied) into the output.
                let mut id_labels: BTreeMap<Identity, Arc<[Label]>> = identity::RESERVED
                    .iter()
                    .map(|(id, n)| (*id, labels::reserved_labels(n).into()))
                    .collect();
                let mut workload_ids: Vec<Identity> = Vec::new();
                for (id, ls) in part.workload_identities() {
                    id_labels.insert(id, ls.clone());
                    workload_ids.push(id);
                }
                workload_ids.sort_unstable();
                for (n, id) in &cidr_ids {
                    id_labels.insert(*id, identity::cidr_labels(n).into());
                }
                let identities: Vec<IdentityInfo> = id_labels
                    .into_iter()
                    .map(|(id, labels)| IdentityInfo { id, labels })
                    .collect();
                (cidr_ids, fqdn_ids, identities, workload_ids)
            }
        };

        // --- ipcache: priority endpoint > host address > node > CIDR > /0.
        // Every claim, then per prefix the one of highest priority (the first
        // of those): a sort of one vector, not a tree of 200,000 nodes.
        let endpoint_claims = |slot: u32, out: &mut Vec<Claim>| {
            let r = &resolved[slot as usize];
            for (i, a) in r.def.addresses.iter().enumerate() {
                let order = (u64::from(slot) << 32) | i as u64;
                let prio = std::cmp::Reverse(ENDPOINT_CLAIM);
                out.push((host_net(*a), prio, order, ep_ids[slot as usize], Some(slot)));
            }
        };
        let claims: Vec<Claim> = match patch {
            Some((p, d)) => {
                // The last claims less the removed endpoints', the kept ones
                // at their slot now (in the same order: kept slots keep
                // theirs), merged with the added endpoints' claims.
                let mut added: Vec<Claim> = Vec::new();
                for slot in &d.added {
                    endpoint_claims(*slot, &mut added);
                }
                added.sort_unstable_by_key(|c| (c.0, c.1, c.2));
                let kept = p.claims.iter().filter_map(|c| match c.4 {
                    None => Some(*c),
                    Some(old) => {
                        let now = d.slot_now[old as usize];
                        (now != part::Delta::GONE).then(|| {
                            let order = (u64::from(now) << 32) | (c.2 & 0xffff_ffff);
                            (c.0, c.1, order, ep_ids[now as usize], Some(now))
                        })
                    }
                });
                merge_sorted(kept, added, p.claims.len(), |c| (c.0, c.1, c.2))
            }
            None => {
                let n_claims = 2
                    + cidr_ids.len()
                    + key.host_addresses.len()
                    + node_claims.len()
                    + resolved.len() * 2;
                let mut ipc: Vec<Claim> = Vec::with_capacity(n_claims);
                let mut put = |net: IpNet, prio: u8, id: Identity| {
                    let seq = ipc.len() as u64;
                    ipc.push((net, std::cmp::Reverse(prio), seq, id, None));
                };
                put(
                    "0.0.0.0/0".parse().expect("static prefix"),
                    0,
                    identity::WORLD_IPV4,
                );
                put(
                    "::/0".parse().expect("static prefix"),
                    0,
                    identity::WORLD_IPV6,
                );
                for (n, id) in &cidr_ids {
                    put(*n, 1, *id);
                }
                for (net, id) in &node_claims {
                    put(*net, 2, *id);
                }
                for a in &key.host_addresses {
                    put(host_net(*a), 3, identity::HOST);
                }
                for slot in 0..resolved.len() as u32 {
                    endpoint_claims(slot, &mut ipc);
                }
                ipc.sort_unstable_by_key(|c| (c.0, c.1, c.2));
                ipc
            }
        };
        let mut ipcache: Vec<IpcacheEntry> = Vec::with_capacity(claims.len());
        for &(net, _, _, identity, endpoint) in &claims {
            if ipcache.last().is_none_or(|e| e.net != net) {
                ipcache.push(IpcacheEntry {
                    net,
                    identity,
                    endpoint,
                });
            }
        }

        // --- peer lookup structures: the named ports are the last world's
        // when the identities are and no endpoint with ports came or went
        // (the kept ones keep their order).
        let (ports_by_id, all_ports) = match same_ids {
            Some((p, d)) if d.same_ports => (p.ports_by_id.clone(), p.all_ports.clone()),
            _ => {
                let mut ports_by_id: FastMap<Identity, Vec<NamedPort>> = FastMap::default();
                let mut all_ports: Vec<NamedPort> = Vec::new();
                for (r, id) in resolved.iter().zip(ep_ids) {
                    if !r.def.ports.is_empty() {
                        ports_by_id
                            .entry(*id)
                            .or_default()
                            .extend(r.def.ports.iter().cloned());
                        all_ports.extend(r.def.ports.iter().cloned());
                    }
                }
                (ports_by_id, all_ports)
            }
        };
        let workload_addrs = match same_ids {
            // The identities are the last world's, so are the kept
            // endpoints': the removed endpoints' addresses out (their claims
            // name them), the added ones' in.
            Some((p, d)) => {
                let is_wl =
                    |id: &Identity| (identity::WORKLOAD_MIN..identity::WORKLOAD_END).contains(id);
                let mut gone: Vec<(IpAddr, Identity)> = p
                    .claims
                    .iter()
                    .filter(|c| {
                        c.4.is_some_and(|s| d.slot_now[s as usize] == part::Delta::GONE)
                    })
                    .filter(|c| is_wl(&c.3))
                    .map(|c| (c.0.addr(), c.3))
                    .collect();
                gone.sort_unstable();
                let mut new: Vec<(IpAddr, Identity)> = Vec::new();
                for slot in &d.added {
                    let r = &resolved[*slot as usize];
                    if r.def.kind == EndpointKind::Workload {
                        let id = ep_ids[*slot as usize];
                        new.extend(r.def.addresses.iter().map(|a| (*a, id)));
                    }
                }
                new.sort_unstable();
                let mut gone = gone.into_iter().peekable();
                let kept = p.workload_addrs.iter().copied().filter(|w| {
                    while gone.next_if(|g| g < w).is_some() {}
                    gone.next_if_eq(w).is_none()
                });
                merge_sorted(kept, new, p.workload_addrs.len(), |w| *w)
            }
            None => {
                let mut workload_addrs = Vec::new();
                for (r, id) in resolved.iter().zip(ep_ids) {
                    if r.def.kind == EndpointKind::Workload {
                        workload_addrs.extend(r.def.addresses.iter().map(|a| (*a, *id)));
                    }
                }
                workload_addrs.sort_unstable();
                workload_addrs
            }
        };
        let mut w = World {
            key,
            version: 0,
            addrs_version: 0,
            cidr_ids,
            fqdn_ids,
            identities,
            claims,
            node_claims,
            ipcache,
            workload_ids,
            workload_addrs,
            ports_by_id,
            all_ports,
            index: Arc::new(SelectorIndex::default()),
        };
        let mut next = || {
            *worlds += 1;
            *worlds
        };
        match prev {
            Some(p) if w.same_identities(p) => {
                w.version = p.version;
                // The old index selects as a new one would, and is shared.
                w.index = p.index.clone();
            }
            _ => {
                w.version = next();
                let ids = w.identities.iter().map(|i| (i.id, i.labels.clone()));
                w.index = Arc::new(SelectorIndex::new(ids.collect()));
            }
        }
        w.addrs_version = match prev {
            Some(p) if p.workload_addrs == w.workload_addrs => p.addrs_version,
            _ => next(),
        };
        w
    }
}

/// `kept` and `added`, both sorted by `key`, in one sorted vector (on equal
/// keys `kept`'s first).
fn merge_sorted<T, K: Ord>(
    kept: impl Iterator<Item = T>,
    added: Vec<T>,
    capacity: usize,
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    let mut out = Vec::with_capacity(capacity + added.len());
    let mut added = added.into_iter().peekable();
    for k in kept {
        while let Some(a) = added.next_if(|a| key(a) < key(&k)) {
            out.push(a);
        }
        out.push(k);
    }
    out.extend(added);
    out
}

fn compile_with(
    policies: &PolicySet,
    registry: &RegistrySet,
    part: &RegistryPart,
    opts: &CompileOptions,
    cache: &mut Cache,
) -> Result<Compiled, CompileError> {
    let limits = opts.limits;
    let (resolved, ep_ids) = part.resolved(registry);
    cache.passes += 1;
    let pass = cache.passes;
    cache.stats = CompileStats::default();

    // --- rules and items, in policy order: an item's index is its rule ref.
    let mut rule_refs: Vec<RuleRef> = Vec::new();
    let mut items: Vec<ItemInfo<'_>> = Vec::new();
    let mut rules: Vec<RuleInfo<'_>> = Vec::new();
    // Each CIDR prefix with the item that names it (for the ipcache budget).
    let mut cidr_prefixes: Vec<(IpNet, u32)> = Vec::new();
    // Each toFQDNs selector with the item that names it (the same budget).
    let mut fqdn_sels: Vec<(&FqdnSelector, u32)> = Vec::new();
    let mut any_dns = false;
    for pol in &policies.policies {
        let refs = policy_refs(&mut cache.refs, &mut cache.names, pol, pass);
        let mut refs = refs.iter();
        for (index, rule) in pol.rules.iter().enumerate() {
            let mut idxs = Vec::new();
            let dirs: [(&Vec<RuleItem>, Direction, EntryVerdict); 4] = [
                (&rule.ingress, Direction::Ingress, EntryVerdict::Allow),
                (&rule.ingress_deny, Direction::Ingress, EntryVerdict::Deny),
                (&rule.egress, Direction::Egress, EntryVerdict::Allow),
                (&rule.egress_deny, Direction::Egress, EntryVerdict::Deny),
            ];
            let first_item = items.len() as u32;
            let mut uses_addrs = false;
            for (list, dir, verdict) in dirs {
                for item in list {
                    if let Peers::List(ps) = &item.peers {
                        for p in ps {
                            if let Peer::Fqdn(sel) = p {
                                fqdn_sels.push((sel, items.len() as u32));
                            }
                            if let Peer::Cidr {
                                net,
                                except,
                                match_endpoints,
                            } = p
                            {
                                uses_addrs |= *match_endpoints;
                                let at = items.len() as u32;
                                if net.prefix_len() > 0 {
                                    cidr_prefixes.push((net.trunc(), at));
                                }
                                cidr_prefixes.extend(
                                    except
                                        .iter()
                                        .filter(|e| e.prefix_len() > 0)
                                        .map(|e| (e.trunc(), at)),
                                );
                            }
                        }
                    }
                    any_dns |= !item.dns.is_empty();
                    idxs.push(items.len() as u32);
                    items.push(ItemInfo {
                        item,
                        origin: &pol.origin,
                        dir,
                        verdict,
                        staged: pol.staged,
                    });
                    rule_refs.push(refs.next().expect("one ref per item").clone());
                }
            }
            rules.push(RuleInfo {
                rule,
                shared: &pol.rules,
                index: index as u32,
                first_item,
                uses_addrs,
                items: idxs,
                staged: pol.staged,
                default_deny_refs: [None; 2],
            });
        }
    }
    let localhost_rule = if opts.allow_localhost {
        rule_refs.push(RuleRef {
            file: Path::new("").into(),
            kind: "config".into(),
            policy: "allow_localhost".into(),
            path: "allow_localhost".into(),
            staged: false,
            default_deny: false,
        });
        Some((rule_refs.len() - 1) as u32)
    } else {
        None
    };
    // The default deny of each staged rule, numbered after every item (and the
    // config's): what a would-be drop by it is reported with.
    staged::default_deny_refs(policies, &mut rules, &mut rule_refs);

    // --- identities, ipcache and the selector index: kept while what they
    // are computed from stays equal (the DNS proxy's learned addresses too).
    let learned = fqdn::learned_prefixes(&opts.fqdn, fqdn_sels.iter().map(|(s, _)| *s));
    let mut cidrs: Vec<IpNet> = cidr_prefixes.iter().map(|(n, _)| *n).collect();
    cidrs.sort_unstable();
    cidrs.dedup();
    let key = WorldKey {
        registry: part.registry,
        node_name: opts.node_name.clone(),
        host_addresses: opts.host_addresses.clone(),
        cidrs,
        learned,
        ipcache_limit: limits.ipcache_entries,
    };
    let Cache {
        world,
        worlds,
        subjects,
        templates,
        refs,
        stats,
        ..
    } = cache;
    if world
        .as_ref()
        .is_none_or(|w| w.key != key || w.key.registry == 0)
    {
        let next = World::build(
            key,
            world.as_ref(),
            worlds,
            part,
            &resolved,
            &ep_ids,
            registry,
            opts,
        );
        // Its ipcache holds each distinct prefix `check_ipcache` counts:
        // over the budget, that names what to blame.
        if next.ipcache.len() > limits.ipcache_entries {
            check_ipcache(
                &items,
                &cidr_prefixes,
                &fqdn_sels,
                &next.key.learned,
                registry,
                opts,
            )?;
        }
        stats.world_built = true;
        stats.identities_changed = world.as_ref().is_none_or(|w| w.version != next.version);
        *world = Some(next);
    }
    let world = world.as_ref().expect("built above");
    let n_items = items.len();
    let mut ctx = Ctx {
        items,
        sel: Selections::new(world.index.clone()),
        world,
        peer_memo: vec![None; n_items],
    };

    // --- which rules select which endpoint.
    let mut rules_by_wl_id: FastMap<Identity, Vec<u32>> = FastMap::default();
    let mut rules_by_slot: Vec<Vec<u32>> = vec![Vec::new(); resolved.len()];
    // Host endpoints come last in slot order.
    let first_host = resolved.partition_point(|r| r.def.kind != EndpointKind::Host);
    for (ri, info) in rules.iter().enumerate() {
        let sel = match &info.rule.subject {
            Subject::Endpoints(sel) => sel,
            Subject::Nodes(sel) => {
                // Few, and numbered by slot (which a registry change moves):
                // matched every time.
                for (slot, r) in resolved.iter().enumerate().skip(first_host) {
                    if labels::selector_matches(sel, &r.labels) {
                        rules_by_slot[slot].push(ri as u32);
                    }
                }
                continue;
            }
        };
        let memo = subjects
            .entry(info.shared.as_ptr() as usize)
            .or_insert_with(|| SubjectMemo {
                _rules: info.shared.clone(),
                world: world.version,
                selected: vec![None; info.shared.len()],
                used: pass,
            });
        if memo.world != world.version {
            memo.world = world.version;
            memo.selected.iter_mut().for_each(|s| *s = None);
        }
        memo.used = pass;
        let selected = memo.selected[info.index as usize].get_or_insert_with(|| {
            stats.subjects_selected += 1;
            ctx.sel
                .select(sel)
                .iter()
                .copied()
                .filter(|id| (identity::WORKLOAD_MIN..identity::WORKLOAD_END).contains(id))
                .collect()
        });
        for id in selected.iter() {
            rules_by_wl_id.entry(*id).or_default().push(ri as u32);
        }
    }

    // --- templates, one per (rules, declared ports, kind); kept between
    // compiles by what they are computed from.
    type TKey = (Vec<u32>, Vec<NamedPort>, bool);
    let mut group_templates: FastMap<TKey, Arc<Template>> = FastMap::default();
    // The same, by the address of the rule list (one per workload identity,
    // one per host endpoint) for endpoints that declare no named port: most
    // endpoints find their template here without copying, hashing and
    // comparing their rule list (at 100k endpoints that was 5% of a change).
    let mut list_templates: FastMap<(usize, bool), Arc<Template>> = FastMap::default();
    // The flags of a rule list, by its address, for endpoints not enforced here.
    let mut list_flags: FastMap<usize, Template> = FastMap::default();
    let mut endpoints: Vec<CompiledEndpoint> = Vec::with_capacity(resolved.len());
    let mut entries: Vec<PolicyEntry> = Vec::new();
    let mut dns: Vec<fqdn::EndpointDns> = Vec::new();
    // Entries per node (`None` = this host): each is one host's policy map.
    let mut per_node: HashMap<Option<&str>, usize> = HashMap::new();
    let no_rules: Vec<u32> = Vec::new();
    for (slot, (r, id)) in resolved.iter().zip(&ep_ids).enumerate() {
        let is_wl = r.def.kind == EndpointKind::Workload;
        let rule_list = if is_wl {
            rules_by_wl_id.get(id).unwrap_or(&no_rules)
        } else {
            &rules_by_slot[slot]
        };
        let list_at = rule_list as *const Vec<u32> as usize;
        if opts.local_entries_only && !r.local {
            // Not enforced here: its flags (for `endpoints`), no entries.
            let t = list_flags
                .entry(list_at)
                .or_insert_with(|| template_flags(&rules, rule_list));
            endpoints.push(compiled_endpoint(slot as u32, r, *id, t, opts));
            continue;
        }
        let fast = r.def.ports.is_empty().then_some((list_at, is_wl));
        let t = match fast.and_then(|k| list_templates.get(&k)) {
            Some(t) => t.clone(),
            None => {
                let key: TKey = (rule_list.clone(), r.def.ports.clone(), is_wl);
                let t = match group_templates.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        let tkey = TemplateKey {
                            rules: key.0.iter().map(|ri| rules[*ri as usize].key()).collect(),
                            ports: key.1.clone(),
                            workload: is_wl,
                            localhost: localhost_rule,
                            world: world.version,
                            addrs: if key.0.iter().any(|ri| rules[*ri as usize].uses_addrs) {
                                world.addrs_version
                            } else {
                                0
                            },
                            limit: limits.policy_entries,
                        };
                        let t = match templates.get_mut(&tkey) {
                            Some((t, used)) => {
                                *used = pass;
                                stats.templates_kept += 1;
                                t.clone()
                            }
                            None => {
                                stats.templates_built += 1;
                                let t = build_template(
                                    &mut ctx,
                                    &rules,
                                    &key.0,
                                    &r.def.ports,
                                    is_wl,
                                    localhost_rule,
                                    limits.policy_entries,
                                )
                                .map_err(|item| {
                                    over_endpoint(&ctx.items, item, r, limits.policy_entries)
                                })?;
                                let t = Arc::new(t);
                                templates.insert(tkey, (t.clone(), pass));
                                t
                            }
                        };
                        group_templates.insert(key, t.clone());
                        t
                    }
                };
                if let Some(k) = fast {
                    list_templates.insert(k, t.clone());
                }
                t
            }
        };
        let node = if r.this_node {
            None
        } else {
            r.def.node.as_deref()
        };
        let on_node = per_node.entry(node).or_insert(0);
        *on_node += t.entries.len();
        if *on_node > limits.policy_entries {
            return Err(over_node(
                &ctx.items,
                &t.entries,
                r,
                node,
                limits.policy_entries,
            ));
        }
        let slot = slot as u32;
        entries.extend(t.entries.iter().map(|e| PolicyEntry {
            endpoint: slot,
            direction: e.dir,
            identity: e.id,
            proto: e.key.proto,
            port: e.key.port,
            port_prefix: e.key.prefix,
            verdict: e.verdict,
            rule: e.rule,
        }));
        endpoints.push(compiled_endpoint(slot, r, *id, &t, opts));
        if any_dns {
            dns.extend(endpoint_dns(&mut ctx, &rules, rule_list, slot));
        }
    }
    debug_assert!(entries.windows(2).all(|w| w[0] < w[1]));
    // What this compile did not use is of no use to the next.
    subjects.retain(|_, m| m.used == pass);
    templates.retain(|_, (_, used)| *used == pass);
    refs.retain(|_, (_, _, used)| *used == pass);
    cache.names.unused_dropped();

    Ok(Compiled {
        identities: world.identities.clone(),
        ipcache: world.ipcache.clone(),
        endpoints,
        entries,
        rules: rule_refs,
        dns,
    })
}

/// The DNS rules of the endpoint at `slot` from its enforced egress allow
/// items (staged policies' DNS rules steer nothing), if it has any.
fn endpoint_dns(
    ctx: &mut Ctx<'_, '_>,
    rules: &[RuleInfo<'_>],
    rule_list: &[u32],
    slot: u32,
) -> Option<fqdn::EndpointDns> {
    let idxs: Vec<usize> = rule_list
        .iter()
        .flat_map(|&ri| rules[ri as usize].items.iter().map(|&i| i as usize))
        .filter(|&i| {
            let info = &ctx.items[i];
            info.dir == Direction::Egress
                && info.verdict == EntryVerdict::Allow
                && !info.staged
                && !info.item.dns.is_empty()
        })
        .collect();
    if idxs.is_empty() {
        return None;
    }
    let servers: Vec<Rc<Vec<Identity>>> = idxs.iter().map(|&i| ctx.peer_ids(i)).collect();
    let items: Vec<fqdn::DnsItem<'_>> = idxs
        .iter()
        .zip(&servers)
        .map(|(&i, s)| fqdn::DnsItem {
            rule: i as u32,
            item: ctx.items[i].item,
            servers: s,
        })
        .collect();
    let ports = fqdn::dns_ports(&items, |id| {
        if id == identity::ANY {
            &ctx.world.all_ports
        } else {
            ctx.world
                .ports_by_id
                .get(&id)
                .map(Vec::as_slice)
                .unwrap_or(&[])
        }
    });
    Some(fqdn::EndpointDns {
        endpoint: slot,
        ports,
    })
}

fn compiled_endpoint(
    slot: u32,
    r: &ResolvedEndpoint<'_>,
    id: Identity,
    t: &Template,
    opts: &CompileOptions,
) -> CompiledEndpoint {
    CompiledEndpoint {
        slot,
        name: r.def.name.clone(),
        namespace: r.def.namespace.clone(),
        kind: r.def.kind,
        identity: id,
        local: r.local,
        interface: r.def.interface.clone(),
        addresses: r.def.addresses.clone(),
        default_deny_ingress: t.default_deny_ingress,
        default_deny_egress: t.default_deny_egress,
        enforced_ingress: t.enforced_ingress,
        enforced_egress: t.enforced_egress,
        audit: opts.audit || r.def.audit,
    }
}

/// The enforcement flags the rules of `rule_list` give an endpoint (no
/// entries), noting staged rules' default denies in `staged`.
fn flags_into(
    rules: &[RuleInfo<'_>],
    rule_list: &[u32],
    t: &mut Template,
    staged: &mut staged::Staged,
) {
    for &ri in rule_list {
        let info = &rules[ri as usize];
        let r = info.rule;
        let has_in = !r.ingress.is_empty() || !r.ingress_deny.is_empty() || r.isolate_ingress;
        let has_eg = !r.egress.is_empty() || !r.egress_deny.is_empty() || r.isolate_egress;
        if info.staged {
            // A staged rule enforces nothing: its default deny is noted apart.
            staged.note(info.default_deny_refs);
        } else {
            if has_in {
                t.enforced_ingress = true;
                t.default_deny_ingress |= r.default_deny_ingress.unwrap_or(true);
            }
            if has_eg {
                t.enforced_egress = true;
                t.default_deny_egress |= r.default_deny_egress.unwrap_or(true);
            }
        }
    }
}

/// A template with the flags only (an endpoint whose entries are not built).
fn template_flags(rules: &[RuleInfo<'_>], rule_list: &[u32]) -> Template {
    let mut t = Template::default();
    flags_into(rules, rule_list, &mut t, &mut staged::Staged::default());
    t
}

/// 128 bits standing for the whole registry (two independent 64-bit hashes
/// of everything in it): equal registries give equal prints, and two that
/// differ collide with a chance of about 2^-128.
fn fingerprint(registry: &RegistrySet) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut a = std::hash::DefaultHasher::new();
    let mut b = FastHasher(0x9e37_79b9_7f4a_7c15);
    registry.hash(&mut a);
    registry.hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// The entries of one group of endpoints. `Err(item)` when they would exceed
/// `limit`: the item being expanded then, or the one with the most entries.
#[allow(clippy::too_many_arguments)]
fn build_template(
    ctx: &mut Ctx<'_, '_>,
    rules: &[RuleInfo<'_>],
    rule_list: &[u32],
    ports: &[NamedPort],
    is_workload: bool,
    localhost_rule: Option<u32>,
    limit: usize,
) -> Result<Template, Option<u32>> {
    let mut t = Template::default();
    let mut raw = Vec::new();
    let mut staged = staged::Staged::default();
    flags_into(rules, rule_list, &mut t, &mut staged);
    for &ri in rule_list {
        let info = &rules[ri as usize];
        for &idx in &info.items {
            ctx.expand(idx as usize, ports, &mut raw, limit)
                .map_err(|Over| Some(idx))?;
        }
    }
    if let (true, Some(rule)) = (is_workload, localhost_rule) {
        raw.push(TEntry {
            dir: Direction::Ingress,
            id: identity::HOST,
            key: ANY_KEY,
            verdict: EntryVerdict::Allow,
            rule,
            staged: false,
        });
    }
    if staged.any() || raw.iter().any(|e| e.staged) {
        staged.finish(&mut raw, [t.default_deny_ingress, t.default_deny_egress]);
    } else {
        finish_entries(&mut raw);
    }
    if raw.len() > limit {
        return Err(top_item(&raw, ctx.items.len()).map(|(i, _)| i));
    }
    t.entries = raw;
    Ok(t)
}

/// The rule item with the most entries (ties: the first), leaving out the
/// config's allow_localhost (numbered after every item), with its count.
fn top_item(entries: &[TEntry], n_items: usize) -> Option<(u32, usize)> {
    let mut counts = vec![0usize; n_items];
    for e in entries {
        if let Some(c) = counts.get_mut(e.rule as usize) {
            *c += 1;
        }
    }
    let mut best: Option<(u32, usize)> = None;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && best.is_none_or(|(_, b)| c > b) {
            best = Some((i as u32, c));
        }
    }
    best
}

/// The rule refs of `pol`'s items, in the order compile numbers them (its
/// rules in order, each rule's ingress, ingressDeny, egress, egressDeny
/// items): kept in `memo` while the policy is, so an unchanged policy costs
/// no string copies.
fn policy_refs(
    memo: &mut FastMap<usize, PolicyRefs>,
    names: &mut Names,
    pol: &Arc<Policy>,
    pass: u64,
) -> Arc<[RuleRef]> {
    let e = memo.entry(Arc::as_ptr(pol) as usize).or_insert_with(|| {
        let file = names.file(&pol.origin.file);
        let kind = names.str(&pol.origin.kind);
        let policy: Arc<str> = policy_name(&pol.origin).into();
        let refs = pol
            .rules
            .iter()
            .flat_map(Rule::items)
            .map(|item| RuleRef {
                file: file.clone(),
                kind: kind.clone(),
                policy: policy.clone(),
                path: names.str(&item.path),
                staged: pol.staged,
                default_deny: false,
            })
            .collect();
        (pol.clone(), refs, pass)
    });
    e.2 = pass;
    e.1.clone()
}

/// A policy (kept alive, so its address names it), the rule refs of its
/// items, and the pass that last used them.
type PolicyRefs = (Arc<Policy>, Arc<[RuleRef]>, u64);

/// The strings rule refs share: one copy of each file, kind and item path
/// however many policies name it.
#[derive(Debug, Default)]
struct Names {
    strs: std::collections::HashSet<Arc<str>, std::hash::BuildHasherDefault<FastHasher>>,
    files: std::collections::HashSet<Arc<Path>, std::hash::BuildHasherDefault<FastHasher>>,
}

impl Names {
    fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strs.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.strs.insert(a.clone());
        a
    }

    fn file(&mut self, f: &Path) -> Arc<Path> {
        if let Some(a) = self.files.get(f) {
            return a.clone();
        }
        let a: Arc<Path> = f.into();
        self.files.insert(a.clone());
        a
    }

    /// Forget the strings no kept ref names any more.
    fn unused_dropped(&mut self) {
        self.strs.retain(|a| Arc::strong_count(a) > 1);
        self.files.retain(|a| Arc::strong_count(a) > 1);
    }
}

/// `namespace/name` or `name`, as rule refs name a policy.
fn policy_name(o: &Origin) -> String {
    match &o.namespace {
        Some(ns) => format!("{ns}/{}", o.name),
        None => o.name.to_string(),
    }
}

/// `Kind namespace/name` or `Kind name`, as parse problems name a document.
fn object_of(o: &Origin) -> String {
    match &o.namespace {
        Some(ns) => format!("{} {ns}/{}", o.kind, o.name),
        None => format!("{} {}", o.kind, o.name),
    }
}

/// A problem at one rule item.
fn item_problem(info: &ItemInfo<'_>, message: String) -> Problem {
    Problem {
        file: info.origin.file.to_path_buf(),
        line: info.item.pos.map(|p| p.0),
        column: info.item.pos.map(|p| p.1),
        document: Some(info.origin.doc + 1),
        object: Some(object_of(info.origin)),
        field: Some(info.item.path.clone()),
        message,
    }
}

/// A problem at a registry document (when no rule item is to blame).
fn endpoint_problem(origin: &Origin, field: Option<String>, message: String) -> Problem {
    Problem {
        file: origin.file.to_path_buf(),
        line: None,
        column: None,
        document: Some(origin.doc + 1),
        object: Some(object_of(origin)),
        field,
        message,
    }
}

/// `the policy map holds N (maps.policy_max_entries)`.
fn holds(what: &str, map: MapKind, limit: usize) -> String {
    format!("the {what} holds {limit} ({})", map.key())
}

/// `raise maps.policy_max_entries in netpold.toml`.
fn raise(map: MapKind) -> String {
    format!("raise {} in {SETTINGS_FILE}", map.key())
}

/// One endpoint's own entries exceed the policy map.
fn over_endpoint(
    items: &[ItemInfo<'_>],
    item: Option<u32>,
    r: &ResolvedEndpoint<'_>,
    limit: usize,
) -> CompileError {
    let ep = r.display_name();
    let (holds, raise) = (
        holds("policy map", MapKind::Policy, limit),
        raise(MapKind::Policy),
    );
    let problem = match item.and_then(|i| items.get(i as usize)) {
        Some(info) => item_problem(
            info,
            format!(
                "with this rule, endpoint {ep} would need more than {limit} policy entries; {holds}; narrow the rule or {raise}"
            ),
        ),
        None => endpoint_problem(
            &r.def.origin,
            None,
            format!("endpoint {ep} would need more than {limit} policy entries; {holds}; {raise}"),
        ),
    };
    let endpoint = endpoint_problem(
        &r.def.origin,
        Some(LABELS_FIELD.into()),
        format!(
            "with these labels, endpoint {ep} would need more than {limit} policy entries{}; {holds}; {raise} or change the endpoint",
            given_by(items, item)
        ),
    );
    CompileError {
        map: MapKind::Policy,
        limit,
        problem: Box::new(problem),
        endpoint: Some(Box::new(endpoint)),
    }
}

/// The field a refusal blaming a registry endpoint names: its labels decide
/// which rules select it.
const LABELS_FIELD: &str = "metadata.labels";

/// ` (rule FILE POLICY FIELD gives the most)` for an item, or nothing.
fn given_by(items: &[ItemInfo<'_>], item: Option<u32>) -> String {
    match item.and_then(|i| items.get(i as usize)) {
        Some(info) => format!(
            " (the most from {} {}: {})",
            info.origin.file.display(),
            object_of(info.origin),
            info.item.path
        ),
        None => String::new(),
    }
}

/// The endpoints of one node together exceed that node's policy map; `entries`
/// are those of the endpoint that pushed the count over.
fn over_node(
    items: &[ItemInfo<'_>],
    entries: &[TEntry],
    r: &ResolvedEndpoint<'_>,
    node: Option<&str>,
    limit: usize,
) -> CompileError {
    let ep = r.display_name();
    let host = match node {
        None => "this host".to_string(),
        Some(n) => format!("node {n}"),
    };
    let (holds, raise) = (
        holds("policy map", MapKind::Policy, limit),
        raise(MapKind::Policy),
    );
    let top = top_item(entries, items.len());
    let problem = match top.and_then(|(i, n)| Some((items.get(i as usize)?, n))) {
        Some((info, n)) => item_problem(
            info,
            format!(
                "with this rule, the endpoints of {host} would need more than {limit} policy entries (it gives endpoint {ep} {n}); {holds}; narrow the rule or {raise}"
            ),
        ),
        None => endpoint_problem(
            &r.def.origin,
            None,
            format!("with this endpoint, the endpoints of {host} would need more than {limit} policy entries; {holds}; {raise}"),
        ),
    };
    let endpoint = endpoint_problem(
        &r.def.origin,
        Some(LABELS_FIELD.into()),
        format!(
            "with this endpoint, the endpoints of {host} would need more than {limit} policy entries (it needs {}{}); {holds}; {raise} or change the endpoint",
            entries.len(),
            given_by(items, top.map(|(i, _)| i))
        ),
    );
    CompileError {
        map: MapKind::Policy,
        limit,
        problem: Box::new(problem),
        endpoint: Some(Box::new(endpoint)),
    }
}

/// Count the ipcache as compile will fill it, stopping at the first prefix
/// over the limit: `/0`, this host's addresses, then the registry's, then the
/// policies' CIDR prefixes in policy order (each one CIDR identity).
fn check_ipcache(
    items: &[ItemInfo<'_>],
    cidr_prefixes: &[(IpNet, u32)],
    fqdn_sels: &[(&FqdnSelector, u32)],
    learned: &fqdn::LearnedPrefixes,
    registry: &RegistrySet,
    opts: &CompileOptions,
) -> Result<(), CompileError> {
    let limit = opts.limits.ipcache_entries;
    if limit == usize::MAX {
        return Ok(());
    }
    let mut nets: std::collections::BTreeSet<IpNet> = std::collections::BTreeSet::new();
    nets.insert("0.0.0.0/0".parse().expect("static prefix"));
    nets.insert("::/0".parse().expect("static prefix"));
    nets.extend(opts.host_addresses.iter().map(|a| host_net(*a)));
    let (holds, raise) = (
        holds("ipcache", MapKind::Ipcache, limit),
        raise(MapKind::Ipcache),
    );
    let registry_over = |origin: &Origin, i: usize| {
        CompileError {
        map: MapKind::Ipcache,
        limit,
        problem: Box::new(endpoint_problem(
            origin,
            Some(format!("spec.addresses[{i}]")),
            format!("with this address, the registry would need more than {limit} ipcache entries; {holds}; {raise}"),
        )),
        endpoint: None,
    }
    };
    let addresses = (registry.nodes.iter().map(|n| (&n.origin, &n.addresses)))
        .chain(registry.endpoints.iter().map(|e| (&e.origin, &e.addresses)));
    for (origin, addrs) in addresses {
        for (i, a) in addrs.iter().enumerate() {
            if nets.insert(host_net(*a)) && nets.len() > limit {
                return Err(registry_over(origin, i));
            }
        }
    }
    // The policies' CIDR prefixes, then the addresses the DNS proxy learned
    // (last: what the files need is refused on its own), each with the item
    // it is counted for and whether it was learned.
    let learned_nets = fqdn_sels.iter().flat_map(|(sel, item)| {
        (learned.get(*sel).into_iter().flatten()).map(move |net| (net, *item, true))
    });
    let policy_nets =
        (cidr_prefixes.iter().map(|(net, item)| (net, *item, false))).chain(learned_nets);
    for (net, item, was_learned) in policy_nets {
        if nets.insert(*net) && nets.len() > limit {
            if let Some(info) = items.get(item as usize) {
                let msg = if was_learned {
                    format!(
                        "with the addresses the DNS proxy learned for this toFQDNs selector, the ipcache would need more than {limit} entries; {holds}; lower the proxy's caps or {raise}"
                    )
                } else {
                    format!(
                        "with this rule, the policies' CIDR prefixes and the registry's addresses would need more than {limit} ipcache entries; {holds}; narrow the rule or {raise}"
                    )
                };
                return Err(CompileError {
                    map: MapKind::Ipcache,
                    limit,
                    problem: Box::new(item_problem(info, msg)),
                    endpoint: None,
                });
            }
        }
    }
    Ok(())
}

fn proto_name(p: u8) -> String {
    match p {
        proto::ANY => "any".into(),
        proto::ICMP => "icmp".into(),
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        proto::SCTP => "sctp".into(),
        n => format!("proto{n}"),
    }
}

/// `tcp/80`, `tcp/80-95` (a port block), `tcp` (every port), `any`.
pub fn format_key(p: u8, port: u16, prefix: u8) -> String {
    if p == proto::ANY {
        return "any".into();
    }
    if prefix == 0 {
        return proto_name(p);
    }
    if prefix >= 16 {
        return format!("{}/{port}", proto_name(p));
    }
    let last = u32::from(port) + (1u32 << (16 - u32::from(prefix))) - 1;
    format!("{}/{port}-{last}", proto_name(p))
}

impl Compiled {
    /// Drop the entries of endpoints that are not enforced on this host. `compile`
    /// keeps every endpoint's entries (offline `trace` judges every endpoint as
    /// enforced); the datapath only needs the local ones. Slots do not change.
    /// (Tests feed the kernel datapath with it.)
    #[cfg(any(test, feature = "test-support"))]
    pub fn retain_local_entries(&mut self) {
        let local: Vec<bool> = self.endpoints.iter().map(|e| e.local).collect();
        self.entries
            .retain(|e| local.get(e.endpoint as usize).copied().unwrap_or(false));
    }

    /// A stable, line-oriented text dump of the whole state, for golden tests and
    /// debugging.
    pub fn dump(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for i in &self.identities {
            let ls: Vec<String> = i.labels.iter().map(labels::format_label).collect();
            let _ = writeln!(s, "identity {} {}", i.id, ls.join(","));
        }
        for e in &self.ipcache {
            match e.endpoint {
                Some(slot) => {
                    let _ = writeln!(s, "ipcache {} -> {} (endpoint {slot})", e.net, e.identity);
                }
                None => {
                    let _ = writeln!(s, "ipcache {} -> {}", e.net, e.identity);
                }
            }
        }
        for ep in &self.endpoints {
            let name = match &ep.namespace {
                Some(ns) if ep.kind == EndpointKind::Workload => format!("{ns}/{}", ep.name),
                _ => ep.name.to_string(),
            };
            let dir = |enf: bool, dd: bool| match (enf, dd) {
                (false, _) => "open",
                (true, false) => "enforced",
                (true, true) => "default-deny",
            };
            let _ = writeln!(
                s,
                "endpoint {} {} {} identity={} {} ingress={} egress={}{}",
                ep.slot,
                if ep.kind == EndpointKind::Host {
                    "host"
                } else {
                    "workload"
                },
                name,
                ep.identity,
                if ep.local { "local" } else { "remote" },
                dir(ep.enforced_ingress, ep.default_deny_ingress),
                dir(ep.enforced_egress, ep.default_deny_egress),
                if ep.audit { " audit" } else { "" },
            );
        }
        for e in &self.entries {
            let _ = writeln!(
                s,
                "entry {} {} id={} {} {} rule={}",
                e.endpoint,
                if e.direction == Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                },
                e.identity,
                format_key(e.proto, e.port, e.port_prefix),
                match e.verdict {
                    EntryVerdict::Allow => "allow",
                    EntryVerdict::Deny => "deny",
                    EntryVerdict::StagedDeny => "staged-deny",
                    EntryVerdict::AllowStagedDeny => "allow+staged-deny",
                    EntryVerdict::StagedDefaultDeny => "staged-default-deny",
                },
                e.rule
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            let _ = writeln!(
                s,
                "rule {i} {} {} {} {}{}{}",
                r.kind,
                r.policy,
                r.file.display(),
                r.path,
                if r.default_deny { " default-deny" } else { "" },
                if r.staged { " staged" } else { "" },
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_80_444_is_nine_blocks() {
        let b = port_range_blocks(80, 444);
        assert_eq!(
            b,
            vec![
                (80, 12),
                (96, 11),
                (128, 9),
                (256, 9),
                (384, 11),
                (416, 12),
                (432, 13),
                (440, 14),
                (444, 16)
            ]
        );
        assert_eq!(
            port_range_blocks(1024, 65535),
            vec![
                (1024, 6),
                (2048, 5),
                (4096, 4),
                (8192, 3),
                (16384, 2),
                (32768, 1)
            ]
        );
        assert_eq!(port_range_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_blocks(443, 443), vec![(443, 16)]);
    }

    proptest::proptest! {
        #[test]
        fn port_range_blocks_cover_exactly(a in 0u16..=u16::MAX, b in 0u16..=u16::MAX) {
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = port_range_blocks(lo, hi);
            let mut covered: u64 = 0;
            for (base, prefix) in &blocks {
                let size = 1u64 << (16 - u32::from(*prefix));
                proptest::prop_assert_eq!(u64::from(*base) % size, 0, "aligned");
                proptest::prop_assert!(u64::from(*base) >= u64::from(lo) && u64::from(*base) + size - 1 <= u64::from(hi));
                covered += size;
            }
            proptest::prop_assert_eq!(covered, u64::from(hi) - u64::from(lo) + 1);
            proptest::prop_assert!(blocks.len() <= 32);
            proptest::prop_assert!(blocks.windows(2).all(|w| w[0].0 < w[1].0));
        }
    }

    #[test]
    fn covers() {
        let any = ANY_KEY;
        let tcp = PortKey {
            proto: 6,
            port: 0,
            prefix: 0,
        };
        let p80 = PortKey {
            proto: 6,
            port: 80,
            prefix: 16,
        };
        let r80 = PortKey {
            proto: 6,
            port: 80,
            prefix: 12,
        };
        assert!(key_covers(&any, &p80));
        assert!(key_covers(&tcp, &p80));
        assert!(key_covers(&r80, &p80));
        assert!(!key_covers(&p80, &r80));
        assert!(!key_covers(
            &PortKey {
                proto: 17,
                port: 0,
                prefix: 0
            },
            &p80
        ));
    }

    #[test]
    fn prefixes_inside_a_net_are_found_by_range_as_by_scan() {
        let nets: Vec<IpNet> = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.0.0.0/16",
            "10.0.0.0/32",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.255.255.255/32",
            "11.0.0.0/8",
            "9.255.255.255/32",
            "192.168.0.0/16",
            "::/0",
            "fd00::/8",
            "fd00:1::/32",
            "fd00:1::1/128",
            "fe00::/8",
            "2001:db8::/32",
        ]
        .iter()
        .map(|n| n.parse::<IpNet>().unwrap().trunc())
        .collect();
        let map: BTreeMap<IpNet, Identity> = nets
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i as Identity))
            .collect();
        for q in &nets {
            let by_scan: Vec<IpNet> = map.keys().filter(|p| net_contains(q, p)).copied().collect();
            let by_range: Vec<IpNet> = map
                .range(within(q))
                .map(|(p, _)| *p)
                .filter(|p| net_contains(q, p))
                .collect();
            assert_eq!(by_range, by_scan, "inside {q}");
        }
    }

    // ------------------------------------------------------------ map budget

    const REG: &str = "\
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {interface: veth-w1, addresses: [10.0.0.1]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec: {node: node-b, interface: veth-w2, addresses: [10.0.0.2]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: api-1, namespace: default, labels: {app: api}}
spec: {interface: veth-a1, addresses: [10.0.1.1]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: api-2, namespace: default, labels: {app: api}}
spec: {interface: veth-a2, addresses: [10.0.1.2]}
";

    /// 2 CIDR identities × 3 ports: 6 entries for each web endpoint (one on this
    /// host, one on node-b).
    const WEB: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromCIDR: [10.1.0.0/16, 10.2.0.0/16]
    toPorts: [{ports: [{port: \"80\", protocol: TCP}, {port: \"81\", protocol: TCP}, {port: \"82\", protocol: TCP}]}]
";

    /// 1 identity × 3 ports: 3 entries for each api endpoint, both on this host.
    const API: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: \"80\", protocol: TCP}, {port: \"81\", protocol: TCP}, {port: \"82\", protocol: TCP}]}]
";

    fn inputs(policies: &[(&str, &str)]) -> (PolicySet, RegistrySet) {
        let mut set = PolicySet::default();
        for (file, text) in policies {
            set.policies
                .extend(crate::api::parse_policies(Path::new(file), text).expect("valid policy"));
        }
        (
            set,
            crate::api::parse_registry(Path::new("reg.yaml"), REG).expect("valid registry"),
        )
    }

    fn with_limits(policy_entries: usize, ipcache_entries: usize) -> CompileOptions {
        CompileOptions {
            node_name: "node-a".into(),
            limits: Limits {
                policy_entries,
                ipcache_entries,
            },
            ..Default::default()
        }
    }

    fn refusal(p: &PolicySet, r: &RegistrySet, o: &CompileOptions) -> String {
        try_compile(p, r, o)
            .expect_err("over the budget")
            .to_string()
    }

    #[test]
    fn one_endpoint_exactly_at_the_policy_budget_passes_and_one_over_is_refused() {
        let (p, r) = inputs(&[("web.yaml", WEB)]);
        let c = try_compile(&p, &r, &with_limits(6, 100)).expect("6 entries per host fit 6");
        // Each host's map holds 6; together they are 12.
        assert_eq!(c.entries.len(), 12);
        assert_eq!(c, compile(&p, &r, &with_limits(6, 100)));
        let e = try_compile(&p, &r, &with_limits(5, 100)).unwrap_err();
        assert_eq!((e.map, e.limit), (MapKind::Policy, 5));
        assert_eq!(
            e.to_string(),
            "web.yaml:7:5: document 1 (CiliumNetworkPolicy default/web): spec.ingress[0]: with this rule, endpoint \
             default/web-1 would need more than 5 policy entries; the policy map holds 5 (maps.policy_max_entries); \
             narrow the rule or raise maps.policy_max_entries in netpold.toml"
        );
    }

    #[test]
    fn endpoints_of_one_host_share_its_policy_budget() {
        let (p, r) = inputs(&[("api.yaml", API)]);
        let c = try_compile(&p, &r, &with_limits(6, 100)).expect("3 + 3 entries fit 6");
        assert_eq!(c.entries.len(), 6);
        assert_eq!(
            refusal(&p, &r, &with_limits(5, 100)),
            "api.yaml:7:5: document 1 (CiliumNetworkPolicy default/api): spec.ingress[0]: with this rule, the \
             endpoints of this host would need more than 5 policy entries (it gives endpoint default/api-2 3); the \
             policy map holds 5 (maps.policy_max_entries); narrow the rule or raise maps.policy_max_entries in \
             netpold.toml"
        );
        // web-2 is node-b's: this host has web-1 (6) + api-1 (3) + api-2 (3).
        let (p, r) = inputs(&[("web.yaml", WEB), ("api.yaml", API)]);
        assert!(try_compile(&p, &r, &with_limits(12, 100)).is_ok());
        assert!(refusal(&p, &r, &with_limits(11, 100))
            .contains("the endpoints of this host would need more than 11"));
    }

    #[test]
    fn ipcache_exactly_at_its_budget_passes_and_one_over_is_refused() {
        // 2 × /0, 4 registry addresses, 2 CIDR prefixes.
        let (p, r) = inputs(&[("web.yaml", WEB)]);
        let c = try_compile(&p, &r, &with_limits(100, 8)).expect("8 ipcache entries fit 8");
        assert_eq!(c.ipcache.len(), 8);
        let e = try_compile(&p, &r, &with_limits(100, 7)).unwrap_err();
        assert_eq!((e.map, e.limit), (MapKind::Ipcache, 7));
        assert_eq!(
            e.to_string(),
            "web.yaml:7:5: document 1 (CiliumNetworkPolicy default/web): spec.ingress[0]: with this rule, the \
             policies' CIDR prefixes and the registry's addresses would need more than 7 ipcache entries; the ipcache \
             holds 7 (maps.ipcache_max_entries); narrow the rule or raise maps.ipcache_max_entries in netpold.toml"
        );
        // The registry alone over the limit names the address that pushed it over.
        assert_eq!(
            refusal(&p, &r, &with_limits(100, 5)),
            "reg.yaml: document 4 (Endpoint default/api-2): spec.addresses[0]: with this address, the registry would \
             need more than 5 ipcache entries; the ipcache holds 5 (maps.ipcache_max_entries); raise \
             maps.ipcache_max_entries in netpold.toml"
        );
    }

    /// A compiler keeps the registry's share while the registry and node name
    /// stay equal, and gives what a fresh compile gives whatever changes.
    #[test]
    fn a_compiler_that_keeps_the_registry_share_answers_as_a_fresh_compile() {
        let (web, r) = inputs(&[("web.yaml", WEB)]);
        let (both, _) = inputs(&[("web.yaml", WEB), ("api.yaml", API)]);
        let opts = with_limits(100, 100);
        let mut c = Compiler::new();
        for p in [&web, &both, &web] {
            assert_eq!(c.compile(p, &r, &opts), try_compile(p, &r, &opts));
        }
        // Another registry (one endpoint fewer), another node name, and back.
        let mut fewer = r.clone();
        fewer.endpoints.pop();
        let other_node = CompileOptions {
            node_name: "node-b".into(),
            ..opts.clone()
        };
        for (reg, o) in [(&fewer, &opts), (&r, &other_node), (&r, &opts)] {
            let fresh = try_compile(&both, reg, o);
            assert_eq!(c.compile(&both, reg, o), fresh);
        }
        assert_ne!(
            try_compile(&both, &fewer, &opts).unwrap().endpoints.len(),
            try_compile(&both, &r, &opts).unwrap().endpoints.len()
        );
        // A refusal from a compiler that kept the share is the same refusal.
        let tight = with_limits(5, 100);
        assert_eq!(c.compile(&web, &r, &tight), try_compile(&web, &r, &tight));
        assert!(c.compile(&web, &r, &tight).is_err());
    }

    /// A policy change selects and expands again only what the changed
    /// policy touches; a registry change that keeps every identity selects
    /// and expands nothing again.
    #[test]
    fn a_compiler_computes_again_only_what_a_change_touches() {
        let (both, r) = inputs(&[("web.yaml", WEB), ("api.yaml", API)]);
        let opts = with_limits(100, 100);
        let mut c = Compiler::new();
        c.compile(&both, &r, &opts).expect("fits");
        let first = c.stats();
        assert!(first.world_built && first.identities_changed);
        assert_eq!((first.subjects_selected, first.templates_built), (2, 2));
        assert_eq!(first.endpoints_resolved, r.endpoints.len());

        // api.yaml edited (another port): its rule is selected again and the
        // api endpoints' template expanded again; web's is kept (web-1's and
        // web-2's, one template).
        let edited = API.replace("port: \"82\"", "port: \"83\"");
        let (api, _) = inputs(&[("api.yaml", &edited)]);
        // web.yaml as a loader keeps it: the same shared rules.
        let mut changed = both.clone();
        changed.policies[1] = api.policies[0].clone();
        let got = c.compile(&changed, &r, &opts);
        assert_eq!(got, try_compile(&changed, &r, &opts));
        let s = c.stats();
        assert!(!s.world_built);
        assert_eq!(s.endpoints_resolved, 0, "the same registry");
        assert_eq!(
            (s.subjects_selected, s.templates_built, s.templates_kept),
            (1, 1, 1)
        );

        // web-2 (on node-b) moves to another address under the same labels:
        // the ipcache changes, no selection or expansion is made again.
        let mut moved = r.clone();
        let w2 = moved
            .endpoints
            .iter_mut()
            .find(|e| e.name == "web-2")
            .expect("web-2");
        Arc::make_mut(w2).addresses = vec!["10.0.0.9".parse().unwrap()];
        let got = c.compile(&changed, &moved, &opts);
        assert_eq!(got, try_compile(&changed, &moved, &opts));
        let s = c.stats();
        assert!(s.world_built && !s.identities_changed);
        assert_eq!((s.subjects_selected, s.templates_built), (0, 0));
        // Only the replaced endpoint is resolved again; the others are kept.
        assert_eq!(s.endpoints_resolved, 1);
        assert!(got
            .unwrap()
            .ipcache
            .iter()
            .any(|e| e.net.to_string() == "10.0.0.9/32"));

        // A new label set is a new identity: everything is selected again.
        let mut relabelled = moved.clone();
        Arc::make_mut(&mut relabelled.endpoints[0])
            .labels
            .push(labels::label("k8s", "tier", "x"));
        let got = c.compile(&changed, &relabelled, &opts);
        assert_eq!(got, try_compile(&changed, &relabelled, &opts));
        assert!(c.stats().identities_changed);
        assert_eq!(c.stats().subjects_selected, 2);
    }

    /// A registry named by the caller's revision is not looked at while the
    /// revision stays; a new revision is compiled as a fresh compile would.
    #[test]
    fn a_compiler_given_registry_revisions_answers_as_a_fresh_compile() {
        let (both, r) = inputs(&[("web.yaml", WEB), ("api.yaml", API)]);
        let mut fewer = r.clone();
        fewer.endpoints.pop();
        let opts = with_limits(100, 100);
        let mut c = Compiler::new();
        for (rev, reg) in [(1, &r), (1, &r), (2, &fewer), (3, &r)] {
            assert_eq!(
                c.compile_revision(&both, reg, rev, &opts),
                try_compile(&both, reg, &opts)
            );
        }
        c.compile_revision(&both, &r, 3, &opts).expect("fits");
        assert!(!c.stats().world_built, "an unchanged revision is kept");
        // The fingerprint path and the revision path never stand for each other.
        assert_eq!(
            c.compile(&both, &fewer, &opts),
            try_compile(&both, &fewer, &opts)
        );
        assert!(c.stats().world_built);
    }

    #[test]
    fn duplicate_rules_alone_never_refuse_a_set() {
        // The same item three times: 18 raw entries per web endpoint, 6 distinct.
        let item = &WEB[WEB.find("  - fromCIDR").expect("item")..];
        let dup = format!("{WEB}{item}{item}").replace("name: web,", "name: dup,");
        let (p, r) = inputs(&[("dup.yaml", &dup)]);
        assert_eq!(p.policies[0].rules[0].ingress.len(), 3);
        let c = try_compile(&p, &r, &with_limits(6, 100)).expect("6 distinct entries fit 6");
        assert_eq!(
            c,
            compile(
                &p,
                &r,
                &CompileOptions {
                    node_name: "node-a".into(),
                    ..Default::default()
                }
            )
        );
    }
}
