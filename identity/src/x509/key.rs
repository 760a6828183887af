//! ECDSA P-256 key pairs, and reading P-256 public keys out of SubjectPublicKeyInfo DER.

use std::fmt;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Why a key could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The system random generator failed.
    #[error("could not generate an ecdsa p-256 key: {0}")]
    Generate(String),
    /// The bytes are not a PKCS#8 ECDSA P-256 private key.
    #[error("not a pkcs#8 ecdsa p-256 private key: {0}")]
    InvalidPrivateKey(String),
    /// The public key is not SubjectPublicKeyInfo DER.
    #[error("malformed public key (SubjectPublicKeyInfo): {0}")]
    MalformedPublicKey(String),
    /// The public key is well formed but not ECDSA P-256.
    #[error(
        "public key algorithm `{algorithm}` is not supported; only ecdsa p-256 keys are accepted"
    )]
    UnsupportedAlgorithm {
        /// The algorithm, by name where known, else by OID.
        algorithm: String,
    },
}

/// An ECDSA P-256 key pair: a workload's or a signing authority's private key.
///
/// `Debug` never shows the private key.
pub struct SvidKey {
    pair: KeyPair,
}

impl SvidKey {
    /// Generates a fresh key from the system's secure random generator.
    pub fn generate() -> Result<Self, KeyError> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Reads a PKCS#8 DER private key; refuses any key that is not ECDSA P-256.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(der);
        let pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ECDSA_P256_SHA256)
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Reads the first `PRIVATE KEY` (PKCS#8) section of PEM text.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| KeyError::InvalidPrivateKey(format!("pem: {e}")))?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// The private key as PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> PrivatePkcs8KeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pair.serialize_der())
    }

    /// The private key in the form rustls takes.
    pub fn to_private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.to_pkcs8_der())
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn to_pkcs8_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// The public key as an uncompressed SEC1 point (`04 || x || y`).
    pub(crate) fn public_point(&self) -> &[u8] {
        self.pair.der_bytes()
    }
}

impl fmt::Debug for SvidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidKey(ecdsa-p256, <redacted>)")
    }
}

impl PublicKeyData for SvidKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for SvidKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.pair.sign(msg)
    }
}

/// A P-256 public key read from SubjectPublicKeyInfo DER, ready to be put in a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct P256PublicKey {
    point: Vec<u8>,
}

impl P256PublicKey {
    /// Reads SubjectPublicKeyInfo DER, refusing every algorithm but ECDSA P-256 by name.
    ///
    /// The point is not checked to be on the curve here (that costs a scalar multiplication); keys from
    /// CSRs were already proven by the CSR's self-signature, and a bad point only yields a useless cert.
    pub(crate) fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        // Fast path: every P-256 SPKI with an uncompressed point is these 26 bytes then the 65-byte point.
        if let Some(point) = der.strip_prefix(P256_SPKI_PREFIX.as_slice())
            && point.len() == 65
            && point.first() == Some(&0x04)
        {
            return Ok(Self {
                point: point.to_vec(),
            });
        }
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| KeyError::MalformedPublicKey(e.to_string()))?;
        if !rest.is_empty() {
            return Err(KeyError::MalformedPublicKey(format!(
                "`{}` trailing bytes after the key",
                rest.len()
            )));
        }
        Self::from_spki(&spki)
    }

    /// Checks a parsed SubjectPublicKeyInfo is an uncompressed ECDSA P-256 key.
    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, KeyError> {
        let algorithm = spki_algorithm_name(spki);
        if algorithm != "ecdsa p-256" {
            return Err(KeyError::UnsupportedAlgorithm { algorithm });
        }
        let point = spki.subject_public_key.data.as_ref();
        if point.len() != 65 || point.first() != Some(&0x04) {
            return Err(KeyError::MalformedPublicKey(
                "ecdsa p-256 point is not a 65-byte uncompressed point".to_owned(),
            ));
        }
        Ok(Self {
            point: point.to_vec(),
        })
    }

    /// The key as canonical SubjectPublicKeyInfo DER.
    pub(crate) fn to_spki_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(P256_SPKI_PREFIX.len() + self.point.len());
        der.extend_from_slice(&P256_SPKI_PREFIX);
        der.extend_from_slice(&self.point);
        der
    }

    /// The uncompressed SEC1 point.
    pub(crate) fn point(&self) -> &[u8] {
        &self.point
    }
}

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A human name for a SubjectPublicKeyInfo's algorithm (`ecdsa p-256`, `rsa`, `ed25519`, ...), else its OID.
pub(crate) fn spki_algorithm_name(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => "ecdsa p-256".to_owned(),
            Some(c) if c == OID_NIST_EC_P384 => "ecdsa p-384".to_owned(),
            Some(c) if c == OID_NIST_EC_P521 => "ecdsa p-521".to_owned(),
            Some(c) => format!("ecdsa curve {c}"),
            None => "ecdsa with no named curve".to_owned(),
        };
    }
    if *oid == OID_PKCS1_RSAENCRYPTION {
        "rsa".to_owned()
    } else if *oid == OID_SIG_ED25519 {
        "ed25519".to_owned()
    } else if *oid == OID_SIG_ED448 {
        "ed448".to_owned()
    } else {
        oid.to_id_string()
    }
}

/// DER of `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (66 bytes, 0 unused bits) ... }`.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
