//! `MintX509Svids` against a real `meshward ca run` process over real TLS: a good batch is signed, and
//! every bad request gets its clear error and nothing else — no SVID in the response, no journal row,
//! no `issued` audit record.

// Helpers outside `#[test]` functions fail loudly too: a broken scenario is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_identity::SpiffeId;
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_client::CaClient;
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid, make_csr};
use meshward_tests::{AgentSvid, CaOptions, CaProcess, trust_domain, workload_request};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, X509Certificate};

const NODE: &str = "node-1";

/// A CA, an agent attested on [`NODE`], and that agent's client.
struct Minting {
    ca: CaProcess,
    _agent: AgentSvid,
    client: CaClient<Channel>,
}

/// A CA where each of `ids` is entitled on [`NODE`], and an agent attested there.
async fn minting(ids: &[&str]) -> Minting {
    let ca = CaProcess::start(CaOptions::new(env!("CARGO_BIN_EXE_meshward")));
    for id in ids {
        ca.create_entry(id, NODE);
    }
    let agent = ca.attest(NODE).await;
    let client = ca.as_agent(&agent).await;
    Minting {
        ca,
        _agent: agent,
        client,
    }
}

async fn mint(
    client: &mut CaClient<Channel>,
    requests: Vec<pb::SvidRequest>,
) -> Vec<pb::SvidResult> {
    client
        .mint_x509_svids(pb::MintX509SvidsRequest { requests })
        .await
        .expect("the batch is answered")
        .into_inner()
        .results
}

/// The refusal in a result; panics if it carries an SVID.
fn refusal(result: &pb::SvidResult) -> &pb::MintError {
    match &result.result {
        Some(pb::svid_result::Result::Error(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn svid(result: &pb::SvidResult) -> &pb::X509Svid {
    match &result.result {
        Some(pb::svid_result::Result::Svid(svid)) => svid,
        other => panic!("expected an svid, got {other:?}"),
    }
}

fn request(id: &str, csr: Vec<u8>) -> pb::SvidRequest {
    pb::SvidRequest {
        spiffe_id: id.to_owned(),
        csr,
        ..Default::default()
    }
}

/// Mints one request that must be refused with `code`; checks the message names the problem
/// (`message_has`), and that nothing was issued for `id`.
async fn refused_alone(id: &str, csr: Vec<u8>, code: &str, message_has: &str) {
    let mut env = minting(&[id]).await;
    let journal = env.ca.journal_count();
    let results = mint(&mut env.client, vec![request(id, csr)]).await;
    assert_eq!(results.len(), 1);
    let error = refusal(&results[0]);
    assert_eq!(error.code, code, "{error:?}");
    assert!(
        error.message.contains(message_has),
        "`{}` should say `{message_has}`",
        error.message
    );
    env.ca.assert_refused(id, code, journal);
}

fn params_for(uris: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params
}

fn verifier(bundle: TrustBundle) -> PeerVerifier {
    let mut set = BundleSet::new();
    set.insert(bundle);
    PeerVerifier::new(Arc::new(set), [trust_domain()])
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// A throw-away RSA-2048 key for this test only (ring signs with RSA but cannot generate RSA keys).
const RSA_TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC8VryHlmyOIme3
n4f601g/yftmL9J3zIxdFgWAQMRR30cTVkz9MyyShzxHbhiWVobU4fhUelth6gvc
Qf3qzqwyimWpsZHG8rtaXBTewAG9S3NJziblr/PdLF8QxxuvdlALMYGVy7VI6i4R
tAWrWBK+MmAIWrKdQ65yCc3qP38UXTtRS5+2TdHB5ro7LTtaTqQ1PnggxTKKfMIh
/1WJwBbBIp4JKGvs3kqiOSdCeSzxkn2nmfo3XTjGzZ27xmcSphAz0ajVLJ2ZFdrQ
HGYe+cKGHZZ9PKAmCPjZtL1tu8Y6/3wddCnMy1tCX/iw3g0kqAikquOI9+K8c1iB
yyPu8PQBAgMBAAECggEAFUdleJo9vJdViZEML4ImY9qhvUtk56UkLLY6u+FVbPyh
jqU/AJKCFDIUVOuy+nVfOXkocf77CSaE3YdVNWzRVsp9Lv2Bf21YTp69uucNq0H1
jh6tFWFaV6BWQ1KDpcDjzUf0IKUJ3+mZd+WTiGbkgzm00OzSZmNJt9e0vKUc6gNm
je3ldBnIIPUReNdhLQw/6owtwgt3zH6/q/qvm0W2KG2k8hhZ01d9SJ12T/vpAp08
f7cIisMcPVnw6GNwKPnHUl/1s3sTF19LDpzIzXhteeFvDHFv74CRmr9axDGJrvZs
8M6+GMfBERrboYwKCG9FySqnUD7QOwq15xpQTxjMMwKBgQD6jaQMdtv7RgXa9em/
J72hOKGAIcjuzVdV30SSzt5q+d9hiqIBOVwqjYa9b7rr0UR5Ahaq5IWvCxiwaEUo
1XXJSyA1v4rl5+PIXo9R5TdYBRpy1YdUG1pDI5kBYzESXXBlJ4vVRVB6hM9HWpdQ
/vO9uPD0nF0kWIXLIbNPJ6vX7wKBgQDAbt1XVPnTNVvaT/ghpt/gDqPWm4bXQ/tB
MP+KtHlzjpGecz5riqYT1pO27JRIQ8k3l6XXCCzQTJksPRtERmv+F3qPtqYJaJzE
viMUUg6DqbDxbIk4TWRbDGw0PApngn0HQZDCNoxlCodQrC+M9IwgudJKg1uuroFS
VIVPuaCDDwKBgQC3c1fnLGv7OhT1clLYfI+S6PUO7S3C86R7ooMB/ufJafUN5USj
Is2B9qfuMk2pdkrtUwMn0zSyqqxEFcR1ln2sig4mbH2Vwkj8n4fOjccM8oegBwoU
Igbf28OeyXLXoIS3+9GdsSew3WcrNoBOdK4gfrYmVAq6nvovdhhk34YqDwKBgHNJ
+JI59vLzJPTGtIJ01+wE2WPaCg8uS3njQTZ4qcrxv4yOvvbvOlDoXddaJfyloAgO
cu1BmJezTJGUiqF9D3ZL2sH/S7qXUlUNFTc3cjqvj7MUs6FnvJhP+QPSdOlO5FlU
jsXMqJBgnnFWt6ZbXRi+O58o0+Tz58bLnJMHQ4NBAoGBAOiPL5swx9FUghjAFelb
UkA84kqQ/UsSeCz0KCJnn/HaqEI7OlHqWGjCqQlJsj+zS8kgpsHyvWWFhuDYbNSN
PGzXUbMus3gq8dwZKHmTdPmSuyl04ddJpiNF+PKIw9IPHpHDs3CS+rBEL5HCAVk6
781Z9wPDw1keeVPOEtclTiqj
-----END PRIVATE KEY-----
";

#[tokio::test]
async fn a_batch_of_entitled_requests_is_signed() {
    const IDS: [&str; 3] = [
        "spiffe://example.org/ns/shop/sa/web",
        "spiffe://example.org/ns/shop/sa/api",
        "spiffe://example.org/ns/shop/sa/db",
    ];
    let mut env = minting(&IDS).await;
    let journal = env.ca.journal_count();
    let keys: Vec<SvidKey> = (0..60).map(|_| SvidKey::generate().unwrap()).collect();
    let requests = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let id = IDS[i % IDS.len()];
            request(id, make_csr(key, &SpiffeId::parse(id).unwrap()).unwrap())
        })
        .collect();
    let results = mint(&mut env.client, requests).await;
    assert_eq!(results.len(), 60);

    let verifier = verifier(env.ca.bundle());
    let now = UnixTime::now();
    let mut serials = Vec::new();
    for (i, result) in results.iter().enumerate() {
        let issued = svid(result);
        let want = IDS[i % IDS.len()];
        assert_eq!(issued.spiffe_id, want);
        let chain: Vec<CertificateDer<'static>> = issued
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let parsed = X509Svid::parse_chain(chain.clone()).unwrap();
        assert_eq!(parsed.spiffe_id().as_str(), want);
        assert_eq!(parsed.serial(), issued.serial);
        // It verifies against the bundle the CA publishes, as a peer would check it.
        let id = verifier
            .verify(&chain[0], &chain[1..], PeerRole::Client, now)
            .unwrap();
        assert_eq!(id.as_str(), want);
        // It certifies the key the CSR was made with, and nothing else.
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        assert_eq!(leaf.public_key().raw, keys[i].public_key_der().as_slice());
        // The default lifetime (1h), give or take the request's flight time.
        let ttl = issued.expires_at - unix_now();
        assert!((3500..=3600).contains(&ttl), "ttl {ttl}s");
        serials.push(issued.serial.clone());
    }

    assert_eq!(env.ca.journal_count(), journal + 60);
    let audit = env.ca.wait_audit("60 issued workload svids", |a| {
        IDS.iter().map(|id| a.issued(id)).sum::<usize>() == 60
    });
    let audited = audit.issued_serials();
    for serial in &serials {
        assert!(audited.contains(serial), "no issued record for `{serial}`");
    }
}

#[tokio::test]
async fn a_malformed_csr_is_refused() {
    refused_alone(
        "spiffe://example.org/ns/shop/sa/malformed",
        b"this is not a pkcs#10 request".to_vec(),
        "bad_csr",
        "malformed csr",
    )
    .await;
}

#[tokio::test]
async fn a_csr_with_a_bad_signature_is_refused() {
    let id = "spiffe://example.org/ns/shop/sa/forged";
    let mut csr = make_csr(&SvidKey::generate().unwrap(), &SpiffeId::parse(id).unwrap()).unwrap();
    // The last byte is inside the signature's `s`: the DER stays valid, the signature does not.
    *csr.last_mut().unwrap() ^= 0x01;
    refused_alone(
        id,
        csr,
        "bad_csr",
        "csr signature does not verify against its own public key",
    )
    .await;
}

#[tokio::test]
async fn a_csr_with_an_rsa_key_is_refused() {
    let id = "spiffe://example.org/ns/shop/sa/rsa";
    let key = KeyPair::from_pem(RSA_TEST_KEY).unwrap();
    // A genuine RSA CSR with a valid signature: refused for its key type alone.
    let csr = params_for(&[id])
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    refused_alone(
        id,
        csr,
        "bad_csr",
        "public key algorithm `rsa` is not supported",
    )
    .await;
}

#[tokio::test]
async fn a_csr_with_a_p384_key_is_refused() {
    let id = "spiffe://example.org/ns/shop/sa/p384";
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = params_for(&[id])
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    refused_alone(
        id,
        csr,
        "bad_csr",
        "public key algorithm `ecdsa p-384` is not supported",
    )
    .await;
}

#[tokio::test]
async fn a_csr_asking_for_a_ca_certificate_is_refused() {
    let id = "spiffe://example.org/ns/shop/sa/wants-ca";
    let mut params = params_for(&[id]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params
        .serialize_request(&SvidKey::generate().unwrap())
        .unwrap()
        .der()
        .to_vec();
    refused_alone(id, csr, "bad_csr", "`CA:true`").await;
}

#[tokio::test]
async fn a_csr_asking_for_two_uri_sans_is_refused() {
    // Consul CVE-2022-40716: the second SAN would have been signed along with the first.
    let id = "spiffe://example.org/ns/shop/sa/web";
    let extra = "spiffe://example.org/ns/bank/sa/vault";
    let csr = params_for(&[id, extra])
        .serialize_request(&SvidKey::generate().unwrap())
        .unwrap()
        .der()
        .to_vec();
    refused_alone(id, csr, "bad_csr", "asks for `2` uri sans").await;
}

#[tokio::test]
async fn an_id_not_entitled_on_the_node_is_refused() {
    let entitled = "spiffe://example.org/ns/shop/sa/web";
    let elsewhere = "spiffe://example.org/ns/bank/sa/vault";
    let mut env = minting(&[entitled]).await;
    // Entitled, but on another node: a compromised node-1 must not get it.
    env.ca.create_entry(elsewhere, "node-2");
    let journal = env.ca.journal_count();
    let results = mint(
        &mut env.client,
        vec![workload_request(elsewhere), workload_request(entitled)],
    )
    .await;
    let error = refusal(&results[0]);
    assert_eq!(error.code, "not_entitled", "{error:?}");
    assert!(error.message.contains(elsewhere), "{}", error.message);
    // The rest of the batch is unaffected.
    assert_eq!(svid(&results[1]).spiffe_id, entitled);
    env.ca
        .assert_refused(elsewhere, "not_entitled", journal + 1);
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_connection_survives() {
    let id = "spiffe://example.org/ns/shop/sa/huge";
    let mut env = minting(&[id]).await;
    let journal = env.ca.journal_count();
    let huge = request(id, vec![0x30; 5 * 1024 * 1024]);
    let err = env
        .client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![huge],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("larger than the ca accepts"),
        "{err:?}"
    );
    env.ca.assert_nothing_issued(id, journal);

    // The same connection still mints.
    let results = mint(&mut env.client, vec![workload_request(id)]).await;
    assert_eq!(svid(&results[0]).spiffe_id, id);
}

#[tokio::test]
async fn garbage_on_the_port_does_not_stop_the_ca() {
    let id = "spiffe://example.org/ns/shop/sa/web";
    let ca = CaProcess::start(CaOptions::new(env!("CARGO_BIN_EXE_meshward")));
    ca.create_entry(id, NODE);
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nhost: ca\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        // A TLS record header promising a huge ClientHello, then junk.
        b"\x16\x03\x01\xff\xff\x01\x00\xff\xfb\x03\x03garbage",
        &[0xff; 4096],
    ];
    for bytes in garbage {
        let mut tcp = TcpStream::connect(ca.addr()).await.unwrap();
        // The CA may close before reading everything: a failed write is fine.
        let _ = tcp.write_all(bytes).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut rest))
            .await
            .expect("the ca closes a garbage connection");
        // At most a TLS alert comes back, never application data.
        assert!(read.is_err() || rest.len() < 64, "{read:?} {rest:?}");
    }
    // A connection that sends half a record and goes quiet, left open while others are served.
    let mut stalled = TcpStream::connect(ca.addr()).await.unwrap();
    stalled.write_all(b"\x16\x03\x01").await.unwrap();

    let agent = ca.attest(NODE).await;
    let results = mint(&mut ca.as_agent(&agent).await, vec![workload_request(id)]).await;
    assert_eq!(svid(&results[0]).spiffe_id, id);
    assert!(ca.pid().is_some());
}
