//! The agent's admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`.
//!
//! Served by [`meshward_ops::AdminEndpoint`], as every part's is; this module only says what the
//! agent puts behind it: its metrics, and a readiness check computed at each request.

use std::sync::Arc;

use meshward_ops::AdminEndpoint;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;

pub use meshward_ops::ReadyCheck;

/// What the admin port serves.
#[derive(Clone)]
pub struct AdminHttp {
    /// The metrics to expose.
    pub metrics: AgentMetrics,
    /// `/ready` answers 200 when this says so.
    pub ready: ReadyCheck,
}

impl AdminHttp {
    /// Serves the admin port on `listener` until `shutdown` fires (see [`AdminEndpoint::serve`]).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.endpoint().serve(listener, shutdown).await;
    }

    fn endpoint(&self) -> AdminEndpoint {
        let metrics = self.metrics.clone();
        AdminEndpoint::new(Arc::new(move || metrics.encode()), Arc::clone(&self.ready))
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use http_body_util::BodyExt as _;

    use super::*;

    // The endpoint itself (paths, methods, readiness, real HTTP, shutdown) is tested in
    // `meshward-ops`; here, that the agent's metrics and check are what it serves.
    #[tokio::test]
    async fn serves_the_agents_metrics_and_check() {
        let admin = AdminHttp {
            metrics: AgentMetrics::new(),
            ready: Arc::new(|| false),
        };
        admin.metrics.minted(2);
        let endpoint = admin.endpoint();
        let response = endpoint.respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("meshward_agent_svids_minted_total 2"),
            "{body}"
        );
        assert_eq!(
            endpoint.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
