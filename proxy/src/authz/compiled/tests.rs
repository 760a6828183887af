use std::str::FromStr;

use cedar_policy::{
    Context, Entities, EntityUid, EvalResult, Expression, Policy, Request, eval_expression,
};
use proptest::prelude::*;

use super::*;

/// The compiled conditions of `permit (principal, action, resource) <clauses>;`.
fn compiled(clauses: &str) -> Option<Condition> {
    let text = format!("permit (principal, action, resource) {clauses};");
    let policy = Policy::from_str(&text).unwrap();
    Condition::of_policy(&policy.to_json().unwrap())
}

/// The pattern of `context.path like "<pattern>"`, compiled from the policy's JSON form.
fn pattern(pattern: &str) -> Pattern {
    match compiled(&format!("when {{ context.path like \"{pattern}\" }}")) {
        Some(Condition::Like(Operand::Path, pattern)) => pattern,
        other => panic!("`like \"{pattern}\"` compiled to {other:?}"),
    }
}

/// Cedar's own answer to `"<text>" like "<pattern>"`.
fn cedar_like(text: &str, pattern: &str) -> bool {
    let uid = EntityUid::from_str(r#"Workload::"w""#).unwrap();
    let request = Request::new(uid.clone(), uid.clone(), uid, Context::empty(), None).unwrap();
    let expr = Expression::from_str(&format!("\"{text}\" like \"{pattern}\"")).unwrap();
    match eval_expression(&request, &Entities::empty(), &expr).unwrap() {
        EvalResult::Bool(b) => b,
        other => panic!("`like` gave {other:?}"),
    }
}

/// Asserts the compiled pattern and Cedar agree on `text`, and that both say `expected`.
fn like(text: &str, pat: &str, expected: bool) {
    assert_eq!(
        cedar_like(text, pat),
        expected,
        "Cedar: {text:?} like {pat:?}"
    );
    assert_eq!(
        pattern(pat).matches(text),
        expected,
        "compiled: {text:?} like {pat:?}"
    );
}

#[test]
fn like_matches_the_whole_text() {
    like("/api/v1/x", "/api/v1/*", true);
    like("/api/v1", "/api/v1/*", false);
    like("/api/v1/", "/api/v1/*", true);
    like("x/api/v1/y", "/api/v1/*", false);
    like("/a", "/a", true);
    like("/ab", "/a", false);
    like("/a", "/ab", false);
}

#[test]
fn like_escaped_star_is_a_literal_star() {
    like("/a*", "/a\\*", true);
    like("/ab", "/a\\*", false);
    like("/a", "/a\\*", false);
    like("*", "\\*", true);
    like("**", "\\**", true);
    like("x*", "\\**", false);
    like("a*b", "*\\**", true);
    like("ab", "*\\**", false);
}

#[test]
fn like_empty_pattern_matches_only_empty_text() {
    like("", "", true);
    like("a", "", false);
    like("", "*", true);
    like("", "**", true);
    like("", "\\*", false);
}

#[test]
fn like_star_at_both_ends_and_in_runs() {
    like("/x/admin/y", "*admin*", true);
    like("admin", "*admin*", true);
    like("/x/admi/y", "*admin*", false);
    like("abcabd", "*ab*d", true);
    like("abcabc", "*ab*d", false);
    like("aaa", "a**a", true);
    like("a", "a**a", false);
    like("mississippi", "*sip*", true);
    like("mississippi", "m*iss*ppi", true);
    like("mississippi", "m*iss*ppx", false);
}

#[test]
fn like_pattern_longer_than_text() {
    like("ab", "abc", false);
    like("ab", "ab*c", false);
    like("ab", "ab**", true);
    like("", "a", false);
}

#[test]
fn like_is_by_unicode_character() {
    like("/café", "/caf?", false);
    like("/café", "/caf*", true);
    like("/café", "/café", true);
    like("/cafe", "/café", false);
    like("日本語", "日*語", true);
    like("日本語", "*本*", true);
    like("日本", "日*語", false);
    like("é", "*é", true);
    like("aé", "*é", true);
    like("éa", "*é", false);
}

#[test]
fn the_common_shapes_compile() {
    for clauses in [
        "when { context.path like \"/a*\" && (context.method == \"GET\" || !(context.host != \"x\")) }",
        "when { context has tls && context.tls has alpn && context.tls.alpn == \"h2\" }",
        "when { context.tls.version == \"TLSv1.3\" && context.tls.cipher != \"\" }",
        "when { if context.path == \"/\" then true else false }",
        "when { \"a\" == context.host } unless { context.path like \"/admin/*\" }",
        "when { context has nope || false }",
    ] {
        assert!(compiled(clauses).is_some(), "{clauses}");
    }
    let c = compiled("when { context.path == \"/a\" } unless { context.method == \"GET\" }");
    let expected = Condition::And(
        Box::new(Condition::Eq(Operand::Path, Operand::Literal("/a".into()))),
        Box::new(Condition::Not(Box::new(Condition::Eq(
            Operand::Method,
            Operand::Literal("GET".into()),
        )))),
    );
    assert_eq!(c, Some(expected));
    // `has` is a constant: the proxy's context always has the same attributes.
    assert_eq!(
        compiled("when { context has path }"),
        Some(Condition::Const(true))
    );
    assert_eq!(
        compiled("when { context has nope }"),
        Some(Condition::Const(false))
    );
    assert_eq!(
        compiled("when { context.tls has cipher }"),
        Some(Condition::Const(true))
    );
}

#[test]
fn shapes_that_could_error_or_read_more_are_left_to_cedar() {
    for clauses in [
        // Other variables, entities, extension values.
        "when { context.path like \"/a*\" && principal.namespace == \"shop\" }",
        "when { context.sourceIp.isLoopback() }",
        "when { context.path == \"/a\" && Workload::\"x\".namespace == \"x\" }",
        "when { action == Action::\"GET\" && context.path == \"/\" }",
        // Attributes that do not exist, or are not strings: errors in Cedar.
        "when { context.nope == \"x\" }",
        "when { context.tls.nope == \"x\" }",
        "when { context.path.length == \"x\" }",
        "when { context.tls == \"x\" }",
        "when { context has path.x }",
        "when { context has tls.alpn }",
        // Not booleans where booleans are needed: type errors.
        "when { context.path }",
        "when { !context.path }",
        "when { context.path && true }",
        "when { \"x\" }",
        // Shapes not compiled.
        "when { context.path == 1 }",
        "when { context == {} }",
        "when { context.path in [\"/a\"] }",
        "when { [context.path].contains(\"/a\") }",
    ] {
        assert_eq!(compiled(clauses), None, "{clauses}");
    }
}

fn pattern_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["a", "b", "é", "日", "*", "\\*"][..])
}

fn text_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["a", "b", "é", "日", "*"][..])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    /// The compiled `like` is Cedar's, on random patterns (wildcards, escaped stars, multi-byte
    /// characters) and texts.
    #[test]
    fn like_equals_cedar_like(
        pat in prop::collection::vec(pattern_piece(), 0..7),
        text in prop::collection::vec(text_piece(), 0..9),
    ) {
        let (pat, text) = (pat.concat(), text.concat());
        prop_assert_eq!(pattern(&pat).matches(&text), cedar_like(&text, &pat), "{:?} like {:?}", text, pat);
    }
}
