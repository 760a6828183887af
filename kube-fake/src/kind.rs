//! The kinds the fake serves: their URL names, `kind`/`apiVersion`, scope, field labels, and the typed
//! `k8s-openapi` struct every body is checked against so wire shapes match the real server.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, ServiceAccount};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One served resource type.
#[derive(Debug)]
pub(crate) struct Kind {
    /// The plural URL segment (`pods`).
    pub resource: &'static str,
    /// The `kind` field (`Pod`).
    pub kind: &'static str,
    /// The `apiVersion` field (`v1`, `coordination.k8s.io/v1`).
    pub api_version: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `status` is only written through the `/status` subresource.
    pub status_subresource: bool,
    /// Whether PUT on a missing object creates it (leases do on the real server).
    pub create_on_update: bool,
    /// Field labels usable in `fieldSelector`.
    pub field_labels: &'static [&'static str],
    /// Deserializes into the typed struct; the error text is the real server's "decode" complaint.
    pub validate: fn(&Value) -> Result<(), String>,
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<(), String> {
    T::deserialize(value).map(|_| ()).map_err(|e| e.to_string())
}

const META_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

/// Every kind the fake serves, by URL group prefix.
pub(crate) static KINDS: &[Kind] = &[
    Kind {
        resource: "namespaces",
        kind: "Namespace",
        api_version: "v1",
        namespaced: false,
        status_subresource: true,
        create_on_update: false,
        field_labels: &["metadata.name", "status.phase"],
        validate: typed::<Namespace>,
    },
    Kind {
        resource: "pods",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
        status_subresource: true,
        create_on_update: false,
        field_labels: &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        validate: typed::<Pod>,
    },
    Kind {
        resource: "nodes",
        kind: "Node",
        api_version: "v1",
        namespaced: false,
        status_subresource: true,
        create_on_update: false,
        field_labels: &["metadata.name", "spec.unschedulable"],
        validate: typed::<Node>,
    },
    Kind {
        resource: "secrets",
        kind: "Secret",
        api_version: "v1",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        field_labels: &["metadata.name", "metadata.namespace", "type"],
        validate: typed::<Secret>,
    },
    Kind {
        resource: "configmaps",
        kind: "ConfigMap",
        api_version: "v1",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        field_labels: META_FIELDS,
        validate: typed::<ConfigMap>,
    },
    Kind {
        resource: "serviceaccounts",
        kind: "ServiceAccount",
        api_version: "v1",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        field_labels: META_FIELDS,
        validate: typed::<ServiceAccount>,
    },
    Kind {
        resource: "leases",
        kind: "Lease",
        api_version: "coordination.k8s.io/v1",
        namespaced: true,
        status_subresource: false,
        create_on_update: true,
        field_labels: META_FIELDS,
        validate: typed::<Lease>,
    },
];

/// The kind served at `group_version` (`v1`, `coordination.k8s.io/v1`) under `resource`.
pub(crate) fn lookup(group_version: &str, resource: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.api_version == group_version && k.resource == resource)
}

/// The kind with this URL resource name in the core group.
pub(crate) fn core(resource: &str) -> Option<&'static Kind> {
    lookup("v1", resource)
}
