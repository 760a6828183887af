//! `meshward agent run`: the node agent.
//!
//! Settings come from flags, then `MESHWARD_AGENT_<SETTING>` env, then the `--config` TOML file
//! (keys named like the flags: `ca`, `trust_bundle`, `join_token`, ...). Exit codes: 0 stopped on
//! SIGTERM/SIGINT, 1 the agent failed (e.g. its SVID expired while it was down), 64 a bad setting.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use meshward_agent::config::AgentSettings;
use tokio_util::sync::CancellationToken;

/// Exit code when the agent fails.
const EX_FAILED: u8 = 1;
/// Exit code for a bad flag or setting.
const EX_USAGE: u8 = 64;

/// `meshward agent ...`
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Run the node agent: attest to the CA, serve the Workload API and SDS on a unix socket.
    Run(Box<RunArgs>),
}

/// `meshward agent run`; every flag also reads `MESHWARD_AGENT_<SETTING>` and the `--config` file.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file; flags and env win over it.
    #[arg(long, env = "MESHWARD_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The CA's agent API, `HOST:PORT`.
    #[arg(long, env = "MESHWARD_AGENT_CA", value_name = "ADDR")]
    ca: Option<String>,
    /// PEM roots that vouch for the CA on the first connection (`meshward ca bundle show`).
    #[arg(long, env = "MESHWARD_AGENT_TRUST_BUNDLE", value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// The trust domain (default: read from the roots in `--trust-bundle`).
    #[arg(long, env = "MESHWARD_AGENT_TRUST_DOMAIN", value_name = "TD")]
    trust_domain: Option<String>,
    /// The Workload API / SDS unix socket to serve.
    #[arg(long, env = "MESHWARD_AGENT_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the agent keeps its SVID, key and bundle across restarts.
    #[arg(long, env = "MESHWARD_AGENT_DATA_DIR", value_name = "D")]
    data_dir: Option<PathBuf>,
    /// One-time join token (`meshward ca token create --node NAME`); not needed once attested.
    #[arg(
        long,
        env = "MESHWARD_AGENT_JOIN_TOKEN",
        value_name = "T",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// Admin HTTP address for `/metrics`, `/ready`, `/live` (off by default).
    #[arg(long, env = "MESHWARD_AGENT_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,
    /// How often to fetch this node's entries from the CA (default 5s).
    #[arg(long, env = "MESHWARD_AGENT_SYNC_INTERVAL", value_name = "DURATION")]
    sync_interval: Option<String>,
    /// How long a workload with no identity (yet) waits before it is refused (default 3s).
    #[arg(long, env = "MESHWARD_AGENT_IDENTITY_WAIT", value_name = "DURATION")]
    identity_wait: Option<String>,
    /// Timeout of one call to the CA (default 10s).
    #[arg(long, env = "MESHWARD_AGENT_CA_TIMEOUT", value_name = "DURATION")]
    ca_timeout: Option<String>,
    /// Kubernetes mode: attest to the CA with the projected service-account token and attest
    /// workloads by their pod (needs `--node-name` and `--psat-token-file`).
    #[arg(long, env = "MESHWARD_AGENT_K8S")]
    k8s: bool,
    /// This node's name (`spec.nodeName` from the Downward API); with `--k8s`.
    #[arg(long, env = "MESHWARD_AGENT_NODE_NAME", value_name = "N")]
    node_name: Option<String>,
    /// The projected service-account token (audience `meshward-ca`), re-read at every attestation.
    #[arg(long, env = "MESHWARD_AGENT_PSAT_TOKEN_FILE", value_name = "F")]
    psat_token_file: Option<PathBuf>,
    /// Kubeconfig for the pod watch (default: in-cluster config or `KUBECONFIG`).
    #[arg(long, env = "MESHWARD_AGENT_KUBECONFIG", value_name = "F")]
    kubeconfig: Option<PathBuf>,
}

/// Runs `meshward agent ...` and says how it ended.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let AgentCommand::Run(args) = args.command;
    let flags = AgentSettings {
        ca: args.ca,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        socket: args.socket,
        data_dir: args.data_dir,
        join_token: args.join_token,
        admin_listen: args.admin_listen,
        sync_interval: args.sync_interval,
        identity_wait: args.identity_wait,
        ca_timeout: args.ca_timeout,
        k8s: args.k8s.then_some(true),
        node_name: args.node_name,
        psat_token_file: args.psat_token_file,
        kubeconfig: args.kubeconfig,
    };
    let file = match &args.config {
        Some(path) => match AgentSettings::from_file(path) {
            Ok(file) => file,
            Err(e) => return Ok(super::fail(EX_USAGE, &e)),
        },
        None => AgentSettings::default(),
    };
    let config = match flags.or(file).into_config() {
        Ok(config) => config,
        Err(e) => return Ok(super::fail(EX_USAGE, &e)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(super::cancel_on_signal(
            shutdown.clone(),
            "agent",
            "shutting down",
        ));
        meshward_agent::run(config, shutdown).await
    });
    Ok(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(EX_FAILED, &e),
    })
}
