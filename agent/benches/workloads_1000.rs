//! 1,000 workloads on one agent, and their 1,000 SVIDs rotating together (issue 8: < 30 MB RSS;
//! a rotation storm handled with jitter and without stalling streams).
//!
//! Three kinds of process, all this bench binary (`MESHWARD_BENCH_ROLE` picks the role):
//!
//! - the orchestrator (no role) runs a real CA in-process (127.0.0.1, temp data dir, SVID TTL
//!   `MESHWARD_BENCH_TTL` seconds, 60 by default), registers one entry per workload selecting
//!   on `unix:uid:<20000 + i>` (1,000 distinct identities, one per uid), and measures;
//! - the agent (`agent`) is `meshward_agent::run` in a process of its own, so its RSS is its own
//!   (`/proc/<pid>/status`, `/proc/<pid>/smaps_rollup`); it logs JSON to a file, from which the
//!   CA batches (`svids minted`, count and time) are read;
//! - each workload (`workload`) is a process started with uid = gid = `20000 + i` (the
//!   orchestrator runs as root), which opens `FetchX509SVID` and holds it, printing every SVID it
//!   receives (serial, notAfter, receive time) to a pipe shared by all workloads; a `probe` is a
//!   new workload (uid `40000 + j`) that prints how long its first SVID took and exits.
//!
//! Figures: agent RSS with no entries, with 1,000 entries minted and no workload, and with 1,000
//! open streams; then, when the 1,000 SVIDs minted together come due (about TTL/2 later): the CA
//! batches, the spread of the renewals, each stream's delay from its batch's mint to its update,
//! whether every stream got its new SVID before the old one expired, and the first-SVID latency of
//! probes started during the storm versus before it.
//!
//! Run (as root, for the uids): `cargo bench -p meshward-agent --bench workloads_1000`.
//! `cargo test --benches` runs a quick pass (20 workloads, TTL 30 s). Without root it says so and
//! exits.

// A bench binary: a failed setup is a failed run, reported loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshward_agent::config::{AgentConfig, JoinToken};
use meshward_agent::workload_api::client::{self, parse_x509_response};
use meshward_ca::config::CaConfig;
use meshward_identity::TrustDomain;
use meshward_identity::proto::ca as ca_pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::proto::workload as pb;
use meshward_identity::x509::certs_to_pem;
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const ROLE: &str = "MESHWARD_BENCH_ROLE";
const TD: &str = "bench.test";
const NODE: &str = "bench-node";
const WORKLOAD_UID: u32 = 20_000;
const PROBE_UID: u32 = 40_000;
const HOUR: Duration = Duration::from_secs(3_600);

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("agent") => agent_role(),
        Ok("workload") => workload_role(false),
        Ok("probe") => workload_role(true),
        _ => orchestrate(),
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("`{name}` is not set"))
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Log timestamps in Unix milliseconds, comparable with the workloads' receive times.
struct UnixMs;

impl tracing_subscriber::fmt::time::FormatTime for UnixMs {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{}", now_ms())
    }
}

/// The agent, alone in its process (the real one runs on a default multi-thread runtime too).
fn agent_role() {
    tracing_subscriber::fmt()
        .json()
        .with_timer(UnixMs)
        .with_env_filter(tracing_subscriber::EnvFilter::new("meshward_agent=info"))
        .with_writer(std::io::stderr)
        .init();
    let mut config = AgentConfig::new(
        env("MB_CA"),
        PathBuf::from(env("MB_BUNDLE")),
        PathBuf::from(env("MB_SOCKET")),
        PathBuf::from(env("MB_DATA")),
    );
    config.join_token = Some(JoinToken::new(env("MB_TOKEN")).unwrap());
    config.sync_interval = Duration::from_secs(2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(meshward_agent::run(config, CancellationToken::new()))
        .unwrap();
}

/// A workload: holds `FetchX509SVID` open and prints what arrives (`F idx first_us unix_ms` once,
/// `M idx serial not_after_ms unix_ms` per message); a probe exits after the first.
fn workload_role(probe: bool) {
    let socket = PathBuf::from(env("MB_SOCKET"));
    let idx = env("MB_IDX");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        // One write per line, under PIPE_BUF: lines of different workloads never interleave.
        let _ = out.write_all(format!("{line}\n").as_bytes());
        let _ = out.flush();
    };
    rt.block_on(async {
        let start = Instant::now();
        let mut stream = match client::connect(&socket).await {
            Ok(mut c) => match c
                .fetch_x509svid(client::request(pb::X509svidRequest {}))
                .await
            {
                Ok(s) => s.into_inner(),
                Err(e) => return say(format!("E {idx} open: {}", e.message())),
            },
            Err(e) => return say(format!("E {idx} connect: {e}")),
        };
        let mut first = true;
        loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return say(format!("E {idx} stream ended")),
                Err(e) => return say(format!("E {idx} stream: {}", e.message())),
            };
            let recv = now_ms();
            let svids = match parse_x509_response(&message) {
                Ok(s) => s,
                Err(e) => return say(format!("E {idx} bad response: {e}")),
            };
            if first {
                first = false;
                say(format!("F {idx} {} {recv}", start.elapsed().as_micros()));
                if probe {
                    return;
                }
            }
            let svid = &svids[0].svid;
            say(format!(
                "M {idx} {} {} {recv}",
                svid.serial(),
                unix_ms(svid.not_after())
            ));
        }
    });
}

/// One line from a workload.
enum Line {
    First {
        idx: usize,
        us: u64,
        at: u64,
    },
    Svid {
        idx: usize,
        serial: String,
        not_after: u64,
        at: u64,
    },
    Error(String),
}

fn parse_line(line: &str) -> Line {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.first().copied() {
        Some("F") if f.len() == 4 => Line::First {
            idx: f[1].parse().unwrap(),
            us: f[2].parse().unwrap(),
            at: f[3].parse().unwrap(),
        },
        Some("M") if f.len() == 5 => Line::Svid {
            idx: f[1].parse().unwrap(),
            serial: f[2].to_owned(),
            not_after: f[3].parse().unwrap(),
            at: f[4].parse().unwrap(),
        },
        _ => Line::Error(line.to_owned()),
    }
}

/// What a process holds in memory, in kB, from procfs.
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
    pss: u64,
    threads: u64,
    fds: u64,
}

fn rss(pid: u32) -> Rss {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Rss {
        total: field(&status, "VmRSS:"),
        anon: field(&status, "RssAnon:"),
        file: field(&status, "RssFile:"),
        pss: field(&rollup, "Pss:"),
        threads: field(&status, "Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
    }
}

/// `svids minted` lines of the agent's log: (unix ms, count).
fn mint_batches(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "svids minted")
        .map(|v| {
            (
                v["timestamp"].as_str().unwrap().parse().unwrap(),
                v["fields"]["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn spawn_workload(
    role: &str,
    uid: u32,
    idx: usize,
    socket: &Path,
    out: &std::io::PipeWriter,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env("MB_SOCKET", socket)
        .env("MB_IDX", idx.to_string())
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .spawn()
        .unwrap()
}

fn orchestrate() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        println!("workloads_1000: skipped: needs root (each workload runs under a uid of its own)");
        return;
    }
    // MESHWARD_BENCH_WORKLOADS: another workload count, for quicker memory measurements.
    let n: usize = std::env::var("MESHWARD_BENCH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20 } else { 1_000 });
    let probes: usize = if quick { 5 } else { 100 };
    let ttl = Duration::from_secs(
        std::env::var("MESHWARD_BENCH_TTL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 30 } else { 60 }),
    );
    let load_before = load_average();
    let dir = tempfile::tempdir().unwrap();
    // The workloads run under other uids and must reach the agent socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let (ca_addr, mut admin, token, bundle) = rt.block_on(start_ca(dir.path(), ttl, &shutdown));

    let agent_dir = dir.path().join("agent");
    // Not under the agent's data dir, which it makes 0700.
    let socket = dir.path().join("run").join("agent.sock");
    let log = dir.path().join("agent.log");
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "agent")
        .env("MB_CA", &ca_addr)
        .env("MB_BUNDLE", &bundle)
        .env("MB_SOCKET", &socket)
        .env("MB_DATA", agent_dir.join("data"))
        .env("MB_TOKEN", &token)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    wait_until(Duration::from_secs(30), "the agent socket", || {
        socket.exists()
    });
    std::thread::sleep(Duration::from_secs(3));
    let rss_empty = rss(agent_pid);

    // One entry per workload and per probe.
    let td: TrustDomain = TD.parse().unwrap();
    rt.block_on(async {
        for (uid, count, name) in [(WORKLOAD_UID, n, "w"), (PROBE_UID, probes, "p")] {
            for i in 0..count {
                let id = td.workload_id(&[name, &i.to_string()]).unwrap();
                admin
                    .create_entry(ca_pb::CreateEntryRequest {
                        spiffe_id: id.to_string(),
                        selectors: vec![ca_pb::Selector {
                            r#type: "unix".into(),
                            value: format!("uid:{}", uid + u32::try_from(i).unwrap()),
                        }],
                        node: NODE.into(),
                        any_node: false,
                        ttl_seconds: 0,
                        hint: String::new(),
                    })
                    .await
                    .unwrap();
            }
        }
    });
    let total = u64::try_from(n + probes).unwrap();
    wait_until(
        Duration::from_secs(120),
        "the first mint of every entry",
        || mint_batches(&log).iter().map(|b| b.1).sum::<u64>() >= total,
    );
    let first_mint = mint_batches(&log);
    let t0 = first_mint.last().unwrap().0;
    std::thread::sleep(Duration::from_secs(2));
    let rss_entries = rss(agent_pid);

    // The workloads, all printing to one pipe read by one thread.
    let (reader, writer) = std::io::pipe().unwrap();
    let (tx, rx) = mpsc::channel::<Line>();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send(parse_line(&line)).is_err() {
                return;
            }
        }
    });
    let spawn_start = Instant::now();
    let mut children: Vec<Child> = (0..n)
        .map(|i| {
            spawn_workload(
                "workload",
                WORKLOAD_UID + u32::try_from(i).unwrap(),
                i,
                &socket,
                &writer,
            )
        })
        .collect();
    let mut svids: HashMap<usize, Vec<(String, u64, u64)>> = HashMap::new();
    let mut opened = 0_usize;
    let mut first_us: Vec<u64> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut take = |line: Line,
                    svids: &mut HashMap<usize, Vec<(String, u64, u64)>>,
                    opened: &mut usize,
                    first_us: &mut Vec<u64>| match line {
        Line::First { us, .. } => {
            *opened += 1;
            first_us.push(us);
        }
        Line::Svid {
            idx,
            serial,
            not_after,
            at,
        } => {
            svids.entry(idx).or_default().push((serial, not_after, at));
        }
        Line::Error(e) => errors.push(e),
    };
    while opened < n {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Line::Error(e)) => panic!("a workload failed: {e}"),
            Ok(line) => take(line, &mut svids, &mut opened, &mut first_us),
            Err(_) => panic!("only {opened} of {n} workloads got an svid within 120 s"),
        }
    }
    let open_took = spawn_start.elapsed();
    let opened_at = now_ms();
    std::thread::sleep(Duration::from_secs(2));
    let rss_streams = rss(agent_pid);

    // Probes: new workloads, a few before the storm (quiet) and the rest spread over it.
    let half = ttl.as_millis() as u64 / 2;
    let storm_from = t0 + half - half / 5;
    let storm_to = t0 + half;
    let probe_socket = socket.clone();
    let probe_writer = writer.try_clone().unwrap();
    let quiet = (probes / 5).max(1);
    let prober = std::thread::spawn(move || {
        let run = |j: usize| {
            let mut child = spawn_workload(
                "probe",
                PROBE_UID + u32::try_from(j).unwrap(),
                100_000 + j,
                &probe_socket,
                &probe_writer,
            );
            child.wait().unwrap();
        };
        for j in 0..quiet {
            run(j);
        }
        let start = storm_from.saturating_sub(1_000);
        let step = (storm_to + 1_000 - start) / u64::try_from(probes - quiet).unwrap().max(1);
        for j in quiet..probes {
            let at = start + step * u64::try_from(j - quiet).unwrap();
            let now = now_ms();
            if at > now {
                std::thread::sleep(Duration::from_millis(at - now));
            }
            run(j);
        }
    });
    drop(writer);

    // The storm: wait until every stream carries a second SVID, or the first ones expired.
    let deadline = t0 + ttl.as_millis() as u64 + 2_000;
    let mut probe_samples: Vec<(u64, u64)> = Vec::new();
    loop {
        let done = (0..n).all(|i| {
            svids.get(&i).is_some_and(|v| {
                v.iter()
                    .map(|s| &s.0)
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    >= 2
            })
        });
        if (done && prober.is_finished()) || now_ms() > deadline {
            break;
        }
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            match line {
                Line::First { idx, us, at } if idx >= 100_000 => probe_samples.push((us, at)),
                other => take(other, &mut svids, &mut opened, &mut first_us),
            }
        }
    }
    let rss_after = rss(agent_pid);
    let batches: Vec<(u64, u64)> = mint_batches(&log)
        .into_iter()
        .filter(|b| b.0 > t0 + 1_000)
        .collect();

    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = agent.kill();
    let _ = agent.wait();
    shutdown.cancel();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    drop(rt);
    let load_after = load_average();

    // Figures.
    println!();
    println!(
        "Agent: {n} workloads (uid {WORKLOAD_UID}..), SVID TTL {} s, {probes} probes",
        ttl.as_secs()
    );
    println!(
        "machine: nproc {}, load average {load_before} (start) -> {load_after} (end)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("agent RSS (kB)                      VmRSS   RssAnon  RssFile      Pss  threads  fds");
    for (name, r) in [
        ("no entries, no workload", rss_empty),
        (
            &format!("{} entries minted, no workload", n + probes) as &str,
            rss_entries,
        ),
        (
            &format!("{n} open FetchX509SVID streams") as &str,
            rss_streams,
        ),
        ("after the rotation storm", rss_after),
    ] {
        println!(
            "  {name:<32} {:>8} {:>9} {:>8} {:>8} {:>8} {:>4}",
            r.total, r.anon, r.file, r.pss, r.threads, r.fds
        );
    }
    println!(
        "  per stream: {:.1} kB total, {:.1} kB anon",
        (rss_streams.total as f64 - rss_entries.total as f64) / n as f64,
        (rss_streams.anon as f64 - rss_entries.anon as f64) / n as f64
    );
    first_us.sort_unstable();
    println!(
        "streams opened: {n} in {:.1} s (spawn included); first SVID p50 {} p99 {} max {}",
        open_took.as_secs_f64(),
        us(quantile(&first_us, 0.5)),
        us(quantile(&first_us, 0.99)),
        us(quantile(&first_us, 1.0))
    );
    println!(
        "initial mint: {} batches {:?} (sizes)",
        first_mint.len(),
        first_mint.iter().map(|b| b.1).collect::<Vec<_>>()
    );
    println!(
        "storm: {} CA batches, sizes {:?}",
        batches.len(),
        batches.iter().map(|b| b.1).collect::<Vec<_>>()
    );
    if let (Some(first), Some(last)) = (batches.first(), batches.last()) {
        println!(
            "storm: batches from t0+{:.2} s to t0+{:.2} s (spread {:.2} s; renewal window by design t0+{:.1}..{:.1} s)",
            (first.0 - t0) as f64 / 1e3,
            (last.0 - t0) as f64 / 1e3,
            (last.0 - first.0) as f64 / 1e3,
            (storm_from - t0) as f64 / 1e3,
            (storm_to - t0) as f64 / 1e3,
        );
    }
    // Each stream's second SVID: when, how long after its batch, and before the first expired?
    let mut delays = Vec::new();
    let mut late = 0_usize;
    let mut missed = 0_usize;
    let mut received = Vec::new();
    for i in 0..n {
        let v = svids.get(&i).cloned().unwrap_or_default();
        let Some(first) = v.first() else {
            missed += 1;
            continue;
        };
        let Some(next) = v.iter().find(|s| s.0 != first.0) else {
            missed += 1;
            continue;
        };
        if next.2 >= first.1 {
            late += 1;
        }
        received.push(next.2 - t0);
        if let Some(batch) = batches.iter().rev().find(|b| b.0 <= next.2 + 5) {
            delays.push(next.2.saturating_sub(batch.0) * 1_000);
        }
    }
    received.sort_unstable();
    delays.sort_unstable();
    println!(
        "storm: {} of {n} streams got the renewed SVID; missed {missed}; after the old one expired {late}; opened after t0 (streams reading gen 1 late) {}",
        n - missed,
        svids
            .values()
            .filter(|v| v.first().is_some_and(|s| s.2 > opened_at))
            .count()
    );
    if !received.is_empty() {
        println!(
            "storm: renewed SVID received at t0+{:.2} s (first) / {:.2} (p50) / {:.2} (last)",
            quantile(&received, 0.0) as f64 / 1e3,
            quantile(&received, 0.5) as f64 / 1e3,
            quantile(&received, 1.0) as f64 / 1e3
        );
        println!(
            "storm: stream update delay after its batch was minted: p50 {} p99 {} max {}",
            us(quantile(&delays, 0.5)),
            us(quantile(&delays, 0.99)),
            us(quantile(&delays, 1.0))
        );
    }
    let span = match (batches.first(), batches.last()) {
        (Some(f), Some(l)) => (f.0.saturating_sub(500), l.0 + 500),
        _ => (storm_from, storm_to),
    };
    let (mut during, mut outside): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for (us, at) in &probe_samples {
        if *at >= span.0 && *at <= span.1 {
            during.push(*us);
        } else {
            outside.push(*us);
        }
    }
    for (name, mut v) in [("during the storm", during), ("outside the storm", outside)] {
        v.sort_unstable();
        if v.is_empty() {
            println!("probes {name}: none");
            continue;
        }
        println!(
            "probes {name}: n {} first SVID p50 {} p99 {} max {}",
            v.len(),
            us(quantile(&v, 0.5)),
            us(quantile(&v, 0.99)),
            us(quantile(&v, 1.0))
        );
    }
    println!(
        "workload errors: {} {:?}",
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn us(v: u64) -> String {
    format!("{:.1} ms", v as f64 / 1e3)
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the CA; returns its address, an admin client, a join token for the node, and the
/// bootstrap bundle file.
async fn start_ca(
    dir: &Path,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> (String, AdminClient<Channel>, String, PathBuf) {
    let td: TrustDomain = TD.parse().unwrap();
    let mut ca_config = CaConfig::new(dir.join("ca"), "127.0.0.1:0".parse().unwrap(), td);
    ca_config.svid_ttl = ttl;
    ca_config.agent_svid_ttl = HOUR;
    let ca = meshward_ca::server::start(ca_config, shutdown.child_token())
        .await
        .unwrap();
    let mut admin = meshward_ca::admin::connect(&ca.admin_socket).await.unwrap();
    let token = admin
        .create_join_token(ca_pb::CreateJoinTokenRequest {
            node: NODE.into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let roots = admin
        .show_bundle(ca_pb::ShowBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect::<Vec<_>>();
    let bundle = dir.join("bootstrap.pem");
    std::fs::write(&bundle, certs_to_pem(&roots)).unwrap();
    let addr = ca.local_addr.to_string();
    tokio::spawn(async move { drop(ca.wait().await) });
    (addr, admin, token, bundle)
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
