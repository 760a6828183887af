//! The CA's JWT signing key and the public JWK validators hold.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::agreement;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Map, Value};

use super::{ALGORITHM, JwtError};

/// Length of a P-256 field element, and so of each JWK coordinate.
const COORDINATE_LEN: usize = 32;

/// Length of an uncompressed SEC1 P-256 point: `0x04 || x || y`.
const POINT_LEN: usize = 1 + 2 * COORDINATE_LEN;

/// The `use` value of JWT authorities in a SPIFFE bundle (SPIFFE Trust Domain and Bundle §4.2.2).
pub(super) const JWT_SVID_USE: &str = "jwt-svid";

/// An ECDSA P-256 private key that signs JWT-SVIDs, with the key ID published next to its public half.
pub struct JwtSigningKey {
    kid: String,
    key: EcdsaKeyPair,
    // ring cannot export a parsed key, so the PKCS#8 document is kept for `to_pkcs8_der`.
    pkcs8: Vec<u8>,
}

/// One JWT authority's public key: an EC P-256 point and its key ID, as a JWK with `use: jwt-svid`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Jwk {
    kid: String,
    // INVARIANT: an uncompressed SEC1 point (`0x04 || x || y`) on P-256.
    point: Vec<u8>,
}

impl JwtSigningKey {
    /// Generates a new key with a random 32-hex-character key ID.
    pub fn generate() -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 16];
        rng.fill(&mut id)
            .map_err(|_| JwtError::Crypto("random key id"))?;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwtError::Crypto("generate p-256 key"))?;
        Self::from_pkcs8_der(hex::encode(id), pkcs8.as_ref())
    }

    /// Loads a P-256 key from PKCS#8 DER (as written by [`Self::to_pkcs8_der`]) under key ID `kid`.
    pub fn from_pkcs8_der(kid: impl Into<String>, der: &[u8]) -> Result<Self, JwtError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(JwtError::BadSigningKey("key id is empty".into()));
        }
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| {
                JwtError::BadSigningKey(format!("`{kid}` is not a p-256 pkcs#8 key: {e}"))
            })?;
        Ok(Self {
            kid,
            key,
            pkcs8: der.to_vec(),
        })
    }

    /// The key ID, written into every token's `kid` header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for storing it. Secret.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }

    /// The public half, to publish in the trust domain's JWT bundle.
    pub fn public_jwk(&self) -> Jwk {
        Jwk {
            kid: self.kid.clone(),
            point: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `message`, returning the 64-byte `r || s` JWS form.
    pub(super) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, JwtError> {
        let signature = self
            .key
            .sign(&SystemRandom::new(), message)
            .map_err(|_| JwtError::Crypto("ecdsa sign"))?;
        Ok(signature.as_ref().to_vec())
    }
}

impl fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("kid", &self.kid)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Jwk {
    /// Builds a key from its ID and an uncompressed SEC1 P-256 point (`0x04 || x || y`, 65 bytes),
    /// refusing a point that is not on the curve.
    pub fn from_sec1_point(kid: impl Into<String>, point: &[u8]) -> Result<Self, JwtError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(JwtError::BadJwks("key id is empty".into()));
        }
        let bad = |reason: &str| JwtError::BadKey {
            kid: kid.clone(),
            reason: reason.to_owned(),
        };
        if point.len() != POINT_LEN || point.first() != Some(&0x04) {
            return Err(bad("not a 65-byte uncompressed p-256 point"));
        }
        // ring checks a verification key only when verifying, and then reports a bad key and a bad
        // signature alike. Its ECDH does the same public-key validation (coordinates below the field
        // prime, point on the curve) and fails only on the key, so one ephemeral agreement tells us at
        // load time whether this point is usable.
        let rng = SystemRandom::new();
        let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
            .map_err(|_| JwtError::Crypto("generate ephemeral p-256 key"))?;
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, point);
        agreement::agree_ephemeral(ephemeral, &peer, |_| ())
            .map_err(|_| bad("point is not on the p-256 curve"))?;
        Ok(Self {
            kid,
            point: point.to_vec(),
        })
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The uncompressed SEC1 point, `0x04 || x || y`.
    pub fn public_key(&self) -> &[u8] {
        &self.point
    }

    /// The JWK as a JSON object: `{"kty":"EC","crv":"P-256","x":..,"y":..,"kid":..,"use":"jwt-svid"}`.
    pub fn to_json(&self) -> Map<String, Value> {
        let (x, y) = self.coordinates();
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-256".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        jwk.insert("kid".into(), self.kid.clone().into());
        jwk.insert("use".into(), JWT_SVID_USE.into());
        jwk
    }

    /// Reads one JWK object the bundle loader has picked as a JWT authority (`use` is `jwt-svid` or
    /// absent). Refuses other key types and curves, coordinates that are not 32 bytes or not on the
    /// curve, an `alg` other than `ES256`, and a private part (`d`).
    pub(super) fn from_json(jwk: &Map<String, Value>) -> Result<Self, JwtError> {
        let kid = match jwk.get("kid") {
            Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
            Some(Value::String(_)) | None => {
                return Err(JwtError::BadJwks("a jwt-svid key has no `kid`".into()));
            }
            Some(other) => {
                return Err(JwtError::BadJwks(format!(
                    "`kid` `{other}` is not a string"
                )));
            }
        };
        let bad = |reason: String| JwtError::BadKey {
            kid: kid.clone(),
            reason,
        };
        let member = |name: &str| -> Result<Option<&str>, JwtError> {
            match jwk.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(bad(format!("`{name}` `{other}` is not a string"))),
            }
        };
        let kty = member("kty")?.unwrap_or_default();
        if kty != "EC" {
            return Err(JwtError::UnsupportedKeyType {
                kid,
                kty: kty.to_owned(),
            });
        }
        let crv = member("crv")?.unwrap_or_default();
        if crv != "P-256" {
            return Err(JwtError::UnsupportedCurve {
                kid,
                crv: crv.to_owned(),
            });
        }
        if let Some(alg) = member("alg")?
            && alg != ALGORITHM
        {
            return Err(bad(format!("`alg` `{alg}` does not fit a p-256 key")));
        }
        // A bundle is public; a private key in it is a leak that must be noticed, not ignored.
        if jwk.contains_key("d") {
            return Err(bad("it contains a private key (`d`)".into()));
        }
        let mut point = Vec::with_capacity(POINT_LEN);
        point.push(0x04);
        for name in ["x", "y"] {
            let encoded = member(name)?.ok_or_else(|| bad(format!("`{name}` is missing")))?;
            let coordinate = URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|e| bad(format!("`{name}` is not base64url: {e}")))?;
            // RFC 7518 §6.2.1.2: the full field-element length, leading zeros included.
            if coordinate.len() != COORDINATE_LEN {
                return Err(bad(format!(
                    "`{name}` is {} bytes; a p-256 coordinate is 32",
                    coordinate.len()
                )));
            }
            point.extend_from_slice(&coordinate);
        }
        Self::from_sec1_point(kid, &point)
    }

    fn coordinates(&self) -> (&[u8], &[u8]) {
        let xy = self.point.get(1..).unwrap_or_default();
        xy.split_at(xy.len() / 2)
    }
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Jwk({}, {})", self.kid, hex::encode(&self.point))
    }
}
