//! `meshward svid fetch`: this process's X.509-SVIDs from the agent's Workload API.
//!
//! Uses the Workload API exactly as any workload would (our generated client, with the
//! `workload.spiffe.io: true` metadata): the agent attests *this* process. `--write DIR` writes the
//! default SVID as `svid.pem` (leaf, then intermediates), `svid.key` (PKCS#8 PEM, mode 0600) and
//! `bundle.pem` (the trust domain's roots); each file is written to a temporary name and renamed,
//! so a reader never sees half a file. `--json` prints the SPIFFE ID, serial and expiry of each
//! SVID as one JSON object.
//!
//! Exit codes: 0 done; 1 no identity, or the agent could not be reached or answered nonsense;
//! 64 bad flags; 74 the files could not be written.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use meshward_agent::workload_api::client::{self, ClientError, FetchedSvid};
use meshward_identity::proto::workload as pb;
use meshward_identity::x509::certs_to_pem;

use super::{EX_IOERR, EX_NO};

/// `meshward svid ...`
#[derive(Debug, Args)]
pub struct SvidArgs {
    #[command(subcommand)]
    command: SvidCommand,
}

#[derive(Debug, Subcommand)]
enum SvidCommand {
    /// Fetch this process's X.509-SVIDs from the agent's Workload API socket.
    Fetch(FetchArgs),
}

/// `meshward svid fetch`
#[derive(Debug, Args)]
struct FetchArgs {
    /// The agent's Workload API socket.
    #[arg(long, env = "MESHWARD_SVID_SOCKET", value_name = "PATH")]
    socket: PathBuf,
    /// Write `svid.pem`, `svid.key` and `bundle.pem` of the default SVID into this directory.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Print the SVIDs as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this long (`10s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Duration,
}

/// Why fetching failed, each with its exit code.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no identity for this process: {0}")]
    NoIdentity(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the workload api refused the call ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the workload api at `{}` ended the stream without an svid", .0.display())]
    NoMessage(PathBuf),
    #[error("no answer from the workload api at `{}` within {timeout:?}; is the agent running?", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("cannot write `{}`: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// Runs `meshward svid ...` and says how it ended.
pub fn run(args: SvidArgs) -> anyhow::Result<ExitCode> {
    let SvidCommand::Fetch(args) = args.command;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let fetched = runtime.block_on(async {
        tokio::time::timeout(args.timeout, fetch(&args.socket))
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Timeout {
                    socket: args.socket.clone(),
                    timeout: args.timeout,
                })
            })
    });
    let svids = match fetched {
        Ok(svids) => svids,
        Err(e) => return Ok(super::fail(EX_NO, &e)),
    };
    let mut written = None;
    if let (Some(dir), Some(default)) = (&args.write, svids.first()) {
        if let Err(e) = write_files(dir, default) {
            return Ok(super::fail(EX_IOERR, &e));
        }
        written = Some(dir);
    }
    let mut out = io::stdout().lock();
    let printed = if args.json {
        writeln!(out, "{}", json(&svids, written.map(PathBuf::as_path)))
    } else {
        text(&mut out, &svids, written.map(PathBuf::as_path))
    };
    // A closed stdout (`| head`) is no reason to report failure after the files were written.
    let _ = printed;
    Ok(ExitCode::SUCCESS)
}

async fn fetch(socket: &Path) -> Result<Vec<FetchedSvid>, FetchError> {
    let mut api = client::connect(socket).await?;
    let refused = |status: tonic::Status| match status.code() {
        tonic::Code::PermissionDenied => FetchError::NoIdentity(status.message().to_owned()),
        code => FetchError::Refused {
            code,
            message: status.message().to_owned(),
        },
    };
    let mut stream = api
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .map_err(refused)?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(refused)?
        .ok_or_else(|| FetchError::NoMessage(socket.to_path_buf()))?;
    Ok(client::parse_x509_response(&first)?)
}

/// Writes the three files of `svid` into `dir` (created if missing).
fn write_files(dir: &Path, svid: &FetchedSvid) -> Result<(), FetchError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(failed(dir))?;
    let files = [
        ("svid.pem", certs_to_pem(svid.svid.chain()), 0o644),
        ("svid.key", svid.key.to_pkcs8_pem(), 0o600),
        ("bundle.pem", svid.bundle.to_pem(), 0o644),
    ];
    for (name, contents, mode) in files {
        let path = dir.join(name);
        write_atomically(&path, contents.as_bytes(), mode).map_err(failed(&path))?;
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, created with `mode` (so a key is never
/// readable by others, not even for a moment), then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        // `mode` is filtered by the umask on create, and an old temp file keeps its mode.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn json(svids: &[FetchedSvid], written: Option<&Path>) -> serde_json::Value {
    let svids: Vec<serde_json::Value> = svids
        .iter()
        .map(|s| {
            serde_json::json!({
                "spiffe_id": s.svid.spiffe_id().as_str(),
                "serial": s.svid.serial(),
                "expires_at": rfc3339(s.svid.not_after()),
                "hint": s.hint,
            })
        })
        .collect();
    let mut out = serde_json::json!({ "svids": svids });
    if let (Some(dir), Some(map)) = (written, out.as_object_mut()) {
        map.insert("written".into(), dir.display().to_string().into());
    }
    out
}

fn text(out: &mut impl io::Write, svids: &[FetchedSvid], written: Option<&Path>) -> io::Result<()> {
    for s in svids {
        writeln!(
            out,
            "{}  serial {}  expires {}",
            s.svid.spiffe_id(),
            s.svid.serial(),
            rfc3339(s.svid.not_after())
        )?;
    }
    if let Some(dir) = written {
        writeln!(
            out,
            "wrote svid.pem, svid.key and bundle.pem to {}",
            dir.display()
        )?;
    }
    Ok(())
}

/// `2025-01-31T12:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = meshward_agent::config::parse_duration(text).map_err(|e| e.to_string())?;
    if timeout.is_zero() {
        return Err("the timeout must be longer than zero".into());
    }
    Ok(timeout)
}
