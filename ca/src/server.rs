//! `meshward ca run`: opens the CA's state, then serves the agent API (gRPC over TLS), the admin
//! socket and the admin HTTP port until shutdown.
//!
//! Tasks (all critical: one fails, all stop):
//! - `grpc`: tonic serving the `Ca` service on connections from `accept`;
//! - `accept`: TCP accept + TLS handshakes (see [`tls`]);
//! - `serving-svid`: renews the CA's own SVID at half-life and when the active authority changes,
//!   and rebuilds the TLS config when the bundle changes;
//! - `reload`: picks up a rotation made by another replica and refreshes gauges;
//! - `admin`: the `Admin` service on the unix socket;
//! - `http`: `/metrics`, `/ready`, `/live` (if `admin_listen` is set).
//! - `webhook`: `POST /inject` over HTTPS, the injection webhook (if `webhook_listen` is set).
//!
//! Shutdown (the token fires, or a task fails): `/ready` goes false, listeners stop accepting,
//! bundle watches end, and calls in flight get [`CaConfig::drain_grace`] to finish.

pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use meshward_identity::audit::{AuditError, AuditLog};
use meshward_identity::proto::ca::ca_server::CaServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminService, AdminSocketError, bind_admin_socket};
use crate::config::{CaConfig, ConfigError};
use crate::datastore::{Datastore, DatastoreError};
use crate::http::{AdminHttp, Readiness};
use crate::issuer::{Issuer, IssuerConfig};
use crate::keystore::{Keystore, KeystoreError, SharedKeys, UpstreamCa};
use crate::metrics::CaMetrics;
use crate::service::CaService;
use tls::{ServingSvid, TlsSetupError};

/// Largest gRPC message the CA decodes (a full batch of CSRs is ~0.5 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long to wait before retrying a failed serving-SVID renewal.
const RENEW_RETRY: Duration = Duration::from_secs(10);

/// Why the CA could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SQLite datastore could not be opened.
    #[error("cannot open the ca datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// The keystore (signing authorities) could not be opened.
    #[error("cannot open the ca keystore: {0}")]
    Keystore(#[from] KeystoreError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log: {0}")]
    Audit(#[from] AuditError),
    /// The CA's TLS identity could not be made.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// A listen address could not be bound.
    #[error("cannot listen for {what} on `{addr}`: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The admin socket could not be set up.
    #[error(transparent)]
    AdminSocket(#[from] AdminSocketError),
    /// A gRPC server failed.
    #[error("the {what} server failed: {source}")]
    Grpc {
        /// Which server.
        what: &'static str,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// Kubernetes mode could not be set up (kubeconfig, in-cluster config, names).
    #[error("kubernetes mode: {0}")]
    K8s(#[from] crate::k8s::K8sError),
    /// The injection webhook could not start (its certificate, key or address).
    #[error(transparent)]
    Webhook(#[from] crate::webhook::WebhookError),
    /// A critical task ended before shutdown.
    #[error("the `{0}` task stopped unexpectedly")]
    TaskExited(&'static str),
    /// A critical task panicked.
    #[error("the `{task}` task panicked: {reason}")]
    TaskPanicked {
        /// Which task.
        task: &'static str,
        /// The panic, as far as it can be told.
        reason: String,
    },
}

/// A CA that is serving: where it listens, and the handle to wait for it to stop.
#[derive(Debug)]
pub struct RunningCa {
    /// The agent API's bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The admin HTTP port's bound address, if enabled.
    pub admin_http_addr: Option<SocketAddr>,
    /// The injection webhook's bound address, if enabled.
    pub webhook_addr: Option<SocketAddr>,
    /// The admin unix socket.
    pub admin_socket: std::path::PathBuf,
    handle: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningCa {
    /// Waits until the CA has shut down (after the shutdown token fired or a task failed).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) => Err(panicked("supervisor", &e)),
        }
    }
}

/// Runs the CA until `shutdown` fires (then drains) or a critical task fails.
pub async fn run(config: CaConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    start(config, shutdown).await?.wait().await
}

/// Opens everything and binds every listener, then serves in the background.
///
/// Returns once the CA is ready to take calls, so callers (tests, the harness) learn the bound
/// addresses; any start-up failure is returned here.
pub async fn start(config: CaConfig, shutdown: CancellationToken) -> Result<RunningCa, ServeError> {
    config.validate()?;
    let state_config = config.clone();
    // Kubernetes mode: the cluster is reached first, because the keys live in its Secret.
    let cluster = match &config.k8s {
        Some(k8s) => Some((k8s.connect().await?, k8s.namespace.clone())),
        None => None,
    };
    let shared = cluster.as_ref().map(|(cluster, namespace)| {
        SharedKeys::new(
            cluster.clone(),
            namespace,
            tokio::runtime::Handle::current(),
        )
    });
    let (datastore, keystore, issuer) =
        tokio::task::spawn_blocking(move || open_state(&state_config, shared))
            .await
            .map_err(|e| panicked("startup", &e))??;
    let metrics = CaMetrics::new();
    let ready = Readiness::new();

    let now = SystemTime::now();
    let current = keystore.current();
    let serving = ServingSvid::issue(
        &current.authority,
        &config.trust_domain,
        config.agent_svid_ttl,
        now,
    )?;
    let (tls_tx, tls_rx) = watch::channel(tls::server_config(&serving, &current.bundle)?);
    tracing::info!(serial = %serving.serial, "ca serving svid issued");

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| bind_error("the agent api", config.listen, source))?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| bind_error("the agent api", config.listen, source))?;
    let (admin_listener, admin_guard) = bind_admin_socket(&config.admin_socket)?;
    let http_listener = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| bind_error("the admin http port", addr, source))?,
        ),
        None => None,
    };
    let admin_http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let webhook = match &config.webhook {
        Some(webhook) => Some(crate::webhook::WebhookServer::bind(webhook).await?),
        None => None,
    };
    let webhook_addr = webhook
        .as_ref()
        .map(crate::webhook::WebhookServer::local_addr);

    let stop = shutdown.child_token();
    let mut tasks: JoinSet<(&'static str, Result<(), ServeError>)> = JoinSet::new();

    // Handshaken connections flow from the accept loop to tonic through this channel.
    let (conn_tx, conn_rx) = mpsc::channel::<tls::TlsConn>(64);
    tasks.spawn({
        let stop = stop.clone();
        let timeout = config.handshake_timeout;
        async move {
            tls::accept_loop(listener, tls_rx, conn_tx, timeout, stop).await;
            ("accept", Ok(()))
        }
    });
    let mut service = CaService::new(
        issuer,
        keystore.clone(),
        metrics.clone(),
        config.max_batch,
        stop.clone(),
    );
    if let (Some(k8s), Some((cluster, _))) = (&config.k8s, cluster) {
        tracing::info!(cluster = cluster.name(), agent_sa = %cluster.agent_sa(), "kubernetes mode: psat attestation and pod entitlement on");
        // Sync the pod cache now, so the first agents' mints do not wait for it.
        cluster.start_pod_watch();
        // Publishing the bundle is best effort (retried); agents get it from the CA itself anyway.
        tokio::spawn(cluster.clone().publish_bundles(
            k8s.namespace.clone(),
            keystore.subscribe(),
            stop.clone(),
        ));
        service = service.with_cluster(cluster);
    }
    tasks.spawn({
        let stop = stop.clone();
        let incoming = ReceiverStream::new(conn_rx).map(Ok::<_, std::convert::Infallible>);
        async move {
            let result = tonic::transport::Server::builder()
                .layer(tower::util::MapResponseLayer::new(
                    oversize_is_resource_exhausted,
                ))
                .add_service(
                    CaServer::new(service)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .map_err(|source| ServeError::Grpc {
                    what: "agent api",
                    source,
                });
            ("grpc", result)
        }
    });
    tasks.spawn(serving_svid_worker(
        keystore.clone(),
        config.clone(),
        serving,
        tls_tx,
        stop.clone(),
    ));
    tasks.spawn(reload_worker(
        keystore.clone(),
        datastore.clone(),
        metrics.clone(),
        config.reload_interval,
        stop.clone(),
    ));
    tasks.spawn({
        let admin = AdminService::new(datastore, keystore.clone(), config.trust_domain.clone());
        let stop = stop.clone();
        async move {
            let result =
                admin
                    .serve(admin_listener, stop)
                    .await
                    .map_err(|source| ServeError::Grpc {
                        what: "admin socket",
                        source,
                    });
            drop(admin_guard);
            ("admin", result)
        }
    });
    if let Some(webhook) = webhook {
        let stop = stop.clone();
        tasks.spawn(async move {
            webhook.serve(stop).await;
            ("webhook", Ok(()))
        });
    }
    if let Some(http_listener) = http_listener {
        let keystore = keystore.clone();
        let gauge = metrics.clone();
        let admin_http = AdminHttp {
            metrics: metrics.clone(),
            ready: ready.clone(),
            before_scrape: Some(Arc::new(move || {
                gauge.set_authority_expiry(
                    keystore.current().authority.not_after(),
                    SystemTime::now(),
                );
            })),
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            admin_http.serve(http_listener, stop).await;
            ("http", Ok(()))
        });
    }

    ready.set(true);
    tracing::info!(
        listen = %local_addr,
        admin_socket = %config.admin_socket.display(),
        admin_http = %admin_http_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        trust_domain = %config.trust_domain,
        "ca serving"
    );
    let admin_socket = config.admin_socket.clone();
    let handle = tokio::spawn(supervise(tasks, stop, ready, config.drain_grace));
    Ok(RunningCa {
        local_addr,
        admin_http_addr,
        webhook_addr,
        admin_socket,
        handle,
    })
}

/// Waits for shutdown or the first task to end, then drains for at most `grace`.
async fn supervise(
    mut tasks: JoinSet<(&'static str, Result<(), ServeError>)>,
    stop: CancellationToken,
    ready: Readiness,
    grace: Duration,
) -> Result<(), ServeError> {
    let mut first_error = None;
    tokio::select! {
        biased;
        () = stop.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            let error = match task_result(joined) {
                Err(e) => Some(e),
                // Shutdown raced with this select: the task stopped because it was asked to.
                Ok(_) if stop.is_cancelled() => None,
                Ok(name) => Some(ServeError::TaskExited(name)),
            };
            if let Some(error) = error {
                tracing::error!(error = %error, "critical task failed; shutting down");
                first_error = Some(error);
            }
        }
    }
    ready.set(false);
    stop.cancel();
    tracing::info!(grace_ms = grace.as_millis(), "ca draining");
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => {
                tracing::warn!(still_running = tasks.len(), "drain grace period over; closing what is left");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(joined) => {
                    if let Err(e) = task_result(joined) {
                        tracing::warn!(error = %e, "task failed while draining");
                        first_error.get_or_insert(e);
                    }
                }
            },
        }
    }
    tracing::info!("ca stopped");
    first_error.map_or(Ok(()), Err)
}

fn task_result(
    joined: Result<(&'static str, Result<(), ServeError>), JoinError>,
) -> Result<&'static str, ServeError> {
    match joined {
        Ok((name, Ok(()))) => Ok(name),
        Ok((_, Err(e))) => Err(e),
        Err(e) => Err(panicked("unknown", &e)),
    }
}

/// Opens the datastore, keystore (creating the first root if needed), audit log and issuer.
///
/// In Kubernetes mode (`shared`) the authorities come from the keys Secret, except with an upstream
/// CA: its `cacerts` files are the shared authority, and the keystore stays file-based.
fn open_state(
    config: &CaConfig,
    shared: Option<SharedKeys>,
) -> Result<(Datastore, Keystore, Issuer), ServeError> {
    let now = SystemTime::now();
    let datastore = Datastore::open(&config.data_dir)?;
    let upstream = config.upstream_ca.as_deref().map(UpstreamCa::from_dir);
    let keystore = match (shared, upstream) {
        (Some(shared), None) => Keystore::open_shared(
            &config.data_dir,
            datastore.clone(),
            config.trust_domain.clone(),
            config.root_ttl,
            now,
            shared,
        )?,
        (shared, upstream) => {
            if shared.is_some() {
                tracing::warn!(
                    "kubernetes mode with an upstream ca: the cacerts files are the shared authority; the keys secret is not used, and each replica keeps its own jwt signing key"
                );
            }
            Keystore::open(
                &config.data_dir,
                datastore.clone(),
                config.trust_domain.clone(),
                upstream,
                config.root_ttl,
                now,
            )?
        }
    };
    let audit = Arc::new(AuditLog::open(config.audit_path(), &node_name())?);
    let issuer = Issuer::new(
        keystore.clone(),
        datastore.clone(),
        audit,
        IssuerConfig {
            svid_ttl: config.svid_ttl,
            agent_svid_ttl: config.agent_svid_ttl,
            jwt_ttl: config.jwt_ttl,
            max_batch: config.max_batch,
        },
    );
    Ok((datastore, keystore, issuer))
}

/// Renews the CA's serving SVID at half-life and when the active authority changes; publishes a new
/// TLS config on every change (a new bundle changes the client verifier too).
async fn serving_svid_worker(
    keystore: Keystore,
    config: CaConfig,
    mut serving: ServingSvid,
    configs: watch::Sender<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> (&'static str, Result<(), ServeError>) {
    const NAME: &str = "serving-svid";
    let mut states = keystore.subscribe();
    let mut signer = states.borrow_and_update().authority.certificate().clone();
    loop {
        let renew_in = serving
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let due = tokio::select! {
            () = stop.cancelled() => return (NAME, Ok(())),
            () = tokio::time::sleep(renew_in) => true,
            changed = states.changed() => {
                if changed.is_err() {
                    return (NAME, Ok(()));
                }
                false
            }
        };
        let state = Arc::clone(&states.borrow_and_update());
        let rotated = state.authority.certificate() != &signer;
        if due || rotated {
            match ServingSvid::issue(
                &state.authority,
                &config.trust_domain,
                config.agent_svid_ttl,
                SystemTime::now(),
            ) {
                Ok(fresh) => {
                    tracing::info!(serial = %fresh.serial, rotated, "ca serving svid renewed");
                    serving = fresh;
                    signer = state.authority.certificate().clone();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = RENEW_RETRY.as_secs(), "cannot renew the ca serving svid");
                    tokio::select! {
                        () = stop.cancelled() => return (NAME, Ok(())),
                        () = tokio::time::sleep(RENEW_RETRY) => continue,
                    }
                }
            }
        }
        match tls::server_config(&serving, &state.bundle) {
            Ok(config) => {
                configs.send_replace(config);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot rebuild the tls config; keeping the previous one")
            }
        }
    }
}

/// Polls for authority changes made by another replica and refreshes the gauges.
async fn reload_worker(
    keystore: Keystore,
    datastore: Datastore,
    metrics: CaMetrics,
    interval: Duration,
    stop: CancellationToken,
) -> (&'static str, Result<(), ServeError>) {
    const NAME: &str = "reload";
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return (NAME, Ok(())),
            _ = ticks.tick() => {}
        }
        let ks = keystore.clone();
        let ds = datastore.clone();
        let polled = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let reloaded = ks.reload(now);
            let agents = ds.list_agents().map(|agents| {
                agents
                    .iter()
                    .filter(|a| !a.evicted && a.expires_at > now)
                    .count()
            });
            (reloaded, agents)
        })
        .await;
        let (reloaded, agents) = match polled {
            Ok(polled) => polled,
            Err(e) => return (NAME, Err(panicked(NAME, &e))),
        };
        match reloaded {
            Ok(true) => tracing::info!("signing authorities changed elsewhere; reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reload the signing authorities"),
        }
        match agents {
            Ok(n) => metrics.set_agents(n),
            Err(e) => tracing::warn!(error = %e, "cannot count agents"),
        }
        metrics.set_authority_expiry(keystore.current().authority.not_after(), SystemTime::now());
    }
}

/// gRPC says an oversized message is `RESOURCE_EXHAUSTED`; tonic's decoder answers `OUT_OF_RANGE`.
/// The CA never returns `OUT_OF_RANGE` itself, so the rewrite is exact. Such a refusal is always a
/// trailers-only response (the status is in the headers), so only headers need touching.
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        let m = m.as_bytes();
        m.starts_with(b"Error, decoded message length too large")
            || m.starts_with(b"Error,%20decoded%20message%20length%20too%20large")
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "message%20is%20larger%20than%20the%20ca%20accepts%20(4%20MiB)",
            ),
        );
    }
    response
}

/// The audit records' `node`: this host's name.
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meshward-ca".to_owned())
}

fn bind_error(what: &'static str, addr: SocketAddr, source: io::Error) -> ServeError {
    ServeError::Bind { what, addr, source }
}

fn panicked(task: &'static str, e: &JoinError) -> ServeError {
    ServeError::TaskPanicked {
        task,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_status(status: &'static str, message: &'static str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(status));
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_static(message));
        r
    }

    #[test]
    fn only_the_decoder_size_refusal_is_rewritten() {
        let r = oversize_is_resource_exhausted(with_status(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205000000%20bytes",
        ));
        assert_eq!(r.headers()["grpc-status"], "8");
        let r = oversize_is_resource_exhausted(with_status("11", "something%20else"));
        assert_eq!(r.headers()["grpc-status"], "11");
        let r = oversize_is_resource_exhausted(with_status(
            "7",
            "Error,%20decoded%20message%20length%20too%20large",
        ));
        assert_eq!(r.headers()["grpc-status"], "7");
    }
}
