//! The `Ca` gRPC service in Kubernetes mode, called in-process against the fake API server: how the
//! cluster's verdicts and failures reach agents, that an apiserver failure refuses one call and
//! leaves the CA serving, and that a pod cache not yet synced refuses every mint.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_ca::datastore::Datastore;
use meshward_ca::issuer::{Issuer, IssuerConfig};
use meshward_ca::k8s::{Cluster, PSAT_AUDIENCE, ServiceAccountRef};
use meshward_ca::keystore::Keystore;
use meshward_ca::metrics::CaMetrics;
use meshward_ca::server::tls::{PeerInfo, VerifiedPeer};
use meshward_ca::service::CaService;
use meshward_identity::audit::AuditLog;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_server::Ca;
use meshward_identity::x509::{SvidKey, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_kube_fake::FakeApiServer;
use meshward_kube_fake::fixture::{
    create_namespace, create_pod, create_service_account, delete_pod_now, ensure_node,
    request_pod_token, set_pod_phase, unique_name,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};

const TD: &str = "example.org";

struct Env {
    _dir: tempfile::TempDir,
    fake: FakeApiServer,
    admin: kube::Client,
    service: CaService,
    plain: CaService,
    cluster: Cluster,
    ns: String,
    node_a: String,
    node_b: String,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = TD.parse().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let ks = Keystore::open(
            dir.path(),
            ds.clone(),
            td,
            None,
            Duration::from_secs(30 * 24 * 3600),
            SystemTime::now(),
        )
        .unwrap();
        let audit = Arc::new(AuditLog::open(dir.path().join("audit.jsonl"), "ca-test").unwrap());
        let issuer = Issuer::new(ks.clone(), ds, audit, IssuerConfig::default());
        let fake = FakeApiServer::start().await.unwrap();
        let admin = fake.client().await.unwrap();
        let ns = create_namespace(&admin, "k8s-svc").await.unwrap();
        for sa in ["meshward-agent", "app", "remote"] {
            create_service_account(&admin, &ns, sa).await.unwrap();
        }
        let node_a = unique_name("node-a");
        let node_b = unique_name("node-b");
        ensure_node(&admin, &node_a).await.unwrap();
        ensure_node(&admin, &node_b).await.unwrap();
        let ca_client =
            kube::Client::try_from(fake.config_for_token(fake.ca_token()).await.unwrap()).unwrap();
        let agent_sa: ServiceAccountRef = format!("{ns}:meshward-agent").parse().unwrap();
        let cluster = Cluster::new(ca_client, "c1", agent_sa).unwrap();
        let plain = CaService::new(issuer, ks, CaMetrics::new(), 100, CancellationToken::new());
        Self {
            _dir: dir,
            fake,
            admin,
            service: plain.clone().with_cluster(cluster.clone()),
            plain,
            cluster,
            ns,
            node_a,
            node_b,
        }
    }

    async fn token(&self, pod: &str, sa: &str, node: &str) -> String {
        let pod = create_pod(&self.admin, &self.ns, pod, sa, node, &[])
            .await
            .unwrap();
        request_pod_token(&self.admin, &pod, sa, &[PSAT_AUDIENCE], 600)
            .await
            .unwrap()
    }

    async fn running(&self, pod: &str, sa: &str, node: &str) {
        create_pod(&self.admin, &self.ns, pod, sa, node, &[])
            .await
            .unwrap();
        set_pod_phase(&self.admin, &self.ns, pod, "Running")
            .await
            .unwrap();
    }

    fn workload(&self, sa: &str) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{sa}", self.ns)
    }
}

fn attest_request(token: &str, id: &str) -> Request<pb::AttestRequest> {
    let csr = make_csr(&SvidKey::generate().unwrap(), &SpiffeId::parse(id).unwrap()).unwrap();
    Request::new(pb::AttestRequest {
        attestation: Some(pb::attest_request::Attestation::K8sPsat(
            pb::K8sPsatAttestation {
                token: token.to_owned(),
            },
        )),
        csr,
    })
}

fn as_agent<T>(message: T, svid: &pb::X509Svid) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(PeerInfo {
        remote: "127.0.0.1:1".parse().unwrap(),
        peer: Some(VerifiedPeer {
            spiffe_id: svid.spiffe_id.parse().unwrap(),
            serial: svid.serial.clone(),
        }),
    });
    request
}

fn mint_request(id: &str) -> pb::MintX509SvidsRequest {
    let csr = make_csr(&SvidKey::generate().unwrap(), &SpiffeId::parse(id).unwrap()).unwrap();
    pb::MintX509SvidsRequest {
        requests: vec![pb::SvidRequest {
            spiffe_id: id.to_owned(),
            csr,
            ttl_seconds: 0,
            pod_uid: String::new(),
        }],
    }
}

fn only_result(response: pb::MintX509SvidsResponse) -> pb::svid_result::Result {
    let [result] = <[pb::SvidResult; 1]>::try_from(response.results).unwrap();
    result.result.unwrap()
}

#[tokio::test]
async fn psat_attestation_over_the_service_fails_closed_and_keeps_serving() {
    let env = Env::new().await;
    let token = env.token("agent", "meshward-agent", &env.node_a).await;
    let agent_id = format!("spiffe://{TD}/meshward/agent/k8s_psat/c1/{}", env.node_a);

    // A CA without `--k8s` says so.
    let err = env
        .plain
        .attest(attest_request(&token, &agent_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The apiserver fails: refused as unavailable (retry), nothing issued.
    env.fake.fail_next_matching(1, 500, "tokenreviews");
    let err = env
        .service
        .attest(attest_request(&token, &agent_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The CA keeps serving: the same token attests now.
    let response = env
        .service
        .attest(attest_request(&token, &agent_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.svid.unwrap().spiffe_id, agent_id);
    assert!(response.bundle.is_some());

    // A workload's token is a cluster verdict: permission denied.
    let app_token = env.token("app-0", "app", &env.node_a).await;
    let err = env
        .service
        .attest(attest_request(&app_token, &agent_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn minting_over_the_service_follows_the_pods_on_the_agents_node() {
    let env = Env::new().await;
    let token = env.token("agent", "meshward-agent", &env.node_a).await;
    let agent_id = format!("spiffe://{TD}/meshward/agent/k8s_psat/c1/{}", env.node_a);
    let agent = env
        .service
        .attest(attest_request(&token, &agent_id))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();

    env.running("web", "app", &env.node_a).await;
    env.running("far", "remote", &env.node_b).await;
    let mint = |sa: &str| {
        env.service
            .mint_x509_svids(as_agent(mint_request(&env.workload(sa)), &agent))
    };
    match only_result(mint("app").await.unwrap().into_inner()) {
        pb::svid_result::Result::Svid(svid) => assert_eq!(svid.spiffe_id, env.workload("app")),
        other => panic!("expected an svid, got {other:?}"),
    }
    // The forged request: a pod of that service account runs, but on node-b.
    match only_result(mint("remote").await.unwrap().into_inner()) {
        pb::svid_result::Result::Error(e) => assert_eq!(e.code, "not_entitled"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Deleted: no more, once the CA's pod watch has delivered the delete.
    delete_pod_now(&env.admin, &env.ns, "web").await.unwrap();
    let app_id = SpiffeId::parse(&env.workload("app")).unwrap();
    for _ in 0..600 {
        let pods = env.cluster.node_pods(&env.node_a).await.unwrap();
        if !pods.entitles(&app_id, None) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match only_result(mint("app").await.unwrap().into_inner()) {
        pb::svid_result::Result::Error(e) => assert_eq!(e.code, "not_entitled"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // JWT-SVIDs follow the same pods.
    env.running("web2", "app", &env.node_a).await;
    let jwt = env
        .service
        .mint_jwt_svid(as_agent(
            pb::MintJwtSvidRequest {
                spiffe_id: env.workload("app"),
                audience: vec!["shop".into()],
                ttl_seconds: 0,
                pod_uid: String::new(),
            },
            &agent,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!jwt.token.is_empty());
    let err = env
        .service
        .mint_jwt_svid(as_agent(
            pb::MintJwtSvidRequest {
                spiffe_id: env.workload("remote"),
                audience: vec!["shop".into()],
                ttl_seconds: 0,
                pod_uid: String::new(),
            },
            &agent,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn minting_before_the_pod_cache_has_synced_is_unavailable_and_issues_nothing() {
    let env = Env::new().await;
    let token = env.token("agent", "meshward-agent", &env.node_a).await;
    let agent_id = format!("spiffe://{TD}/meshward/agent/k8s_psat/c1/{}", env.node_a);
    let agent = env
        .service
        .attest(attest_request(&token, &agent_id))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    env.running("web", "app", &env.node_a).await;
    // The CA can never list the cluster's pods: its cache never syncs.
    env.fake.fail_next_matching(100_000, 500, "/api/v1/pods");
    let err = env
        .service
        .mint_x509_svids(as_agent(mint_request(&env.workload("app")), &agent))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("not yet synced"), "{err:?}");
    let err = env
        .service
        .mint_jwt_svid(as_agent(
            pb::MintJwtSvidRequest {
                spiffe_id: env.workload("app"),
                audience: vec!["shop".into()],
                ttl_seconds: 0,
                pod_uid: String::new(),
            },
            &agent,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!env.cluster.pods_synced());
}

/// `meshward ca run --k8s --kubeconfig F --namespace NS`: the server connects with the kubeconfig and
/// publishes its bundle to the ConfigMap of its namespace.
#[tokio::test]
async fn a_k8s_mode_ca_starts_from_a_kubeconfig_and_publishes_its_bundle() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;
    use meshward_ca::config::CaConfig;
    use meshward_ca::k8s::{BUNDLE_CONFIGMAP, BUNDLE_PEM_KEY, K8sConfig};

    let fake = FakeApiServer::start().await.unwrap();
    let admin = fake.client().await.unwrap();
    let ns = create_namespace(&admin, "ca-run").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(
        dir.path().join("data"),
        "127.0.0.1:0".parse().unwrap(),
        TD.parse().unwrap(),
    );
    config.drain_grace = Duration::from_secs(2);
    let mut k8s = K8sConfig::new(Some(fake.kubeconfig_ca_path().to_owned())).unwrap();
    k8s.namespace.clone_from(&ns);
    config.k8s = Some(k8s);
    let shutdown = CancellationToken::new();
    let running = meshward_ca::server::start(config, shutdown.clone())
        .await
        .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(admin, &ns);
    let mut published = None;
    for _ in 0..100 {
        if let Some(map) = maps.get_opt(BUNDLE_CONFIGMAP).await.unwrap() {
            published = map.data.and_then(|d| d.get(BUNDLE_PEM_KEY).cloned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        published.is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")),
        "the bundle configmap was published"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_k8s_mode_ca_without_a_usable_kubeconfig_does_not_start() {
    use meshward_ca::config::CaConfig;
    use meshward_ca::k8s::{K8sConfig, K8sError};
    use meshward_ca::server::ServeError;

    let dir = tempfile::tempdir().unwrap();
    let mut config = CaConfig::new(
        dir.path().join("data"),
        "127.0.0.1:0".parse().unwrap(),
        TD.parse().unwrap(),
    );
    config.k8s = Some(K8sConfig::new(Some(dir.path().join("missing-kubeconfig"))).unwrap());
    let err = meshward_ca::server::start(config, CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ServeError::K8s(K8sError::Connect { .. })),
        "{err:?}"
    );
}
