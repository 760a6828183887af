//! Inbound TCP: one `connect` decision per connection, before a single byte reaches the app.

use std::time::Instant;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, warn};

use super::{Inbound, Peer};
use crate::audit_sink::DecisionFacts;
use crate::authz::{AuthzRequest, Decision};
use crate::normalize::normalize_host;
use crate::server::Drain;
use crate::tcp::relay;

/// Decides the connection; if allowed, connects to the app and relays, else closes it.
pub(crate) async fn serve(
    inbound: &Inbound,
    mut stream: TlsStream<TcpStream>,
    peer: Peer,
    drain: &Drain,
) {
    // The SNI is the only "host" a TCP connection has; a malformed one is simply absent.
    let host = peer
        .sni
        .as_deref()
        .and_then(|sni| normalize_host(sni).ok())
        .unwrap_or_default();
    let mut request = AuthzRequest::connect(peer.id.clone(), peer.us.clone(), host, peer.source_ip);
    request.tls = peer.tls.clone();
    let authorizer = inbound.policies.current();
    let started = Instant::now();
    let decision = authorizer.decide(&request);
    let took = started.elapsed();
    inbound.metrics.decision_duration(took);
    let audited = record(inbound, &request, &decision, took);
    if let Some(dry_run) = authorizer.decide_dry_run(&request) {
        let _ = record(inbound, &request, &dry_run, took);
    }
    drop(authorizer);
    if audited.is_none() || !decision.allowed {
        // A TCP stream has no place for a reason: close it cleanly; the audit record says why.
        let _ = stream.shutdown().await;
        return;
    }
    let app = match tokio::time::timeout(
        inbound.limits.connect_timeout,
        TcpStream::connect(inbound.spec.app),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => {
            inbound.metrics.upstream_failure(true);
            warn!(app = %inbound.spec.app, error = %e, "local app unavailable");
            return;
        }
        Err(_) => {
            inbound.metrics.upstream_failure(true);
            warn!(app = %inbound.spec.app, "local app did not accept in time");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let mut app = app;
    relay(&mut stream, &mut app, drain).await;
}

fn record(
    inbound: &Inbound,
    request: &AuthzRequest,
    decision: &Decision,
    took: std::time::Duration,
) -> Option<meshward_identity::audit::RecordId> {
    inbound
        .metrics
        .decision(Some(request.action), decision.mode, decision.allowed);
    let facts = DecisionFacts {
        principal: request.principal.as_str(),
        action: request.action.as_str(),
        resource: request.resource.as_str(),
        path: None,
        host: &request.host,
        source_ip: request.source_ip,
        tls: &request.tls,
    };
    match inbound.audit.record(&facts, decision, took) {
        Ok(id) => {
            debug!(decision_id = %id, mode = ?decision.mode, allowed = decision.allowed, peer = %request.principal, reason = %decision.reason(), "connection decided");
            Some(id)
        }
        Err(e) => {
            error!(error = %e, "cannot audit a decision; failing closed");
            None
        }
    }
}
