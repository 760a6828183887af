//! Outbound: plain from the local app, mTLS to one upstream whose SPIFFE ID must be the expected one.
//!
//! HTTP goes through a pooled hyper client whose connector makes the mTLS connection with the
//! current SVID's prebuilt client config (its verifier accepts only the expected ID), and speaks
//! HTTP/2 when the upstream offers it over ALPN, so one connection carries many requests. TCP is
//! one mTLS connection per accepted connection, bytes relayed both ways. A refused upstream gets
//! the local app a 502 saying why (HTTP) or a closed connection (TCP).

mod connector;
mod demand;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

pub use self::connector::{ConnectError, MtlsConnector, MtlsStream};
pub use self::demand::{InFlightBody, MAX_CONNECTING};
use crate::config::{Limits, OutboundListener, Protocol};
use crate::hop_by_hop::strip_hop_by_hop;
use crate::identity_source::IdentityHandle;
use crate::inbound::text;
use crate::metrics::ProxyMetrics;
use crate::server::{Drain, serve_http};
use crate::tcp::relay;

/// The longest an idle pooled upstream connection is kept.
const UPSTREAM_POOL_IDLE_MAX: Duration = Duration::from_secs(90);

/// How long an idle pooled upstream connection is kept: half the header read timeout (at most
/// [`UPSTREAM_POOL_IDLE_MAX`]).
///
/// A meshward inbound closes an idle HTTP/1.1 keep-alive connection once `header_read_timeout`
/// passes without a new request (hyper starts that timer as soon as a response is sent). A pool
/// that kept the connection longer would sooner or later send a request into a connection the
/// peer is closing at that moment, and the caller would get a 502 for a request the upstream never
/// saw. Dropping it at half that time, on our side, first, closes that race for peers with the
/// same settings.
pub fn upstream_pool_idle(limits: &Limits) -> Duration {
    (limits.header_read_timeout / 2).min(UPSTREAM_POOL_IDLE_MAX)
}

/// A response to the local app: the upstream's, streamed, or one the proxy wrote.
pub type OutboundBody = Either<InFlightBody, Full<Bytes>>;

/// What every connection of one outbound listener shares.
#[derive(Debug)]
pub struct Outbound {
    spec: OutboundListener,
    connector: MtlsConnector,
    client: Client<MtlsConnector, Incoming>,
    builder: auto::Builder<TokioExecutor>,
    upstream_authority: Authority,
    metrics: ProxyMetrics,
}

impl Outbound {
    /// The listener for `spec`, the `index`th outbound listener (its client config's index).
    pub fn new(
        index: usize,
        spec: OutboundListener,
        identity: IdentityHandle,
        metrics: ProxyMetrics,
        limits: &Limits,
    ) -> Self {
        let connector = MtlsConnector::new(
            index,
            spec.upstream.clone(),
            identity,
            limits.connect_timeout,
            limits.handshake_timeout,
            metrics.clone(),
        );
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(upstream_pool_idle(limits))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(limits.h2_keepalive_interval)
            .http2_keep_alive_timeout(limits.h2_keepalive_timeout)
            .build(connector.clone());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let upstream_authority = Authority::try_from(spec.upstream.as_str())
            .unwrap_or_else(|_| Authority::from_static("upstream"));
        Self {
            spec,
            connector,
            client,
            builder,
            upstream_authority,
            metrics,
        }
    }

    /// Accepts the local app's connections until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let (tcp, addr) = tokio::select! {
                () = drain.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(listen = %self.spec.listen, error = %e, "outbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            debug!(source = %addr, upstream = %self.spec.upstream, "outbound connection");
            let this = Arc::clone(&self);
            let conn_drain = drain.clone();
            drain.tracker.spawn(async move {
                match this.spec.protocol {
                    Protocol::Http => this.serve_http(tcp, conn_drain).await,
                    Protocol::Tcp => this.serve_tcp(tcp, conn_drain).await,
                }
            });
        }
    }

    async fn serve_http(self: Arc<Self>, tcp: TcpStream, drain: Drain) {
        let this = Arc::clone(&self);
        let service = service_fn(move |req| {
            let this = Arc::clone(&this);
            async move { Ok::<_, Infallible>(this.forward(req).await) }
        });
        serve_http(&self.builder, TokioIo::new(tcp), service, &drain).await;
    }

    async fn serve_tcp(self: Arc<Self>, mut tcp: TcpStream, drain: Drain) {
        let connected = tokio::select! {
            connected = self.connector.connect() => connected,
            () = drain.stop.cancelled() => return,
        };
        match connected {
            Ok(upstream) => {
                let mut upstream = upstream.into_inner();
                relay(&mut tcp, &mut upstream, &drain).await;
            }
            Err(e) => {
                self.metrics.upstream_failure(false);
                warn!(upstream = %self.spec.upstream, error = %e, "upstream refused; closing the local connection");
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<OutboundBody> {
        let (mut parts, body) = req.into_parts();
        // Keep the app's own authority (it names the service; the inbound side decides on it);
        // fall back to the upstream's address.
        let authority = parts
            .uri
            .authority()
            .cloned()
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            })
            .unwrap_or_else(|| self.upstream_authority.clone());
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(path_and_query);
        let Ok(uri) = Uri::from_parts(uri) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the request target cannot be forwarded\n".to_owned(),
            );
        };
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST)
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, value);
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        // Counted until the response body is done: the pool makes connections for what is in
        // flight, not one per request that waited (see `demand`).
        let in_flight = self.connector.demand().request();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(InFlightBody::new(body, in_flight)))
            }
            Err(e) => {
                self.metrics.upstream_failure(false);
                let reason = connect_error(&e).map_or_else(
                    || format!("the upstream connection failed: {e}"),
                    ToString::to_string,
                );
                warn!(upstream = %self.spec.upstream, error = %reason, "outbound request failed");
                text(StatusCode::BAD_GATEWAY, format!("meshward: {reason}\n"))
            }
        }
    }
}

/// Finds our connector's error in the client error's source chain.
fn connect_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if let Some(found) = error.downcast_ref::<ConnectError>() {
            return Some(found);
        }
        source = error.source();
    }
    None
}
