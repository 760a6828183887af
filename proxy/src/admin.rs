//! The proxy's admin port: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Served by [`meshward_ops::AdminEndpoint`], as every part's is; this module only says what the
//! proxy puts behind it: its metrics, and a readiness check computed at each request.

use std::sync::Arc;

use meshward_ops::AdminEndpoint;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::ProxyMetrics;

pub use meshward_ops::ReadyCheck;

/// What the admin port serves.
#[derive(Clone)]
pub struct Admin {
    /// The metrics to expose.
    pub metrics: ProxyMetrics,
    /// `/ready` answers 200 when this says so.
    pub ready: ReadyCheck,
}

impl Admin {
    /// Serves the admin port on `listener` until `shutdown` fires (see [`AdminEndpoint::serve`]).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.endpoint().serve(listener, shutdown).await;
    }

    fn endpoint(&self) -> AdminEndpoint {
        let metrics = self.metrics.clone();
        AdminEndpoint::new(Arc::new(move || metrics.encode()), Arc::clone(&self.ready))
            .not_ready_reason("no svid yet, or shutting down")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use http::{Method, StatusCode};
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::policy_store::PolicyMetrics;

    // The endpoint itself (paths, methods, readiness, real HTTP, shutdown) is tested in
    // `meshward-ops`; here, that the proxy's check and reason are what it serves.
    #[tokio::test]
    async fn ready_follows_the_check_and_says_why_not() {
        let flag = Arc::new(AtomicBool::new(false));
        let check = Arc::clone(&flag);
        let admin = Admin {
            metrics: ProxyMetrics::new(&PolicyMetrics::default()),
            ready: Arc::new(move || check.load(Ordering::Acquire)),
        };
        let endpoint = admin.endpoint();
        let response = endpoint.respond(&Method::GET, "/ready");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"not ready: no svid yet, or shutting down\n");
        flag.store(true, Ordering::Release);
        assert_eq!(
            endpoint.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            endpoint.respond(&Method::GET, "/metrics").status(),
            StatusCode::OK
        );
    }
}
