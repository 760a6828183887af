//! Kubernetes mode with several CA replicas, each with its own data dir, started in-process with
//! `server::start` against one apiserver (the fake and the real kube-apiserver): the keys Secret is
//! their one authority, and root rotation on one replica (holding the rotation Lease) reaches the
//! others.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use meshward_ca::config::CaConfig;
use meshward_ca::k8s::{
    BUNDLE_CONFIGMAP, BUNDLE_PEM_KEY, Cluster, K8sConfig, KEYS_SECRET, ServiceAccountRef,
};
use meshward_ca::keystore::{INDEX_KEY, KeystoreError};
use meshward_ca::server::{RunningCa, ServeError, start};
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::proto::ca::ca_client::CaClient;
use meshward_identity::tls::{PROTOCOL_VERSIONS, client_config, provider};
use meshward_identity::verify::{Expected, PeerRole, PeerVerifier};
use meshward_identity::x509::{SvidKey, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_kube_fake::FakeApiServer;
use meshward_kube_fake::fixture::create_namespace;
use meshward_kube_fake::real::{RealApiServer, SKIP_MESSAGE};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use support::tls_channel;

const TD: &str = "example.org";

/// One apiserver for a test: where the CA's kubeconfig is, and an admin client.
struct Apiserver {
    kubeconfig: PathBuf,
    admin: kube::Client,
    ns: String,
}

impl Apiserver {
    async fn fake(fake: &FakeApiServer) -> Self {
        let admin = fake.client().await.unwrap();
        let ns = create_namespace(&admin, "ca-repl").await.unwrap();
        Self {
            kubeconfig: fake.kubeconfig_ca_path().to_path_buf(),
            admin,
            ns,
        }
    }

    async fn real() -> Option<Self> {
        let Some(real) = RealApiServer::shared().unwrap() else {
            eprintln!("{SKIP_MESSAGE}");
            return None;
        };
        let admin = real.client().await.unwrap();
        let ns = create_namespace(&admin, "ca-repl").await.unwrap();
        Some(Self {
            kubeconfig: real.kubeconfig_ca_path(),
            admin,
            ns,
        })
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    async fn secret(&self) -> Secret {
        self.secrets().get(KEYS_SECRET).await.unwrap()
    }

    /// The Secret's `authorities.json`: id -> state.
    async fn states(&self) -> BTreeMap<String, String> {
        let secret = self.secret().await;
        let index: serde_json::Value =
            serde_json::from_slice(&secret.data.unwrap()[INDEX_KEY].0).unwrap();
        index["authorities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap().to_owned(),
                    a["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// A replica with a fresh data dir.
    async fn replica(&self) -> Replica {
        Replica::start(self, tempfile::tempdir().unwrap())
            .await
            .unwrap()
    }

    /// What a replica with a fresh data dir says when it starts.
    async fn replica_start(&self) -> Result<Replica, ServeError> {
        Replica::start(self, tempfile::tempdir().unwrap()).await
    }

    /// A second "replica" holding the rotation Lease, as one does in the middle of a rotation.
    async fn cluster(&self) -> Cluster {
        let sa: ServiceAccountRef = format!("{}:meshward-agent", self.ns).parse().unwrap();
        Cluster::new(self.admin.clone(), "c1", sa).unwrap()
    }
}

struct Replica {
    dir: tempfile::TempDir,
    running: Option<RunningCa>,
    shutdown: CancellationToken,
    addr: std::net::SocketAddr,
    admin_socket: PathBuf,
}

impl Replica {
    async fn start(api: &Apiserver, dir: tempfile::TempDir) -> Result<Self, ServeError> {
        let td: TrustDomain = TD.parse().unwrap();
        let mut config = CaConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap(), td);
        config.drain_grace = Duration::from_secs(2);
        config.reload_interval = Duration::from_millis(200);
        let mut k8s = K8sConfig::new(Some(api.kubeconfig.clone())).unwrap();
        k8s.namespace = api.ns.clone();
        k8s.cluster = "c1".to_owned();
        k8s.agent_sa = format!("{}:meshward-agent", api.ns).parse().unwrap();
        config.k8s = Some(k8s);
        let shutdown = CancellationToken::new();
        let running = start(config, shutdown.clone()).await?;
        Ok(Self {
            addr: running.local_addr,
            admin_socket: running.admin_socket.clone(),
            running: Some(running),
            shutdown,
            dir,
        })
    }

    fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("keys")
    }

    async fn admin(&self) -> AdminClient<Channel> {
        meshward_ca::admin::connect(&self.admin_socket)
            .await
            .unwrap()
    }

    async fn bundle(&self) -> TrustBundle {
        support::admin_bundle(&self.admin_socket).await
    }

    /// id -> state, as this replica's admin API lists them.
    async fn authorities(&self) -> BTreeMap<String, String> {
        self.admin()
            .await
            .list_authorities(pb::ListAuthoritiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .authorities
            .into_iter()
            .filter(|a| a.state != "retired")
            .map(|a| (a.id, a.state))
            .collect()
    }

    /// Waits (bounded) until this replica's bundle has `n` roots.
    async fn wait_for_roots(&self, n: usize) -> TrustBundle {
        for _ in 0..150 {
            let bundle = self.bundle().await;
            if bundle.len() == n {
                return bundle;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("replica never showed `{n}` roots");
    }

    /// Attests an agent with a join token made on this replica; returns its SVID chain.
    async fn attest(&self, node: &str) -> Vec<CertificateDer<'static>> {
        self.attest_with_key(node).await.0
    }

    /// An attested agent's client of this replica.
    async fn agent(&self, node: &str) -> CaClient<Channel> {
        let (chain, key) = self.attest_with_key(node).await;
        let config = client_config(
            chain,
            key.to_pkcs8_der(),
            verifier(self.bundle().await, "meshward/ca"),
            vec![b"h2".to_vec()],
        )
        .unwrap();
        CaClient::new(tls_channel(self.addr, config).await)
    }

    async fn attest_with_key(&self, node: &str) -> (Vec<CertificateDer<'static>>, SvidKey) {
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
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier(self.bundle().await, "meshward/ca"))
            .with_no_client_auth();
        let mut client = CaClient::new(tls_channel(self.addr, config).await);
        let response = client
            .attest(pb::AttestRequest {
                attestation: Some(pb::attest_request::Attestation::JoinToken(
                    pb::JoinTokenAttestation { token },
                )),
                csr: make_csr(&key, &id).unwrap(),
            })
            .await
            .unwrap()
            .into_inner();
        let chain = response
            .svid
            .unwrap()
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        (chain, key)
    }

    async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        let running = self.running.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .expect("the ca drains within its grace period")
            .unwrap();
        self.dir
    }
}

fn verifier(bundle: TrustBundle, path: &str) -> Arc<PeerVerifier> {
    let mut set = BundleSet::new();
    set.insert(bundle);
    let id = SpiffeId::parse(&format!("spiffe://{TD}/{path}")).unwrap();
    Arc::new(
        PeerVerifier::new(Arc::new(set), [TD.parse().unwrap()]).with_expected(Expected::Id(id)),
    )
}

/// Whether `chain` (an agent SVID) verifies against `bundle`.
fn chains_to(chain: &[CertificateDer<'static>], bundle: &TrustBundle, node: &str) -> bool {
    let v = verifier(bundle.clone(), &format!("meshward/agent/join/{node}"));
    v.verify(&chain[0], &chain[1..], PeerRole::Client, UnixTime::now())
        .is_ok()
}

/// The key files in a data dir's key dir, by name.
fn key_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

// --- two replicas, one authority ------------------------------------------------------------------

async fn replicas_share_one_authority(api: Apiserver) {
    let (a, b) = tokio::join!(api.replica(), api.replica());
    let states = api.states().await;
    assert_eq!(states.len(), 1, "one authority in the secret: {states:?}");
    let (id, state) = states.iter().next().unwrap();
    assert_eq!(state, "active");
    let expected_keys = vec![format!("{id}.jwt.key"), format!("{id}.key")];
    // Both replicas use the secret's authority and nothing else: the loser's root never existed.
    for replica in [&a, &b] {
        assert_eq!(key_files(&replica.keys_dir()), expected_keys);
        let listed = replica.authorities().await;
        assert_eq!(listed.keys().collect::<Vec<_>>(), vec![id]);
    }
    let (bundle_a, bundle_b) = (a.bundle().await, b.bundle().await);
    assert_eq!(bundle_a.authorities(), bundle_b.authorities());
    assert_eq!(bundle_a.len(), 1);
    // SVIDs from either replica chain to the other's root.
    let from_a = a.attest("node-a").await;
    let from_b = b.attest("node-b").await;
    assert!(chains_to(&from_a, &bundle_b, "node-a"));
    assert!(chains_to(&from_b, &bundle_a, "node-b"));

    // A replica restarted with an empty data dir signs with the secret's key.
    drop(a.stop().await);
    let a2 = api.replica().await;
    assert_eq!(key_files(&a2.keys_dir()), expected_keys);
    assert_eq!(a2.bundle().await.authorities(), bundle_b.authorities());
    let again = a2.attest("node-a2").await;
    assert!(chains_to(&again, &bundle_b, "node-a2"));
    assert_eq!(api.states().await, states, "nothing new in the secret");
    a2.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn fake_replicas_share_one_authority() {
    let fake = FakeApiServer::start().await.unwrap();
    let api = Apiserver::fake(&fake).await;
    // Every answer waits: both replicas read "absent" before either creates the secret.
    fake.delay(Duration::from_millis(50));
    replicas_share_one_authority(api).await;
    let creates = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/secrets"))
        .count();
    assert_eq!(
        creates, 2,
        "both replicas tried to create: the race really happened"
    );
}

#[tokio::test]
async fn real_replicas_share_one_authority() {
    let Some(api) = Apiserver::real().await else {
        return;
    };
    replicas_share_one_authority(api).await;
}

// --- rotation across replicas ---------------------------------------------------------------------

async fn rotation_reaches_every_replica(api: Apiserver) {
    let a = api.replica().await;
    let b = api.replica().await;
    let first = api.states().await;
    let first_id = first.keys().next().unwrap().clone();
    // b signs with the first root (its agent's SVID): activation records that in the secret.
    let mut agent_b = b.agent("node-b").await;
    let mut stream = agent_b
        .watch_bundle(pb::WatchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let current = stream.message().await.unwrap().unwrap();
    assert_eq!(current.x509_authorities.len(), 1);

    let prepared = a
        .admin()
        .await
        .prepare_root(pb::RotateRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prepared.state, "prepared");
    let bundle_b = b.wait_for_roots(2).await;
    assert!(bundle_b.contains(&CertificateDer::from(prepared.certificate.clone())));
    // b's agents hear of it on their WatchBundle stream.
    let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("b's bundle stream follows a's prepare")
        .unwrap()
        .unwrap();
    assert!(next.sequence > current.sequence);
    assert_eq!(next.x509_authorities.len(), 2);
    assert!(next.x509_authorities.contains(&prepared.certificate));
    // The bundle ConfigMap follows too.
    let maps: Api<ConfigMap> = Api::namespaced(api.admin.clone(), &api.ns);
    let mut published = false;
    for _ in 0..150 {
        if let Some(map) = maps.get_opt(BUNDLE_CONFIGMAP).await.unwrap()
            && map.data.unwrap_or_default().get(BUNDLE_PEM_KEY) == Some(&bundle_b.to_pem())
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "the bundle configmap shows both roots");

    // While another replica holds the rotation lease, b refuses and the secret stays as it is.
    let holder = api.cluster().await;
    assert!(
        holder
            .acquire_rotation_lease(
                &api.ns,
                "replica-x-rotating",
                Duration::from_secs(60),
                SystemTime::now()
            )
            .await
            .unwrap()
    );
    let before = api.secret().await.metadata.resource_version;
    let refused = b
        .admin()
        .await
        .activate_root(pb::RotateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("`replica-x-rotating`")
            && refused.message().contains("rotation lease")
            && refused.message().contains("run the command again"),
        "{}",
        refused.message()
    );
    assert_eq!(api.secret().await.metadata.resource_version, before);
    holder
        .release_rotation_lease(&api.ns, "replica-x-rotating")
        .await
        .unwrap();

    // Activate on b; a follows.
    let activated = b
        .admin()
        .await
        .activate_root(pb::RotateRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.id, prepared.id);
    let mut followed = false;
    for _ in 0..150 {
        let listed = a.authorities().await;
        if listed.get(&prepared.id).map(String::as_str) == Some("active")
            && listed.get(&first_id).map(String::as_str) == Some("old")
        {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(followed, "replica a sees the new root active");
    let from_a = a.attest("node-a").await;
    let new_root = TrustBundle::new(TD.parse().unwrap());
    let mut only_new = new_root;
    only_new
        .add_authority(CertificateDer::from(prepared.certificate.clone()))
        .unwrap();
    assert!(
        chains_to(&from_a, &only_new, "node-a"),
        "a signs with the new root"
    );

    // Retiring on a is refused: b's agent svid of the old root is still valid (b recorded it).
    let refused = a
        .admin()
        .await
        .retire_root(pb::RotateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(&first_id),
        "{}",
        refused.message()
    );
    assert_eq!(api.states().await[&first_id], "old");

    let retired = a
        .admin()
        .await
        .retire_root(pb::RotateRequest { danger_force: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.id, first_id);
    let bundle_b = b.wait_for_roots(1).await;
    assert!(bundle_b.contains(&CertificateDer::from(prepared.certificate.clone())));
    let secret = api.secret().await.data.unwrap();
    assert!(
        !secret.contains_key(&format!("{first_id}.key")),
        "the retired key left the secret"
    );
    for replica in [&a, &b] {
        let mut wanted = false;
        for _ in 0..150 {
            if !key_files(&replica.keys_dir()).contains(&format!("{first_id}.key")) {
                wanted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(wanted, "the retired key left every data dir");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn fake_rotation_reaches_every_replica() {
    let fake = FakeApiServer::start().await.unwrap();
    rotation_reaches_every_replica(Apiserver::fake(&fake).await).await;
}

#[tokio::test]
async fn real_rotation_reaches_every_replica() {
    let Some(api) = Apiserver::real().await else {
        return;
    };
    rotation_reaches_every_replica(api).await;
}

// --- an unusable secret -----------------------------------------------------------------------------

async fn put_secret(api: &Apiserver, data: BTreeMap<String, Vec<u8>>) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEYS_SECRET.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    };
    match api.secrets().get_opt(KEYS_SECRET).await.unwrap() {
        Some(current) => {
            let secret = Secret {
                metadata: ObjectMeta {
                    resource_version: current.metadata.resource_version,
                    ..secret.metadata
                },
                ..secret
            };
            api.secrets()
                .replace(KEYS_SECRET, &PostParams::default(), &secret)
                .await
                .unwrap();
        }
        None => {
            api.secrets()
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
        }
    }
}

fn assert_bad_secret(result: Result<Replica, ServeError>, api: &Apiserver, what: &str) {
    let err = match result {
        Ok(_) => panic!("a replica started on an unusable secret"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            ServeError::Keystore(KeystoreError::BadKeySecret { .. })
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("`{}/{KEYS_SECRET}`", api.ns))
            && message.contains(what)
            && message.contains("restore it from a backup"),
        "{message}"
    );
}

async fn an_unusable_secret_stops_the_start(api: Apiserver) {
    put_secret(
        &api,
        BTreeMap::from([(INDEX_KEY.to_owned(), b"garbage".to_vec())]),
    )
    .await;
    let before = api.secret().await.metadata.resource_version;
    assert_bad_secret(api.replica_start().await, &api, "does not parse");
    assert_eq!(
        api.secret().await.metadata.resource_version,
        before,
        "the secret was left alone"
    );

    // A good secret made by a replica, then its key file removed.
    api.secrets()
        .delete(KEYS_SECRET, &Default::default())
        .await
        .unwrap();
    let good = api.replica().await;
    good.stop().await;
    let mut data: BTreeMap<String, Vec<u8>> = api
        .secret()
        .await
        .data
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let id = api.states().await.keys().next().unwrap().clone();
    data.remove(&format!("{id}.key"));
    put_secret(&api, data).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("data").join("keys");
    assert_bad_secret(
        Replica::start(&api, dir).await,
        &api,
        &format!("`{id}.key` is missing"),
    );
    assert!(
        !keys.exists() || key_files(&keys).is_empty(),
        "no key was materialized"
    );

    // An empty Secret (made by hand, say) is filled with a first root, not refused.
    put_secret(&api, BTreeMap::new()).await;
    let filled = api.replica().await;
    let states = api.states().await;
    assert_eq!(states.values().collect::<Vec<_>>(), vec!["active"]);
    assert_eq!(filled.authorities().await, states);
    filled.stop().await;
}

#[tokio::test]
async fn fake_an_unusable_secret_stops_the_start() {
    let fake = FakeApiServer::start().await.unwrap();
    an_unusable_secret_stops_the_start(Apiserver::fake(&fake).await).await;
}

#[tokio::test]
async fn real_an_unusable_secret_stops_the_start() {
    let Some(api) = Apiserver::real().await else {
        return;
    };
    an_unusable_secret_stops_the_start(api).await;
}
