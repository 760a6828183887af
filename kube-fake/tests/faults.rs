//! The fake's fault hooks and the behaviour only the fake can be made to show on demand.

// Helpers shared by the test functions panic on failure like the tests themselves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::pin::pin;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshward_kube_fake::fixture::{self, unique_name};
use meshward_kube_fake::{
    EXTRA_CREDENTIAL_ID, EXTRA_NODE_NAME, EXTRA_NODE_UID, EXTRA_POD_NAME, FakeApiServer,
};
use serde_json::json;
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

async fn next_event<S>(stream: &mut S) -> Option<WatchEvent<Pod>>
where
    S: tokio_stream::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch event or EOF in time")
        .map(Result::unwrap)
}

async fn pod_setup(fake: &FakeApiServer) -> (kube::Client, String) {
    let client = fake.client().await.unwrap();
    let ns = fixture::create_namespace(&client, "fault").await.unwrap();
    fixture::ensure_node(&client, "node-a").await.unwrap();
    (client, ns)
}

#[tokio::test]
async fn fail_next_answers_status_errors_then_recovers() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    fake.fail_next(2, 500);
    for _ in 0..2 {
        match pods.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"))
            }
            other => panic!("expected 500, got {other:?}"),
        }
    }
    pods.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn kube_client_retries_503_by_itself() {
    // kube's default client retries 429/503/504 with backoff: a 503 fault is invisible to callers
    // unless it outlasts those retries.
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let before = fake.requests().len();
    fake.fail_next(2, 503);
    pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        fake.requests().len() - before,
        3,
        "two failures and the retry that succeeded"
    );
}

#[tokio::test]
async fn fail_next_matching_only_hits_that_path() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pod = fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    fake.fail_next_matching(1, 403, "tokenreviews");
    Api::<Pod>::namespaced(client.clone(), &ns)
        .get("p")
        .await
        .unwrap();
    match fixture::review_token(&client, &token, &["meshward-ca"]).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"))
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let status = fixture::review_token(&client, &token, &["meshward-ca"])
        .await
        .unwrap();
    assert_eq!(status.authenticated, Some(true));
}

#[tokio::test]
async fn delay_slows_every_answer_until_cleared() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    fake.delay(Duration::from_millis(300));
    let start = Instant::now();
    namespaces.get("default").await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    fake.delay(Duration::ZERO);
    let start = Instant::now();
    namespaces.get("default").await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn unknown_bearer_token_is_unauthorized() {
    let fake = FakeApiServer::start().await.unwrap();
    let client =
        kube::Client::try_from(fake.config_for_token("not-a-token").await.unwrap()).unwrap();
    match Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn service_account_token_is_a_bearer_token() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pod = fixture::create_pod(&client, &ns, "agent", "default", "node-a", &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    let as_agent = kube::Client::try_from(fake.config_for_token(&token).await.unwrap()).unwrap();
    Api::<Pod>::namespaced(as_agent, &ns)
        .get("agent")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_without_relist() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut events = pin!(
            watcher(pods, watcher::Config::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(Ok(pod)) = events.next().await {
            let _ = tx.send(pod.metadata.name.unwrap_or_default());
        }
    });
    while fake.watch_count() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fixture::create_pod(&client, &ns, "p1", "default", "node-a", &[])
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .as_deref(),
        Some("p1")
    );
    fake.drop_watches();
    fixture::create_pod(&client, &ns, "p2", "default", "node-a", &[])
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .as_deref(),
        Some("p2")
    );
    driver.abort();
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.is_list_of("pods"))
        .count();
    assert_eq!(
        lists, 1,
        "a clean EOF re-watches from the last revision, it does not relist"
    );
    assert_eq!(fake.requests().iter().filter(|r| r.is_watch()).count(), 2);
}

#[tokio::test]
async fn bookmark_now_reaches_watches_that_asked() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut with = pin!(pods.watch(&WatchParams::default(), &rv).await.unwrap());
    let mut without = pin!(
        pods.watch(&WatchParams::default().disable_bookmarks(), &rv)
            .await
            .unwrap()
    );
    while fake.watch_count() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.bookmark_now();
    match next_event(&mut with).await {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(
            b.metadata.resource_version,
            fake.resource_version().to_string()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    fake.drop_watches();
    assert!(
        next_event(&mut without).await.is_none(),
        "no bookmark without allowWatchBookmarks, then EOF"
    );
}

#[tokio::test]
async fn label_watch_turns_stop_matching_into_deleted() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    fixture::create_pod(&client, &ns, "p", "default", "node-a", &[("app", "web")])
        .await
        .unwrap();
    let rv = fake.resource_version().to_string();
    let mut stream = pin!(
        pods.watch(&WatchParams::default().labels("app=web"), &rv)
            .await
            .unwrap()
    );
    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    pods.patch("p", &PatchParams::default(), &relabel("db"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        Some(WatchEvent::Deleted(_))
    ));
    pods.patch("p", &PatchParams::default(), &relabel("web"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        Some(WatchEvent::Added(_))
    ));
}

#[tokio::test]
async fn paged_list_and_expired_continue() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    for name in ["a", "b", "c"] {
        fixture::create_pod(&client, &ns, name, "default", "node-a", &[])
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().unwrap();
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        second
            .items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert!(second.metadata.continue_.is_none());
    fixture::create_pod(
        &pods.clone().into_client(),
        &ns,
        "d",
        "default",
        "node-a",
        &[],
    )
    .await
    .unwrap();
    fake.compact();
    match pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 for a compacted continue token, got {other:?}"),
    }
}

#[tokio::test]
async fn graceful_delete_of_a_scheduled_pod_never_finishes() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let pod = pods.get("p").await.unwrap();
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(30));
    pods.delete(
        "p",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    assert!(pods.get_opt("p").await.unwrap().is_none());
}

#[tokio::test]
async fn terminating_namespace_refuses_new_content() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    match fixture::create_service_account(&client, &ns, "late").await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => assert_eq!(s.code, 403),
        other => panic!("expected 403, got {other:?}"),
    }
    match fixture::create_service_account(&client, &unique_name("absent"), "x").await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("expected 404 for a missing namespace, got {other:?}"),
    }
}

#[tokio::test]
async fn review_cache_ttl_zero_sees_deletion_at_once() {
    let fake = FakeApiServer::builder()
        .with_review_cache_ttl(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pod = fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    assert_eq!(
        fixture::review_token(&client, &token, &["meshward-ca"])
            .await
            .unwrap()
            .authenticated,
        Some(true)
    );
    fixture::delete_pod_now(&client, &ns, "p").await.unwrap();
    let status = fixture::review_token(&client, &token, &["meshward-ca"])
        .await
        .unwrap();
    assert_eq!(status.authenticated, None);
    assert!(status.error.unwrap().contains("not found"));
}

#[tokio::test]
async fn review_cache_expires_after_its_ttl() {
    let fake = FakeApiServer::builder()
        .with_review_cache_ttl(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let pod = fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    fixture::review_token(&client, &token, &["meshward-ca"])
        .await
        .unwrap();
    fixture::delete_pod_now(&client, &ns, "p").await.unwrap();
    assert_eq!(
        fixture::review_token(&client, &token, &["meshward-ca"])
            .await
            .unwrap()
            .authenticated,
        Some(true)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fixture::review_token(&client, &token, &["meshward-ca"])
            .await
            .unwrap()
            .authenticated,
        None
    );
}

#[tokio::test]
async fn node_extras_when_enabled() {
    let fake = FakeApiServer::builder()
        .with_node_extras(true)
        .start()
        .await
        .unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let node = fixture::ensure_node(&client, "node-a").await.unwrap();
    let pod = fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    let token = fixture::request_pod_token(&client, &pod, "default", &["meshward-ca"], 600)
        .await
        .unwrap();
    let extra = fixture::review_token(&client, &token, &[])
        .await
        .unwrap()
        .user
        .unwrap()
        .extra
        .unwrap();
    assert_eq!(extra.get(EXTRA_POD_NAME), Some(&vec!["p".to_owned()]));
    assert_eq!(extra.get(EXTRA_NODE_NAME), Some(&vec!["node-a".to_owned()]));
    assert_eq!(
        extra.get(EXTRA_NODE_UID),
        Some(&vec![node.metadata.uid.unwrap()])
    );
    assert!(
        extra
            .get(EXTRA_CREDENTIAL_ID)
            .is_some_and(|v| v.iter().all(|c| c.starts_with("JTI=")))
    );
    fake.set_node_extras(false);
    fake.clear_review_cache();
    let extra = fixture::review_token(&client, &token, &[])
        .await
        .unwrap()
        .user
        .unwrap()
        .extra
        .unwrap();
    assert!(!extra.contains_key(EXTRA_NODE_NAME));
}

#[tokio::test]
async fn token_request_refuses_missing_and_recreated_pods() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, ns) = pod_setup(&fake).await;
    let old = fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    fixture::delete_pod_now(&client, &ns, "p").await.unwrap();
    match fixture::request_pod_token(&client, &old, "default", &["meshward-ca"], 600).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    fixture::create_pod(&client, &ns, "p", "default", "node-a", &[])
        .await
        .unwrap();
    match fixture::request_pod_token(&client, &old, "default", &["meshward-ca"], 600).await {
        Err(fixture::FixtureError::Kube(kube::Error::Api(s))) => {
            assert_eq!(s.code, 409, "UID mismatch")
        }
        other => panic!("expected 409, got {other:?}"),
    }
}
