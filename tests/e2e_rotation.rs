//! End-to-end rotation scenarios, each on its own mesh with 30 s SVIDs (real CA, agent and proxy
//! processes on loopback, see `meshward_tests::mesh`): SVID rotation under continuous load, and a
//! root rotation (prepare -> activate -> retire) with traffic flowing. Both must lose no request.

// Indexing a `serde_json::Value` never panics: a missing key is `Null`.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshward_tests::mesh::{Load, LoadReport, Mesh, MeshOptions};

const BIN: &str = env!("CARGO_BIN_EXE_meshward");
const EXPIRY: &str = "meshward_proxy_svid_expiry_seconds";

fn assert_no_failures(report: &LoadReport, what: &str) {
    assert!(
        report.failures.is_empty(),
        "{what}: {} of {} requests failed: {:?}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        report.failures.iter().take(10).collect::<Vec<_>>()
    );
    assert!(report.ok > 0, "{what}: no request went through");
}

/// Counts how often each proxy's SVID expiry moved forward (a new SVID) while sampling.
struct Rotations {
    admins: Vec<SocketAddr>,
    last: Vec<Option<f64>>,
    counts: Vec<u32>,
}

impl Rotations {
    fn new(mesh: &Mesh) -> Self {
        let admins = vec![mesh.client.admin, mesh.server.admin];
        let last = admins
            .iter()
            .map(|a| mesh.proxy_metric(*a, EXPIRY))
            .collect();
        Self {
            counts: vec![0; admins.len()],
            admins,
            last,
        }
    }

    fn sample(&mut self, mesh: &Mesh) {
        for ((admin, last), count) in self.admins.iter().zip(&mut self.last).zip(&mut self.counts) {
            let now = mesh.proxy_metric(*admin, EXPIRY);
            if let (Some(now), Some(before)) = (now, *last)
                && now > before + 1.0
            {
                *count += 1;
            }
            if now.is_some() {
                *last = now;
            }
        }
    }

    /// Samples once a second for `duration`.
    fn watch(&mut self, mesh: &Mesh, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(1));
            self.sample(mesh);
        }
    }
}

/// (5) 30 s SVIDs, continuous load for ~40 s: every request succeeds, and both proxies swap in at
/// least one new SVID meanwhile.
#[test]
fn svid_rotation_under_continuous_load_loses_no_request() {
    let mesh = Mesh::start(MeshOptions::new(BIN).svid_ttl("30s"));
    let mut rotations = Rotations::new(&mesh);
    let load = Load::start(mesh.outbound, "/rotation", 4);
    rotations.watch(&mesh, Duration::from_secs(40));
    let report = load.stop();
    assert_no_failures(&report, "svid rotation");
    assert!(
        rotations.counts.iter().all(|c| *c >= 1),
        "each proxy rotates at least once in 40 s of 30 s svids (client, server): {:?}\nclient log:\n{}",
        rotations.counts,
        mesh.client_proxy.log()
    );
    mesh.assert_audit_verifies(&mesh.server.audit);
}

/// (9) prepare -> activate -> retire a root with traffic flowing: no request fails, retire is
/// accepted once everything the old root signed has expired (no `--danger-force`), and traffic
/// still flows on the new root alone.
#[test]
fn root_rotation_with_traffic_flowing_loses_no_request() {
    let mut mesh = Mesh::start(
        MeshOptions::new(BIN)
            .svid_ttl("30s")
            .ca_arg("--agent-svid-ttl", "30s"),
    );
    let load = Load::start(mesh.outbound, "/root-rotation", 3);
    let mut rotations = Rotations::new(&mesh);
    rotations.watch(&mesh, Duration::from_secs(2));

    mesh.ca_cli_ok(&["rotate", "prepare"]);
    // The new root reaches the agent and the proxies (bundle sync every second) before it signs.
    rotations.watch(&mesh, Duration::from_secs(5));
    mesh.ca_cli_ok(&["rotate", "activate"]);

    // Retire is refused while the old root's certificates are valid; poll until it is accepted.
    let started = Instant::now();
    let mut refusals = 0;
    let mut last_error = String::new();
    loop {
        let out = mesh.ca_cli(&["rotate", "retire"]);
        if out.status.success() {
            break;
        }
        refusals += 1;
        last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "retire still refused after 120 s: {last_error}"
        );
        rotations.watch(&mesh, Duration::from_secs(3));
    }
    assert!(
        refusals > 0,
        "retire right after activate must be refused (the old root's svids are valid)"
    );
    assert!(!last_error.is_empty());

    // Only the new root is trusted now: traffic keeps flowing on it.
    rotations.watch(&mesh, Duration::from_secs(8));
    let report = load.stop();
    assert_no_failures(&report, "root rotation");
    let (status, body) = mesh
        .call("GET", "/after-retire")
        .expect("a call after retire");
    assert_eq!(status, 200, "{body}");
    assert!(
        rotations.counts.iter().all(|c| *c >= 1),
        "each proxy moved to a new svid (client, server): {:?}\nclient log:\n{}\nserver log:\n{}\nagent log:\n{}",
        rotations.counts,
        svid_lines(&mesh.client_proxy.log()),
        svid_lines(&mesh.server_proxy.log()),
        svid_lines(&mesh.agent.log()),
    );
    // The agent renewed its own SVID under the new root and was never locked out (it used to
    // check the CA's answer against the bundle it read before waiting and refuse it; the CA, which
    // then made the old SVID stale at once, refused it as `stale_agent_svid` until its SVID expired
    // and it stopped).
    let agent_log = mesh.agent.log();
    assert!(
        mesh.agent.exited().is_none(),
        "the agent stopped during the root rotation:\n{}",
        svid_lines(&agent_log)
    );
    assert!(
        agent_log.contains("agent svid renewed") && !agent_log.contains("stale_agent_svid"),
        "the agent's own renewal under the new root:\n{}",
        svid_lines(&agent_log)
    );
    let roots = mesh.ca_cli_ok(&["bundle", "show"]);
    assert_eq!(
        roots.matches("BEGIN CERTIFICATE").count(),
        1,
        "the bundle holds the new root only:\n{roots}"
    );
}

/// The log lines about SVIDs, bundles and errors: what a failed rotation check needs to be read.
fn svid_lines(log: &str) -> String {
    log.lines()
        .filter(|l| {
            l.contains("svid") || l.contains("bundle") || l.contains("WARN") || l.contains("ERROR")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
