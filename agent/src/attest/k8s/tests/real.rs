//! Against the REAL kube-apiserver, with real cgroups (root only): a process placed in a
//! kubelet-shaped cgroup of a pod is attested as that pod.

use std::path::PathBuf;
use std::process::{Child, Command};

use meshward_kube_fake::real::{self, RealApiServer};

use super::*;

/// `Some(reason)` when these tests cannot run here.
fn skip_reason() -> Option<&'static str> {
    // `geteuid` is not in std; `/proc/self` is owned by the effective uid.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        return Some("skipping: real cgroup attestation needs root");
    }
    None
}

/// The pids v1 hierarchy when mounted, else the v2 one.
fn cgroup_root() -> Option<PathBuf> {
    [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.join("cgroup.procs").exists())
}

/// A `sleep` placed in `<root>/kubepods/besteffort/pod<uid>/<container>`; on drop it is moved back to
/// the root cgroup, killed, and the directories it made are removed.
struct PodProcess {
    root: PathBuf,
    made: Vec<PathBuf>,
    child: Child,
}

impl PodProcess {
    fn place(root: &std::path::Path, uid: &str) -> Self {
        let container = uid.replace('-', "").repeat(2);
        let mut made = Vec::new();
        let mut dir = root.to_owned();
        for part in [
            "kubepods".to_owned(),
            "besteffort".to_owned(),
            format!("pod{uid}"),
            container,
        ] {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
                made.push(dir.clone());
            }
        }
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let me = Self {
            root: root.to_owned(),
            made,
            child,
        };
        std::fs::write(dir.join("cgroup.procs"), me.child.id().to_string()).unwrap();
        me
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.child.id().to_string());
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Parents shared with a concurrent test stay (rmdir of a non-empty cgroup fails).
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_apiserver_a_process_in_a_pods_cgroup_is_that_pod() {
    if let Some(reason) = skip_reason() {
        println!("{reason}");
        return;
    }
    let Some(cgroups) = cgroup_root() else {
        println!("skipping: no writable cgroup hierarchy mounted");
        return;
    };
    let Some(server) = tokio::task::spawn_blocking(RealApiServer::shared)
        .await
        .unwrap()
        .unwrap()
    else {
        println!("{}", real::SKIP_MESSAGE);
        return;
    };
    let client = server.client().await.unwrap();
    let ns = create_namespace(&client, "katt").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    ensure_node(&client, OTHER_NODE).await.unwrap();
    let web = pod(&client, &ns, "web", "web-sa", NODE, &[]).await.unwrap();
    let elsewhere = pod(&client, &ns, "far", "far-sa", OTHER_NODE, &[])
        .await
        .unwrap();
    let uid = uid_of(&web);

    let attestor = K8sAttestor::start(client.clone(), NODE).with_pod_wait(Duration::from_secs(2));
    assert!(attestor.wait_synced(Duration::from_secs(20)).await);

    let process = PodProcess::place(&cgroups, &uid);
    let got = attestor.attest_pid(process.pid()).await.unwrap();
    let identity: Vec<&Selector> = got
        .iter()
        .filter(|s| s.value.starts_with("ns:") || s.value.starts_with("sa:"))
        .collect();
    assert_eq!(
        identity,
        vec![&s(&format!("ns:{ns}")), &s("sa:web-sa")],
        "{got:?}"
    );
    let mut got = got;
    got.sort();
    let mut want = vec![
        s(&format!("ns:{ns}")),
        s("sa:web-sa"),
        s(&format!("pod-uid:{uid}")),
        s("pod-name:web"),
        s(&format!("node-name:{NODE}")),
    ];
    want.sort();
    assert_eq!(got, want);
    drop(process);

    // A process in the cgroup of a pod on another node is refused.
    let far = PodProcess::place(&cgroups, &uid_of(&elsewhere));
    let err = attestor.attest_pid(far.pid()).await.unwrap_err();
    assert_not_on_node(err, &uid_of(&elsewhere));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_apiserver_restart_the_watch_recovers_and_attestation_keeps_working() {
    let Some(server) = tokio::task::spawn_blocking(RealApiServer::start_private)
        .await
        .unwrap()
        .unwrap()
    else {
        println!("{}", real::SKIP_MESSAGE);
        return;
    };
    let client = server.client().await.unwrap();
    let ns = create_namespace(&client, "krst").await.unwrap();
    ensure_node(&client, NODE).await.unwrap();
    let before = pod(&client, &ns, "before", "sa-1", NODE, &[])
        .await
        .unwrap();
    let proc = FakeProc::new();
    proc.place(31, &uid_of(&before));
    let attestor = K8sAttestor::start(client.clone(), NODE)
        .with_proc_root(proc.root())
        .with_pod_wait(Duration::from_secs(2));
    assert!(attestor.wait_synced(Duration::from_secs(20)).await);
    assert!(attestor.attest_pid(31).await.is_ok());

    let server = tokio::task::spawn_blocking(move || {
        server.restart_apiserver().unwrap();
        server
    })
    .await
    .unwrap();

    // A pod created after the restart can only be known through the re-established watch.
    let client = server.client().await.unwrap();
    let after = pod(&client, &ns, "after", "sa-2", NODE, &[]).await.unwrap();
    proc.place(32, &uid_of(&after));
    let recovering = attestor.clone().with_pod_wait(Duration::from_secs(30));
    let got = recovering.attest_pid(32).await.unwrap();
    assert!(got.contains(&s("sa:sa-2")), "{got:?}");
    let got = attestor.attest_pid(31).await.unwrap();
    assert!(got.contains(&s("sa:sa-1")), "{got:?}");
    drop(server);
}
