//! Signing authorities: a CA certificate and its key, which sign intermediates and workload SVIDs.
//!
//! The rcgen `Issuer` (issuer name, key identifier, key) is built once when the authority is made or
//! loaded, so [`Authority::sign_svid`] never parses the CA certificate again.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::key::{KeyError, P256PublicKey, SvidKey};
use super::{
    MAX_AUTHORITY_TTL, MAX_SVID_TTL, MIN_SVID_TTL, NOT_BEFORE_BACKDATE, X509SvidError,
    asn1_to_system, parse_cert, serial_hex, single_spiffe_id, unix_secs,
};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Why an authority could not be made or loaded, or refused to sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// A key could not be generated, or a public key to sign is not ECDSA P-256.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The requested lifetime is outside the allowed bounds.
    #[error("ttl `{}s` is outside the allowed range `{}s`..=`{}s`", .ttl.as_secs(), .min.as_secs(), .max.as_secs())]
    TtlOutOfBounds {
        /// What was asked for.
        ttl: Duration,
        /// Shortest allowed.
        min: Duration,
        /// Longest allowed.
        max: Duration,
    },
    /// The SPIFFE ID is not in this authority's trust domain.
    #[error("spiffe id `{id}` is outside trust domain `{trust_domain}` of this authority")]
    OutsideTrustDomain {
        /// The ID asked for.
        id: String,
        /// The authority's trust domain.
        trust_domain: String,
    },
    /// A workload SVID was asked for the trust domain's own ID, which only signing certificates carry.
    #[error("spiffe id `{0}` has no path: it names the trust domain and cannot be a workload svid")]
    TrustDomainIdAsLeaf(String),
    /// The authority's certificate has expired (or expires at `now`).
    #[error("signing certificate expired at unix time `{}`", unix_secs(*.0))]
    Expired(SystemTime),
    /// The authority's certificate only becomes valid after `now + ttl`.
    #[error("signing certificate is not valid before unix time `{}`", unix_secs(*.0))]
    NotYetValid(SystemTime),
    /// `now` is before 1970 or too far in the future to encode.
    #[error("time `{0:?}` cannot be written in a certificate")]
    BadTime(SystemTime),
    /// The chain given to [`Authority::from_parts`] is empty.
    #[error("signing certificate chain is empty")]
    EmptyChain,
    /// A certificate of the chain does not parse.
    #[error("certificate `{index}` of the signing chain is malformed: {reason}")]
    Malformed {
        /// Position in the chain (0 is the authority's own certificate).
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The authority's certificate is not a CA (`CA:true` missing).
    #[error("signing certificate is not a ca (basicConstraints `CA:true` missing)")]
    NotCa,
    /// The authority's certificate may not sign certificates (keyUsage `keyCertSign` missing).
    #[error("signing certificate lacks keyUsage `keyCertSign`")]
    MissingKeyCertSign,
    /// The key does not belong to the certificate.
    #[error("private key does not match the signing certificate's public key")]
    KeyMismatch,
    /// The authority's certificate does not carry a usable SPIFFE ID.
    #[error("signing certificate has no usable spiffe id: {0}")]
    BadSigningId(X509SvidError),
    /// The authority's SPIFFE ID has a path; signing certificates carry `spiffe://<td>` only.
    #[error(
        "signing certificate has spiffe id `{0}`; a signing certificate's id must have no path"
    )]
    SigningIdHasPath(String),
    /// A certificate of the chain is not signed by the next one.
    #[error("certificate `{index}` of the signing chain is not signed by certificate `{}`", .index + 1)]
    BrokenChain {
        /// Position of the certificate whose signature fails.
        index: usize,
    },
    /// The issuer name cannot be reproduced byte for byte, so issued certificates would not chain.
    #[error("signing certificate subject cannot be reproduced exactly in issued certificates: {0}")]
    UnreproducibleSubject(String),
    /// The authority's certificate has `pathLenConstraint` 0: it may sign leaves only.
    #[error(
        "signing certificate has pathLenConstraint `0`; it may sign svids but not intermediates"
    )]
    PathLenExhausted,
    /// The random generator failed (serial numbers).
    #[error("system random generator failed")]
    Random,
    /// rcgen refused to build or sign a certificate.
    #[error("could not sign certificate: {0}")]
    Sign(String),
}

/// A signing certificate and its key: the CA's root, or an intermediate signed by a root or an upstream CA.
pub struct Authority {
    issuer: Issuer<'static, SvidKey>,
    cert: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    // What an issued chain carries after its leaf: `chain` without self-signed roots, computed once
    // (a peer must get the root from its bundle, never from the chain it is verifying).
    issued_tail: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    not_before: SystemTime,
    not_after: SystemTime,
    path_len: Option<u32>,
    is_root: bool,
}

/// A workload SVID fresh from [`Authority::sign_svid`].
#[derive(Clone, PartialEq, Eq)]
pub struct SignedSvid {
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// The leaf certificate.
    pub leaf: CertificateDer<'static>,
    /// The chain to hand out: the leaf, then the authority's chain without its root.
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial number, lower-case hex without leading zero bytes.
    pub serial: String,
    /// `notBefore` as written in the certificate.
    pub not_before: SystemTime,
    /// `notAfter` as written in the certificate (never after the authority's own).
    pub not_after: SystemTime,
}

/// An intermediate signing certificate fresh from [`Authority::sign_intermediate`].
#[derive(Clone, PartialEq, Eq)]
pub struct SignedCert {
    /// The certificate.
    pub cert: CertificateDer<'static>,
    /// Serial number, lower-case hex without leading zero bytes.
    pub serial: String,
    /// `notBefore` as written in the certificate.
    pub not_before: SystemTime,
    /// `notAfter` as written in the certificate (never after the signer's own).
    pub not_after: SystemTime,
}

impl Authority {
    /// Makes a self-signed root for `td` with a fresh key, valid from `now` (backdated) for `ttl`.
    pub fn new_root(
        td: &TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        check_ttl(ttl, MIN_SVID_TTL, MAX_AUTHORITY_TTL)?;
        let key = SvidKey::generate()?;
        let now = whole_seconds(now)?;
        let not_before = now.checked_sub(NOT_BEFORE_BACKDATE).unwrap_or(UNIX_EPOCH);
        let not_after = now.checked_add(ttl).ok_or(AuthorityError::BadTime(now))?;
        let serial = random_serial()?;
        let params = signing_params(
            td,
            "root",
            not_before,
            not_after,
            &serial,
            BasicConstraints::Unconstrained,
        )?;
        let cert: CertificateDer<'static> = params.self_signed(&key).map_err(sign_error)?.into();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: cert.clone(),
            chain: vec![cert],
            issued_tail: Vec::new(),
            trust_domain: td.clone(),
            not_before,
            not_after,
            path_len: None,
            is_root: true,
        })
    }

    /// Loads a signing certificate chain (its own certificate first, up to but not necessarily including
    /// the root) and its key, e.g. an intermediate signed by an upstream CA, or a persisted root.
    ///
    /// Checks: the first certificate is a CA with `keyCertSign`, `key` is its key, it carries exactly one
    /// URI SAN that is a trust domain ID (`spiffe://td`), and each certificate is signed by the next.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: SvidKey,
    ) -> Result<Self, AuthorityError> {
        let Some(cert_der) = chain.first() else {
            return Err(AuthorityError::EmptyChain);
        };
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(index, der)| {
                parse_cert(der, index).map_err(|e| match e {
                    X509SvidError::Malformed { reason, .. } => malformed(index, reason),
                    other => malformed(index, other),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(cert) = parsed.first() else {
            return Err(AuthorityError::EmptyChain);
        };

        let bc = cert.basic_constraints().map_err(|e| malformed(0, e))?;
        let path_len = match bc {
            Some(bc) if bc.value.ca => bc.value.path_len_constraint,
            _ => return Err(AuthorityError::NotCa),
        };
        match cert.key_usage().map_err(|e| malformed(0, e))? {
            Some(ku) if ku.value.key_cert_sign() => {}
            _ => return Err(AuthorityError::MissingKeyCertSign),
        }
        // Comparing the points also proves the certificate's key is P-256 (ours always is).
        if cert.public_key().subject_public_key.data.as_ref() != key.public_point() {
            return Err(AuthorityError::KeyMismatch);
        }
        let id = single_spiffe_id(cert).map_err(AuthorityError::BadSigningId)?;
        if !id.is_trust_domain_id() {
            return Err(AuthorityError::SigningIdHasPath(id.to_string()));
        }
        for (index, pair) in parsed.windows(2).enumerate() {
            if let [child, parent] = pair {
                child
                    .verify_signature(Some(parent.public_key()))
                    .map_err(|_| AuthorityError::BrokenChain { index })?;
            }
        }
        // rcgen rebuilds the issuer name from its parsed attributes, and panics on an empty RDN; refuse
        // anything but one attribute per RDN before handing it the certificate.
        if cert.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(AuthorityError::UnreproducibleSubject(
                "a relative distinguished name has other than one attribute".to_owned(),
            ));
        }
        let issued_tail = chain
            .iter()
            .zip(&parsed)
            .filter(|(_, c)| !is_self_signed(c))
            .map(|(der, _)| der.clone())
            .collect();
        let validity = cert.validity();
        let not_before = asn1_to_system(validity.not_before.timestamp());
        let not_after = asn1_to_system(validity.not_after.timestamp());
        let subject_raw = cert.subject().as_raw().to_vec();

        let is_root = is_self_signed(cert);
        let issuer = Issuer::from_ca_cert_der(cert_der, key)
            .map_err(|e| AuthorityError::UnreproducibleSubject(e.to_string()))?;
        check_issuer_name(&issuer, &subject_raw, not_before, not_after)?;
        let cert = cert_der.clone();
        Ok(Self {
            issuer,
            cert,
            chain,
            issued_tail,
            trust_domain: id.trust_domain(),
            not_before,
            not_after,
            path_len,
            is_root,
        })
    }

    /// Signs a workload SVID for `id` over `public_key_der` (SubjectPublicKeyInfo, ECDSA P-256).
    ///
    /// The SVID is valid from `now` minus [`NOT_BEFORE_BACKDATE`] for `ttl` (within [`MIN_SVID_TTL`]..=
    /// [`MAX_SVID_TTL`]), clamped to this authority's own validity. Nothing of the requester's choosing
    /// goes into the certificate but the public key.
    pub fn sign_svid(
        &self,
        public_key_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SignedSvid, AuthorityError> {
        check_ttl(ttl, MIN_SVID_TTL, MAX_SVID_TTL)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(AuthorityError::OutsideTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(AuthorityError::TrustDomainIdAsLeaf(id.to_string()));
        }
        let key = P256PublicKey::from_spki_der(public_key_der)?;
        let (not_before, not_after) = self.validity(now, ttl)?;
        let serial = random_serial()?;
        let params = leaf_params(id, not_before, not_after, &serial)?;
        let leaf: CertificateDer<'static> = params
            .signed_by(&key, &self.issuer)
            .map_err(sign_error)?
            .into();
        let mut chain = Vec::with_capacity(1 + self.issued_tail.len());
        chain.push(leaf.clone());
        chain.extend(self.issued_tail.iter().cloned());
        Ok(SignedSvid {
            spiffe_id: id.clone(),
            leaf,
            chain,
            serial: serial_hex(&serial),
            not_before,
            not_after,
        })
    }

    /// Signs an intermediate signing certificate for this trust domain over `public_key_der`.
    ///
    /// The intermediate has `pathLenConstraint` 0: it signs SVIDs, not further intermediates. Its
    /// lifetime is clamped to this authority's. Load it with [`Authority::from_parts`].
    pub fn sign_intermediate(
        &self,
        public_key_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SignedCert, AuthorityError> {
        check_ttl(ttl, MIN_SVID_TTL, MAX_AUTHORITY_TTL)?;
        if self.path_len == Some(0) {
            return Err(AuthorityError::PathLenExhausted);
        }
        let key = P256PublicKey::from_spki_der(public_key_der)?;
        let (not_before, not_after) = self.validity(now, ttl)?;
        let serial = random_serial()?;
        let mut params = signing_params(
            &self.trust_domain,
            "intermediate",
            not_before,
            not_after,
            &serial,
            BasicConstraints::Constrained(0),
        )?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(sign_error)?
            .into();
        Ok(SignedCert {
            cert,
            serial: serial_hex(&serial),
            not_before,
            not_after,
        })
    }

    /// This authority's own certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This authority's chain, its own certificate first, as loaded (a root's chain is just the root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trust domain of this authority's SPIFFE ID.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This authority's `notBefore`.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// This authority's `notAfter`; nothing it signs outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether this authority's certificate is self-signed (a root).
    pub fn is_root(&self) -> bool {
        self.is_root
    }

    /// The signing key.
    pub fn key(&self) -> &SvidKey {
        self.issuer.key()
    }

    /// The rcgen issuer, for the test PKI's deliberately malformed certificates.
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn issuer(&self) -> &Issuer<'static, SvidKey> {
        &self.issuer
    }

    /// What an issued chain carries after its leaf.
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn issued_tail(&self) -> &[CertificateDer<'static>] {
        &self.issued_tail
    }

    /// The validity window of something this authority signs at `now` for `ttl`.
    fn validity(
        &self,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<(SystemTime, SystemTime), AuthorityError> {
        let now = whole_seconds(now)?;
        if self.not_after <= now {
            return Err(AuthorityError::Expired(self.not_after));
        }
        let not_before = now
            .checked_sub(NOT_BEFORE_BACKDATE)
            .unwrap_or(UNIX_EPOCH)
            .max(self.not_before);
        let not_after = now
            .checked_add(ttl)
            .ok_or(AuthorityError::BadTime(now))?
            .min(self.not_after);
        // `now + ttl` before the authority even starts: the clock is far behind, and the certificate
        // would be born expired.
        if not_after <= not_before {
            return Err(AuthorityError::NotYetValid(self.not_before));
        }
        Ok((not_before, not_after))
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain.len())
            .field("not_after_unix", &unix_secs(self.not_after))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for SignedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after_unix", &unix_secs(self.not_after))
            .finish()
    }
}

impl fmt::Debug for SignedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCert")
            .field("serial", &self.serial)
            .field("not_after_unix", &unix_secs(self.not_after))
            .finish()
    }
}

/// The leaf SVID template (X.509-SVID §4 and §5): one URI SAN, `CA:false`, critical keyUsage
/// `digitalSignature` only, EKU serverAuth + clientAuth, empty subject (so the SAN is marked critical).
pub(crate) fn leaf_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: &[u8],
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(sign_error)?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    Ok(params)
}

/// Fresh random serial bytes: 128 bits, encoded as a positive DER INTEGER (RFC 5280 §4.1.2.2).
pub(crate) fn random_serial() -> Result<[u8; 16], AuthorityError> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| AuthorityError::Random)?;
    // A zero serial is not positive; 2^-128 likely, but cheap to rule out.
    if serial.iter().all(|b| *b == 0) {
        serial = [1; 16];
    }
    Ok(serial)
}

/// A root or intermediate template: `CA:true`, critical keyUsage keyCertSign + cRLSign, URI SAN `spiffe://td`.
fn signing_params(
    td: &TrustDomain,
    kind: &str,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: &[u8],
    constraints: BasicConstraints,
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    // The serial prefix keeps names distinct across rotations, so path builders that match by name
    // alone do not confuse an old root with a new one.
    let short_serial = serial_hex(serial.get(..4).unwrap_or(serial));
    dn.push(
        DnType::CommonName,
        format!("meshward {kind} {short_serial}"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        td.id().as_str().try_into().map_err(sign_error)?,
    )];
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    Ok(params)
}

/// Signs a throwaway certificate and checks its issuer name is byte-identical to the CA's subject.
///
/// rcgen re-encodes the issuer name from parsed attributes; if that loses anything (an attribute type
/// or string type it does not keep), every SVID would carry an issuer that matches no certificate.
fn check_issuer_name(
    issuer: &Issuer<'static, SvidKey>,
    subject_raw: &[u8],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), AuthorityError> {
    let mut probe = CertificateParams::default();
    probe.not_before = to_offset(not_before)?;
    probe.not_after = to_offset(not_after)?;
    probe.serial_number = Some(SerialNumber::from_slice(&[1]));
    let probe = probe.signed_by(issuer.key(), issuer).map_err(sign_error)?;
    let (_, parsed) = X509Certificate::from_der(probe.der().as_ref())
        .map_err(|e| AuthorityError::UnreproducibleSubject(e.to_string()))?;
    if parsed.issuer().as_raw() != subject_raw {
        return Err(AuthorityError::UnreproducibleSubject(format!(
            "subject `{}` re-encodes differently",
            parsed.issuer()
        )));
    }
    Ok(())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

fn check_ttl(ttl: Duration, min: Duration, max: Duration) -> Result<(), AuthorityError> {
    if ttl < min || ttl > max {
        return Err(AuthorityError::TtlOutOfBounds { ttl, min, max });
    }
    Ok(())
}

/// `t` truncated to whole seconds, the precision of certificate times.
fn whole_seconds(t: SystemTime) -> Result<SystemTime, AuthorityError> {
    let since = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthorityError::BadTime(t))?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(since.as_secs()))
        .ok_or(AuthorityError::BadTime(t))
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, AuthorityError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthorityError::BadTime(t))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| AuthorityError::BadTime(t))?;
    let dt = OffsetDateTime::from_unix_timestamp(secs).map_err(|_| AuthorityError::BadTime(t))?;
    // Years past 9999 do not fit GeneralizedTime.
    if dt.year() > 9999 {
        return Err(AuthorityError::BadTime(t));
    }
    Ok(dt)
}

fn malformed(index: usize, reason: impl fmt::Display) -> AuthorityError {
    AuthorityError::Malformed {
        index,
        reason: reason.to_string(),
    }
}

fn sign_error(e: rcgen::Error) -> AuthorityError {
    AuthorityError::Sign(e.to_string())
}

#[cfg(test)]
mod tests;
