//! `meshward ca`: run the CA, and the operator commands that talk to a running CA over its admin
//! unix socket (`--admin-socket P`, or `--data-dir D` for `D/admin.sock`).
//!
//! Exit codes: 0 done, 1 the CA refused or could not be reached, 64 a bad flag or setting.
//! `token create` prints only the token on stdout, so `$(meshward ca token create ...)` works.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use meshward_ca::config::{ADMIN_SOCKET_FILE, CaSettings, parse_duration};
use meshward_ca::datastore::{Selector, validate_node_name};
use meshward_identity::SpiffeId;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::x509::certs_to_pem;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::Output;

/// `println!` to stdout through [`emit`].
macro_rules! say {
    ($($arg:tt)*) => {
        emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Exit code for a refusal or an unreachable CA.
const EX_FAILED: u8 = 1;
/// Exit code for a bad flag or setting.
const EX_USAGE: u8 = 64;

/// `meshward ca ...`
#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Run the CA: sign SVIDs for attested agents, serve the admin socket.
    Run(Box<RunArgs>),
    /// Join tokens for agents (standalone node attestation).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Registration entries: which identities may be minted on which nodes.
    Entry {
        #[command(subcommand)]
        command: EntryCommand,
    },
    /// Attested agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The trust bundle.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Root rotation: prepare a new root, activate it, retire the old one.
    Rotate {
        #[command(subcommand)]
        command: RotateCommand,
    },
}

/// `meshward ca run`; every flag also reads `MESHWARD_CA_<SETTING>` and the `--config` file.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file; flags and env win over it.
    #[arg(long, env = "MESHWARD_CA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data dir: keys, SQLite state, the audit log, the admin socket.
    #[arg(long, env = "MESHWARD_CA_DATA_DIR", value_name = "D")]
    data_dir: Option<PathBuf>,
    /// Agent API listen address (gRPC over TLS), e.g. `0.0.0.0:8081`.
    #[arg(long, env = "MESHWARD_CA_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// The trust domain to sign for, e.g. `example.org`.
    #[arg(long, env = "MESHWARD_CA_TRUST_DOMAIN", value_name = "TD")]
    trust_domain: Option<String>,
    /// Default workload SVID lifetime (30s to 24h; default 1h).
    #[arg(long, env = "MESHWARD_CA_SVID_TTL", value_name = "DURATION")]
    svid_ttl: Option<String>,
    /// Agent SVID lifetime (30s to 24h; default 1h).
    #[arg(long, env = "MESHWARD_CA_AGENT_SVID_TTL", value_name = "DURATION")]
    agent_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime (30s to 24h; default 5m).
    #[arg(long, env = "MESHWARD_CA_JWT_TTL", value_name = "DURATION")]
    jwt_ttl: Option<String>,
    /// Admin unix socket (default `D/admin.sock`).
    #[arg(long, env = "MESHWARD_CA_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Audit log (default `D/audit.jsonl`); replicas sharing a data dir each need their own.
    #[arg(long, env = "MESHWARD_CA_AUDIT_FILE", value_name = "PATH")]
    audit_file: Option<PathBuf>,
    /// Admin HTTP address for `/metrics`, `/ready`, `/live` (off by default).
    #[arg(long, env = "MESHWARD_CA_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Istio-style `cacerts` dir (ca-cert.pem or cert-chain.pem, ca-key.pem, root-cert.pem).
    #[arg(long, env = "MESHWARD_CA_UPSTREAM_CA", value_name = "DIR")]
    upstream_ca: Option<PathBuf>,
    /// Lifetime of roots this CA makes (default 365d).
    #[arg(long, env = "MESHWARD_CA_ROOT_TTL", value_name = "DURATION")]
    root_ttl: Option<String>,
    /// Most SVID requests in one batch (default 1000).
    #[arg(long, env = "MESHWARD_CA_MAX_BATCH", value_name = "N")]
    max_batch: Option<usize>,
    /// Kubernetes mode: agents attest with projected service-account tokens (TokenReview), and
    /// `ns/<ns>/sa/<sa>` is entitled by the pods running on the agent's node.
    #[arg(long, env = "MESHWARD_CA_K8S")]
    k8s: bool,
    /// Kubeconfig for `--k8s` (default: the in-cluster config).
    #[arg(long, env = "MESHWARD_CA_KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The namespace of the CA's own objects for `--k8s` (default `meshward`).
    #[arg(long, env = "MESHWARD_CA_NAMESPACE", value_name = "NS")]
    namespace: Option<String>,
    /// The cluster name in agent IDs for `--k8s` (default `cluster`).
    #[arg(long, env = "MESHWARD_CA_CLUSTER", value_name = "NAME")]
    cluster: Option<String>,
    /// The agents' service account for `--k8s` (default `meshward:meshward-agent`).
    #[arg(long, env = "MESHWARD_CA_AGENT_SA", value_name = "NS:SA")]
    agent_sa: Option<String>,
    /// Serve the injection webhook (`POST /inject`, HTTPS) on this address, e.g. `0.0.0.0:8443`.
    #[arg(long, env = "MESHWARD_CA_WEBHOOK_LISTEN", value_name = "ADDR")]
    webhook_listen: Option<String>,
    /// The webhook's PEM serving certificate (then its intermediates); reread when it changes.
    #[arg(long, env = "MESHWARD_CA_WEBHOOK_CERT", value_name = "FILE")]
    webhook_cert: Option<PathBuf>,
    /// The webhook's PEM private key; reread when it changes.
    #[arg(long, env = "MESHWARD_CA_WEBHOOK_KEY", value_name = "FILE")]
    webhook_key: Option<PathBuf>,
    /// The image injected proxies run (default `meshward:<version>`).
    #[arg(long, env = "MESHWARD_CA_INJECT_IMAGE", value_name = "IMAGE")]
    inject_image: Option<String>,
    /// The ConfigMap injected proxies mount their policy set from (default `meshward-policies`).
    #[arg(
        long,
        env = "MESHWARD_CA_INJECT_POLICIES_CONFIGMAP",
        value_name = "NAME"
    )]
    inject_policies_configmap: Option<String>,
    /// The node directory holding the agent's socket (default `/run/meshward`).
    #[arg(long, env = "MESHWARD_CA_INJECT_SOCKET_DIR", value_name = "DIR")]
    inject_socket_dir: Option<String>,
    /// Inject pods with `hostNetwork: true` too (by default they are denied).
    #[arg(long, env = "MESHWARD_CA_INJECT_ALLOW_HOST_NETWORK")]
    inject_allow_host_network: bool,
}

/// Where the running CA's admin socket is.
#[derive(Debug, Args)]
struct AdminTarget {
    /// The CA's admin socket.
    #[arg(long, env = "MESHWARD_CA_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// The CA's data dir (the socket is `D/admin.sock`).
    #[arg(long, env = "MESHWARD_CA_DATA_DIR", value_name = "D")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a one-time join token for a node; prints only the token.
    Create {
        #[command(flatten)]
        target: AdminTarget,
        /// The node the agent runs on (its agent ID ends with it).
        #[arg(long, value_parser = node_name)]
        node: String,
        /// How long the token stays usable.
        #[arg(long, default_value = "10m", value_parser = duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Create an entry; prints its id.
    Create {
        #[command(flatten)]
        target: AdminTarget,
        /// The identity to hand out, e.g. `spiffe://example.org/ns/shop/sa/web`.
        #[arg(long, value_parser = spiffe_id)]
        spiffe_id: SpiffeId,
        /// The node it may be minted on.
        #[arg(long, value_parser = node_name, required_unless_present = "any_node", conflicts_with = "any_node")]
        node: Option<String>,
        /// Any node may mint it.
        #[arg(long)]
        any_node: bool,
        /// `type:value`, all must match (e.g. `unix:uid:1000`, `k8s:ns:shop`); repeat for more.
        #[arg(long = "selector", required = true, value_parser = selector)]
        selectors: Vec<Selector>,
        /// SVID lifetime for this identity (default: the CA's `--svid-ttl`).
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// A free-form note shown by `entry list`.
        #[arg(long, default_value = "")]
        hint: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List entries.
    List {
        #[command(flatten)]
        target: AdminTarget,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete an entry by id.
    Delete {
        #[command(flatten)]
        target: AdminTarget,
        /// The entry's id (from `entry list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// List attested agents.
    List {
        #[command(flatten)]
        target: AdminTarget,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Evict an agent: it can no longer mint or renew until it attests with a new token.
    Evict {
        #[command(flatten)]
        target: AdminTarget,
        /// The agent's SPIFFE ID.
        #[arg(value_parser = spiffe_id)]
        id: SpiffeId,
    },
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print the trust bundle: PEM, or with `--output json` the PEM and the JWKS.
    Show {
        #[command(flatten)]
        target: AdminTarget,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum RotateCommand {
    /// Make a new root and publish it in the bundle (it does not sign yet).
    Prepare(RotateArgs),
    /// Sign with the prepared root; the previous one stays published as `old`.
    Activate(RotateArgs),
    /// Drop the old root from the bundle, once everything it signed has expired.
    Retire(RotateArgs),
    /// List the authorities and their states.
    List(RotateArgs),
}

#[derive(Debug, Args)]
struct RotateArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// Retire even though SVIDs the old root signed are still valid (they stop verifying).
    #[arg(long)]
    danger_force: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

/// Why a `meshward ca` command failed.
#[derive(Debug, thiserror::Error)]
enum CaCliError {
    /// A bad flag or setting: exit 64.
    #[error("{0}")]
    Usage(String),
    /// The CA refused or failed: exit 1.
    #[error("{0}")]
    Failed(String),
}

/// Runs `meshward ca ...`; errors are printed here as one line, so this returns an exit code.
pub fn run(args: CaArgs) -> anyhow::Result<ExitCode> {
    let outcome = match args.command {
        CaCommand::Run(run) => run_ca(*run),
        other => admin(other),
    };
    Ok(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(CaCliError::Usage(message)) => {
            eprintln!("meshward: {message}");
            ExitCode::from(EX_USAGE)
        }
        Err(CaCliError::Failed(message)) => {
            eprintln!("meshward: {message}");
            ExitCode::from(EX_FAILED)
        }
    })
}

fn run_ca(args: RunArgs) -> Result<(), CaCliError> {
    let flags = CaSettings {
        data_dir: args.data_dir,
        listen: args.listen,
        trust_domain: args.trust_domain,
        svid_ttl: args.svid_ttl,
        agent_svid_ttl: args.agent_svid_ttl,
        jwt_ttl: args.jwt_ttl,
        admin_socket: args.admin_socket,
        audit_file: args.audit_file,
        admin_listen: args.admin_listen,
        upstream_ca: args.upstream_ca,
        root_ttl: args.root_ttl,
        max_batch: args.max_batch,
        // A bare `--k8s` switch: absent means "not on the command line", so the file may turn it on.
        k8s: args.k8s.then_some(true),
        kubeconfig: args.kubeconfig,
        namespace: args.namespace,
        cluster: args.cluster,
        agent_sa: args.agent_sa,
        webhook_listen: args.webhook_listen,
        webhook_cert: args.webhook_cert,
        webhook_key: args.webhook_key,
        inject_image: args.inject_image,
        inject_policies_configmap: args.inject_policies_configmap,
        inject_socket_dir: args.inject_socket_dir,
        inject_allow_host_network: args.inject_allow_host_network.then_some(true),
        ..CaSettings::default()
    };
    let file = match &args.config {
        Some(path) => CaSettings::from_file(path).map_err(|e| CaCliError::Usage(e.to_string()))?,
        None => CaSettings::default(),
    };
    let config = flags
        .or(file)
        .into_config()
        .map_err(|e| CaCliError::Usage(e.to_string()))?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(super::cancel_on_signal(
            shutdown.clone(),
            "ca",
            "shutting down",
        ));
        meshward_ca::run(config, shutdown)
            .await
            .map_err(|e| CaCliError::Failed(e.to_string()))
    })
}

fn admin(command: CaCommand) -> Result<(), CaCliError> {
    let runtime = runtime()?;
    runtime.block_on(async move {
        match command {
            CaCommand::Run(_) => Ok(()),
            CaCommand::Token {
                command: TokenCommand::Create { target, node, ttl },
            } => {
                let mut client = connect(&target).await?;
                let response = client
                    .create_join_token(pb::CreateJoinTokenRequest {
                        node,
                        ttl_seconds: seconds(ttl),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                say!("{}", response.token)?;
                Ok(())
            }
            CaCommand::Entry { command } => entry(command).await,
            CaCommand::Agent { command } => agent(command).await,
            CaCommand::Bundle {
                command: BundleCommand::Show { target, output },
            } => {
                let bundle = connect(&target)
                    .await?
                    .show_bundle(pb::ShowBundleRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                let pem = bundle_pem(&bundle);
                match output {
                    Output::Text => emit(&pem)?,
                    Output::Json => {
                        let jwks: Value =
                            serde_json::from_slice(&bundle.jwt_authorities).unwrap_or(Value::Null);
                        print_json(&json!({
                            "trust_domain": bundle.trust_domain,
                            "sequence": bundle.sequence,
                            "refresh_hint_seconds": bundle.refresh_hint_seconds,
                            "x509_authorities_pem": pem,
                            "jwt_authorities": jwks,
                        }))?;
                    }
                }
                Ok(())
            }
            CaCommand::Rotate { command } => rotate(command).await,
        }
    })
}

async fn entry(command: EntryCommand) -> Result<(), CaCliError> {
    match command {
        EntryCommand::Create {
            target,
            spiffe_id,
            node,
            any_node,
            selectors,
            ttl,
            hint,
            output,
        } => {
            let entry = connect(&target)
                .await?
                .create_entry(pb::CreateEntryRequest {
                    spiffe_id: spiffe_id.to_string(),
                    selectors: selectors.iter().map(selector_to_proto).collect(),
                    node: node.unwrap_or_default(),
                    any_node,
                    ttl_seconds: ttl.map_or(0, seconds),
                    hint,
                })
                .await
                .map_err(refused)?
                .into_inner();
            match output {
                Output::Text => say!("{}", entry.id)?,
                Output::Json => print_json(&entry_json(&entry))?,
            }
            Ok(())
        }
        EntryCommand::List { target, output } => {
            let entries = connect(&target)
                .await?
                .list_entries(pb::ListEntriesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .entries;
            match output {
                Output::Json => {
                    print_json(&Value::Array(entries.iter().map(entry_json).collect()))?
                }
                Output::Text => {
                    say!(
                        "{:<16}  {:<48}  {:<16}  {:<8}  SELECTORS",
                        "ID",
                        "SPIFFE ID",
                        "NODE",
                        "TTL"
                    )?;
                    for e in &entries {
                        let node = if e.any_node { "*" } else { e.node.as_str() };
                        let ttl = if e.ttl_seconds == 0 {
                            "default".to_owned()
                        } else {
                            format!("{}s", e.ttl_seconds)
                        };
                        let selectors: Vec<String> = e
                            .selectors
                            .iter()
                            .map(|s| format!("{}:{}", s.r#type, s.value))
                            .collect();
                        say!(
                            "{:<16}  {:<48}  {:<16}  {:<8}  {}",
                            e.id,
                            e.spiffe_id,
                            node,
                            ttl,
                            selectors.join(",")
                        )?;
                    }
                }
            }
            Ok(())
        }
        EntryCommand::Delete { target, id } => {
            connect(&target)
                .await?
                .delete_entry(pb::DeleteEntryRequest { id })
                .await
                .map_err(refused)?;
            Ok(())
        }
    }
}

async fn agent(command: AgentCommand) -> Result<(), CaCliError> {
    match command {
        AgentCommand::List { target, output } => {
            let agents = connect(&target)
                .await?
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .agents;
            match output {
                Output::Json => print_json(&Value::Array(agents.iter().map(agent_json).collect()))?,
                Output::Text => {
                    say!(
                        "{:<56}  {:<16}  {:<10}  {:<20}  STATE",
                        "SPIFFE ID",
                        "NODE",
                        "METHOD",
                        "EXPIRES"
                    )?;
                    let now = unix_now();
                    for a in &agents {
                        say!(
                            "{:<56}  {:<16}  {:<10}  {:<20}  {}",
                            a.spiffe_id,
                            a.node,
                            a.attestation,
                            utc(a.expires_at),
                            agent_state(a, now)
                        )?;
                    }
                }
            }
            Ok(())
        }
        AgentCommand::Evict { target, id } => {
            connect(&target)
                .await?
                .evict_agent(pb::EvictAgentRequest {
                    spiffe_id: id.to_string(),
                })
                .await
                .map_err(refused)?;
            Ok(())
        }
    }
}

async fn rotate(command: RotateCommand) -> Result<(), CaCliError> {
    let (args, list) = match &command {
        RotateCommand::List(a) => (a, true),
        RotateCommand::Prepare(a) | RotateCommand::Activate(a) | RotateCommand::Retire(a) => {
            (a, false)
        }
    };
    let mut client = connect(&args.target).await?;
    let request = pb::RotateRequest {
        danger_force: args.danger_force,
    };
    let authorities = match &command {
        RotateCommand::Prepare(_) => vec![
            client
                .prepare_root(request)
                .await
                .map_err(refused)?
                .into_inner(),
        ],
        RotateCommand::Activate(_) => vec![
            client
                .activate_root(request)
                .await
                .map_err(refused)?
                .into_inner(),
        ],
        RotateCommand::Retire(_) => vec![
            client
                .retire_root(request)
                .await
                .map_err(refused)?
                .into_inner(),
        ],
        RotateCommand::List(_) => {
            client
                .list_authorities(pb::ListAuthoritiesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .authorities
        }
    };
    match args.output {
        Output::Json if list => {
            print_json(&Value::Array(
                authorities.iter().map(authority_json).collect(),
            ))?;
        }
        Output::Json => {
            for a in &authorities {
                print_json(&authority_json(a))?;
            }
        }
        Output::Text => {
            for a in &authorities {
                say!(
                    "{}  {:<8}  not_after {}  signed_until {}",
                    a.id,
                    a.state,
                    utc(a.not_after),
                    if a.signed_until == 0 {
                        "-".to_owned()
                    } else {
                        utc(a.signed_until)
                    }
                )?;
            }
        }
    }
    Ok(())
}

/// Connects to the admin socket; the tonic client speaks HTTP/2 over the unix stream.
async fn connect(target: &AdminTarget) -> Result<AdminClient<Channel>, CaCliError> {
    let path = socket_path(target)?;
    let unreachable = |path: &Path, e: &dyn std::fmt::Display| {
        CaCliError::Failed(format!(
            "cannot reach the ca admin socket `{}`: {e}; is `meshward ca run` running with this data dir?",
            path.display()
        ))
    };
    meshward_ca::admin::connect(&path)
        .await
        .map_err(|e| unreachable(&path, &error_chain(&e)))
}

fn socket_path(target: &AdminTarget) -> Result<PathBuf, CaCliError> {
    match (&target.admin_socket, &target.data_dir) {
        (Some(socket), _) => Ok(socket.clone()),
        (None, Some(dir)) => Ok(dir.join(ADMIN_SOCKET_FILE)),
        (None, None) => Err(CaCliError::Usage(
            "say which ca: pass `--data-dir D` (for `D/admin.sock`) or `--admin-socket P`"
                .to_owned(),
        )),
    }
}

/// A refusal from the CA, as one line.
fn refused(status: tonic::Status) -> CaCliError {
    match status.code() {
        tonic::Code::Unavailable => CaCliError::Failed(format!(
            "the ca admin socket stopped answering: {}; is `meshward ca run` still running?",
            status.message()
        )),
        _ => CaCliError::Failed(status.message().to_owned()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CaCliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CaCliError::Failed(format!("cannot start the async runtime: {e}")))
}

fn bundle_pem(bundle: &pb::Bundle) -> String {
    let certs: Vec<CertificateDer<'_>> = bundle
        .x509_authorities
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    certs_to_pem(&certs)
}

fn selector_to_proto(s: &Selector) -> pb::Selector {
    pb::Selector {
        r#type: s.kind().as_str().to_owned(),
        value: s.value().to_owned(),
    }
}

fn entry_json(e: &pb::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "node": e.node,
        "any_node": e.any_node,
        "ttl_seconds": e.ttl_seconds,
        "created_at": e.created_at,
        "hint": e.hint,
    })
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "node": a.node,
        "attestation": a.attestation,
        "serial": a.serial,
        "expires_at": a.expires_at,
        "evicted": a.evicted,
        "attested_at": a.attested_at,
        // A renewed SVID the agent has not presented yet (`serial` still works until it does).
        "pending_serial": (!a.pending_serial.is_empty()).then_some(&a.pending_serial),
        "pending_expires_at": (!a.pending_serial.is_empty()).then_some(a.pending_expires_at),
    })
}

/// The STATE column of `ca agent list`. A renewed SVID the agent has not presented yet is shown:
/// until the agent uses it the old one (EXPIRES) still works, and it keeps the agent in service
/// even past the old one's expiry.
fn agent_state(a: &pb::Agent, now: i64) -> &'static str {
    let pending = !a.pending_serial.is_empty() && a.pending_expires_at > now;
    if a.evicted {
        "evicted"
    } else if pending {
        "active, renewed SVID not yet used"
    } else if a.expires_at <= now {
        "expired"
    } else {
        "active"
    }
}

fn authority_json(a: &pb::Authority) -> Value {
    let pem = certs_to_pem(&[CertificateDer::from(a.certificate.as_slice())]);
    json!({
        "id": a.id,
        "state": a.state,
        "not_before": a.not_before,
        "not_after": a.not_after,
        "signed_until": a.signed_until,
        "certificate_pem": pem,
    })
}

fn print_json(value: &Value) -> Result<(), CaCliError> {
    say!("{value}")
}

/// Writes to stdout. A closed pipe (`| head`) is the reader's choice and ends output quietly; any
/// other failure (a full disk behind a redirect) is an error, so a lost token is never silent.
fn emit(text: &str) -> Result<(), CaCliError> {
    use std::io::Write as _;
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(CaCliError::Failed(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, seconds)
}

/// `2025-01-31T12:00:00Z`.
fn utc(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix {secs}"),
    }
}

/// An error and its causes on one line (tonic's transport errors hide the io error as a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn node_name(s: &str) -> Result<String, String> {
    validate_node_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn spiffe_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn selector(s: &str) -> Result<Selector, String> {
    s.parse::<Selector>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
