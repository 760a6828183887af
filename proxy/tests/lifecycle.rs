//! Rotation, readiness and shutdown over real sockets.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn a_long_lived_h2_connection_survives_an_svid_rotation() {
    let h = Harness::http().await;
    let first_serial = h
        .running()
        .identity
        .current()
        .unwrap()
        .svid()
        .serial()
        .to_owned();
    let (svid, key) = h.pki.svid(WEB);
    let client = Client::new(&h.pki, svid.into_chain(), key, &[b"h2"]);
    let mut send = client.h2(h.inbound()).await;
    assert_eq!(h2_get(&mut send, "/api/before").await.0, 200);

    let (new_svid, new_key) = h.pki.svid(API);
    let new_serial = new_svid.serial().to_owned();
    assert_ne!(new_serial, first_serial);
    write_svid_dir(&h.identity_dir(), &h.pki, &new_svid, &new_key);
    let identity = h.running().identity.clone();
    eventually(Duration::from_secs(10), "the new svid", || {
        identity.current().unwrap().svid().serial() == new_serial
    })
    .await;

    // The old connection keeps working on its old session.
    for i in 0..3 {
        assert_eq!(h2_get(&mut send, &format!("/api/after/{i}")).await.0, 200);
    }
    // A new connection gets the new certificate.
    let tls = client.connect(h.inbound()).await.unwrap();
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    assert_eq!(leaf.as_ref(), new_svid.leaf().as_ref());
    assert_eq!(h.app.seen().len(), 4);
}

#[tokio::test]
async fn ready_waits_for_an_svid_and_metrics_are_served() {
    let mut h = Harness::http().await;
    let admin = h.running().admin.unwrap();
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert_eq!(status(&get("/ready").await), 200);
    assert_eq!(status(&get("/live").await), 200);
    assert_eq!(
        status(&h.client(WEB).get(h.inbound(), "/api/x").await.unwrap()),
        200
    );
    let metrics = get("/metrics").await;
    for needle in [
        r#"meshward_proxy_decisions_total{action="GET",decision="allow",mode="enforce"} 1"#,
        "meshward_proxy_decision_duration_seconds_count 1",
        "meshward_proxy_svid_expiry_seconds ",
        "meshward_proxy_policies 4",
    ] {
        assert!(metrics.contains(needle), "missing `{needle}` in\n{metrics}");
    }
    assert!(
        !metrics.contains("meshward_proxy_svid_expiry_seconds 0\n"),
        "{metrics}"
    );
    h.stop().await;

    // A proxy whose svid dir is still empty is live but not ready, and accepts no handshake.
    let mut config = h.config.clone();
    let empty = h.dir.path().join("empty-svid");
    config.identity = meshward_proxy::config::IdentitySource::SvidDir(empty.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = meshward_proxy::start(config, shutdown.clone())
        .await
        .unwrap();
    let admin = running.admin.unwrap();
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert_eq!(status(&get("/ready").await), 503);
    assert_eq!(status(&get("/live").await), 200);
    let (svid, key) = h.pki.svid(API);
    write_svid_dir(&empty, &h.pki, &svid, &key);
    tokio::time::timeout(Duration::from_secs(10), running.identity.ready())
        .await
        .unwrap();
    assert_eq!(status(&get("/ready").await), 200);
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_syncs_the_audit_log() {
    let mut h = Harness::http().await;
    let web = h.client(WEB);
    let addr = h.inbound();
    let in_flight = tokio::spawn(async move { web.get(addr, "/api/slow").await });
    let app = h.app.clone();
    eventually(Duration::from_secs(5), "request at the app", || {
        app.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;

    h.shutdown.cancel();
    // New connections are refused once the listener is gone.
    eventually(Duration::from_secs(5), "listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    // The in-flight request still completes.
    h.app.gate.add_permits(1);
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(status(&response), 200, "{response}");
    assert!(response.ends_with("app saw /api/slow"));
    h.running.take().unwrap().wait().await.unwrap();

    // Every decision is on disk, the chain is intact, and the file is no longer locked.
    let report = meshward_identity::audit::verify_file(h.audit_path()).unwrap();
    assert_eq!(report.records, 1, "{report:?}");
    drop(meshward_identity::audit::AuditLog::open(h.audit_path(), "next").unwrap());
}
