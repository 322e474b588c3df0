//! Parser and validator tests: valid fixtures parse into the expected model,
//! every invalid fixture gives exactly the messages in its `.expected` file,
//! directory rules, and `netpolctl check` end to end.

use std::path::{Path, PathBuf};

use std::collections::BTreeSet;
use std::process::Command;

use netpol::api::model::*;
use netpol::api::{self, Problem};

use crate::harness::cmd::repo;

fn fixtures() -> PathBuf {
    crate::harness::cmd::fixtures("parse")
}

/// `NETPOL_DUMP=file cargo test --test offline parse::dump -- --ignored --nocapture`
#[test]
#[ignore]
fn dump() {
    let f = std::env::var("NETPOL_DUMP").unwrap();
    let text = std::fs::read_to_string(&f).unwrap();
    match api::parse_policies(Path::new(&f), &text) {
        Ok(p) => println!("{}", serde_json::to_string_pretty(&p).unwrap()),
        Err(e) => {
            for p in e {
                println!("{p}");
            }
        }
    }
}

/// `NETPOL_DUMP_REG=file cargo test --test offline parse::dump_registry -- --ignored --nocapture`
#[test]
#[ignore]
fn dump_registry() {
    let f = std::env::var("NETPOL_DUMP_REG").unwrap();
    let text = std::fs::read_to_string(&f).unwrap();
    match api::parse_registry(Path::new(&f), &text) {
        Ok(p) => println!("{}", serde_json::to_string_pretty(&p).unwrap()),
        Err(e) => {
            for p in e {
                println!("{p}");
            }
        }
    }
}

// ---------------------------------------------------------------- helpers

fn lines(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn icmp_type(family: Family, ty: u8) -> IcmpType {
    IcmpType { family, ty }
}

fn any(key: &str) -> LabelKey {
    LabelKey {
        source: None,
        key: key.into(),
    }
}

fn k8s(key: &str) -> LabelKey {
    LabelKey {
        source: Some("k8s".into()),
        key: key.into(),
    }
}

fn req(key: LabelKey, op: Op, values: &[&str]) -> Requirement {
    Requirement {
        key,
        op,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn sel(reqs: Vec<Requirement>) -> Selector {
    Selector { requirements: reqs }
}

fn ns_in(ns: &str) -> Requirement {
    req(k8s("io.kubernetes.pod.namespace"), Op::In, &[ns])
}

fn ns_exists() -> Requirement {
    req(k8s("io.kubernetes.pod.namespace"), Op::Exists, &[])
}

fn port(n: u16, end: Option<u16>, proto: Proto) -> PortProto {
    PortProto {
        port: PortSpec::Number(n),
        end_port: end,
        proto,
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn policies(file: &str) -> Vec<Policy> {
    let path = fixtures().join("valid/policies").join(file);
    match api::parse_policies(&path, &read(&path)) {
        Ok(p) => p.into_iter().map(std::sync::Arc::unwrap_or_clone).collect(),
        Err(e) => panic!("{file} should be valid:\n{}", lines(&e).join("\n")),
    }
}

/// The DHCP client policy docs/policy.md shows is valid and says what the
/// text says: egress to the broadcast and the server on UDP 67, to DHCPv6
/// servers on UDP 547, ingress from the server on UDP 68.
#[test]
fn the_documented_dhcp_client_policy_is_valid() {
    let path = repo().join("docs/policy.md");
    let doc = read(&path);
    let start = doc
        .find("### DHCP and link-local traffic")
        .expect("the section");
    let block = doc[start..]
        .split("```yaml")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml block");
    let ps = match api::parse_policies(&path, block) {
        Ok(p) => p,
        Err(e) => panic!(
            "the DHCP example should be valid:\n{}",
            lines(&e).join("\n")
        ),
    };
    assert_eq!(ps.len(), 1);
    let text = format!("{:?}", ps[0]);
    for want in ["255.255.255.255/32", "192.0.2.1/32", "ff02::1:2/128"] {
        assert!(text.contains(want), "{want} in {text}");
    }
}

fn named<'a>(ps: &'a [Policy], name: &str) -> &'a Policy {
    ps.iter()
        .find(|p| p.origin.name == name)
        .unwrap_or_else(|| panic!("no policy {name}"))
}

// ---------------------------------------------------------------- invalid fixtures

/// Every file in `invalid/<sub>/` fails with exactly the lines of `<stem>.expected`.
/// Paths are the bare file name. `NETPOL_BLESS=1` rewrites the expected files.
fn check_invalid(sub: &str, parse: fn(&Path, &str) -> Result<(), Vec<Problem>>) {
    let dir = fixtures().join("invalid").join(sub);
    let bless = std::env::var_os("NETPOL_BLESS").is_some();
    let mut failures = Vec::new();
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".expected") {
            let stem = name.trim_end_matches(".expected");
            assert!(
                ["yaml", "yml", "json"]
                    .iter()
                    .any(|e| dir.join(format!("{stem}.{e}")).exists()),
                "{name} has no fixture"
            );
            continue;
        }
        n += 1;
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let expected_path = dir.join(format!("{stem}.expected"));
        let got = match parse(Path::new(&name), &read(&path)) {
            Ok(()) => vec!["<valid>".to_string()],
            Err(p) => lines(&p),
        };
        let got_text = got.join("\n") + "\n";
        if bless {
            std::fs::write(&expected_path, &got_text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing (run with NETPOL_BLESS=1 and review it)",
                expected_path.display()
            )
        });
        let want: Vec<&str> = want.lines().collect();
        if want != got.iter().map(String::as_str).collect::<Vec<_>>() {
            failures.push(format!(
                "{sub}/{name}:\n--- expected\n{}\n--- got\n{}",
                want.join("\n"),
                got.join("\n")
            ));
        }
        assert!(
            !got.contains(&"<valid>".to_string()),
            "{sub}/{name} is valid but lies among invalid fixtures"
        );
    }
    assert!(n > 0);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn invalid_policy_fixtures() {
    check_invalid("policy", |f, t| api::parse_policies(f, t).map(|_| ()));
}

#[test]
fn invalid_registry_fixtures() {
    check_invalid("registry", |f, t| api::parse_registry(f, t).map(|_| ()));
}

/// Every file in `warn/policy/` is valid and gives exactly the warnings of
/// `<stem>.expected` (an empty file: none). `NETPOL_BLESS=1` rewrites them.
/// Every warning code has a fixture.
#[test]
fn warning_fixtures() {
    let dir = fixtures().join("warn/policy");
    let bless = std::env::var_os("NETPOL_BLESS").is_some();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "expected"))
        .collect();
    entries.sort();
    assert!(entries.len() >= 5, "{entries:?}");
    let mut failures = Vec::new();
    let mut codes = BTreeSet::new();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let loaded = api::parse_policies_warned(Path::new(&name), &read(&path));
        if let Err(e) = &loaded.result {
            failures.push(format!("{name} is invalid:\n{}", lines(e).join("\n")));
            continue;
        }
        codes.extend(loaded.warnings.iter().map(|w| w.code));
        let got: String = loaded.warnings.iter().map(|w| format!("{w}\n")).collect();
        let expected = path.with_extension("expected");
        if bless {
            std::fs::write(&expected, &got).unwrap();
        } else if read(&expected) != got {
            failures.push(format!(
                "{name}:\n--- expected\n{}--- got\n{got}",
                read(&expected)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let all: BTreeSet<_> = api::WarningCode::ALL
        .iter()
        .copied()
        .filter(|c| !LINT_ONLY.contains(c))
        .collect();
    assert_eq!(codes, all, "every warning code needs a fixture (those only the registry shows, in tests/fixtures/lint)");
}

/// `netpolctl check --policy-dir POL --endpoint-dir REG`.
fn check_args(pol: &Path, reg: &Path) -> Vec<String> {
    [
        "check",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// The warning codes only a registry shows (`policy::lint`): their fixtures
/// are under `tests/fixtures/lint`, checked by [`lint_fixtures`].
const LINT_ONLY: &[api::WarningCode] = &[
    api::WarningCode::SelectsNothing,
    api::WarningCode::PeerMatchesNothing,
    api::WarningCode::NamedPortUndeclared,
    api::WarningCode::ShadowedAllow,
    api::WarningCode::CidrCoversEndpoints,
];

/// Every `tests/fixtures/lint/<case>/netpol.d`, checked by `netpolctl check`
/// against `tests/fixtures/lint/endpoints.d`, prints exactly `<case>/expected`
/// (the case directory written `DIR`); `NETPOL_BLESS=1` rewrites them. Every
/// code only a registry shows has a case, and `--json` lists the warnings
/// apart from the problems.
#[test]
fn lint_fixtures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lint");
    let registry = root.join("endpoints.d");
    let bless = std::env::var_os("NETPOL_BLESS").is_some();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("netpol.d").is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() > LINT_ONLY.len(),
        "a case per code and a quiet one: {cases:?}"
    );
    let (mut failures, mut codes) = (Vec::new(), BTreeSet::new());
    for case in cases {
        let args = check_args(&case.join("netpol.d"), &registry);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = netpolctl(&args);
        let got = out.replace(&case.display().to_string(), "DIR");
        let expected = case.join("expected");
        if bless {
            std::fs::write(&expected, &got).unwrap();
        } else if read(&expected) != got {
            failures.push(format!(
                "{}:\n--- expected\n{}--- got\n{got}{err}",
                case.display(),
                read(&expected)
            ));
        }
        assert_eq!(code, 0, "warnings never make a set invalid: {out}{err}");
        let json: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let v: serde_json::Value = serde_json::from_str(&netpolctl(&json).1).unwrap();
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
        for w in v["warnings"].as_array().unwrap() {
            let c = api::WarningCode::ALL
                .iter()
                .find(|c| w["code"] == c.code())
                .unwrap_or_else(|| panic!("unknown code in {w}"));
            codes.insert(*c);
        }
        let strict: Vec<&str> = args.iter().copied().chain(["--strict"]).collect();
        let want = if v["warnings"].as_array().unwrap().is_empty() {
            0
        } else {
            1
        };
        assert_eq!(netpolctl(&strict).0, want, "{}: --strict", case.display());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let lint: BTreeSet<_> = LINT_ONLY.iter().copied().collect();
    assert_eq!(
        codes, lint,
        "every lint code needs a case, and only those warn"
    );
}

/// docs/policy.md lists every deliberate difference from a Cilium cluster: the
/// lenient table names exactly the warning codes about how a file is written,
/// the strict one a fixture per row whose expected messages quote the row's
/// excerpt; and every warning about what a policy does, with its fixture.
#[test]
fn documented_differences_match_the_code() {
    let root = repo();
    let doc = read(&root.join("docs/policy.md"));
    let rows = |heading: &str| -> Vec<Vec<String>> {
        let start = doc
            .find(heading)
            .unwrap_or_else(|| panic!("docs/policy.md has no {heading:?}"));
        doc[start..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().trim_matches('`').to_string())
                    .collect()
            })
            .collect()
    };
    let codes = |of: &mut dyn Iterator<Item = &api::WarningCode>| -> Vec<String> {
        of.map(|c| c.code().to_string()).collect()
    };
    let documented: Vec<String> = rows("### Accepted with a warning")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let effect = api::WarningCode::POLICY_EFFECT;
    assert_eq!(
        documented,
        codes(&mut api::WarningCode::ALL.iter().filter(|c| !effect.contains(c)))
    );
    // Each warning about what a policy does, in its own table, with an example
    // that is a fixture of the code.
    let effects = rows("## Warnings about what a policy does");
    assert_eq!(
        effects.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        codes(&mut effect.iter())
    );
    let mut printed = String::new();
    for r in &effects {
        // | code | warns about | example (a fixture) | what to do |
        let fixture = root.join("tests/fixtures").join(&r[2]);
        assert!(fixture.exists(), "{} does not exist", fixture.display());
        let expected = match fixture.parent().and_then(Path::parent) {
            Some(case) if r[2].starts_with("lint/") => case.join("expected"),
            _ => fixture.with_extension("expected"),
        };
        printed.push_str(&read(&expected).replace("DIR/netpol.d/", ""));
    }
    // The example lines are what the fixtures print.
    let start = doc.find("What each prints").expect("examples");
    let block = doc[start..].split("```").nth(1).expect("a code block");
    for line in block.lines().filter(|l| !l.is_empty()) {
        assert!(
            printed.contains(line),
            "docs/policy.md shows a warning no fixture prints: {line}"
        );
    }
    let strict = rows("### Refused although a Cilium cluster accepts it");
    assert!(strict.len() >= 5, "{strict:?}");
    for r in strict {
        // | fixture | excerpt of its expected message | what | why |
        let (fixture, excerpt) = (&r[0], &r[1]);
        let file = root.join("tests/fixtures").join(fixture);
        let expected = match fixture.rsplit_once('/') {
            Some((_, f)) if f.contains('.') && fixture.starts_with("hostile/") => {
                PathBuf::from(format!("{}.expected", file.display()))
            }
            _ => file.with_extension("expected"),
        };
        assert!(file.exists(), "{fixture} does not exist");
        assert!(
            read(&expected).contains(excerpt.as_str()),
            "{} does not say {excerpt:?}",
            expected.display()
        );
    }
}

#[test]
fn message_format_matches_the_contract() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, egress: [{}]}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\nspec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports:\n            - port: \"8.0\"\n";
    let e = api::parse_policies(Path::new("/etc/netpol.d/web.yaml"), text).unwrap_err();
    assert_eq!(
        lines(&e),
        vec!["/etc/netpol.d/web.yaml:15:21: document 2 (CiliumNetworkPolicy default/web): spec.ingress[0].toPorts[0].ports[0].port: \"8.0\" is not a port number or name"]
    );
    let p = &e[0];
    assert_eq!(
        (p.line, p.column, p.document),
        (Some(15), Some(21), Some(2))
    );
    assert_eq!(p.object.as_deref(), Some("CiliumNetworkPolicy default/web"));
    assert_eq!(
        p.field.as_deref(),
        Some("spec.ingress[0].toPorts[0].ports[0].port")
    );
}

// ---------------------------------------------------------------- valid fixtures

#[test]
fn seed_examples_parse() {
    let root = repo().join("etc/examples/seed");
    let set = api::load_policy_dir(&root.join("netpol.d"))
        .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    assert_eq!(set.policies.len(), 2);
    // sorted file order: frontend-egress-control, then frontend-to-backend
    assert_eq!(set.policies[0].origin.name, "frontend-egress-control");
    let p = &set.policies[1];
    assert_eq!(p.origin.name, "frontend-to-backend");
    assert_eq!(p.origin.namespace.as_deref(), Some("default"));
    assert_eq!(p.kind, PolicyKind::CiliumNetworkPolicy);
    let r = &p.rules[0];
    assert_eq!(
        r.subject,
        Subject::Endpoints(sel(vec![
            req(any("app"), Op::In, &["backend"]),
            ns_in("default")
        ]))
    );
    assert_eq!(r.ingress.len(), 1);
    assert_eq!(r.ingress[0].path, "spec.ingress[0]");
    assert_eq!(
        r.ingress[0].peers,
        Peers::List(vec![Peer::Endpoints(sel(vec![
            req(any("app"), Op::In, &["frontend"]),
            ns_in("default")
        ]))])
    );
    assert_eq!(r.ingress[0].l4, L4::Ports(vec![port(80, None, Proto::Tcp)]));
    assert!(r.egress.is_empty() && r.default_deny_ingress.is_none() && !r.isolate_ingress);

    let reg = api::load_endpoint_dirs(&[root.join("endpoints.d")])
        .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    assert_eq!(reg.endpoints.len(), 4);
    let be = reg.endpoints.iter().find(|e| e.name == "backend").unwrap();
    assert_eq!(be.kind, EndpointKind::Workload);
    assert_eq!(be.namespace.as_deref(), Some("default"));
    assert_eq!(
        be.labels,
        vec![Label {
            source: "k8s".into(),
            key: "app".into(),
            value: "backend".into()
        }]
    );
    assert_eq!(be.interface, Some(Interface::Name("veth-be".into())));
    assert_eq!(
        be.addresses,
        vec![
            "10.0.1.21".parse::<std::net::IpAddr>().unwrap(),
            "fd00:1::21".parse().unwrap()
        ]
    );
    assert_eq!(
        be.ports,
        vec![NamedPort {
            name: "http".into(),
            port: 80,
            proto: Proto::Tcp
        }]
    );
    assert_eq!(be.node, None);
    assert!(!be.audit);
}

#[test]
fn every_cilium_construct() {
    let ps = policies("cilium-constructs.yaml");
    assert_eq!(ps.len(), 1);
    let p = &ps[0];
    assert_eq!(p.origin.namespace.as_deref(), Some("prod"));
    let r = &p.rules[0];
    assert_eq!(
        r.subject,
        Subject::Endpoints(sel(vec![
            req(any("app"), Op::In, &["web"]),
            req(k8s("tier"), Op::In, &["frontend"]),
            req(any("env"), Op::In, &["prod", "staging"]),
            req(any("canary"), Op::NotIn, &["true"]),
            req(k8s("owner"), Op::Exists, &[]),
            req(any("legacy"), Op::DoesNotExist, &[]),
            ns_in("prod"),
        ]))
    );
    assert_eq!(
        (r.default_deny_ingress, r.default_deny_egress),
        (Some(true), Some(false))
    );
    assert_eq!(r.ingress.len(), 8);
    // Peer scoping: plain selectors get the namespace; namespace, namespace-label
    // and reserved selectors are left alone.
    assert_eq!(
        r.ingress[0].peers,
        Peers::List(vec![
            Peer::Endpoints(sel(vec![
                req(any("app"), Op::In, &["client"]),
                ns_in("prod")
            ])),
            Peer::Endpoints(sel(vec![
                req(any("app"), Op::In, &["prometheus"]),
                req(any("io.kubernetes.pod.namespace"), Op::In, &["monitoring"]),
            ])),
            Peer::Endpoints(sel(vec![req(
                any("io.cilium.k8s.namespace.labels.team"),
                Op::In,
                &["payments"]
            )])),
            Peer::Endpoints(sel(vec![req(
                LabelKey {
                    source: Some("reserved".into()),
                    key: "host".into()
                },
                Op::In,
                &[""]
            )])),
        ])
    );
    assert_eq!(
        r.ingress[0].l4,
        L4::Ports(vec![
            port(80, None, Proto::Tcp),
            port(8080, Some(8090), Proto::Tcp),
            PortProto {
                port: PortSpec::Named("http".into()),
                end_port: None,
                proto: Proto::Tcp
            },
            port(53, None, Proto::Any),
            port(0, None, Proto::Udp),
            port(5000, None, Proto::Sctp),
            port(443, None, Proto::Any),
        ])
    );
    let cidr = |s: &str| Peer::Cidr {
        net: net(s),
        except: vec![],
        match_endpoints: false,
    };
    assert_eq!(
        r.ingress[1].peers,
        Peers::List(vec![
            cidr("192.0.2.0/24"),
            cidr("198.51.100.7/32"),
            cidr("2001:db8::/32")
        ])
    );
    assert_eq!(r.ingress[1].l4, L4::Any);
    assert_eq!(
        r.ingress[2].peers,
        Peers::List(vec![
            Peer::Cidr {
                net: net("10.0.0.0/8"),
                except: vec![net("10.96.0.0/12"), net("10.1.2.3/32")],
                match_endpoints: false
            },
            cidr("fd00::/8"),
        ])
    );
    let Peers::List(ents) = &r.ingress[3].peers else {
        panic!()
    };
    assert_eq!(ents.len(), 13);
    assert!(
        ents.contains(&Peer::Entity(Entity::KubeApiserver))
            && ents.contains(&Peer::Entity(Entity::WorldIpv6))
    );
    assert_eq!(r.ingress[4].peers, Peers::All);
    assert_eq!(
        r.ingress[4].l4,
        L4::Icmps(vec![
            icmp_type(Family::V4, 8),
            icmp_type(Family::V6, 128),
            icmp_type(Family::V4, 0),
        ])
    );
    // toPorts without a peer: every peer.
    assert_eq!(r.ingress[5].peers, Peers::All);
    assert_eq!(
        r.ingress[5].l4,
        L4::Ports(vec![port(9090, None, Proto::Tcp)])
    );
    // `{}`: no peer, no port: allows nothing (but the direction is enforced).
    assert_eq!(
        (&r.ingress[6].peers, &r.ingress[6].l4),
        (&Peers::List(vec![]), &L4::Any)
    );
    // `fromEndpoints: []`: selects nothing.
    assert_eq!(r.ingress[7].peers, Peers::List(vec![]));
    assert_eq!(r.ingress_deny.len(), 1);
    assert_eq!(
        r.ingress_deny[0].peers,
        Peers::List(vec![cidr("203.0.113.0/24")])
    );
    assert_eq!(
        r.ingress_deny[0].l4,
        L4::Ports(vec![port(22, None, Proto::Tcp)])
    );
    assert_eq!(
        r.egress[0].peers,
        Peers::List(vec![Peer::Endpoints(sel(vec![ns_in("prod")]))])
    );
    assert_eq!(
        r.egress[1].peers,
        Peers::List(vec![Peer::Cidr {
            net: net("0.0.0.0/0"),
            except: vec![net("169.254.0.0/16")],
            match_endpoints: false
        }])
    );
    assert_eq!(r.egress[2].l4, L4::Icmps(vec![icmp_type(Family::V4, 3)]));
    assert_eq!(
        r.egress_deny[0].peers,
        Peers::List(vec![Peer::Endpoints(sel(vec![
            req(any("app"), Op::In, &["database"]),
            ns_in("prod")
        ]))])
    );
}

#[test]
fn clusterwide_scoping() {
    let ps = policies("clusterwide.yaml");
    assert_eq!(ps.len(), 3);
    let lockdown = named(&ps, "external-lockdown");
    assert_eq!(lockdown.kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(lockdown.origin.namespace, None);
    assert_eq!(lockdown.rules[0].subject, Subject::Endpoints(sel(vec![])));
    assert_eq!(
        lockdown.rules[0].ingress_deny[0].peers,
        Peers::List(vec![Peer::Entity(Entity::World)])
    );
    let host = named(&ps, "lock-down-ingress-worker-node");
    assert_eq!(
        host.rules[0].subject,
        Subject::Nodes(sel(vec![req(any("type"), Op::In, &["ingress-worker"])]))
    );
    assert_eq!(host.rules[0].ingress[1].peers, Peers::All);
    let w = named(&ps, "wildcard-from-endpoints");
    assert_eq!(w.rules.len(), 3);
    assert_eq!(w.rules[1].path, "specs[1]");
    assert_eq!(w.rules[0].ingress[0].path, "specs[0].ingress[0]");
    // `{}` in a CCNP: every endpoint that has a namespace.
    assert_eq!(
        w.rules[0].ingress[0].peers,
        Peers::List(vec![Peer::Endpoints(sel(vec![ns_exists()]))])
    );
    // subject selects reserved:init: no namespace requirement on peers.
    assert_eq!(
        w.rules[1].egress[0].peers,
        Peers::List(vec![Peer::Endpoints(sel(vec![req(
            any("app"),
            Op::In,
            &["dns"]
        )]))])
    );
    // In a CCNP namespace labels do not exempt; a namespace key does.
    assert_eq!(
        w.rules[2].egress[0].peers,
        Peers::List(vec![
            Peer::Endpoints(sel(vec![
                req(any("io.cilium.k8s.namespace.labels.team"), Op::In, &["a"]),
                ns_exists()
            ])),
            Peer::Endpoints(sel(vec![req(
                k8s("io.kubernetes.pod.namespace"),
                Op::In,
                &["kube-system"]
            )])),
        ])
    );
}

#[test]
fn cilium_examples() {
    let ps = policies("cilium-examples.yaml");
    assert_eq!(ps.len(), 6);
    assert_eq!(ps[1].origin.doc, 1);
    let multi = named(&ps, "l4-rules");
    assert_eq!(multi.rules[0].ingress[1].peers, Peers::All);
    let deny = named(&ps, "deny-all-egress");
    assert_eq!(
        deny.rules[0].egress,
        vec![RuleItem {
            path: "spec.egress[0]".into(),
            pos: Some((41, 5)),
            peers: Peers::List(vec![]),
            l4: L4::Any,
            dns: vec![],
        }]
    );
    let range = named(&ps, "l4-port-range-rule");
    assert_eq!(
        range.rules[0].egress[0].l4,
        L4::Ports(vec![port(80, Some(444), Proto::Tcp)])
    );
    let icmp = named(&ps, "icmp-rule");
    assert_eq!(
        icmp.rules[0].egress[0].l4,
        L4::Icmps(vec![icmp_type(Family::V4, 8), icmp_type(Family::V6, 128)])
    );
}

#[test]
fn kubernetes_network_policies() {
    let ps = policies("k8s-docs.yaml");
    assert_eq!(ps.len(), 8);
    let t = named(&ps, "test-network-policy");
    assert_eq!(t.kind, PolicyKind::NetworkPolicy);
    let r = &t.rules[0];
    assert_eq!(
        r.subject,
        Subject::Endpoints(sel(vec![
            req(k8s("role"), Op::In, &["db"]),
            ns_in("default")
        ]))
    );
    assert!(r.isolate_ingress && r.isolate_egress);
    assert_eq!(
        r.ingress[0].peers,
        Peers::List(vec![
            Peer::Cidr {
                net: net("172.17.0.0/16"),
                except: vec![net("172.17.1.0/24")],
                match_endpoints: true
            },
            Peer::Endpoints(sel(vec![req(
                k8s("io.cilium.k8s.namespace.labels.project"),
                Op::In,
                &["myproject"]
            )])),
            Peer::Endpoints(sel(vec![
                req(k8s("role"), Op::In, &["frontend"]),
                ns_in("default")
            ])),
        ])
    );
    assert_eq!(
        r.ingress[0].l4,
        L4::Ports(vec![port(6379, None, Proto::Tcp)])
    );
    assert_eq!(
        r.egress[0].peers,
        Peers::List(vec![Peer::Cidr {
            net: net("10.0.0.0/24"),
            except: vec![],
            match_endpoints: true
        }])
    );
    assert_eq!(
        r.egress[0].l4,
        L4::Ports(vec![port(5978, None, Proto::Tcp)])
    );

    let r = &named(&ps, "default-deny-ingress").rules[0];
    assert!(r.isolate_ingress && !r.isolate_egress && r.ingress.is_empty());
    assert_eq!(r.subject, Subject::Endpoints(sel(vec![ns_in("default")])));
    let r = &named(&ps, "allow-all-ingress").rules[0];
    assert_eq!(r.ingress[0].peers, Peers::All);
    assert_eq!(r.ingress[0].l4, L4::Any);
    let r = &named(&ps, "default-deny-egress").rules[0];
    assert!(!r.isolate_ingress && r.isolate_egress && r.egress.is_empty());
    let r = &named(&ps, "allow-all-egress").rules[0];
    assert_eq!(
        (r.egress[0].peers.clone(), r.isolate_egress),
        (Peers::All, true)
    );
    let r = &named(&ps, "default-deny-all").rules[0];
    assert!(r.isolate_ingress && r.isolate_egress);
    let r = &named(&ps, "multi-port-egress").rules[0];
    assert_eq!(
        r.egress[0].l4,
        L4::Ports(vec![port(32000, Some(32768), Proto::Tcp)])
    );
    let p = named(&ps, "ns-and-pod");
    assert_eq!(p.origin.namespace.as_deref(), Some("prod"));
    let r = &p.rules[0];
    assert!(r.isolate_ingress && !r.isolate_egress);
    assert_eq!(
        r.ingress[0].peers,
        Peers::List(vec![
            Peer::Endpoints(sel(vec![
                req(
                    k8s("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"),
                    Op::In,
                    &["monitoring"]
                ),
                req(k8s("app"), Op::In, &["prometheus"]),
            ])),
            Peer::Endpoints(sel(vec![ns_exists()])),
        ])
    );
    assert_eq!(
        r.ingress[0].l4,
        L4::Ports(vec![
            PortProto {
                port: PortSpec::Named("metrics".into()),
                end_port: None,
                proto: Proto::Tcp
            },
            port(0, None, Proto::Udp),
        ])
    );
}

#[test]
fn json_policy() {
    let ps = policies("policy.json");
    assert_eq!(ps[0].origin.name, "json-policy");
    assert_eq!(
        ps[0].rules[0].ingress[0].l4,
        L4::Ports(vec![port(80, None, Proto::Tcp)])
    );
}

#[test]
fn registry_kinds() {
    let dir = fixtures().join("valid/registry");
    let reg =
        api::load_endpoint_dirs(&[dir]).unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    assert_eq!(
        (reg.endpoints.len(), reg.nodes.len(), reg.namespaces.len()),
        (4, 1, 1)
    );
    let fe = &reg.endpoints[0];
    assert_eq!(fe.namespace.as_deref(), Some("shop"));
    assert_eq!(fe.node.as_deref(), Some("host-a"));
    assert!(fe.audit);
    let label = |s: &str, k: &str, v: &str| Label {
        source: s.into(),
        key: k.into(),
        value: v.into(),
    };
    assert_eq!(
        fe.labels,
        vec![
            label("k8s", "team", "a"),
            label("k8s", "app", "frontend"),
            label("container", "image", "nginx"),
            label("k8s", "tier", "web"),
            label("unspec", "legacy", "yes"),
        ]
    );
    assert_eq!(
        fe.ports,
        vec![
            NamedPort {
                name: "http".into(),
                port: 80,
                proto: Proto::Tcp
            },
            NamedPort {
                name: "dns".into(),
                port: 53,
                proto: Proto::Udp
            },
            NamedPort {
                name: "metrics".into(),
                port: 9090,
                proto: Proto::Tcp
            },
        ]
    );
    let remote = &reg.endpoints[1];
    assert_eq!(
        (remote.namespace.as_deref(), &remote.interface),
        (Some("default"), &None)
    );
    assert_eq!(reg.endpoints[2].interface, Some(Interface::Auto));
    let host = &reg.endpoints[3];
    assert_eq!(
        (host.kind, host.namespace.as_deref()),
        (EndpointKind::Host, None)
    );
    assert_eq!(host.origin.kind, "HostEndpoint");
    assert_eq!(reg.nodes[0].name, "host-b");
    assert_eq!(
        reg.namespaces[0].labels,
        vec![label("k8s", "team", "payments")]
    );
}

// ---------------------------------------------------------------- directories

// `egress: [...]`: Cilium refuses a rule with no direction at all.
const CNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: NAME\nspec:\n  endpointSelector: {}\n  egress: [{toEntities: [all]}]\n";

fn cnp(name: &str) -> String {
    CNP.replace("NAME", name)
}

/// Problems with the temporary directory replaced by `DIR`.
fn dir_lines(dir: &Path, problems: &[Problem]) -> Vec<String> {
    let prefix = dir.display().to_string();
    lines(problems)
        .into_iter()
        .map(|l| l.replace(&prefix, "DIR"))
        .collect()
}

#[test]
fn directory_rules_ignore_dotfiles_and_editor_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("b.yaml"), cnp("b")).unwrap();
    std::fs::write(d.join("a.yml"), cnp("a")).unwrap();
    std::fs::write(d.join("c.json"), r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "c"}, "spec": {"endpointSelector": {}, "egress": [{}]}}"#).unwrap();
    // BOM is dropped.
    std::fs::write(d.join("d.yaml"), format!("\u{feff}{}", cnp("d"))).unwrap();
    // Empty documents and comment-only files are fine.
    std::fs::write(d.join("e.yaml"), "# nothing here\n---\n---\n").unwrap();
    for junk in [
        ".hidden.yaml",
        "b.yaml~",
        "#b.yaml#",
        ".b.yaml.swp",
        "b.yaml.swp",
        "b.yaml.tmp",
        "README",
        "notes.txt",
    ] {
        std::fs::write(d.join(junk), "this: is: not: yaml: [").unwrap();
    }
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/x.yaml"), "broken: [").unwrap();
    // A symlink to a regular file is followed.
    std::fs::write(tmp.path().join("target.txt"), cnp("linked")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("target.txt"), d.join("f.yaml")).unwrap();
    let set = api::load_policy_dir(d).unwrap_or_else(|e| panic!("{}", dir_lines(d, &e).join("\n")));
    let names: Vec<_> = set
        .policies
        .iter()
        .map(|p| p.origin.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d", "linked"]);
}

#[test]
fn empty_and_missing_directories() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        api::load_policy_dir(tmp.path()).unwrap(),
        PolicySet::default()
    );
    assert_eq!(
        api::load_endpoint_dirs(&[tmp.path().to_path_buf()]).unwrap(),
        RegistrySet::default()
    );
    let missing = tmp.path().join("nope");
    let e = api::load_policy_dir(&missing).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        ["DIR/nope: policy directory does not exist"]
    );
    let e = api::load_endpoint_dirs(&[missing]).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        ["DIR/nope: endpoint directory does not exist"]
    );
    std::fs::write(tmp.path().join("file"), "").unwrap();
    let e = api::load_policy_dir(&tmp.path().join("file")).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        ["DIR/file: policy directory is not a directory"]
    );
}

#[test]
fn oversize_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = cnp("big");
    text.push_str(&format!("# {}\n", "x".repeat(api::MAX_FILE_SIZE as usize)));
    std::fs::write(tmp.path().join("big.yaml"), &text).unwrap();
    let e = api::load_policy_dir(tmp.path()).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        [format!(
            "DIR/big.yaml: file is {} bytes; the limit is 4194304 bytes (4 MiB)",
            text.len()
        )]
    );
}

#[test]
fn special_files_are_refused_without_being_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A FIFO nobody writes to: opening it for reading would block forever.
    nix::unistd::mkfifo(
        &d.join("pipe.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", d.join("dangling.yaml")).unwrap();
    std::fs::create_dir(d.join("dir.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/null", d.join("null.yaml")).unwrap();
    let e = api::load_policy_dir(d).unwrap_err();
    assert_eq!(
        dir_lines(d, &e),
        [
            "DIR/dangling.yaml: symlink target cannot be read: No such file or directory (os error 2)",
            "DIR/dir.yaml: a directory is not read: only regular files are policy or registry files",
            "DIR/null.yaml: a device is not read: only regular files are policy or registry files",
            "DIR/pipe.yaml: a FIFO is not read: only regular files are policy or registry files",
        ]
    );
}

#[test]
fn invalid_utf8_is_refused_with_its_position() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = cnp("x").into_bytes();
    bytes.extend_from_slice(b"# caf\xe9\n");
    std::fs::write(tmp.path().join("latin1.yaml"), bytes).unwrap();
    let e = api::load_policy_dir(tmp.path()).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        ["DIR/latin1.yaml:8:6: file is not valid UTF-8"]
    );
}

#[test]
fn all_or_nothing_with_every_problem_of_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("a.yaml"), cnp("web")).unwrap();
    std::fs::write(d.join("b.yaml"), cnp("web")).unwrap();
    std::fs::write(
        d.join("c.yaml"),
        cnp("c").replace("{}", "{matchLabels: {a: \"b c\"}}"),
    )
    .unwrap();
    std::fs::write(d.join("d.yaml"), cnp("d")).unwrap();
    let e = api::load_policy_dir(d).unwrap_err();
    assert_eq!(
        dir_lines(d, &e),
        [
            "DIR/b.yaml:4:9: document 1 (CiliumNetworkPolicy default/web): metadata.name: CiliumNetworkPolicy default/web is already defined at DIR/a.yaml:4:9; a policy name must be unique per kind and namespace",
            "DIR/c.yaml:6:39: document 1 (CiliumNetworkPolicy default/c): spec.endpointSelector.matchLabels.a: \"b c\" is not a valid label value: it must be empty or consist of letters, digits, '-', '_' or '.', and start and end with a letter or digit",
        ]
    );
}

#[test]
fn registry_conflicts_across_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("one"), tmp.path().join("two"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let ep = |name: &str, iface: &str, addr: &str| {
        format!("apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {name}\nspec:\n  interface: {iface}\n  addresses: [{addr}]\n")
    };
    std::fs::write(d1.join("a.yaml"), ep("a", "veth-a", "10.0.0.1")).unwrap();
    std::fs::write(d2.join("b.yaml"), ep("b", "veth-b", "10.0.0.1")).unwrap();
    let e = api::load_endpoint_dirs(&[d1.clone(), d2.clone()]).unwrap_err();
    assert_eq!(
        dir_lines(tmp.path(), &e),
        ["DIR/two/b.yaml:7:15: document 1 (Endpoint default/b): spec.addresses[0]: address 10.0.0.1 is already claimed by Endpoint default/a at DIR/one/a.yaml:7:15; an address belongs to one endpoint"]
    );
    std::fs::write(d2.join("b.yaml"), ep("b", "veth-b", "10.0.0.2")).unwrap();
    let reg = api::load_endpoint_dirs(&[d1, d2]).unwrap();
    assert_eq!(reg.endpoints.len(), 2);
}

// ---------------------------------------------------------------- netpolctl check

fn netpolctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_netpolctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_passes_on_the_seed_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let root = repo().join("etc/examples/seed");
    // Paths from a config file.
    let cfg = tmp.path().join("netpold.toml");
    std::fs::write(
        &cfg,
        format!(
            "policy_dir = {:?}\nendpoint_dirs = [{:?}]\n",
            root.join("netpol.d"),
            root.join("endpoints.d")
        ),
    )
    .unwrap();
    let (code, out, err) = netpolctl(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "ok: 2 policies (2 rules), 4 endpoints, 0 host endpoints, 0 nodes, 0 namespaces\n"
    );
    let (code, out, _) = netpolctl(&["check", "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["policies"], 2);
    assert_eq!(v["endpoints"], 4);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

/// A temp dir with `netpol.d/web.yaml` and `endpoints.d/eps.yaml` holding these texts.
fn check_dirs(policy: &str, registry: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pol = tmp.path().join("netpol.d");
    let reg = tmp.path().join("endpoints.d");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir_all(&reg).unwrap();
    std::fs::write(pol.join("web.yaml"), policy).unwrap();
    std::fs::write(reg.join("eps.yaml"), registry).unwrap();
    (tmp, pol, reg)
}

#[test]
fn check_fails_with_file_line_column() {
    let (tmp, pol, reg) = check_dirs(
        &(cnp("web") + "  ingress:\n    - fromEntities: [wrld]\n"),
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: a}\nspec: {addresses: [10.0.0.300]}\n",
    );
    let args = [
        "check",
        "--config",
        "/nonexistent/netpold.toml",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ];
    let (code, _, err) = netpolctl(&args);
    // A config file given explicitly must exist.
    assert_eq!(code, 2, "{err}");
    let args = [
        "check",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ];
    let (code, out, err) = netpolctl(&args);
    assert_eq!(code, 1, "{out}{err}");
    let out = out.replace(&tmp.path().display().to_string(), "DIR");
    assert_eq!(
        out,
        "DIR/netpol.d/web.yaml:9:22: document 1 (CiliumNetworkPolicy default/web): spec.ingress[0].fromEntities[0]: unknown entity \"wrld\" (did you mean \"world\"?); known entities: all, world, world-ipv4, world-ipv6, host, remote-node, cluster, init, health, unmanaged, ingress, kube-apiserver, none\n\
         DIR/endpoints.d/eps.yaml:4:20: document 1 (Endpoint default/a): spec.addresses[0]: \"10.0.0.300\" is not an IP address\n"
    );
    assert!(err.contains("2 problems found"), "{err}");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let (code, out, _) = netpolctl(&json_args);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], false);
    let p = &v["problems"][0];
    assert_eq!(
        (
            p["line"].as_u64(),
            p["column"].as_u64(),
            p["document"].as_u64()
        ),
        (Some(9), Some(22), Some(1))
    );
    assert_eq!(p["object"], "CiliumNetworkPolicy default/web");
    assert_eq!(p["field"], "spec.ingress[0].fromEntities[0]");
    assert!(p["file"].as_str().unwrap().ends_with("netpol.d/web.yaml"));
    assert!(p["message"]
        .as_str()
        .unwrap()
        .starts_with("unknown entity \"wrld\""));
}

#[test]
fn check_prints_warnings_and_strict_fails_on_them() {
    let (tmp, pol, reg) = check_dirs(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  endpointSelector: {matchLabels: {prod: yes}}\n  ingress:\n    - toPorts: [{ports: [{port: 80}]}]\n",
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: a, labels: {prod: \"yes\"}}\nspec: {addresses: [10.0.0.1]}\n",
    );
    let base = [
        "check",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ];
    let dir = tmp.path().display().to_string();
    let warnings = "DIR/netpol.d/web.yaml:5:42: warning: document 1 (CiliumNetworkPolicy default/web): spec.endpointSelector.matchLabels.prod: unquoted yes is read as the string \"yes\" here, but a Kubernetes client (YAML 1.1) reads it as the boolean true; write \"yes\" [yaml11-bool]\n\
         DIR/netpol.d/web.yaml:7:33: warning: document 1 (CiliumNetworkPolicy default/web): spec.ingress[0].toPorts[0].ports[0].port: port 80 is written as a number; a Cilium cluster refuses it (its CRD wants a string); write \"80\" [int-port]\n";
    // Warnings alone: printed, and the set is valid.
    let (code, out, err) = netpolctl(&base);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.replace(&dir, "DIR"),
        format!("{warnings}ok: 1 policy (1 rule), 1 endpoint, 0 host endpoints, 0 nodes, 0 namespaces\n")
    );
    assert_eq!(
        err,
        "netpolctl check: 2 warnings found (--strict makes them fail)\n"
    );
    // --strict: the same lines, no ok, exit 1.
    let strict: Vec<&str> = base.iter().copied().chain(["--strict"]).collect();
    let (code, out, err) = netpolctl(&strict);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out.replace(&dir, "DIR"), warnings);
    assert!(
        err.contains("2 warnings found, which --strict makes fail"),
        "{err}"
    );
    // --json: warnings apart from problems, with their code.
    for (args, valid, code_want) in [(base.to_vec(), true, 0), (strict.clone(), false, 1)] {
        let args: Vec<&str> = args.into_iter().chain(["--json"]).collect();
        let (code, out, _) = netpolctl(&args);
        assert_eq!(code, code_want);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["valid"], valid);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
        let w = v["warnings"].as_array().unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1]["code"], "int-port");
        assert_eq!(w[1]["field"], "spec.ingress[0].toPorts[0].ports[0].port");
        assert_eq!(
            (w[1]["line"].as_u64(), w[1]["column"].as_u64()),
            (Some(7), Some(33))
        );
        assert!(w[1]["text"].as_str().unwrap().ends_with("[int-port]"));
    }
    // With an error too: the problems, then the warnings; exit 1.
    std::fs::write(
        reg.join("eps.yaml"),
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: a, labels: {prod: \"yes\"}}\nspec: {addresses: [10.0.0.300]}\n",
    )
    .unwrap();
    let (code, out, err) = netpolctl(&base);
    assert_eq!(code, 1);
    assert_eq!(
        out.replace(&dir, "DIR"),
        format!("DIR/endpoints.d/eps.yaml:4:20: document 1 (Endpoint default/a): spec.addresses[0]: \"10.0.0.300\" is not an IP address\n{warnings}")
    );
    assert!(
        err.contains("1 problem found; nothing would be applied"),
        "{err}"
    );
}

/// A valid set whose compiled state would not fit the config's policy map is a
/// problem for `check` (exit 1) and `trace` (exit 2), named like a parse problem;
/// with a larger `maps.policy_max_entries` it passes.
#[test]
fn check_and_trace_refuse_a_set_over_the_map_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let pol = tmp.path().join("netpol.d");
    std::fs::create_dir_all(&pol).unwrap();
    let ports: Vec<String> = (0..30)
        .map(|i| format!("{{port: \"{}\", protocol: TCP}}", 1000 + i))
        .collect();
    std::fs::write(
        pol.join("big.yaml"),
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n  - toPorts: [{{ports: [{}]}}]\n",
            ports.join(", ")
        ),
    )
    .unwrap();
    let reg = repo().join("etc/examples/seed/endpoints.d");
    let cfg = tmp.path().join("netpold.toml");
    let config = |max: u32| {
        std::fs::write(&cfg, format!("policy_dir = {pol:?}\nendpoint_dirs = [{reg:?}]\n[maps]\npolicy_max_entries = {max}\n")).unwrap();
    };
    config(20);
    let (code, out, err) = netpolctl(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = format!(
        "{}:7:5: document 1 (CiliumNetworkPolicy default/big): spec.ingress[0]: with this rule, endpoint default/backend \
         would need more than 20 policy entries; the policy map holds 20 (maps.policy_max_entries); narrow the rule or \
         raise maps.policy_max_entries in netpold.toml",
        pol.join("big.yaml").display()
    );
    assert_eq!(out, format!("{expected}\n"));
    assert!(err.contains("1 problem found"), "{err}");
    let (code, out, err) = netpolctl(&[
        "trace",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        "default/frontend-1",
        "--to",
        "default/backend",
        "--port",
        "1000",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with(&format!("{expected}\n")), "{err}");
    config(30);
    let (code, out, err) = netpolctl(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// `netpolctl trace` compiles as netpold does with the same config: `audit` and
/// `allow_localhost` change its answers the way they change the datapath's.
#[test]
fn trace_honours_the_configs_audit_and_allow_localhost() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = repo().join("etc/examples/seed");
    let pol = tmp.path().join("netpol.d");
    let extra = tmp.path().join("nodes.d");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::copy(
        seed.join("netpol.d/frontend-to-backend.yaml"),
        pol.join("frontend-to-backend.yaml"),
    )
    .unwrap();
    // This host, by node name: its address is identity host.
    std::fs::write(
        extra.join("node.yaml"),
        "apiVersion: netpol/v1\nkind: Node\nmetadata: {name: trace-node}\nspec: {addresses: [192.0.2.1]}\n",
    )
    .unwrap();
    let cfg = tmp.path().join("netpold.toml");
    let trace = |settings: &str, from: &str| {
        std::fs::write(
            &cfg,
            format!(
                "policy_dir = {pol:?}\nendpoint_dirs = [{:?}, {extra:?}]\nnode_name = \"trace-node\"\n{settings}",
                seed.join("endpoints.d")
            ),
        )
        .unwrap();
        let (code, out, err) = netpolctl(&[
            "trace",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            from,
            "--to",
            "default/backend",
            "--port",
            "80",
            "--json",
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let verdict = v["verdict"].as_str().unwrap().to_string();
        assert_eq!(code, if verdict == "allowed" { 0 } else { 1 }, "{out}{err}");
        (verdict, v["audit"].as_bool().unwrap())
    };
    // The host is not among backend's allowed peers.
    assert_eq!(trace("", "192.0.2.1"), ("denied".to_string(), false));
    assert_eq!(
        trace("allow_localhost = \"always\"\n", "192.0.2.1"),
        ("allowed".to_string(), false)
    );
    // database is not allowed either; in audit mode it passes and says so.
    assert_eq!(trace("", "default/database"), ("denied".to_string(), false));
    assert_eq!(
        trace("audit = true\n", "default/database"),
        ("allowed".to_string(), true)
    );
}

/// `metadata.annotations["netpol.io/audit"]` stages a policy of every kind:
/// "true" stages it, "false" and no annotation enforce it; an unquoted `true`
/// stages it too, with the warning every unquoted string gets.
#[test]
fn audit_annotation_stages_a_policy_of_every_kind() {
    let doc = |kind: &str, name: &str, annotation: &str| {
        let (api_version, spec) = match kind {
            "NetworkPolicy" => ("networking.k8s.io/v1", "spec: {podSelector: {}}"),
            _ => (
                "cilium.io/v2",
                "spec: {endpointSelector: {}, ingress: [{}]}",
            ),
        };
        format!("---\napiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: {name}\n  annotations:\n    netpol.io/audit: {annotation}\n    other.example/x: \"y\"\n{spec}\n")
    };
    let text = [
        doc("CiliumNetworkPolicy", "a", "\"true\""),
        doc("CiliumClusterwideNetworkPolicy", "b", "\"true\""),
        doc("NetworkPolicy", "c", "\"true\""),
        doc("CiliumNetworkPolicy", "d", "\"false\""),
        doc("NetworkPolicy", "e", "true"),
    ]
    .concat();
    let loaded = api::parse_policies_warned(Path::new("staged.yaml"), &text);
    let ps = loaded
        .result
        .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    let staged: Vec<(&str, bool)> = ps
        .iter()
        .map(|p| (p.origin.name.as_str(), p.staged))
        .collect();
    assert_eq!(
        staged,
        [
            ("a", true),
            ("b", true),
            ("c", true),
            ("d", false),
            ("e", true)
        ]
    );
    let w: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("{}: [{}]", w.at.field.as_deref().unwrap_or(""), w.code))
        .collect();
    assert_eq!(
        w,
        ["metadata.annotations[\"netpol.io/audit\"]: [non-string]"]
    );
    assert!(!api::parse_policies(Path::new("p.yaml"), &cnp("p")).unwrap()[0].staged);
}

/// No shipped example (`etc/examples/*/`) gives a warning, of either kind:
/// `netpolctl check` on each prints no warning and `--json` lists none.
#[test]
fn shipped_examples_give_no_warning() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/examples");
    let mut n = 0;
    for dir in std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()) {
        if !dir.join("netpol.d").is_dir() {
            continue;
        }
        n += 1;
        let mut args = check_args(&dir.join("netpol.d"), &dir.join("endpoints.d"));
        args.push("--strict".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = netpolctl(&args);
        assert_eq!(code, 0, "{}: {out}{err}", dir.display());
        assert!(!out.contains("warning:") && err.is_empty(), "{out}{err}");
        let json: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let v: serde_json::Value = serde_json::from_str(&netpolctl(&json).1).unwrap();
        assert_eq!(v["warnings"], serde_json::json!([]), "{}", dir.display());
    }
    assert!(n >= 1, "no example under {}", root.display());
}

// ---------------------------------------------------------------- DNS names

/// The model of valid toFQDNs and DNS rules (what the compile reads):
/// normalised selectors, DNS rules with the ports of their own port rule.
#[test]
fn fqdn_model() {
    let ps = policies("fqdn.yaml");
    let p = named(&ps, "to-stripe");
    let egress = &p.rules[0].egress;
    assert_eq!(
        egress[0].dns,
        vec![DnsRule {
            path: "spec.egress[0].toPorts[0].rules.dns".into(),
            ports: vec![port(53, None, Proto::Udp), port(53, None, Proto::Tcp)],
            selectors: vec![
                FqdnSelector::Name("api.stripe.com.".into()),
                FqdnSelector::Pattern("*.stripe.com.".into()),
            ],
        }]
    );
    assert_eq!(
        egress[0].l4,
        L4::Ports(vec![
            port(53, None, Proto::Udp),
            port(53, None, Proto::Tcp),
            port(443, None, Proto::Tcp)
        ])
    );
    assert_eq!(
        egress[1].peers,
        Peers::List(vec![
            Peer::Fqdn(FqdnSelector::Name("api.stripe.com.".into())),
            Peer::Fqdn(FqdnSelector::Pattern("**.pypi.org.".into())),
            Peer::Fqdn(FqdnSelector::Pattern("*".into())),
        ])
    );
    assert!(egress[1].dns.is_empty());
    assert_eq!(egress[1].l4, L4::Ports(vec![port(443, None, Proto::Tcp)]));
    let host = named(&ps, "host-dns");
    assert_eq!(
        host.rules[0].egress[0].peers,
        Peers::List(vec![Peer::Fqdn(FqdnSelector::Name(
            "mirror.example.org.".into()
        ))])
    );
    assert_eq!(host.rules[0].egress[0].l4, L4::Any);
}

/// `netpolctl check` accepts valid toFQDNs and DNS rules (one load for
/// the daemon and check): both policies, no problem (the warnings say the
/// empty registry gives them nothing to select).
#[test]
fn check_accepts_fqdn_policies() {
    let text = read(&fixtures().join("valid/policies/fqdn.yaml"));
    let (_tmp, pol, reg) = check_dirs(&text, "");
    let (code, out, err) = netpolctl(&[
        "check",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 2 policies (2 rules)"), "{out}{err}");
    assert!(!out.contains("error"), "{out}{err}");
}
