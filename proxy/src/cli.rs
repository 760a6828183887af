//! The sidecar's command line, shared by `meshward proxy run` and the sidecar-only binary
//! `meshward-proxy run` (same flags, same env, same exit codes).
//!
//! Settings come from flags, then `MESHWARD_PROXY_<SETTING>` env, then the `--config` TOML file
//! (keys named like the flags: `socket`, `policies`, `inbound`, ...). Exit codes: 0 stopped on
//! SIGTERM/SIGINT after draining, 1 the proxy failed, 64 a bad setting (or a policy set, schema
//! or audit file it cannot start with).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use meshward_ops::cli::{EX_USAGE, cancel_on_signal, fail};
use tokio_util::sync::CancellationToken;

use crate::ProxyError;
use crate::config::{ListenerSetting, ProxySettings};

/// Exit code when the proxy fails.
pub const EX_FAILED: u8 = 1;

/// The flags of `meshward proxy run` and `meshward-proxy run`; every flag also reads
/// `MESHWARD_PROXY_<SETTING>` and the `--config` file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; flags and env win over it.
    #[arg(long, env = "MESHWARD_PROXY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's Workload API unix socket.
    #[arg(long, env = "MESHWARD_PROXY_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Instead of `--socket`: a directory with svid.pem, svid.key and bundle.pem, watched for changes.
    #[arg(long, env = "MESHWARD_PROXY_SVID_DIR", value_name = "DIR")]
    svid_dir: Option<PathBuf>,
    /// The enforced policy set (a directory of `*.cedar` files).
    #[arg(long, env = "MESHWARD_PROXY_POLICIES", value_name = "DIR")]
    policies: Option<PathBuf>,
    /// A policy set whose decisions are audited and counted, never enforced.
    #[arg(long, env = "MESHWARD_PROXY_DRY_RUN_POLICIES", value_name = "DIR")]
    dry_run_policies: Option<PathBuf>,
    /// A Cedar schema replacing the built-in one.
    #[arg(long, env = "MESHWARD_PROXY_SCHEMA", value_name = "FILE")]
    schema: Option<PathBuf>,
    /// The audit file (hash-chained JSON lines).
    #[arg(long, env = "MESHWARD_PROXY_AUDIT", value_name = "FILE")]
    audit: Option<PathBuf>,
    /// The node name in audit records (default: the host name).
    #[arg(long, env = "MESHWARD_PROXY_NODE", value_name = "NAME")]
    node: Option<String>,
    /// Admin HTTP address for `/metrics`, `/ready`, `/live` (off by default).
    #[arg(long, env = "MESHWARD_PROXY_ADMIN", value_name = "ADDR")]
    admin: Option<String>,
    /// mTLS listener in front of the local app: `LISTEN=APP_ADDR[,tcp]`; repeat for more.
    #[arg(
        long,
        env = "MESHWARD_PROXY_INBOUND",
        value_name = "LISTEN=APP[,tcp]",
        value_delimiter = ';'
    )]
    inbound: Vec<String>,
    /// Plain listener for the local app, mTLS to the upstream: `LISTEN=UPSTREAM,SPIFFE_ID[,tcp]`.
    #[arg(
        long,
        env = "MESHWARD_PROXY_OUTBOUND",
        value_name = "LISTEN=UPSTREAM,ID[,tcp]",
        value_delimiter = ';'
    )]
    outbound: Vec<String>,
    /// Largest request header section, in bytes (default 16384; 431 beyond).
    #[arg(long, env = "MESHWARD_PROXY_MAX_HEADER_BYTES", value_name = "BYTES")]
    max_header_bytes: Option<usize>,
    /// Time a client has to send a request head (default 10s); an idle HTTP/1.1 keep-alive
    /// connection is closed after it too, and pooled upstream connections after half of it.
    #[arg(
        long,
        env = "MESHWARD_PROXY_HEADER_READ_TIMEOUT",
        value_name = "DURATION"
    )]
    header_read_timeout: Option<String>,
    /// Time a peer has to finish the TLS handshake (default 10s).
    #[arg(
        long,
        env = "MESHWARD_PROXY_HANDSHAKE_TIMEOUT",
        value_name = "DURATION"
    )]
    handshake_timeout: Option<String>,
    /// Concurrent HTTP/2 streams per connection (default 256).
    #[arg(
        long,
        env = "MESHWARD_PROXY_H2_MAX_CONCURRENT_STREAMS",
        value_name = "N"
    )]
    h2_max_concurrent_streams: Option<u32>,
    /// Time in-flight requests get to finish on SIGTERM (default 10s).
    #[arg(long, env = "MESHWARD_PROXY_DRAIN_GRACE", value_name = "DURATION")]
    drain_grace: Option<String>,
    /// Time an idle keep-alive connection to the local app is kept for reuse (default 1500ms);
    /// keep it below the app server's own idle timeout.
    #[arg(long, env = "MESHWARD_PROXY_APP_IDLE_TIMEOUT", value_name = "DURATION")]
    app_idle_timeout: Option<String>,
    /// How often the policy directories are checked for changes (default 1s).
    #[arg(
        long,
        env = "MESHWARD_PROXY_POLICY_POLL_INTERVAL",
        value_name = "DURATION"
    )]
    policy_poll_interval: Option<String>,
    /// Worker threads of the async runtime (default: one per CPU).
    #[arg(long, env = "MESHWARD_PROXY_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<usize>,
    /// Offer HTTP/2 to HTTP upstreams (default true); `false` speaks HTTP/1.1 to them.
    #[arg(long, env = "MESHWARD_PROXY_UPSTREAM_HTTP2", value_name = "BOOL")]
    upstream_http2: Option<bool>,
}

/// Runs the proxy until SIGTERM or SIGINT, and says how it ended; errors are printed as one
/// line prefixed with `program`.
pub fn run(args: RunArgs, program: &str) -> ExitCode {
    let flags = ProxySettings {
        socket: args.socket,
        svid_dir: args.svid_dir,
        policies: args.policies,
        dry_run_policies: args.dry_run_policies,
        schema: args.schema,
        audit: args.audit,
        node: args.node,
        admin: args.admin,
        inbound: args
            .inbound
            .into_iter()
            .map(ListenerSetting::Spec)
            .collect(),
        outbound: args
            .outbound
            .into_iter()
            .map(ListenerSetting::Spec)
            .collect(),
        max_header_bytes: args.max_header_bytes,
        header_read_timeout: args.header_read_timeout,
        handshake_timeout: args.handshake_timeout,
        h2_max_concurrent_streams: args.h2_max_concurrent_streams,
        drain_grace: args.drain_grace,
        app_idle_timeout: args.app_idle_timeout,
        policy_poll_interval: args.policy_poll_interval,
        worker_threads: args.worker_threads,
        upstream_http2: args.upstream_http2,
    };
    let file = match &args.config {
        Some(path) => match ProxySettings::from_file(path) {
            Ok(file) => file,
            Err(e) => return fail(program, EX_USAGE, &e),
        },
        None => ProxySettings::default(),
    };
    let config = match flags.or(file).into_config() {
        Ok(config) => config,
        Err(e) => return fail(program, EX_USAGE, &e),
    };
    let runtime = match crate::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            return fail(
                program,
                EX_FAILED,
                &format!("cannot start the async runtime: {e}"),
            );
        }
    };
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone(), "proxy", "draining"));
        crate::run(config, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // What the operator gave us cannot be used: a usage error, not a crash.
        Err(
            e @ (ProxyError::Config(_)
            | ProxyError::Schema(_)
            | ProxyError::Policy(_)
            | ProxyError::Audit(_)
            | ProxyError::Bind { .. }),
        ) => fail(program, EX_USAGE, &e),
        Err(e) => fail(program, EX_FAILED, &e),
    }
}
