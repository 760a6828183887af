//! `meshward-proxy`: the sidecar alone. `meshward-proxy run` takes the flags, env and config
//! file of `meshward proxy run` ([`meshward_proxy::cli`]) and exits the same way.
//!
//! Why a binary of its own: every pod runs one, and a process maps the pages of its binary that
//! it touches. Without the CA, the agent, the Kubernetes client and SQLite linked in, the code a
//! sidecar runs sits in a third of the text, so each sidecar is smaller (docs/benchmarks.md,
//! "Proxy pair vs Envoy pair").

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshward_ops::cli::{EX_USAGE, LogArgs, fail, usage_error};
use meshward_proxy::cli::RunArgs;

const PROGRAM: &str = "meshward-proxy";

/// The meshward sidecar: mTLS in and out, Cedar authorization on every call, audit.
#[derive(Debug, Parser)]
#[command(name = "meshward-proxy", version, about)]
struct Cli {
    #[command(flatten)]
    logging: LogArgs,
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
    if let Err(e) = cli.logging.init() {
        return fail(PROGRAM, EX_USAGE, &e);
    }
    let Command::Run(args) = cli.command;
    meshward_proxy::cli::run(*args, PROGRAM)
}
