//! The remote view: etcd entries → validated registry documents and the current
//! policy set, and the merge with this host's files (DESIGN §5a).
//!
//! Rules, in the order they apply:
//! - every entry is validated on its own with the api parsers; a bad entry is
//!   dropped and reported (origin `etcd:<key>@<mod_revision>`), the rest applies;
//! - the key must match its document: the kind, the node (`spec.node` of an
//!   endpoint, the name of a Node), the namespace and the name;
//! - this host's own prefix is not part of the view (it mirrors this host's
//!   files), and no remote entry can stand for this host: a static endpoint
//!   naming this host is refused, so no remote claim is ever `host`;
//! - two entries for one object, or claiming one address, → the lowest
//!   `create_revision` wins on every host (ties: the lower key), reported;
//! - the current policy set is all-or-nothing, as a policy directory is;
//! - [`merge_registry`] / [`merge_policies`]: a file and an etcd entry for the
//!   same object, or for one address, → the file wins, reported.
//!
//! Pure: no I/O, no clock.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::doc;
use super::keys::{KeyKind, Keys};
use crate::api::model::{
    EndpointDef, EndpointKind, Name, NamespaceDef, NodeDef, Policy, PolicySet, RegistrySet,
};
use crate::api::Problem;

/// One etcd entry as the view keeps it (and the cache stores it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEntry {
    pub key: String,
    /// The value as text; a value that is not UTF-8 is kept lossily and `binary` set.
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
}

impl RawEntry {
    pub fn from_kv(kv: &super::store::Kv) -> RawEntry {
        let (value, binary) = match std::str::from_utf8(&kv.value) {
            Ok(s) => (s.to_string(), false),
            Err(_) => (String::from_utf8_lossy(&kv.value).into_owned(), true),
        };
        RawEntry {
            key: kv.key.clone(),
            value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            binary,
        }
    }

    pub fn origin(&self) -> std::path::PathBuf {
        doc::origin(&self.key, self.mod_revision)
    }
}

/// A registry document read from one entry.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryDoc {
    Endpoint(Arc<EndpointDef>),
    Node(NodeDef),
    Namespace(NamespaceDef),
}

/// What one entry is, parsed once when it arrives.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Registry(RegistryDoc),
    /// One document of a policy set; problems are kept, since a set applies
    /// only when all of its documents are valid.
    Policy {
        id: String,
        policies: Result<Vec<Arc<Policy>>, Vec<Problem>>,
    },
    /// The value of `policyset-current`.
    Current(String),
    /// Under this host's own prefix: not part of the view.
    Own,
    /// A key netpol does not read.
    Ignored,
    Rejected(Problem),
}

fn reject(e: &RawEntry, object: Option<String>, field: Option<&str>, message: String) -> Parsed {
    Parsed::Rejected(Problem {
        file: e.origin(),
        line: None,
        column: None,
        document: object.as_ref().map(|_| 1),
        object,
        field: field.map(str::to_string),
        message,
    })
}

fn object_name(d: &RegistryDoc) -> String {
    match d {
        RegistryDoc::Endpoint(e) if e.kind == EndpointKind::Host => {
            format!("HostEndpoint {}", e.name)
        }
        RegistryDoc::Endpoint(e) => format!(
            "Endpoint {}/{}",
            e.namespace.as_deref().unwrap_or("default"),
            e.name
        ),
        RegistryDoc::Node(n) => format!("Node {}", n.name),
        RegistryDoc::Namespace(n) => format!("Namespace {}", n.name),
    }
}

/// Parse and check one entry. `node` is this host's name.
pub fn parse_entry(keys: &Keys, node: &str, e: &RawEntry) -> Parsed {
    let kind = match keys.parse(&e.key) {
        Ok(Some(k)) => k,
        Ok(None) => return Parsed::Ignored,
        Err(m) => return reject(e, None, None, m),
    };
    if kind.node() == Some(node) {
        return Parsed::Own;
    }
    if e.binary {
        return reject(e, None, None, "the value is not UTF-8 text".into());
    }
    match &kind {
        KeyKind::Status { .. } => return Parsed::Ignored,
        KeyKind::PolicySetCurrent => {
            let id = e.value.trim();
            return if super::keys::valid_segment(id) {
                Parsed::Current(id.to_string())
            } else {
                reject(e, None, None, format!("{id:?} is not a policy set id"))
            };
        }
        KeyKind::PolicyFile { id, .. } => {
            return Parsed::Policy {
                id: id.clone(),
                policies: doc::parse_policy_value(&e.origin(), &e.value),
            };
        }
        _ => {}
    }
    let reg = match doc::parse_registry_value(&e.origin(), &e.value) {
        Ok(r) => r,
        Err(mut p) => return Parsed::Rejected(p.swap_remove(0)),
    };
    let mut docs: Vec<RegistryDoc> = Vec::new();
    docs.extend(reg.endpoints.into_iter().map(RegistryDoc::Endpoint));
    docs.extend(reg.nodes.into_iter().map(RegistryDoc::Node));
    docs.extend(reg.namespaces.into_iter().map(RegistryDoc::Namespace));
    if docs.len() != 1 {
        return reject(
            e,
            None,
            None,
            format!("holds {} documents; a value holds one", docs.len()),
        );
    }
    let d = docs.remove(0);
    let obj = object_name(&d);
    let mismatch = |field: &str, msg: String| reject(e, Some(obj.clone()), Some(field), msg);
    let want_kind = match &kind {
        KeyKind::Node { .. } => "Node",
        KeyKind::Endpoint { .. } | KeyKind::StaticEndpoint { .. } => "Endpoint",
        KeyKind::HostEndpoint { .. } => "HostEndpoint",
        KeyKind::Namespace { .. } => "Namespace",
        _ => unreachable!("handled above"),
    };
    let have_kind = obj.split(' ').next().unwrap_or_default();
    if have_kind != want_kind {
        return mismatch(
            "kind",
            format!("the key holds a {want_kind}, the document is a {have_kind}"),
        );
    }
    let name_check = |have: &str, want: &str| {
        (have != want).then(|| {
            mismatch(
                "metadata.name",
                format!("{have:?} does not match the name in the key ({want:?})"),
            )
        })
    };
    let node_check = |def: &EndpointDef, want: &str| match def.node.as_deref() {
        Some(n) if n == want => None,
        Some(n) => Some(mismatch(
            "spec.node",
            format!("{n:?} does not match the node of the key ({want:?})"),
        )),
        None => Some(mismatch(
            "spec.node",
            format!("must be {want:?}, the node of the key"),
        )),
    };
    let ns_check = |def: &EndpointDef, want: &str| {
        let have = def.namespace.as_deref().unwrap_or("default");
        (have != want).then(|| {
            mismatch(
                "metadata.namespace",
                format!("{have:?} does not match the namespace in the key ({want:?})"),
            )
        })
    };
    let bad = match (&kind, &d) {
        (KeyKind::Node { node: n }, RegistryDoc::Node(def)) => name_check(&def.name, n),
        (KeyKind::Namespace { name }, RegistryDoc::Namespace(def)) => name_check(&def.name, name),
        (KeyKind::Endpoint { node: n, namespace, name }, RegistryDoc::Endpoint(def)) => {
            name_check(&def.name, name)
                .or_else(|| ns_check(def, namespace))
                .or_else(|| node_check(def, n))
        }
        (KeyKind::HostEndpoint { node: n, name }, RegistryDoc::Endpoint(def)) => {
            name_check(&def.name, name).or_else(|| node_check(def, n))
        }
        (KeyKind::StaticEndpoint { namespace, name }, RegistryDoc::Endpoint(def)) => name_check(&def.name, name)
            .or_else(|| ns_check(def, namespace))
            .or_else(|| match def.node.as_deref() {
                None => Some(mismatch(
                    "spec.node",
                    "a static endpoint names the host it lives on (a host without netpold); without it every host would take it for its own".into(),
                )),
                Some(n) if n == node => Some(mismatch(
                    "spec.node",
                    format!("names this host ({n:?}); this host's endpoints come from its own files"),
                )),
                Some(_) => None,
            }),
        _ => unreachable!("kinds matched above"),
    };
    match bad {
        Some(p) => p,
        None => Parsed::Registry(d),
    }
}

/// One policy document as parsed: its policies, or why not.
type PolicyDoc = Result<Vec<Arc<Policy>>, Vec<Problem>>;

/// The view built from the parsed entries.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    /// The accepted remote documents.
    pub registry: RegistrySet,
    /// The current policy set's id, if any.
    pub policy_set: Option<String>,
    /// The current set when every document of it is valid; `Err` with every
    /// problem otherwise (the caller keeps the last valid set).
    pub policies: Result<PolicySet, Vec<Problem>>,
    /// Entries dropped: invalid, not matching their key, or losing a claim.
    pub rejected: Vec<Problem>,
}

impl Default for Built {
    fn default() -> Self {
        Built {
            registry: RegistrySet::default(),
            policy_set: None,
            policies: Ok(PolicySet::default()),
            rejected: Vec::new(),
        }
    }
}

/// The addresses a document claims.
fn addresses(d: &RegistryDoc) -> &[IpAddr] {
    match d {
        RegistryDoc::Endpoint(e) => &e.addresses,
        RegistryDoc::Node(n) => &n.addresses,
        RegistryDoc::Namespace(_) => &[],
    }
}

/// A HostEndpoint and the Node of its own host may share an address (as in files).
fn may_share(a: &RegistryDoc, b: &RegistryDoc) -> bool {
    let pair = |h: &RegistryDoc, n: &RegistryDoc| match (h, n) {
        (RegistryDoc::Endpoint(h), RegistryDoc::Node(n)) => {
            h.kind == EndpointKind::Host && h.node.as_deref() == Some(n.name.as_str())
        }
        _ => false,
    };
    pair(a, b) || pair(b, a)
}

/// Object identity as registry names are unique: kind, namespace, name.
fn identity(d: &RegistryDoc) -> (u8, &str, &str) {
    match d {
        RegistryDoc::Endpoint(e) => endpoint_identity(e),
        RegistryDoc::Node(n) => (2, "", &n.name),
        RegistryDoc::Namespace(n) => (3, "", &n.name),
    }
}

fn endpoint_identity(e: &EndpointDef) -> (u8, &str, &str) {
    match e.kind {
        EndpointKind::Host => (1, "", &e.name),
        EndpointKind::Workload => (0, e.namespace.as_deref().unwrap_or("default"), &e.name),
    }
}

fn loses(e: &RawEntry, d: &RegistryDoc, message: String) -> Problem {
    Problem {
        file: e.origin(),
        line: None,
        column: None,
        document: Some(1),
        object: Some(object_name(d)),
        field: None,
        message,
    }
}

/// Build the view from every entry of the watched range (parsed with
/// [`parse_entry`]). Deterministic: the same entries give the same view on
/// every host.
pub fn build<'a>(entries: impl IntoIterator<Item = (&'a RawEntry, &'a Parsed)>) -> Built {
    let mut out = Built::default();
    let mut docs: Vec<(&RawEntry, &RegistryDoc)> = Vec::new();
    let mut current: Option<String> = None;
    let mut policy_docs: Vec<(&RawEntry, &String, &PolicyDoc)> = Vec::new();
    for (e, p) in entries {
        match p {
            Parsed::Registry(d) => docs.push((e, d)),
            Parsed::Policy { id, policies } => policy_docs.push((e, id, policies)),
            Parsed::Current(id) => current = Some(id.clone()),
            Parsed::Rejected(problem) => out.rejected.push(problem.clone()),
            Parsed::Own | Parsed::Ignored => {}
        }
    }
    // The first claim holds: lowest create_revision, then key.
    docs.sort_by(|a, b| (a.0.create_revision, &a.0.key).cmp(&(b.0.create_revision, &b.0.key)));
    let mut names: HashMap<(u8, &str, &str), &RawEntry> = HashMap::with_capacity(docs.len());
    let mut claims: HashMap<IpAddr, (&RawEntry, &RegistryDoc)> = HashMap::with_capacity(docs.len());
    let mut accepted: Vec<(&RawEntry, &RegistryDoc)> = Vec::with_capacity(docs.len());
    'doc: for (e, d) in docs {
        if let Some(first) = names.get(&identity(d)) {
            out.rejected.push(loses(
                e,
                d,
                format!(
                    "{} is already defined by {} (created at revision {}); the first entry wins",
                    object_name(d),
                    first.key,
                    first.create_revision
                ),
            ));
            continue;
        }
        for a in addresses(d) {
            if let Some((fe, fd)) = claims.get(a) {
                if !may_share(d, fd) {
                    out.rejected.push(loses(
                        e,
                        d,
                        format!(
                            "address {a} is already claimed by {} ({}, created at revision {}); the first claim wins",
                            object_name(fd),
                            fe.key,
                            fe.create_revision
                        ),
                    ));
                    continue 'doc;
                }
            }
        }
        names.insert(identity(d), e);
        for a in addresses(d) {
            claims.entry(*a).or_insert((e, d));
        }
        accepted.push((e, d));
    }
    accepted.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    for (_, d) in accepted {
        match d {
            RegistryDoc::Endpoint(x) => out.registry.endpoints.push(x.clone()),
            RegistryDoc::Node(x) => out.registry.nodes.push(x.clone()),
            RegistryDoc::Namespace(x) => out.registry.namespaces.push(x.clone()),
        }
    }
    // The current policy set, all or nothing.
    out.policy_set = current.clone();
    if let Some(id) = current {
        let mut set = PolicySet::default();
        let mut problems = Vec::new();
        let mut seen: BTreeMap<(Name, Option<Name>, Name), String> = BTreeMap::new();
        policy_docs.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        for (e, pid, r) in policy_docs {
            if *pid != id {
                continue;
            }
            match r {
                Ok(ps) => {
                    for p in ps {
                        let k = (
                            p.origin.kind.clone(),
                            p.origin.namespace.clone(),
                            p.origin.name.clone(),
                        );
                        if let Some(first) = seen.get(&k) {
                            problems.push(Problem {
                                file: e.origin(),
                                line: None,
                                column: None,
                                document: Some(1),
                                object: None,
                                field: Some("metadata.name".into()),
                                message: format!(
                                    "{} {} is already defined by {first}; a policy name must be unique per kind and namespace",
                                    p.origin.kind, p.origin.name
                                ),
                            });
                        } else {
                            seen.insert(k, e.key.clone());
                            set.policies.push(p.clone());
                        }
                    }
                }
                Err(p) => problems.extend(p.iter().cloned()),
            }
        }
        out.policies = if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        };
    }
    out.rejected.sort();
    out
}

// ---------------------------------------------------------------- merge with files

fn local_objects(local: &RegistrySet) -> HashMap<(u8, &str, &str), &Path> {
    let mut m = HashMap::new();
    for e in &local.endpoints {
        m.insert(endpoint_identity(e), &*e.origin.file);
    }
    for n in &local.nodes {
        m.insert((2, "", n.name.as_str()), &*n.origin.file);
    }
    for n in &local.namespaces {
        m.insert((3, "", n.name.as_str()), &*n.origin.file);
    }
    m
}

/// This host's registry: its files (valid as a whole) plus the remote view.
/// A remote document for an object or an address a file already has is left
/// out, and reported (the second value) under its etcd origin. The result has
/// no duplicate name and no address claimed twice, except a HostEndpoint
/// sharing its own host's Node address, which files may do too.
pub fn merge_registry(local: &RegistrySet, remote: &RegistrySet) -> (RegistrySet, Vec<Problem>) {
    let objects = local_objects(local);
    let mut claims: HashMap<IpAddr, (RegistryDoc, &Path)> = HashMap::new();
    for e in &local.endpoints {
        for a in &e.addresses {
            claims
                .entry(*a)
                .or_insert((RegistryDoc::Endpoint(e.clone()), &e.origin.file));
        }
    }
    for n in &local.nodes {
        for a in &n.addresses {
            claims
                .entry(*a)
                .or_insert((RegistryDoc::Node(n.clone()), &n.origin.file));
        }
    }
    let mut out = local.clone();
    let mut problems = Vec::new();
    let mut take = |d: RegistryDoc, file: &Path| -> Option<RegistryDoc> {
        let problem = |message: String| Problem {
            file: file.to_path_buf(),
            line: None,
            column: None,
            document: Some(1),
            object: Some(object_name(&d)),
            field: None,
            message,
        };
        if let Some(f) = objects.get(&identity(&d)) {
            problems.push(problem(format!(
                "{} is also defined in {}; the file wins",
                object_name(&d),
                f.display()
            )));
            return None;
        }
        for a in addresses(&d) {
            if let Some((ld, f)) = claims.get(a) {
                if !may_share(&d, ld) {
                    problems.push(problem(format!(
                        "address {a} is already claimed by {} in {}; the file wins",
                        object_name(ld),
                        f.display()
                    )));
                    return None;
                }
            }
        }
        Some(d)
    };
    for e in &remote.endpoints {
        if let Some(RegistryDoc::Endpoint(e)) =
            take(RegistryDoc::Endpoint(e.clone()), &e.origin.file)
        {
            out.endpoints.push(e);
        }
    }
    for n in &remote.nodes {
        if let Some(RegistryDoc::Node(n)) = take(RegistryDoc::Node(n.clone()), &n.origin.file) {
            out.nodes.push(n);
        }
    }
    for n in &remote.namespaces {
        if let Some(RegistryDoc::Namespace(n)) =
            take(RegistryDoc::Namespace(n.clone()), &n.origin.file)
        {
            out.namespaces.push(n);
        }
    }
    problems.sort();
    (out, problems)
}

/// This host's policies: its policy directory plus the current etcd set. A
/// remote policy with the name of a local one (kind, namespace, name) is left
/// out and reported: the file wins.
pub fn merge_policies(local: &PolicySet, remote: &PolicySet) -> (PolicySet, Vec<Problem>) {
    let names: HashMap<(&str, Option<&str>, &str), &Path> = local
        .policies
        .iter()
        .map(|p| {
            (
                (
                    p.origin.kind.as_str(),
                    p.origin.namespace.as_deref(),
                    p.origin.name.as_str(),
                ),
                &*p.origin.file,
            )
        })
        .collect();
    let mut out = local.clone();
    let mut problems = Vec::new();
    for p in &remote.policies {
        let k = (
            p.origin.kind.as_str(),
            p.origin.namespace.as_deref(),
            p.origin.name.as_str(),
        );
        if let Some(f) = names.get(&k) {
            let obj = match &p.origin.namespace {
                Some(ns) => format!("{} {ns}/{}", p.origin.kind, p.origin.name),
                None => format!("{} {}", p.origin.kind, p.origin.name),
            };
            problems.push(Problem {
                file: p.origin.file.to_path_buf(),
                line: None,
                column: None,
                document: Some(1),
                object: Some(obj.clone()),
                field: None,
                message: format!("{obj} is also defined in {}; the file wins", f.display()),
            });
        } else {
            out.policies.push(p.clone());
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("/netpol/v1")
    }

    fn entry(key: &str, value: &str, create: i64) -> RawEntry {
        RawEntry {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: create,
            binary: false,
        }
    }

    fn ep(name: &str, ns: &str, node: Option<&str>, addr: &str) -> String {
        let node = node.map_or(String::new(), |n| format!(r#","node":"{n}""#));
        format!(
            r#"{{"apiVersion":"netpol/v1","kind":"Endpoint","metadata":{{"name":"{name}","namespace":"{ns}","labels":{{"app":"{name}"}}}},"spec":{{"interface":"veth-{name}","addresses":["{addr}"]{node}}}}}"#
        )
    }

    fn parsed(es: &[RawEntry]) -> Vec<(RawEntry, Parsed)> {
        es.iter()
            .map(|e| (e.clone(), parse_entry(&keys(), "host-a", e)))
            .collect()
    }

    fn built(es: &[RawEntry]) -> Built {
        let p = parsed(es);
        build(p.iter().map(|(e, p)| (e, p)))
    }

    fn messages(b: &Built) -> Vec<String> {
        b.rejected.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn key_must_match_its_document() {
        let k = keys();
        let b = built(&[
            entry(
                &k.endpoint("host-b", "default", "web"),
                &ep("web", "default", Some("host-b"), "10.0.0.2"),
                5,
            ),
            entry(
                &k.endpoint("host-b", "default", "db"),
                &ep("db", "default", Some("host-c"), "10.0.0.3"),
                6,
            ),
            entry(
                &k.endpoint("host-b", "prod", "api"),
                &ep("api", "default", Some("host-b"), "10.0.0.4"),
                7,
            ),
            entry(
                &k.endpoint("host-b", "default", "x"),
                &ep("y", "default", Some("host-b"), "10.0.0.5"),
                8,
            ),
            entry(
                &k.endpoint("host-b", "default", "n"),
                &ep("n", "default", None, "10.0.0.6"),
                9,
            ),
            entry(
                &k.host_endpoint("host-b", "web"),
                &ep("web", "default", Some("host-b"), "10.0.0.7"),
                10,
            ),
        ]);
        assert_eq!(b.registry.endpoints.len(), 1);
        assert_eq!(b.registry.endpoints[0].name, "web");
        assert_eq!(
            &*b.registry.endpoints[0].origin.file,
            Path::new("etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/web@5")
        );
        assert_eq!(
            messages(&b),
            vec![
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/db@6: document 1 (Endpoint default/db): spec.node: \"host-c\" does not match the node of the key (\"host-b\")",
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/n@9: document 1 (Endpoint default/n): spec.node: must be \"host-b\", the node of the key",
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/x@8: document 1 (Endpoint default/y): metadata.name: \"y\" does not match the name in the key (\"x\")",
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/prod/api@7: document 1 (Endpoint default/api): metadata.namespace: \"default\" does not match the namespace in the key (\"prod\")",
                "etcd:/netpol/v1/registry/nodes/host-b/hostendpoints/web@10: document 1 (Endpoint default/web): kind: the key holds a HostEndpoint, the document is a Endpoint",
            ]
        );
    }

    #[test]
    fn own_prefix_is_not_in_the_view_and_nothing_remote_is_this_host() {
        let k = keys();
        let b = built(&[
            entry(
                &k.endpoint("host-a", "default", "mine"),
                &ep("mine", "default", Some("host-a"), "10.0.0.1"),
                3,
            ),
            entry(
                &k.node("host-a"),
                r#"{"apiVersion":"netpol/v1","kind":"Node","metadata":{"name":"host-a"},"spec":{"addresses":["192.0.2.1"]}}"#,
                4,
            ),
            entry(
                &k.static_endpoint("default", "vm"),
                &ep("vm", "default", Some("host-a"), "10.0.0.9"),
                5,
            ),
            entry(
                &k.static_endpoint("default", "vm2"),
                &ep("vm2", "default", None, "10.0.0.8"),
                6,
            ),
            entry(
                &k.static_endpoint("default", "vm3"),
                &ep("vm3", "default", Some("appliance-1"), "10.0.0.7"),
                7,
            ),
        ]);
        assert_eq!(b.registry.endpoints.len(), 1);
        assert_eq!(b.registry.endpoints[0].node.as_deref(), Some("appliance-1"));
        assert!(b.registry.nodes.is_empty());
        assert_eq!(b.rejected.len(), 2, "{:?}", messages(&b));
        assert!(
            messages(&b)[1].ends_with(
                "spec.node: names this host (\"host-a\"); this host's endpoints come from its own files"
            ),
            "{:?}",
            messages(&b)
        );
        // Whatever the entries, no remote endpoint resolves as this host's.
        for e in &b.registry.endpoints {
            assert!(e.node.as_deref().is_some_and(|n| n != "host-a"));
        }
    }

    #[test]
    fn lowest_create_revision_wins_an_address_and_a_name() {
        let k = keys();
        let es = [
            entry(
                &k.endpoint("host-c", "default", "late"),
                &ep("late", "default", Some("host-c"), "10.0.0.5"),
                20,
            ),
            entry(
                &k.endpoint("host-b", "default", "early"),
                &ep("early", "default", Some("host-b"), "10.0.0.5"),
                10,
            ),
            entry(
                &k.endpoint("host-c", "default", "early"),
                &ep("early", "default", Some("host-c"), "10.0.0.6"),
                30,
            ),
        ];
        let b = built(&es);
        assert_eq!(b.registry.endpoints.len(), 1);
        assert_eq!(b.registry.endpoints[0].node.as_deref(), Some("host-b"));
        assert_eq!(
            messages(&b),
            vec![
                "etcd:/netpol/v1/registry/nodes/host-c/endpoints/default/early@30: document 1 (Endpoint default/early): Endpoint default/early is already defined by /netpol/v1/registry/nodes/host-b/endpoints/default/early (created at revision 10); the first entry wins",
                "etcd:/netpol/v1/registry/nodes/host-c/endpoints/default/late@20: document 1 (Endpoint default/late): address 10.0.0.5 is already claimed by Endpoint default/early (/netpol/v1/registry/nodes/host-b/endpoints/default/early, created at revision 10); the first claim wins",
            ]
        );
        // The same winner whatever order the entries come in.
        let mut rev = es.to_vec();
        rev.reverse();
        assert_eq!(built(&rev), b);
    }

    #[test]
    fn a_bad_entry_is_dropped_alone() {
        let k = keys();
        let b = built(&[
            entry(
                &k.endpoint("host-b", "default", "ok"),
                &ep("ok", "default", Some("host-b"), "10.0.0.2"),
                5,
            ),
            entry(
                &k.endpoint("host-b", "default", "bad"),
                "{\"apiVersion\":\"netpol/v1\"",
                6,
            ),
            entry("/netpol/v1/registry/pods/x", "{}", 7),
            entry(
                &k.namespace("prod"),
                r#"{"apiVersion":"netpol/v1","kind":"Namespace","metadata":{"name":"prod","labels":{"reserved:x":"y"}}}"#,
                8,
            ),
        ]);
        assert_eq!(b.registry.endpoints.len(), 1);
        assert_eq!(b.rejected.len(), 3, "{:?}", messages(&b));
        assert!(messages(&b)
            .iter()
            .any(|m| m
                .starts_with("etcd:/netpol/v1/registry/pods/x@7: key is not of netpol's layout")));
    }

    fn cnp(name: &str) -> String {
        format!(
            r#"{{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{{"name":"{name}"}},"spec":{{"endpointSelector":{{}},"ingress":[{{}}]}}}}"#
        )
    }

    #[test]
    fn the_current_policy_set_is_all_or_nothing() {
        let k = keys();
        let mut es = vec![
            entry(&k.policy_file("s1", "a.yaml"), &cnp("a"), 3),
            entry(&k.policy_file("s2", "a.yaml"), &cnp("a"), 4),
            entry(&k.policy_file("s2", "b.yaml"), &cnp("b"), 5),
            entry(&k.policyset_current(), "s2", 6),
        ];
        let b = built(&es);
        assert_eq!(b.policy_set.as_deref(), Some("s2"));
        let names: Vec<_> = b
            .policies
            .as_ref()
            .unwrap()
            .policies
            .iter()
            .map(|p| p.origin.name.clone())
            .collect();
        assert_eq!(names, vec!["a", "b"]);
        es.push(entry(&k.policy_file("s2", "c.yaml"), "{\"kind\":1}", 7));
        let b = built(&es);
        let problems = b.policies.unwrap_err();
        assert!(
            problems[0]
                .to_string()
                .starts_with("etcd:/netpol/v1/policysets/s2/c.yaml@7"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn merge_file_wins_and_the_result_validates() {
        let k = keys();
        let b = built(&[
            entry(
                &k.endpoint("host-b", "default", "web"),
                &ep("web", "default", Some("host-b"), "10.0.0.2"),
                5,
            ),
            entry(
                &k.endpoint("host-b", "default", "db"),
                &ep("db", "default", Some("host-b"), "10.0.0.3"),
                6,
            ),
            entry(
                &k.endpoint("host-b", "default", "api"),
                &ep("api", "default", Some("host-b"), "10.0.0.4"),
                7,
            ),
            entry(
                &k.node("host-b"),
                r#"{"apiVersion":"netpol/v1","kind":"Node","metadata":{"name":"host-b"},"spec":{"addresses":["192.0.2.2"]}}"#,
                8,
            ),
            entry(
                &k.host_endpoint("host-b", "b-eth0"),
                r#"{"apiVersion":"netpol/v1","kind":"HostEndpoint","metadata":{"name":"b-eth0"},"spec":{"node":"host-b","interface":"eth0","addresses":["192.0.2.2"]}}"#,
                9,
            ),
        ]);
        assert!(b.rejected.is_empty(), "{:?}", messages(&b));
        let local = crate::api::parse_registry(
            Path::new("/etc/netpol/endpoints.d/local.yaml"),
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: web}\nspec: {node: host-b, addresses: [10.0.9.9]}\n---\napiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: mine}\nspec: {interface: veth-mine, addresses: [10.0.0.3]}\n",
        )
        .unwrap();
        let (merged, problems) = merge_registry(&local, &b.registry);
        let names: Vec<_> = merged.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["web", "mine", "api", "b-eth0"]);
        assert_eq!(merged.nodes.len(), 1);
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/db@6: document 1 (Endpoint default/db): address 10.0.0.3 is already claimed by Endpoint default/mine in /etc/netpol/endpoints.d/local.yaml; the file wins",
                "etcd:/netpol/v1/registry/nodes/host-b/endpoints/default/web@5: document 1 (Endpoint default/web): Endpoint default/web is also defined in /etc/netpol/endpoints.d/local.yaml; the file wins",
            ]
        );
        // The only claim left twice is the one files allow too: a HostEndpoint
        // sharing the address of its own host's Node.
        let left: Vec<String> = crate::policy::registry::validate(&merged)
            .iter()
            .map(|p| p.message.clone())
            .collect();
        assert_eq!(
            left,
            vec!["address 192.0.2.2 is already used by HostEndpoint b-eth0 (etcd:/netpol/v1/registry/nodes/host-b/hostendpoints/b-eth0@9)"]
        );
    }

    #[test]
    fn merge_policies_file_wins() {
        let k = keys();
        let b = built(&[
            entry(&k.policy_file("s1", "a.yaml"), &cnp("a"), 3),
            entry(&k.policy_file("s1", "b.yaml"), &cnp("b"), 3),
            entry(&k.policyset_current(), "s1", 4),
        ]);
        let local = crate::api::parse_policies(
            Path::new("/etc/netpol.d/a.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec: {endpointSelector: {}, egress: [{}]}\n",
        )
        .unwrap();
        let (m, problems) =
            merge_policies(&PolicySet { policies: local }, b.policies.as_ref().unwrap());
        assert_eq!(m.policies.len(), 2);
        assert_eq!(
            &*m.policies[0].origin.file,
            Path::new("/etc/netpol.d/a.yaml")
        );
        assert_eq!(
            problems[0].to_string(),
            "etcd:/netpol/v1/policysets/s1/a.yaml@3: document 1 (CiliumNetworkPolicy default/a): CiliumNetworkPolicy default/a is also defined in /etc/netpol.d/a.yaml; the file wins"
        );
    }
}
