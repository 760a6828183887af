//! `meshward demo`: the whole mesh in one command, on 127.0.0.1, with real processes.
//!
//! It starts the real CA (standalone, SQLite, short SVID TTL), one real agent (join token), and one
//! real `meshward proxy run` per demo service (`frontend`, `catalog`, `payments`, `reports`), each
//! from its own hard link of the binary (`DATA/bin/<service>-proxy`), and as root also as its own
//! uid: every proxy gets its identity by workload attestation, never by a file or a flag. Behind
//! each proxy is a tiny app in this process; a traffic generator here calls through the proxies,
//! some calls allowed by the demo policies, some denied (by a `forbid`, or by default).
//!
//! While it runs it shows who calls whom, the decision and the deciding policy, and every SVID
//! rotation; at the end a summary, the audit files (each verified) and the commands to read them.
//!
//! Exit codes: 0 done and every call ended as the policies say; 1 a call failed (an allowed call
//! did not get through, a denied one did) or a part failed; 64 bad flags; 130/143 stopped by
//! SIGINT/SIGTERM (after a clean stop and the summary).

mod display;
mod mesh;
mod traffic;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use meshward_identity::audit::{Anchor, AuditDecision, verify_file_anchored};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::display::{Display, totals};
use self::mesh::{Children, Interrupted, Isolation, Layout, NODE};
use self::traffic::{ROUTES, SharedStats};
use crate::cmd::audit::summary::Summary;

/// The demo's trust domain (the one `policies/demo` names).
pub const TRUST_DOMAIN: &str = "demo.meshward";

/// A demo service: its name (and service account) and whom it calls.
#[derive(Debug)]
pub struct Service {
    /// `frontend`, `catalog`, ...
    pub name: &'static str,
    /// The services it has an outbound listener for.
    pub upstreams: &'static [&'static str],
}

/// The demo shop, callees before callers.
pub const SERVICES: [Service; 4] = [
    Service {
        name: "payments",
        upstreams: &[],
    },
    Service {
        name: "catalog",
        upstreams: &["payments"],
    },
    Service {
        name: "frontend",
        upstreams: &["catalog", "payments"],
    },
    Service {
        name: "reports",
        upstreams: &["payments"],
    },
];

/// Exit code for bad flags.
const EX_USAGE: u8 = 64;
/// Exit code when a call or a part failed.
const EX_FAILED: u8 = 1;
/// How often the view refreshes.
const REFRESH: Duration = Duration::from_millis(250);

/// Arguments of `meshward demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to send traffic once everything is up (`30s`, `2m`).
    #[arg(long, default_value = "30s", value_parser = duration)]
    duration: Duration,
    /// Keep the data dir (CA state, audit files, logs) here; it must be new or empty.
    /// Without it a temporary dir is used and removed at the end.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Workload SVID lifetime (30s or more); they rotate at half of it.
    #[arg(long, default_value = "30s", value_parser = duration)]
    svid_ttl: Duration,
}

/// Runs `meshward demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(demo(args))
}

/// How the traffic phase ended.
#[derive(Debug)]
enum End {
    /// The duration ran out.
    TimeUp,
    /// SIGINT or SIGTERM.
    Signal(&'static str),
    /// A part exited on its own.
    PartDied(String),
}

/// A proxy's addresses.
#[derive(Debug, Clone)]
struct ProxyPorts {
    admin: SocketAddr,
    inbound: SocketAddr,
    /// One per upstream, in `Service::upstreams` order.
    outbound: Vec<SocketAddr>,
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let signalled: Arc<Mutex<Option<&'static str>>> = Arc::default();
    tokio::spawn(watch_signals(stop.clone(), Arc::clone(&signalled)));

    let (root, keep) = match data_dir(args.out.as_deref()) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("meshward: {e:#}");
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let layout = Layout::new(&root);
    let isolation = mesh::detect_isolation();
    let mut display = Display::new(std::io::stdout().is_terminal(), args.duration);
    display.line(&format!(
        "meshward demo: a CA, an agent and {} proxies on 127.0.0.1; data dir {}",
        SERVICES.len(),
        root.display()
    ));
    display.line(&format!("identities: {}", isolation.describe()));

    let mut children = Children::new();
    let stats = SharedStats::new();
    let apps_stop = CancellationToken::new();
    let started = Instant::now();
    let outcome = run_mesh(
        &args,
        &layout,
        isolation,
        &mut children,
        &stats,
        &mut display,
        &stop,
        &apps_stop,
    )
    .await;
    display.line(
        "stopping: proxies, then the agent, then the CA (SIGTERM, SIGKILL after a grace period)",
    );
    let killed = children.stop_all().await;
    apps_stop.cancel();
    let signal = *signalled
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    let end = match outcome {
        Ok(End::Signal(_)) => End::Signal(signal.unwrap_or("SIGINT")),
        Ok(end) => end,
        Err(e) if e.is::<Interrupted>() => End::Signal(signal.unwrap_or("SIGINT")),
        Err(e) => End::PartDied(format!("{e:#}")),
    };
    let ok = report(
        &layout,
        isolation,
        &stats,
        &end,
        &killed,
        keep,
        started.elapsed(),
    );
    if !keep && let Err(e) = std::fs::remove_dir_all(&root) {
        eprintln!(
            "meshward: cannot remove the data dir `{}`: {e}",
            root.display()
        );
    }
    Ok(match (&end, ok) {
        (_, false) | (End::PartDied(_), _) => ExitCode::from(EX_FAILED),
        (End::Signal("SIGTERM"), true) => ExitCode::from(143),
        (End::Signal(_), true) => ExitCode::from(130),
        (End::TimeUp, true) => ExitCode::SUCCESS,
    })
}

/// Starts everything, runs the traffic, and stops the traffic (the children are stopped by the
/// caller, whatever happens here).
#[allow(clippy::too_many_arguments)]
async fn run_mesh(
    args: &DemoArgs,
    layout: &Layout,
    isolation: Isolation,
    children: &mut Children,
    stats: &SharedStats,
    display: &mut Display,
    stop: &CancellationToken,
    apps_stop: &CancellationToken,
) -> anyhow::Result<End> {
    layout.prepare(isolation)?;
    let ttl = format!("{}s", args.svid_ttl.as_secs());
    let exe = std::env::current_exe().context("find the meshward binary")?;

    // Ports: the CA, then per service its admin, inbound and outbound listeners.
    let wanted = 1 + SERVICES
        .iter()
        .map(|s| 2 + s.upstreams.len())
        .sum::<usize>();
    let mut ports = meshward_ops::ports::free_ports(wanted)
        .context("find free ports on 127.0.0.1 for the demo")?
        .into_iter();
    let mut next = || {
        ports
            .next()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .context("ran out of picked ports")
    };
    let ca_addr = next()?;
    let mut proxy_ports = Vec::new();
    for service in &SERVICES {
        proxy_ports.push(ProxyPorts {
            admin: next()?,
            inbound: next()?,
            outbound: service
                .upstreams
                .iter()
                .map(|_| next())
                .collect::<anyhow::Result<_>>()?,
        });
    }

    let mut apps = Vec::new();
    for service in &SERVICES {
        apps.push(traffic::start_app(service.name, apps_stop.clone()).await?);
    }

    display.line(&format!(
        "starting the CA on {ca_addr} (trust domain {TRUST_DOMAIN}, SVID TTL {ttl})"
    ));
    let ca_dir = layout.ca.display().to_string();
    let mut command = children.command(&exe, None);
    command
        .args(["ca", "run", "--trust-domain", TRUST_DOMAIN])
        .args(["--listen", &ca_addr.to_string(), "--data-dir", &ca_dir])
        .args(["--svid-ttl", &ttl]);
    children.spawn("ca", 0, &layout.logs, command)?;
    let admin_socket = layout.ca.join(meshward_ca::config::ADMIN_SOCKET_FILE);
    mesh::wait_for("the CA to serve", children, stop, || {
        let ready = admin_socket.exists() && mesh::accepts(ca_addr);
        async move { ready }
    })
    .await?;

    let bundle =
        mesh::meshward_output(strings(&["ca", "bundle", "show", "--data-dir", &ca_dir])).await?;
    std::fs::write(&layout.bundle, bundle)
        .with_context(|| format!("write `{}`", layout.bundle.display()))?;
    let token = mesh::meshward_output(strings(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        &ca_dir,
        "--node",
        NODE,
    ]))
    .await?;
    for (index, service) in SERVICES.iter().enumerate() {
        let id = mesh::spiffe_id(service);
        let path = format!("unix:path:{}", layout.proxy_bin(service).display());
        let mut create = strings(&[
            "ca",
            "entry",
            "create",
            "--data-dir",
            &ca_dir,
            "--spiffe-id",
            &id,
            "--node",
            NODE,
            "--selector",
            &path,
            "--ttl",
            &ttl,
        ]);
        if isolation == Isolation::Uids {
            create.push("--selector".to_owned());
            create.push(format!("unix:uid:{}", mesh::uid_of(index)));
        }
        create.push("--hint".to_owned());
        create.push(format!("meshward demo: {}", service.name));
        mesh::meshward_output(create).await?;
        display.line(&format!(
            "registered {id}: selectors {path}{}",
            if isolation == Isolation::Uids {
                format!(" + unix:uid:{}", mesh::uid_of(index))
            } else {
                String::new()
            }
        ));
    }

    display.line(&format!(
        "starting the agent (node {NODE}, join token), Workload API on {}",
        layout.socket.display()
    ));
    let mut command = children.command(&exe, None);
    command
        .args(["agent", "run", "--ca", &ca_addr.to_string()])
        .arg("--trust-bundle")
        .arg(&layout.bundle)
        .arg("--socket")
        .arg(&layout.socket)
        .arg("--data-dir")
        .arg(&layout.agent)
        .args(["--sync-interval", "1s"])
        // Not in argv, where every local user could read it.
        .env("MESHWARD_AGENT_JOIN_TOKEN", token.trim());
    children.spawn("agent", 1, &layout.logs, command)?;
    let socket = layout.socket.clone();
    mesh::wait_for("the agent's Workload API", children, stop, || {
        let ready = std::os::unix::net::UnixStream::connect(&socket).is_ok();
        async move { ready }
    })
    .await?;

    for ((index, service), ports) in SERVICES.iter().enumerate().zip(&proxy_ports) {
        let uid = (isolation == Isolation::Uids).then(|| mesh::uid_of(index));
        let app = apps.get(index).context("an app per service")?;
        let mut command = children.command(&layout.proxy_bin(service), uid);
        command
            .args(["proxy", "run", "--node", NODE, "--drain-grace", "2s"])
            .arg("--socket")
            .arg(&layout.socket)
            .arg("--policies")
            .arg(&layout.policies)
            .arg("--audit")
            .arg(layout.proxy_audit(service))
            .args(["--admin", &ports.admin.to_string()])
            .args(["--inbound", &format!("{}={app}", ports.inbound)]);
        for (upstream, listen) in service.upstreams.iter().zip(&ports.outbound) {
            let (target, target_ports) = SERVICES
                .iter()
                .zip(&proxy_ports)
                .find(|(s, _)| s.name == *upstream)
                .context("upstream is a demo service")?;
            command.args([
                "--outbound",
                &format!(
                    "{listen}={},{}",
                    target_ports.inbound,
                    mesh::spiffe_id(target)
                ),
            ]);
        }
        children.spawn(&format!("{}-proxy", service.name), 2, &layout.logs, command)?;
    }
    display.line("starting 4 proxies; each asks the agent's Workload API for its SVID");
    let client = traffic::client();
    let admins: Vec<SocketAddr> = proxy_ports.iter().map(|p| p.admin).collect();
    mesh::wait_for(
        "every proxy to hold an SVID and be ready",
        children,
        stop,
        || {
            let client = client.clone();
            let admins = admins.clone();
            async move {
                for admin in admins {
                    if !traffic::ready(&client, admin).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await?;
    display.line(&format!(
        "all parts up; sending traffic for {}s",
        args.duration.as_secs()
    ));

    // Traffic, audit tails and the rotation watcher.
    stats.lock().started = Instant::now();
    let traffic_stop = CancellationToken::new();
    let watch_stop = CancellationToken::new();
    let mut generators = JoinSet::new();
    for (index, route) in ROUTES.iter().enumerate() {
        let caller = SERVICES
            .iter()
            .position(|s| s.name == route.caller)
            .context("route caller is a service")?;
        let (service, ports) = SERVICES
            .get(caller)
            .zip(proxy_ports.get(caller))
            .context("route caller is a service")?;
        let outbound = service
            .upstreams
            .iter()
            .position(|u| *u == route.callee)
            .and_then(|i| ports.outbound.get(i))
            .context("route caller has an outbound listener for the callee")?;
        generators.spawn(traffic::generate(
            client.clone(),
            index,
            *route,
            *outbound,
            mesh::spiffe_id(service),
            stats.clone(),
            traffic_stop.clone(),
        ));
    }
    let mut watchers = JoinSet::new();
    let ids: Vec<(String, String)> = ROUTES
        .iter()
        .map(|r| (service_id(r.caller), service_id(r.callee)))
        .collect();
    for service in &SERVICES {
        watchers.spawn(traffic::tail_audit(
            layout.proxy_audit(service),
            ids.clone(),
            stats.clone(),
            watch_stop.clone(),
        ));
    }
    watchers.spawn(traffic::watch_rotations(
        client.clone(),
        SERVICES.iter().map(|s| s.name).zip(admins).collect(),
        stats.clone(),
        watch_stop.clone(),
    ));

    let end = loop {
        display.tick(&stats.lock());
        if stop.is_cancelled() {
            break End::Signal("SIGINT");
        }
        if stats.lock().started.elapsed() >= args.duration {
            break End::TimeUp;
        }
        if let Some((name, status, log)) = children.exited() {
            break End::PartDied(format!(
                "the {name} exited ({status}) during the run; its log ends:\n{log}"
            ));
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(REFRESH) => {}
        }
    };
    // Let in-flight calls finish, then give the tails time to read their last records.
    traffic_stop.cancel();
    while generators.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(600)).await;
    watch_stop.cancel();
    while watchers.join_next().await.is_some() {}
    display.tick(&stats.lock());
    display.finish();
    Ok(end)
}

/// Prints the summary; returns whether the run was clean.
fn report(
    layout: &Layout,
    isolation: Isolation,
    stats: &SharedStats,
    end: &End,
    killed: &[String],
    keep: bool,
    elapsed: Duration,
) -> bool {
    let stats = stats.lock();
    let mut ok = true;
    let mut lines = vec![String::new(), "== meshward demo: summary ==".to_owned()];
    let how = match end {
        End::TimeUp => "the duration ran out".to_owned(),
        End::Signal(name) => format!("stopped by {name}"),
        End::PartDied(why) => {
            ok = false;
            format!("FAILED: {why}")
        }
    };
    lines.push(format!("ran {:.1}s; {how}", elapsed.as_secs_f64()));
    lines.push(format!("identities: {}", isolation.describe()));

    let (calls, allowed, denied, failed) = totals(&stats);
    let failed_allowed: u64 = ROUTES
        .iter()
        .zip(&stats.routes)
        .filter(|(r, _)| r.expect_allow)
        .map(|(_, s)| s.failed)
        .sum();
    let wrongly_allowed: u64 = stats.routes.iter().map(|s| s.wrongly_allowed).sum();
    lines.push(format!(
        "calls: {calls}  allowed: {allowed}  denied: {denied}  failed: {failed}"
    ));
    lines.push(format!(
        "failed allowed requests: {failed_allowed}  denied calls that got through: {wrongly_allowed}"
    ));
    if failed > 0 {
        ok = false;
    }
    lines.push("per call:".to_owned());
    for (route, s) in ROUTES.iter().zip(&stats.routes) {
        lines.push(format!(
            "  {:<8} -> {:<8} {:<14} {:>5} allowed {:>5} denied {:>3} failed  decided by {}",
            route.caller,
            route.callee,
            format!("{} {}", route.method, route.path),
            s.allowed,
            s.denied,
            s.failed,
            s.decided_by.as_deref().unwrap_or("-")
        ));
        if let Some(error) = &s.last_error {
            lines.push(format!("      last failure: {error}"));
        }
    }

    // The audit files: each verified, then summed up.
    let mut files: Vec<(String, PathBuf)> = vec![("CA issuance".to_owned(), layout.ca_audit())];
    for service in &SERVICES {
        files.push((
            format!("{} proxy", service.name),
            layout.proxy_audit(service),
        ));
    }
    let mut proxies = Summary::default();
    let mut ca = Summary::default();
    let mut file_lines = Vec::new();
    for (index, (label, path)) in files.iter().enumerate() {
        let state = match verify_file_anchored(path, &Anchor::default()) {
            Ok(report) => format!("{} records, hash chain intact", report.records),
            Err(e) => {
                ok = false;
                format!("NOT INTACT: {e}")
            }
        };
        file_lines.push(format!("  {label:<16} {}  ({state})", path.display()));
        let into = if index == 0 { &mut ca } else { &mut proxies };
        if let Err(e) = into.add_file(path) {
            file_lines.push(format!("    cannot read it: {e}"));
        }
    }
    for (title, decision) in [
        ("denies by policy (from the proxies' audit files):", "deny"),
        ("allows by policy:", "allow"),
    ] {
        lines.push(title.to_owned());
        for ((d, policy), n) in &proxies.by_policy {
            if *d == decision {
                lines.push(format!("  {policy:<36} {n}"));
            }
        }
    }

    let mut rotations: BTreeMap<&str, u64> = BTreeMap::new();
    for change in stats.svids.iter().filter(|c| !c.first) {
        *rotations.entry(change.service).or_default() += 1;
    }
    let per: Vec<String> = rotations.iter().map(|(s, n)| format!("{s} {n}")).collect();
    lines.push(if per.is_empty() {
        "rotations seen: 0 (SVIDs renew at about half their TTL: run longer to see one)".to_owned()
    } else {
        format!(
            "rotations seen: {} ({}); each proxy swapped its new SVID in without a restart",
            rotations.values().sum::<u64>(),
            per.join(", ")
        )
    });
    lines.push(format!(
        "issuance (CA audit): {} SVIDs issued, {} refused",
        ca.count(AuditDecision::Issued),
        ca.count(AuditDecision::Refused)
    ));
    if !killed.is_empty() {
        lines.push(format!(
            "warning: {} did not stop within the grace period and were killed",
            killed.join(", ")
        ));
    }

    lines.push("audit files:".to_owned());
    lines.extend(file_lines);
    let payments = layout.root.join("payments").join("audit.jsonl");
    let payments = payments.display();
    let ca_audit = layout.ca_audit();
    let ca_audit = ca_audit.display();
    if keep {
        lines.push("inspect them:".to_owned());
    } else {
        lines.push(
            "the data dir is removed now; run with `--out DIR` to keep it, then inspect the files:"
                .to_owned(),
        );
    }
    lines.push(format!("  meshward audit verify {payments}"));
    lines.push(format!("  meshward audit summary {payments}"));
    lines.push(format!("  meshward audit query {payments} --decision deny"));
    lines.push(format!("  meshward audit query {ca_audit} --kind issuance"));
    lines.push(format!(
        "  meshward check --data-dir {}   # roots and intermediates close to expiry",
        layout.ca.display()
    ));
    if keep {
        lines.push(format!(
            "data dir kept: {} (logs in {})",
            layout.root.display(),
            layout.logs.display()
        ));
    }
    lines.push(if ok {
        "result: every call ended as the policies say".to_owned()
    } else {
        "result: FAILED (see above)".to_owned()
    });
    let mut text = lines.join("\n");
    text.push('\n');
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, text.as_bytes());
    let _ = std::io::Write::flush(&mut stdout);
    ok
}

/// The data dir: `--out` (created; must be new or empty) or a fresh temporary one. Absolute.
fn data_dir(out: Option<&Path>) -> anyhow::Result<(PathBuf, bool)> {
    match out {
        Some(dir) => {
            if dir.exists() {
                let mut entries = std::fs::read_dir(dir)
                    .with_context(|| format!("cannot read `--out` dir `{}`", dir.display()))?;
                if entries.next().is_some() {
                    anyhow::bail!(
                        "`--out` dir `{}` is not empty: pick a new directory or remove it",
                        dir.display()
                    );
                }
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `--out` dir `{}`", dir.display()))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve `{}`", dir.display()))?;
            Ok((dir, true))
        }
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::env::temp_dir()
                .join(format!("meshward-demo-{}-{nanos:08x}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve `{}`", dir.display()))?;
            Ok((dir, false))
        }
    }
}

/// SIGINT or SIGTERM: stop cleanly (the first one wins).
async fn watch_signals(stop: CancellationToken, signalled: Arc<Mutex<Option<&'static str>>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    *signalled
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(name);
    stop.cancel();
}

fn service_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{name}")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn duration(text: &str) -> Result<Duration, String> {
    let d = meshward_ca::config::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{text}` is too short: at least 1s"));
    }
    Ok(d)
}
