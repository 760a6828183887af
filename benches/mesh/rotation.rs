//! SVID rotation under full load (issue #8: "0 failed requests across >= 100 rotations at full
//! load"), every part its own OS process on loopback:
//!
//! ```text
//!   meshward ca run (--svid-ttl 30s --agent-svid-ttl 30s) <- meshward agent run (join token)
//!                                                              | Workload API (unix:path attestation)
//! load tool -> client-i proxy (outbound) -mTLS-> server-i proxy (inbound, Cedar, audit) -> backend
//!              (i = 0..pairs, each proxy run from its own hard link of meshward: its own identity)
//! ```
//!
//! Every SVID lives 30 s (the minimum), so the agent renews each at about half its life and every
//! proxy swaps a new SVID in every ~15 s; the agent's own SVID too, so the agent renews itself
//! under the new root during the run. The load tool drives a closed loop at full speed
//! (`concurrency` HTTP/1.1 keep-alive connections per pair, each sending its next request as soon
//! as the last answered) until the proxies have swapped in `target` new SVIDs. A rotation is a
//! *real swap in a proxy*: a `svid loaded` log line of that proxy whose serial differs from the one
//! it served before (bundle-only updates keep the serial and do not count); its log timestamp
//! places it on the load's time line. With `root` on, one CA root rotation (`meshward ca rotate
//! prepare`, then `activate` once every proxy took the new bundle, at least 5 s later) runs at ~30 % of the target,
//! and the run goes on until every proxy has swapped in an SVID signed under the new root.
//!
//! Every request is counted: a non-2xx answer, a transport error (connect, send, a connection
//! closed under a request) or no answer within 10 s is a failure. Latency is closed-loop (send to
//! last body byte); a request is "in a rotation window" when its pair's client or server proxy
//! swapped SVIDs within `window` of its start. The run exits non-zero if any request failed or the
//! target was not reached.
//!
//! Run: `cargo bench -p meshward --bench rotation_under_load` (or `scripts/bench-all`).
//! Settings (env): `MESHWARD_BIN` (default: the `meshward` cargo built for this bench),
//! `MESHWARD_ROTATION_PAIRS` (10), `MESHWARD_ROTATION_CONCURRENCY` (per pair, 4),
//! `MESHWARD_ROTATION_TARGET` (100), `MESHWARD_ROTATION_ROOT` (1; 0 skips the root rotation),
//! `MESHWARD_ROTATION_WINDOW_MS` (500), `MESHWARD_ROTATION_TIMEOUT_SECS` (600),
//! `MESHWARD_BENCH_KEEP` (keep the work directory and its logs).

// Shared with `proxy_vs_envoy`; this bench uses only part of each.
#[allow(dead_code)]
mod backend;
#[allow(dead_code)]
mod procs;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use meshward_tests::mesh::{http, ready};
use meshward_tests::metric_value;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::procs::Proc;

const TRUST_DOMAIN: &str = "rotation.bench";
const NODE: &str = "rotation-node";
/// The minimum workload SVID lifetime the CA accepts.
const SVID_TTL: &str = "30s";
const PATH: &str = "/rotation";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// A request with no full answer by then is a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the proxies' logs are read for swaps.
const POLL: Duration = Duration::from_millis(250);
/// Progress lines every so often.
const PROGRESS: Duration = Duration::from_secs(10);
/// The share of the target after which the root rotation starts.
const ROOT_AT: f64 = 0.3;
/// Shortest and longest wait between `ca rotate prepare` returning and `activate`.
const BUNDLE_MIN_WAIT: Duration = Duration::from_secs(5);
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// A swap this soon after `activate` started may still carry an SVID of the old root.
const ACTIVATE_SETTLE_US: i64 = 2_000_000;
/// Failures printed in full.
const SHOWN_FAILURES: usize = 10;

fn main() -> ExitCode {
    if std::env::var(backend::ROLE_ENV).as_deref() == Ok("backend") {
        return backend::main();
    }
    // `cargo test --all-targets` runs bench targets without `--bench`: this takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "rotation_under_load: skipped (run `cargo bench -p meshward --bench rotation_under_load` or `scripts/bench-all`)"
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rotation_under_load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    bin: PathBuf,
    pairs: usize,
    concurrency: usize,
    target: usize,
    root: bool,
    window: Duration,
    timeout: Duration,
    keep: bool,
}

/// The running mesh; processes are stopped (SIGTERM) when it drops, clients first.
struct Mesh {
    clients: Vec<Sidecar>,
    servers: Vec<Sidecar>,
    _backend: Proc,
    _agent: Proc,
    _ca: Proc,
    dir: PathBuf,
    bin: PathBuf,
}

struct Sidecar {
    name: String,
    admin: SocketAddr,
    /// Outbound listener (clients only): where the load goes in.
    listen: SocketAddr,
    log: PathBuf,
    proc: Proc,
}

/// What one load worker saw.
#[derive(Default)]
struct WorkerOut {
    /// (start since the load began, latency), microseconds; successful requests only.
    samples: Vec<(u64, u32)>,
    failures: Vec<Failure>,
}

struct Failure {
    pair: usize,
    at_us: u64,
    what: String,
}

/// One SVID swap in one proxy.
#[derive(Debug, Clone)]
struct Swap {
    /// Microseconds since the load began (negative: before it).
    at_us: i64,
}

/// What the monitor learned from the proxies' logs.
#[derive(Default)]
struct Swaps {
    /// Per proxy (clients then servers): the serials it loaded, in order, with when.
    loaded: Vec<Vec<(String, i64)>>,
}

impl Swaps {
    /// Swaps after the load began, per proxy.
    fn per_proxy(&self) -> Vec<Vec<Swap>> {
        self.loaded
            .iter()
            .map(|serials| {
                serials
                    .windows(2)
                    .filter_map(|w| match w {
                        [(before, _), (now, at)] if before != now && *at >= 0 => {
                            Some(Swap { at_us: *at })
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect()
    }

    fn count(&self) -> usize {
        self.per_proxy().iter().map(Vec::len).sum()
    }

    /// Whether every proxy loaded a new serial after `at_us`.
    fn all_swapped_after(&self, at_us: i64) -> bool {
        self.per_proxy()
            .iter()
            .all(|swaps| swaps.iter().any(|s| s.at_us > at_us))
    }

    /// Whether every proxy logged any `svid loaded` (a bundle update too) after `at_us`.
    fn all_loaded_after(&self, at_us: i64) -> bool {
        self.loaded
            .iter()
            .all(|serials| serials.iter().any(|(_, at)| *at > at_us))
    }
}

/// When the root rotation happened, in microseconds since the load began.
#[derive(Debug, Clone, Copy, Default)]
struct RootRotation {
    prepared_us: Option<i64>,
    activated_us: Option<i64>,
}

fn run() -> anyhow::Result<bool> {
    let settings = settings()?;
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("mw-rot-")
        .tempdir_in("/tmp")?;
    println!("{}", machine());
    println!(
        "meshward: {}\n{} pairs ({} proxies, {} SVIDs of {SVID_TTL}), {} connections per pair, target {} rotations{}",
        settings.bin.display(),
        settings.pairs,
        2 * settings.pairs,
        2 * settings.pairs,
        settings.concurrency,
        settings.target,
        if settings.root {
            ", one root rotation"
        } else {
            ""
        }
    );
    let mesh = Mesh::start(&settings, work.path())?;
    println!(
        "mesh ready in {:.1} s (CA, agent, backend, {} proxies)",
        started.elapsed().as_secs_f64(),
        2 * settings.pairs
    );
    let usage_before = mesh.cpu_secs();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(drive(&settings, &mesh))?;
    let cpu = mesh.cpu_secs() - usage_before;
    let counters = mesh.proxy_counters();
    let passed = report(&settings, &outcome, cpu, &counters);
    let agent_log = std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default();
    println!(
        "- agent: renewed its own SVID {} times ({SVID_TTL} agent SVIDs)",
        agent_log.matches("\"agent svid renewed\"").count()
    );
    if !passed {
        for s in mesh.clients.iter().chain(&mesh.servers).take(2) {
            eprintln!("{} log tail:\n{}", s.name, s.proc.log_tail());
        }
    }
    drop(mesh);
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    if settings.keep {
        let kept = work.keep();
        println!("work directory kept: {}", kept.display());
    }
    Ok(passed)
}

/// The load and the monitor, from the first request to the last.
struct Outcome {
    workers: Vec<WorkerOut>,
    swaps: Swaps,
    root: RootRotation,
    elapsed: Duration,
    reached: bool,
}

async fn drive(settings: &Settings, mesh: &Mesh) -> anyhow::Result<Outcome> {
    let epoch_us = unix_us(SystemTime::now());
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for (pair, client) in mesh.clients.iter().enumerate() {
        for _ in 0..settings.concurrency {
            workers.spawn(worker(
                pair,
                client.listen,
                t0,
                Arc::clone(&stop),
                Arc::clone(&done),
            ));
        }
    }

    let logs: Vec<PathBuf> = mesh
        .clients
        .iter()
        .chain(&mesh.servers)
        .map(|s| s.log.clone())
        .collect();
    let mut swaps;
    let mut root = RootRotation::default();
    let mut next_progress = PROGRESS;
    let mut root_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut reached = false;
    let mut prepare_done_us: Option<i64> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let now = t0.elapsed();
        swaps = read_swaps(&logs, epoch_us)?;
        let count = swaps.count();
        if now >= next_progress {
            next_progress += PROGRESS;
            println!(
                "  {:>4.0} s: {count} rotations, {} requests",
                now.as_secs_f64(),
                done.load(Ordering::Relaxed)
            );
        }
        if settings.root {
            if root.prepared_us.is_none() && count as f64 >= ROOT_AT * settings.target as f64 {
                root.prepared_us = Some(micros(now));
                root_task = Some(ca_cli_async(mesh, &["rotate", "prepare"]));
                println!("  {:>4.0} s: ca rotate prepare", now.as_secs_f64());
            }
            if root.prepared_us.is_some() && root.activated_us.is_none() {
                if prepare_done_us.is_none() && root_task.as_ref().is_some_and(|t| t.is_finished())
                {
                    if let Some(task) = root_task.take() {
                        task.await?.context("ca rotate prepare")?;
                    }
                    prepare_done_us = Some(micros(t0.elapsed()));
                }
                // Activate once the new root is surely trusted everywhere before it signs: at
                // least BUNDLE_MIN_WAIT after prepare returned (the agent syncs every second and
                // pushes the new bundle to every stream), and every proxy took an update since
                // prepare started (it logs `svid loaded` again); or after BUNDLE_TIMEOUT.
                if let Some(done_at) = prepare_done_us {
                    let waited = Duration::from_micros(
                        u64::try_from(micros(t0.elapsed()) - done_at).unwrap_or(0),
                    );
                    let everywhere = root
                        .prepared_us
                        .is_some_and(|at| swaps.all_loaded_after(at));
                    if (everywhere && waited >= BUNDLE_MIN_WAIT) || waited >= BUNDLE_TIMEOUT {
                        root.activated_us = Some(micros(t0.elapsed()));
                        root_task = Some(ca_cli_async(mesh, &["rotate", "activate"]));
                        println!(
                            "  {:>4.0} s: ca rotate activate (every proxy took a new bundle: {everywhere})",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
            }
        }
        let root_done = !settings.root
            || root
                .activated_us
                .is_some_and(|at| swaps.all_swapped_after(at + ACTIVATE_SETTLE_US));
        if count >= settings.target && root_done {
            reached = true;
            break;
        }
        if now >= settings.timeout {
            break;
        }
    }
    if let Some(task) = root_task.take() {
        task.await?.context("ca rotate")?;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let mut out = Vec::new();
    while let Some(joined) = workers.join_next().await {
        out.push(joined?);
    }
    // A last read: swaps logged while the workers finished are outside the load; harmless.
    let swaps_final = read_swaps(&logs, epoch_us)?;
    if swaps_final.count() >= swaps.count() {
        swaps = swaps_final;
    }
    Ok(Outcome {
        workers: out,
        swaps,
        root,
        elapsed,
        reached,
    })
}

/// One closed-loop connection of `pair` until `stop`.
async fn worker(
    pair: usize,
    addr: SocketAddr,
    t0: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut sender: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let at_us = micros(start - t0).max(0).unsigned_abs();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, one_request(&mut sender, addr)).await;
        done.fetch_add(1, Ordering::Relaxed);
        let failure = match result {
            Ok(Ok(())) => {
                let latency = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
                out.samples.push((at_us, latency));
                continue;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
        };
        // The connection may be broken: the next request opens a new one.
        sender = None;
        out.failures.push(Failure {
            pair,
            at_us,
            what: failure,
        });
    }
    out
}

/// One GET on the kept connection (opened first if there is none); `Ok` only for a 2xx answer
/// read to its end.
async fn one_request(
    sender: &mut Option<http1::SendRequest<Empty<Bytes>>>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let s = match sender {
        Some(s) => s,
        None => sender.insert(connect(addr).await?),
    };
    s.ready()
        .await
        .context("connection closed before the request")?;
    let request = Request::get(PATH)
        .header(header::HOST, "backend.rotation")
        .body(Empty::new())?;
    let response = s.send_request(request).await.context("send")?;
    let status = response.status();
    let body = response.into_body().collect().await.context("body")?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        bail!("status {status}: {}", text.trim());
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to `{addr}`"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

impl Mesh {
    fn start(settings: &Settings, dir: &Path) -> anyhow::Result<Self> {
        for sub in ["bin", "policies", "agent"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let ca_addr = free_addr()?;
        let ca_dir = dir.join("ca");
        let ca = Proc::spawn(
            "ca",
            meshward(&settings.bin)
                .args(["--log", "info", "--log-format", "json"])
                .args(["ca", "run", "--trust-domain", TRUST_DOMAIN])
                .args(["--listen", &ca_addr.to_string()])
                .arg("--data-dir")
                .arg(&ca_dir)
                .args(["--svid-ttl", SVID_TTL])
                // The agent's own SVID too, so that it renews itself every ~15 s under load,
                // across the root rotation as well (the renewal must take the new root: see
                // agent/src/node/tests.rs, which reproduces that case deterministically).
                .args(["--agent-svid-ttl", SVID_TTL]),
            dir,
        )?;
        wait_for(READY_TIMEOUT, "the ca to serve", || {
            Ok(std::fs::read_to_string(dir.join("ca.log"))?.contains("\"ca serving\""))
        })
        .with_context(|| format!("ca log:\n{}", ca.log_tail()))?;
        let ca_cli = |args: &[&str]| ca_cli(&settings.bin, &ca_dir, args);
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, ca_cli(&["bundle", "show"])?)?;
        write_policies(dir, settings.pairs)?;

        // One hard link of meshward per proxy: its `unix:path` selector, so its own identity.
        let link = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join("bin").join(name);
            if std::fs::hard_link(&settings.bin, &path).is_err() {
                std::fs::copy(&settings.bin, &path)
                    .with_context(|| format!("copy `{}`", settings.bin.display()))?;
            }
            Ok(path)
        };
        let mut names = Vec::new();
        for i in 0..settings.pairs {
            for role in ["client", "server"] {
                let name = format!("{role}-{i}");
                let bin = link(&name)?;
                ca_cli(&[
                    "entry",
                    "create",
                    "--spiffe-id",
                    &workload_id(&name),
                    "--node",
                    NODE,
                    "--selector",
                    &format!("unix:path:{}", bin.display()),
                    "--ttl",
                    SVID_TTL,
                ])?;
                names.push((name, bin));
            }
        }
        let token = ca_cli(&["token", "create", "--node", NODE])?;
        let socket = dir.join("agent.sock");
        let agent = Proc::spawn(
            "agent",
            meshward(&settings.bin)
                .env("MESHWARD_AGENT_JOIN_TOKEN", token.trim())
                .args(["--log", "info", "--log-format", "json"])
                .args(["agent", "run", "--ca", &ca_addr.to_string()])
                .arg("--trust-bundle")
                .arg(&bundle)
                .arg("--socket")
                .arg(&socket)
                .arg("--data-dir")
                .arg(dir.join("agent"))
                .args(["--sync-interval", "1s"]),
            dir,
        )?;
        wait_for(READY_TIMEOUT, "the agent's socket", || {
            Ok(std::os::unix::net::UnixStream::connect(&socket).is_ok())
        })
        .with_context(|| format!("agent log:\n{}", agent.log_tail()))?;

        let backend_addr = free_addr()?;
        let backend = Proc::spawn(
            "backend",
            Command::new(std::env::current_exe()?)
                .env(backend::ROLE_ENV, "backend")
                .env(backend::LISTEN_ENV, backend_addr.to_string()),
            dir,
        )?;

        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for i in 0..settings.pairs {
            let inbound = free_addr()?;
            let server_name = format!("server-{i}");
            let mut cmd = proxy_cmd(dir, &socket, &server_name)?;
            cmd.args(["--inbound", &format!("{inbound}={backend_addr}")]);
            servers.push(Sidecar::spawn(&server_name, cmd, inbound, dir)?);
            let outbound = free_addr()?;
            let client_name = format!("client-{i}");
            let mut cmd = proxy_cmd(dir, &socket, &client_name)?;
            cmd.args([
                "--outbound",
                &format!("{outbound}={inbound},{}", workload_id(&server_name)),
            ]);
            clients.push(Sidecar::spawn(&client_name, cmd, outbound, dir)?);
        }
        let mesh = Self {
            clients,
            servers,
            _backend: backend,
            _agent: agent,
            _ca: ca,
            dir: dir.to_owned(),
            bin: settings.bin.clone(),
        };
        for s in mesh.clients.iter().chain(&mesh.servers) {
            wait_for(READY_TIMEOUT, &format!("{} to be ready", s.name), || {
                s.proc.usage()?;
                Ok(ready(s.admin))
            })
            .with_context(|| format!("{} log:\n{}", s.name, s.proc.log_tail()))?;
        }
        // One request through every pair: the policies allow, the chain verifies.
        for (i, c) in mesh.clients.iter().enumerate() {
            let (status, body) = http(c.listen, "GET", PATH)
                .with_context(|| format!("the first request through pair {i}"))?;
            if status != 200 {
                bail!("pair {i}: the first request was answered {status}: {body}");
            }
        }
        Ok(mesh)
    }

    /// CPU seconds of every proxy so far.
    fn cpu_secs(&self) -> f64 {
        self.clients
            .iter()
            .chain(&self.servers)
            .filter_map(|s| s.proc.usage().ok())
            .map(|u| u.cpu_secs)
            .sum()
    }

    /// The proxies' own failure counters, summed by metric line.
    fn proxy_counters(&self) -> Vec<(String, f64)> {
        let mut sums: HashMap<String, f64> = HashMap::new();
        for s in self.clients.iter().chain(&self.servers) {
            let Ok((200, body)) = http(s.admin, "GET", "/metrics") else {
                continue;
            };
            for line in body.lines() {
                let Some((name, _)) = line.split_once(' ') else {
                    continue;
                };
                if (name.starts_with("meshward_proxy_tls_failures_total")
                    || name.starts_with("meshward_proxy_upstream_failures_total"))
                    && let Some(v) = metric_value(&body, name)
                {
                    *sums.entry(name.to_owned()).or_default() += v;
                }
            }
        }
        let mut out: Vec<(String, f64)> = sums.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Sidecar {
    fn spawn(name: &str, mut cmd: Command, listen: SocketAddr, dir: &Path) -> anyhow::Result<Self> {
        let admin = free_addr()?;
        cmd.args(["--admin", &admin.to_string()]);
        let proc = Proc::spawn(name, &mut cmd, dir)?;
        Ok(Self {
            name: name.to_owned(),
            admin,
            listen,
            log: dir.join(format!("{name}.log")),
            proc,
        })
    }
}

/// `meshward proxy run` from `name`'s hard link, one worker thread, on the agent's socket.
fn proxy_cmd(dir: &Path, socket: &Path, name: &str) -> anyhow::Result<Command> {
    let mut cmd = meshward(&dir.join("bin").join(name));
    cmd.args(["--log", "info", "--log-format", "json"])
        .args(["proxy", "run", "--node", NODE, "--worker-threads", "1"])
        .args(["--drain-grace", "1s"])
        .arg("--socket")
        .arg(socket)
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--audit")
        .arg(dir.join(format!("audit-{name}.jsonl")));
    Ok(cmd)
}

/// `meshward` with no `MESHWARD_*` variables from this process's environment.
fn meshward(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHWARD_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `meshward ca <args> --data-dir <dir>`; its stdout, or an error with its stderr.
fn ca_cli(bin: &Path, ca_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out: Output = meshward(bin)
        .arg("ca")
        .args(args)
        .arg("--data-dir")
        .arg(ca_dir)
        .output()
        .with_context(|| format!("run `meshward ca {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`meshward ca {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`ca_cli`] on the blocking pool, so the load tool's thread keeps sending meanwhile.
fn ca_cli_async(mesh: &Mesh, args: &[&str]) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (bin, ca_dir) = (mesh.bin.clone(), mesh.dir.join("ca"));
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ca_cli(&bin, &ca_dir, &args).map(|_| ())
    })
}

fn workload_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{name}")
}

/// The default baseline plus `client-i` may call `server-i`.
fn write_policies(dir: &Path, pairs: usize) -> anyhow::Result<()> {
    let d = dir.join("policies");
    let baseline = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default/baseline.cedar");
    std::fs::copy(&baseline, d.join("baseline.cedar"))
        .with_context(|| format!("copy `{}`", baseline.display()))?;
    let mut text = String::new();
    for i in 0..pairs {
        let _ = writeln!(
            text,
            "@id(\"pair-{i}\")\npermit (principal == Workload::\"{}\", action, resource == Workload::\"{}\");",
            workload_id(&format!("client-{i}")),
            workload_id(&format!("server-{i}"))
        );
    }
    std::fs::write(d.join("pairs.cedar"), text)?;
    Ok(())
}

/// Every `svid loaded` line of each log: (serial, microseconds since `epoch_us`).
fn read_swaps(logs: &[PathBuf], epoch_us: i64) -> anyhow::Result<Swaps> {
    let mut loaded = Vec::with_capacity(logs.len());
    for log in logs {
        let text =
            std::fs::read_to_string(log).with_context(|| format!("read `{}`", log.display()))?;
        let mut serials = Vec::new();
        for line in text.lines().filter(|l| l.contains("\"svid loaded\"")) {
            let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let serial = json
                .get("fields")
                .and_then(|f| f.get("serial"))
                .and_then(serde_json::Value::as_str);
            let at = json
                .get("timestamp")
                .and_then(serde_json::Value::as_str)
                .and_then(parse_rfc3339_us);
            if let (Some(serial), Some(at)) = (serial, at) {
                // The logs and this process share the clock: a day off is a misread timestamp.
                if (at - epoch_us).abs() > 86_400_000_000 {
                    bail!(
                        "`{}`: cannot place the log timestamp of: {line}",
                        log.display()
                    );
                }
                serials.push((serial.to_owned(), at - epoch_us));
            }
        }
        loaded.push(serials);
    }
    Ok(Swaps { loaded })
}

/// Prints the summary; `true` when no request failed and the target was reached.
fn report(settings: &Settings, o: &Outcome, proxy_cpu: f64, counters: &[(String, f64)]) -> bool {
    let per_proxy = o.swaps.per_proxy();
    let rotations: usize = per_proxy.iter().map(Vec::len).sum();
    let pairs = settings.pairs;
    // Swap times per pair (its client's and its server's).
    let mut pair_swaps: Vec<Vec<i64>> = vec![Vec::new(); pairs];
    for (p, swaps) in per_proxy.iter().enumerate() {
        if let Some(list) = pair_swaps.get_mut(p % pairs.max(1)) {
            list.extend(swaps.iter().map(|s| s.at_us));
        }
    }
    for list in &mut pair_swaps {
        list.sort_unstable();
    }
    let window = i64::try_from(settings.window.as_micros()).unwrap_or(i64::MAX);
    let in_window = |pair: usize, at_us: u64| {
        let at = i64::try_from(at_us).unwrap_or(i64::MAX);
        pair_swaps
            .get(pair)
            .is_some_and(|list| list.iter().any(|s| (s - at).abs() <= window))
    };
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    // Workers were spawned pair by pair, `concurrency` each.
    for (w, out) in o.workers.iter().enumerate() {
        let pair = w / settings.concurrency.max(1);
        for &(at, latency) in &out.samples {
            if in_window(pair, at) {
                inside.push(latency);
            } else {
                outside.push(latency);
            }
        }
        failures.extend(out.failures.iter());
    }
    let ok = inside.len() + outside.len();
    let total = ok + failures.len();
    let secs = o.elapsed.as_secs_f64();
    inside.sort_unstable();
    outside.sort_unstable();
    let mut all: Vec<u32> = inside.iter().chain(&outside).copied().collect();
    all.sort_unstable();
    let min_max = per_proxy
        .iter()
        .map(Vec::len)
        .fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));

    let mut s = String::new();
    let _ = writeln!(s, "\n## Rotation under load: summary");
    let _ = writeln!(
        s,
        "- mesh: {pairs} proxy pairs ({} SVIDs, TTL {SVID_TTL}), {} keep-alive connections per pair (closed loop, {} in flight)",
        2 * pairs,
        settings.concurrency,
        pairs * settings.concurrency
    );
    let _ = writeln!(
        s,
        "- rotations: {rotations} SVID swaps in the proxies in {secs:.0} s ({:.0}/min; per proxy {}..{}){}",
        rotations as f64 * 60.0 / secs.max(1e-9),
        if min_max.0 == usize::MAX {
            0
        } else {
            min_max.0
        },
        min_max.1,
        if o.reached {
            String::new()
        } else {
            format!(" -- target {} NOT reached", settings.target)
        }
    );
    match (o.root.prepared_us, o.root.activated_us) {
        (Some(p), Some(a)) => {
            let after = per_proxy
                .iter()
                .filter(|sw| sw.iter().any(|x| x.at_us > a + ACTIVATE_SETTLE_US))
                .count();
            let _ = writeln!(
                s,
                "- root rotation: prepare at {:.1} s, activate at {:.1} s; {after} of {} proxies then swapped in an SVID under the new root",
                p as f64 / 1e6,
                a as f64 / 1e6,
                per_proxy.len()
            );
        }
        (Some(p), None) => {
            let _ = writeln!(
                s,
                "- root rotation: prepare at {:.1} s, never activated",
                p as f64 / 1e6
            );
        }
        _ if settings.root => {
            let _ = writeln!(s, "- root rotation: not reached");
        }
        _ => {}
    }
    let _ = writeln!(
        s,
        "- requests: {total} total, {} failed, {:.0} req/s",
        failures.len(),
        ok as f64 / secs.max(1e-9)
    );
    let _ = writeln!(
        s,
        "- latency (closed loop) p50 / p99 / max: all {} / {} / {}",
        ms(pct(&all, 0.50)),
        ms(pct(&all, 0.99)),
        ms(pct(&all, 1.0))
    );
    let _ = writeln!(
        s,
        "- p99 in rotation windows (own pair swapped within ±{} ms; {:.1} % of requests): {} (p50 {}, max {}); outside: {} (p50 {}, max {}); ratio {:.2}",
        settings.window.as_millis(),
        100.0 * inside.len() as f64 / ok.max(1) as f64,
        ms(pct(&inside, 0.99)),
        ms(pct(&inside, 0.50)),
        ms(pct(&inside, 1.0)),
        ms(pct(&outside, 0.99)),
        ms(pct(&outside, 0.50)),
        ms(pct(&outside, 1.0)),
        pct(&inside, 0.99) as f64 / pct(&outside, 0.99).max(1) as f64
    );
    let _ = writeln!(
        s,
        "- proxies' CPU: {:.2} CPU-ms per 1k requests (all {} proxies)",
        proxy_cpu * 1e6 / ok.max(1) as f64,
        2 * pairs
    );
    let counted: Vec<String> = counters
        .iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    let _ = writeln!(
        s,
        "- proxies' failure counters: {}",
        if counted.is_empty() {
            "none".to_owned()
        } else {
            counted.join(", ")
        }
    );
    for f in failures.iter().take(SHOWN_FAILURES) {
        let _ = writeln!(
            s,
            "  failed: pair {} at {:.3} s{}: {}",
            f.pair,
            f.at_us as f64 / 1e6,
            if in_window(f.pair, f.at_us) {
                " (rotation window)"
            } else {
                ""
            },
            f.what
        );
    }
    let passed = failures.is_empty() && o.reached;
    let _ = writeln!(
        s,
        "- verdict: {}",
        if passed {
            format!("PASS: 0 failed requests across {rotations} rotations at full load")
        } else {
            format!(
                "FAIL: {} failed requests, {rotations} of {} rotations",
                failures.len(),
                settings.target
            )
        }
    );
    print!("{s}");
    passed
}

/// The `p` quantile of sorted microseconds.
fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0)
}

fn ms(us: u32) -> String {
    format!("{:.2} ms", f64::from(us) / 1000.0)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `2026-11-27T12:34:55.123456Z` (UTC, as the JSON logs write it) to unix microseconds.
fn parse_rfc3339_us(s: &str) -> Option<i64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let frac_us = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        digits.parse::<i64>().ok()?
    };
    // Days from 1970-01-01 (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3_600 + min * 60 + sec) * 1_000_000) + frac_us)
}

/// Polls `done` every 50 ms until it holds or `timeout` passes.
fn wait_for(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("waiting for {what}")),
        None => bail!("no {what} within {timeout:?}"),
    }
}

fn settings() -> anyhow::Result<Settings> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let num = |name: &str, default: u64| -> anyhow::Result<u64> {
        env(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("`{name}` is not a number: `{v}`"))
        })
    };
    let bin = env("MESHWARD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_meshward")),
        PathBuf::from,
    );
    if !bin.is_file() {
        bail!(
            "no meshward binary at `{}`: run `cargo build --release --bin meshward` or set MESHWARD_BIN",
            bin.display()
        );
    }
    let pairs = usize::try_from(num("MESHWARD_ROTATION_PAIRS", 10)?)?;
    if pairs == 0 {
        bail!("`MESHWARD_ROTATION_PAIRS` must be at least 1");
    }
    Ok(Settings {
        bin,
        pairs,
        concurrency: usize::try_from(num("MESHWARD_ROTATION_CONCURRENCY", 4)?)?.max(1),
        target: usize::try_from(num("MESHWARD_ROTATION_TARGET", 100)?)?,
        root: num("MESHWARD_ROTATION_ROOT", 1)? != 0,
        window: Duration::from_millis(num("MESHWARD_ROTATION_WINDOW_MS", 500)?),
        timeout: Duration::from_secs(num("MESHWARD_ROTATION_TIMEOUT_SECS", 600)?),
        keep: env("MESHWARD_BENCH_KEEP").is_some(),
    })
}

/// A port for a child process to bind: below the ephemeral range, so that no outgoing connection
/// takes it before the child binds it (it happened with `bind(:0)`).
fn free_addr() -> anyhow::Result<SocketAddr> {
    let port = meshward_ops::ports::free_port().context("find a free port on 127.0.0.1")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// nproc, CPU model and load average, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "machine: {cpus} CPUs, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
