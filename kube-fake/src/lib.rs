//! Test support for meshward's Kubernetes mode: an in-process Kubernetes API server that speaks the real
//! wire protocol ([`FakeApiServer`]), the real kube-apiserver harness ([`RealApiServer`], started by
//! `scripts/kube-apiserver`), and cluster fixtures that work against both ([`fixture`]).
//!
//! The fake serves HTTPS on `127.0.0.1:0` with `k8s-openapi` shapes for namespaces, pods, nodes,
//! secrets, configmaps, serviceaccounts (+ `token`), leases and tokenreviews, and copies the real
//! server's semantics where clients depend on them: one global resourceVersion; LIST at the current
//! revision; WATCH replays from a revision, answers a compacted one with HTTP 200 + an in-stream 410
//! `ERROR` event + EOF; `Status` error bodies; optimistic concurrency (409); TokenReview always 201 with
//! `status.error` for bad tokens and a positive-result cache. It adds fault hooks the real one cannot
//! give on demand: [`FakeApiServer::compact`], [`FakeApiServer::drop_watches`],
//! [`FakeApiServer::fail_next`], [`FakeApiServer::delay`], [`FakeApiServer::bookmark_now`].
//!
//! Not implemented (the real server is the reference for these): RBAC (every known token may do
//! everything), JSON patch, server-side apply field ownership (apply = create or merge), `dryRun`,
//! protobuf, and kinds other than the ones above. `tests/contract.rs` runs one suite against both.

pub mod fixture;
mod http;
mod kind;
mod object;
pub mod real;
mod selector;
mod status;
mod store;
mod tls;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::config::{KubeConfigOptions, Kubeconfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use crate::real::{RealApiServer, RealError};
pub use crate::status::ApiError;
pub use crate::tls::TlsError;
pub use crate::token::{
    API_AUDIENCES, EXTRA_CREDENTIAL_ID, EXTRA_NODE_NAME, EXTRA_NODE_UID, EXTRA_POD_NAME,
    EXTRA_POD_UID,
};

/// The positive TokenReview cache TTL of the real server.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);

/// The fake could not start or build a client config.
#[derive(Debug, Error)]
pub enum FakeError {
    /// The serving certificate or TLS config.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding `127.0.0.1:0` or writing the kubeconfig files.
    #[error("fake api server i/o: {0}")]
    Io(#[from] std::io::Error),
    /// kube could not read the generated kubeconfig.
    #[error("building a kube config for the fake api server: {0}")]
    Kubeconfig(String),
}

/// One request the fake received (for asserting relists, retries and the like).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The raw (percent-encoded) query string without `?`.
    pub query: String,
}

impl RequestRecord {
    /// Whether this is a LIST (a GET of a collection without `watch`) of `resource` (`pods`).
    pub fn is_list_of(&self, resource: &str) -> bool {
        self.method == "GET" && self.path.ends_with(&format!("/{resource}")) && !self.is_watch()
    }

    /// Whether this is a WATCH request.
    pub fn is_watch(&self) -> bool {
        form_urlencoded::parse(self.query.as_bytes())
            .any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    }
}

/// Start-up options for [`FakeApiServer`].
#[derive(Debug, Clone)]
pub struct FakeBuilder {
    review_cache_ttl: Duration,
    node_extras: bool,
}

impl Default for FakeBuilder {
    fn default() -> Self {
        Self {
            review_cache_ttl: DEFAULT_REVIEW_CACHE_TTL,
            node_extras: false,
        }
    }
}

impl FakeBuilder {
    /// How long positive TokenReview results are cached (default 10 s like the real server; zero disables).
    pub fn with_review_cache_ttl(mut self, ttl: Duration) -> Self {
        self.review_cache_ttl = ttl;
        self
    }

    /// Whether tokens and reviews carry the newer servers' `node-name`/`node-uid`/`credential-id` extras
    /// (default off, like 1.20).
    pub fn with_node_extras(mut self, on: bool) -> Self {
        self.node_extras = on;
        self
    }

    /// Starts the server on `127.0.0.1:0` and writes its kubeconfig files.
    pub async fn start(self) -> Result<FakeApiServer, FakeError> {
        let pki = tls::generate()?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let admin_token = hex_token();
        let ca_token = hex_token();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store: store::Store::new(),
                tokens: token::Tokens::new(self.review_cache_ttl, self.node_extras),
                faults: Faults::default(),
                log: Vec::new(),
            }),
            static_tokens: vec![admin_token.clone(), ca_token.clone()],
        });
        let dir = tempfile::Builder::new()
            .prefix("meshward-kube-fake-")
            .tempdir()?;
        let url = format!("https://{addr}");
        let kubeconfig = dir.path().join("kubeconfig");
        let kubeconfig_ca = dir.path().join("kubeconfig-ca");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(&url, &pki.ca_pem, "admin", &admin_token),
        )?;
        std::fs::write(
            &kubeconfig_ca,
            kubeconfig_yaml(&url, &pki.ca_pem, "meshward-ca", &ca_token),
        )?;
        let task = tokio::spawn(serve(
            listener,
            TlsAcceptor::from(pki.server_config),
            Arc::clone(&shared),
        ));
        Ok(FakeApiServer {
            shared,
            addr,
            url,
            ca_pem: pki.ca_pem,
            admin_token,
            ca_token,
            kubeconfig,
            kubeconfig_ca,
            _dir: dir,
            task,
        })
    }
}

/// A running in-process API server; stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    url: String,
    ca_pem: String,
    admin_token: String,
    ca_token: String,
    kubeconfig: PathBuf,
    kubeconfig_ca: PathBuf,
    _dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Starts a fake with the defaults (10 s review cache, no node extras).
    pub async fn start() -> Result<Self, FakeError> {
        FakeBuilder::default().start().await
    }

    /// Start-up options.
    pub fn builder() -> FakeBuilder {
        FakeBuilder::default()
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The serving CA, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The bearer token of the `meshward-ca` identity (the fake does not enforce RBAC).
    pub fn ca_token(&self) -> &str {
        &self.ca_token
    }

    /// A kubeconfig file for the admin identity.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig file for the `meshward-ca` identity.
    pub fn kubeconfig_ca_path(&self) -> &Path {
        &self.kubeconfig_ca
    }

    /// A kubeconfig document for any bearer token (a service-account token from TokenRequest, say).
    pub fn kubeconfig_for_token(&self, user: &str, token: &str) -> String {
        kubeconfig_yaml(&self.url, &self.ca_pem, user, token)
    }

    /// A `kube::Config` for the admin identity.
    pub async fn config(&self) -> Result<kube::Config, FakeError> {
        config_from_yaml(&self.kubeconfig_for_token("admin", &self.admin_token)).await
    }

    /// A `kube::Config` that authenticates with `token`.
    pub async fn config_for_token(&self, token: &str) -> Result<kube::Config, FakeError> {
        config_from_yaml(&self.kubeconfig_for_token("user", token)).await
    }

    /// An admin `kube::Client`.
    pub async fn client(&self) -> Result<kube::Client, FakeError> {
        kube::Client::try_from(self.config().await?)
            .map_err(|e| FakeError::Kubeconfig(e.to_string()))
    }

    /// Forgets all history up to now: a WATCH (or `continue`) from an earlier revision gets 410
    /// (in-stream for WATCH). Open watches keep running; combine with [`Self::drop_watches`] to make
    /// clients resume from an old revision.
    pub fn compact(&self) {
        self.shared.lock().store.compact();
    }

    /// Ends every open watch stream with a clean EOF.
    pub fn drop_watches(&self) {
        self.shared.lock().store.drop_watches();
    }

    /// The next `n` API requests (any path) fail with `code` and a `Status` body.
    pub fn fail_next(&self, n: usize, code: u16) {
        self.shared.lock().faults.rules.push(FailRule {
            remaining: n,
            code,
            path_contains: None,
        });
    }

    /// The next `n` API requests whose path contains `path_contains` (`/pods`, `tokenreviews`) fail
    /// with `code`.
    pub fn fail_next_matching(&self, n: usize, code: u16, path_contains: &str) {
        self.shared.lock().faults.rules.push(FailRule {
            remaining: n,
            code,
            path_contains: Some(path_contains.to_owned()),
        });
    }

    /// Every API request waits `d` before it is answered (a watch before its stream starts);
    /// `Duration::ZERO` turns it off.
    pub fn delay(&self, d: Duration) {
        self.shared.lock().faults.delay = d;
    }

    /// Sends a `BOOKMARK` at the current revision on every watch that asked for bookmarks.
    pub fn bookmark_now(&self) {
        self.shared.lock().store.bookmark_now();
    }

    /// Changes the positive TokenReview cache TTL (zero disables); cached entries are kept.
    pub fn set_review_cache_ttl(&self, ttl: Duration) {
        self.shared.lock().tokens.cache_ttl = ttl;
    }

    /// Forgets cached TokenReview results.
    pub fn clear_review_cache(&self) {
        self.shared.lock().tokens.clear_cache();
    }

    /// Turns the newer servers' node extras on or off for tokens issued and reviewed from now on.
    pub fn set_node_extras(&self, on: bool) {
        self.shared.lock().tokens.node_extras = on;
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.resource_version()
    }

    /// How many watch streams are open.
    pub fn watch_count(&self) -> usize {
        self.shared.lock().store.watch_count()
    }

    /// Every API request received so far, oldest first (health probes excluded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }
}

/// What the HTTP handlers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    static_tokens: Vec<String>,
}

impl Shared {
    /// The state; a panic in another handler does not make it unusable (tests report that panic).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(crate) struct State {
    pub store: store::Store,
    pub tokens: token::Tokens,
    pub faults: Faults,
    pub log: Vec<RequestRecord>,
}

#[derive(Default)]
pub(crate) struct Faults {
    rules: Vec<FailRule>,
    pub delay: Duration,
}

struct FailRule {
    remaining: usize,
    code: u16,
    path_contains: Option<String>,
}

impl Faults {
    /// The status code to fail this request with, consuming one use of the first matching rule.
    pub fn take(&mut self, path: &str) -> Option<u16> {
        let rule = self.rules.iter_mut().find(|r| {
            r.remaining > 0 && r.path_contains.as_deref().is_none_or(|p| path.contains(p))
        })?;
        rule.remaining -= 1;
        let code = rule.code;
        self.rules.retain(|r| r.remaining > 0);
        Some(code)
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    // Connections live in this set so aborting the server task closes them too.
    let mut connections = JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "fake api server accept failed");
                    continue;
                }
            },
            Some(_) = connections.join_next() => continue,
        };
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(error = %e, "fake api server tls handshake failed");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |req| http::handle(Arc::clone(&shared), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(error = %e, "fake api server connection ended");
            }
        });
    }
}

async fn config_from_yaml(yaml: &str) -> Result<kube::Config, FakeError> {
    let kubeconfig =
        Kubeconfig::from_yaml(yaml).map_err(|e| FakeError::Kubeconfig(e.to_string()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| FakeError::Kubeconfig(e.to_string()))
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: meshward-fake\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {user}@meshward-fake\n  context:\n    cluster: meshward-fake\n    user: {user}\n    namespace: default\ncurrent-context: {user}@meshward-fake\n"
    )
}

fn hex_token() -> String {
    object::random_bytes::<24>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
