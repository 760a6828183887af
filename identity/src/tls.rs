//! rustls configs for meshward's mTLS: our X.509-SVID on one side, [`PeerVerifier`] on the other.
//!
//! Both builders name the ring provider explicitly instead of relying on a process-default
//! provider, offer TLS 1.3 and 1.2, and turn session resumption off: a resumed session skips
//! certificate verification, so a peer whose SVID expired, or whose root was retired, could keep
//! resuming. With SVIDs rotated every half hour that is not a trade worth making; connections are
//! long-lived, so the full handshakes cost little.
//!
//! On rotation, build a new verifier and a new config; connections made from then on use it.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion, version};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::verify::PeerVerifier;

/// The protocol versions meshward speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&version::TLS13, &version::TLS12];

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain is empty; it must start with our leaf SVID.
    #[error("cannot build a tls {0} config: the certificate chain is empty")]
    EmptyChain(&'static str),
    /// rustls refused the versions, the key, or a key that does not match the leaf.
    #[error("cannot build a tls {side} config: {source}")]
    Rustls {
        /// `server` or `client`.
        side: &'static str,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// A server config that presents `chain` (leaf first) and requires and verifies a client SVID.
///
/// `alpn` lists the protocols offered, most preferred first (e.g. `h2`, `http/1.1`); empty for none.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8_der: PrivatePkcs8KeyDer<'static>,
    verifier: Arc<PeerVerifier>,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, TlsError> {
    const SIDE: &str = "server";
    if chain.is_empty() {
        return Err(TlsError::EmptyChain(SIDE));
    }
    let rustls_error = |source| TlsError::Rustls { side: SIDE, source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(rustls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key_pkcs8_der))
        .map_err(rustls_error)?;
    config.alpn_protocols = alpn;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config that presents `chain` (leaf first) and verifies the server's SVID.
///
/// The server's DNS name passed to rustls at connect time is not checked (SPIFFE identifies the
/// server by its URI SAN); the verifier's [`crate::verify::Expected`] says which server is wanted.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8_der: PrivatePkcs8KeyDer<'static>,
    verifier: Arc<PeerVerifier>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, TlsError> {
    const SIDE: &str = "client";
    if chain.is_empty() {
        return Err(TlsError::EmptyChain(SIDE));
    }
    let rustls_error = |source| TlsError::Rustls { side: SIDE, source };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(rustls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key_pkcs8_der))
        .map_err(rustls_error)?;
    config.alpn_protocols = alpn;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The one crypto provider meshward uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests;
