//! The CA's admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Plain HTTP/1.1 with hyper: it serves nothing secret (no keys, no IDs beyond counts), and the
//! Prometheus scraper and kubelet probes speak nothing else. Only `GET` and `HEAD` are answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::CaMetrics;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the CA is serving; `/ready` answers 200 only once it is. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A readiness flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the CA ready (or, on shutdown, not ready).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the CA is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin port serves.
#[derive(Clone)]
pub struct AdminHttp {
    /// The metrics to expose.
    pub metrics: CaMetrics,
    /// The readiness flag.
    pub ready: Readiness,
    /// Called before each scrape to refresh gauges that are cheaper to compute on demand.
    pub before_scrape: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl AdminHttp {
    /// Serves the admin port on `listener` until `shutdown` fires.
    ///
    /// A failing connection only ends that connection; accept errors (e.g. out of file descriptors)
    /// are logged and retried after a short pause, as they are usually transient.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let this = Arc::new(self);
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin http accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let this = Arc::clone(&this);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.respond(&req)) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
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
                    tracing::debug!(error = %e, "admin http connection failed");
                }
            });
        }
    }

    /// Answers one request.
    pub fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        respond_to(self, req.method(), req.uri().path())
    }
}

fn respond_to(admin: &AdminHttp, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed\n",
        );
    }
    match path {
        "/metrics" => {
            if let Some(refresh) = &admin.before_scrape {
                refresh();
            }
            let body = admin.metrics.encode();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/ready" if admin.ready.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/live" => text(StatusCode::OK, "live\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready or /live\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn admin() -> AdminHttp {
        AdminHttp {
            metrics: CaMetrics::new(),
            ready: Readiness::new(),
            before_scrape: None,
        }
    }

    #[test]
    fn ready_follows_the_flag() {
        let admin = admin();
        assert_eq!(
            respond_to(&admin, &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        admin.ready.set(true);
        assert_eq!(
            respond_to(&admin, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond_to(&admin, &Method::GET, "/live").status(),
            StatusCode::OK
        );
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let admin = admin();
        assert_eq!(
            respond_to(&admin, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond_to(&admin, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn metrics_refresh_runs_before_each_scrape() {
        let mut admin = admin();
        let metrics = admin.metrics.clone();
        admin.before_scrape = Some(Arc::new(move || metrics.set_agents(7)));
        let response = respond_to(&admin, &Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(admin.metrics.encode().contains("meshward_ca_agents 7"));
    }

    #[tokio::test]
    async fn serves_over_real_http_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin();
        admin.metrics.issued(2);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(admin.serve(listener, shutdown.clone()));

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("meshward_ca_svids_issued_total 2"), "{body}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
