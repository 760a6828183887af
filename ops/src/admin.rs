//! The admin HTTP port of every long-running part: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Plain HTTP/1.1 with hyper: nothing here is secret (counts and expiry times, never a key, an ID,
//! a peer or a path), and Prometheus and kubelet probes speak nothing else. Only `GET` and `HEAD`
//! are answered (405 otherwise); an unknown path is 404. It is bounded: a client has
//! [`HEADER_READ_TIMEOUT`] to send its request head, hyper caps the head's size, and every answer
//! is a small body built in memory.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request headers (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of `/metrics`: what `prometheus-client` encodes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers whether the part is ready, computed at each `/ready` request.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Renders the metrics text at each scrape (gauges that are cheaper to compute on demand are
/// refreshed here too).
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// A readiness flag for parts that set it at start-up and clear it on shutdown. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A readiness flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the part ready (or, on shutdown, not ready).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the part is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// This flag as a [`ReadyCheck`].
    pub fn check(&self) -> ReadyCheck {
        let flag = self.clone();
        Arc::new(move || flag.is_ready())
    }
}

/// What one admin port serves. Cheap to clone.
#[derive(Clone)]
pub struct AdminEndpoint {
    metrics: MetricsText,
    ready: ReadyCheck,
    not_ready: Bytes,
}

impl AdminEndpoint {
    /// An endpoint serving `metrics` at `/metrics` and answering `/ready` with 200 when `ready`
    /// says so, 503 `not ready` otherwise.
    pub fn new(metrics: MetricsText, ready: ReadyCheck) -> Self {
        Self {
            metrics,
            ready,
            not_ready: Bytes::from_static(b"not ready\n"),
        }
    }

    /// Says why in the 503 body of `/ready`: `not ready: <reason>`.
    pub fn not_ready_reason(mut self, reason: &str) -> Self {
        self.not_ready = Bytes::from(format!("not ready: {reason}\n"));
        self
    }

    /// Serves the admin port on `listener` until `shutdown` fires.
    ///
    /// A failing connection ends only that connection; accept errors (e.g. out of file descriptors)
    /// are logged and retried after a short pause, as they are usually transient. On shutdown,
    /// open connections finish their current request and close.
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
                let service = service_fn(move |req: Request<Incoming>| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.respond(req.method(), req.uri().path())) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
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
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(b"only GET and HEAD are allowed\n"),
            );
        }
        match path {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from((self.metrics)())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
                );
                response
            }
            "/ready" if (self.ready)() => text(StatusCode::OK, Bytes::from_static(b"ready\n")),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, self.not_ready.clone()),
            "/live" => text(StatusCode::OK, Bytes::from_static(b"live\n")),
            _ => text(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"not found: try /metrics, /ready or /live\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests;
