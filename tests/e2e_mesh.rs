//! End-to-end, read-only scenarios on one shared mesh (real CA, agent and two proxy processes on
//! loopback, see `meshward_tests::mesh`): an allowed call is served and audited, a denied call gets
//! a 403 naming its reason and is audited, an unattested process gets no identity, and a client
//! from a foreign trust domain is refused by the server proxy. They share one mesh because none of
//! them changes it; each property is checked on its own and named in its failure messages.

// Indexing a `serde_json::Value` never panics: a missing key is `Null`.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::test_util::TestPki;
use meshward_identity::tls::client_config;
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, certs_from_pem};
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_tests::mesh::{Mesh, MeshOptions};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BIN: &str = env!("CARGO_BIN_EXE_meshward");

#[test]
fn shared_mesh_allow_deny_unattested_and_foreign() {
    let mesh = Mesh::start(MeshOptions::new(BIN));
    allowed_call_is_served_and_audited(&mesh);
    denied_call_gets_403_naming_the_policy_and_is_audited(&mesh);
    unattested_process_gets_no_identity(&mesh);
    foreign_trust_domain_client_is_refused(&mesh);
    mesh.assert_audit_verifies(&mesh.server.audit);
}

/// (1) client sidecar -> server sidecar -> app, and an `allow` record with the policy id.
fn allowed_call_is_served_and_audited(mesh: &Mesh) {
    let before = mesh.app.requests();
    let (status, body) = mesh.call("GET", "/hello").expect("the allowed call");
    assert_eq!(status, 200, "allowed call: {body}");
    assert_eq!(body, "GET /hello ok\n", "the app answered");
    assert_eq!(mesh.app.requests(), before + 1, "the app saw the call");
    let audit = mesh.wait_server_audit("the allowed call", |a| {
        a.records().iter().any(|r| {
            r["decision"] == "allow"
                && r["context"]["path"] == "/hello"
                && r["principal"] == mesh.client.id.as_str()
                && r["resource"] == mesh.server.id.as_str()
        })
    });
    let record = audit
        .records()
        .iter()
        .find(|r| r["decision"] == "allow" && r["context"]["path"] == "/hello")
        .unwrap();
    assert_eq!(record["kind"], "authz", "{record}");
    assert_eq!(record["mode"], "enforce", "{record}");
    assert!(
        record["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "e2e-client-reads-server")),
        "the allow names the permitting policy: {record}"
    );
    mesh.assert_audit_verifies(&mesh.server.audit);
}

/// (2) a `forbid` on `/admin`: 403 naming the policy, the app never sees it, a `deny` record.
fn denied_call_gets_403_naming_the_policy_and_is_audited(mesh: &Mesh) {
    let before = mesh.app.requests();
    let (status, body) = mesh.call("GET", "/admin").expect("the denied call");
    assert_eq!(status, 403, "denied call: {body}");
    assert!(
        body.contains("e2e-forbid-admin"),
        "the 403 names the deciding policy: {body:?}"
    );
    // And a call no policy permits (POST) names that reason.
    let (status, body) = mesh.call("POST", "/hello").expect("the unpermitted call");
    assert_eq!(status, 403, "unpermitted call: {body}");
    assert!(
        body.contains("no policy permits"),
        "the 403 says no policy permits: {body:?}"
    );
    assert_eq!(
        mesh.app.requests(),
        before,
        "denied calls never reach the app"
    );
    let audit = mesh.wait_server_audit("the denied calls", |a| {
        let denied = |path: &str, method: &str| {
            a.records().iter().any(|r| {
                r["decision"] == "deny"
                    && r["context"]["path"] == path
                    && r["context"]["method"] == method
                    && r["principal"] == mesh.client.id.as_str()
            })
        };
        denied("/admin", "GET") && denied("/hello", "POST")
    });
    let forbid = audit
        .records()
        .iter()
        .find(|r| r["decision"] == "deny" && r["context"]["path"] == "/admin")
        .unwrap();
    assert!(
        forbid["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "e2e-forbid-admin")),
        "the deny names the forbid: {forbid}"
    );
    assert!(
        body.contains(forbid_id_of(&audit, "POST")),
        "the 403 body names the decision id of its audit record: {body:?}"
    );
}

fn forbid_id_of<'a>(audit: &'a meshward_tests::Audit, method: &str) -> &'a str {
    audit
        .records()
        .iter()
        .rev()
        .find(|r| r["decision"] == "deny" && r["context"]["method"] == method)
        .and_then(|r| r["id"].as_str())
        .unwrap_or("<no id>")
}

/// (3) the plain binary path has no entry: `svid fetch` exits non-zero saying "no identity".
fn unattested_process_gets_no_identity(mesh: &Mesh) {
    let socket = mesh.socket.display().to_string();
    let out = mesh.meshward(&["svid", "fetch", "--socket", &socket]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unattested fetch fails: {stderr}");
    assert!(
        stderr.contains("no identity"),
        "the error says there is no identity: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing is printed on stdout");
    // The same socket still serves the registered proxies (the refusal was about this process).
    let (status, _) = mesh
        .call("GET", "/still-ok")
        .expect("a call after the refusal");
    assert_eq!(status, 200);
}

/// (4) a client holding a valid SVID of another trust domain: the server proxy refuses the
/// connection and the app never sees a request. The control: the same raw client with the real
/// client SVID (fetched by `svid fetch --write`, run from the client proxy's path) is served, so
/// the refusal is about the trust domain and nothing else.
fn foreign_trust_domain_client_is_refused(mesh: &Mesh) {
    let svid_dir = mesh.dir().join("client-svid");
    let out = std::process::Command::new(&mesh.client.bin)
        .args(["svid", "fetch", "--socket"])
        .arg(&mesh.socket)
        .arg("--write")
        .arg(&svid_dir)
        .output()
        .expect("svid fetch --write");
    assert!(
        out.status.success(),
        "the client's svid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |file: &str| std::fs::read_to_string(svid_dir.join(file)).expect(file);
    let own_chain = certs_from_pem(&read("svid.pem")).expect("svid.pem");
    let own_key = SvidKey::from_pkcs8_pem(&read("svid.key")).expect("svid.key");
    let before = mesh.app.requests();
    let response = tls_get(mesh, own_chain, &own_key).expect("the control call is served");
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "the control call: {:?}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(
        mesh.app.requests(),
        before + 1,
        "the control reached the app"
    );

    let foreign = TestPki::new("other.org");
    let (svid, key) = foreign.svid("spiffe://other.org/ns/e2e/sa/client");
    match tls_get(mesh, svid.into_chain(), &key) {
        Err(e) => assert!(
            !e.to_string().contains("deadline has elapsed"),
            "the server hung instead of refusing: {e}"
        ),
        Ok(response) => panic!(
            "a foreign trust domain client got an answer: {:?}",
            String::from_utf8_lossy(&response)
        ),
    }
    assert_eq!(
        mesh.app.requests(),
        before + 1,
        "the foreign client never reached the app"
    );
    std::thread::sleep(meshward_tests::AUDIT_SETTLE);
    assert!(
        !mesh.server_audit().records().iter().any(|r| {
            r["decision"] == "allow"
                && r["principal"]
                    .as_str()
                    .is_some_and(|p| p.contains("other.org"))
        }),
        "nothing from other.org was allowed"
    );
}

/// `GET /foreign` over mTLS straight to the server proxy, presenting `chain`; the raw response.
/// The client trusts the real server (the mesh bundle, the server's ID), so a failure here is the
/// server refusing the client.
fn tls_get(
    mesh: &Mesh,
    chain: Vec<CertificateDer<'static>>,
    key: &SvidKey,
) -> std::io::Result<Vec<u8>> {
    let example: TrustDomain = "example.org".parse().unwrap();
    let pem = std::fs::read_to_string(&mesh.bundle).expect("the mesh bundle");
    let mut set = BundleSet::new();
    set.insert(TrustBundle::from_pem(example.clone(), &pem).expect("bundle"));
    let verifier = PeerVerifier::new(Arc::new(set), [example])
        .with_expected(Expected::Id(SpiffeId::parse(&mesh.server.id).unwrap()));
    let config = client_config(
        chain,
        key.to_pkcs8_der(),
        Arc::new(verifier),
        vec![b"http/1.1".to_vec()],
    )
    .expect("client config");
    let inbound = mesh.inbound;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(inbound).await?;
        let name = ServerName::try_from("server.invalid").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /foreign HTTP/1.1\r\nhost: e2e\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response))
            .await
            .map_err(std::io::Error::other)??;
        Ok(response)
    })
}
