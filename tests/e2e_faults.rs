//! End-to-end fault scenarios, each on its own mesh (real CA, agent and proxy processes on
//! loopback, see `meshward_tests::mesh`): the CA SIGKILLed and restarted mid-traffic, the agent
//! restarted under traffic, policy hot reload (and a broken reload), and SIGTERM draining a proxy.

// Indexing a `serde_json::Value` never panics: a missing key is `Null`.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use meshward_tests::mesh::{Load, Mesh, MeshOptions, SLOW, workload_id};

const BIN: &str = env!("CARGO_BIN_EXE_meshward");
const EXPIRY: &str = "meshward_proxy_svid_expiry_seconds";

fn entry_ids(mesh: &Mesh) -> Vec<String> {
    let text = mesh.ca_cli_ok(&["entry", "list", "--output", "json"]);
    let entries: serde_json::Value = serde_json::from_str(&text).expect("entry list json");
    let mut ids: Vec<String> = entries
        .as_array()
        .expect("an array of entries")
        .iter()
        .map(|e| e.to_string())
        .collect();
    ids.sort();
    ids
}

fn assert_no_failures(load: Load, what: &str) -> u64 {
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{what}: {} of {} requests failed: {:?}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        report.failures.iter().take(10).collect::<Vec<_>>()
    );
    assert!(report.ok > 0, "{what}: no request went through");
    report.ok
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (6) SIGKILL the CA mid-traffic, restart it on the same data dir and port: no request fails,
/// the entries are all still there, its audit chain still verifies, and the agent keeps working
/// with it (the proxies' 30 s SVIDs are renewed through the restarted CA, and a new entry
/// registered after the restart is served to its workload).
#[test]
fn ca_crash_and_restart_loses_no_request_and_no_state() {
    let mut mesh = Mesh::start(MeshOptions::new(BIN).svid_ttl("30s"));
    let entries_before = entry_ids(&mesh);
    assert_eq!(entries_before.len(), 2, "{entries_before:?}");
    let load = Load::start(mesh.outbound, "/ca-crash", 3);
    std::thread::sleep(Duration::from_secs(1));
    let expiry_before = (
        mesh.proxy_metric(mesh.client.admin, EXPIRY)
            .expect("client expiry"),
        mesh.proxy_metric(mesh.server.admin, EXPIRY)
            .expect("server expiry"),
    );
    mesh.crash_and_restart_ca();
    assert_eq!(entry_ids(&mesh), entries_before, "entries survive a crash");

    // The agent syncs with the restarted CA: an entry made now reaches its workload.
    let late = mesh.link("late-workload");
    let late_id = workload_id("late");
    mesh.register(&late_id, &late);
    let mut last = String::new();
    let served = eventually(Duration::from_secs(15), || {
        let out = mesh.fetch_as(&late);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success() && last.contains(&late_id)
    });
    assert!(
        served,
        "the agent got no svid for an entry made after the ca restart: {last}\nagent log:\n{}",
        mesh.agent.log()
    );
    // The proxies' SVIDs are renewed (at half their 30 s life) through the restarted CA.
    let renewed = eventually(Duration::from_secs(30), || {
        mesh.proxy_metric(mesh.client.admin, EXPIRY)
            .is_some_and(|c| c > expiry_before.0 + 1.0)
            && mesh
                .proxy_metric(mesh.server.admin, EXPIRY)
                .is_some_and(|s| s > expiry_before.1 + 1.0)
    });
    assert!(
        renewed,
        "the proxies' svids were not renewed after the ca restart\nagent log:\n{}",
        mesh.agent.log()
    );
    assert_no_failures(load, "ca crash");
    mesh.assert_audit_verifies(&mesh.ca_dir.join("audit.jsonl"));
}

/// (7) Restart the agent under traffic: no request fails, and the proxies reconnect to the new
/// agent within seconds (each gets a fresh SVID from it: its expiry gauge changes).
#[test]
fn agent_restart_proxies_recover_within_seconds() {
    // A 1h TTL: no rotation can happen during the test, so a changed expiry is the reconnection.
    let mut mesh = Mesh::start(MeshOptions::new(BIN));
    let load = Load::start(mesh.outbound, "/agent-restart", 3);
    std::thread::sleep(Duration::from_secs(1));
    let before = (
        mesh.proxy_metric(mesh.client.admin, EXPIRY)
            .expect("client expiry"),
        mesh.proxy_metric(mesh.server.admin, EXPIRY)
            .expect("server expiry"),
    );
    let restarted = Instant::now();
    mesh.restart_agent();
    let recovered = eventually(Duration::from_secs(10), || {
        let now = (
            mesh.proxy_metric(mesh.client.admin, EXPIRY),
            mesh.proxy_metric(mesh.server.admin, EXPIRY),
        );
        now.0.is_some_and(|c| c > before.0) && now.1.is_some_and(|s| s > before.1)
    });
    assert!(
        recovered,
        "the proxies held no new svid within 10s of the agent restart ({:?} after); before {before:?}\nclient log:\n{}\nagent log:\n{}",
        restarted.elapsed(),
        mesh.client_proxy.log(),
        mesh.agent.log()
    );
    let (status, _) = mesh
        .call("GET", "/after-restart")
        .expect("call after restart");
    assert_eq!(status, 200);
    assert_no_failures(load, "agent restart");
}

/// (8) A new policy file permitting a denied call takes effect within seconds; a broken change
/// is refused and the last good set stays in force (the permit still works, the forbid too).
#[test]
fn policy_hot_reload_takes_effect_and_a_broken_reload_keeps_the_old_set() {
    let mesh = Mesh::start(MeshOptions::new(BIN));
    let (status, body) = mesh.call("POST", "/orders").unwrap();
    assert_eq!(status, 403, "POST is denied before the reload: {body}");

    let permit = format!(
        r#"@id("e2e-client-posts-orders")
permit (
  principal == Workload::"{}",
  action == Action::"POST",
  resource == Workload::"{}"
) when {{ context.path == "/orders" }};
"#,
        mesh.client.id, mesh.server.id
    );
    mesh.write_policy("orders.cedar", &permit);
    let allowed = eventually(Duration::from_secs(5), || {
        matches!(mesh.call("POST", "/orders"), Ok((200, _)))
    });
    assert!(
        allowed,
        "the new permit did not take effect within 5s; server log:\n{}",
        mesh.server_proxy.log()
    );
    let audit = mesh.wait_server_audit("the reloaded permit", |a| {
        a.records().iter().any(|r| {
            r["decision"] == "allow"
                && r["policies"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p == "e2e-client-posts-orders"))
        })
    });
    assert!(!audit.records().is_empty());

    let failures_before = mesh
        .proxy_metric(
            mesh.server.admin,
            "meshward_proxy_policy_reload_failures_total",
        )
        .unwrap_or(0.0);
    // Broken: the permit's file replaced by one that does not parse, which would drop the permit
    // if it were applied.
    mesh.write_policy("orders.cedar", "permit (principal, action, resource\n");
    let refused = eventually(Duration::from_secs(5), || {
        mesh.proxy_metric(
            mesh.server.admin,
            "meshward_proxy_policy_reload_failures_total",
        )
        .is_some_and(|n| n > failures_before)
    });
    assert!(
        refused,
        "the broken set was not counted as refused; server log:\n{}",
        mesh.server_proxy.log()
    );
    for _ in 0..3 {
        let (status, body) = mesh.call("POST", "/orders").unwrap();
        assert_eq!(status, 200, "the last good set stays in force: {body}");
        let (status, body) = mesh.call("GET", "/admin").unwrap();
        assert_eq!(status, 403, "the old forbid stays in force: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    mesh.assert_audit_verifies(&mesh.server.audit);
}

/// (10) SIGTERM to the server proxy while a slow request is in flight: the request completes,
/// new connections are refused, and the proxy exits 0.
#[test]
fn sigterm_drains_in_flight_requests_and_refuses_new_connections() {
    let mut mesh = Mesh::start(MeshOptions::new(BIN));
    let before = mesh.app.requests();
    let outbound = mesh.outbound;
    let slow = std::thread::spawn(move || meshward_tests::mesh::http(outbound, "GET", "/slow"));
    assert!(
        eventually(Duration::from_secs(5), || mesh.app.requests() > before),
        "the slow request did not reach the app"
    );
    let sent = Instant::now();
    mesh.server_proxy.signal(rustix::process::Signal::TERM);
    let refused = eventually(Duration::from_secs(2), || {
        TcpStream::connect_timeout(&mesh.inbound, Duration::from_millis(200)).is_err()
    });
    assert!(
        refused,
        "the server proxy still accepts connections after SIGTERM"
    );
    assert!(
        sent.elapsed() < SLOW,
        "new connections must be refused while the slow request is still in flight"
    );
    let (status, body) = slow
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, 200, "the in-flight request completes: {body}");
    assert_eq!(body, "GET /slow ok\n");
    let status = mesh.server_proxy.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "the proxy exits 0 after draining: {status}"
    );
    mesh.assert_audit_verifies(&mesh.server.audit);
}
