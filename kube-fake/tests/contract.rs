//! One contract suite, run against the in-process fake AND the real kube-apiserver (v1.20.2), so the
//! fake cannot drift from the real wire protocol. Every case runs twice: `<case>::fake` and
//! `<case>::real`; the real one uses `MESHWARD_KUBE_APISERVER_DIR` or starts the cached binary, and
//! otherwise prints the skip message and passes.

// Helpers shared by the test functions panic on failure like the tests themselves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::pin::pin;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use meshward_kube_fake::fixture::{self, unique_name};
use meshward_kube_fake::real::SKIP_MESSAGE;
use meshward_kube_fake::{
    EXTRA_NODE_NAME, EXTRA_POD_NAME, EXTRA_POD_UID, FakeApiServer, RealApiServer,
};
use serde_json::json;
use tokio_stream::StreamExt;

struct Cluster {
    /// The real server (RBAC enforced, 1.20 behaviour) rather than the fake.
    real: bool,
    /// Admin.
    client: Client,
    /// The least-privilege `meshward-ca` identity (RBAC enforced on the real server only).
    ca_client: Client,
}

impl Cluster {
    async fn fake(fake: &FakeApiServer) -> Self {
        let ca_client =
            Client::try_from(fake.config_for_token(fake.ca_token()).await.unwrap()).unwrap();
        Self {
            real: false,
            client: fake.client().await.unwrap(),
            ca_client,
        }
    }

    async fn real(real: &RealApiServer) -> Self {
        let ca_client = Client::try_from(real.ca_config().await.unwrap()).unwrap();
        Self {
            real: true,
            client: real.client().await.unwrap(),
            ca_client,
        }
    }

    fn is_real(&self) -> bool {
        self.real
    }
}

/// The shared real server, or `None` after printing the skip message.
fn real_or_skip() -> Option<&'static RealApiServer> {
    match RealApiServer::shared() {
        Ok(Some(real)) => Some(real),
        Ok(None) => {
            println!("{SKIP_MESSAGE}");
            None
        }
        Err(e) => panic!("the real kube-apiserver is available but failed: {e}"),
    }
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fake() {
                let fake = meshward_kube_fake::FakeApiServer::start().await.unwrap();
                super::$case(&super::Cluster::fake(&fake).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() {
                let Some(real) = super::real_or_skip() else { return };
                super::$case(&super::Cluster::real(real).await).await;
            }
        }
    )*};
}

contract!(
    list_and_watch_with_field_and_label_selectors,
    token_request_then_review_is_positive_with_pod_extras,
    bad_tokens_review_with_an_error_and_no_authenticated,
    positive_review_is_cached_past_pod_deletion,
    secret_create_then_stale_update_conflicts,
    lease_create_and_renew,
    errors_are_status_bodies,
);

const WAIT: Duration = Duration::from_secs(20);

async fn setup(cluster: &Cluster, prefix: &str) -> (String, String, String) {
    let ns = fixture::create_namespace(&cluster.client, prefix)
        .await
        .unwrap();
    let node_a = unique_name("node-a");
    let node_b = unique_name("node-b");
    fixture::ensure_node(&cluster.client, &node_a)
        .await
        .unwrap();
    fixture::ensure_node(&cluster.client, &node_b)
        .await
        .unwrap();
    (ns, node_a, node_b)
}

fn name_of<K: kube::Resource>(k: &K) -> String {
    k.meta().name.clone().unwrap_or_default()
}

async fn next_event<S>(stream: &mut S) -> WatchEvent<Pod>
where
    S: tokio_stream::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch event in time")
        .expect("stream open")
        .unwrap()
}

async fn list_and_watch_with_field_and_label_selectors(cluster: &Cluster) {
    let (ns, node_a, node_b) = setup(cluster, "listwatch").await;
    let c = &cluster.client;
    fixture::create_pod(c, &ns, "a1", "default", &node_a, &[("app", "web")])
        .await
        .unwrap();
    fixture::create_pod(c, &ns, "b1", "default", &node_b, &[("app", "db")])
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let on_a = format!("spec.nodeName={node_a}");

    let listed = pods
        .list(&ListParams::default().fields(&on_a))
        .await
        .unwrap();
    assert_eq!(listed.items.iter().map(name_of).collect::<Vec<_>>(), ["a1"]);
    let rv = listed.metadata.resource_version.clone().unwrap();
    assert!(
        rv.parse::<u64>().unwrap() > 0,
        "list carries the current revision, got `{rv}`"
    );
    let by_label = pods
        .list(&ListParams::default().labels("app in (db,cache)"))
        .await
        .unwrap();
    assert_eq!(
        by_label.items.iter().map(name_of).collect::<Vec<_>>(),
        ["b1"]
    );
    // The CA identity may list pods cluster-wide with a field selector (its RBAC on the real server).
    let all: Api<Pod> = Api::all(cluster.ca_client.clone());
    let cluster_wide = all
        .list(&ListParams::default().fields(&on_a))
        .await
        .unwrap();
    assert_eq!(
        cluster_wide.items.iter().map(name_of).collect::<Vec<_>>(),
        ["a1"]
    );

    // Written after the list: a watch from the list's revision replays it.
    fixture::create_pod(c, &ns, "a2", "default", &node_a, &[])
        .await
        .unwrap();
    fixture::create_pod(c, &ns, "b2", "default", &node_b, &[])
        .await
        .unwrap();
    let mut stream = pin!(
        pods.watch(&WatchParams::default().fields(&on_a).timeout(60), &rv)
            .await
            .unwrap()
    );
    match next_event(&mut stream).await {
        WatchEvent::Added(p) => assert_eq!(name_of(&p), "a2"),
        other => panic!("expected ADDED a2, got {other:?}"),
    }
    fixture::set_pod_phase(c, &ns, "a2", "Running")
        .await
        .unwrap();
    match next_event(&mut stream).await {
        WatchEvent::Modified(p) => {
            assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
        }
        other => panic!("expected MODIFIED a2, got {other:?}"),
    }
    fixture::delete_pod_now(c, &ns, "b2").await.unwrap();
    fixture::delete_pod_now(c, &ns, "a2").await.unwrap();
    // Deleting marks the pod first (grace 0), then removes it; b2 is on the other node.
    match next_event(&mut stream).await {
        WatchEvent::Modified(p) => {
            assert_eq!(name_of(&p), "a2");
            assert!(p.metadata.deletion_timestamp.is_some());
            assert_eq!(p.metadata.deletion_grace_period_seconds, Some(0));
        }
        other => panic!("expected MODIFIED a2 (marked for deletion), got {other:?}"),
    }
    match next_event(&mut stream).await {
        WatchEvent::Deleted(p) => assert_eq!(name_of(&p), "a2"),
        other => panic!("expected DELETED a2, got {other:?}"),
    }
    assert!(
        pods.get_opt("a2").await.unwrap().is_none(),
        "grace 0 deletes at once"
    );
}

async fn token_request_then_review_is_positive_with_pod_extras(cluster: &Cluster) {
    let (ns, node_a, _) = setup(cluster, "review").await;
    fixture::create_service_account(&cluster.client, &ns, "workload")
        .await
        .unwrap();
    let pod = fixture::create_pod(&cluster.client, &ns, "w", "workload", &node_a, &[])
        .await
        .unwrap();
    let token =
        fixture::request_pod_token(&cluster.client, &pod, "workload", &["meshward-ca"], 600)
            .await
            .unwrap();
    let status = fixture::review_token(&cluster.ca_client, &token, &["meshward-ca"])
        .await
        .unwrap();
    assert_eq!(status.error, None);
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.audiences.as_deref(),
        Some(&["meshward-ca".to_owned()][..])
    );
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra.get(EXTRA_POD_NAME), Some(&vec!["w".to_owned()]));
    assert_eq!(
        extra.get(EXTRA_POD_UID),
        Some(&vec![pod.metadata.uid.clone().unwrap()])
    );
    // 1.20 and the fake's default send no node extras; newer servers do, so they stay optional.
    if let Some(node) = extra.get(EXTRA_NODE_NAME) {
        assert_eq!(node, &vec![node_a.clone()]);
    }
}

async fn bad_tokens_review_with_an_error_and_no_authenticated(cluster: &Cluster) {
    let (ns, node_a, _) = setup(cluster, "badtoken").await;
    let c = &cluster.client;
    let pod = fixture::create_pod(c, &ns, "p", "default", &node_a, &[])
        .await
        .unwrap();
    let gone = fixture::create_pod(c, &ns, "gone", "default", &node_a, &[])
        .await
        .unwrap();
    let other_audience = fixture::request_pod_token(c, &pod, "default", &["someone-else"], 600)
        .await
        .unwrap();
    let of_deleted_pod = fixture::request_pod_token(c, &gone, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    fixture::delete_pod_now(c, &ns, "gone").await.unwrap();
    for (what, token) in [
        ("wrong audience", other_audience.as_str()),
        ("garbage", "not-a-token"),
        ("three garbage parts", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
        ("deleted pod", of_deleted_pod.as_str()),
    ] {
        let status = fixture::review_token(&cluster.ca_client, token, &["meshward-ca"])
            .await
            .unwrap();
        assert_eq!(
            status.authenticated, None,
            "{what}: no `authenticated` at all"
        );
        assert!(
            status.error.as_deref().is_some_and(|e| !e.is_empty()),
            "{what}: an error, got {status:?}"
        );
        assert!(
            status.user.and_then(|u| u.username).is_none(),
            "{what}: no user"
        );
    }
    // A token cannot be bound to a pod running as another service account.
    fixture::create_service_account(c, &ns, "other")
        .await
        .unwrap();
    match fixture::request_pod_token(c, &pod, "other", &["meshward-ca"], 600).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => assert_eq!(s.code, 400, "{s:?}"),
        other => panic!("expected 400, got {other:?}"),
    }
    // Too short an expiry is invalid.
    match fixture::request_pod_token(c, &pod, "default", &["meshward-ca"], 60).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => assert_eq!(s.code, 422, "{s:?}"),
        other => panic!("expected 422, got {other:?}"),
    }
}

async fn positive_review_is_cached_past_pod_deletion(cluster: &Cluster) {
    let (ns, node_a, _) = setup(cluster, "cache").await;
    let pod = fixture::create_pod(&cluster.client, &ns, "p", "default", &node_a, &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&cluster.client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    let first = fixture::review_token(&cluster.ca_client, &token, &["meshward-ca"])
        .await
        .unwrap();
    assert_eq!(first.authenticated, Some(true));
    fixture::delete_pod_now(&cluster.client, &ns, "p")
        .await
        .unwrap();
    // Within the ~10 s cache the real server still says yes: a CA must check the pod itself.
    let again = fixture::review_token(&cluster.ca_client, &token, &["meshward-ca"])
        .await
        .unwrap();
    assert_eq!(again.authenticated, Some(true), "cached positive review");
}

async fn secret_create_then_stale_update_conflicts(cluster: &Cluster) {
    let ns = fixture::create_namespace(&cluster.client, "secret")
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(cluster.ca_client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ca-key"},
        "type": "Opaque",
        "stringData": {"key.pem": "first"},
    }))
    .unwrap();
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let data = created.data.clone().unwrap();
    assert_eq!(
        data.get("key.pem").map(|b| b.0.as_slice()),
        Some(&b"first"[..]),
        "stringData folds into data"
    );
    assert!(created.string_data.is_none());
    match secrets.create(&PostParams::default(), &secret).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    let mut second = created.clone();
    second.string_data = Some([("key.pem".to_owned(), "second".to_owned())].into());
    let replaced = secrets
        .replace("ca-key", &PostParams::default(), &second)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    // `second` still carries the first revision: stale.
    match secrets
        .replace("ca-key", &PostParams::default(), &second)
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let stale_patch = json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"x": "eA=="}});
    match secrets
        .patch(
            "ca-key",
            &PatchParams::default(),
            &Patch::Merge(stale_patch),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected Conflict on a stale merge patch, got {other:?}"),
    }
    let current = secrets.get("ca-key").await.unwrap();
    assert_eq!(
        current.data.unwrap().get("key.pem").map(|b| b.0.as_slice()),
        Some(&b"second"[..])
    );
}

async fn lease_create_and_renew(cluster: &Cluster) {
    let ns = fixture::create_namespace(&cluster.client, "lease")
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(cluster.ca_client.clone(), &ns);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "meshward-ca-rotation"},
        "spec": {
            "holderIdentity": "ca-0",
            "leaseDurationSeconds": 15,
            "acquireTime": "2025-01-01T00:00:00.000000Z",
            "renewTime": "2025-01-01T00:00:00.000000Z",
            "leaseTransitions": 0,
        },
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut renewed = created.clone();
    if let Some(spec) = renewed.spec.as_mut() {
        spec.renew_time = serde_json::from_value(json!("2025-01-01T00:00:10.000000Z")).unwrap();
    }
    let after = leases
        .replace("meshward-ca-rotation", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_eq!(
        after
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("ca-0")
    );
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.renew_time.clone()),
        renewed.spec.as_ref().and_then(|s| s.renew_time.clone())
    );
    // Another replica taking over with the revision it read before the renewal loses.
    let mut takeover = created.clone();
    if let Some(spec) = takeover.spec.as_mut() {
        spec.holder_identity = Some("ca-1".into());
    }
    match leases
        .replace("meshward-ca-rotation", &PostParams::default(), &takeover)
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // Published through a ConfigMap too (the trust bundle's path), by the same identity.
    let cms: Api<ConfigMap> = Api::namespaced(cluster.ca_client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "bundle"}, "data": {"bundle.pem": "x"}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
}

async fn errors_are_status_bodies(cluster: &Cluster) {
    let ns = fixture::create_namespace(&cluster.client, "status")
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    match pods.get("missing").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
            assert_eq!(s.message, "pods \"missing\" not found");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match pods
        .list(&ListParams::default().fields("spec.hostname=x"))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400, "{s:?}"),
        other => panic!("expected BadRequest for an unsupported field label, got {other:?}"),
    }
    // A pod whose service account does not exist is refused by admission.
    match fixture::create_pod(&cluster.client, &ns, "p", "nobody", "node-x", &[]).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    if cluster.is_real() {
        // The CA identity may not read service accounts (least privilege is real there).
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(cluster.ca_client.clone(), &ns);
        match sas.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
            other => panic!("expected Forbidden for the CA identity, got {other:?}"),
        }
    }
}

/// A WATCH from a revision older than the server's window is HTTP 200 + one in-stream 410 `ERROR` +
/// EOF, and kube-runtime's watcher relists (a new `Init`) on it — on the fake after compact +
/// drop_watches, on a private real server after an apiserver restart (a fresh real server's watch
/// cache reaches back to revision 1, and etcd compaction does not shrink it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_fake() {
    let fake = FakeApiServer::start().await.unwrap();
    let cluster = Cluster::fake(&fake).await;
    watcher_relists(&cluster, || {
        fake.compact();
        fake.drop_watches();
    })
    .await;
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.is_list_of("pods"))
        .count();
    assert_eq!(lists, 2, "one initial list and one relist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_real() {
    let real = match RealApiServer::start_private() {
        Ok(Some(real)) => real,
        Ok(None) => {
            println!("{SKIP_MESSAGE}");
            return;
        }
        Err(e) => panic!("the real kube-apiserver is available but failed: {e}"),
    };
    let cluster = Cluster::real(&real).await;
    watcher_relists(&cluster, || real.restart_apiserver().unwrap()).await;
}

async fn watcher_relists(cluster: &Cluster, break_watch: impl FnOnce()) {
    let (ns, node_a, _) = setup(cluster, "relist").await;
    let pods: Api<Pod> = Api::all(cluster.ca_client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_a}"));
    let mut events = pin!(watcher(pods, config).default_backoff());
    let mut inits = 0;
    let mut saw_410 = false;
    let mut applied = Vec::new();
    let mut step = async |inits: &mut i32, saw_410: &mut bool, applied: &mut Vec<String>| {
        match tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("watcher event in time")
        {
            Some(Ok(watcher::Event::Init)) => *inits += 1,
            Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                applied.push(name_of(&p))
            }
            Some(Ok(_)) => {}
            Some(Err(watcher::Error::WatchError(s))) if s.code == 410 => *saw_410 = true,
            Some(Err(_)) => {} // connection refused while the real apiserver restarts
            None => panic!("watcher ended"),
        }
    };
    while inits < 1 {
        step(&mut inits, &mut saw_410, &mut applied).await;
    }
    fixture::create_pod(&cluster.client, &ns, "p1", "default", &node_a, &[])
        .await
        .unwrap();
    while !applied.contains(&"p1".to_owned()) {
        step(&mut inits, &mut saw_410, &mut applied).await;
    }
    // A write the pod watch does not see moves the revision past the watcher's last one.
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "bump"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    break_watch();
    applied.clear();
    while inits < 2 {
        step(&mut inits, &mut saw_410, &mut applied).await;
    }
    assert!(saw_410, "the relist came from an in-stream 410");
    while !applied.contains(&"p1".to_owned()) {
        step(&mut inits, &mut saw_410, &mut applied).await;
    }

    // The same on the wire: revision 1 is now before the window.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let stream = pods
        .watch(&WatchParams::default().timeout(30), "1")
        .await
        .expect("HTTP 200, not an HTTP 410");
    let mut stream = pin!(stream);
    match next_event(&mut stream).await {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected an in-stream 410 ERROR, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("EOF after the error");
    assert!(end.is_none(), "the stream ends after the 410, got {end:?}");
}
