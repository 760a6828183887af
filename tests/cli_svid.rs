//! `meshward svid fetch` as a workload runs it: the real binary, attested by a real agent (of a
//! real CA, both in this test process) over the agent's unix socket.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use std::sync::Arc;

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid};
use rustls_pki_types::UnixTime;
use support::{Mesh, MeshOptions, TD, id, path_selector};

/// Runs the CLI off the async runtime (the agent it talks to runs on it).
async fn meshward(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_meshward"))
            .args(&args)
            .env_remove("MESHWARD_LOG")
            .env_remove("MESHWARD_SVID_SOCKET")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn cli() -> String {
    path_selector(Path::new(env!("CARGO_BIN_EXE_meshward")))
}

fn s(x: &str) -> String {
    x.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_writes_the_svid_key_and_bundle_and_prints_json() {
    let mesh = Mesh::start(MeshOptions::default(), &[("cli", vec![cli()])]).await;
    let socket = mesh.socket.display().to_string();
    let out_dir = mesh.dir.path().join("out");

    let out = meshward(vec![
        s("svid"),
        s("fetch"),
        s("--socket"),
        socket.clone(),
        s("--write"),
        out_dir.display().to_string(),
        s("--json"),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let svid = &json["svids"][0];
    assert_eq!(svid["spiffe_id"], id("cli").as_str());
    assert!(svid["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(json["written"], out_dir.display().to_string());

    let chain =
        X509Svid::from_pem(&std::fs::read_to_string(out_dir.join("svid.pem")).unwrap()).unwrap();
    assert_eq!(*chain.spiffe_id(), id("cli"));
    assert_eq!(svid["serial"], chain.serial());
    let key_path = out_dir.join("svid.key");
    let key = SvidKey::from_pkcs8_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    assert!(meshward_agent::ca_client::leaf_matches_key(&chain, &key));
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let bundle = TrustBundle::from_pem(
        TD.parse().unwrap(),
        &std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        bundle.authorities(),
        mesh.agent.cache.current().bundle.authorities()
    );
    // The written chain verifies against the written bundle.
    let mut set = BundleSet::new();
    set.insert(bundle);
    let (leaf, intermediates) = chain.chain().split_first().unwrap();
    PeerVerifier::new(Arc::new(set), [TD.parse().unwrap()])
        .verify(leaf, intermediates, PeerRole::Client, UnixTime::now())
        .unwrap();

    // Text output, and a second run replaces the files in place.
    let out = meshward(vec![
        s("svid"),
        s("fetch"),
        s("--socket"),
        socket,
        s("--write"),
        out_dir.display().to_string(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(id("cli").as_str()), "{stdout}");
    assert!(stdout.contains("serial "), "{stdout}");
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_one_line_with_a_non_zero_exit() {
    let options = MeshOptions {
        identity_wait: Duration::from_millis(500),
        ..MeshOptions::default()
    };
    // Someone is registered; the CLI is not.
    let mesh = Mesh::start(options, &[("someone", vec![s("unix:uid:4242")])]).await;
    let out = meshward(vec![
        s("svid"),
        s("fetch"),
        s("--socket"),
        mesh.socket.display().to_string(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("meshward: no identity for this process: "),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());

    // No agent on the socket.
    let missing = mesh.dir.path().join("nobody.sock");
    let out = meshward(vec![
        s("svid"),
        s("fetch"),
        s("--socket"),
        missing.display().to_string(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the workload api"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // A bad flag value is a usage error.
    let out = meshward(vec![
        s("svid"),
        s("fetch"),
        s("--socket"),
        s("x"),
        s("--timeout"),
        s("soon"),
    ])
    .await;
    assert_eq!(out.status.code(), Some(64));
    mesh.stop().await;
}
