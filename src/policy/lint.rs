//! Warnings about what valid policies do against the registry: a rule that
//! selects no endpoint, a peer selector that matches nothing, a named port no
//! endpoint it could apply to declares, an allow rule a deny rule shadows
//! whole, a CiliumNetworkPolicy CIDR rule over registry endpoints (which such
//! a rule never matches). docs/policy.md, "Warnings about what a policy does",
//! lists each with an example; `netpolctl check` prints them and `--strict`
//! fails on them, netpold reports them in `status` and applies the set as usual.
//!
//! Works on the validated policies, the registry and the state compiled from
//! both (its identities, and its deny entries for the shadowed-allow check); it
//! compiles nothing and decides no verdict. Only what is certain warns: a rule
//! shadowed by a union of denies that split one port block between them, for
//! example, is not reported. Pure, no I/O.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::api::model::{
    Entity, Family, NamedPort, Origin, Peer, Peers, Policy, PolicyKind, PolicySet, Proto,
    RegistrySet, RuleItem, Selector, Subject, L4,
};
use crate::api::validate::POD_NAMESPACE_LABEL;
use crate::api::{Problem, Warning, WarningCode};
use crate::policy::compile::port_range_blocks;
use crate::policy::identity;
use crate::policy::labels;
use crate::policy::lookup;
use crate::policy::registry::{self, ResolvedEndpoint};
use crate::policy::types::{proto, Compiled, Direction, EntryVerdict, Identity, PolicyEntry};

/// At most this many endpoints or rules are named in one message.
const NAMED: usize = 3;

/// Every warning about what `policies` do against `registry`, `compiled` being
/// the state compiled from both for `node_name`. Sorted by file, position and
/// code. Nothing is reported when `compiled` is not that state (another
/// number of endpoints).
pub fn lint(
    policies: &PolicySet,
    registry: &RegistrySet,
    compiled: &Compiled,
    node_name: &str,
) -> Vec<Warning> {
    let resolved = registry::resolve(registry, node_name);
    if resolved.len() != compiled.endpoints.len() {
        return Vec::new();
    }
    let lint = Lint { resolved, compiled };
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
}

/// `Kind namespace/name` or `Kind name`, as problems name a document.
fn object_of(o: &Origin) -> String {
    match &o.namespace {
        Some(ns) => format!("{} {ns}/{}", o.kind, o.name),
        None => format!("{} {}", o.kind, o.name),
    }
}

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
            file: p.origin.file.clone(),
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

/// The namespace a namespaced selector is confined to, if it names exactly one.
fn namespace_of(sel: &Selector) -> Option<&str> {
    sel.requirements.iter().find_map(|r| {
        (r.key.key == POD_NAMESPACE_LABEL
            && r.op == crate::api::model::Op::In
            && r.values.len() == 1)
            .then(|| r.values.iter().next().map(String::as_str))
            .flatten()
    })
}

/// ` in namespace "prod"` for a selector confined to one namespace.
fn in_namespace(sel: &Selector) -> String {
    namespace_of(sel)
        .map(|ns| format!(" in namespace {ns:?}"))
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

/// Protocols of a `Proto` when a port is given (as compile expands them).
fn protos(p: Proto) -> &'static [u8] {
    match p {
        Proto::Tcp => &[proto::TCP],
        Proto::Udp => &[proto::UDP],
        Proto::Sctp => &[proto::SCTP],
        Proto::Any => &[proto::TCP, proto::UDP, proto::SCTP],
    }
}

/// The protocols on which a declared port answers to a port name wanted on
/// `want` (as compile resolves named ports).
fn named_protos(want: Proto, declared: &NamedPort) -> &'static [u8] {
    match (want, declared.proto) {
        (Proto::Any, p) | (p, Proto::Any) => protos(p),
        (w, p) if w == p => protos(w),
        _ => &[],
    }
}

/// One port key of an item: protocol (0 any), port, prefix bits.
type Key = (u8, u16, u8);

fn declared_keys(name: &str, want: Proto, declared: &[NamedPort], out: &mut Vec<Key>) {
    for np in declared
        .iter()
        .filter(|np| np.name.eq_ignore_ascii_case(name))
    {
        out.extend(named_protos(want, np).iter().map(|&pr| (pr, np.port, 16)));
    }
}

impl Lint<'_> {
    fn policy(&self, p: &Policy, out: &mut Vec<Warning>) {
        for rule in p.rules.iter() {
            let slots = self.subject(&rule.subject);
            if slots.is_empty() {
                let field = rule.subject_path(p.kind);
                let message = match (&rule.subject, &p.origin.namespace) {
                    (Subject::Nodes(_), _) => {
                        "selects no HostEndpoint of the registry, so this rule enforces nothing".to_string()
                    }
                    (Subject::Endpoints(_), Some(ns)) if !self.namespace_has_workloads(ns) => format!(
                        "no endpoint of the registry is in namespace {ns:?}, so this rule enforces nothing"
                    ),
                    (Subject::Endpoints(_), Some(ns)) => format!(
                        "selects no endpoint of the registry in namespace {ns:?}, so this rule enforces nothing"
                    ),
                    (Subject::Endpoints(_), None) => {
                        "selects no endpoint of the registry, so this rule enforces nothing".to_string()
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

    /// The slots a rule's subject selects.
    fn subject(&self, subject: &Subject) -> Vec<u32> {
        let (sel, kind) = match subject {
            Subject::Endpoints(s) => (s, crate::api::model::EndpointKind::Workload),
            Subject::Nodes(s) => (s, crate::api::model::EndpointKind::Host),
        };
        self.resolved
            .iter()
            .enumerate()
            .filter(|(_, r)| r.def.kind == kind && labels::selector_matches(sel, &r.labels))
            .map(|(slot, _)| slot as u32)
            .collect()
    }

    fn namespace_has_workloads(&self, ns: &str) -> bool {
        self.resolved.iter().any(|r| {
            r.def.kind == crate::api::model::EndpointKind::Workload
                && registry::namespace_of(r.def) == ns
        })
    }

    fn item(
        &self,
        p: &Policy,
        item: &RuleItem,
        dir: Direction,
        deny: bool,
        slots: &[u32],
        out: &mut Vec<Warning>,
    ) {
        let source = p.source.items.get(&item.path);
        let path_of = |paths: Option<&Vec<String>>, i: usize, fallback: &str| {
            paths
                .and_then(|ps| ps.get(i))
                .cloned()
                .unwrap_or_else(|| fallback.to_string())
        };
        let peer_paths = source.map(|s| &s.peers);
        if let Peers::List(peers) = &item.peers {
            for (i, peer) in peers.iter().enumerate() {
                let field = path_of(peer_paths, i, &item.path);
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
            let port_paths = source.map(|s| &s.ports);
            for (i, pp) in ports.iter().enumerate() {
                let crate::api::model::PortSpec::Named(name) = &pp.port else {
                    continue;
                };
                let field = path_of(port_paths, i, &item.path);
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

    /// Every identity a selector matches (reserved, workload and CIDR, as
    /// compile matches peers).
    fn selected_ids(&self, sel: &Selector) -> Vec<Identity> {
        self.compiled
            .identities
            .iter()
            .filter(|i| labels::selector_matches(sel, &i.labels))
            .map(|i| i.id)
            .collect()
    }

    /// The workload endpoints (slot, address) a CNP CIDR peer's range covers.
    fn cidr_over_endpoints(
        &self,
        p: &Policy,
        field: &str,
        net: &IpNet,
        except: &[IpNet],
        dir: Direction,
    ) -> Option<Warning> {
        let covered: Vec<String> = self
            .resolved
            .iter()
            .filter(|r| r.def.kind == crate::api::model::EndpointKind::Workload)
            .filter_map(|r| {
                let a = r
                    .def
                    .addresses
                    .iter()
                    .find(|a| net.contains(*a) && !except.iter().any(|e| e.contains(*a)))?;
                Some(format!("{} at {a}", r.display_name()))
            })
            .collect();
        if covered.is_empty() {
            return None;
        }
        let select = match dir {
            Direction::Ingress => "fromEndpoints",
            Direction::Egress => "toEndpoints",
        };
        Some(warning(
            p,
            WarningCode::CidrCoversEndpoints,
            field,
            format!(
                "{net} covers registry endpoints ({}), which a CIDR rule of a {} never matches (it matches only addresses outside the registry); select them with {select}, or use a Kubernetes NetworkPolicy ipBlock, which matches them",
                list(&covered),
                match p.kind {
                    PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
                    _ => "CiliumNetworkPolicy",
                }
            ),
        ))
    }

    /// The message when no endpoint a named port could resolve against declares
    /// it: ingress, the endpoints the rule selects; egress, the destinations
    /// among its peers. `None` when some does, or when there is nothing to
    /// resolve against that another warning does not already name.
    fn undeclared(
        &self,
        item: &RuleItem,
        dir: Direction,
        slots: &[u32],
        name: &str,
        want: Proto,
    ) -> Option<String> {
        let declares = |slot: &u32| {
            let mut keys = Vec::new();
            declared_keys(
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
                let dests: Vec<u32> = self
                    .compiled
                    .endpoints
                    .iter()
                    .filter(|e| {
                        e.kind == crate::api::model::EndpointKind::Workload
                            && (ids.contains(&identity::ANY) || ids.contains(&e.identity))
                    })
                    .map(|e| e.slot)
                    .collect();
                let only_empty_selectors = match &item.peers {
                    Peers::All => false,
                    Peers::List(ps) => ps.iter().all(|p| matches!(p, Peer::Endpoints(_))),
                };
                if dests.iter().any(declares) || (dests.is_empty() && only_empty_selectors) {
                    return None;
                }
                Some(format!(
                    "no destination of this rule declares the port name {name:?} (Endpoint spec.ports), so it matches nothing"
                ))
            }
        }
    }

    /// The identities an item's peers stand for, as compile expands them
    /// (0 for any identity).
    fn peer_ids(&self, item: &RuleItem) -> Vec<Identity> {
        let c = self.compiled;
        let cidrs = || {
            c.ipcache
                .iter()
                .filter(|e| e.endpoint.is_none() && identity::is_cidr(e.identity))
        };
        let workloads = || {
            c.endpoints
                .iter()
                .filter(|e| e.kind == crate::api::model::EndpointKind::Workload)
        };
        let mut ids = Vec::new();
        let Peers::List(peers) = &item.peers else {
            return vec![identity::ANY];
        };
        for peer in peers {
            match peer {
                Peer::Endpoints(sel) => ids.extend(self.selected_ids(sel)),
                Peer::Cidr {
                    net,
                    except,
                    match_endpoints,
                } => {
                    let outside = |n: &IpNet| !except.iter().any(|e| e.contains(n));
                    if net.prefix_len() == 0 {
                        ids.push(match net {
                            IpNet::V4(_) => identity::WORLD_IPV4,
                            IpNet::V6(_) => identity::WORLD_IPV6,
                        });
                    }
                    ids.extend(
                        cidrs()
                            .filter(|e| net.contains(&e.net) && outside(&e.net))
                            .map(|e| e.identity),
                    );
                    if *match_endpoints {
                        let inside =
                            |a: &IpAddr| net.contains(a) && !except.iter().any(|e| e.contains(a));
                        ids.extend(
                            workloads()
                                .filter(|e| e.addresses.iter().any(inside))
                                .map(|e| e.identity),
                        );
                    }
                }
                Peer::Entity(e) => match identity::entity_reserved(*e) {
                    None => ids.push(identity::ANY),
                    Some(r) => {
                        ids.extend(r);
                        let family = |v6: bool| {
                            cidrs()
                                .filter(move |e| matches!(e.net, IpNet::V6(_)) == v6)
                                .map(|e| e.identity)
                        };
                        match e {
                            Entity::World => ids.extend(cidrs().map(|e| e.identity)),
                            Entity::WorldIpv4 => ids.extend(family(false)),
                            Entity::WorldIpv6 => ids.extend(family(true)),
                            Entity::Cluster => ids.extend(workloads().map(|e| e.identity)),
                            _ => {}
                        }
                    }
                },
            }
        }
        ids.sort_unstable();
        ids.dedup();
        if ids.first() == Some(&identity::ANY) {
            ids.truncate(1);
        }
        ids
    }

    /// The port keys an item allows at `slot` toward (or from) identity `id`.
    fn keys(&self, item: &RuleItem, dir: Direction, slot: u32, id: Identity) -> Vec<Key> {
        let mut keys = Vec::new();
        match &item.l4 {
            L4::Any => keys.push((proto::ANY, 0, 0)),
            L4::Icmps(list) => keys.extend(list.iter().map(|t| {
                let pr = match t.family {
                    Family::V4 => proto::ICMP,
                    Family::V6 => proto::ICMPV6,
                };
                (pr, u16::from(t.ty), 16)
            })),
            L4::Ports(list) => {
                for pp in list {
                    match &pp.port {
                        crate::api::model::PortSpec::Number(n) => {
                            let end = pp.end_port.filter(|e| e > n);
                            for &pr in protos(pp.proto) {
                                if *n == 0 && end.is_none() {
                                    keys.push((pr, 0, 0));
                                    continue;
                                }
                                keys.extend(
                                    port_range_blocks(*n, end.unwrap_or(*n))
                                        .into_iter()
                                        .map(|(base, prefix)| (pr, base, prefix)),
                                );
                            }
                        }
                        crate::api::model::PortSpec::Named(name) => match dir {
                            Direction::Ingress => declared_keys(
                                name,
                                pp.proto,
                                &self.resolved[slot as usize].def.ports,
                                &mut keys,
                            ),
                            Direction::Egress => {
                                for ep in self.resolved.iter().zip(&self.compiled.endpoints) {
                                    if id == identity::ANY || ep.1.identity == id {
                                        declared_keys(name, pp.proto, &ep.0.def.ports, &mut keys);
                                    }
                                }
                            }
                        },
                    }
                }
            }
        }
        keys
    }

    /// The deny rules that deny every flow an allow item allows at every
    /// endpoint it applies to, when they do (and it allows something). A
    /// staged allow is shadowed by staged denies too.
    fn shadowed(
        &self,
        item: &RuleItem,
        dir: Direction,
        slots: &[u32],
        staged: bool,
    ) -> Option<Vec<String>> {
        let denies = |v: EntryVerdict| {
            v == EntryVerdict::Deny
                || (staged && matches!(v, EntryVerdict::StagedDeny | EntryVerdict::AllowStagedDeny))
        };
        let ids = self.peer_ids(item);
        let mut by: Vec<u32> = Vec::new();
        let mut any = false;
        for &slot in slots {
            let entries = lookup::entries_for(self.compiled, slot, dir);
            for &id in &ids {
                for (pr, port, prefix) in self.keys(item, dir, slot, id) {
                    any = true;
                    let covers = |e: &&PolicyEntry| {
                        denies(e.verdict)
                            && (e.identity == id || e.identity == identity::ANY)
                            && (e.proto == proto::ANY
                                || (e.proto == pr
                                    && e.port_prefix <= prefix
                                    && lookup::prefix_covers(e.port, e.port_prefix, port)))
                    };
                    let d = entries.iter().find(covers)?;
                    if !by.contains(&d.rule) {
                        by.push(d.rule);
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
