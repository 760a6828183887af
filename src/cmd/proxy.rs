//! `meshward proxy run`: the sidecar. Its flags, settings and exit codes are
//! [`meshward_proxy::cli`]'s, shared with the sidecar-only binary `meshward-proxy run`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use meshward_proxy::cli::RunArgs;

/// `meshward proxy ...`
#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(subcommand)]
    command: ProxyCommand,
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// Run the sidecar: mTLS in and out, a Cedar decision on every inbound call, an audit record each.
    Run(Box<RunArgs>),
}

/// Runs `meshward proxy ...` and says how it ended.
pub fn run(args: ProxyArgs) -> ExitCode {
    let ProxyCommand::Run(args) = args.command;
    meshward_proxy::cli::run(*args, "meshward")
}
