//! Files and directories → documents → model, with every problem located.
//!
//! Owns reading files and directories and the cross-document checks: one set
//! of steps for every load ([`assemble`]), which the load cache
//! (`super::cache`) runs too, deciding only which files' parses it keeps.
//! Never decides what is enforced.
//!
//! Directory rules (docs/policy.md, "Files"): `*.yaml`, `*.yml`, `*.json`; dotfiles and editor
//! leftovers (`*~`, `*.swp`, `*.tmp`, `#*#`) ignored; files read in sorted order;
//! only regular files (a symlink is followed when its target is one), at most
//! [`MAX_FILE_SIZE`] bytes, valid UTF-8 (a BOM is dropped), no NUL byte. Everything
//! is checked before anything is returned: one problem anywhere means no result.
//!
//! File trust ([`LoadOptions::strict_modes`], on by default, like sshd's
//! StrictModes): a directory read, a file read, and for a symlink its target and
//! the directory holding the target, must be owned by root or by the reading user
//! and not be writable by group or others; otherwise the file is refused with
//! the fix to apply (`chmod go-w` / `chown root`). A symlink may point outside the
//! directory: its target passes the same checks as a file in the directory.
//! Parent directories above the one read are not checked.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::hash::{FastHasher, FastMap};

use super::de::{from_node, from_node_noted, suggest, DeError, Notes};
use super::model::{
    EndpointDef, EndpointKind, Interface, ItemSource, Label, Name, NamespaceDef, NodeDef, Origin,
    Peer, Peers, Policy, PolicyKind, PolicySet, RegistrySet, Rule, Selector, SourceMap, Subject,
};
use super::policy::{self, Ctx};
use super::raw::{RawCnp, RawEndpoint, RawMeta, RawNamespace, RawNetworkPolicy, RawNode};
use super::registry;
use super::validate as v;
use super::yaml::{self, Doc, Node, Pos};
use super::{Problem, Warning, WarningCode};

/// Largest file read, in bytes.
pub const MAX_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// Longest message kept in a [`Problem`], in characters: a problem that quotes
/// a 3 MB line is cut to a readable length. Field paths and object names are
/// cut at [`MAX_PROBLEM_NAME`].
pub const MAX_PROBLEM_TEXT: usize = 1000;
pub const MAX_PROBLEM_NAME: usize = 200;

/// How directories are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Refuse files and directories that someone other than root or the reading
    /// user owns or could write (group- or world-writable). On by default; the
    /// daemon turns it off only when its config says `strict_file_modes = false`.
    pub strict_modes: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { strict_modes: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Policy,
    Registry,
}

const POLICY_KINDS: &[(&str, &str)] = &[
    ("CiliumNetworkPolicy", "cilium.io/v2"),
    ("CiliumClusterwideNetworkPolicy", "cilium.io/v2"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
];
const REGISTRY_KINDS: &[(&str, &str)] = &[
    ("Endpoint", "netpol/v1"),
    ("HostEndpoint", "netpol/v1"),
    ("Node", "netpol/v1"),
    ("Namespace", "netpol/v1"),
];

/// Where the parts of an object that cross-document checks name were
/// written; its file, document and name are its [`Origin`]'s. Kept for every
/// object of every kept parse, so it holds positions only.
#[derive(Debug, Clone)]
pub struct Site {
    pub name_pos: Pos,
    /// Positions of `spec.addresses[i]`.
    pub addr_pos: Box<[Pos]>,
    pub iface_pos: Pos,
}

/// An object's origin and site: what a cross-document message names.
#[derive(Clone, Copy)]
struct At<'a> {
    origin: &'a Origin,
    site: &'a Site,
}

impl At<'_> {
    /// `Kind namespace/name` or `Kind name`, as [`object_label`] names the
    /// document.
    fn object(&self) -> String {
        let o = self.origin;
        match (&o.namespace, namespaced(&o.kind)) {
            (Some(ns), true) => format!("{} {ns}/{}", o.kind, o.name),
            _ => format!("{} {}", o.kind, o.name),
        }
    }
    fn at(&self, pos: Pos) -> String {
        let file = self.origin.file.display();
        match pos.known() {
            Some((l, c)) => format!("{file}:{l}:{c}"),
            None => format!("{file} (document {})", self.origin.doc + 1),
        }
    }
    fn problem(&self, pos: Pos, field: &str, message: String) -> Problem {
        let k = pos.known();
        Problem {
            file: self.origin.file.to_path_buf(),
            line: k.map(|x| x.0),
            column: k.map(|x| x.1),
            document: Some(self.origin.doc + 1),
            object: Some(self.object()),
            field: Some(field.to_string()),
            message,
        }
    }
}

/// Everything parsed so far, with sites, before cross-document checks.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Shared, as the endpoints are: a set is assembled from kept parses on
    /// every change, and that must not copy thousands of policies.
    pub policies: Vec<(Arc<Policy>, Arc<Site>)>,
    pub endpoints: Vec<(Arc<EndpointDef>, Arc<Site>)>,
    pub nodes: Vec<(NodeDef, Site)>,
    pub namespaces: Vec<(NamespaceDef, Site)>,
    pub problems: Vec<Problem>,
    /// Never refuse a set (see `api::warn`).
    pub warnings: Vec<Warning>,
    /// Files in the order they were read; problems are reported in this order.
    pub files: Vec<PathBuf>,
}

fn is_json(file: &Path) -> bool {
    file.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn problem(
    file: &Path,
    pos: Option<Pos>,
    document: Option<usize>,
    object: Option<&str>,
    field: Option<&str>,
    msg: String,
) -> Problem {
    let k = pos.and_then(Pos::known);
    Problem {
        file: file.to_path_buf(),
        line: k.map(|x| x.0),
        column: k.map(|x| x.1),
        document,
        object: object.map(str::to_string),
        field: field.filter(|f| !f.is_empty()).map(str::to_string),
        message: msg,
    }
}

fn namespaced(kind: &str) -> bool {
    matches!(kind, "CiliumNetworkPolicy" | "NetworkPolicy" | "Endpoint")
}

/// `Kind namespace/name` or `Kind name`, from the tree (best effort, before validation).
fn object_label(root: &Node) -> Option<String> {
    let kind = root.get("kind")?.as_str()?.to_string();
    let meta = root.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Node::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Node::as_str)
        .unwrap_or("default");
    Some(match name {
        Some(n) if namespaced(&kind) => format!("{kind} {ns}/{n}"),
        Some(n) => format!("{kind} {n}"),
        None => kind,
    })
}

/// Parse one file's text into `out`.
pub fn parse_text(file: &Path, text: &str, want: FileKind, out: &mut Parsed) {
    let min = if PARSE_IN_PARTS.load(std::sync::atomic::Ordering::Relaxed) {
        PARALLEL_PARSE_MIN
    } else {
        usize::MAX
    };
    parse_text_with(file, text, want, out, min);
}

/// [`parse_text`], in parts side by side when the text is at least
/// `parallel_min` bytes long.
fn parse_text_with(file: &Path, text: &str, want: FileKind, out: &mut Parsed, parallel_min: usize) {
    out.files.push(file.to_path_buf());
    if text.len() as u64 > MAX_FILE_SIZE {
        out.problems.push(file_problem(
            file,
            format!(
                "file is {} bytes; the limit is {MAX_FILE_SIZE} bytes (4 MiB)",
                text.len()
            ),
        ));
        return;
    }
    // The YAML scanner takes NUL for the end of the input: whatever follows one
    // would be dropped without a word, and a reviewer would still see it.
    if let Some(i) = text.find('\0') {
        let (line, col) = line_col(text.as_bytes(), i);
        out.problems.push(Problem {
            file: file.to_path_buf(),
            line: Some(line),
            column: Some(col),
            document: None,
            object: None,
            field: None,
            message: "file contains a NUL byte; policy and registry files are text".into(),
        });
        return;
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let from = Counts::of(out);
    // One copy of the path for every object of the file.
    let file: &Arc<Path> = &Arc::from(file);
    let tree_problems = if is_json(file) {
        let (docs, tree_problems) = yaml::parse_json(text);
        let labelled = label_tree_problems(tree_problems, |n| {
            docs.iter()
                .find(|d| d.number == n)
                .and_then(|d| object_label(&d.root))
        });
        for doc in &docs {
            parse_doc(file, doc, want, out);
        }
        labelled
    } else if let Some(parts) = parse_in_parts(file, text, want, parallel_min) {
        for part in parts {
            out.policies.extend(part.policies);
            out.endpoints.extend(part.endpoints);
            out.nodes.extend(part.nodes);
            out.namespaces.extend(part.namespaces);
            out.problems.extend(part.problems);
            out.warnings.extend(part.warnings);
        }
        Vec::new()
    } else {
        // Each document becomes objects as soon as it ends, and its tree is
        // dropped: the parse's scratch stays one document's, rather than a
        // whole file's trees under the objects that are kept.
        let mut labels: Vec<(usize, Option<String>)> = Vec::new();
        let (whole, tree_problems) = yaml::parse_yaml_each(text, &mut |doc, problems| {
            if problems.iter().any(|p| p.document == Some(doc.number)) {
                labels.push((doc.number, object_label(&doc.root)));
            }
            parse_doc(file, &doc, want, out);
        });
        if !whole {
            // Refused whole: what its documents gave is dropped.
            from.truncate(out);
        }
        label_tree_problems(tree_problems, |n| {
            labels
                .iter()
                .find(|(d, _)| *d == n)
                .and_then(|(_, l)| l.clone())
        })
    };
    // The tree's problems come before the objects', as a reader meets them.
    let at = from.problems;
    out.problems.splice(
        at..at,
        tree_problems.into_iter().map(|(tp, object)| {
            problem(
                file,
                Some(tp.pos),
                tp.document,
                object.as_deref(),
                None,
                tp.message,
            )
        }),
    );
    share_names(out, &from);
}

/// How many objects of each kind a [`Parsed`] held.
struct Counts {
    policies: usize,
    endpoints: usize,
    nodes: usize,
    namespaces: usize,
    problems: usize,
    warnings: usize,
}

impl Counts {
    fn of(p: &Parsed) -> Counts {
        Counts {
            policies: p.policies.len(),
            endpoints: p.endpoints.len(),
            nodes: p.nodes.len(),
            namespaces: p.namespaces.len(),
            problems: p.problems.len(),
            warnings: p.warnings.len(),
        }
    }

    /// Drop what was added to `p` since these counts were taken.
    fn truncate(&self, p: &mut Parsed) {
        p.policies.truncate(self.policies);
        p.endpoints.truncate(self.endpoints);
        p.nodes.truncate(self.nodes);
        p.namespaces.truncate(self.namespaces);
        p.problems.truncate(self.problems);
        p.warnings.truncate(self.warnings);
    }
}

/// A file at least this long is parsed in parts side by side, where the
/// machine has the cores (a start reads 10,000 policies from one file).
const PARALLEL_PARSE_MIN: usize = 512 * 1024;

/// Whether [`parse_text`] parses long files in parts (on by default).
static PARSE_IN_PARTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the parse in parts off (or on again) for this process. A process
/// whose allocator serves every thread from one arena (netpold, see
/// `daemon::fix_allocator_thresholds`) turns it off: there the parts' threads
/// wait on one lock and a start at 10k x 10k read no faster with them.
pub fn set_parse_in_parts(on: bool) {
    PARSE_IN_PARTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A long YAML file's documents parsed in parts on several threads, split at
/// lines that are `---` alone: what one parse of the whole file gives, or
/// `None` where a part could give anything else (a syntax error or any tree
/// problem, an alias, which counts against one limit for the whole file, or
/// documents that start other than at the lines counted), and the file is
/// parsed as one.
fn parse_in_parts(
    file: &Arc<Path>,
    text: &str,
    want: FileKind,
    parallel_min: usize,
) -> Option<Vec<Parsed>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    if threads < 2 || text.len() < parallel_min {
        return None;
    }
    let is_marker = |line: &str| line.strip_suffix('\r').unwrap_or(line) == "---";
    // Where each part starts: 0, then the start of a marker line near each
    // equal share of the text.
    let mut starts = vec![0];
    for k in 1..threads {
        let target = (text.len() * k / threads).max(starts[starts.len() - 1] + 1);
        if let Some(i) = text.get(target..).and_then(|t| t.find("\n---\n")) {
            starts.push(target + i + 1);
        }
    }
    if starts.len() < 2 {
        return None;
    }
    // The documents each part starts, by its marker lines (and the first
    // part's implicit document, when content comes before its first marker).
    let mut parts: Vec<(&str, usize, usize, usize)> = Vec::new(); // (text, lines before, doc base, documents)
    let mut lines_before = 0;
    let mut doc_base = 0;
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(text.len());
        let part = &text[start..end];
        let mut docs = part.split('\n').filter(|l| is_marker(l)).count();
        if k == 0 {
            let implicit = part.split('\n').take_while(|l| !is_marker(l)).any(|l| {
                let t = l.trim();
                !(t.is_empty() || t.starts_with('#') || t.starts_with('%'))
            });
            docs += usize::from(implicit);
        }
        parts.push((part, lines_before, doc_base, docs));
        lines_before += part.bytes().filter(|b| *b == b'\n').count();
        doc_base += docs;
    }
    let parse = |&(part, lines_before, doc_base, docs): &(&str, usize, usize, usize)| {
        // Line numbers as in the whole file: the lines before, as empty ones.
        let padded;
        let part = if lines_before > 0 {
            padded = "\n".repeat(lines_before) + part;
            padded.as_str()
        } else {
            part
        };
        let mut out = Parsed::default();
        let each = yaml::parse_yaml_each_from(part, doc_base, &mut |doc, _| {
            parse_doc(file, &doc, want, &mut out)
        });
        (each.whole && each.problems.is_empty() && each.alias_nodes == 0 && each.documents == docs)
            .then_some(out)
    };
    let results: Vec<Option<Parsed>> = std::thread::scope(|s| {
        let others: Vec<_> = parts[1..]
            .iter()
            .map(|p| s.spawn(move || parse(p)))
            .collect();
        let first = parse(&parts[0]);
        std::iter::once(first)
            .chain(
                others
                    .into_iter()
                    .map(|h| h.join().expect("a parse thread panicked")),
            )
            .collect()
    });
    results.into_iter().collect()
}

/// Each tree problem with the object its document names (`label` of the
/// document's number), for the message.
fn label_tree_problems(
    tree_problems: Vec<yaml::TreeProblem>,
    label: impl Fn(usize) -> Option<String>,
) -> Vec<(yaml::TreeProblem, Option<String>)> {
    tree_problems
        .into_iter()
        .map(|tp| {
            let object = tp.document.and_then(&label);
            (tp, object)
        })
        .collect()
}

/// One copy of each label source, key and value among the objects parsed
/// since `from`: a file's thousands of selectors and labels name a few keys
/// and repeat their values, and a kept parse holds them for as long as the
/// file is unchanged.
fn share_names(out: &mut Parsed, from: &Counts) {
    #[derive(Default)]
    struct Names(std::collections::HashSet<Name, std::hash::BuildHasherDefault<FastHasher>>);
    impl Names {
        fn share(&mut self, n: &mut Name) {
            match self.0.get(n.as_str()) {
                Some(kept) => *n = kept.clone(),
                None => {
                    self.0.insert(n.clone());
                }
            }
        }
        fn label(&mut self, l: &mut Label) {
            self.share(&mut l.source);
            self.share(&mut l.key);
            self.share(&mut l.value);
        }
        /// Its kind and namespace (its file's path is shared already).
        fn origin(&mut self, o: &mut Origin) {
            self.share(&mut o.kind);
            if let Some(ns) = &mut o.namespace {
                self.share(ns);
            }
        }
        fn selector(&mut self, sel: &mut Selector) {
            for r in &mut sel.requirements {
                if let Some(s) = &mut r.key.source {
                    self.share(s);
                }
                self.share(&mut r.key.key);
                r.values.each_mut(|v| self.share(v));
            }
        }
    }
    let mut names = Names::default();
    // Just parsed, so not shared yet: `get_mut` finds each one alone.
    for (p, _) in &mut out.policies[from.policies..] {
        let Some(p) = Arc::get_mut(p) else {
            continue;
        };
        names.origin(&mut p.origin);
        let Some(rules) = Arc::get_mut(&mut p.rules) else {
            continue;
        };
        for rule in rules.iter_mut() {
            match &mut rule.subject {
                Subject::Endpoints(sel) | Subject::Nodes(sel) => names.selector(sel),
            }
            let items = rule
                .ingress
                .iter_mut()
                .chain(&mut rule.ingress_deny)
                .chain(&mut rule.egress)
                .chain(&mut rule.egress_deny);
            for item in items {
                if let Peers::List(peers) = &mut item.peers {
                    for peer in peers {
                        if let Peer::Endpoints(sel) = peer {
                            names.selector(sel);
                        }
                    }
                }
            }
        }
    }
    for (e, _) in &mut out.endpoints[from.endpoints..] {
        if let Some(e) = Arc::get_mut(e) {
            e.labels.iter_mut().for_each(|l| names.label(l));
            names.origin(&mut e.origin);
            e.namespace.clone_from(&e.origin.namespace);
            if let Some(n) = &mut e.node {
                names.share(n);
            }
        }
    }
    for (n, _) in &mut out.nodes[from.nodes..] {
        n.labels.iter_mut().for_each(|l| names.label(l));
        names.origin(&mut n.origin);
    }
    for (n, _) in &mut out.namespaces[from.namespaces..] {
        n.labels.iter_mut().for_each(|l| names.label(l));
        names.origin(&mut n.origin);
    }
}

fn parse_doc(file: &Arc<Path>, doc: &Doc, want: FileKind, out: &mut Parsed) {
    let root = &doc.root;
    let n = doc.number;
    let object = object_label(root);
    let obj = object.as_deref();
    let push = |out: &mut Parsed, pos: Pos, field: &str, msg: String| {
        out.problems
            .push(problem(file, Some(pos), Some(n), obj, Some(field), msg));
    };
    let (expected, other, dir_name) = match want {
        FileKind::Policy => (
            POLICY_KINDS,
            REGISTRY_KINDS,
            "an endpoint registry directory (/etc/netpol/endpoints.d)",
        ),
        FileKind::Registry => (
            REGISTRY_KINDS,
            POLICY_KINDS,
            "the policy directory (/etc/netpol.d)",
        ),
    };
    let kinds_list = expected.iter().map(|(k, _)| *k).collect::<Vec<_>>();
    let what = match want {
        FileKind::Policy => "a policy file holds",
        FileKind::Registry => "a registry file holds",
    };
    if !matches!(root.value, yaml::Value::Map(_)) {
        push(
            out,
            root.pos,
            "",
            format!(
                "a document must be a mapping with apiVersion, kind and metadata, found {}",
                super::de::describe(root)
            ),
        );
        return;
    }
    let kind = match root.get("kind").map(|k| (k, k.as_str())) {
        None | Some((_, None)) => {
            push(
                out,
                root.pos_of("kind"),
                "kind",
                format!("kind is required; {what} {}", kinds_list.join(", ")),
            );
            return;
        }
        Some((_, Some(k))) => k,
    };
    let api_version = root.get("apiVersion").and_then(Node::as_str);
    let Some((_, want_api)) = expected.iter().find(|(k, _)| *k == kind) else {
        if let Some((k, _)) = other.iter().find(|(k, _)| *k == kind) {
            push(
                out,
                root.pos_of("kind"),
                "kind",
                format!("{k} does not belong here; put it in {dir_name}"),
            );
        } else {
            let hint = match suggest(kind, &kinds_list) {
                Some(s) => format!(" (did you mean {s:?}?)"),
                None => String::new(),
            };
            push(
                out,
                root.pos_of("kind"),
                "kind",
                format!(
                    "unknown kind {kind:?}{hint}; {what} {}",
                    kinds_list.join(", ")
                ),
            );
        }
        return;
    };
    match api_version {
        Some(a) if a == *want_api => {}
        Some(a) => {
            push(
                out,
                root.pos_of("apiVersion"),
                "apiVersion",
                format!("apiVersion {a:?} is not supported for {kind}; use {want_api}"),
            );
            return;
        }
        None => {
            push(
                out,
                root.pos_of("apiVersion"),
                "apiVersion",
                format!("apiVersion is required; use {want_api}"),
            );
            return;
        }
    }

    let de_problem = |out: &mut Parsed, e: DeError| {
        let pos = e.pos.unwrap_or(root.pos);
        let field = e.path.unwrap_or_default();
        out.problems.push(problem(
            file,
            Some(pos),
            Some(n),
            obj,
            Some(&field),
            e.message,
        ));
    };
    let mut ctx = Ctx::default();
    let notes = Notes::default();
    let origin_of = |ns: Option<&str>, name: &str| Origin {
        file: file.clone(),
        doc: n - 1,
        kind: kind.into(),
        namespace: ns.map(Name::from),
        name: name.into(),
    };
    let site = |root: &Node| Site {
        name_pos: root.pos_of("metadata.name"),
        addr_pos: match root
            .get("spec")
            .and_then(|s| s.get("addresses"))
            .map(|a| &a.value)
        {
            Some(yaml::Value::Seq(items)) => items.iter().map(|i| i.pos).collect(),
            _ => Box::default(),
        },
        iface_pos: root.pos_of("spec.interface"),
    };

    match kind {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            let raw: RawCnp = match from_node_noted(root, "", &notes) {
                Ok(r) => r,
                Err(e) => return de_problem(out, e),
            };
            let clusterwide = kind == "CiliumClusterwideNetworkPolicy";
            let (name, ns) = meta(
                &mut ctx,
                raw.metadata.as_ref(),
                if clusterwide {
                    Scope::Cluster
                } else {
                    Scope::Namespaced
                },
            );
            policy::object_name(&mut ctx, &name);
            if raw.spec.is_none() && raw.specs.is_none() {
                ctx.err(
                    "spec",
                    format!("a {kind} needs spec (one rule) or specs (a list of rules)"),
                );
            }
            let mut rules = Vec::new();
            if let Some(spec) = &raw.spec {
                rules.extend(policy::cilium_rule(&mut ctx, "spec", spec, ns.as_deref()));
            }
            for (i, spec) in raw.specs.iter().flatten().enumerate() {
                rules.extend(policy::cilium_rule(
                    &mut ctx,
                    &yaml::join_index("specs", i),
                    spec,
                    ns.as_deref(),
                ));
            }
            let staged = staged(&mut ctx, raw.metadata.as_ref());
            if ctx.errors.is_empty() {
                locate_items(&mut rules, root);
                let kind = if clusterwide {
                    PolicyKind::CiliumClusterwideNetworkPolicy
                } else {
                    PolicyKind::CiliumNetworkPolicy
                };
                let source = source_map(std::mem::take(&mut ctx.sources), &rules, kind, root);
                let policy = Policy {
                    origin: origin_of(ns.as_deref(), &name),
                    kind,
                    rules: rules.into(),
                    staged,
                    source: source.into(),
                };
                out.policies.push((policy.into(), site(root).into()));
            }
        }
        "NetworkPolicy" => {
            let raw: RawNetworkPolicy = match from_node_noted(root, "", &notes) {
                Ok(r) => r,
                Err(e) => return de_problem(out, e),
            };
            let (name, ns) = meta(&mut ctx, raw.metadata.as_ref(), Scope::Namespaced);
            policy::object_name(&mut ctx, &name);
            let ns = ns.unwrap_or_else(|| "default".into());
            let rule = match &raw.spec {
                Some(spec) => policy::network_policy_rule(&mut ctx, spec, &ns),
                None => {
                    ctx.err("spec", "spec is required (spec: {podSelector: {}} selects every pod of the namespace)");
                    None
                }
            };
            let staged = staged(&mut ctx, raw.metadata.as_ref());
            if ctx.errors.is_empty() {
                let mut rules: Vec<Rule> = rule.into_iter().collect();
                locate_items(&mut rules, root);
                let kind = PolicyKind::NetworkPolicy;
                let source = source_map(std::mem::take(&mut ctx.sources), &rules, kind, root);
                let policy = Policy {
                    origin: origin_of(Some(&ns), &name),
                    kind,
                    rules: rules.into(),
                    staged,
                    source: source.into(),
                };
                out.policies.push((policy.into(), site(root).into()));
            }
        }
        "Endpoint" | "HostEndpoint" => {
            let raw: RawEndpoint = match from_node(root, "") {
                Ok(r) => r,
                Err(e) => return de_problem(out, e),
            };
            let host = kind == "HostEndpoint";
            let (name, ns) = meta(
                &mut ctx,
                raw.metadata.as_ref(),
                if host { Scope::None } else { Scope::Namespaced },
            );
            let labels = registry::labels(
                &mut ctx,
                "metadata.labels",
                raw.metadata.as_ref().and_then(|m| m.labels.as_ref()),
                true,
            );
            let spec = match &raw.spec {
                Some(s) => Some(registry::endpoint_spec(&mut ctx, s, host)),
                None => {
                    ctx.err(
                        "spec",
                        if host {
                            "spec is required (with interface and addresses)"
                        } else {
                            "spec is required (with addresses, and interface for a local endpoint)"
                        },
                    );
                    None
                }
            };
            if let (true, Some(spec)) = (ctx.errors.is_empty(), spec) {
                let origin = origin_of(ns.as_deref(), &name);
                let def = EndpointDef {
                    kind: if host {
                        EndpointKind::Host
                    } else {
                        EndpointKind::Workload
                    },
                    name: origin.name.clone(),
                    namespace: origin.namespace.clone(),
                    origin,
                    labels,
                    node: spec.node.map(Name::from),
                    interface: spec.interface,
                    addresses: spec.addresses,
                    ports: spec.ports,
                    audit: spec.audit,
                };
                out.endpoints.push((def.into(), site(root).into()));
            }
        }
        "Node" => {
            let raw: RawNode = match from_node(root, "") {
                Ok(r) => r,
                Err(e) => return de_problem(out, e),
            };
            let (name, _) = meta(&mut ctx, raw.metadata.as_ref(), Scope::None);
            let labels = registry::labels(
                &mut ctx,
                "metadata.labels",
                raw.metadata.as_ref().and_then(|m| m.labels.as_ref()),
                true,
            );
            let addresses = match &raw.spec {
                Some(s) => registry::addresses(
                    &mut ctx,
                    "spec.addresses",
                    s.addresses.as_ref(),
                    "a Node needs at least one address",
                ),
                None => {
                    ctx.err("spec", "spec with addresses is required");
                    Vec::new()
                }
            };
            if ctx.errors.is_empty() {
                let def = NodeDef {
                    origin: origin_of(None, &name),
                    name: name.clone(),
                    labels,
                    addresses,
                };
                out.nodes.push((def, site(root)));
            }
        }
        "Namespace" => {
            let raw: RawNamespace = match from_node(root, "") {
                Ok(r) => r,
                Err(e) => return de_problem(out, e),
            };
            let (name, _) = meta(&mut ctx, raw.metadata.as_ref(), Scope::None);
            if !name.is_empty() && !v::dns_label(&name) {
                ctx.err(
                    "metadata.name",
                    format!("{name:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63 characters)"),
                );
            }
            let labels = registry::labels(
                &mut ctx,
                "metadata.labels",
                raw.metadata.as_ref().and_then(|m| m.labels.as_ref()),
                false,
            );
            if ctx.errors.is_empty() {
                let def = NamespaceDef {
                    origin: origin_of(None, &name),
                    name: name.clone(),
                    labels,
                };
                out.namespaces.push((def, site(root)));
            }
        }
        _ => unreachable!("kind checked above"),
    }
    for (path, msg) in ctx.errors {
        let pos = root.pos_of(&path);
        out.problems
            .push(problem(file, Some(pos), Some(n), obj, Some(&path), msg));
    }
    let notes = notes
        .into_inner()
        .into_iter()
        .map(|n| (n.code, n.pos, n.path, n.message));
    let located = ctx
        .warnings
        .into_iter()
        .map(|(code, path, msg)| (code, root.pos_of(&path), path, msg));
    for (code, pos, path, msg) in notes.chain(located) {
        let at = problem(file, Some(pos), Some(n), obj, Some(&path), msg);
        out.warnings.push(Warning { at, code });
    }
}

/// Record where each rule item was written, for messages about it that only
/// compile can give (the map budget, `policy::compile::try_compile`).
fn locate_items(rules: &mut [Rule], root: &Node) {
    for r in rules {
        for it in r
            .ingress
            .iter_mut()
            .chain(r.ingress_deny.iter_mut())
            .chain(r.egress.iter_mut())
            .chain(r.egress_deny.iter_mut())
        {
            it.pos = root.pos_of(&it.path).known();
        }
    }
}

/// The annotation that stages a policy (docs/policy.md, "Staged policies").
pub const AUDIT_ANNOTATION: &str = "netpol.io/audit";

/// Whether `metadata.annotations` stages the policy: `"true"` stages it,
/// `"false"` (or no annotation) enforces it; anything else is an error naming
/// the annotation.
fn staged(ctx: &mut Ctx, m: Option<&RawMeta>) -> bool {
    let Some(value) = m
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(AUDIT_ANNOTATION))
    else {
        return false;
    };
    match value.as_str() {
        "true" => true,
        "false" => false,
        other => {
            ctx.err(
                yaml::join_key("metadata.annotations", AUDIT_ANNOTATION),
                format!("{other:?} is not a value of {AUDIT_ANNOTATION}; write \"true\" to stage the policy (what it would deny is reported as audit, and nothing of it is enforced) or \"false\" to enforce it"),
            );
            false
        }
    }
}

/// Where the parts of a valid policy were written: each item's parts (from
/// validation, `sources`) and the positions of those and of each rule's
/// subject selector.
fn source_map(
    sources: Vec<(String, ItemSource)>,
    rules: &[Rule],
    kind: PolicyKind,
    root: &Node,
) -> SourceMap {
    let subjects = rules.iter().map(|r| r.subject_path(kind));
    let parts = sources
        .iter()
        .flat_map(|(_, s)| s.peers.iter().chain(&s.ports).cloned());
    let positions: Vec<(String, (usize, usize))> = subjects
        .chain(parts)
        .filter_map(|path| root.pos_of(&path).known().map(|pos| (path, pos)))
        .collect();
    SourceMap::new(sources, positions)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// CNP, NetworkPolicy, Endpoint: namespace defaults to `default`.
    Namespaced,
    /// CCNP: a namespace would make Cilium read it as a CNP; refused.
    Cluster,
    /// HostEndpoint, Node, Namespace: no namespace.
    None,
}

/// Validate metadata; returns (name, namespace). Errors go to `ctx`.
fn meta(ctx: &mut Ctx, m: Option<&RawMeta>, scope: Scope) -> (String, Option<String>) {
    let Some(m) = m else {
        ctx.err("metadata", "metadata with a name is required");
        return (
            String::new(),
            (scope == Scope::Namespaced).then(|| "default".into()),
        );
    };
    let name = match m.name.as_deref() {
        None | Some("") => {
            ctx.err("metadata.name", "metadata.name is required");
            String::new()
        }
        Some(n) => {
            if let Err(e) = v::object_name(n) {
                ctx.err("metadata.name", e);
            }
            n.to_string()
        }
    };
    let ns = match (scope, m.namespace.as_deref()) {
        (Scope::Namespaced, None | Some("")) => Some("default".to_string()),
        (Scope::Namespaced, Some(ns)) => {
            if !v::dns_label(ns) {
                ctx.err(
                    "metadata.namespace",
                    format!("{ns:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63 characters)"),
                );
            }
            Some(ns.to_string())
        }
        (Scope::Cluster, Some(ns)) if !ns.is_empty() => {
            ctx.err(
                "metadata.namespace",
                "a CiliumClusterwideNetworkPolicy has no namespace; remove metadata.namespace (or make it a CiliumNetworkPolicy)",
            );
            None
        }
        (Scope::None, Some(ns)) if !ns.is_empty() => {
            ctx.err(
                "metadata.namespace",
                "this kind has no namespace; remove metadata.namespace",
            );
            None
        }
        _ => None,
    };
    (name, ns)
}

// ---------------------------------------------------------------- cross-document checks

/// Two policies of one kind with one namespace and name (a problem); two
/// policies of different kinds with one namespace and name (a warning: both
/// are enforced, and most output names a policy by namespace and name).
pub fn check_policies(parsed: &mut Parsed) {
    let mut seen: FastMap<(&str, Option<&str>, &str), usize> = FastMap::default();
    seen.reserve(parsed.policies.len());
    let mut names: FastMap<(&str, &str), usize> = FastMap::default();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let at = |i: usize| {
        let (p, site) = &parsed.policies[i];
        At {
            origin: &p.origin,
            site,
        }
    };
    for (i, (p, _)) in parsed.policies.iter().enumerate() {
        let here = at(i);
        if let Some(ns) = p.origin.namespace.as_deref() {
            match names.get(&(ns, p.origin.name.as_str())) {
                Some(&first) if parsed.policies[first].0.origin.kind != p.origin.kind => {
                    let there = at(first);
                    warnings.push(Warning {
                        at: here.problem(
                            here.site.name_pos,
                            "metadata.name",
                            format!(
                                "has the same namespace and name as {} at {}; both are enforced, as two policies that status, trace and monitor tell apart only by their kind: give each its own name",
                                there.object(),
                                there.at(there.site.name_pos)
                            ),
                        ),
                        code: WarningCode::DuplicateName,
                    });
                }
                Some(_) => {}
                None => {
                    names.insert((ns, p.origin.name.as_str()), i);
                }
            }
        }
        let key = (
            p.origin.kind.as_str(),
            p.origin.namespace.as_deref(),
            p.origin.name.as_str(),
        );
        if let Some(&first) = seen.get(&key) {
            let there = at(first);
            problems.push(here.problem(
                here.site.name_pos,
                "metadata.name",
                format!(
                    "{} is already defined at {}; a policy name must be unique per kind and namespace",
                    here.object(),
                    there.at(there.site.name_pos)
                ),
            ));
        } else {
            seen.insert(key, i);
        }
    }
    parsed.problems.extend(problems);
    parsed.warnings.extend(warnings);
}

/// Duplicate names, addresses claimed twice, interfaces enforced twice.
pub fn check_registry(parsed: &mut Parsed) {
    let mut problems = Vec::new();
    // Names.
    let mut names: FastMap<(&str, Option<&str>, &str), At<'_>> = FastMap::default();
    names.reserve(parsed.endpoints.len() + parsed.nodes.len());
    let all_sites = parsed
        .endpoints
        .iter()
        .map(|(e, s)| (&e.origin, &**s))
        .chain(parsed.nodes.iter().map(|(n, s)| (&n.origin, s)))
        .chain(parsed.namespaces.iter().map(|(n, s)| (&n.origin, s)));
    for (origin, site) in all_sites {
        let here = At { origin, site };
        let o = origin;
        let key = (o.kind.as_str(), o.namespace.as_deref(), o.name.as_str());
        if let Some(first) = names.get(&key) {
            problems.push(here.problem(
                site.name_pos,
                "metadata.name",
                format!(
                    "{} is already defined at {}; names must be unique per kind and namespace",
                    here.object(),
                    first.at(first.site.name_pos)
                ),
            ));
        } else {
            names.insert(key, here);
        }
    }
    // Addresses: an address identifies one endpoint. A HostEndpoint may share
    // its address with the Node entry of its own host. Endpoints first, then
    // Nodes; a claim is kept as where to find it (a fleet registry has
    // 200,000 addresses, so the map stays small).
    #[derive(Clone, Copy)]
    enum Claimant {
        Endpoint(u32),
        Node(u32),
    }
    struct Claim<'a> {
        site: At<'a>,
        pos: Pos,
        host_of: Option<Option<&'a str>>, // Some(node) for HostEndpoints
        node_name: Option<&'a str>,       // Some(name) for Nodes
    }
    let claim_of = |c: Claimant, i: usize| -> Claim<'_> {
        let (origin, site, host_of, node_name) = match c {
            Claimant::Endpoint(k) => {
                let (e, site) = &parsed.endpoints[k as usize];
                let host_of = (e.kind == EndpointKind::Host).then_some(e.node.as_deref());
                (&e.origin, &**site, host_of, None)
            }
            Claimant::Node(k) => {
                let (n, site) = &parsed.nodes[k as usize];
                (&n.origin, site, None, Some(n.name.as_str()))
            }
        };
        Claim {
            site: At { origin, site },
            pos: site.addr_pos.get(i).copied().unwrap_or(site.name_pos),
            host_of,
            node_name,
        }
    };
    let mut claims: FastMap<IpAddr, (Claimant, u32)> = FastMap::default();
    claims.reserve(parsed.endpoints.len());
    let endpoint_addrs = (parsed.endpoints.iter().enumerate())
        .map(|(k, (e, _))| (Claimant::Endpoint(k as u32), &e.addresses));
    let node_addrs = (parsed.nodes.iter().enumerate())
        .map(|(k, (n, _))| (Claimant::Node(k as u32), &n.addresses));
    for (who, addrs) in endpoint_addrs.chain(node_addrs) {
        for (i, addr) in addrs.iter().enumerate() {
            let Some(&(first_who, first_i)) = claims.get(addr) else {
                claims.insert(*addr, (who, i as u32));
                continue;
            };
            let (first, claim) = (claim_of(first_who, first_i as usize), claim_of(who, i));
            let shared_ok = |h: &Claim<'_>, n: &Claim<'_>| match (h.host_of, n.node_name) {
                (Some(None), Some(_)) => true,
                (Some(Some(hn)), Some(nn)) => hn == nn,
                _ => false,
            };
            if shared_ok(&first, &claim) || shared_ok(&claim, &first) {
                continue;
            }
            problems.push(claim.site.problem(
                claim.pos,
                &format!("spec.addresses[{i}]"),
                format!(
                    "address {addr} is already claimed by {} at {}; an address belongs to one endpoint",
                    first.site.object(),
                    first.site.at(first.pos)
                ),
            ));
        }
    }
    // Interfaces: one enforcement point per (node, interface).
    let mut ifaces: HashMap<(Option<&str>, &str), At<'_>> = HashMap::new();
    for (e, site) in &parsed.endpoints {
        if let Some(Interface::Name(name)) = &e.interface {
            let here = At {
                origin: &e.origin,
                site,
            };
            let key = (e.node.as_deref(), name.as_str());
            if let Some(first) = ifaces.get(&key) {
                problems.push(here.problem(
                    site.iface_pos,
                    "spec.interface",
                    format!(
                        "interface {name} is already used by {} at {}; one interface enforces one endpoint",
                        first.object(),
                        first.at(first.site.iface_pos)
                    ),
                ));
            } else {
                ifaces.insert(key, here);
            }
        }
    }
    parsed.problems.extend(problems);
}

/// Keys and how many objects hold each: the maps of [`PolicyIndex`] and
/// [`RegistryIndex`].
#[derive(Debug)]
struct Holders<K>(FastMap<K, u32>);

impl<K: std::hash::Hash + Eq> Holders<K> {
    fn with_capacity(n: usize) -> Holders<K> {
        let mut map = FastMap::default();
        map.reserve(n);
        Holders(map)
    }

    /// One more holder of `key` (`hold`), or one fewer: `false` when a
    /// holder is added to a key that had one.
    fn count(&mut self, key: K, hold: bool) -> bool {
        if hold {
            let n = self.0.entry(key).or_insert(0);
            *n += 1;
            return *n == 1;
        }
        if let Some(n) = self.0.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&key);
            }
        }
        true
    }
}

/// The keys [`check_policies`] holds unique across the policy files (names
/// per kind and namespace), and each namespaced name's holders (two of other
/// kinds are a warning), kept between loads as [`RegistryIndex`] is. Kept only
/// for a set without such a warning, so that a change whose names are all new
/// needs no check at all.
#[derive(Debug)]
pub(crate) struct PolicyIndex {
    keys: Holders<(Name, Option<Name>, Name)>,
    names: Holders<(Name, Name)>,
}

impl PolicyIndex {
    fn of(parsed: &Parsed) -> Option<PolicyIndex> {
        let n = parsed.policies.len();
        let mut index = PolicyIndex {
            keys: Holders::with_capacity(n),
            names: Holders::with_capacity(n),
        };
        index.count(parsed, true).then_some(index)
    }

    /// Hold the keys of `p` (a file's parse) as well, or no longer (`hold`
    /// false): `false` when one held was held already.
    fn count(&mut self, p: &Parsed, hold: bool) -> bool {
        let mut fresh = true;
        for (pol, _) in &p.policies {
            let o = &pol.origin;
            let key = (o.kind.clone(), o.namespace.clone(), o.name.clone());
            fresh &= self.keys.count(key, hold);
            if let Some(ns) = &o.namespace {
                fresh &= self.names.count((ns.clone(), o.name.clone()), hold);
            }
        }
        fresh
    }
}

/// The cross-file keys of a kind's last valid set ([`PolicyIndex`],
/// [`RegistryIndex`]): a load given the touched files takes their old keys
/// out and adds their new ones, and when every one is new the set needs no
/// cross-file check (it would find nothing); else the whole set is checked.
#[derive(Debug)]
pub(crate) enum SetIndex {
    Policies(PolicyIndex),
    Registry(RegistryIndex),
}

impl SetIndex {
    /// The index of a valid set (`None` for a policy set with a duplicate
    /// name warning).
    pub(crate) fn of(want: FileKind, parsed: &Parsed) -> Option<SetIndex> {
        match want {
            FileKind::Policy => PolicyIndex::of(parsed).map(SetIndex::Policies),
            FileKind::Registry => Some(SetIndex::Registry(RegistryIndex::of(parsed))),
        }
    }

    /// Hold the keys of a file's parse as well: `false` when one was held.
    pub(crate) fn add(&mut self, p: &Parsed) -> bool {
        self.count(p, true)
    }

    /// No longer hold the keys of a file's parse that was added.
    pub(crate) fn remove(&mut self, p: &Parsed) {
        self.count(p, false);
    }

    fn count(&mut self, p: &Parsed, hold: bool) -> bool {
        match self {
            SetIndex::Policies(i) => i.count(p, hold),
            SetIndex::Registry(i) => i.count(p, hold),
        }
    }
}

/// The keys [`check_registry`] holds unique across a registry's files (names
/// per kind and namespace, addresses, interfaces per node), kept between loads
/// so that a change to a few files is checked against the others without
/// looking at them: a load through the cache removes the changed files' old
/// keys and adds their new ones. A key added that is already held (an address
/// a HostEndpoint shares with its Node included) is not judged here: the load
/// checks the whole set then, so what it reports is what a full check reports.
#[derive(Debug)]
pub(crate) struct RegistryIndex {
    names: Holders<(Name, Option<Name>, Name)>,
    /// Two claims for an address a HostEndpoint shares with its Node.
    addrs: Holders<IpAddr>,
    ifaces: Holders<(Option<Name>, String)>,
}

impl RegistryIndex {
    /// The keys of a valid registry.
    fn of(parsed: &Parsed) -> RegistryIndex {
        let n = parsed.endpoints.len();
        let mut index = RegistryIndex {
            names: Holders::with_capacity(n + parsed.nodes.len()),
            addrs: Holders::with_capacity(n * 2),
            ifaces: Holders::with_capacity(0),
        };
        index.count(parsed, true);
        index
    }

    fn origins(p: &Parsed) -> impl Iterator<Item = &Origin> {
        let endpoints = p.endpoints.iter().map(|(e, _)| &e.origin);
        let nodes = p.nodes.iter().map(|(n, _)| &n.origin);
        endpoints
            .chain(nodes)
            .chain(p.namespaces.iter().map(|(n, _)| &n.origin))
    }

    fn addresses(p: &Parsed) -> impl Iterator<Item = &IpAddr> {
        let endpoints = p.endpoints.iter().flat_map(|(e, _)| &e.addresses);
        endpoints.chain(p.nodes.iter().flat_map(|(n, _)| &n.addresses))
    }

    fn interfaces(p: &Parsed) -> impl Iterator<Item = (&Option<Name>, &String)> {
        p.endpoints.iter().filter_map(|(e, _)| match &e.interface {
            Some(Interface::Name(name)) => Some((&e.node, name)),
            _ => None,
        })
    }

    /// Hold the keys of `p` (a file's parse) as well, or no longer (`hold`
    /// false): `false` when one held was held already.
    fn count(&mut self, p: &Parsed, hold: bool) -> bool {
        let mut fresh = true;
        for o in Self::origins(p) {
            let key = (o.kind.clone(), o.namespace.clone(), o.name.clone());
            fresh &= self.names.count(key, hold);
        }
        for a in Self::addresses(p) {
            fresh &= self.addrs.count(*a, hold);
        }
        for (node, name) in Self::interfaces(p) {
            fresh &= self.ifaces.count((node.clone(), name.clone()), hold);
        }
        fresh
    }
}

/// 1-based line and column (in characters) of byte offset `at`, which must lie
/// on a character boundary of valid UTF-8 up to it.
fn line_col(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (
        line,
        String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1,
    )
}

/// Cut `text` to `max` characters, saying how much was left out.
fn clip(text: &mut String, max: usize) {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        let rest = text[cut..].chars().count();
        text.truncate(cut);
        text.push_str(&format!("... ({rest} more characters)"));
    }
}

impl Parsed {
    /// The warnings, in the order problems are reported in.
    pub fn take_warnings(&mut self) -> Vec<Warning> {
        let mut order: HashMap<&Path, usize> = HashMap::new();
        for f in &self.files {
            let n = order.len();
            order.entry(f).or_insert(n);
        }
        let mut warnings = std::mem::take(&mut self.warnings);
        for w in &mut warnings {
            clip(&mut w.at.message, MAX_PROBLEM_TEXT);
            for name in [&mut w.at.field, &mut w.at.object].into_iter().flatten() {
                clip(name, MAX_PROBLEM_NAME);
            }
        }
        warnings.sort_by_cached_key(|w| {
            let p = &w.at;
            let file = order.get(p.file.as_path()).copied();
            (file, p.line, p.column, p.document, w.code)
        });
        warnings.dedup();
        warnings
    }

    pub fn into_policy_set(self) -> Result<PolicySet, Vec<Problem>> {
        if !self.problems.is_empty() {
            return Err(sorted(self.problems, self.files));
        }
        Ok(PolicySet {
            policies: self.policies.into_iter().map(|(p, _)| p).collect(),
        })
    }

    pub fn into_registry_set(self) -> Result<RegistrySet, Vec<Problem>> {
        if !self.problems.is_empty() {
            return Err(sorted(self.problems, self.files));
        }
        Ok(RegistrySet {
            endpoints: self.endpoints.into_iter().map(|(e, _)| e).collect(),
            nodes: self.nodes.into_iter().map(|(n, _)| n).collect(),
            namespaces: self.namespaces.into_iter().map(|(n, _)| n).collect(),
        })
    }
}

/// Problems in file order, then position; files keep the order they were read in.
fn sorted(problems: Vec<Problem>, files: Vec<PathBuf>) -> Vec<Problem> {
    // A map, not a list search: with 10,000 files all broken, a search per
    // comparison made this quadratic.
    let mut order: HashMap<PathBuf, usize> = HashMap::new();
    for f in files {
        let n = order.len();
        order.entry(f).or_insert(n);
    }
    for p in &problems {
        let n = order.len();
        order.entry(p.file.clone()).or_insert(n);
    }
    let mut problems = problems;
    for p in &mut problems {
        clip(&mut p.message, MAX_PROBLEM_TEXT);
        for name in [&mut p.field, &mut p.object].into_iter().flatten() {
            clip(name, MAX_PROBLEM_NAME);
        }
    }
    problems.sort_by_cached_key(|p| {
        (
            order.get(&p.file).copied(),
            p.line.unwrap_or(0),
            p.column.unwrap_or(0),
            p.document,
        )
    });
    problems.dedup();
    problems
}

// ---------------------------------------------------------------- files and directories

/// Whether a directory entry name is one netpol reads.
pub fn wanted_name(name: &str) -> bool {
    if name.starts_with('.')
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
    {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".swp") || lower.ends_with(".tmp") {
        return false;
    }
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

fn file_problem(file: &Path, msg: String) -> Problem {
    problem(file, None, None, None, None, msg)
}

/// The files of `dir` netpol reads, sorted, with whether each entry is a
/// symlink (from the directory listing itself, no extra system call where the
/// filesystem reports types).
fn list_dir_entries(dir: &Path, what: &str) -> Result<Vec<(PathBuf, bool)>, Problem> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(file_problem(dir, format!("{what} does not exist")));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(file_problem(dir, format!("{what} is not a directory")));
        }
        Err(e) => return Err(file_problem(dir, format!("cannot read {what}: {e}"))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| file_problem(dir, format!("cannot read {what}: {e}")))?;
        let name = entry.file_name();
        if wanted_name(&name.to_string_lossy()) {
            let link = entry.file_type().is_ok_and(|t| t.is_symlink());
            files.push((entry.path(), link));
        }
    }
    files.sort();
    Ok(files)
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Why `meta` (of `shown`, called `what` in the message) cannot be trusted, if it
/// cannot: owned by someone other than root or `euid`, or writable by group or others.
fn distrust(what: &str, shown: &Path, meta: &fs::Metadata, euid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mode = meta.mode() & 0o7777;
    let writers = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("group and others"),
        (true, false) => Some("group"),
        (false, true) => Some("others"),
        (false, false) => None,
    };
    if let Some(w) = writers {
        out.push(format!(
            "{what} is writable by {w} (mode {mode:04o}), so someone other than its owner could change what netpol enforces; run chmod go-w {}",
            shown.display()
        ));
    }
    let uid = meta.uid();
    if uid != 0 && uid != euid {
        out.push(format!(
            "{what} is owned by uid {uid}, which is neither root nor the user reading it (uid {euid}); run chown root {}",
            shown.display()
        ));
    }
    out
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Trust problems of a directory read (`what`: "policy directory", ...).
fn check_dir_trust(dir: &Path, what: &str) -> Vec<Problem> {
    match fs::metadata(dir) {
        Ok(meta) => distrust(what, dir, &meta, euid())
            .into_iter()
            .map(|m| file_problem(dir, m))
            .collect(),
        Err(_) => Vec::new(), // listing the directory reports it
    }
}

/// Read one file under the size limit; only regular files, never blocking on
/// a FIFO. Strict modes: the file must pass the trust check (see the module
/// doc). Returns every problem of the file (at least one on error).
fn read_file_with(path: &Path, opts: &LoadOptions) -> Result<String, Vec<Problem>> {
    let lmeta = fs::symlink_metadata(path)
        .map_err(|e| vec![file_problem(path, format!("cannot read: {e}"))])?;
    let is_link = lmeta.file_type().is_symlink();
    let f = open_regular(path, lmeta).map_err(|p| vec![p])?;
    if opts.strict_modes {
        let euid = euid();
        let fmeta = f
            .metadata()
            .map_err(|e| vec![file_problem(path, format!("cannot read: {e}"))])?;
        let mut problems = Vec::new();
        if is_link {
            match fs::canonicalize(path) {
                Ok(target) => {
                    problems.extend(distrust(
                        &format!("symlink target {}", target.display()),
                        &target,
                        &fmeta,
                        euid,
                    ));
                    if let Some(parent) = target.parent() {
                        if let Ok(pmeta) = fs::metadata(parent) {
                            problems.extend(distrust(
                                &format!(
                                    "directory {} holding the symlink target",
                                    parent.display()
                                ),
                                parent,
                                &pmeta,
                                euid,
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!("symlink target cannot be resolved: {e}")),
            }
        } else {
            problems.extend(distrust("file", path, &fmeta, euid));
        }
        if !problems.is_empty() {
            return Err(problems
                .into_iter()
                .map(|m| file_problem(path, m))
                .collect());
        }
    }
    read_open(path, f).map_err(|p| vec![p])
}

/// Open `path` (whose `symlink_metadata` is `lmeta`) for reading if it is, or
/// leads to, a regular file under the size limit.
fn open_regular(path: &Path, lmeta: fs::Metadata) -> Result<fs::File, Problem> {
    let meta = if lmeta.file_type().is_symlink() {
        fs::metadata(path)
            .map_err(|e| file_problem(path, format!("symlink target cannot be read: {e}")))?
    } else {
        lmeta
    };
    if !meta.is_file() {
        return Err(file_problem(
            path,
            format!(
                "{} is not read: only regular files are policy or registry files",
                kind_of(&meta.file_type())
            ),
        ));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(file_problem(
            path,
            format!(
                "file is {} bytes; the limit is {MAX_FILE_SIZE} bytes (4 MiB)",
                meta.len()
            ),
        ));
    }
    // O_NONBLOCK: if the file was swapped for a FIFO since the check, open must not hang.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| file_problem(path, format!("cannot open: {e}")))?;
    let fmeta = f
        .metadata()
        .map_err(|e| file_problem(path, format!("cannot read: {e}")))?;
    if !fmeta.is_file() {
        return Err(file_problem(
            path,
            format!(
                "{} is not read: only regular files are policy or registry files",
                kind_of(&fmeta.file_type())
            ),
        ));
    }
    Ok(f)
}

/// Read an opened regular file: size limit, UTF-8.
fn read_open(path: &Path, f: fs::File) -> Result<String, Problem> {
    let mut buf = Vec::new();
    f.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| file_problem(path, format!("cannot read: {e}")))?;
    if buf.len() as u64 > MAX_FILE_SIZE {
        return Err(file_problem(
            path,
            format!("file is larger than the limit of {MAX_FILE_SIZE} bytes (4 MiB)"),
        ));
    }
    if buf.starts_with(&[0xff, 0xfe]) || buf.starts_with(&[0xfe, 0xff]) {
        return Err(file_problem(
            path,
            "file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8".into(),
        ));
    }
    match String::from_utf8(buf) {
        Ok(s) => Ok(s),
        Err(e) => {
            let (line, col) = line_col(e.as_bytes(), e.utf8_error().valid_up_to());
            Err(Problem {
                file: path.to_path_buf(),
                line: Some(line),
                column: Some(col),
                document: None,
                object: None,
                field: None,
                message: "file is not valid UTF-8".into(),
            })
        }
    }
}

/// One directory as a load lists it.
#[derive(Debug, Clone)]
pub(crate) struct DirListing {
    pub dir: PathBuf,
    /// The files netpol reads, sorted, each with whether it is a symlink; or
    /// why the directory could not be listed.
    pub files: Result<Vec<(PathBuf, bool)>, Problem>,
    /// Why the directory cannot be trusted (strict modes), if it cannot.
    pub distrust: Vec<Problem>,
}

fn dir_what(want: FileKind) -> &'static str {
    match want {
        FileKind::Policy => "policy directory",
        FileKind::Registry => "endpoint directory",
    }
}

/// List every directory of `dirs`, and under strict modes check that each one
/// listed can be trusted.
pub(crate) fn list_dirs(dirs: &[PathBuf], want: FileKind, opts: &LoadOptions) -> Vec<DirListing> {
    let what = dir_what(want);
    dirs.iter()
        .map(|dir| {
            let files = list_dir_entries(dir, what);
            let distrust = match &files {
                Ok(_) if opts.strict_modes => check_dir_trust(dir, what),
                _ => Vec::new(),
            };
            DirListing {
                dir: dir.clone(),
                files,
                distrust,
            }
        })
        .collect()
}

/// The steps of every load, with or without a cache: the listed files in
/// order, each parsed into the result by `file`, then the cross-file checks. A
/// directory that cannot be listed is its problem; an untrusted one is
/// reported (before its files) and its files are read and reported too, so
/// one look shows every problem.
pub(crate) fn assemble(
    listing: &[DirListing],
    want: FileKind,
    file: impl FnMut(&Path, &mut Parsed),
) -> Parsed {
    let mut out = assemble_files(listing, file);
    check_set(want, &mut out);
    out
}

/// The cross-file checks of a kind over an assembled set.
pub(crate) fn check_set(want: FileKind, out: &mut Parsed) {
    match want {
        FileKind::Policy => check_policies(out),
        FileKind::Registry => check_registry(out),
    }
}

/// [`assemble`] without the cross-file checks (the caller makes them).
pub(crate) fn assemble_files(
    listing: &[DirListing],
    mut file: impl FnMut(&Path, &mut Parsed),
) -> Parsed {
    let mut out = Parsed::default();
    for d in listing {
        match &d.files {
            Err(p) => out.problems.push(p.clone()),
            Ok(files) => {
                if !d.distrust.is_empty() {
                    out.files.push(d.dir.clone()); // reported before its files
                    out.problems.extend(d.distrust.iter().cloned());
                }
                for (f, _) in files {
                    file(f, &mut out);
                }
            }
        }
    }
    out
}

/// Read and parse one file into `out`; a file that cannot be read is its problems.
pub(crate) fn read_into(f: &Path, want: FileKind, opts: &LoadOptions, out: &mut Parsed) {
    match read_file_with(f, opts) {
        Ok(text) => parse_text(f, &text, want, out),
        Err(ps) => {
            out.files.push(f.to_path_buf());
            out.problems.extend(ps);
        }
    }
}

/// Read and parse every file of `dirs` into one [`Parsed`]: the steps of
/// [`assemble`], each file read afresh. With a [`super::LoadCache`], see
/// [`super::load_dirs`].
pub fn load_dirs_with(dirs: &[PathBuf], want: FileKind, opts: &LoadOptions) -> Parsed {
    assemble(&list_dirs(dirs, want, opts), want, |f, out| {
        read_into(f, want, opts, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::Subject;

    const POLICIES: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: db}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{}]
";

    const ENDPOINTS: &str = "\
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: one, labels: {app: web}}
spec: {addresses: [10.0.0.1]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: two, labels: {app: web}}
spec: {addresses: [10.0.0.2]}
";

    fn subject(p: &Policy) -> &Selector {
        match &p.rules[0].subject {
            Subject::Endpoints(s) | Subject::Nodes(s) => s,
        }
    }

    /// Equal label text in one file is one copy: in selectors of different
    /// policies, and in different endpoints' labels.
    #[test]
    fn one_file_holds_one_copy_of_each_label_text() {
        let mut out = Parsed::default();
        parse_text(Path::new("p.yaml"), POLICIES, FileKind::Policy, &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let (a, b) = (&out.policies[0].0, &out.policies[1].0);
        let (ka, kb) = (
            &subject(a).requirements[0].key,
            &subject(b).requirements[0].key,
        );
        assert_eq!(ka.key, "app");
        assert!(ka.key.shares(&kb.key), "the key of both subjects");
        let Peers::List(peers) = &a.rules[0].ingress[0].peers else {
            panic!("a peer list")
        };
        let Peer::Endpoints(peer) = &peers[0] else {
            panic!("an endpoint peer")
        };
        let db_peer = peer.requirements[0].values.iter().next().unwrap();
        let db_subject = subject(b).requirements[0].values.iter().next().unwrap();
        assert_eq!(db_peer, "db");
        assert!(
            db_peer.shares(db_subject),
            "value db of a's peer and b's subject"
        );

        let mut out = Parsed::default();
        parse_text(Path::new("e.yaml"), ENDPOINTS, FileKind::Registry, &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let (one, two) = (&out.endpoints[0].0.labels, &out.endpoints[1].0.labels);
        let web = |ls: &[Label]| ls.iter().find(|l| l.key == "app").unwrap().clone();
        assert_eq!(web(one).value, "web");
        assert!(web(one).value.shares(&web(two).value));
        assert!(web(one).key.shares(&web(two).key));

        // The origins' text: one path, kind and namespace for the file, and
        // each endpoint's name and namespace are its origin's.
        let (one, two) = (&out.endpoints[0].0, &out.endpoints[1].0);
        assert!(Arc::ptr_eq(&one.origin.file, &two.origin.file));
        assert!(one.origin.kind.shares(&two.origin.kind));
        let (ns1, ns2) = (one.namespace.as_ref(), two.namespace.as_ref());
        assert_eq!(ns1.map(Name::as_str), Some("default"));
        assert!(ns1.unwrap().shares(ns2.unwrap()));
        assert!(ns1.unwrap().shares(one.origin.namespace.as_ref().unwrap()));
        assert!(one.name.shares(&one.origin.name));
    }

    /// Documents become objects one by one, yet a syntax error in a later
    /// document still refuses the whole file, earlier documents included.
    #[test]
    fn a_syntax_error_after_valid_documents_refuses_the_whole_file() {
        let text = format!("{POLICIES}---\nkind: [unclosed\n");
        let mut out = Parsed::default();
        parse_text(Path::new("p.yaml"), &text, FileKind::Policy, &mut out);
        assert!(
            out.policies.is_empty(),
            "kept {} policies",
            out.policies.len()
        );
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert!(out.problems[0].message.starts_with("YAML syntax error"));
        assert_eq!(out.problems[0].document, Some(3));
    }

    /// A file parsed in parts side by side gives what one parse gives: the
    /// same objects, problems and warnings with the same lines, columns and
    /// document numbers, whether the parts can be used (markers alone on
    /// their lines, an implicit first document or not) or the file is parsed
    /// as one after all (a syntax error or a duplicate key in a later part,
    /// an alias, markers with content after them).
    #[test]
    fn a_file_parsed_in_parts_gives_what_one_parse_gives() {
        let pol = |n: usize, extra: &str| {
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{n}}}\n\
                 spec: {{endpointSelector: {{matchLabels: {{app: a{n}}}}}, ingress: [{{fromCIDR: [{}]}}]}}\n{extra}",
                if n % 7 == 3 { "bogus" } else { "10.0.0.0/8" }
            )
        };
        let docs = |n: usize, sep: &str, extra: &dyn Fn(usize) -> String| {
            (0..n)
                .map(|k| pol(k, &extra(k)))
                .collect::<Vec<_>>()
                .join(sep)
        };
        let plain = docs(40, "---\n", &|_| String::new());
        let cases: Vec<(&str, String, bool)> = vec![
            ("implicit first document", plain.clone(), true),
            (
                "comments, then a marker first",
                format!("# head\n\n---\n{plain}"),
                true,
            ),
            (
                "a directive first",
                format!("%YAML 1.2\n---\n{plain}"),
                true,
            ),
            (
                "empty documents",
                docs(40, "---\n---\n", &|_| String::new()),
                true,
            ),
            (
                "unknown fields warned",
                docs(40, "---\n", &|k| format!("bogusField{k}: 1\n")),
                true,
            ),
            (
                "a syntax error late",
                format!("{plain}---\nkind: [unclosed\n"),
                false,
            ),
            (
                "a duplicate key late",
                format!("{plain}---\n{}spec: {{}}\n", pol(99, "")),
                false,
            ),
            (
                "an alias",
                format!("{plain}---\n{}", pol(98, "x: &a [1]\ny: *a\n")),
                false,
            ),
            (
                "markers with content",
                docs(40, "--- # next\n", &|_| String::new()),
                false,
            ),
        ];
        for (what, text, in_parts) in cases {
            let file = Path::new("p.yaml");
            let mut one = Parsed::default();
            parse_text_with(file, &text, FileKind::Policy, &mut one, usize::MAX);
            let mut parts = Parsed::default();
            parse_text_with(file, &text, FileKind::Policy, &mut parts, 0);
            assert_eq!(format!("{parts:?}"), format!("{one:?}"), "{what}");
            let arc: Arc<Path> = Arc::from(file);
            let used = parse_in_parts(&arc, &text, FileKind::Policy, 0).is_some();
            if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
                assert_eq!(used, in_parts, "{what}: parsed in parts");
            }
            assert!(
                !one.policies.is_empty() || !one.problems.is_empty(),
                "{what}"
            );
        }
    }

    /// A document's tree problem (a duplicate key) names its object, and comes
    /// before the problems found in the objects of the same file, as before
    /// documents were turned into objects one by one.
    #[test]
    fn tree_problems_name_their_object_and_come_first() {
        let text = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: first}
spec: {endpointSelector: {matchLabels: {app: a}}, ingress: [{fromCIDR: [bogus]}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: second}
spec: {endpointSelector: {}}
spec: {endpointSelector: {}}
";
        let mut out = Parsed::default();
        parse_text(Path::new("p.yaml"), text, FileKind::Policy, &mut out);
        assert!(out.problems.len() >= 2, "{:?}", out.problems);
        let first = &out.problems[0];
        assert_eq!(first.document, Some(2), "{first:?}");
        assert!(first.message.contains("duplicate"), "{first:?}");
        assert_eq!(
            first.object.as_deref(),
            Some("CiliumNetworkPolicy default/second"),
            "{first:?}"
        );
        assert!(
            out.problems[1..].iter().any(|p| p.document == Some(1)),
            "{:?}",
            out.problems
        );
    }
}
