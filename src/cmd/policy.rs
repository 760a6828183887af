//! `meshward policy`: validate policy sets, ask them questions, and compare two of them.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use meshward_proxy::authz::cases::{CaseFile, build_request};
use meshward_proxy::authz::{
    Authorizer, AuthzRequest, Decision, PolicyLoadError, PolicySchema, PolicySet, SchemaError,
};
use serde_json::json;

use super::{EX_NO, EX_NOINPUT, Output};

/// Exit code for a bad command-line value (`EX_USAGE`).
const EX_USAGE: u8 = 64;

/// Arguments of `meshward policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check that every `*.cedar` file in DIR parses and validates strictly against the schema.
    ///
    /// Exits 0 and prints the policy counts when the set is valid; 1 and every problem, as
    /// `file:line:column: message`, when it is not; 66 when DIR cannot be read.
    Validate(ValidateArgs),
    /// Decide one request against a policy set, as the proxy would, and say which policies decided.
    ///
    /// The path and host are normalized first, exactly as the proxy does. Exits 0 when the
    /// request is allowed, 1 when it is denied, 64 when the request itself is malformed.
    Check(CheckArgs),
    /// Compare two policy sets: policies added, removed and changed (by @id), and the example
    /// requests (`cases/*.json` of either set, and --cases) whose decision changes.
    ///
    /// Exits 0 when nothing differs, 1 when something does.
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
struct SchemaArg {
    /// A `.cedarschema` file to validate against instead of the built-in schema.
    #[arg(long, value_name = "FILE", env = "MESHWARD_POLICY_SCHEMA")]
    schema: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// The policy directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    #[command(flatten)]
    schema: SchemaArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The caller's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    principal: String,
    /// The HTTP method (GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE) or `connect` for TCP.
    #[arg(long, value_name = "ACTION")]
    action: String,
    /// The callee's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    resource: String,
    /// The request path (with query, if any); `/` when omitted. Not for `connect`.
    #[arg(long, value_name = "PATH")]
    path: Option<String>,
    /// The Host header (or TLS server name for `connect`).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// The caller's address.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    source_ip: IpAddr,
    /// The policy directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "MESHWARD_PROXY_POLICIES",
        default_value = "policies/default"
    )]
    policies: PathBuf,
    /// A dry-run policy directory: its decision is shown too, and does not change the exit code.
    #[arg(long, value_name = "DIR")]
    dry_run: Option<PathBuf>,
    #[command(flatten)]
    schema: SchemaArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// The policy directory before.
    #[arg(value_name = "OLD")]
    old: PathBuf,
    /// The policy directory after.
    #[arg(value_name = "NEW")]
    new: PathBuf,
    /// More case files whose requests are replayed against both sets (repeatable).
    #[arg(long = "cases", value_name = "FILE")]
    cases: Vec<PathBuf>,
    #[command(flatten)]
    schema: SchemaArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "MESHWARD_OUTPUT")]
    output: Output,
}

/// Runs `meshward policy ...`.
pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Validate(args) => validate(&args),
        PolicyCommand::Check(args) => check(&args),
        PolicyCommand::Diff(args) => diff(&args),
    }
}

/// Why a command stopped before answering, with the exit code to stop with.
struct Stop(ExitCode);

fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let schema = match load_schema(&args.schema) {
        Ok(schema) => schema,
        Err(Stop(code)) => return Ok(code),
    };
    match PolicySet::load_dir(&args.dir, schema) {
        Ok(set) => {
            for warning in set.warnings() {
                eprintln!("warning: {warning}");
            }
            let (permits, forbids) = set.counts();
            let text = format!(
                "policy set `{}` is valid: {} policies ({permits} permit, {forbids} forbid)",
                args.dir.display(),
                set.len()
            );
            let json = json!({
                "dir": args.dir.display().to_string(),
                "valid": true,
                "policies": set.len(),
                "permits": permits,
                "forbids": forbids,
                "warnings": set.warnings(),
            });
            print(args.output, &text, &json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = report_load_error(&args.dir, &e);
            if args.output == Output::Json {
                let json = json!({
                    "dir": args.dir.display().to_string(),
                    "valid": false,
                    "problems": e.problems(),
                });
                println!("{json}");
            }
            Ok(code)
        }
    }
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let request = match build_request(
        &args.principal,
        &args.action,
        &args.resource,
        args.path.as_deref(),
        args.host.as_deref(),
        Some(args.source_ip),
    ) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("meshward: cannot check this request: {e}");
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let schema = match load_schema(&args.schema) {
        Ok(schema) => schema,
        Err(Stop(code)) => return Ok(code),
    };
    let enforced = match load_set(&args.policies, &schema) {
        Ok(set) => set,
        Err(Stop(code)) => return Ok(code),
    };
    let dry_run = match &args.dry_run {
        Some(dir) => match load_set(dir, &schema) {
            Ok(set) => Some(set),
            Err(Stop(code)) => return Ok(code),
        },
        None => None,
    };
    let authorizer = Authorizer::new(enforced, dry_run);
    let decision = authorizer.decide(&request);
    let dry = authorizer.decide_dry_run(&request);
    let mut text = format!("{}: {}", verdict(&decision), decision.reason());
    if let Some(dry) = &dry {
        text.push_str(&format!("\ndry-run {}: {}", verdict(dry), dry.reason()));
    }
    let json = json!({
        "request": request_json(&request),
        "decision": verdict(&decision),
        "policies": decision.policies,
        "errors": decision.errors,
        "reason": decision.reason(),
        "dry_run": dry.as_ref().map(|d| json!({
            "decision": verdict(d),
            "policies": d.policies,
            "errors": d.errors,
            "reason": d.reason(),
        })),
    });
    print(args.output, &text, &json);
    Ok(if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    })
}

fn diff(args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let schema = match load_schema(&args.schema) {
        Ok(schema) => schema,
        Err(Stop(code)) => return Ok(code),
    };
    let (old, new) = match (load_set(&args.old, &schema), load_set(&args.new, &schema)) {
        (Ok(old), Ok(new)) => (old, new),
        (Err(Stop(code)), _) | (_, Err(Stop(code))) => return Ok(code),
    };
    let old_ids: BTreeSet<&str> = old.policies().map(|p| p.id.as_str()).collect();
    let new_ids: BTreeSet<&str> = new.policies().map(|p| p.id.as_str()).collect();
    let added: Vec<&str> = new_ids.difference(&old_ids).copied().collect();
    let removed: Vec<&str> = old_ids.difference(&new_ids).copied().collect();
    let changed: Vec<&str> = old_ids
        .intersection(&new_ids)
        .copied()
        .filter(|id| match (old.policy(id), new.policy(id)) {
            (Some(a), Some(b)) => squash(&a.text) != squash(&b.text),
            _ => false,
        })
        .collect();

    let mut case_files: Vec<PathBuf> = args.cases.clone();
    for dir in [&args.old, &args.new] {
        case_files.extend(discover_cases(dir));
    }
    case_files.sort();
    case_files.dedup();
    let mut requests: Vec<(String, AuthzRequest)> = Vec::new();
    for file in &case_files {
        let cases = match CaseFile::load(file) {
            Ok(cases) => cases,
            Err(e) => {
                eprintln!("meshward: {e}");
                return Ok(ExitCode::from(EX_NOINPUT));
            }
        };
        for case in &cases.cases {
            match case.request() {
                Ok(request) => {
                    if !requests.iter().any(|(_, r)| *r == request) {
                        requests.push((case.name.clone(), request));
                    }
                }
                Err(e) => eprintln!("warning: {}: {e}", file.display()),
            }
        }
    }
    let mut decision_changes = Vec::new();
    for (name, request) in &requests {
        let before = old.decide(request, meshward_proxy::authz::Mode::Enforce);
        let after = new.decide(request, meshward_proxy::authz::Mode::Enforce);
        if before.allowed != after.allowed || before.policies != after.policies {
            decision_changes.push((name.clone(), request.clone(), before, after));
        }
    }

    let mut text = format!(
        "policies: {} added, {} removed, {} changed",
        added.len(),
        removed.len(),
        changed.len()
    );
    let at = |set: &PolicySet, id: &str| {
        set.policy(id)
            .map(|p| format!("{}:{}", p.file, p.line))
            .unwrap_or_default()
    };
    for id in &added {
        text.push_str(&format!("\n+ {id} ({})", at(&new, id)));
    }
    for id in &removed {
        text.push_str(&format!("\n- {id} ({})", at(&old, id)));
    }
    for id in &changed {
        text.push_str(&format!("\n~ {id} ({} -> {})", at(&old, id), at(&new, id)));
    }
    text.push_str(&format!(
        "\ndecisions: {} of {} case requests change",
        decision_changes.len(),
        requests.len()
    ));
    for (name, _, before, after) in &decision_changes {
        text.push_str(&format!(
            "\n  {name}: {} -> {} ({})",
            verdict(before),
            verdict(after),
            after.reason()
        ));
    }
    let json = json!({
        "old": args.old.display().to_string(),
        "new": args.new.display().to_string(),
        "added": added,
        "removed": removed,
        "changed": changed,
        "case_files": case_files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "requests": requests.len(),
        "decision_changes": decision_changes.iter().map(|(name, request, before, after)| json!({
            "case": name,
            "request": request_json(request),
            "before": { "decision": verdict(before), "policies": before.policies, "reason": before.reason() },
            "after": { "decision": verdict(after), "policies": after.policies, "reason": after.reason() },
        })).collect::<Vec<_>>(),
    });
    print(args.output, &text, &json);
    let same =
        added.is_empty() && removed.is_empty() && changed.is_empty() && decision_changes.is_empty();
    Ok(if same {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    })
}

fn load_schema(arg: &SchemaArg) -> Result<Arc<PolicySchema>, Stop> {
    let loaded = match &arg.schema {
        Some(path) => PolicySchema::from_file(path),
        None => PolicySchema::builtin(),
    };
    loaded.map(Arc::new).map_err(|e| {
        eprintln!("meshward: {e}");
        Stop(match e {
            SchemaError::Read { .. } => ExitCode::from(EX_NOINPUT),
            _ => ExitCode::from(EX_NO),
        })
    })
}

fn load_set(dir: &Path, schema: &Arc<PolicySchema>) -> Result<PolicySet, Stop> {
    PolicySet::load_dir(dir, Arc::clone(schema)).map_err(|e| Stop(report_load_error(dir, &e)))
}

/// Prints every problem, one per line, and returns the exit code for it.
fn report_load_error(dir: &Path, e: &PolicyLoadError) -> ExitCode {
    match e {
        PolicyLoadError::Invalid { problems, .. } => {
            for problem in problems {
                eprintln!("{problem}");
            }
            eprintln!(
                "meshward: policy set `{}` is invalid: {} problem(s)",
                dir.display(),
                problems.len()
            );
            ExitCode::from(EX_NO)
        }
        other => {
            eprintln!("meshward: {other}");
            ExitCode::from(EX_NOINPUT)
        }
    }
}

/// Case files for `dir`: the `cases/*.json` files in `dir`'s ancestors whose `set` is `dir`.
fn discover_cases(dir: &Path) -> Vec<PathBuf> {
    let Ok(target) = dir.canonicalize() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for ancestor in target.ancestors().skip(1).take(3) {
        let Ok(entries) = std::fs::read_dir(ancestor.join("cases")) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.path();
            if file.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(cases) = CaseFile::load(&file) else {
                continue;
            };
            if cases.set_dir(&file).canonicalize().ok().as_deref() == Some(target.as_path()) {
                found.push(file);
            }
        }
    }
    found
}

fn verdict(decision: &Decision) -> &'static str {
    if decision.allowed { "allow" } else { "deny" }
}

fn request_json(request: &AuthzRequest) -> serde_json::Value {
    json!({
        "principal": request.principal.as_str(),
        "action": request.action.as_str(),
        "resource": request.resource.as_str(),
        "path": request.path.as_ref().map(|p| p.as_str()),
        "host": request.host,
        "source_ip": request.source_ip.to_string(),
    })
}

/// Policy text with whitespace runs collapsed: reformatting is not a change.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn print(output: Output, text: &str, json: &serde_json::Value) {
    match output {
        Output::Text => println!("{text}"),
        Output::Json => println!("{json}"),
    }
}
