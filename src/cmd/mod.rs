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
    meshward_ops::cli::fail("meshward", code, error)
}

pub use meshward_ops::cli::cancel_on_signal;
