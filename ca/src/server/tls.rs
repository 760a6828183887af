//! The CA's TLS front: the serving SVID, the rustls config, and the accept loop that hands tonic only
//! connections whose handshake finished, each carrying its verified peer.
//!
//! Client certificates are *optional* at the TLS layer: `Attest` is how an agent gets its first SVID,
//! so it necessarily comes without one. When a client does present a certificate it must pass
//! identity's [`PeerVerifier`] (chain to our bundle, one SPIFFE ID in our trust domain) or the
//! handshake fails; the service then decides per call whether a peer is required.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::tls::{PROTOCOL_VERSIONS, provider};
use meshward_identity::verify::PeerVerifier;
use meshward_identity::x509::{Authority, AuthorityError, KeyError, SvidKey, X509Svid};
use meshward_identity::{SpiffeId, SpiffeIdError, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// Handshakes in flight at once; past this the accept loop waits, so a flood of slow clients costs
/// bounded memory.
const MAX_CONCURRENT_HANDSHAKES: usize = 1_024;

/// The client of one connection, as tonic puts it in every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client's verified SVID, if it presented one.
    pub peer: Option<VerifiedPeer>,
}

/// A client SVID that passed the [`PeerVerifier`] during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// Its leaf's serial, lower-case hex without leading zero bytes.
    pub serial: String,
}

/// One accepted, handshaken TLS connection, as tonic's IO type.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

/// The CA's own serving SVID and key.
pub struct ServingSvid {
    /// Leaf first, then the authority's intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key, made here and never written anywhere.
    pub key: SvidKey,
    /// Its serial.
    pub serial: String,
    /// When it was signed (its notBefore is backdated a little).
    pub issued_at: SystemTime,
    /// Its notAfter.
    pub not_after: SystemTime,
}

/// Why the CA's TLS identity could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA's own SPIFFE ID could not be formed.
    #[error("cannot form the ca's spiffe id: {0}")]
    Id(#[from] SpiffeIdError),
    /// A key could not be generated.
    #[error("cannot generate the ca's serving key: {0}")]
    Key(#[from] KeyError),
    /// The active authority refused to sign.
    #[error("the active authority cannot sign the ca's serving svid: {0}")]
    Sign(#[from] AuthorityError),
    /// rustls refused the config.
    #[error("cannot build the ca's tls config: {0}")]
    Rustls(#[from] rustls::Error),
}

impl ServingSvid {
    /// Signs a fresh serving SVID for `spiffe://TD/meshward/ca` with `authority`, over a new key.
    pub fn issue(
        authority: &Authority,
        td: &TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, TlsSetupError> {
        let id = ca_spiffe_id(td)?;
        let key = SvidKey::generate()?;
        let signed = authority.sign_svid(&key.public_key_der(), &id, ttl, now)?;
        Ok(Self {
            chain: signed.chain,
            key,
            serial: signed.serial,
            issued_at: now,
            not_after: signed.not_after,
        })
    }

    /// When to renew: half-way through the remaining lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        self.issued_at + life / 2
    }
}

/// `spiffe://TD/meshward/ca`.
pub fn ca_spiffe_id(td: &TrustDomain) -> Result<SpiffeId, SpiffeIdError> {
    td.workload_id(&["meshward", "ca"])
}

/// The rustls server config: TLS 1.3 and 1.2 (ring), ALPN `h2`, no resumption, the serving SVID, and
/// optional client SVIDs verified against `bundle`.
pub fn server_config(
    serving: &ServingSvid,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut bundles = BundleSet::new();
    bundles.insert(bundle.clone());
    let verifier = PeerVerifier::new(Arc::new(bundles), [bundle.trust_domain().clone()]);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(Arc::new(OptionalClientCert(verifier)))
        .with_single_cert(
            serving.chain.clone(),
            PrivateKeyDer::Pkcs8(serving.key.to_pkcs8_der()),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // As identity's configs: a resumed session would skip verifying the client certificate again.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Accepts TCP connections, runs each handshake (bounded by `timeout`) on its own task, and sends
/// the finished ones to tonic through `out`, until `shutdown` fires or tonic stops listening.
///
/// Every new connection uses the config current in `configs`, so a renewed serving SVID or a new
/// bundle applies from the next connection on. A failed, slow or garbage handshake ends only that
/// connection, logged at debug.
pub async fn accept_loop(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    out: mpsc::Sender<TlsConn>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            () = out.closed() => return,
            permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (tcp, remote) = tokio::select! {
            () = shutdown.cancelled() => return,
            () = out.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: transient; back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // gRPC writes a response as headers, data and trailers: with Nagle on, the trailers wait for
        // the client's delayed ACK (~40 ms per call). A failure only costs latency.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = TlsAcceptor::from(Arc::clone(&*configs.borrow()));
        let out = out.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = tokio::select! {
                () = shutdown.cancelled() => return,
                result = tokio::time::timeout(timeout, acceptor.accept(tcp)) => result,
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, timeout_ms = timeout.as_millis(), "tls handshake timed out");
                    return;
                }
            };
            let peer = match verified_peer(&stream) {
                Ok(peer) => peer,
                Err(reason) => {
                    tracing::debug!(%remote, %reason, "client certificate unreadable after handshake");
                    return;
                }
            };
            tracing::debug!(%remote, peer = ?peer.as_ref().map(|p| p.spiffe_id.as_str()), "tls connection accepted");
            // A closed channel means the server is shutting down; dropping the stream closes it.
            let _ = out
                .send(TlsConn {
                    stream,
                    info: PeerInfo { remote, peer },
                })
                .await;
        });
    }
}

/// The peer the verifier accepted during the handshake, read back from its leaf.
fn verified_peer(stream: &TlsStream<TcpStream>) -> Result<Option<VerifiedPeer>, String> {
    let Some(certs) = stream.get_ref().1.peer_certificates() else {
        return Ok(None);
    };
    if certs.is_empty() {
        return Ok(None);
    }
    let svid = X509Svid::parse_chain(certs.to_vec()).map_err(|e| e.to_string())?;
    Ok(Some(VerifiedPeer {
        spiffe_id: svid.spiffe_id().clone(),
        serial: svid.serial().to_owned(),
    }))
}

impl TlsConn {
    /// Who is on the other end.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// identity's [`PeerVerifier`], with client authentication offered but not required.
#[derive(Debug)]
struct OptionalClientCert(PeerVerifier);

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    // `Attest` comes without a certificate; every other call checks for a peer itself.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(&self.0, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(&self.0, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_identity::test_util::TestPki;

    #[test]
    fn serving_svid_is_the_ca_id_and_renews_at_half_life() {
        let pki = TestPki::new("example.org");
        let now = SystemTime::now();
        let svid = ServingSvid::issue(
            pki.intermediate(),
            pki.trust_domain(),
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
        let parsed = X509Svid::parse_chain(svid.chain.clone()).unwrap();
        assert_eq!(
            parsed.spiffe_id().as_str(),
            "spiffe://example.org/meshward/ca"
        );
        assert_eq!(parsed.serial(), svid.serial);
        let renew = svid.renew_at().duration_since(now).unwrap().as_secs();
        assert!((1790..=1800).contains(&renew), "{renew}");
    }

    #[test]
    fn client_certificates_are_optional_but_verified() {
        let pki = TestPki::new("example.org");
        let now = SystemTime::now();
        let serving = ServingSvid::issue(
            pki.intermediate(),
            pki.trust_domain(),
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
        let bundle = TrustBundle::from_pem(pki.trust_domain().clone(), &pki.root_pem()).unwrap();
        let mut bundles = BundleSet::new();
        bundles.insert(bundle.clone());
        let verifier = OptionalClientCert(PeerVerifier::new(
            Arc::new(bundles),
            [pki.trust_domain().clone()],
        ));
        assert!(verifier.offer_client_auth());
        assert!(!verifier.client_auth_mandatory());

        let (good, _) = pki.svid("spiffe://example.org/meshward/agent/join/n1");
        let chain = good.chain();
        let when = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        assert!(
            verifier
                .verify_client_cert(&chain[0], &chain[1..], when)
                .is_ok()
        );

        let (foreign, _) = pki.foreign_svid("spiffe://example.org/meshward/agent/join/n1");
        let chain = foreign.chain();
        assert!(
            verifier
                .verify_client_cert(&chain[0], &chain[1..], when)
                .is_err()
        );

        assert!(server_config(&serving, &bundle).is_ok());
    }
}
