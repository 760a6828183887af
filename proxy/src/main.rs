//! `meshward-proxy`: the sidecar alone. `meshward-proxy run` takes the flags, env and config
//! file of `meshward proxy run` ([`meshward_proxy::cli`]) and exits the same way.
//!
//! Why a binary of its own: every pod runs one, and a process maps the pages of its binary that
//! it touches. Without the CA, the agent, the Kubernetes client and SQLite linked in, the code a
//! sidecar runs sits in a third of the text, so each sidecar is smaller (docs/benchmarks.md,
//! "Proxy pair vs Envoy pair").

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshward_ops::cli::{EX_USAGE, LogFormat, fail, init_logging, usage_error};
use meshward_proxy::cli::RunArgs;

const PROGRAM: &str = "meshward-proxy";

/// The meshward sidecar: mTLS in and out, Cedar authorization on every call, audit.
#[derive(Debug, Parser)]
#[command(name = "meshward-proxy", version, about)]
struct Cli {
    /// Log filter, in tracing's EnvFilter syntax (`info`, `meshward_proxy=debug`). Logs go to stderr.
    #[arg(
        long = "log",
        global = true,
        env = "MESHWARD_LOG",
        default_value = "warn",
        value_name = "FILTER"
    )]
    log: String,
    /// Log line format.
    #[arg(long, global = true, env = "MESHWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar: mTLS in and out, a Cedar decision on every inbound call, an audit record each.
    Run(Box<RunArgs>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(PROGRAM, &e),
    };
    if let Err(e) = init_logging(&cli.log, cli.log_format) {
        return fail(PROGRAM, EX_USAGE, &e);
    }
    let Command::Run(args) = cli.command;
    meshward_proxy::cli::run(*args, PROGRAM)
}
