//! `meshward audit query` and `meshward audit summary` on real audit files written by `AuditLog`.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use meshward_identity::audit::{AuditDecision, AuditEvent, AuditLog, Timestamp};
use serde_json::Value;

const FRONTEND: &str = "spiffe://example.org/ns/shop/sa/frontend";
const REPORTS: &str = "spiffe://example.org/ns/shop/sa/reports";
const PAYMENTS: &str = "spiffe://example.org/ns/shop/sa/payments";
const AGENT: &str = "spiffe://example.org/meshward/agent/join/node-1";

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

fn ago(d: Duration) -> Timestamp {
    Timestamp::from(time::OffsetDateTime::from(SystemTime::now() - d))
}

/// Two hours ago: an allow and a deny; now: 3 allows (frontend), 2 denies (reports, by a forbid),
/// 1 deny by default, and two issuance records (one issued, one refused).
fn audit_file(dir: &Path) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    let authz = |decision, principal: &str, policies: &[&str], ts| {
        let mut e = AuditEvent::new(decision, principal, "POST", PAYMENTS);
        e.policies = policies.iter().map(|p| (*p).to_owned()).collect();
        e.context.insert("path".into(), Value::from("/pay"));
        e.ts = ts;
        e
    };
    let old = ago(Duration::from_secs(2 * 3600));
    log.append(authz(AuditDecision::Allow, FRONTEND, &["pays"], old))
        .unwrap();
    log.append(authz(AuditDecision::Deny, REPORTS, &["never"], old))
        .unwrap();
    for _ in 0..3 {
        log.append(authz(
            AuditDecision::Allow,
            FRONTEND,
            &["pays"],
            Timestamp::now(),
        ))
        .unwrap();
    }
    for _ in 0..2 {
        log.append(authz(
            AuditDecision::Deny,
            REPORTS,
            &["never"],
            Timestamp::now(),
        ))
        .unwrap();
    }
    log.append(authz(
        AuditDecision::Deny,
        "spiffe://example.org/ns/shop/sa/catalog",
        &[],
        Timestamp::now(),
    ))
    .unwrap();
    let mut issued = AuditEvent::new(AuditDecision::Issued, AGENT, "issue", FRONTEND);
    issued.spiffe_id = Some(FRONTEND.to_owned());
    issued.serial = Some("0a1b".to_owned());
    issued.agent = Some(AGENT.to_owned());
    log.append(issued).unwrap();
    let mut refused = AuditEvent::new(AuditDecision::Refused, AGENT, "issue", PAYMENTS);
    refused.errors = vec!["not entitled on this node".to_owned()];
    log.append(refused).unwrap();
    path
}

fn query(file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["audit", "query", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = meshward(&args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out).lines().map(str::to_owned).collect()
}

#[test]
fn query_filters_by_decision_principal_resource_kind_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path());

    assert_eq!(query(&file, &[]).len(), 10);
    let denies = query(&file, &["--decision", "deny"]);
    assert_eq!(denies.len(), 4, "{denies:?}");
    assert!(denies.iter().all(|l| l.contains(" deny ")), "{denies:?}");
    assert_eq!(
        denies.iter().filter(|l| l.contains("by never")).count(),
        3,
        "{denies:?}"
    );
    assert_eq!(
        denies
            .iter()
            .filter(|l| l.contains("by (no policy permits)"))
            .count(),
        1
    );

    let reports = query(&file, &["--principal", REPORTS]);
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|l| l.contains(REPORTS)));
    // Principals are matched exactly, never as a prefix.
    assert!(
        query(
            &file,
            &["--principal", "spiffe://example.org/ns/shop/sa/rep"]
        )
        .is_empty()
    );

    assert_eq!(query(&file, &["--resource", PAYMENTS]).len(), 9);
    assert_eq!(query(&file, &["--kind", "issuance"]).len(), 2);
    let issued = query(&file, &["--decision", "issued"]);
    assert_eq!(issued.len(), 1);
    assert!(issued[0].contains("serial 0a1b"), "{issued:?}");
    let refused = query(&file, &["--decision", "refused"]);
    assert!(
        refused[0].contains("not entitled on this node"),
        "{refused:?}"
    );

    // `--since` as an age and as RFC 3339.
    assert_eq!(query(&file, &["--since", "1h"]).len(), 8);
    assert_eq!(query(&file, &["--since", "3h"]).len(), 10);
    assert_eq!(
        query(
            &file,
            &[
                "--since",
                "1h",
                "--decision",
                "deny",
                "--principal",
                REPORTS
            ]
        )
        .len(),
        2
    );
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(query(&file, &["--since", &future]).is_empty());
}

#[test]
fn query_json_prints_the_records_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path());
    let lines = query(&file, &["--output", "json", "--decision", "allow"]);
    assert_eq!(lines.len(), 4);
    let written: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    for line in &lines {
        let record: Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["decision"], "allow");
        assert_eq!(record["principal"], FRONTEND);
        // Byte for byte the line in the file: hashes can be checked from query output.
        assert!(written.contains(line), "{line}");
    }
}

#[test]
fn query_refuses_a_bad_since_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path());
    let out = meshward(&[
        "audit",
        "query",
        file.to_str().unwrap(),
        "--since",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("`yesterday`"), "{}", stderr(&out));

    let out = meshward(&[
        "audit",
        "query",
        file.to_str().unwrap(),
        "--decision",
        "maybe",
    ]);
    assert_eq!(out.status.code(), Some(64));

    let missing = dir.path().join("nope.jsonl");
    let out = meshward(&["audit", "query", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
    assert!(stderr(&out).contains("nope.jsonl"), "{}", stderr(&out));
    let out = meshward(&["audit", "summary", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
}

#[test]
fn query_skips_a_damaged_line_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path());
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{not a record}";
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = meshward(&["audit", "query", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).lines().count(), 9);
    let err = stderr(&out);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("meshward audit verify"), "{err}");
}

#[test]
fn summary_counts_callers_decisions_policies_and_issuance() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path());
    let out = meshward(&[
        "audit",
        "summary",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(s["records"], 10);
    assert_eq!(s["decisions"]["allow"], 4);
    assert_eq!(s["decisions"]["deny"], 4);
    assert_eq!(s["decisions"]["issued"], 1);
    assert_eq!(s["decisions"]["refused"], 1);
    let policy = |decision: &str, policy: &str| {
        s["by_policy"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["decision"] == decision && p["policy"] == policy)
            .map(|p| p["count"].as_u64().unwrap())
    };
    assert_eq!(policy("allow", "pays"), Some(4));
    assert_eq!(policy("deny", "never"), Some(3));
    assert_eq!(policy("deny", "(no policy permits)"), Some(1));
    let calls = s["calls"].as_array().unwrap();
    let reports = calls.iter().find(|c| c["principal"] == REPORTS).unwrap();
    assert_eq!(reports["resource"], PAYMENTS);
    assert_eq!(reports["allow"], 0);
    assert_eq!(reports["deny"], 3);
    let issuance = s["issuance"].as_array().unwrap();
    assert!(
        issuance
            .iter()
            .any(|i| i["spiffe_id"] == FRONTEND && i["issued"] == 1)
    );

    let out = meshward(&["audit", "summary", file.to_str().unwrap()]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("decisions: 4 allow, 4 deny"), "{text}");
    assert!(text.contains("issuance: 1 issued, 1 refused"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(REPORTS) && l.ends_with(&format!("-> {PAYMENTS}  0 allow, 3 deny"))),
        "{text}"
    );
}
