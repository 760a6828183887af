use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use proptest::prelude::*;

use super::cases::{CaseFile, build_request};
use super::*;

fn policies_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn schema() -> Arc<PolicySchema> {
    Arc::new(PolicySchema::builtin().unwrap())
}

fn set(text: &str) -> PolicySet {
    PolicySet::from_sources("test", &[("test.cedar".into(), text.into())], schema()).unwrap()
}

fn load_err(text: &str) -> Vec<PolicyProblem> {
    match PolicySet::from_sources("test", &[("test.cedar".into(), text.into())], schema()) {
        Err(PolicyLoadError::Invalid { problems, .. }) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn req(principal: &str, action: &str, resource: &str, path: Option<&str>) -> AuthzRequest {
    build_request(principal, action, resource, path, None, None).unwrap()
}

const WEB: &str = "spiffe://a.org/ns/shop/sa/web";
const API: &str = "spiffe://a.org/ns/shop/sa/api";

#[test]
fn every_case_file_replays() {
    let cases_dir = policies_root().join("cases");
    let mut files: Vec<_> = std::fs::read_dir(&cases_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let cases = CaseFile::load(file).unwrap();
        let dir = cases.set_dir(file);
        let set = PolicySet::load_dir(&dir, schema())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let (mut allows, mut denies) = (0, 0);
        for case in &cases.cases {
            let decision = set.decide(&case.request().unwrap(), Mode::Enforce);
            if decision.allowed {
                allows += 1;
            } else {
                denies += 1;
            }
            assert_eq!(
                decision,
                set.decide_unindexed(&case.request().unwrap(), Mode::Enforce)
            );
            if let Some(m) = case.mismatch(&decision) {
                failures.push(format!("{} / {}: {m}", file.display(), case.name));
            }
        }
        assert!(denies > 0, "{}: needs deny cases", file.display());
        // The default set permits nothing by design; every other set shows what it allows.
        if cases.set != "default" {
            assert!(allows > 0, "{}: needs allow cases", file.display());
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_policy_directory_has_cases() {
    let root = policies_root();
    let mut covered = Vec::new();
    for entry in std::fs::read_dir(root.join("cases")).unwrap() {
        let file = entry.unwrap().path();
        covered.push(CaseFile::load(&file).unwrap().set);
    }
    for set in [
        "default",
        "demo",
        "examples/namespace-isolation",
        "examples/read-only-callers",
    ] {
        assert!(covered.iter().any(|c| c == set), "no cases for `{set}`");
    }
}

#[test]
fn an_evaluation_error_denies_even_when_the_erroring_policy_is_a_forbid() {
    // The forbid reads an attribute of an entity that is not in the store: it errors at run
    // time (strict validation cannot see that), Cedar skips it and would allow.
    let set = set(r#"
        @id("allow-web") permit (principal == Workload::"spiffe://a.org/ns/shop/sa/web", action, resource);
        @id("broken-forbid") forbid (principal, action, resource)
        when { Workload::"spiffe://a.org/ns/ghost/sa/none".namespace == "ghost" };
    "#);
    let decision = set.decide(&req(WEB, "GET", API, Some("/")), Mode::Enforce);
    assert!(!decision.allowed);
    assert!(decision.policies.is_empty(), "{decision:?}");
    assert_eq!(decision.errors.len(), 1);
    assert!(decision.errors[0].contains("broken-forbid"), "{decision:?}");
    assert!(
        decision.reason().contains("failing closed"),
        "{}",
        decision.reason()
    );
    assert_eq!(
        decision,
        set.decide_unindexed(&req(WEB, "GET", API, Some("/")), Mode::Enforce)
    );
}

#[test]
fn an_erroring_permit_alone_denies_with_the_error() {
    let set = set(r#"
        @id("broken-permit") permit (principal, action, resource)
        when { Workload::"spiffe://a.org/ns/ghost/sa/none".serviceAccount == "none" };
    "#);
    let decision = set.decide(&req(WEB, "GET", API, Some("/")), Mode::Enforce);
    assert!(!decision.allowed);
    assert!(decision.errors[0].contains("broken-permit"), "{decision:?}");
}

#[test]
fn forbid_beats_permit_and_is_named() {
    let set = set(r#"
        @id("allow-all-shop") permit (principal in Namespace::"shop", action, resource);
        @id("no-delete") forbid (principal, action == Action::"DELETE", resource);
    "#);
    let allowed = set.decide(&req(WEB, "GET", API, Some("/")), Mode::Enforce);
    assert!(allowed.allowed);
    assert_eq!(allowed.policies, ["allow-all-shop"]);
    assert_eq!(allowed.reason(), "allowed by `allow-all-shop`");
    let denied = set.decide(&req(WEB, "DELETE", API, Some("/")), Mode::Enforce);
    assert!(!denied.allowed);
    assert_eq!(denied.policies, ["no-delete"]);
    assert_eq!(denied.reason(), "denied by `no-delete`");
}

#[test]
fn nothing_permitted_is_no_policy_permits() {
    let set = set(
        r#"@id("only-api") permit (principal == Workload::"spiffe://a.org/ns/shop/sa/api", action, resource);"#,
    );
    let decision = set.decide(&req(WEB, "GET", API, Some("/")), Mode::Enforce);
    assert!(!decision.allowed);
    assert!(decision.policies.is_empty() && decision.errors.is_empty());
    assert_eq!(decision.reason(), "denied: no policy permits");
    let empty = PolicySet::from_sources("empty", &[], schema()).unwrap();
    assert!(empty.is_empty());
    assert_eq!(
        empty
            .decide(&req(WEB, "GET", API, None), Mode::Enforce)
            .reason(),
        "denied: no policy permits"
    );
}

#[test]
fn a_shared_namespace_name_does_not_leak_trust_domain_membership() {
    let set = set(r#"
        @id("a-only") permit (principal in TrustDomain::"a.org", action, resource);
    "#);
    // `shop` exists in both trust domains; the caller from b.org must not be "in" a.org.
    let foreign = req("spiffe://b.org/ns/shop/sa/web", "GET", API, Some("/"));
    assert!(!set.decide(&foreign, Mode::Enforce).allowed);
    assert!(
        set.decide(&req(WEB, "GET", API, Some("/")), Mode::Enforce)
            .allowed
    );
}

#[test]
fn action_groups_and_connect() {
    let set = set(r#"
        @id("reads") permit (principal, action in Action::"read", resource);
        @id("tcp") permit (principal, action == Action::"connect", resource in Namespace::"db");
    "#);
    for action in ["GET", "HEAD", "OPTIONS"] {
        assert!(
            set.decide(&req(WEB, action, API, Some("/")), Mode::Enforce)
                .allowed,
            "{action}"
        );
    }
    for action in ["POST", "PUT", "PATCH", "DELETE", "connect"] {
        let path = (action != "connect").then_some("/");
        assert!(
            !set.decide(&req(WEB, action, API, path), Mode::Enforce)
                .allowed,
            "{action}"
        );
    }
    let db = "spiffe://a.org/ns/db/sa/postgres";
    assert!(
        set.decide(&req(WEB, "connect", db, None), Mode::Enforce)
            .allowed
    );
}

#[test]
fn unknown_actions_and_non_spiffe_principals_cannot_be_asked() {
    assert_eq!(
        Action::from_str("TRACE"),
        Err(UnknownActionError("TRACE".into()))
    );
    // Methods are case-sensitive.
    assert_eq!(
        Action::from_str("get"),
        Err(UnknownActionError("get".into()))
    );
    let err = build_request("web", "GET", API, None, None, None).unwrap_err();
    assert!(err.starts_with("principal:"), "{err}");
    let err = build_request(WEB, "GET", "https://a.org/api", None, None, None).unwrap_err();
    assert!(err.starts_with("resource:"), "{err}");
    let err = build_request(WEB, "GET", API, Some("/a%2fb"), None, None).unwrap_err();
    assert!(err.contains("encoded `/`"), "{err}");
    let err = build_request(WEB, "connect", API, Some("/"), None, None).unwrap_err();
    assert!(err.contains("no path"), "{err}");
}

#[test]
fn dry_run_never_changes_the_enforced_decision() {
    let enforced = set(r#"@id("only-get") permit (principal, action == Action::"GET", resource);"#);
    let dry = set(r#"@id("dry-forbid-all") forbid (principal, action, resource);"#);
    let authorizer = Authorizer::new(enforced, Some(dry));
    let get = req(WEB, "GET", API, Some("/"));
    let enforced = authorizer.decide(&get);
    assert!(enforced.allowed);
    assert_eq!(enforced.mode, Mode::Enforce);
    let dry = authorizer.decide_dry_run(&get).unwrap();
    assert!(!dry.allowed);
    assert_eq!(dry.mode, Mode::DryRun);
    assert_eq!(dry.policies, ["dry-forbid-all"]);
    // And the other way round: a permissive dry-run does not open anything.
    let strict = set(r#"@id("nothing") forbid (principal, action, resource);"#);
    let open = set(r#"@id("everything") permit (principal, action, resource);"#);
    let authorizer = Authorizer::new(strict, Some(open));
    assert!(!authorizer.decide(&get).allowed);
    assert!(authorizer.decide_dry_run(&get).unwrap().allowed);
    // Without a dry-run set there is no dry-run decision.
    assert!(
        Authorizer::new(set(""), None)
            .decide_dry_run(&get)
            .is_none()
    );
}

#[test]
fn parse_errors_name_file_and_line() {
    let problems = load_err(
        "@id(\"ok\") permit (principal, action, resource);\n\n@id(\"bad\") permit (principal, action resource);\n",
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].file, "test.cedar");
    assert_eq!(problems[0].line, 3, "{problems:?}");
    assert!(
        problems[0].to_string().starts_with("test.cedar:3:"),
        "{}",
        problems[0]
    );
}

#[test]
fn validation_errors_name_file_and_line() {
    let problems = load_err(
        "@id(\"a\") permit (principal, action, resource);\n@id(\"typo\") permit (principal, action, resource)\nwhen { principal.team == \"x\" };\n",
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].line, 3, "{problems:?}");
    assert!(problems[0].message.contains("team"), "{problems:?}");
    // Strict validation: a type error.
    let problems =
        load_err("@id(\"t\") permit (principal, action, resource) when { context.path == 1 };");
    assert_eq!(problems.len(), 1, "{problems:?}");
    // An unknown action and an unknown entity type.
    assert!(
        !load_err("@id(\"u\") permit (principal, action == Action::\"TRACE\", resource);")
            .is_empty()
    );
    assert!(
        !load_err("@id(\"v\") permit (principal == User::\"alice\", action, resource);").is_empty()
    );
}

#[test]
fn every_policy_needs_a_unique_id() {
    let problems = load_err("permit (principal, action, resource);");
    assert!(problems[0].message.contains("@id"), "{problems:?}");
    let problems = load_err(
        "@id(\"x\") permit (principal, action, resource);\n@id(\"x\") forbid (principal, action, resource);",
    );
    assert_eq!(problems[0].line, 2);
    assert!(
        problems[0].message.contains("already used at test.cedar:1"),
        "{problems:?}"
    );
    let problems = load_err("@id(\"\") permit (principal, action, resource);");
    assert!(problems[0].message.contains("non-empty"), "{problems:?}");
    // Across files too.
    let err = PolicySet::from_sources(
        "two",
        &[
            (
                "a.cedar".into(),
                "@id(\"x\") permit (principal, action, resource);".into(),
            ),
            (
                "b.cedar".into(),
                "@id(\"x\") permit (principal, action, resource);".into(),
            ),
        ],
        schema(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("b.cedar:1:1: policy id `x` is already used at a.cedar:1"),
        "{err}"
    );
}

#[test]
fn templates_are_refused() {
    let problems = load_err("@id(\"t\") permit (principal == ?principal, action, resource);");
    assert!(problems[0].message.contains("templates"), "{problems:?}");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let err = PolicySet::from_sources(
        "many",
        &[
            (
                "a.cedar".into(),
                "permit (principal, action, resource);".into(),
            ),
            (
                "b.cedar".into(),
                "@id(\"b\") permit (principal, action, resource) when { principal.nope };".into(),
            ),
            ("c.cedar".into(), "@id(\"c\") permit (".into()),
        ],
        schema(),
    )
    .unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("a.cedar:1:1:"));
    assert!(problems[1].starts_with("b.cedar:1:"));
    assert!(problems[2].starts_with("c.cedar:1:"));
}

#[test]
fn directory_loading_reads_only_cedar_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        "@id(\"a\") permit (principal, action, resource);",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not cedar").unwrap();
    std::fs::create_dir(dir.path().join("sub.cedar")).unwrap();
    let set = PolicySet::load_dir(dir.path(), schema()).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.counts(), (1, 0));
    let info = set.policy("a").unwrap();
    assert!(info.file.ends_with("a.cedar") && info.line == 1 && info.permit);
    let missing = PolicySet::load_dir(&dir.path().join("nope"), schema()).unwrap_err();
    assert!(
        matches!(missing, PolicyLoadError::ReadDir { .. }),
        "{missing}"
    );
    std::fs::write(dir.path().join("bin.cedar"), [0xff, 0xfe]).unwrap();
    let binary = PolicySet::load_dir(dir.path(), schema()).unwrap_err();
    assert!(
        matches!(binary, PolicyLoadError::ReadFile { .. }),
        "{binary}"
    );
}

#[test]
fn schemas_are_checked_against_the_requests_the_proxy_makes() {
    let builtin = PolicySchema::builtin().unwrap();
    assert_eq!(builtin.name(), "built-in");
    let err = PolicySchema::parse("broken", "entity Workload {").unwrap_err();
    assert!(matches!(err, SchemaError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
    // Parses, but has no `connect` action.
    let without_connect = BUILTIN_SCHEMA.replace("action connect", "action tcp");
    let err = PolicySchema::parse("no-connect", &without_connect).unwrap_err();
    assert!(matches!(err, SchemaError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("connect"), "{err}");
    // Parses, but the context lacks `sourceIp`.
    let without_ip = BUILTIN_SCHEMA.replace(
        "sourceIp: ipaddr, // the caller's address as the proxy saw it",
        "",
    );
    assert_ne!(without_ip, BUILTIN_SCHEMA);
    let err = PolicySchema::parse("no-ip", &without_ip).unwrap_err();
    assert!(matches!(err, SchemaError::Incompatible { .. }), "{err}");
    let err = PolicySchema::from_file(Path::new("/nonexistent/schema.cedarschema")).unwrap_err();
    assert!(matches!(err, SchemaError::Read { .. }), "{err}");
}

#[test]
fn context_carries_source_ip_host_and_tls() {
    let set = set(r#"
        @id("internal-h2") permit (principal, action, resource)
        when {
            context.sourceIp.isInRange(ip("10.0.0.0/8")) &&
            context.host == "api.shop.svc" &&
            context.tls.alpn == "h2"
        };
    "#);
    let mut request = build_request(
        WEB,
        "GET",
        API,
        Some("/"),
        Some("API.Shop.svc:8443"),
        Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
    )
    .unwrap();
    assert!(!set.decide(&request, Mode::Enforce).allowed);
    request.tls.alpn = "h2".into();
    assert!(set.decide(&request, Mode::Enforce).allowed);
    request.source_ip = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1));
    assert!(!set.decide(&request, Mode::Enforce).allowed);
}

#[test]
fn the_index_only_builds_slices_for_pairs_it_sees() {
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!(
            "@id(\"p{i}\") permit (principal == Workload::\"spiffe://a.org/ns/n{i}/sa/c\", action, resource == Workload::\"spiffe://a.org/ns/n{i}/sa/s\");\n"
        ));
    }
    let set = set(&text);
    assert_eq!(set.index_buckets(), 200);
    let r = req(
        "spiffe://a.org/ns/n7/sa/c",
        "GET",
        "spiffe://a.org/ns/n7/sa/s",
        None,
    );
    let d = set.decide(&r, Mode::Enforce);
    assert_eq!(d.policies, ["p7"]);
    assert_eq!(set.cached_pairs(), 1);
    set.decide(&r, Mode::Enforce);
    assert_eq!(set.cached_pairs(), 1);
}

fn context_use(condition: &str) -> plan::ContextUse {
    let text = format!("permit (principal, action, resource) {condition};");
    plan::ContextUse::of(&cedar_policy::Policy::from_str(&text).unwrap())
}

#[test]
fn a_policy_observes_only_the_context_attributes_it_names() {
    use plan::ContextNeeds;
    let none = context_use("when { principal.namespace == \"shop\" && action == Action::\"GET\" }");
    assert!(!none.reads);
    assert_eq!(none.needs, ContextNeeds::default());
    let tls = context_use("when { context.tls.alpn == \"h2\" }");
    assert!(tls.reads);
    let only_tls = ContextNeeds {
        tls: true,
        ..ContextNeeds::default()
    };
    assert_eq!(tls.needs, only_tls);
    let has = context_use("when { context has sourceIp && context.sourceIp.isLoopback() }");
    let only_ip = ContextNeeds {
        source_ip: true,
        ..ContextNeeds::default()
    };
    assert_eq!(has.needs, only_ip);
    // The record as a whole: everything.
    let whole = context_use("when { context == {} }");
    assert!(whole.reads && whole.needs.all);
    // A string naming an attribute only over-approximates.
    let mention = context_use("when { context.path == \"host\" }");
    let path_and_host = ContextNeeds {
        path: true,
        host: true,
        ..ContextNeeds::default()
    };
    assert_eq!(mention.needs, path_and_host);
}

#[test]
fn an_error_under_a_cut_context_reads_as_under_the_full_context() {
    let set = set(r#"
        @id("ghost") permit (principal, action, resource)
        when { context.path == "/a" && Workload::"spiffe://a.org/ns/ghost/sa/none".namespace == "ghost" };
        @id("all") permit (principal, action, resource);
    "#);
    let erring = req(WEB, "GET", API, Some("/a"));
    let d = set.decide(&erring, Mode::Enforce);
    assert!(!d.allowed, "{d:?}");
    assert!(d.policies.is_empty(), "{d:?}");
    assert_eq!(d.errors.len(), 1, "{d:?}");
    assert!(d.errors[0].contains("ghost"), "{d:?}");
    assert_eq!(d, set.decide_unindexed(&erring, Mode::Enforce));
    // The same plan, another path: no error, and the unconditional permit allows.
    let fine = set.decide(&req(WEB, "GET", API, Some("/b")), Mode::Enforce);
    assert!(fine.allowed, "{fine:?}");
    assert_eq!(fine.policies, ["all"]);
}

#[test]
fn compiled_conditions_decide_beside_cedar_with_cedar_errors() {
    // `c` and `f` are compiled (`compiled.rs`); `e` reads an entity the store lacks, so it
    // stays with Cedar and errors when its path clause holds.
    let set = set(r#"
        @id("c") permit (principal, action, resource) when { context.path like "/a*" };
        @id("f") forbid (principal, action == Action::"POST", resource)
        when { context.method == "POST" && context.path == "/a/x" };
        @id("e") permit (principal, action, resource)
        when { context.path == "/a" && Workload::"spiffe://a.org/ns/ghost/sa/none".namespace == "ghost" };
    "#);
    let erring = req(WEB, "GET", API, Some("/a"));
    let d = set.decide(&erring, Mode::Enforce);
    assert!(!d.allowed, "{d:?}");
    assert!(d.policies.is_empty(), "{d:?}");
    assert_eq!(d.errors.len(), 1, "{d:?}");
    assert!(d.errors[0].contains("ghost"), "{d:?}");
    assert_eq!(d, set.decide_unindexed(&erring, Mode::Enforce));
    let allowed = req(WEB, "GET", API, Some("/a/y"));
    let d = set.decide(&allowed, Mode::Enforce);
    assert!(d.allowed && d.errors.is_empty(), "{d:?}");
    assert_eq!(d.policies, ["c"]);
    assert_eq!(d, set.decide_unindexed(&allowed, Mode::Enforce));
    let forbidden = req(WEB, "POST", API, Some("/a/x"));
    let d = set.decide(&forbidden, Mode::Enforce);
    assert!(!d.allowed && d.errors.is_empty(), "{d:?}");
    assert_eq!(d.policies, ["f"]);
    assert_eq!(d, set.decide_unindexed(&forbidden, Mode::Enforce));
    let unmatched = req(WEB, "GET", API, Some("/b"));
    let d = set.decide(&unmatched, Mode::Enforce);
    assert_eq!(d, Decision::no_policy_permits(Mode::Enforce));
    assert_eq!(d, set.decide_unindexed(&unmatched, Mode::Enforce));
}

#[test]
fn a_compiled_policy_applies_only_where_its_scopes_hold() {
    // The index files `in Namespace::"billing"` under that namespace and `is Workload in
    // TrustDomain::"b.org"` under that trust domain; the plan checks them for the pair.
    let set = set(r#"
        @id("ns") permit (principal in Namespace::"billing", action, resource)
        when { context.path like "*" };
        @id("td") permit (principal is Workload in TrustDomain::"b.org", action, resource)
        when { context.path like "*" };
        @id("res") permit (principal, action, resource == Workload::"spiffe://a.org/ns/shop/sa/api")
        when { context.path == "/r" };
    "#);
    for (principal, resource, path, expected) in [
        (WEB, API, "/x", vec![]),
        ("spiffe://a.org/ns/billing/sa/web", API, "/x", vec!["ns"]),
        ("spiffe://b.org/ns/shop/sa/web", API, "/x", vec!["td"]),
        (WEB, API, "/r", vec!["res"]),
        (API, WEB, "/r", vec![]),
    ] {
        let r = req(principal, "GET", resource, Some(path));
        let d = set.decide(&r, Mode::Enforce);
        assert_eq!(d.policies, expected, "{r:?}");
        assert_eq!(d.allowed, !expected.is_empty(), "{r:?}");
        assert_eq!(d, set.decide_unindexed(&r, Mode::Enforce));
    }
}

// ---- the index equals plain Cedar ----

const WORKLOADS: &[&str] = &[
    "spiffe://a.org/ns/shop/sa/web",
    "spiffe://a.org/ns/shop/sa/api",
    "spiffe://a.org/ns/billing/sa/web",
    "spiffe://b.org/ns/shop/sa/web",
    "spiffe://a.org/batch/job",
    "spiffe://b.org/x",
];

fn scope(var: &'static str) -> impl Strategy<Value = String> {
    let workload = prop::sample::select(WORKLOADS).prop_map(|w| format!("Workload::\"{w}\""));
    let namespace = prop::sample::select(&["shop", "billing", "ghost"][..]);
    let td = prop::sample::select(&["a.org", "b.org", "c.org"][..]);
    prop_oneof![
        Just(var.to_owned()),
        workload.clone().prop_map(move |w| format!("{var} == {w}")),
        workload.prop_map(move |w| format!("{var} in {w}")),
        namespace
            .clone()
            .prop_map(move |n| format!("{var} in Namespace::\"{n}\"")),
        td.prop_map(move |t| format!("{var} in TrustDomain::\"{t}\"")),
        Just(format!("{var} is Workload")),
        namespace.prop_map(move |n| format!("{var} is Workload in Namespace::\"{n}\"")),
    ]
}

fn action_scope() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("action".to_owned()),
        prop::sample::select(&["GET", "POST", "connect"][..])
            .prop_map(|a| format!("action == Action::\"{a}\"")),
        prop::sample::select(&["read", "write"][..])
            .prop_map(|g| format!("action in Action::\"{g}\"")),
        Just("action in [Action::\"GET\", Action::\"DELETE\"]".to_owned()),
    ]
}

fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("when { context.path == \"/a\" }".to_owned()),
        Just("when { context.path like \"/a*\" }".to_owned()),
        Just("unless { context.method == \"GET\" }".to_owned()),
        Just("when { principal.namespace == resource.namespace }".to_owned()),
        Just("when { resource.serviceAccount == \"api\" }".to_owned()),
        Just("when { principal in resource }".to_owned()),
        // Reads the action, not the context.
        Just("when { action == Action::\"GET\" || action in Action::\"write\" }".to_owned()),
        // Each context attribute, the nested record, `has`, and the whole record.
        Just("when { context.sourceIp.isInRange(ip(\"10.0.0.0/8\")) }".to_owned()),
        Just("when { context.host == \"api.shop\" }".to_owned()),
        Just("when { context.tls.alpn == \"h2\" }".to_owned()),
        Just("when { context has tls && context.tls.version == \"TLSv1.3\" }".to_owned()),
        Just(
            "unless { context == { method: \"GET\", path: \"/a\", host: \"\", \
             sourceIp: ip(\"10.1.2.3\"), tls: { version: \"\", cipher: \"\", alpn: \"\" } } }"
                .to_owned()
        ),
        // Compiled shapes (`compiled.rs`): `like` (wildcards, escaped star, empty pattern),
        // `==` / `!=` on context strings, `&&`, `||`, `!`, `if`, `has`, constants.
        Just("when { context.path like \"/a*\" && context.method != \"POST\" }".to_owned()),
        Just("when { context.path like \"*\" }".to_owned()),
        Just("when { context.path like \"\" }".to_owned()),
        Just("when { context.path like \"/a\\*\" }".to_owned()),
        Just("unless { context.path like \"*/x\" || context.host == \"api.shop\" }".to_owned()),
        Just(
            "when { context has tls && context.tls has alpn && context.tls.alpn != \"h2\" }"
                .to_owned()
        ),
        Just(
            "when { if context.method == \"GET\" then context.path == \"/a\" else !(context.tls.version == \"\") }"
                .to_owned()
        ),
        Just("when { context has sourceIp } unless { context.tls.version == \"\" }".to_owned()),
        Just("when { false || context.path == \"/a*\" }".to_owned()),
        // Compiled clauses beside ones Cedar must evaluate, in one policy.
        Just("when { context.path like \"/a*\" && principal.namespace == \"shop\" }".to_owned()),
        Just("when { context.path == \"/b\" } when { resource in Namespace::\"shop\" }".to_owned()),
        Just(
            "when { context.path like \"/a*\" } unless { context.sourceIp.isInRange(ip(\"10.0.0.0/8\")) }"
                .to_owned()
        ),
        // Errors at run time: the entity is not in the store.
        Just(
            "when { Workload::\"spiffe://a.org/ns/ghost/sa/none\".namespace == \"ghost\" }"
                .to_owned()
        ),
        // Errors at run time, only for some contexts.
        Just(
            "when { context.path == \"/a\" && \
             Workload::\"spiffe://a.org/ns/ghost/sa/none\".namespace == \"ghost\" }"
                .to_owned()
        ),
    ]
}

fn policy() -> impl Strategy<Value = (bool, String, String, String, String)> {
    (
        any::<bool>(),
        scope("principal"),
        action_scope(),
        scope("resource"),
        condition(),
    )
}

fn policy_text(policies: &[(bool, String, String, String, String)]) -> String {
    policies
        .iter()
        .enumerate()
        .map(|(i, (permit, p, a, r, c))| {
            let effect = if *permit { "permit" } else { "forbid" };
            format!("@id(\"p{i}\") {effect} ({p}, {a}, {r}) {c};\n")
        })
        .collect()
}

/// A request's context: path, host, source address, ALPN, TLS version.
type Ctx = (
    &'static str,
    &'static str,
    [u8; 4],
    &'static str,
    &'static str,
);

fn context() -> impl Strategy<Value = Ctx> {
    (
        prop::sample::select(&["/a", "/b", "/a/x", "/a*", "/"][..]),
        prop::sample::select(&["", "api.shop"][..]),
        prop::sample::select(&[[10, 1, 2, 3], [192, 168, 0, 1]][..]),
        prop::sample::select(&["", "h2"][..]),
        prop::sample::select(&["", "TLSv1.3"][..]),
    )
}

fn request(
    (principal, action, resource): (&str, Action, &str),
    (path, host, ip, alpn, version): Ctx,
) -> AuthzRequest {
    let path = (action != Action::Connect).then_some(path);
    let host = (!host.is_empty()).then_some(host);
    let ip = IpAddr::V4(Ipv4Addr::from(ip));
    let mut request =
        build_request(principal, action.as_str(), resource, path, host, Some(ip)).unwrap();
    request.tls.alpn = alpn.to_owned();
    request.tls.version = version.to_owned();
    request
}

fn triple() -> impl Strategy<Value = (&'static str, Action, &'static str)> {
    (
        prop::sample::select(WORKLOADS),
        prop::sample::select(&Action::ALL[..]),
        prop::sample::select(WORKLOADS),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Holds the scope index and the per-action plans (action scopes left out, context-free
    /// policies settled once, the context cut to what the rest mention) to plain Cedar: each
    /// triple is decided under several contexts, so a plan built for the first is reused.
    #[test]
    fn indexed_decision_equals_full_cedar_decision(
        policies in prop::collection::vec(policy(), 0..25),
        triples in prop::collection::vec(triple(), 1..8),
        contexts in prop::collection::vec(context(), 1..4),
    ) {
        let text = policy_text(&policies);
        let set = match PolicySet::from_sources("prop", &[("prop.cedar".into(), text.clone())], schema()) {
            Ok(set) => set,
            Err(e) => panic!("generated set must validate: {e}\n{text}"),
        };
        for triple in &triples {
            for context in &contexts {
                let request = request(*triple, *context);
                let indexed = set.decide(&request, Mode::Enforce);
                let full = set.decide_unindexed(&request, Mode::Enforce);
                prop_assert_eq!(&indexed, &full, "request {:?}\n{}", request, text);
                // Twice, from the cache.
                prop_assert_eq!(&set.decide(&request, Mode::Enforce), &full);
            }
        }
    }
}
