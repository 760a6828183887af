//! `meshward inject`: adds the meshward proxy to every pod template of a Kubernetes manifest.
//!
//! A thin CLI over `meshward_inject` (the CA's `/inject` webhook uses the same code).
//!
//! Reads a multi-document YAML stream (a file or stdin) and writes it back with the proxy added,
//! as a Kubernetes native sidecar (an init container with `restartPolicy: Always` whose startup
//! probe is the proxy's `/ready`), so the app containers start only once the proxy holds an SVID
//! and a policy set. Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! ReplicationControllers, Jobs, CronJobs, PodTemplates and the items of a `List` are injected;
//! every other document is written back byte for byte, and so is a workload that already has a
//! `meshward-proxy` container (injecting twice changes nothing) or that opted out with
//! `meshward.io/inject: "false"`. An injected document is printed from its parsed tree: its keys
//! keep their order and the comments above it stay, but comments inside it are dropped.
//!
//! Listeners come from the pod template's annotations (or the workload's own):
//! `meshward.io/inbound: "8443=127.0.0.1:8080"` and
//! `meshward.io/outbound: "15001=orders.shop.svc:15006,spiffe://td/ns/shop/sa/orders"`
//! (`;`-separated, `,tcp` for plain TCP; a bare listen port means all addresses inbound and
//! loopback outbound). Without `meshward.io/inbound`, the proxy listens on 15006 in front of
//! the first TCP `containerPort`.
//!
//! Exit codes: 0 done; 1 the input was refused (invalid YAML, a malformed pod template or
//! annotation, `hostNetwork: true` without `--allow-host-network`), with one line on stderr and
//! nothing on stdout; 64 bad flags; 66 the input file cannot be opened; 74 reading or writing
//! failed.

use std::fs::File;
use std::io::{self, Read, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use meshward_inject::{
    DEFAULT_IMAGE, DEFAULT_POLICIES_CONFIG_MAP, DEFAULT_SOCKET_DIR, InjectOptions,
    check_config_map_name, check_image, check_socket_dir, inject,
};

use super::{EX_IOERR, EX_NO, EX_NOINPUT};

/// `meshward inject [FILE]`
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The manifest to read (`-` or nothing: stdin). The result goes to stdout.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// The meshward image the proxy runs.
    #[arg(long, env = "MESHWARD_INJECT_IMAGE", value_name = "IMAGE", default_value = DEFAULT_IMAGE, value_parser = check_image)]
    image: String,
    /// The ConfigMap (in the workload's namespace) holding the `*.cedar` policy set.
    #[arg(long, env = "MESHWARD_INJECT_POLICIES_CONFIGMAP", value_name = "NAME", default_value = DEFAULT_POLICIES_CONFIG_MAP, value_parser = check_config_map_name)]
    policies_configmap: String,
    /// The node directory holding the agent's socket (`agent.sock`), mounted read-only.
    #[arg(long, env = "MESHWARD_INJECT_SOCKET_DIR", value_name = "DIR", default_value = DEFAULT_SOCKET_DIR, value_parser = check_socket_dir)]
    socket_dir: String,
    /// Inject pods with `hostNetwork: true` too (the proxy's ports then bind on the node).
    #[arg(long, env = "MESHWARD_INJECT_ALLOW_HOST_NETWORK")]
    allow_host_network: bool,
}

/// Runs `meshward inject` and says how it ended.
pub fn run(args: InjectArgs) -> anyhow::Result<ExitCode> {
    let mut bytes = Vec::new();
    let read = match args.file.as_deref() {
        None => io::stdin().lock().read_to_end(&mut bytes),
        Some(path) if path.as_os_str() == "-" => io::stdin().lock().read_to_end(&mut bytes),
        Some(path) => match File::open(path) {
            Ok(mut file) => file.read_to_end(&mut bytes),
            Err(e) => {
                return Ok(fail(
                    EX_NOINPUT,
                    &format!("cannot open `{}`: {e}", path.display()),
                ));
            }
        },
    };
    if let Err(e) = read {
        return Ok(fail(EX_IOERR, &format!("cannot read the manifest: {e}")));
    }
    let Ok(input) = String::from_utf8(bytes) else {
        return Ok(fail(EX_NO, &"the manifest is not UTF-8 text"));
    };
    let options = InjectOptions {
        image: args.image,
        policies_config_map: args.policies_configmap,
        socket_dir: args.socket_dir,
        allow_host_network: args.allow_host_network,
    };
    let output = match inject(&input, &options) {
        Ok(output) => output,
        Err(e) => return Ok(fail(EX_NO, &e)),
    };
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        return Ok(fail(EX_IOERR, &format!("cannot write the manifest: {e}")));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `meshward: <error>` on one line and returns `code`.
fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("meshward: {}", one_line(&error.to_string()));
    ExitCode::from(code)
}

/// Collapses a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
