//! `meshward check`: real certificates (PEM files made with the test PKI) and a real CA's data dir,
//! running and stopped.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use meshward_identity::test_util::{SvidOptions, TEST_AUTHORITY_TTL, TestPki};
use meshward_identity::x509::certs_to_pem;
use meshward_tests::CaProcess;
use serde_json::Value;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn meshward(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshward"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHWARD_") {
            command.env_remove(key);
        }
    }
    command.args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A root and an intermediate that expire in two days, and an SVID valid for an hour.
struct Files {
    root: PathBuf,
    intermediate: PathBuf,
    svid: PathBuf,
}

fn files(dir: &Path) -> Files {
    let pki = TestPki::new_at(
        "example.org",
        SystemTime::now() - TEST_AUTHORITY_TTL + 2 * DAY,
    );
    let (svid, _key) = pki.svid_with(
        "spiffe://example.org/ns/shop/sa/web",
        SvidOptions {
            not_after: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..SvidOptions::default()
        },
    );
    Files {
        root: write(dir, "root.pem", &pki.root_pem()),
        intermediate: write(
            dir,
            "intermediate.pem",
            &certs_to_pem(&[pki.intermediate_der()]),
        ),
        // Only the leaf: its chain expires in two days and is checked from its own file.
        svid: write(dir, "svid.pem", &certs_to_pem(&svid.chain()[..1])),
    }
}

#[test]
fn certificates_outside_the_window_pass() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = meshward(&[
        "check",
        "--within",
        "1d",
        "--cert",
        f.root.to_str().unwrap(),
        "--cert",
        f.intermediate.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("2 certificates checked, 0 expire within 1d"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("root") && l.starts_with("ok")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("intermediate")), "{text}");
}

#[test]
fn each_certificate_in_the_window_is_named_and_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let out = meshward(&[
        "check",
        "--within",
        "7d",
        "--cert",
        f.root.to_str().unwrap(),
        "--cert",
        f.intermediate.to_str().unwrap(),
        "--cert",
        f.svid.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("root `spiffe://example.org"), "{err}");
    assert!(err.contains("intermediate `"), "{err}");
    assert!(
        err.contains("svid `spiffe://example.org/ns/shop/sa/web`"),
        "{err}"
    );
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], false);
    let certs = report["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3);
    assert!(certs.iter().all(|c| c["expiring"] == true));
    let kinds: Vec<&str> = certs.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["root", "intermediate", "svid"]);

    // Only the SVID is within an hour and a half.
    let out = meshward(&[
        "check",
        "--within",
        "90m",
        "--cert",
        f.root.to_str().unwrap(),
        "--cert",
        f.svid.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("svid `"), "{err}");
    assert!(!err.contains("root `"), "{err}");
}

#[test]
fn an_expired_certificate_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("example.org");
    let now = SystemTime::now();
    let (svid, _) = pki.svid_with(
        "spiffe://example.org/old",
        SvidOptions {
            not_before: Some(now - 2 * DAY),
            not_after: Some(now - DAY),
            ..SvidOptions::default()
        },
    );
    let path = write(dir.path(), "old.pem", &certs_to_pem(&svid.chain()[..1]));
    let out = meshward(&["check", "--within", "0s", "--cert", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("has expired"), "{}", stderr(&out));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshward(&["check"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--data-dir"), "{}", stderr(&out));

    let out = meshward(&["check", "--within", "a week", "--cert", "x.pem"]);
    assert_eq!(out.status.code(), Some(64));

    let missing = dir.path().join("missing.pem");
    let out = meshward(&["check", "--cert", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
    assert!(stderr(&out).contains("missing.pem"), "{}", stderr(&out));

    let empty = write(dir.path(), "empty.pem", "no pem here\n");
    let out = meshward(&["check", "--cert", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
    assert!(
        stderr(&out).contains("no usable certificate"),
        "{}",
        stderr(&out)
    );

    let not_ca = dir.path().join("not-a-ca");
    std::fs::create_dir(&not_ca).unwrap();
    let out = meshward(&["check", "--data-dir", not_ca.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(74));
    assert!(
        stderr(&out).contains("is not a ca data dir"),
        "{}",
        stderr(&out)
    );
    // Read-only: nothing was created in it.
    assert_eq!(std::fs::read_dir(&not_ca).unwrap().count(), 0);

    let out = meshward(&[
        "check",
        "--socket",
        dir.path().join("no.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(74));
    assert!(stderr(&out).contains("workload api"), "{}", stderr(&out));
}

#[test]
fn a_ca_data_dir_is_checked_running_and_stopped() {
    let mut ca = CaProcess::start_default(env!("CARGO_BIN_EXE_meshward"));
    let data_dir = ca.data_dir().to_str().unwrap().to_owned();

    // Running: over the admin socket.
    let out = meshward(&["check", "--data-dir", &data_dir, "--within", "30d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("from ca authority active"), "{text}");
    assert!(text.contains("root"), "{text}");

    // A year-long root is inside a 400-day window.
    let out = meshward(&["check", "--data-dir", &data_dir, "--within", "400d"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("root `spiffe://"), "{}", stderr(&out));

    // Stopped: from the SQLite state.
    assert!(ca.terminate().success());
    let out = meshward(&[
        "check",
        "--data-dir",
        &data_dir,
        "--within",
        "30d",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["certificates"][0]["kind"], "root");
}

#[test]
fn the_svids_a_workload_api_hands_out_are_checked() {
    let ca = CaProcess::start_default(env!("CARGO_BIN_EXE_meshward"));
    let dir = tempfile::tempdir().unwrap();
    let token = ca.create_token("node-1", "10m");
    let uid = rustix::process::getuid().as_raw().to_string();
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/ops/sa/checker",
        "--node",
        "node-1",
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    let bundle = write(dir.path(), "bundle.pem", &ca.cli_ok(&["bundle", "show"]));
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["agent", "run", "--ca", &ca.addr().to_string()])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .args(["--sync-interval", "1s"])
        .env("MESHWARD_AGENT_JOIN_TOKEN", &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let socket = socket.to_str().unwrap();
    // The SVID lives an hour (the CA's default): outside a 30-minute window, inside a 2-hour one.
    let out = meshward(&["check", "--socket", socket, "--within", "30m"]);
    let ok = out.status.success();
    let text = stdout(&out);
    let err = stderr(&out);
    let out2 = meshward(&["check", "--socket", socket, "--within", "2h"]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(ok, "{text}{err}");
    assert!(
        text.contains("svid          spiffe://example.org/ns/ops/sa/checker"),
        "{text}"
    );
    assert!(text.contains("from workload api bundle"), "{text}");
    assert_eq!(out2.status.code(), Some(1), "{}", stderr(&out2));
    assert!(
        stderr(&out2).contains("svid `spiffe://example.org/ns/ops/sa/checker`"),
        "{}",
        stderr(&out2)
    );
}
