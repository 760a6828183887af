//! The proxy as a Kubernetes native sidecar, and its injection into one pod template.
//!
//! The pod template is read through `k8s-openapi` types (so a malformed one is refused with
//! the field that is wrong), and the proxy, its volumes and probes are built from them; the
//! result is spliced into the document's own tree so everything the user wrote stays as written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::document::Value;
use crate::listener::{inbound_port, outbound_port};
use crate::{InjectError, InjectOptions};

/// Name of the injected proxy container; its presence marks a template as already injected.
pub const PROXY_CONTAINER: &str = "meshward-proxy";
/// The injected container's command: the image's sidecar-only binary (`meshward-proxy run`).
pub const PROXY_BINARY: &str = "/usr/local/bin/meshward-proxy";
/// Annotation that opts a workload out (`"false"`) or in (`"true"`, `"enabled"`).
pub const ANNOTATION_INJECT: &str = "meshward.io/inject";
/// Annotation with the inbound listeners: `PORT=APP_ADDR[,tcp]`, `;`-separated.
pub const ANNOTATION_INBOUND: &str = "meshward.io/inbound";
/// Annotation with the outbound listeners: `PORT=UPSTREAM,SPIFFE_ID[,tcp]`, `;`-separated.
pub const ANNOTATION_OUTBOUND: &str = "meshward.io/outbound";
/// The proxy's admin port (`/ready`, `/live`, `/metrics`), on every pod address.
pub const ADMIN_PORT: u16 = 15020;
/// The proxy's inbound port when it fronts the first `containerPort` by default.
pub const INBOUND_PORT: u16 = 15006;
/// The agent's socket file name inside the socket directory.
pub const SOCKET_FILE: &str = "agent.sock";

const SOCKET_VOLUME: &str = "meshward-socket";
const POLICIES_VOLUME: &str = "meshward-policies";
const AUDIT_VOLUME: &str = "meshward-audit";
const POLICIES_DIR: &str = "/etc/meshward/policies";
const AUDIT_DIR: &str = "/var/log/meshward";
const ADMIN_PORT_NAME: &str = "mw-admin";
/// The distroless `nonroot` user of the runtime image.
const PROXY_UID: i64 = 65532;

/// What happened to one pod template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy was added.
    Injected,
    /// The template already has a `meshward-proxy` container; it is left as it is.
    AlreadyInjected,
    /// The workload opted out with `meshward.io/inject: "false"`.
    OptedOut,
}

/// Names a workload in error messages: `document 2, Deployment `shop/orders`` (a manifest's),
/// `Pod `shop/orders-x7k2p`` (an AdmissionReview's).
#[derive(Debug, Clone)]
pub struct Workload {
    /// 1-based document index in the input; 0 for a pod that did not come from a manifest.
    pub document: usize,
    /// 1-based index inside a `List`, if the workload is one of its items.
    pub item: Option<usize>,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace/metadata.name` (or just the name).
    pub name: String,
    /// Where the pod template is in the object (`spec.template`; empty for a Pod).
    pub template_path: String,
}

impl Workload {
    /// The path of `field` of the pod template, for messages: `spec.template.spec`.
    pub fn field(&self, field: &str) -> String {
        if self.template_path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.template_path)
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Document 0: not from a manifest (an AdmissionReview's pod).
        if self.document > 0 {
            write!(f, "document {}, ", self.document)?;
        }
        if let Some(item) = self.item {
            write!(f, "item {item}, ")?;
        }
        write!(f, "{} `{}`", self.kind, self.name)
    }
}

/// Adds the proxy to the pod template `template` (a mapping with `metadata` and `spec`).
///
/// `owner` holds the annotations of the object around the template (a Deployment's own), which
/// count when the template itself does not set a meshward annotation.
pub fn inject_template(
    template: &mut Value,
    owner: &BTreeMap<String, String>,
    workload: &Workload,
    options: &InjectOptions,
) -> Result<Outcome, InjectError> {
    let meta: ObjectMeta = match template.get("metadata") {
        Some(meta) => typed(meta, workload, &workload.field("metadata"))?,
        None => ObjectMeta::default(),
    };
    let mut annotations = owner.clone();
    annotations.extend(meta.annotations.unwrap_or_default());

    match annotations.get(ANNOTATION_INJECT).map(String::as_str) {
        None | Some("true" | "enabled") => {}
        Some("false" | "disabled") => return Ok(Outcome::OptedOut),
        Some(other) => {
            return Err(InjectError::Annotation {
                workload: workload.to_string(),
                key: ANNOTATION_INJECT,
                value: other.to_owned(),
                reason: "write `\"false\"` to skip this workload or `\"true\"` to inject it"
                    .to_owned(),
            });
        }
    }

    let spec_field = workload.field("spec");
    let no_spec = || InjectError::Template {
        workload: workload.to_string(),
        reason: format!("there is no pod spec at `{spec_field}`"),
    };
    let spec: PodSpec = typed(
        template.get("spec").ok_or_else(no_spec)?,
        workload,
        &spec_field,
    )?;
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if spec
        .containers
        .iter()
        .chain(init)
        .any(|c| c.name == PROXY_CONTAINER)
    {
        return Ok(Outcome::AlreadyInjected);
    }
    if spec.host_network == Some(true) && !options.allow_host_network {
        return Err(InjectError::HostNetwork {
            workload: workload.to_string(),
        });
    }

    let listeners = Listeners::for_pod(&spec, &annotations, workload)?;
    check_conflicts(&spec, &listeners, workload)?;

    let proxy = to_value(&proxy_container(&listeners, options))?;
    let volumes = proxy_volumes(options)
        .iter()
        .map(to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let not_a_list = |field: &str| InjectError::Template {
        workload: workload.to_string(),
        reason: format!("`{spec_field}.{field}` is not a list"),
    };
    let spec_value = template.get_mut("spec").ok_or_else(no_spec)?;
    // First among the init containers: every later init container and every app container
    // starts only once the proxy's startup probe (its `/ready`) has passed.
    match spec_value.entry("initContainers", Value::Seq(Vec::new())) {
        Some(Value::Seq(init)) => init.insert(0, proxy),
        _ => return Err(not_a_list("initContainers")),
    }
    match spec_value.entry("volumes", Value::Seq(Vec::new())) {
        Some(Value::Seq(existing)) => existing.extend(volumes),
        _ => return Err(not_a_list("volumes")),
    }
    Ok(Outcome::Injected)
}

/// The proxy's listeners for one pod, as `--inbound` / `--outbound` flag values.
struct Listeners {
    /// `LISTEN=APP[,tcp]`, with the port each listens on.
    inbound: Vec<(String, u16)>,
    /// `LISTEN=UPSTREAM,SPIFFE_ID[,tcp]`, with the port each listens on.
    outbound: Vec<(String, u16)>,
}

impl Listeners {
    /// From the annotations, or else in front of the first TCP `containerPort`.
    fn for_pod(
        spec: &PodSpec,
        annotations: &BTreeMap<String, String>,
        workload: &Workload,
    ) -> Result<Listeners, InjectError> {
        let annotation_error =
            |key: &'static str, value: &str, reason: String| InjectError::Annotation {
                workload: workload.to_string(),
                key,
                value: value.to_owned(),
                reason,
            };
        let mut inbound = Vec::new();
        if let Some(value) = annotations.get(ANNOTATION_INBOUND) {
            for spec in entries(value) {
                let spec = with_host(spec, "0.0.0.0");
                let port = inbound_port(&spec)
                    .map_err(|e| annotation_error(ANNOTATION_INBOUND, value, e))?;
                inbound.push((spec, port));
            }
        } else if let Some(port) = first_tcp_port(spec) {
            inbound.push((
                format!("0.0.0.0:{INBOUND_PORT}=127.0.0.1:{port}"),
                INBOUND_PORT,
            ));
        }
        let mut outbound = Vec::new();
        if let Some(value) = annotations.get(ANNOTATION_OUTBOUND) {
            for spec in entries(value) {
                // Outbound listeners are for the app next door only: loopback by default.
                let spec = with_host(spec, "127.0.0.1");
                let port = outbound_port(&spec)
                    .map_err(|e| annotation_error(ANNOTATION_OUTBOUND, value, e))?;
                outbound.push((spec, port));
            }
        }
        if inbound.is_empty() && outbound.is_empty() {
            return Err(InjectError::NoListener {
                workload: workload.to_string(),
            });
        }
        Ok(Listeners { inbound, outbound })
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.inbound
            .iter()
            .chain(&self.outbound)
            .map(|(_, port)| *port)
    }
}

/// The `;`- or newline-separated entries of a listener annotation.
fn entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split([';', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// `8443=...` -> `HOST:8443=...`; a listen address with a host stays as written.
fn with_host(spec: &str, host: &str) -> String {
    match spec.split_once('=') {
        Some((listen, rest))
            if !listen.is_empty() && listen.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{host}:{listen}={rest}")
        }
        _ => spec.to_owned(),
    }
}

fn first_tcp_port(spec: &PodSpec) -> Option<i32> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.as_deref().unwrap_or_default())
        .find(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .map(|p| p.container_port)
}

/// Refuses a pod whose ports, port names or volume names collide with the proxy's.
fn check_conflicts(
    spec: &PodSpec,
    listeners: &Listeners,
    workload: &Workload,
) -> Result<(), InjectError> {
    let conflict = |what: &'static str, name: String| InjectError::Conflict {
        workload: workload.to_string(),
        what,
        name,
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let app_ports: Vec<&ContainerPort> = spec
        .containers
        .iter()
        .chain(init)
        .flat_map(|c| c.ports.as_deref().unwrap_or_default())
        .collect();
    let mut proxy_ports = BTreeSet::from([ADMIN_PORT]);
    for port in listeners.ports() {
        if !proxy_ports.insert(port) {
            return Err(conflict("proxy port", port.to_string()));
        }
    }
    for port in &app_ports {
        let number = u16::try_from(port.container_port).unwrap_or_default();
        if proxy_ports.contains(&number) {
            return Err(conflict("port", number.to_string()));
        }
        if let Some(name) = port.name.as_deref()
            && proxy_port_names(listeners.inbound.len()).any(|ours| ours == name)
        {
            return Err(conflict("port name", name.to_owned()));
        }
    }
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if [SOCKET_VOLUME, POLICIES_VOLUME, AUDIT_VOLUME].contains(&volume.name.as_str()) {
            return Err(conflict("volume name", volume.name.clone()));
        }
    }
    Ok(())
}

/// The names of the proxy's ports: the admin port, then one per inbound listener
/// (`mw-inbound` is what a Service's `targetPort` names; port names are at most 15 characters).
fn proxy_port_names(inbound: usize) -> impl Iterator<Item = String> {
    let inbound = (0..inbound).map(|index| match index {
        0 => "mw-inbound".to_owned(),
        n => format!("mw-inbound-{n}"),
    });
    std::iter::once(ADMIN_PORT_NAME.to_owned()).chain(inbound)
}

/// The proxy container: a native sidecar (`restartPolicy: Always` on an init container).
fn proxy_container(listeners: &Listeners, options: &InjectOptions) -> Container {
    let socket = format!("{}/{SOCKET_FILE}", options.socket_dir.trim_end_matches('/'));
    let mut args: Vec<String> = [
        "run",
        "--socket",
        &socket,
        "--policies",
        POLICIES_DIR,
        "--audit",
        &format!("{AUDIT_DIR}/audit.jsonl"),
        "--admin",
        &format!("0.0.0.0:{ADMIN_PORT}"),
    ]
    .map(str::to_owned)
    .to_vec();
    for (spec, _) in &listeners.inbound {
        args.extend(["--inbound".to_owned(), spec.clone()]);
    }
    for (spec, _) in &listeners.outbound {
        args.extend(["--outbound".to_owned(), spec.clone()]);
    }

    let mut ports = vec![ContainerPort {
        name: Some(ADMIN_PORT_NAME.to_owned()),
        container_port: i32::from(ADMIN_PORT),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }];
    for ((_, port), name) in listeners
        .inbound
        .iter()
        .zip(proxy_port_names(usize::MAX).skip(1))
    {
        ports.push(ContainerPort {
            name: Some(name),
            container_port: i32::from(*port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        });
    }

    let ready = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".to_owned()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let quantities = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect::<BTreeMap<_, _>>()
    };

    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        // The sidecar-only binary of the image: the same flags as `meshward proxy run`, a third
        // of the code mapped in every pod (deploy/Dockerfile).
        command: Some(vec![PROXY_BINARY.to_owned()]),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "MESHWARD_PROXY_NODE".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(ports),
        restart_policy: Some("Always".to_owned()),
        // Up to 2 minutes to fetch the first SVID and policy set before the pod is failed.
        startup_probe: Some(ready(1, 120)),
        readiness_probe: Some(ready(5, 3)),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/live".to_owned()),
                port: IntOrString::Int(i32::from(ADMIN_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            timeout_seconds: Some(1),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "10m"), ("memory", "32Mi")])),
            limits: Some(quantities(&[("memory", "256Mi")])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: SOCKET_VOLUME.to_owned(),
                mount_path: options.socket_dir.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: POLICIES_VOLUME.to_owned(),
                mount_path: POLICIES_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: AUDIT_VOLUME.to_owned(),
                mount_path: AUDIT_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// The agent's socket directory (from the node), the policy set, and scratch for the audit log.
fn proxy_volumes(options: &InjectOptions) -> [Volume; 3] {
    [
        Volume {
            name: SOCKET_VOLUME.to_owned(),
            // `Directory`, not `DirectoryOrCreate`: a missing directory means no agent runs on
            // the node, and the pod should wait rather than start with an empty one.
            host_path: Some(HostPathVolumeSource {
                path: options.socket_dir.clone(),
                type_: Some("Directory".to_owned()),
            }),
            ..Volume::default()
        },
        Volume {
            name: POLICIES_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: options.policies_config_map.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: AUDIT_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}

/// Reads a node of the document as a `k8s-openapi` type, naming the field on failure.
pub fn typed<T: DeserializeOwned>(
    value: &Value,
    workload: &Workload,
    field: &str,
) -> Result<T, InjectError> {
    let json = serde_json::to_value(value).map_err(|e| InjectError::Template {
        workload: workload.to_string(),
        reason: format!("`{field}`: {e}"),
    })?;
    serde_json::from_value(json).map_err(|e| InjectError::Template {
        workload: workload.to_string(),
        reason: format!("`{field}` is invalid: {e}"),
    })
}

/// Encodes a container or volume, `name` first as people write them (JSON sorts the rest).
fn to_value<T: Serialize>(object: &T) -> Result<Value, InjectError> {
    let mut value = serde_json::to_value(object)
        .map(Value::from_json)
        .map_err(|e| InjectError::Encode(e.to_string()))?;
    if let Value::Map(entries) = &mut value
        && let Some(position) = entries.iter().position(|(k, _)| k == "name")
    {
        let name = entries.remove(position);
        entries.insert(0, name);
    }
    Ok(value)
}
