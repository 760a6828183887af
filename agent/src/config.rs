//! The agent's typed configuration, validated once before the runtime starts.
//!
//! The CLI gathers [`AgentSettings`] from flags (with `MESHWARD_AGENT_<SETTING>` env fallbacks, read
//! by clap), then the TOML file given with `--config`, then the defaults here.
//! [`AgentSettings::into_config`] turns them into an [`AgentConfig`] of domain types, so nothing
//! downstream parses again. Tests build an [`AgentConfig`] directly with [`AgentConfig::new`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshward_identity::TrustDomain;
pub use meshward_ops::duration::{DurationError, format_duration, parse_duration};
use serde::Deserialize;

/// Default interval between `SyncEntries` calls.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Default bound on how long a workload waits for an identity that may still be syncing.
pub const DEFAULT_IDENTITY_WAIT: Duration = Duration::from_secs(3);
/// Default timeout of one call to the CA.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);

/// A join token: a one-time secret, so `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    /// Wraps a token; refuses an empty one.
    pub fn new(token: impl Into<String>) -> Result<Self, ConfigError> {
        let token = token.into();
        let trimmed = token.trim();
        if trimmed.is_empty() {
            return Err(invalid(
                "join_token",
                String::new(),
                "the join token is empty; create one with `meshward ca token create --node NAME`",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The token itself, for the attestation request only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// Everything `meshward agent run` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The CA's agent API, `host:port` (a DNS name or an IP).
    pub ca_addr: String,
    /// PEM roots that vouch for the CA on the very first connection (before the agent holds a
    /// bundle of its own in the data dir).
    pub trust_bundle: PathBuf,
    /// The trust domain; read from the bootstrap roots' SPIFFE ID when not given.
    pub trust_domain: Option<TrustDomain>,
    /// The Workload API / SDS unix socket.
    pub socket: PathBuf,
    /// The agent SVID, its key and the bundle are kept here (0700).
    pub data_dir: PathBuf,
    /// The one-time join token; only needed when the data dir holds no valid agent SVID.
    pub join_token: Option<JoinToken>,
    /// The admin HTTP port (`/metrics`, `/ready`, `/live`), if any.
    pub admin_listen: Option<SocketAddr>,
    /// How often the entries of this node are fetched from the CA.
    pub sync_interval: Duration,
    /// How long a workload without a (yet) matching identity is kept waiting before it is refused.
    pub identity_wait: Duration,
    /// Timeout of one call to the CA.
    pub ca_timeout: Duration,
    /// Kubernetes mode (`--k8s`): node attestation with the projected service-account token and
    /// the `k8s` workload attestor; `None` in standalone mode.
    pub k8s: Option<K8sAgentConfig>,
}

/// The Kubernetes mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sAgentConfig {
    /// This node's name (from the Downward API, `spec.nodeName`).
    pub node_name: String,
    /// The projected service-account token (audience `meshward-ca`); re-read at every
    /// attestation because the kubelet rotates it.
    pub psat_token_file: PathBuf,
    /// A kubeconfig for the pod watch; the in-cluster config (or `KUBECONFIG`) when `None`.
    pub kubeconfig: Option<PathBuf>,
}

pub use meshward_ops::config::ConfigError;

/// This part's name in [`ConfigError::Missing`] (its env variables are `MESHWARD_AGENT_*`).
const PART: &str = "agent";

/// Raw settings from flags, env or a TOML file; every field optional, nothing validated yet.
///
/// In the TOML file the keys are the field names (`ca = "ca.example:8081"`), which are also the
/// flag names (`--ca`) and, upper-cased, the env names (`MESHWARD_AGENT_CA`).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// See [`AgentConfig::ca_addr`] (the flag is `--ca`).
    pub ca: Option<String>,
    /// See [`AgentConfig::trust_bundle`].
    pub trust_bundle: Option<PathBuf>,
    /// See [`AgentConfig::trust_domain`].
    pub trust_domain: Option<String>,
    /// See [`AgentConfig::socket`].
    pub socket: Option<PathBuf>,
    /// See [`AgentConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`AgentConfig::join_token`].
    pub join_token: Option<String>,
    /// See [`AgentConfig::admin_listen`].
    pub admin_listen: Option<String>,
    /// See [`AgentConfig::sync_interval`].
    pub sync_interval: Option<String>,
    /// See [`AgentConfig::identity_wait`].
    pub identity_wait: Option<String>,
    /// See [`AgentConfig::ca_timeout`].
    pub ca_timeout: Option<String>,
    /// Kubernetes mode; see [`AgentConfig::k8s`].
    pub k8s: Option<bool>,
    /// See [`K8sAgentConfig::node_name`].
    pub node_name: Option<String>,
    /// See [`K8sAgentConfig::psat_token_file`].
    pub psat_token_file: Option<PathBuf>,
    /// See [`K8sAgentConfig::kubeconfig`].
    pub kubeconfig: Option<PathBuf>,
}

impl fmt::Debug for AgentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSettings")
            .field("ca", &self.ca)
            .field("trust_bundle", &self.trust_bundle)
            .field("trust_domain", &self.trust_domain)
            .field("socket", &self.socket)
            .field("data_dir", &self.data_dir)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("admin_listen", &self.admin_listen)
            .field("sync_interval", &self.sync_interval)
            .field("identity_wait", &self.identity_wait)
            .field("ca_timeout", &self.ca_timeout)
            .field("k8s", &self.k8s)
            .field("node_name", &self.node_name)
            .field("psat_token_file", &self.psat_token_file)
            .field("kubeconfig", &self.kubeconfig)
            .finish()
    }
}

impl AgentConfig {
    /// A config with every optional setting at its default (tests use this, then adjust fields).
    pub fn new(
        ca_addr: impl Into<String>,
        trust_bundle: impl Into<PathBuf>,
        socket: impl Into<PathBuf>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            ca_addr: ca_addr.into(),
            trust_bundle: trust_bundle.into(),
            trust_domain: None,
            socket: socket.into(),
            data_dir: data_dir.into(),
            join_token: None,
            admin_listen: None,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            identity_wait: DEFAULT_IDENTITY_WAIT,
            ca_timeout: DEFAULT_CA_TIMEOUT,
            k8s: None,
        }
    }

    /// Checks the ranges of the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ca_addr(&self.ca_addr)?;
        for (setting, path) in [
            ("trust_bundle", &self.trust_bundle),
            ("socket", &self.socket),
            ("data_dir", &self.data_dir),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(setting, String::new(), "give a path"));
            }
        }
        for (setting, value, min) in [
            (
                "sync_interval",
                self.sync_interval,
                Duration::from_millis(100),
            ),
            ("ca_timeout", self.ca_timeout, Duration::from_millis(100)),
        ] {
            if value < min {
                return Err(invalid(
                    setting,
                    format_duration(value),
                    "use at least 100ms",
                ));
            }
        }
        if self.identity_wait > Duration::from_secs(60) {
            return Err(invalid(
                "identity_wait",
                format_duration(self.identity_wait),
                "use at most 60s: a workload must never hang",
            ));
        }
        Ok(())
    }
}

impl AgentSettings {
    /// Parses a TOML config file's text; `path` is only for the error message.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        meshward_ops::config::parse_toml(text, path)
    }

    /// Reads and parses a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        meshward_ops::config::read_toml(path)
    }

    /// These settings, with any gaps filled from `fallback` (e.g. flags over the config file).
    pub fn or(self, fallback: AgentSettings) -> AgentSettings {
        AgentSettings {
            ca: self.ca.or(fallback.ca),
            trust_bundle: self.trust_bundle.or(fallback.trust_bundle),
            trust_domain: self.trust_domain.or(fallback.trust_domain),
            socket: self.socket.or(fallback.socket),
            data_dir: self.data_dir.or(fallback.data_dir),
            join_token: self.join_token.or(fallback.join_token),
            admin_listen: self.admin_listen.or(fallback.admin_listen),
            sync_interval: self.sync_interval.or(fallback.sync_interval),
            identity_wait: self.identity_wait.or(fallback.identity_wait),
            ca_timeout: self.ca_timeout.or(fallback.ca_timeout),
            k8s: self.k8s.or(fallback.k8s),
            node_name: self.node_name.or(fallback.node_name),
            psat_token_file: self.psat_token_file.or(fallback.psat_token_file),
            kubeconfig: self.kubeconfig.or(fallback.kubeconfig),
        }
    }

    /// Parses and validates every setting, applying defaults for the missing optional ones.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let required = |value: Option<PathBuf>, setting| {
            value.ok_or(ConfigError::Missing {
                part: PART,
                setting,
            })
        };
        let ca_addr = self.ca.ok_or(ConfigError::Missing {
            part: PART,
            setting: "ca",
        })?;
        let mut config = AgentConfig::new(
            ca_addr,
            required(self.trust_bundle, "trust_bundle")?,
            required(self.socket, "socket")?,
            required(self.data_dir, "data_dir")?,
        );
        if let Some(td) = self.trust_domain {
            config.trust_domain = Some(
                td.parse::<TrustDomain>()
                    .map_err(|e| invalid("trust_domain", td.clone(), &e.to_string()))?,
            );
        }
        config.join_token = self.join_token.map(JoinToken::new).transpose()?;
        if let Some(addr) = self.admin_listen {
            config.admin_listen = Some(addr.parse().map_err(|_| {
                invalid(
                    "admin_listen",
                    addr.clone(),
                    "use IP:PORT, e.g. `127.0.0.1:8082` or `[::1]:8082`",
                )
            })?);
        }
        for (setting, text, slot) in [
            (
                "sync_interval",
                self.sync_interval,
                &mut config.sync_interval,
            ),
            (
                "identity_wait",
                self.identity_wait,
                &mut config.identity_wait,
            ),
            ("ca_timeout", self.ca_timeout, &mut config.ca_timeout),
        ] {
            if let Some(text) = text {
                *slot = parse_duration(&text)
                    .map_err(|e| invalid(setting, text.clone(), &e.to_string()))?;
            }
        }
        if self.k8s == Some(true) {
            if config.join_token.is_some() {
                return Err(invalid(
                    "join_token",
                    "<redacted>".into(),
                    "not used with `--k8s`: the agent attests with its service-account token",
                ));
            }
            let node_name =
                self.node_name
                    .filter(|n| !n.trim().is_empty())
                    .ok_or(ConfigError::Missing {
                        part: PART,
                        setting: "node_name",
                    })?;
            config.k8s = Some(K8sAgentConfig {
                node_name,
                psat_token_file: required(self.psat_token_file, "psat_token_file")?,
                kubeconfig: self.kubeconfig,
            });
        }
        config.validate()?;
        Ok(config)
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn check_ca_addr(addr: &str) -> Result<(), ConfigError> {
    let reason = "use HOST:PORT, e.g. `meshward-ca.meshward:8081` or `10.0.0.5:8081`";
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(invalid("ca", addr.to_owned(), reason));
    };
    let host_ok = !host.is_empty()
        && !host.contains(char::is_whitespace)
        && !host.contains('/')
        // An IPv6 address needs brackets, or its colons would be read as the port separator.
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(invalid("ca", addr.to_owned(), reason));
    }
    Ok(())
}

fn invalid(setting: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AgentSettings {
        AgentSettings {
            ca: Some("ca.example:8081".into()),
            trust_bundle: Some("/etc/meshward/bundle.pem".into()),
            socket: Some("/run/meshward/agent.sock".into()),
            data_dir: Some("/var/lib/meshward-agent".into()),
            join_token: Some("secret-token".into()),
            ..AgentSettings::default()
        }
    }

    fn invalid_setting(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { setting, .. } => setting,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_the_gaps() {
        let config = settings().into_config().unwrap();
        assert_eq!(config.ca_addr, "ca.example:8081");
        assert_eq!(config.sync_interval, DEFAULT_SYNC_INTERVAL);
        assert_eq!(config.identity_wait, DEFAULT_IDENTITY_WAIT);
        assert_eq!(config.admin_listen, None);
        assert_eq!(config.trust_domain, None);
        assert_eq!(config.join_token.unwrap().secret(), "secret-token");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = AgentSettings::from_toml(
            "ca = \"file.example:1\"\nsync_interval = \"1m\"\nadmin_listen = \"127.0.0.1:9091\"\ntrust_domain = \"example.org\"\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        let flags = AgentSettings {
            sync_interval: Some("2s".into()),
            ..settings()
        };
        let config = flags.or(file).into_config().unwrap();
        assert_eq!(config.ca_addr, "ca.example:8081");
        assert_eq!(config.sync_interval, Duration::from_secs(2));
        assert_eq!(config.admin_listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(config.trust_domain.unwrap().as_str(), "example.org");
    }

    #[test]
    fn k8s_mode_needs_a_node_name_and_a_token_file_and_no_join_token() {
        let k8s = AgentSettings {
            join_token: None,
            k8s: Some(true),
            node_name: Some("node-a".into()),
            psat_token_file: Some("/var/run/secrets/meshward/token".into()),
            ..settings()
        };
        let config = k8s.clone().into_config().unwrap();
        assert_eq!(
            config.k8s,
            Some(K8sAgentConfig {
                node_name: "node-a".into(),
                psat_token_file: "/var/run/secrets/meshward/token".into(),
                kubeconfig: None,
            })
        );
        let err = AgentSettings {
            node_name: None,
            ..k8s.clone()
        }
        .into_config()
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Missing {
                    part: PART,
                    setting: "node_name"
                }
            ),
            "{err:?}"
        );
        let err = AgentSettings {
            psat_token_file: None,
            ..k8s.clone()
        }
        .into_config()
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Missing {
                    part: PART,
                    setting: "psat_token_file"
                }
            ),
            "{err:?}"
        );
        let err = AgentSettings {
            join_token: Some("t".into()),
            ..k8s
        }
        .into_config()
        .unwrap_err();
        assert_eq!(invalid_setting(err), "join_token");
        assert_eq!(settings().into_config().unwrap().k8s, None);
    }

    #[test]
    fn the_join_token_is_never_shown() {
        let settings = settings();
        assert!(!format!("{settings:?}").contains("secret-token"));
        let config = settings.into_config().unwrap();
        assert!(!format!("{config:?}").contains("secret-token"));
    }

    #[test]
    fn missing_settings_name_the_flag_and_env() {
        let err = AgentSettings {
            ca: None,
            ..settings()
        }
        .into_config()
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Missing {
                part: PART,
                setting: "ca"
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("`--ca`") && text.contains("`MESHWARD_AGENT_CA`"),
            "{text}"
        );
        let err = AgentSettings {
            socket: None,
            ..settings()
        }
        .into_config()
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Missing {
                part: PART,
                setting: "socket"
            }
        ));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            (
                "ca",
                AgentSettings {
                    ca: Some("ca.example".into()),
                    ..settings()
                },
            ),
            (
                "ca",
                AgentSettings {
                    ca: Some(":8081".into()),
                    ..settings()
                },
            ),
            (
                "ca",
                AgentSettings {
                    ca: Some("ca:0".into()),
                    ..settings()
                },
            ),
            (
                "ca",
                AgentSettings {
                    ca: Some("::1:8081".into()),
                    ..settings()
                },
            ),
            (
                "ca",
                AgentSettings {
                    ca: Some("ca:http".into()),
                    ..settings()
                },
            ),
            (
                "trust_domain",
                AgentSettings {
                    trust_domain: Some("Bad_TD".into()),
                    ..settings()
                },
            ),
            (
                "join_token",
                AgentSettings {
                    join_token: Some("  ".into()),
                    ..settings()
                },
            ),
            (
                "admin_listen",
                AgentSettings {
                    admin_listen: Some(":9090".into()),
                    ..settings()
                },
            ),
            (
                "sync_interval",
                AgentSettings {
                    sync_interval: Some("5".into()),
                    ..settings()
                },
            ),
            (
                "sync_interval",
                AgentSettings {
                    sync_interval: Some("10ms".into()),
                    ..settings()
                },
            ),
            (
                "identity_wait",
                AgentSettings {
                    identity_wait: Some("2h".into()),
                    ..settings()
                },
            ),
            (
                "identity_wait",
                AgentSettings {
                    identity_wait: Some("1d".into()),
                    ..settings()
                },
            ),
            (
                "ca_timeout",
                AgentSettings {
                    ca_timeout: Some("3w".into()),
                    ..settings()
                },
            ),
        ];
        for (setting, s) in cases {
            let err = s.into_config().unwrap_err();
            let message = err.to_string();
            assert!(!message.contains('\n'), "{message}");
            assert_eq!(invalid_setting(err), setting, "{message}");
        }
    }

    #[test]
    fn good_ca_addresses_pass() {
        for addr in [
            "ca:8081",
            "10.0.0.5:8081",
            "[::1]:8081",
            "meshward-ca.meshward.svc:443",
        ] {
            check_ca_addr(addr).unwrap();
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let err =
            AgentSettings::from_toml("sync_intervall = \"1s\"\n", Path::new("a.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
