//! The real kube-apiserver (v1.20.2 + etcd) for tests, through `scripts/kube-apiserver`.
//!
//! [`RealApiServer::shared`] is the one instance a test process uses: the already started instance in
//! `MESHWARD_KUBE_APISERVER_DIR` if set, else one started from the cached binary (stopped and removed
//! by the script's watchdog when the test process exits), else `None` — the caller prints
//! [`SKIP_MESSAGE`] and passes. [`RealApiServer::start_private`] starts a throwaway instance for tests
//! that restart the apiserver.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use thiserror::Error;

/// What a test prints when no real API server is available.
pub const SKIP_MESSAGE: &str = "skipping: no kube-apiserver (run scripts/kube-apiserver build)";

/// The environment variable naming a started instance's directory.
pub const DIR_ENV: &str = "MESHWARD_KUBE_APISERVER_DIR";

/// The real API server could not be started, attached or used.
#[derive(Debug, Clone, Error)]
pub enum RealError {
    /// `scripts/kube-apiserver` failed.
    #[error("`scripts/kube-apiserver {command}` failed ({status}): {stderr}")]
    Script {
        /// The subcommand and arguments.
        command: String,
        /// The exit status.
        status: String,
        /// The script's last lines of stderr.
        stderr: String,
    },
    /// A file of the instance could not be read, or the script not run.
    #[error("kube-apiserver instance in `{0}`: {1}")]
    Io(PathBuf, String),
    /// The instance's `env` file lacks a key.
    #[error("`{0}/env` has no `{1}`")]
    MissingKey(PathBuf, &'static str),
    /// kube could not build a client from the instance's kubeconfig.
    #[error("kubeconfig `{0}`: {1}")]
    Kubeconfig(PathBuf, String),
}

/// A started real API server.
#[derive(Debug)]
pub struct RealApiServer {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    /// Stop on drop (a private instance); the shared one is stopped by the script's watchdog.
    owned: bool,
    _scratch: Option<tempfile::TempDir>,
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        if self.owned {
            let _ = run_script(&["stop", &self.dir.to_string_lossy()]);
        }
    }
}

impl RealApiServer {
    /// The project's `scripts/kube-apiserver`.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver")
    }

    /// The cached kube-apiserver binary, if `scripts/kube-apiserver build` has run on this machine (or
    /// `MESHWARD_KUBE_APISERVER_BIN` names one).
    pub fn binary() -> Option<PathBuf> {
        let out = Command::new(Self::script()).arg("path").output().ok()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
    }

    /// The instance shared by this test process, started on first use; `Ok(None)` when there is none
    /// to be had (no `MESHWARD_KUBE_APISERVER_DIR`, no cached binary). A binary that fails to start is
    /// an error, not a skip.
    pub fn shared() -> Result<Option<&'static RealApiServer>, RealError> {
        static SHARED: OnceLock<Result<Option<RealApiServer>, RealError>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                if let Some(dir) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
                    return Self::attach(Path::new(&dir)).map(Some);
                }
                if Self::binary().is_none() {
                    return Ok(None);
                }
                let dir = std::env::temp_dir()
                    .join(format!("meshward-kube-apiserver-{}", std::process::id()));
                let pid = std::process::id().to_string();
                run_script(&[
                    "start",
                    &dir.to_string_lossy(),
                    "--watch-pid",
                    &pid,
                    "--cleanup",
                ])?;
                Self::attach(&dir).map(Some)
            })
            .as_ref()
            .map(Option::as_ref)
            .map_err(Clone::clone)
    }

    /// Starts a throwaway instance in its own scratch directory; stopped when dropped (or when this
    /// process exits). `Ok(None)` without a cached binary.
    pub fn start_private() -> Result<Option<RealApiServer>, RealError> {
        if Self::binary().is_none() {
            return Ok(None);
        }
        let scratch = tempfile::Builder::new()
            .prefix("meshward-kube-apiserver-")
            .tempdir()
            .map_err(|e| RealError::Io(std::env::temp_dir(), e.to_string()))?;
        let dir = scratch.path().join("instance");
        let pid = std::process::id().to_string();
        run_script(&["start", &dir.to_string_lossy(), "--watch-pid", &pid])?;
        let mut server = Self::attach(&dir)?;
        server.owned = true;
        server._scratch = Some(scratch);
        Ok(Some(server))
    }

    /// Uses an instance started by `scripts/kube-apiserver start DIR` (not stopped on drop).
    pub fn attach(dir: &Path) -> Result<RealApiServer, RealError> {
        let text = std::fs::read_to_string(dir.join("env"))
            .map_err(|e| RealError::Io(dir.to_owned(), e.to_string()))?;
        let env = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(RealApiServer {
            dir: dir.to_owned(),
            env,
            owned: false,
            _scratch: None,
        })
    }

    /// The instance's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A key of the instance's `env` file (`APISERVER_URL`, `ETCD_ENDPOINT`, `ADMIN_TOKEN`, ...).
    pub fn env(&self, key: &'static str) -> Result<&str, RealError> {
        self.env
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| RealError::MissingKey(self.dir.clone(), key))
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> Result<&str, RealError> {
        self.env("APISERVER_URL")
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`), for `etcdctl`.
    pub fn etcd_endpoint(&self) -> Result<&str, RealError> {
        self.env("ETCD_ENDPOINT")
    }

    /// The admin kubeconfig (group `system:masters`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The least-privilege `meshward-ca` kubeconfig.
    pub fn kubeconfig_ca_path(&self) -> PathBuf {
        self.dir.join("kubeconfig-ca")
    }

    /// The serving CA, PEM.
    pub fn ca_pem(&self) -> Result<String, RealError> {
        std::fs::read_to_string(self.dir.join("ca.crt"))
            .map_err(|e| RealError::Io(self.dir.clone(), e.to_string()))
    }

    /// A `kube::Config` for the admin identity.
    pub async fn config(&self) -> Result<kube::Config, RealError> {
        config_from_file(&self.kubeconfig_path()).await
    }

    /// A `kube::Config` for the least-privilege `meshward-ca` identity.
    pub async fn ca_config(&self) -> Result<kube::Config, RealError> {
        config_from_file(&self.kubeconfig_ca_path()).await
    }

    /// A `kube::Config` that authenticates with `token` (a service-account token, say).
    pub async fn config_for_token(&self, token: &str) -> Result<kube::Config, RealError> {
        let mut config = self.config().await?;
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.to_owned().into()),
            ..Default::default()
        };
        Ok(config)
    }

    /// An admin `kube::Client`.
    pub async fn client(&self) -> Result<kube::Client, RealError> {
        kube::Client::try_from(self.config().await?)
            .map_err(|e| RealError::Kubeconfig(self.kubeconfig_path(), e.to_string()))
    }

    /// Stops and starts the apiserver process (same port, same etcd): watches break, and the new watch
    /// cache starts at etcd's current revision, so resuming from an older one gets the in-stream 410.
    pub fn restart_apiserver(&self) -> Result<(), RealError> {
        run_script(&["restart-apiserver", &self.dir.to_string_lossy()]).map(|_| ())
    }
}

fn run_script(args: &[&str]) -> Result<String, RealError> {
    let script = RealApiServer::script();
    let out = Command::new(&script)
        .args(args)
        .output()
        .map_err(|e| RealError::Io(script.clone(), e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(RealError::Script {
            command: args.join(" "),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn config_from_file(path: &Path) -> Result<kube::Config, RealError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| RealError::Kubeconfig(path.to_owned(), e.to_string()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| RealError::Kubeconfig(path.to_owned(), e.to_string()))
}
