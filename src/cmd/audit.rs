//! `meshward audit`: check and read audit files written by the CA and the proxies.

pub mod query;
pub mod summary;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use meshward_identity::audit::{
    Anchor, AuditReadError, AuditVerifyError, ChainHash, VerifyReport, verify_file_anchored,
};
use serde_json::json;
use tracing::debug;

use super::{EX_IOERR, EX_NO, EX_NOINPUT, Output};

/// Arguments of `meshward audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check that an audit file's hash chain is intact: no record edited, removed, added or reordered.
    ///
    /// Exits 0 and prints the record count and head hash when it is, 1 when it is not. Records removed
    /// from the end leave a valid shorter chain: keep the head and count printed by an earlier run
    /// somewhere else, and pass them as --expect-head / --expect-records to catch that too.
    Verify(VerifyArgs),
    /// Print the records that match: by outcome, kind, principal, resource, time.
    Query(query::QueryArgs),
    /// Who called whom, counts by decision and by deciding policy, and issuance counts.
    Summary(summary::SummaryArgs),
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The audit file (one JSON record per line).
    #[arg(value_name = "FILE", env = "MESHWARD_AUDIT_FILE")]
    file: PathBuf,
    /// A head hash printed by an earlier verify: the chain must still contain that record.
    #[arg(long, value_name = "HASH", env = "MESHWARD_AUDIT_EXPECT_HEAD")]
    expect_head: Option<ChainHash>,
    /// A record count printed by an earlier verify: the file must still have at least that many.
    #[arg(long, value_name = "N", env = "MESHWARD_AUDIT_EXPECT_RECORDS")]
    expect_records: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

/// Runs `meshward audit ...`.
pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Query(args) => query::run(&args),
        AuditCommand::Summary(args) => summary::run(&args),
    }
}

/// Reports a file that cannot be read (66 when it cannot be opened, 74 when reading fails).
fn read_failure(e: &AuditReadError) -> ExitCode {
    eprintln!("meshward: {e}");
    match e {
        AuditReadError::Open { .. } => ExitCode::from(EX_NOINPUT),
        _ => ExitCode::from(EX_IOERR),
    }
}

fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let anchor = Anchor {
        head: args.expect_head,
        records: args.expect_records,
    };
    let file = args.file.display();
    debug!(file = %file, anchored = anchor != Anchor::default(), "verifying audit file");
    match verify_file_anchored(&args.file, &anchor) {
        Ok(report) => {
            let text = intact_text(&file.to_string(), &report, &anchor);
            let json = json!({
                "file": file.to_string(),
                "intact": true,
                "records": report.records,
                "first_ts": report.first_ts.map(|t| t.to_string()),
                "last_ts": report.last_ts.map(|t| t.to_string()),
                "head": report.head.to_string(),
            });
            print_result(args.output, &text, &json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_tampering() => {
            eprintln!("audit file `{file}` is not intact: {e}");
            if args.output == Output::Json {
                let json = json!({
                    "file": file.to_string(),
                    "intact": false,
                    "line": e.line(),
                    "kind": e.kind(),
                    "error": e.to_string(),
                });
                print_stdout(&json.to_string())?;
            }
            Ok(ExitCode::from(EX_NO))
        }
        Err(e @ AuditVerifyError::Open { .. }) => {
            eprintln!("meshward: {e}");
            Ok(ExitCode::from(EX_NOINPUT))
        }
        Err(e) => {
            eprintln!("meshward: audit file `{file}`: {e}");
            Ok(ExitCode::from(EX_IOERR))
        }
    }
}

fn intact_text(file: &str, report: &VerifyReport, anchor: &Anchor) -> String {
    let anchored = if *anchor == Anchor::default() {
        ""
    } else {
        "; the anchor holds"
    };
    match (report.first_ts, report.last_ts) {
        (Some(first), Some(last)) => format!(
            "audit file `{file}` is intact: {} records from {first} to {last}, head {}{anchored}",
            report.records, report.head
        ),
        _ => format!("audit file `{file}` is intact: no records yet{anchored}"),
    }
}

fn print_result(output: Output, text: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    match output {
        Output::Text => print_stdout(text),
        Output::Json => print_stdout(&json.to_string()),
    }
}

/// Writes one line to stdout; unlike `println!`, a closed pipe is an error, not a panic.
fn print_stdout(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("write to stdout")
}
