//! Node-scoped entitlement from the pods running on a node.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use meshward_identity::SpiffeId;

use super::{Cluster, K8sError};

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
}

impl Cluster {
    /// The pods on `node` that are `Running` and not terminating, listed live from the apiserver.
    pub async fn node_pods(&self, node: &str) -> Result<NodePods, K8sError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| K8sError::api("list the node's pods", e))?;
        let running = list
            .items
            .iter()
            .filter_map(|pod| running_on(pod, node))
            .collect();
        Ok(NodePods::new(node, running))
    }
}

/// The pod as a [`RunningPod`] if it runs on `node` now (the field selector already chose the node;
/// checked again so a server that ignores selectors cannot widen entitlements).
fn running_on(pod: &Pod, node: &str) -> Option<RunningPod> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if pod.status.as_ref()?.phase.as_deref() != Some("Running") {
        return None;
    }
    Some(RunningPod {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    })
}
