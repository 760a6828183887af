//! The CA's pod cache (node-scoped issuance in Kubernetes mode) against the in-process fake API
//! server — with its faults: 410 relists, dropped watches, slow and failing answers — and against
//! the real kube-apiserver (skipped with a printed reason when it is not cached here).
//!
//! Every test asserts what is entitled and what is refused; none asserts how long anything took.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::future::Future;
use std::time::{Duration, Instant};

use meshward_ca::k8s::{Cluster, K8sError, NodePods, ServiceAccountRef};
use meshward_identity::SpiffeId;
use meshward_kube_fake::fixture::{
    create_namespace, create_pod, create_service_account, delete_pod_now, ensure_node,
    set_pod_phase, unique_name,
};
use meshward_kube_fake::real::{self, RealApiServer};
use meshward_kube_fake::{FakeApiServer, RequestRecord};

const TD: &str = "example.org";
/// Longest any wait for the watch may take before the test fails (a bound, never asserted).
const PATIENCE: Duration = Duration::from_secs(30);

/// Two nodes, a namespace with service accounts, an admin client and the CA's [`Cluster`].
struct Env {
    admin: kube::Client,
    cluster: Cluster,
    ns: String,
    node_a: String,
    node_b: String,
}

impl Env {
    async fn new(admin: kube::Client, ca_client: kube::Client) -> Self {
        let ns = create_namespace(&admin, "k8s-pods").await.unwrap();
        for sa in ["meshward-agent", "app", "other", "remote", "late"] {
            create_service_account(&admin, &ns, sa).await.unwrap();
        }
        let node_a = unique_name("node-a");
        let node_b = unique_name("node-b");
        ensure_node(&admin, &node_a).await.unwrap();
        ensure_node(&admin, &node_b).await.unwrap();
        let agent_sa: ServiceAccountRef = format!("{ns}:meshward-agent").parse().unwrap();
        let cluster = Cluster::new(ca_client, "c1", agent_sa).unwrap();
        Self {
            admin,
            cluster,
            ns,
            node_a,
            node_b,
        }
    }

    async fn fake(fake: &FakeApiServer) -> Self {
        let admin = fake.client().await.unwrap();
        let ca =
            kube::Client::try_from(fake.config_for_token(fake.ca_token()).await.unwrap()).unwrap();
        Self::new(admin, ca).await
    }

    async fn running(&self, pod: &str, sa: &str, node: &str) -> String {
        create_pod(&self.admin, &self.ns, pod, sa, node, &[])
            .await
            .unwrap();
        set_pod_phase(&self.admin, &self.ns, pod, "Running")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    }

    fn id(&self, sa: &str) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{sa}", self.ns)
    }

    /// Whether the node's pods, for a mint of `sa`'s identity, entitle it.
    async fn entitled(&self, node: &str, sa: &str) -> bool {
        let id = self.id(sa);
        let pods = self
            .cluster
            .node_pods_for(node, [(id.as_str(), None)])
            .await
            .unwrap();
        entitles(&pods, &id)
    }

    /// Whether the cached view alone (no lookup: nothing asked for) entitles `sa` on `node`.
    async fn cached(&self, node: &str, sa: &str) -> bool {
        entitles(&self.cluster.node_pods(node).await.unwrap(), &self.id(sa))
    }

    async fn synced(&self) {
        wait_for("the first pod list", || async {
            self.cluster.pods_synced()
        })
        .await;
    }
}

fn entitles(pods: &NodePods, id: &str) -> bool {
    pods.entitles(&SpiffeId::parse(id).unwrap(), None)
}

async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// LISTs of every pod by node (the CA's live lookup), as opposed to the watch's own lists.
fn node_lookups(requests: &[RequestRecord]) -> usize {
    requests
        .iter()
        .filter(|r| r.is_list_of("pods") && r.query.contains("spec.nodeName"))
        .count()
}

/// LISTs of every pod without a selector: the watch's (re)lists.
fn watch_lists(requests: &[RequestRecord]) -> usize {
    requests
        .iter()
        .filter(|r| {
            r.path == "/api/v1/pods" && r.is_list_of("pods") && !r.query.contains("fieldSelector")
        })
        .count()
}

#[tokio::test]
async fn entitled_mints_come_from_the_cache_and_a_delete_ends_entitlement() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("web", "app", &env.node_a).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold web", || env.cached(&env.node_a, "app")).await;

    // Entitled from the cache: no pod LIST at all for these mints.
    let before = fake.requests().len();
    for _ in 0..5 {
        assert!(env.entitled(&env.node_a, "app").await);
    }
    let during = &fake.requests()[before..];
    assert_eq!(
        during.iter().filter(|r| r.is_list_of("pods")).count(),
        0,
        "an entitled mint lists nothing: {during:?}"
    );

    // Deleted: refused once the watch delivered the delete, live lookup or not.
    delete_pod_now(&env.admin, &env.ns, "web").await.unwrap();
    wait_for("the delete to reach the cache", || async {
        !env.cached(&env.node_a, "app").await
    })
    .await;
    assert!(
        !env.entitled(&env.node_a, "app").await,
        "a deleted pod entitles nothing"
    );
}

#[tokio::test]
async fn a_pod_on_another_node_or_not_running_is_refused_even_after_the_lookup() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("far", "remote", &env.node_b).await;
    create_pod(&env.admin, &env.ns, "pending", "other", &env.node_a, &[])
        .await
        .unwrap();
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold far", || {
        env.cached(&env.node_b, "remote")
    })
    .await;

    let before = fake.requests().len();
    assert!(
        !env.entitled(&env.node_a, "remote").await,
        "runs on node-b only"
    );
    assert!(
        !env.entitled(&env.node_a, "other").await,
        "pending, not running"
    );
    let lookups = node_lookups(&fake.requests()[before..]);
    assert_eq!(
        lookups, 2,
        "each refusal was checked live once (and only once)"
    );
    // A pod uid of another pod of the same account is refused too.
    let id = env.id("remote");
    let pods = env
        .cluster
        .node_pods_for(&env.node_b, [(id.as_str(), Some("not-the-uid"))])
        .await
        .unwrap();
    assert!(!pods.entitles(&SpiffeId::parse(&id).unwrap(), Some("not-the-uid")));
}

#[tokio::test]
async fn a_pod_the_watch_has_not_delivered_is_looked_up_once() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.cluster.start_pod_watch();
    env.synced().await;

    // Stall the watch: its next request waits a long time before it is answered.
    let watches = |r: &[RequestRecord]| r.iter().filter(|r| r.is_watch()).count();
    let before = watches(&fake.requests());
    fake.delay(Duration::from_secs(600));
    fake.drop_watches();
    wait_for("the watch to ask again", || async {
        watches(&fake.requests()) > before
    })
    .await;
    fake.delay(Duration::ZERO);

    let uid = env.running("late", "late", &env.node_a).await;
    assert!(
        !env.cached(&env.node_a, "late").await,
        "the stalled watch has not delivered the new pod"
    );
    let before = fake.requests().len();
    let id = env.id("late");
    let pods = env
        .cluster
        .node_pods_for(&env.node_a, [(id.as_str(), Some(uid.as_str()))])
        .await
        .unwrap();
    assert!(
        pods.entitles(&SpiffeId::parse(&id).unwrap(), Some(&uid)),
        "the live lookup found the new pod"
    );
    assert_eq!(node_lookups(&fake.requests()[before..]), 1);
}

#[tokio::test]
async fn issuance_keeps_working_through_a_410_relist() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("web", "app", &env.node_a).await;
    env.running("old", "other", &env.node_a).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold both pods", || async {
        env.cached(&env.node_a, "app").await && env.cached(&env.node_a, "other").await
    })
    .await;
    let lists = watch_lists(&fake.requests());

    // A delete the watch never sees as an event: the watch is dropped and its re-watch held back
    // while the pod is deleted and the history compacted, so resuming gets 410 and the watcher
    // must relist to learn of it.
    let watches = |r: &[RequestRecord]| r.iter().filter(|r| r.is_watch()).count();
    let before = watches(&fake.requests());
    fake.delay(Duration::from_secs(5));
    fake.drop_watches();
    wait_for("the re-watch", || async {
        watches(&fake.requests()) > before
    })
    .await;
    fake.delay(Duration::ZERO);
    delete_pod_now(&env.admin, &env.ns, "old").await.unwrap();
    fake.compact();
    wait_for("the relist after 410", || async {
        watch_lists(&fake.requests()) > lists
    })
    .await;
    wait_for("the relist to drop the deleted pod", || async {
        !env.cached(&env.node_a, "other").await
    })
    .await;
    assert!(
        env.entitled(&env.node_a, "app").await,
        "web still entitles after the relist"
    );
    assert!(!env.entitled(&env.node_a, "other").await, "old was deleted");

    // And the watch after the relist delivers new events.
    env.running("web2", "remote", &env.node_a).await;
    wait_for("the watch after the relist", || {
        env.cached(&env.node_a, "remote")
    })
    .await;
    delete_pod_now(&env.admin, &env.ns, "web").await.unwrap();
    wait_for("a delete after the relist", || async {
        !env.cached(&env.node_a, "app").await
    })
    .await;
}

#[tokio::test]
async fn until_the_first_list_completes_every_mint_is_refused_as_not_synced() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("web", "app", &env.node_a).await;
    // Every request for all pods fails: the watch never lists, and no lookup may stand in for it.
    fake.fail_next_matching(100_000, 500, "/api/v1/pods");
    env.cluster.start_pod_watch();
    let id = env.id("app");
    let err = env
        .cluster
        .node_pods_for(&env.node_a, [(id.as_str(), None)])
        .await
        .unwrap_err();
    assert!(matches!(err, K8sError::PodCache(_)), "{err:?}");
    assert!(err.to_string().contains("not yet synced"), "{err}");
    assert!(
        !err.is_refusal(),
        "the ca failing to know is not a verdict on the agent"
    );
    assert!(!env.cluster.pods_synced());
}

#[tokio::test]
async fn while_the_watch_fails_mints_list_live_and_fail_closed_without_an_answer() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("web", "app", &env.node_a).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold web", || env.cached(&env.node_a, "app")).await;

    // The watch breaks and cannot come back: the cache may now miss deletes.
    fake.fail_next_matching(100_000, 500, "/api/v1/pods");
    fake.drop_watches();
    wait_for("the cache to stop vouching", || async {
        env.cluster.node_pods(&env.node_a).await.is_err()
    })
    .await;
    let err = env.cluster.node_pods(&env.node_a).await.unwrap_err();
    assert!(matches!(err, K8sError::Api { .. }), "{err:?}");
    assert!(!err.is_refusal());
}

#[tokio::test]
async fn a_failed_watch_makes_mints_list_live_until_its_next_event() {
    let fake = FakeApiServer::start().await.unwrap();
    let env = Env::fake(&fake).await;
    env.running("web", "app", &env.node_a).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold web", || env.cached(&env.node_a, "app")).await;

    // The re-watch after a dropped watch fails once (the first pod request after the rule is it).
    let mark = fake.requests().len();
    fake.fail_next_matching(1, 500, "/api/v1/pods");
    fake.drop_watches();
    wait_for("the failed re-watch", || async {
        fake.requests()[mark..].iter().any(RequestRecord::is_watch)
    })
    .await;
    // Until the watch delivers something, the cache may be missing deletes: mints list live.
    let before = fake.requests().len();
    wait_for("a live lookup", || async {
        env.cluster.node_pods(&env.node_a).await.unwrap();
        node_lookups(&fake.requests()[before..]) > 0
    })
    .await;

    // The live list sees a delete the broken watch cannot deliver.
    delete_pod_now(&env.admin, &env.ns, "web").await.unwrap();
    assert!(!env.entitled(&env.node_a, "app").await, "deleted");

    // The watcher retries (after its backoff); its next event makes the cache trusted again.
    env.running("web2", "other", &env.node_a).await;
    wait_for("the watch to come back", || async {
        let before = fake.requests().len();
        let pods = env.cluster.node_pods(&env.node_a).await.unwrap();
        node_lookups(&fake.requests()[before..]) == 0 && entitles(&pods, &env.id("other"))
    })
    .await;
    assert!(
        !env.cached(&env.node_a, "app").await,
        "the cache has the delete too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_apiserver_the_cache_follows_pods_with_the_cas_own_rbac() {
    let Some(server) = tokio::task::spawn_blocking(RealApiServer::shared)
        .await
        .unwrap()
        .unwrap()
    else {
        println!("{}", real::SKIP_MESSAGE);
        return;
    };
    let admin = server.client().await.unwrap();
    // The least-privilege `meshward-ca` identity: get/list/watch on pods is all the cache needs.
    let ca = kube::Client::try_from(server.ca_config().await.unwrap()).unwrap();
    let env = Env::new(admin, ca).await;
    env.running("web", "app", &env.node_a).await;
    env.running("far", "remote", &env.node_b).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold web", || env.cached(&env.node_a, "app")).await;

    assert!(env.entitled(&env.node_a, "app").await);
    assert!(!env.entitled(&env.node_a, "remote").await, "on node-b only");
    assert!(env.entitled(&env.node_b, "remote").await);

    // A new pod is entitled at once (cache or live lookup), a deleted one refused once seen.
    env.running("late", "late", &env.node_a).await;
    assert!(env.entitled(&env.node_a, "late").await);
    delete_pod_now(&env.admin, &env.ns, "web").await.unwrap();
    wait_for("the delete to reach the cache", || async {
        !env.cached(&env.node_a, "app").await
    })
    .await;
    assert!(!env.entitled(&env.node_a, "app").await);
}

/// The real apiserver restarted (watches break; resuming from the old revision gets 410 from the
/// new watch cache): the cache relists, keeps entitling what runs, and learns of a delete made
/// while it was reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_apiserver_issuance_keeps_working_across_an_apiserver_restart() {
    let Some(server) = tokio::task::spawn_blocking(RealApiServer::start_private)
        .await
        .unwrap()
        .unwrap()
    else {
        println!("{}", real::SKIP_MESSAGE);
        return;
    };
    let admin = server.client().await.unwrap();
    let ca = kube::Client::try_from(server.ca_config().await.unwrap()).unwrap();
    let env = Env::new(admin, ca).await;
    env.running("web", "app", &env.node_a).await;
    env.running("old", "other", &env.node_a).await;
    env.cluster.start_pod_watch();
    env.synced().await;
    wait_for("the cache to hold both pods", || async {
        env.cached(&env.node_a, "app").await && env.cached(&env.node_a, "other").await
    })
    .await;

    tokio::task::block_in_place(|| server.restart_apiserver()).unwrap();
    delete_pod_now(&env.admin, &env.ns, "old").await.unwrap();
    wait_for("the delete across the restart", || async {
        !env.entitled(&env.node_a, "other").await
    })
    .await;
    assert!(env.entitled(&env.node_a, "app").await, "web still entitles");
    // The watch is back, not just the live lookups: the cache itself follows new pods.
    env.running("new", "late", &env.node_a).await;
    wait_for("the watch after the restart", || {
        env.cached(&env.node_a, "late")
    })
    .await;
    assert!(!env.cached(&env.node_a, "other").await);
}
