//! PKCS#10 certificate signing requests: workloads and agents make them, the CA verifies them.
//!
//! The CA never trusts what a CSR *asks for*: it writes the SAN, key usage and lifetime itself
//! (DESIGN.md §3.1). It only reads the public key, and refuses a CSR that asks for something other
//! than the identity it is entitled to, so a confused or malicious requester learns early and loudly
//! (Consul CVE-2022-40716 was a CA that signed the SAN a CSR asked for).

use rcgen::{CertificateParams, DistinguishedName, SanType};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};

use super::MAX_CSR_LEN;
use super::key::{KeyError, P256PublicKey, SvidKey};
use crate::spiffe_id::SpiffeId;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("csr is `{len}` bytes; the limit is `{max}` bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not DER PKCS#10.
    #[error("malformed csr: {0}")]
    Malformed(String),
    /// The CSR's key is not ECDSA P-256 (or not a usable P-256 key).
    #[error("csr key: {0}")]
    Key(#[from] KeyError),
    /// The CSR is signed with something other than `ecdsa-with-SHA256`.
    #[error("csr signature algorithm `{0}` is not supported; only ecdsa-with-SHA256 is accepted")]
    UnsupportedSignatureAlgorithm(String),
    /// The self-signature does not verify: the requester does not hold the private key.
    #[error("csr signature does not verify against its own public key")]
    BadSignature,
    /// The CSR asks for a CA certificate.
    #[error("csr asks for a ca certificate (basicConstraints `CA:true`)")]
    RequestsCa,
    /// The CSR asks for several URI SANs.
    #[error("csr asks for `{}` uri sans (`{}`); an svid has exactly one", .0.len(), .0.join("`, `"))]
    MultipleUriSans(Vec<String>),
    /// The CSR asks for a URI SAN other than the identity it is entitled to.
    #[error("csr asks for uri san `{requested}` but the caller is entitled to `{entitled}`")]
    IdMismatch {
        /// What the CSR asked for.
        requested: String,
        /// What the CA would sign.
        entitled: String,
    },
    /// rcgen could not build the CSR.
    #[error("could not build csr: {0}")]
    Build(String),
}

/// A CSR whose self-signature verified, with what it asked for.
///
/// The requests are reported only so [`VerifiedCsr::check_for`] can refuse a mismatch; the CA writes
/// every extension of the issued certificate itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// The subject's public key, SubjectPublicKeyInfo DER (always ECDSA P-256).
    pub public_key_der: Vec<u8>,
    /// Every URI SAN the CSR asked for, in order.
    pub requested_uris: Vec<String>,
    /// Whether the CSR asked for `CA:true`.
    pub requests_ca: bool,
}

impl VerifiedCsr {
    /// Refuses the CSR unless it fits an SVID for `id`: no CA request, and no URI SAN or exactly `id`.
    ///
    /// A CSR with no URI SAN is fine: the CA writes the SAN itself.
    pub fn check_for(&self, id: &SpiffeId) -> Result<(), CsrError> {
        if self.requests_ca {
            return Err(CsrError::RequestsCa);
        }
        match self.requested_uris.as_slice() {
            [] => Ok(()),
            [uri] if uri == id.as_str() => Ok(()),
            [uri] => Err(CsrError::IdMismatch {
                requested: uri.clone(),
                entitled: id.to_string(),
            }),
            more => Err(CsrError::MultipleUriSans(more.to_vec())),
        }
    }
}

/// Makes a DER PKCS#10 CSR for `id`, signed by `key`, carrying `id` as its single URI SAN.
pub fn make_csr(key: &SvidKey, id: &SpiffeId) -> Result<Vec<u8>, CsrError> {
    let mut params = CertificateParams::default();
    // The subject is ignored by the CA (the identity lives in the SAN), so none is sent.
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .as_str()
        .try_into()
        .map_err(|e: rcgen::Error| CsrError::Build(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(key)
        .map_err(|e| CsrError::Build(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// Parses a DER CSR, checks its self-signature, requires an ECDSA P-256 key, and reports what it asks for.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge {
            len: der.len(),
            max: MAX_CSR_LEN,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "`{}` trailing bytes after the csr",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    // The key algorithm first, so an RSA or P-384 CSR is refused by name rather than as a bad signature.
    let key = P256PublicKey::from_spki(&info.subject_pki)?;
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CsrError::UnsupportedSignatureAlgorithm(
            csr.signature_algorithm.algorithm.to_id_string(),
        ));
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.point())
        .verify(info.raw, csr.signature_value.data.as_ref())
        .map_err(|_| CsrError::BadSignature)?;

    let mut requested_uris = Vec::new();
    let mut requests_ca = false;
    // Every extensionRequest attribute, not only the first (x509-parser's `requested_extensions` stops
    // at the first, and a second one could hide a request).
    let requested = info
        .iter_attributes()
        .filter_map(|attr| match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(req) => Some(req.extensions.iter()),
            _ => None,
        });
    for ext in requested.flatten() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                requested_uris.extend(san.general_names.iter().filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                }));
            }
            ParsedExtension::BasicConstraints(bc) => requests_ca |= bc.ca,
            // A request we cannot read might be the SAN or CA flag in disguise: refuse rather than guess.
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed(format!("requested extension: {error}")));
            }
            _ => {}
        }
    }
    Ok(VerifiedCsr {
        public_key_der: key.to_spki_der(),
        requested_uris,
        requests_ca,
    })
}

#[cfg(test)]
mod tests;
