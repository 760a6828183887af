//! Start-up, the critical tasks, and the drain on shutdown.
//!
//! [`start`] loads the schema and policy sets (a bad set fails start-up: there is no last good
//! set yet), opens the audit log, binds every listener and spawns: the identity worker, the
//! policy watcher, the admin port and one accept loop per listener. Connections run on a
//! [`TaskTracker`]. When the shutdown token fires (SIGTERM/SIGINT in the CLI, or a test), the
//! accept loops stop, every HTTP connection is asked to finish its in-flight requests and close
//! (HTTP/2 GOAWAY, HTTP/1.1 close after the response), and after [`Limits::drain_grace`] what is
//! left is cut. The audit log is synced last.
//!
//! [`Limits::drain_grace`]: crate::config::Limits::drain_grace

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use meshward_identity::audit::{AuditError, AuditLog};
use tokio::net::TcpListener;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::Admin;
use crate::audit_sink::AuditSink;
use crate::authz::{PolicyLoadError, PolicySchema, SchemaError};
use crate::config::{ConfigError, ProxyConfig};
use crate::identity_source::{IdentityHandle, Upstream, identity};
use crate::inbound::Inbound;
use crate::metrics::ProxyMetrics;
use crate::outbound::Outbound;
use crate::policy_store::{PolicyMetrics, PolicyStore, PolicyStoreConfig};

/// Why the proxy could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The schema cannot be used.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The policy sets do not load.
    #[error(transparent)]
    Policy(#[from] PolicyLoadError),
    /// The audit log cannot be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A listener could not be bound.
    #[error("cannot listen on `{addr}` ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// A critical task ended before shutdown.
    #[error("the `{0}` task stopped unexpectedly")]
    TaskExited(&'static str),
    /// A critical task panicked.
    #[error("a proxy task panicked: {0}")]
    TaskPanicked(String),
}

/// The shutdown signals every connection follows. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Fired when shutdown starts: stop accepting, finish in-flight requests.
    pub stop: CancellationToken,
    /// Fired when the grace period is over: drop whatever is left.
    pub hard: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// A proxy that is serving: where, and the handle to wait for it to stop.
#[derive(Debug)]
pub struct RunningProxy {
    /// Bound inbound addresses, in configuration order.
    pub inbound: Vec<SocketAddr>,
    /// Bound outbound addresses, in configuration order.
    pub outbound: Vec<SocketAddr>,
    /// The admin port's bound address, if enabled.
    pub admin: Option<SocketAddr>,
    /// The identity in force (tests watch it).
    pub identity: IdentityHandle,
    /// The policy store (tests reload it).
    pub policies: PolicyStore,
    /// The metrics.
    pub metrics: ProxyMetrics,
    handle: tokio::task::JoinHandle<Result<(), ProxyError>>,
}

impl RunningProxy {
    /// Waits until the proxy has shut down and its audit log is synced.
    pub async fn wait(self) -> Result<(), ProxyError> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) => Err(ProxyError::TaskPanicked(e.to_string())),
        }
    }
}

/// Runs the proxy until `shutdown` fires (then drains) or a critical task fails.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken) -> Result<(), ProxyError> {
    start(config, shutdown).await?.wait().await
}

/// Loads policies, opens the audit log and binds every listener, then serves in the background.
///
/// Returns once the listeners are bound; any start-up failure is returned here.
pub async fn start(
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> Result<RunningProxy, ProxyError> {
    config.validate()?;
    let schema = match &config.schema {
        Some(path) => PolicySchema::from_file(path)?,
        None => PolicySchema::builtin()?,
    };
    let policy_metrics = PolicyMetrics::default();
    let (policies, watcher) = PolicyStore::load(
        PolicyStoreConfig {
            policies: config.policies.clone(),
            dry_run: config.dry_run_policies.clone(),
            schema: Arc::new(schema),
            poll_interval: config.policy_poll_interval,
        },
        policy_metrics.clone(),
    )?;
    let metrics = ProxyMetrics::new(&policy_metrics);
    let audit_log = Arc::new(AuditLog::open(&config.audit, &config.node)?);
    let audit = AuditSink::new(Arc::clone(&audit_log));
    let upstreams = config
        .outbound
        .iter()
        .map(|o| Upstream {
            expected: o.expected.clone(),
            protocol: o.protocol,
            http2: config.upstream_http2,
        })
        .collect();
    let (identity_handle, identity_worker) =
        identity(config.identity.clone(), upstreams, metrics.clone());

    let mut inbound_listeners = Vec::new();
    for spec in &config.inbound {
        inbound_listeners.push((bind(spec.listen, "inbound").await?, spec.clone()));
    }
    let mut outbound_listeners = Vec::new();
    for spec in &config.outbound {
        outbound_listeners.push((bind(spec.listen, "outbound").await?, spec.clone()));
    }
    let admin_listener = match config.admin {
        Some(addr) => Some(bind(addr, "admin").await?),
        None => None,
    };
    let local = |l: &TcpListener| l.local_addr().ok();
    let inbound_addrs = inbound_listeners
        .iter()
        .filter_map(|(l, _)| local(l))
        .collect();
    let outbound_addrs = outbound_listeners
        .iter()
        .filter_map(|(l, _)| local(l))
        .collect();
    let admin_addr = admin_listener.as_ref().and_then(local);

    let drain = Drain {
        stop: shutdown.child_token(),
        hard: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    tasks.spawn({
        let stop = drain.stop.clone();
        async move {
            identity_worker.run(stop).await;
            "identity"
        }
    });
    tasks.spawn({
        let stop = drain.stop.clone();
        async move {
            watcher.run(stop.cancelled_owned()).await;
            "policy watcher"
        }
    });
    for (listener, spec) in inbound_listeners {
        let inbound = Arc::new(Inbound::new(
            spec,
            identity_handle.clone(),
            policies.clone(),
            audit.clone(),
            metrics.clone(),
            config.limits,
        ));
        let drain = drain.clone();
        tasks.spawn(async move {
            inbound.serve(listener, drain).await;
            "inbound listener"
        });
    }
    for (index, (listener, spec)) in outbound_listeners.into_iter().enumerate() {
        let outbound = Arc::new(Outbound::new(
            index,
            spec,
            identity_handle.clone(),
            metrics.clone(),
            &config.limits,
        ));
        let drain = drain.clone();
        tasks.spawn(async move {
            outbound.serve(listener, drain).await;
            "outbound listener"
        });
    }
    if let Some(listener) = admin_listener {
        let (identity, stopping) = (identity_handle.clone(), drain.stop.clone());
        let admin = Admin {
            metrics: metrics.clone(),
            // The policy store always holds a set (start-up fails without one), so ready means:
            // an SVID is loaded and still valid, and no shutdown has started.
            ready: Arc::new(move || {
                !stopping.is_cancelled()
                    && identity
                        .current()
                        .is_some_and(|s| s.svid().is_valid_at(std::time::SystemTime::now()))
            }),
        };
        let stop = drain.stop.clone();
        tasks.spawn(async move {
            admin.serve(listener, stop).await;
            "admin"
        });
    }
    info!(
        inbound = ?inbound_addrs,
        outbound = ?outbound_addrs,
        admin = ?admin_addr,
        policies = %config.policies.display(),
        audit = %config.audit.display(),
        "proxy serving"
    );
    let handle = tokio::spawn(supervise(
        tasks,
        drain,
        config.limits.drain_grace,
        audit,
        audit_log,
    ));
    Ok(RunningProxy {
        inbound: inbound_addrs,
        outbound: outbound_addrs,
        admin: admin_addr,
        identity: identity_handle,
        policies,
        metrics,
        handle,
    })
}

/// Serves one HTTP connection with `builder`, finishing in-flight requests when the drain starts
/// and dropping the connection when the grace period is over.
pub(crate) async fn serve_http<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    drain: &Drain,
) where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = drain.stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = drain.hard.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        // Resets, timeouts, malformed requests: one connection's problem, logged at debug.
        debug!(error = %e, "http connection ended with an error");
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, what, source })
}

/// Waits for shutdown or the first task to end, drains, then syncs the audit log.
async fn supervise(
    mut tasks: JoinSet<&'static str>,
    drain: Drain,
    grace: std::time::Duration,
    audit: AuditSink,
    audit_log: Arc<AuditLog>,
) -> Result<(), ProxyError> {
    let mut first_error = None;
    tokio::select! {
        biased;
        () = drain.stop.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            let error = match task_name(joined) {
                Err(e) => e,
                Ok(name) => ProxyError::TaskExited(name),
            };
            if !drain.stop.is_cancelled() {
                error!(error = %error, "critical task failed; shutting down");
                first_error = Some(error);
            }
        }
    }
    drain.stop.cancel();
    info!(grace = ?grace, "draining");
    drain.tracker.close();
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = task_name(joined) {
                warn!(error = %e, "task failed while draining");
            }
        }
        drain.tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!(grace = ?grace, "drain grace over; closing what is left");
        drain.hard.cancel();
        tasks.abort_all();
        drain.tracker.wait().await;
    }
    if let Err(e) = audit.sync() {
        error!(error = %e, "cannot sync the audit log on exit");
        first_error.get_or_insert(ProxyError::Audit(e));
    }
    drop(audit);
    drop(audit_log);
    info!("proxy stopped");
    first_error.map_or(Ok(()), Err)
}

fn task_name(joined: Result<&'static str, JoinError>) -> Result<&'static str, ProxyError> {
    joined.map_err(|e| ProxyError::TaskPanicked(e.to_string()))
}
