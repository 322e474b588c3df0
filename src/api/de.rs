//! A serde `Deserializer` over the positioned tree of `api::yaml`, so that every
//! deserialization error (unknown field, wrong type, missing field) carries the
//! field path and the `line:column` of the node it is about.
//!
//! Type rules: a quoted scalar is always a string; a plain scalar is null
//! (`~`, `null`, empty), a boolean (`true`/`false`), an integer (`[-+]?[0-9]+`),
//! a float, or else a string. A string field accepts any non-null scalar as its
//! text, so `version: 1.10` stays "1.10".
//!
//! Kubernetes reads the same files differently in two ways, which a noted
//! deserialization ([`from_node_noted`]) records as [`Note`]s for policy files
//! (they become warnings, see `api::warn`): a string field written as an unquoted
//! number or boolean is refused there (it wants a string), and kubectl reads YAML
//! 1.1 (gopkg.in/yaml.v2 through sigs.k8s.io/yaml), where `yes`/`no`/`on`/`off`/
//! `y`/`n` are booleans and `010`, `0x1f`, `0o17`, `0b1`, `1_000` are numbers.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::warn::WarningCode;
use super::yaml::{join_index, join_key, Node, Pos, Value};

#[derive(Debug, Clone)]
pub struct DeError {
    pub message: String,
    pub pos: Option<Pos>,
    pub path: Option<String>,
}

impl DeError {
    fn new(message: impl Into<String>) -> Self {
        DeError {
            message: message.into(),
            pos: None,
            path: None,
        }
    }
    /// Attach a position and path unless a deeper node already did.
    fn at(mut self, pos: Pos, path: &str) -> Self {
        if self.pos.is_none() {
            self.pos = Some(pos);
            self.path = Some(path.to_string());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lw = word.to_ascii_lowercase();
    if let Some(c) = candidates.iter().find(|c| c.to_ascii_lowercase() == lw) {
        return Some(c);
    }
    if lw.len() >= 4 {
        if let Some(c) = candidates
            .iter()
            .find(|c| c.to_ascii_lowercase().starts_with(&lw))
        {
            return Some(c);
        }
    }
    candidates
        .iter()
        .map(|c| (distance(&lw, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(msg.to_string())
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(format!("expected {exp}, found {unexp}"))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut msg = format!("unknown field {field:?}");
        if let Some(s) = suggest(field, expected) {
            msg.push_str(&format!(" (did you mean {s:?}?)"));
        } else if expected.is_empty() {
            msg.push_str("; no fields are allowed here");
        } else {
            msg.push_str(&format!("; expected one of: {}", expected.join(", ")));
        }
        DeError::new(msg)
    }
    fn missing_field(field: &'static str) -> Self {
        DeError::new(format!("missing required field {field:?}"))
    }
    fn duplicate_field(field: &'static str) -> Self {
        DeError::new(format!("field {field:?} is written twice"))
    }
}

/// How a node reads to a human, for "expected X, found Y".
pub fn describe(node: &Node) -> String {
    match &node.value {
        Value::Null => "nothing (null)".into(),
        Value::Seq(_) => "a list".into(),
        Value::Map(_) => "a mapping".into(),
        Value::Scalar { text, plain } => match (plain, resolve(text)) {
            (true, Plain::Bool(_)) => format!("the boolean {text}"),
            (true, Plain::Int(_)) | (true, Plain::Float) => format!("the number {text}"),
            _ => format!("the string {text:?}"),
        },
    }
}

enum Plain {
    Bool(bool),
    Int(i128),
    Float,
    Str,
}

fn resolve(text: &str) -> Plain {
    match text {
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        ".inf" | "-.inf" | "+.inf" | ".Inf" | ".nan" | ".NaN" => return Plain::Float,
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = text.parse::<i128>() {
            return Plain::Int(n);
        }
    }
    let looks_float = digits.bytes().any(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && text.parse::<f64>().is_ok();
    if looks_float {
        Plain::Float
    } else {
        Plain::Str
    }
}

/// How YAML 1.1 (gopkg.in/yaml.v2 `resolve`, which sigs.k8s.io/yaml and so
/// kubectl use) reads a plain scalar, where that differs from [`resolve`]:
/// a boolean where netpol reads text, or another number, or a number where
/// netpol reads text.
enum Yaml11 {
    Bool(bool),
    Number(i128),
}

/// gopkg.in/yaml.v2 resolve.go: its boolean words (`resolveMapList`).
fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// gopkg.in/yaml.v2 resolve.go: a plain scalar starting with a digit or a sign
/// loses its underscores and goes through Go's `strconv.ParseInt(s, 0, 64)`
/// (`0x`, `0o`, `0b` prefixes; a leading `0` means octal).
fn yaml11_int(text: &str) -> Option<i128> {
    if !text.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-') {
        return None;
    }
    let plain = text.replace('_', "");
    let (neg, body) = match plain.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, plain.strip_prefix('+').unwrap_or(&plain)),
    };
    let (radix, digits) = if let Some(d) = body.strip_prefix("0x").or(body.strip_prefix("0X")) {
        (16, d)
    } else if let Some(d) = body.strip_prefix("0o").or(body.strip_prefix("0O")) {
        (8, d)
    } else if let Some(d) = body.strip_prefix("0b").or(body.strip_prefix("0B")) {
        (2, d)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..])
    } else {
        (10, body)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i128::from_str_radix(digits, radix).ok()?;
    let n = if neg { -n } else { n };
    (i128::from(i64::MIN)..=i128::from(u64::MAX))
        .contains(&n)
        .then_some(n)
}

fn yaml11(text: &str) -> Option<Yaml11> {
    if let Some(b) = yaml11_bool(text) {
        return Some(Yaml11::Bool(b));
    }
    let n = yaml11_int(text)?;
    match resolve(text) {
        Plain::Int(mine) if mine == n => None,
        Plain::Int(_) | Plain::Str => Some(Yaml11::Number(n)),
        _ => None,
    }
}

/// Something a noted deserialization saw that Kubernetes reads differently.
#[derive(Debug, Clone)]
pub struct Note {
    pub code: WarningCode,
    pub pos: Pos,
    pub path: String,
    pub message: String,
}

/// Where notes go while deserializing.
pub type Notes = RefCell<Vec<Note>>;

/// A plain scalar read as text (a string field, or an int-or-string read as a
/// string): is it a number or boolean to Kubernetes?
fn note_text(text: &str, string_field: bool) -> Option<(WarningCode, String)> {
    let what = match resolve(text) {
        Plain::Str => {
            let (code, what) = match yaml11(text)? {
                Yaml11::Bool(b) => (WarningCode::Yaml11Bool, format!("the boolean {b}")),
                Yaml11::Number(n) => (WarningCode::Yaml11Number, format!("the number {n}")),
            };
            return Some((
                code,
                format!("unquoted {text} is read as the string {text:?} here, but a Kubernetes client (YAML 1.1) reads it as {what}; write {text:?}"),
            ));
        }
        _ if !string_field => return None,
        Plain::Bool(_) => "a boolean",
        Plain::Int(_) | Plain::Float => "a number",
    };
    Some((
        WarningCode::NonString,
        format!("unquoted {text} is read as the string {text:?} here, but Kubernetes reads it as {what} and refuses it (this field is a string); write {text:?}"),
    ))
}

/// A plain scalar read as a number: does YAML 1.1 read another number?
fn note_number(text: &str) -> Option<(WarningCode, String)> {
    match (resolve(text), yaml11(text)) {
        (Plain::Int(mine), Some(Yaml11::Number(theirs))) => Some((
            WarningCode::Yaml11Number,
            format!("unquoted {text} is read as {mine} here, but a Kubernetes client (YAML 1.1) reads it as the octal number {theirs}; drop the leading zero"),
        )),
        _ => None,
    }
}

/// A plain mapping key: does YAML 1.1 make it another key?
fn note_key(text: &str) -> Option<(WarningCode, String)> {
    let (code, what, key) = match yaml11(text)? {
        Yaml11::Bool(b) => (
            WarningCode::Yaml11Bool,
            format!("the boolean {b}"),
            b.to_string(),
        ),
        Yaml11::Number(n) => (
            WarningCode::Yaml11Number,
            format!("the number {n}"),
            n.to_string(),
        ),
    };
    Some((
        code,
        format!("unquoted key {text} is read as {text:?} here, but a Kubernetes client (YAML 1.1) reads it as {what}, the key {key:?}; write {text:?}"),
    ))
}

/// Deserialize `T` from `node`, whose field path is `path`.
pub fn from_node<'de, T: Deserialize<'de>>(node: &'de Node, path: &str) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: path.to_string(),
        notes: None,
    })
}

/// [`from_node`], recording in `notes` every plain scalar Kubernetes reads
/// differently (see the module doc).
pub fn from_node_noted<'de, T: Deserialize<'de>>(
    node: &'de Node,
    path: &str,
    notes: &'de Notes,
) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: path.to_string(),
        notes: Some(notes),
    })
}

pub struct NodeDe<'a> {
    node: &'a Node,
    path: String,
    notes: Option<&'a Notes>,
}

impl<'a> NodeDe<'a> {
    fn err(&self, expected: &str) -> DeError {
        DeError::new(format!(
            "expected {expected}, found {}",
            describe(self.node)
        ))
        .at(self.node.pos, &self.path)
    }

    fn note(&self, found: Option<(WarningCode, String)>) {
        if let (Some(notes), Some((code, message))) = (self.notes, found) {
            notes.borrow_mut().push(Note {
                code,
                pos: self.node.pos,
                path: self.path.clone(),
                message,
            });
        }
    }
}

macro_rules! int_method {
    ($name:ident) => {
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            match &self.node.value {
                Value::Scalar { text, plain: true } => match resolve(text) {
                    Plain::Int(n) => {
                        self.note(note_number(text));
                        let r = if n < 0 {
                            match i64::try_from(n) {
                                Ok(v) => visitor.visit_i64(v),
                                Err(_) => return Err(self.err("a smaller integer")),
                            }
                        } else {
                            match u64::try_from(n) {
                                Ok(v) => visitor.visit_u64(v),
                                Err(_) => return Err(self.err("a smaller integer")),
                            }
                        };
                        r.map_err(|e: DeError| e.at(self.node.pos, &self.path))
                    }
                    _ => Err(self.err("an integer")),
                },
                _ => Err(self.err("an integer")),
            }
        }
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Value::Scalar { text, plain: true } = &self.node.value {
            if matches!(resolve(text), Plain::Int(_)) {
                self.note(note_number(text));
            }
        }
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Scalar { text, plain: false } => visitor.visit_str(text),
            Value::Scalar { text, plain: true } => match resolve(text) {
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Int(n) if n < 0 => match i64::try_from(n) {
                    Ok(v) => visitor.visit_i64(v),
                    Err(_) => visitor.visit_str(text),
                },
                Plain::Int(n) => match u64::try_from(n) {
                    Ok(v) => visitor.visit_u64(v),
                    Err(_) => visitor.visit_str(text),
                },
                Plain::Float => match text.parse::<f64>() {
                    Ok(f) => visitor.visit_f64(f),
                    Err(_) => visitor.visit_str(text),
                },
                Plain::Str => {
                    self.note(note_text(text, false));
                    visitor.visit_str(text)
                }
            },
            Value::Seq(_) => return self.deserialize_seq(visitor),
            Value::Map(_) => return self.deserialize_map(visitor),
        };
        r.map_err(|e: DeError| e.at(self.node.pos, &self.path))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar { text, plain: true } => match resolve(text) {
                Plain::Bool(b) => visitor
                    .visit_bool(b)
                    .map_err(|e: DeError| e.at(self.node.pos, &self.path)),
                _ => Err(self.err("true or false")),
            },
            _ => Err(self.err("true or false")),
        }
    }

    int_method!(deserialize_i8);
    int_method!(deserialize_i16);
    int_method!(deserialize_i32);
    int_method!(deserialize_i64);
    int_method!(deserialize_u8);
    int_method!(deserialize_u16);
    int_method!(deserialize_u32);
    int_method!(deserialize_u64);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Value::Scalar { text, plain: true } = &self.node.value {
            self.note(note_text(text, true));
        }
        match &self.node.value {
            Value::Scalar { text, .. } => visitor
                .visit_str(text)
                .map_err(|e: DeError| e.at(self.node.pos, &self.path)),
            _ => Err(self.err("a string")),
        }
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.err("nothing (null)")),
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => {
                let access = Seq {
                    items: items.iter().enumerate(),
                    path: &self.path,
                    notes: self.notes,
                };
                let r = visitor.visit_seq(access);
                r.map_err(|e: DeError| e.at(self.node.pos, &self.path))
            }
            _ => Err(self.err("a list")),
        }
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _n: &'static str,
        _l: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => {
                let access = Map {
                    entries: entries.iter(),
                    path: &self.path,
                    value: None,
                    notes: self.notes,
                };
                visitor
                    .visit_map(access)
                    .map_err(|e: DeError| e.at(self.node.pos, &self.path))
            }
            _ => Err(self.err("a mapping")),
        }
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar { text, .. } => {
                let d: de::value::StrDeserializer<'_, DeError> = text.as_str().into_deserializer();
                visitor
                    .visit_enum(d)
                    .map_err(|e: DeError| e.at(self.node.pos, &self.path))
            }
            _ => Err(self.err("a string")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct Seq<'a, 'de, I> {
    items: I,
    path: &'a str,
    notes: Option<&'de Notes>,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'de Node)>> SeqAccess<'de> for Seq<'a, 'de, I> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => {
                let path = join_index(self.path, i);
                let de = NodeDe {
                    node,
                    path: path.clone(),
                    notes: self.notes,
                };
                seed.deserialize(de)
                    .map(Some)
                    .map_err(|e: DeError| e.at(node.pos, &path))
            }
        }
    }
}

struct Map<'a, 'de, I> {
    entries: I,
    path: &'a str,
    value: Option<(&'de Node, String)>,
    notes: Option<&'de Notes>,
}

impl<'de, 'a, I: Iterator<Item = &'de (Node, Node)>> MapAccess<'de> for Map<'a, 'de, I> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((k, v)) = self.entries.next() else {
            return Ok(None);
        };
        let key_text = match &k.value {
            Value::Scalar { text, .. } => text.clone(),
            Value::Null => String::new(),
            _ => {
                return Err(
                    DeError::new("a mapping key must be a plain string").at(k.pos, self.path)
                );
            }
        };
        let path = join_key(self.path, &key_text);
        if let (Some(notes), Value::Scalar { plain: true, .. }) = (self.notes, &k.value) {
            if let Some((code, message)) = note_key(&key_text) {
                notes.borrow_mut().push(Note {
                    code,
                    pos: k.pos,
                    path: path.clone(),
                    message,
                });
            }
        }
        let d: de::value::StringDeserializer<DeError> = key_text.into_deserializer();
        let key = seed
            .deserialize(d)
            .map_err(|e: DeError| e.at(k.pos, &path))?;
        self.value = Some((v, path));
        Ok(Some(key))
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (node, path) = self
            .value
            .take()
            .ok_or_else(|| DeError::new("value without a key"))?;
        let de = NodeDe {
            node,
            path: path.clone(),
            notes: self.notes,
        };
        seed.deserialize(de)
            .map_err(|e: DeError| e.at(node.pos, &path))
    }
}

/// A value written either as an integer or as a string (ports, ICMP types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<IntOrString, E> {
                Err(E::custom(format!(
                    "expected a whole number or a string, found the number {v}"
                )))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<IntOrString, E> {
                Err(E::custom(format!(
                    "expected a number or a string, found the boolean {v}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A field that netpol parses only to reject (proxy-only and cluster-only fields):
/// anything but null counts as present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present;

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::IgnoredAny::deserialize(d).map(|_| Present)
    }
}

#[cfg(test)]
mod tests {
    use super::super::yaml::parse_yaml;
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        name: String,
        #[serde(rename = "endPort")]
        end_port: Option<i64>,
        port: Option<IntOrString>,
        labels: Option<BTreeMap<String, String>>,
        #[allow(dead_code)]
        items: Option<Vec<Inner>>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(rename = "fromEndpoints")]
        _from_endpoints: Option<Vec<String>>,
    }

    fn parse(text: &str) -> Result<T, DeError> {
        let (docs, p) = parse_yaml(text);
        assert!(p.is_empty(), "{p:?}");
        from_node(&docs[0].root, "")
    }

    #[test]
    fn values() {
        let t = parse("name: 1.10\nendPort: 90\nport: \"80\"\nlabels: {a: true}\n").unwrap();
        assert_eq!(t.name, "1.10");
        assert_eq!(t.end_port, Some(90));
        assert_eq!(t.port, Some(IntOrString::Str("80".into())));
        assert_eq!(t.labels.unwrap()["a"], "true");
        let t = parse("name: x\nport: 80\n").unwrap();
        assert_eq!(t.port, Some(IntOrString::Int(80)));
    }

    #[test]
    fn yaml11_readings() {
        for (text, want) in [
            ("yes", Some("b true")),
            ("Off", Some("b false")),
            ("y", Some("b true")),
            ("true", None),
            ("010", Some("n 8")),
            ("-010", Some("n -8")),
            ("080", None), // not octal: 80 there too (as a float)
            ("0x1F", Some("n 31")),
            ("0o17", Some("n 15")),
            ("0b101", Some("n 5")),
            ("1_000", Some("n 1000")),
            ("+80", None),
            ("80", None),
            ("0", None),
            ("0x", None),
            ("web", None),
            ("1.5", None),
        ] {
            let got = yaml11(text).map(|y| match y {
                Yaml11::Bool(b) => format!("b {b}"),
                Yaml11::Number(n) => format!("n {n}"),
            });
            assert_eq!(got.as_deref(), want, "{text}");
        }
    }

    #[test]
    fn notes_only_when_noted() {
        let (docs, _) = parse_yaml("name: 5\nlabels: {yes: no}\nendPort: 010\n");
        assert!(from_node::<T>(&docs[0].root, "").is_ok());
        let notes = Notes::default();
        let t: T = from_node_noted(&docs[0].root, "", &notes).unwrap();
        assert_eq!(t.end_port, Some(10));
        let got: Vec<(String, WarningCode)> = notes
            .into_inner()
            .into_iter()
            .map(|n| (n.path, n.code))
            .collect();
        assert_eq!(
            got,
            [
                ("name".to_string(), WarningCode::NonString),
                ("labels.yes".to_string(), WarningCode::Yaml11Bool),
                ("labels.yes".to_string(), WarningCode::Yaml11Bool),
                ("endPort".to_string(), WarningCode::Yaml11Number),
            ]
        );
    }

    #[test]
    fn errors_have_paths_and_positions() {
        let e = parse("name: x\nitems:\n  - fromEndpoint: []\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("items[0].fromEndpoint"));
        assert_eq!(e.pos, Some(Pos { line: 3, col: 5 }));
        assert_eq!(
            e.message,
            "unknown field \"fromEndpoint\" (did you mean \"fromEndpoints\"?)"
        );
        let e = parse("endPort: 1\n").unwrap_err();
        assert_eq!(e.message, "missing required field \"name\"");
        assert_eq!(e.pos, Some(Pos { line: 1, col: 1 }));
        let e = parse("name: x\nendPort: \"90\"\n").unwrap_err();
        assert_eq!(e.message, "expected an integer, found the string \"90\"");
        assert_eq!(e.path.as_deref(), Some("endPort"));
        assert_eq!(e.pos, Some(Pos { line: 2, col: 10 }));
    }
}
