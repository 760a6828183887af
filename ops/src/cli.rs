//! What meshward's binaries (`meshward`, and the sidecar-only `meshward-proxy`) share on the
//! command line: the log flags, one-line errors with sysexits codes, and stopping on a signal.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Exit code for a bad command line or setting (`EX_USAGE`).
pub const EX_USAGE: u8 = 64;

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Plain,
    /// One JSON object per line.
    Json,
}

/// `--log` and `--log-format`, global flags of every meshward binary (flatten into its parser).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter, in tracing's EnvFilter syntax (`info`, `meshward_proxy=debug`). Logs go to stderr.
    #[arg(
        long = "log",
        global = true,
        env = "MESHWARD_LOG",
        default_value = "warn",
        value_name = "FILTER"
    )]
    pub filter: String,
    /// Log line format.
    #[arg(long, global = true, env = "MESHWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Starts logging as these flags say ([`init_logging`]).
    pub fn init(&self) -> Result<(), LoggingError> {
        init_logging(&self.filter, self.log_format)
    }
}

/// A log filter that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The `--log` / `MESHWARD_LOG` value does not parse.
    #[error("invalid MESHWARD_LOG filter `{filter}`: {reason}")]
    Filter {
        /// The value given.
        filter: String,
        /// What the parser said.
        reason: String,
    },
    /// A global subscriber is already installed.
    #[error("cannot start logging: {0}")]
    Install(String),
}

/// Sends `tracing` events at `filter` (EnvFilter syntax: `info`, `meshward_proxy=debug`) to stderr.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), LoggingError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|e| LoggingError::Filter {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| LoggingError::Install(e.to_string()))
}

/// Prints `<program>: <error>` on one line of stderr and returns `code`.
pub fn fail(program: &str, code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    let line = error.to_string().replace('\n', " ");
    eprintln!("{program}: {line}");
    ExitCode::from(code)
}

/// What a command line that did not parse ends with: help or the version as clap renders them
/// (success; a missing subcommand prints help and is a usage error), any other error as one line
/// naming `--help` (`EX_USAGE`).
pub fn usage_error(program: &str, e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Best effort: a closed stdout is no reason to fail `--help`.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            let _ = e.print();
            ExitCode::from(EX_USAGE)
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let message = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{program}: {message} (see `{program} --help`)");
            ExitCode::from(EX_USAGE)
        }
    }
}

/// SIGTERM or SIGINT cancels `shutdown` (the long-running `part` then stops gracefully: `doing`
/// is what the log line says it does).
pub async fn cancel_on_signal(shutdown: CancellationToken, part: &str, doing: &str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the {part} with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: {doing}"),
        _ = int.recv() => tracing::info!("SIGINT: {doing}"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_names_the_value() {
        let e = init_logging("meshward=[", LogFormat::Plain).unwrap_err();
        let message = e.to_string();
        assert!(
            message.starts_with("invalid MESHWARD_LOG filter `meshward=[`"),
            "{message}"
        );
    }

    #[test]
    fn fail_returns_the_code() {
        assert_eq!(
            fail("meshward", EX_USAGE, &"bad\nthing"),
            ExitCode::from(64)
        );
    }
}
