//! Real rustls servers and clients over real TCP on 127.0.0.1, built with meshward's
//! `tls::server_config` / `tls::client_config` and `PeerVerifier`.
//!
//! Each scenario checks one property, and every refusal checks both that the right side refused
//! for the right reason and that the refused side got no application data.

// Helpers outside `#[test]` functions fail loudly too: a broken scenario is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::test_util::{SvidOptions, TestPki};
use meshward_identity::tls::{self, client_config, server_config};
use meshward_identity::verify::{Expected, PeerVerifier, VerifyError, peer_spiffe_id};
use meshward_identity::x509::{SvidKey, X509Svid};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALICE: &str = "spiffe://example.org/ns/shop/sa/alice";
const BOB: &str = "spiffe://example.org/ns/shop/sa/bob";
const PARTNER: &str = "spiffe://partner.test/ns/pay/sa/api";

/// What the client sends once its handshake is done, and what the server answers.
const PING: &[u8] = b"c";
const PONG: &[u8] = b"s";

/// No scenario may hang: a stuck handshake is a failure.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(20);

/// What one side saw.
#[derive(Debug)]
struct Outcome {
    /// The peer's SPIFFE ID once the handshake is done, or the handshake error.
    handshake: Result<SpiffeId, io::Error>,
    /// The negotiated version, when the handshake finished.
    version: Option<ProtocolVersion>,
    /// The negotiated ALPN protocol.
    alpn: Option<Vec<u8>>,
    /// Application data received from the peer.
    received: Vec<u8>,
    /// The first I/O error after the handshake, if any.
    after: Option<io::Error>,
}

impl Outcome {
    fn failed(err: io::Error) -> Self {
        Self {
            handshake: Err(err),
            version: None,
            alpn: None,
            received: Vec::new(),
            after: None,
        }
    }

    fn peer(&self) -> &SpiffeId {
        self.handshake.as_ref().expect("handshake succeeded")
    }

    fn handshake_error(&self) -> &rustls::Error {
        let err = self.handshake.as_ref().expect_err("handshake failed");
        rustls_error(err).unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
    }
}

fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The [`VerifyError`] a SPIFFE-specific refusal carries inside rustls.
fn verify_error(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

/// A verifier over one bundle per PKI, accepting `accepted` trust domains and `expected` peers.
fn verifier(pkis: &[&TestPki], accepted: &[&str], expected: Expected) -> Arc<PeerVerifier> {
    let set: BundleSet = pkis
        .iter()
        .map(|pki| {
            let mut bundle = TrustBundle::new(pki.trust_domain().clone());
            bundle.add_authority(pki.root_der()).unwrap();
            bundle
        })
        .collect();
    Arc::new(
        PeerVerifier::new(Arc::new(set), accepted.iter().map(|s| td(s))).with_expected(expected),
    )
}

fn server(svid: &(X509Svid, SvidKey), verifier: Arc<PeerVerifier>) -> ServerConfig {
    server_config(
        svid.0.chain().to_vec(),
        svid.1.to_pkcs8_der(),
        verifier,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
    .unwrap()
}

fn client(svid: &(X509Svid, SvidKey), verifier: Arc<PeerVerifier>) -> ClientConfig {
    client_config(
        svid.0.chain().to_vec(),
        svid.1.to_pkcs8_der(),
        verifier,
        vec![b"h2".to_vec()],
    )
    .unwrap()
}

/// Runs one server and one client over real TCP and returns what each saw.
async fn run(server: ServerConfig, client: ClientConfig) -> (Outcome, Outcome) {
    let scenario = async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, Arc::new(server)));
        let client = connect(addr, Arc::new(client)).await;
        (server.await.unwrap(), client)
    };
    tokio::time::timeout(SCENARIO_TIMEOUT, scenario)
        .await
        .expect("scenario finished in time")
}

/// Accepts one connection: handshake, read one byte, answer one byte, close.
async fn serve_once(listener: TcpListener, config: Arc<ServerConfig>) -> Outcome {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = match TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => tls,
        Err(err) => return Outcome::failed(err),
    };
    let (_, conn) = tls.get_ref();
    let mut outcome = Outcome {
        handshake: peer_spiffe_id(conn.peer_certificates().unwrap_or_default())
            .map_err(io::Error::other),
        version: conn.protocol_version(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        received: Vec::new(),
        after: None,
    };
    let mut byte = [0u8; 1];
    let exchange = async {
        tls.read_exact(&mut byte).await?;
        outcome.received.extend_from_slice(&byte);
        tls.write_all(PONG).await?;
        tls.shutdown().await
    };
    if let Err(err) = exchange.await {
        outcome.after = Some(err);
    }
    outcome
}

/// Connects once: handshake, send one byte, read until the server closes.
async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Outcome {
    let tcp = TcpStream::connect(addr).await.unwrap();
    // The name only fills SNI: PeerVerifier checks the server's SPIFFE ID, never a DNS name.
    let name = ServerName::try_from("server.invalid").unwrap();
    let mut tls = match TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => tls,
        Err(err) => return Outcome::failed(err),
    };
    let (_, conn) = tls.get_ref();
    let mut outcome = Outcome {
        handshake: peer_spiffe_id(conn.peer_certificates().unwrap_or_default())
            .map_err(io::Error::other),
        version: conn.protocol_version(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        received: Vec::new(),
        after: None,
    };
    let exchange = async {
        tls.write_all(PING).await?;
        tls.flush().await?;
        tls.read_to_end(&mut outcome.received).await
    };
    if let Err(err) = exchange.await {
        outcome.after = Some(err);
    }
    outcome
}

/// The refused side never saw a byte of application data, and the other side got none back.
fn assert_no_application_data(server: &Outcome, client: &Outcome) {
    assert!(
        server.received.is_empty(),
        "server read {:?}",
        server.received
    );
    assert!(
        client.received.is_empty(),
        "client read {:?}",
        client.received
    );
}

#[tokio::test]
async fn good_mutual_handshake_gives_each_side_the_other_id() {
    let pki = TestPki::new("example.org");
    let server_cfg = server(
        &pki.svid(BOB),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let client_cfg = client(
        &pki.svid(ALICE),
        verifier(&[&pki], &["example.org"], Expected::Id(id(BOB))),
    );
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(server.peer(), &id(ALICE));
    assert_eq!(client.peer(), &id(BOB));
    assert_eq!(server.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(client.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(server.received, PING);
    assert_eq!(client.received, PONG);
    assert!(server.after.is_none(), "{:?}", server.after);
    assert!(client.after.is_none(), "{:?}", client.after);
}

#[tokio::test]
async fn tls12_mutual_handshake_works_too() {
    let pki = TestPki::new("example.org");
    let server_cfg = server(
        &pki.svid(BOB),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    // A client that speaks only TLS 1.2, with the same verifier, certificate and provider.
    let alice = pki.svid(ALICE);
    let client_cfg = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier(
            &[&pki],
            &["example.org"],
            Expected::Id(id(BOB)),
        ))
        .with_client_auth_cert(alice.0.chain().to_vec(), alice.1.to_private_key_der())
        .unwrap();
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(server.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(client.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(server.peer(), &id(ALICE));
    assert_eq!(client.peer(), &id(BOB));
    assert_eq!(server.received, PING);
    assert_eq!(client.received, PONG);
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let pki = TestPki::new("example.org");
    let server_cfg = server(
        &pki.svid(BOB),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let client_cfg = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier(&[&pki], &["example.org"], Expected::Any))
        .with_no_client_auth();
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(
        server.handshake_error(),
        &rustls::Error::NoCertificatesPresented
    );
    assert_no_application_data(&server, &client);
    // In TLS 1.3 the client finishes first, so it learns of the refusal when it reads.
    assert!(
        client.handshake.is_err() || client.after.is_some(),
        "{client:?}"
    );
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    // The server holds partner.test's bundle but does not accept that trust domain.
    let server_cfg = server(
        &own.svid(BOB),
        verifier(&[&own, &partner], &["example.org"], Expected::Any),
    );
    let client_cfg = client(
        &partner.svid(PARTNER),
        verifier(&[&own], &["example.org"], Expected::Any),
    );
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(
        verify_error(server.handshake_error()),
        Some(&VerifyError::UnknownTrustDomain { id: id(PARTNER) })
    );
    assert_no_application_data(&server, &client);
    assert!(
        client.handshake.is_err() || client.after.is_some(),
        "{client:?}"
    );
}

#[tokio::test]
async fn client_from_a_foreign_root_is_refused() {
    let pki = TestPki::new("example.org");
    let server_cfg = server(
        &pki.svid(BOB),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let client_cfg = client(
        &pki.foreign_svid(ALICE),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(
        server.handshake_error(),
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    assert_no_application_data(&server, &client);
}

#[tokio::test]
async fn server_that_is_not_the_expected_peer_is_refused_by_the_client() {
    let pki = TestPki::new("example.org");
    let carol = "spiffe://example.org/ns/shop/sa/carol";
    let server_cfg = server(
        &pki.svid(carol),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let client_cfg = client(
        &pki.svid(ALICE),
        verifier(&[&pki], &["example.org"], Expected::Id(id(BOB))),
    );
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(
        verify_error(client.handshake_error()),
        Some(&VerifyError::WrongPeer {
            expected: Expected::Id(id(BOB)),
            got: id(carol),
        })
    );
    // The client never sent its byte, so the server has nothing, and its handshake failed.
    assert!(server.handshake.is_err(), "{server:?}");
    assert_no_application_data(&server, &client);
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = TestPki::new("example.org");
    let now = SystemTime::now();
    let expired = pki.svid_with(
        ALICE,
        SvidOptions {
            not_before: Some(now - Duration::from_secs(2 * 3600)),
            not_after: Some(now - Duration::from_secs(3600)),
            ..SvidOptions::default()
        },
    );
    let server_cfg = server(
        &pki.svid(BOB),
        verifier(&[&pki], &["example.org"], Expected::Any),
    );
    let client_cfg = client(&expired, verifier(&[&pki], &["example.org"], Expected::Any));
    let (server, client) = run(server_cfg, client_cfg).await;

    assert!(
        matches!(
            server.handshake_error(),
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{:?}",
        server.handshake
    );
    assert_no_application_data(&server, &client);
}

#[tokio::test]
async fn tls12_client_from_another_trust_domain_is_refused() {
    // In TLS 1.2 the server refuses before its Finished, so the client's handshake fails too.
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    let server_cfg = server(
        &own.svid(BOB),
        verifier(&[&own], &["example.org"], Expected::Any),
    );
    let stranger = partner.svid(PARTNER);
    let client_cfg = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier(&[&own], &["example.org"], Expected::Any))
        .with_client_auth_cert(stranger.0.chain().to_vec(), stranger.1.to_private_key_der())
        .unwrap();
    let (server, client) = run(server_cfg, client_cfg).await;

    assert_eq!(
        verify_error(server.handshake_error()),
        Some(&VerifyError::UnknownTrustDomain { id: id(PARTNER) })
    );
    assert!(client.handshake.is_err(), "{client:?}");
    assert_no_application_data(&server, &client);
}
