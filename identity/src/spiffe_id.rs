//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID specification says.
//!
//! `spiffe://<trust-domain>[/<segment>...]` where the trust domain is `[a-z0-9._-]+` and each path segment is
//! `[a-zA-Z0-9._-]+`, not `.` or `..`. Anything else (upper-case trust domains, ports, userinfo, queries,
//! fragments, percent-encoding, empty segments, trailing slashes) is refused rather than normalized: an
//! identity that needs normalizing is an identity two parties may read differently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme of every SPIFFE ID, with its separator.
const SCHEME_PREFIX: &str = "spiffe://";

/// Longest trust domain name the specification allows (SPIFFE-ID §2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest SPIFFE ID, as a URI, the specification allows (SPIFFE-ID §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("spiffe id is empty")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("`{0}` is not a spiffe id: it must start with `spiffe://`")]
    WrongScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("`{0}` has no trust domain after `spiffe://`")]
    MissingTrustDomain(String),
    /// A trust domain character outside `[a-z0-9._-]` (this also refuses ports, userinfo and upper case).
    #[error(
        "trust domain in `{input}` has the character `{ch}`; only lower-case letters, digits, `.`, `-` and `_` are allowed"
    )]
    BadTrustDomainChar {
        /// The whole input.
        input: String,
        /// The first offending character.
        ch: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain in `{0}` is longer than 255 characters")]
    TrustDomainTooLong(String),
    /// The whole ID is longer than 2048 bytes.
    #[error("spiffe id is longer than 2048 bytes ({0} bytes)")]
    TooLong(usize),
    /// `//` in the path.
    #[error("`{0}` has an empty path segment (`//`)")]
    EmptySegment(String),
    /// A path segment that is `.` or `..`.
    #[error("`{0}` has a `.` or `..` path segment")]
    DotSegment(String),
    /// A path character outside `[a-zA-Z0-9._-]` (this also refuses queries, fragments and `%` escapes).
    #[error(
        "path in `{input}` has the character `{ch}`; only letters, digits, `.`, `-` and `_` are allowed"
    )]
    BadPathChar {
        /// The whole input.
        input: String,
        /// The first offending character.
        ch: char,
    },
    /// The path ends in `/`.
    #[error("`{0}` ends with `/`")]
    TrailingSlash(String),
    /// A SPIFFE ID whose trust domain is not the one expected.
    #[error("spiffe id `{id}` is outside trust domain `{expected}`")]
    OutsideTrustDomain {
        /// The ID.
        id: String,
        /// The trust domain it should have been in.
        expected: String,
    },
}

/// A trust domain name, such as `example.org`. Always valid and lower case.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID such as `spiffe://example.org/ns/shop/sa/web`. Always valid; compared literally.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // INVARIANT: `full` is a valid SPIFFE ID and `full[SCHEME_PREFIX.len()..td_end]` is its trust domain.
    full: String,
    td_end: usize,
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`); use [`FromStr`] to also accept `spiffe://example.org`.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name, name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>` (the ID of its signing certificates).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME_PREFIX}{}", self.0),
            td_end: SCHEME_PREFIX.len() + self.0.len(),
        }
    }

    /// Builds the SPIFFE ID `spiffe://<td>/<segments joined by />`, validating every segment.
    pub fn workload_id<S: AsRef<str>>(&self, segments: &[S]) -> Result<SpiffeId, SpiffeIdError> {
        let mut full = self.id().full;
        for segment in segments {
            full.push('/');
            full.push_str(segment.as_ref());
        }
        SpiffeId::parse(&full)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    /// Accepts `example.org` or `spiffe://example.org` (a SPIFFE ID with no path).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(SCHEME_PREFIX) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar {
                    input: s.to_owned(),
                    ch: '/',
                });
            }
            return Ok(id.trust_domain());
        }
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl SpiffeId {
    /// Parses a SPIFFE ID, refusing everything the specification does not allow.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(input.len()));
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| SpiffeIdError::WrongScheme(input.to_owned()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain(input.to_owned()));
        }
        validate_trust_domain(td, input)?;
        validate_path(path, input)?;
        Ok(Self {
            full: input.to_owned(),
            td_end: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain's name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        self.full
            .get(SCHEME_PREFIX.len()..self.td_end)
            .unwrap_or_default()
    }

    /// The path, with its leading `/`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        self.full.get(self.td_end..).unwrap_or_default()
    }

    /// The path segments, without separators.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// Whether this ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// Fails with a clear error unless this ID is in `td`.
    pub fn require_member_of(&self, td: &TrustDomain) -> Result<(), SpiffeIdError> {
        if self.is_member_of(td) {
            Ok(())
        } else {
            Err(SpiffeIdError::OutsideTrustDomain {
                id: self.full.clone(),
                expected: td.to_string(),
            })
        }
    }

    /// Whether this is a trust domain's own ID (no path): the ID of signing certificates.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// The ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str, input: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain(input.to_owned()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(input.to_owned()));
    }
    if let Some(ch) = td.chars().find(|c| !is_trust_domain_char(*c)) {
        return Err(SpiffeIdError::BadTrustDomainChar {
            input: input.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn validate_path(path: &str, input: &str) -> Result<(), SpiffeIdError> {
    // `path` is empty or starts with '/'; the element before that '/' is not a segment.
    let Some(segments) = path.strip_prefix('/') else {
        return Ok(());
    };
    let mut rest = segments.split('/').peekable();
    while let Some(segment) = rest.next() {
        match segment {
            "" if rest.peek().is_none() => {
                return Err(SpiffeIdError::TrailingSlash(input.to_owned()));
            }
            "" => return Err(SpiffeIdError::EmptySegment(input.to_owned())),
            "." | ".." => return Err(SpiffeIdError::DotSegment(input.to_owned())),
            _ => {}
        }
        if let Some(ch) = segment.chars().find(|c| !is_path_char(*c)) {
            return Err(SpiffeIdError::BadPathChar {
                input: input.to_owned(),
                ch,
            });
        }
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
mod tests;
