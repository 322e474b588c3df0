//! Offline conformance suite: every `tests/conformance/*.yaml` file is one case, a
//! multi-document YAML file holding policies (CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy, NetworkPolicy), registry documents (Endpoint,
//! HostEndpoint, Node, Namespace) and one `kind: Expect` document:
//!
//! ```yaml
//! kind: Expect
//! description: what the case shows
//! source: where the example comes from
//! include_policies: [etc/examples/seed/netpol.d/frontend-to-backend.yaml]  # optional, repo-relative
//! include_registry: [etc/examples/seed/endpoints.d/seed.yaml]              # optional
//! node_name: host-a            # optional, default host-a
//! allow_localhost: false       # optional
//! flows:
//!   - frontend-1 backend tcp/80 allowed     # SRC DST PROTO/PORT allowed|denied
//!   - 203.0.113.9 backend icmp/8 denied
//! ```
//!
//! Documents go through the real parser (`api::parse_policies` / `parse_registry`),
//! then compile, then `trace` — the same path as `netpolctl trace`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use netpol::api::{self, model::PolicySet, model::RegistrySet};
use netpol::policy::compile::{compile, CompileOptions};
use netpol::policy::trace::{trace_str, Verdict};
use netpol::policy::types::proto;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    #[allow(dead_code)]
    source: Option<String>,
    #[serde(default)]
    include_policies: Vec<String>,
    #[serde(default)]
    include_registry: Vec<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    allow_localhost: bool,
    flows: Vec<String>,
}

const REGISTRY_KINDS: &[&str] = &["Endpoint", "HostEndpoint", "Node", "Namespace"];

fn split_docs(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().unwrap();
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.into_iter().filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))).collect()
}

fn kind_of(doc: &str) -> String {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind:"))
        .map(|k| k.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn parse_proto_port(s: &str) -> Result<(u8, u16), String> {
    let (p, port) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected PROTO/PORT"))?;
    let p = match p {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "sctp" => proto::SCTP,
        "icmp" => proto::ICMP,
        "icmpv6" => proto::ICMPV6,
        other => return Err(format!("{other:?}: unknown protocol")),
    };
    Ok((p, port.parse().map_err(|_| format!("{port:?}: not a port"))?))
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run one case; returns the failures (empty = pass).
fn run_case(path: &Path) -> Result<usize, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let mut pol_text = String::new();
    let mut reg_text = String::new();
    let mut expect: Option<Expect> = None;
    for doc in split_docs(&text) {
        let kind = kind_of(&doc);
        if kind == "Expect" {
            expect = Some(serde_norway::from_str(&doc).map_err(|e| vec![format!("{}: Expect: {e}", path.display())])?);
        } else if REGISTRY_KINDS.contains(&kind.as_str()) {
            reg_text.push_str("---\n");
            reg_text.push_str(&doc);
        } else {
            pol_text.push_str("---\n");
            pol_text.push_str(&doc);
        }
    }
    let expect = expect.ok_or_else(|| vec![format!("{}: no Expect document", path.display())])?;
    let mut problems = Vec::new();
    let mut policies = PolicySet::default();
    let mut registry = RegistrySet::default();
    let mut add_pol = |file: &Path, t: &str, problems: &mut Vec<String>| match api::parse_policies(file, t) {
        Ok(ps) => policies.policies.extend(ps),
        Err(ps) => problems.extend(ps.iter().map(|p| p.to_string())),
    };
    if !pol_text.is_empty() {
        add_pol(path, &pol_text, &mut problems);
    }
    for inc in &expect.include_policies {
        let f = repo_root().join(inc);
        let t = std::fs::read_to_string(&f).map_err(|e| vec![format!("{}: {e}", f.display())])?;
        add_pol(&f, &t, &mut problems);
    }
    let mut add_reg = |file: &Path, t: &str, problems: &mut Vec<String>| match api::parse_registry(file, t) {
        Ok(r) => {
            registry.endpoints.extend(r.endpoints);
            registry.nodes.extend(r.nodes);
            registry.namespaces.extend(r.namespaces);
        }
        Err(ps) => problems.extend(ps.iter().map(|p| p.to_string())),
    };
    if !reg_text.is_empty() {
        add_reg(path, &reg_text, &mut problems);
    }
    for inc in &expect.include_registry {
        let f = repo_root().join(inc);
        let t = std::fs::read_to_string(&f).map_err(|e| vec![format!("{}: {e}", f.display())])?;
        add_reg(&f, &t, &mut problems);
    }
    problems.extend(netpol::registry::validate(&registry).iter().map(|p| p.to_string()));
    if !problems.is_empty() {
        return Err(problems);
    }
    if registry.endpoints.is_empty() {
        return Err(vec![format!("{}: the registry parsed to no endpoints (parser not merged?)", path.display())]);
    }
    let opts = CompileOptions {
        node_name: expect.node_name.clone().unwrap_or_else(|| "host-a".into()),
        allow_localhost: expect.allow_localhost,
        ..Default::default()
    };
    let c = compile(&policies, &registry, &opts);
    let mut failures = Vec::new();
    for flow in &expect.flows {
        let f: Vec<&str> = flow.split_whitespace().collect();
        if f.len() != 4 {
            failures.push(format!("{}: flow {flow:?}: expected `SRC DST PROTO/PORT allowed|denied`", path.display()));
            continue;
        }
        let (p, port) = match parse_proto_port(f[2]) {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{}: flow {flow:?}: {e}", path.display()));
                continue;
            }
        };
        let want = match f[3] {
            "allowed" => Verdict::Allowed,
            "denied" => Verdict::Denied,
            other => {
                failures.push(format!("{}: flow {flow:?}: {other:?} is not allowed|denied", path.display()));
                continue;
            }
        };
        match trace_str(&c, f[0], f[1], p, port) {
            Ok(r) if r.verdict == want => {}
            Ok(r) => failures.push(format!("{}: flow {flow:?}: got {:?}\n{r}", path.display(), r.verdict)),
            Err(e) => failures.push(format!("{}: flow {flow:?}: {e}", path.display())),
        }
    }
    if failures.is_empty() {
        Ok(expect.flows.len())
    } else {
        Err(failures)
    }
}

fn cases() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/conformance");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/conformance exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn conformance_cases() {
    let cases = cases();
    assert!(cases.len() >= 40, "at least 40 cases, found {}", cases.len());
    let mut failures = Vec::new();
    let mut flows = 0;
    for c in &cases {
        match run_case(c) {
            Ok(n) => flows += n,
            Err(f) => failures.extend(f),
        }
    }
    eprintln!("{} conformance cases, {flows} flows checked", cases.len());
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn splitting_and_kinds() {
    let docs = split_docs("# c\n---\nkind: A\n---\n\n---\nkind: \"B\"\nx: 1\n");
    assert_eq!(docs.len(), 2);
    assert_eq!(kind_of(&docs[1]), "B");
    assert_eq!(parse_proto_port("icmpv6/128").unwrap(), (proto::ICMPV6, 128));
}
