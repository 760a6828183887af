//! A real meshward CA and node agent, in-process, on `127.0.0.1:0` and a temp unix socket: the
//! setting of the Workload API / SDS interop tests (and of `tests/cli_svid.rs`, which includes
//! this file by path).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshward_agent::RunningAgent;
use meshward_agent::config::{AgentConfig, JoinToken};
use meshward_ca::config::CaConfig;
use meshward_ca::server::RunningCa;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::x509::certs_to_pem;
use meshward_identity::{SpiffeId, TrustDomain};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

/// The trust domain of every mesh here.
pub const TD: &str = "interop.test";

/// The node every agent here runs as.
pub const NODE: &str = "node-interop";

/// How a mesh is started.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Workload SVID lifetime (the CA's minimum is 30s).
    pub svid_ttl: Duration,
    /// How long the agent lets an unknown caller wait before refusing it.
    pub identity_wait: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            svid_ttl: Duration::from_secs(3_600),
            identity_wait: Duration::from_secs(10),
        }
    }
}

/// A CA and one agent; both stop when it is dropped.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ca: RunningCa,
    ca_stop: CancellationToken,
    pub agent: RunningAgent,
    agent_stop: CancellationToken,
    /// The agent's Workload API / SDS socket.
    pub socket: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.agent_stop.cancel();
        self.ca_stop.cancel();
    }
}

impl Mesh {
    /// Starts a CA, creates `entries` (path under [`TD`], selectors) for [`NODE`], then starts the
    /// agent of that node.
    pub async fn start(options: MeshOptions, entries: &[(&str, Vec<String>)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CaConfig::new(
            dir.path().join("ca"),
            "127.0.0.1:0".parse().unwrap(),
            TD.parse::<TrustDomain>().unwrap(),
        );
        config.svid_ttl = options.svid_ttl;
        config.drain_grace = Duration::from_millis(200);
        let ca_stop = CancellationToken::new();
        let ca = meshward_ca::server::start(config, ca_stop.clone())
            .await
            .unwrap();
        for (path, selectors) in entries {
            entry(&ca.admin_socket, path, selectors).await;
        }

        let base = dir.path().join("agent");
        std::fs::create_dir_all(&base).unwrap();
        let bundle = base.join("bootstrap.pem");
        let roots = admin(&ca.admin_socket)
            .await
            .show_bundle(pb::ShowBundleRequest {})
            .await
            .unwrap()
            .into_inner()
            .x509_authorities
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect::<Vec<_>>();
        std::fs::write(&bundle, certs_to_pem(&roots)).unwrap();
        let token = admin(&ca.admin_socket)
            .await
            .create_join_token(pb::CreateJoinTokenRequest {
                node: NODE.into(),
                ttl_seconds: 600,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let mut config = AgentConfig::new(
            ca.local_addr.to_string(),
            bundle,
            base.join("agent.sock"),
            base.join("data"),
        );
        config.join_token = Some(JoinToken::new(token).unwrap());
        config.sync_interval = Duration::from_millis(500);
        config.ca_timeout = Duration::from_secs(3);
        config.identity_wait = options.identity_wait;
        let agent_stop = CancellationToken::new();
        let agent = meshward_agent::start(config, agent_stop.clone())
            .await
            .unwrap();
        Self {
            socket: agent.socket.clone(),
            dir,
            ca,
            ca_stop,
            agent,
            agent_stop,
        }
    }

    /// Creates another entry for the agent's node.
    pub async fn entry(&self, path: &str, selectors: &[String]) -> String {
        entry(&self.ca.admin_socket, path, selectors).await
    }

    /// Prepares the next root (it joins the bundle; SVIDs stay signed by the current one).
    pub async fn prepare_root(&self) {
        admin(&self.ca.admin_socket)
            .await
            .prepare_root(pb::RotateRequest {
                danger_force: false,
            })
            .await
            .unwrap();
    }

    /// Stops the agent, then the CA.
    pub async fn stop(self) {
        self.agent_stop.cancel();
        self.ca_stop.cancel();
    }
}

/// `spiffe://interop.test/<path>`.
pub fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/{path}")).unwrap()
}

/// The `unix:path:` selector of a binary, as the agent's attestor sees it (`/proc/<pid>/exe`).
pub fn path_selector(binary: &Path) -> String {
    format!("unix:path:{}", binary.canonicalize().unwrap().display())
}

/// The `unix:path:` selector of this test process.
pub fn this_process() -> String {
    format!(
        "unix:path:{}",
        std::fs::read_link("/proc/self/exe").unwrap().display()
    )
}

async fn admin(socket: &Path) -> AdminClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    AdminClient::new(channel)
}

async fn entry(admin_socket: &Path, path: &str, selectors: &[String]) -> String {
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
    admin(admin_socket)
        .await
        .create_entry(pb::CreateEntryRequest {
            spiffe_id: id(path).to_string(),
            selectors,
            node: NODE.into(),
            any_node: false,
            ttl_seconds: 0,
            hint: path.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .id
}
