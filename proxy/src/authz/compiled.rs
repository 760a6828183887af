//! Native conditions: the common shapes of a policy's `when` / `unless` clauses, evaluated
//! against the request's already-normalized fields without building a Cedar `Context`.
//!
//! A condition is compiled only when every part of it is one of:
//! - `true` / `false`, `!`, `&&`, `||`, `if … then … else …` over compiled parts;
//! - `==` / `!=` between string operands, `like` of a string operand;
//! - `context has attr` (the proxy's context always has the same five attributes) and
//!   `context.tls has attr`;
//!
//! where a string operand is a string literal, `context.method`, `.path`, `.host` or
//! `context.tls.version`, `.cipher`, `.alpn` (always strings, always present: see
//! [`AuthzRequest::context`]). Every such expression is well-typed whatever the request, so
//! none of them can error in Cedar: a compiled condition has no error to report, and its value
//! is Cedar's. Anything else — `principal`, `resource`, `action`, entity literals, `sourceIp`,
//! extension functions, sets, records, `in`, comparisons, a non-string `==` — leaves the
//! whole policy to Cedar, exactly as before.
//!
//! The input is the policy's JSON form (EST), which the loader already computes once per
//! policy for [`super::plan::ContextUse`].

use serde_json::{Map, Value};

use super::request::AuthzRequest;
use crate::normalize::NormalizedPath;

/// A compiled condition: `true` exactly when Cedar's `when`/`unless` clauses are all satisfied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// A constant (also what `context has attr` is).
    Const(bool),
    /// `!c`.
    Not(Box<Condition>),
    /// `a && b`.
    And(Box<Condition>, Box<Condition>),
    /// `a || b`.
    Or(Box<Condition>, Box<Condition>),
    /// `if c then a else b`.
    If(Box<Condition>, Box<Condition>, Box<Condition>),
    /// `a == b` on strings (`!=` is `Not(Eq)`).
    Eq(Operand, Operand),
    /// `a like pattern`.
    Like(Operand, Pattern),
}

/// A string-valued operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Operand {
    /// A string literal.
    Literal(String),
    /// `context.method`.
    Method,
    /// `context.path`.
    Path,
    /// `context.host`.
    Host,
    /// `context.tls.version`.
    TlsVersion,
    /// `context.tls.cipher`.
    TlsCipher,
    /// `context.tls.alpn`.
    TlsAlpn,
}

/// A Cedar `like` pattern: characters and `*` wildcards (an escaped `\*` is a character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern(Vec<PatternElem>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternElem {
    Char(char),
    Wildcard,
}

/// The context attributes the proxy builds (see [`AuthzRequest::context`]).
const CONTEXT_ATTRS: [&str; 5] = ["method", "path", "host", "sourceIp", "tls"];
/// The attributes of `context.tls`.
const TLS_ATTRS: [&str; 3] = ["version", "cipher", "alpn"];

impl Condition {
    /// The conjunction of a policy's `when` bodies and negated `unless` bodies, from its JSON
    /// form; `None` when any part is not a compiled shape (see the module doc).
    pub(crate) fn of_policy(json: &Value) -> Option<Condition> {
        let conditions = json.get("conditions")?.as_array()?;
        let mut out: Option<Condition> = None;
        for clause in conditions {
            let body = compile(clause.get("body")?)?;
            let clause = match clause.get("kind")?.as_str()? {
                "when" => body,
                "unless" => Condition::Not(Box::new(body)),
                _ => return None,
            };
            out = Some(match out {
                None => clause,
                Some(previous) => Condition::And(Box::new(previous), Box::new(clause)),
            });
        }
        Some(out.unwrap_or(Condition::Const(true)))
    }

    /// The condition's value for `request`.
    pub(crate) fn eval(&self, request: &AuthzRequest) -> bool {
        match self {
            Condition::Const(b) => *b,
            Condition::Not(c) => !c.eval(request),
            Condition::And(a, b) => a.eval(request) && b.eval(request),
            Condition::Or(a, b) => a.eval(request) || b.eval(request),
            Condition::If(c, a, b) => {
                if c.eval(request) {
                    a.eval(request)
                } else {
                    b.eval(request)
                }
            }
            Condition::Eq(a, b) => a.value(request) == b.value(request),
            Condition::Like(a, pattern) => pattern.matches(a.value(request)),
        }
    }
}

impl Operand {
    /// The string this operand is for `request`, as [`AuthzRequest::context`] builds it.
    fn value<'a>(&'a self, request: &'a AuthzRequest) -> &'a str {
        match self {
            Operand::Literal(s) => s,
            Operand::Method => request.action.method(),
            Operand::Path => request.path.as_ref().map_or("", NormalizedPath::as_str),
            Operand::Host => &request.host,
            Operand::TlsVersion => &request.tls.version,
            Operand::TlsCipher => &request.tls.cipher,
            Operand::TlsAlpn => &request.tls.alpn,
        }
    }
}

impl Pattern {
    /// The pattern of an EST `like`: `"Wildcard"` or `{"Literal": "chars"}` elements.
    fn of_json(elements: &[Value]) -> Option<Pattern> {
        let mut out = Vec::new();
        for element in elements {
            match element {
                Value::String(s) if s == "Wildcard" => out.push(PatternElem::Wildcard),
                Value::Object(map) if map.len() == 1 => {
                    let literal = map.get("Literal")?.as_str()?;
                    out.extend(literal.chars().map(PatternElem::Char));
                }
                _ => return None,
            }
        }
        Some(Pattern(out))
    }

    /// Whether all of `text` matches (Cedar's `like`: `*` is any run of characters, possibly
    /// empty; everything else matches itself, by Unicode scalar value).
    pub(crate) fn matches(&self, text: &str) -> bool {
        let pattern = &self.0;
        // `j` indexes the pattern; `i` is a byte offset into `text` (always a char boundary).
        let (mut i, mut j) = (0usize, 0usize);
        // After a `*`: the pattern index after it, and where in `text` its match ends so far.
        let mut star: Option<(usize, usize)> = None;
        loop {
            if let Some(PatternElem::Wildcard) = pattern.get(j) {
                star = Some((j + 1, i));
                j += 1;
                continue;
            }
            let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) else {
                // Text used up: only wildcards may remain.
                return pattern
                    .get(j..)
                    .is_some_and(|rest| rest.iter().all(|e| *e == PatternElem::Wildcard));
            };
            if pattern.get(j) == Some(&PatternElem::Char(c)) {
                i += c.len_utf8();
                j += 1;
                continue;
            }
            // Mismatch: let the last `*` take one more character, and retry after it.
            let Some((after_star, taken_to)) = star else {
                return false;
            };
            let Some(next) = text.get(taken_to..).and_then(|rest| rest.chars().next()) else {
                return false;
            };
            let taken_to = taken_to + next.len_utf8();
            star = Some((after_star, taken_to));
            i = taken_to;
            j = after_star;
        }
    }
}

/// Compiles one boolean EST expression, or `None`.
fn compile(expr: &Value) -> Option<Condition> {
    let (op, arg) = single(expr)?;
    let boxed = |v: &Value| compile(v).map(Box::new);
    match op {
        "Value" => arg.as_bool().map(Condition::Const),
        "!" => Some(Condition::Not(boxed(arg.get("arg")?)?)),
        "&&" => Some(Condition::And(
            boxed(arg.get("left")?)?,
            boxed(arg.get("right")?)?,
        )),
        "||" => Some(Condition::Or(
            boxed(arg.get("left")?)?,
            boxed(arg.get("right")?)?,
        )),
        "if-then-else" => Some(Condition::If(
            boxed(arg.get("if")?)?,
            boxed(arg.get("then")?)?,
            boxed(arg.get("else")?)?,
        )),
        "==" | "!=" => {
            let eq = Condition::Eq(operand(arg.get("left")?)?, operand(arg.get("right")?)?);
            Some(if op == "!=" {
                Condition::Not(Box::new(eq))
            } else {
                eq
            })
        }
        "like" => Some(Condition::Like(
            operand(arg.get("left")?)?,
            Pattern::of_json(arg.get("pattern")?.as_array()?)?,
        )),
        "has" => {
            // Only the simple form (`attr` a string): `e has a.b` reads `e.a`, which may error.
            let attr = arg.get("attr")?.as_str()?;
            match record(arg.get("left")?)? {
                Record::Context => Some(Condition::Const(CONTEXT_ATTRS.contains(&attr))),
                Record::Tls => Some(Condition::Const(TLS_ATTRS.contains(&attr))),
            }
        }
        _ => None,
    }
}

/// Compiles a string-valued EST expression, or `None`.
fn operand(expr: &Value) -> Option<Operand> {
    let (op, arg) = single(expr)?;
    match op {
        "Value" => arg.as_str().map(|s| Operand::Literal(s.to_owned())),
        "." => {
            let attr = arg.get("attr")?.as_str()?;
            match (record(arg.get("left")?)?, attr) {
                (Record::Context, "method") => Some(Operand::Method),
                (Record::Context, "path") => Some(Operand::Path),
                (Record::Context, "host") => Some(Operand::Host),
                (Record::Tls, "version") => Some(Operand::TlsVersion),
                (Record::Tls, "cipher") => Some(Operand::TlsCipher),
                (Record::Tls, "alpn") => Some(Operand::TlsAlpn),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The records a compiled expression may look into.
enum Record {
    Context,
    Tls,
}

fn record(expr: &Value) -> Option<Record> {
    let (op, arg) = single(expr)?;
    match op {
        "Var" if arg.as_str() == Some("context") => Some(Record::Context),
        "." if arg.get("attr")?.as_str()? == "tls" => match record(arg.get("left")?)? {
            Record::Context => Some(Record::Tls),
            Record::Tls => None,
        },
        _ => None,
    }
}

/// An EST expression node: an object with exactly one key (the operator).
fn single(expr: &Value) -> Option<(&str, &Value)> {
    let map: &Map<String, Value> = expr.as_object()?;
    if map.len() != 1 {
        return None;
    }
    map.iter().next().map(|(k, v)| (k.as_str(), v))
}

#[cfg(test)]
mod tests;
