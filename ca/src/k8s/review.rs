//! PSAT node attestation: TokenReview, then the token's pod.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

use super::{Cluster, K8sError, PSAT_AUDIENCE};

/// TokenReview extra: the bound pod's name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview extra: the bound pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// TokenReview extra (newer servers): the pod's node name.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// TokenReview extra (newer servers): the pod's node UID.
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

/// What a verified agent token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The node the agent's pod runs on.
    pub node: String,
    /// The agent pod's namespace.
    pub namespace: String,
    /// The agent pod's name.
    pub pod_name: String,
    /// The agent pod's UID.
    pub pod_uid: String,
}

impl Cluster {
    /// Verifies an agent's projected service-account token and returns the node it proves (see the
    /// module docs for every rule).
    pub async fn attest_psat(&self, token: &str) -> Result<AttestedNode, K8sError> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![PSAT_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| K8sError::api("review an agent token", e))?;
        let status = answer.status.unwrap_or_default();
        if let Some(error) = status.error.filter(|e| !e.is_empty()) {
            return Err(K8sError::TokenRejected(error));
        }
        if status.authenticated != Some(true) {
            return Err(K8sError::NotAuthenticated);
        }
        // The API server says which audiences it checked; an answer for others is no answer.
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| a == PSAT_AUDIENCE)
        {
            return Err(K8sError::TokenRejected(format!(
                "token audiences `{}` lack `{PSAT_AUDIENCE}`",
                audiences.join(",")
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = self.agent_sa.username();
        if username != expected {
            return Err(K8sError::WrongServiceAccount { username, expected });
        }
        let extra = user.extra.unwrap_or_default();
        let pod_name = single(&extra, EXTRA_POD_NAME)?.ok_or(K8sError::MissingExtra("pod-name"))?;
        let pod_uid = single(&extra, EXTRA_POD_UID)?.ok_or(K8sError::MissingExtra("pod-uid"))?;
        let namespace = self.agent_sa.namespace.clone();
        let pod_ref = format!("{namespace}/{pod_name}");

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| K8sError::api("read the agent's pod", e))?
            .ok_or_else(|| K8sError::PodNotFound {
                namespace: namespace.clone(),
                name: pod_name.clone(),
            })?;
        let actual_uid = pod.metadata.uid.clone().unwrap_or_default();
        if actual_uid != pod_uid {
            return Err(K8sError::PodUidMismatch {
                pod: pod_ref,
                token: pod_uid,
                actual: actual_uid,
            });
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(K8sError::PodTerminating(pod_ref));
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| K8sError::PodNotScheduled(pod_ref.clone()))?;
        if let Some(token_node) = single(&extra, EXTRA_NODE_NAME)?
            && token_node != node
        {
            return Err(K8sError::NodeMismatch {
                pod: pod_ref,
                what: "node-name",
                token: token_node,
                actual: node,
            });
        }
        if let Some(token_node_uid) = single(&extra, EXTRA_NODE_UID)? {
            let nodes: Api<Node> = Api::all(self.client.clone());
            let node_uid = nodes
                .get_opt(&node)
                .await
                .map_err(|e| K8sError::api("read the agent's node", e))?
                .and_then(|n| n.metadata.uid)
                .unwrap_or_default();
            if node_uid != token_node_uid {
                return Err(K8sError::NodeMismatch {
                    pod: pod_ref,
                    what: "node-uid",
                    token: token_node_uid,
                    actual: node_uid,
                });
            }
        }
        Ok(AttestedNode {
            node,
            namespace,
            pod_name,
            pod_uid,
        })
    }
}

/// The one value of a list-valued extra; absent or empty is `None`, several values are refused.
fn single(
    extra: &BTreeMap<String, Vec<String>>,
    key: &'static str,
) -> Result<Option<String>, K8sError> {
    match extra.get(key).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([value]) if !value.is_empty() => Ok(Some(value.clone())),
        Some(_) => Err(K8sError::TokenRejected(format!(
            "extra `{key}` must have exactly one non-empty value"
        ))),
    }
}
