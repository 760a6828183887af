//! Node-scoped entitlement from the pods running on a node, kept by a watch of the cluster's pods.
//!
//! One kube-runtime `watcher` of every pod (the CA serves every node) feeds a cache indexed by node
//! ([`PodIndex`]); a mint reads its agent's node from it instead of listing pods. The watcher resumes
//! a dropped watch from its last revision and relists when the apiserver answers 410 Gone; a relist
//! replaces the index only once complete, so issuance keeps working through it.
//!
//! Fail-closed rules:
//! - Until the first list has completed, every mint is refused ([`K8sError::PodCache`], retryable):
//!   an empty cache must not read as "no pods", and nothing is allowed on an answer not yet had.
//! - A delete (or a pod leaving `Running`) takes effect when the watch delivers it.
//! - While the watch is failing (an error since its last event), the cache may be missing deletes,
//!   so every mint lists the node's pods live, as if there were no cache; a failed list fails the call.
//! - A pod the cache has not seen yet (created a moment ago) is looked up live once, bounded by
//!   [`LOOKUP_TIMEOUT`], before it is refused, so a new pod is not refused by a race with the watch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use meshward_identity::SpiffeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use super::{Cluster, K8sError};

/// How long a mint waits for the first pod list before it is refused as not synced.
pub const SYNC_WAIT: Duration = Duration::from_secs(2);

/// How long one live lookup of a node's pods may take before the mint gives up on it.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A pod running on a node, as far as issuance cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Its service account (`default` when the spec names none).
    pub service_account: String,
}

/// The pods running on one node at one moment: the Kubernetes entitlements of that node's agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePods {
    node: String,
    pods: Vec<RunningPod>,
}

impl NodePods {
    /// `pods` (already known to be running) on `node`.
    pub fn new(node: &str, pods: Vec<RunningPod>) -> Self {
        Self {
            node: node.to_owned(),
            pods,
        }
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The running pods.
    pub fn pods(&self) -> &[RunningPod] {
        &self.pods
    }

    /// Whether `id` is `…/ns/<ns>/sa/<sa>` of a pod running here; with `pod_uid`, that pod must be
    /// the one. The trust domain is the issuer's to check.
    pub fn entitles(&self, id: &SpiffeId, pod_uid: Option<&str>) -> bool {
        let segments: Vec<&str> = id.segments().collect();
        let ["ns", namespace, "sa", service_account] = segments.as_slice() else {
            return false;
        };
        self.pods.iter().any(|pod| {
            pod.namespace == *namespace
                && pod.service_account == *service_account
                && pod_uid.is_none_or(|uid| uid == pod.uid)
        })
    }

    /// Whether every `(spiffe id, pod uid)` in `wanted` that a pod could entitle (`…/ns/<ns>/sa/<sa>`)
    /// is entitled here. Other IDs (unparsable, or another shape) are the issuer's to judge from its
    /// entries; no pod lookup would change that.
    pub fn entitles_all<'a>(
        &self,
        wanted: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> bool {
        wanted
            .into_iter()
            .all(|(id, uid)| match SpiffeId::parse(id) {
                Ok(id) if is_pod_shaped(&id) => self.entitles(&id, uid),
                _ => true,
            })
    }
}

impl Cluster {
    /// Starts the watch of the cluster's pods (once; later calls do nothing). Node-scoped issuance
    /// starts it on first use; the server starts it at once so it has synced before agents ask.
    pub fn start_pod_watch(&self) {
        self.pod_cache();
    }

    /// Whether the pod watch has completed its first list.
    pub fn pods_synced(&self) -> bool {
        self.pod_cache().index().synced
    }

    /// The pods on `node` that are `Running` and not terminating, from the pod watch (waiting up to
    /// [`SYNC_WAIT`] for its first list), or listed live while the watch is failing.
    pub async fn node_pods(&self, node: &str) -> Result<NodePods, K8sError> {
        self.node_pods_for(node, []).await
    }

    /// [`Cluster::node_pods`] for a mint of `wanted` (`(spiffe id, pod uid)` pairs): when the cached
    /// view does not entitle all of them, the node's pods are looked up live once (a pod the watch
    /// has not delivered yet) and that answer is used; if the lookup fails, the cached view stands
    /// and the unseen pod is refused.
    pub async fn node_pods_for<'a>(
        &self,
        node: &str,
        wanted: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<NodePods, K8sError> {
        let cache = self.pod_cache();
        let cached = match cache.node(node) {
            Some(cached) => cached,
            None if !cache.index().synced => {
                cache.wait_synced(SYNC_WAIT).await;
                match cache.node(node) {
                    Some(cached) => cached,
                    None => return self.unsynced_or_live(node).await,
                }
            }
            // Synced, but the watch failed since its last event: deletes may be missing.
            None => return self.node_pods_live(node).await,
        };
        if cached.entitles_all(wanted) {
            return Ok(cached);
        }
        match self.node_pods_live(node).await {
            Ok(live) => Ok(live),
            Err(e) => {
                tracing::warn!(node, error = %e, "live lookup of a pod the cache has not seen failed; refusing it");
                Ok(cached)
            }
        }
    }

    /// The pods on `node` listed live from the apiserver now (fieldSelector `spec.nodeName`), bounded
    /// by [`LOOKUP_TIMEOUT`].
    pub async fn node_pods_live(&self, node: &str) -> Result<NodePods, K8sError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = tokio::time::timeout(LOOKUP_TIMEOUT, pods.list(&params))
            .await
            .map_err(|_| K8sError::Api {
                doing: "list the node's pods",
                reason: format!("no answer within {}ms", LOOKUP_TIMEOUT.as_millis()),
            })?
            .map_err(|e| K8sError::api("list the node's pods", e))?;
        let running = list
            .items
            .iter()
            .filter_map(running_on)
            .filter(|(on, _)| on == node)
            .map(|(_, pod)| pod)
            .collect();
        Ok(NodePods::new(node, running))
    }

    /// Not synced even after waiting: refused, unless the watch synced meanwhile and is failing.
    async fn unsynced_or_live(&self, node: &str) -> Result<NodePods, K8sError> {
        if self.pod_cache().index().synced {
            return self.node_pods_live(node).await;
        }
        Err(K8sError::PodCache(
            "not yet synced (the first list of the cluster's pods has not completed)".to_owned(),
        ))
    }

    fn pod_cache(&self) -> &PodCache {
        self.pods
            .0
            .get_or_init(|| PodCache::start(self.client.clone(), self.name.clone()))
    }
}

/// Where a [`Cluster`] keeps its pod cache, started on first use; shared by its clones.
#[derive(Default)]
pub(super) struct PodCacheSlot(OnceLock<PodCache>);

/// The pod index, its first-sync signal, and the watch task feeding them (aborted on drop).
struct PodCache {
    index: Arc<Mutex<PodIndex>>,
    synced: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl PodCache {
    fn start(client: kube::Client, cluster: String) -> Self {
        let index = Arc::new(Mutex::new(PodIndex::default()));
        let (synced_tx, synced) = watch::channel(false);
        let api: Api<Pod> = Api::all(client);
        let task = tokio::spawn({
            let index = Arc::clone(&index);
            async move {
                let stream = watcher(api, watcher::Config::default()).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let synced_now = match event {
                        Ok(event) => lock(&index).apply(event),
                        Err(e) => {
                            // The watcher retries by itself (backoff) and relists after 410; until
                            // its next event, mints list live.
                            tracing::warn!(cluster = %cluster, error = %e, "pod watch failed; retrying");
                            lock(&index).failing = true;
                            false
                        }
                    };
                    if synced_now {
                        synced_tx.send_replace(true);
                    }
                }
            }
        });
        Self {
            index,
            synced,
            task,
        }
    }

    fn index(&self) -> MutexGuard<'_, PodIndex> {
        lock(&self.index)
    }

    /// The node's pods from the cache, if it can be trusted now.
    fn node(&self, node: &str) -> Option<NodePods> {
        let index = self.index();
        (index.synced && !index.failing).then(|| index.node(node))
    }

    async fn wait_synced(&self, timeout: Duration) {
        let mut synced = self.synced.clone();
        let _ = tokio::time::timeout(timeout, synced.wait_for(|s| *s)).await;
    }
}

impl Drop for PodCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(index: &Mutex<PodIndex>) -> MutexGuard<'_, PodIndex> {
    // Every update leaves the index consistent, so a panic elsewhere cannot have torn it.
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running pods by node, as the watch last said.
#[derive(Debug, Default)]
pub(super) struct PodIndex {
    /// node -> pod uid -> pod.
    by_node: HashMap<String, HashMap<String, RunningPod>>,
    /// pod uid -> node, to drop a pod that stops running or is deleted.
    node_of: HashMap<String, String>,
    /// A relist in progress: replaces the index at its end (`InitDone`).
    relist: Option<Vec<(String, RunningPod)>>,
    /// The first list has completed.
    pub(super) synced: bool,
    /// The watch failed since its last event.
    pub(super) failing: bool,
}

impl PodIndex {
    /// Applies one watch event; `true` when it completed a list.
    pub(super) fn apply(&mut self, event: watcher::Event<Pod>) -> bool {
        // `Init` and `InitApply` leave `failing` alone: until the relist completes, the index may
        // still lack deletes the failed watch never delivered.
        match event {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(relist), Some(running)) = (self.relist.as_mut(), running_on(&pod)) {
                    relist.push(running);
                }
                false
            }
            watcher::Event::InitDone => {
                self.by_node.clear();
                self.node_of.clear();
                for (node, pod) in self.relist.take().unwrap_or_default() {
                    self.insert(node, pod);
                }
                self.synced = true;
                self.failing = false;
                true
            }
            watcher::Event::Apply(pod) => {
                self.failing = false;
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.remove(uid);
                }
                if let Some((node, pod)) = running_on(&pod) {
                    self.insert(node, pod);
                }
                false
            }
            watcher::Event::Delete(pod) => {
                self.failing = false;
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.remove(uid);
                }
                false
            }
        }
    }

    /// The running pods on `node`.
    pub(super) fn node(&self, node: &str) -> NodePods {
        let mut pods: Vec<RunningPod> = self
            .by_node
            .get(node)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        NodePods::new(node, pods)
    }

    fn insert(&mut self, node: String, pod: RunningPod) {
        self.node_of.insert(pod.uid.clone(), node.clone());
        self.by_node
            .entry(node)
            .or_default()
            .insert(pod.uid.clone(), pod);
    }

    fn remove(&mut self, uid: &str) {
        let Some(node) = self.node_of.remove(uid) else {
            return;
        };
        if let Some(pods) = self.by_node.get_mut(&node) {
            pods.remove(uid);
            if pods.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }
}

/// Whether `id` is `…/ns/<ns>/sa/<sa>`, the only shape a pod entitles.
fn is_pod_shaped(id: &SpiffeId) -> bool {
    let segments: Vec<&str> = id.segments().collect();
    matches!(segments.as_slice(), ["ns", _, "sa", _])
}

/// The pod's node and the pod as a [`RunningPod`] if it is `Running` on a node and not terminating.
fn running_on(pod: &Pod) -> Option<(String, RunningPod)> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if pod.status.as_ref()?.phase.as_deref() != Some("Running") {
        return None;
    }
    let running = RunningPod {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    };
    Some((node, running))
}

#[cfg(test)]
mod tests;
