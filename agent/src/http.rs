//! The agent's admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Plain HTTP/1.1 with hyper: nothing here is secret (counts and expiry times, never an ID), and
//! Prometheus and kubelet probes speak nothing else. Only `GET` and `HEAD` are answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers whether the agent is ready, computed at each request.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin port serves.
#[derive(Clone)]
pub struct AdminHttp {
    /// The metrics to expose.
    pub metrics: AgentMetrics,
    /// `/ready` answers 200 when this says so.
    pub ready: ReadyCheck,
}

impl AdminHttp {
    /// Serves the admin port on `listener` until `shutdown` fires.
    ///
    /// A failing connection ends only that connection; accept errors (e.g. out of file descriptors)
    /// are logged and retried after a short pause.
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
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n",
            );
        }
        match path {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/ready" if (self.ready)() => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/live" => text(StatusCode::OK, "live\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready or /live\n",
            ),
        }
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
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn admin(flag: Arc<AtomicBool>) -> AdminHttp {
        AdminHttp {
            metrics: AgentMetrics::new(),
            ready: Arc::new(move || flag.load(Ordering::Acquire)),
        }
    }

    #[test]
    fn ready_follows_the_check_and_bad_requests_are_refused() {
        let flag = Arc::new(AtomicBool::new(false));
        let admin = admin(Arc::clone(&flag));
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        flag.store(true, Ordering::Release);
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            admin.respond(&Method::GET, "/live").status(),
            StatusCode::OK
        );
        assert_eq!(
            admin.respond(&Method::GET, "/x").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            admin.respond(&Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_real_http_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin(Arc::new(AtomicBool::new(true)));
        admin.metrics.minted(2);
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
        assert!(
            body.contains("meshward_agent_svids_minted_total 2"),
            "{body}"
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
