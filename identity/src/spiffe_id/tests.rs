use proptest::prelude::*;

use super::*;

fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::parse(s)
}

#[test]
fn accepts_valid_ids() {
    for ok in [
        "spiffe://example.org",
        "spiffe://example.org/ns/shop/sa/web",
        "spiffe://td/a",
        "spiffe://a-b_c.d9/Path.With-Mixed_Case9",
        "spiffe://example.org/...",
        "spiffe://example.org/.hidden",
        "spiffe://example.org/a../b",
        "spiffe://1.2.3.4/x",
    ] {
        let id = parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(id.as_str(), ok);
        assert_eq!(id.to_string(), ok);
    }
}

#[test]
fn splits_trust_domain_and_path() {
    let id = parse("spiffe://example.org/ns/shop/sa/web").unwrap();
    assert_eq!(id.trust_domain_name(), "example.org");
    assert_eq!(id.trust_domain(), TrustDomain::new("example.org").unwrap());
    assert_eq!(id.path(), "/ns/shop/sa/web");
    assert_eq!(
        id.segments().collect::<Vec<_>>(),
        ["ns", "shop", "sa", "web"]
    );
    assert!(!id.is_trust_domain_id());

    let td = parse("spiffe://example.org").unwrap();
    assert_eq!(td.path(), "");
    assert_eq!(td.segments().count(), 0);
    assert!(td.is_trust_domain_id());
}

#[test]
fn empty_is_refused() {
    assert_eq!(parse(""), Err(SpiffeIdError::Empty));
}

#[test]
fn wrong_or_missing_scheme_is_refused() {
    for bad in [
        "example.org/a",
        "http://example.org/a",
        "SPIFFE://example.org/a",
        "Spiffe://example.org/a",
        "spiffe:/example.org/a",
        "spiffe:example.org",
        " spiffe://example.org/a",
        "spiffe//example.org",
        "urn:spiffe:example.org",
    ] {
        assert!(
            matches!(parse(bad), Err(SpiffeIdError::WrongScheme(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn missing_trust_domain_is_refused() {
    for bad in ["spiffe://", "spiffe:///a", "spiffe:///"] {
        assert!(
            matches!(parse(bad), Err(SpiffeIdError::MissingTrustDomain(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn upper_case_trust_domain_is_refused_not_lowered() {
    assert_eq!(
        parse("spiffe://Example.org/a"),
        Err(SpiffeIdError::BadTrustDomainChar {
            input: "spiffe://Example.org/a".into(),
            ch: 'E'
        })
    );
}

#[test]
fn port_userinfo_and_other_trust_domain_chars_are_refused() {
    for (bad, ch) in [
        ("spiffe://example.org:8080/a", ':'),
        ("spiffe://user@example.org/a", '@'),
        ("spiffe://user:pw@example.org/a", ':'),
        ("spiffe://exa mple.org/a", ' '),
        ("spiffe://example.org?q=1", '?'),
        ("spiffe://example.org#frag", '#'),
        ("spiffe://ex%41mple.org/a", '%'),
        ("spiffe://[::1]/a", '['),
        ("spiffe://exämple.org/a", 'ä'),
        ("spiffe://example.org\\a", '\\'),
        ("spiffe://example.org\0/a", '\0'),
    ] {
        match parse(bad) {
            Err(SpiffeIdError::BadTrustDomainChar { ch: got, .. }) => assert_eq!(got, ch, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn query_fragment_and_percent_encoding_in_path_are_refused() {
    for (bad, ch) in [
        ("spiffe://example.org/a?b=c", '?'),
        ("spiffe://example.org/a#b", '#'),
        ("spiffe://example.org/a%2Fb", '%'),
        ("spiffe://example.org/%61", '%'),
        ("spiffe://example.org/a b", ' '),
        ("spiffe://example.org/a:b", ':'),
        ("spiffe://example.org/a@b", '@'),
        ("spiffe://example.org/a\\b", '\\'),
        ("spiffe://example.org/a\u{0}b", '\0'),
        ("spiffe://example.org/ä", 'ä'),
        ("spiffe://example.org/a+b", '+'),
        ("spiffe://example.org/a~b", '~'),
    ] {
        match parse(bad) {
            Err(SpiffeIdError::BadPathChar { ch: got, .. }) => assert_eq!(got, ch, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn empty_segments_are_refused() {
    for bad in [
        "spiffe://example.org//a",
        "spiffe://example.org/a//b",
        "spiffe://example.org//",
    ] {
        assert!(
            matches!(parse(bad), Err(SpiffeIdError::EmptySegment(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn trailing_slash_is_refused() {
    for bad in [
        "spiffe://example.org/",
        "spiffe://example.org/a/",
        "spiffe://example.org/a/b/",
    ] {
        assert!(
            matches!(parse(bad), Err(SpiffeIdError::TrailingSlash(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn dot_segments_are_refused() {
    for bad in [
        "spiffe://example.org/.",
        "spiffe://example.org/..",
        "spiffe://example.org/a/./b",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/a/..",
    ] {
        assert!(
            matches!(parse(bad), Err(SpiffeIdError::DotSegment(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn length_limits_are_enforced() {
    let td_255 = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    assert!(parse(&format!("spiffe://{td_255}/x")).is_ok());
    let td_256 = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
    assert!(matches!(
        parse(&format!("spiffe://{td_256}/x")),
        Err(SpiffeIdError::TrustDomainTooLong(_))
    ));

    let prefix = "spiffe://example.org/";
    let exactly_max = format!("{prefix}{}", "p".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(exactly_max.len(), MAX_SPIFFE_ID_LEN);
    assert!(parse(&exactly_max).is_ok());
    let too_long = format!("{exactly_max}p");
    assert_eq!(
        parse(&too_long),
        Err(SpiffeIdError::TooLong(MAX_SPIFFE_ID_LEN + 1))
    );
}

#[test]
fn errors_name_the_offending_value() {
    let err = parse("spiffe://Example.org/a").unwrap_err().to_string();
    assert!(err.contains("`spiffe://Example.org/a`"), "{err}");
    assert!(err.contains("`E`"), "{err}");
    let err = parse("https://x/y").unwrap_err().to_string();
    assert!(
        err.contains("`https://x/y`") && err.contains("spiffe://"),
        "{err}"
    );
}

#[test]
fn trust_domain_parsing() {
    assert_eq!(
        TrustDomain::new("example.org").unwrap().as_str(),
        "example.org"
    );
    assert_eq!(
        "example.org".parse::<TrustDomain>().unwrap().as_str(),
        "example.org"
    );
    assert_eq!(
        "spiffe://example.org"
            .parse::<TrustDomain>()
            .unwrap()
            .as_str(),
        "example.org"
    );
    assert!(matches!(
        "spiffe://example.org/a".parse::<TrustDomain>(),
        Err(SpiffeIdError::BadTrustDomainChar { ch: '/', .. })
    ));
    assert!(matches!(
        TrustDomain::new(""),
        Err(SpiffeIdError::MissingTrustDomain(_))
    ));
    assert!(matches!(
        TrustDomain::new("Example.org"),
        Err(SpiffeIdError::BadTrustDomainChar { ch: 'E', .. })
    ));
    assert!(matches!(
        TrustDomain::new("example.org:443"),
        Err(SpiffeIdError::BadTrustDomainChar { ch: ':', .. })
    ));
    assert!(matches!(
        TrustDomain::new(&"a".repeat(256)),
        Err(SpiffeIdError::TrustDomainTooLong(_))
    ));
}

#[test]
fn trust_domain_builds_ids() {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(td.id().as_str(), "spiffe://example.org");
    assert!(td.id().is_trust_domain_id());
    assert_eq!(
        td.workload_id(&["ns", "shop", "sa", "web"])
            .unwrap()
            .as_str(),
        "spiffe://example.org/ns/shop/sa/web"
    );
    // Segments are validated, so a caller cannot smuggle a path through one.
    assert!(matches!(
        td.workload_id(&["a/../b"]),
        Err(SpiffeIdError::DotSegment(_))
    ));
    assert!(matches!(
        td.workload_id(&[""]),
        Err(SpiffeIdError::TrailingSlash(_))
    ));
    assert!(matches!(
        td.workload_id(&["a", ""]),
        Err(SpiffeIdError::TrailingSlash(_))
    ));
    assert!(matches!(
        td.workload_id(&["", "a"]),
        Err(SpiffeIdError::EmptySegment(_))
    ));
    assert!(matches!(
        td.workload_id(&["a?b"]),
        Err(SpiffeIdError::BadPathChar { .. })
    ));
}

#[test]
fn membership_is_exact() {
    let td = TrustDomain::new("example.org").unwrap();
    assert!(parse("spiffe://example.org/a").unwrap().is_member_of(&td));
    // Not a suffix or prefix match.
    assert!(
        !parse("spiffe://example.org.evil/a")
            .unwrap()
            .is_member_of(&td)
    );
    assert!(
        !parse("spiffe://evil-example.org/a")
            .unwrap()
            .is_member_of(&td)
    );
    let err = parse("spiffe://other.org/a")
        .unwrap()
        .require_member_of(&td)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "spiffe id `spiffe://other.org/a` is outside trust domain `example.org`"
    );
}

#[test]
fn ids_compare_literally() {
    // Path case is significant; the SPIFFE spec does not fold it.
    assert_ne!(
        parse("spiffe://td/a").unwrap(),
        parse("spiffe://td/A").unwrap()
    );
}

#[test]
fn serde_round_trip_and_validation() {
    let id = parse("spiffe://example.org/ns/a/sa/b").unwrap();
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, "\"spiffe://example.org/ns/a/sa/b\"");
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/a/\"").is_err());
    assert!(serde_json::from_str::<TrustDomain>("\"EXAMPLE\"").is_err());
    let td: TrustDomain = serde_json::from_str("\"example.org\"").unwrap();
    assert_eq!(serde_json::to_string(&td).unwrap(), "\"example.org\"");
}

fn td_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn segment_strategy() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,20}".prop_filter("dot segments are not allowed", |s| s != "." && s != "..")
}

proptest! {
    #[test]
    fn parse_display_round_trip(td in td_strategy(), segments in prop::collection::vec(segment_strategy(), 0..8)) {
        let mut s = format!("spiffe://{td}");
        for seg in &segments {
            s.push('/');
            s.push_str(seg);
        }
        let id = SpiffeId::parse(&s).unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id.clone());
        prop_assert_eq!(id.trust_domain_name(), td.as_str());
        prop_assert_eq!(id.segments().map(str::to_owned).collect::<Vec<_>>(), segments);
    }

    #[test]
    fn arbitrary_strings_never_panic_and_valid_ones_round_trip(s in ".{0,80}") {
        if let Ok(id) = SpiffeId::parse(&s) {
            prop_assert_eq!(id.as_str(), s.as_str());
        }
    }

    #[test]
    fn any_forbidden_path_char_is_refused(td in td_strategy(), c in any::<char>()) {
        prop_assume!(!(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')));
        let s = format!("spiffe://{td}/a{c}b");
        let refused = matches!(SpiffeId::parse(&s), Err(SpiffeIdError::BadPathChar { .. }));
        prop_assert!(refused);
    }
}
