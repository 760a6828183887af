//! Interop: the Rust `spiffe` crate (a third-party, unmodified Workload API client) against our
//! agent's socket: SVIDs, bundles, JWT-SVIDs (validated by the agent), and rotation seen by an
//! `X509Source`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::time::Duration;

use spiffe::{TrustDomain, WorkloadApiClient, X509SourceBuilder};
use support::{Mesh, MeshOptions, TD, id, this_process};

/// No step waits longer than this.
const PATIENCE: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_gets_svids_bundles_and_jwts_and_sees_rotation() {
    // 30s SVIDs (the CA's minimum): renewed by the agent after ~15s.
    let options = MeshOptions {
        svid_ttl: Duration::from_secs(30),
        ..MeshOptions::default()
    };
    let mesh = Mesh::start(options, &[("spiffe-crate", vec![this_process()])]).await;
    let endpoint = format!("unix:{}", mesh.socket.display());
    let td: TrustDomain = TD.parse().unwrap();
    let roots: Vec<Vec<u8>> = mesh
        .agent
        .cache
        .current()
        .bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();

    let client = WorkloadApiClient::connect_to(&endpoint).await.unwrap();

    // X.509-SVID, with its key and hint.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), id("spiffe-crate").to_string());
    assert_eq!(svid.hint(), Some("spiffe-crate"));
    assert!(!svid.private_key().as_ref().is_empty());
    let context = client.fetch_x509_context().await.unwrap();
    assert_eq!(context.svids().len(), 1);
    assert!(context.bundle_set().get(&td).is_some());

    // X.509 bundles: exactly our roots.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let ours: Vec<Vec<u8>> = bundles
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(ours, roots);

    // JWT bundles, a JWT-SVID, and its validation by the agent.
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let jwt_bundle = jwt_bundles
        .get(&td)
        .expect("a jwt bundle for our trust domain");
    assert!(jwt_bundle.jwt_authorities().count() > 0);
    let jwt = client
        .fetch_jwt_svid(["interop-audience"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), id("spiffe-crate").to_string());
    assert_eq!(jwt.audience(), ["interop-audience"]);
    assert!(
        jwt_bundle
            .jwt_authorities()
            .any(|a| a.key_id() == jwt.key_id()),
        "the token's key is in the bundle"
    );
    let validated = client
        .validate_jwt_token("interop-audience", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), jwt.spiffe_id());
    // Refused: another audience, and a tampered token.
    assert!(
        client
            .validate_jwt_token("someone-else", jwt.token())
            .await
            .is_err()
    );
    let mut tampered = jwt.token().to_owned().into_bytes();
    let at = tampered.len() - 3;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let err = client
        .validate_jwt_token("interop-audience", &tampered)
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("invalid"), "{err}");

    // An X509Source follows rotation: first a prepared root, then a renewed SVID.
    let source = X509SourceBuilder::new()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let first_leaf = source.svid().unwrap().leaf().as_bytes().to_vec();
    let mut updates = source.updated();
    mesh.prepare_root().await;
    tokio::time::timeout(PATIENCE, async {
        loop {
            updates.changed().await.unwrap();
            let bundle = source.bundle_set().unwrap().get(&td).unwrap();
            if bundle.authorities().len() == 2 {
                break;
            }
        }
    })
    .await
    .expect("the x509 source sees the prepared root");
    tokio::time::timeout(PATIENCE, async {
        loop {
            if source.svid().unwrap().leaf().as_bytes() != first_leaf.as_slice() {
                break;
            }
            updates.changed().await.unwrap();
        }
    })
    .await
    .expect("the x509 source sees the renewed svid");
    let rotated = source.svid().unwrap();
    assert_eq!(
        rotated.spiffe_id().to_string(),
        id("spiffe-crate").to_string()
    );
    source.shutdown().await;
    mesh.stop().await;
}
