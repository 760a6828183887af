//! The CA's admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Served by [`meshward_ops::AdminEndpoint`], as every part's is; this module only says what the
//! CA puts behind it: its metrics (with gauges refreshed at each scrape) and its readiness flag.

use std::sync::Arc;

use meshward_ops::AdminEndpoint;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::CaMetrics;

pub use meshward_ops::Readiness;

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
    /// Serves the admin port on `listener` until `shutdown` fires (see [`AdminEndpoint::serve`]).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.endpoint().serve(listener, shutdown).await;
    }

    fn endpoint(&self) -> AdminEndpoint {
        let (metrics, before_scrape) = (self.metrics.clone(), self.before_scrape.clone());
        let text = move || {
            if let Some(refresh) = &before_scrape {
                refresh();
            }
            metrics.encode()
        };
        AdminEndpoint::new(Arc::new(text), self.ready.check())
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use http_body_util::BodyExt as _;

    use super::*;

    // The endpoint itself (paths, methods, readiness, real HTTP, shutdown) is tested in
    // `meshward-ops`; here, that the CA's metrics, refresh and flag are what it serves.
    #[tokio::test]
    async fn metrics_refresh_runs_before_each_scrape() {
        let mut admin = AdminHttp {
            metrics: CaMetrics::new(),
            ready: Readiness::new(),
            before_scrape: None,
        };
        admin.metrics.issued(2);
        let metrics = admin.metrics.clone();
        admin.before_scrape = Some(Arc::new(move || metrics.set_agents(7)));
        let endpoint = admin.endpoint();
        let response = endpoint.respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("meshward_ca_agents 7"), "{body}");
        assert!(body.contains("meshward_ca_svids_issued_total 2"), "{body}");
    }

    #[test]
    fn ready_follows_the_flag() {
        let admin = AdminHttp {
            metrics: CaMetrics::new(),
            ready: Readiness::new(),
            before_scrape: None,
        };
        let endpoint = admin.endpoint();
        assert_eq!(
            endpoint.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        admin.ready.set(true);
        assert_eq!(
            endpoint.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
    }
}
