//! Short constructors for [`model`](super::model) values, for tests and
//! benchmarks that build policies and endpoints in code rather than YAML
//! (feature `test-support`).

use super::model::{Label, LabelKey, Op, Origin, Requirement};

/// Where a hand-built value says it came from: `NAME.yaml`, document 0.
pub fn origin(kind: &str, ns: Option<&str>, name: &str) -> Origin {
    Origin {
        file: std::path::PathBuf::from(format!("{name}.yaml")).into(),
        doc: 0,
        kind: kind.into(),
        namespace: ns.map(Into::into),
        name: name.into(),
    }
}

/// A label of source `k8s`.
pub fn k8s(k: &str, v: &str) -> Label {
    Label {
        source: "k8s".into(),
        key: k.into(),
        value: v.into(),
    }
}

/// A selector requirement; `source: None` matches any source.
pub fn req(source: Option<&str>, key: &str, op: Op, vals: &[&str]) -> Requirement {
    Requirement {
        key: LabelKey {
            source: source.map(Into::into),
            key: key.into(),
        },
        op,
        values: vals.iter().map(|s| s.to_string()).collect(),
    }
}
