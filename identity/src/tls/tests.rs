use rustls::{ClientConnection, ProtocolVersion, ServerConnection};
use rustls_pki_types::ServerName;

use super::*;
use crate::bundle::{BundleSet, TrustBundle};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::test_util::TestPki;
use crate::verify::{Expected, VerifyError, peer_spiffe_id};
use crate::x509::SvidKey;

const ALICE: &str = "spiffe://example.org/ns/shop/sa/alice";
const BOB: &str = "spiffe://example.org/ns/shop/sa/bob";

fn verifier(pki: &TestPki) -> PeerVerifier {
    let mut bundle = TrustBundle::new(pki.trust_domain().clone());
    bundle.add_authority(pki.root_der()).unwrap();
    let set: BundleSet = [bundle].into_iter().collect();
    PeerVerifier::new(Arc::new(set), [TrustDomain::new("example.org").unwrap()])
}

/// Which side of an in-memory handshake failed.
#[derive(Debug, PartialEq)]
enum Failed {
    Client,
    Server,
}

/// The [`VerifyError`] inside a rustls certificate error, if that is what it is.
fn verify_error(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

/// Drives an in-memory handshake until both sides are done or one fails.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), (Failed, rustls::Error)> {
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server
                .process_new_packets()
                .map_err(|e| (Failed::Server, e))?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client
                .process_new_packets()
                .map_err(|e| (Failed::Client, e))?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn in_memory_mutual_handshake_yields_both_ids_and_alpn() {
    let pki = TestPki::new("example.org");
    let (alice, alice_key) = pki.svid(ALICE);
    let (bob, bob_key) = pki.svid(BOB);
    let server = server_config(
        bob.chain().to_vec(),
        bob_key.to_pkcs8_der(),
        Arc::new(verifier(&pki)),
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
    .unwrap();
    assert_eq!(server.send_tls13_tickets, 0);
    let client = client_config(
        alice.chain().to_vec(),
        alice_key.to_pkcs8_der(),
        Arc::new(verifier(&pki).with_expected(Expected::Id(SpiffeId::parse(BOB).unwrap()))),
        vec![b"http/1.1".to_vec()],
    )
    .unwrap();

    let name = ServerName::try_from("bob.invalid").unwrap();
    let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    handshake(&mut c, &mut s).unwrap();

    assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        peer_spiffe_id(s.peer_certificates().unwrap())
            .unwrap()
            .as_str(),
        ALICE
    );
    assert_eq!(
        peer_spiffe_id(c.peer_certificates().unwrap())
            .unwrap()
            .as_str(),
        BOB
    );
}

#[test]
fn in_memory_handshake_with_the_wrong_server_fails_on_the_client() {
    let pki = TestPki::new("example.org");
    let (alice, alice_key) = pki.svid(ALICE);
    let (bob, bob_key) = pki.svid(BOB);
    let server = server_config(
        bob.chain().to_vec(),
        bob_key.to_pkcs8_der(),
        Arc::new(verifier(&pki)),
        Vec::new(),
    )
    .unwrap();
    // The client wants alice, but bob answers.
    let client = client_config(
        alice.chain().to_vec(),
        alice_key.to_pkcs8_der(),
        Arc::new(verifier(&pki).with_expected(Expected::Id(SpiffeId::parse(ALICE).unwrap()))),
        Vec::new(),
    )
    .unwrap();
    let name = ServerName::try_from("alice.invalid").unwrap();
    let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    let (side, err) = handshake(&mut c, &mut s).unwrap_err();
    assert_eq!(side, Failed::Client);
    assert_eq!(
        verify_error(&err),
        Some(&VerifyError::WrongPeer {
            expected: Expected::Id(SpiffeId::parse(ALICE).unwrap()),
            got: SpiffeId::parse(BOB).unwrap(),
        })
    );
}

#[test]
fn refuses_an_empty_chain() {
    let pki = TestPki::new("example.org");
    let key = SvidKey::generate().unwrap();
    let err = server_config(
        Vec::new(),
        key.to_pkcs8_der(),
        Arc::new(verifier(&pki)),
        vec![],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::EmptyChain("server")), "{err:?}");
    let err = client_config(
        Vec::new(),
        key.to_pkcs8_der(),
        Arc::new(verifier(&pki)),
        vec![],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::EmptyChain("client")), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot build a tls client config: the certificate chain is empty"
    );
}

#[test]
fn refuses_a_key_that_does_not_match_the_leaf() {
    let pki = TestPki::new("example.org");
    let (alice, _) = pki.svid(ALICE);
    let other = SvidKey::generate().unwrap();
    for result in [
        server_config(
            alice.chain().to_vec(),
            other.to_pkcs8_der(),
            Arc::new(verifier(&pki)),
            vec![],
        )
        .map(|_| ()),
        client_config(
            alice.chain().to_vec(),
            other.to_pkcs8_der(),
            Arc::new(verifier(&pki)),
            vec![],
        )
        .map(|_| ()),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Rustls {
                    source: rustls::Error::InconsistentKeys(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn refuses_a_key_that_is_not_pkcs8() {
    let pki = TestPki::new("example.org");
    let (alice, _) = pki.svid(ALICE);
    let err = server_config(
        alice.chain().to_vec(),
        PrivatePkcs8KeyDer::from(vec![0x30, 0x00]),
        Arc::new(verifier(&pki)),
        vec![],
    )
    .unwrap_err();
    assert!(
        matches!(err, TlsError::Rustls { side: "server", .. }),
        "{err:?}"
    );
}

#[test]
fn the_verifier_in_the_config_is_the_one_given() {
    // A config built from a verifier that does not accept example.org refuses example.org peers:
    // nothing falls back to a default verifier or provider.
    let pki = TestPki::new("example.org");
    let (alice, alice_key) = pki.svid(ALICE);
    let (bob, bob_key) = pki.svid(BOB);
    let nobody = PeerVerifier::new(Arc::new(BundleSet::new()), []);
    let server = server_config(
        bob.chain().to_vec(),
        bob_key.to_pkcs8_der(),
        Arc::new(nobody),
        vec![],
    )
    .unwrap();
    let client = client_config(
        alice.chain().to_vec(),
        alice_key.to_pkcs8_der(),
        Arc::new(verifier(&pki)),
        vec![],
    )
    .unwrap();
    let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("x.invalid").unwrap())
        .unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    let (side, err) = handshake(&mut c, &mut s).unwrap_err();
    assert_eq!(side, Failed::Server);
    assert_eq!(
        verify_error(&err),
        Some(&VerifyError::UnknownTrustDomain {
            id: SpiffeId::parse(ALICE).unwrap(),
        })
    );
}
