//! `toFQDNs` and `rules.dns` in compile: the addresses the DNS proxy learned
//! as identities, and each endpoint's DNS rules (docs/policy.md, "DNS names").
//!
//! Owns: the learned view compile reads ([`FqdnAddrs`]: name → addresses,
//! given by the daemon from its `dns::learned::LearnedSet`, or by the offline
//! tools from the learned file); which learned addresses each FQDN selector
//! of the policies stands for, and their identities ([`FqdnIds`]); the DNS
//! rules of an endpoint per port ([`EndpointDns`]), which tell the datapath
//! what to steer to the proxy and the proxy what to allow.
//!
//! How a learned address becomes an identity, as Cilium's selector cache
//! does it for toFQDNs: each address is a host prefix (`/32`, `/128`) with a
//! CIDR identity (labels `cidr:<prefix>`, `reserved:world`), put in the
//! ipcache beside the policies' CIDR prefixes, so `toCIDR` rules that
//! contain it and `toEntities: [world]` cover it as they cover any world
//! address. A selector stands for the identities of the addresses learned
//! for every name it matches, whichever endpoint looked the name up (Cilium's
//! name manager is global too); a selector with nothing learned stands for no
//! identity, so it allows nothing. A learned address that is a registry
//! endpoint's or a node's keeps that identity in the ipcache (as a CNP CIDR
//! rule, toFQDNs reaches world addresses only).
//!
//! Identities of learned addresses are stable: a hash of the address in the
//! upper half of the CIDR scope, probed in address order on a collision, so
//! learning one more address does not renumber the others (the policies'
//! own CIDR prefixes keep their numbers from 1). An address that is also a
//! policy's `/32` (or `/128`) prefix shares that prefix's identity.
//!
//! Must not: do I/O, read a clock (time is in the view given), or decide
//! which names a query may ask (that is `dns::message::decide` with the
//! selectors given here).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::identity::{self, CIDR_SCOPE};
use super::trace::{self, Side, TraceResult, Verdict};
use super::types::{proto, Compiled, Identity, RuleRef};
use crate::api::model::{
    FqdnSelector, NamedPort, Peer, Peers, PolicySet, PortSpec, Proto, RuleItem,
};
use crate::dns::learned::LearnedSet;
use crate::dns::matcher;

/// What the DNS proxy has learned, as compile reads it: each name (normal
/// form: lower case, trailing dot) with the addresses it answered that are
/// still alive (TTL not over, or held by an open connection). Empty by
/// default: then every `toFQDNs` selector allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct FqdnAddrs {
    names: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl FqdnAddrs {
    pub fn new() -> FqdnAddrs {
        FqdnAddrs::default()
    }

    /// Add one address of `name` (any spelling: it is normalised).
    pub fn insert(&mut self, name: &str, ip: IpAddr) {
        self.names
            .entry(matcher::normalize(name))
            .or_default()
            .insert(ip);
    }

    /// Whether `ip` is one of `name`'s addresses (any spelling of the name).
    pub fn contains(&self, name: &str, ip: IpAddr) -> bool {
        self.names
            .get(&matcher::normalize(name))
            .is_some_and(|a| a.contains(&ip))
    }

    /// The addresses of `set` alive at `now` (seconds since the epoch): those
    /// whose TTL has not ended, and those an open connection holds.
    pub fn from_learned(set: &LearnedSet, now: u64) -> FqdnAddrs {
        let mut out = FqdnAddrs::new();
        for e in set.entries() {
            for l in &e.addrs {
                if l.expires > now || set.held(&e.endpoint, l.ip) {
                    out.insert(&e.name, l.ip);
                }
            }
        }
        out
    }

    /// Every name with its addresses, by name.
    pub fn names(&self) -> impl Iterator<Item = (&str, &BTreeSet<IpAddr>)> {
        self.names.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// The addresses `sel` stands for: those of every name it matches.
    pub fn addrs_for(&self, sel: &FqdnSelector) -> BTreeSet<IpAddr> {
        let mut out = BTreeSet::new();
        match sel {
            // One lookup, not a scan, for the common case.
            FqdnSelector::Name(n) => {
                if let Some(a) = self.names.get(n) {
                    out.extend(a.iter().copied());
                }
            }
            FqdnSelector::Pattern(_) => {
                for (name, a) in &self.names {
                    if matcher::matches(sel, name) {
                        out.extend(a.iter().copied());
                    }
                }
            }
        }
        out
    }

    /// The names matched by `sel` whose answers gave `ip` (for explanations).
    pub fn names_for(&self, sel: &FqdnSelector, ip: IpAddr) -> Vec<&str> {
        self.names
            .iter()
            .filter(|(n, a)| a.contains(&ip) && matcher::matches(sel, n))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The addresses learned for `name` (any spelling).
    pub fn addrs_of(&self, name: &str) -> Option<&BTreeSet<IpAddr>> {
        self.names.get(&matcher::normalize(name))
    }

    /// Distinct addresses in all.
    pub fn len(&self) -> usize {
        self.names.values().flatten().collect::<BTreeSet<_>>().len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Per FQDN selector of the policies (sorted), its learned addresses as
/// `/32` or `/128` prefixes, sorted.
pub(crate) type LearnedPrefixes = BTreeMap<FqdnSelector, Vec<IpNet>>;

/// The learned host prefixes of the policies' FQDN selectors.
pub(crate) fn learned_prefixes<'a>(
    addrs: &FqdnAddrs,
    selectors: impl IntoIterator<Item = &'a FqdnSelector>,
) -> LearnedPrefixes {
    let mut out = BTreeMap::new();
    if addrs.is_empty() {
        return out;
    }
    for sel in selectors {
        if out.contains_key(sel) {
            continue;
        }
        let nets = addrs.addrs_for(sel).into_iter().map(IpNet::from).collect();
        out.insert(sel.clone(), nets);
    }
    out
}

/// First identity of learned addresses: the upper half of the CIDR scope
/// (the policies' CIDR prefixes are numbered from `CIDR_SCOPE | 1` up).
pub const FQDN_MIN: Identity = CIDR_SCOPE | 0x0080_0000;
/// One past the last identity of the CIDR scope.
const FQDN_END: Identity = CIDR_SCOPE + 0x0100_0000;

/// The identity an address would get with no collision.
fn preferred_id(net: &IpNet) -> Identity {
    let bytes = match net.addr() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let span = u64::from(FQDN_END - FQDN_MIN);
    FQDN_MIN + (identity::fnv1a64(&bytes) % span) as Identity
}

/// Which identities each FQDN selector of the policies stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FqdnIds {
    by_selector: BTreeMap<FqdnSelector, Vec<Identity>>,
}

impl FqdnIds {
    /// The identities of `sel`, sorted; none when nothing is learned for it.
    pub(crate) fn of(&self, sel: &FqdnSelector) -> &[Identity] {
        self.by_selector.get(sel).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Give every learned prefix an identity in `cidr_ids` (the policies' CIDR
/// identities: a prefix already there keeps its identity) and say which
/// identities each selector stands for. Deterministic: a function of the
/// prefixes only (see the module's doc for the numbering).
pub(crate) fn allocate(
    cidr_ids: &mut BTreeMap<IpNet, Identity>,
    learned: &LearnedPrefixes,
) -> FqdnIds {
    let fresh: BTreeSet<IpNet> = learned
        .values()
        .flatten()
        .filter(|n| !cidr_ids.contains_key(n))
        .copied()
        .collect();
    if !fresh.is_empty() {
        let mut used: HashSet<Identity> = cidr_ids.values().copied().collect();
        for net in fresh {
            let mut id = preferred_id(&net);
            while used.contains(&id) {
                id += 1;
                if id >= FQDN_END {
                    id = FQDN_MIN;
                }
            }
            used.insert(id);
            cidr_ids.insert(net, id);
        }
    }
    let by_selector = learned
        .iter()
        .map(|(sel, nets)| {
            let mut ids: Vec<Identity> = nets.iter().map(|n| cidr_ids[n]).collect();
            ids.sort_unstable();
            ids.dedup();
            (sel.clone(), ids)
        })
        .collect();
    FqdnIds { by_selector }
}

/// The DNS rules of one endpoint whose egress has `toPorts[].rules.dns`:
/// per DNS port, the names its queries may ask. The datapath steers the
/// endpoint's traffic to these ports to the proxy; the proxy answers
/// REFUSED to a query no selector here allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointDns {
    /// The endpoint's slot in [`super::types::Compiled::endpoints`].
    pub endpoint: u32,
    /// Sorted by (protocol, port), one per (protocol, port).
    pub ports: Vec<DnsPort>,
}

/// The DNS rules of one port (TCP or UDP) of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsPort {
    /// [`proto::TCP`] or [`proto::UDP`] (a rule's `ANY` gives both).
    pub proto: u8,
    pub port: u16,
    /// One per rule item with DNS rules on this port, in rule order.
    pub allows: Vec<DnsAllow>,
}

/// What one rule item allows on a DNS port: queries for names its selectors
/// match, to the DNS servers of its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsAllow {
    /// The identities of the item's peers, the DNS servers these rules are
    /// for, sorted; `[0]` for any peer (an item without peer fields).
    pub servers: Vec<Identity>,
    pub selectors: Vec<FqdnSelector>,
    /// Index into [`super::types::Compiled::rules`] of the item.
    pub rule: u32,
}

impl DnsPort {
    /// The selectors that allow a query to a server of identity `server`.
    pub fn selectors_for(&self, server: Identity) -> Vec<FqdnSelector> {
        let mut out: Vec<FqdnSelector> = self
            .allows
            .iter()
            .filter(|a| a.servers.first() == Some(&identity::ANY) || a.servers.contains(&server))
            .flat_map(|a| a.selectors.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

impl EndpointDns {
    /// The rules of one port, if the endpoint has DNS rules there.
    pub fn port(&self, proto: u8, port: u16) -> Option<&DnsPort> {
        self.ports
            .binary_search_by(|p| (p.proto, p.port).cmp(&(proto, port)))
            .ok()
            .map(|i| &self.ports[i])
    }

    /// Every selector of every port and server, sorted: what a proxy that
    /// does not tell ports and servers apart allows.
    pub fn selectors(&self) -> Vec<FqdnSelector> {
        let mut out: Vec<FqdnSelector> = self
            .ports
            .iter()
            .flat_map(|p| p.allows.iter())
            .flat_map(|a| a.selectors.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// One enforced egress allow item with DNS rules, as compile hands it over.
pub(crate) struct DnsItem<'a> {
    /// Its rule ref.
    pub rule: u32,
    pub item: &'a RuleItem,
    /// The identities of its peers, sorted (just 0 for any).
    pub servers: &'a [Identity],
}

/// The DNS ports of an endpoint from its enforced egress allow items with DNS
/// rules. A named port is the port of that name the item's peers declare
/// (`declared(identity)`; identity 0: every declared port).
pub(crate) fn dns_ports<'a>(
    items: &[DnsItem<'_>],
    declared: impl Fn(Identity) -> &'a [NamedPort],
) -> Vec<DnsPort> {
    let mut by_port: BTreeMap<(u8, u16), Vec<DnsAllow>> = BTreeMap::new();
    for it in items {
        for rule in &it.item.dns {
            let mut keys: BTreeSet<(u8, u16)> = BTreeSet::new();
            for pp in &rule.ports {
                let protos: &[u8] = match pp.proto {
                    Proto::Tcp => &[proto::TCP],
                    Proto::Udp => &[proto::UDP],
                    // DNS is UDP and TCP; validation refuses SCTP.
                    Proto::Any | Proto::Sctp => &[proto::UDP, proto::TCP],
                };
                match &pp.port {
                    PortSpec::Number(n) => keys.extend(protos.iter().map(|p| (*p, *n))),
                    PortSpec::Named(name) => {
                        for &id in it.servers {
                            for np in declared(id)
                                .iter()
                                .filter(|np| np.name.eq_ignore_ascii_case(name))
                            {
                                for &p in protos {
                                    let fits = match np.proto {
                                        Proto::Any => true,
                                        Proto::Tcp => p == proto::TCP,
                                        Proto::Udp => p == proto::UDP,
                                        Proto::Sctp => false,
                                    };
                                    if fits {
                                        keys.insert((p, np.port));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for key in keys {
                let allows = by_port.entry(key).or_default();
                match allows.last_mut() {
                    // Two port rules of one item on the same port: one allow.
                    Some(a) if a.rule == it.rule => {
                        a.selectors.extend(rule.selectors.iter().cloned());
                        a.selectors.sort();
                        a.selectors.dedup();
                    }
                    _ => {
                        let mut selectors = rule.selectors.clone();
                        selectors.sort();
                        selectors.dedup();
                        allows.push(DnsAllow {
                            servers: it.servers.to_vec(),
                            selectors,
                            rule: it.rule,
                        });
                    }
                }
            }
        }
    }
    by_port
        .into_iter()
        .map(|((proto, port), allows)| DnsPort {
            proto,
            port,
            allows,
        })
        .collect()
}

/// A selector as written in a policy: `matchName: api.example.com.`.
pub fn selector_text(sel: &FqdnSelector) -> String {
    match sel {
        FqdnSelector::Name(n) => format!("matchName: {n}"),
        FqdnSelector::Pattern(p) => format!("matchPattern: {p}"),
    }
}

/// A selector as JSON output writes it: `{"matchName": "api.example.com."}`.
pub fn selector_json(sel: &FqdnSelector) -> serde_json::Value {
    match sel {
        FqdnSelector::Name(n) => serde_json::json!({ "matchName": n }),
        FqdnSelector::Pattern(p) => serde_json::json!({ "matchPattern": p }),
    }
}

/// The rule item a rule ref names, in `policies`.
pub fn item_of<'a>(policies: &'a PolicySet, r: &RuleRef) -> Option<&'a RuleItem> {
    policies
        .policies
        .iter()
        .filter(|p| {
            let name = match &p.origin.namespace {
                Some(ns) => format!("{ns}/{}", p.origin.name),
                None => p.origin.name.to_string(),
            };
            *p.origin.file == *r.file && *p.origin.kind == *r.kind && *name == *r.policy
        })
        .flat_map(|p| p.rules.iter())
        .flat_map(crate::api::model::Rule::items)
        .find(|item| *item.path == *r.path)
}

/// Why a toFQDNs rule decided a flow to a learned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FqdnDecision {
    /// The selectors of the deciding item that match a name whose answer
    /// gave the address (`matchName: …` / `matchPattern: …`).
    pub selectors: Vec<String>,
    /// Those names (normal form).
    pub names: Vec<String>,
}

/// One learned address of a traced name, and the verdict toward it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressTrace {
    pub address: IpAddr,
    /// `Some` when the egress direction was decided by a toFQDNs rule.
    pub fqdn: Option<FqdnDecision>,
    pub trace: TraceResult,
}

/// `netpolctl trace --to NAME`: the verdict toward each address learned for
/// a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NameTrace {
    /// Normal form (lower case, trailing dot).
    pub name: String,
    /// Allowed when the flow to every learned address is; denied when one is
    /// not, or when nothing is learned for the name (toFQDNs allows an
    /// address only once the proxy has learned it).
    pub verdict: Verdict,
    pub addresses: Vec<AddressTrace>,
}

/// Trace a new connection from `src` to every address `learned` holds for
/// `name`, explaining which toFQDNs selector, name and address decided.
pub fn trace_name(
    c: &Compiled,
    policies: &PolicySet,
    learned: &FqdnAddrs,
    src: &Side,
    name: &str,
    proto_: u8,
    port: u16,
) -> NameTrace {
    let name = matcher::normalize(name);
    let mut addresses = Vec::new();
    for &ip in learned.addrs_of(&name).into_iter().flatten() {
        // An address always resolves (to an endpoint, or its ipcache identity).
        let Ok(dst) = trace::resolve_side(c, &ip.to_string()) else {
            continue;
        };
        let t = trace::trace(c, src, &dst, proto_, port);
        let fqdn = t.egress.rule.as_ref().and_then(|r| {
            let item = item_of(policies, r)?;
            let Peers::List(peers) = &item.peers else {
                return None;
            };
            let mut selectors = Vec::new();
            let mut names = BTreeSet::new();
            for p in peers {
                if let Peer::Fqdn(sel) = p {
                    let matched = learned.names_for(sel, ip);
                    if !matched.is_empty() {
                        selectors.push(selector_text(sel));
                        names.extend(matched.into_iter().map(str::to_string));
                    }
                }
            }
            (!selectors.is_empty()).then(|| FqdnDecision {
                selectors,
                names: names.into_iter().collect(),
            })
        });
        addresses.push(AddressTrace {
            address: ip,
            fqdn,
            trace: t,
        });
    }
    let verdict = if !addresses.is_empty()
        && addresses
            .iter()
            .all(|a| a.trace.verdict == Verdict::Allowed)
    {
        Verdict::Allowed
    } else {
        Verdict::Denied
    };
    NameTrace {
        name,
        verdict,
        addresses,
    }
}

impl fmt::Display for NameTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.addresses.is_empty() {
            return writeln!(
                f,
                "{}: DENIED — no address is learned for this name, and toFQDNs allows an address only once the DNS proxy has learned it from an answer",
                self.name
            );
        }
        let list: Vec<String> = self
            .addresses
            .iter()
            .map(|a| a.address.to_string())
            .collect();
        let v = match self.verdict {
            Verdict::Allowed => "ALLOWED",
            Verdict::Denied => "DENIED",
        };
        writeln!(f, "{} ({}): {v}", self.name, list.join(", "))?;
        for a in &self.addresses {
            write!(f, "{}", a.trace)?;
            if let Some(d) = &a.fqdn {
                writeln!(
                    f,
                    "  fqdn    {} matched {}, whose answer gave {}",
                    d.selectors.join(", "),
                    d.names.join(", "),
                    a.address
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::learned::LearnedConfig;
    use crate::dns::message::Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn name(n: &str) -> FqdnSelector {
        FqdnSelector::Name(crate::api::validate::fqdn_name(n).unwrap())
    }

    fn pat(p: &str) -> FqdnSelector {
        FqdnSelector::Pattern(crate::api::validate::fqdn_pattern(p).unwrap())
    }

    #[test]
    fn selectors_stand_for_the_addresses_of_the_names_they_match() {
        let mut a = FqdnAddrs::new();
        a.insert("API.example.com", ip("192.0.2.1"));
        a.insert("api.example.com.", ip("2001:db8::1"));
        a.insert("www.example.com", ip("192.0.2.2"));
        a.insert("a.b.example.com", ip("192.0.2.3"));
        assert_eq!(
            a.addrs_for(&name("api.example.com")),
            BTreeSet::from([ip("192.0.2.1"), ip("2001:db8::1")])
        );
        assert_eq!(
            a.addrs_for(&pat("*.example.com")),
            BTreeSet::from([ip("192.0.2.1"), ip("2001:db8::1"), ip("192.0.2.2")])
        );
        assert_eq!(a.addrs_for(&pat("**.example.com")).len(), 4);
        assert!(a.addrs_for(&name("example.com")).is_empty());
        assert_eq!(
            a.names_for(&pat("*.example.com"), ip("192.0.2.2")),
            vec!["www.example.com."]
        );
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn the_view_of_a_learned_set_keeps_live_and_held_addresses() {
        let mut set = LearnedSet::new(LearnedConfig {
            min_ttl_s: 0,
            ..LearnedConfig::default()
        });
        let addrs = [
            Addr {
                ip: ip("192.0.2.1"),
                ttl: 10,
            },
            Addr {
                ip: ip("192.0.2.2"),
                ttl: 100,
            },
        ];
        set.learn("web", "a.example.", &[name("a.example")], &addrs, 1000)
            .unwrap();
        let v = FqdnAddrs::from_learned(&set, 1005);
        assert_eq!(v.addrs_of("a.example").map(BTreeSet::len), Some(2));
        // TTL over: gone, unless a connection holds it.
        let v = FqdnAddrs::from_learned(&set, 1010);
        assert_eq!(
            v.addrs_of("A.example."),
            Some(&BTreeSet::from([ip("192.0.2.2")]))
        );
        set.hold("web", ip("192.0.2.1"));
        let v = FqdnAddrs::from_learned(&set, 1010);
        assert_eq!(v.addrs_of("a.example").map(BTreeSet::len), Some(2));
        assert!(FqdnAddrs::from_learned(&set, 2000)
            .addrs_of("a.example")
            .unwrap()
            .contains(&ip("192.0.2.1")));
    }

    #[test]
    fn learned_identities_are_stable_and_share_policy_prefixes() {
        let sel = name("a.example");
        let other = name("b.example");
        let p = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut cidr = identity::allocate_cidrs([p("198.51.100.7/32"), p("10.0.0.0/8")]);
        let before = cidr.clone();
        let learned = BTreeMap::from([
            (sel.clone(), vec![p("192.0.2.1/32"), p("198.51.100.7/32")]),
            (other.clone(), vec![]),
        ]);
        let ids = allocate(&mut cidr, &learned);
        // The policies' prefixes keep their numbers; a learned address that
        // is one of them shares its identity.
        for (n, id) in &before {
            assert_eq!(cidr[n], *id);
        }
        let fresh = cidr[&p("192.0.2.1/32")];
        assert!(identity::is_cidr(fresh) && fresh >= FQDN_MIN);
        assert_eq!(
            ids.of(&sel),
            &{
                let mut v = vec![fresh, before[&p("198.51.100.7/32")]];
                v.sort();
                v
            }[..]
        );
        assert!(ids.of(&other).is_empty());
        assert!(ids.of(&name("never.example")).is_empty());
        // One more learned address does not renumber the first.
        let mut cidr2 = identity::allocate_cidrs([p("198.51.100.7/32"), p("10.0.0.0/8")]);
        let learned2 = BTreeMap::from([(
            sel.clone(),
            vec![p("192.0.2.0/32"), p("192.0.2.1/32"), p("2001:db8::1/128")],
        )]);
        allocate(&mut cidr2, &learned2);
        assert_eq!(cidr2[&p("192.0.2.1/32")], fresh);
        let all: HashSet<_> = cidr2.values().collect();
        assert_eq!(all.len(), cidr2.len(), "identities are distinct");
    }

    #[test]
    fn colliding_addresses_probe_to_distinct_identities() {
        let mut cidr = BTreeMap::new();
        let nets: Vec<IpNet> = (0..5000u32)
            .map(|i| IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(0xC000_0000 + i))))
            .collect();
        // Force a collision: the first address's preferred number is taken.
        cidr.insert("10.0.0.0/8".parse().unwrap(), preferred_id(&nets[0]));
        let learned = BTreeMap::from([(name("x.example"), nets.clone())]);
        let ids = allocate(&mut cidr, &learned);
        assert_eq!(ids.of(&name("x.example")).len(), 5000);
        assert_ne!(cidr[&nets[0]], preferred_id(&nets[0]));
        assert!(cidr.values().all(|id| identity::is_cidr(*id)));
    }

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-stripe, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: checkout}}
  egress:
    - toEndpoints:
        - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchName: api.stripe.com}, {matchPattern: "*.pypi.org"}]
    - toPorts:
        - ports: [{port: "5353", protocol: UDP}, {port: dns-tcp, protocol: TCP}]
          rules:
            dns: [{matchPattern: "*"}]
    - toFQDNs: [{matchName: api.stripe.com}, {matchPattern: "*.pypi.org"}]
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
    - toFQDNs: [{matchName: never.example}]
"#;

    const REGISTRY: &str = r#"
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: checkout-1, namespace: shop, labels: {app: checkout}}
spec: {interface: veth-co1, addresses: [10.0.1.1]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  interface: veth-dns
  addresses: [10.0.9.53]
  ports: [{name: dns-tcp, port: 5300, protocol: TCP}]
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: other, namespace: shop, labels: {app: other}}
spec: {interface: veth-o, addresses: [10.0.1.2]}
"#;

    fn state(learned: &FqdnAddrs) -> Compiled {
        let policies = crate::api::parse_policies("p.yaml".as_ref(), POLICY).unwrap();
        let registry = crate::api::parse_registry("r.yaml".as_ref(), REGISTRY).unwrap();
        super::super::compile::compile(
            &PolicySet { policies },
            &registry,
            &super::super::compile::CompileOptions {
                fqdn: std::sync::Arc::new(learned.clone()),
                ..Default::default()
            },
        )
    }

    fn verdict(c: &Compiled, to: &str, port: u16) -> bool {
        let r = trace::trace_str(c, "shop/checkout-1", to, proto::TCP, port).unwrap();
        r.verdict == Verdict::Allowed
    }

    #[test]
    fn to_fqdns_allows_the_learned_addresses_of_its_names_only() {
        let nothing = state(&FqdnAddrs::new());
        assert!(
            !verdict(&nothing, "192.0.2.1", 443),
            "nothing learned: denied"
        );
        let mut l = FqdnAddrs::new();
        l.insert("api.stripe.com", ip("192.0.2.1"));
        l.insert("files.pypi.org", ip("2001:db8::7"));
        l.insert("evil.example", ip("198.51.100.9"));
        // A learned address that is a registry endpoint's keeps its identity.
        l.insert("api.stripe.com", ip("10.0.1.2"));
        let c = state(&l);
        assert!(verdict(&c, "192.0.2.1", 443));
        assert!(verdict(&c, "2001:db8::7", 443));
        assert!(!verdict(&c, "192.0.2.1", 80), "only the rule's ports");
        assert!(
            !verdict(&c, "198.51.100.9", 443),
            "a name no selector matches"
        );
        assert!(!verdict(&c, "192.0.2.99", 443), "never learned");
        assert!(
            !verdict(&c, "shop/other", 443),
            "toFQDNs reaches world only"
        );
        // The learned address is a /32 CIDR identity in the ipcache.
        let e = c.lookup_ip_entry(ip("192.0.2.1")).unwrap();
        assert_eq!(e.net, "192.0.2.1/32".parse::<IpNet>().unwrap());
        assert!(identity::is_cidr(e.identity) && e.identity >= FQDN_MIN);
        let info = c.identities.iter().find(|i| i.id == e.identity).unwrap();
        assert!(info.labels.iter().any(|l| l.key == "world"));
        // The unmatched name's address got no identity of its own.
        assert!(!identity::is_cidr(c.lookup_ip(ip("198.51.100.9"))));
        // Learning it again and more: same identity (stable numbering).
        l.insert("www.pypi.org", ip("192.0.2.0"));
        assert_eq!(state(&l).lookup_ip(ip("192.0.2.1")), e.identity);
    }

    #[test]
    fn each_endpoint_gets_its_dns_rules_per_port_and_server() {
        let c = state(&FqdnAddrs::new());
        let slot = |n: &str| c.endpoints.iter().find(|e| e.name == n).unwrap().slot;
        let co = slot("checkout-1");
        let dns_id = c.endpoints[slot("kube-dns") as usize].identity;
        assert_eq!(c.dns.len(), 1, "only checkout-1 has DNS rules: {:?}", c.dns);
        let d = &c.dns[0];
        assert_eq!(d.endpoint, co);
        let ports: Vec<(u8, u16)> = d.ports.iter().map(|p| (p.proto, p.port)).collect();
        // ANY is UDP and TCP; the named port is the one kube-dns declares.
        assert_eq!(
            ports,
            vec![
                (proto::TCP, 53),
                (proto::TCP, 5300),
                (proto::UDP, 53),
                (proto::UDP, 5353)
            ]
        );
        let p53 = d.port(proto::UDP, 53).unwrap();
        assert_eq!(p53.allows.len(), 1);
        assert_eq!(p53.allows[0].servers, vec![dns_id]);
        assert_eq!(
            &*c.rules[p53.allows[0].rule as usize].path,
            "spec.egress[0]"
        );
        assert_eq!(
            p53.selectors_for(dns_id),
            vec![name("api.stripe.com"), pat("*.pypi.org")]
        );
        assert!(p53.selectors_for(identity::WORLD_IPV4).is_empty());
        // An item without peers: every server.
        let p5353 = d.port(proto::UDP, 5353).unwrap();
        assert_eq!(p5353.allows[0].servers, vec![identity::ANY]);
        assert_eq!(p5353.selectors_for(12345), vec![pat("*")]);
        assert!(d.port(proto::TCP, 5353).is_none());
        assert_eq!(
            d.selectors(),
            vec![name("api.stripe.com"), pat("*"), pat("*.pypi.org")]
        );
    }

    #[test]
    fn staged_rules_bring_no_dns_rules_and_learned_addresses_count_in_the_budget() {
        let staged = POLICY.replace(
            "metadata: {name: to-stripe, namespace: shop}",
            "metadata: {name: to-stripe, namespace: shop, annotations: {netpol.io/audit: \"true\"}}",
        );
        let policies = crate::api::parse_policies("p.yaml".as_ref(), &staged).unwrap();
        let registry = crate::api::parse_registry("r.yaml".as_ref(), REGISTRY).unwrap();
        let set = PolicySet { policies };
        let c = super::super::compile::compile(&set, &registry, &Default::default());
        assert!(c.dns.is_empty());
        // The ipcache budget counts learned addresses, and names the rule.
        let policies = crate::api::parse_policies("p.yaml".as_ref(), POLICY).unwrap();
        let set = PolicySet { policies };
        let mut l = FqdnAddrs::new();
        for i in 0..10u8 {
            l.insert("api.stripe.com", ip(&format!("192.0.2.{i}")));
        }
        let opts = |learned: &FqdnAddrs| super::super::compile::CompileOptions {
            fqdn: std::sync::Arc::new(learned.clone()),
            limits: super::super::compile::Limits {
                policy_entries: usize::MAX,
                ipcache_entries: 10,
            },
            ..Default::default()
        };
        let e = super::super::compile::try_compile(&set, &registry, &opts(&l)).unwrap_err();
        assert!(
            e.to_string().contains("spec.egress[2]: with the addresses the DNS proxy learned for this toFQDNs selector, the ipcache would need more than 10 entries"),
            "{e}"
        );
        assert!(
            super::super::compile::try_compile(&set, &registry, &opts(&FqdnAddrs::new())).is_ok()
        );
    }

    #[test]
    fn trace_by_name_says_which_selector_name_and_address_decided() {
        let mut l = FqdnAddrs::new();
        l.insert("files.pypi.org", ip("192.0.2.5"));
        l.insert("files.pypi.org", ip("2001:db8::5"));
        l.insert("evil.example", ip("198.51.100.9"));
        let c = state(&l);
        let policies = PolicySet {
            policies: crate::api::parse_policies("p.yaml".as_ref(), POLICY).unwrap(),
        };
        let src = trace::resolve_side(&c, "shop/checkout-1").unwrap();
        let t = trace_name(&c, &policies, &l, &src, "Files.PyPI.org", proto::TCP, 443);
        assert_eq!(t.name, "files.pypi.org.");
        assert_eq!(t.verdict, Verdict::Allowed);
        assert_eq!(t.addresses.len(), 2);
        let d = t.addresses[0].fqdn.as_ref().unwrap();
        assert_eq!(d.selectors, vec!["matchPattern: *.pypi.org."]);
        assert_eq!(d.names, vec!["files.pypi.org."]);
        let text = t.to_string();
        assert!(
            text.contains("fqdn    matchPattern: *.pypi.org. matched files.pypi.org., whose answer gave 192.0.2.5"),
            "{text}"
        );
        // Not a toFQDNs port: denied, and no FQDN explanation.
        let t = trace_name(&c, &policies, &l, &src, "files.pypi.org", proto::TCP, 80);
        assert_eq!(t.verdict, Verdict::Denied);
        assert!(t.addresses.iter().all(|a| a.fqdn.is_none()));
        // A name no selector matches; a name never learned.
        let t = trace_name(&c, &policies, &l, &src, "evil.example", proto::TCP, 443);
        assert_eq!(t.verdict, Verdict::Denied);
        let t = trace_name(&c, &policies, &l, &src, "api.stripe.com", proto::TCP, 443);
        assert_eq!((t.verdict, t.addresses.len()), (Verdict::Denied, 0));
        assert!(t
            .to_string()
            .contains("no address is learned for this name"));
    }
}
