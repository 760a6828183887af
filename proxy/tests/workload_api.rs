//! The proxy's identity from the real agent's Workload API: a real CA and agent in-process, the
//! proxy attested by this test process's uid, and the agent restarted under it.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::Duration;

use common::{App, eventually, status};
use hyper_util::rt::TokioIo;
use meshward_agent::config::{AgentConfig, JoinToken};
use meshward_ca::config::CaConfig;
use meshward_identity::TrustDomain;
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::proto::workload::X509svidRequest;
use meshward_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshward_identity::tls::client_config;
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, certs_to_pem};
use meshward_proxy::config::{IdentitySource, InboundListener, Protocol, ProxyConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

const TD: &str = "mesh.test";
const API: &str = "spiffe://mesh.test/ns/shop/sa/api";

async fn unix_channel(path: std::path::PathBuf) -> Channel {
    Endpoint::from_static("http://local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

/// The SVID this process gets from the agent, as a client would fetch it.
async fn fetch(socket: &std::path::Path) -> (Vec<CertificateDer<'static>>, SvidKey, Vec<u8>) {
    let mut client = SpiffeWorkloadApiClient::new(unix_channel(socket.to_owned()).await);
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let message = stream.message().await.unwrap().unwrap();
    let svid = &message.svids[0];
    let mut chain = Vec::new();
    let mut rest = &svid.x509_svid[..];
    while !rest.is_empty() {
        let len = 4 + usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        chain.push(CertificateDer::from(rest[..len].to_vec()));
        rest = &rest[len..];
    }
    (
        chain,
        SvidKey::from_pkcs8_der(&svid.x509_svid_key).unwrap(),
        svid.bundle.clone(),
    )
}

#[tokio::test]
async fn the_proxy_serves_with_the_agents_svid_and_survives_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The CA.
    let mut ca_config = CaConfig::new(
        dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        TD.parse::<TrustDomain>().unwrap(),
    );
    ca_config.drain_grace = Duration::from_millis(200);
    let ca_shutdown = CancellationToken::new();
    let ca = meshward_ca::server::start(ca_config.clone(), ca_shutdown.clone())
        .await
        .unwrap();
    let mut admin = AdminClient::new(unix_channel(ca_config.admin_socket.clone()).await);
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    admin
        .create_entry(pb::CreateEntryRequest {
            spiffe_id: API.into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: format!("uid:{uid}"),
            }],
            node: "node-1".into(),
            any_node: false,
            ttl_seconds: 0,
            hint: String::new(),
        })
        .await
        .unwrap();
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            node: "node-1".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let bundle = admin
        .show_bundle(pb::ShowBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let roots: Vec<CertificateDer<'static>> = bundle
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bootstrap = dir.path().join("bootstrap.pem");
    std::fs::write(&bootstrap, certs_to_pem(&roots)).unwrap();

    // The agent.
    let socket = dir.path().join("agent").join("agent.sock");
    let mut agent_config = AgentConfig::new(
        ca.local_addr.to_string(),
        &bootstrap,
        &socket,
        dir.path().join("agent-data"),
    );
    agent_config.join_token = Some(JoinToken::new(token).unwrap());
    agent_config.sync_interval = Duration::from_millis(300);
    let agent_shutdown = CancellationToken::new();
    let agent = meshward_agent::start(agent_config.clone(), agent_shutdown.clone())
        .await
        .unwrap();

    // The proxy, identity from the Workload API; api may call itself.
    let app = App::start().await;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.cedar"),
        format!(r#"@id("api-self") permit (principal == Workload::"{API}", action, resource);"#),
    )
    .unwrap();
    let mut config = ProxyConfig::new(
        IdentitySource::WorkloadApi(socket.clone()),
        &policies,
        dir.path().join("audit.log"),
    );
    config.inbound.push(InboundListener {
        listen: "127.0.0.1:0".parse().unwrap(),
        app: app.addr,
        protocol: Protocol::Http,
    });
    let shutdown = CancellationToken::new();
    let proxy = meshward_proxy::start(config, shutdown.clone())
        .await
        .unwrap();
    let state = tokio::time::timeout(Duration::from_secs(15), proxy.identity.ready())
        .await
        .expect("the proxy gets an svid from the agent")
        .unwrap();
    assert_eq!(state.id().as_str(), API);
    let first_serial = state.svid().serial().to_owned();

    // A client with an SVID from the same agent calls through the proxy.
    let (chain, key, bundle_der) = fetch(&socket).await;
    let mut bundles = BundleSet::new();
    bundles.insert(TrustBundle::from_der_concat(TD.parse().unwrap(), &bundle_der).unwrap());
    let verifier = PeerVerifier::new(Arc::new(bundles), [TD.parse::<TrustDomain>().unwrap()])
        .with_expected(Expected::Id(API.parse().unwrap()));
    let client = tokio_rustls::TlsConnector::from(Arc::new(
        client_config(chain, key.to_pkcs8_der(), Arc::new(verifier), Vec::new()).unwrap(),
    ));
    let call = || async {
        let tcp = tokio::net::TcpStream::connect(proxy.inbound[0])
            .await
            .unwrap();
        let mut tls = client
            .connect(ServerName::try_from("api").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"GET /hello HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tls.read_to_string(&mut out).await.unwrap();
        out
    };
    let response = call().await;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(app.paths(), ["/hello"]);

    // The agent goes away: the proxy keeps serving with the SVID it holds.
    agent_shutdown.cancel();
    agent.wait().await.unwrap();
    assert_eq!(status(&call().await), 200);

    // The agent comes back (attested already: its data dir holds its SVID); the proxy
    // reconnects and takes the SVID the restarted agent mints.
    let mut again = agent_config.clone();
    again.join_token = None;
    let agent_shutdown = CancellationToken::new();
    let agent = meshward_agent::start(again, agent_shutdown.clone())
        .await
        .unwrap();
    let identity = proxy.identity.clone();
    eventually(
        Duration::from_secs(20),
        "the proxy follows the restarted agent",
        || identity.current().unwrap().svid().serial() != first_serial,
    )
    .await;
    assert_eq!(status(&call().await), 200);

    shutdown.cancel();
    proxy.wait().await.unwrap();
    agent_shutdown.cancel();
    agent.wait().await.unwrap();
    ca_shutdown.cancel();
    ca.wait().await.unwrap();
}
