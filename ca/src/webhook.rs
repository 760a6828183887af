//! The injection webhook: `POST /inject` over HTTPS, answering the API server's AdmissionReviews
//! for pods created in namespaces labelled `meshward.io/inject=enabled` (see the chart's
//! `templates/webhook.yaml`) with the patch that adds the proxy, as `meshward inject` would.
//!
//! - Trusts: nothing it is sent. The body is bounded ([`MAX_BODY_BYTES`]) and parsed by
//!   `meshward_inject::admission`; it only ever answers, it never writes or issues anything. Who
//!   may call it is the API server's business (the webhook has no side effects), so there is no
//!   client authentication.
//! - TLS: the API server verifies the serving certificate against the webhook configuration's
//!   `caBundle`, so it is a PEM certificate (chain) and key from files (the chart mounts a
//!   `kubernetes.io/tls` Secret), not the CA's own SPIFFE SVID (which has no DNS name). Both files
//!   are read again when either changes ([`RELOAD_INTERVAL`]), so a renewed Secret applies from
//!   the next handshake; a pair that does not load is logged and the previous one kept.
//! - Answers: 200 with an AdmissionReview; 400 for a body that is not one; 404 another path; 405
//!   another method; 413 a body over [`MAX_BODY_BYTES`]; 415 another content type than JSON.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshward_identity::tls::{PROTOCOL_VERSIONS, provider};
use meshward_inject::InjectOptions;
use meshward_inject::admission::{self, AdmissionReview};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// The path the webhook configuration's `clientConfig` names.
pub const INJECT_PATH: &str = "/inject";
/// Largest AdmissionReview accepted (a pod is a few KiB; the API server's own limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How often the certificate and key files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client may take to finish its TLS handshake, then to send its request headers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The HTTPS listen address.
    pub listen: SocketAddr,
    /// PEM serving certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate.
    pub key: PathBuf,
    /// What the injected proxy runs: image, policy ConfigMap, socket directory.
    pub inject: InjectOptions,
}

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A file cannot be read.
    #[error("cannot read the webhook {what} `{}`: {source}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate file has no PEM certificate.
    #[error("the webhook certificate `{}` holds no PEM `CERTIFICATE`: give the serving certificate, then its intermediates", .0.display())]
    NoCertificate(PathBuf),
    /// The key file has no PEM private key.
    #[error("the webhook key `{}` holds no PEM private key: give the certificate's key (PKCS#8, PKCS#1 or SEC1)", .0.display())]
    NoKey(PathBuf),
    /// The pair cannot serve TLS (a key rustls cannot use, or not the certificate's).
    #[error("the webhook certificate `{}` and key `{}` cannot be used together: {reason}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The TLS configuration cannot be built.
    #[error("cannot set up the webhook's tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The listen address cannot be bound.
    #[error("cannot listen for the webhook on `{addr}`: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A bound webhook, ready to [`serve`](WebhookServer::serve).
#[derive(Debug)]
pub struct WebhookServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    certs: Arc<ReloadingCert>,
    tls: Arc<ServerConfig>,
    options: Arc<InjectOptions>,
}

impl WebhookServer {
    /// Loads the certificate and key and binds the listen address.
    pub async fn bind(config: &WebhookConfig) -> Result<Self, WebhookError> {
        let certs = Arc::new(ReloadingCert::load(&config.cert, &config.key)?);
        let mut tls = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let bind_error = |source| WebhookError::Bind {
            addr: config.listen,
            source,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            local_addr,
            certs,
            tls: Arc::new(tls),
            options: Arc::new(config.inject.clone()),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` fires; requests in flight then finish.
    ///
    /// A failing handshake or connection ends only that connection; accept errors (e.g. out of
    /// file descriptors) are logged and retried after a short pause.
    pub async fn serve(self, shutdown: CancellationToken) {
        tokio::spawn(Arc::clone(&self.certs).watch(shutdown.clone()));
        let acceptor = TlsAcceptor::from(self.tls);
        loop {
            let (tcp, remote) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let options = Arc::clone(&self.options);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "webhook tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "webhook tls handshake timed out");
                        return;
                    }
                };
                let service = service_fn(move |req| {
                    let options = Arc::clone(&options);
                    async move { Ok::<_, Infallible>(respond(req, &options).await) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(CLIENT_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => result,
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "webhook connection failed");
                }
            });
        }
    }
}

/// Validates the webhook settings of `ca.toml`, flags or env: all or nothing of `webhook_listen`,
/// `webhook_cert`, `webhook_key`; the `inject_*` settings only with them.
#[allow(clippy::too_many_arguments)]
pub fn webhook_config(
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    image: Option<String>,
    policies_configmap: Option<String>,
    socket_dir: Option<String>,
    allow_host_network: Option<bool>,
) -> Result<Option<WebhookConfig>, ConfigError> {
    let invalid = |setting: &'static str, value: String, reason: String| ConfigError::Invalid {
        setting,
        value,
        reason,
    };
    let Some(listen_text) = listen else {
        let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
        let stray = [
            ("webhook_cert", path(cert)),
            ("webhook_key", path(key)),
            ("inject_image", image),
            ("inject_policies_configmap", policies_configmap),
            ("inject_socket_dir", socket_dir),
            (
                "inject_allow_host_network",
                allow_host_network.map(|b| b.to_string()),
            ),
        ];
        return match stray.into_iter().find_map(|(k, v)| v.map(|v| (k, v))) {
            Some((setting, value)) => Err(invalid(
                setting,
                value,
                "only used by the injection webhook; add `--webhook-listen`".to_owned(),
            )),
            None => Ok(None),
        };
    };
    let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
        invalid(
            "webhook_listen",
            listen_text.clone(),
            "use IP:PORT, e.g. `0.0.0.0:8443`".to_owned(),
        )
    })?;
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(invalid(
            "webhook_listen",
            listen_text,
            "the webhook serves https: also give `--webhook-cert` and `--webhook-key` (PEM files)"
                .to_owned(),
        ));
    };
    let mut inject = InjectOptions::default();
    if let Some(text) = image {
        inject.image = meshward_inject::check_image(&text)
            .map_err(|reason| invalid("inject_image", text.clone(), reason))?;
    }
    if let Some(text) = policies_configmap {
        inject.policies_config_map = meshward_inject::check_config_map_name(&text)
            .map_err(|reason| invalid("inject_policies_configmap", text.clone(), reason))?;
    }
    if let Some(text) = socket_dir {
        inject.socket_dir = meshward_inject::check_socket_dir(&text)
            .map_err(|reason| invalid("inject_socket_dir", text.clone(), reason))?;
    }
    inject.allow_host_network = allow_host_network.unwrap_or(false);
    Ok(Some(WebhookConfig {
        listen,
        cert,
        key,
        inject,
    }))
}

/// Answers one request.
async fn respond(req: Request<Incoming>, options: &InjectOptions) -> Response<Full<Bytes>> {
    if req.uri().path() != INJECT_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "not found: `{}`; the webhook serves POST {INJECT_PATH}\n",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method `{}` is not allowed: send POST {INJECT_PATH}\n",
                req.method()
            ),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_json = content_type.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type `{}` is not supported: send an AdmissionReview as `application/json`\n",
                content_type.as_deref().unwrap_or("")
            ),
        );
    }
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is over {MAX_BODY_BYTES} bytes: an AdmissionReview for one pod is far smaller\n"
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
    };
    match admission::review(&body, options) {
        Ok(review) => answer(&review),
        Err(e) => {
            tracing::warn!(error = %e, "webhook refused a malformed admission review");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

fn answer(review: &AdmissionReview) -> Response<Full<Bytes>> {
    let response = &review.response;
    match &response.status {
        Some(status) => {
            tracing::info!(uid = %response.uid, reason = %status.message, "webhook denied a pod");
        }
        None => {
            tracing::debug!(uid = %response.uid, patched = response.patch.is_some(), "webhook answered")
        }
    }
    match serde_json::to_vec(review) {
        Ok(bytes) => {
            let mut reply = Response::new(Full::new(Bytes::from(bytes)));
            reply.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            reply
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the admission review: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The serving certificate, read again from its files when they change.
#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Modification times of the certificate and key files when they were read.
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

impl ReloadingCert {
    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, WebhookError> {
        let loaded = load_pair(cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(loaded),
        })
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until `shutdown` fires.
    async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let this = Arc::clone(&self);
            // File reads block; a slow volume must not stall the runtime.
            if tokio::task::spawn_blocking(move || this.reload_if_changed())
                .await
                .is_err()
            {
                tracing::warn!("webhook certificate reload panicked");
            }
        }
    }

    /// Reads the pair again if either file's modification time changed; says whether it did.
    fn reload_if_changed(&self) -> bool {
        let stamps = (modified(&self.cert_path), modified(&self.key_path));
        let unchanged = self
            .current
            .read()
            .map(|current| current.stamps == stamps)
            .unwrap_or(false);
        if unchanged {
            return false;
        }
        match load_pair(&self.cert_path, &self.key_path) {
            Ok(loaded) => {
                if let Ok(mut current) = self.current.write() {
                    *current = loaded;
                }
                tracing::info!(cert = %self.cert_path.display(), "webhook certificate reloaded");
                true
            }
            Err(e) => {
                // A Secret update writes both files; one read between the two can mismatch. The
                // old stamps stay, so the next tick tries again.
                tracing::warn!(error = %e, "webhook certificate not reloaded; still serving the previous one");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c.key))
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, WebhookError> {
    let stamps = (modified(cert_path), modified(key_path));
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| WebhookError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("certificate", cert_path)?;
    let key_pem = read("key", key_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| WebhookError::NoCertificate(cert_path.to_owned()))?;
    if chain.is_empty() {
        return Err(WebhookError::NoCertificate(cert_path.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| WebhookError::NoKey(key_path.to_owned()))?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| WebhookError::Pair {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        stamps,
    })
}

#[cfg(test)]
mod tests;
