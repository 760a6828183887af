//! `meshward audit summary FILE`: who called whom, counts by decision and by deciding policy, and
//! issuance counts; also what `meshward demo` prints at the end over all its proxies' files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use meshward_identity::audit::{
    AuditDecision, AuditReadError, AuditReader, AuditRecord, Mode, Timestamp,
};
use serde_json::{Value, json};

use super::{print_stdout, read_failure};
use crate::cmd::Output;

/// The label of a deny that no policy decided.
pub const NO_POLICY_PERMITS: &str = "(no policy permits)";
/// The label of a deny caused by an error before or during evaluation (fail closed).
pub const FAILED_CLOSED: &str = "(error: failed closed)";

/// Arguments of `meshward audit summary`.
#[derive(Debug, Args)]
pub struct SummaryArgs {
    /// The audit file (one JSON record per line).
    #[arg(value_name = "FILE", env = "MESHWARD_AUDIT_FILE")]
    file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

/// Runs `meshward audit summary`.
pub fn run(args: &SummaryArgs) -> anyhow::Result<ExitCode> {
    let summary = match Summary::read_file(&args.file) {
        Ok(summary) => summary,
        Err(e) => return Ok(read_failure(&e)),
    };
    let file = args.file.display().to_string();
    match args.output {
        Output::Text => {
            print_stdout(&format!("audit file `{file}`"))?;
            for line in summary.render() {
                print_stdout(&line)?;
            }
        }
        Output::Json => {
            let mut json = summary.to_json();
            if let Value::Object(map) = &mut json {
                map.insert("file".to_owned(), Value::String(file));
            }
            print_stdout(&json.to_string())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Counts over the records of one or more audit files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records counted.
    pub records: u64,
    /// Lines that could not be read as records (skipped).
    pub bad_lines: u64,
    /// The earliest record's time.
    pub first_ts: Option<Timestamp>,
    /// The latest record's time.
    pub last_ts: Option<Timestamp>,
    /// Enforced decisions and issuance outcomes, by outcome.
    pub by_decision: BTreeMap<&'static str, u64>,
    /// Dry-run (would-be) decisions, by outcome.
    pub dry_run: BTreeMap<&'static str, u64>,
    /// Enforced decisions by (outcome, deciding policy or a label for none).
    pub by_policy: BTreeMap<(&'static str, String), u64>,
    /// Enforced decisions by (caller, callee): (allows, denies).
    pub calls: BTreeMap<(String, String), (u64, u64)>,
    /// Issuance by SPIFFE ID: (issued, refused).
    pub issuance: BTreeMap<String, (u64, u64)>,
}

impl Summary {
    /// Reads a whole file; unreadable lines are counted in `bad_lines`, not fatal.
    pub fn read_file(path: &Path) -> Result<Summary, AuditReadError> {
        let mut summary = Summary::default();
        summary.add_file(path)?;
        Ok(summary)
    }

    /// Adds every record of `path`.
    pub fn add_file(&mut self, path: &Path) -> Result<(), AuditReadError> {
        for item in AuditReader::open(path)? {
            match item {
                Ok(read) => self.add(&read.record),
                Err(AuditReadError::Open { .. }) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "skipping an unreadable audit line");
                    self.bad_lines += 1;
                }
            }
        }
        Ok(())
    }

    /// Counts one record.
    pub fn add(&mut self, record: &AuditRecord) {
        self.records += 1;
        self.first_ts = Some(self.first_ts.map_or(record.ts, |t| t.min(record.ts)));
        self.last_ts = Some(self.last_ts.map_or(record.ts, |t| t.max(record.ts)));
        let decision = record.decision.as_str();
        if record.mode == Mode::DryRun {
            *self.dry_run.entry(decision).or_default() += 1;
            return;
        }
        *self.by_decision.entry(decision).or_default() += 1;
        match record.decision {
            AuditDecision::Allow | AuditDecision::Deny => {
                let allowed = record.decision == AuditDecision::Allow;
                for label in policy_labels(record) {
                    *self.by_policy.entry((decision, label)).or_default() += 1;
                }
                let pair = self
                    .calls
                    .entry((record.principal.clone(), record.resource.clone()))
                    .or_default();
                if allowed {
                    pair.0 += 1;
                } else {
                    pair.1 += 1;
                }
            }
            AuditDecision::Issued | AuditDecision::Refused => {
                let id = record
                    .spiffe_id
                    .clone()
                    .unwrap_or_else(|| record.resource.clone());
                let pair = self.issuance.entry(id).or_default();
                if record.decision == AuditDecision::Issued {
                    pair.0 += 1;
                } else {
                    pair.1 += 1;
                }
            }
        }
    }

    /// The number of enforced records with this outcome.
    pub fn count(&self, decision: AuditDecision) -> u64 {
        self.by_decision
            .get(decision.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// The summary for people, one line per item (no trailing newlines).
    pub fn render(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match (self.first_ts, self.last_ts) {
            (Some(first), Some(last)) => {
                lines.push(format!("{} records from {first} to {last}", self.records));
            }
            _ => lines.push("no records".to_owned()),
        }
        if self.bad_lines > 0 {
            lines.push(format!(
                "{} unreadable lines skipped (run `meshward audit verify` on the file)",
                self.bad_lines
            ));
        }
        let authz = self.count(AuditDecision::Allow) + self.count(AuditDecision::Deny);
        if authz > 0 {
            lines.push(format!(
                "decisions: {} allow, {} deny",
                self.count(AuditDecision::Allow),
                self.count(AuditDecision::Deny)
            ));
            lines.push("by policy:".to_owned());
            let width = self
                .by_policy
                .keys()
                .map(|(_, p)| p.len())
                .max()
                .unwrap_or(0);
            for ((decision, policy), n) in &self.by_policy {
                lines.push(format!("  {decision:<5}  {policy:<width$}  {n}"));
            }
            lines.push("who called whom:".to_owned());
            let width = self.calls.keys().map(|(p, _)| p.len()).max().unwrap_or(0);
            for ((principal, resource), (allow, deny)) in &self.calls {
                let principal = if principal.is_empty() {
                    "(unknown caller)"
                } else {
                    principal
                };
                lines.push(format!(
                    "  {principal:<width$} -> {resource}  {allow} allow, {deny} deny"
                ));
            }
        }
        if !self.dry_run.is_empty() {
            let parts: Vec<String> = self
                .dry_run
                .iter()
                .map(|(d, n)| format!("{n} {d}"))
                .collect();
            lines.push(format!("dry-run (not enforced): {}", parts.join(", ")));
        }
        let issuance = self.count(AuditDecision::Issued) + self.count(AuditDecision::Refused);
        if issuance > 0 {
            lines.push(format!(
                "issuance: {} issued, {} refused",
                self.count(AuditDecision::Issued),
                self.count(AuditDecision::Refused)
            ));
            let width = self.issuance.keys().map(String::len).max().unwrap_or(0);
            for (id, (issued, refused)) in &self.issuance {
                lines.push(format!(
                    "  {id:<width$}  {issued} issued, {refused} refused"
                ));
            }
        }
        lines
    }

    /// The summary for scripts.
    pub fn to_json(&self) -> Value {
        let counts = |map: &BTreeMap<&'static str, u64>| {
            let mut out = serde_json::Map::new();
            for d in ["allow", "deny", "issued", "refused"] {
                out.insert(d.to_owned(), json!(map.get(d).copied().unwrap_or(0)));
            }
            Value::Object(out)
        };
        json!({
            "records": self.records,
            "bad_lines": self.bad_lines,
            "first_ts": self.first_ts.map(|t| t.to_string()),
            "last_ts": self.last_ts.map(|t| t.to_string()),
            "decisions": counts(&self.by_decision),
            "dry_run": counts(&self.dry_run),
            "by_policy": self.by_policy.iter().map(|((decision, policy), n)| json!({
                "decision": decision,
                "policy": policy,
                "count": n,
            })).collect::<Vec<_>>(),
            "calls": self.calls.iter().map(|((principal, resource), (allow, deny))| json!({
                "principal": principal,
                "resource": resource,
                "allow": allow,
                "deny": deny,
            })).collect::<Vec<_>>(),
            "issuance": self.issuance.iter().map(|(id, (issued, refused))| json!({
                "spiffe_id": id,
                "issued": issued,
                "refused": refused,
            })).collect::<Vec<_>>(),
        })
    }
}

/// What decided an authz record: its policies, or a label saying why there is none.
pub fn policy_labels(record: &AuditRecord) -> Vec<String> {
    if !record.policies.is_empty() {
        return record.policies.clone();
    }
    if record.decision == AuditDecision::Deny {
        let label = if record.errors.is_empty() {
            NO_POLICY_PERMITS
        } else {
            FAILED_CLOSED
        };
        return vec![label.to_owned()];
    }
    vec!["(no policy named)".to_owned()]
}

#[cfg(test)]
mod tests {
    use meshward_identity::audit::{AuditEvent, AuditLog};

    use super::*;

    fn event(decision: AuditDecision, principal: &str, policies: &[&str]) -> AuditEvent {
        let mut e = AuditEvent::new(
            decision,
            principal,
            "GET",
            "spiffe://example.org/ns/shop/sa/payments",
        );
        e.policies = policies.iter().map(|p| (*p).to_owned()).collect();
        e
    }

    #[test]
    fn counts_decisions_policies_and_callers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path, "n").unwrap();
        let front = "spiffe://example.org/ns/shop/sa/frontend";
        let reports = "spiffe://example.org/ns/shop/sa/reports";
        log.append(event(AuditDecision::Allow, front, &["p-allow"]))
            .unwrap();
        log.append(event(AuditDecision::Allow, front, &["p-allow"]))
            .unwrap();
        log.append(event(AuditDecision::Deny, reports, &["p-forbid"]))
            .unwrap();
        log.append(event(AuditDecision::Deny, reports, &[]))
            .unwrap();
        let mut dry = event(AuditDecision::Deny, front, &[]);
        dry.mode = Mode::DryRun;
        log.append(dry).unwrap();
        drop(log);

        let s = Summary::read_file(&path).unwrap();
        assert_eq!(s.records, 5);
        assert_eq!(s.count(AuditDecision::Allow), 2);
        assert_eq!(s.count(AuditDecision::Deny), 2);
        assert_eq!(s.dry_run.get("deny"), Some(&1));
        assert_eq!(
            s.by_policy.get(&("deny", NO_POLICY_PERMITS.to_owned())),
            Some(&1)
        );
        assert_eq!(s.by_policy.get(&("deny", "p-forbid".to_owned())), Some(&1));
        assert_eq!(
            s.calls.get(&(
                front.to_owned(),
                "spiffe://example.org/ns/shop/sa/payments".to_owned()
            )),
            Some(&(2, 0))
        );
        let mut twice = s.clone();
        twice.add_file(&path).unwrap();
        assert_eq!(twice.count(AuditDecision::Allow), 4);
        assert_eq!(twice.records, 10);
    }

    #[test]
    fn a_missing_file_is_an_open_error() {
        let err = Summary::read_file(Path::new("/nonexistent/audit.jsonl")).unwrap_err();
        assert!(matches!(err, AuditReadError::Open { .. }), "{err:?}");
    }
}
