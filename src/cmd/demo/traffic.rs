//! The demo's in-process parts: the tiny app behind each proxy, the traffic generator that calls
//! through the proxies, the audit tails that learn which policy decided, and the rotation watcher.

use std::convert::Infallible;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::audit::{AuditKind, AuditReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cmd::audit::summary::policy_labels;

/// One kind of call the generator makes, and whether the policies should let it through.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The calling service.
    pub caller: &'static str,
    /// The called service.
    pub callee: &'static str,
    /// The HTTP method.
    pub method: &'static str,
    /// The path.
    pub path: &'static str,
    /// What the demo policies say.
    pub expect_allow: bool,
}

/// The calls the demo makes, each in its own loop.
pub const ROUTES: [Route; 5] = [
    Route {
        caller: "frontend",
        callee: "catalog",
        method: "GET",
        path: "/items/42",
        expect_allow: true,
    },
    Route {
        caller: "frontend",
        callee: "payments",
        method: "POST",
        path: "/pay",
        expect_allow: true,
    },
    Route {
        caller: "catalog",
        callee: "payments",
        method: "GET",
        path: "/health",
        expect_allow: true,
    },
    Route {
        caller: "reports",
        callee: "payments",
        method: "POST",
        path: "/pay",
        expect_allow: false,
    },
    Route {
        caller: "catalog",
        callee: "payments",
        method: "POST",
        path: "/pay",
        expect_allow: false,
    },
];

/// How often each route is called.
const CALL_EVERY: Duration = Duration::from_millis(200);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What happened on one route.
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    /// Calls answered by the app.
    pub allowed: u64,
    /// Calls refused with 403.
    pub denied: u64,
    /// Calls that ended otherwise than the policies say (an allowed call not getting through, a
    /// denied one getting through, the app seeing the wrong caller) or not at all.
    pub failed: u64,
    /// Of `failed`: denied calls that got through.
    pub wrongly_allowed: u64,
    /// Of `failed`: calls with no 200 or 403 answer (an error status, a timeout, a reset).
    pub unanswered: u64,
    /// The policies that decided the latest audited call.
    pub decided_by: Option<String>,
    /// The latest status, e.g. `200 OK`.
    pub last: String,
    /// The latest failure.
    pub last_error: Option<String>,
}

/// A new SVID seen in a proxy.
#[derive(Debug, Clone)]
pub struct SvidChange {
    /// The service.
    pub service: &'static str,
    /// Since the traffic started.
    pub at: Duration,
    /// The new SVID's notAfter, unix seconds.
    pub expires: i64,
    /// The first SVID (not a rotation).
    pub first: bool,
}

/// Everything the display and the summary read.
#[derive(Debug)]
pub struct Stats {
    /// One per [`ROUTES`] entry.
    pub routes: Vec<RouteStats>,
    /// SVIDs seen, in order.
    pub svids: Vec<SvidChange>,
    /// When traffic started.
    pub started: Instant,
}

/// Shared [`Stats`].
#[derive(Debug, Clone)]
pub struct SharedStats(Arc<Mutex<Stats>>);

impl SharedStats {
    /// Empty stats, starting now.
    pub fn new() -> Self {
        SharedStats(Arc::new(Mutex::new(Stats {
            routes: vec![RouteStats::default(); ROUTES.len()],
            svids: Vec::new(),
            started: Instant::now(),
        })))
    }

    /// Locks the stats (a poisoned lock still holds counts worth showing).
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn route(&self, index: usize, update: impl FnOnce(&mut RouteStats)) {
        if let Some(route) = self.lock().routes.get_mut(index) {
            update(route);
        }
    }
}

/// Starts the app of `service` on a free port: it answers every request with its name and the
/// `x-forwarded-client-cert` its proxy passed on.
pub async fn start_app(
    service: &'static str,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind a demo app")?;
    let addr = listener.local_addr().context("demo app address")?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let answer = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(app_response(service, &req))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), answer)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn app_response(service: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let xfcc = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)");
    let body = format!(
        "service: {service}\nrequest: {} {}\nx-forwarded-client-cert: {xfcc}\n",
        req.method(),
        req.uri().path()
    );
    Response::new(Full::new(Bytes::from(body)))
}

/// The HTTP client the generator and the watcher share.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled plain HTTP/1.1 client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Calls `route` through the caller's outbound listener at `outbound` until `stop` fires; an
/// in-flight call is finished, never cut.
pub async fn generate(
    client: HttpClient,
    index: usize,
    route: Route,
    outbound: SocketAddr,
    caller_id: String,
    stats: SharedStats,
    stop: CancellationToken,
) {
    // Spread the routes over the interval so the load is even.
    let offset =
        CALL_EVERY / u32::try_from(ROUTES.len()).unwrap_or(1) * u32::try_from(index).unwrap_or(0);
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(offset) => {}
    }
    let mut tick = tokio::time::interval(CALL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let outcome = call(&client, &route, outbound, &caller_id).await;
        stats.route(index, |s| record(s, &route, outcome));
    }
}

/// How one call ended.
enum Outcome {
    Answered { caller_seen: bool },
    Forbidden(String),
    Other(String),
}

async fn call(
    client: &HttpClient,
    route: &Route,
    outbound: SocketAddr,
    caller_id: &str,
) -> Outcome {
    let method = Method::from_bytes(route.method.as_bytes()).unwrap_or(Method::GET);
    let body = if method == Method::POST {
        Bytes::from_static(b"{\"order\":\"o-1\",\"amount\":42}")
    } else {
        Bytes::new()
    };
    let request = match Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{}", route.path))
        .header("host", format!("{}.shop.svc", route.callee))
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(e) => return Outcome::Other(format!("bad request: {e}")),
    };
    let result = tokio::time::timeout(CALL_TIMEOUT, async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| error_chain(&e))?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await;
    match result {
        Err(_) => Outcome::Other(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Err(e)) => Outcome::Other(e),
        Ok(Ok((StatusCode::OK, body))) => Outcome::Answered {
            caller_seen: body.contains(&format!("service: {}\n", route.callee))
                && body.contains(&format!("URI={caller_id}")),
        },
        Ok(Ok((StatusCode::FORBIDDEN, body))) => Outcome::Forbidden(body.trim().to_owned()),
        Ok(Ok((status, body))) => Outcome::Other(format!("{status}: {}", body.trim())),
    }
}

fn record(s: &mut RouteStats, route: &Route, outcome: Outcome) {
    match outcome {
        Outcome::Answered { caller_seen } => {
            s.allowed += 1;
            s.last = "200 OK".to_owned();
            if !route.expect_allow {
                s.failed += 1;
                s.wrongly_allowed += 1;
                s.last_error = Some("a call the policies deny got through".to_owned());
            } else if !caller_seen {
                s.failed += 1;
                s.last_error = Some(
                    "the app did not see the caller's SPIFFE ID in its XFCC header".to_owned(),
                );
            }
        }
        Outcome::Forbidden(body) => {
            s.denied += 1;
            s.last = "403 Forbidden".to_owned();
            if route.expect_allow {
                s.failed += 1;
                s.last_error = Some(format!("denied: {body}"));
            }
            if s.decided_by.is_none() {
                s.decided_by = policy_from_403(&body);
            }
        }
        Outcome::Other(error) => {
            s.failed += 1;
            s.unanswered += 1;
            s.last = "error".to_owned();
            s.last_error = Some(error);
        }
    }
}

/// `denied by `a`, `b` (decision ...)` -> `a, b`; `denied: no policy permits` -> a label.
fn policy_from_403(body: &str) -> Option<String> {
    if body.contains("no policy permits") {
        return Some(crate::cmd::audit::summary::NO_POLICY_PERMITS.to_owned());
    }
    let rest = body.strip_prefix("denied by ")?;
    let ids: Vec<&str> = rest
        .split(" (decision")
        .next()?
        .split(", ")
        .map(|id| id.trim_matches('`'))
        .collect();
    Some(ids.join(", "))
}

/// Follows one proxy's audit file and records, per route, which policies decided its calls.
pub async fn tail_audit(
    path: PathBuf,
    ids: Vec<(String, String)>,
    stats: SharedStats,
    stop: CancellationToken,
) {
    let mut offset = 0u64;
    let mut pending = Vec::new();
    loop {
        let mut chunk = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&path)
            && file.seek(SeekFrom::Start(offset)).is_ok()
            && let Ok(n) = file.read_to_end(&mut chunk)
        {
            offset += u64::try_from(n).unwrap_or(0);
            pending.extend_from_slice(&chunk);
        }
        if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
            let rest = pending.split_off(end + 1);
            let complete = std::mem::replace(&mut pending, rest);
            for record in AuditReader::new(complete.as_slice()).flatten() {
                let r = record.record;
                if r.kind != AuditKind::Authz {
                    continue;
                }
                let path = r.context.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let matching = ROUTES
                    .iter()
                    .zip(&ids)
                    .position(|(route, (caller, callee))| {
                        *caller == r.principal
                            && *callee == r.resource
                            && route.method == r.action
                            && route.path == path
                    });
                if let Some(index) = matching {
                    let label = policy_labels(&r).join(", ");
                    stats.route(index, |s| s.decided_by = Some(label));
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Polls each proxy's `/metrics` for its SVID's expiry; a new expiry is a new SVID swapped in.
pub async fn watch_rotations(
    client: HttpClient,
    admins: Vec<(&'static str, SocketAddr)>,
    stats: SharedStats,
    stop: CancellationToken,
) {
    let mut last: Vec<i64> = vec![0; admins.len()];
    loop {
        for ((service, admin), last) in admins.iter().zip(last.iter_mut()) {
            let Some(expires) = svid_expiry(&client, *admin).await else {
                continue;
            };
            if expires > 0 && expires != *last {
                let mut s = stats.lock();
                let at = s.started.elapsed();
                s.svids.push(SvidChange {
                    service,
                    at,
                    expires,
                    first: *last == 0,
                });
                *last = expires;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn svid_expiry(client: &HttpClient, admin: SocketAddr) -> Option<i64> {
    let request = Request::get(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(2), client.request(request))
        .await
        .ok()?
        .ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.lines().find_map(|line| {
        let value = line.strip_prefix("meshward_proxy_svid_expiry_seconds ")?;
        // A float in unix seconds; whole seconds are all an expiry needs.
        value.trim().parse::<f64>().ok().map(|v| v.round() as i64)
    })
}

/// Whether a proxy's `/ready` says 200.
pub async fn ready(client: &HttpClient, admin: SocketAddr) -> bool {
    let Ok(request) = Request::get(format!("http://{admin}/ready")).body(Full::new(Bytes::new()))
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.request(request)).await,
        Ok(Ok(response)) if response.status() == StatusCode::OK
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_from_403_reads_the_proxy_body() {
        assert_eq!(
            policy_from_403("denied by `demo-x`, `demo-y` (decision 0123)").as_deref(),
            Some("demo-x, demo-y")
        );
        assert_eq!(
            policy_from_403("denied: no policy permits (decision 0123)").as_deref(),
            Some(crate::cmd::audit::summary::NO_POLICY_PERMITS)
        );
        assert_eq!(policy_from_403("something else"), None);
    }
}
