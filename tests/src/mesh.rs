//! The whole mesh as real processes, for the end-to-end scenarios (`tests/e2e_*.rs` at the root):
//! a `meshward ca run` on a fixed loopback port, one `meshward agent run` (join token), and two
//! sidecars, `client` and `server`, each a `meshward proxy run` started from its own hard link of
//! the binary (`DIR/bin/<name>-proxy`), so each gets its identity by real `unix:path` attestation.
//!
//! ```text
//! test --plain--> client proxy (outbound) --mTLS--> server proxy (inbound, Cedar, audit) --> App
//! ```
//!
//! The app is a small HTTP/1.1 server in the test process ([`App`]); `/slow` answers after
//! [`SLOW`]. Every child is SIGKILLed and reaped when its [`Proc`] drops, so a failed or panicking
//! test leaves nothing running. The CA keeps its port across restarts (the agent is started with
//! that address), which is why this harness does not use [`crate::CaProcess`], which rebinds on
//! `127.0.0.1:0`.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::{Audit, TRUST_DOMAIN, metric_value};

/// The node the agent attests as.
pub const NODE: &str = "e2e-node";
/// How long the app takes to answer `/slow`.
pub const SLOW: Duration = Duration::from_secs(3);
/// Longest any part may take to start (a debug build on a loaded two-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
/// Numbers proxy logs across restarts.
static PROXY_STARTS: AtomicU64 = AtomicU64::new(0);

/// The policies every mesh starts with: `client` may GET `server`, except `/admin`.
pub const BASE_POLICY: &str = r#"
@id("e2e-client-reads-server")
permit (
  principal == Workload::"spiffe://example.org/ns/e2e/sa/client",
  action == Action::"GET",
  resource == Workload::"spiffe://example.org/ns/e2e/sa/server"
);

@id("e2e-forbid-admin")
forbid (principal, action, resource)
when { context.path == "/admin" };
"#;

/// `spiffe://example.org/ns/e2e/sa/<name>`.
pub fn workload_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/e2e/sa/{name}")
}

/// How to start a [`Mesh`].
#[derive(Debug, Clone)]
pub struct MeshOptions {
    bin: PathBuf,
    svid_ttl: String,
    ca_args: Vec<String>,
}

impl MeshOptions {
    /// A mesh run by the `meshward` binary at `bin`, SVID TTL 1h.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            svid_ttl: "1h".to_owned(),
            ca_args: Vec::new(),
        }
    }

    /// The workload SVID lifetime (`--svid-ttl` and the entries' `--ttl`), e.g. `30s`.
    pub fn svid_ttl(mut self, ttl: &str) -> Self {
        ttl.clone_into(&mut self.svid_ttl);
        self
    }

    /// An extra `meshward ca run` flag and its value.
    pub fn ca_arg(mut self, flag: &str, value: &str) -> Self {
        self.ca_args.push(flag.to_owned());
        self.ca_args.push(value.to_owned());
        self
    }
}

/// One running child process, SIGKILLed and reaped on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn none(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            child: None,
            log: PathBuf::new(),
        }
    }

    fn spawn(name: &str, log: PathBuf, mut command: Command) -> Self {
        let file = fs::File::create(&log).expect("create a child log");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log (stderr, JSON lines).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (ignored once it has exited).
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill_process(Pid::from_child(child), signal);
        }
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("poll a child")
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill_process(Pid::from_child(&child), Signal::KILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM; it must exit within `timeout` (else SIGKILL and a failed test).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::TERM);
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "the {} did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.log()
                );
            }
        }
    }

    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.exited() {
            self.child = None;
            panic!(
                "the {} exited ({status}) while waiting for {what}; log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One sidecar's addresses and files.
#[derive(Debug, Clone)]
pub struct ProxyInfo {
    /// `client` or `server`.
    pub name: &'static str,
    /// Its SPIFFE ID.
    pub id: String,
    /// The hard link of meshward it runs from (its `unix:path` selector).
    pub bin: PathBuf,
    /// Its admin HTTP address (`/metrics`, `/ready`).
    pub admin: SocketAddr,
    /// Its audit file.
    pub audit: PathBuf,
}

/// The running mesh: CA, agent, app, server proxy in front of the app, client proxy calling it.
pub struct Mesh {
    options: MeshOptions,
    // Declared first so the processes below drop (die) before their directory goes.
    /// The client sidecar.
    pub client_proxy: Proc,
    /// The server sidecar.
    pub server_proxy: Proc,
    /// The agent.
    pub agent: Proc,
    /// The CA.
    pub ca: Proc,
    /// The app behind the server proxy.
    pub app: App,
    /// The client sidecar's addresses and files.
    pub client: ProxyInfo,
    /// The server sidecar's addresses and files.
    pub server: ProxyInfo,
    /// Plain HTTP in here reaches the server app through both sidecars.
    pub outbound: SocketAddr,
    /// The server proxy's mTLS listener.
    pub inbound: SocketAddr,
    /// The CA's agent API.
    pub ca_addr: SocketAddr,
    /// The CA's data dir.
    pub ca_dir: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The enforced policy directory.
    pub policies: PathBuf,
    /// The bundle the agent started from.
    pub bundle: PathBuf,
    root: PathBuf,
    ca_starts: u32,
    agent_starts: u32,
    temp: tempfile::TempDir,
}

impl Mesh {
    /// Starts everything and waits until both proxies are ready.
    pub fn start(options: MeshOptions) -> Self {
        let temp = tempfile::Builder::new()
            .prefix("mw-e2e")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = temp.path().to_owned();
        let ports = free_ports(6);
        let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
        let (ca_addr, outbound, inbound) = (addr(0), addr(1), addr(2));
        let ca_dir = root.join("ca");
        let policies = root.join("policies");
        for dir in ["logs", "bin", "policies", "agent"] {
            fs::create_dir_all(root.join(dir)).expect("create a mesh dir");
        }
        fs::write(policies.join("base.cedar"), BASE_POLICY).expect("write the policies");
        let proxy = |name: &'static str, admin: SocketAddr| {
            let bin = root.join("bin").join(format!("{name}-proxy"));
            if fs::hard_link(&options.bin, &bin).is_err() {
                fs::copy(&options.bin, &bin).expect("copy meshward");
            }
            ProxyInfo {
                name,
                id: workload_id(name),
                bin,
                admin,
                audit: root.join(format!("{name}-audit.jsonl")),
            }
        };
        let client = proxy("client", addr(3));
        let server = proxy("server", addr(4));
        let app = App::start();

        let mut mesh = Self {
            ca: Proc::none("ca"),
            agent: Proc::none("agent"),
            server_proxy: Proc::none("server-proxy"),
            client_proxy: Proc::none("client-proxy"),
            options,
            app,
            client,
            server,
            outbound,
            inbound,
            ca_addr,
            ca_dir,
            socket: root.join("agent.sock"),
            policies,
            bundle: root.join("bundle.pem"),
            root,
            ca_starts: 0,
            agent_starts: 0,
            temp,
        };
        mesh.start_ca();
        let bundle = mesh.ca_cli_ok(&["bundle", "show"]);
        fs::write(&mesh.bundle, bundle).expect("write the bundle");
        for info in [&mesh.client, &mesh.server] {
            mesh.register(&info.id, &info.bin);
        }
        let token = mesh.ca_cli_ok(&["token", "create", "--node", NODE]);
        mesh.start_agent(Some(token.trim()));
        mesh.server_proxy = mesh.spawn_proxy(&mesh.server.clone());
        mesh.client_proxy = mesh.spawn_proxy(&mesh.client.clone());
        mesh.wait_ready();
        mesh
    }

    /// The mesh's temp dir.
    pub fn dir(&self) -> &Path {
        self.temp.path()
    }

    /// Crashes the CA (SIGKILL) and starts it again on the same data dir and port.
    pub fn crash_and_restart_ca(&mut self) {
        self.ca.kill();
        self.start_ca();
    }

    /// Stops the agent (SIGTERM) and starts it again on its data dir (no join token: it is attested).
    pub fn restart_agent(&mut self) {
        let status = self.agent.terminate(Duration::from_secs(20));
        assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
        self.start_agent(None);
    }

    /// Restarts the server proxy (e.g. after a SIGTERM test) and waits until it is ready.
    pub fn restart_server_proxy(&mut self) {
        self.server_proxy.kill();
        self.server_proxy = self.spawn_proxy(&self.server.clone());
        self.wait_ready();
    }

    /// Waits until both proxies answer `/ready` with 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(self.client.admin) && ready(self.server.admin) {
                return;
            }
            self.server_proxy.assert_running("the proxies to be ready");
            self.client_proxy.assert_running("the proxies to be ready");
            self.agent.assert_running("the proxies to be ready");
            assert!(
                Instant::now() < deadline,
                "the proxies were not ready within {START_TIMEOUT:?}; server log:\n{}\nclient log:\n{}\nagent log:\n{}",
                self.server_proxy.log(),
                self.client_proxy.log(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `METHOD path` through the client sidecar: (status, body).
    pub fn call(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        http(self.outbound, method, path)
    }

    /// Runs `meshward <args>` from the plain binary.
    pub fn meshward(&self, args: &[&str]) -> Output {
        command(&self.options.bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run meshward")
    }

    /// A new hard link of meshward at `DIR/bin/<name>` (a fresh `unix:path` for attestation).
    pub fn link(&self, name: &str) -> PathBuf {
        let bin = self.root.join("bin").join(name);
        if fs::hard_link(&self.options.bin, &bin).is_err() {
            fs::copy(&self.options.bin, &bin).expect("copy meshward");
        }
        bin
    }

    /// Registers `id` for processes run from `bin` on this mesh's node.
    pub fn register(&self, id: &str, bin: &Path) {
        let selector = format!("unix:path:{}", bin.display());
        self.ca_cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--node",
            NODE,
            "--selector",
            &selector,
            "--ttl",
            &self.options.svid_ttl,
        ]);
    }

    /// `<bin> svid fetch --socket <agent socket> --json`, run from `bin` (so attested as it).
    pub fn fetch_as(&self, bin: &Path) -> Output {
        command(bin)
            .args(["svid", "fetch", "--json", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run svid fetch")
    }

    /// `meshward ca <args> --data-dir <ca dir>` (through the running CA's admin socket).
    pub fn ca_cli(&self, args: &[&str]) -> Output {
        command(&self.options.bin)
            .arg("ca")
            .args(args)
            .arg("--data-dir")
            .arg(&self.ca_dir)
            .stdin(Stdio::null())
            .output()
            .expect("run meshward ca")
    }

    /// [`Mesh::ca_cli`], asserting exit 0; returns stdout.
    pub fn ca_cli_ok(&self, args: &[&str]) -> String {
        let out = self.ca_cli(args);
        assert!(
            out.status.success(),
            "`meshward ca {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// The server proxy's audit records now.
    pub fn server_audit(&self) -> Audit {
        Audit::read(&self.server.audit)
    }

    /// Waits until the server proxy's audit satisfies `done`.
    pub fn wait_server_audit(&self, what: &str, done: impl Fn(&Audit) -> bool) -> Audit {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let audit = self.server_audit();
            if done(&audit) {
                return audit;
            }
            assert!(
                Instant::now() < deadline,
                "no server audit record for {what}; the file has:\n{}",
                audit.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `meshward audit verify FILE`, asserting it passes.
    pub fn assert_audit_verifies(&self, file: &Path) {
        let out = self.meshward(&["audit", "verify", &file.display().to_string()]);
        assert!(
            out.status.success(),
            "`meshward audit verify {}` failed: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A sample of a proxy's `/metrics` (`name` including any labels).
    pub fn proxy_metric(&self, admin: SocketAddr, name: &str) -> Option<f64> {
        let (status, body) = http(admin, "GET", "/metrics").ok()?;
        (status == 200).then(|| metric_value(&body, name)).flatten()
    }

    /// Writes (or replaces) `name` in the policy directory, atomically.
    pub fn write_policy(&self, name: &str, text: &str) {
        let tmp = self.root.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).expect("write a policy");
        fs::rename(&tmp, self.policies.join(name)).expect("move a policy in place");
    }

    fn start_ca(&mut self) {
        self.ca_starts += 1;
        let log = self.root.join(format!("logs/ca-{}.log", self.ca_starts));
        let mut cmd = command(&self.options.bin);
        cmd.args(["--log", "info", "--log-format", "json"])
            .args(["ca", "run", "--trust-domain", TRUST_DOMAIN])
            .args(["--listen", &self.ca_addr.to_string()])
            .arg("--data-dir")
            .arg(&self.ca_dir)
            .args(["--svid-ttl", &self.options.svid_ttl])
            .args(&self.options.ca_args);
        self.ca = Proc::spawn("ca", log, cmd);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.ca.log().contains("\"ca serving\"") {
            self.ca.assert_running("the ca to serve");
            assert!(
                Instant::now() < deadline,
                "the ca did not serve; log:\n{}",
                self.ca.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_agent(&mut self, token: Option<&str>) {
        self.agent_starts += 1;
        let log = self
            .root
            .join(format!("logs/agent-{}.log", self.agent_starts));
        let mut cmd = command(&self.options.bin);
        cmd.args(["--log", "info", "--log-format", "json"])
            .args(["agent", "run", "--ca", &self.ca_addr.to_string()])
            .arg("--trust-bundle")
            .arg(&self.bundle)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(self.root.join("agent"))
            .args(["--sync-interval", "1s"]);
        if let Some(token) = token {
            cmd.env("MESHWARD_AGENT_JOIN_TOKEN", token);
        }
        self.agent = Proc::spawn("agent", log, cmd);
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            self.agent.assert_running("the agent's socket");
            assert!(
                Instant::now() < deadline,
                "the agent did not serve; log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_proxy(&self, info: &ProxyInfo) -> Proc {
        let log = self.root.join(format!(
            "logs/{}-proxy-{}.log",
            info.name,
            PROXY_STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = command(&info.bin);
        cmd.args(["--log", "info", "--log-format", "json"])
            .args(["proxy", "run", "--node", NODE, "--drain-grace", "10s"])
            .args([
                "--policy-poll-interval",
                "200ms",
                "--upstream-http2",
                "false",
            ])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--policies")
            .arg(&self.policies)
            .arg("--audit")
            .arg(&info.audit)
            .args(["--admin", &info.admin.to_string()]);
        if info.name == "server" {
            cmd.args(["--inbound", &format!("{}={}", self.inbound, self.app.addr)]);
        } else {
            cmd.args([
                "--outbound",
                &format!("{}={},{}", self.outbound, self.inbound, self.server.id),
            ]);
        }
        Proc::spawn(&format!("{}-proxy", info.name), log, cmd)
    }
}

/// Continuous GETs through the client sidecar from a few threads, counting every outcome.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<String>>>,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Requests answered 200.
    pub ok: u64,
    /// Everything else, one line each.
    pub failures: Vec<String>,
}

impl Load {
    /// Starts `threads` loops of `GET path` against `addr`.
    pub fn start(addr: SocketAddr, path: &str, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, path) = (Arc::clone(&stop), Arc::clone(&ok), path.to_owned());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match http(addr, "GET", &path) {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, body)) => failures.push(format!("{status}: {body}")),
                            Err(e) => failures.push(format!("error: {e}")),
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    failures
                })
            })
            .collect();
        Self { stop, ok, threads }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the loops and reports.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.threads {
            failures.extend(t.join().expect("a load thread"));
        }
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            failures,
        }
    }
}

/// A tiny HTTP/1.1 app (keep-alive, content-length bodies): answers `<method> <path> ok`, and
/// `/slow` only after [`SLOW`]. Its threads end with the test process.
pub struct App {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl App {
    /// Starts it on a free port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the app");
        let addr = listener.local_addr().expect("app address");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || serve_app(stream, &counter));
            }
        });
        Self { addr, requests }
    }

    /// Requests it has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

fn serve_app(stream: TcpStream, counter: &AtomicU64) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone a stream"));
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        if path == "/slow" {
            std::thread::sleep(SLOW);
        }
        let reply = format!("{method} {path} ok\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One HTTP/1.1 exchange on a new connection (`connection: close`): (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(HTTP_TIMEOUT))?;
    let body = if method == "GET" { "" } else { "x" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: e2e\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes())?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an http response: {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status: {head}"),
            )
        })?;
    Ok((status, body.to_owned()))
}

/// Whether an admin port answers `/ready` with 200.
pub fn ready(admin: SocketAddr) -> bool {
    matches!(http(admin, "GET", "/ready"), Ok((200, _)))
}

/// Distinct free 127.0.0.1 ports (held until all are picked, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("port").port())
        .collect()
}

/// `program` with no `MESHWARD_*` variables from the test's environment.
fn command(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHWARD_") {
            command.env_remove(name);
        }
    }
    command
}
