//! `meshward check`: does a root, an intermediate or an SVID expire soon?
//!
//! Sources, any combination: `--data-dir D` (the CA's authorities and bundle: over its admin socket
//! `D/admin.sock` when the CA runs, else read from its SQLite state), `--socket PATH` (the SVIDs and
//! bundle the Workload API hands to this process), `--cert FILE` (PEM certificates).
//!
//! Exit codes: 0 nothing expires within the window, 1 something does (each named on stderr and in
//! the output), 64 bad flags, 66 a certificate file cannot be read, 74 a source cannot be read.

use std::collections::HashSet;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use meshward_ca::config::{ADMIN_SOCKET_FILE, parse_duration};
use meshward_ca::datastore::{AuthorityState, DB_FILE, Datastore};
use meshward_identity::proto::ca as ca_pb;
use meshward_identity::proto::workload as wl_pb;
use meshward_identity::x509::certs_from_pem;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{EX_IOERR, EX_NO, EX_NOINPUT, Output};

/// Exit code for bad flags.
const EX_USAGE: u8 = 64;

/// Arguments of `meshward check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Warn about anything that expires within this long (`7d`, `12h`, `30m`).
    #[arg(long, default_value = "7d", value_parser = window, env = "MESHWARD_CHECK_WITHIN")]
    within: Duration,
    /// A CA data dir: check its roots and intermediates (via `D/admin.sock`, or its SQLite state).
    #[arg(long, value_name = "D", env = "MESHWARD_CHECK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An agent's Workload API socket: check the SVIDs (and their chains and bundle) it gives us.
    #[arg(long, value_name = "PATH", env = "MESHWARD_CHECK_SOCKET")]
    socket: Option<PathBuf>,
    /// A PEM file with one or more certificates; repeat for more.
    #[arg(long = "cert", value_name = "FILE")]
    certs: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

/// What a certificate is, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// A self-signed CA certificate.
    Root,
    /// A CA certificate signed by another.
    Intermediate,
    /// A leaf with a SPIFFE ID.
    Svid,
    /// Any other leaf.
    Leaf,
}

impl CertKind {
    fn as_str(self) -> &'static str {
        match self {
            CertKind::Root => "root",
            CertKind::Intermediate => "intermediate",
            CertKind::Svid => "svid",
            CertKind::Leaf => "leaf",
        }
    }
}

/// One certificate checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Where it came from (`ca authority active`, a file path, `workload api`).
    pub source: String,
    /// Root, intermediate or SVID.
    pub kind: CertKind,
    /// The SPIFFE ID when it has one, else the subject.
    pub name: String,
    /// Its notAfter, unix seconds.
    pub not_after: i64,
    /// Seconds left (negative: already expired).
    pub remaining: i64,
}

/// Why a certificate or a source could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A PEM file could not be read.
    #[error("cannot read certificate file `{}`: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A PEM file holds no certificate, or bad PEM.
    #[error("`{source_name}` holds no usable certificate: {reason}")]
    NoCertificate {
        /// The file or source.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A certificate does not parse.
    #[error("a certificate from `{source_name}` does not parse: {reason}")]
    BadCertificate {
        /// The file or source.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A source (socket, data dir) could not be read.
    #[error("{0}")]
    Source(String),
}

/// Runs `meshward check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    if args.data_dir.is_none() && args.socket.is_none() && args.certs.is_empty() {
        eprintln!(
            "meshward: say what to check: `--data-dir D` (a CA), `--socket PATH` (a Workload API) or `--cert FILE`"
        );
        return Ok(ExitCode::from(EX_USAGE));
    }
    let now = unix(SystemTime::now());
    let mut checked = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |checked: &mut Vec<Checked>, source: &str, der: &[u8]| {
        if !seen.insert(der.to_vec()) {
            return Ok(());
        }
        checked.push(inspect(source, der, now)?);
        Ok::<(), CheckError>(())
    };
    let outcome: Result<(), CheckError> = (|| {
        for path in &args.certs {
            let source = path.display().to_string();
            for der in read_pem_file(path)? {
                add(&mut checked, &source, der.as_ref())?;
            }
        }
        if args.data_dir.is_some() || args.socket.is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CheckError::Source(format!("cannot start the async runtime: {e}")))?;
            if let Some(dir) = &args.data_dir {
                for (source, der) in runtime.block_on(ca_certificates(dir))? {
                    add(&mut checked, &source, &der)?;
                }
            }
            if let Some(socket) = &args.socket {
                for (source, der) in runtime.block_on(workload_certificates(socket))? {
                    add(&mut checked, &source, &der)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        eprintln!("meshward: {e}");
        return Ok(ExitCode::from(match e {
            CheckError::Open { .. } => EX_NOINPUT,
            CheckError::NoCertificate { .. } | CheckError::BadCertificate { .. } => EX_NOINPUT,
            CheckError::Source(_) => EX_IOERR,
        }));
    }
    let within = i64::try_from(args.within.as_secs()).unwrap_or(i64::MAX);
    let expiring: Vec<&Checked> = checked.iter().filter(|c| c.remaining <= within).collect();
    for c in &expiring {
        let when = if c.remaining <= 0 {
            "has expired".to_owned()
        } else {
            format!("expires in {}", human(c.remaining))
        };
        eprintln!(
            "meshward: {} `{}` ({}) {when}, at {}",
            c.kind.as_str(),
            c.name,
            c.source,
            utc(c.not_after)
        );
    }
    match args.output {
        Output::Text => {
            for c in &checked {
                let mark = if c.remaining <= within {
                    "EXPIRING"
                } else {
                    "ok"
                };
                say(&format!(
                    "{mark:<8}  {:<12}  {}  not_after {} ({} left)  from {}",
                    c.kind.as_str(),
                    c.name,
                    utc(c.not_after),
                    human(c.remaining.max(0)),
                    c.source
                ))?;
            }
            say(&format!(
                "{} certificates checked, {} expire within {}",
                checked.len(),
                expiring.len(),
                meshward_ca::config::format_duration(args.within)
            ))?;
        }
        Output::Json => {
            let items: Vec<Value> = checked
                .iter()
                .map(|c| {
                    json!({
                        "source": c.source,
                        "kind": c.kind.as_str(),
                        "name": c.name,
                        "not_after": utc(c.not_after),
                        "remaining_seconds": c.remaining,
                        "expiring": c.remaining <= within,
                    })
                })
                .collect();
            say(&json!({
                "within_seconds": within,
                "ok": expiring.is_empty(),
                "certificates": items,
            })
            .to_string())?;
        }
    }
    Ok(if expiring.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    })
}

/// Classifies one DER certificate and computes the time it has left.
pub fn inspect(source: &str, der: &[u8], now: i64) -> Result<Checked, CheckError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CheckError::BadCertificate {
        source_name: source.to_owned(),
        reason: e.to_string(),
    })?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
                _ => None,
            })
        });
    let kind = match (is_ca, cert.subject() == cert.issuer()) {
        (true, true) => CertKind::Root,
        (true, false) => CertKind::Intermediate,
        (false, _) if spiffe_id.is_some() => CertKind::Svid,
        (false, _) => CertKind::Leaf,
    };
    let subject = cert.subject().to_string();
    let name = match spiffe_id {
        Some(id) if subject.is_empty() || kind == CertKind::Svid => id,
        Some(id) => format!("{id} ({subject})"),
        None => subject,
    };
    let not_after = cert.validity().not_after.timestamp();
    Ok(Checked {
        source: source.to_owned(),
        kind,
        name,
        not_after,
        remaining: not_after.saturating_sub(now),
    })
}

fn read_pem_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckError::Open {
        path: path.to_owned(),
        source,
    })?;
    let certs = certs_from_pem(&text).map_err(|e| CheckError::NoCertificate {
        source_name: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(CheckError::NoCertificate {
            source_name: path.display().to_string(),
            reason: "no `CERTIFICATE` block".to_owned(),
        });
    }
    Ok(certs)
}

/// The CA's authorities (not retired) and bundle roots: over the admin socket, or from SQLite
/// when the CA is not running.
async fn ca_certificates(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, CheckError> {
    let socket = dir.join(ADMIN_SOCKET_FILE);
    match admin_certificates(&socket).await {
        Ok(certs) => return Ok(certs),
        Err(e) => tracing::debug!(error = %e, "admin socket unusable; reading the datastore"),
    }
    if !dir.join(DB_FILE).is_file() {
        return Err(CheckError::Source(format!(
            "`{}` is not a ca data dir: no `{ADMIN_SOCKET_FILE}` answers and there is no `{DB_FILE}`",
            dir.display()
        )));
    }
    let store = Datastore::open(dir).map_err(|e| CheckError::Source(e.to_string()))?;
    let rows = store
        .list_authorities()
        .map_err(|e| CheckError::Source(e.to_string()))?;
    Ok(rows
        .into_iter()
        .filter(|a| a.state != AuthorityState::Retired)
        .map(|a| (format!("ca authority {}", a.state.as_str()), a.certificate))
        .collect())
}

async fn admin_certificates(socket: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut client = meshward_ca::admin::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let authorities = client
        .list_authorities(ca_pb::ListAuthoritiesRequest {})
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner()
        .authorities;
    let bundle = client
        .show_bundle(ca_pb::ShowBundleRequest {})
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut out: Vec<(String, Vec<u8>)> = authorities
        .into_iter()
        .filter(|a| a.state != AuthorityState::Retired.as_str())
        .map(|a| (format!("ca authority {}", a.state), a.certificate))
        .collect();
    out.extend(
        bundle
            .x509_authorities
            .into_iter()
            .map(|der| ("ca bundle".to_owned(), der)),
    );
    Ok(out)
}

/// The SVIDs the Workload API gives this process, their intermediates, and the bundle roots.
async fn workload_certificates(socket: &Path) -> Result<Vec<(String, Vec<u8>)>, CheckError> {
    use meshward_agent::workload_api::client::{connect, parse_x509_response, request};
    let unreachable = |e: &dyn std::fmt::Display| {
        CheckError::Source(format!(
            "cannot fetch svids from the workload api at `{}`: {e}",
            socket.display()
        ))
    };
    let mut client = connect(socket).await.map_err(|e| unreachable(&e))?;
    let mut stream = client
        .fetch_x509svid(request(wl_pb::X509svidRequest {}))
        .await
        .map_err(|s| unreachable(&s.message()))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| unreachable(&s.message()))?
        .ok_or_else(|| unreachable(&"the stream ended without an answer"))?;
    let svids = parse_x509_response(&first).map_err(|e| unreachable(&e))?;
    let mut out = Vec::new();
    for fetched in svids {
        let source = format!("workload api svid {}", fetched.svid.spiffe_id());
        for der in fetched.svid.chain() {
            out.push((source.clone(), der.as_ref().to_vec()));
        }
        for der in fetched.bundle.authorities() {
            out.push(("workload api bundle".to_owned(), der.as_ref().to_vec()));
        }
    }
    Ok(out)
}

fn window(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `3d4h`, `12m`, `40s`: the two largest units.
fn human(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `2025-01-31T12:00:00Z`.
fn utc(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix {secs}"),
    }
}

fn say(line: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_shows_two_units() {
        assert_eq!(human(40), "40s");
        assert_eq!(human(125), "2m5s");
        assert_eq!(human(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        assert_eq!(human(-5), "0s");
    }

    #[test]
    fn garbage_is_a_bad_certificate() {
        let err = inspect("x", b"not der", 0).unwrap_err();
        assert!(matches!(err, CheckError::BadCertificate { .. }), "{err:?}");
    }
}
