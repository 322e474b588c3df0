//! Offline conformance suite: every `tests/fixtures/conformance/*.yaml` file is one case, a
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
//! warnings: ["spec.ingress[0]: [shadowed-allow]"]   # optional: what `policy::lint` says
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

use crate::harness::cmd::repo;

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
    /// The warnings `policy::lint` gives the case, as `FIELD: [code]`, in order.
    #[serde(default)]
    warnings: Vec<String>,
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
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

fn kind_of(doc: &str) -> String {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind:"))
        .map(|k| k.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn parse_proto_port(s: &str) -> Result<(u8, u16), String> {
    let (p, port) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected PROTO/PORT"))?;
    let p = match p {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "sctp" => proto::SCTP,
        "icmp" => proto::ICMP,
        "icmpv6" => proto::ICMPV6,
        other => return Err(format!("{other:?}: unknown protocol")),
    };
    Ok((
        p,
        port.parse().map_err(|_| format!("{port:?}: not a port"))?,
    ))
}

/// Run one case; returns the failures (empty = pass).
fn run_case(path: &Path) -> Result<usize, Vec<String>> {
    let (policies, registry, expect) = load_case(path)?;
    let opts = CompileOptions {
        node_name: expect.node_name.clone().unwrap_or_else(|| "host-a".into()),
        allow_localhost: expect.allow_localhost,
        ..Default::default()
    };
    let c = compile(&policies, &registry, &opts);
    check_flows(path, &c, &expect)
}

/// The policies, registry and expectations of one case, valid, or every problem.
fn load_case(path: &Path) -> Result<(PolicySet, RegistrySet, Expect), Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let mut pol_text = String::new();
    let mut reg_text = String::new();
    let mut expect: Option<Expect> = None;
    for doc in split_docs(&text) {
        let kind = kind_of(&doc);
        if kind == "Expect" {
            expect = Some(
                serde_norway::from_str(&doc)
                    .map_err(|e| vec![format!("{}: Expect: {e}", path.display())])?,
            );
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
    let mut add_pol =
        |file: &Path, t: &str, problems: &mut Vec<String>| match api::parse_policies(file, t) {
            Ok(ps) => policies.policies.extend(ps),
            Err(ps) => problems.extend(ps.iter().map(|p| p.to_string())),
        };
    if !pol_text.is_empty() {
        add_pol(path, &pol_text, &mut problems);
    }
    for inc in &expect.include_policies {
        let f = repo().join(inc);
        let t = std::fs::read_to_string(&f).map_err(|e| vec![format!("{}: {e}", f.display())])?;
        add_pol(&f, &t, &mut problems);
    }
    let mut add_reg =
        |file: &Path, t: &str, problems: &mut Vec<String>| match api::parse_registry(file, t) {
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
        let f = repo().join(inc);
        let t = std::fs::read_to_string(&f).map_err(|e| vec![format!("{}: {e}", f.display())])?;
        add_reg(&f, &t, &mut problems);
    }
    problems.extend(
        netpol::policy::registry::validate(&registry)
            .iter()
            .map(|p| p.to_string()),
    );
    if !problems.is_empty() {
        return Err(problems);
    }
    if registry.endpoints.is_empty() {
        return Err(vec![format!(
            "{}: the registry parsed to no endpoints (parser not merged?)",
            path.display()
        )]);
    }
    Ok((policies, registry, expect))
}

/// Check a case's flows against its compiled state.
fn check_flows(
    path: &Path,
    c: &netpol::policy::types::Compiled,
    expect: &Expect,
) -> Result<usize, Vec<String>> {
    let mut failures = Vec::new();
    for flow in &expect.flows {
        let f: Vec<&str> = flow.split_whitespace().collect();
        if f.len() != 4 {
            failures.push(format!(
                "{}: flow {flow:?}: expected `SRC DST PROTO/PORT allowed|denied`",
                path.display()
            ));
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
                failures.push(format!(
                    "{}: flow {flow:?}: {other:?} is not allowed|denied",
                    path.display()
                ));
                continue;
            }
        };
        match trace_str(c, f[0], f[1], p, port) {
            Ok(r) if r.verdict == want => {}
            Ok(r) => failures.push(format!(
                "{}: flow {flow:?}: got {:?}\n{r}",
                path.display(),
                r.verdict
            )),
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
    let dir = crate::harness::cmd::fixtures("conformance");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/conformance exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn conformance_cases() {
    let cases = cases();
    assert!(
        cases.len() >= 40,
        "at least 40 cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    let mut flows = 0;
    for c in &cases {
        match run_case(c) {
            Ok(n) => flows += n,
            Err(f) => failures.extend(f),
        }
    }
    eprintln!("{} conformance cases, {flows} flows checked", cases.len());
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// No conformance case warns: each is a policy a Cilium cluster reads as netpol
/// does (issue 18; `netpolctl check` would print any warning).
#[test]
fn no_case_warns() {
    let mut warnings = Vec::new();
    for c in cases() {
        let text = std::fs::read_to_string(&c).unwrap();
        let policies: String = split_docs(&text)
            .into_iter()
            .filter(|d| !REGISTRY_KINDS.contains(&kind_of(d).as_str()) && kind_of(d) != "Expect")
            .map(|d| format!("---\n{d}"))
            .collect();
        let loaded = api::parse_policies_warned(&c, &policies);
        warnings.extend(loaded.warnings.iter().map(ToString::to_string));
    }
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}

/// No conformance case gets a warning about what its policies do (issue 17,
/// `policy::lint`) but those its `Expect` names in `warnings` (`FIELD: [code]`):
/// the cases that show a construct doing nothing on purpose (a named port a
/// peer does not declare, an allow a deny shadows).
#[test]
fn no_case_lints() {
    let mut warnings = Vec::new();
    for c in cases() {
        let (policies, registry, expect) =
            load_case(&c).unwrap_or_else(|e| panic!("{}", e.join("\n")));
        let node = expect.node_name.clone().unwrap_or_else(|| "host-a".into());
        let opts = CompileOptions {
            node_name: node.clone(),
            allow_localhost: expect.allow_localhost,
            ..Default::default()
        };
        let compiled = compile(&policies, &registry, &opts);
        let found = netpol::policy::lint::lint(&policies, &registry, &compiled, &node);
        let got: Vec<String> = found
            .iter()
            .map(|w| format!("{}: [{}]", w.at.field.as_deref().unwrap_or(""), w.code))
            .collect();
        if got != expect.warnings {
            warnings.push(format!(
                "{}: expected warnings {:?}, got:\n{}",
                c.display(),
                expect.warnings,
                found.iter().map(|w| format!("  {w}\n")).collect::<String>()
            ));
        }
    }
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}

#[test]
fn splitting_and_kinds() {
    let docs = split_docs("# c\n---\nkind: A\n---\n\n---\nkind: \"B\"\nx: 1\n");
    assert_eq!(docs.len(), 2);
    assert_eq!(kind_of(&docs[1]), "B");
    assert_eq!(
        parse_proto_port("icmpv6/128").unwrap(),
        (proto::ICMPV6, 128)
    );
}

// ---------------------------------------------------------------- netpolctl trace / matrix

fn netpolctl(args: &[&str]) -> (i32, String, String) {
    let root = repo();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpolctl"))
        .current_dir(&root)
        .args(args)
        .output()
        .expect("run netpolctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SEED: &[&str] = &[
    "--policy-dir",
    "etc/examples/seed/netpol.d",
    "--endpoint-dir",
    "etc/examples/seed/endpoints.d",
];

const FE1_TO_BE: &[&str] = &["--from", "frontend-1", "--to", "backend"];

#[test]
fn cli_trace_allowed_denied_and_error_exit_codes() {
    let (code, out, _) = netpolctl(&[&["trace"], FE1_TO_BE, &["--port", "80"], SEED].concat());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("frontend-1 (default) -> backend (default) tcp/80: ALLOWED"),
        "{out}"
    );
    assert!(
        out.contains("ingress backend: allowed by CiliumNetworkPolicy default/frontend-to-backend"),
        "{out}"
    );
    assert!(out.contains("spec.ingress[0]"), "{out}");

    let mut args = vec![
        "trace",
        "--from",
        "frontend-1",
        "--to",
        "database",
        "--port",
        "5432",
    ];
    args.extend_from_slice(SEED);
    let (code, out, _) = netpolctl(&args);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DENIED") && out.contains("default deny"),
        "{out}"
    );

    let mut args = vec![
        "trace",
        "--from",
        "10.0.1.11",
        "--to",
        "10.0.1.21",
        "--port",
        "81",
        "--json",
    ];
    args.extend_from_slice(SEED);
    let (code, out, _) = netpolctl(&args);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["egress"]["verdict"], "denied");

    let (code, out, _) = netpolctl(&[&["trace"], FE1_TO_BE, &["--proto", "icmp"], SEED].concat());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("icmp/8"), "{out}");

    let mut args = vec![
        "trace", "--from", "nosuch", "--to", "backend", "--port", "80",
    ];
    args.extend_from_slice(SEED);
    let (code, _, err) = netpolctl(&args);
    assert_eq!(code, 2);
    assert!(err.contains("unknown endpoint \"nosuch\""), "{err}");
}

#[test]
fn cli_trace_invalid_files_exit_2_with_problems() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("netpol.d");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(
        pol.join("bad.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bad\nspec:\n  endpointSelector: {}\n  bogusField: 1\n",
    )
    .unwrap();
    let pol_s = pol.to_str().unwrap();
    let files = [
        "--policy-dir",
        pol_s,
        "--endpoint-dir",
        "etc/examples/seed/endpoints.d",
    ];
    let (code, out, err) = netpolctl(&[&["trace"], FE1_TO_BE, &["--port", "80"], &files].concat());
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("bad.yaml"), "{err}");
}

#[test]
fn cli_matrix() {
    let mut args = vec!["matrix", "--port", "80"];
    args.extend_from_slice(SEED);
    let (code, out, _) = netpolctl(&args);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("default/frontend-1") && out.contains('✓') && out.contains('✗'),
        "{out}"
    );
    let mut args = vec!["matrix", "--json"];
    args.extend_from_slice(SEED);
    let (code, out, _) = netpolctl(&args);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let flows = v["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 16);
    let f = flows
        .iter()
        .find(|f| f["from"] == "default/frontend-1" && f["to"] == "default/database")
        .unwrap();
    assert_eq!(f["verdict"], "denied");
    let f = flows
        .iter()
        .find(|f| f["from"] == "default/frontend-1" && f["to"] == "default/backend")
        .unwrap();
    assert_eq!(f["verdict"], "allowed");
}

// ---------------------------------------------------------------- golden dump

/// The compiled seed scenario, byte for byte: identity numbers, ipcache, entries
/// and rule references. Identity numbers are a hash of the label set, so a change
/// here means every deployed host would renumber. Regenerate deliberately with
/// `UPDATE_GOLDEN=1 cargo test --test offline conformance::golden`.
#[test]
fn golden_seed_dump() {
    let root = repo();
    let pols = api::load_policy_dir(&root.join("etc/examples/seed/netpol.d"))
        .expect("seed policies valid");
    let reg = api::load_endpoint_dirs(&[root.join("etc/examples/seed/endpoints.d")])
        .expect("seed registry valid");
    let c = compile(
        &pols,
        &reg,
        &CompileOptions {
            node_name: "host-a".into(),
            ..Default::default()
        },
    );
    let prefix = format!("{}/", root.display());
    let dump = c.dump().replace(&prefix, "");
    let golden = root.join("tests/fixtures/conformance/golden/seed.dump");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &dump).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (UPDATE_GOLDEN=1 to create)");
    assert_eq!(dump, want, "compiled seed state changed");
}
