//! The load tool both topologies get: hyper 1 client connections, HTTP/1.1 keep-alive or HTTP/2
//! (prior knowledge, plain text, to the client sidecar).
//!
//! - [`closed_loop`]: `concurrency` workers, each sending its next request as soon as the last
//!   answered, for a fixed time after a warm-up: the maximum throughput.
//! - [`fixed_rate`]: an open loop at a fixed rate. A pacer thread emits each request's *intended*
//!   send time (`start + i / rate`) and latency is measured from that time, not from when the
//!   request actually went out, so a stalled proxy is charged for every request it delayed
//!   (no coordinated omission). HTTP/1.1 requests take a free pooled connection (waiting for one
//!   counts as latency); HTTP/2 requests round-robin over a few multiplexed connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The request path; the Cedar policy and the RBAC filter see it.
const PATH: &str = "/api/items";
/// The authority the client sends (the sidecars forward it; Envoy routes `*`).
const AUTHORITY: &str = "backend.bench";

/// The protocol the load tool speaks (and, in this bench, the sidecars speak to each other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 keep-alive, one request at a time per connection.
    H1,
    /// HTTP/2 with prior knowledge, many streams per connection.
    H2,
}

impl Proto {
    /// The label in the report.
    pub fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

/// Where to send load and how.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The entry point (client sidecar, or the backend alone).
    pub addr: SocketAddr,
    /// The protocol.
    pub proto: Proto,
    /// HTTP/2 connections (HTTP/1.1 opens one per concurrent request).
    pub h2_connections: usize,
}

/// A closed-loop result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    /// Successful (200) responses per second over the measured window.
    pub rps: f64,
    /// Non-200 responses and transport errors in the window.
    pub errors: u64,
}

/// A fixed-rate result; latencies in microseconds, from the intended send time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Successful responses measured.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// HTTP/1.1 connections the proxy had closed while idle (its header read timeout), replaced
    /// before use as any client pool does; the reconnect counts in that request's latency.
    pub reconnects: u64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// 99.9th percentile latency.
    pub p999_us: f64,
    /// Worst latency.
    pub max_us: f64,
    /// 99th percentile of the load tool's own lateness (dispatch minus intended time).
    pub late_p99_us: f64,
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// Another handle on the same connection: HTTP/2 only (HTTP/1.1 has one request at a time).
    fn share(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// Whether the connection has ended (the server closed it).
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Sends one request and reads the whole answer; `Ok(true)` for a 200.
async fn send(sender: &mut Sender, uri: &Uri) -> anyhow::Result<bool> {
    let response = match sender {
        Sender::H1(s) => {
            s.ready().await?;
            let req = Request::get(uri.clone())
                .header(header::HOST, AUTHORITY)
                .body(Empty::new())?;
            s.send_request(req).await?
        }
        Sender::H2(s) => {
            s.ready().await?;
            let req = Request::get(uri.clone()).body(Empty::new())?;
            s.send_request(req).await?
        }
    };
    let ok = response.status() == StatusCode::OK;
    response.into_body().collect().await?;
    Ok(ok)
}

/// Opens one connection.
async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connect to `{}`", target.addr))?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match target.proto {
        Proto::H1 => {
            let (send, conn) = http1::handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H1(send)
        }
        Proto::H2 => {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(send)
        }
    })
}

fn uri(target: &Target) -> anyhow::Result<Uri> {
    Ok(match target.proto {
        // HTTP/1.1 origin form with a Host header; HTTP/2 needs :scheme and :authority.
        Proto::H1 => Uri::from_static(PATH),
        Proto::H2 => format!("http://{AUTHORITY}{PATH}").parse()?,
    })
}

/// Opens the connections a run needs: one per worker for HTTP/1.1, `h2_connections` for HTTP/2.
async fn senders(target: &Target, workers: usize) -> anyhow::Result<Vec<Sender>> {
    let n = match target.proto {
        Proto::H1 => workers,
        Proto::H2 => target.h2_connections.clamp(1, workers.max(1)),
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect(target).await?);
    }
    Ok(out)
}

/// Sends until one request succeeds (the pair is up and the policy allows), or `timeout`.
pub async fn wait_ready(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let uri = uri(target)?;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match connect(target).await {
            Ok(mut s) => match send(&mut s, &uri).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "a non-200 answer".to_owned(),
                Err(e) => last = format!("{e:#}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "`{}` did not answer 200 within {timeout:?}: {last}",
        target.addr
    )
}

/// Maximum throughput with `concurrency` requests in flight.
pub async fn closed_loop(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let uri = uri(target)?;
    let mut pool = senders(target, concurrency).await?;
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for i in 0..concurrency {
        let sender = match target.proto {
            Proto::H1 => pool.pop(),
            Proto::H2 => pool.get(i % pool.len().max(1)).and_then(Sender::share),
        };
        let Some(mut sender) = sender else {
            anyhow::bail!("no connection for worker {i}");
        };
        let (ok, errors, stop, uri, target) = (
            Arc::clone(&ok),
            Arc::clone(&errors),
            Arc::clone(&stop),
            uri.clone(),
            *target,
        );
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match send(&mut sender, &uri).await {
                    Ok(true) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // The connection is gone: open another (a proxy that drops
                        // connections pays for the reconnects).
                        match connect(&target).await {
                            Ok(s) => sender = s,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    let (ok0, err0) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let (ok1, err1) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(pool);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    Ok(Throughput {
        rps: (ok1 - ok0) as f64 / secs,
        errors: err1 - err0,
    })
}

/// `rate` requests per second for `warmup + duration`; only requests intended after the warm-up
/// are measured.
pub async fn fixed_rate(
    target: &Target,
    connections: usize,
    rate: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Latency> {
    let uri = uri(target)?;
    let pool = Arc::new(Pool::new(target, senders(target, connections).await?));
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(20);
    let measured_from = start + warmup;
    let interval_ns = 1_000_000_000u64 / u64::from(rate.max(1));
    let total = (warmup + duration).as_nanos() as u64 / interval_ns;
    // std::thread::sleep has microsecond precision (tokio's timer has 1 ms), so the pacer is
    // an OS thread; its lateness is reported so it can be told apart from the proxies'.
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let intended = start + Duration::from_nanos(i * interval_ns);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if tx.send(intended).is_err() {
                return;
            }
        }
    });
    let mut inflight = JoinSet::new();
    while let Some(intended) = rx.recv().await {
        let (pool, samples, errors, uri) = (
            Arc::clone(&pool),
            Arc::clone(&samples),
            Arc::clone(&errors),
            uri.clone(),
        );
        inflight.spawn(async move {
            let dispatched = Instant::now();
            let ok = pool.send(&uri).await;
            let done = Instant::now();
            if intended < measured_from {
                return;
            }
            if ok {
                if let Ok(mut s) = samples.lock() {
                    s.latency_ns.push((done - intended).as_nanos() as u64);
                    s.late_ns.push((dispatched - intended).as_nanos() as u64);
                }
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Reap finished tasks so the set stays small.
        while inflight.try_join_next().is_some() {}
    }
    let _ = pacer.join();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    inflight.abort_all();
    let mut s = samples
        .lock()
        .map_err(|_| anyhow::anyhow!("sample lock poisoned"))?;
    let Samples {
        latency_ns,
        late_ns,
    } = &mut *s;
    latency_ns.sort_unstable();
    late_ns.sort_unstable();
    Ok(Latency {
        ok: latency_ns.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        reconnects: pool.reconnects.load(Ordering::Relaxed),
        p50_us: percentile_us(latency_ns, 0.50),
        p99_us: percentile_us(latency_ns, 0.99),
        p999_us: percentile_us(latency_ns, 0.999),
        max_us: percentile_us(latency_ns, 1.0),
        late_p99_us: percentile_us(late_ns, 0.99),
    })
}

#[derive(Default)]
struct Samples {
    latency_ns: Vec<u64>,
    late_ns: Vec<u64>,
}

/// The connections of a fixed-rate run.
struct Pool {
    target: Target,
    proto: Proto,
    /// HTTP/1.1: idle connections (last in, first out: the warm ones get reused).
    idle: Mutex<Vec<Sender>>,
    permits: Semaphore,
    /// HTTP/2: every connection, used in turn.
    all: Vec<Sender>,
    next: AtomicUsize,
    reconnects: AtomicU64,
}

impl Pool {
    fn new(target: &Target, senders: Vec<Sender>) -> Self {
        let proto = target.proto;
        let permits = Semaphore::new(senders.len());
        let (idle, all) = match proto {
            Proto::H1 => (senders, Vec::new()),
            Proto::H2 => (Vec::new(), senders),
        };
        Self {
            target: *target,
            proto,
            idle: Mutex::new(idle),
            permits,
            all,
            next: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    async fn send(&self, uri: &Uri) -> bool {
        match self.proto {
            Proto::H2 => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.all.len().max(1);
                let Some(mut sender) = self.all.get(i).and_then(Sender::share) else {
                    return false;
                };
                matches!(send(&mut sender, uri).await, Ok(true))
            }
            Proto::H1 => {
                let Ok(_permit) = self.permits.acquire().await else {
                    return false;
                };
                let Some(mut sender) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) else {
                    return false;
                };
                if sender.is_closed() {
                    match connect(&self.target).await {
                        Ok(fresh) => {
                            sender = fresh;
                            self.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            if let Ok(mut idle) = self.idle.lock() {
                                idle.push(sender);
                            }
                            return false;
                        }
                    }
                }
                let ok = matches!(send(&mut sender, uri).await, Ok(true));
                if let Ok(mut idle) = self.idle.lock() {
                    idle.push(sender);
                }
                ok
            }
        }
    }
}

/// The `p` quantile of sorted nanoseconds, in microseconds (0 for no samples).
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns
        .get(rank - 1)
        .map_or(0.0, |&ns| ns as f64 / 1000.0)
}
