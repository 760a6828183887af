//! meshward-agent: the node agent.
//!
//! It attests itself to the CA (join token), keeps an agent SVID, mints and rotates the SVIDs of the
//! workloads entitled on its node, attests each caller of its unix socket from the socket's peer
//! credentials, and serves identities over the SPIFFE Workload API and Envoy SDS.
//!
//! Trust: the agent trusts the CA (verified as `spiffe://TD/meshward/ca` against the bootstrap
//! bundle, then the bundle the CA sends) and the kernel (peer credentials, procfs). It trusts no
//! workload: file modes on the socket allow anyone to connect, and attestation decides what each
//! caller gets.
//!
//! Tasks (all critical: one fails, all stop): `node` renews the agent SVID ([`node`]); `cache`
//! syncs entries, mints and renews workload SVIDs and follows the bundle ([`svid_cache`]); `grpc`
//! serves the unix socket; `http` serves `/metrics`, `/ready`, `/live` ([`http`]).
//!
//! Start reading at [`run`], then [`node`], [`svid_cache`] and [`attest`].

pub mod attest;
pub mod ca_client;
pub mod config;
pub mod http;
pub mod metrics;
pub mod node;
pub mod sds;
pub mod svid_cache;
#[cfg(test)]
mod test_ca;
pub mod workload_api;

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::task::{JoinError, JoinSet};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::attest::Attestors;
use crate::ca_client::CaClient;
use crate::config::{AgentConfig, ConfigError};
use crate::http::AdminHttp;
use crate::metrics::AgentMetrics;
use crate::node::{NodeError, NodeIdentity};
use crate::svid_cache::SvidCache;

/// How long open calls may go on after shutdown starts.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The agent's own identity could not be established or kept.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Kubernetes mode: the API client could not be configured.
    #[error(transparent)]
    Kube(#[from] attest::k8s::ClientError),
    /// The Workload API socket could not be set up.
    #[error("cannot serve the workload api on `{}`: {reason}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The admin HTTP address could not be bound.
    #[error("cannot listen for the admin http port on `{addr}`: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The gRPC server on the socket failed.
    #[error("the workload api server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
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

/// What the Workload API and SDS services ([`workload_api`], [`sds`]) are built from; cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Services {
    /// The SVID cache: snapshots, JWT minting, waiting for an identity.
    pub cache: SvidCache,
    /// The workload attestors (pid -> selectors).
    pub attestors: Attestors,
    /// The agent's metrics.
    pub metrics: AgentMetrics,
    /// How long a workload with no matching identity waits before it is refused.
    pub identity_wait: Duration,
}

/// An agent that is serving: where, and the handle to wait for it to stop.
#[derive(Debug)]
pub struct RunningAgent {
    /// The Workload API / SDS socket.
    pub socket: PathBuf,
    /// The admin HTTP port's bound address, if enabled.
    pub admin_http_addr: Option<SocketAddr>,
    /// The SVID cache (tests and the harness watch it).
    pub cache: SvidCache,
    /// The agent's own identity.
    pub node: NodeIdentity,
    handle: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    /// Waits until the agent has shut down (after the shutdown token fired or a task failed).
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) => Err(panicked("supervisor", &e)),
        }
    }
}

/// Runs the agent until `shutdown` fires (then drains) or a critical task fails.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    start(config, shutdown).await?.wait().await
}

/// Establishes the agent's identity and binds every listener, then serves in the background.
///
/// Returns once the socket accepts connections; any start-up failure is returned here.
pub async fn start(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    config.validate()?;
    let metrics = AgentMetrics::new();
    let node = NodeIdentity::establish(&config, SystemTime::now()).await?;
    metrics.set_agent_svid_expiry(node.current().svid.not_after());
    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);
    let (cache, worker) = SvidCache::new(
        node.clone(),
        client.clone(),
        metrics.clone(),
        config.sync_interval,
    );
    let (attestors, worker) = match &config.k8s {
        Some(k8s) => {
            let kube = attest::k8s::kube_client(k8s.kubeconfig.as_deref()).await?;
            let pods = attest::k8s::K8sAttestor::start(kube, k8s.node_name.clone());
            let td = node.current().trust_domain.clone();
            let implicit = {
                let pods = pods.clone();
                Arc::new(move || pods.implicit_entries(&td))
            };
            (
                Attestors::kubernetes(pods),
                worker.with_implicit_entries(implicit),
            )
        }
        None => (Attestors::standalone(), worker),
    };
    let services = Services {
        cache: cache.clone(),
        attestors,
        metrics: metrics.clone(),
        identity_wait: config.identity_wait,
    };

    let (listener, socket_guard) = bind_socket(&config.socket)?;
    let http_listener = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { addr, source })?,
        ),
        None => None,
    };
    let admin_http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    let stop = shutdown.child_token();
    let mut tasks: JoinSet<(&'static str, Result<(), AgentError>)> = JoinSet::new();
    tasks.spawn({
        let (node, metrics, stop) = (node.clone(), metrics.clone(), stop.clone());
        async move {
            let result = node
                .renew(client, metrics, stop)
                .await
                .map_err(AgentError::from);
            ("node", result)
        }
    });
    tasks.spawn({
        let stop = stop.clone();
        async move {
            worker.run(stop).await;
            ("cache", Ok(()))
        }
    });
    tasks.spawn({
        let stop = stop.clone();
        let routes = workload_routes(&services);
        async move {
            let result = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(AgentError::Grpc);
            drop(socket_guard);
            ("grpc", result)
        }
    });
    if let Some(http_listener) = http_listener {
        let (cache, node, stopping) = (cache.clone(), node.clone(), stop.clone());
        let admin = AdminHttp {
            metrics: metrics.clone(),
            ready: Arc::new(move || {
                !stopping.is_cancelled()
                    && cache.current().synced
                    && node.current().svid.not_after() > SystemTime::now()
            }),
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            admin.serve(http_listener, stop).await;
            ("http", Ok(()))
        });
    }

    tracing::info!(
        socket = %config.socket.display(),
        admin_http = ?admin_http_addr,
        agent = %node.current().svid.spiffe_id(),
        ca = %config.ca_addr,
        "agent serving"
    );
    let handle = tokio::spawn(supervise(tasks, stop));
    Ok(RunningAgent {
        socket: config.socket.clone(),
        admin_http_addr,
        cache,
        node,
        handle,
    })
}

/// The gRPC services on the agent socket: the SPIFFE Workload API and Envoy SDS.
fn workload_routes(services: &Services) -> tonic::service::Routes {
    tonic::service::Routes::default()
        .add_service(workload_api::server(services.clone()))
        .add_service(sds::server(services.clone()))
}

/// Removes the socket file when the server stops, if it is still the one this agent bound.
#[derive(Debug)]
struct SocketGuard {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the unix socket at `path`: creates the parent dir, replaces a stale socket (one nobody
/// answers on), refuses to touch anything that is not a socket, and opens it to every local user
/// (0777): attestation, not file modes, decides what a caller gets.
fn bind_socket(path: &Path) -> Result<(UnixListener, SocketGuard), AgentError> {
    let fail = |reason: String| AgentError::Socket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail(
                    "another process is serving on it; stop the other agent or pick another `--socket`".into(),
                ));
            }
            fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
            tracing::info!(socket = %path.display(), "stale socket removed");
        }
        Ok(_) => {
            return Err(fail(
                "a file that is not a socket is in the way; remove it or pick another `--socket`"
                    .into(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))
        .map_err(|e| fail(format!("cannot open it to local workloads: {e}")))?;
    let inode = fs::symlink_metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .ino();
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

/// Waits for shutdown or the first task to end, then drains for at most [`DRAIN_GRACE`].
async fn supervise(
    mut tasks: JoinSet<(&'static str, Result<(), AgentError>)>,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let mut first_error = None;
    tokio::select! {
        biased;
        () = stop.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            let error = match task_result(joined) {
                Err(e) => Some(e),
                Ok(_) if stop.is_cancelled() => None,
                Ok(name) => Some(AgentError::TaskExited(name)),
            };
            if let Some(error) = error {
                tracing::error!(error = %error, "critical task failed; shutting down");
                first_error = Some(error);
            }
        }
    }
    stop.cancel();
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = task_result(joined) {
                tracing::warn!(error = %e, "task failed while draining");
                first_error.get_or_insert(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?DRAIN_GRACE, "drain grace over; dropping open calls");
        tasks.abort_all();
    }
    tracing::info!("agent stopped");
    first_error.map_or(Ok(()), Err)
}

fn task_result(
    joined: Result<(&'static str, Result<(), AgentError>), JoinError>,
) -> Result<&'static str, AgentError> {
    match joined {
        Ok((name, Ok(()))) => Ok(name),
        Ok((_, Err(e))) => Err(e),
        Err(e) => Err(panicked("unknown", &e)),
    }
}

fn panicked(task: &'static str, e: &JoinError) -> AgentError {
    AgentError::TaskPanicked {
        task,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
