//! The `k8s` attestor: which pod a process runs in, and what the API server says about that pod.
//!
//! pid -> `/proc/<pid>/cgroup` -> pod UID + container ID ([`super::cgroup`]) -> the pod, from a watch
//! of THIS node's pods only (field selector `spec.nodeName=<node>`, kept by a kube-runtime
//! reflector; the watcher relists by itself when the API server answers 410 Gone) -> selectors.
//!
//! Selectors (all of kind `k8s`): `ns:<namespace>`, `sa:<service account>`, `pod-uid:<uid>`,
//! `pod-name:<name>`, `node-name:<node>`, `pod-label:<key>:<value>` for every label, and
//! `container-name:<name>` when the container ID is in the pod's status.
//!
//! Start-up race: the kubelet starts a container before the agent's watch has necessarily delivered
//! its pod, so a pod UID the store does not know is looked up again for a short while
//! ([`DEFAULT_POD_WAIT`]) before the process is refused. Because the watch only holds this node's
//! pods, a process in a pod of another node (a forged cgroup, a stale directory) never matches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use meshward_identity::TrustDomain;
use meshward_identity::proto::ca as pb;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;

use super::cgroup::{self, CgroupError, PodCgroup};
use super::{AttestError, AttestFuture, Attestor, Selector};

/// The selector kind of this attestor.
pub const KIND: &str = "k8s";

/// How long an unknown pod UID is looked up again before the process is refused.
pub const DEFAULT_POD_WAIT: Duration = Duration::from_secs(2);

/// The entry id prefix of the implicit (pod-derived) entries.
pub const IMPLICIT_PREFIX: &str = "k8s-implicit:";

/// How often the store is looked at while waiting for a pod.
const POLL: Duration = Duration::from_millis(50);

/// Why a process is not a workload of a pod on this node.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// Its cgroups do not place it in exactly one pod.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// No pod with that UID is among this node's pods, even after waiting: it is on another node,
    /// deleted, or the API server is unreachable.
    #[error(
        "pod `{uid}` is not on this node `{node}` (not among its pods after waiting {}ms; deleted, on another node, or the pod watch is not synced)",
        waited.as_millis()
    )]
    NotOnThisNode {
        /// The pod UID from the cgroup file.
        uid: String,
        /// This node.
        node: String,
        /// How long it was looked for.
        waited: Duration,
    },
    /// The pod has finished (`Succeeded` or `Failed`): its processes have no business asking.
    #[error("pod `{pod}` has finished (phase `{phase}`)")]
    PodFinished {
        /// `namespace/name`.
        pod: String,
        /// Its phase.
        phase: String,
    },
    /// The pod lacks a field every admitted pod has.
    #[error("pod `{uid}` has no `{field}`")]
    PodIncomplete {
        /// The pod UID.
        uid: String,
        /// The missing field.
        field: &'static str,
    },
}

/// Why the Kubernetes API client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig (or the in-cluster config) is unusable.
    #[error("cannot configure the kubernetes api client{}: {reason}", kubeconfig.as_ref().map(|p| format!(" from `{}`", p.display())).unwrap_or_default())]
    Config {
        /// The kubeconfig file, if one was given.
        kubeconfig: Option<PathBuf>,
        /// What kube said.
        reason: String,
    },
}

/// A client from `kubeconfig`, or else the in-cluster config (or `KUBECONFIG`).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, ClientError> {
    let fail = |reason: String| ClientError::Config {
        kubeconfig: kubeconfig.map(std::path::Path::to_path_buf),
        reason,
    };
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| fail(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| fail(e.to_string()))
}

/// Attests processes against this node's pods; cheap to clone. The pod watch runs as long as any
/// clone lives.
#[derive(Clone)]
pub struct K8sAttestor {
    node_name: String,
    proc_root: PathBuf,
    pod_wait: Duration,
    pods: Store<Pod>,
    _watch: Arc<WatchTask>,
}

/// Aborts the watch task when the last attestor clone is dropped.
struct WatchTask(JoinHandle<()>);

impl K8sAttestor {
    /// Starts watching `node_name`'s pods through `client` (on the current tokio runtime) and
    /// attests against the real `/proc`.
    pub fn start(client: Client, node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        let (pods, writer) = reflector::store::<Pod>();
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let node = node_name.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, config).default_backoff().reflect(writer);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                // The watcher retries by itself (with backoff) and relists on 410; an error here
                // is only worth a log line.
                if let Err(e) = event {
                    tracing::warn!(node = %node, error = %e, "pod watch failed; retrying");
                }
            }
        });
        Self {
            node_name,
            proc_root: PathBuf::from("/proc"),
            pod_wait: DEFAULT_POD_WAIT,
            pods,
            _watch: Arc::new(WatchTask(task)),
        }
    }

    /// Reads `<proc_root>/<pid>/cgroup` instead of `/proc` (tests, a host procfs mounted elsewhere).
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// Looks for an unknown pod this long before refusing (default [`DEFAULT_POD_WAIT`]).
    pub fn with_pod_wait(mut self, wait: Duration) -> Self {
        self.pod_wait = wait;
        self
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Waits until the pod watch has listed once; `false` if it did not within `timeout`.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.pods.wait_until_ready()).await,
            Ok(Ok(()))
        )
    }

    /// Every pod of this node the watch currently knows.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }

    /// One implicit entry per service account with a pod on this node that has not finished:
    /// `spiffe://TD/ns/<ns>/sa/<sa>` for selectors `k8s:ns:<ns>` + `k8s:sa:<sa>` (the CA checks
    /// the pod itself before it signs).
    pub fn implicit_entries(&self, td: &TrustDomain) -> Vec<pb::Entry> {
        let accounts: BTreeSet<(String, String)> = self
            .pods
            .state()
            .iter()
            .filter(|p| !finished(p))
            .filter_map(|p| pod_identity(p).map(|(ns, sa)| (ns.to_owned(), sa.to_owned())))
            .collect();
        accounts
            .into_iter()
            .filter_map(|(ns, sa)| {
                let id = td.workload_id(&["ns", &ns, "sa", &sa]).ok()?;
                Some(pb::Entry {
                    id: format!("{IMPLICIT_PREFIX}{ns}/{sa}"),
                    spiffe_id: id.to_string(),
                    selectors: vec![
                        pb::Selector {
                            r#type: KIND.into(),
                            value: format!("ns:{ns}"),
                        },
                        pb::Selector {
                            r#type: KIND.into(),
                            value: format!("sa:{sa}"),
                        },
                    ],
                    node: self.node_name.clone(),
                    ..pb::Entry::default()
                })
            })
            .collect()
    }

    /// The `k8s` selectors of process `pid`.
    pub async fn attest_pid(&self, pid: i32) -> Result<Vec<Selector>, AttestError> {
        let dir = self.proc_root.join(pid.to_string());
        let started = start_time(pid, &dir)?;
        let path = dir.join("cgroup");
        let content = match tokio::fs::read_to_string(&path).await {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AttestError::ProcessGone(pid));
            }
            Err(source) => return Err(AttestError::Io { pid, path, source }),
        };
        // INVARIANT: the cgroup file read is that of the process that started at `started`; a
        // pid reused in between would lend another process's pod.
        if start_time(pid, &dir)? != started {
            return Err(AttestError::PidReused(pid));
        }
        let in_pod = cgroup::parse(&content).map_err(|e| k8s_error(pid, e.into()))?;
        let pod = self
            .find_pod(&in_pod.pod_uid)
            .await
            .map_err(|e| k8s_error(pid, e))?;
        selectors(&pod, &in_pod, &self.node_name).map_err(|e| k8s_error(pid, e))
    }

    /// The pod with `uid`, waiting up to the pod wait for the watch to deliver it.
    async fn find_pod(&self, uid: &str) -> Result<Arc<Pod>, K8sError> {
        let started = Instant::now();
        let deadline = started + self.pod_wait;
        loop {
            let found = self
                .pods
                .find(|p| p.metadata.uid.as_deref() == Some(uid))
                // A reflector keyed by this node should only hold its pods; check anyway, so a
                // mis-scoped watch can never vouch for another node's pod.
                .filter(|p| on_node(p, &self.node_name));
            if let Some(pod) = found {
                return Ok(pod);
            }
            if Instant::now() >= deadline {
                return Err(K8sError::NotOnThisNode {
                    uid: uid.to_owned(),
                    node: self.node_name.clone(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Attestor for K8sAttestor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn attest(&self, pid: i32) -> AttestFuture<'_> {
        Box::pin(self.attest_pid(pid))
    }
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("node_name", &self.node_name)
            .field("proc_root", &self.proc_root)
            .field("pod_wait", &self.pod_wait)
            .finish_non_exhaustive()
    }
}

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The namespace and service account of a pod: what its workload identity is made of.
pub fn pod_identity(pod: &Pod) -> Option<(&str, &str)> {
    let ns = pod.metadata.namespace.as_deref()?;
    let sa = pod.spec.as_ref()?.service_account_name.as_deref()?;
    Some((ns, sa))
}

/// The process's start time; a vanished process is [`AttestError::ProcessGone`].
fn start_time(pid: i32, dir: &std::path::Path) -> Result<u64, AttestError> {
    super::unix::start_time(pid, dir).map_err(|e| match e {
        AttestError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            AttestError::ProcessGone(pid)
        }
        other => other,
    })
}

/// Whether the pod has finished (`Succeeded` or `Failed`).
fn finished(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"))
}

/// Whether the pod is scheduled on `node`.
fn on_node(pod: &Pod, node: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| n == node)
}

fn k8s_error(pid: i32, source: K8sError) -> AttestError {
    AttestError::K8s { pid, source }
}

/// The selectors of a process in `pod` (and, if known, in one of its containers).
fn selectors(pod: &Pod, in_pod: &PodCgroup, node: &str) -> Result<Vec<Selector>, K8sError> {
    let uid = &in_pod.pod_uid;
    let incomplete = |field| K8sError::PodIncomplete {
        uid: uid.clone(),
        field,
    };
    let ns = pod
        .metadata
        .namespace
        .as_deref()
        .ok_or_else(|| incomplete("metadata.namespace"))?;
    let name = pod
        .metadata
        .name
        .as_deref()
        .ok_or_else(|| incomplete("metadata.name"))?;
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .ok_or_else(|| incomplete("spec.serviceAccountName"))?;
    let status = pod.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return Err(K8sError::PodFinished {
            pod: format!("{ns}/{name}"),
            phase: phase.to_owned(),
        });
    }
    let mut out = vec![
        Selector::new(KIND, format!("ns:{ns}")),
        Selector::new(KIND, format!("sa:{sa}")),
        Selector::new(KIND, format!("pod-uid:{uid}")),
        Selector::new(KIND, format!("pod-name:{name}")),
        Selector::new(KIND, format!("node-name:{node}")),
    ];
    let empty = BTreeMap::new();
    for (k, v) in pod.metadata.labels.as_ref().unwrap_or(&empty) {
        out.push(Selector::new(KIND, format!("pod-label:{k}:{v}")));
    }
    if let Some(container) = in_pod
        .container_id
        .as_deref()
        .and_then(|id| container_name(pod, id))
    {
        out.push(Selector::new(KIND, format!("container-name:{container}")));
    }
    Ok(out)
}

/// The name of the container (regular, init or ephemeral) whose status carries `id`
/// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
fn container_name<'p>(pod: &'p Pod, id: &str) -> Option<&'p str> {
    let status = pod.status.as_ref()?;
    let lists: [&Option<Vec<ContainerStatus>>; 3] = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    lists
        .into_iter()
        .flatten()
        .flatten()
        .find(|c| {
            c.container_id
                .as_deref()
                .and_then(|full| full.split_once("://"))
                .is_some_and(|(_, cid)| cid == id)
        })
        .map(|c| c.name.as_str())
}

#[cfg(test)]
mod tests;
