//! `meshward`: one binary for every part of the mesh, one subcommand per part.
//!
//! Exit codes follow sysexits where they apply, so scripts can tell "the answer is no" from "could
//! not ask":
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done; for checks, the answer is yes (the audit file is intact) |
//! | 1 | the answer is no (the audit file is not intact) |
//! | 64 | bad command line or environment value (`EX_USAGE`) |
//! | 66 | an input file cannot be opened (`EX_NOINPUT`) |
//! | 74 | reading or writing failed part-way (`EX_IOERR`) |
//!
//! Every error is one line on stderr; nothing here panics.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshward_ops::cli::{EX_USAGE, LogArgs, fail, usage_error};

const PROGRAM: &str = "meshward";

/// Zero-trust workload identity and authorization for service meshes.
#[derive(Debug, Parser)]
#[command(name = "meshward", version, about)]
struct Cli {
    #[command(flatten)]
    logging: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The node agent: attests workloads and serves them identities on a unix socket.
    Agent(cmd::agent::AgentArgs),
    /// Check and read audit files.
    Audit(cmd::audit::AuditArgs),
    /// The certificate authority: run it, and manage tokens, entries, agents and roots.
    Ca(cmd::ca::CaArgs),
    /// Exit non-zero, naming each, when a root, intermediate or SVID expires within a window.
    Check(cmd::check::CheckArgs),
    /// The whole mesh on 127.0.0.1: CA, agent, proxies, traffic, rotation and audit, live.
    Demo(cmd::demo::DemoArgs),
    /// Add the meshward proxy, as a native sidecar, to every pod template of a manifest.
    Inject(cmd::inject::InjectArgs),
    /// Validate policy sets, check a request against one, and diff two.
    Policy(cmd::policy::PolicyArgs),
    /// The sidecar: mTLS in and out, Cedar authorization on every call, audit.
    Proxy(cmd::proxy::ProxyArgs),
    /// Fetch this process's SVIDs from the agent's Workload API (and write them to files).
    Svid(cmd::svid::SvidArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(PROGRAM, &e),
    };
    if let Err(e) = cli.logging.init() {
        return fail(PROGRAM, EX_USAGE, &e);
    }
    let outcome = match cli.command {
        Command::Agent(args) => cmd::agent::run(args),
        Command::Audit(args) => cmd::audit::run(args),
        Command::Ca(args) => cmd::ca::run(args),
        Command::Check(args) => cmd::check::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Inject(args) => cmd::inject::run(args),
        Command::Policy(args) => cmd::policy::run(args),
        Command::Proxy(args) => Ok(cmd::proxy::run(args)),
        Command::Svid(args) => cmd::svid::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshward: {e:#}");
            ExitCode::from(cmd::EX_IOERR)
        }
    }
}
