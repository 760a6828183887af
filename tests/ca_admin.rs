//! The CA's operator surface on a real `meshward ca run` process: the admin CLI's output contracts,
//! root rotation as agents see it, the metrics endpoint, and the permissions of what it writes.

// Helpers outside `#[test]` functions fail loudly too: a broken scenario is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::certs_from_pem;
use meshward_tests::{CaOptions, CaProcess, trust_domain, workload_request};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;

const NODE: &str = "node-1";
const WEB: &str = "spiffe://example.org/ns/shop/sa/web";

fn ca() -> CaProcess {
    CaProcess::start(CaOptions::new(env!("CARGO_BIN_EXE_meshward")))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not json ({e}): {text}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The leaf chain of a minted SVID; panics on a refusal.
fn minted_chain(result: &pb::SvidResult) -> Vec<CertificateDer<'static>> {
    match &result.result {
        Some(pb::svid_result::Result::Svid(svid)) => svid
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect(),
        other => panic!("expected an svid, got {other:?}"),
    }
}

/// Whether `chain` verifies against a bundle of `roots` alone.
fn chains_to(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> bool {
    let mut bundle = TrustBundle::new(trust_domain());
    for root in roots {
        bundle.add_authority(root.clone()).unwrap();
    }
    let mut set = BundleSet::new();
    set.insert(bundle);
    PeerVerifier::new(Arc::new(set), [trust_domain()])
        .verify(&chain[0], &chain[1..], PeerRole::Client, UnixTime::now())
        .is_ok()
}

/// The next bundle `WatchBundle` pushes; panics if none comes within 10s.
async fn next(stream: &mut tonic::Streaming<pb::Bundle>, what: &str) -> pb::Bundle {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap_or_else(|_| panic!("no bundle pushed for {what}"))
        .unwrap()
        .unwrap()
}

fn authority_cert(authority: &Value) -> CertificateDer<'static> {
    let pem = authority["certificate_pem"].as_str().unwrap();
    certs_from_pem(pem).unwrap().remove(0)
}

#[tokio::test]
async fn token_create_prints_only_the_token() {
    let ca = ca();
    let out = ca.cli(&["token", "create", "--node", NODE]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Exactly one line, the token, so `$(meshward ca token create ...)` is the token.
    let token = stdout.strip_suffix('\n').expect("one line");
    assert!(!token.contains('\n'), "{stdout:?}");
    assert!(
        token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token:?}"
    );
    // And it is the real thing.
    let agent_key = meshward_identity::x509::SvidKey::generate().unwrap();
    let csr =
        meshward_identity::x509::make_csr(&agent_key, &meshward_tests::agent_id(NODE)).unwrap();
    ca.anonymous()
        .await
        .attest(meshward_tests::attest_request(token, csr))
        .await
        .unwrap();

    // A bad flag is a usage error (64) on stderr, with nothing on stdout.
    let out = ca.cli(&["token", "create", "--node", NODE, "--ttl", "ten minutes"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn json_listings_parse() {
    let ca = ca();
    let entry = json(&ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--node",
        NODE,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:path:/usr/bin/web",
        "--ttl",
        "10m",
        "--hint",
        "the shop front",
        "--output",
        "json",
    ]));
    let any = ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/ops/sa/metrics",
        "--any-node",
        "--selector",
        "unix:uid:2000",
    ]);
    let entries = json(&ca.cli_ok(&["entry", "list", "--output", "json"]));
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let web = entries.iter().find(|e| e["id"] == entry["id"]).unwrap();
    assert_eq!(web["spiffe_id"], WEB);
    assert_eq!(web["node"], NODE);
    assert_eq!(web["any_node"], false);
    assert_eq!(web["ttl_seconds"], 600);
    assert_eq!(web["hint"], "the shop front");
    assert_eq!(
        web["selectors"],
        // Stored sorted, so equal sets of selectors compare equal.
        serde_json::json!(["unix:path:/usr/bin/web", "unix:uid:1000"])
    );
    let other = entries.iter().find(|e| e["id"] == any.trim()).unwrap();
    assert_eq!(other["any_node"], true);

    ca.attest(NODE).await;
    let agents = json(&ca.cli_ok(&["agent", "list", "--output", "json"]));
    assert_eq!(
        agents[0]["spiffe_id"],
        meshward_tests::agent_id(NODE).as_str()
    );
    assert_eq!(agents[0]["attestation"], "join_token");
    assert!(agents[0]["expires_at"].as_i64().unwrap() > 0);
    assert_eq!(agents[0]["pending_serial"], Value::Null);

    let authorities = json(&ca.cli_ok(&["rotate", "list", "--output", "json"]));
    assert_eq!(authorities[0]["state"], "active");
    authority_cert(&authorities[0]);

    let bundle = json(&ca.cli_ok(&["bundle", "show", "--output", "json"]));
    assert_eq!(bundle["trust_domain"], "example.org");
    let pem = bundle["x509_authorities_pem"].as_str().unwrap();
    assert_eq!(certs_from_pem(pem).unwrap(), ca.bundle().authorities());
    let keys = bundle["jwt_authorities"]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "EC");

    // Deleting one leaves the other.
    assert!(ca.cli_ok(&["entry", "delete", any.trim()]).is_empty());
    let entries = json(&ca.cli_ok(&["entry", "list", "--output", "json"]));
    assert_eq!(entries.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn root_rotation_prepare_activate_retire() {
    let ca = ca();
    ca.create_entry(WEB, NODE);
    let agent = ca.attest(NODE).await;
    let mut client = ca.as_agent(&agent).await;
    let mut watch = client
        .watch_bundle(pb::WatchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut watch, "the watch start").await;
    assert_eq!(first.x509_authorities.len(), 1);
    let old_root = CertificateDer::from(first.x509_authorities[0].clone());

    // Prepare: published before it signs.
    let prepared = json(&ca.cli_ok(&["rotate", "prepare", "--output", "json"]));
    assert_eq!(prepared["state"], "prepared");
    let new_root = authority_cert(&prepared);
    let pushed = next(&mut watch, "the prepared root").await;
    assert!(pushed.sequence > first.sequence);
    assert_eq!(
        pushed.x509_authorities.len(),
        2,
        "both roots while prepared"
    );
    assert!(pushed.x509_authorities.contains(&old_root.to_vec()));
    assert!(pushed.x509_authorities.contains(&new_root.to_vec()));
    let jwks: Value = serde_json::from_slice(&pushed.jwt_authorities).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let before = client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(WEB)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let before = minted_chain(&before[0]);
    assert!(chains_to(&before, std::slice::from_ref(&old_root)));
    assert!(!chains_to(&before, std::slice::from_ref(&new_root)));

    // Activate: the new root signs; the old one stays published.
    let activated = json(&ca.cli_ok(&["rotate", "activate", "--output", "json"]));
    assert_eq!(activated["state"], "active");
    let pushed = next(&mut watch, "the activation").await;
    assert_eq!(pushed.x509_authorities.len(), 2);
    // The agent's SVID from the old root still works; a reconnect sees the CA's renewed serving SVID.
    let mut client = ca.as_agent(&agent).await;
    let after = client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(WEB)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let after = minted_chain(&after[0]);
    assert!(chains_to(&after, std::slice::from_ref(&new_root)));
    assert!(!chains_to(&after, std::slice::from_ref(&old_root)));

    // Retire: refused while SVIDs the old root signed are still valid.
    let out = ca.cli(&["rotate", "retire"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("signed certificates valid until") && stderr.contains("retire it after"),
        "{stderr}"
    );
    let authorities = json(&ca.cli_ok(&["rotate", "list", "--output", "json"]));
    let states: Vec<&str> = authorities
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"active") && states.contains(&"old"),
        "{states:?}"
    );
    let old = authorities
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["state"] == "old")
        .unwrap();
    // signed_until covers the SVID minted before activation (1h).
    assert!(old["signed_until"].as_i64().unwrap() > 0);
    assert_eq!(ca.bundle().len(), 2, "the old root is still published");
}

#[tokio::test]
async fn metrics_count_issued_svids() {
    let ca = CaProcess::start(CaOptions::new(env!("CARGO_BIN_EXE_meshward")).metrics());
    const ISSUED: &str = "meshward_ca_svids_issued_total";
    const NOT_ENTITLED: &str = "meshward_ca_svids_refused_total{reason=\"not_entitled\"}";
    assert_eq!(ca.metric(ISSUED), 0.0);
    assert_eq!(ca.metric(NOT_ENTITLED), 0.0);
    ca.create_entry(WEB, NODE);
    let agent = ca.attest(NODE).await;
    assert_eq!(ca.metric(ISSUED), 1.0, "the agent svid counts");
    ca.as_agent(&agent)
        .await
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![
                workload_request(WEB),
                workload_request(WEB),
                workload_request(WEB),
                workload_request("spiffe://example.org/ns/bank/sa/vault"),
            ],
        })
        .await
        .unwrap();
    assert_eq!(ca.metric(ISSUED), 4.0);
    assert_eq!(ca.metric(NOT_ENTITLED), 1.0);
    let text = ca.metrics();
    assert!(
        text.contains("meshward_ca_signing_duration_seconds_count"),
        "{text}"
    );
}

#[tokio::test]
async fn keys_and_state_on_disk_are_owner_only() {
    let ca = ca();
    ca.cli_ok(&["rotate", "prepare"]);
    let data = ca.data_dir();
    let keys_dir = data.join("keys");
    assert_eq!(mode(data), 0o700, "data dir");
    assert_eq!(mode(&keys_dir), 0o700, "keys dir");
    let keys: Vec<_> = std::fs::read_dir(&keys_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    // Two authorities (first root + prepared), each with an X.509 and a JWT key.
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in &keys {
        assert_eq!(mode(key), 0o600, "{}", key.display());
    }
    for file in ["ca.sqlite3", "audit.jsonl", "admin.sock"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}
