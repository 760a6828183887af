//! The harness: a test PKI, a recording app, the proxy as it runs for users (`meshward_proxy::start`
//! on 127.0.0.1:0 with an `--svid-dir`), and mTLS clients with any certificate.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::SpiffeId;
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::test_util::TestPki;
use meshward_identity::tls::client_config;
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid};
use meshward_proxy::RunningProxy;
use meshward_proxy::config::{IdentitySource, InboundListener, Limits, Protocol, ProxyConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

pub const TD: &str = "a.org";
pub const API: &str = "spiffe://a.org/ns/shop/sa/api";
pub const WEB: &str = "spiffe://a.org/ns/shop/sa/web";
pub const INTRUDER: &str = "spiffe://a.org/ns/other/sa/intruder";

/// `web` may call `api` (any action), except anything under `/admin`; `/api/broken` errors.
pub const POLICIES: &str = r#"
@id("web-calls-api")
permit (
  principal == Workload::"spiffe://a.org/ns/shop/sa/web",
  action,
  resource == Workload::"spiffe://a.org/ns/shop/sa/api"
);

@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin*" };

@id("host-must-be-api-shop")
forbid (principal, action, resource)
when { context.path == "/api/host" && context.host != "api.shop" };

@id("broken-forbid")
forbid (principal, action, resource)
when { context.path == "/api/broken" && Workload::"spiffe://a.org/ns/ghost/sa/none".namespace == "ghost" };
"#;

/// What the app saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A plain HTTP/1.1 app that records every request and answers `app saw <path>`.
///
/// Requests to `/api/slow*` wait for a permit from `gate` first.
#[derive(Clone)]
pub struct App {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub gate: Arc<Semaphore>,
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    pub max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl App {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        };
        let this = app.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let this = this.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.respond(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        app
    }

    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        use std::sync::atomic::Ordering;
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body,
        });
        if path.starts_with("/api/slow") {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let permit = self.gate.acquire().await.unwrap();
            permit.forget();
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        Response::new(Full::new(Bytes::from(format!("app saw {path}"))))
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.uri).collect()
    }
}

/// A TCP echo app that counts connections and bytes.
#[derive(Clone)]
pub struct EchoApp {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    pub bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl EchoApp {
    pub async fn start() -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = EchoApp {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            bytes: Arc::default(),
        };
        let this = app.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                this.connections.fetch_add(1, Ordering::SeqCst);
                let this = this.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                this.bytes.fetch_add(n, Ordering::SeqCst);
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        app
    }
}

/// An SVID as files, the `--svid-dir` layout.
pub fn write_svid_dir(dir: &Path, pki: &TestPki, svid: &X509Svid, key: &SvidKey) {
    std::fs::create_dir_all(dir).unwrap();
    // Key first, chain last: the proxy only acts on a consistent set (a mismatch is refused
    // and retried at the next poll).
    std::fs::write(dir.join("bundle.pem"), pki.root_pem()).unwrap();
    std::fs::write(dir.join("svid.key"), key.to_pkcs8_pem()).unwrap();
    std::fs::write(dir.join("svid.pem"), svid.to_pem()).unwrap();
}

/// One proxy under test, with its temp dir, app and shutdown token.
pub struct Harness {
    pub pki: Arc<TestPki>,
    pub dir: tempfile::TempDir,
    pub config: ProxyConfig,
    pub shutdown: CancellationToken,
    pub running: Option<RunningProxy>,
    pub app: App,
}

impl Harness {
    /// A proxy for `api` with one HTTP inbound listener in front of a recording app.
    pub async fn http() -> Self {
        Self::with(|_, _| {}).await
    }

    /// Like [`Harness::http`], letting `adjust` change the config (paths are in `dir`) first.
    pub async fn with(adjust: impl FnOnce(&mut ProxyConfig, &Path)) -> Self {
        let pki = Arc::new(TestPki::new(TD));
        Self::with_identity(pki, API, adjust).await
    }

    /// A proxy holding `id`'s SVID from `pki`.
    pub async fn with_identity(
        pki: Arc<TestPki>,
        id: &str,
        adjust: impl FnOnce(&mut ProxyConfig, &Path),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (svid, key) = pki.svid(id);
        write_svid_dir(&dir.path().join("svid"), &pki, &svid, &key);
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("test.cedar"), POLICIES).unwrap();
        let app = App::start().await;
        let mut config = ProxyConfig::new(
            IdentitySource::SvidDir(dir.path().join("svid")),
            &policies,
            dir.path().join("audit.log"),
        );
        config.node = "test-node".to_owned();
        config.admin = Some("127.0.0.1:0".parse().unwrap());
        config.policy_poll_interval = Duration::from_millis(100);
        config.limits = Limits {
            drain_grace: Duration::from_secs(5),
            ..Limits::default()
        };
        config.inbound.push(InboundListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: app.addr,
            protocol: Protocol::Http,
        });
        adjust(&mut config, dir.path());
        let mut harness = Harness {
            pki,
            dir,
            config,
            shutdown: CancellationToken::new(),
            running: None,
            app,
        };
        harness.start().await;
        harness
    }

    pub async fn start(&mut self) {
        self.shutdown = CancellationToken::new();
        let running = meshward_proxy::start(self.config.clone(), self.shutdown.clone())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), running.identity.ready())
            .await
            .expect("the proxy loads its svid")
            .unwrap();
        self.running = Some(running);
    }

    pub fn running(&self) -> &RunningProxy {
        self.running.as_ref().unwrap()
    }

    pub fn inbound(&self) -> SocketAddr {
        self.running().inbound[0]
    }

    pub fn metrics(&self) -> String {
        self.running().metrics.encode()
    }

    /// Fires the shutdown token and waits for the drain to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.unwrap();
        }
    }

    /// The `--svid-dir` this proxy watches.
    pub fn identity_dir(&self) -> PathBuf {
        match &self.config.identity {
            IdentitySource::SvidDir(dir) => dir.clone(),
            IdentitySource::WorkloadApi(_) => panic!("not an svid-dir proxy"),
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        self.config.audit.clone()
    }

    /// The audit records, once at least `n` are on disk.
    pub async fn audit(&self, n: usize) -> Vec<Value> {
        let path = self.audit_path();
        let mut records = Vec::new();
        for _ in 0..100 {
            records = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} audit records, found {}: {records:#?}",
            records.len()
        );
    }

    /// The proxy's outbound listener `i`.
    pub fn outbound(&self, i: usize) -> SocketAddr {
        self.running().outbound[i]
    }

    /// An mTLS client presenting `id`'s SVID from this harness's PKI.
    pub fn client(&self, id: &str) -> Client {
        let (svid, key) = self.pki.svid(id);
        Client::new(&self.pki, svid.into_chain(), key, &[b"http/1.1"])
    }
}

/// An mTLS client with any certificate chain; it trusts `pki`'s root and expects `API`.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
}

impl Client {
    pub fn new(
        pki: &TestPki,
        chain: Vec<CertificateDer<'static>>,
        key: SvidKey,
        alpn: &[&[u8]],
    ) -> Self {
        let mut bundles = BundleSet::new();
        bundles.insert(TrustBundle::from_pem(pki.trust_domain().clone(), &pki.root_pem()).unwrap());
        let verifier = PeerVerifier::new(Arc::new(bundles), [pki.trust_domain().clone()])
            .with_expected(Expected::Id(API.parse::<SpiffeId>().unwrap()));
        let config = client_config(
            chain,
            key.to_pkcs8_der(),
            Arc::new(verifier),
            alpn.iter().map(|p| p.to_vec()).collect(),
        )
        .unwrap();
        Client {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        self.connector
            .connect(ServerName::try_from("api.shop").unwrap(), tcp)
            .await
    }

    /// Sends raw bytes over a fresh connection and reads until the proxy closes (or 5 s).
    pub async fn raw(&self, addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
        let mut tls = self.connect(addr).await?;
        tls.write_all(request).await?;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        match read {
            Ok(Ok(_)) => Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(Err(e)) if out.is_empty() => Err(e),
            Ok(Err(_)) | Err(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        }
    }

    /// `GET path` over HTTP/1.1 with `connection: close`; the status line and body.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> std::io::Result<String> {
        self.raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: api.shop\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
    }

    /// An HTTP/2 connection (the client must have been made with ALPN `h2`).
    pub async fn h2(
        &self,
        addr: SocketAddr,
    ) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
        let tls = self.connect(addr).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }
}

/// `GET path` on an HTTP/2 connection: status and body.
pub async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (u16, String) {
    send.ready().await.unwrap();
    let req = Request::get(format!("https://api.shop{path}"))
        .body(Empty::new())
        .unwrap();
    let response = send.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The status code of a raw HTTP/1.1 response.
pub fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an http response: {response:?}"))
}

/// Waits until `check` holds, for at most `within`.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Plain HTTP/1.1 `GET` (as the local app would send to an outbound listener); the raw response.
pub async fn plain_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: api.shop\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
