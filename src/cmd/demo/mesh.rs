//! The demo's real processes: the CA, the agent and one proxy per service, each the `meshward`
//! binary started as a child, and the one-shot admin commands that wire them together.
//!
//! Children get their own process group, so a Ctrl-C in the terminal reaches only the demo, which
//! then stops them in order (proxies, agent, CA): SIGTERM, then SIGKILL after a grace period. When
//! `setpriv` is there, each child also gets a parent-death signal, so even a SIGKILLed demo leaves
//! nothing running.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use rustix::process::{Pid, Signal, kill_process};
use tokio_util::sync::CancellationToken;

use super::{SERVICES, Service, TRUST_DOMAIN};

/// The node name the agent attests as.
pub const NODE: &str = "demo-node";
/// How long a child gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(8);
/// How long starting any one part may take.
const START_TIMEOUT: Duration = Duration::from_secs(45);
/// Unix sockets paths are limited to 108 bytes with the NUL.
const MAX_SOCKET_PATH: usize = 100;

/// Policies built into the binary, so the demo works from any directory.
const POLICIES: [(&str, &str); 2] = [
    (
        "shop.cedar",
        include_str!("../../../policies/demo/shop.cedar"),
    ),
    (
        "guardrails.cedar",
        include_str!("../../../policies/demo/guardrails.cedar"),
    ),
];

/// How services get distinct identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Root with `setpriv`: each proxy runs as its own uid, from its own binary path.
    Uids,
    /// Each proxy runs from its own binary path, as the demo's user.
    Paths,
}

impl Isolation {
    /// One line saying what the mode is and how to get the other.
    pub fn describe(self) -> String {
        match self {
            Isolation::Uids => format!(
                "root: each proxy runs as its own uid ({}..{}) from its own binary path; entries select `unix:uid` and `unix:path`",
                uid_of(0),
                uid_of(SERVICES.len().saturating_sub(1))
            ),
            Isolation::Paths => "unprivileged: each proxy runs from its own binary path (a hard link or copy of meshward); entries select `unix:path` (run as root for distinct uids too)".to_owned(),
        }
    }
}

/// The uid service `index` runs as in [`Isolation::Uids`] mode.
pub fn uid_of(index: usize) -> u32 {
    64101 + u32::try_from(index).unwrap_or(0)
}

/// Where everything lives under the data dir.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The data dir.
    pub root: PathBuf,
    /// The CA's data dir.
    pub ca: PathBuf,
    /// The agent's data dir.
    pub agent: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The trust bundle the agent starts from.
    pub bundle: PathBuf,
    /// The policy set the proxies enforce.
    pub policies: PathBuf,
    /// Child logs.
    pub logs: PathBuf,
    /// Per-service binaries.
    pub bin: PathBuf,
}

impl Layout {
    /// The layout under `root` (absolute).
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_owned(),
            ca: root.join("ca"),
            agent: root.join("agent"),
            socket: root.join("agent.sock"),
            bundle: root.join("bundle.pem"),
            policies: root.join("policies"),
            logs: root.join("logs"),
            bin: root.join("bin"),
        }
    }

    /// The CA's issuance audit file.
    pub fn ca_audit(&self) -> PathBuf {
        self.ca.join("audit.jsonl")
    }

    /// A service's proxy binary.
    pub fn proxy_bin(&self, service: &Service) -> PathBuf {
        self.bin.join(format!("{}-proxy", service.name))
    }

    /// A service's directory (its proxy's audit file).
    pub fn service_dir(&self, service: &Service) -> PathBuf {
        self.root.join(service.name)
    }

    /// A service's proxy audit file.
    pub fn proxy_audit(&self, service: &Service) -> PathBuf {
        self.service_dir(service).join("audit.jsonl")
    }

    /// Creates the directories, writes the policies and links the per-service binaries.
    pub fn prepare(&self, isolation: Isolation) -> anyhow::Result<()> {
        if self.socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the data dir `{}` is too long for a unix socket inside it; pick a shorter --out",
                self.root.display()
            );
        }
        for dir in [&self.logs, &self.bin, &self.policies] {
            fs::create_dir_all(dir).with_context(|| format!("create `{}`", dir.display()))?;
        }
        // Proxies may run as other uids: they must reach their binary, the policies and the socket.
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("make `{}` traversable", self.root.display()))?;
        if isolation == Isolation::Uids {
            for dir in self.root.ancestors().skip(1) {
                let mode = fs::metadata(dir)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0);
                if mode & 0o001 == 0 {
                    bail!(
                        "the proxies run as their own uids and cannot enter `{}` (mode {mode:o}): pick an --out dir other users can reach, e.g. under /tmp",
                        dir.display()
                    );
                }
            }
        }
        for (name, text) in POLICIES {
            let path = self.policies.join(name);
            fs::write(&path, text).with_context(|| format!("write `{}`", path.display()))?;
        }
        let exe = std::env::current_exe().context("find the meshward binary")?;
        for (index, service) in SERVICES.iter().enumerate() {
            let bin = self.proxy_bin(service);
            // A hard link is free; another file system needs a copy. Either way the path differs,
            // and the path is what the `unix:path` selector sees in `/proc/<pid>/exe`.
            if fs::hard_link(&exe, &bin).is_err() {
                fs::copy(&exe, &bin)
                    .with_context(|| format!("copy `{}` to `{}`", exe.display(), bin.display()))?;
            }
            let dir = self.service_dir(service);
            fs::create_dir_all(&dir).with_context(|| format!("create `{}`", dir.display()))?;
            if isolation == Isolation::Uids {
                let uid = uid_of(index);
                std::os::unix::fs::chown(&dir, Some(uid), Some(uid))
                    .with_context(|| format!("give `{}` to uid {uid}", dir.display()))?;
            }
        }
        Ok(())
    }
}

/// Picks the isolation mode: uids when root and `setpriv` works.
pub fn detect_isolation() -> Isolation {
    if rustix::process::geteuid().is_root() && setpriv_available() {
        Isolation::Uids
    } else {
        Isolation::Paths
    }
}

fn setpriv_available() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One running child.
#[derive(Debug)]
struct Running {
    name: String,
    /// Stop order: higher stops first.
    tier: u8,
    child: Child,
    log: PathBuf,
}

/// The demo's children.
#[derive(Debug)]
pub struct Children {
    running: Vec<Running>,
    setpriv: bool,
}

impl Children {
    /// No children yet.
    pub fn new() -> Self {
        Children {
            running: Vec::new(),
            setpriv: setpriv_available(),
        }
    }

    /// A `meshward` command for a child: no inherited `MESHWARD_*` settings, logs to a file.
    pub fn command(&self, program: &Path, uid: Option<u32>) -> Command {
        let mut command = if self.setpriv {
            let mut c = Command::new("setpriv");
            if let Some(uid) = uid {
                c.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()])
                    .arg("--clear-groups");
            }
            // A safety net: if the demo dies without stopping us, so do we.
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHWARD_") {
                command.env_remove(key);
            }
        }
        command.args(["--log", "info", "--log-format", "json"]);
        command
    }

    /// Starts `command` as child `name`, its stderr in `logs/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        tier: u8,
        logs: &Path,
        mut command: Command,
    ) -> anyhow::Result<()> {
        let log = logs.join(format!("{name}.log"));
        let file = File::create(&log).with_context(|| format!("create `{}`", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("start the {name}"))?;
        self.running.push(Running {
            name: name.to_owned(),
            tier,
            child,
            log,
        });
        Ok(())
    }

    /// The first child that has exited, with its status and the end of its log.
    pub fn exited(&mut self) -> Option<(String, ExitStatus, String)> {
        for r in &mut self.running {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Some((r.name.clone(), status, log_tail(&r.log)));
            }
        }
        None
    }

    /// Stops every child, highest tier first: SIGTERM, then SIGKILL after the grace period.
    /// Returns the children that had to be killed.
    pub async fn stop_all(&mut self) -> Vec<String> {
        let mut killed = Vec::new();
        let mut tiers: Vec<u8> = self.running.iter().map(|r| r.tier).collect();
        tiers.sort_unstable();
        tiers.dedup();
        for tier in tiers.into_iter().rev() {
            let (group, rest): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|r| r.tier == tier);
            self.running = rest;
            killed.extend(stop_group(group).await);
        }
        killed
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Only reached with children left on an error path: nothing may outlive the demo.
        for r in &mut self.running {
            signal(&r.child, Signal::KILL);
            let _ = r.child.wait();
        }
    }
}

async fn stop_group(mut group: Vec<Running>) -> Vec<String> {
    for r in &group {
        signal(&r.child, Signal::TERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut killed = Vec::new();
    while !group.is_empty() {
        group.retain_mut(|r| !matches!(r.child.try_wait(), Ok(Some(_)) | Err(_)));
        if Instant::now() >= deadline {
            for r in &mut group {
                signal(&r.child, Signal::KILL);
                let _ = r.child.wait();
                killed.push(r.name.clone());
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    killed
}

fn signal(child: &Child, signal: Signal) {
    // ESRCH: it already exited and waits to be reaped; nothing to do.
    let _ = kill_process(Pid::from_child(child), signal);
}

/// The last lines of a log, for an error message.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(8);
    lines.get(start..).unwrap_or_default().join("\n")
}

/// Runs a one-shot `meshward` command (an admin command) and returns its stdout.
pub async fn meshward_output(args: Vec<String>) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("find the meshward binary")?;
    let shown = args.join(" ");
    let output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(exe);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHWARD_") {
                command.env_remove(key);
            }
        }
        command.args(&args).stdin(Stdio::null()).output()
    })
    .await
    .context("run a meshward command")?
    .with_context(|| format!("run `meshward {shown}`"))?;
    if !output.status.success() {
        bail!(
            "`meshward {shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).map_err(|_| anyhow!("`meshward {shown}` printed non-UTF-8"))
}

/// Waits until `ready` says yes, a child exits (an error naming it), time runs out, or `stop` fires.
pub async fn wait_for<F, Fut>(
    what: &str,
    children: &mut Children,
    stop: &CancellationToken,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some((name, status, log)) = children.exited() {
            bail!("the {name} exited ({status}) while waiting for {what}; its log ends:\n{log}");
        }
        if stop.is_cancelled() {
            bail!(Interrupted);
        }
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Start-up was cut short by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Whether something accepts TCP connections at `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The SPIFFE ID of a service.
pub fn spiffe_id(service: &Service) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{}", service.name)
}
