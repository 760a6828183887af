use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::*;
use crate::jwt::{JwtSigningKey, JwtSvid};
use crate::spiffe_id::SpiffeId;

/// The P-256 example key of RFC 7517 appendix A.1: a fixed, known-good point.
const RFC_X: &str = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
const RFC_Y: &str = "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM";

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn rfc_key() -> Value {
    json!({"kty": "EC", "crv": "P-256", "x": RFC_X, "y": RFC_Y, "kid": "rfc", "use": "jwt-svid"})
}

fn load(document: &Value) -> Result<JwtBundle, JwtError> {
    JwtBundle::from_jwks_json(td(), document.to_string().as_bytes())
}

/// Loads a document whose only key is `rfc_key()` with `edit` applied.
fn load_edited(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<JwtBundle, JwtError> {
    let mut key = rfc_key();
    edit(key.as_object_mut().unwrap());
    load(&json!({ "keys": [key] }))
}

#[test]
fn jwks_round_trip() {
    let a = JwtSigningKey::generate().unwrap();
    let b = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td());
    bundle.insert(a.public_jwk());
    bundle.insert(b.public_jwk());
    bundle.set_sequence(Some(7));
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));

    let json = bundle.to_jwks_json();
    let loaded = JwtBundle::from_jwks_json(td(), &json).unwrap();
    assert_eq!(loaded, bundle);
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded.sequence(), Some(7));
    assert_eq!(loaded.refresh_hint(), Some(Duration::from_secs(300)));
    assert_eq!(loaded.get(a.kid()), Some(&a.public_jwk()));
}

#[test]
fn jwks_has_the_spiffe_bundle_shape() {
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td());
    bundle.insert(key.public_jwk());
    let document: Value = serde_json::from_slice(&bundle.to_jwks_json()).unwrap();
    let jwk = &document["keys"][0];
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["use"], "jwt-svid");
    assert_eq!(jwk["kid"], key.kid());
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    assert_eq!([&[4u8][..], &x, &y].concat(), key.public_jwk().public_key());
    assert!(
        document.get("spiffe_sequence").is_none(),
        "unset fields are omitted"
    );
}

#[test]
fn tokens_validate_against_a_published_and_reloaded_bundle() {
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td());
    bundle.insert(key.public_jwk());
    let loaded = JwtBundle::from_jwks_json(td(), &bundle.to_jwks_json()).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let token = JwtSvid::mint(&key, &sub, &["db".into()], Duration::from_secs(60), now).unwrap();
    let set: JwtBundleSet = [loaded].into_iter().collect();
    assert_eq!(
        JwtSvid::validate(&token, "db", &set, now)
            .unwrap()
            .spiffe_id,
        sub
    );
}

#[test]
fn rfc_7517_example_key_loads() {
    let bundle = load(&json!({"keys": [rfc_key()], "spiffe_sequence": 1})).unwrap();
    let jwk = bundle.get("rfc").unwrap();
    assert_eq!(jwk.public_key().len(), 65);
    assert_eq!(Value::Object(jwk.to_json()), rfc_key());
}

#[test]
fn x509_and_unknown_use_keys_are_skipped_and_missing_use_is_read() {
    let document = json!({
        "keys": [
            {"kty": "RSA", "use": "x509-svid", "x5c": ["MIIB"], "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "use": "wit-svid", "crv": "Ed25519", "x": "AAAA", "kid": "w"},
            {"kty": "EC", "crv": "P-256", "x": RFC_X, "y": RFC_Y, "kid": "no-use"},
        ],
        "spiffe_refresh_hint": 60,
    });
    let bundle = load(&document).unwrap();
    assert_eq!(bundle.len(), 1);
    assert!(bundle.get("no-use").is_some());
    assert_eq!(bundle.refresh_hint(), Some(Duration::from_secs(60)));
}

#[test]
fn empty_key_set_loads_as_an_empty_bundle() {
    let bundle = load(&json!({"keys": []})).unwrap();
    assert!(bundle.is_empty());
    assert_eq!(bundle.trust_domain(), &td());
}

#[test]
fn malformed_documents_are_refused() {
    for document in [
        &b"not json"[..],
        b"[]",
        b"{}",
        br#"{"keys": {}}"#,
        br#"{"keys": [7]}"#,
        br#"{"keys": [], "spiffe_sequence": -1}"#,
        br#"{"keys": [], "spiffe_sequence": "1"}"#,
        br#"{"keys": [], "spiffe_refresh_hint": 1.5}"#,
    ] {
        let err = JwtBundle::from_jwks_json(td(), document);
        assert!(
            matches!(err, Err(JwtError::BadJwks(_))),
            "{}: {err:?}",
            String::from_utf8_lossy(document)
        );
    }
}

#[test]
fn key_without_kid_is_refused() {
    for kid in [None, Some(json!("")), Some(json!(1))] {
        let err = load_edited(|k| match &kid {
            None => {
                k.remove("kid");
            }
            Some(kid) => {
                k.insert("kid".into(), kid.clone());
            }
        });
        assert!(matches!(err, Err(JwtError::BadJwks(_))), "{kid:?}: {err:?}");
    }
}

#[test]
fn non_string_use_is_refused() {
    let err = load_edited(|k| {
        k.insert("use".into(), json!(["jwt-svid"]));
    });
    assert!(matches!(err, Err(JwtError::BadJwks(_))), "{err:?}");
}

#[test]
fn unknown_key_type_is_refused() {
    let err = load_edited(|k| {
        k.insert("kty".into(), json!("RSA"));
    });
    assert_eq!(
        err,
        Err(JwtError::UnsupportedKeyType {
            kid: "rfc".into(),
            kty: "RSA".into()
        })
    );
    let err = load_edited(|k| {
        k.remove("kty");
    });
    assert!(
        matches!(err, Err(JwtError::UnsupportedKeyType { .. })),
        "{err:?}"
    );
}

#[test]
fn unknown_curve_is_refused() {
    let err = load_edited(|k| {
        k.insert("crv".into(), json!("P-384"));
    });
    assert_eq!(
        err,
        Err(JwtError::UnsupportedCurve {
            kid: "rfc".into(),
            crv: "P-384".into()
        })
    );
}

#[test]
fn bad_coordinates_are_refused() {
    let mut y = URL_SAFE_NO_PAD.decode(RFC_Y).unwrap();
    y[31] ^= 1;
    let off_curve = URL_SAFE_NO_PAD.encode(&y);
    let short = URL_SAFE_NO_PAD.encode([1u8; 31]);
    let long = URL_SAFE_NO_PAD.encode([1u8; 33]);
    // x = 2^256 - 1 is above the field prime: not a field element at all.
    let above_prime = URL_SAFE_NO_PAD.encode([0xffu8; 32]);
    let zero = URL_SAFE_NO_PAD.encode([0u8; 32]);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("y", Some(off_curve)),
        ("x", Some(short)),
        ("y", Some(long)),
        ("x", Some(above_prime)),
        ("x", Some(zero.clone())),
        ("y", Some(zero)),
        ("x", Some(format!("{RFC_X}="))),
        ("x", Some("not base64!".into())),
        ("y", None),
    ];
    for (name, value) in cases {
        let err = load_edited(|k| match &value {
            Some(v) => {
                k.insert(name.into(), json!(v));
            }
            None => {
                k.remove(name);
            }
        });
        assert!(
            matches!(&err, Err(JwtError::BadKey { kid, .. }) if kid == "rfc"),
            "{name}={value:?}: {err:?}"
        );
    }
    let err = load_edited(|k| {
        k.insert("x".into(), json!(42));
    });
    assert!(matches!(err, Err(JwtError::BadKey { .. })), "{err:?}");
}

#[test]
fn private_key_in_a_bundle_is_refused() {
    let err = load_edited(|k| {
        k.insert(
            "d".into(),
            json!("870MB6gfuTJ4HtUnUvYMyJpr5eUZNP4Bk43bVdj3eAE"),
        );
    });
    assert!(
        matches!(&err, Err(JwtError::BadKey { reason, .. }) if reason.contains("private")),
        "{err:?}"
    );
}

#[test]
fn mismatched_alg_is_refused() {
    let ok = load_edited(|k| {
        k.insert("alg".into(), json!("ES256"));
    });
    assert!(ok.is_ok(), "{ok:?}");
    let err = load_edited(|k| {
        k.insert("alg".into(), json!("ES384"));
    });
    assert!(matches!(err, Err(JwtError::BadKey { .. })), "{err:?}");
}

#[test]
fn duplicate_kids_are_refused() {
    let document = json!({"keys": [rfc_key(), rfc_key()]});
    assert_eq!(load(&document), Err(JwtError::DuplicateKeyId("rfc".into())));
    // Even when one of them would be skipped as an x509 authority, two JWT keys may not share a kid.
    let mut x509 = rfc_key();
    x509["use"] = json!("x509-svid");
    assert!(load(&json!({"keys": [rfc_key(), x509]})).is_ok());
}

#[test]
fn sec1_points_are_checked() {
    let good = JwtSigningKey::generate().unwrap().public_jwk();
    let point = good.public_key();
    assert_eq!(
        Jwk::from_sec1_point("k", point).unwrap().public_key(),
        point
    );

    let mut compressed = point[..33].to_vec();
    compressed[0] = 0x02;
    let mut wrong_prefix = point.to_vec();
    wrong_prefix[0] = 0x05;
    let mut off_curve = point.to_vec();
    off_curve[64] ^= 1;
    for bad in [
        &compressed[..],
        &wrong_prefix,
        &off_curve,
        &[0u8; 65][..],
        &point[..64],
        &[],
    ] {
        assert!(
            matches!(Jwk::from_sec1_point("k", bad), Err(JwtError::BadKey { .. })),
            "{}",
            hex::encode(bad)
        );
    }
    assert!(matches!(
        Jwk::from_sec1_point("", point),
        Err(JwtError::BadJwks(_))
    ));
}

#[test]
fn bundle_insert_replaces_and_remove_forgets() {
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::new(td());
    assert_eq!(bundle.insert(key.public_jwk()), None);
    assert_eq!(bundle.insert(key.public_jwk()), Some(key.public_jwk()));
    assert_eq!(bundle.keys().count(), 1);
    assert_eq!(bundle.remove(key.kid()), Some(key.public_jwk()));
    assert_eq!(bundle.remove(key.kid()), None);
    assert!(bundle.get(key.kid()).is_none());
}

#[test]
fn bundle_set_is_keyed_by_trust_domain() {
    let other = TrustDomain::new("other.org").unwrap();
    let mut set = JwtBundleSet::new();
    assert!(set.is_empty());
    assert!(set.insert(JwtBundle::new(td())).is_none());
    assert!(set.insert(JwtBundle::new(other.clone())).is_none());
    assert!(set.insert(JwtBundle::new(td())).is_some());
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&other).unwrap().trust_domain(), &other);
    let names: Vec<_> = set.iter().map(|b| b.trust_domain().to_string()).collect();
    assert_eq!(names, ["example.org", "other.org"]);
    assert!(set.remove(&other).is_some());
    assert!(set.get(&other).is_none());
}
