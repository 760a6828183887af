use proptest::prelude::*;

use super::*;

fn path(raw: &str) -> String {
    normalize_path(raw.as_bytes()).unwrap().as_str().to_owned()
}

fn err(raw: &[u8]) -> PathError {
    normalize_path(raw).unwrap_err()
}

#[test]
fn dot_dot_is_resolved_before_deciding() {
    assert_eq!(path("/api/../admin"), "/admin");
    assert_eq!(path("/api/./../admin"), "/admin");
    assert_eq!(path("/api/%2e%2e/admin"), "/admin");
    assert_eq!(path("/api/%2E%2E/admin"), "/admin");
    assert_eq!(path("/api/.%2E/admin"), "/admin");
    assert_eq!(path("/%2e/admin"), "/admin");
}

#[test]
fn dot_dot_never_climbs_above_root() {
    assert_eq!(path("/a/b/../../.."), "/");
    assert_eq!(path("/../../etc/passwd"), "/etc/passwd");
    assert_eq!(path("/.."), "/");
}

#[test]
fn trailing_dot_segments_keep_a_trailing_slash() {
    assert_eq!(path("/a/b/.."), "/a/");
    assert_eq!(path("/a/."), "/a/");
    assert_eq!(path("/a/"), "/a/");
    assert_eq!(path("/a"), "/a");
}

#[test]
fn double_slashes_are_merged() {
    assert_eq!(path("//admin"), "/admin");
    assert_eq!(path("/a//b///c"), "/a/b/c");
    assert_eq!(path("/a//"), "/a/");
    assert_eq!(path("//"), "/");
}

#[test]
fn encoded_slash_is_refused() {
    assert_eq!(err(b"/a%2fb"), PathError::EncodedSlash("/a%2fb".into()));
    assert_eq!(err(b"/a%2Fb"), PathError::EncodedSlash("/a%2Fb".into()));
    assert_eq!(
        err(b"/api/..%2fadmin"),
        PathError::EncodedSlash("/api/..%2fadmin".into())
    );
}

#[test]
fn backslashes_are_refused() {
    assert_eq!(err(b"/a%5cb"), PathError::EncodedBackslash("/a%5cb".into()));
    assert_eq!(err(b"/a%5Cb"), PathError::EncodedBackslash("/a%5Cb".into()));
    assert_eq!(err(b"/a\\..\\b"), PathError::Backslash("/a\\..\\b".into()));
}

#[test]
fn nul_is_refused_raw_and_encoded() {
    assert_eq!(err(b"/a%00b"), PathError::Nul("/a%00b".into()));
    assert_eq!(err(b"/a\0b"), PathError::Nul("/a\0b".into()));
}

#[test]
fn control_characters_and_spaces_are_refused() {
    assert!(matches!(
        err(b"/a b"),
        PathError::ControlChar { byte: b' ', .. }
    ));
    assert!(matches!(
        err(b"/a\r\nb"),
        PathError::ControlChar { byte: b'\r', .. }
    ));
    assert!(matches!(
        err(b"/a\x7f"),
        PathError::ControlChar { byte: 0x7f, .. }
    ));
}

#[test]
fn bad_escapes_are_refused() {
    assert_eq!(err(b"/a%zz"), PathError::BadEscape("/a%zz".into()));
    assert_eq!(err(b"/a%4"), PathError::BadEscape("/a%4".into()));
    assert_eq!(err(b"/a%"), PathError::BadEscape("/a%".into()));
    assert_eq!(err(b"/a%g1"), PathError::BadEscape("/a%g1".into()));
}

#[test]
fn invalid_utf8_is_refused_raw_and_encoded() {
    assert_eq!(err(b"/a%ff"), PathError::InvalidUtf8("/a%ff".into()));
    // An overlong encoding of `/`: a lax decoder upstream would see a separator.
    assert_eq!(
        err(b"/a%c0%afb"),
        PathError::InvalidUtf8("/a%c0%afb".into())
    );
    assert!(matches!(err(b"/a\xffb"), PathError::InvalidUtf8(_)));
    assert!(matches!(err(b"/a?q=\xff"), PathError::InvalidUtf8(_)));
}

#[test]
fn tomcat_path_parameters_cannot_hide_dot_dot() {
    assert!(matches!(
        err(b"/api/..;/admin"),
        PathError::DotSegmentParameter(_)
    ));
    assert!(matches!(
        err(b"/api/.;x/admin"),
        PathError::DotSegmentParameter(_)
    ));
    assert!(matches!(
        err(b"/api/%2e%2e;jsessionid=1/admin"),
        PathError::DotSegmentParameter(_)
    ));
    // A parameter on an ordinary segment is just part of that segment.
    assert_eq!(path("/shop;jsessionid=1/cart"), "/shop;jsessionid=1/cart");
}

#[test]
fn fragment_is_stripped_and_query_kept_verbatim() {
    let p = normalize_path(b"/a/../b?x=%2f&y=1#frag").unwrap();
    assert_eq!(p.as_str(), "/b");
    assert_eq!(p.query(), Some("x=%2f&y=1"));
    assert_eq!(p.path_and_query(), "/b?x=%2f&y=1");
    let p = normalize_path(b"/a#/../../admin").unwrap();
    assert_eq!(p.as_str(), "/a");
    assert_eq!(p.query(), None);
    assert_eq!(normalize_path(b"/a?").unwrap().query(), Some(""));
}

#[test]
fn escapes_are_canonical() {
    // Unreserved escapes are decoded, others upper-cased.
    assert_eq!(path("/%7euser"), "/~user");
    assert_eq!(path("/%7Euser"), "/~user");
    assert_eq!(path("/%41%62c"), "/Abc");
    assert_eq!(path("/a%3bb"), "/a%3Bb");
    assert_eq!(path("/caf%c3%a9"), "/caf%C3%A9");
    // Raw UTF-8 gets the same spelling as its escapes.
    assert_eq!(path("/café"), "/caf%C3%A9");
}

#[test]
fn empty_and_asterisk_targets() {
    assert_eq!(path(""), "/");
    assert_eq!(path("?q"), "/");
    let star = normalize_path(b"*").unwrap();
    assert!(star.is_asterisk());
    assert_eq!(star.as_str(), "*");
}

#[test]
fn absolute_form_is_refused() {
    assert_eq!(
        err(b"http://evil/admin"),
        PathError::NotOriginForm("http://evil/admin".into())
    );
    assert!(matches!(err(b"admin"), PathError::NotOriginForm(_)));
    assert!(matches!(err(b"**"), PathError::NotOriginForm(_)));
}

#[test]
fn error_messages_name_the_path() {
    let msg = err(b"/a%2fb").to_string();
    assert!(msg.contains("`/a%2fb`"), "{msg}");
}

#[test]
fn hosts_are_lower_cased_without_port() {
    assert_eq!(
        normalize_host("Catalog.Shop.SVC:8080").unwrap(),
        "catalog.shop.svc"
    );
    assert_eq!(normalize_host("example.com").unwrap(), "example.com");
    assert_eq!(normalize_host("example.com.").unwrap(), "example.com");
    assert_eq!(normalize_host("10.0.0.1:443").unwrap(), "10.0.0.1");
    assert_eq!(normalize_host("[::1]:8443").unwrap(), "[::1]");
    assert_eq!(normalize_host("[0:0:0::1]").unwrap(), "[::1]");
    assert_eq!(normalize_host("[FE80::1]").unwrap(), "[fe80::1]");
}

#[test]
fn bad_hosts_are_refused() {
    assert_eq!(normalize_host(""), Err(HostError::Empty));
    assert_eq!(normalize_host(":80"), Err(HostError::Empty));
    assert_eq!(
        normalize_host("a.com:http"),
        Err(HostError::BadPort("a.com:http".into()))
    );
    assert_eq!(
        normalize_host("a.com:70000"),
        Err(HostError::BadPort("a.com:70000".into()))
    );
    assert_eq!(
        normalize_host("a.com:"),
        Err(HostError::BadPort("a.com:".into()))
    );
    assert_eq!(
        normalize_host("::1"),
        Err(HostError::UnbracketedIpv6("::1".into()))
    );
    assert_eq!(
        normalize_host("[not-v6]"),
        Err(HostError::BadIpv6("[not-v6]".into()))
    );
    assert_eq!(
        normalize_host("[::1"),
        Err(HostError::BadIpv6("[::1".into()))
    );
    assert_eq!(
        normalize_host("[::1]x"),
        Err(HostError::BadPort("[::1]x".into()))
    );
    assert_eq!(
        normalize_host("a b"),
        Err(HostError::InvalidChar {
            host: "a b".into(),
            ch: ' '
        })
    );
    assert!(matches!(
        normalize_host("user@host"),
        Err(HostError::InvalidChar { ch: '@', .. })
    ));
}

fn path_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"/".to_vec()),
        Just(b"//".to_vec()),
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b"/./".to_vec()),
        Just(b"/../".to_vec()),
        Just(b"%2e".to_vec()),
        Just(b"%2E".to_vec()),
        Just(b"%7e".to_vec()),
        Just(b"%41".to_vec()),
        Just(b"%3b".to_vec()),
        Just(b"%c3%a9".to_vec()),
        Just(b";".to_vec()),
        Just(b"?".to_vec()),
        Just(b"#".to_vec()),
        "[a-zA-Z0-9_~-]{1,4}".prop_map(String::into_bytes),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| {
        let mut out = b"/".to_vec();
        for p in pieces {
            out.extend(p);
        }
        out
    })
}

proptest! {
    #[test]
    fn normalization_is_idempotent_and_canonical(raw in path_bytes()) {
        if let Ok(once) = normalize_path(&raw) {
            let twice = normalize_path(once.as_str().as_bytes()).unwrap();
            prop_assert_eq!(twice.as_str(), once.as_str());
            let p = once.as_str();
            prop_assert!(p.starts_with('/'));
            prop_assert!(!p.contains("//"), "{p}");
            for segment in p.split('/') {
                prop_assert!(segment != "." && segment != "..", "{p}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_results_are_stable(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(once) = normalize_path(&raw) {
            let twice = normalize_path(once.as_str().as_bytes()).unwrap();
            prop_assert_eq!(twice.as_str(), once.as_str());
        }
    }
}
