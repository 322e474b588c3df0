//! Validated policy and registry model: what the rest of netpol sees.
//!
//! The parser (`api::load`) turns files into these types; nothing here can be
//! wrong in a way the files could express. Namespace scoping (docs/policy.md,
//! "Semantics") is already folded into every [`Selector`] by the parser, so
//! compile never needs to know which kind of policy a selector came from.
//!
//! Owns the types only: no I/O, no parsing, no validation logic.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// Where a document came from: file, document index (0-based) and its identity.
/// Its text is shared: the objects of one file hold one copy of its path, of
/// each kind and of each namespace (`api::load::share_names`), and an
/// endpoint's own name and namespace are its origin's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Origin {
    pub file: std::sync::Arc<std::path::Path>,
    /// 0-based index of the document within a multi-document file.
    pub doc: usize,
    pub kind: Name,
    /// `None` for clusterwide kinds and for Node.
    pub namespace: Option<Name>,
    pub name: Name,
}

/// A label source, key or value: shared text. A file's thousands of labels
/// and selectors name a few sources and keys and repeat their values (the
/// parser gives equal text one copy per file, see `api::policy::Ctx`), so
/// each is a reference, compared, ordered, hashed and printed as its text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Name(std::sync::Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same copy of the text (not only equal text).
    pub fn shares(&self, other: &Name) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(s.into())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(s.as_str().into())
    }
}

impl From<std::sync::Arc<str>> for Name {
    fn from(s: std::sync::Arc<str>) -> Name {
        Name(s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == &*other.0
    }
}

/// Label source as written before the first `:` (`k8s`, `reserved`, `container`, ...).
pub type Source = Name;

/// A concrete label on an endpoint or identity: `source:key=value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Label {
    pub source: Source,
    pub key: Name,
    pub value: Name,
}

/// A key in a selector: with `source: None` it matches the key from any source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LabelKey {
    pub source: Option<Source>,
    pub key: Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement of a selector. `matchLabels: {k: v}` becomes `k In {v}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Requirement {
    pub key: LabelKey,
    pub op: Op,
    pub values: Values,
}

/// The values of a requirement: distinct and sorted, as a `BTreeSet` would
/// hold them (and ordered, hashed and printed the same), in one allocation
/// the size of its values (a `BTreeSet` node holds room for eleven; nearly
/// every requirement has one value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Values(Box<[Name]>);

impl Values {
    pub fn iter(&self) -> std::slice::Iter<'_, Name> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each value, to be replaced by an equal one (the parser shares equal
    /// text); the order and so the set stay as they are.
    pub(crate) fn each_mut(&mut self, mut f: impl FnMut(&mut Name)) {
        self.0.iter_mut().for_each(&mut f);
    }

    pub fn contains(&self, value: &str) -> bool {
        self.0.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }
}

impl<T: Into<Name>> FromIterator<T> for Values {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Values {
        let mut v: Vec<Name> = iter.into_iter().map(Into::into).collect();
        v.sort_unstable();
        v.dedup();
        Values(v.into_boxed_slice())
    }
}

impl<T: Into<Name>, const N: usize> From<[T; N]> for Values {
    fn from(values: [T; N]) -> Values {
        values.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Values {
    type Item = &'a Name;
    type IntoIter = std::slice::Iter<'a, Name>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A label selector: all requirements ANDed; no requirement matches every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// Cilium's named entities (docs/policy.md, "Semantics").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Entity {
    All,
    World,
    WorldIpv4,
    WorldIpv6,
    Host,
    RemoteNode,
    Cluster,
    Init,
    Health,
    Unmanaged,
    Ingress,
    KubeApiserver,
    None,
}

/// One peer of a rule item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Peer {
    /// fromEndpoints / toEndpoints / podSelector (+namespaceSelector): a selector over
    /// identity labels, namespace scoping already applied.
    Endpoints(Selector),
    /// fromCIDR / fromCIDRSet / toCIDR / toCIDRSet / ipBlock.
    Cidr {
        net: IpNet,
        except: Vec<IpNet>,
        /// `false` for CNP CIDR rules (match only addresses outside the registry:
        /// world); `true` for Kubernetes ipBlock, which matches any address.
        match_endpoints: bool,
    },
    Entity(Entity),
    /// toFQDNs: the addresses the DNS proxy learns for names this selector
    /// matches; compile gives it the identities of those addresses
    /// (`policy::fqdn`; nothing learned, it allows nothing). `api::load`
    /// still refuses every policy that has one while the proxy is not wired
    /// to the datapath (docs/policy.md, "DNS names").
    Fqdn(FqdnSelector),
}

/// A DNS name selector (Cilium's FQDNSelector, in `toFQDNs` and in
/// `toPorts[].rules.dns`), normalised as Cilium does: lower case, with the
/// trailing dot. `crate::dns::matcher` decides which names it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub enum FqdnSelector {
    /// `matchName`: exactly this name (`api.example.com.`).
    Name(String),
    /// `matchPattern`: `*` is any run of name characters within one label;
    /// a leading `**.` is one or more whole labels; `*` alone is every name.
    Pattern(String),
}

/// `toPorts[i].rules.dns` of one port rule: the names the selected endpoints
/// may look up on these ports (Cilium's PortRuleDNS); a query for any other
/// name is answered REFUSED. The ports are also in the item's [`L4`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DnsRule {
    /// Field path of the `rules.dns` list, for messages.
    pub path: String,
    pub ports: Vec<PortProto>,
    pub selectors: Vec<FqdnSelector>,
}

/// The peers of a rule item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Peers {
    /// No peer field at all in an item that has ports (CNP `toPorts`-only, or a
    /// NetworkPolicy rule without `from`/`to`): every peer, identity 0.
    All,
    /// The listed peers, ORed. Empty allows (or denies) nothing.
    List(Vec<Peer>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    /// TCP, UDP and SCTP when a port is given; every protocol (ICMP included) for an
    /// L3-only match.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PortSpec {
    /// 0 means every port.
    Number(u16),
    /// A named port, resolved per destination endpoint from the registry.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PortProto {
    pub port: PortSpec,
    /// Inclusive end of a range; `None` (or less than `port`) means the single port.
    pub end_port: Option<u16>,
    pub proto: Proto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IcmpType {
    pub family: Family,
    pub ty: u8,
}

/// The L4 part of a rule item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum L4 {
    /// No toPorts and no icmps: every protocol and port.
    Any,
    /// toPorts (flattened over every PortRule in the item).
    Ports(Vec<PortProto>),
    /// icmps (flattened).
    Icmps(Vec<IcmpType>),
}

/// One item of ingress/ingressDeny/egress/egressDeny (or one NetworkPolicy rule).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleItem {
    /// Field path for explanations, e.g. `specs[1].ingress[0]`.
    pub path: String,
    /// Line and column (1-based) of the item in its file, when known: messages
    /// about a valid item found after parsing (compile's map budget) point here.
    pub pos: Option<(usize, usize)>,
    pub peers: Peers,
    pub l4: L4,
    /// DNS rules of its port rules (egress only): compile hands them out per
    /// endpoint (`Compiled::dns`, `policy::fqdn`). `api::load` still refuses
    /// every policy that has one while the proxy is not wired to the datapath.
    pub dns: Vec<DnsRule>,
}

/// What a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Subject {
    /// endpointSelector / podSelector, namespace scoping applied: selects
    /// `Endpoint`s (workloads), never HostEndpoints.
    Endpoints(Selector),
    /// nodeSelector (clusterwide only): selects this host's HostEndpoints by their labels.
    Nodes(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    /// Field path of the rule, e.g. `spec` or `specs[2]`.
    pub path: String,
    pub subject: Subject,
    pub ingress: Vec<RuleItem>,
    pub ingress_deny: Vec<RuleItem>,
    pub egress: Vec<RuleItem>,
    pub egress_deny: Vec<RuleItem>,
    /// enableDefaultDeny as written; `None` = Cilium's default (on when the
    /// direction has any item).
    pub default_deny_ingress: Option<bool>,
    pub default_deny_egress: Option<bool>,
    /// Kubernetes NetworkPolicy policyTypes: a direction listed with no items
    /// still enables default deny. For CNP these are `false`.
    pub isolate_ingress: bool,
    pub isolate_egress: bool,
}

impl Rule {
    /// Its items in the order compile numbers them (an item's rule
    /// reference): ingress, ingressDeny, egress, egressDeny.
    pub fn items(&self) -> impl Iterator<Item = &RuleItem> {
        self.ingress
            .iter()
            .chain(&self.ingress_deny)
            .chain(&self.egress)
            .chain(&self.egress_deny)
    }

    /// The field path of the rule's subject selector as written in a policy of
    /// `kind` (`spec.endpointSelector`, `specs[1].nodeSelector`, `spec.podSelector`).
    pub fn subject_path(&self, kind: PolicyKind) -> String {
        let field = match (kind, &self.subject) {
            (PolicyKind::NetworkPolicy, _) => "podSelector",
            (_, Subject::Endpoints(_)) => "endpointSelector",
            (_, Subject::Nodes(_)) => "nodeSelector",
        };
        format!("{}.{field}", self.path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub origin: Origin,
    pub kind: PolicyKind,
    /// Shared: a set is rebuilt from kept parses on every change, and cloning a
    /// policy must not copy its rules.
    pub rules: std::sync::Arc<[Rule]>,
    /// Staged (`metadata.annotations["netpol.io/audit"]: "true"`): evaluated,
    /// and what it would deny is reported as audit, but it is not enforced
    /// (docs/policy.md, "Staged policies").
    pub staged: bool,
    /// Where its parts were written (for warnings found after parsing).
    #[serde(skip)]
    pub source: std::sync::Arc<SourceMap>,
}

/// Where the parts of a valid policy were written: field paths and positions
/// for messages that only a later step can give (`policy::lint`'s warnings).
/// Not part of what the policy means: compile never reads it. Kept for every
/// policy in force, so held compact: sorted slices searched by path (a
/// `BTreeMap` node holds room for eleven entries, most policies have two).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMap {
    /// By rule item path (`spec.ingress[0]`), sorted by path.
    items: Box<[(Box<str>, ItemSource)]>,
    /// 1-based line and column of field paths (the items' peers and ports,
    /// and each rule's subject selector), sorted by path.
    positions: Box<[(Box<str>, LineCol)]>,
}

/// A 1-based line and column.
type LineCol = (u32, u32);

/// The field paths of one rule item's parts, in model order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemSource {
    /// One per peer of a [`Peers::List`] (`spec.ingress[0].fromEndpoints[1]`,
    /// `spec.egress[0].toCIDRSet[0].cidr`).
    pub peers: Vec<String>,
    /// One per port of [`L4::Ports`] (`spec.ingress[0].toPorts[0].ports[1].port`).
    pub ports: Vec<String>,
}

impl SourceMap {
    /// The map of these items' parts and these positions (a later entry for
    /// the same path wins).
    pub fn new(
        items: impl IntoIterator<Item = (String, ItemSource)>,
        positions: impl IntoIterator<Item = (String, (usize, usize))>,
    ) -> SourceMap {
        fn sorted<T>(mut v: Vec<(Box<str>, T)>) -> Box<[(Box<str>, T)]> {
            // Stable, so the last of equal paths ends last; keep that one.
            v.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out: Vec<(Box<str>, T)> = Vec::with_capacity(v.len());
            for e in v {
                match out.last_mut() {
                    Some(last) if last.0 == e.0 => *last = e,
                    _ => out.push(e),
                }
            }
            out.into_boxed_slice()
        }
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        SourceMap {
            items: sorted(items.into_iter().map(|(k, v)| (k.into(), v)).collect()),
            positions: sorted(
                positions
                    .into_iter()
                    .map(|(k, (l, c))| (k.into(), (clamp(l), clamp(c))))
                    .collect(),
            ),
        }
    }

    /// The position of a field path, when known.
    pub fn pos(&self, path: &str) -> Option<(usize, usize)> {
        let i = self.positions.binary_search_by(|e| (*e.0).cmp(path)).ok()?;
        let (l, c) = self.positions[i].1;
        Some((l as usize, c as usize))
    }

    /// The field paths of the parts of the rule item at `path`.
    pub fn item(&self, path: &str) -> Option<&ItemSource> {
        let i = self.items.binary_search_by(|e| (*e.0).cmp(path)).ok()?;
        Some(&self.items[i].1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Interface {
    Name(String),
    /// The device this host routes the endpoint's (first) address through.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EndpointKind {
    /// A workload behind a host-side device.
    Workload,
    /// The host's own interface.
    Host,
}

/// An Endpoint or HostEndpoint document.
#[derive(Debug, Clone, PartialEq, Hash, Serialize)]
pub struct EndpointDef {
    pub origin: Origin,
    pub kind: EndpointKind,
    /// Its origin's name (shared).
    pub name: Name,
    /// Always set for workloads (default `default`); HostEndpoints have none.
    /// Its origin's namespace (shared).
    pub namespace: Option<Name>,
    /// The endpoint's own labels as written (source `k8s` for a plain key).
    pub labels: Vec<Label>,
    /// `None` = this host.
    pub node: Option<Name>,
    pub interface: Option<Interface>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// Per-endpoint audit mode (`spec.audit: true`); the config may also set it globally.
    pub audit: bool,
}

#[derive(Debug, Clone, PartialEq, Hash, Serialize)]
pub struct NodeDef {
    pub origin: Origin,
    pub name: String,
    pub labels: Vec<Label>,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Hash, Serialize)]
pub struct NamespaceDef {
    pub origin: Origin,
    pub name: String,
    pub labels: Vec<Label>,
}

/// Everything read from the policy directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicySet {
    /// Shared with the parses a daemon keeps (and the sets it held before).
    pub policies: Vec<std::sync::Arc<Policy>>,
}

/// Everything read from the endpoint directories.
#[derive(Debug, Clone, Default, PartialEq, Hash, Serialize)]
pub struct RegistrySet {
    /// Shared: a registry is rebuilt from kept parses on every change, and
    /// one file's change must not copy the endpoints of the others (a
    /// compiler also tells the endpoints a change replaced by their address).
    pub endpoints: Vec<std::sync::Arc<EndpointDef>>,
    pub nodes: Vec<NodeDef>,
    pub namespaces: Vec<NamespaceDef>,
}
