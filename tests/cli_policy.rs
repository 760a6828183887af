//! `meshward policy validate | check | diff` as an operator runs them: the real binary, the
//! repository's policy sets, exit codes and output.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn meshward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("MESHWARD_OUTPUT")
        .env_remove("MESHWARD_POLICY_SCHEMA")
        .env_remove("MESHWARD_PROXY_POLICIES")
        .env_remove("MESHWARD_LOG")
        .env_remove("MESHWARD_LOG_FORMAT")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn policies(set: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(set)
        .display()
        .to_string()
}

const FRONTEND: &str = "spiffe://demo.meshward/ns/shop/sa/frontend";
const REPORTS: &str = "spiffe://demo.meshward/ns/shop/sa/reports";
const PAYMENTS: &str = "spiffe://demo.meshward/ns/shop/sa/payments";

#[test]
fn validate_accepts_every_shipped_set() {
    for set in [
        "default",
        "demo",
        "examples/namespace-isolation",
        "examples/read-only-callers",
    ] {
        let out = meshward(&["policy", "validate", &policies(set)]);
        assert_eq!(out.status.code(), Some(0), "{set}: {}", stderr(&out));
        assert!(stdout(&out).contains("is valid:"), "{}", stdout(&out));
    }
    let out = meshward(&["policy", "validate", &policies("demo"), "--output", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["policies"], 5);
    assert_eq!(json["forbids"], 2);
}

#[test]
fn validate_reports_every_problem_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.cedar"),
        "@id(\"ok\") permit (principal, action, resource);\n\n@id(\"typo\") permit (principal, action, resource)\nwhen { principal.team == \"x\" };\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("b.cedar"),
        "permit (principal, action, resource);\n",
    )
    .unwrap();
    let out = meshward(&["policy", "validate", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("a.cedar:4:"), "{err}");
    assert!(err.contains("team"), "{err}");
    assert!(err.contains("b.cedar:1:1:"), "{err}");
    assert!(err.contains("@id"), "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn validate_a_missing_directory_is_no_input() {
    let out = meshward(&["policy", "validate", "/nonexistent/policies"]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/policies"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn validate_with_a_schema_override() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("broken.cedarschema");
    fs::write(&schema, "entity Workload {").unwrap();
    let out = meshward(&[
        "policy",
        "validate",
        &policies("demo"),
        "--schema",
        schema.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not parse"), "{}", stderr(&out));
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/schema.cedarschema");
    let out = meshward(&[
        "policy",
        "validate",
        &policies("demo"),
        "--schema",
        builtin.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn check_allows_and_names_the_policy() {
    let out = meshward(&[
        "policy",
        "check",
        "--principal",
        FRONTEND,
        "--action",
        "POST",
        "--resource",
        PAYMENTS,
        "--path",
        "/checkout/../pay",
        "--policies",
        &policies("demo"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "allow: allowed by `demo-frontend-pays`"
    );
}

#[test]
fn check_denies_with_the_forbid_or_no_policy_permits() {
    let out = meshward(&[
        "policy",
        "check",
        "--principal",
        REPORTS,
        "--action",
        "GET",
        "--resource",
        PAYMENTS,
        "--path",
        "/health",
        "--policies",
        &policies("demo"),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(
        json["policies"],
        serde_json::json!(["demo-reports-never-call-payments"])
    );
    assert_eq!(json["request"]["path"], "/health");
    let out = meshward(&[
        "policy",
        "check",
        "--principal",
        FRONTEND,
        "--action",
        "DELETE",
        "--resource",
        PAYMENTS,
        "--policies",
        &policies("demo"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).trim(), "deny: denied: no policy permits");
}

#[test]
fn check_shows_a_dry_run_decision_without_enforcing_it() {
    let out = meshward(&[
        "policy",
        "check",
        "--principal",
        FRONTEND,
        "--action",
        "GET",
        "--resource",
        "spiffe://demo.meshward/ns/shop/sa/catalog",
        "--policies",
        &policies("default"),
        "--dry-run",
        &policies("demo"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("deny: denied: no policy permits"), "{text}");
    assert!(
        text.contains("dry-run allow: allowed by `demo-frontend-reads-catalog`"),
        "{text}"
    );
}

#[test]
fn check_refuses_malformed_requests_with_usage_errors() {
    let base = ["policy", "check", "--resource", PAYMENTS, "--policies"];
    let cases: [(&[&str], &str); 4] = [
        (&["--principal", "frontend", "--action", "GET"], "principal"),
        (
            &["--principal", FRONTEND, "--action", "TRACE"],
            "unknown action `TRACE`",
        ),
        (
            &[
                "--principal",
                FRONTEND,
                "--action",
                "GET",
                "--path",
                "/a%2fb",
            ],
            "encoded `/`",
        ),
        (
            &["--principal", FRONTEND, "--action", "GET", "--host", "a b"],
            "host",
        ),
    ];
    for (extra, expected) in cases {
        let demo = policies("demo");
        let mut args: Vec<&str> = base.to_vec();
        args.push(&demo);
        args.extend_from_slice(extra);
        let out = meshward(&args);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn check_with_a_broken_policy_set_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.cedar"),
        "@id(\"x\") permit (principal, action, resource) when {",
    )
    .unwrap();
    let out = meshward(&[
        "policy",
        "check",
        "--principal",
        FRONTEND,
        "--action",
        "GET",
        "--resource",
        PAYMENTS,
        "--policies",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).is_empty(),
        "no decision is printed: {}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("a.cedar:1:"), "{}", stderr(&out));
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn diff_lists_policy_changes_and_changed_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let new: PathBuf = dir.path().join("demo-next");
    copy_dir(Path::new(&policies("demo")), &new);
    // Remove the reports forbid, widen the pay rule, add a policy.
    let guardrails = fs::read_to_string(new.join("guardrails.cedar")).unwrap();
    let start = guardrails
        .find("@id(\"demo-reports-never-call-payments\")")
        .unwrap();
    let end = start + guardrails[start..].find(");").unwrap() + 2;
    fs::write(
        new.join("guardrails.cedar"),
        format!("{}{}", &guardrails[..start], &guardrails[end..]),
    )
    .unwrap();
    let shop = fs::read_to_string(new.join("shop.cedar")).unwrap();
    fs::write(
        new.join("shop.cedar"),
        shop.replace("context.path == \"/pay\"", "context.path like \"/pay*\""),
    )
    .unwrap();
    fs::write(
        new.join("extra.cedar"),
        "@id(\"demo-reports-read-catalog\") permit (principal == Workload::\"spiffe://demo.meshward/ns/shop/sa/reports\", action == Action::\"GET\", resource == Workload::\"spiffe://demo.meshward/ns/shop/sa/catalog\");\n",
    )
    .unwrap();
    let out = meshward(&["policy", "diff", &policies("demo"), new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("policies: 1 added, 1 removed, 1 changed"),
        "{text}"
    );
    assert!(text.contains("+ demo-reports-read-catalog"), "{text}");
    assert!(
        text.contains("- demo-reports-never-call-payments"),
        "{text}"
    );
    assert!(text.contains("~ demo-frontend-pays"), "{text}");
    // The demo cases were found (policies/cases/demo.json names `demo`) and replayed; two of
    // its eleven cases are the same request once the path is normalized.
    assert!(text.contains("of 10 case requests change"), "{text}");
    assert!(
        text.contains(
            "reports never call payments, even /health (forbid beats permit): deny -> allow"
        ),
        "{text}"
    );
    assert!(
        text.contains("reports cannot read the catalog either: no policy permits: deny -> allow"),
        "{text}"
    );

    let out = meshward(&[
        "policy",
        "diff",
        &policies("demo"),
        &policies("demo"),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["added"], serde_json::json!([]));
    assert_eq!(json["decision_changes"], serde_json::json!([]));
    assert_eq!(
        json["requests"], 10,
        "identical requests after normalization count once"
    );
}

#[test]
fn diff_replays_extra_case_files() {
    let out = meshward(&[
        "policy",
        "diff",
        &policies("default"),
        &policies("examples/read-only-callers"),
        "--cases",
        &policies("cases/read-only-callers.json"),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let changes = json["decision_changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["case"] == "monitoring reads" && c["after"]["decision"] == "allow"),
        "{json}"
    );
    assert_eq!(
        json["removed"],
        serde_json::json!(["default-forbid-foreign-trust-domain"])
    );
}
