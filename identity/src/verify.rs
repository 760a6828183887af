//! The peer verifier every mTLS connection in meshward goes through, on both sides.
//!
//! SPIFFE authenticates a peer by the one `spiffe://` URI SAN of its X.509-SVID, not by DNS names, so
//! [`PeerVerifier`] replaces rustls's WebPKI verifiers. In order, it:
//!
//! 1. reads the leaf: a CA certificate is refused, then it needs exactly one URI SAN that parses as
//!    a SPIFFE ID, keyUsage `digitalSignature`, and a trust domain this verifier accepts;
//! 2. chains the leaf to *that* trust domain's bundle only (so a federated root can never vouch for
//!    an identity in our own trust domain), with rustls-webpki, checking validity windows,
//!    signatures and the extended key usage for the peer's role;
//! 3. checks the ID against the expected peer, if one was given.
//!
//! A verifier is immutable: on SVID or bundle rotation the owner builds a new verifier and a new
//! rustls config, and new connections pick up the current config (as linkerd2-proxy does).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{SignatureScheme, crypto};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, KeyUsage};
use x509_parser::prelude::FromDer as _;

use crate::bundle::BundleSet;
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a peer's certificate chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate could not be parsed, or its contents are self-contradictory.
    #[error("peer certificate is malformed: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN, so it carries no SPIFFE ID.
    #[error("peer certificate has no URI SAN, so it carries no spiffe id")]
    NoUriSan,
    /// The leaf has more than one URI SAN; an X.509-SVID has exactly one.
    #[error("peer certificate has {} URI SANs (`{}`); an X.509-SVID has exactly one", .0.len(), .0.join("`, `"))]
    MultipleUriSans(Vec<String>),
    /// The leaf's URI SAN is not a valid SPIFFE ID.
    #[error("peer certificate's URI SAN `{uri}` is not a spiffe id: {reason}")]
    NotSpiffe {
        /// The URI as it appears in the certificate.
        uri: String,
        /// Why it does not parse.
        reason: SpiffeIdError,
    },
    /// The peer's trust domain is not one this verifier accepts.
    #[error("peer `{id}` is in trust domain `{}`, which is not accepted here", .id.trust_domain_name())]
    UnknownTrustDomain {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
    },
    /// The peer's trust domain is accepted, but there is no bundle for it.
    #[error("no trust bundle for trust domain `{0}`; cannot verify its peers")]
    NoBundle(TrustDomain),
    /// The leaf is a CA certificate (`CA:true`, or allowed to sign certificates or CRLs).
    #[error("peer certificate for `{id}` is a CA certificate ({reason}), not a workload leaf")]
    CaAsLeaf {
        /// The URI SAN, or `(none)`.
        id: String,
        /// Which CA property the leaf has.
        reason: &'static str,
    },
    /// The leaf, or a certificate in its chain, has expired.
    #[error("certificate chain of `{id}` expired at {} (now {})", utc(.not_after), utc(.now))]
    Expired {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// The `notAfter` that has passed.
        not_after: UnixTime,
        /// The verification time.
        now: UnixTime,
    },
    /// The leaf, or a certificate in its chain, is not valid yet.
    #[error("certificate chain of `{id}` is not valid before {} (now {})", utc(.not_before), utc(.now))]
    NotYetValid {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// The `notBefore` still in the future.
        not_before: UnixTime,
        /// The verification time.
        now: UnixTime,
    },
    /// No chain leads from the leaf to a root in its trust domain's bundle.
    #[error("certificate of `{id}` does not chain to any authority in the trust bundle of `{}`", .id.trust_domain_name())]
    UnknownIssuer {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
    },
    /// A signature in the chain does not verify with its issuer's key.
    #[error("a signature in the certificate chain of `{id}` does not verify")]
    BadSignature {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
    },
    /// The leaf's keyUsage is missing or lacks `digitalSignature`, so it may not sign a handshake.
    #[error("certificate of `{id}` lacks keyUsage `digitalSignature` (X.509-SVID §4.3)")]
    NoDigitalSignature {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
    },
    /// The leaf's extended key usage does not allow the peer's role.
    #[error("certificate of `{id}` is not allowed for {role} authentication (extended key usage)")]
    WrongPurpose {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// The role the peer played.
        role: PeerRole,
    },
    /// Any other reason rustls-webpki refuses the chain (name or path length constraints, algorithms).
    #[error("certificate chain of `{id}` is refused: {reason}")]
    InvalidChain {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// What webpki said.
        reason: webpki::Error,
    },
    /// The chain is good but the peer is not the one this connection expects.
    #[error("peer `{got}` is not {expected}")]
    WrongPeer {
        /// Who was expected.
        expected: Expected,
        /// Who answered.
        got: SpiffeId,
    },
}

/// Which peer identities a connection accepts once the chain verifies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expected {
    /// Any ID in an accepted trust domain (inbound: authorization decides later).
    #[default]
    Any,
    /// Exactly this ID (outbound to a known upstream).
    Id(SpiffeId),
    /// Any one of these IDs.
    AnyOf(Vec<SpiffeId>),
}

/// The role the *verified* peer plays, which decides the extended key usage its leaf must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (we are the server): `clientAuth`.
    Client,
    /// The peer is a TLS server (we are the client): `serverAuth`.
    Server,
}

/// Verifies SPIFFE peers for rustls, as a server ([`ClientCertVerifier`]) and as a client
/// ([`ServerCertVerifier`]).
pub struct PeerVerifier {
    bundles: Arc<BundleSet>,
    accepted: BTreeSet<TrustDomain>,
    expected: Expected,
    // Precomputed once: rustls asks for them on every handshake as a borrowed slice.
    root_hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    /// A verifier that accepts peers of `accepted` trust domains, chained to their bundle in
    /// `bundles`; any peer ID is accepted until [`Self::with_expected`] narrows it.
    pub fn new(bundles: Arc<BundleSet>, accepted: impl IntoIterator<Item = TrustDomain>) -> Self {
        let accepted: BTreeSet<TrustDomain> = accepted.into_iter().collect();
        let root_hints = accepted
            .iter()
            .filter_map(|td| bundles.get(td))
            .flat_map(|bundle| bundle.trust_anchors())
            .map(|anchor| DistinguishedName::in_sequence(anchor.subject.as_ref()))
            .collect();
        Self {
            bundles,
            accepted,
            expected: Expected::Any,
            root_hints,
            algorithms: crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// The same verifier, accepting only `expected` peers.
    pub fn with_expected(mut self, expected: Expected) -> Self {
        self.expected = expected;
        self
    }

    /// The trust domains whose peers are accepted.
    pub fn accepted_trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.accepted.iter()
    }

    /// The peers accepted once their chain verifies.
    pub fn expected(&self) -> &Expected {
        &self.expected
    }

    /// The bundles this verifier chains to.
    pub fn bundles(&self) -> &Arc<BundleSet> {
        &self.bundles
    }

    /// Verifies a peer's leaf and intermediates at `now` and returns its SPIFFE ID.
    ///
    /// `role` is the role the peer plays in the handshake; it selects the extended key usage.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        now: UnixTime,
    ) -> Result<SpiffeId, VerifyError> {
        let id = spiffe_id_of_leaf(end_entity)?;
        let td = id.trust_domain();
        if !self.accepted.contains(&td) {
            return Err(VerifyError::UnknownTrustDomain { id });
        }
        let bundle = self.bundles.get(&td).ok_or(VerifyError::NoBundle(td))?;

        let leaf = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        let usage = match role {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        };
        leaf.verify_for_usage(
            self.algorithms.all,
            bundle.trust_anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| chain_error(e, &id, role, now))?;

        if !self.expected.accepts(&id) {
            return Err(VerifyError::WrongPeer {
                expected: self.expected.clone(),
                got: id,
            });
        }
        Ok(id)
    }
}

/// The SPIFFE ID of the leaf of an already-verified peer chain (e.g. after the handshake).
///
/// This only reads the leaf; it checks no signature and no bundle.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, VerifyError> {
    let leaf = certs.first().ok_or(VerifyError::NoCertificate)?;
    spiffe_id_of_leaf(leaf)
}

impl Expected {
    /// Whether `id` is an accepted peer.
    pub fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Id(expected) => expected == id,
            Self::AnyOf(ids) => ids.contains(id),
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any peer"),
            Self::Id(id) => write!(f, "the expected `{id}`"),
            Self::AnyOf(ids) => {
                f.write_str("one of the expected ")?;
                for (i, id) in ids.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}`{id}`")?;
                }
                if ids.is_empty() {
                    f.write_str("(none)")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
        })
    }
}

impl From<VerifyError> for rustls::Error {
    /// The one place a refusal becomes a rustls error (and so a TLS alert).
    ///
    /// Where rustls has a matching variant it is used, so the peer gets the standard alert
    /// (`certificate_expired`, `unknown_ca`, ...). SPIFFE-specific refusals have none; they travel
    /// as `CertificateError::Other` holding the [`VerifyError`], which callers can downcast.
    fn from(err: VerifyError) -> Self {
        let cert_error = match err {
            VerifyError::NoCertificate => return rustls::Error::NoCertificatesPresented,
            VerifyError::Malformed(_) => CertificateError::BadEncoding,
            VerifyError::Expired { not_after, now, .. } => CertificateError::ExpiredContext {
                time: now,
                not_after,
            },
            VerifyError::NotYetValid {
                not_before, now, ..
            } => CertificateError::NotValidYetContext {
                time: now,
                not_before,
            },
            VerifyError::UnknownIssuer { .. } => CertificateError::UnknownIssuer,
            VerifyError::BadSignature { .. } => CertificateError::BadSignature,
            VerifyError::WrongPurpose { .. } => CertificateError::InvalidPurpose,
            VerifyError::NoUriSan
            | VerifyError::MultipleUriSans(_)
            | VerifyError::NotSpiffe { .. }
            | VerifyError::UnknownTrustDomain { .. }
            | VerifyError::NoBundle(_)
            | VerifyError::CaAsLeaf { .. }
            | VerifyError::NoDigitalSignature { .. }
            | VerifyError::InvalidChain { .. }
            | VerifyError::WrongPeer { .. } => CertificateError::Other(OtherError(Arc::new(err))),
        };
        rustls::Error::InvalidCertificate(cert_error)
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    // Zero trust: every inbound connection must present an SVID.
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, PeerRole::Client, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(refused)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    // `_server_name` is ignored on purpose: SPIFFE identifies the server by its URI SAN, and the
    // expected peer (`Expected`) is the check that a DNS name check would otherwise be.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, PeerRole::Server, now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(refused)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("accepted", &self.accepted)
            .field("expected", &self.expected)
            .field("bundles", &self.bundles.len())
            .finish()
    }
}

/// Logs a refusal (per connection, so at debug) and turns it into the rustls error.
fn refused(err: VerifyError) -> rustls::Error {
    tracing::debug!(error = %err, "peer certificate refused");
    err.into()
}

/// Reads the leaf's SPIFFE ID, after checking the leaf rules of the X.509-SVID specification §4:
/// not a CA, exactly one URI SAN that is a SPIFFE ID, and keyUsage `digitalSignature`.
fn spiffe_id_of_leaf(der: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(VerifyError::Malformed(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    let uris = uri_sans(&cert)?;
    let key_usage = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(format!("keyUsage: {e}")))?
        .map(|ku| *ku.value);
    // The CA check comes first: a signing certificate presented as a leaf is refused as what it
    // is, whatever its SANs look like.
    if let Some(reason) = ca_property(&cert, key_usage)? {
        let id = match uris.as_slice() {
            [one] => one.clone(),
            _ => "(none)".to_owned(),
        };
        return Err(VerifyError::CaAsLeaf { id, reason });
    }
    let id = match uris.as_slice() {
        [] => return Err(VerifyError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|reason| VerifyError::NotSpiffe {
            uri: uri.clone(),
            reason,
        })?,
        _ => return Err(VerifyError::MultipleUriSans(uris)),
    };
    if !key_usage.is_some_and(|ku| ku.digital_signature()) {
        return Err(VerifyError::NoDigitalSignature { id });
    }
    Ok(id)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, VerifyError> {
    // A duplicated SAN extension is an error here, not "take the first": two readers of the same
    // certificate must never see different identities.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Which CA property a would-be leaf has, if any.
fn ca_property(
    cert: &X509Certificate<'_>,
    key_usage: Option<KeyUsage>,
) -> Result<Option<&'static str>, VerifyError> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(format!("basicConstraints: {e}")))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Ok(Some("basicConstraints CA:true"));
    }
    Ok(match key_usage {
        Some(ku) if ku.key_cert_sign() => Some("keyUsage keyCertSign"),
        Some(ku) if ku.crl_sign() => Some("keyUsage cRLSign"),
        _ => None,
    })
}

/// Sorts a webpki refusal into a [`VerifyError`] variant.
fn chain_error(err: webpki::Error, id: &SpiffeId, role: PeerRole, now: UnixTime) -> VerifyError {
    use webpki::Error as E;
    let id = id.clone();
    match err {
        E::CertExpired { not_after, .. } => VerifyError::Expired { id, not_after, now },
        E::CertNotValidYet { not_before, .. } => VerifyError::NotYetValid {
            id,
            not_before,
            now,
        },
        E::UnknownIssuer => VerifyError::UnknownIssuer { id },
        E::InvalidSignatureForPublicKey => VerifyError::BadSignature { id },
        E::CaUsedAsEndEntity => VerifyError::CaAsLeaf {
            id: id.to_string(),
            reason: "basicConstraints CA:true",
        },
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            VerifyError::WrongPurpose { id, role }
        }
        E::BadDer
        | E::BadDerTime
        | E::TrailingData(_)
        | E::MalformedExtensions
        | E::ExtensionValueInvalid
        | E::InvalidCertValidity
        | E::InvalidSerialNumber
        | E::UnsupportedCertVersion => VerifyError::Malformed(err.to_string()),
        reason => VerifyError::InvalidChain { id, reason },
    }
}

/// `2025-01-31T12:00:00Z`, for error messages.
fn utc(t: &UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix time {secs}"),
    }
}

#[cfg(test)]
mod tests;
