//! meshward-tests: end-to-end tests that run real meshward parts and real third-party peers over real
//! sockets on loopback.
//!
//! The scenarios live in `tests/tests/*.rs` (this crate) and in the root package's `tests/*.rs` (which
//! can name the `meshward` binary with `env!("CARGO_BIN_EXE_meshward")`). The shared start-up code
//! lives here:
//!
//! - [`CaProcess`]: a real `meshward ca run` process on `127.0.0.1:0` with a temp data dir, its admin
//!   CLI, gRPC clients to it (anonymous for `Attest`, or presenting an agent SVID), and what it wrote
//!   to disk (the issuance journal in SQLite, the audit file).
//!
//! # How the harness learns the CA's port
//!
//! The CA binds `--listen 127.0.0.1:0` itself, then logs one info line `ca serving` with the bound
//! address in its `listen` field (and the admin HTTP address in `admin_http`). The harness runs it with
//! `--log-format json` and stderr sent to a log file, and waits for that line: no port is picked
//! beforehand, so nothing can race for it.
//!
//! # No process is left behind
//!
//! Dropping a [`CaProcess`] sends SIGTERM, waits for the graceful drain, and falls back to SIGKILL.
//! A test process that is itself SIGKILLed cannot clean up (a parent-death signal would need `unsafe`
//! `pre_exec`, which the workspace forbids); everything else, panics included, is covered.

// Test helpers fail loudly: a harness that cannot start its CA is a failed test, not an input to handle.
// (Indexing a `serde_json::Value` never panics: a missing key is `Null`.)
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

pub mod mesh;

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use meshward_ca::datastore::Datastore;
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_client::CaClient;
use meshward_identity::tls::{PROTOCOL_VERSIONS, client_config, provider};
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use rustix::process::{Pid, Signal, kill_process};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// The trust domain every harness CA signs for.
pub const TRUST_DOMAIN: &str = "example.org";

/// Longest a CA may take to say `ca serving` (a debug build on a loaded two-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a CA may take to drain after SIGTERM before the harness SIGKILLs it.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest to wait for an audit record to reach the file (the CA syncs every 50 ms).
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for any audit record appended before it to be on disk.
pub const AUDIT_SETTLE: Duration = Duration::from_millis(400);

/// How to start a [`CaProcess`]; `CaOptions::new(env!("CARGO_BIN_EXE_meshward"))`.
#[derive(Debug, Clone)]
pub struct CaOptions {
    bin: PathBuf,
    data_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    audit_file: Option<PathBuf>,
    metrics: bool,
    args: Vec<String>,
}

impl CaOptions {
    /// A CA run by the `meshward` binary at `bin`, in a fresh temp data dir, with default settings.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            data_dir: None,
            admin_socket: None,
            audit_file: None,
            metrics: false,
            args: Vec::new(),
        }
    }

    /// Use this data dir instead of a fresh temp dir (the caller keeps it alive).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// `--admin-socket PATH` (two CAs on one data dir need one each).
    pub fn admin_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.admin_socket = Some(path.into());
        self
    }

    /// `--audit-file PATH` (two CAs on one data dir need one each: an audit file has one writer).
    pub fn audit_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_file = Some(path.into());
        self
    }

    /// Serve `/metrics` on `--admin-listen 127.0.0.1:0`.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// An extra `meshward ca run` switch without a value, e.g. `--k8s`.
    pub fn flag(mut self, flag: &str) -> Self {
        self.args.push(flag.to_owned());
        self
    }

    /// An extra `meshward ca run` flag and its value, e.g. `("--agent-svid-ttl", "30s")`.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_owned());
        self
    }
}

/// A running `meshward ca run` process; SIGTERMed (then SIGKILLed if it hangs) on drop.
pub struct CaProcess {
    options: CaOptions,
    // The temp dir holding the data dir (when the harness made it) and the log files.
    temp: tempfile::TempDir,
    data_dir: PathBuf,
    admin_socket: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    admin_http: Option<SocketAddr>,
    log: PathBuf,
    starts: u32,
}

/// Where a started CA said it serves.
struct Serving {
    addr: SocketAddr,
    admin_http: Option<SocketAddr>,
}

impl CaProcess {
    /// Starts `meshward ca run` and waits until it serves; panics (with its log) if it does not.
    pub fn start(options: CaOptions) -> Self {
        let mut ca = Self::launch(options);
        ca.wait_serving();
        ca
    }

    /// Starts every CA at once (all processes spawned before any is waited for, e.g. to race two
    /// first starts on one data dir), then waits until each serves.
    pub fn start_all(options: impl IntoIterator<Item = CaOptions>) -> Vec<Self> {
        let mut cas: Vec<Self> = options.into_iter().map(Self::launch).collect();
        for ca in &mut cas {
            ca.wait_serving();
        }
        cas
    }

    /// Spawns the process without waiting for it to serve.
    fn launch(options: CaOptions) -> Self {
        let temp = tempfile::tempdir().expect("temp dir for the ca");
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| temp.path().join("data"));
        let admin_socket = options
            .admin_socket
            .clone()
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let mut ca = Self {
            options,
            temp,
            data_dir,
            admin_socket,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_http: None,
            log: PathBuf::new(),
            starts: 0,
        };
        ca.spawn();
        ca
    }

    /// Starts a CA with default settings in a fresh data dir.
    pub fn start_default(bin: impl Into<PathBuf>) -> Self {
        Self::start(CaOptions::new(bin))
    }

    /// Stops the CA gracefully (SIGTERM; it must exit 0) and starts it again on the same data dir.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "the ca exits 0 on SIGTERM: {status}");
        self.start_again();
    }

    /// Crashes the CA (SIGKILL), then starts it again on the same data dir.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Starts a stopped CA again with the same options and data dir (it gets a new port).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the ca is still running");
        self.spawn();
        self.wait_serving();
    }

    /// Sends SIGTERM and waits for the CA to exit (SIGKILL after a timeout, which fails the test).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the ca is running");
        signal(&child, Signal::TERM);
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                signal(&child, Signal::KILL);
                let _ = child.wait();
                panic!(
                    "the ca did not stop within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Sends SIGKILL (a crash) and reaps the process.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the ca is running");
        signal(&child, Signal::KILL);
        let _ = child.wait();
    }

    /// The agent API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP address (with [`CaOptions::metrics`]).
    pub fn admin_http(&self) -> Option<SocketAddr> {
        self.admin_http
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The admin unix socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The audit file the CA writes.
    pub fn audit_path(&self) -> PathBuf {
        self.options
            .audit_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.jsonl"))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The current run's log (stderr, JSON lines).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `meshward <args>` with no `MESHWARD_*` variables from the test's environment.
    pub fn meshward(&self, args: &[&str]) -> Output {
        meshward_command(&self.options.bin)
            .args(args)
            .output()
            .expect("run meshward")
    }

    /// Runs `meshward ca <args> --admin-socket <this ca's socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        meshward_command(&self.options.bin)
            .arg("ca")
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("run meshward ca")
    }

    /// [`CaProcess::cli`], asserting exit 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`meshward ca {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// `ca token create --node NODE --ttl TTL`; the token.
    pub fn create_token(&self, node: &str, ttl: &str) -> String {
        self.cli_ok(&["token", "create", "--node", node, "--ttl", ttl])
            .trim()
            .to_owned()
    }

    /// `ca entry create --spiffe-id ID --node NODE --selector unix:uid:1000`; the entry id.
    pub fn create_entry(&self, spiffe_id: &str, node: &str) -> String {
        self.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--node",
            node,
            "--selector",
            "unix:uid:1000",
        ])
        .trim()
        .to_owned()
    }

    /// The trust bundle, as `ca bundle show` prints it.
    pub fn bundle(&self) -> TrustBundle {
        let pem = self.cli_ok(&["bundle", "show"]);
        TrustBundle::from_pem(trust_domain(), &pem).expect("bundle show prints a pem bundle")
    }

    /// A gRPC client that verifies the CA and presents no certificate (as for `Attest`).
    pub async fn anonymous(&self) -> CaClient<Channel> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .expect("tls versions")
            .dangerous()
            .with_custom_certificate_verifier(self.ca_verifier())
            .with_no_client_auth();
        CaClient::new(
            tls_channel(self.addr, config)
                .await
                .expect("connect to the ca"),
        )
    }

    /// A gRPC client presenting `agent`'s SVID.
    pub async fn as_agent(&self, agent: &AgentSvid) -> CaClient<Channel> {
        self.with_client_cert(agent.chain.clone(), &agent.key)
            .await
            .expect("connect to the ca with an agent svid")
    }

    /// A gRPC client presenting any certificate chain; the connection may fail (a refused cert).
    pub async fn with_client_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &SvidKey,
    ) -> Result<CaClient<Channel>, tonic::transport::Error> {
        let config = client_config(
            chain,
            key.to_pkcs8_der(),
            self.ca_verifier(),
            vec![b"h2".to_vec()],
        )
        .expect("client tls config");
        Ok(CaClient::new(tls_channel(self.addr, config).await?))
    }

    /// Attests an agent for `node` with a fresh join token (made with the CLI).
    pub async fn attest(&self, node: &str) -> AgentSvid {
        let token = self.create_token(node, "10m");
        let key = SvidKey::generate().expect("agent key");
        let id = agent_id(node);
        let response = self
            .anonymous()
            .await
            .attest(attest_request(&token, make_csr(&key, &id).expect("csr")))
            .await
            .expect("attest with a fresh join token")
            .into_inner();
        let svid = response.svid.expect("attest returns an svid");
        AgentSvid::issued(id, key, svid)
    }

    /// Renews `agent`'s SVID over its own mTLS connection, for a fresh key.
    pub async fn renew_agent(&self, agent: &AgentSvid) -> AgentSvid {
        let key = SvidKey::generate().expect("agent key");
        let svid = self
            .as_agent(agent)
            .await
            .renew_agent(pb::RenewAgentRequest {
                csr: make_csr(&key, &agent.id).expect("csr"),
            })
            .await
            .expect("renew the agent svid")
            .into_inner()
            .svid
            .expect("renew returns an svid");
        AgentSvid::issued(agent.id.clone(), key, svid)
    }

    /// How many SVIDs the issuance journal (SQLite) holds; written before any SVID is returned.
    pub fn journal_count(&self) -> u64 {
        Datastore::open(&self.data_dir)
            .expect("open the ca datastore")
            .issued_count()
            .expect("count the journal")
    }

    /// The audit records on disk now (complete lines only).
    pub fn audit(&self) -> Audit {
        Audit::read(&self.audit_path())
    }

    /// Waits until the audit file satisfies `done`; panics after a timeout.
    pub fn wait_audit(&self, what: &str, done: impl Fn(&Audit) -> bool) -> Audit {
        let deadline = Instant::now() + AUDIT_TIMEOUT;
        loop {
            let audit = self.audit();
            if done(&audit) {
                return audit;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {what} within {AUDIT_TIMEOUT:?}; the file has:\n{}",
                audit.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts the refusal of `resource` for `code` is audited, and that nothing was issued for it:
    /// no `issued` audit record names it, and the journal still holds `journal_before` SVIDs.
    pub fn assert_refused(&self, resource: &str, code: &str, journal_before: u64) {
        let audit = self.wait_audit(&format!("`{resource}` refused with `{code}`"), |a| {
            a.refused(resource, code) > 0
        });
        assert_eq!(
            audit.issued(resource),
            0,
            "`{resource}` was refused but an issued record names it:\n{}",
            audit.dump()
        );
        assert_eq!(
            self.journal_count(),
            journal_before,
            "the journal grew although `{resource}` was refused"
        );
    }

    /// For refusals before the issuer (TLS): after the audit settles, no `issued` record names
    /// `resource` and the journal still holds `journal_before` SVIDs.
    pub fn assert_nothing_issued(&self, resource: &str, journal_before: u64) {
        std::thread::sleep(AUDIT_SETTLE);
        let audit = self.audit();
        assert_eq!(
            audit.issued(resource),
            0,
            "an issued record names `{resource}`:\n{}",
            audit.dump()
        );
        assert_eq!(self.journal_count(), journal_before, "the journal grew");
    }

    /// `GET /metrics` on the admin HTTP port (with [`CaOptions::metrics`]).
    pub fn metrics(&self) -> String {
        let addr = self
            .admin_http
            .expect("start the ca with CaOptions::metrics");
        let mut tcp = StdTcpStream::connect(addr).expect("connect to the admin http port");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
            .expect("send the metrics request");
        let mut response = String::new();
        tcp.read_to_string(&mut response)
            .expect("read the metrics response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .expect("an http response has a header block");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    /// A sample's value in the `/metrics` text (`name` including any labels).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric `{name}` in:\n{text}"))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        self.log = self.temp.path().join(format!("ca-{}.log", self.starts));
        let log = fs::File::create(&self.log).expect("create the ca log");
        let mut command = meshward_command(&self.options.bin);
        command
            // The TLS layer logs refused handshakes at debug; tests read the reason there.
            .args([
                "--log",
                "info,meshward_ca::server::tls=debug",
                "--log-format",
                "json",
            ])
            .args(["ca", "run", "--trust-domain", TRUST_DOMAIN])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--admin-socket")
            .arg(&self.admin_socket);
        if let Some(audit) = &self.options.audit_file {
            command.arg("--audit-file").arg(audit);
        }
        if self.options.metrics {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        command
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().expect("spawn meshward ca run"));
    }

    /// Waits for the `ca serving` log line; panics with the log if the CA exits or takes too long.
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(serving) = parse_serving(&self.log()) {
                self.addr = serving.addr;
                self.admin_http = serving.admin_http;
                return;
            }
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().expect("poll the ca") {
                self.child = None;
                panic!(
                    "the ca exited before serving ({status}); log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the ca did not serve within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ca_verifier(&self) -> Arc<PeerVerifier> {
        let mut set = BundleSet::new();
        set.insert(self.bundle());
        Arc::new(
            PeerVerifier::new(Arc::new(set), [trust_domain()]).with_expected(Expected::Id(ca_id())),
        )
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, Signal::TERM);
        if wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
            signal(&child, Signal::KILL);
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for CaProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaProcess")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

/// An attested agent's SVID and key.
pub struct AgentSvid {
    /// `spiffe://example.org/meshward/agent/join/<node>`.
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The agent's key.
    pub key: SvidKey,
    /// The leaf's serial (lower-case hex).
    pub serial: String,
    /// `notAfter`, unix seconds.
    pub expires_at: i64,
}

impl AgentSvid {
    /// The SVID the CA returned for `id`'s `key`.
    fn issued(id: SpiffeId, key: SvidKey, svid: pb::X509Svid) -> Self {
        assert_eq!(svid.spiffe_id, id.as_str());
        Self {
            id,
            chain: svid
                .cert_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key,
            serial: svid.serial,
            expires_at: svid.expires_at,
        }
    }
}

/// The audit records of a CA's audit file at one moment.
#[derive(Debug, Clone)]
pub struct Audit {
    records: Vec<Value>,
}

impl Audit {
    /// Reads every complete line of `path` (a missing file is empty).
    pub fn read(path: &Path) -> Self {
        let text = fs::read_to_string(path).unwrap_or_default();
        // A line still being written has no newline yet: skip it.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let records = complete
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("audit line is not json ({e}): {line}"))
            })
            .collect();
        Self { records }
    }

    /// Every record.
    pub fn records(&self) -> &[Value] {
        &self.records
    }

    /// How many `issued` records name `resource` (the SPIFFE ID issued).
    pub fn issued(&self, resource: &str) -> usize {
        self.count(|r| decision(r) == "issued" && r["resource"] == resource)
    }

    /// How many `issued` records there are.
    pub fn issued_total(&self) -> usize {
        self.count(|r| decision(r) == "issued")
    }

    /// How many `refused` records name `resource` with reason `code`.
    pub fn refused(&self, resource: &str, code: &str) -> usize {
        self.count(|r| {
            decision(r) == "refused" && r["resource"] == resource && r["context"]["code"] == code
        })
    }

    /// How many `refused` records carry reason `code`, whatever they name.
    pub fn refused_code(&self, code: &str) -> usize {
        self.count(|r| decision(r) == "refused" && r["context"]["code"] == code)
    }

    /// The serials of every `issued` record.
    pub fn issued_serials(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| decision(r) == "issued")
            .filter_map(|r| r["serial"].as_str().map(str::to_owned))
            .collect()
    }

    /// The records, one per line, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for r in &self.records {
            let _ = writeln!(out, "{r}");
        }
        out
    }

    fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.records.iter().filter(|r| pred(r)).count()
    }
}

fn decision(record: &Value) -> &str {
    record["decision"].as_str().unwrap_or_default()
}

/// `example.org` as a [`TrustDomain`].
pub fn trust_domain() -> TrustDomain {
    TRUST_DOMAIN.parse().expect("trust domain")
}

/// `spiffe://example.org/meshward/agent/join/<node>`.
pub fn agent_id(node: &str) -> SpiffeId {
    SpiffeId::parse(&format!(
        "spiffe://{TRUST_DOMAIN}/meshward/agent/join/{node}"
    ))
    .expect("agent id")
}

/// `spiffe://example.org/meshward/ca`.
pub fn ca_id() -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/meshward/ca")).expect("ca id")
}

/// An `Attest` request with a join token.
pub fn attest_request(token: &str, csr: Vec<u8>) -> pb::AttestRequest {
    pb::AttestRequest {
        attestation: Some(pb::attest_request::Attestation::JoinToken(
            pb::JoinTokenAttestation {
                token: token.to_owned(),
            },
        )),
        csr,
    }
}

/// A workload SVID request for `id` with a fresh key's CSR.
pub fn workload_request(id: &str) -> pb::SvidRequest {
    let key = SvidKey::generate().expect("workload key");
    let spiffe_id = SpiffeId::parse(id).expect("workload id");
    pb::SvidRequest {
        spiffe_id: id.to_owned(),
        csr: make_csr(&key, &spiffe_id).expect("csr"),
        ..Default::default()
    }
}

/// A TLS channel to `addr` (HTTP/2 over `config`, which must offer ALPN `h2`).
pub async fn tls_channel(
    addr: SocketAddr,
    mut config: ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    Endpoint::from_static("http://ca.invalid")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("ca.invalid").expect("server name");
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
}

/// A sample's value in Prometheus text: the line `<name> <value>`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// `meshward` with no `MESHWARD_*` variables inherited, so the test's environment cannot change it.
fn meshward_command(bin: &Path) -> Command {
    let mut command = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHWARD_") {
            command.env_remove(name);
        }
    }
    command
}

fn parse_serving(log: &str) -> Option<Serving> {
    log.lines()
        .filter(|line| line.contains("\"ca serving\""))
        .find_map(|line| {
            let record: Value = serde_json::from_str(line).ok()?;
            let fields = &record["fields"];
            if fields["message"] != "ca serving" {
                return None;
            }
            let addr = fields["listen"].as_str()?.parse().ok()?;
            let admin_http = fields["admin_http"].as_str().and_then(|a| a.parse().ok());
            Some(Serving { addr, admin_http })
        })
}

fn signal(child: &Child, signal: Signal) {
    // ESRCH: it already exited (and is a zombie until reaped); nothing to do.
    let _ = kill_process(Pid::from_child(child), signal);
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => return None,
        }
    }
}
