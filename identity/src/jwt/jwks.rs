//! JWT bundles: each trust domain's JWT authorities, in and out of the SPIFFE bundle (JWKS) format.
//!
//! A SPIFFE bundle (Trust Domain and Bundle §4) is a JWK Set with optional `spiffe_sequence` and
//! `spiffe_refresh_hint`. Keys whose `use` is `x509-svid`, or a `use` this code does not know, are
//! skipped as §4.2.2 requires. Keys with no `use` are read as JWT authorities: go-spiffe and SPIRE
//! write JWT bundles on the Workload API without it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::JwtError;
use super::key::{JWT_SVID_USE, Jwk};
use crate::spiffe_id::TrustDomain;

/// One trust domain's JWT authorities, several at once during key rotation, looked up by key ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, Jwk>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

/// The JWT bundles of every trust domain a validator trusts, keyed by trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundleSet {
    bundles: BTreeMap<TrustDomain, JwtBundle>,
}

impl JwtBundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            keys: BTreeMap::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// Reads a SPIFFE bundle or plain JWKS document as `trust_domain`'s JWT authorities.
    ///
    /// Refuses a document that is not a JSON object with a `keys` array, a JWT key with a missing `kid`,
    /// a `kty` other than `EC`, a `crv` other than `P-256`, bad or off-curve coordinates, a private part,
    /// and two keys with one `kid`.
    pub fn from_jwks_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, JwtError> {
        let document = match serde_json::from_slice(json) {
            Ok(Value::Object(document)) => document,
            Ok(_) => return Err(JwtError::BadJwks("document is not a json object".into())),
            Err(e) => return Err(JwtError::BadJwks(format!("document is not json: {e}"))),
        };
        let Some(Value::Array(keys)) = document.get("keys") else {
            return Err(JwtError::BadJwks("document has no `keys` array".into()));
        };
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = optional_u64(&document, "spiffe_sequence")?;
        bundle.refresh_hint =
            optional_u64(&document, "spiffe_refresh_hint")?.map(Duration::from_secs);
        for (index, key) in keys.iter().enumerate() {
            let Value::Object(key) = key else {
                return Err(JwtError::BadJwks(format!(
                    "key {index} is not a json object"
                )));
            };
            match key.get("use") {
                None => {}
                Some(Value::String(usage)) if usage == JWT_SVID_USE => {}
                // `x509-svid` authorities, and uses this code does not know (§4.2.2: ignore them).
                Some(Value::String(_)) => continue,
                Some(other) => {
                    return Err(JwtError::BadJwks(format!(
                        "key {index} has `use` `{other}`, which is not a string"
                    )));
                }
            }
            let jwk = Jwk::from_json(key)?;
            if bundle.keys.contains_key(jwk.kid()) {
                return Err(JwtError::DuplicateKeyId(jwk.kid().to_owned()));
            }
            bundle.insert(jwk);
        }
        Ok(bundle)
    }

    /// The bundle as a SPIFFE bundle document: `{"keys":[..]}` with every key's `use` set to `jwt-svid`,
    /// plus `spiffe_sequence` and `spiffe_refresh_hint` when set. Keys are ordered by key ID.
    pub fn to_jwks_json(&self) -> Vec<u8> {
        let mut document = Map::new();
        let keys = self.keys.values().map(|k| Value::Object(k.to_json()));
        document.insert("keys".into(), Value::Array(keys.collect()));
        if let Some(hint) = self.refresh_hint {
            document.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        if let Some(sequence) = self.sequence {
            document.insert("spiffe_sequence".into(), sequence.into());
        }
        Value::Object(document).to_string().into_bytes()
    }

    /// The trust domain these authorities sign for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Adds `jwk`, returning the key it replaces if one had the same key ID.
    pub fn insert(&mut self, jwk: Jwk) -> Option<Jwk> {
        self.keys.insert(jwk.kid().to_owned(), jwk)
    }

    /// Removes and returns the key with ID `kid`; tokens it signed no longer validate.
    pub fn remove(&mut self, kid: &str) -> Option<Jwk> {
        self.keys.remove(kid)
    }

    /// The key with ID `kid`.
    pub fn get(&self, kid: &str) -> Option<&Jwk> {
        self.keys.get(kid)
    }

    /// Every key, ordered by key ID.
    pub fn keys(&self) -> impl Iterator<Item = &Jwk> {
        self.keys.values()
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the bundle has no keys (and so validates nothing).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `spiffe_sequence` number, which increases with every change the publisher makes.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// Sets the `spiffe_sequence` number.
    pub fn set_sequence(&mut self, sequence: Option<u64>) {
        self.sequence = sequence;
    }

    /// The `spiffe_refresh_hint`: how often consumers should fetch the bundle again.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Sets the `spiffe_refresh_hint` (published in whole seconds).
    pub fn set_refresh_hint(&mut self, hint: Option<Duration>) {
        self.refresh_hint = hint;
    }
}

impl JwtBundleSet {
    /// An empty set, which validates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bundle`, returning the bundle it replaces for the same trust domain.
    pub fn insert(&mut self, bundle: JwtBundle) -> Option<JwtBundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    /// Removes and returns the bundle of `trust_domain`.
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<JwtBundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundle of `trust_domain`, to add or remove keys.
    pub fn get_mut(&mut self, trust_domain: &TrustDomain) -> Option<&mut JwtBundle> {
        self.bundles.get_mut(trust_domain)
    }

    /// Every bundle, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.bundles.values()
    }

    /// The number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether the set has no bundles.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl FromIterator<JwtBundle> for JwtBundleSet {
    fn from_iter<I: IntoIterator<Item = JwtBundle>>(bundles: I) -> Self {
        let mut set = Self::new();
        for bundle in bundles {
            set.insert(bundle);
        }
        set
    }
}

fn optional_u64(document: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    match document.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            JwtError::BadJwks(format!("`{name}` `{value}` is not a non-negative integer"))
        }),
    }
}

#[cfg(test)]
mod tests;
