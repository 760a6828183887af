//! `meshward audit query FILE [filters]`: the records that match, one per line.
//!
//! A query reads; it does not check the chain (that is `meshward audit verify`). Lines that are not
//! records are reported on stderr and skipped, so one damaged line does not hide the rest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use meshward_identity::audit::{
    AuditDecision, AuditKind, AuditReadError, AuditReader, AuditRecord, Mode, Timestamp,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::read_failure;
use super::summary::policy_labels;
use crate::cmd::Output;

/// Arguments of `meshward audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The audit file (one JSON record per line).
    #[arg(value_name = "FILE", env = "MESHWARD_AUDIT_FILE")]
    file: PathBuf,
    /// Only records with this outcome.
    #[arg(long, value_enum)]
    decision: Option<DecisionFilter>,
    /// Only records of this kind.
    #[arg(long, value_enum)]
    kind: Option<KindFilter>,
    /// Only records whose principal (the caller, or the agent for issuance) is exactly this ID.
    #[arg(long, value_name = "ID")]
    principal: Option<String>,
    /// Only records whose resource (the callee, or the issued identity) is exactly this ID.
    #[arg(long, value_name = "ID")]
    resource: Option<String>,
    /// Only records at or after this time: RFC 3339 (`2026-05-01T12:00:00Z`) or an age (`10m`, `1h`, `2d`).
    #[arg(long, value_name = "T", value_parser = since)]
    since: Option<Timestamp>,
    /// Output format: text lines for people, or the matching records as JSON lines.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

/// `--decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DecisionFilter {
    Allow,
    Deny,
    Issued,
    Refused,
}

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindFilter {
    Authz,
    Issuance,
}

/// Runs `meshward audit query`.
pub fn run(args: &QueryArgs) -> anyhow::Result<ExitCode> {
    let reader = match AuditReader::open(&args.file) {
        Ok(reader) => reader,
        Err(e) => return Ok(read_failure(&e)),
    };
    let mut skipped = 0u64;
    for item in reader {
        let read = match item {
            Ok(read) => read,
            Err(e @ AuditReadError::Io { .. }) => return Ok(read_failure(&e)),
            Err(e) => {
                eprintln!(
                    "meshward: audit file `{}`: {e}; skipped",
                    args.file.display()
                );
                skipped += 1;
                continue;
            }
        };
        if !matches(args, &read.record) {
            continue;
        }
        let line = match args.output {
            Output::Text => text_line(&read.record),
            Output::Json => serde_json::to_string(&read.record)?,
        };
        if !emit(&line)? {
            // The reader went away (`| head`): its choice, not an error.
            return Ok(ExitCode::SUCCESS);
        }
    }
    if skipped > 0 {
        eprintln!(
            "meshward: {skipped} lines of `{}` were not records; run `meshward audit verify` on it",
            args.file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn matches(args: &QueryArgs, record: &AuditRecord) -> bool {
    let decision = args.decision.is_none_or(|d| {
        record.decision
            == match d {
                DecisionFilter::Allow => AuditDecision::Allow,
                DecisionFilter::Deny => AuditDecision::Deny,
                DecisionFilter::Issued => AuditDecision::Issued,
                DecisionFilter::Refused => AuditDecision::Refused,
            }
    });
    let kind = args.kind.is_none_or(|k| {
        record.kind
            == match k {
                KindFilter::Authz => AuditKind::Authz,
                KindFilter::Issuance => AuditKind::Issuance,
            }
    });
    let principal = args
        .principal
        .as_deref()
        .is_none_or(|p| record.principal == p);
    let resource = args
        .resource
        .as_deref()
        .is_none_or(|r| record.resource == r || record.spiffe_id.as_deref() == Some(r));
    let since = args.since.is_none_or(|t| record.ts >= t);
    decision && kind && principal && resource && since
}

/// One record for people: time, outcome, who, what, on whom, and why.
fn text_line(r: &AuditRecord) -> String {
    let dry = if r.mode == Mode::DryRun {
        " (dry-run)"
    } else {
        ""
    };
    match r.kind {
        AuditKind::Authz => {
            let path = r
                .context
                .get("path")
                .and_then(|p| p.as_str())
                .filter(|p| !p.is_empty())
                .map(|p| format!(" {p}"))
                .unwrap_or_default();
            let caller = if r.principal.is_empty() {
                "(unknown caller)"
            } else {
                &r.principal
            };
            let mut line = format!(
                "{}  {:<5}{dry}  {caller} -> {} {}{path}  by {}",
                r.ts,
                r.decision,
                r.action,
                r.resource,
                policy_labels(r).join(", ")
            );
            if let Some(error) = r.errors.first() {
                line.push_str(&format!("  error: {error}"));
            }
            line.push_str(&format!("  id {}", r.id));
            line
        }
        AuditKind::Issuance => {
            let id = r.spiffe_id.as_deref().unwrap_or(&r.resource);
            let mut line = format!("{}  {:<7}  {id}  for {}", r.ts, r.decision, r.principal);
            if let Some(serial) = &r.serial {
                line.push_str(&format!("  serial {serial}"));
            }
            if let Some(not_after) = r.not_after {
                line.push_str(&format!("  not_after {not_after}"));
            }
            if let Some(error) = r.errors.first() {
                line.push_str(&format!("  error: {error}"));
            }
            line
        }
    }
}

/// Writes one line to stdout; `false` when the reader has gone (a closed pipe).
fn emit(line: &str) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

/// `--since`: RFC 3339, or an age counted back from now.
fn since(text: &str) -> Result<Timestamp, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(Timestamp::from(t));
    }
    let age: Duration = meshward_ca::config::parse_duration(text).map_err(|_| {
        format!(
            "`{text}` is neither an RFC 3339 time (`2026-05-01T12:00:00Z`) nor an age (`10m`, `2h`)"
        )
    })?;
    let age = time::Duration::try_from(age).map_err(|_| format!("age `{text}` is too long"))?;
    OffsetDateTime::now_utc()
        .checked_sub(age)
        .map(Timestamp::from)
        .ok_or_else(|| format!("age `{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_and_ages() {
        let t = since("2026-05-01T12:00:00Z").unwrap();
        assert_eq!(t.to_string(), "2026-05-01T12:00:00.000000Z");
        let t = since("2026-05-01T14:00:00+02:00").unwrap();
        assert_eq!(t.to_string(), "2026-05-01T12:00:00.000000Z");
        let ten_min = since("10m").unwrap().as_offset_date_time();
        let delta = OffsetDateTime::now_utc() - ten_min;
        assert!(delta >= time::Duration::minutes(10) && delta < time::Duration::minutes(11));
    }

    #[test]
    fn since_refuses_other_text() {
        for bad in ["yesterday", "", "2026-05-01", "10", "-5m"] {
            let err = since(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }
}
