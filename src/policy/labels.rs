//! Labels and label selectors: matching a [`Selector`] against a label set, and the
//! label sets Cilium gives endpoints and reserved identities (docs/policy.md,
//! "The registry" and "Identities").
//!
//! Owns only label logic: it knows nothing of policies, identities' numbers or the
//! registry's files. Pure, no I/O.
//!
//! Decisions recorded here:
//! - A selector key with source `None` (or the selector wildcard source `any`)
//!   matches the key from any label source; a concrete source must match exactly.
//! - `NotIn` and `DoesNotExist` are true when the key is absent (Kubernetes).
//! - Every workload endpoint carries `k8s:io.cilium.k8s.policy.cluster=default`, as
//!   every pod does in a Cilium cluster named `default`; the `cluster` entity is
//!   resolved by compile to every registry identity plus the cluster's reserved
//!   identities, so the label only matters to selectors that name it explicitly.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use crate::api::model::{Label, LabelKey, Name, NamespaceDef, Op, Requirement, Selector};

/// `k8s:io.kubernetes.pod.namespace`: the namespace of a workload.
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels copied from the endpoint's Namespace document.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The well-known namespace name label every Namespace has in Kubernetes.
pub const METADATA_NAME: &str = "kubernetes.io/metadata.name";
/// The cluster label (Cilium's entity `cluster`).
pub const POLICY_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// The cluster name netpol uses (there is one cluster: the set of registry files).
pub const CLUSTER_NAME: &str = "default";

pub const SOURCE_K8S: &str = "k8s";
pub const SOURCE_RESERVED: &str = "reserved";
pub const SOURCE_CIDR: &str = "cidr";
/// Selector wildcard source: matches any label source.
pub const SOURCE_ANY: &str = "any";

/// Build a label.
pub fn label(source: &str, key: &str, value: &str) -> Label {
    Label {
        source: source.into(),
        key: key.into(),
        value: value.into(),
    }
}

/// `source:key=value` (or `source:key` when the value is empty).
pub fn format_label(l: &Label) -> String {
    if l.value.is_empty() {
        format!("{}:{}", l.source, l.key)
    } else {
        format!("{}:{}={}", l.source, l.key, l.value)
    }
}

/// True when the selector key names this label's key (and source, if it has one).
pub fn key_matches(key: &LabelKey, l: &Label) -> bool {
    if key.key != l.key {
        return false;
    }
    match key.source.as_deref() {
        None | Some(SOURCE_ANY) => true,
        Some(s) => s == l.source,
    }
}

/// Does one requirement hold for this label set?
pub fn requirement_matches(req: &Requirement, labels: &[Label]) -> bool {
    let mut present = labels.iter().filter(|l| key_matches(&req.key, l));
    match req.op {
        Op::In => present.any(|l| req.values.contains(&l.value)),
        Op::NotIn => !present.any(|l| req.values.contains(&l.value)),
        Op::Exists => present.next().is_some(),
        Op::DoesNotExist => present.next().is_none(),
    }
}

/// Does the selector select this label set? All requirements are ANDed; the empty
/// selector matches every label set.
pub fn selector_matches(sel: &Selector, labels: &[Label]) -> bool {
    sel.requirements
        .iter()
        .all(|r| requirement_matches(r, labels))
}

/// The labels of a workload endpoint as Cilium gives them to a pod: its own labels,
/// `k8s:io.kubernetes.pod.namespace=<ns>`, `k8s:io.cilium.k8s.namespace.labels.<k>=<v>`
/// for each label of its Namespace document plus `kubernetes.io/metadata.name=<ns>`
/// (present even without a Namespace document), and the cluster label. Sorted,
/// without duplicates (a later label with the same source and key replaces an
/// earlier one, so a user cannot forge a second namespace label).
pub fn workload_labels(
    own: &[Label],
    namespace: &str,
    ns_def: Option<&NamespaceDef>,
) -> Vec<Label> {
    // The names every endpoint's set holds, one copy each.
    static K8S: LazyLock<Name> = LazyLock::new(|| SOURCE_K8S.into());
    static POD_NS: LazyLock<Name> = LazyLock::new(|| POD_NAMESPACE.into());
    static CLUSTER_KEY: LazyLock<Name> = LazyLock::new(|| POLICY_CLUSTER.into());
    static CLUSTER: LazyLock<Name> = LazyLock::new(|| CLUSTER_NAME.into());
    static NS_NAME_KEY: LazyLock<Name> =
        LazyLock::new(|| format!("{NAMESPACE_LABELS_PREFIX}{METADATA_NAME}").into());
    let mut map: BTreeMap<(Name, Name), Name> = BTreeMap::new();
    for l in own {
        map.insert((l.source.clone(), l.key.clone()), l.value.clone());
    }
    let namespace: Name = namespace.into();
    let mut ns_labels: BTreeMap<Name, Name> = BTreeMap::new();
    if let Some(def) = ns_def {
        for l in &def.labels {
            let key = format!("{NAMESPACE_LABELS_PREFIX}{}", l.key);
            ns_labels.insert(key.into(), l.value.clone());
        }
    }
    ns_labels.insert(NS_NAME_KEY.clone(), namespace.clone());
    for (k, v) in ns_labels {
        map.insert((K8S.clone(), k), v);
    }
    map.insert((K8S.clone(), POD_NS.clone()), namespace);
    map.insert((K8S.clone(), CLUSTER_KEY.clone()), CLUSTER.clone());
    map.into_iter()
        .map(|((source, key), value)| Label { source, key, value })
        .collect()
}

/// The label set of a reserved identity: `{reserved:<name>}`. The family-specific
/// world identities also carry `reserved:world`: netpol's ipcache resolves every
/// unknown address to them (never to identity 2), so a selector on
/// `reserved:world` must select them, as it selects CIDR identities.
pub fn reserved_labels(name: &str) -> Vec<Label> {
    match name {
        "world-ipv4" | "world-ipv6" => vec![
            label(SOURCE_RESERVED, "world", ""),
            label(SOURCE_RESERVED, name, ""),
        ],
        _ => vec![label(SOURCE_RESERVED, name, "")],
    }
}

/// Canonical text of a sorted label set, used for hashing and display.
pub fn canonical(labels: &[Label]) -> String {
    let mut v: Vec<String> = labels.iter().map(format_label).collect();
    v.sort();
    v.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(source: Option<&str>, key: &str, op: Op, values: &[&str]) -> Requirement {
        Requirement {
            key: LabelKey {
                source: source.map(Into::into),
                key: key.into(),
            },
            op,
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn sel(reqs: Vec<Requirement>) -> Selector {
        Selector { requirements: reqs }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(selector_matches(&Selector::default(), &[]));
        assert!(selector_matches(
            &Selector::default(),
            &[label("k8s", "app", "x")]
        ));
    }

    #[test]
    fn source_none_matches_any_source_concrete_source_must_match() {
        let ls = vec![label("container", "app", "web")];
        assert!(selector_matches(
            &sel(vec![req(None, "app", Op::In, &["web"])]),
            &ls
        ));
        assert!(selector_matches(
            &sel(vec![req(Some("any"), "app", Op::In, &["web"])]),
            &ls
        ));
        assert!(!selector_matches(
            &sel(vec![req(Some("k8s"), "app", Op::In, &["web"])]),
            &ls
        ));
        assert!(selector_matches(
            &sel(vec![req(Some("container"), "app", Op::In, &["web"])]),
            &ls
        ));
    }

    #[test]
    fn operators() {
        let ls = vec![label("k8s", "app", "web"), label("k8s", "tier", "front")];
        let m = |r| selector_matches(&sel(vec![r]), &ls);
        assert!(m(req(None, "app", Op::In, &["db", "web"])));
        assert!(!m(req(None, "app", Op::In, &["db"])));
        assert!(m(req(None, "app", Op::NotIn, &["db"])));
        assert!(!m(req(None, "app", Op::NotIn, &["web"])));
        assert!(
            m(req(None, "missing", Op::NotIn, &["web"])),
            "NotIn is true when absent"
        );
        assert!(m(req(None, "tier", Op::Exists, &[])));
        assert!(!m(req(None, "missing", Op::Exists, &[])));
        assert!(m(req(None, "missing", Op::DoesNotExist, &[])));
        assert!(!m(req(None, "app", Op::DoesNotExist, &[])));
    }

    #[test]
    fn requirements_are_anded() {
        let ls = vec![label("k8s", "app", "web")];
        let s = sel(vec![
            req(None, "app", Op::In, &["web"]),
            req(None, "env", Op::Exists, &[]),
        ]);
        assert!(!selector_matches(&s, &ls));
    }

    #[test]
    fn workload_labels_include_namespace_and_namespace_labels() {
        let ns = NamespaceDef {
            origin: crate::api::model::Origin {
                file: std::path::Path::new("x").into(),
                doc: 0,
                kind: "Namespace".into(),
                namespace: None,
                name: "prod".into(),
            },
            name: "prod".into(),
            labels: vec![label("k8s", "team", "payments")],
        };
        let ls = workload_labels(&[label("k8s", "app", "web")], "prod", Some(&ns));
        let has = |k: &str, v: &str| {
            ls.iter()
                .any(|l| l.source == "k8s" && l.key == k && l.value == v)
        };
        assert!(has("app", "web"));
        assert!(has(POD_NAMESPACE, "prod"));
        assert!(has("io.cilium.k8s.namespace.labels.team", "payments"));
        assert!(has(
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
            "prod"
        ));
        assert!(has(POLICY_CLUSTER, "default"));
        // Without a Namespace document the metadata name label is still there.
        let ls2 = workload_labels(&[], "dev", None);
        assert!(ls2.iter().any(|l| l.key
            == "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"
            && l.value == "dev"));
    }

    #[test]
    fn own_label_cannot_forge_namespace() {
        let ls = workload_labels(
            &[label("k8s", POD_NAMESPACE, "kube-system")],
            "default",
            None,
        );
        let ns: Vec<_> = ls.iter().filter(|l| l.key == POD_NAMESPACE).collect();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0].value, "default");
    }
}
