//! Time from a workload's first Workload API call to its SVID, warm agent (issue 4; issue 8 target:
//! p99 < 100 ms).
//!
//! One process runs a real CA (`meshward_ca::server::start`, 127.0.0.1, temp data dir) and a real
//! agent (`meshward_agent::start`, temp unix socket) on a multi-thread runtime of their own, and an
//! entry for this process's uid (`unix:uid:<uid>`). Once the agent holds that entry's SVID (warm),
//! the workload side, on its own single-thread runtime on the main thread, times each call from
//! opening a NEW unix-socket connection (HTTP/2 handshake included) to the first response: the
//! agent attests the caller from `SO_PEERCRED` + procfs (start time read twice, uid/gid, exe link;
//! no binary hash: no entry uses one), looks the identity up in its cache and answers. Each
//! response is then checked untimed (chain parses, key matches, right SPIFFE ID).
//!
//! Rows: `FetchX509SVID` on a new connection (the figure of the target); the same on one kept
//! connection (what the connection set-up costs); `FetchJWTSVID` with an audience seen before
//! (agent's JWT cache) and with a new audience each call (minted at the CA over mTLS). The very
//! first call of the process is reported on its own: the agent has never seen its binary (it hashes
//! a binary only when an entry of the node has a `unix:sha256:` selector, which this one has not).
//! Run: `cargo bench -p meshward-agent --bench first_svid`.

// A bench binary: a failed setup is a failed run, reported loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshward_agent::config::{AgentConfig, JoinToken};
use meshward_agent::workload_api::client::{self, parse_x509_response};
use meshward_ca::config::CaConfig;
use meshward_identity::proto::ca as ca_pb;
use meshward_identity::proto::workload as pb;
use meshward_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshward_identity::x509::certs_to_pem;
use meshward_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TD: &str = "bench.test";
const NODE: &str = "bench-node";
const WORKLOAD: &str = "bench/workload";
/// Timed calls per row (new-audience JWTs: a fifth of it, each one a CA round trip).
const CALLS: usize = 500;
/// Untimed calls before each row (connection code paths, allocator, caches of the client side).
const WARMUP: usize = 20;
/// Issue 8's target for the p99.
const TARGET: Duration = Duration::from_millis(100);
const HOUR: Duration = Duration::from_secs(3_600);

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no `--bench`: one quick pass.
    let quick = !std::env::args().any(|a| a == "--bench");
    let calls = if quick { CALLS / 20 } else { CALLS };
    let load_before = load_average();

    let dir = tempfile::tempdir().unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ca-agent")
        .build()
        .unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let selector = format!("unix:uid:{uid}");
    let (socket, shutdown, agent_id) =
        server_rt.block_on(start_ca_and_agent(dir.path(), &selector));
    eprintln!("agent warm: holds the svid of `{agent_id}`; workload selector `{selector}`");

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = client_rt.block_on(measure(&socket, &agent_id, calls));

    server_rt.block_on(async {
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    drop(server_rt);
    let load_after = load_average();

    println!();
    println!("Agent: first SVID (warm), {calls} timed calls per row ({WARMUP} untimed first)");
    println!(
        "machine: nproc {}, cpu \"{}\", load average {load_before} (start) -> {load_after} (end)",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model()
    );
    println!(
        "{:<58} {:>6} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "call", "n", "p50", "p90", "p99", "max", "p99 / 100ms"
    );
    for row in &rows {
        row.print();
    }
}

/// Starts the CA, registers the workload's entry, starts the agent and waits until it holds the
/// workload's SVID. Returns the agent's socket, the shutdown of both, and the workload's ID.
async fn start_ca_and_agent(dir: &Path, selector: &str) -> (PathBuf, CancellationToken, SpiffeId) {
    let td: TrustDomain = TD.parse().unwrap();
    let shutdown = CancellationToken::new();
    let mut ca_config = CaConfig::new(dir.join("ca"), "127.0.0.1:0".parse().unwrap(), td.clone());
    ca_config.svid_ttl = HOUR;
    ca_config.agent_svid_ttl = HOUR;
    let ca = meshward_ca::server::start(ca_config, shutdown.child_token())
        .await
        .unwrap();
    let mut admin = meshward_ca::admin::connect(&ca.admin_socket).await.unwrap();

    let workload = td
        .workload_id(&WORKLOAD.split('/').collect::<Vec<_>>())
        .unwrap();
    let (kind, value) = selector.split_once(':').unwrap();
    admin
        .create_entry(ca_pb::CreateEntryRequest {
            spiffe_id: workload.to_string(),
            selectors: vec![ca_pb::Selector {
                r#type: kind.into(),
                value: value.into(),
            }],
            node: NODE.into(),
            any_node: false,
            ttl_seconds: 0,
            hint: "bench".into(),
        })
        .await
        .unwrap();
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
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let bundle = agent_dir.join("bootstrap.pem");
    std::fs::write(&bundle, certs_to_pem(&roots)).unwrap();

    let mut config = AgentConfig::new(
        ca.local_addr.to_string(),
        bundle,
        agent_dir.join("run").join("agent.sock"),
        agent_dir.join("data"),
    );
    config.join_token = Some(JoinToken::new(token).unwrap());
    let agent = meshward_agent::start(config, shutdown.child_token())
        .await
        .unwrap();
    let warm = agent
        .cache
        .wait_for(Duration::from_secs(30), |snapshot| {
            let minted = snapshot
                .entries
                .iter()
                .any(|e| e.spiffe_id == workload && e.svid.is_some());
            (snapshot.synced && minted).then_some(())
        })
        .await;
    assert!(
        warm.is_some(),
        "the agent did not mint `{workload}` within 30 s"
    );
    let socket = agent.socket.clone();
    // Both keep serving in the background until `shutdown` fires.
    tokio::spawn(async move { drop(agent.wait().await) });
    tokio::spawn(async move { drop(ca.wait().await) });
    (socket, shutdown, workload)
}

/// Every row, timed from the workload's side.
async fn measure(socket: &Path, id: &SpiffeId, calls: usize) -> Vec<Row> {
    let mut rows = Vec::new();

    // The first call of this process: the agent has never seen its binary (and needs no hash of
    // it: no entry selects on `unix:sha256:`).
    let first = {
        let start = Instant::now();
        let response = x509_on_new_connection(socket).await;
        let took = start.elapsed();
        check_x509(&response, id);
        took
    };
    rows.push(Row::new(
        "FetchX509SVID, 1st call of the process (binary never seen)",
        vec![first],
    ));

    rows.push(
        Row::timed(
            "FetchX509SVID, new connection each call",
            calls,
            || async move {
                let start = Instant::now();
                let response = x509_on_new_connection(socket).await;
                let took = start.elapsed();
                check_x509(&response, id);
                took
            },
        )
        .await,
    );

    let kept = client::connect(socket).await.unwrap();
    rows.push(
        Row::timed("FetchX509SVID, one kept connection", calls, || {
            let mut client = kept.clone();
            async move {
                let start = Instant::now();
                let response = first_x509(&mut client).await;
                let took = start.elapsed();
                check_x509(&response, id);
                took
            }
        })
        .await,
    );

    // Mint this audience once (untimed warm-up does it), then it comes from the agent's cache.
    rows.push(
        Row::timed(
            "FetchJWTSVID, cached audience, new connection",
            calls,
            || async move {
                let start = Instant::now();
                let response = jwt_on_new_connection(socket, "bench-cached").await;
                let took = start.elapsed();
                check_jwt(&response, id);
                took
            },
        )
        .await,
    );

    let mut fresh = 0_usize;
    rows.push(
        Row::timed(
            "FetchJWTSVID, new audience (CA mint), new connection",
            (calls / 5).max(1),
            || {
                fresh += 1;
                let audience = format!("bench-fresh-{fresh}");
                async move {
                    let start = Instant::now();
                    let response = jwt_on_new_connection(socket, &audience).await;
                    let took = start.elapsed();
                    check_jwt(&response, id);
                    took
                }
            },
        )
        .await,
    );
    rows
}

/// Connects anew (unix socket + HTTP/2 handshake), opens `FetchX509SVID` and reads its first message.
async fn x509_on_new_connection(socket: &Path) -> pb::X509svidResponse {
    let mut client = client::connect(socket).await.unwrap();
    first_x509(&mut client).await
}

async fn first_x509(client: &mut SpiffeWorkloadApiClient<Channel>) -> pb::X509svidResponse {
    let mut stream = client
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap()
}

async fn jwt_on_new_connection(socket: &Path, audience: &str) -> pb::JwtsvidResponse {
    let mut client = client::connect(socket).await.unwrap();
    client
        .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
}

/// The response holds exactly the workload's SVID, well-formed, with its key.
fn check_x509(response: &pb::X509svidResponse, id: &SpiffeId) {
    let svids = parse_x509_response(response).unwrap();
    assert_eq!(svids.len(), 1);
    assert_eq!(svids[0].svid.spiffe_id(), id);
    assert!(svids[0].is_current());
}

fn check_jwt(response: &pb::JwtsvidResponse, id: &SpiffeId) {
    assert_eq!(response.svids.len(), 1);
    assert_eq!(response.svids[0].spiffe_id, id.to_string());
    assert_eq!(response.svids[0].svid.split('.').count(), 3);
}

/// One row of the table: a name and its latencies.
struct Row {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Row {
    fn new(name: &'static str, mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { name, samples }
    }

    /// `WARMUP` untimed calls of `call`, then `n` timed ones (each returns its own latency).
    async fn timed<F, Fut>(name: &'static str, n: usize, mut call: F) -> Self
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Duration>,
    {
        for _ in 0..WARMUP {
            call().await;
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            samples.push(call().await);
        }
        Self::new(name, samples)
    }

    /// The `q` quantile (nearest rank) of the sorted samples.
    fn quantile(&self, q: f64) -> Duration {
        let rank = ((q * self.samples.len() as f64).ceil() as usize).clamp(1, self.samples.len());
        self.samples[rank - 1]
    }

    fn print(&self) {
        let p99 = self.quantile(0.99);
        println!(
            "{:<58} {:>6} {:>9} {:>9} {:>9} {:>9} {:>12}",
            self.name,
            self.samples.len(),
            ms(self.quantile(0.50)),
            ms(self.quantile(0.90)),
            ms(p99),
            ms(self.samples[self.samples.len() - 1]),
            format!("{:.4}", p99.as_secs_f64() / TARGET.as_secs_f64()),
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}
