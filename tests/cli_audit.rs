//! `meshward audit verify` as an operator runs it: the real binary, real files, exit codes and output.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshward_identity::audit::{AuditDecision, AuditEvent, AuditLog};

fn meshward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(args)
        .env_remove("MESHWARD_AUDIT_FILE")
        .env_remove("MESHWARD_AUDIT_EXPECT_HEAD")
        .env_remove("MESHWARD_AUDIT_EXPECT_RECORDS")
        .env_remove("MESHWARD_OUTPUT")
        .env_remove("MESHWARD_LOG")
        .env_remove("MESHWARD_LOG_FORMAT")
        .output()
        .unwrap()
}

fn audit_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    for i in 0..n {
        let decision = if i % 2 == 0 {
            AuditDecision::Allow
        } else {
            AuditDecision::Deny
        };
        log.append(AuditEvent::new(
            decision,
            format!("spiffe://example.org/ns/a/sa/s{i}"),
            "GET",
            "spiffe://example.org/ns/b/sa/api",
        ))
        .unwrap();
    }
    path
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn head_of(path: &Path) -> String {
    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    json["head"].as_str().unwrap().to_owned()
}

#[test]
fn intact_file_exits_0_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 5);
    let out = meshward(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("is intact: 5 records from "), "{text}");
    assert!(text.contains(&head_of(&path)), "{text}");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn intact_file_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 3);
    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["intact"], true);
    assert_eq!(json["records"], 3);
    assert_eq!(json["head"].as_str().unwrap().len(), 64);
    assert_eq!(json["first_ts"].as_str().unwrap().len(), 27);
}

#[test]
fn tampered_file_exits_1_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 5);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen("/sa/s2\"", "/sa/admin\"", 1)).unwrap();

    let out = meshward(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "audit file `{}` is not intact: line 3: record 3 was edited",
            path.display()
        )),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn tampered_file_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 5);
    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, l)| l)
        .collect();
    fs::write(&path, kept.join("\n") + "\n").unwrap();

    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["intact"], false);
    assert_eq!(json["line"], 2);
    assert_eq!(json["kind"], "broken_chain");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("record 2 is missing"),
        "{json}"
    );
    assert!(stderr(&out).contains("line 2: record 3 follows record 1: record 2 is missing"));
}

#[test]
fn records_removed_from_the_end_fail_against_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 5);
    let head = head_of(&path);
    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(4).collect();
    fs::write(&path, kept.join("\n") + "\n").unwrap();

    let out = meshward(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the shorter chain is valid on its own"
    );

    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--expect-head",
        &head,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("line 5: the anchored head"),
        "{}",
        stderr(&out)
    );

    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--expect-records",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("fewer than the 5 anchored"),
        "{}",
        stderr(&out)
    );

    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--expect-records",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("the anchor holds"));
}

#[test]
fn missing_file_is_one_line_and_exit_66() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.jsonl");
    let out = meshward(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot open audit file `{}`", path.display())),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_one_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 1);
    for args in [
        vec![
            "audit",
            "verify",
            path.to_str().unwrap(),
            "--expect-head",
            "nothex",
        ],
        vec![
            "audit",
            "verify",
            path.to_str().unwrap(),
            "--expect-records",
            "-3",
        ],
        vec![
            "audit",
            "verify",
            path.to_str().unwrap(),
            "--output",
            "yaml",
        ],
        vec!["audit", "verify", path.to_str().unwrap(), "--bogus"],
        vec!["audit", "verify"],
        vec!["audit", "frobnicate"],
    ] {
        let out = meshward(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("meshward: "), "{err}");
    }
    let out = meshward(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--expect-head",
        "nothex",
    ]);
    assert!(
        stderr(&out).contains("is not a chain hash"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_log_settings_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 1);
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["audit", "verify", path.to_str().unwrap()])
        .env("MESHWARD_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["audit", "verify", path.to_str().unwrap()])
        .env("MESHWARD_LOG", "meshward=notalevel")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid MESHWARD_LOG filter"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 2);
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["audit", "verify", "--output", "json"])
        .env("MESHWARD_AUDIT_FILE", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"records\":2"));
}

#[test]
fn json_logs_go_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_file(dir.path(), 1);
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["audit", "verify", path.to_str().unwrap()])
        .env("MESHWARD_LOG", "debug")
        .env("MESHWARD_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let first_log: serde_json::Value =
        serde_json::from_str(stderr(&out).lines().next().unwrap()).unwrap();
    assert_eq!(first_log["fields"]["message"], "verifying audit file");
    assert!(stdout(&out).contains("is intact"));
}
