//! The proxy's typed configuration, validated once before the runtime starts.
//!
//! The CLI gathers [`ProxySettings`] from flags (with `MESHWARD_PROXY_<SETTING>` env fallbacks,
//! read by clap), then the TOML file given with `--config`; [`ProxySettings::into_config`] turns
//! them into a [`ProxyConfig`] of domain types (socket addresses, SPIFFE IDs, durations), so
//! nothing downstream parses again. Tests build a [`ProxyConfig`] directly with
//! [`ProxyConfig::new`].
//!
//! Listeners are written `LISTEN=APP[,tcp]` (inbound) and `LISTEN=UPSTREAM,SPIFFE_ID[,tcp]`
//! (outbound) on the command line; the TOML file takes the same strings, or tables:
//!
//! ```toml
//! [[inbound]]
//! listen = "0.0.0.0:15006"
//! app = "127.0.0.1:8080"
//!
//! [[outbound]]
//! listen = "127.0.0.1:15001"
//! upstream = "orders.shop.svc:15006"
//! spiffe_id = "spiffe://example.org/ns/shop/sa/orders"
//! protocol = "tcp"
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshward_identity::SpiffeId;
use serde::Deserialize;

use crate::policy_store::DEFAULT_POLL_INTERVAL;

/// Default limit on the size of a request's header section (431 beyond it).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default time a client has to send a complete request head (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a peer has to finish the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on concurrent HTTP/2 streams per connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default interval between HTTP/2 keepalive pings.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default time an HTTP/2 keepalive ping may go unanswered before the connection is closed.
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time in-flight requests get to finish after shutdown starts.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Default timeout for connecting to the local app or an upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time an idle keep-alive connection to the local app is kept for reuse: below the idle
/// timeouts of common app servers (gunicorn's async workers 2 s, uvicorn and Node.js 5 s), so the
/// proxy lets go of a connection before the app closes it under a request.
pub const DEFAULT_APP_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Most runtime worker threads accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Everything `meshward proxy run` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where this proxy's SVID and trust bundles come from.
    pub identity: IdentitySource,
    /// The enforced policy set's directory.
    pub policies: PathBuf,
    /// A dry-run policy set's directory: audited and counted, never enforced.
    pub dry_run_policies: Option<PathBuf>,
    /// A schema file replacing the built-in one.
    pub schema: Option<PathBuf>,
    /// The audit file (hash-chained JSON lines).
    pub audit: PathBuf,
    /// The node name written into every audit record.
    pub node: String,
    /// The admin HTTP port (`/metrics`, `/ready`, `/live`), if any.
    pub admin: Option<SocketAddr>,
    /// mTLS listeners in front of the local app.
    pub inbound: Vec<InboundListener>,
    /// Plain listeners for the local app, going out over mTLS.
    pub outbound: Vec<OutboundListener>,
    /// Sizes and timeouts.
    pub limits: Limits,
    /// How often the policy directories are checked for changes.
    pub policy_poll_interval: Duration,
    /// Worker threads of the proxy's async runtime (`None`: one per CPU; 1: the current-thread
    /// scheduler, see [`runtime`](crate::runtime())). Read by the CLI, which builds the runtime;
    /// [`start`](crate::start) runs on whatever runtime it is given.
    pub worker_threads: Option<usize>,
    /// Offer HTTP/2 to HTTP upstreams over ALPN (the default); `false` offers only HTTP/1.1.
    pub upstream_http2: bool,
}

/// Where the proxy gets its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// The agent's SPIFFE Workload API on this unix socket (`--socket`).
    WorkloadApi(PathBuf),
    /// A directory with `svid.pem`, `svid.key` and `bundle.pem` (as `meshward svid fetch --write`
    /// leaves them), watched for changes (`--svid-dir`).
    SvidDir(PathBuf),
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2; every request is decided.
    #[default]
    Http,
    /// Plain TCP; every connection is decided (action `connect`).
    Tcp,
}

/// An inbound listener: mTLS from peers, decided, forwarded to the local app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundListener {
    /// Where peers connect.
    pub listen: SocketAddr,
    /// The local app, spoken to in plain text.
    pub app: SocketAddr,
    /// HTTP or TCP.
    pub protocol: Protocol,
}

/// An outbound listener: plain from the local app, mTLS to one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundListener {
    /// Where the local app connects.
    pub listen: SocketAddr,
    /// The upstream (`host:port`, usually its inbound proxy).
    pub upstream: String,
    /// The only SPIFFE ID the upstream may present.
    pub expected: SpiffeId,
    /// HTTP or TCP.
    pub protocol: Protocol,
}

/// Sizes and timeouts that protect the proxy from slow or abusive peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request header section accepted; HTTP/1.1 answers 431 beyond it.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head. On HTTP/1.1 it also closes a
    /// keep-alive connection that stays idle this long after its last response; the outbound pool
    /// drops idle upstream connections after half of it (see
    /// [`upstream_pool_idle`](crate::outbound::upstream_pool_idle)).
    pub header_read_timeout: Duration,
    /// Time a peer has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Interval between HTTP/2 keepalive pings.
    pub h2_keepalive_interval: Duration,
    /// Time a keepalive ping may go unanswered.
    pub h2_keepalive_timeout: Duration,
    /// Time in-flight requests get to finish after shutdown starts.
    pub drain_grace: Duration,
    /// Timeout for connecting to the app or an upstream (TCP and TLS each).
    pub connect_timeout: Duration,
    /// Time an idle keep-alive connection to the local app is kept for reuse. Keep it below the
    /// app server's own idle timeout: a request sent on a connection the app is closing at that
    /// moment fails (502) without the app ever seeing it.
    pub app_idle_timeout: Duration,
}

pub use meshward_ops::config::ConfigError;

/// This part's name in [`ConfigError::Missing`] (its env variables are `MESHWARD_PROXY_*`).
const PART: &str = "proxy";

/// Raw settings from flags, env or a TOML file; every field optional, nothing validated yet.
///
/// In the TOML file the keys are the field names, which are also the flag names with `-`
/// for `_` and, upper-cased, the env names (`MESHWARD_PROXY_DRY_RUN_POLICIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// See [`IdentitySource::WorkloadApi`].
    pub socket: Option<PathBuf>,
    /// See [`IdentitySource::SvidDir`].
    pub svid_dir: Option<PathBuf>,
    /// See [`ProxyConfig::policies`].
    pub policies: Option<PathBuf>,
    /// See [`ProxyConfig::dry_run_policies`].
    pub dry_run_policies: Option<PathBuf>,
    /// See [`ProxyConfig::schema`].
    pub schema: Option<PathBuf>,
    /// See [`ProxyConfig::audit`].
    pub audit: Option<PathBuf>,
    /// See [`ProxyConfig::node`] (default: the host name).
    pub node: Option<String>,
    /// See [`ProxyConfig::admin`].
    pub admin: Option<String>,
    /// See [`ProxyConfig::inbound`].
    #[serde(default)]
    pub inbound: Vec<ListenerSetting>,
    /// See [`ProxyConfig::outbound`].
    #[serde(default)]
    pub outbound: Vec<ListenerSetting>,
    /// See [`Limits::max_header_bytes`].
    pub max_header_bytes: Option<usize>,
    /// See [`Limits::header_read_timeout`].
    pub header_read_timeout: Option<String>,
    /// See [`Limits::handshake_timeout`].
    pub handshake_timeout: Option<String>,
    /// See [`Limits::h2_max_concurrent_streams`].
    pub h2_max_concurrent_streams: Option<u32>,
    /// See [`Limits::drain_grace`].
    pub drain_grace: Option<String>,
    /// See [`Limits::app_idle_timeout`].
    pub app_idle_timeout: Option<String>,
    /// See [`ProxyConfig::policy_poll_interval`].
    pub policy_poll_interval: Option<String>,
    /// See [`ProxyConfig::worker_threads`].
    pub worker_threads: Option<usize>,
    /// See [`ProxyConfig::upstream_http2`].
    pub upstream_http2: Option<bool>,
}

/// One listener as written: the flag's string form, or a TOML table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ListenerSetting {
    /// `LISTEN=APP[,tcp]` or `LISTEN=UPSTREAM,SPIFFE_ID[,tcp]`.
    Spec(String),
    /// `{ listen, app | upstream + spiffe_id, protocol }`.
    Table(ListenerTable),
}

/// A listener as a TOML table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTable {
    /// The address to listen on.
    pub listen: String,
    /// Inbound: the local app's address.
    pub app: Option<String>,
    /// Outbound: the upstream's `host:port`.
    pub upstream: Option<String>,
    /// Outbound: the upstream's SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// `http` (default) or `tcp`.
    pub protocol: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_keepalive_interval: DEFAULT_H2_KEEPALIVE_INTERVAL,
            h2_keepalive_timeout: DEFAULT_H2_KEEPALIVE_TIMEOUT,
            drain_grace: DEFAULT_DRAIN_GRACE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            app_idle_timeout: DEFAULT_APP_IDLE_TIMEOUT,
        }
    }
}

impl ProxyConfig {
    /// A config with no listeners, no admin port and default limits (tests adjust fields).
    pub fn new(
        identity: IdentitySource,
        policies: impl Into<PathBuf>,
        audit: impl Into<PathBuf>,
    ) -> Self {
        Self {
            identity,
            policies: policies.into(),
            dry_run_policies: None,
            schema: None,
            audit: audit.into(),
            node: default_node(),
            admin: None,
            inbound: Vec::new(),
            outbound: Vec::new(),
            limits: Limits::default(),
            policy_poll_interval: DEFAULT_POLL_INTERVAL,
            worker_threads: None,
            upstream_http2: true,
        }
    }

    /// Checks ranges and conflicts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        // hyper's HTTP/1.1 read buffer cannot be smaller than 8 KiB.
        if !(8192..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                "max_header_bytes",
                l.max_header_bytes.to_string(),
                "give a size from 8192 to 1048576 bytes",
            ));
        }
        if let Some(n) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            return Err(invalid(
                "worker_threads",
                n.to_string(),
                "give from 1 to 1024 threads, or leave it unset for one per CPU",
            ));
        }
        if l.h2_max_concurrent_streams == 0 {
            return Err(invalid(
                "h2_max_concurrent_streams",
                "0".to_owned(),
                "give at least 1",
            ));
        }
        for (setting, value) in [
            ("header_read_timeout", l.header_read_timeout),
            ("handshake_timeout", l.handshake_timeout),
            ("connect_timeout", l.connect_timeout),
            ("app_idle_timeout", l.app_idle_timeout),
            ("policy_poll_interval", self.policy_poll_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    setting,
                    "0s".to_owned(),
                    "give a positive duration",
                ));
            }
        }
        let mut seen: Vec<SocketAddr> = Vec::new();
        let listens = self
            .inbound
            .iter()
            .map(|l| l.listen)
            .chain(self.outbound.iter().map(|l| l.listen))
            .chain(self.admin);
        for addr in listens {
            if addr.port() != 0 && seen.contains(&addr) {
                return Err(ConfigError::Conflict(format!(
                    "two listeners on `{addr}`: give each its own address"
                )));
            }
            seen.push(addr);
        }
        if self.inbound.is_empty() && self.outbound.is_empty() {
            return Err(ConfigError::Conflict(
                "no listeners: pass at least one `--inbound LISTEN=APP` or `--outbound LISTEN=UPSTREAM,SPIFFE_ID`".to_owned(),
            ));
        }
        Ok(())
    }
}

impl ProxySettings {
    /// Reads the TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        meshward_ops::config::read_toml(path)
    }

    /// These settings, with every unset one taken from `fallback` (flags and env over the file).
    /// Listener lists are not merged: flags replace the file's list when given.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            socket: self.socket.or(fallback.socket),
            svid_dir: self.svid_dir.or(fallback.svid_dir),
            policies: self.policies.or(fallback.policies),
            dry_run_policies: self.dry_run_policies.or(fallback.dry_run_policies),
            schema: self.schema.or(fallback.schema),
            audit: self.audit.or(fallback.audit),
            node: self.node.or(fallback.node),
            admin: self.admin.or(fallback.admin),
            inbound: if self.inbound.is_empty() {
                fallback.inbound
            } else {
                self.inbound
            },
            outbound: if self.outbound.is_empty() {
                fallback.outbound
            } else {
                self.outbound
            },
            max_header_bytes: self.max_header_bytes.or(fallback.max_header_bytes),
            header_read_timeout: self.header_read_timeout.or(fallback.header_read_timeout),
            handshake_timeout: self.handshake_timeout.or(fallback.handshake_timeout),
            h2_max_concurrent_streams: self
                .h2_max_concurrent_streams
                .or(fallback.h2_max_concurrent_streams),
            drain_grace: self.drain_grace.or(fallback.drain_grace),
            app_idle_timeout: self.app_idle_timeout.or(fallback.app_idle_timeout),
            policy_poll_interval: self.policy_poll_interval.or(fallback.policy_poll_interval),
            worker_threads: self.worker_threads.or(fallback.worker_threads),
            upstream_http2: self.upstream_http2.or(fallback.upstream_http2),
        }
    }

    /// Parses and validates every setting.
    pub fn into_config(self) -> Result<ProxyConfig, ConfigError> {
        let identity = match (self.socket, self.svid_dir) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "give either `--socket` (the agent's Workload API) or `--svid-dir`, not both"
                        .to_owned(),
                ));
            }
            (Some(socket), None) => IdentitySource::WorkloadApi(socket),
            (None, Some(dir)) => IdentitySource::SvidDir(dir),
            (None, None) => {
                return Err(ConfigError::Missing {
                    part: PART,
                    setting: "socket",
                });
            }
        };
        let policies = self.policies.ok_or(ConfigError::Missing {
            part: PART,
            setting: "policies",
        })?;
        let audit = self.audit.ok_or(ConfigError::Missing {
            part: PART,
            setting: "audit",
        })?;
        let mut config = ProxyConfig::new(identity, policies, audit);
        config.dry_run_policies = self.dry_run_policies;
        config.schema = self.schema;
        if let Some(node) = self.node {
            config.node = node;
        }
        config.admin = self.admin.map(|a| parse_addr("admin", &a)).transpose()?;
        config.inbound = self
            .inbound
            .iter()
            .map(parse_inbound)
            .collect::<Result<_, _>>()?;
        config.outbound = self
            .outbound
            .iter()
            .map(parse_outbound)
            .collect::<Result<_, _>>()?;
        let limits = &mut config.limits;
        if let Some(v) = self.max_header_bytes {
            limits.max_header_bytes = v;
        }
        if let Some(v) = self.h2_max_concurrent_streams {
            limits.h2_max_concurrent_streams = v;
        }
        for (setting, value, slot) in [
            (
                "header_read_timeout",
                self.header_read_timeout,
                &mut limits.header_read_timeout,
            ),
            (
                "handshake_timeout",
                self.handshake_timeout,
                &mut limits.handshake_timeout,
            ),
            ("drain_grace", self.drain_grace, &mut limits.drain_grace),
            (
                "app_idle_timeout",
                self.app_idle_timeout,
                &mut limits.app_idle_timeout,
            ),
        ] {
            if let Some(v) = value {
                *slot = parse_duration(setting, &v)?;
            }
        }
        if let Some(v) = self.policy_poll_interval {
            config.policy_poll_interval = parse_duration("policy_poll_interval", &v)?;
        }
        config.worker_threads = self.worker_threads;
        if let Some(v) = self.upstream_http2 {
            config.upstream_http2 = v;
        }
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

/// Parses `LISTEN=APP[,tcp]`.
pub fn parse_inbound(setting: &ListenerSetting) -> Result<InboundListener, ConfigError> {
    const NAME: &str = "inbound";
    let (listen, app, protocol) = match setting {
        ListenerSetting::Spec(spec) => {
            let (listen, rest) = spec
                .split_once('=')
                .ok_or_else(|| invalid(NAME, spec.clone(), "write `LISTEN=APP_ADDR[,tcp]`"))?;
            let mut parts = rest.split(',');
            let app = parts.next().unwrap_or_default();
            let protocol = parts.next();
            if parts.next().is_some() {
                return Err(invalid(NAME, spec.clone(), "write `LISTEN=APP_ADDR[,tcp]`"));
            }
            (
                listen.to_owned(),
                app.to_owned(),
                protocol.map(str::to_owned),
            )
        }
        ListenerSetting::Table(t) => {
            if t.upstream.is_some() || t.spiffe_id.is_some() {
                return Err(invalid(
                    NAME,
                    t.listen.clone(),
                    "an inbound listener has `app`, not `upstream` or `spiffe_id`",
                ));
            }
            let app = t
                .app
                .clone()
                .ok_or_else(|| invalid(NAME, t.listen.clone(), "the table needs `app`"))?;
            (t.listen.clone(), app, t.protocol.clone())
        }
    };
    Ok(InboundListener {
        listen: parse_addr(NAME, &listen)?,
        app: parse_addr(NAME, &app)?,
        protocol: parse_protocol(NAME, protocol.as_deref())?,
    })
}

/// Parses `LISTEN=UPSTREAM,SPIFFE_ID[,tcp]`.
pub fn parse_outbound(setting: &ListenerSetting) -> Result<OutboundListener, ConfigError> {
    const NAME: &str = "outbound";
    const FORM: &str = "write `LISTEN=UPSTREAM_ADDR,SPIFFE_ID[,tcp]`";
    let (listen, upstream, id, protocol) = match setting {
        ListenerSetting::Spec(spec) => {
            let (listen, rest) = spec
                .split_once('=')
                .ok_or_else(|| invalid(NAME, spec.clone(), FORM))?;
            let mut parts = rest.split(',');
            let (Some(upstream), Some(id)) = (parts.next(), parts.next()) else {
                return Err(invalid(NAME, spec.clone(), FORM));
            };
            let protocol = parts.next();
            if parts.next().is_some() {
                return Err(invalid(NAME, spec.clone(), FORM));
            }
            (
                listen.to_owned(),
                upstream.to_owned(),
                id.to_owned(),
                protocol.map(str::to_owned),
            )
        }
        ListenerSetting::Table(t) => {
            if t.app.is_some() {
                return Err(invalid(
                    NAME,
                    t.listen.clone(),
                    "an outbound listener has `upstream` and `spiffe_id`, not `app`",
                ));
            }
            let (Some(upstream), Some(id)) = (t.upstream.clone(), t.spiffe_id.clone()) else {
                return Err(invalid(
                    NAME,
                    t.listen.clone(),
                    "the table needs `upstream` and `spiffe_id`",
                ));
            };
            (t.listen.clone(), upstream, id, t.protocol.clone())
        }
    };
    check_host_port(NAME, &upstream)?;
    let expected = SpiffeId::parse(&id).map_err(|e| invalid(NAME, id.clone(), &e.to_string()))?;
    if expected.is_trust_domain_id() {
        return Err(invalid(
            NAME,
            id,
            "a workload's spiffe id has a path (`spiffe://td/ns/NS/sa/SA`)",
        ));
    }
    Ok(OutboundListener {
        listen: parse_addr(NAME, &listen)?,
        upstream,
        expected,
        protocol: parse_protocol(NAME, protocol.as_deref())?,
    })
}

/// Parses one duration setting (`250ms`, `10s`, `1m30s`, `7d`: see [`meshward_ops::duration`]).
pub fn parse_duration(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    meshward_ops::duration::parse_duration(value)
        .map_err(|e| invalid(setting, value.to_owned(), &e.to_string()))
}

fn parse_addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            setting,
            value.to_owned(),
            "write an IP address and port, like `127.0.0.1:8080` or `[::1]:8080`",
        )
    })
}

fn parse_protocol(setting: &'static str, value: Option<&str>) -> Result<Protocol, ConfigError> {
    match value {
        None | Some("http") => Ok(Protocol::Http),
        Some("tcp") => Ok(Protocol::Tcp),
        Some(other) => Err(invalid(
            setting,
            other.to_owned(),
            "the protocol is `http` (the default) or `tcp`",
        )),
    }
}

fn check_host_port(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = || {
        invalid(
            setting,
            value.to_owned(),
            "the upstream is `HOST:PORT`, like `orders.shop.svc:15006` or `10.0.0.7:15006`",
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
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

/// The host name, for the audit records' `node`.
fn default_node() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ListenerSetting {
        ListenerSetting::Spec(s.to_owned())
    }

    fn base() -> ProxySettings {
        ProxySettings {
            socket: Some("/run/agent.sock".into()),
            policies: Some("/etc/policies".into()),
            audit: Some("/var/audit.log".into()),
            inbound: vec![spec("0.0.0.0:15006=127.0.0.1:8080")],
            ..ProxySettings::default()
        }
    }

    #[test]
    fn listeners_parse_from_flags_and_tables() {
        let inbound = parse_inbound(&spec("0.0.0.0:15006=127.0.0.1:8080,tcp")).unwrap();
        assert_eq!(inbound.protocol, Protocol::Tcp);
        assert_eq!(inbound.app, "127.0.0.1:8080".parse().unwrap());
        let outbound = parse_outbound(&spec(
            "127.0.0.1:15001=orders:15006,spiffe://a.org/ns/x/sa/y",
        ))
        .unwrap();
        assert_eq!(outbound.upstream, "orders:15006");
        assert_eq!(outbound.expected.as_str(), "spiffe://a.org/ns/x/sa/y");
        assert_eq!(outbound.protocol, Protocol::Http);
        let settings: ProxySettings = toml::from_str(
            r#"
            socket = "/s"
            policies = "/p"
            audit = "/a"
            inbound = ["0.0.0.0:1=127.0.0.1:2"]
            [[outbound]]
            listen = "127.0.0.1:3"
            upstream = "up:4"
            spiffe_id = "spiffe://a.org/u"
            protocol = "tcp"
            "#,
        )
        .unwrap();
        let config = settings.into_config().unwrap();
        assert_eq!(config.outbound[0].protocol, Protocol::Tcp);
        assert_eq!(config.inbound.len(), 1);
    }

    #[test]
    fn bad_listeners_are_refused_with_the_value() {
        for (bad, needle) in [
            ("0.0.0.0:1", "LISTEN=APP_ADDR"),
            ("0.0.0.0:1=localhost:80", "IP address"),
            ("0.0.0.0:1=127.0.0.1:80,udp", "`tcp`"),
        ] {
            let err = parse_inbound(&spec(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        for bad in [
            "127.0.0.1:1=up:2",
            "127.0.0.1:1=up,spiffe://a.org/x",
            "127.0.0.1:1=up:2,http://a.org/x",
            "127.0.0.1:1=up:2,spiffe://a.org",
        ] {
            let err = parse_outbound(&spec(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn missing_and_conflicting_settings_are_named() {
        let mut s = base();
        s.audit = None;
        let err = s.into_config().unwrap_err();
        assert!(err.to_string().contains("MESHWARD_PROXY_AUDIT"), "{err}");
        let mut s = base();
        s.svid_dir = Some("/d".into());
        assert!(matches!(s.into_config(), Err(ConfigError::Conflict(_))));
        let mut s = base();
        s.inbound.push(spec("0.0.0.0:15006=127.0.0.1:9090"));
        assert!(matches!(s.into_config(), Err(ConfigError::Conflict(_))));
        let mut s = base();
        s.worker_threads = Some(0);
        assert!(matches!(
            s.into_config(),
            Err(ConfigError::Invalid {
                setting: "worker_threads",
                ..
            })
        ));
        let mut s = base();
        s.header_read_timeout = Some("ten".into());
        assert!(matches!(
            s.into_config(),
            Err(ConfigError::Invalid {
                setting: "header_read_timeout",
                ..
            })
        ));
    }

    #[test]
    fn app_idle_timeout_defaults_below_common_app_servers_and_must_be_positive() {
        assert_eq!(
            base().into_config().unwrap().limits.app_idle_timeout,
            Duration::from_millis(1500)
        );
        let mut s = base();
        s.app_idle_timeout = Some("250ms".into());
        assert_eq!(
            s.into_config().unwrap().limits.app_idle_timeout,
            Duration::from_millis(250)
        );
        for bad in ["0s", "soon"] {
            let mut s = base();
            s.app_idle_timeout = Some(bad.into());
            let err = s.into_config().unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        setting: "app_idle_timeout",
                        ..
                    }
                ),
                "{bad}: {err:?}"
            );
        }
    }

    // The syntax itself is tested in `meshward-ops` (duration/tests.rs); here, that a bad one
    // names the setting and says why.
    #[test]
    fn durations_parse_and_bad_ones_name_the_setting() {
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
        let err = parse_duration("drain_grace", "5").unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::Invalid { setting: "drain_grace", value, .. } if value == "5"
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "invalid `drain_grace` `5`: `5` has no unit; use `s`, `m`, `h` or `d` (e.g. `5s`)"
        );
        let err = parse_duration("drain_grace", "5w").unwrap_err();
        assert!(err.to_string().contains("unknown unit `w`"), "{err}");
    }
}
