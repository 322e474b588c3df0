//! Documents as etcd values: the same `netpol/v1` and `cilium.io/v2` documents
//! as the files, written as JSON (DESIGN §5a).
//!
//! Registry documents are written from the validated model ([`endpoint_json`],
//! [`node_json`], [`namespace_json`]): canonical, and what a host publishes is
//! exactly what its files mean. Policy documents cannot be written back from
//! the model (rules are lowered), so [`policy_file_docs`] turns each document of
//! a policy file into JSON from the parsed tree, and refuses a document whose
//! JSON would not mean the same (checked by parsing both). Reading back goes
//! through the api parsers ([`parse_registry_value`], [`parse_policy_value`]),
//! with every origin and problem naming `etcd:<key>@<mod_revision>`.
//!
//! Pure: no I/O.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::api::model::{
    EndpointDef, EndpointKind, Interface, Label, NamespaceDef, NodeDef, Policy, Proto, RegistrySet,
};
use crate::api::yaml::{self, Value as YValue};
use crate::api::{self, Problem};

/// `etcd:<key>@<mod_revision>`: the "file" of a document read from etcd.
pub fn origin(key: &str, mod_revision: i64) -> PathBuf {
    PathBuf::from(format!("etcd:{key}@{mod_revision}"))
}

fn labels_json(labels: &[Label]) -> Value {
    let mut m = Map::new();
    for l in labels {
        let k = if l.source == "k8s" {
            l.key.to_string()
        } else {
            format!("{}:{}", l.source, l.key)
        };
        m.insert(k, Value::String(l.value.to_string()));
    }
    Value::Object(m)
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
        Proto::Sctp => "SCTP",
        // Named ports are TCP, UDP or SCTP; `Any` never reaches the registry.
        Proto::Any => "ANY",
    }
}

/// An Endpoint or HostEndpoint as JSON; `node` overrides `spec.node` (a host
/// publishes its own endpoints with its node name, which files may leave out).
pub fn endpoint_json(def: &EndpointDef, node: Option<&str>) -> String {
    let host = def.kind == EndpointKind::Host;
    let mut meta = Map::new();
    meta.insert("name".into(), json!(def.name));
    if !host {
        meta.insert(
            "namespace".into(),
            json!(def.namespace.as_deref().unwrap_or("default")),
        );
    }
    if !def.labels.is_empty() {
        meta.insert("labels".into(), labels_json(&def.labels));
    }
    let mut spec = Map::new();
    if let Some(n) = node.or(def.node.as_deref()) {
        spec.insert("node".into(), json!(n));
    }
    match &def.interface {
        Some(Interface::Name(n)) => {
            spec.insert("interface".into(), json!(n));
        }
        Some(Interface::Auto) => {
            spec.insert("interface".into(), json!("auto"));
        }
        None => {}
    }
    if !def.addresses.is_empty() {
        let a: Vec<String> = def.addresses.iter().map(|a| a.to_string()).collect();
        spec.insert("addresses".into(), json!(a));
    }
    if !def.ports.is_empty() {
        let p: Vec<Value> = def
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.port, "protocol": proto_name(p.proto)}))
            .collect();
        spec.insert("ports".into(), Value::Array(p));
    }
    if def.audit {
        spec.insert("audit".into(), json!(true));
    }
    json!({
        "apiVersion": "netpol/v1",
        "kind": if host { "HostEndpoint" } else { "Endpoint" },
        "metadata": meta,
        "spec": spec,
    })
    .to_string()
}

pub fn node_json(def: &NodeDef) -> String {
    let mut meta = Map::new();
    meta.insert("name".into(), json!(def.name));
    if !def.labels.is_empty() {
        meta.insert("labels".into(), labels_json(&def.labels));
    }
    let a: Vec<String> = def.addresses.iter().map(|a| a.to_string()).collect();
    json!({"apiVersion": "netpol/v1", "kind": "Node", "metadata": meta, "spec": {"addresses": a}})
        .to_string()
}

pub fn namespace_json(def: &NamespaceDef) -> String {
    let mut meta = Map::new();
    meta.insert("name".into(), json!(def.name));
    if !def.labels.is_empty() {
        meta.insert("labels".into(), labels_json(&def.labels));
    }
    json!({"apiVersion": "netpol/v1", "kind": "Namespace", "metadata": meta}).to_string()
}

/// Point every origin of `set` at `file` (they were parsed under a stand-in name).
fn set_origin(reg: &mut RegistrySet, file: &Path) {
    for e in &mut reg.endpoints {
        Arc::make_mut(e).origin.file = file.into();
    }
    for n in &mut reg.nodes {
        n.origin.file = file.into();
    }
    for n in &mut reg.namespaces {
        n.origin.file = file.into();
    }
}

fn set_problem_file(problems: &mut [Problem], file: &Path) {
    for p in problems {
        p.file = file.to_path_buf();
    }
}

/// The stand-in file name the JSON parser is run under (its extension picks JSON).
const JSON_NAME: &str = "etcd-value.json";

/// Parse one registry value; every origin and problem names `origin`.
pub fn parse_registry_value(origin: &Path, text: &str) -> Result<RegistrySet, Vec<Problem>> {
    match api::parse_registry(Path::new(JSON_NAME), text) {
        Ok(mut reg) => {
            set_origin(&mut reg, origin);
            Ok(reg)
        }
        Err(mut p) => {
            set_problem_file(&mut p, origin);
            Err(p)
        }
    }
}

/// Parse one policy value (one document, JSON).
pub fn parse_policy_value(origin: &Path, text: &str) -> Result<Vec<Arc<Policy>>, Vec<Problem>> {
    match api::parse_policies(Path::new(JSON_NAME), text) {
        Ok(mut ps) => {
            for p in &mut ps {
                Arc::make_mut(p).origin.file = origin.into();
            }
            Ok(ps)
        }
        Err(mut p) => {
            set_problem_file(&mut p, origin);
            Err(p)
        }
    }
}

/// A tree node as JSON. Scalars keep their exact text: a plain scalar becomes a
/// JSON boolean only as `true`/`false` and a number only in canonical decimal,
/// everything else a string (so a label value `0x1F` stays `"0x1F"`).
fn tree_json(n: &yaml::Node) -> Result<Value, String> {
    Ok(match &n.value {
        YValue::Null => Value::Null,
        YValue::Scalar { text, plain: false } => Value::String(text.clone()),
        YValue::Scalar { text, plain: true } => match text.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            t => match (t.parse::<i64>(), t.parse::<u64>()) {
                (Ok(i), _) if i.to_string() == t => json!(i),
                (_, Ok(u)) if u.to_string() == t => json!(u),
                _ => Value::String(t.to_string()),
            },
        },
        YValue::Seq(items) => Value::Array(items.iter().map(tree_json).collect::<Result<_, _>>()?),
        YValue::Map(entries) => {
            let mut m = Map::new();
            for (k, v) in entries {
                let Some(key) = k.as_str() else {
                    return Err(format!(
                        "line {}: a mapping key that is not a string cannot be stored as JSON",
                        k.pos.line
                    ));
                };
                m.insert(key.to_string(), tree_json(v)?);
            }
            Value::Object(m)
        }
    })
}

/// The policy without what JSON cannot keep the same: origin and positions.
fn comparable(p: &Policy) -> Policy {
    let mut p = p.clone();
    p.origin.file = Path::new("").into();
    p.origin.doc = 0;
    // Where the parts were written is not what they mean.
    p.source = Default::default();
    let rules: Vec<_> = p
        .rules
        .iter()
        .map(|r| {
            let mut r = r.clone();
            for item in r
                .ingress
                .iter_mut()
                .chain(r.ingress_deny.iter_mut())
                .chain(r.egress.iter_mut())
                .chain(r.egress_deny.iter_mut())
            {
                item.pos = None;
            }
            r
        })
        .collect();
    p.rules = Arc::from(rules);
    p
}

/// One policy file as `(name, json)` documents: `file` alone for a file of one
/// document, `file#N` (1-based, as a reader counts) for each of several. The
/// file must be valid; a document whose JSON would parse to a different policy
/// is refused with a problem naming it.
pub fn policy_file_docs(file: &Path, text: &str) -> Result<Vec<(String, String)>, Vec<Problem>> {
    let original = api::parse_policies(file, text)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_json = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (docs, _) = if is_json {
        yaml::parse_json(text)
    } else {
        yaml::parse_yaml(text)
    };
    let mut out = Vec::new();
    let many = docs.len() > 1;
    let problem = |doc: usize, message: String| Problem {
        file: file.to_path_buf(),
        line: None,
        column: None,
        document: Some(doc),
        object: None,
        field: None,
        message,
    };
    for d in &docs {
        let v = tree_json(&d.root).map_err(|m| vec![problem(d.number, m)])?;
        let json = v.to_string();
        let doc_name = if many {
            format!("{name}#{}", d.number)
        } else {
            name.clone()
        };
        out.push((doc_name, json));
    }
    // Both sides parse to the same policies, in the same order.
    let mut back = Vec::new();
    for (n, (_, json)) in out.iter().enumerate() {
        match api::parse_policies(Path::new(JSON_NAME), json) {
            Ok(p) => back.extend(p),
            Err(p) => {
                return Err(vec![problem(
                    docs[n].number,
                    format!(
                        "cannot be stored as JSON without changing its meaning ({}); write booleans as true/false and numbers in decimal",
                        p.first().map(|p| p.to_string()).unwrap_or_default()
                    ),
                )])
            }
        }
    }
    let a: Vec<Policy> = original.iter().map(|p| comparable(p)).collect();
    let b: Vec<Policy> = back.iter().map(|p| comparable(p)).collect();
    if a != b {
        let at = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        return Err(vec![problem(
            docs.get(at).map_or(1, |d| d.number),
            "cannot be stored as JSON without changing its meaning; write booleans as true/false and numbers in decimal".into(),
        )]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: &str = r#"
apiVersion: netpol/v1
kind: Endpoint
metadata:
  name: web-1
  namespace: prod
  labels: {app: web, "container:x": "0x1F", version: "1.10"}
spec:
  node: host-b
  interface: veth-web1
  addresses: [10.0.1.11, "fd00::11"]
  ports:
    - {name: http, port: 80}
    - {name: dns, port: 53, protocol: UDP}
  audit: true
---
apiVersion: netpol/v1
kind: HostEndpoint
metadata: {name: b-eth0, labels: {role: web}}
spec: {node: host-b, interface: eth0, addresses: [192.0.2.11]}
---
apiVersion: netpol/v1
kind: Node
metadata: {name: host-b, labels: {rack: r2}}
spec: {addresses: [192.0.2.11]}
---
apiVersion: netpol/v1
kind: Namespace
metadata: {name: prod, labels: {team: payments}}
"#;

    /// What a host publishes parses back to exactly what its files say.
    #[test]
    fn registry_documents_round_trip() {
        let reg = api::parse_registry(Path::new("reg.yaml"), REG).unwrap();
        let mut back = RegistrySet::default();
        for e in &reg.endpoints {
            let r = parse_registry_value(Path::new("x"), &endpoint_json(e, None)).unwrap();
            back.endpoints.extend(r.endpoints);
        }
        for n in &reg.nodes {
            back.nodes.extend(
                parse_registry_value(Path::new("x"), &node_json(n))
                    .unwrap()
                    .nodes,
            );
        }
        for n in &reg.namespaces {
            back.namespaces.extend(
                parse_registry_value(Path::new("x"), &namespace_json(n))
                    .unwrap()
                    .namespaces,
            );
        }
        let norm = |mut r: RegistrySet| {
            set_origin(&mut r, Path::new("x"));
            for e in &mut r.endpoints {
                Arc::make_mut(e).origin.doc = 0;
            }
            for e in &mut r.nodes {
                e.origin.doc = 0;
            }
            for e in &mut r.namespaces {
                e.origin.doc = 0;
            }
            r
        };
        assert_eq!(norm(back), norm(reg.clone()));
        let j = endpoint_json(&reg.endpoints[0], Some("host-z"));
        assert!(j.contains(r#""node":"host-z""#), "{j}");
    }

    #[test]
    fn problems_name_the_key_and_revision() {
        let o = origin("/netpol/v1/registry/namespaces/x", 42);
        let e = parse_registry_value(
            &o,
            r#"{"apiVersion":"netpol/v1","kind":"Namespace","metadata":{"name":"x"},"spec":{}}"#,
        )
        .unwrap_err();
        // The api's own wording follows; the origin and location are fleet's.
        assert!(
            e[0].to_string().starts_with(
                "etcd:/netpol/v1/registry/namespaces/x@42:1:70: document 1 (Namespace x): spec: "
            ),
            "{}",
            e[0]
        );
        let e = parse_registry_value(&o, "{not json").unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("etcd:/netpol/v1/registry/namespaces/x@42:1:2: JSON syntax error"),
            "{}",
            e[0]
        );
    }

    const POL: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web, version: "0x1F"}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: api}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}, {port: 443}]}]
  enableDefaultDeny: {egress: false}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

    #[test]
    fn policy_documents_become_json_that_means_the_same() {
        let docs = policy_file_docs(Path::new("/d/web.yaml"), POL).unwrap();
        assert_eq!(
            docs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
            vec!["web.yaml#1", "web.yaml#2"]
        );
        assert!(docs[0].1.contains(r#""version":"0x1F""#), "{}", docs[0].1);
        let p = parse_policy_value(&origin("/k", 3), &docs[0].1).unwrap();
        assert_eq!(&*p[0].origin.file, Path::new("etcd:/k@3"));
        let one = policy_file_docs(
            Path::new("np.json"),
            r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"np"},"spec":{"podSelector":{}}}"#,
        )
        .unwrap();
        assert_eq!(one[0].0, "np.json");
        // A capitalised boolean is a boolean to the YAML reader but would be a
        // string in JSON: refused rather than stored with another meaning.
        let e = policy_file_docs(
            Path::new("/d/x.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  enableDefaultDeny: {ingress: False}\n  ingress: [{}]\n",
        )
        .unwrap_err();
        assert!(
            e[0].to_string().starts_with(
                "/d/x.yaml: document 1: cannot be stored as JSON without changing its meaning"
            ),
            "{}",
            e[0]
        );
    }
}
