//! meshward-inject: adds the meshward proxy to Kubernetes pods, as a native sidecar (an init
//! container with `restartPolicy: Always` whose startup probe is the proxy's `/ready`), so the app
//! containers start only once the proxy holds an SVID and a policy set.
//!
//! Two ways in, one injection:
//! - [`inject`]: a multi-document YAML manifest (`meshward inject`). Pods, Deployments,
//!   StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs, CronJobs, PodTemplates
//!   and the items of a `List` are injected; every other document is written back byte for byte,
//!   and so is a workload that already has a `meshward-proxy` container (injecting twice changes
//!   nothing) or that opted out with `meshward.io/inject: "false"`. An injected document is
//!   printed from its parsed tree: its keys keep their order and the comments above it stay, but
//!   comments inside it are dropped.
//! - [`admission::review`]: an `admission.k8s.io/v1` AdmissionReview for a pod (the CA's
//!   mutating webhook), answered with a JSONPatch that makes the same change.
//!
//! Listeners come from the pod template's annotations (or the workload's own):
//! `meshward.io/inbound: "8443=127.0.0.1:8080"` and
//! `meshward.io/outbound: "15001=orders.shop.svc:15006,spiffe://td/ns/shop/sa/orders"`
//! (`;`-separated, `,tcp` for plain TCP; a bare listen port means all addresses inbound and
//! loopback outbound). Without `meshward.io/inbound`, the proxy listens on 15006 in front of
//! the first TCP `containerPort`.

pub mod admission;
mod document;
mod listener;
mod sidecar;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use self::document::{Document, Value};
use self::sidecar::Workload;
pub use self::sidecar::{
    ADMIN_PORT, ANNOTATION_INBOUND, ANNOTATION_INJECT, ANNOTATION_OUTBOUND, INBOUND_PORT, Outcome,
    PROXY_CONTAINER, SOCKET_FILE,
};

/// The namespace label the webhook configuration selects: pods created in a namespace labelled
/// `meshward.io/inject=enabled` are sent to the CA's `/inject`.
pub const NAMESPACE_LABEL: &str = "meshward.io/inject";
/// The image the proxy runs by default: this build's version.
pub const DEFAULT_IMAGE: &str = concat!("meshward:", env!("CARGO_PKG_VERSION"));
/// The ConfigMap (in the workload's namespace) holding the policy set, by default.
pub const DEFAULT_POLICIES_CONFIG_MAP: &str = "meshward-policies";
/// The node directory holding the agent's socket, by default.
pub const DEFAULT_SOCKET_DIR: &str = "/run/meshward";

/// How to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The meshward image the proxy runs.
    pub image: String,
    /// The ConfigMap holding the policy set, in the workload's namespace.
    pub policies_config_map: String,
    /// The node directory with the agent's socket (absolute).
    pub socket_dir: String,
    /// Whether pods with `hostNetwork: true` are injected rather than refused.
    pub allow_host_network: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.to_owned(),
            policies_config_map: DEFAULT_POLICIES_CONFIG_MAP.to_owned(),
            socket_dir: DEFAULT_SOCKET_DIR.to_owned(),
            allow_host_network: false,
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not YAML.
    #[error("document {document} is not valid YAML (line {line}): {reason}")]
    Yaml {
        /// 1-based index of the (non-empty) document.
        document: usize,
        /// 1-based line in the input.
        line: usize,
        /// The parser's message, on one line.
        reason: String,
    },
    /// A workload's pod template does not have the shape Kubernetes gives it.
    #[error("{workload}: {reason}")]
    Template {
        /// Which workload.
        workload: String,
        /// What is wrong.
        reason: String,
    },
    /// A pod on the node's network, without `--allow-host-network`.
    #[error(
        "{workload} uses `hostNetwork: true`, so the proxy's ports would bind on the node: pass --allow-host-network to inject it anyway, or annotate it `meshward.io/inject: \"false\"`"
    )]
    HostNetwork {
        /// Which workload.
        workload: String,
    },
    /// A meshward annotation with a value that cannot be used.
    #[error("{workload}: annotation `{key}: {value}` is invalid: {reason}")]
    Annotation {
        /// Which workload.
        workload: String,
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No inbound or outbound listener can be derived.
    #[error(
        "{workload}: nothing for the proxy to listen on: give a container a `containerPort`, or annotate the pod template with `meshward.io/inbound` or `meshward.io/outbound`"
    )]
    NoListener {
        /// Which workload.
        workload: String,
    },
    /// The workload already uses a port or name that the proxy needs.
    #[error("{workload}: {what} `{name}` is already used by the workload, and the proxy needs it")]
    Conflict {
        /// Which workload.
        workload: String,
        /// `port`, `port name`, `volume name`, or `proxy port` (two listeners on one port).
        what: &'static str,
        /// The port or name.
        name: String,
    },
    /// A changed document could not be printed back.
    #[error("cannot print document {document}: {reason}")]
    Print {
        /// 1-based index of the document.
        document: usize,
        /// The printer's message.
        reason: String,
    },
    /// The proxy's own objects could not be encoded (a bug, not bad input).
    #[error("cannot encode the proxy container: {0}")]
    Encode(String),
}

/// Injects the proxy into every pod template of the YAML stream `input`.
///
/// Nothing is returned unless every document was handled: an error names the first document
/// that was refused.
pub fn inject(input: &str, options: &InjectOptions) -> Result<String, InjectError> {
    let mut out = String::with_capacity(input.len() + input.len() / 2);
    let mut number = 0;
    for doc in document::split(input) {
        if doc.is_empty() {
            out.push_str(&doc.marker);
            out.push_str(&doc.body);
            continue;
        }
        number += 1;
        let mut value = parse(&doc, number)?;
        if inject_object(&mut value, number, None, options)? {
            // A node written on the marker line is now part of the printed body.
            if doc.marker.starts_with("---") {
                out.push_str("---\n");
            } else {
                out.push_str(&doc.marker);
            }
            // The comments heading the document stay; those inside it cannot be placed again.
            out.push_str(leading_comments(&doc.body));
            let mut style = serde_saphyr::SerializerOptions::default();
            // `- item` indented under its key, as Kubernetes docs and this repository write it.
            style.compact_list_indent = false;
            let printed = serde_saphyr::to_string_with_options(&value, style).map_err(|e| {
                InjectError::Print {
                    document: number,
                    reason: one_line(&e.to_string()),
                }
            })?;
            out.push_str(&printed);
            if !printed.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str(&doc.marker);
            out.push_str(&doc.body);
        }
    }
    Ok(out)
}

/// Checks an image reference (`--image`): non-empty, no white space.
pub fn check_image(value: &str) -> Result<String, String> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(format!(
            "image `{value}` must be a non-empty reference without spaces"
        ));
    }
    Ok(value.to_owned())
}

/// Checks a ConfigMap name (`--policies-configmap`): a DNS subdomain, lower-case letters,
/// digits, `-` and `.`, at most 253 characters.
pub fn check_config_map_name(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "configmap name `{value}` is not a DNS subdomain (lower-case letters, digits, `-`, `.`)"
        ))
    }
}

/// Checks the agent's socket directory (`--socket-dir`): absolute, not `/`; returned without a
/// trailing `/`.
pub fn check_socket_dir(value: &str) -> Result<String, String> {
    let trimmed = value.trim_end_matches('/');
    if !value.starts_with('/') || trimmed.is_empty() {
        return Err(format!(
            "socket dir `{value}` must be an absolute path other than `/`"
        ));
    }
    Ok(trimmed.to_owned())
}

fn parse(doc: &Document, number: usize) -> Result<Value, InjectError> {
    let mut options = serde_saphyr::Options::default();
    // The tree's own visitor refuses duplicate keys, with a message that names the key.
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    serde_saphyr::from_str_with_options::<Value>(&doc.source(), options).map_err(|e| {
        let location = e.location();
        let row = location.map_or(1, |l| usize::try_from(l.line()).unwrap_or(1));
        let mut reason = one_line(&e.without_snippet().to_string());
        // The parser places errors within the document; the line of the whole input is given
        // instead, so drop its own ` at line L, column C`.
        if let Some(l) = location {
            let suffix = format!(" at line {}, column {}", l.line(), l.column());
            if let Some(stripped) = reason.strip_suffix(&suffix) {
                reason = format!("{stripped} (column {})", l.column());
            }
        }
        InjectError::Yaml {
            document: number,
            line: doc.source_first_line() + row.saturating_sub(1),
            reason,
        }
    })
}

/// Injects one object (or the items of a `List`); says whether anything changed.
fn inject_object(
    value: &mut Value,
    document: usize,
    item: Option<usize>,
    options: &InjectOptions,
) -> Result<bool, InjectError> {
    let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(false);
    };
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let template_path: &[&str] = match (group, kind.as_str()) {
        ("", "List") if item.is_none() => {
            let mut changed = false;
            if let Some(Value::Seq(items)) = value.get_mut("items") {
                for (index, object) in items.iter_mut().enumerate() {
                    changed |= inject_object(object, document, Some(index + 1), options)?;
                }
            }
            return Ok(changed);
        }
        ("", "Pod") => &[],
        ("", "PodTemplate") => &["template"],
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => &["spec", "template"],
        ("batch", "CronJob") => &["spec", "jobTemplate", "spec", "template"],
        // Anything else, including a custom resource that reuses a built-in kind name.
        _ => return Ok(false),
    };

    let mut workload = Workload {
        document,
        item,
        kind,
        name: "(unnamed)".to_owned(),
        template_path: template_path.join("."),
    };
    let meta: ObjectMeta = match value.get("metadata") {
        Some(meta) => sidecar::typed(meta, &workload, "metadata")?,
        None => ObjectMeta::default(),
    };
    if let Some(name) = meta.name.as_deref().or(meta.generate_name.as_deref()) {
        workload.name = match meta.namespace.as_deref() {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.to_owned(),
        };
    }
    // A bare Pod's own annotations are its template's; nothing is inherited.
    let owner: BTreeMap<String, String> = if template_path.is_empty() {
        BTreeMap::new()
    } else {
        meta.annotations.unwrap_or_default()
    };

    let mut template = value;
    for key in template_path {
        template = template.get_mut(key).ok_or_else(|| InjectError::Template {
            workload: workload.to_string(),
            reason: format!("there is no pod template at `{}`", workload.template_path),
        })?;
    }
    let outcome = sidecar::inject_template(template, &owner, &workload, options)?;
    Ok(outcome == Outcome::Injected)
}

/// The comment and blank lines that open `body`, when its node starts on a later line.
fn leading_comments(body: &str) -> &str {
    let mut end = 0;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim();
        if !(trimmed.is_empty() || trimmed.starts_with('#')) {
            break;
        }
        end += line.len();
    }
    body.get(..end).unwrap_or_default()
}

/// Collapses a possibly multi-line message into one line.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
