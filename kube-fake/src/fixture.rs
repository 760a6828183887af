//! Cluster fixtures that work the same against the fake and the real (bare, controller-less) API
//! server: a fresh namespace with its `default` ServiceAccount, Nodes, pods bound to a node with
//! `automountServiceAccountToken: false`, pod status patches, immediate deletion, TokenRequest and
//! TokenReview.

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use thiserror::Error;

/// A fixture step failed.
#[derive(Debug, Error)]
pub enum FixtureError {
    /// The API server refused or failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// A TokenRequest answer without `status.token`.
    #[error("token request for `{0}` returned no token")]
    NoToken(String),
    /// An object the server returned lacks a field it always sets.
    #[error("{0} `{1}` has no `{2}`")]
    Missing(&'static str, String, &'static str),
}

/// A name unique in this process and across runs: `<prefix>-<8 hex>`.
pub fn unique_name(prefix: &str) -> String {
    let bytes = crate::object::random_bytes::<4>();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Creates a fresh namespace `<prefix>-<random>` and its `default` ServiceAccount (no controller
/// creates it on a bare server); returns the namespace name.
pub async fn create_namespace(client: &Client, prefix: &str) -> Result<String, FixtureError> {
    let name = unique_name(prefix);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))
        .map_err(kube::Error::SerdeError)?;
    namespaces.create(&PostParams::default(), &ns).await?;
    create_service_account(client, &name, "default").await?;
    Ok(name)
}

/// Creates a ServiceAccount (`automountServiceAccountToken: false`).
pub async fn create_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<ServiceAccount, FixtureError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": name}, "automountServiceAccountToken": false}),
    )
    .map_err(kube::Error::SerdeError)?;
    Ok(api.create(&PostParams::default(), &sa).await?)
}

/// Creates a Node, or returns the existing one (Nodes are cluster-wide, shared by tests).
pub async fn ensure_node(client: &Client, name: &str) -> Result<Node, FixtureError> {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
    )
    .map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &node).await {
        Ok(node) => Ok(node),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(api.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Creates a pod on `node` running as `service_account`, with `labels`; one `pause` container that no
/// kubelet ever runs, and no token automount (a bare 1.20 server would refuse it).
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
    labels: &[(&str, &str)],
) -> Result<Pod, FixtureError> {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}],
        },
    }))
    .map_err(kube::Error::SerdeError)?;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(api.create(&PostParams::default(), &pod).await?)
}

/// Sets `status.phase` (and a pod IP for `Running`) through the status subresource, as a kubelet would.
pub async fn set_pod_phase(
    client: &Client,
    namespace: &str,
    name: &str,
    phase: &str,
) -> Result<Pod, FixtureError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = if phase == "Running" {
        json!({"phase": phase, "podIP": "10.244.0.10", "conditions": [{"type": "Ready", "status": "True"}]})
    } else {
        json!({"phase": phase})
    };
    Ok(api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?)
}

/// Deletes a pod with grace period 0 (gone at once; nothing else would ever finish a graceful delete).
pub async fn delete_pod_now(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), FixtureError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    Ok(())
}

/// TokenRequest: a token for `service_account`, bound to `pod` (name and UID), for `audiences`,
/// valid `expiration_seconds` (at least 600).
pub async fn request_pod_token(
    client: &Client,
    pod: &Pod,
    service_account: &str,
    audiences: &[&str],
    expiration_seconds: i64,
) -> Result<String, FixtureError> {
    let pod_name = pod
        .metadata
        .name
        .clone()
        .ok_or_else(|| FixtureError::Missing("pod", String::new(), "metadata.name"))?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| FixtureError::Missing("pod", pod_name.clone(), "metadata.namespace"))?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(expiration_seconds),
        },
        ..TokenRequest::default()
    };
    let answer = api
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    answer
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FixtureError::NoToken(service_account.to_owned()))
}

/// TokenReview of `token` for `audiences` (empty = the server's API audiences); the review's status.
pub async fn review_token(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> Result<TokenReviewStatus, FixtureError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: (!audiences.is_empty())
                .then(|| audiences.iter().map(|a| (*a).to_owned()).collect()),
        },
        ..TokenReview::default()
    };
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.unwrap_or_default())
}
