//! `admission.k8s.io/v1` AdmissionReviews: what the CA's mutating webhook answers.
//!
//! The API server sends the pod being created; the answer allows it, with a base64 JSONPatch that
//! adds the proxy exactly as `meshward inject` would (the same code injects both). A pod that
//! already has the proxy, or that opted out with `meshward.io/inject: "false"`, is allowed with no
//! patch, and so is anything that is not a pod being created (the webhook configuration should not
//! send those, so the answer carries a warning). A pod the injector refuses (`hostNetwork`, a bad
//! annotation, a port the proxy needs) is denied with the injector's message: the webhook fails
//! closed rather than start a pod without its proxy. A body that is not an AdmissionReview cannot
//! be answered with one (there is no `uid` to answer): [`review`] returns a [`ReviewError`] and the
//! server says so with a 400.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::document::Value;
use crate::sidecar::{self, Outcome, Workload};
use crate::{InjectError, InjectOptions, one_line};

/// The AdmissionReview `apiVersion` handled (and answered).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The only `patchType` Kubernetes accepts.
pub const PATCH_TYPE: &str = "JSONPatch";

/// Why a body cannot be answered with an AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The body is not JSON, or not shaped like an AdmissionReview.
    #[error("the body is not an AdmissionReview: {0}")]
    Json(String),
    /// Another kind or version than `admission.k8s.io/v1` `AdmissionReview`.
    #[error(
        "the body is a `{api_version}` `{kind}`, not an `admission.k8s.io/v1` `AdmissionReview`: set `admissionReviewVersions: [v1]` in the webhook configuration"
    )]
    Version {
        /// The `apiVersion` sent.
        api_version: String,
        /// The `kind` sent.
        kind: String,
    },
    /// No `request` to answer.
    #[error("the AdmissionReview has no `request`")]
    NoRequest,
    /// A request without the `uid` its answer must carry.
    #[error("the AdmissionReview's `request` has no `uid`")]
    NoUid,
}

/// An AdmissionReview answer, as sent back to the API server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    /// Always [`API_VERSION`].
    pub api_version: &'static str,
    /// Always `AdmissionReview`.
    pub kind: &'static str,
    /// The answer.
    pub response: AdmissionResponse,
}

/// The answer to one admission request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's `uid`.
    pub uid: String,
    /// Whether the object may be created.
    pub allowed: bool,
    /// [`PATCH_TYPE`] when there is a patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// The JSONPatch (RFC 6902), base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Why a request was denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Shown to the client (`kubectl` prints them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The `status` of a denial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// An HTTP status code the API server passes on (400: the pod cannot be injected).
    pub code: u16,
    /// What is wrong and what to do, on one line.
    pub message: String,
}

impl AdmissionResponse {
    /// The JSONPatch operations, decoded (tests and logs).
    pub fn patch_operations(&self) -> Option<Vec<Json>> {
        let bytes = STANDARD.decode(self.patch.as_deref()?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Answers the AdmissionReview in `body`.
pub fn review(body: &[u8], options: &InjectOptions) -> Result<AdmissionReview, ReviewError> {
    let incoming: IncomingReview =
        serde_json::from_slice(body).map_err(|e| ReviewError::Json(one_line(&e.to_string())))?;
    let api_version = incoming.api_version.unwrap_or_default();
    let kind = incoming.kind.unwrap_or_default();
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return Err(ReviewError::Version { api_version, kind });
    }
    let request = incoming.request.ok_or(ReviewError::NoRequest)?;
    let uid = request
        .uid
        .clone()
        .filter(|uid| !uid.is_empty())
        .ok_or(ReviewError::NoUid)?;
    Ok(AdmissionReview {
        api_version: API_VERSION,
        kind: "AdmissionReview",
        response: respond(uid, &request, options),
    })
}

/// The JSONPatch operations that add the proxy to `pod` (a `v1` Pod as JSON), or `None` when it
/// already has the proxy or opted out. `namespace` names the pod in errors when its own metadata
/// does not (a pod being created often has no namespace yet).
pub fn pod_patch(
    pod: &Json,
    namespace: Option<&str>,
    options: &InjectOptions,
) -> Result<Option<Vec<Json>>, InjectError> {
    let meta = pod.get("metadata");
    let field = |key: &str| meta.and_then(|m| m.get(key)).and_then(Json::as_str);
    let name = field("name")
        .filter(|n| !n.is_empty())
        .or(field("generateName"))
        .unwrap_or("(unnamed)");
    let name = match field("namespace").filter(|n| !n.is_empty()).or(namespace) {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    };
    let workload = Workload {
        document: 0,
        item: None,
        kind: "Pod".to_owned(),
        name,
        template_path: String::new(),
    };
    if !pod.is_object() {
        return Err(InjectError::Template {
            workload: workload.to_string(),
            reason: "the object is not a JSON object".to_owned(),
        });
    }
    let mut tree = Value::from_json(pod.clone());
    match sidecar::inject_template(&mut tree, &BTreeMap::new(), &workload, options)? {
        Outcome::Injected => {}
        Outcome::AlreadyInjected | Outcome::OptedOut => return Ok(None),
    }
    let injected = serde_json::to_value(&tree).map_err(|e| InjectError::Encode(e.to_string()))?;
    let mut operations = Vec::new();
    for key in ["initContainers", "volumes"] {
        let before = pod.get("spec").and_then(|s| s.get(key));
        let after = injected.get("spec").and_then(|s| s.get(key));
        if let Some(after) = after {
            array_operations(&format!("/spec/{key}"), before, after, &mut operations);
        }
    }
    Ok(Some(operations))
}

/// The answer to a request with `uid`.
fn respond(uid: String, request: &IncomingRequest, options: &InjectOptions) -> AdmissionResponse {
    let mut response = AdmissionResponse {
        uid,
        allowed: true,
        patch_type: None,
        patch: None,
        status: None,
        warnings: Vec::new(),
    };
    let kind = request.kind.as_ref();
    let (group, version, kind) = (
        kind.and_then(|k| k.group.as_deref()).unwrap_or(""),
        kind.and_then(|k| k.version.as_deref()).unwrap_or(""),
        kind.and_then(|k| k.kind.as_deref()).unwrap_or(""),
    );
    if (group, version, kind) != ("", "v1", "Pod") || request.sub_resource.is_some() {
        response.warnings.push(format!(
            "meshward injects only pods: `{}` was let through unchanged; check the webhook configuration's rules",
            [group, version, kind]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/")
        ));
        return response;
    }
    // A pod's spec cannot change after creation: only a CREATE can be injected.
    if request.operation.as_deref() != Some("CREATE") {
        return response;
    }
    let Some(pod) = request.object.as_ref() else {
        return deny(
            response,
            "the request has no `object` (the pod to create)".to_owned(),
        );
    };
    match pod_patch(pod, request.namespace.as_deref(), options) {
        Ok(None) => response,
        Ok(Some(operations)) => match serde_json::to_vec(&operations) {
            Ok(bytes) => {
                response.patch_type = Some(PATCH_TYPE);
                response.patch = Some(STANDARD.encode(bytes));
                response
            }
            Err(e) => deny(response, format!("cannot encode the patch: {e}")),
        },
        Err(e) => deny(response, one_line(&e.to_string())),
    }
}

fn deny(mut response: AdmissionResponse, message: String) -> AdmissionResponse {
    response.allowed = false;
    response.status = Some(Status { code: 400, message });
    response
}

/// Appends the operations that turn the array `before` (missing or null: none) into `after`: one
/// `add` per inserted element when `after` is `before` with elements inserted in one place (what
/// injection does), else one `add` of the whole array.
fn array_operations(path: &str, before: Option<&Json>, after: &Json, operations: &mut Vec<Json>) {
    let (Some(Json::Array(old)), Json::Array(new)) = (before, after) else {
        if before != Some(after) {
            operations.push(json!({"op": "add", "path": path, "value": after}));
        }
        return;
    };
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let room = old.len().min(new.len()) - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    if old.len() != prefix + suffix {
        operations.push(json!({"op": "add", "path": path, "value": after}));
        return;
    }
    for (index, value) in new.iter().enumerate().take(new.len() - suffix).skip(prefix) {
        operations.push(json!({"op": "add", "path": format!("{path}/{index}"), "value": value}));
    }
}

/// An AdmissionReview as received; everything optional so that what is missing can be named.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingReview {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<IncomingRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingRequest {
    uid: Option<String>,
    kind: Option<GroupVersionKind>,
    sub_resource: Option<String>,
    namespace: Option<String>,
    operation: Option<String>,
    object: Option<Json>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
}

#[cfg(test)]
mod tests;
