//! Inbound HTTP: every request decided by Cedar, then forwarded to the app with XFCC.
//!
//! Order per request: refuse framing that smells of smuggling; parse the method as a Cedar
//! action; normalize the path and host ONCE (an ambiguous path is a 400, audited as a deny);
//! decide (enforced set, then the dry-run set, which is only audited and counted); audit; then
//! either answer 403 naming the decision id and its reason, or forward the *normalized* path
//! to the app over plain HTTP/1.1 with the caller's identity in a fresh XFCC header.

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshward_identity::audit::RecordId;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, warn};

use super::{Inbound, Peer};
use crate::audit_sink::DecisionFacts;
use crate::authz::{Action, AuthzRequest, Decision, Mode};
use crate::config::Limits;
use crate::hop_by_hop::strip_hop_by_hop;
use crate::normalize::{normalize_host, normalize_path};
use crate::server::{Drain, serve_http};
use crate::xfcc::{XFCC, xfcc_value};

/// The pooled plain HTTP/1.1 client to the local app.
pub type AppClient = Client<HttpConnector, Incoming>;

/// A response body: the app's, streamed, or one the proxy wrote.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// hyper's smallest accepted read buffer limit.
const MIN_BUF_SIZE: usize = 8192;

/// The connection builders, one per ALPN outcome, made once per listener.
#[derive(Debug)]
pub(crate) struct Builders {
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
    either: auto::Builder<TokioExecutor>,
}

/// Per-connection state every request on it reads.
struct Conn {
    inbound: Arc<Inbound>,
    peer: Peer,
    xfcc: HeaderValue,
}

/// Why a request was refused before Cedar could decide it.
enum Refusal {
    /// Malformed: 400.
    BadRequest(String),
    /// Not in the schema: 403.
    Forbidden(String),
}

impl Builders {
    pub(crate) fn new(limits: &Limits) -> Self {
        let mut either = auto::Builder::new(TokioExecutor::new());
        either
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(MIN_BUF_SIZE))
            .max_headers(128);
        either
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .keep_alive_interval(limits.h2_keepalive_interval)
            .keep_alive_timeout(limits.h2_keepalive_timeout)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // CVE-2023-44487 (rapid reset) and CVE-2024-27316 (CONTINUATION flood): bound the
            // streams a peer can make us do work for and then cancel.
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(256);
        Self {
            h1: either.clone().http1_only(),
            h2: either.clone().http2_only(),
            either,
        }
    }

    fn for_alpn(&self, alpn: &str) -> &auto::Builder<TokioExecutor> {
        match alpn {
            "h2" => &self.h2,
            "http/1.1" => &self.h1,
            _ => &self.either,
        }
    }
}

/// A pooled plain HTTP client (for the app), keeping idle connections for `idle_timeout`
/// ([`Limits::app_idle_timeout`](crate::config::Limits::app_idle_timeout)).
pub fn app_client(connect_timeout: Duration, idle_timeout: Duration) -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Serves HTTP on one verified connection until it closes or the drain ends it.
pub(crate) async fn serve(
    inbound: Arc<Inbound>,
    stream: TlsStream<TcpStream>,
    peer: Peer,
    drain: Drain,
) {
    let xfcc = xfcc_value(&peer.us, &peer.id, &peer.leaf_sha256);
    let conn = Arc::new(Conn {
        inbound: Arc::clone(&inbound),
        peer,
        xfcc,
    });
    let builder = inbound.builders.for_alpn(&conn.peer.tls.alpn);
    let service = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    serve_http(builder, TokioIo::new(stream), service, &drain).await;
}

async fn handle(conn: &Conn, req: Request<Incoming>) -> Response<ProxyBody> {
    let inbound = &conn.inbound;
    let raw_target = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
    let action = Action::from_str(req.method().as_str());
    let authority = request_authority(&req);
    let checked = check(
        &req,
        raw_target,
        action.as_ref().ok().copied(),
        authority.as_deref(),
    );
    let (action, path, host) = match checked {
        Ok(parts) => parts,
        Err(refusal) => {
            return refuse(
                conn,
                &req,
                raw_target,
                authority.as_deref(),
                action.ok(),
                refusal,
            );
        }
    };
    let request = AuthzRequest {
        principal: conn.peer.id.clone(),
        resource: conn.peer.us.clone(),
        action,
        path: Some(path),
        host,
        source_ip: conn.peer.source_ip,
        tls: conn.peer.tls.clone(),
    };
    let authorizer = inbound.policies.current();
    let started = Instant::now();
    let decision = authorizer.decide(&request);
    let took = started.elapsed();
    inbound.metrics.decision_duration(took);
    let Some(record_id) = record(conn, &request, &decision, took) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit log is unavailable; failing closed\n".to_owned(),
        );
    };
    if let Some(dry_run) = authorizer.decide_dry_run(&request) {
        // The dry-run decision is recorded, never enforced; its audit failure only logs.
        let _ = record(conn, &request, &dry_run, took);
    }
    drop(authorizer);
    if !decision.allowed {
        return text(
            StatusCode::FORBIDDEN,
            format!("{} (decision {record_id})\n", decision.reason()),
        );
    }
    forward(conn, req, &request).await
}

/// The checks that come before a decision: framing, method, path and host.
fn check(
    req: &Request<Incoming>,
    raw_target: &str,
    action: Option<Action>,
    authority: Option<&str>,
) -> Result<(Action, crate::normalize::NormalizedPath, String), Refusal> {
    let headers = req.headers();
    // hyper already drops Content-Length when Transfer-Encoding is present (and closes the
    // connection after the response); refuse the shape outright if anything lets both through.
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(Refusal::BadRequest(
            "both content-length and transfer-encoding: ambiguous framing".to_owned(),
        ));
    }
    let path =
        normalize_path(raw_target.as_bytes()).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    let host = match authority {
        Some(host) => normalize_host(host).map_err(|e| Refusal::BadRequest(e.to_string()))?,
        None => String::new(),
    };
    let action = action.ok_or_else(|| {
        Refusal::Forbidden(format!(
            "method `{}` is not an action in the policy schema",
            req.method()
        ))
    })?;
    Ok((action, path, host))
}

/// `:authority` (HTTP/2, absolute-form) or `Host`.
fn request_authority(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
}

/// A refusal before Cedar: audited as a deny carrying the error, answered 400 or 403.
fn refuse(
    conn: &Conn,
    req: &Request<Incoming>,
    raw_target: &str,
    raw_host: Option<&str>,
    action: Option<Action>,
    refusal: Refusal,
) -> Response<ProxyBody> {
    let (status, message) = match refusal {
        Refusal::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
        Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, m),
    };
    let decision = Decision {
        allowed: false,
        policies: Vec::new(),
        errors: vec![message],
        mode: Mode::Enforce,
    };
    let action_name = match action {
        Some(action) => action.as_str(),
        None => req.method().as_str(),
    };
    let facts = DecisionFacts {
        principal: conn.peer.id.as_str(),
        action: action_name,
        resource: conn.peer.us.as_str(),
        path: Some(raw_target),
        host: raw_host.unwrap_or(""),
        source_ip: conn.peer.source_ip,
        tls: &conn.peer.tls,
    };
    conn.inbound.metrics.decision(action, Mode::Enforce, false);
    let record = match conn.inbound.audit.record(&facts, &decision, Duration::ZERO) {
        Ok(id) => id,
        Err(e) => {
            error!(error = %e, "cannot audit a refused request; failing closed");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log is unavailable; failing closed\n".to_owned(),
            );
        }
    };
    debug!(decision_id = %record, peer = %conn.peer.id, status = status.as_u16(), reason = %decision.reason(), "request refused before authorization");
    text(
        status,
        format!("{} (decision {record})\n", decision.reason()),
    )
}

/// Counts, audits and logs one decision; `None` if the audit log refused the record.
fn record(
    conn: &Conn,
    request: &AuthzRequest,
    decision: &Decision,
    took: Duration,
) -> Option<RecordId> {
    let inbound = &conn.inbound;
    inbound
        .metrics
        .decision(Some(request.action), decision.mode, decision.allowed);
    let facts = DecisionFacts {
        principal: conn.peer.id.as_str(),
        action: request.action.as_str(),
        resource: conn.peer.us.as_str(),
        path: request.path.as_ref().map(|p| p.as_str()),
        host: &request.host,
        source_ip: request.source_ip,
        tls: &request.tls,
    };
    match inbound.audit.record(&facts, decision, took) {
        Ok(id) => {
            debug!(
                decision_id = %id,
                mode = ?decision.mode,
                allowed = decision.allowed,
                peer = %conn.peer.id,
                action = %request.action,
                path = facts.path.unwrap_or(""),
                reason = %decision.reason(),
                "decided"
            );
            Some(id)
        }
        Err(e) => {
            error!(error = %e, mode = ?decision.mode, "cannot audit a decision");
            None
        }
    }
}

/// Sends the allowed request to the app: normalized path, no hop-by-hop headers, our XFCC.
async fn forward(
    conn: &Conn,
    req: Request<Incoming>,
    request: &AuthzRequest,
) -> Response<ProxyBody> {
    let inbound = &conn.inbound;
    let (mut parts, body) = req.into_parts();
    let original_authority = parts.uri.authority().cloned();
    let path_and_query = request
        .path
        .as_ref()
        .map(|p| p.path_and_query())
        .unwrap_or_else(|| "/".to_owned());
    let uri = match PathAndQuery::try_from(path_and_query).ok().and_then(|pq| {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(inbound.app_authority.clone());
        uri.path_and_query = Some(pq);
        Uri::from_parts(uri).ok()
    }) {
        Some(uri) => uri,
        None => {
            return text(
                StatusCode::BAD_REQUEST,
                "the request target cannot be forwarded\n".to_owned(),
            );
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    // Whatever the caller claims about client certificates is dropped; ours is the only one.
    parts.headers.remove(&XFCC);
    parts.headers.insert(XFCC.clone(), conn.xfcc.clone());
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = original_authority
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    match inbound.app.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(e) => {
            inbound.metrics.upstream_failure(true);
            warn!(app = %inbound.spec.app, error = %e, "local app unavailable");
            text(
                StatusCode::BAD_GATEWAY,
                "the local app is unavailable\n".to_owned(),
            )
        }
    }
}

/// The app's address as a URI authority.
pub(crate) fn app_authority(app: std::net::SocketAddr) -> Authority {
    // A socket address is always a valid authority.
    Authority::try_from(app.to_string()).unwrap_or_else(|_| Authority::from_static("127.0.0.1"))
}

/// A short plain-text response written by the proxy (in either side's body type).
pub(crate) fn text<B>(status: StatusCode, body: String) -> Response<Either<B, Full<Bytes>>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
