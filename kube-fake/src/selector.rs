//! Label and field selectors as the API server parses them from `labelSelector=` and `fieldSelector=`.
//!
//! Label selectors support the full set-based grammar (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`,
//! `a`, `!a`); field selectors support `=`, `==` and `!=` over the field labels a kind registers. A
//! field that is absent compares as the empty string, as on the real server.

use serde_json::Value;
use thiserror::Error;

/// A selector that could not be parsed; the API server answers 400 Bad Request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectorError {
    /// A label selector term is not valid.
    #[error("unable to parse requirement: `{0}`")]
    Label(String),
    /// A field selector term has no operator.
    #[error("invalid field selector: `{0}`")]
    Field(String),
    /// The kind does not index this field.
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

/// One parsed label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses the `labelSelector` query value (already percent-decoded).
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_label_term(term)?);
        }
        Ok(Self(reqs))
    }

    /// Whether an object (its JSON form) satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        self.0.iter().all(|req| match req {
            LabelReq::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        })
    }
}

/// One parsed field requirement: the JSON pointer of the field, the value, and whether it must equal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    pointer: String,
    value: String,
    equals: bool,
}

/// A parsed field selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// Parses the `fieldSelector` query value against the field labels the kind supports
    /// (`metadata.name`, `spec.nodeName`, ...).
    pub fn parse(text: &str, supported: &[&str]) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, equals) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(SelectorError::Field(term.to_owned()));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(SelectorError::UnsupportedField(field.to_owned()));
            }
            reqs.push(FieldReq {
                pointer: format!("/{}", field.replace('.', "/")),
                value: value.trim().to_owned(),
                equals,
            });
        }
        Ok(Self(reqs))
    }

    /// Whether an object (its JSON form) satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|req| {
            let actual = match object.pointer(&req.pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == req.value) == req.equals
        })
    }
}

/// Splits on commas that are not inside `( )`, so `a in (x,y),b` is two terms.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(text.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(text.get(start..).unwrap_or_default());
    terms
}

fn parse_label_term(term: &str) -> Result<LabelReq, SelectorError> {
    let bad = || SelectorError::Label(term.to_owned());
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key)
            .then(|| LabelReq::NotExists(key.to_owned()))
            .ok_or_else(bad);
    }
    if let Some((k, v)) = term.split_once("!=") {
        return label_pair(k, v)
            .map(|(k, v)| LabelReq::NotEquals(k, v))
            .ok_or_else(bad);
    }
    if let Some((k, v)) = term.split_once("==") {
        return label_pair(k, v)
            .map(|(k, v)| LabelReq::Equals(k, v))
            .ok_or_else(bad);
    }
    if let Some((k, v)) = term.split_once('=') {
        return label_pair(k, v)
            .map(|(k, v)| LabelReq::Equals(k, v))
            .ok_or_else(bad);
    }
    if let Some((k, set)) = term.split_once(" notin ") {
        return label_set(k, set)
            .map(|(k, s)| LabelReq::NotIn(k, s))
            .ok_or_else(bad);
    }
    if let Some((k, set)) = term.split_once(" in ") {
        return label_set(k, set)
            .map(|(k, s)| LabelReq::In(k, s))
            .ok_or_else(bad);
    }
    valid_key(term)
        .then(|| LabelReq::Exists(term.to_owned()))
        .ok_or_else(bad)
}

fn label_pair(key: &str, value: &str) -> Option<(String, String)> {
    let (key, value) = (key.trim(), value.trim());
    (valid_key(key) && valid_value(value)).then(|| (key.to_owned(), value.to_owned()))
}

fn label_set(key: &str, set: &str) -> Option<(String, Vec<String>)> {
    let key = key.trim();
    let inner = set.trim().strip_prefix('(')?.strip_suffix(')')?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
    (valid_key(key) && values.iter().all(|v| valid_value(v))).then_some((key.to_owned(), values))
}

// Label keys: an optional DNS prefix and `/`, then a name of alphanumerics, `-`, `_`, `.`.
fn valid_key(key: &str) -> bool {
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    !name.is_empty()
        && name.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "spec": {"nodeName": node}})
    }

    #[test]
    fn label_equality_and_sets() {
        let p = pod(json!({"app": "web", "tier": "front"}), "n1");
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=web,tier=front", true),
            ("app in (api,web)", true),
            ("app notin (api,web)", false),
            ("app in (api),tier", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&p),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn label_rejects_bad_terms() {
        for sel in ["a b", "app in web", "=x", "a=(b)"] {
            assert!(
                matches!(LabelSelector::parse(sel), Err(SelectorError::Label(_))),
                "{sel}"
            );
        }
    }

    #[test]
    fn field_selector_on_node_name() {
        let supported = ["metadata.name", "spec.nodeName"];
        let sel = FieldSelector::parse("spec.nodeName=n1", &supported).unwrap();
        assert!(sel.matches(&pod(json!({}), "n1")));
        assert!(!sel.matches(&pod(json!({}), "n2")));
        let not = FieldSelector::parse("spec.nodeName!=n1,metadata.name==p", &supported).unwrap();
        assert!(not.matches(&pod(json!({}), "n2")));
        // An absent field is the empty string.
        let empty = FieldSelector::parse("spec.nodeName=", &supported).unwrap();
        assert!(empty.matches(&json!({"metadata": {"name": "p"}})));
    }

    #[test]
    fn field_selector_rejects_unknown_fields_and_terms() {
        assert_eq!(
            FieldSelector::parse("spec.host=n1", &["spec.nodeName"]),
            Err(SelectorError::UnsupportedField("spec.host".into()))
        );
        assert_eq!(
            FieldSelector::parse("spec.nodeName", &["spec.nodeName"]),
            Err(SelectorError::Field("spec.nodeName".into()))
        );
    }
}
