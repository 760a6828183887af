//! Kubernetes mode (DESIGN §3 flows 2–3, §5): node attestation with the agent's projected
//! service-account token (PSAT), and node-scoped issuance from the pods the cluster says run there.
//!
//! - Attestation ([`Cluster::attest_psat`]): a TokenReview (audience [`PSAT_AUDIENCE`]) must say
//!   `authenticated: true` for exactly the configured agent service account; the token's pod extras
//!   (`pod-name`, `pod-uid`) are required, and that pod must exist in the service account's namespace,
//!   carry the token's UID (a pod deleted and recreated under the same name is another pod), be
//!   scheduled on a node and not be terminating. The newer servers' `node-name`/`node-uid` extras are
//!   optional (1.20 lacks them) but must match the pod's node when present. The agent's identity is
//!   `spiffe://<td>/meshward/agent/k8s_psat/<cluster>/<node>`.
//! - Issuance ([`Cluster::node_pods_for`]): the pods on the agent's node come from a watch of the
//!   cluster's pods, indexed by node (see `pods` for its fail-closed rules), and `spiffe://<td>/ns/<ns>/sa/<sa>` is entitled only while a pod
//!   of that service account is `Running` there and not terminating. The apiserver caches positive
//!   TokenReviews for ~10 s, so the pod is what is checked, never a workload's token.
//!
//! Every apiserver failure is an error ([`K8sError::Api`]): the caller fails closed (nothing is
//! attested or minted on the strength of an answer it did not get) and keeps serving.

mod bundle;
mod lease;
mod pods;
mod review;
mod secret;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use kube::config::{KubeConfigOptions, Kubeconfig};

use meshward_identity::{SpiffeId, TrustDomain};
use thiserror::Error;

pub use bundle::{BUNDLE_CONFIGMAP, BUNDLE_PEM_KEY, JWKS_KEY};
pub use lease::ROTATION_LEASE;
pub use pods::{LOOKUP_TIMEOUT, NodePods, RunningPod, SYNC_WAIT};
pub use review::AttestedNode;
pub use secret::{KEYS_SECRET, KeyFiles, StoredKeys};

/// The audience an agent's projected token must be issued for.
pub const PSAT_AUDIENCE: &str = "meshward-ca";

/// The attestation method's path segment in agent IDs.
pub const PSAT_SEGMENT: &str = "k8s_psat";

/// The default agent service account (`--agent-sa`).
pub const DEFAULT_AGENT_SA: &str = "meshward:meshward-agent";

/// The default cluster name (`--cluster`).
pub const DEFAULT_CLUSTER: &str = "cluster";

/// The default namespace of the CA's own objects (`--namespace`) outside a cluster.
pub const DEFAULT_NAMESPACE: &str = "meshward";

/// How the CA reaches its cluster (`meshward ca run --k8s ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    /// A kubeconfig file; `None` for the in-cluster config (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the CA's own objects.
    pub namespace: String,
    /// The cluster name in agent IDs.
    pub cluster: String,
    /// The service account agents run as.
    pub agent_sa: ServiceAccountRef,
}

impl K8sConfig {
    /// Defaults for everything but the kubeconfig: in-cluster, namespace [`DEFAULT_NAMESPACE`],
    /// cluster [`DEFAULT_CLUSTER`], agents as [`DEFAULT_AGENT_SA`].
    pub fn new(kubeconfig: Option<PathBuf>) -> Result<Self, K8sError> {
        Ok(Self {
            kubeconfig,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            cluster: DEFAULT_CLUSTER.to_owned(),
            agent_sa: DEFAULT_AGENT_SA.parse()?,
        })
    }

    /// Checks the names (the kubeconfig is read at start).
    pub fn validate(&self) -> Result<(), K8sError> {
        check_segment(&self.cluster)?;
        if !is_dns_label(&self.namespace) {
            return Err(K8sError::BadName(
                self.namespace.clone(),
                "a namespace is a DNS label".to_owned(),
            ));
        }
        Ok(())
    }

    /// Builds the client (kubeconfig file, else in-cluster) and the CA's view of the cluster.
    pub async fn connect(&self) -> Result<Cluster, K8sError> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(|e| K8sError::Connect {
                    from: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| K8sError::Connect {
                        from: path.display().to_string(),
                        reason: e.to_string(),
                    })?
            }
            None => kube::Config::incluster().map_err(|e| K8sError::Connect {
                from: "in-cluster config".to_owned(),
                reason: e.to_string(),
            })?,
        };
        let client = kube::Client::try_from(config).map_err(|e| K8sError::Connect {
            from: "kube client".to_owned(),
            reason: e.to_string(),
        })?;
        Cluster::new(client, &self.cluster, self.agent_sa.clone())
    }
}

/// A service account, `namespace:name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccountRef {
    /// The username a TokenReview reports for it: `system:serviceaccount:<ns>:<name>`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccountRef {
    type Err = K8sError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || K8sError::BadServiceAccount(s.to_owned());
        let (namespace, name) = s.split_once(':').ok_or_else(bad)?;
        if !is_dns_label(namespace) || !is_dns_subdomain(name) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// Why a Kubernetes check refused or could not be made.
#[derive(Debug, Error)]
pub enum K8sError {
    /// The apiserver failed or could not be reached; nothing is admitted on a missing answer.
    #[error(
        "kubernetes api while trying to {doing}: {reason}; check the apiserver and the ca's rbac"
    )]
    Api {
        /// What was being done.
        doing: &'static str,
        /// The cause.
        reason: String,
    },
    /// The TokenReview rejected the token (bad audience, expired, garbage, bound object gone).
    #[error("token refused by the apiserver: {0}")]
    TokenRejected(String),
    /// The TokenReview neither rejected nor authenticated the token.
    #[error("token not authenticated by the apiserver")]
    NotAuthenticated,
    /// The token belongs to another service account.
    #[error("token of `{username}` refused: only `{expected}` may attest as an agent")]
    WrongServiceAccount {
        /// The username the review reported.
        username: String,
        /// The configured agent service account's username.
        expected: String,
    },
    /// The token lacks a required extra (it is not a pod-bound projected token).
    #[error(
        "token has no `{0}` extra; use a projected service-account token bound to the agent's pod"
    )]
    MissingExtra(&'static str),
    /// The token's pod does not exist.
    #[error("pod `{namespace}/{name}` named by the token does not exist")]
    PodNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The pod of that name is another pod than the token was bound to.
    #[error("pod `{pod}` has uid `{actual}`, but the token is bound to uid `{token}`")]
    PodUidMismatch {
        /// `namespace/name`.
        pod: String,
        /// The token's pod UID.
        token: String,
        /// The pod's UID now.
        actual: String,
    },
    /// The pod is not on a node yet.
    #[error("pod `{0}` is not scheduled on a node")]
    PodNotScheduled(String),
    /// The pod is being deleted.
    #[error("pod `{0}` is terminating")]
    PodTerminating(String),
    /// The token's node extras disagree with the pod's node.
    #[error("token names node `{token}` ({what}), but pod `{pod}` is on node `{actual}`")]
    NodeMismatch {
        /// `namespace/name`.
        pod: String,
        /// Which extra disagreed (`node-name`, `node-uid`).
        what: &'static str,
        /// The token's value.
        token: String,
        /// The cluster's value.
        actual: String,
    },
    /// `--agent-sa` is not `namespace:name`.
    #[error("agent service account `{0}` is not `namespace:name`")]
    BadServiceAccount(String),
    /// No usable client configuration.
    #[error(
        "cannot configure the kubernetes client from {from}: {reason}; pass `--kubeconfig` or run in a pod"
    )]
    Connect {
        /// The kubeconfig path, or the in-cluster config.
        from: String,
        /// Why.
        reason: String,
    },
    /// The pod cache cannot answer (not synced yet); nothing is minted on a missing answer.
    #[error(
        "the ca's pod cache is {0}; retry shortly, and check the apiserver and the ca's rbac if it persists"
    )]
    PodCache(String),
    /// `--cluster` (or a node name) cannot be a SPIFFE ID path segment.
    #[error("`{0}` cannot name a cluster or node in an agent id: {1}")]
    BadName(String, String),
}

impl K8sError {
    /// The stable reason code (metrics label, logs).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Api { .. } => "k8s_api",
            Self::PodCache(_) => "pods_not_synced",
            Self::TokenRejected(_) | Self::NotAuthenticated => "bad_psat",
            Self::WrongServiceAccount { .. } => "wrong_service_account",
            Self::MissingExtra(_) => "not_pod_bound",
            Self::PodNotFound { .. }
            | Self::PodUidMismatch { .. }
            | Self::PodNotScheduled(_)
            | Self::PodTerminating(_)
            | Self::NodeMismatch { .. } => "bad_agent_pod",
            Self::BadServiceAccount(_) | Self::BadName(..) | Self::Connect { .. } => "bad_config",
        }
    }

    /// Whether this is the cluster's verdict on the caller (as opposed to the CA failing to ask).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Self::Api { .. }
                | Self::PodCache(_)
                | Self::BadServiceAccount(_)
                | Self::BadName(..)
                | Self::Connect { .. }
        )
    }

    fn api(doing: &'static str, e: kube::Error) -> Self {
        Self::Api {
            doing,
            reason: e.to_string(),
        }
    }
}

/// The CA's view of its cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    name: String,
    agent_sa: ServiceAccountRef,
    pods: std::sync::Arc<pods::PodCacheSlot>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("agent_sa", &self.agent_sa)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster `name` (a path segment of agent IDs) reached through `client`, whose agents run
    /// as `agent_sa`.
    pub fn new(
        client: kube::Client,
        name: &str,
        agent_sa: ServiceAccountRef,
    ) -> Result<Self, K8sError> {
        check_segment(name)?;
        Ok(Self {
            client,
            name: name.to_owned(),
            agent_sa,
            pods: std::sync::Arc::default(),
        })
    }

    /// The cluster name in agent IDs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent service account.
    pub fn agent_sa(&self) -> &ServiceAccountRef {
        &self.agent_sa
    }

    /// The kube client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// `spiffe://<td>/meshward/agent/k8s_psat/<cluster>/<node>`.
    pub fn agent_id(&self, td: &TrustDomain, node: &str) -> Result<SpiffeId, K8sError> {
        agent_id(td, &self.name, node)
    }
}

/// `spiffe://<td>/meshward/agent/k8s_psat/<cluster>/<node>`.
pub fn agent_id(td: &TrustDomain, cluster: &str, node: &str) -> Result<SpiffeId, K8sError> {
    check_segment(cluster)?;
    check_segment(node)?;
    td.workload_id(&["meshward", "agent", PSAT_SEGMENT, cluster, node])
        .map_err(|e| K8sError::BadName(node.to_owned(), e.to_string()))
}

/// Whether `id` is a Kubernetes-attested agent's ID (its node's pods entitle it).
pub fn is_k8s_agent(id: &SpiffeId) -> bool {
    let mut segments = id.segments();
    segments.next() == Some("meshward")
        && segments.next() == Some("agent")
        && segments.next() == Some(PSAT_SEGMENT)
}

fn check_segment(name: &str) -> Result<(), K8sError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(K8sError::BadName(
            name.to_owned(),
            "use lower-case letters, digits, `-` and `.` (a DNS subdomain)".to_owned(),
        ))
    }
}

/// RFC 1123 label: what namespaces are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what node and service-account names are.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
