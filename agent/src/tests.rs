//! `run`/`start` end to end: a real CA, the agent's socket, the admin port, shutdown.

use std::os::unix::fs::PermissionsExt as _;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::test_ca::{TestCa, eventually};

const HOUR: Duration = Duration::from_secs(3_600);

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn the_agent_serves_its_socket_and_admin_port_then_stops_cleanly() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("web", "node-run", &["unix:uid:1000"]).await;
    let mut config = ca.agent_config("node-run").await;
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    // A stale socket from a crashed agent is replaced.
    fs::create_dir_all(config.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&config.socket).unwrap());

    let shutdown = CancellationToken::new();
    let running = start(config.clone(), shutdown.clone()).await.unwrap();
    let admin = running.admin_http_addr.unwrap();
    let mode = fs::metadata(&config.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "any local process may connect");
    assert!(get(admin, "/live").await.starts_with("HTTP/1.1 200"));

    let cache = running.cache.clone();
    eventually(Duration::from_secs(10), "first sync", || {
        cache.current().synced
    })
    .await;
    assert!(get(admin, "/ready").await.starts_with("HTTP/1.1 200"));
    let metrics = get(admin, "/metrics").await;
    assert!(
        metrics.contains("meshward_agent_svids_minted_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("meshward_agent_entries 1"), "{metrics}");

    // A second agent on the same socket is refused; the live socket is left alone.
    let mut second = config.clone();
    second.admin_listen = None;
    let err = start(second, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, AgentError::Socket { .. }), "{err:?}");
    assert!(config.socket.exists());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!config.socket.exists(), "the socket is removed on shutdown");
}

#[test]
fn a_file_in_the_socket_path_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    fs::write(&path, "precious").unwrap();
    let err = bind_socket(&path).unwrap_err();
    assert!(matches!(err, AgentError::Socket { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test]
async fn an_agent_without_identity_or_token_does_not_start() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let mut config = ca.agent_config("node-none").await;
    config.join_token = None;
    let err = start(config.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::Node(NodeError::NoJoinToken { .. })),
        "{err:?}"
    );
    assert!(!config.socket.exists());
}
