//! The CA's typed configuration, validated once before the runtime starts.
//!
//! The CLI gathers [`CaSettings`] from three places, most specific first: flags (and their
//! `MESHWARD_CA_<SETTING>` env fallbacks, which clap reads), the TOML file given with `--config`, and
//! the defaults here. [`CaSettings::into_config`] turns them into a [`CaConfig`] whose every field is
//! a domain type (`TrustDomain`, `SocketAddr`, `Duration`), so nothing downstream parses again.
//! Tests build a [`CaConfig`] directly with [`CaConfig::new`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshward_identity::TrustDomain;
use meshward_identity::x509::{MAX_AUTHORITY_TTL, MAX_SVID_TTL, MIN_SVID_TTL};
pub use meshward_ops::duration::{DurationError, format_duration, parse_duration};
use serde::Deserialize;

/// The admin socket's file name inside the data dir.
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";
/// The audit log's file name inside the data dir.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Default lifetime of workload X.509-SVIDs.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(60 * 60);
/// Default lifetime of agent SVIDs.
pub const DEFAULT_AGENT_SVID_TTL: Duration = Duration::from_secs(60 * 60);
/// Default lifetime of JWT-SVIDs (short: a bearer token cannot be bound to a key).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of a root made at first start or by `ca rotate prepare`.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Default cap on the SVID requests in one `MintX509Svids` call.
pub const DEFAULT_MAX_BATCH: usize = 1_000;
/// Largest accepted `max_batch`.
pub const MAX_MAX_BATCH: usize = 10_000;

/// Everything `meshward ca run` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// Keys, SQLite state, the audit log and (by default) the admin socket live here.
    pub data_dir: PathBuf,
    /// The agent-facing gRPC (TLS) listen address.
    pub listen: SocketAddr,
    /// The trust domain this CA signs for.
    pub trust_domain: TrustDomain,
    /// Default workload X.509-SVID lifetime (30s..=24h).
    pub svid_ttl: Duration,
    /// Agent SVID lifetime (30s..=24h); the CA's own serving SVID uses it too.
    pub agent_svid_ttl: Duration,
    /// Default JWT-SVID lifetime (30s..=24h).
    pub jwt_ttl: Duration,
    /// The admin unix socket (0600); `D/admin.sock` by default.
    pub admin_socket: PathBuf,
    /// The audit log; `D/audit.jsonl` by default. An audit file has one writer, so CA replicas
    /// sharing a data dir each need their own.
    pub audit_file: PathBuf,
    /// The admin HTTP port (`/metrics`, `/ready`, `/live`), if any.
    pub admin_listen: Option<SocketAddr>,
    /// An Istio-style `cacerts` directory with an upstream-signed intermediate, if any.
    pub upstream_ca: Option<PathBuf>,
    /// Lifetime of a root this CA makes itself.
    pub root_ttl: Duration,
    /// Most SVID requests in one `MintX509Svids` call.
    pub max_batch: usize,
    /// How long a client may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long open calls may go on after shutdown starts.
    pub drain_grace: Duration,
    /// How often the keystore looks for a rotation made by another replica.
    pub reload_interval: Duration,
    /// Kubernetes mode (`--k8s`): PSAT attestation and pod-based entitlement.
    pub k8s: Option<crate::k8s::K8sConfig>,
    /// The injection webhook (`POST /inject` over HTTPS), if `webhook_listen` is set.
    pub webhook: Option<crate::webhook::WebhookConfig>,
}

pub use meshward_ops::config::ConfigError;

/// This part's name in [`ConfigError::Missing`] (its env variables are `MESHWARD_CA_*`).
const PART: &str = "ca";

/// Raw settings from flags, env or a TOML file; every field optional, nothing validated yet.
///
/// In the TOML file the keys are the field names (`trust_domain = "example.org"`, `svid_ttl = "1h"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSettings {
    /// See [`CaConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`CaConfig::listen`].
    pub listen: Option<String>,
    /// See [`CaConfig::trust_domain`].
    pub trust_domain: Option<String>,
    /// See [`CaConfig::svid_ttl`].
    pub svid_ttl: Option<String>,
    /// See [`CaConfig::agent_svid_ttl`].
    pub agent_svid_ttl: Option<String>,
    /// See [`CaConfig::jwt_ttl`].
    pub jwt_ttl: Option<String>,
    /// See [`CaConfig::admin_socket`].
    pub admin_socket: Option<PathBuf>,
    /// See [`CaConfig::audit_file`].
    pub audit_file: Option<PathBuf>,
    /// See [`CaConfig::admin_listen`].
    pub admin_listen: Option<String>,
    /// See [`CaConfig::upstream_ca`].
    pub upstream_ca: Option<PathBuf>,
    /// See [`CaConfig::root_ttl`].
    pub root_ttl: Option<String>,
    /// See [`CaConfig::max_batch`].
    pub max_batch: Option<usize>,
    /// See [`CaConfig::handshake_timeout`].
    pub handshake_timeout: Option<String>,
    /// See [`CaConfig::drain_grace`].
    pub drain_grace: Option<String>,
    /// See [`CaConfig::reload_interval`].
    pub reload_interval: Option<String>,
    /// Kubernetes mode (see [`CaConfig::k8s`]).
    pub k8s: Option<bool>,
    /// See [`crate::k8s::K8sConfig::kubeconfig`].
    pub kubeconfig: Option<PathBuf>,
    /// See [`crate::k8s::K8sConfig::namespace`].
    pub namespace: Option<String>,
    /// See [`crate::k8s::K8sConfig::cluster`].
    pub cluster: Option<String>,
    /// See [`crate::k8s::K8sConfig::agent_sa`] (`namespace:name`).
    pub agent_sa: Option<String>,
    /// See [`crate::webhook::WebhookConfig::listen`].
    pub webhook_listen: Option<String>,
    /// See [`crate::webhook::WebhookConfig::cert`].
    pub webhook_cert: Option<PathBuf>,
    /// See [`crate::webhook::WebhookConfig::key`].
    pub webhook_key: Option<PathBuf>,
    /// The image injected proxies run (default `meshward:<version>`).
    pub inject_image: Option<String>,
    /// The ConfigMap injected proxies mount (default `meshward-policies`).
    pub inject_policies_configmap: Option<String>,
    /// The node directory with the agent's socket (default `/run/meshward`).
    pub inject_socket_dir: Option<String>,
    /// Inject pods with `hostNetwork: true` too (default: deny them).
    pub inject_allow_host_network: Option<bool>,
}

impl CaConfig {
    /// A config with every optional setting at its default (tests use this, then adjust fields).
    pub fn new(
        data_dir: impl Into<PathBuf>,
        listen: SocketAddr,
        trust_domain: TrustDomain,
    ) -> Self {
        let data_dir = data_dir.into();
        Self {
            admin_socket: data_dir.join(ADMIN_SOCKET_FILE),
            audit_file: data_dir.join(AUDIT_FILE),
            data_dir,
            listen,
            trust_domain,
            svid_ttl: DEFAULT_SVID_TTL,
            agent_svid_ttl: DEFAULT_AGENT_SVID_TTL,
            jwt_ttl: DEFAULT_JWT_TTL,
            admin_listen: None,
            upstream_ca: None,
            root_ttl: DEFAULT_ROOT_TTL,
            max_batch: DEFAULT_MAX_BATCH,
            handshake_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(5),
            reload_interval: Duration::from_secs(10),
            k8s: None,
            webhook: None,
        }
    }

    /// Checks the ranges and relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_svid_ttl("svid_ttl", self.svid_ttl)?;
        check_svid_ttl("agent_svid_ttl", self.agent_svid_ttl)?;
        check_svid_ttl("jwt_ttl", self.jwt_ttl)?;
        let longest = self.svid_ttl.max(self.agent_svid_ttl).max(self.jwt_ttl);
        // A root must outlive two SVID lifetimes, or rotation could never publish the next root
        // before SVIDs signed by this one stop verifying.
        let min_root = longest.saturating_mul(2);
        if self.root_ttl < min_root || self.root_ttl > MAX_AUTHORITY_TTL {
            return Err(invalid(
                "root_ttl",
                show(self.root_ttl),
                format!(
                    "use at least twice the longest svid ttl (`{}`) and at most 20 years",
                    show(min_root)
                ),
            ));
        }
        if self.max_batch == 0 || self.max_batch > MAX_MAX_BATCH {
            return Err(invalid(
                "max_batch",
                self.max_batch.to_string(),
                format!("use 1 to {MAX_MAX_BATCH}"),
            ));
        }
        for (setting, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("reload_interval", self.reload_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(setting, show(value), "use more than 0s".to_owned()));
            }
        }
        if self.admin_socket.as_os_str().is_empty() {
            return Err(invalid(
                "admin_socket",
                String::new(),
                "give a socket path".to_owned(),
            ));
        }
        if self.audit_file.as_os_str().is_empty() {
            return Err(invalid(
                "audit_file",
                String::new(),
                "give a file path".to_owned(),
            ));
        }
        Ok(())
    }

    /// The audit log: [`CaConfig::audit_file`] (`D/audit.jsonl` unless set).
    pub fn audit_path(&self) -> PathBuf {
        self.audit_file.clone()
    }
}

impl CaSettings {
    /// Parses a TOML config file's text; `path` is only for the error message.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        meshward_ops::config::parse_toml(text, path)
    }

    /// Reads and parses a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        meshward_ops::config::read_toml(path)
    }

    /// These settings, with any gaps filled from `fallback` (e.g. flags over the config file).
    pub fn or(self, fallback: CaSettings) -> CaSettings {
        CaSettings {
            data_dir: self.data_dir.or(fallback.data_dir),
            listen: self.listen.or(fallback.listen),
            trust_domain: self.trust_domain.or(fallback.trust_domain),
            svid_ttl: self.svid_ttl.or(fallback.svid_ttl),
            agent_svid_ttl: self.agent_svid_ttl.or(fallback.agent_svid_ttl),
            jwt_ttl: self.jwt_ttl.or(fallback.jwt_ttl),
            admin_socket: self.admin_socket.or(fallback.admin_socket),
            audit_file: self.audit_file.or(fallback.audit_file),
            admin_listen: self.admin_listen.or(fallback.admin_listen),
            upstream_ca: self.upstream_ca.or(fallback.upstream_ca),
            root_ttl: self.root_ttl.or(fallback.root_ttl),
            max_batch: self.max_batch.or(fallback.max_batch),
            handshake_timeout: self.handshake_timeout.or(fallback.handshake_timeout),
            drain_grace: self.drain_grace.or(fallback.drain_grace),
            reload_interval: self.reload_interval.or(fallback.reload_interval),
            k8s: self.k8s.or(fallback.k8s),
            kubeconfig: self.kubeconfig.or(fallback.kubeconfig),
            namespace: self.namespace.or(fallback.namespace),
            cluster: self.cluster.or(fallback.cluster),
            agent_sa: self.agent_sa.or(fallback.agent_sa),
            webhook_listen: self.webhook_listen.or(fallback.webhook_listen),
            webhook_cert: self.webhook_cert.or(fallback.webhook_cert),
            webhook_key: self.webhook_key.or(fallback.webhook_key),
            inject_image: self.inject_image.or(fallback.inject_image),
            inject_policies_configmap: self
                .inject_policies_configmap
                .or(fallback.inject_policies_configmap),
            inject_socket_dir: self.inject_socket_dir.or(fallback.inject_socket_dir),
            inject_allow_host_network: self
                .inject_allow_host_network
                .or(fallback.inject_allow_host_network),
        }
    }

    /// Parses and validates every setting, applying defaults for the missing optional ones.
    pub fn into_config(self) -> Result<CaConfig, ConfigError> {
        let data_dir = self.data_dir.ok_or(ConfigError::Missing {
            part: PART,
            setting: "data_dir",
        })?;
        if data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                String::new(),
                "give a directory".to_owned(),
            ));
        }
        let listen = parse_addr("listen", self.listen.as_deref())?.ok_or(ConfigError::Missing {
            part: PART,
            setting: "listen",
        })?;
        let td_text = self.trust_domain.ok_or(ConfigError::Missing {
            part: PART,
            setting: "trust_domain",
        })?;
        let trust_domain = td_text
            .parse::<TrustDomain>()
            .map_err(|e| invalid("trust_domain", td_text.clone(), e.to_string()))?;

        let mut config = CaConfig::new(data_dir, listen, trust_domain);
        let durations: [(&'static str, Option<String>, &mut Duration); 7] = [
            ("svid_ttl", self.svid_ttl, &mut config.svid_ttl),
            (
                "agent_svid_ttl",
                self.agent_svid_ttl,
                &mut config.agent_svid_ttl,
            ),
            ("jwt_ttl", self.jwt_ttl, &mut config.jwt_ttl),
            ("root_ttl", self.root_ttl, &mut config.root_ttl),
            (
                "handshake_timeout",
                self.handshake_timeout,
                &mut config.handshake_timeout,
            ),
            ("drain_grace", self.drain_grace, &mut config.drain_grace),
            (
                "reload_interval",
                self.reload_interval,
                &mut config.reload_interval,
            ),
        ];
        for (setting, text, slot) in durations {
            if let Some(text) = text {
                *slot = parse_duration(&text)
                    .map_err(|e| invalid(setting, text.clone(), e.to_string()))?;
            }
        }
        if let Some(socket) = self.admin_socket {
            config.admin_socket = socket;
        }
        if let Some(file) = self.audit_file {
            config.audit_file = file;
        }
        config.admin_listen = parse_addr("admin_listen", self.admin_listen.as_deref())?;
        if let Some(dir) = self.upstream_ca {
            if !dir.is_dir() {
                return Err(invalid(
                    "upstream_ca",
                    dir.display().to_string(),
                    "not a directory; give the `cacerts` directory holding ca-cert.pem, ca-key.pem and root-cert.pem".to_owned(),
                ));
            }
            config.upstream_ca = Some(dir);
        }
        if let Some(max_batch) = self.max_batch {
            config.max_batch = max_batch;
        }
        config.k8s = k8s_config(
            self.k8s.unwrap_or(false),
            self.kubeconfig,
            self.namespace,
            self.cluster,
            self.agent_sa,
        )?;
        config.webhook = crate::webhook::webhook_config(
            self.webhook_listen,
            self.webhook_cert,
            self.webhook_key,
            self.inject_image,
            self.inject_policies_configmap,
            self.inject_socket_dir,
            self.inject_allow_host_network,
        )?;
        config.validate()?;
        Ok(config)
    }
}

fn show(d: Duration) -> String {
    format_duration(d)
}

fn check_svid_ttl(setting: &'static str, ttl: Duration) -> Result<(), ConfigError> {
    if ttl < MIN_SVID_TTL || ttl > MAX_SVID_TTL {
        return Err(invalid(setting, show(ttl), "use 30s to 24h".to_owned()));
    }
    Ok(())
}

fn parse_addr(
    setting: &'static str,
    text: Option<&str>,
) -> Result<Option<SocketAddr>, ConfigError> {
    text.map(|text| {
        text.parse::<SocketAddr>().map_err(|_| {
            invalid(
                setting,
                text.to_owned(),
                "use IP:PORT, e.g. `0.0.0.0:8081` or `[::1]:8081`".to_owned(),
            )
        })
    })
    .transpose()
}

fn invalid(setting: &'static str, value: String, reason: String) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value,
        reason,
    }
}

#[cfg(test)]
mod tests;

/// The Kubernetes settings, only with `k8s = true` (a stray one is a mistake worth saying).
fn k8s_config(
    on: bool,
    kubeconfig: Option<PathBuf>,
    namespace: Option<String>,
    cluster: Option<String>,
    agent_sa: Option<String>,
) -> Result<Option<crate::k8s::K8sConfig>, ConfigError> {
    if !on {
        let stray = [
            ("kubeconfig", kubeconfig.map(|p| p.display().to_string())),
            ("namespace", namespace),
            ("cluster", cluster),
            ("agent_sa", agent_sa),
        ];
        return match stray.into_iter().find_map(|(k, v)| v.map(|v| (k, v))) {
            Some((setting, value)) => Err(invalid(
                setting,
                value,
                "only used in kubernetes mode; add `--k8s`".to_owned(),
            )),
            None => Ok(None),
        };
    }
    let mut k8s = crate::k8s::K8sConfig::new(kubeconfig).map_err(|e| {
        invalid(
            "agent_sa",
            crate::k8s::DEFAULT_AGENT_SA.to_owned(),
            e.to_string(),
        )
    })?;
    if let Some(namespace) = namespace {
        k8s.namespace = namespace;
    }
    if let Some(cluster) = cluster {
        k8s.cluster = cluster;
    }
    if let Some(text) = agent_sa {
        k8s.agent_sa = text
            .parse()
            .map_err(|e: crate::k8s::K8sError| invalid("agent_sa", text.clone(), e.to_string()))?;
    }
    k8s.validate().map_err(|e| match &e {
        crate::k8s::K8sError::BadName(name, _) if *name == k8s.namespace => {
            invalid("namespace", name.clone(), e.to_string())
        }
        _ => invalid("cluster", k8s.cluster.clone(), e.to_string()),
    })?;
    Ok(Some(k8s))
}
