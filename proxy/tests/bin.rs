//! The sidecar-only binary, `meshward-proxy run`, as a process: it serves with `meshward proxy
//! run`'s flags (mTLS, a Cedar decision, an audit record each), drains on SIGTERM, and turns bad
//! command lines and settings into one-line errors with exit code 64, before binding anything.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{API, App, Client, INTRUDER, POLICIES, WEB, status, write_svid_dir};
use meshward_identity::test_util::TestPki;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_meshward-proxy");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MESHWARD_LOG")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temp dir with `api`'s SVID in `svid/`, the test policies in `policies/`.
fn sidecar_dir(pki: &TestPki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (svid, key) = pki.svid(API);
    write_svid_dir(&dir.path().join("svid"), pki, &svid, &key);
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/test.cedar"), POLICIES).unwrap();
    dir
}

fn start(dir: &Path, inbound: SocketAddr, app: SocketAddr, admin: SocketAddr) -> Child {
    Command::new(BIN)
        .args(["run", "--node", "bin-test", "--drain-grace", "2s"])
        .arg("--svid-dir")
        .arg(dir.join("svid"))
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--audit")
        .arg(dir.join("audit.jsonl"))
        .arg("--inbound")
        .arg(format!("{inbound}={app}"))
        .arg("--admin")
        .arg(admin.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `GET path` on the admin port once it accepts; the raw response.
async fn admin_get(admin: SocketAddr, path: &str, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "meshward-proxy exited while starting"
        );
        if TcpStream::connect(admin).await.is_ok() {
            let response = common::plain_get(admin, path).await;
            if status(&response) == 200 || Instant::now() > deadline {
                return response;
            }
        }
        assert!(Instant::now() < deadline, "the admin port never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "meshward-proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn meshward_proxy_run_decides_audits_and_drains_on_sigterm() {
    let pki = TestPki::new(common::TD);
    let dir = sidecar_dir(&pki);
    let app = App::start().await;
    let ports = meshward_ops::ports::free_ports(2).unwrap();
    let inbound: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let mut child = start(dir.path(), inbound, app.addr, admin);

    let ready = admin_get(admin, "/ready", &mut child).await;
    assert_eq!(status(&ready), 200, "{ready}");

    let client = |id: &str| {
        let (svid, key) = pki.svid(id);
        Client::new(&pki, svid.into_chain(), key, &[b"http/1.1"])
    };
    let allowed = client(WEB).get(inbound, "/api/orders").await.unwrap();
    assert_eq!(status(&allowed), 200, "{allowed}");
    assert!(allowed.ends_with("app saw /api/orders"), "{allowed}");
    let denied = client(INTRUDER).get(inbound, "/api/orders").await.unwrap();
    assert_eq!(status(&denied), 403, "{denied}");
    assert!(denied.contains("no policy permits"), "{denied}");
    // Only the allowed request reached the app, with the caller's identity.
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    let xfcc = seen[0].headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(xfcc.contains(&format!("URI={WEB}")), "{xfcc}");

    let metrics = admin_get(admin, "/metrics", &mut child).await;
    assert!(metrics.contains("decision=\"deny\""), "{metrics}");

    sigterm(&child);
    let exit = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "drained and stopped on SIGTERM");

    // One audit record per decision, allow and deny, and the chain verifies.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["principal"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(decisions, [(WEB, "allow"), (INTRUDER, "deny")]);
    assert!(records.iter().all(|r| r["node"] == "bin-test"));
}

#[test]
fn version_and_help_exit_zero_and_a_missing_subcommand_is_a_usage_error() {
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&version.stdout);
    assert!(stdout.starts_with("meshward-proxy "), "{stdout}");

    let help = run(&["run", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--policies"));

    let bare = run(&[]);
    assert_eq!(bare.status.code(), Some(64));
}

#[test]
fn an_unknown_flag_is_one_line_naming_help() {
    let out = run(&["run", "--bogus"]);
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("meshward-proxy: unexpected argument '--bogus'")
            && err.contains("see `meshward-proxy --help`"),
        "{err}"
    );
}

#[test]
fn a_bad_log_filter_is_refused() {
    let out = run(&["--log", "meshward=[", "run"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).starts_with("meshward-proxy: invalid MESHWARD_LOG filter `meshward=[`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn settings_it_cannot_start_with_exit_64_before_binding_or_auditing() {
    let pki = TestPki::new(common::TD);
    let dir = sidecar_dir(&pki);
    let port = meshward_ops::ports::free_port().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let base = |policies: &Path| -> Vec<String> {
        vec![
            "run".to_owned(),
            "--svid-dir".to_owned(),
            dir.path().join("svid").display().to_string(),
            "--policies".to_owned(),
            policies.display().to_string(),
            "--audit".to_owned(),
            audit.display().to_string(),
            "--inbound".to_owned(),
            format!("127.0.0.1:{port}=127.0.0.1:9"),
        ]
    };

    // A policy set that does not validate against the schema.
    let bad = dir.path().join("bad-policies");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("typo.cedar"),
        "permit (principal, action == Action::\"FETCH\", resource);",
    )
    .unwrap();
    let args = base(&bad);
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("meshward-proxy: ") && err.contains("typo.cedar"),
        "{err}"
    );

    // An inbound listener without its app address.
    let mut args = base(&dir.path().join("policies"));
    let last = args.len() - 1;
    args[last] = format!("127.0.0.1:{port}");
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("LISTEN=APP_ADDR"), "{}", stderr(&out));

    // A zero idle timeout for the app's connections.
    let mut args = base(&dir.path().join("policies"));
    args.extend(["--app-idle-timeout".to_owned(), "0s".to_owned()]);
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid `app_idle_timeout` `0s`"),
        "{}",
        stderr(&out)
    );

    // Nothing was bound and nothing was decided.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port was left free");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(audited.is_empty(), "{audited}");
}
