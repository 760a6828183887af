//! The subcommands, one module per part; each turns its typed arguments into an exit code.

pub mod agent;
pub mod audit;
pub mod ca;
pub mod check;
pub mod demo;
pub mod inject;
pub mod policy;
pub mod proxy;
pub mod svid;

use std::process::ExitCode;

use clap::ValueEnum;
use tokio_util::sync::CancellationToken;

/// Exit code when the answer is "no" (for example: the audit file is not intact).
pub const EX_NO: u8 = 1;

/// Exit code when an input file cannot be opened.
pub const EX_NOINPUT: u8 = 66;

/// Exit code when reading or writing fails part-way.
pub const EX_IOERR: u8 = 74;

/// How a command prints its result on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// One line for a person.
    #[default]
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// Prints `meshward: <error>` on one line and returns `code`.
pub fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    let line = error.to_string().replace('\n', " ");
    eprintln!("meshward: {line}");
    ExitCode::from(code)
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
