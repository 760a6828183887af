//! Interop: an unmodified Envoy (installed by `scripts/install-envoy`) takes its certificate and
//! trust bundle over SDS from our agent's unix socket, attested as itself, and serves mTLS with
//! them: a client holding another SVID of the same CA gets through, foreign clients do not.
//!
//! Two listeners cover SPIRE's secret names: one with `default` + `spiffe://<td>` (a plain
//! `trusted_ca`), one with the SPIFFE ID + `ALL` (Envoy's SPIFFE certificate validator).
//!
//! Envoy is found through `MESHWARD_ENVOY`, else in the default venv of `scripts/install-envoy`;
//! without it the test says so and passes, so `cargo test` works on a bare machine (CI installs it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_agent::workload_api::client::{self, FetchedSvid};
use meshward_identity::bundle::BundleSet;
use meshward_identity::proto::workload as pb;
use meshward_identity::test_util::TestPki;
use meshward_identity::tls::client_config;
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid};
use rustls::pki_types::ServerName;
use support::{Mesh, MeshOptions, TD, id, path_selector, this_process};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What Envoy answers every request with.
const BODY: &str = "hello from envoy over sds";

/// Longest wait for Envoy to load its secrets and listen.
const ENVOY_READY: Duration = Duration::from_secs(60);

/// The Envoy binary, or `None` (and a note on stderr) when it is not installed.
fn envoy_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MESHWARD_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MESHWARD_ENVOY points at `{}`, which is not a file",
            path.display()
        );
        return Some(path);
    }
    let cache = std::env::var_os("MESHWARD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/meshward")))?;
    let lib = cache.join("envoy-venv").join("lib");
    // lib/python3.X/site-packages/envoy/_bin/envoy
    std::fs::read_dir(lib).ok()?.flatten().find_map(|python| {
        let candidate = python.path().join("site-packages/envoy/_bin/envoy");
        candidate.is_file().then_some(candidate)
    })
}

/// A running Envoy, killed on drop.
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The SDS config source: gRPC to the static cluster that points at the agent's socket.
fn sds(name: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "meshward_agent" } }]
            }
        }
    })
}

fn listener(name: &str, port: u16, certificate: &str, validation: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [sds(certificate)],
                        "validation_context_sds_secret_config": sds(validation)
                    }
                }
            },
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "codec_type": "AUTO",
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "all",
                            "domains": ["*"],
                            "routes": [{
                                "match": { "prefix": "/" },
                                "direct_response": { "status": 200, "body": { "inline_string": BODY } }
                            }]
                        }]
                    },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        }
                    }]
                }
            }]
        }]
    })
}

fn start_envoy(binary: &Path, dir: &Path, socket: &Path, ports: (u16, u16)) -> Envoy {
    let config = serde_json::json!({
        "node": { "id": "meshward-interop", "cluster": "interop" },
        "static_resources": {
            "clusters": [{
                "name": "meshward_agent",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} }
                    }
                },
                "load_assignment": {
                    "cluster_name": "meshward_agent",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                        "address": { "pipe": { "path": socket.display().to_string() } }
                    } }] }]
                }
            }],
            "listeners": [
                listener("by_default", ports.0, "default", &format!("spiffe://{TD}")),
                listener("by_id", ports.1, id("envoy").as_str(), "ALL"),
            ]
        }
    });
    let config_path = dir.join("envoy.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let log = dir.join("envoy.log");
    // A random base id keeps parallel Envoys (other tests, other CI jobs) apart.
    let base_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 1_000_000
        + std::process::id() % 1_000;
    let child = Command::new(binary)
        .arg("-c")
        .arg(&config_path)
        .args(["--base-id", &base_id.to_string(), "--disable-hot-restart"])
        .args(["--concurrency", "1", "-l", "info"])
        .arg("--log-path")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Envoy { child, log }
}

/// One HTTPS request with `chain`/`key`, verifying the server is `expected`; the response, or
/// the error that ended the exchange.
async fn get(
    addr: SocketAddr,
    chain: &X509Svid,
    key: &SvidKey,
    verifier: PeerVerifier,
) -> io::Result<String> {
    let config = client_config(
        chain.chain().to_vec(),
        key.to_pkcs8_der(),
        Arc::new(verifier),
        Vec::new(),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("envoy.local").unwrap(), tcp)
        .await?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: envoy.local\r\nconnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

fn envoy_verifier(svid: &FetchedSvid) -> PeerVerifier {
    let mut set = BundleSet::new();
    set.insert(svid.bundle.clone());
    PeerVerifier::new(Arc::new(set), [svid.bundle.trust_domain().clone()])
        .with_expected(Expected::Id(id("envoy")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_mtls_with_secrets_from_our_sds() {
    let Some(binary) = envoy_binary() else {
        eprintln!("skipping: envoy not installed (run scripts/install-envoy)");
        return;
    };
    // Envoy gets its identity from its binary (uid-independent), this test from its own.
    let mesh = Mesh::start(
        MeshOptions::default(),
        &[
            ("envoy", vec![path_selector(&binary)]),
            ("client", vec![this_process()]),
        ],
    )
    .await;

    // The client's SVID comes from the same agent, over the Workload API.
    let mut api = client::connect(&mesh.socket).await.unwrap();
    let mut stream = api
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let ours = client::parse_x509_response(&stream.message().await.unwrap().unwrap())
        .unwrap()
        .remove(0);
    assert_eq!(*ours.svid.spiffe_id(), id("client"));

    let ports = (free_port(), free_port());
    let envoy = start_envoy(&binary, mesh.dir.path(), &mesh.socket, ports);
    let addrs: [SocketAddr; 2] = [
        ([127, 0, 0, 1], ports.0).into(),
        ([127, 0, 0, 1], ports.1).into(),
    ];

    // Listeners warm until their SDS secrets arrive; then the handshake and the request go through.
    for addr in addrs {
        let deadline = tokio::time::Instant::now() + ENVOY_READY;
        let response = loop {
            match get(addr, &ours.svid, &ours.key, envoy_verifier(&ours)).await {
                Ok(response) if response.starts_with("HTTP/1.1 200") => break response,
                outcome => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "envoy on {addr} did not serve mtls in time; last: {outcome:?}\nenvoy log:\n{}",
                        envoy.log()
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        assert!(response.contains(BODY), "{response}");
    }

    // Foreign clients are refused on both listeners: another trust domain, and an impostor with
    // our trust domain's name but another root.
    let foreign = TestPki::new("foreign.test").svid("spiffe://foreign.test/intruder");
    let impostor = TestPki::new(TD).svid(id("client").as_str());
    for (what, (chain, key)) in [("foreign trust domain", foreign), ("impostor", impostor)] {
        for addr in addrs {
            let outcome = get(addr, &chain, &key, envoy_verifier(&ours)).await;
            assert!(
                !matches!(&outcome, Ok(r) if r.contains(BODY)),
                "{what} got through {addr}: {outcome:?}"
            );
        }
    }

    // Envoy presented `spiffe://interop.test/envoy` (every verifier above expects exactly it): an
    // identity only its own binary is entitled to, so the agent attested the Envoy process itself.
    drop(envoy);
    mesh.stop().await;
}
