//! Proxy pair vs Envoy pair (DESIGN.md §6, issues #5 and #8), in one run on one machine.
//!
//! Three topologies on loopback, every part its own OS process:
//!
//! ```text
//! load tool -> meshward proxy (outbound) -mTLS-> meshward proxy (inbound, Cedar + audit) -> backend
//! load tool -> Envoy (plain listener)    -mTLS-> Envoy (RBAC filter, XFCC)               -> backend
//! load tool -> TCP relay                 -TCP--> TCP relay                               -> backend
//! ```
//!
//! The relay pair (`relay.rs`: bytes copied, nothing else) is the floor: what the crossings and
//! wake-ups of any two-sidecar pair cost here, so what a sidecar adds is its figure minus the
//! relay pair's.
//!
//! Same test PKI (made at run time; both pairs read the same svid.pem / svid.key / bundle.pem),
//! same backend process, same load tool (`load.rs`), one worker each (`--worker-threads 1`,
//! `--concurrency 1`). For HTTP/1.1 and HTTP/2 between the sidecars (the load tool speaks the
//! same protocol to the client sidecar; both sidecars speak HTTP/1.1 to the backend) it measures
//! closed-loop throughput, fixed-rate latency from the intended send time, and each proxy
//! process's VmRSS/VmHWM and CPU time. Rounds alternate which implementation goes first.
//!
//! CPU pinning (on by default with 2+ CPUs; `MESHWARD_BENCH_PIN=off` turns it off), the same for
//! both pairs: the load tool and the backend run on CPU 0, both sidecars on CPU 1 (`taskset`), so
//! the sidecars of a pair share one core and never migrate, and the load tool's pacer is not
//! preempted by the sidecars it measures. Throughput then shows what one core of sidecars does.
//!
//! Run it with `scripts/bench-proxy` (builds the sidecar binary `meshward-proxy` with the `dist`
//! profile, the shipped build; installs Envoy; runs this).
//! Settings (env): `MESHWARD_PROXY_BIN` (default `target/dist/meshward-proxy`, run as
//! `meshward-proxy run`; a binary of another name runs as `<bin> proxy run`, e.g. the full
//! `meshward`, to compare), `MESHWARD_ENVOY`, `MESHWARD_BENCH_SECS` (closed loop, 8),
//! `MESHWARD_BENCH_FIXED_SECS` (8), `MESHWARD_BENCH_RATE` (2000), `MESHWARD_BENCH_CONCURRENCY`
//! (32), `MESHWARD_BENCH_ROUNDS` (2), `MESHWARD_BENCH_PROTOS` (`h1,h2`), `MESHWARD_BENCH_ONLY`
//! (a list of `meshward`, `envoy`, `relay`; all three by default), `MESHWARD_BENCH_PIN`
//! (`on`/`off`), `MESHWARD_BENCH_KEEP` (keep the work directory), `MESHWARD_BENCH_STALL_MS` (0:
//! with a length, each pair gets a second fixed-rate phase in which the server sidecar is stopped
//! for that long every 2 s, `stall.rs`).

mod backend;
mod envoy;
mod load;
mod procs;
mod relay;
mod stall;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshward_identity::test_util::TestPki;

use crate::load::{Latency, Proto, Target, Throughput};
use crate::procs::{Proc, Usage};

const TRUST_DOMAIN: &str = "bench.example";
const CLIENT_ID: &str = "spiffe://bench.example/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://bench.example/ns/bench/sa/server";
/// HTTP/2 connections from the load tool to the client sidecar.
const H2_CONNECTIONS: usize = 4;
/// HTTP/1.1 connections in the fixed-rate pool (idle ones cost nothing).
const FIXED_RATE_H1_CONNECTIONS: usize = 64;
const WARMUP: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// With pinning: the CPU of the load tool (this process) and the backend.
const LOAD_CPU: &str = "0";
/// With pinning: the CPU both sidecars of a pair share.
const SIDECAR_CPU: &str = "1";

fn main() -> ExitCode {
    match std::env::var(backend::ROLE_ENV).as_deref() {
        Ok("backend") => return backend::main(),
        Ok("relay") => return relay::main(),
        _ => {}
    }
    // `cargo test --all-targets` runs bench targets without `--bench`: this takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "proxy_vs_envoy: skipped (run `scripts/bench-proxy` or `cargo bench -p meshward-tests --bench proxy_vs_envoy`)"
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy_vs_envoy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Meshward,
    Envoy,
    /// Two TCP relays (`relay.rs`) in the sidecars' places: the lower bound for any pair here.
    Relay,
}

impl Impl {
    fn label(self) -> &'static str {
        match self {
            Impl::Meshward => "meshward",
            Impl::Envoy => "Envoy 1.40",
            Impl::Relay => "relay (TCP, no TLS)",
        }
    }
}

struct Settings {
    meshward: PathBuf,
    envoy: PathBuf,
    closed: Duration,
    fixed: Duration,
    rate: u32,
    concurrency: usize,
    rounds: usize,
    protos: Vec<Proto>,
    impls: Vec<Impl>,
    pin: bool,
    keep: bool,
    /// With a length, a second fixed-rate phase with the server sidecar stalled (`stall.rs`).
    stall: Option<Duration>,
}

/// One pair's figures for one protocol in one round.
#[derive(Debug, Clone, Copy)]
struct Run {
    imp: Impl,
    proto: Proto,
    throughput: Throughput,
    latency: Latency,
    /// Client sidecar, server sidecar: after both load phases.
    usage: [Usage; 2],
    /// CPU seconds both sidecars used during the closed-loop window, per 1,000 requests.
    cpu_ms_per_1k: f64,
    /// The fixed-rate phase with stalls, when asked for.
    stalled: Option<(Latency, stall::Observed)>,
}

fn run() -> anyhow::Result<()> {
    let settings = settings()?;
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("meshward-bench-")
        .tempdir()?;
    let dir = work.path();
    // Before pinning, which would make it count one CPU.
    let machine = machine();
    if settings.pin {
        // Before any thread exists, so the runtime and the pacer thread inherit it.
        pin_self(LOAD_CPU)?;
    }
    write_pki(dir)?;
    write_policies(dir)?;
    println!("{machine}");
    println!("meshward: {}", settings.meshward.display());
    println!("envoy:    {}", settings.envoy.display());
    println!(
        "pinning:  {}",
        if settings.pin {
            format!("load tool + backend on CPU {LOAD_CPU}, both sidecars on CPU {SIDECAR_CPU}")
        } else {
            "off".to_owned()
        }
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let backend_addr = free_addr()?;
    let backend = Proc::spawn(
        "backend",
        command(&std::env::current_exe()?, settings.pin.then_some(LOAD_CPU))
            .env(backend::ROLE_ENV, "backend")
            .env(backend::LISTEN_ENV, backend_addr.to_string()),
        dir,
    )?;
    let alone = Target {
        addr: backend_addr,
        proto: Proto::H1,
        h2_connections: H2_CONNECTIONS,
    };
    let (alone_tp, alone_lat) = runtime.block_on(async {
        load::wait_ready(&alone, READY_TIMEOUT).await?;
        let tp = load::closed_loop(&alone, settings.concurrency, WARMUP, settings.closed).await?;
        let lat = load::fixed_rate(
            &alone,
            FIXED_RATE_H1_CONNECTIONS,
            settings.rate,
            WARMUP,
            settings.fixed,
        )
        .await?;
        anyhow::Ok((tp, lat))
    })?;
    let backend_usage = backend.usage()?;
    println!(
        "backend alone (HTTP/1.1): {:.0} req/s, fixed rate p50 {:.0} us p99 {:.0} us, load tool lateness p99 {:.0} us, RSS {} KiB",
        alone_tp.rps,
        alone_lat.p50_us,
        alone_lat.p99_us,
        alone_lat.late_p99_us,
        backend_usage.rss_kib
    );

    let mut runs = Vec::new();
    for round in 0..settings.rounds {
        for &proto in &settings.protos {
            let mut order = settings.impls.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for imp in order {
                let one = runtime
                    .block_on(run_pair(&settings, dir, backend_addr, imp, proto))
                    .with_context(|| format!("{} over {}", imp.label(), proto.label()))?;
                println!(
                    "round {} {:<10} {:<8}: {:>7.0} req/s ({} errors), fixed {} req/s ({} ok) p50 {:>5.0} us p99 {:>6.0} us p99.9 {:>6.0} us max {:>6.0} us (lateness p99 {:.0} us, {} errors, {} reconnects), RSS client {} / server {} KiB (peak {} / {}; anon {} / {}; file {} / {}), {:.2} CPU-ms per 1k req",
                    round + 1,
                    imp.label(),
                    proto.label(),
                    one.throughput.rps,
                    one.throughput.errors,
                    settings.rate,
                    one.latency.ok,
                    one.latency.p50_us,
                    one.latency.p99_us,
                    one.latency.p999_us,
                    one.latency.max_us,
                    one.latency.late_p99_us,
                    one.latency.errors,
                    one.latency.reconnects,
                    one.usage[0].rss_kib,
                    one.usage[1].rss_kib,
                    one.usage[0].hwm_kib,
                    one.usage[1].hwm_kib,
                    one.usage[0].anon_kib,
                    one.usage[1].anon_kib,
                    one.usage[0].file_kib,
                    one.usage[1].file_kib,
                    one.cpu_ms_per_1k,
                );
                if let Some((lat, seen)) = one.stalled {
                    println!(
                        "round {} {:<10} {:<8}: {} stalls of the server sidecar: p50 {:.0} us p99 {:.0} us p99.9 {:.0} us max {:.0} us ({} errors), connections to it {} -> at most {}",
                        round + 1,
                        imp.label(),
                        proto.label(),
                        seen.stalls,
                        lat.p50_us,
                        lat.p99_us,
                        lat.p999_us,
                        lat.max_us,
                        lat.errors,
                        seen.conns_before,
                        seen.conns_max,
                    );
                }
                runs.push(one);
            }
        }
    }
    drop(backend);
    println!();
    println!("{}", report(&settings, &runs));
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    if settings.keep {
        let kept = work.keep();
        println!("work directory kept: {}", kept.display());
    }
    Ok(())
}

/// Starts one pair, loads it, reads its processes, stops it.
async fn run_pair(
    settings: &Settings,
    dir: &Path,
    backend: SocketAddr,
    imp: Impl,
    proto: Proto,
) -> anyhow::Result<Run> {
    let (client_addr, server_addr) = (free_addr()?, free_addr()?);
    let cpu = settings.pin.then_some(SIDECAR_CPU);
    let tag = format!(
        "{}-{}",
        imp.label().split(' ').next().unwrap_or("x"),
        proto.label().replace('/', "")
    );
    let (client, server) = match imp {
        Impl::Meshward => {
            let audit = dir.join(format!("audit-{tag}-server.log"));
            // Remove an earlier round's log: each run starts a fresh hash chain.
            let _ = std::fs::remove_file(&audit);
            let _ = std::fs::remove_file(dir.join(format!("audit-{tag}-client.log")));
            let server = Proc::spawn(
                &format!("{tag}-server"),
                meshward(&settings.meshward, cpu, dir, "server", &audit)
                    .arg("--inbound")
                    .arg(format!("{server_addr}={backend}")),
                dir,
            )?;
            let mut client_cmd = meshward(
                &settings.meshward,
                cpu,
                dir,
                "client",
                &dir.join(format!("audit-{tag}-client.log")),
            );
            client_cmd
                .arg("--outbound")
                .arg(format!("{client_addr}={server_addr},{SERVER_ID}"));
            if proto == Proto::H1 {
                client_cmd.args(["--upstream-http2", "false"]);
            }
            let client = Proc::spawn(&format!("{tag}-client"), &mut client_cmd, dir)?;
            (client, server)
        }
        Impl::Envoy => {
            let server_cfg = dir.join(format!("{tag}-server.json"));
            let client_cfg = dir.join(format!("{tag}-client.json"));
            std::fs::write(
                &server_cfg,
                envoy::server(server_addr, backend, &dir.join("server"), CLIENT_ID).to_string(),
            )?;
            std::fs::write(
                &client_cfg,
                envoy::client(
                    client_addr,
                    server_addr,
                    &dir.join("client"),
                    SERVER_ID,
                    proto,
                )
                .to_string(),
            )?;
            let server = Proc::spawn(
                &format!("{tag}-server"),
                &mut envoy_cmd(&settings.envoy, cpu, &server_cfg),
                dir,
            )?;
            let client = Proc::spawn(
                &format!("{tag}-client"),
                &mut envoy_cmd(&settings.envoy, cpu, &client_cfg),
                dir,
            )?;
            (client, server)
        }
        Impl::Relay => {
            let relay = |listen: SocketAddr, upstream: SocketAddr| -> anyhow::Result<Command> {
                let mut cmd = command(&std::env::current_exe()?, cpu);
                cmd.env(backend::ROLE_ENV, "relay")
                    .env(backend::LISTEN_ENV, listen.to_string())
                    .env(relay::UPSTREAM_ENV, upstream.to_string());
                Ok(cmd)
            };
            let server = Proc::spawn(
                &format!("{tag}-server"),
                &mut relay(server_addr, backend)?,
                dir,
            )?;
            let client = Proc::spawn(
                &format!("{tag}-client"),
                &mut relay(client_addr, server_addr)?,
                dir,
            )?;
            (client, server)
        }
    };
    let target = Target {
        addr: client_addr,
        proto,
        h2_connections: H2_CONNECTIONS,
    };
    let ready = load::wait_ready(&target, READY_TIMEOUT).await;
    if let Err(e) = ready {
        bail!(
            "{e:#}\nclient log:\n{}\nserver log:\n{}",
            client.log_tail(),
            server.log_tail()
        );
    }
    let cpu_before = client.usage()?.cpu_secs + server.usage()?.cpu_secs;
    // The closed loop's warm-up is inside `closed_loop`; count CPU over warm-up + window and
    // scale by the window's share (the rate is steady by then).
    let t0 = Instant::now();
    let throughput =
        load::closed_loop(&target, settings.concurrency, WARMUP, settings.closed).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = client.usage()?.cpu_secs + server.usage()?.cpu_secs - cpu_before;
    let requests = throughput.rps * wall;
    let cpu_ms_per_1k = if requests > 0.0 {
        cpu * 1e6 / requests
    } else {
        0.0
    };
    let connections = match proto {
        Proto::H1 => FIXED_RATE_H1_CONNECTIONS,
        Proto::H2 => H2_CONNECTIONS,
    };
    let latency =
        load::fixed_rate(&target, connections, settings.rate, WARMUP, settings.fixed).await?;
    let stalled = match settings.stall {
        Some(length) => {
            let stalls = stall::start(
                server.pid(),
                server_addr.port(),
                WARMUP + Duration::from_millis(500),
                length,
            )?;
            let lat =
                load::fixed_rate(&target, connections, settings.rate, WARMUP, settings.fixed).await;
            let seen = stalls.finish();
            Some((lat?, seen))
        }
        None => None,
    };
    let usage = [client.usage()?, server.usage()?];
    if imp == Impl::Meshward {
        // Audit was on: one record per decided request.
        let audit = std::fs::read_to_string(dir.join(format!("audit-{tag}-server.log")))?;
        let records = audit.lines().count();
        if records == 0 {
            bail!("the server sidecar wrote no audit records");
        }
    }
    drop(client);
    drop(server);
    Ok(Run {
        imp,
        proto,
        throughput,
        latency,
        usage,
        cpu_ms_per_1k,
        stalled,
    })
}

fn meshward(bin: &Path, cpu: Option<&str>, dir: &Path, who: &str, audit: &Path) -> Command {
    let mut cmd = command(bin, cpu);
    // `meshward-proxy run`, or the full binary's `meshward proxy run`: the same flags.
    let sidecar_only = bin
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("meshward-proxy"));
    if !sidecar_only {
        cmd.arg("proxy");
    }
    cmd.env("MESHWARD_LOG", "warn")
        .args([
            "run",
            "--worker-threads",
            "1",
            "--drain-grace",
            "1s",
            "--node",
            "bench",
        ])
        .arg("--svid-dir")
        .arg(dir.join(who))
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--audit")
        .arg(audit);
    cmd
}

fn envoy_cmd(bin: &Path, cpu: Option<&str>, config: &Path) -> Command {
    let mut cmd = command(bin, cpu);
    cmd.arg("-c").arg(config).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]);
    cmd
}

/// `bin`, run on CPU `cpu` (through `taskset`, which execs it: the pid stays the program's).
fn command(bin: &Path, cpu: Option<&str>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpu]).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// Pins every thread of this process (the load tool) to `cpu`.
fn pin_self(cpu: &str) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpu, &pid])
        .output()
        .context("run `taskset` (util-linux; or set MESHWARD_BENCH_PIN=off)")?;
    if !out.status.success() {
        bail!(
            "`taskset -a -p -c {cpu} {pid}` failed: {} (set MESHWARD_BENCH_PIN=off)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The table for docs/benchmarks.md: medians over the rounds, and the ratios against the bars.
fn report(settings: &Settings, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| between sidecars | pair | throughput (req/s) | fixed {} req/s p50 | p99 | p99.9 | RSS client + server (KiB) | peak RSS (KiB) | anon RSS (KiB) | file RSS (KiB) | CPU-ms / 1k req |",
        settings.rate
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut ratios = String::new();
    for &proto in &settings.protos {
        let mut per_impl = Vec::new();
        for &imp in &settings.impls {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.imp == imp && r.proto == proto)
                .collect();
            let m = |f: &dyn Fn(&Run) -> f64| median(mine.iter().map(|r| f(r)).collect());
            let row = (
                m(&|r| r.throughput.rps),
                m(&|r| r.latency.p50_us),
                m(&|r| r.latency.p99_us),
                m(&|r| r.latency.p999_us),
                m(&|r| (r.usage[0].rss_kib + r.usage[1].rss_kib) as f64),
                m(&|r| (r.usage[0].hwm_kib + r.usage[1].hwm_kib) as f64),
                m(&|r| r.cpu_ms_per_1k),
                m(&|r| (r.usage[0].anon_kib + r.usage[1].anon_kib) as f64),
                m(&|r| (r.usage[0].file_kib + r.usage[1].file_kib) as f64),
            );
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                proto.label(),
                imp.label(),
                row.0,
                row.1,
                row.2,
                row.3,
                row.4,
                row.5,
                row.7,
                row.8,
                row.6
            );
            per_impl.push((imp, row));
        }
        let find = |imp| per_impl.iter().find(|(i, _)| *i == imp).map(|(_, r)| *r);
        if let (Some(m), Some(e)) = (find(Impl::Meshward), find(Impl::Envoy)) {
            let verdict = |ok: bool| if ok { "met" } else { "missed" };
            let _ = writeln!(
                ratios,
                "- {}: throughput {:.2}x Envoy (bar >= 1.5x: {}; goal 2x: {}), fixed-rate p99 {:.2}x (bar <= 0.5x: {}), RSS {:.2}x (bar <= 0.3x: {}; anon RSS {:.2}x), CPU per request {:.2}x",
                proto.label(),
                m.0 / e.0,
                verdict(m.0 >= 1.5 * e.0),
                verdict(m.0 >= 2.0 * e.0),
                m.2 / e.2,
                verdict(m.2 <= 0.5 * e.2),
                m.4 / e.4,
                verdict(m.4 <= 0.3 * e.4),
                m.7 / e.7,
                m.6 / e.6,
            );
        }
        if let (Some(r), Some(e)) = (find(Impl::Relay), find(Impl::Envoy)) {
            let _ = writeln!(
                ratios,
                "- {}: the relay pair (the floor for any pair here) has fixed-rate p50 {:.2}x and p99 {:.2}x Envoy's",
                proto.label(),
                r.1 / e.1,
                r.2 / e.2,
            );
        }
        if let (Some(m), Some(r)) = (find(Impl::Meshward), find(Impl::Relay)) {
            let _ = writeln!(
                ratios,
                "- {}: meshward adds {:.0} µs at p50 and {:.0} µs at p99 to the relay pair",
                proto.label(),
                m.1 - r.1,
                m.2 - r.2,
            );
        }
    }
    if settings.stall.is_some() {
        let _ = writeln!(
            out,
            "\n| between sidecars | pair | with stalls: p50 | p99 | p99.9 | max | connections to the server sidecar: before | at most |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &proto in &settings.protos {
            for &imp in &settings.impls {
                let mine: Vec<(Latency, stall::Observed)> = runs
                    .iter()
                    .filter(|r| r.imp == imp && r.proto == proto)
                    .filter_map(|r| r.stalled)
                    .collect();
                let m = |f: &dyn Fn(&(Latency, stall::Observed)) -> f64| {
                    median(mine.iter().map(f).collect())
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | {:.0} |",
                    proto.label(),
                    imp.label(),
                    m(&|s| s.0.p50_us),
                    m(&|s| s.0.p99_us),
                    m(&|s| s.0.p999_us),
                    m(&|s| s.0.max_us),
                    m(&|s| s.1.conns_before as f64),
                    m(&|s| s.1.conns_max as f64),
                );
            }
        }
    }
    out.push('\n');
    out.push_str(&ratios);
    out
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values.get(n / 2).copied().unwrap_or(0.0),
        _ => {
            let a = values.get(n / 2 - 1).copied().unwrap_or(0.0);
            let b = values.get(n / 2).copied().unwrap_or(0.0);
            (a + b) / 2.0
        }
    }
}

/// The test PKI: one root and intermediate, an SVID each for the client and the server side,
/// written as `meshward svid fetch --write` leaves them (both pairs read these same files).
fn write_pki(dir: &Path) -> anyhow::Result<()> {
    let pki = TestPki::new(TRUST_DOMAIN);
    for (who, id) in [("client", CLIENT_ID), ("server", SERVER_ID)] {
        let (svid, key) = pki.svid(id);
        let d = dir.join(who);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("svid.pem"), svid.to_pem())?;
        std::fs::write(d.join("svid.key"), key.to_pkcs8_pem())?;
        std::fs::write(d.join("bundle.pem"), pki.root_pem())?;
    }
    Ok(())
}

/// The default baseline (the cross-trust-domain `forbid`) plus one permit for the caller.
fn write_policies(dir: &Path) -> anyhow::Result<()> {
    let d = dir.join("policies");
    std::fs::create_dir_all(&d)?;
    let baseline = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default/baseline.cedar");
    std::fs::copy(&baseline, d.join("baseline.cedar"))
        .with_context(|| format!("copy `{}`", baseline.display()))?;
    std::fs::write(
        d.join("bench.cedar"),
        format!(
            "@id(\"bench-client-calls-server\")\npermit (principal == Workload::\"{CLIENT_ID}\", action, resource == Workload::\"{SERVER_ID}\");\n"
        ),
    )?;
    Ok(())
}

fn settings() -> anyhow::Result<Settings> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let num = |name: &str, default: u64| -> anyhow::Result<u64> {
        env(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("`{name}` is not a number: `{v}`"))
        })
    };
    let exe = std::env::current_exe()?;
    // target/release/deps/proxy_vs_envoy-HASH -> target/dist/meshward-proxy: the shipped build.
    let default_bin = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|p| p.join("dist").join("meshward-proxy"))
        .unwrap_or_default();
    let meshward = env("MESHWARD_PROXY_BIN").map_or(default_bin, PathBuf::from);
    if !meshward.is_file() {
        bail!(
            "no sidecar binary at `{}`: run `cargo build --profile dist -p meshward-proxy --bin meshward-proxy` or set MESHWARD_PROXY_BIN",
            meshward.display()
        );
    }
    let envoy = match env("MESHWARD_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => install_envoy()?,
    };
    let protos = env("MESHWARD_BENCH_PROTOS")
        .unwrap_or_else(|| "h1,h2".to_owned())
        .split(',')
        .map(|p| match p.trim() {
            "h1" => Ok(Proto::H1),
            "h2" => Ok(Proto::H2),
            other => bail!("`MESHWARD_BENCH_PROTOS`: unknown protocol `{other}` (h1, h2)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let impls = env("MESHWARD_BENCH_ONLY")
        .unwrap_or_else(|| "meshward,envoy,relay".to_owned())
        .split(',')
        .map(|i| match i.trim() {
            "meshward" => Ok(Impl::Meshward),
            "envoy" => Ok(Impl::Envoy),
            "relay" => Ok(Impl::Relay),
            other => bail!(
                "`MESHWARD_BENCH_ONLY`: unknown pair `{other}` (a list of meshward, envoy, relay)"
            ),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pin = match env("MESHWARD_BENCH_PIN").as_deref() {
        None | Some("on") => cpus >= 2,
        Some("off") => false,
        Some(other) => bail!("`MESHWARD_BENCH_PIN`: `{other}` is not `on` or `off`"),
    };
    Ok(Settings {
        meshward,
        envoy,
        closed: Duration::from_secs(num("MESHWARD_BENCH_SECS", 8)?),
        fixed: Duration::from_secs(num("MESHWARD_BENCH_FIXED_SECS", 8)?),
        rate: u32::try_from(num("MESHWARD_BENCH_RATE", 2000)?)?,
        concurrency: usize::try_from(num("MESHWARD_BENCH_CONCURRENCY", 32)?)?,
        rounds: usize::try_from(num("MESHWARD_BENCH_ROUNDS", 2)?)?.max(1),
        protos,
        impls,
        pin,
        keep: env("MESHWARD_BENCH_KEEP").is_some(),
        stall: match num("MESHWARD_BENCH_STALL_MS", 0)? {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
    })
}

/// `scripts/install-envoy`, whose last stdout line is the binary.
fn install_envoy() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-envoy");
    let out = Command::new(&script)
        .output()
        .with_context(|| format!("run `{}`", script.display()))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .context("install-envoy printed no path; set MESHWARD_ENVOY")
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
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "machine: {cpus} CPUs, {model}, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
