//! Multi-document YAML as `meshward inject` needs it: split without reparsing, parse into an
//! order-keeping tree, print back.
//!
//! The stream is cut at document markers (`---` and `...` at column 0), which the YAML spec
//! forbids inside any scalar, so cutting by line is exact. Each document keeps its original text:
//! one that inject does not change is written back byte for byte (comments and all); one it
//! changes is printed from the tree, with keys in their original order.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// One document of a YAML stream, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The marker line that opened it (`---`, `--- # comment`, `...`), newline included; empty
    /// for a first document written without one.
    pub marker: String,
    /// The document's text after the marker line.
    pub body: String,
    /// 1-based line of the input where `body` starts, for error messages.
    pub first_line: usize,
}

impl Document {
    /// Whether the document holds no node: only blank lines and comments.
    pub fn is_empty(&self) -> bool {
        inline_content(&self.marker).is_none()
            && self.body.lines().all(|line| {
                let line = line.trim();
                line.is_empty() || line.starts_with('#')
            })
    }

    /// The text to parse: the body, preceded by any node written on the marker line itself
    /// (`--- {kind: Service}` or `--- !tag`).
    pub fn source(&self) -> String {
        match inline_content(&self.marker) {
            // Spaces keep the columns (and so the error positions) of the marker line.
            Some(inline) => format!("   {inline}\n{}", self.body),
            None => self.body.clone(),
        }
    }

    /// Line (1-based) of the input where [`Document::source`] starts.
    pub fn source_first_line(&self) -> usize {
        if inline_content(&self.marker).is_some() {
            self.first_line.saturating_sub(1)
        } else {
            self.first_line
        }
    }
}

/// Cuts a YAML stream into its documents, keeping every byte: joining `marker + body` of all
/// documents gives the input back.
pub fn split(input: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = Document {
        marker: String::new(),
        body: String::new(),
        first_line: 1,
    };
    for (index, line) in input.split_inclusive('\n').enumerate() {
        if is_marker(line) {
            let next = Document {
                marker: line.to_owned(),
                body: String::new(),
                first_line: index + 2,
            };
            docs.push(std::mem::replace(&mut current, next));
        } else {
            current.body.push_str(line);
        }
    }
    docs.push(current);
    docs
}

/// A parsed YAML node, keeping mapping keys in their written order (Kubernetes reads keys as
/// strings, so they are kept as strings).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A string scalar.
    String(String),
    /// A sequence.
    Seq(Vec<Value>),
    /// A mapping, in written order.
    Map(Vec<(String, Value)>),
}

impl Value {
    /// The value under `key`, when this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value under `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value under `key`, created as `default` (appended, so written last) when missing or
    /// null. `None` when this is not a mapping.
    pub fn entry(&mut self, key: &str, default: Value) -> Option<&mut Value> {
        let Value::Map(entries) = self else {
            return None;
        };
        let position = match entries.iter().position(|(k, _)| k == key) {
            Some(position) => {
                if let Some((_, v @ Value::Null)) = entries.get_mut(position) {
                    *v = default;
                }
                position
            }
            None => {
                entries.push((key.to_owned(), default));
                entries.len() - 1
            }
        };
        entries.get_mut(position).map(|(_, v)| v)
    }

    /// The string, when this is a string scalar.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Converts a JSON value (what `k8s-openapi` types serialize to) into a tree node.
    pub fn from_json(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Value::Int(i),
                (None, Some(u), _) => Value::UInt(u),
                (None, None, Some(f)) => Value::Float(f),
                (None, None, None) => Value::Null,
            },
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(items) => {
                Value::Seq(items.into_iter().map(Value::from_json).collect())
            }
            serde_json::Value::Object(map) => Value::Map(
                map.into_iter()
                    .map(|(k, v)| (k, Value::from_json(v)))
                    .collect(),
            ),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::UInt(u) => serializer.serialize_u64(*u),
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::String(s) => serializer.serialize_str(s),
            Value::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Builds a [`Value`] from whatever the YAML parser found.
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format!("integer `{v}` is out of range")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(|v| i64::try_from(v).map_or(Value::UInt(v), Value::Int))
            .map_err(|_| E::custom(format!("integer `{v}` is out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        // Kubernetes has no binary scalars: Secret data is base64 text, not `!!binary`.
        Err(E::custom("binary (`!!binary`) scalars are not supported"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries: Vec<(String, Value)> = Vec::new();
        while let Some(key) = map.next_key::<Value>()? {
            // Kubernetes' YAML reader turns scalar keys into JSON strings; do the same.
            let key = match key {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Int(i) => i.to_string(),
                Value::UInt(u) => u.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Null => "null".to_owned(),
                Value::Seq(_) | Value::Map(_) => {
                    return Err(de::Error::custom(
                        "a mapping key must be a scalar (Kubernetes objects have string keys)",
                    ));
                }
            };
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom(format!("duplicate mapping key `{key}`")));
            }
            let value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// Whether `line` is a document marker: `---` or `...` at column 0, alone or followed by
/// white space.
fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    ["---", "..."].iter().any(|marker| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    })
}

/// A node written on a `---` line itself (`--- {a: 1}`), not a comment.
fn inline_content(marker: &str) -> Option<&str> {
    let rest = marker.strip_prefix("---")?.trim();
    (!rest.is_empty() && !rest.starts_with('#')).then_some(rest)
}
