use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use meshward_kube_fake::FakeApiServer;
use meshward_kube_fake::fixture::{
    create_namespace, create_pod, create_service_account, delete_pod_now, ensure_node,
    set_pod_phase,
};

use super::*;

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
const CID: &str = "3c1e4b8f0a9d2e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29181706f5e4d3c2b1a0";

mod real;

/// A fake procfs holding only `<pid>/cgroup`.
struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Puts `pid` into the kubelet-shaped cgroup of `uid` (cgroupfs driver, containerd).
    fn place(&self, pid: i32, uid: &str) {
        self.write(
            pid,
            &format!("8:pids:/kubepods/besteffort/pod{uid}/{CID}\n0::/\n"),
        );
    }

    /// Writes `pid`'s `cgroup` file, and a `stat` whose start time (field 22) is 22.
    fn write(&self, pid: i32, cgroup: &str) {
        let dir = self.dir.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        let fields: Vec<String> = (4..=22).map(|i| i.to_string()).collect();
        std::fs::write(
            dir.join("stat"),
            format!("{pid} (app) S {}\n", fields.join(" ")),
        )
        .unwrap();
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

/// A pod on `node` running as `sa` (created first unless `default`).
async fn pod(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    node: &str,
    labels: &[(&str, &str)],
) -> Result<Pod, meshward_kube_fake::fixture::FixtureError> {
    if sa != "default" {
        create_service_account(client, ns, sa).await?;
    }
    create_pod(client, ns, name, sa, node, labels).await
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

fn s(v: &str) -> Selector {
    Selector::new(KIND, v)
}

async fn synced(client: &Client, proc: &FakeProc, wait: Duration) -> K8sAttestor {
    let attestor = K8sAttestor::start(client.clone(), NODE)
        .with_proc_root(proc.root())
        .with_pod_wait(wait);
    assert!(attestor.wait_synced(Duration::from_secs(10)).await);
    attestor
}

fn assert_not_on_node(err: AttestError, want_uid: &str) {
    match err {
        AttestError::K8s {
            source: K8sError::NotOnThisNode { uid, node, .. },
            ..
        } => {
            assert_eq!(uid, want_uid);
            assert_eq!(node, NODE);
        }
        other => panic!("expected NotOnThisNode, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pod_on_this_node_gives_its_selectors() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let pod = pod(&client, &ns, "web", "web-sa", NODE, &[("app", "web")])
        .await
        .unwrap();
    set_pod_phase(&client, &ns, "web", "Running").await.unwrap();
    let uid = uid_of(&pod);
    let proc = FakeProc::new();
    proc.place(4242, &uid);
    let attestor = synced(&client, &proc, Duration::from_secs(2)).await;

    let mut got = attestor.attest_pid(4242).await.unwrap();
    got.sort();
    let mut want = vec![
        s(&format!("ns:{ns}")),
        s("sa:web-sa"),
        s(&format!("pod-uid:{uid}")),
        s("pod-name:web"),
        s(&format!("node-name:{NODE}")),
        s("pod-label:app:web"),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(attestor.kind(), "k8s");
    assert_eq!(attestor.pods().len(), 1);
}

#[tokio::test]
async fn a_pod_on_another_node_is_refused() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, OTHER_NODE).await.unwrap();
    let pod = pod(&client, &ns, "elsewhere", "default", OTHER_NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(7, &uid_of(&pod));
    let attestor = synced(&client, &proc, Duration::from_millis(300)).await;
    let err = attestor.attest_pid(7).await.unwrap_err();
    assert!(err.to_string().contains("not on this node"), "{err}");
    assert_not_on_node(err, &uid_of(&pod));
}

#[tokio::test]
async fn a_pod_the_watch_has_not_delivered_yet_is_waited_for() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let pod = pod(&client, &ns, "early", "early-sa", NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(99, &uid_of(&pod));
    // The API server answers slowly, so the attest call starts before the watch has delivered the
    // pod (UIDs are assigned by the server, so the pod cannot be created after the cgroup names it).
    fake.delay(Duration::from_millis(600));
    let attestor = K8sAttestor::start(client.clone(), NODE)
        .with_proc_root(proc.root())
        .with_pod_wait(Duration::from_secs(3));
    assert!(attestor.pods().is_empty());
    let started = std::time::Instant::now();
    let got = attestor.attest_pid(99).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(got.contains(&s("sa:early-sa")), "{got:?}");

    // The same race with a wait too short for it is refused, not guessed.
    let impatient = K8sAttestor::start(client.clone(), NODE)
        .with_proc_root(proc.root())
        .with_pod_wait(Duration::from_millis(100));
    assert_not_on_node(impatient.attest_pid(99).await.unwrap_err(), &uid_of(&pod));
}

#[tokio::test]
async fn a_deleted_pod_is_refused() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let pod = pod(&client, &ns, "gone", "default", NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(11, &uid_of(&pod));
    let attestor = synced(&client, &proc, Duration::from_millis(200)).await;
    assert!(attestor.attest_pid(11).await.is_ok());

    delete_pod_now(&client, &ns, "gone").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let err = loop {
        match attestor.attest_pid(11).await {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {}
            Ok(sel) => panic!("deleted pod still attested: {sel:?}"),
        }
    };
    assert_not_on_node(err, &uid_of(&pod));
}

#[tokio::test]
async fn a_finished_pod_is_refused() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let pod = pod(&client, &ns, "job", "default", NODE, &[])
        .await
        .unwrap();
    set_pod_phase(&client, &ns, "job", "Succeeded")
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(12, &uid_of(&pod));
    let attestor = synced(&client, &proc, Duration::from_secs(2)).await;
    let err = attestor.attest_pid(12).await.unwrap_err();
    assert!(
        matches!(&err, AttestError::K8s { source: K8sError::PodFinished { phase, .. }, .. } if phase == "Succeeded"),
        "{err:?}"
    );
}

#[tokio::test]
async fn processes_outside_pods_and_gone_processes_are_refused() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let proc = FakeProc::new();
    proc.write(5, "0::/user.slice/session-1.scope\n");
    let attestor = synced(&client, &proc, Duration::from_millis(100)).await;
    let err = attestor.attest_pid(5).await.unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::K8s {
                source: K8sError::Cgroup(CgroupError::NotInPod),
                ..
            }
        ),
        "{err:?}"
    );
    let err = attestor.attest_pid(6).await.unwrap_err();
    assert!(matches!(err, AttestError::ProcessGone(6)), "{err:?}");
}

#[tokio::test]
async fn the_container_name_comes_from_the_pod_status() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let pod = pod(&client, &ns, "multi", "default", NODE, &[])
        .await
        .unwrap();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    api.patch_status(
        "multi",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "other", "containerID": format!("containerd://{}", "b".repeat(64)),
                 "image": "x", "imageID": "", "ready": true, "restartCount": 0},
                {"name": "app", "containerID": format!("containerd://{CID}"),
                 "image": "x", "imageID": "", "ready": true, "restartCount": 0},
            ],
        }})),
    )
    .await
    .unwrap();
    let proc = FakeProc::new();
    proc.place(13, &uid_of(&pod));
    let attestor = synced(&client, &proc, Duration::from_secs(2)).await;
    // The status patch may arrive after the initial list: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = attestor.attest_pid(13).await.unwrap();
        if got.contains(&s("container-name:app")) {
            assert!(!got.contains(&s("container-name:other")));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn after_a_compaction_the_watch_relists_and_attestation_keeps_working() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "att").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let before = pod(&client, &ns, "before", "sa-1", NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(21, &uid_of(&before));
    let attestor = synced(&client, &proc, Duration::from_secs(3)).await;
    assert!(attestor.attest_pid(21).await.is_ok());
    let lists = || {
        fake.requests()
            .iter()
            .filter(|r| r.is_list_of("pods"))
            .count()
    };
    let lists_before = lists();

    // Other nodes' churn moves the global revision past the one this watch has seen; compacting
    // then makes the watch's resume point too old (410 Gone) once it has to reconnect.
    ensure_node(&client, OTHER_NODE).await.unwrap();
    pod(&client, &ns, "churn", "default", OTHER_NODE, &[])
        .await
        .unwrap();
    fake.compact();
    fake.drop_watches();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lists() <= lists_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher never relisted: {:#?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let after = pod(&client, &ns, "after", "sa-2", NODE, &[]).await.unwrap();
    proc.place(22, &uid_of(&after));
    let got = attestor.attest_pid(22).await.unwrap();
    assert!(got.contains(&s("sa:sa-2")), "{got:?}");
    let got = attestor.attest_pid(21).await.unwrap();
    assert!(got.contains(&s("sa:sa-1")), "{got:?}");
}

#[test]
fn pod_identity_is_namespace_and_service_account() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"serviceAccountName": "cart", "containers": []},
    }))
    .unwrap();
    assert_eq!(pod_identity(&pod), Some(("shop", "cart")));
    let bare: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
    assert_eq!(pod_identity(&bare), None);
}

#[tokio::test]
async fn implicit_entries_are_one_per_service_account_with_a_live_pod_here() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let ns = create_namespace(&client, "imp").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    ensure_node(&client, OTHER_NODE).await.unwrap();
    pod(&client, &ns, "a1", "api", NODE, &[]).await.unwrap();
    create_pod(&client, &ns, "a2", "api", NODE, &[])
        .await
        .unwrap();
    pod(&client, &ns, "done", "batch", NODE, &[]).await.unwrap();
    set_pod_phase(&client, &ns, "done", "Failed").await.unwrap();
    pod(&client, &ns, "far", "far", OTHER_NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    let attestor = synced(&client, &proc, Duration::from_secs(1)).await;
    let td: TrustDomain = "example.org".parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let entries = loop {
        let entries = attestor.implicit_entries(&td);
        // The `Failed` phase may land after the first list: wait until it is seen.
        if entries.len() == 1 || std::time::Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(
        entry.spiffe_id,
        format!("spiffe://example.org/ns/{ns}/sa/api")
    );
    assert_eq!(entry.id, format!("{IMPLICIT_PREFIX}{ns}/api"));
    assert_eq!(entry.node, NODE);
    let selectors: Vec<String> = entry
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    assert_eq!(
        selectors,
        vec![format!("k8s:ns:{ns}"), "k8s:sa:api".to_owned()]
    );
}
