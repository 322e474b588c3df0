//! A YAML (and JSON) document tree that remembers where every node was written.
//!
//! Built from yaml-rust2's marked event parser, so that both deserialization
//! errors and later validation errors can name `line:column`. Plain scalars keep
//! their text; their type (null, bool, int, string) is decided on demand by the
//! deserializer (`api::de`), which is why `port: 80` and `port: "80"` both work.
//!
//! Pure: no I/O.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column; `line == 0` means unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    pub fn known(self) -> Option<(usize, usize)> {
        (self.line > 0).then_some((self.line, self.col))
    }
    fn from_marker(m: &Marker) -> Pos {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    /// `~`, `null`, or nothing at all.
    Null,
    /// A scalar; `plain` is false for quoted or `!!str`-tagged scalars, which are
    /// always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    /// Text of a scalar node (quoted or not), `None` otherwise.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Position of the node at `path` (as produced by [`join_key`] / [`join_index`]),
    /// or of its deepest existing ancestor.
    pub fn pos_of(&self, path: &str) -> Pos {
        let mut node = self;
        let mut best = self.pos;
        for seg in split_path(path) {
            let next = match (&seg, &node.value) {
                (Seg::Key(k), Value::Map(entries)) => entries
                    .iter()
                    .find(|(kn, _)| kn.as_str() == Some(k))
                    .map(|(kn, v)| {
                        // A null value has no useful position of its own: point at its key.
                        if matches!(v.value, Value::Null) {
                            (kn, v)
                        } else {
                            (v, v)
                        }
                    }),
                (Seg::Index(i), Value::Seq(items)) => items.get(*i).map(|v| (v, v)),
                _ => None,
            };
            match next {
                Some((posnode, v)) => {
                    if posnode.pos.line > 0 {
                        best = posnode.pos;
                    }
                    node = v;
                }
                None => break,
            }
        }
        best
    }

    /// Position of the key `key` in this mapping (for errors about the key itself).
    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, _)| k.pos),
            _ => None,
        }
    }
}

/// One document of a file: its 1-based number and its root node.
#[derive(Debug)]
pub struct Doc {
    pub number: usize,
    pub root: Node,
}

/// A problem found while building the tree: position and message.
#[derive(Debug, Clone)]
pub struct TreeProblem {
    pub pos: Pos,
    pub document: Option<usize>,
    pub message: String,
}

/// Append a mapping key to a field path, quoting keys that are not plain words.
pub fn join_key(path: &str, key: &str) -> String {
    let simple = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), simple) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

pub fn join_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

enum Seg {
    Key(String),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let b: Vec<char> = path.chars().collect();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            '.' => i += 1,
            '[' => {
                if b.get(i + 1) == Some(&'"') {
                    // quoted key, Rust Debug escaping
                    let mut j = i + 2;
                    let mut s = String::new();
                    while j < b.len() && b[j] != '"' {
                        if b[j] == '\\' && j + 1 < b.len() {
                            j += 1;
                        }
                        s.push(b[j]);
                        j += 1;
                    }
                    out.push(Seg::Key(s));
                    i = j + 2; // skip `"]`
                } else {
                    let mut j = i + 1;
                    let mut n = String::new();
                    while j < b.len() && b[j] != ']' {
                        n.push(b[j]);
                        j += 1;
                    }
                    out.push(Seg::Index(n.parse().unwrap_or(usize::MAX)));
                    i = j + 1;
                }
            }
            _ => {
                let mut j = i;
                let mut s = String::new();
                while j < b.len() && b[j] != '.' && b[j] != '[' {
                    s.push(b[j]);
                    j += 1;
                }
                out.push(Seg::Key(s));
                i = j;
            }
        }
    }
    out
}

/// Deepest nesting of lists and mappings accepted. Real policies nest about ten
/// levels; the cap keeps every recursive walk of the tree (deserializer, drop)
/// far from the stack's end, whatever the input.
pub const MAX_DEPTH: usize = 64;

/// Most nodes that aliases (`*name`) may add to one file, counting every node of
/// every copy. Without a cap a few hundred bytes of nested aliases ("billion
/// laughs") expand to billions of nodes.
pub const MAX_ALIAS_NODES: usize = 10_000;

enum Frame {
    /// `size`: nodes in the frame so far, itself included.
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
        size: usize,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
        size: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    /// Anchored nodes with their size in nodes.
    anchors: HashMap<usize, (Node, usize)>,
    docs: Vec<Doc>,
    doc_count: usize,
    root: Option<Node>,
    problems: Vec<TreeProblem>,
    /// Nodes added by aliases in this file so far.
    alias_nodes: usize,
    /// Set when the input broke a limit: parsing stops, and this problem alone is reported.
    fatal: Option<TreeProblem>,
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

impl Builder {
    fn insert(&mut self, node: Node, node_size: usize) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, size, .. }) => {
                *size += node_size;
                items.push(node)
            }
            Some(Frame::Map {
                entries, key, size, ..
            }) => match key.take() {
                None => {
                    *size += node_size;
                    *key = Some(node)
                }
                Some(k) => {
                    *size += node_size;
                    entries.push((k, node))
                }
            },
        }
    }

    fn limit(&mut self, pos: Pos, message: String) {
        if self.fatal.is_none() {
            self.fatal = Some(TreeProblem {
                pos,
                document: Some(self.doc_count),
                message,
            });
        }
    }

    /// Tags change what a value means to other YAML readers (`!!binary` is
    /// base64 to Kubernetes, text here), so only `!!str` is accepted.
    fn check_tag(&mut self, tag: Option<&Tag>, pos: Pos, scalar: bool) {
        let Some(t) = tag else { return };
        let core = t.handle == "tag:yaml.org,2002:";
        if scalar && core && t.suffix == "str" {
            return;
        }
        let written = if core {
            format!("!!{}", t.suffix)
        } else {
            format!("{}{}", t.handle, t.suffix)
        };
        self.problems.push(TreeProblem {
            pos,
            document: Some(self.doc_count),
            message: format!("YAML tag {written:?} is not supported (only !!str is); remove it"),
        });
    }

    fn start(&mut self, frame: Frame, pos: Pos) {
        if self.stack.len() >= MAX_DEPTH {
            self.limit(
                pos,
                format!("lists and mappings nest deeper than {MAX_DEPTH} levels; a policy or registry file needs far fewer"),
            );
            return;
        }
        self.stack.push(frame);
    }

    fn check_duplicates(&mut self, entries: &[(Node, Node)]) {
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for (k, _) in entries {
            match &k.value {
                Value::Scalar { text, .. } => {
                    if let Some(first) = seen.get(text.as_str()) {
                        self.problems.push(TreeProblem {
                            pos: k.pos,
                            document: Some(self.doc_count),
                            message: format!(
                                "duplicate key {text:?} (first written at line {} column {}); each key may appear once",
                                first.line, first.col
                            ),
                        });
                    } else {
                        seen.insert(text, k.pos);
                    }
                }
                Value::Null => {}
                _ => self.problems.push(TreeProblem {
                    pos: k.pos,
                    document: Some(self.doc_count),
                    message: "a mapping key must be a plain string, not a list or mapping".into(),
                }),
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(&mark);
        match ev {
            Event::DocumentStart => {
                self.doc_count += 1;
                self.root = None;
                self.anchors.clear();
            }
            Event::DocumentEnd => {
                if let Some(root) = self.root.take() {
                    if !matches!(root.value, Value::Null) {
                        self.docs.push(Doc {
                            number: self.doc_count,
                            root,
                        });
                    }
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.check_tag(tag.as_ref(), pos, true);
                let str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == TScalarStyle::Plain && !str_tag;
                let value = if plain && is_null(&text) {
                    Value::Null
                } else {
                    Value::Scalar { text, plain }
                };
                let node = Node { pos, value };
                if anchor > 0 {
                    self.anchors.insert(anchor, (node.clone(), 1));
                }
                self.insert(node, 1);
            }
            Event::Alias(id) => {
                let (value, size) = match self.anchors.get(&id) {
                    Some((n, size)) => (n.value.clone(), *size),
                    None => (Value::Null, 1),
                };
                self.alias_nodes = self.alias_nodes.saturating_add(size);
                if self.alias_nodes > MAX_ALIAS_NODES {
                    self.limit(
                        pos,
                        format!(
                            "aliases expand to more than {MAX_ALIAS_NODES} nodes (nested aliases, as in a \"billion laughs\" file?); write the repeated parts out"
                        ),
                    );
                    return;
                }
                self.insert(Node { pos, value }, size);
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_tag(tag.as_ref(), pos, false);
                self.start(
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                        size: 1,
                    },
                    pos,
                )
            }
            Event::MappingStart(anchor, tag) => {
                self.check_tag(tag.as_ref(), pos, false);
                self.start(
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                        size: 1,
                    },
                    pos,
                )
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq {
                    pos,
                    anchor,
                    items,
                    size,
                }) = self.stack.pop()
                {
                    let node = Node {
                        pos,
                        value: Value::Seq(items),
                    };
                    if anchor > 0 {
                        self.anchors.insert(anchor, (node.clone(), size));
                    }
                    self.insert(node, size);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    size,
                    ..
                }) = self.stack.pop()
                {
                    self.check_duplicates(&entries);
                    // A block mapping's start mark lies after its first key; the
                    // first key is where a reader looks for it.
                    let pos = match entries.first() {
                        Some((k, _))
                            if k.pos.line > 0 && (k.pos.line, k.pos.col) < (pos.line, pos.col) =>
                        {
                            k.pos
                        }
                        _ => pos,
                    };
                    let node = Node {
                        pos,
                        value: Value::Map(entries),
                    };
                    if anchor > 0 {
                        self.anchors.insert(anchor, (node.clone(), size));
                    }
                    self.insert(node, size);
                }
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

/// Parse YAML text (one or more documents) into trees. Empty documents are
/// skipped but still counted, so document numbers match what a reader counts.
/// A syntax error ends parsing and is returned alone with the documents' problems.
pub fn parse_yaml(text: &str) -> (Vec<Doc>, Vec<TreeProblem>) {
    let mut docs = Vec::new();
    let (whole, problems) = parse_yaml_each(text, &mut |doc, _| docs.push(doc));
    if !whole {
        docs.clear();
    }
    (docs, problems)
}

/// [`parse_yaml`], handing each document to `on_doc` as soon as it ends, with
/// the problems found so far (so a caller can turn it into objects and drop
/// its tree before the next is built: a file of 10,000 documents never holds
/// 10,000 trees). Returns whether the file was read to its end, and the
/// problems. `false` (a syntax error, or a limit broken) refuses the file
/// whole, as [`parse_yaml`] does: what `on_doc` was given must be discarded.
pub fn parse_yaml_each(
    text: &str,
    on_doc: &mut dyn FnMut(Doc, &[TreeProblem]),
) -> (bool, Vec<TreeProblem>) {
    let each = parse_yaml_each_from(text, 0, on_doc);
    (each.whole, each.problems)
}

/// What [`parse_yaml_each_from`] found besides the documents.
pub struct Each {
    /// No syntax error or broken limit (the file is not refused whole).
    pub whole: bool,
    pub problems: Vec<TreeProblem>,
    /// Documents started (empty ones included): the number of the last.
    pub documents: usize,
    /// Nodes that aliases added (what [`MAX_ALIAS_NODES`] bounds per file).
    pub alias_nodes: usize,
}

/// [`parse_yaml_each`] of a part of a file whose documents before it number
/// `doc_base` (its documents are numbered on from there).
pub fn parse_yaml_each_from(
    text: &str,
    doc_base: usize,
    on_doc: &mut dyn FnMut(Doc, &[TreeProblem]),
) -> Each {
    let mut b = Builder {
        doc_count: doc_base,
        ..Builder::default()
    };
    let (whole, problems) = build_each(&mut b, text, on_doc);
    Each {
        whole,
        problems,
        documents: b.doc_count - doc_base,
        alias_nodes: b.alias_nodes,
    }
}

fn build_each(
    b: &mut Builder,
    text: &str,
    on_doc: &mut dyn FnMut(Doc, &[TreeProblem]),
) -> (bool, Vec<TreeProblem>) {
    let mut parser = Parser::new_from_str(text);
    // Events are pulled one by one rather than through `Parser::load`, which
    // recurses once per nesting level and so overflows the stack on deeply
    // nested input before any limit of ours could step in.
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, mark)) => b.on_event(ev, mark),
            Err(e) => {
                let m = e.marker();
                b.problems.push(TreeProblem {
                    pos: Pos {
                        line: m.line(),
                        col: m.col() + 1,
                    },
                    document: (b.doc_count > 0).then_some(b.doc_count),
                    message: format!("YAML syntax error: {}{}", e.info(), syntax_hint(e.info())),
                });
                return (false, std::mem::take(&mut b.problems));
            }
        }
        if let Some(p) = b.fatal.take() {
            return (false, vec![p]);
        }
        if !b.docs.is_empty() {
            for doc in b.docs.drain(..) {
                on_doc(doc, &b.problems);
            }
        }
    }
    (true, std::mem::take(&mut b.problems))
}

/// A hint for the YAML errors people hit most, all of them indentation.
fn syntax_hint(info: &str) -> &'static str {
    if info.contains("did not find expected key") || info.contains("mapping values are not allowed")
    {
        " (check the indentation of this line and the lines above it)"
    } else if info.contains("found character that cannot start any token") {
        " (tabs cannot indent YAML; use spaces)"
    } else if info.contains("did not find expected '-' indicator") {
        " (list items of one list must line up)"
    } else {
        ""
    }
}

/// Parse a JSON file: serde_json decides whether it is valid JSON (and names the
/// position of a syntax error); the tree with positions comes from the YAML
/// parser, since JSON is YAML. A file holds one document.
pub fn parse_json(text: &str) -> (Vec<Doc>, Vec<TreeProblem>) {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
        let msg = e.to_string();
        let msg = match msg.rfind(" at line ") {
            Some(i) => msg[..i].to_string(),
            None => msg,
        };
        return (
            Vec::new(),
            vec![TreeProblem {
                // serde_json counts columns from 0 at the very end of the input.
                pos: Pos {
                    line: e.line(),
                    col: e.column().max(1),
                },
                document: None,
                message: format!("JSON syntax error: {msg}"),
            }],
        );
    }
    let (docs, problems) = parse_yaml(text);
    if problems
        .iter()
        .any(|p| p.message.starts_with("YAML syntax error"))
    {
        // Valid JSON the YAML parser cannot read: fall back to a tree without positions.
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) if json_depth(&v) > MAX_DEPTH => {
                return (
                    Vec::new(),
                    vec![TreeProblem {
                        pos: Pos::default(),
                        document: None,
                        message: format!(
                            "lists and mappings nest deeper than {MAX_DEPTH} levels; a policy or registry file needs far fewer"
                        ),
                    }],
                );
            }
            Ok(v) => {
                let root = from_json(&v);
                let docs = if matches!(root.value, Value::Null) {
                    Vec::new()
                } else {
                    vec![Doc { number: 1, root }]
                };
                return (docs, Vec::new());
            }
            Err(_) => return (docs, problems),
        }
    }
    (docs, problems)
}

/// Nesting depth of a JSON value (serde_json itself stops at 128 levels).
fn json_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn from_json(v: &serde_json::Value) -> Node {
    let value = match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Scalar {
            text: b.to_string(),
            plain: true,
        },
        serde_json::Value::Number(n) => Value::Scalar {
            text: n.to_string(),
            plain: true,
        },
        serde_json::Value::String(s) => Value::Scalar {
            text: s.clone(),
            plain: false,
        },
        serde_json::Value::Array(a) => Value::Seq(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| {
                    (
                        Node {
                            pos: Pos::default(),
                            value: Value::Scalar {
                                text: k.clone(),
                                plain: false,
                            },
                        },
                        from_json(v),
                    )
                })
                .collect(),
        ),
    };
    Node {
        pos: Pos::default(),
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_paths() {
        let text = "a: 1\nb:\n  c: \"x\"\n  d: [1, 2]\n---\n---\n- k: v\n";
        let (docs, problems) = parse_yaml(text);
        assert!(problems.is_empty());
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].number, 1);
        assert_eq!(docs[1].number, 3);
        let root = &docs[0].root;
        assert_eq!(root.pos_of("b.d[1]"), Pos { line: 4, col: 10 });
        assert_eq!(root.pos_of("b.c"), Pos { line: 3, col: 6 });
        assert_eq!(root.pos_of("b"), Pos { line: 3, col: 3 });
        assert_eq!(root.pos_of("b.zz"), Pos { line: 3, col: 3 });
    }

    #[test]
    fn quoted_keys_in_paths() {
        let text = "m:\n  app.kubernetes.io/name: x\n";
        let (docs, _) = parse_yaml(text);
        let p = join_key("m", "app.kubernetes.io/name");
        assert_eq!(p, "m[\"app.kubernetes.io/name\"]");
        assert_eq!(docs[0].root.pos_of(&p), Pos { line: 2, col: 27 });
    }

    #[test]
    fn duplicate_keys() {
        let (_, problems) = parse_yaml("a: 1\na: 2\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pos, Pos { line: 2, col: 1 });
    }

    #[test]
    fn alias_expansion_is_capped() {
        // 10 aliases of a 1,001-node list: 10,010 nodes, just over the cap.
        let list = format!(
            "a: &l [{}]\nb: [{}]\n",
            ["x"; 1000].join(", "),
            ["*l"; 10].join(", ")
        );
        let (docs, problems) = parse_yaml(&list);
        assert!(docs.is_empty());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pos, Pos { line: 2, col: 41 }); // the tenth alias
        assert!(problems[0]
            .message
            .starts_with("aliases expand to more than 10000 nodes"));
        // Nine are fine, and the copies are real copies.
        let list = format!(
            "a: &l [{}]\nb: [{}]\n",
            ["x"; 1000].join(", "),
            ["*l"; 9].join(", ")
        );
        let (docs, problems) = parse_yaml(&list);
        assert!(problems.is_empty());
        match &docs[0].root.get("b").unwrap().value {
            Value::Seq(items) => assert!(items
                .iter()
                .all(|i| matches!(&i.value, Value::Seq(v) if v.len() == 1000))),
            _ => panic!("not a list"),
        }
    }

    #[test]
    fn depth_is_capped_without_recursion() {
        let ok = format!("{}x\n", "- ".repeat(MAX_DEPTH));
        assert!(parse_yaml(&ok).1.is_empty());
        let deep = format!("{}x\n", "- ".repeat(MAX_DEPTH + 1));
        let (_, problems) = parse_yaml(&deep);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].pos,
            Pos {
                line: 1,
                col: 2 * MAX_DEPTH + 1
            }
        );
        // Deeper than any stack would take through a recursive loader.
        let (_, problems) = parse_yaml(&"- ".repeat(1_000_000));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn tags_other_than_str_are_refused() {
        let (_, problems) = parse_yaml("a: !!str 1\nb: !!binary aGk=\nc: !x {}\nd: !!int 1\n");
        let msgs: Vec<_> = problems
            .iter()
            .map(|p| (p.pos.line, p.message.as_str()))
            .collect();
        assert_eq!(
            msgs,
            [
                (
                    2,
                    "YAML tag \"!!binary\" is not supported (only !!str is); remove it"
                ),
                (
                    3,
                    "YAML tag \"!x\" is not supported (only !!str is); remove it"
                ),
                (
                    4,
                    "YAML tag \"!!int\" is not supported (only !!str is); remove it"
                ),
            ]
        );
    }

    #[test]
    fn json_positions() {
        let (docs, problems) = parse_json("{\n\t\"a\": {\"b\": [1, 2]}\n}\n");
        assert!(problems.is_empty());
        assert_eq!(docs[0].root.pos_of("a.b[1]"), Pos { line: 2, col: 17 });
        let (_, problems) = parse_json("{\n  \"a\": 1,\n}\n");
        assert_eq!(problems[0].pos, Pos { line: 3, col: 1 });
    }
}
