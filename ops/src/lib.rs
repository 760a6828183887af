//! meshward-ops: what every long-running part (CA, agent, proxy) shares with its operator.
//!
//! - [`admin`]: the admin HTTP port, `/metrics` (Prometheus text), `/ready`, `/live`; each part
//!   brings its own metrics and readiness check.
//! - [`cli`]: what the binaries share on the command line: log flags, one-line errors with
//!   sysexits codes, stopping on SIGTERM/SIGINT.
//! - [`config`]: a part's TOML settings file and [`ConfigError`], said the same way by every part.
//! - [`duration`]: human durations in flags and config files (`30s`, `10m`, `1h30m`, `7d`), parsed
//!   with errors that say what is wrong, and shown back the same way.
//! - [`ports`]: free 127.0.0.1 ports for child processes (the demo, the benchmarks).
//!
//! It depends on nothing of ours, so any part can use it without importing another part.

pub mod admin;
pub mod cli;
pub mod config;
pub mod duration;
pub mod ports;

pub use admin::{AdminEndpoint, MetricsText, Readiness, ReadyCheck};
pub use config::ConfigError;
pub use duration::{DurationError, format_duration, parse_duration};
