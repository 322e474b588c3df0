//! Operator tools end to end, without root: `netpolctl diff`, `netpolctl matrix
//! --svg/--html`, and the rule that identities, compiled entries and verdicts are a
//! function of the files alone (the node name only decides what is local and
//! whether a node address is host or remote-node).

use crate::harness::cmd::{netpolctl, repo, NETPOLD};
use crate::harness::nodegen;
use crate::harness::prom::{parse_exposition, scrape, value, Sample};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netpol::policy::compile::{compile, CompileOptions};
use netpol::policy::identity as ids;
use netpol::policy::trace::{endpoint_side, trace};
use netpol::policy::types::{proto, Compiled};

fn seed() -> (PathBuf, PathBuf) {
    (
        repo().join("etc/examples/seed/netpol.d"),
        repo().join("etc/examples/seed/endpoints.d"),
    )
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `netpolctl COMMAND --config CFG --policy-dir POL --endpoint-dir EPS REST...`.
fn netpolctl_on(command: &str, cfg: &Path, pol: &Path, eps: &Path, rest: &[&str]) -> Output {
    let files = [
        "--config",
        s(cfg),
        "--policy-dir",
        s(pol),
        "--endpoint-dir",
        s(eps),
    ];
    netpolctl(&[&[command][..], &files, rest].concat())
}

/// A config file pointing nowhere, so no test reads /etc/netpol.
fn empty_config(dir: &Path, node: &str) -> PathBuf {
    let p = dir.join("netpold.toml");
    std::fs::write(&p, format!("node_name = \"{node}\"\n")).unwrap();
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

// ------------------------------------------------------------------ diff

#[test]
fn diff_of_identical_sets_is_empty_and_exits_0() {
    let (pol, eps) = seed();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = empty_config(tmp.path(), "host-a");
    let copy = tmp.path().join("same");
    copy_dir(&pol, &copy);
    let o = netpolctl_on("diff", &cfg, &pol, &eps, &[s(&copy)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.starts_with("no verdict changes: "), "{out}");
    // 4 endpoints → 12 ordered pairs; probes: tcp/80, the other tcp port, icmp, icmpv6
    assert!(out.contains("48 flows checked"), "{out}");
    assert!(
        out.contains("tcp/80") && out.contains("(other)") && out.contains("icmp/8"),
        "{out}"
    );
}

#[test]
fn diff_reports_exactly_the_changed_flows() {
    let (pol, eps) = seed();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = empty_config(tmp.path(), "host-a");
    let new = tmp.path().join("new");
    copy_dir(&pol, &new);
    // frontend's egress now allows backend on 8080 instead of 80; backend's ingress
    // still only 80: frontend → backend tcp/80 becomes denied, tcp/8080 stays denied
    let f = new.join("frontend-egress-control.yaml");
    let t = std::fs::read_to_string(&f)
        .unwrap()
        .replace("port: \"80\"", "port: \"8080\"");
    std::fs::write(&f, t).unwrap();
    let o = netpolctl_on("diff", &cfg, &pol, &eps, &[s(&new)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("SOURCE") && lines[0].contains("BEFORE → AFTER"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "header, two changes, summary:\n{out}");
    for (l, src) in lines[1..3]
        .iter()
        .zip(["default/frontend-1", "default/frontend-2"])
    {
        let cols: Vec<&str> = l
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cols[..4],
            [src, "default/backend", "tcp/80", "allowed → denied"],
            "{l}"
        );
        assert!(
            cols[4].contains(&format!("egress of {src}: default deny")),
            "{l}"
        );
    }
    assert!(lines[3].starts_with("2 of "), "{out}");

    let o = netpolctl_on("diff", &cfg, &pol, &eps, &[s(&new), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["changed"], 2);
    let ch = v["changes"].as_array().unwrap();
    assert_eq!(ch[0]["from"], "default/frontend-1");
    assert_eq!(ch[0]["to"], "default/backend");
    assert_eq!(ch[0]["proto"], "tcp");
    assert_eq!(ch[0]["port"], 80);
    assert_eq!(ch[0]["before"], "allowed");
    assert_eq!(ch[0]["after"], "denied");
    assert!(
        ch[0]["rule_before"]
            .as_str()
            .unwrap()
            .contains("frontend-egress-control"),
        "{v}"
    );
    let probes: Vec<&str> = v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        probes.contains(&"tcp/80") && probes.contains(&"tcp/8080"),
        "{probes:?}"
    );

    // the other way round: the change reverses
    let back = netpolctl_on("diff", &cfg, &new, &eps, &[s(&pol), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&back.stdout).unwrap();
    assert_eq!(v["changes"][0]["before"], "denied");
    assert_eq!(v["changes"][0]["after"], "allowed");
    assert!(
        v["changes"][0]["rule_after"]
            .as_str()
            .unwrap()
            .contains("allow default/frontend-to-backend"),
        "{v}"
    );
}

#[test]
fn diff_with_invalid_new_files_prints_problems_and_exits_2() {
    let (pol, eps) = seed();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = empty_config(tmp.path(), "host-a");
    let new = tmp.path().join("new");
    copy_dir(&pol, &new);
    std::fs::write(new.join("bad.yaml"), "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  ingres: []\n").unwrap();
    let o = netpolctl_on("diff", &cfg, &pol, &eps, &[s(&new)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("bad.yaml:6:3"), "{err}");
    assert!(
        err.contains("the new policies") && err.contains("are invalid"),
        "{err}"
    );
    // a missing directory is an error too
    let o = netpolctl_on("diff", &cfg, &pol, &eps, &["/nonexistent/npn"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Problems, one a line.
fn lines(problems: &[netpol::api::Problem]) -> String {
    problems
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn load(pol: &Path, eps: &Path, node: &str) -> Compiled {
    let p = netpol::api::load_policy_dir(pol).unwrap_or_else(|e| panic!("{}", lines(&e)));
    let r = netpol::api::load_endpoint_dirs(&[eps.to_path_buf()])
        .unwrap_or_else(|e| panic!("{}", lines(&e)));
    let problems = netpol::policy::registry::validate(&r);
    assert!(problems.is_empty(), "{problems:?}");
    compile(
        &p,
        &r,
        &CompileOptions {
            node_name: node.into(),
            ..Default::default()
        },
    )
}

/// Completeness of the diff's probe set: on generated policy sets, every change
/// found at any sampled port is represented by a reported change whose probe
/// port is decided the same way as the sampled port in both states.
#[test]
fn diff_probe_ports_represent_every_port() {
    let layout = nodegen::layout(false);
    let old = nodegen::generate(11, &layout, 12, 20);
    let mut new = old.clone();
    new.policies = nodegen::policies(12, 20);
    let tmp = tempfile::tempdir().unwrap();
    nodegen::write(&old, &tmp.path().join("old"), &tmp.path().join("eps"));
    let new_eps = tmp.path().join("eps-new");
    nodegen::write(&new, &tmp.path().join("new"), &new_eps);
    let before = load(&tmp.path().join("old"), &tmp.path().join("eps"), "node-a");
    let after = load(&tmp.path().join("new"), &tmp.path().join("eps"), "node-a");
    let probes = netpol::cli::diff::probes(&[&before, &after]);
    let (changes, _) = netpol::cli::diff::changes(&before, &after, &probes);
    let reported: BTreeSet<(String, String, String, u16)> = changes
        .iter()
        .map(|c| (c.from.clone(), c.to.clone(), c.proto.clone(), c.port))
        .collect();
    let mut sample: Vec<u16> = vec![
        1, 79, 80, 81, 442, 443, 444, 5431, 5432, 5433, 8079, 8080, 8081, 8999, 9000, 9005, 9010,
        9011, 65535,
    ];
    let mut rng = nodegen::stream(99);
    sample.extend((0..40).map(|_| 1 + rng.below(65535) as u16));
    let key = |c: &Compiled, a: u32, b: u32, p: u8, port: u16| {
        let r = trace(
            c,
            &endpoint_side(c, "a", a),
            &endpoint_side(c, "b", b),
            p,
            port,
        );
        (r.verdict, r.audit)
    };
    let mut sampled_changes = 0;
    for a in 0..before.endpoints.len() as u32 {
        for b in 0..before.endpoints.len() as u32 {
            if a == b {
                continue;
            }
            let name = |c: &Compiled, s: u32| {
                let e = &c.endpoints[s as usize];
                format!("{}/{}", e.namespace.as_deref().unwrap_or(""), e.name)
            };
            for p in [proto::TCP, proto::UDP] {
                for &port in &sample {
                    let kb = key(&before, a, b, p, port);
                    let ka = key(&after, a, b, p, port);
                    if kb == ka {
                        continue;
                    }
                    sampled_changes += 1;
                    let found = probes.iter().filter(|q| q.proto == p).any(|q| {
                        key(&before, a, b, p, q.port) == kb
                            && key(&after, a, b, p, q.port) == ka
                            && reported.contains(&(
                                name(&before, a),
                                name(&before, b),
                                netpol::policy::trace::proto_name(p),
                                q.port,
                            ))
                    });
                    assert!(found, "{} → {} {p}/{port} changes {kb:?} → {ka:?} but no reported probe represents it", name(&before, a), name(&before, b));
                }
            }
        }
    }
    assert!(
        sampled_changes > 20,
        "the generated sets should differ somewhere ({sampled_changes})"
    );
}

// ------------------------------------------------------------------ matrix pictures

/// A tiny XML well-formedness checker: elements nest and close, attributes are
/// `name="value"` and unique, text has no raw `<` or bare `&`, entities are known.
/// Returns the elements as (name, attributes, direct text).
#[derive(Debug, Clone)]
struct Element {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
    children: Vec<usize>,
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find(';')
            .ok_or_else(|| format!("unterminated entity in {s:?}"))?
            + i;
        let ent = &rest[i + 1..end];
        match ent {
            "amp" => out.push('&'),
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            e if e.starts_with("#x") => out.push(
                char::from_u32(u32::from_str_radix(&e[2..], 16).map_err(|x| x.to_string())?)
                    .ok_or("bad char")?,
            ),
            e if e.starts_with('#') => out.push(
                char::from_u32(
                    e[1..]
                        .parse()
                        .map_err(|x: std::num::ParseIntError| x.to_string())?,
                )
                .ok_or("bad char")?,
            ),
            e => return Err(format!("unknown entity &{e};")),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    if out.contains('<') && s.contains('<') {
        return Err(format!("raw < in {s:?}"));
    }
    Ok(out)
}

fn is_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

fn parse_xml(doc: &str) -> Result<Vec<Element>, String> {
    let mut els: Vec<Element> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut rest = doc;
    let mut roots = 0;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("<!--") {
            let end = r.find("-->").ok_or("unterminated comment")?;
            rest = &r[end + 3..];
        } else if let Some(r) = rest.strip_prefix("<?") {
            let end = r.find("?>").ok_or("unterminated processing instruction")?;
            rest = &r[end + 2..];
        } else if rest.starts_with("<!DOCTYPE") || rest.starts_with("<!doctype") {
            let end = rest.find('>').ok_or("unterminated doctype")?;
            rest = &rest[end + 1..];
        } else if let Some(r) = rest.strip_prefix("</") {
            let end = r.find('>').ok_or("unterminated end tag")?;
            let name = r[..end].trim();
            let open = stack
                .pop()
                .ok_or_else(|| format!("</{name}> without an open element"))?;
            if els[open].name != name {
                return Err(format!("</{name}> closes <{}>", els[open].name));
            }
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('<') {
            let end = r.find('>').ok_or("unterminated start tag")?;
            let mut tag = &r[..end];
            let self_closing = tag.ends_with('/');
            if self_closing {
                tag = &tag[..tag.len() - 1];
            }
            let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
            let name = &tag[..name_end];
            if !is_name(name) {
                return Err(format!("bad element name {name:?}"));
            }
            let mut attrs = BTreeMap::new();
            let mut a = tag[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a
                    .find('=')
                    .ok_or_else(|| format!("attribute without value in <{name} {a}>"))?;
                let an = a[..eq].trim();
                if !is_name(an) {
                    return Err(format!("bad attribute name {an:?}"));
                }
                let v = a[eq + 1..].trim_start();
                let q = v
                    .chars()
                    .next()
                    .filter(|c| *c == '"' || *c == '\'')
                    .ok_or_else(|| format!("unquoted attribute {an}"))?;
                let vend = v[1..]
                    .find(q)
                    .ok_or_else(|| format!("unterminated attribute {an}"))?
                    + 1;
                let raw = &v[1..vend];
                if raw.contains('<') {
                    return Err(format!("raw < in attribute {an}"));
                }
                if attrs.insert(an.to_string(), unescape(raw)?).is_some() {
                    return Err(format!("duplicate attribute {an} on <{name}>"));
                }
                a = v[vend + 1..].trim_start();
            }
            let idx = els.len();
            els.push(Element {
                name: name.to_string(),
                attrs,
                text: String::new(),
                children: vec![],
            });
            match stack.last() {
                Some(&p) => els[p].children.push(idx),
                None => roots += 1,
            }
            if !self_closing {
                stack.push(idx);
            }
            rest = &r[end + 1..];
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            let t = &rest[..end];
            match stack.last() {
                Some(&p) => {
                    let u = unescape(t)?;
                    els[p].text.push_str(&u);
                }
                None if t.trim().is_empty() => {}
                None => return Err(format!("text outside the root element: {t:?}")),
            }
            rest = &rest[end..];
        }
    }
    if let Some(&open) = stack.last() {
        return Err(format!("<{}> is never closed", els[open].name));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(els)
}

#[test]
fn xml_checker_rejects_broken_documents() {
    assert!(parse_xml("<a><b></a>").is_err());
    assert!(parse_xml("<a x=1/>").is_err());
    assert!(parse_xml("<a x=\"1\" x=\"2\"/>").is_err());
    assert!(parse_xml("<a>1 < 2</a>").is_err());
    assert!(parse_xml("<a>&nbsp;</a>").is_err());
    assert!(parse_xml("<a/><b/>").is_err());
    assert!(parse_xml("<a>").is_err());
    let ok = parse_xml("<?xml version=\"1.0\"?><a q='&amp;'><b>x &lt; y</b><c/></a>").unwrap();
    assert_eq!(ok[1].text, "x < y");
    assert_eq!(ok[0].attrs["q"], "&");
}

#[test]
fn matrix_svg_and_html_are_well_formed_and_match_the_verdicts() {
    let (pol, eps) = seed();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = empty_config(tmp.path(), "host-a");
    let svg = tmp.path().join("m.svg");
    let html = tmp.path().join("m.html");
    let matrix = |more: &[&str]| {
        netpolctl_on(
            "matrix",
            &cfg,
            &pol,
            &eps,
            &[&["--port", "80"], more].concat(),
        )
    };
    let o = matrix(&["--svg", s(&svg), "--html", s(&html)]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&matrix(&["--json"]).stdout).unwrap();
    let names: Vec<String> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let mut expect: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for f in v["flows"].as_array().unwrap() {
        let verdict = match (
            f["verdict"].as_str().unwrap(),
            f["audit"].as_bool().unwrap(),
        ) {
            ("allowed", true) => "audit",
            (x, _) => x,
        };
        let (from, to) = (
            f["from"].as_str().unwrap().to_string(),
            f["to"].as_str().unwrap().to_string(),
        );
        let verdict = if from == to { "self" } else { verdict };
        expect.insert(
            (from, to),
            (verdict.to_string(), f["rule"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(expect.len(), names.len() * names.len());

    let check = |doc: &str, what: &str| {
        let els = parse_xml(doc).unwrap_or_else(|e| panic!("{what} is not well-formed: {e}"));
        let svg_el = els
            .iter()
            .find(|e| e.name == "svg")
            .unwrap_or_else(|| panic!("{what}: no <svg>"));
        assert_eq!(svg_el.attrs["xmlns"], "http://www.w3.org/2000/svg");
        let cells: Vec<&Element> = els
            .iter()
            .filter(|e| {
                e.name == "rect" && e.attrs.get("class").map(String::as_str) == Some("cell")
            })
            .collect();
        assert_eq!(
            cells.len(),
            names.len() * names.len(),
            "{what}: one cell per pair"
        );
        let mut seen = BTreeSet::new();
        for c in cells {
            let key = (c.attrs["data-from"].clone(), c.attrs["data-to"].clone());
            let (verdict, rule) = &expect[&key];
            assert_eq!(&c.attrs["data-verdict"], verdict, "{what} {key:?}");
            let colour = match verdict.as_str() {
                "allowed" => "#2e9e44",
                "denied" => "#d1352b",
                "audit" => "#e3a21a",
                _ => "#c8c8c8",
            };
            assert_eq!(c.attrs["fill"], colour, "{what} {key:?}");
            let tip = &els[*c
                .children
                .first()
                .unwrap_or_else(|| panic!("{what}: cell without tooltip"))];
            assert_eq!(tip.name, "title");
            if verdict != "self" {
                assert!(
                    tip.text.contains(rule.as_str()) && tip.text.contains(verdict.as_str()),
                    "{what}: {} lacks {rule}",
                    tip.text
                );
            }
            seen.insert(key);
        }
        assert_eq!(seen.len(), names.len() * names.len());
        let labels: BTreeSet<&str> = els
            .iter()
            .filter(|e| e.attrs.get("class").map(String::as_str) == Some("row-label"))
            .map(|e| e.text.as_str())
            .collect();
        assert_eq!(labels, names.iter().map(String::as_str).collect());
    };
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    check(&svg_text, "svg");
    let html_text = std::fs::read_to_string(&html).unwrap();
    assert!(html_text.starts_with("<!DOCTYPE html>"));
    assert!(
        !html_text.contains("src=") && !html_text.contains("href="),
        "self-contained"
    );
    check(&html_text, "html");
    // the seed: frontend → backend allowed by the ingress rule, backend → frontend
    // open, frontend → database denied by frontend's egress default deny
    let (v, r) = &expect[&("default/frontend-1".into(), "default/backend".into())];
    assert_eq!(v, "allowed");
    assert!(
        r.contains("frontend-to-backend") && r.contains("frontend-egress-control"),
        "{r}"
    );
    let (v, r) = &expect[&("default/frontend-1".into(), "default/database".into())];
    assert_eq!(
        (v.as_str(), r.as_str()),
        ("denied", "egress of default/frontend-1: default deny")
    );
}

// ------------------------------------------------------------------ node invariance

/// Compile the same files for every node name and require the same identities,
/// the same entries, the same ipcache up to host vs remote-node for Node addresses,
/// and the same verdict for every endpoint pair and probe port.
fn assert_node_invariant(pol: &Path, eps: &Path, node_addrs: &BTreeMap<&str, &str>) {
    let names = ["node-a", "node-b", "elsewhere"];
    let cs: Vec<Compiled> = names.iter().map(|n| load(pol, eps, n)).collect();
    let base = &cs[0];
    assert!(base.endpoints.len() >= 4);
    for (n, c) in names.iter().zip(&cs).skip(1) {
        assert_eq!(c.identities, base.identities, "identities for {n}");
        assert_eq!(c.entries, base.entries, "entries for {n}");
        assert_eq!(c.rules, base.rules, "rules for {n}");
        assert_eq!(c.endpoints.len(), base.endpoints.len());
        for (a, b) in c.endpoints.iter().zip(&base.endpoints) {
            assert_eq!(
                (&a.name, &a.namespace, a.identity, &a.addresses),
                (&b.name, &b.namespace, b.identity, &b.addresses)
            );
            assert_eq!(
                (
                    a.default_deny_ingress,
                    a.default_deny_egress,
                    a.enforced_ingress,
                    a.enforced_egress
                ),
                (
                    b.default_deny_ingress,
                    b.default_deny_egress,
                    b.enforced_ingress,
                    b.enforced_egress
                ),
                "{} for {n}",
                a.name
            );
        }
        assert_eq!(c.ipcache.len(), base.ipcache.len());
    }
    // local endpoints: exactly the ones on that node
    for (n, c) in names.iter().zip(&cs) {
        let text = std::fs::read_to_string(eps.join("registry.yaml")).unwrap();
        let expected_local = text.matches(&format!("node: {n}\n")).count();
        assert_eq!(
            c.endpoints.iter().filter(|e| e.local).count(),
            expected_local,
            "local endpoints on {n}"
        );
    }
    // ipcache: equal except that a node's own address is host, the others remote-node
    for (n, c) in names.iter().zip(&cs) {
        for (e, b) in c.ipcache.iter().zip(&base.ipcache) {
            assert_eq!(e.net, b.net);
            let addr = e.net.addr().to_string();
            match node_addrs.iter().find(|(_, a)| **a == addr) {
                Some((owner, _)) => {
                    let want = if owner == n {
                        ids::HOST
                    } else {
                        ids::REMOTE_NODE
                    };
                    assert_eq!(e.identity, want, "{} on {n}", e.net);
                }
                None => assert_eq!(
                    (e.identity, e.endpoint),
                    (b.identity, b.endpoint),
                    "{} on {n}",
                    e.net
                ),
            }
        }
    }
    let probes = netpol::cli::diff::probes(&[base]);
    let mut flows = 0;
    for a in 0..base.endpoints.len() as u32 {
        for b in 0..base.endpoints.len() as u32 {
            for p in &probes {
                let verdicts: Vec<_> = cs
                    .iter()
                    .map(|c| {
                        let r = trace(
                            c,
                            &endpoint_side(c, "a", a),
                            &endpoint_side(c, "b", b),
                            p.proto,
                            p.port,
                        );
                        (
                            r.verdict,
                            r.audit,
                            r.egress.rule.clone(),
                            r.ingress.rule.clone(),
                        )
                    })
                    .collect();
                assert!(
                    verdicts.iter().all(|v| *v == verdicts[0]),
                    "slot {a} → {b} {p:?}: {verdicts:?}"
                );
                flows += 1;
            }
        }
    }
    assert!(flows >= 16);
}

#[test]
fn seed_spread_over_two_nodes_compiles_the_same_on_each() {
    let layout = nodegen::layout(false);
    let sc = nodegen::seed_spread(&layout, &repo());
    let tmp = tempfile::tempdir().unwrap();
    let (pol, eps) = (tmp.path().join("pol"), tmp.path().join("eps"));
    nodegen::write(&sc, &pol, &eps);
    assert_node_invariant(&pol, &eps, &nodegen::NODES.iter().copied().collect());
    // and netpolctl trace agrees across node names too
    for node in ["node-a", "node-b"] {
        let cfg = empty_config(&tmp.path().join(node).tap_mkdir(), node);
        let trace = |args: &[&str]| netpolctl_on("trace", &cfg, &pol, &eps, args);
        let o = trace(&[
            "--from",
            "frontend-2",
            "--to",
            "backend",
            "--port",
            "80",
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{node}: {:?}", text(&o));
        let o = trace(&[
            "--from",
            "10.206.2.10",
            "--to",
            "database",
            "--port",
            "5432",
        ]);
        assert_eq!(o.status.code(), Some(1), "{node}: {:?}", text(&o));
    }
}

#[test]
fn generated_two_node_scenarios_compile_the_same_on_each_node() {
    let layout = nodegen::layout(false);
    for seed in [1u64, 2, 3] {
        let sc = nodegen::generate(seed, &layout, 22, 24);
        let tmp = tempfile::tempdir().unwrap();
        let (pol, eps) = (tmp.path().join("pol"), tmp.path().join("eps"));
        nodegen::write(&sc, &pol, &eps);
        let cfg = empty_config(tmp.path(), "node-a");
        let o = netpolctl_on("check", &cfg, &pol, &eps, &[]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "seed {seed}: generated files invalid: {:?}",
            text(&o)
        );
        assert_node_invariant(&pol, &eps, &nodegen::NODES.iter().copied().collect());
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

// ------------------------------------------------------------------ Prometheus exposition

#[test]
fn exposition_checker_rejects_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(parse_exposition(ok).is_ok());
    for bad in [
        "a_total 3\n",                                                   // no TYPE
        "# TYPE a counter\na{x=1} 3\n",                                  // unquoted
        "# TYPE a counter\na{x=\"\\q\"} 3\n",                            // bad escape
        "# TYPE a counter\na -1\n",                                      // negative counter
        "# TYPE a gauge\na abc\n",                                       // not a float
        "# TYPE 1a gauge\n1a 1\n",                                       // name
        "# TYPE a gauge\na 1\na 2\n",                                    // duplicate series
        "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n",                    // not grouped
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
        "# TYPE a gauge\na 1",                                           // no final newline
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn rendered_metrics_are_valid_exposition() {
    use netpol::daemon::metrics::{MapFill, Metrics};
    let m = Metrics::new();
    m.applied(1, 0.0004);
    m.applied(2, 0.03);
    m.apply_failed();
    m.update(|s| {
        s.ready = true;
        s.verdicts.insert(
            "default/web".into(),
            netpol::datapath::Counters {
                allowed: 5,
                denied_default: 2,
                ..Default::default()
            },
        );
        s.verdicts
            .insert("we\"ird\\name\n".into(), Default::default());
        s.maps.insert(
            "ipcache".into(),
            MapFill {
                entries: 10,
                max_entries: 1024,
            },
        );
        s.file_errors.insert("/etc/netpol.d/a.yaml".into(), 2);
        s.endpoints.insert("attached".into(), 3);
        s.events.insert("denied".into(), 4);
    });
    let text = m.render();
    let fams = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(fams["netpol_apply_duration_seconds"].0, "histogram");
    assert_eq!(fams["netpol_verdicts_total"].0, "counter");
    let v = &fams["netpol_verdicts_total"].1;
    assert!(
        v.iter().any(|s| s.labels["endpoint"] == "we\"ird\\name\n"),
        "escaping round-trips"
    );
    let dd = v
        .iter()
        .find(|s| s.labels["endpoint"] == "default/web" && s.labels["reason"] == "default-deny")
        .unwrap();
    assert_eq!(dd.value, 2.0);
    assert_eq!(fams["netpol_generation"].1[0].value, 2.0);
    assert_eq!(
        fams["netpol_file_errors"].1[0].labels["file"],
        "/etc/netpol.d/a.yaml"
    );
}

// ------------------------------------------------------------------ metrics from the daemon

/// The datapath for the scrape test: the in-memory fake, plus counters the test sets.
#[derive(Clone, Default)]
struct CountingDp(
    std::sync::Arc<
        std::sync::Mutex<(
            netpol::datapath::fake::FakeDatapath,
            BTreeMap<u32, netpol::datapath::Counters>,
        )>,
    >,
);

impl netpol::datapath::Datapath for CountingDp {
    fn apply(
        &mut self,
        s: &Compiled,
        a: &[netpol::datapath::Attachment],
    ) -> Result<u64, netpol::datapath::DatapathError> {
        self.0.lock().unwrap().0.apply(s, a)
    }
    fn sync_attachments(
        &mut self,
        a: &[netpol::datapath::Attachment],
    ) -> Result<(), netpol::datapath::DatapathError> {
        self.0.lock().unwrap().0.sync_attachments(a)
    }
    fn generation(&self) -> u64 {
        self.0.lock().unwrap().0.generation()
    }
    fn poll_events(&mut self, max: usize) -> Vec<netpol::datapath::VerdictEvent> {
        self.0.lock().unwrap().0.poll_events(max)
    }
    fn counters(&self) -> BTreeMap<u32, netpol::datapath::Counters> {
        self.0.lock().unwrap().1.clone()
    }
    fn detach_all(&mut self) -> Result<(), netpol::datapath::DatapathError> {
        self.0.lock().unwrap().0.detach_all()
    }
}

#[tokio::test]
async fn daemon_serves_prometheus_metrics_when_configured() {
    use netpol::datapath::{Counters, EventVerdict, VerdictEvent};
    let (pol, eps) = seed();
    let tmp = tempfile::tempdir().unwrap();
    let (p, e) = (tmp.path().join("pol"), tmp.path().join("ep"));
    copy_dir(&pol, &p);
    copy_dir(&eps, &e);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = netpol::config::Config {
        metrics_listen: addr.to_string(),
        ..crate::harness::daemon::in_process_config(tmp.path(), &p, &e)
    };
    let links = crate::harness::daemon::seed_links();
    let dp = CountingDp::default();
    {
        let mut g = dp.0.lock().unwrap();
        for slot in 0..4u32 {
            g.1.insert(
                slot,
                Counters {
                    allowed: 100 + u64::from(slot),
                    denied_default: u64::from(slot),
                    ..Default::default()
                },
            );
        }
        let ev = |verdict| VerdictEvent {
            slot: 2,
            ..crate::harness::events::frontend_to_db(verdict)
        };
        g.0.events = vec![
            ev(EventVerdict::Denied),
            ev(EventVerdict::Denied),
            ev(EventVerdict::Allowed),
        ];
    }
    let (_links_tx, fake) = netpol::daemon::netlink::fake_links(links);
    let (_reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opts = netpol::daemon::Options::new(
        netpol::logging::discard(),
        netpol::daemon::sdnotify::Notifier::recorder().0,
        reload_rx,
    );
    opts.event_poll = std::time::Duration::from_millis(20);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(netpol::daemon::run_with(
        config,
        dp.clone(),
        fake,
        opts,
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Scrape until `f` holds (5 s at most); every answer must be valid exposition.
    async fn until(
        addr: std::net::SocketAddr,
        what: &str,
        f: impl Fn(&BTreeMap<String, (String, Vec<Sample>)>) -> bool,
    ) -> BTreeMap<String, (String, Vec<Sample>)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut last = String::new();
        loop {
            if let Ok(Ok(text)) = tokio::task::spawn_blocking(move || scrape(addr)).await {
                let fams = parse_exposition(&text)
                    .unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"));
                if f(&fams) {
                    return fams;
                }
                last = text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; last scrape:\n{last}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    let f = until(addr, "the first apply and the counters", |f| {
        value(f, "netpol_generation", &[]) == Some(1.0)
            && value(f, "netpol_events_total", &[("verdict", "denied")]) == Some(2.0)
            && f.get("netpol_verdicts_total")
                .is_some_and(|v| !v.1.is_empty())
    })
    .await;
    assert_eq!(value(&f, "netpol_ready", &[]), Some(1.0));
    assert_eq!(value(&f, "netpol_degraded", &[]), Some(0.0));
    assert_eq!(value(&f, "netpol_applies_total", &[]), Some(1.0));
    assert_eq!(
        value(&f, "netpol_apply_duration_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&f, "netpol_events_total", &[("verdict", "allowed")]),
        Some(1.0)
    );
    assert_eq!(
        value(&f, "netpol_endpoints", &[("state", "attached")]),
        Some(4.0)
    );
    assert_eq!(
        value(&f, "netpol_map_entries", &[("map", "endpoints")]),
        Some(4.0)
    );
    assert_eq!(
        value(&f, "netpol_map_max_entries", &[("map", "policy")]),
        Some(262144.0)
    );
    assert!(value(&f, "netpol_map_entries", &[("map", "policy")]).unwrap() > 0.0);
    assert!(
        value(&f, "netpol_map_entries", &[("map", "ipcache")]).unwrap() >= 8.0,
        "4 endpoints × 2 addresses"
    );
    let verdicts = &f["netpol_verdicts_total"].1;
    let names: BTreeSet<&str> = verdicts
        .iter()
        .map(|s| s.labels["endpoint"].as_str())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "default/backend",
            "default/database",
            "default/frontend-1",
            "default/frontend-2"
        ])
    );
    let allowed: f64 = verdicts
        .iter()
        .filter(|s| s.labels["verdict"] == "allowed")
        .map(|s| s.value)
        .sum();
    let default_deny: f64 = verdicts
        .iter()
        .filter(|s| s.labels["reason"] == "default-deny")
        .map(|s| s.value)
        .sum();
    assert_eq!((allowed, default_deny), (406.0, 6.0));
    assert!(
        f.get("netpol_file_errors").is_some_and(|v| v.1.is_empty()),
        "no file has had a problem yet"
    );

    // An invalid file: degraded, counted against that file; fixed: back to 0.
    let bad = p.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  ingres: []\n").unwrap();
    let bad_name = bad.display().to_string();
    let f = until(addr, "the invalid file", |f| {
        value(f, "netpol_file_errors", &[("file", &bad_name)]) == Some(1.0)
    })
    .await;
    assert_eq!(value(&f, "netpol_degraded", &[]), Some(1.0));
    assert_eq!(
        value(&f, "netpol_generation", &[]),
        Some(1.0),
        "the last valid set stays"
    );
    std::fs::remove_file(&bad).unwrap();
    let f = until(addr, "the fix", |f| {
        value(f, "netpol_file_errors", &[("file", &bad_name)]) == Some(0.0)
    })
    .await;
    assert_eq!(value(&f, "netpol_degraded", &[]), Some(0.0));

    let _ = stop_tx.send(());
    daemon.await.unwrap().expect("daemon loop");
    assert!(
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).is_err(),
        "metrics server stopped with the daemon"
    );
}

#[test]
fn netpold_refuses_a_metrics_listen_that_is_not_an_address() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("netpold.toml");
    std::fs::write(&cfg, "metrics_listen = \"localhost\"\n").unwrap();
    let o = Command::new(NETPOLD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end(),
        format!("netpold: {}: metrics_listen: \"localhost\" is not an address:port such as \"127.0.0.1:9962\"", cfg.display())
    );
}
