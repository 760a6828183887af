//! Tests only: a real meshward CA on `127.0.0.1:0` with a temp data dir, and its admin socket.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshward_ca::config::CaConfig;
use meshward_ca::server::RunningCa;
use meshward_identity::TrustDomain;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::x509::certs_to_pem;
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{AgentConfig, JoinToken};

/// The trust domain of every test CA.
pub const TD: &str = "agent.test";

/// A running (or stopped, for outage tests) CA.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    config: CaConfig,
    running: Option<(RunningCa, CancellationToken)>,
}

impl TestCa {
    /// A CA signing workload SVIDs for `svid_ttl` and agent SVIDs for `agent_ttl`.
    pub async fn start(svid_ttl: Duration, agent_ttl: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CaConfig::new(
            dir.path().join("ca"),
            "127.0.0.1:0".parse().unwrap(),
            TD.parse::<TrustDomain>().unwrap(),
        );
        config.svid_ttl = svid_ttl;
        config.agent_svid_ttl = agent_ttl;
        config.drain_grace = Duration::from_millis(200);
        let mut ca = Self {
            addr: config.listen,
            dir,
            config,
            running: None,
        };
        ca.resume().await;
        ca
    }

    /// Starts the CA again on the same port and data dir.
    pub async fn resume(&mut self) {
        let shutdown = CancellationToken::new();
        let running = meshward_ca::server::start(self.config.clone(), shutdown.clone())
            .await
            .unwrap();
        self.addr = running.local_addr;
        self.config.listen = running.local_addr;
        self.running = Some((running, shutdown));
    }

    /// Stops the CA (the port closes; the data dir stays).
    pub async fn stop(&mut self) {
        if let Some((running, shutdown)) = self.running.take() {
            shutdown.cancel();
            running.wait().await.unwrap();
        }
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        meshward_ca::admin::connect(&self.config.admin_socket)
            .await
            .unwrap()
    }

    pub async fn token(&self, node: &str) -> JoinToken {
        let token = self
            .admin()
            .await
            .create_join_token(pb::CreateJoinTokenRequest {
                node: node.into(),
                ttl_seconds: 600,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        JoinToken::new(token).unwrap()
    }

    /// Creates an entry for `path` (under the test trust domain) on `node`; returns its ID.
    pub async fn entry(&self, path: &str, node: &str, selectors: &[&str]) -> String {
        let selectors = selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap();
                pb::Selector {
                    r#type: kind.into(),
                    value: value.into(),
                }
            })
            .collect();
        self.admin()
            .await
            .create_entry(pb::CreateEntryRequest {
                spiffe_id: format!("spiffe://{TD}/{path}"),
                selectors,
                node: node.into(),
                any_node: false,
                ttl_seconds: 0,
                hint: format!("hint-{path}"),
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// Writes the CA's current roots as PEM to `path`.
    pub async fn write_bundle(&self, path: &Path) {
        let bundle = self
            .admin()
            .await
            .show_bundle(pb::ShowBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        let certs: Vec<CertificateDer<'static>> = bundle
            .x509_authorities
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        std::fs::write(path, certs_to_pem(&certs)).unwrap();
    }

    /// An agent config for node `node` in a fresh dir under the CA's temp dir, with a join token.
    pub async fn agent_config(&self, node: &str) -> AgentConfig {
        let base = self.dir.path().join(format!("agent-{node}"));
        std::fs::create_dir_all(&base).unwrap();
        let bundle = base.join("bootstrap.pem");
        self.write_bundle(&bundle).await;
        let mut config = AgentConfig::new(
            self.addr.to_string(),
            bundle,
            base.join("run").join("agent.sock"),
            base.join("data"),
        );
        config.join_token = Some(self.token(node).await);
        config.sync_interval = Duration::from_millis(500);
        config.ca_timeout = Duration::from_secs(3);
        config
    }
}

/// Polls `check` every 100ms for at most `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
