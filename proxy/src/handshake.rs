//! TLS handshakes with a deadline, and what a failed one tells the metrics and the log.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::verify::VerifyError;
use rustls::{CertificateError, ServerConnection};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::authz::TlsFacts;
use crate::metrics::TlsFailure;

/// A refused or failed handshake: the bounded metric reason and the detail for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tls handshake failed ({}): {detail}", .reason.as_str())]
pub struct HandshakeError {
    /// The metric label.
    pub reason: TlsFailure,
    /// What happened, e.g. the peer verifier's message.
    pub detail: String,
}

/// Accepts a TLS connection on `tcp`, giving up after `timeout`.
pub async fn accept(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(HandshakeError {
            reason: TlsFailure::HandshakeTimeout,
            detail: format!("no complete handshake within {timeout:?}"),
        }),
    }
}

/// Sorts a handshake's I/O error (rustls errors travel inside it) into a bounded reason.
pub fn classify(e: &io::Error) -> HandshakeError {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return HandshakeError {
            reason: TlsFailure::Protocol,
            detail: e.to_string(),
        };
    };
    let reason = match tls {
        rustls::Error::NoCertificatesPresented => TlsFailure::NoCertificate,
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::Expired,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsFailure::Untrusted
            }
            CertificateError::Other(other) => match verify_error(&other.0) {
                Some(VerifyError::UnknownTrustDomain { .. } | VerifyError::NoBundle(_)) => {
                    TlsFailure::UnknownTrustDomain
                }
                Some(VerifyError::WrongPeer { .. }) => TlsFailure::WrongPeer,
                _ => TlsFailure::BadCertificate,
            },
            _ => TlsFailure::BadCertificate,
        },
        _ => TlsFailure::Protocol,
    };
    let detail = match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            verify_error(&other.0).map_or_else(|| tls.to_string(), ToString::to_string)
        }
        _ => tls.to_string(),
    };
    HandshakeError { reason, detail }
}

fn verify_error(error: &Arc<dyn std::error::Error + Send + Sync>) -> Option<&VerifyError> {
    error.downcast_ref::<VerifyError>()
}

/// The TLS facts of an established session, for the Cedar context.
pub fn tls_facts(session: &rustls::CommonState) -> TlsFacts {
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    let cipher = session
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("");
    let alpn = session
        .alpn_protocol()
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("");
    TlsFacts {
        version: version.to_owned(),
        cipher: cipher.to_owned(),
        alpn: alpn.to_owned(),
    }
}

/// The verified peer's leaf certificate, if it sent one.
pub fn peer_leaf(session: &ServerConnection) -> Option<&CertificateDer<'static>> {
    session.peer_certificates().and_then(<[_]>::first)
}
