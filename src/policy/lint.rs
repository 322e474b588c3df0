//! Warnings about what valid policies do against the registry: a rule that
//! selects no endpoint, a peer selector that matches nothing, a named port no
//! endpoint it could apply to declares, an allow rule a deny rule shadows
//! whole, a CiliumNetworkPolicy CIDR rule over registry endpoints (which such
//! a rule never matches). docs/policy.md, "Warnings about what a policy does",
//! lists each with an example; `netpolctl check` prints them and `--strict`
//! fails on them, netpold reports them in `status` and applies the set as usual.
//!
//! Works on the validated policies, the registry and the state compiled from
//! both (its identities and ipcache, and its deny entries for the
//! shadowed-allow check); it compiles nothing and decides no verdict. Only
//! what is certain warns: a rule shadowed by a union of denies that split one
//! port block between them, for example, is not reported. Pure, no I/O.
//!
//! Cost: about what compile's selection costs. Selectors go through compile's
//! index over identities, addresses and prefixes are looked up in sorted
//! lists, and an allow is checked for shadowing only against the deny entries
//! of the endpoints it applies to (usually none, which ends the check). The
//! pipeline runs it only when an input set changed.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

use ipnet::IpNet;

use crate::api::model::{
    EndpointKind, Family, NamedPort, Op, Origin, Peer, Peers, Policy, PolicyKind, PolicySet,
    PortSpec, Proto, RegistrySet, RuleItem, Selector, Subject, L4,
};
use crate::api::validate::POD_NAMESPACE_LABEL;
use crate::api::{Problem, Warning, WarningCode};
use crate::policy::compile::{
    named_keys, number_keys, peer_identities, PortKey, Selections, SelectorIndex,
};
use crate::policy::identity;
use crate::policy::labels;
use crate::policy::lookup;
use crate::policy::registry::{self, ResolvedEndpoint};
use crate::policy::types::{proto, Compiled, Direction, EntryVerdict, Identity, PolicyEntry};

/// At most this many endpoints or rules are named in one message.
const NAMED: usize = 3;

/// Every warning about what `policies` do against `registry`, `compiled` being
/// the state compiled from both for `node_name`. Sorted by file, position,
/// field and code. Nothing is reported when `compiled` is not that state
/// (another number of endpoints).
pub fn lint<'a>(
    policies: &'a PolicySet,
    registry: &'a RegistrySet,
    compiled: &'a Compiled,
    node_name: &str,
) -> Vec<Warning> {
    let resolved = registry::resolve(registry, node_name);
    if resolved.len() != compiled.endpoints.len() {
        return Vec::new();
    }
    let lint = Lint::new(resolved, compiled);
    let mut out = Vec::new();
    for p in &policies.policies {
        lint.policy(p, &mut out);
    }
    out.sort_by(|a, b| {
        let k = |w: &Warning| {
            (
                w.at.file.clone(),
                w.at.line,
                w.at.column,
                w.at.field.clone(),
                w.code,
            )
        };
        k(a).cmp(&k(b))
    });
    out
}

struct Lint<'a> {
    /// In slot order, as `compiled.endpoints`.
    resolved: Vec<ResolvedEndpoint<'a>>,
    compiled: &'a Compiled,
    /// Every identity's labels, selected from as compile selects.
    index: RefCell<Selections<'a>>,
    /// Workload slots by identity.
    slots_by_id: HashMap<Identity, Vec<u32>>,
    /// Ports declared by the endpoints of each identity, and by all.
    ports_by_id: HashMap<Identity, Vec<NamedPort>>,
    all_ports: Vec<NamedPort>,
    /// (address, slot) of every workload, sorted.
    workload_addrs: Vec<(IpAddr, u32)>,
    /// The same with each workload's identity, and the workload identities
    /// (sorted), as compile expands peers against them.
    workload_ids_by_addr: Vec<(IpAddr, Identity)>,
    workload_ids: Vec<Identity>,
    /// The CIDR identities by prefix.
    cidr_ids: BTreeMap<IpNet, Identity>,
    /// The deny entries (enforced and staged) of each endpoint and direction,
    /// sorted by identity; found when first asked for.
    denies: RefCell<HashMap<(u32, Direction), Vec<&'a PolicyEntry>>>,
}

/// `Kind namespace/name` or `Kind name`, as problems name a document.
fn object_of(o: &Origin) -> String {
    match &o.namespace {
        Some(ns) => format!("{} {ns}/{}", o.kind, o.name),
        None => format!("{} {}", o.kind, o.name),
    }
}

/// A warning at `field` of `p`, where the source map places it.
fn warning(p: &Policy, code: WarningCode, field: &str, message: String) -> Warning {
    warning_at(p, code, field, p.source.pos(field), message)
}

fn warning_at(
    p: &Policy,
    code: WarningCode,
    field: &str,
    pos: Option<(usize, usize)>,
    message: String,
) -> Warning {
    Warning {
        at: Problem {
            file: p.origin.file.to_path_buf(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            document: Some(p.origin.doc + 1),
            object: Some(object_of(&p.origin)),
            field: Some(field.to_string()),
            message,
        },
        code,
    }
}

/// `a, b, c and 2 more`.
fn list(names: &[String]) -> String {
    let shown = names[..names.len().min(NAMED)].join(", ");
    match names.len().saturating_sub(NAMED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// ` in namespace "prod"` for a selector confined to one namespace.
fn in_namespace(sel: &Selector) -> String {
    let ns = sel.requirements.iter().find_map(|r| {
        let one = r.key.key == POD_NAMESPACE_LABEL && r.op == Op::In && r.values.len() == 1;
        r.values.iter().next().filter(|_| one)
    });
    ns.map(|ns| format!(" in namespace {ns:?}"))
        .unwrap_or_default()
}

/// The shortest prefix of a CIDR rule that warns when it covers registry
/// endpoints: /16 for IPv4, /48 for IPv6. A broader range (a corporate /8, the
/// world) is taken to mean the networks around the registry, as Cilium's own
/// examples use it; a narrower one that covers endpoints was most likely
/// written for them.
fn narrow(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 16,
        IpNet::V6(_) => 48,
    }
}

impl<'a> Lint<'a> {
    fn new(resolved: Vec<ResolvedEndpoint<'a>>, compiled: &'a Compiled) -> Lint<'a> {
        let ids = compiled
            .identities
            .iter()
            .map(|i| (i.id, i.labels.clone()))
            .collect();
        let mut slots_by_id: HashMap<Identity, Vec<u32>> = HashMap::new();
        let mut ports_by_id: HashMap<Identity, Vec<NamedPort>> = HashMap::new();
        let mut workload_addrs = Vec::new();
        for (r, e) in resolved.iter().zip(&compiled.endpoints) {
            if !r.def.ports.is_empty() {
                ports_by_id
                    .entry(e.identity)
                    .or_default()
                    .extend(r.def.ports.iter().cloned());
            }
            if e.kind == EndpointKind::Workload {
                slots_by_id.entry(e.identity).or_default().push(e.slot);
                workload_addrs.extend(r.def.addresses.iter().map(|a| (*a, e.slot)));
            }
        }
        workload_addrs.sort_unstable();
        let all_ports = ports_by_id.values().flatten().cloned().collect();
        let mut workload_ids_by_addr: Vec<(IpAddr, Identity)> = workload_addrs
            .iter()
            .map(|(a, slot)| (*a, compiled.endpoints[*slot as usize].identity))
            .collect();
        workload_ids_by_addr.sort_unstable();
        let mut workload_ids: Vec<Identity> = slots_by_id.keys().copied().collect();
        workload_ids.sort_unstable();
        let cidr_ids = compiled
            .ipcache
            .iter()
            .filter(|e| e.endpoint.is_none() && identity::is_cidr(e.identity))
            .map(|e| (e.net, e.identity))
            .collect();
        Lint {
            resolved,
            compiled,
            index: RefCell::new(Selections::new(std::sync::Arc::new(SelectorIndex::new(
                ids,
            )))),
            slots_by_id,
            ports_by_id,
            all_ports,
            workload_addrs,
            workload_ids_by_addr,
            workload_ids,
            cidr_ids,
            denies: RefCell::new(HashMap::new()),
        }
    }

    fn policy(&self, p: &'a Policy, out: &mut Vec<Warning>) {
        for rule in p.rules.iter() {
            let slots = self.subject(&rule.subject);
            if slots.is_empty() {
                let field = rule.subject_path(p.kind);
                let message = match (&rule.subject, &p.origin.namespace) {
                    (Subject::Nodes(_), _) => {
                        "selects no HostEndpoint of the registry, so this rule enforces nothing"
                            .to_string()
                    }
                    (Subject::Endpoints(_), Some(ns)) if !self.namespace_has_workloads(ns) => {
                        format!("no endpoint of the registry is in namespace {ns:?}, so this rule enforces nothing")
                    }
                    (Subject::Endpoints(_), Some(ns)) => format!(
                        "selects no endpoint of the registry in namespace {ns:?}, so this rule enforces nothing"
                    ),
                    (Subject::Endpoints(_), None) => {
                        "selects no endpoint of the registry, so this rule enforces nothing"
                            .to_string()
                    }
                };
                out.push(warning(p, WarningCode::SelectsNothing, &field, message));
            }
            let lists = [
                (&rule.ingress, Direction::Ingress, false),
                (&rule.ingress_deny, Direction::Ingress, true),
                (&rule.egress, Direction::Egress, false),
                (&rule.egress_deny, Direction::Egress, true),
            ];
            for (items, dir, deny) in lists {
                for item in items {
                    self.item(p, item, dir, deny, &slots, out);
                }
            }
        }
    }

    /// The slots a rule's subject selects, as compile selects them: workloads
    /// by identity, host endpoints by their labels.
    fn subject(&self, subject: &'a Subject) -> Vec<u32> {
        match subject {
            Subject::Endpoints(sel) => {
                let mut slots: Vec<u32> = self
                    .selected_ids(sel)
                    .iter()
                    .filter_map(|id| self.slots_by_id.get(id))
                    .flatten()
                    .copied()
                    .collect();
                slots.sort_unstable();
                slots
            }
            Subject::Nodes(sel) => self
                .resolved
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.def.kind == EndpointKind::Host && labels::selector_matches(sel, &r.labels)
                })
                .map(|(slot, _)| slot as u32)
                .collect(),
        }
    }

    fn namespace_has_workloads(&self, ns: &str) -> bool {
        self.resolved
            .iter()
            .any(|r| r.def.kind == EndpointKind::Workload && registry::namespace_of(r.def) == ns)
    }

    /// Every identity a selector matches (reserved, workload and CIDR, as
    /// compile matches peers).
    fn selected_ids(&self, sel: &'a Selector) -> Rc<Vec<Identity>> {
        self.index.borrow_mut().select(sel)
    }

    /// The workloads with an address in `net` outside `except`: (address, slot).
    fn within(&self, net: &IpNet, except: &[IpNet]) -> Vec<(IpAddr, u32)> {
        let (lo, hi) = (net.network(), net.broadcast());
        let start = self.workload_addrs.partition_point(|(a, _)| *a < lo);
        self.workload_addrs[start..]
            .iter()
            .take_while(|(a, _)| *a <= hi)
            .filter(|(a, _)| net.contains(a) && !except.iter().any(|e| e.contains(a)))
            .copied()
            .collect()
    }

    fn item(
        &self,
        p: &Policy,
        item: &'a RuleItem,
        dir: Direction,
        deny: bool,
        slots: &[u32],
        out: &mut Vec<Warning>,
    ) {
        let source = p.source.item(&item.path);
        let path_of = |paths: Option<&Vec<String>>, i: usize| {
            paths
                .and_then(|ps| ps.get(i))
                .cloned()
                .unwrap_or_else(|| item.path.clone())
        };
        if let Peers::List(peers) = &item.peers {
            for (i, peer) in peers.iter().enumerate() {
                let field = path_of(source.map(|s| &s.peers), i);
                match peer {
                    Peer::Endpoints(sel) if self.selected_ids(sel).is_empty() => {
                        out.push(warning(
                            p,
                            WarningCode::PeerMatchesNothing,
                            &field,
                            format!(
                                "matches no endpoint of the registry{}, so this peer {} nothing",
                                in_namespace(sel),
                                if deny { "denies" } else { "allows" }
                            ),
                        ));
                    }
                    Peer::Cidr {
                        net,
                        except,
                        match_endpoints: false,
                    } if net.prefix_len() >= narrow(net) => {
                        if let Some(w) = self.cidr_over_endpoints(p, &field, net, except, dir) {
                            out.push(w);
                        }
                    }
                    _ => {}
                }
            }
        }
        if let L4::Ports(ports) = &item.l4 {
            for (i, pp) in ports.iter().enumerate() {
                let PortSpec::Named(name) = &pp.port else {
                    continue;
                };
                let field = path_of(source.map(|s| &s.ports), i);
                if let Some(message) = self.undeclared(item, dir, slots, name, pp.proto) {
                    out.push(warning(
                        p,
                        WarningCode::NamedPortUndeclared,
                        &field,
                        message,
                    ));
                }
            }
        }
        if !deny {
            if let Some(by) = self.shadowed(item, dir, slots, p.staged) {
                out.push(warning_at(
                    p,
                    WarningCode::ShadowedAllow,
                    &item.path,
                    item.pos,
                    format!(
                        "every flow this rule allows is denied by {} (deny wins), so it allows nothing",
                        list(&by)
                    ),
                ));
            }
        }
    }

    /// The warning for a CNP CIDR peer whose range covers workload endpoints.
    fn cidr_over_endpoints(
        &self,
        p: &Policy,
        field: &str,
        net: &IpNet,
        except: &[IpNet],
        dir: Direction,
    ) -> Option<Warning> {
        let mut seen: Vec<u32> = Vec::new();
        let mut covered: Vec<String> = Vec::new();
        for (a, slot) in self.within(net, except) {
            if !seen.contains(&slot) {
                seen.push(slot);
                let name = self.resolved[slot as usize].display_name();
                covered.push(format!("{name} at {a}"));
            }
        }
        if covered.is_empty() {
            return None;
        }
        let select = match dir {
            Direction::Ingress => "fromEndpoints",
            Direction::Egress => "toEndpoints",
        };
        let kind = match p.kind {
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            _ => "CiliumNetworkPolicy",
        };
        Some(warning(
            p,
            WarningCode::CidrCoversEndpoints,
            field,
            format!(
                "{net} covers registry endpoints ({}), which a CIDR rule of a {kind} never matches (it matches only addresses outside the registry); select them with {select}, or use a Kubernetes NetworkPolicy ipBlock, which matches them",
                list(&covered),
            ),
        ))
    }

    /// The message when no endpoint a named port could resolve against declares
    /// it: ingress, the endpoints the rule selects; egress, the destinations
    /// among its peers. `None` when some does, or when there is nothing to
    /// resolve against that another warning does not already name.
    fn undeclared(
        &self,
        item: &'a RuleItem,
        dir: Direction,
        slots: &[u32],
        name: &str,
        want: Proto,
    ) -> Option<String> {
        let declares = |slot: &u32| {
            let mut keys = Vec::new();
            named_keys(
                name,
                want,
                &self.resolved[*slot as usize].def.ports,
                &mut keys,
            );
            !keys.is_empty()
        };
        match dir {
            Direction::Ingress => {
                if slots.is_empty() || slots.iter().any(declares) {
                    return None;
                }
                Some(format!(
                    "no endpoint this rule selects declares the port name {name:?} (Endpoint spec.ports), so it matches nothing"
                ))
            }
            Direction::Egress => {
                let ids = self.peer_ids(item);
                let dests: Vec<u32> = if ids.first() == Some(&identity::ANY) {
                    self.slots_by_id.values().flatten().copied().collect()
                } else {
                    ids.iter()
                        .filter_map(|id| self.slots_by_id.get(id))
                        .flatten()
                        .copied()
                        .collect()
                };
                let only_selectors = match &item.peers {
                    Peers::All => false,
                    Peers::List(ps) => ps.iter().all(|p| matches!(p, Peer::Endpoints(_))),
                };
                if dests.iter().any(declares) || (dests.is_empty() && only_selectors) {
                    return None;
                }
                Some(format!(
                    "no destination of this rule declares the port name {name:?} (Endpoint spec.ports), so it matches nothing"
                ))
            }
        }
    }

    /// The identities an item's peers stand for, as compile expands them
    /// (just 0 for any identity).
    fn peer_ids(&self, item: &'a RuleItem) -> Vec<Identity> {
        peer_identities(
            &item.peers,
            &mut self.index.borrow_mut(),
            &self.cidr_ids,
            &crate::policy::fqdn::FqdnIds::default(),
            &self.workload_ids,
            &self.workload_ids_by_addr,
        )
    }

    /// The port keys an item allows at `slot` toward (or from) identity `id`,
    /// as compile expands them.
    fn keys(&self, item: &RuleItem, dir: Direction, slot: u32, id: Identity) -> Vec<PortKey> {
        let mut keys = Vec::new();
        let key = |proto, port, prefix| PortKey {
            proto,
            port,
            prefix,
        };
        match &item.l4 {
            L4::Any => keys.push(key(proto::ANY, 0, 0)),
            L4::Icmps(list) => keys.extend(list.iter().map(|t| {
                let pr = match t.family {
                    Family::V4 => proto::ICMP,
                    Family::V6 => proto::ICMPV6,
                };
                key(pr, u16::from(t.ty), 16)
            })),
            L4::Ports(list) => {
                for pp in list {
                    match &pp.port {
                        PortSpec::Number(n) => number_keys(*n, pp.end_port, pp.proto, &mut keys),
                        PortSpec::Named(name) => {
                            let declared: &[NamedPort] = match (dir, id) {
                                (Direction::Ingress, _) => &self.resolved[slot as usize].def.ports,
                                (Direction::Egress, identity::ANY) => &self.all_ports,
                                (Direction::Egress, id) => {
                                    self.ports_by_id.get(&id).map_or(&[], Vec::as_slice)
                                }
                            };
                            named_keys(name, pp.proto, declared, &mut keys);
                        }
                    }
                }
            }
        }
        keys
    }

    /// `f` of the deny entries (enforced and staged) of `slot` in `dir`,
    /// found once.
    fn with_denies<T>(
        &self,
        slot: u32,
        dir: Direction,
        f: impl FnOnce(&[&'a PolicyEntry]) -> T,
    ) -> T {
        let mut cache = self.denies.borrow_mut();
        let d = cache.entry((slot, dir)).or_insert_with(|| {
            lookup::entries_for(self.compiled, slot, dir)
                .iter()
                .filter(|e| e.verdict != EntryVerdict::Allow)
                .filter(|e| e.verdict != EntryVerdict::StagedDefaultDeny)
                .collect()
        });
        f(d)
    }

    /// The deny rules that deny every flow an allow item allows at every
    /// endpoint it applies to, when they do (and it allows something). A
    /// staged allow is shadowed by staged denies too.
    fn shadowed(
        &self,
        item: &'a RuleItem,
        dir: Direction,
        slots: &[u32],
        staged: bool,
    ) -> Option<Vec<String>> {
        // Most endpoints have no deny at all: nothing to expand.
        if slots.is_empty()
            || slots
                .iter()
                .any(|s| self.with_denies(*s, dir, <[_]>::is_empty))
        {
            return None;
        }
        let denies = |v: EntryVerdict| {
            v == EntryVerdict::Deny
                || (staged && matches!(v, EntryVerdict::StagedDeny | EntryVerdict::AllowStagedDeny))
        };
        let ids = self.peer_ids(item);
        let mut by: Vec<u32> = Vec::new();
        let mut any = false;
        for &slot in slots {
            for &id in &ids {
                for PortKey {
                    proto: pr,
                    port,
                    prefix,
                } in self.keys(item, dir, slot, id)
                {
                    any = true;
                    let covers = |e: &&&PolicyEntry| {
                        denies(e.verdict)
                            && (e.proto == proto::ANY
                                || (e.proto == pr
                                    && e.port_prefix <= prefix
                                    && lookup::prefix_covers(e.port, e.port_prefix, port)))
                    };
                    let rule = self.with_denies(slot, dir, |d| {
                        let of = |want: Identity| {
                            let lo = d.partition_point(|e| e.identity < want);
                            let hi = d.partition_point(|e| e.identity <= want);
                            d[lo..hi].iter().find(covers).map(|e| e.rule)
                        };
                        of(id).or_else(|| of(identity::ANY))
                    })?;
                    if !by.contains(&rule) {
                        by.push(rule);
                    }
                }
            }
        }
        if !any {
            return None;
        }
        by.sort_unstable();
        Some(
            by.iter()
                .filter_map(|r| self.compiled.rules.get(*r as usize))
                .map(|r| format!("{} {} {}", r.kind, r.policy, r.path))
                .collect(),
        )
    }
}
