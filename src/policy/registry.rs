//! The endpoint registry as policy sees it: every Endpoint and HostEndpoint with the
//! label set it is matched by, whether it is enforced on this host, and the
//! registry-wide checks (an address or a name used twice).
//!
//! Owns resolution of registry documents against the node name and Namespace
//! documents; it does not read files (that is `api`) and does not number
//! identities (that is `identity`). Pure.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::model::{
    EndpointDef, EndpointKind, Label, Name, NamespaceDef, Origin, RegistrySet,
};
use crate::policy::labels;

/// A registry endpoint resolved for one host.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint<'a> {
    pub def: &'a EndpointDef,
    /// Where `def` is in the registry's `endpoints`.
    pub index: usize,
    /// Workloads: the identity labels (own + namespace + cluster labels, sorted).
    /// HostEndpoints: their own labels, matched by `nodeSelector`.
    pub labels: Arc<[Label]>,
    /// The endpoint lives on this host (`node` absent or equal to the node name).
    pub this_node: bool,
    /// Enforced here: on this host and it names an interface.
    pub local: bool,
}

impl ResolvedEndpoint<'_> {
    /// `namespace/name` for workloads, `name` for host endpoints.
    pub fn display_name(&self) -> String {
        display_name(self.def)
    }
}

/// `namespace/name` for workloads, `name` for host endpoints.
pub fn display_name(def: &EndpointDef) -> String {
    match (&def.kind, &def.namespace) {
        (EndpointKind::Workload, Some(ns)) => format!("{ns}/{}", def.name),
        _ => def.name.to_string(),
    }
}

fn is_this_node(node: &Option<Name>, node_name: &str) -> bool {
    match node {
        None => true,
        Some(n) => n == node_name,
    }
}

/// The namespace of a workload (`default` when the parser left none).
pub fn namespace_of(def: &EndpointDef) -> &str {
    def.namespace.as_deref().unwrap_or("default")
}

/// What slots are ordered by: workloads first, then host endpoints, each by
/// namespace, name and origin (and, between equal keys, registry order).
pub fn slot_key(def: &EndpointDef) -> (bool, &str, &str, &Origin) {
    (
        def.kind == EndpointKind::Host,
        namespace_of(def),
        &def.name,
        &def.origin,
    )
}

/// The registry's Namespace documents by name.
pub fn namespaces_of(reg: &RegistrySet) -> HashMap<&str, &NamespaceDef> {
    reg.namespaces
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect()
}

/// The labels policy matches an endpoint by ([`ResolvedEndpoint::labels`]).
pub fn endpoint_labels(def: &EndpointDef, namespaces: &HashMap<&str, &NamespaceDef>) -> Vec<Label> {
    match def.kind {
        EndpointKind::Workload => {
            let ns = namespace_of(def);
            labels::workload_labels(&def.labels, ns, namespaces.get(ns).copied())
        }
        EndpointKind::Host => {
            let mut l = def.labels.clone();
            l.sort();
            l.dedup();
            l
        }
    }
}

/// (on this host, enforced here) of an endpoint for host `node_name`.
pub fn placement(def: &EndpointDef, node_name: &str) -> (bool, bool) {
    let this_node = is_this_node(&def.node, node_name);
    (this_node, this_node && def.interface.is_some())
}

/// Resolve every endpoint of the registry, in slot order ([`slot_key`]).
pub fn resolve<'a>(reg: &'a RegistrySet, node_name: &str) -> Vec<ResolvedEndpoint<'a>> {
    let namespaces = namespaces_of(reg);
    let mut defs: Vec<(usize, &EndpointDef)> =
        reg.endpoints.iter().map(|e| &**e).enumerate().collect();
    defs.sort_by(|(_, a), (_, b)| slot_key(a).cmp(&slot_key(b)));
    // Workloads with the same labels in one namespace share one copy of
    // their identity labels (a fleet registry has many per label set).
    let mut shared: HashMap<(&[Label], &str), Arc<[Label]>> = HashMap::new();
    defs.into_iter()
        .map(|(index, def)| {
            let (this_node, local) = placement(def, node_name);
            let labels: Arc<[Label]> = match def.kind {
                EndpointKind::Workload => shared
                    .entry((def.labels.as_slice(), namespace_of(def)))
                    .or_insert_with(|| endpoint_labels(def, &namespaces).into())
                    .clone(),
                EndpointKind::Host => endpoint_labels(def, &namespaces).into(),
            };
            ResolvedEndpoint {
                def,
                index,
                labels,
                this_node,
                local,
            }
        })
        .collect()
}

#[cfg(any(test, feature = "test-support"))]
pub use checks::validate;

/// The registry-wide checks tests use (behind `test-support`).
#[cfg(any(test, feature = "test-support"))]
mod checks {
    use std::collections::{BTreeMap, HashMap};
    use std::net::IpAddr;

    use super::{display_name, namespace_of};
    use crate::api::model::{EndpointDef, EndpointKind, RegistrySet};
    use crate::api::Problem;

    fn object(kind: &str, ns: Option<&str>, name: &str) -> String {
        match ns {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        }
    }

    /// Registry-wide problems: two endpoints with the same name (per kind and
    /// namespace), two Nodes with the same name, an address claimed by two documents.
    /// Compile tolerates them (the first document in slot order wins an address), but
    /// a registry with problems should not be applied. The loader's cross-file
    /// checks (`api::load`) are what netpol applies; tests that assemble a
    /// registry from pieces of text check it with this.
    pub fn validate(reg: &RegistrySet) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut names: BTreeMap<(bool, String, String), &EndpointDef> = BTreeMap::new();
        // address -> (object description, file)
        let mut addrs: HashMap<IpAddr, (String, String)> = HashMap::new();
        for ep in &reg.endpoints {
            let kind = if ep.kind == EndpointKind::Host {
                "HostEndpoint"
            } else {
                "Endpoint"
            };
            let ns = if ep.kind == EndpointKind::Host {
                None
            } else {
                Some(namespace_of(ep))
            };
            let obj = object(kind, ns, &ep.name);
            let key = (
                ep.kind == EndpointKind::Host,
                ns.unwrap_or("").to_string(),
                ep.name.to_string(),
            );
            if let Some(prev) = names.get(&key) {
                problems.push(Problem {
                    file: ep.origin.file.to_path_buf(),
                    line: None,
                    column: None,
                    document: Some(ep.origin.doc + 1),
                    object: Some(obj.clone()),
                    field: Some("metadata.name".into()),
                    message: format!(
                        "{kind} {} is already defined in {}",
                        display_name(ep),
                        prev.origin.file.display()
                    ),
                });
            } else {
                names.insert(key, ep);
            }
            for (i, a) in ep.addresses.iter().enumerate() {
                if let Some((other, file)) = addrs.get(a) {
                    problems.push(Problem {
                        file: ep.origin.file.to_path_buf(),
                        line: None,
                        column: None,
                        document: Some(ep.origin.doc + 1),
                        object: Some(obj.clone()),
                        field: Some(format!("spec.addresses[{i}]")),
                        message: format!("address {a} is already used by {other} ({file})"),
                    });
                } else {
                    addrs.insert(*a, (obj.clone(), ep.origin.file.display().to_string()));
                }
            }
        }
        let mut node_names: BTreeMap<&str, &crate::api::model::NodeDef> = BTreeMap::new();
        for n in &reg.nodes {
            let obj = object("Node", None, &n.name);
            if let Some(prev) = node_names.get(n.name.as_str()) {
                problems.push(Problem {
                    file: n.origin.file.to_path_buf(),
                    line: None,
                    column: None,
                    document: Some(n.origin.doc + 1),
                    object: Some(obj.clone()),
                    field: Some("metadata.name".into()),
                    message: format!(
                        "Node {} is already defined in {}",
                        n.name,
                        prev.origin.file.display()
                    ),
                });
            } else {
                node_names.insert(&n.name, n);
            }
            for (i, a) in n.addresses.iter().enumerate() {
                if let Some((other, file)) = addrs.get(a) {
                    problems.push(Problem {
                        file: n.origin.file.to_path_buf(),
                        line: None,
                        column: None,
                        document: Some(n.origin.doc + 1),
                        object: Some(obj.clone()),
                        field: Some(format!("spec.addresses[{i}]")),
                        message: format!("address {a} is already used by {other} ({file})"),
                    });
                } else {
                    addrs.insert(*a, (obj.clone(), n.origin.file.display().to_string()));
                }
            }
        }
        problems.sort();
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{Interface, Origin};

    fn ep(name: &str, ns: &str, addr: &str, node: Option<&str>) -> EndpointDef {
        EndpointDef {
            origin: Origin {
                file: std::path::Path::new("reg.yaml").into(),
                doc: 0,
                kind: "Endpoint".into(),
                namespace: Some(ns.into()),
                name: name.into(),
            },
            kind: EndpointKind::Workload,
            name: name.into(),
            namespace: Some(ns.into()),
            labels: vec![],
            node: node.map(Name::from),
            interface: Some(Interface::Name(format!("veth-{name}"))),
            addresses: vec![addr.parse().unwrap()],
            ports: vec![],
            audit: false,
        }
    }

    #[test]
    fn local_and_remote() {
        let reg = RegistrySet {
            endpoints: vec![
                ep("a", "default", "10.0.0.1", None).into(),
                ep("b", "default", "10.0.0.2", Some("host-b")).into(),
            ],
            ..Default::default()
        };
        let r = resolve(&reg, "host-a");
        assert!(r[0].local);
        assert!(!r[1].local);
        let r = resolve(&reg, "host-b");
        assert!(r[1].local);
    }

    #[test]
    fn duplicate_address_and_name() {
        let reg = RegistrySet {
            endpoints: vec![
                ep("a", "default", "10.0.0.1", None).into(),
                ep("a", "default", "10.0.0.1", None).into(),
            ],
            ..Default::default()
        };
        let p = validate(&reg);
        assert_eq!(p.len(), 2);
        assert!(p.iter().any(|p| p
            .message
            .contains("address 10.0.0.1 is already used by Endpoint default/a")));
        assert!(p.iter().any(|p| p.message.contains("is already defined")));
    }
}
