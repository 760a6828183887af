//! The CA as it runs for users, in-process: `server::start` on 127.0.0.1:0 with a temp data dir,
//! real gRPC over real TLS for agents, and the real admin unix socket.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshward_ca::config::CaConfig;
use meshward_ca::server::{RunningCa, start};
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::proto::ca::ca_client::CaClient;
use meshward_identity::tls::{PROTOCOL_VERSIONS, client_config, provider};
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use support::tls_channel;

const TD: &str = "example.org";

struct Ca {
    _dir: tempfile::TempDir,
    running: Option<RunningCa>,
    shutdown: CancellationToken,
    addr: SocketAddr,
    admin_socket: PathBuf,
}

impl Ca {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a CA on 127.0.0.1:0 in a fresh data dir, after `adjust` has changed its config.
    async fn start_with(adjust: impl FnOnce(&mut CaConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = TD.parse().unwrap();
        let mut config = CaConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap(), td);
        config.drain_grace = Duration::from_secs(2);
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        let running = start(config, shutdown.clone()).await.unwrap();
        Self {
            addr: running.local_addr,
            admin_socket: running.admin_socket.clone(),
            running: Some(running),
            shutdown,
            _dir: dir,
        }
    }

    async fn admin(&self) -> AdminClient<Channel> {
        meshward_ca::admin::connect(&self.admin_socket)
            .await
            .unwrap()
    }

    /// The bundle as an operator would fetch it (`meshward ca bundle show`).
    async fn bundle(&self) -> TrustBundle {
        support::admin_bundle(&self.admin_socket).await
    }

    /// A client that verifies the CA and presents no certificate (as for `Attest`).
    async fn anonymous(&self) -> CaClient<Channel> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(self.ca_verifier().await)
            .with_no_client_auth();
        CaClient::new(tls_channel(self.addr, config).await)
    }

    /// A client presenting `svid` (an agent SVID).
    async fn as_agent(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &SvidKey,
    ) -> CaClient<Channel> {
        let config = client_config(
            chain,
            key.to_pkcs8_der(),
            self.ca_verifier().await,
            vec![b"h2".to_vec()],
        )
        .unwrap();
        CaClient::new(tls_channel(self.addr, config).await)
    }

    async fn ca_verifier(&self) -> Arc<PeerVerifier> {
        let mut set = BundleSet::new();
        set.insert(self.bundle().await);
        let ca_id = SpiffeId::parse(&format!("spiffe://{TD}/meshward/ca")).unwrap();
        Arc::new(
            PeerVerifier::new(Arc::new(set), [TD.parse().unwrap()])
                .with_expected(Expected::Id(ca_id)),
        )
    }

    /// Attests an agent for `node` with a fresh join token; returns its SVID chain and key.
    async fn attest(&self, node: &str) -> (Vec<CertificateDer<'static>>, SvidKey) {
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
        let key = SvidKey::generate().unwrap();
        let id = SpiffeId::parse(&format!("spiffe://{TD}/meshward/agent/join/{node}")).unwrap();
        let response = self
            .anonymous()
            .await
            .attest(attest_request(&token, make_csr(&key, &id).unwrap()))
            .await
            .unwrap()
            .into_inner();
        let svid = response.svid.unwrap();
        assert_eq!(svid.spiffe_id, id.as_str());
        let chain = svid
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        (chain, key)
    }

    async fn create_entry(&self, id: &str, node: &str) {
        self.admin()
            .await
            .create_entry(pb::CreateEntryRequest {
                spiffe_id: id.into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                node: node.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        let running = self.running.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .expect("the ca drains within its grace period")
            .unwrap();
        assert!(
            !self.admin_socket.exists(),
            "the admin socket is removed on shutdown"
        );
    }
}

fn attest_request(token: &str, csr: Vec<u8>) -> pb::AttestRequest {
    pb::AttestRequest {
        attestation: Some(pb::attest_request::Attestation::JoinToken(
            pb::JoinTokenAttestation {
                token: token.into(),
            },
        )),
        csr,
    }
}

fn workload_request(id: &str) -> pb::SvidRequest {
    let key = SvidKey::generate().unwrap();
    pb::SvidRequest {
        spiffe_id: id.into(),
        csr: make_csr(&key, &SpiffeId::parse(id).unwrap()).unwrap(),
        ..Default::default()
    }
}

fn svid_of(result: &pb::SvidResult) -> X509Svid {
    match &result.result {
        Some(pb::svid_result::Result::Svid(svid)) => X509Svid::parse_chain(
            svid.cert_chain
                .iter()
                .cloned()
                .map(CertificateDer::from)
                .collect(),
        )
        .unwrap(),
        other => panic!("expected an svid, got {other:?}"),
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn attested_agent_mints_entitled_svids_and_nothing_else() {
    let ca = Ca::start().await;
    assert!(is_socket(&ca.admin_socket));
    let (chain, key) = ca.attest("n1").await;
    ca.create_entry("spiffe://example.org/web", "n1").await;
    ca.create_entry("spiffe://example.org/db", "n2").await;

    let mut agent = ca.as_agent(chain, &key).await;
    let results = agent
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![
                workload_request("spiffe://example.org/web"),
                workload_request("spiffe://example.org/db"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    let web = svid_of(&results[0]);
    assert_eq!(web.spiffe_id().as_str(), "spiffe://example.org/web");
    // The workload SVID verifies against the published bundle, as a peer would check it.
    let mut set = BundleSet::new();
    set.insert(ca.bundle().await);
    let verifier = PeerVerifier::new(Arc::new(set), [TD.parse().unwrap()]);
    let now = rustls_pki_types::UnixTime::now();
    let chain = web.chain();
    verifier
        .verify(
            &chain[0],
            &chain[1..],
            meshward_identity::verify::PeerRole::Client,
            now,
        )
        .unwrap();
    match &results[1].result {
        Some(pb::svid_result::Result::Error(e)) => assert_eq!(e.code, "not_entitled", "{e:?}"),
        other => panic!("db is entitled on n2 only, got {other:?}"),
    }

    let entries = agent
        .sync_entries(pb::SyncEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ids: Vec<_> = entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/web"]);
    ca.stop().await;
}

#[tokio::test]
async fn calls_other_than_attest_need_a_client_certificate() {
    let ca = Ca::start().await;
    let mut anonymous = ca.anonymous().await;
    let err = anonymous
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request("spiffe://example.org/web")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = anonymous
        .sync_entries(pb::SyncEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = anonymous
        .watch_bundle(pb::WatchBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn a_join_token_works_once() {
    let ca = Ca::start().await;
    let token = ca
        .admin()
        .await
        .create_join_token(pb::CreateJoinTokenRequest {
            node: "n1".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let key = SvidKey::generate().unwrap();
    let id = SpiffeId::parse("spiffe://example.org/meshward/agent/join/n1").unwrap();
    let csr = make_csr(&key, &id).unwrap();
    let mut client = ca.anonymous().await;
    client
        .attest(attest_request(&token, csr.clone()))
        .await
        .unwrap();
    let err = client
        .attest(attest_request(&token, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = client
        .attest(attest_request("not-a-token", csr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn garbage_and_stalled_handshakes_do_not_stop_the_server() {
    // A long handshake timeout: a stalled client must not hold up anyone else meanwhile.
    let ca = Ca::start_with(|c| c.handshake_timeout = Duration::from_secs(60)).await;
    // Not TLS at all: the server answers with at most an alert, then closes.
    let mut garbage = TcpStream::connect(ca.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n\x00\xff\x16\x03garbage")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut rest))
        .await
        .expect("the garbage connection is closed");
    assert!(matches!(read, Ok(n) if n < 64) || read.is_err(), "{read:?}");

    // A client that connects and never says anything.
    let _stalled = TcpStream::connect(ca.addr).await.unwrap();

    // Meanwhile a good client is served, well before the stalled handshake times out.
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let (chain, key) = ca.attest("n1").await;
        ca.create_entry("spiffe://example.org/web", "n1").await;
        ca.as_agent(chain, &key)
            .await
            .mint_x509_svids(pb::MintX509SvidsRequest {
                requests: vec![workload_request("spiffe://example.org/web")],
            })
            .await
            .unwrap()
            .into_inner()
            .results
    })
    .await
    .expect("a stalled handshake does not block other clients");
    svid_of(&served[0]);
    ca.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_after_the_timeout() {
    let ca = Ca::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let mut stalled = TcpStream::connect(ca.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "stalled handshake closed: {closed:?}"
    );
    // And the server is still there.
    ca.bundle().await;
    ca.anonymous().await;
    ca.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() {
    let ca = Ca::start().await;
    let mut client = ca.anonymous().await;
    let err = client
        .attest(attest_request("token", vec![0u8; 5 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The connection and the server survive it.
    let err = client
        .attest(attest_request("token", vec![1, 2, 3]))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::ResourceExhausted);
    ca.stop().await;
}

#[tokio::test]
async fn watch_bundle_streams_the_current_bundle_then_each_rotation() {
    let ca = Ca::start().await;
    let (chain, key) = ca.attest("n1").await;
    let mut agent = ca.as_agent(chain, &key).await;
    let mut stream = agent
        .watch_bundle(pb::WatchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.trust_domain, TD);
    assert_eq!(first.x509_authorities.len(), 1);

    let prepared = ca
        .admin()
        .await
        .prepare_root(pb::RotateRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prepared.state, "prepared");
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        next.sequence > first.sequence,
        "{} > {}",
        next.sequence,
        first.sequence
    );
    assert_eq!(next.x509_authorities.len(), 2);
    assert!(next.x509_authorities.contains(&prepared.certificate));

    // Shutdown ends the stream instead of waiting for the agent to hang up.
    ca.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    ca.stop().await;
}

#[tokio::test]
async fn a_second_ca_on_the_same_admin_socket_is_refused() {
    let ca = Ca::start().await;
    let td: TrustDomain = TD.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap(), td);
    config.admin_socket = ca.admin_socket.clone();
    let err = start(config, CancellationToken::new()).await.unwrap_err();
    assert!(
        matches!(
            err,
            meshward_ca::server::ServeError::AdminSocket(
                meshward_ca::admin::AdminSocketError::InUse(_)
            )
        ),
        "{err}"
    );
    // The first CA still answers.
    ca.bundle().await;
    ca.stop().await;
}

#[tokio::test]
async fn an_evicted_agent_gets_nothing_more() {
    let ca = Ca::start().await;
    let (chain, key) = ca.attest("n1").await;
    ca.create_entry("spiffe://example.org/web", "n1").await;
    let mut agent = ca.as_agent(chain, &key).await;
    ca.admin()
        .await
        .evict_agent(pb::EvictAgentRequest {
            spiffe_id: "spiffe://example.org/meshward/agent/join/n1".into(),
        })
        .await
        .unwrap();
    let agents = ca
        .admin()
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents.iter().all(|a| a.evicted), "{agents:?}");
    let err = agent
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request("spiffe://example.org/web")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = agent
        .renew_agent(pb::RenewAgentRequest { csr: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn a_renewed_agent_svid_replaces_the_old_one_once_the_agent_uses_it() {
    let ca = Ca::start().await;
    let (chain, key) = ca.attest("n1").await;
    ca.create_entry("spiffe://example.org/web", "n1").await;
    let mut old = ca.as_agent(chain, &key).await;
    let new_key = SvidKey::generate().unwrap();
    let id = SpiffeId::parse("spiffe://example.org/meshward/agent/join/n1").unwrap();
    let renewed = old
        .renew_agent(pb::RenewAgentRequest {
            csr: make_csr(&new_key, &id).unwrap(),
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, id.as_str());

    let jwt_for_db = || pb::MintJwtSvidRequest {
        spiffe_id: "spiffe://example.org/web".into(),
        audience: vec!["db".into()],
        ..Default::default()
    };
    // Until the agent presents the new SVID, the old one still works (the answer may be lost).
    old.mint_jwt_svid(jwt_for_db()).await.unwrap();

    // The new one works, for JWT-SVIDs too.
    let chain = renewed
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let mut new = ca.as_agent(chain, &new_key).await;
    let jwt = new.mint_jwt_svid(jwt_for_db()).await.unwrap().into_inner();
    assert_eq!(jwt.token.split('.').count(), 3);
    assert!(jwt.expires_at > 0);

    // The agent has used its new SVID: the old one is stale now, whatever it asks.
    let err = old.mint_jwt_svid(jwt_for_db()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = old
        .renew_agent(pb::RenewAgentRequest {
            csr: make_csr(&SvidKey::generate().unwrap(), &id).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = new
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            audience: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    ca.stop().await;
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_whole() {
    let ca = Ca::start_with(|c| c.max_batch = 2).await;
    let (chain, key) = ca.attest("n1").await;
    let err = ca
        .as_agent(chain, &key)
        .await
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: (0..3)
                .map(|_| workload_request("spiffe://example.org/web"))
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    ca.stop().await;
}
