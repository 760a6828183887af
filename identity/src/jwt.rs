//! JWT-SVIDs (SPIFFE JWT-SVID specification) signed with ECDSA P-256 (`ES256`), and JWT bundles as JWKS.
//!
//! Tokens are minted and validated with ring directly rather than a JWT crate: the JOSE header is where
//! JWT libraries have historically gone wrong (`alg: none`, HMAC/public-key confusion, `jku`/`jwk`
//! injection), and the JWT-SVID specification (§2) narrows it on purpose. Here the header may hold only
//! `alg` (always `ES256`), `kid` (required, so a key is found without trial verification) and `typ`
//! (`JWT` or `JOSE`); anything else is refused before any key is touched.
//!
//! Validation order: size cap, shape, header, subject, bundle of the subject's trust domain, key by `kid`,
//! signature, then `exp`, `nbf` and `aud`. Claims are only trusted after the signature verifies; the
//! subject is read first only to pick the bundle, as every SPIFFE implementation does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde_json::{Map, Value};

use crate::spiffe_id::SpiffeId;

mod jwks;
mod key;

pub use jwks::{JwtBundle, JwtBundleSet};
pub use key::{Jwk, JwtSigningKey};

/// The only `alg` accepted or produced.
pub const ALGORITHM: &str = "ES256";

/// Longest token accepted, checked before any parsing; a JWT-SVID is a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Clock skew allowed on `exp` and `nbf`: a token is still accepted up to this long after it expired, and
/// this long before its `nbf`. The JWT-SVID specification (appendix A) allows "a small amount of leeway".
pub const CLOCK_SKEW_LEEWAY: Duration = Duration::from_secs(30);

/// Why a JWT-SVID, a JWT signing key or a JWT bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("jwt is {0} bytes; the limit is 8192 bytes")]
    TooLarge(usize),
    /// Not three dot-separated base64url parts holding JSON objects, or a claim of the wrong type.
    #[error("malformed jwt: {0}")]
    Malformed(String),
    /// An `alg` other than `ES256` (including `none` and HMAC algorithms).
    #[error("jwt algorithm `{0}` is not supported; only `ES256` is accepted")]
    UnsupportedAlgorithm(String),
    /// A `typ` other than `JWT` or `JOSE` (JWT-SVID §2.3).
    #[error("jwt type `{0}` is not supported; expected `JWT` or `JOSE`")]
    UnsupportedType(String),
    /// A header parameter other than `alg`, `kid` and `typ` (JWT-SVID §2 forbids all others).
    #[error("jwt header parameter `{0}` is not allowed in a jwt-svid")]
    UnsupportedHeader(String),
    /// The header has no `kid`, or an empty one.
    #[error("jwt header has no `kid`")]
    MissingKeyId,
    /// The `kid` is not in the bundle of the subject's trust domain.
    #[error("jwt key `{kid}` is not in the jwt bundle of trust domain `{trust_domain}`")]
    UnknownKey {
        /// The key ID from the token header.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// No JWT bundle for the subject's trust domain.
    #[error("no jwt bundle for trust domain `{0}`")]
    UnknownTrustDomain(String),
    /// The signature does not verify with the key named by `kid`.
    #[error("jwt signature does not verify with key `{0}`")]
    BadSignature(String),
    /// No `exp` claim (JWT-SVID §3.3 requires it).
    #[error("jwt has no `exp` claim")]
    MissingExpiry,
    /// `exp` is more than [`CLOCK_SKEW_LEEWAY`] in the past.
    #[error("jwt expired at unix time `{expiry}` (now `{now}`, leeway 30s)")]
    Expired {
        /// The `exp` claim, in seconds since the Unix epoch.
        expiry: u64,
        /// The validation time, in seconds since the Unix epoch.
        now: u64,
    },
    /// `nbf` is more than [`CLOCK_SKEW_LEEWAY`] in the future.
    #[error("jwt is not valid before unix time `{not_before}` (now `{now}`, leeway 30s)")]
    NotYetValid {
        /// The `nbf` claim, in seconds since the Unix epoch.
        not_before: u64,
        /// The validation time, in seconds since the Unix epoch.
        now: u64,
    },
    /// `aud` is missing or does not contain the validator's audience.
    #[error("jwt audience {found:?} does not include `{expected}`")]
    WrongAudience {
        /// The audience the validator identifies with.
        expected: String,
        /// The token's audiences (empty when `aud` is missing).
        found: Vec<String>,
    },
    /// `sub` is missing or not a SPIFFE ID.
    #[error("bad jwt subject: {0}")]
    BadSubject(String),
    /// Minting with no audience, or an empty audience string.
    #[error("a jwt-svid needs at least one non-empty audience")]
    EmptyAudience,
    /// Minting with a lifetime under one second.
    #[error("jwt-svid ttl `{0:?}` is too short; it must be at least one second")]
    BadTtl(Duration),
    /// Minting at a time before the Unix epoch.
    #[error("clock is before the unix epoch")]
    ClockBeforeEpoch,
    /// A signing key that ring refuses, or an empty key ID.
    #[error("bad jwt signing key: {0}")]
    BadSigningKey(String),
    /// The random number generator or the signer failed.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// A JWKS document that is not JSON, has no `keys` array, or has an entry of the wrong shape.
    #[error("malformed jwks: {0}")]
    BadJwks(String),
    /// A JWT key whose `kty` is not `EC`.
    #[error("jwt key `{kid}` has key type `{kty}`; only `EC` is supported")]
    UnsupportedKeyType {
        /// The key ID.
        kid: String,
        /// The key type found.
        kty: String,
    },
    /// A JWT key whose `crv` is not `P-256`.
    #[error("jwt key `{kid}` is on curve `{crv}`; only `P-256` is supported")]
    UnsupportedCurve {
        /// The key ID.
        kid: String,
        /// The curve found.
        crv: String,
    },
    /// A JWT key with bad coordinates (wrong length, not base64url, not on the curve) or other bad members.
    #[error("jwt key `{kid}` is invalid: {reason}")]
    BadKey {
        /// The key ID.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two keys with the same `kid` in one bundle.
    #[error("jwks has two keys with id `{0}`")]
    DuplicateKeyId(String),
}

/// JWT-SVID operations. A JWT-SVID travels as its compact serialization, a plain `String`.
#[derive(Debug)]
pub enum JwtSvid {}

/// A JWT-SVID whose signature, lifetime and audience were checked by [`JwtSvid::validate`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ValidatedJwt {
    /// The `sub` claim: the workload the token was issued to.
    pub spiffe_id: SpiffeId,
    /// Every value of the `aud` claim (one of them is the audience asked for).
    pub audience: Vec<String>,
    /// The `exp` claim.
    pub expiry: SystemTime,
    /// All claims, including the registered ones above, as the Workload API's `ValidateJWTSVID` returns them.
    pub claims: Map<String, Value>,
}

/// A token's header and claims decoded without any verification, for display only.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UnverifiedJwt {
    /// The JOSE header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
}

impl JwtSvid {
    /// Signs a JWT-SVID for `sub`, valid for `ttl` from `now`, for every audience in `audience`.
    ///
    /// The header is `{"alg":"ES256","kid":<key id>,"typ":"JWT"}`; the claims are `aud` (always an
    /// array), `exp`, `iat` and `sub`.
    pub fn mint(
        key: &JwtSigningKey,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, JwtError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::EmptyAudience);
        }
        if ttl.as_secs() == 0 {
            return Err(JwtError::BadTtl(ttl));
        }
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| JwtError::ClockBeforeEpoch)?
            .as_secs();
        let exp = iat.saturating_add(ttl.as_secs());

        // Inserted in alphabetical order so the output is the same whether or not serde_json's
        // `preserve_order` feature is on somewhere in the dependency graph.
        let mut header = Map::new();
        header.insert("alg".into(), ALGORITHM.into());
        header.insert("kid".into(), key.kid().into());
        header.insert("typ".into(), "JWT".into());
        let mut claims = Map::new();
        claims.insert("aud".into(), audience.to_vec().into());
        claims.insert("exp".into(), exp.into());
        claims.insert("iat".into(), iat.into());
        claims.insert("sub".into(), sub.as_str().into());

        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string()),
        );
        let signature = key.sign(signing_input.as_bytes())?;
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature));
        // A token this process would refuse to validate must not be handed out.
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLarge(token.len()));
        }
        Ok(token)
    }

    /// Validates `token` for `audience` against the JWT bundle of its subject's trust domain, at `now`.
    ///
    /// Refuses, each with its own [`JwtError`] variant: oversized or malformed tokens, any `alg` but
    /// `ES256`, header parameters other than `alg`/`kid`/`typ`, a missing `kid`, a subject that is not a
    /// SPIFFE ID, a trust domain with no bundle, a `kid` not in that bundle, a bad signature, a missing or
    /// passed `exp`, a future `nbf`, and an `aud` without `audience`. `exp` and `nbf` get
    /// [`CLOCK_SKEW_LEEWAY`]; `iat` is not checked (the specification gives it no meaning).
    pub fn validate(
        token: &str,
        audience: &str,
        bundles: &JwtBundleSet,
        now: SystemTime,
    ) -> Result<ValidatedJwt, JwtError> {
        let parts = Parts::split(token)?;
        let header = decode_object(parts.header, "header")?;
        let kid = check_header(&header)?;
        let claims = decode_object(parts.claims, "claims")?;
        let spiffe_id = subject(&claims)?;

        let trust_domain = spiffe_id.trust_domain();
        let bundle = bundles
            .get(&trust_domain)
            .ok_or_else(|| JwtError::UnknownTrustDomain(trust_domain.to_string()))?;
        let jwk = bundle.get(kid).ok_or_else(|| JwtError::UnknownKey {
            kid: kid.to_owned(),
            trust_domain: trust_domain.to_string(),
        })?;
        let signature = URL_SAFE_NO_PAD
            .decode(parts.signature)
            .map_err(|e| JwtError::Malformed(format!("signature is not base64url: {e}")))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, jwk.public_key())
            .verify(parts.signing_input.as_bytes(), &signature)
            .map_err(|_| JwtError::BadSignature(kid.to_owned()))?;

        // From here on the claims are the issuer's.
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let leeway = CLOCK_SKEW_LEEWAY.as_secs();
        let expiry =
            numeric_date(&claims, "exp", Rounding::Down)?.ok_or(JwtError::MissingExpiry)?;
        if now_secs >= expiry.saturating_add(leeway) {
            return Err(JwtError::Expired {
                expiry,
                now: now_secs,
            });
        }
        if let Some(not_before) = numeric_date(&claims, "nbf", Rounding::Up)?
            && not_before > now_secs.saturating_add(leeway)
        {
            return Err(JwtError::NotYetValid {
                not_before,
                now: now_secs,
            });
        }
        let audiences = audiences(&claims)?;
        if !audiences.iter().any(|a| a == audience) {
            return Err(JwtError::WrongAudience {
                expected: audience.to_owned(),
                found: audiences,
            });
        }
        let expiry = UNIX_EPOCH
            .checked_add(Duration::from_secs(expiry))
            .ok_or_else(|| JwtError::Malformed(format!("`exp` `{expiry}` is out of range")))?;

        Ok(ValidatedJwt {
            spiffe_id,
            audience: audiences,
            expiry,
            claims,
        })
    }

    /// Decodes the header and claims of `token` without verifying anything. For display only: nothing
    /// read here may be trusted.
    pub fn parse_insecure(token: &str) -> Result<UnverifiedJwt, JwtError> {
        let parts = Parts::split(token)?;
        Ok(UnverifiedJwt {
            header: decode_object(parts.header, "header")?,
            claims: decode_object(parts.claims, "claims")?,
        })
    }

    /// Reads the `sub` claim of `token` as a SPIFFE ID without verifying anything (to pick a bundle, or to
    /// log who a refused token claimed to be).
    pub fn parse_spiffe_id_unverified(token: &str) -> Result<SpiffeId, JwtError> {
        subject(&Self::parse_insecure(token)?.claims)
    }
}

/// The three parts of a compact JWS, still encoded.
struct Parts<'a> {
    header: &'a str,
    claims: &'a str,
    signature: &'a str,
    /// `header.claims`, the bytes the signature covers.
    signing_input: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Self, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLarge(token.len()));
        }
        let mut split = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (split.next(), split.next(), split.next(), split.next())
        else {
            return Err(JwtError::Malformed(format!(
                "expected 3 dot-separated parts, found {}",
                token.split('.').count()
            )));
        };
        let signing_input = token
            .get(..header.len() + 1 + claims.len())
            .ok_or_else(|| JwtError::Malformed("cannot split signing input".into()))?;
        Ok(Self {
            header,
            claims,
            signature,
            signing_input,
        })
    }
}

fn decode_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a json object"))),
        Err(e) => Err(JwtError::Malformed(format!("{what} is not json: {e}"))),
    }
}

/// Checks the JOSE header against JWT-SVID §2 and returns the `kid`.
fn check_header(header: &Map<String, Value>) -> Result<&str, JwtError> {
    // `alg` first: the specification requires it be checked before anything else is processed.
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg,
        Some(other) => return Err(JwtError::UnsupportedAlgorithm(other.to_string())),
        None => return Err(JwtError::Malformed("header has no `alg`".into())),
    };
    if alg != ALGORITHM {
        return Err(JwtError::UnsupportedAlgorithm(alg.clone()));
    }
    if let Some(name) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::UnsupportedHeader(name.clone()));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(Value::String(typ)) => return Err(JwtError::UnsupportedType(typ.clone())),
        Some(other) => return Err(JwtError::UnsupportedType(other.to_string())),
    }
    match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid),
        Some(Value::String(_)) | None => Err(JwtError::MissingKeyId),
        Some(_) => Err(JwtError::Malformed("header `kid` is not a string".into())),
    }
}

fn subject(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    match claims.get("sub") {
        Some(Value::String(sub)) => {
            SpiffeId::parse(sub).map_err(|e| JwtError::BadSubject(e.to_string()))
        }
        Some(other) => Err(JwtError::BadSubject(format!(
            "`sub` `{other}` is not a string"
        ))),
        None => Err(JwtError::BadSubject("`sub` claim is missing".into())),
    }
}

/// `aud` as RFC 7519 §4.1.3 allows it: one string or an array of strings.
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(aud)) => Ok(vec![aud.clone()]),
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v {
                Value::String(aud) => Ok(aud.clone()),
                other => Err(JwtError::Malformed(format!(
                    "`aud` element `{other}` is not a string"
                ))),
            })
            .collect(),
        Some(other) => Err(JwtError::Malformed(format!(
            "`aud` `{other}` is not a string or an array of strings"
        ))),
    }
}

/// 2^53: beyond it an `f64` has no fractional part, and converting it to `u64` stays exact.
const MAX_EXACT_F64: f64 = 9_007_199_254_740_992.0;

/// Which way to round a fractional `NumericDate`: always towards refusing the token.
#[derive(Clone, Copy)]
enum Rounding {
    Down,
    Up,
}

/// A `NumericDate` claim (RFC 7519 §2: seconds since the epoch, possibly fractional) in whole seconds.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    rounding: Rounding,
) -> Result<Option<u64>, JwtError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let bad = || JwtError::Malformed(format!("`{name}` `{value}` is not a non-negative number"));
    let Value::Number(number) = value else {
        return Err(bad());
    };
    if let Some(secs) = number.as_u64() {
        return Ok(Some(secs));
    }
    match number.as_f64() {
        Some(secs) if secs.is_finite() && (0.0..MAX_EXACT_F64).contains(&secs) => {
            let secs = match rounding {
                Rounding::Down => secs.floor(),
                Rounding::Up => secs.ceil(),
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(Some(secs as u64))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
