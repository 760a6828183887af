//! Request normalization: the one canonical form of a request's path and host, computed once.
//!
//! The authorization decision and the forwarded request must agree on what was asked for; if the
//! policy sees `/api/../admin` and the app sees `/admin`, a `path == "/admin"` forbid is bypassed
//! (Istio CVE-2021-31920, CVE-2021-39156). So the proxy normalizes here, decides on the result, and
//! forwards the *same* result. What cannot be normalized without guessing how the app will read it
//! (an encoded `/` or `\`, NUL, invalid UTF-8, `..;`) is refused rather than passed through.

use std::fmt;
use std::net::Ipv6Addr;

/// A request path in its one canonical form, with the query kept beside it untouched.
///
/// The path starts with `/` (or is exactly `*`, the asterisk form of `OPTIONS *`), has no empty,
/// `.` or `..` segments, no escapes of unreserved characters, and only upper-case escapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalizedPath {
    path: String,
    query: Option<String>,
}

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The request target is an absolute URL (`http://host/path`); only origin form is accepted.
    #[error("request target `{0}` is not a path: send the origin form (`/path?query`)")]
    NotOriginForm(String),
    /// `%2F` or `%2f`: an encoded `/` that the app may or may not read as a separator.
    #[error("path `{0}` has an encoded `/` (`%2F`), which is ambiguous")]
    EncodedSlash(String),
    /// `%5C` or `%5c`: an encoded `\`, which some servers read as a separator.
    #[error("path `{0}` has an encoded `\\` (`%5C`), which is ambiguous")]
    EncodedBackslash(String),
    /// A raw `\`, which some servers read as a separator.
    #[error("path `{0}` has a `\\`, which is ambiguous")]
    Backslash(String),
    /// A NUL byte, raw or as `%00`.
    #[error("path `{0}` has a NUL byte")]
    Nul(String),
    /// A control character or space, raw.
    #[error("path `{path}` has the control character or space `{byte:#04x}`")]
    ControlChar {
        /// The path (lossily decoded).
        path: String,
        /// The offending byte.
        byte: u8,
    },
    /// `%` not followed by two hex digits.
    #[error("path `{0}` has a bad escape: `%` must be followed by two hex digits")]
    BadEscape(String),
    /// The path (fully decoded) or query is not valid UTF-8, e.g. `%C0%AF`, an overlong `/`.
    #[error("path `{0}` is not valid UTF-8 once decoded")]
    InvalidUtf8(String),
    /// A `.` or `..` segment with a `;` parameter (`..;/`), which Tomcat-style servers read as `..`.
    #[error(
        "path `{0}` has a `.` or `..` segment with a `;` parameter (`..;`), which is ambiguous"
    )]
    DotSegmentParameter(String),
}

/// Why a `Host` (or `:authority`, or SNI) value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nothing but perhaps a port.
    #[error("host is empty")]
    Empty,
    /// A character that cannot be in a host name.
    #[error(
        "host `{host}` has the character `{ch}`; only letters, digits, `.`, `-` and `_` are allowed"
    )]
    InvalidChar {
        /// The host as given.
        host: String,
        /// The first offending character.
        ch: char,
    },
    /// The part after `:` is not a port number.
    #[error("host `{0}` has a bad port: it must be a number from 0 to 65535")]
    BadPort(String),
    /// An IPv6 literal without brackets, so the port cannot be told apart.
    #[error("host `{0}` looks like an IPv6 address without brackets: write `[addr]:port`")]
    UnbracketedIpv6(String),
    /// `[...]` that is not an IPv6 address.
    #[error("host `{0}` has brackets around something that is not an IPv6 address")]
    BadIpv6(String),
}

impl NormalizedPath {
    /// The root path `/`, with no query.
    pub fn root() -> Self {
        Self {
            path: "/".to_owned(),
            query: None,
        }
    }

    /// The normalized path, without the query.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The query (after `?`), exactly as received; `None` when there was no `?`.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The path and query to forward upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// Whether this is the asterisk form (`OPTIONS *`).
    pub fn is_asterisk(&self) -> bool {
        self.path == "*"
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// Normalizes a request target (origin form `/path?query`, or `*`) for deciding and forwarding.
///
/// Strips the fragment; keeps the query separate and unmodified; decodes escapes of unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`) and upper-cases the remaining ones; percent-encodes raw
/// non-ASCII UTF-8; merges `//`; resolves `.` and `..` (RFC 3986 §5.2.4, never above the root).
/// An empty path is `/` (RFC 9110 §4.2.3).
pub fn normalize_path(raw: &[u8]) -> Result<NormalizedPath, PathError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    let without_fragment = match raw.iter().position(|&b| b == b'#') {
        Some(i) => raw.get(..i).unwrap_or_default(),
        None => raw,
    };
    let (path, query) = match without_fragment.iter().position(|&b| b == b'?') {
        Some(i) => (
            without_fragment.get(..i).unwrap_or_default(),
            Some(without_fragment.get(i + 1..).unwrap_or_default()),
        ),
        None => (without_fragment, None),
    };
    let query = match query {
        Some(q) => Some(
            std::str::from_utf8(q)
                .map_err(|_| PathError::InvalidUtf8(shown()))?
                .to_owned(),
        ),
        None => None,
    };
    if path == b"*" {
        return Ok(NormalizedPath {
            path: "*".to_owned(),
            query,
        });
    }
    if !path.is_empty() && path.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm(shown()));
    }
    let canonical = canonical_bytes(path, &shown)?;
    Ok(NormalizedPath {
        path: remove_dot_segments(&canonical, &shown)?,
        query,
    })
}

/// Normalizes a host for deciding: lower case, no port, no trailing dot, IPv6 in canonical form.
///
/// `Example.COM:8080` -> `example.com`; `[0:0::1]:443` -> `[::1]`.
pub fn normalize_host(host: &str) -> Result<String, HostError> {
    if let Some(rest) = host.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(HostError::BadIpv6(host.to_owned()));
        };
        if !after.is_empty() {
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| HostError::BadPort(host.to_owned()))?;
            check_port(port, host)?;
        }
        let addr: Ipv6Addr = inner
            .parse()
            .map_err(|_| HostError::BadIpv6(host.to_owned()))?;
        return Ok(format!("[{addr}]"));
    }
    let name = match host.split_once(':') {
        Some((_, port)) if port.contains(':') => {
            return Err(HostError::UnbracketedIpv6(host.to_owned()));
        }
        Some((name, port)) => {
            check_port(port, host)?;
            name
        }
        None => host,
    };
    // `example.com.` and `example.com` are the same DNS name; one spelling for policies.
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(HostError::InvalidChar {
            host: host.to_owned(),
            ch,
        });
    }
    Ok(name.to_ascii_lowercase())
}

fn check_port(port: &str, host: &str) -> Result<(), HostError> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort(host.to_owned()));
    }
    match port.parse::<u16>() {
        Ok(_) => Ok(()),
        Err(_) => Err(HostError::BadPort(host.to_owned())),
    }
}

/// RFC 3986 §2.3: the characters whose escapes are decoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escape(out: &mut String, b: u8) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "%{b:02X}");
}

/// One pass over the path bytes: decode unreserved escapes, upper-case the others, refuse the
/// ambiguous bytes. Also checks that the path, fully decoded, is UTF-8: an app that decodes
/// everything must not see bytes the policy never saw (`%C0%AF` is an overlong `/`).
fn canonical_bytes(path: &[u8], shown: &dyn Fn() -> String) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        match b {
            b'%' => {
                let value = match (path.get(i + 1), path.get(i + 2)) {
                    (Some(&h), Some(&l)) => match (hex_value(h), hex_value(l)) {
                        (Some(h), Some(l)) => (h << 4) | l,
                        _ => return Err(PathError::BadEscape(shown())),
                    },
                    _ => return Err(PathError::BadEscape(shown())),
                };
                match value {
                    b'/' => return Err(PathError::EncodedSlash(shown())),
                    b'\\' => return Err(PathError::EncodedBackslash(shown())),
                    0 => return Err(PathError::Nul(shown())),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => push_escape(&mut out, v),
                }
                decoded.push(value);
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash(shown())),
            0 => return Err(PathError::Nul(shown())),
            b if b < 0x20 || b == 0x7f || b == b' ' => {
                return Err(PathError::ControlChar {
                    path: shown(),
                    byte: b,
                });
            }
            b if b >= 0x80 => {
                // Raw UTF-8 gets the same spelling as its escapes, so `é` and `%C3%A9` are one path.
                push_escape(&mut out, b);
                decoded.push(b);
                i += 1;
            }
            b => {
                out.push(char::from(b));
                decoded.push(b);
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8(shown()));
    }
    Ok(out)
}

/// Merges `//` and resolves `.`/`..` (RFC 3986 §5.2.4), never above the root; refuses `..;`.
fn remove_dot_segments(path: &str, shown: &dyn Fn() -> String) -> Result<String, PathError> {
    let mut stack: Vec<&str> = Vec::new();
    // A path that ends in `/`, `/.` or `/..` names a directory: keep the trailing `/`.
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        let before_params = segment.split(';').next().unwrap_or_default();
        if segment.contains(';') && matches!(before_params, "." | "..") {
            return Err(PathError::DotSegmentParameter(shown()));
        }
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                stack.pop();
                trailing_slash = true;
            }
            s => {
                stack.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for segment in &stack {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || stack.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
