//! X.509-SVIDs: the keys, CSRs and signing authorities that make them, and parsing a chain back into its facts.
//!
//! Everything here follows the SPIFFE X.509-SVID specification:
//! - a leaf SVID has exactly one URI SAN (its SPIFFE ID), `CA:false`, a critical keyUsage with
//!   `digitalSignature` and without `keyCertSign`/`cRLSign`, and EKU `serverAuth` + `clientAuth`;
//! - a signing certificate (root or intermediate) has `CA:true`, a critical keyUsage with `keyCertSign`
//!   (and `cRLSign`), and its trust domain's own SPIFFE ID (`spiffe://td`, no path) as its URI SAN;
//! - keys are ECDSA P-256, and `notBefore` is backdated by [`NOT_BEFORE_BACKDATE`] for clock skew.
//!
//! [`Authority`] is the CA's hot loop: it keeps an rcgen `Issuer` built once, so a signature costs one
//! template, one ECDSA signature and no parsing. Time is always a [`SystemTime`] passed in by the caller
//! (`now`), the single clock seam tests use.

mod authority;
mod csr;
mod key;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::spiffe_id::{SpiffeId, SpiffeIdError};

pub use authority::{Authority, AuthorityError, SignedCert, SignedSvid};
pub use csr::{CsrError, VerifiedCsr, make_csr, verify_csr};
pub use key::{KeyError, SvidKey};

#[cfg(any(test, feature = "test-util"))]
pub(crate) use authority::{leaf_params, random_serial};

/// Lifetime of a workload SVID when nobody asks for another one.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(60 * 60);

/// Shortest SVID lifetime the CA signs (short enough for rotation tests and the demo).
pub const MIN_SVID_TTL: Duration = Duration::from_secs(30);

/// Longest SVID lifetime the CA signs.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest lifetime of a signing certificate (root or intermediate) this module makes.
pub const MAX_AUTHORITY_TTL: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);

/// How far `notBefore` is set before `now`, so a peer whose clock runs a little behind accepts a fresh SVID.
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(30);

/// Largest CSR [`verify_csr`] reads; a P-256 CSR is a few hundred bytes.
pub const MAX_CSR_LEN: usize = 64 * 1024;

/// Why a certificate chain is not a valid X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509SvidError {
    /// No certificate at all.
    #[error("svid chain is empty")]
    EmptyChain,
    /// A certificate in the chain is not DER X.509.
    #[error("certificate `{index}` of the chain is malformed: {reason}")]
    Malformed {
        /// Position in the chain (0 is the leaf).
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The certificate has no URI SAN, so it carries no SPIFFE ID.
    #[error("certificate has no uri san, so no spiffe id")]
    NoUriSan,
    /// More than one URI SAN: which one is the identity would be ambiguous.
    #[error("certificate has `{0}` uri sans; an svid has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a `spiffe://` URI.
    #[error("uri san `{0}` is not a spiffe id")]
    NotSpiffe(String),
    /// The URI SAN starts with `spiffe://` but is not a valid SPIFFE ID.
    #[error("uri san `{uri}` is not a valid spiffe id: {source}")]
    BadSpiffeId {
        /// The URI SAN as written in the certificate.
        uri: String,
        /// Why it does not parse.
        source: SpiffeIdError,
    },
    /// The leaf has `CA:true`; a signing certificate is not a workload identity.
    #[error("leaf certificate is a ca (basicConstraints `CA:true`)")]
    LeafIsCa,
    /// The leaf's keyUsage is missing or lacks `digitalSignature`, so it cannot sign a TLS handshake.
    #[error("leaf certificate lacks keyUsage `digitalSignature`")]
    MissingDigitalSignature,
    /// The leaf's keyUsage allows signing certificates or CRLs.
    #[error("leaf certificate has forbidden keyUsage `{0}`")]
    ForbiddenKeyUsage(&'static str),
    /// The leaf's SPIFFE ID has no path: it names a trust domain, which only signing certificates carry
    /// (X.509-SVID §3.1, §5.2).
    #[error("leaf spiffe id `{0}` has no path; a workload svid's id must have one")]
    LeafIdWithoutPath(String),
}

/// Why PEM text could not be read as certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// The PEM framing or base64 is broken.
    #[error("invalid pem: {0}")]
    Invalid(String),
    /// No `CERTIFICATE` section in the text.
    #[error("no `CERTIFICATE` section in the pem text")]
    NoCertificates,
}

/// The facts of a parsed, well-formed X.509-SVID chain: its SPIFFE ID, validity and serial.
///
/// Parsing checks the *shape* of the leaf only; whether the chain leads to a trusted root is the peer
/// verifier's job (`crate::verify`).
#[derive(Clone, PartialEq, Eq)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    leaf: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
}

impl X509Svid {
    /// Parses a chain, leaf first, and enforces the X.509-SVID leaf rules.
    pub fn parse_chain(chain: Vec<CertificateDer<'static>>) -> Result<Self, X509SvidError> {
        let Some(leaf_der) = chain.first() else {
            return Err(X509SvidError::EmptyChain);
        };
        let leaf = parse_cert(leaf_der, 0)?;
        let spiffe_id = single_spiffe_id(&leaf)?;
        check_leaf_usage(&leaf)?;
        if spiffe_id.is_trust_domain_id() {
            return Err(X509SvidError::LeafIdWithoutPath(spiffe_id.to_string()));
        }
        for (index, cert) in chain.iter().enumerate().skip(1) {
            parse_cert(cert, index)?;
        }
        let validity = leaf.validity();
        Ok(Self {
            spiffe_id,
            not_before: asn1_to_system(validity.not_before.timestamp()),
            not_after: asn1_to_system(validity.not_after.timestamp()),
            serial: serial_hex(leaf.raw_serial()),
            leaf: leaf_der.clone(),
            chain,
        })
    }

    /// Parses a PEM chain (`svid.pem`), leaf first.
    pub fn from_pem(pem: &str) -> Result<Self, X509SvidPemError> {
        Ok(Self::parse_chain(certs_from_pem(pem)?)?)
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The leaf's `notBefore`.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's `notAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether `now` is inside the leaf's validity window (both ends inclusive, as RFC 5280 says).
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// The leaf's serial number as lower-case hex, without leading zero bytes.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The whole chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    /// Gives the chain back, leaf first.
    pub fn into_chain(self) -> Vec<CertificateDer<'static>> {
        self.chain
    }

    /// The chain as PEM, leaf first (the `svid.pem` format).
    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }
}

impl fmt::Debug for X509Svid {
    // The certificates themselves are noise in logs; the ID, serial and expiry identify the SVID.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after_unix", &unix_secs(self.not_after))
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

/// Why a PEM SVID chain could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509SvidPemError {
    /// The PEM text itself.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The certificates in it.
    #[error(transparent)]
    Svid(#[from] X509SvidError),
}

/// The SPIFFE ID in a certificate's single URI SAN (leaf or signing certificate alike).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, X509SvidError> {
    single_spiffe_id(&parse_cert(cert, 0)?)
}

/// Reads every `CERTIFICATE` section of PEM text, in order; other sections are skipped.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Writes certificates as PEM `CERTIFICATE` sections, in order, with 64-column base64 lines.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        push_pem_section(&mut out, "CERTIFICATE", cert.as_ref());
    }
    out
}

// --- helpers shared by the submodules -------------------------------------------------------------

/// Appends one PEM section to `out`.
fn push_pem_section(out: &mut String, label: &str, der: &[u8]) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so splitting its bytes at any position keeps valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// Parses one DER certificate, refusing trailing bytes.
fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    index: usize,
) -> Result<X509Certificate<'a>, X509SvidError> {
    let (rest, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| X509SvidError::Malformed {
            index,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(X509SvidError::Malformed {
            index,
            reason: format!("`{}` trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

/// The URI SANs of a certificate, in order.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, X509SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| X509SvidError::Malformed {
            index: 0,
            reason: format!("subjectAltName: {e}"),
        })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID of a certificate: exactly one URI SAN, and it must parse.
fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    let uris = uri_sans(cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(X509SvidError::NoUriSan),
        [uri] => *uri,
        more => return Err(X509SvidError::MultipleUriSans(more.len())),
    };
    if !uri.starts_with("spiffe://") {
        return Err(X509SvidError::NotSpiffe(uri.to_owned()));
    }
    SpiffeId::parse(uri).map_err(|source| X509SvidError::BadSpiffeId {
        uri: uri.to_owned(),
        source,
    })
}

/// The leaf rules of the X.509-SVID specification §4.1 and §4.3: `CA:false`, `digitalSignature`, and
/// neither `keyCertSign` nor `cRLSign`.
fn check_leaf_usage(cert: &X509Certificate<'_>) -> Result<(), X509SvidError> {
    let malformed = |e: x509_parser::error::X509Error| X509SvidError::Malformed {
        index: 0,
        reason: e.to_string(),
    };
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(X509SvidError::LeafIsCa);
    }
    let Some(ku) = cert.key_usage().map_err(malformed)? else {
        return Err(X509SvidError::MissingDigitalSignature);
    };
    if ku.value.key_cert_sign() {
        return Err(X509SvidError::ForbiddenKeyUsage("keyCertSign"));
    }
    if ku.value.crl_sign() {
        return Err(X509SvidError::ForbiddenKeyUsage("cRLSign"));
    }
    if !ku.value.digital_signature() {
        return Err(X509SvidError::MissingDigitalSignature);
    }
    Ok(())
}

/// A certificate time (seconds since the epoch, possibly negative) as a `SystemTime`.
fn asn1_to_system(unix: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        UNIX_EPOCH.checked_add(magnitude).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// Seconds since the epoch, for messages and `Debug` (0 for times before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A DER INTEGER's content bytes as lower-case hex without leading zero bytes (`0` for zero).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let trimmed = raw.get(start..).unwrap_or_default();
    if trimmed.is_empty() {
        return "0".to_owned();
    }
    hex::encode(trimmed)
}

#[cfg(test)]
mod tests;
