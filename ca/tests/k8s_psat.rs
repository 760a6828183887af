//! Kubernetes mode against the in-process fake API server AND the real kube-apiserver (same test
//! bodies; the real one is skipped with a message when its binary is not cached): PSAT node
//! attestation through TokenReview and the token's pod, and node-scoped issuance from running pods.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use meshward_ca::datastore::Datastore;
use meshward_ca::issuer::{AgentIdentity, IssueError, Issuer, IssuerConfig, SvidRequest};
use meshward_ca::k8s::{Cluster, K8sError, PSAT_AUDIENCE, ServiceAccountRef};
use meshward_ca::keystore::Keystore;
use meshward_identity::audit::AuditLog;
use meshward_identity::x509::{SvidKey, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_kube_fake::FakeApiServer;
use meshward_kube_fake::fixture::{
    create_namespace, create_pod, create_service_account, delete_pod_now, ensure_node,
    request_pod_token, review_token, set_pod_phase, unique_name,
};
use meshward_kube_fake::real::{RealApiServer, SKIP_MESSAGE};

const TD: &str = "example.org";
const CLUSTER: &str = "test-cluster";
const AGENT_SA: &str = "meshward-agent";

/// The issuer side of a CA, in a temp dir.
struct Ca {
    _dir: tempfile::TempDir,
    issuer: Issuer,
}

impl Ca {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let td: TrustDomain = TD.parse().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let ks = Keystore::open(
            dir.path(),
            ds.clone(),
            td,
            None,
            Duration::from_secs(30 * 24 * 3600),
            now,
        )
        .unwrap();
        let audit = Arc::new(AuditLog::open(dir.path().join("audit.jsonl"), "ca-test").unwrap());
        let issuer = Issuer::new(ks, ds, audit, IssuerConfig::default());
        Self { _dir: dir, issuer }
    }
}

fn csr_for(id: &str) -> Vec<u8> {
    make_csr(&SvidKey::generate().unwrap(), &SpiffeId::parse(id).unwrap()).unwrap()
}

fn request(id: &str, pod_uid: Option<&str>) -> SvidRequest {
    SvidRequest {
        spiffe_id: id.to_owned(),
        csr: csr_for(id),
        ttl: None,
        pod_uid: pod_uid.map(str::to_owned),
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

/// A namespace with the agent's and two workloads' service accounts, two fresh nodes, and the CA's
/// view of the cluster (through the least-privilege `meshward-ca` identity).
struct World {
    admin: kube::Client,
    cluster: Cluster,
    ns: String,
    node_a: String,
    node_b: String,
}

impl World {
    async fn new(admin: kube::Client, ca_config: kube::Config) -> Self {
        let ns = create_namespace(&admin, "k8s-psat").await.unwrap();
        for sa in [AGENT_SA, "app", "remote", "idle"] {
            create_service_account(&admin, &ns, sa).await.unwrap();
        }
        let node_a = unique_name("node-a");
        let node_b = unique_name("node-b");
        ensure_node(&admin, &node_a).await.unwrap();
        ensure_node(&admin, &node_b).await.unwrap();
        let agent_sa: ServiceAccountRef = format!("{ns}:{AGENT_SA}").parse().unwrap();
        let cluster = Cluster::new(
            kube::Client::try_from(ca_config).unwrap(),
            CLUSTER,
            agent_sa,
        )
        .unwrap();
        Self {
            admin,
            cluster,
            ns,
            node_a,
            node_b,
        }
    }

    /// An agent pod on `node` and its pod-bound token for `audience`.
    async fn agent_pod(&self, name: &str, node: &str, audience: &str) -> (Pod, String) {
        let pod = create_pod(&self.admin, &self.ns, name, AGENT_SA, node, &[])
            .await
            .unwrap();
        let token = request_pod_token(&self.admin, &pod, AGENT_SA, &[audience], 600)
            .await
            .unwrap();
        (pod, token)
    }

    async fn running_pod(&self, name: &str, sa: &str, node: &str) -> Pod {
        create_pod(&self.admin, &self.ns, name, sa, node, &[("app", name)])
            .await
            .unwrap();
        set_pod_phase(&self.admin, &self.ns, name, "Running")
            .await
            .unwrap()
    }

    fn workload(&self, sa: &str) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{sa}", self.ns)
    }

    /// Attests the agent token through the cluster and the issuer; the agent as later calls see it.
    async fn attest(&self, ca: &Ca, token: &str) -> Result<AgentIdentity, K8sError> {
        let attested = self.cluster.attest_psat(token).await?;
        let id = format!(
            "spiffe://{TD}/meshward/agent/k8s_psat/{CLUSTER}/{}",
            attested.node
        );
        let svid = ca
            .issuer
            .attest_k8s_psat(
                self.cluster.name(),
                &attested.node,
                &csr_for(&id),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(svid.spiffe_id.as_str(), id);
        Ok(ca
            .issuer
            .authorize_agent(&svid.spiffe_id, &svid.serial, SystemTime::now())
            .unwrap())
    }

    async fn mint(
        &self,
        ca: &Ca,
        agent: &AgentIdentity,
        sa: &str,
        pod_uid: Option<&str>,
    ) -> Result<SpiffeId, IssueError> {
        // As the service does: the pod cache, and one live lookup for a pod it has not seen.
        let id = self.workload(sa);
        let pods = self
            .cluster
            .node_pods_for(&agent.node, [(id.as_str(), pod_uid)])
            .await
            .unwrap();
        let mut results = ca.issuer.mint_x509_with_pods(
            agent,
            &[request(&id, pod_uid)],
            Some(&pods),
            SystemTime::now(),
        );
        results.pop().unwrap().map(|svid| svid.spiffe_id)
    }
}

/// Attestation: the good token, the wrong audience, the wrong service account, a recreated pod.
async fn attestation_rules(world: &World, exact_uid_mismatch: bool) {
    let ca = Ca::new();
    let (_pod, token) = world.agent_pod("agent", &world.node_a, PSAT_AUDIENCE).await;
    let agent = world.attest(&ca, &token).await.unwrap();
    assert_eq!(agent.node, world.node_a);
    assert_eq!(
        agent.spiffe_id.as_str(),
        format!(
            "spiffe://{TD}/meshward/agent/k8s_psat/{CLUSTER}/{}",
            world.node_a
        )
    );

    // A token for another audience.
    let (_pod, other) = world
        .agent_pod("agent-aud", &world.node_a, "other-audience")
        .await;
    let err = world.attest(&ca, &other).await.unwrap_err();
    assert!(matches!(err, K8sError::TokenRejected(_)), "{err:?}");

    // A valid meshward-ca token of a workload's service account.
    let app = create_pod(&world.admin, &world.ns, "app-0", "app", &world.node_a, &[])
        .await
        .unwrap();
    let app_token = request_pod_token(&world.admin, &app, "app", &[PSAT_AUDIENCE], 600)
        .await
        .unwrap();
    let err = world.attest(&ca, &app_token).await.unwrap_err();
    assert!(
        matches!(&err, K8sError::WrongServiceAccount { username, .. }
            if *username == format!("system:serviceaccount:{}:app", world.ns)),
        "{err:?}"
    );

    // The token's pod deleted and a new one created under the same name: review it first so the
    // apiserver's positive cache answers "valid"; the pod check must still catch it.
    let (old, token) = world
        .agent_pod("agent-re", &world.node_a, PSAT_AUDIENCE)
        .await;
    let review = review_token(&world.admin, &token, &[PSAT_AUDIENCE])
        .await
        .unwrap();
    assert_eq!(review.authenticated, Some(true));
    delete_pod_now(&world.admin, &world.ns, "agent-re")
        .await
        .unwrap();
    let new = create_pod(
        &world.admin,
        &world.ns,
        "agent-re",
        AGENT_SA,
        &world.node_b,
        &[],
    )
    .await
    .unwrap();
    assert_ne!(uid(&old), uid(&new));
    let err = world.attest(&ca, &token).await.unwrap_err();
    if exact_uid_mismatch {
        assert!(
            matches!(&err, K8sError::PodUidMismatch { token, actual, .. }
                if *token == uid(&old) && *actual == uid(&new)),
            "{err:?}"
        );
    } else {
        // The real server's cache may have expired: then it refuses the token itself.
        assert!(
            matches!(
                err,
                K8sError::PodUidMismatch { .. } | K8sError::TokenRejected(_)
            ),
            "{err:?}"
        );
    }
}

/// Issuance: a running pod's identity on its node only, with its own pod UID, and only while it runs.
async fn issuance_rules(world: &World) {
    let ca = Ca::new();
    let (_pod, token) = world
        .agent_pod("agent-i", &world.node_a, PSAT_AUDIENCE)
        .await;
    let agent = world.attest(&ca, &token).await.unwrap();

    let web = world.running_pod("web", "app", &world.node_a).await;
    let id = world.mint(&ca, &agent, "app", None).await.unwrap();
    assert_eq!(id.as_str(), world.workload("app"));
    world
        .mint(&ca, &agent, "app", Some(&uid(&web)))
        .await
        .unwrap();
    // The request names another pod than the one running with that service account.
    let err = world
        .mint(
            &ca,
            &agent,
            "app",
            Some("00000000-0000-0000-0000-000000000000"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, IssueError::NotEntitled { .. }), "{err:?}");

    // Created but never running: not enough.
    create_pod(&world.admin, &world.ns, "idle", "idle", &world.node_a, &[])
        .await
        .unwrap();
    let err = world.mint(&ca, &agent, "idle", None).await.unwrap_err();
    assert!(matches!(err, IssueError::NotEntitled { .. }), "{err:?}");

    // A pod running on ANOTHER node: a forged request from node-a's agent.
    world.running_pod("far", "remote", &world.node_b).await;
    let err = world.mint(&ca, &agent, "remote", None).await.unwrap_err();
    assert!(
        matches!(&err, IssueError::NotEntitled { node, .. } if *node == world.node_a),
        "{err:?}"
    );

    // Pods listed for another node entitle nothing for this agent.
    let far_pods = world.cluster.node_pods(&world.node_b).await.unwrap();
    let results = ca.issuer.mint_x509_with_pods(
        &agent,
        &[request(&world.workload("remote"), None)],
        Some(&far_pods),
        SystemTime::now(),
    );
    assert!(matches!(results[0], Err(IssueError::NotEntitled { .. })));

    // The pod is deleted: its identity stops being issued once the CA's pod watch delivers it.
    delete_pod_now(&world.admin, &world.ns, "web")
        .await
        .unwrap();
    let app = SpiffeId::parse(&world.workload("app")).unwrap();
    for _ in 0..600 {
        let pods = world.cluster.node_pods(&world.node_a).await.unwrap();
        if !pods.entitles(&app, None) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = world.mint(&ca, &agent, "app", None).await.unwrap_err();
    assert!(matches!(err, IssueError::NotEntitled { .. }), "{err:?}");
}

async fn fake_world(fake: &FakeApiServer) -> World {
    World::new(
        fake.client().await.unwrap(),
        fake.config_for_token(fake.ca_token()).await.unwrap(),
    )
    .await
}

async fn real_world() -> Option<World> {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return None;
    };
    Some(
        World::new(
            real.client().await.unwrap(),
            real.ca_config().await.unwrap(),
        )
        .await,
    )
}

#[tokio::test]
async fn fake_attestation_rules() {
    let fake = FakeApiServer::start().await.unwrap();
    attestation_rules(&fake_world(&fake).await, true).await;
}

#[tokio::test]
async fn real_attestation_rules() {
    if let Some(world) = real_world().await {
        attestation_rules(&world, false).await;
    }
}

#[tokio::test]
async fn fake_issuance_rules() {
    let fake = FakeApiServer::start().await.unwrap();
    issuance_rules(&fake_world(&fake).await).await;
}

#[tokio::test]
async fn real_issuance_rules() {
    if let Some(world) = real_world().await {
        issuance_rules(&world).await;
    }
}

#[tokio::test]
async fn newer_node_extras_are_honoured() {
    let fake = FakeApiServer::builder()
        .with_node_extras(true)
        .start()
        .await
        .unwrap();
    let world = fake_world(&fake).await;
    let ca = Ca::new();
    let (_pod, token) = world.agent_pod("agent", &world.node_a, PSAT_AUDIENCE).await;
    let review = review_token(&world.admin, &token, &[PSAT_AUDIENCE])
        .await
        .unwrap();
    let extra = review.user.unwrap().extra.unwrap();
    assert_eq!(
        extra[meshward_kube_fake::EXTRA_NODE_NAME],
        vec![world.node_a.clone()]
    );
    let agent = world.attest(&ca, &token).await.unwrap();
    assert_eq!(agent.node, world.node_a);
}

#[tokio::test]
async fn an_apiserver_failure_refuses_attestation_and_the_next_one_works() {
    let fake = FakeApiServer::start().await.unwrap();
    let world = fake_world(&fake).await;
    let ca = Ca::new();
    let (_pod, token) = world.agent_pod("agent", &world.node_a, PSAT_AUDIENCE).await;
    fake.fail_next_matching(1, 500, "tokenreviews");
    let err = world.attest(&ca, &token).await.unwrap_err();
    assert!(matches!(err, K8sError::Api { .. }), "{err:?}");
    assert!(!err.is_refusal());
    // A failing pod read fails closed too.
    fake.fail_next_matching(1, 500, "/pods/");
    let err = world.attest(&ca, &token).await.unwrap_err();
    assert!(matches!(err, K8sError::Api { .. }), "{err:?}");
    // The apiserver recovers: so does attestation.
    world.attest(&ca, &token).await.unwrap();
    // The CA cannot list the cluster's pods: an error, never an empty (or stale) entitlement.
    fake.fail_next_matching(100_000, 500, "/api/v1/pods");
    assert!(matches!(
        world.cluster.node_pods(&world.node_a).await,
        Err(K8sError::PodCache(_))
    ));
}
