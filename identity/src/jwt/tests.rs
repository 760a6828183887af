use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};

use super::*;
use crate::spiffe_id::TrustDomain;

const AUDIENCE: &str = "spiffe://example.org/reports";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn workload() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap()
}

fn audience() -> Vec<String> {
    vec![AUDIENCE.to_owned()]
}

fn bundles_with(keys: &[&JwtSigningKey]) -> JwtBundleSet {
    let mut bundle = JwtBundle::new(td());
    for key in keys {
        bundle.insert(key.public_jwk());
    }
    [bundle].into_iter().collect()
}

fn mint(key: &JwtSigningKey) -> String {
    JwtSvid::mint(
        key,
        &workload(),
        &audience(),
        Duration::from_secs(300),
        now(),
    )
    .unwrap()
}

fn validate(token: &str, bundles: &JwtBundleSet) -> Result<ValidatedJwt, JwtError> {
    JwtSvid::validate(token, AUDIENCE, bundles, now())
}

fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn header(key: &JwtSigningKey) -> Value {
    json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"})
}

fn claims() -> Value {
    let iat = now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    json!({"sub": workload().as_str(), "aud": [AUDIENCE], "iat": iat, "exp": iat + 300})
}

/// Signs arbitrary header and claims with the real key, so only the check under test can fail.
fn forge(key: &JwtSigningKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", encode(header), encode(claims));
    let signature = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn forge_claims(key: &JwtSigningKey, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut claims = claims();
    edit(claims.as_object_mut().unwrap());
    forge(key, &header(key), &claims)
}

fn forge_header(key: &JwtSigningKey, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut header = header(key);
    edit(header.as_object_mut().unwrap());
    forge(key, &header, &claims())
}

fn parts(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

#[test]
fn round_trip() {
    let key = JwtSigningKey::generate().unwrap();
    let token = mint(&key);
    let validated = validate(&token, &bundles_with(&[&key])).unwrap();
    assert_eq!(validated.spiffe_id, workload());
    assert_eq!(validated.audience, audience());
    assert_eq!(
        validated.expiry,
        now() + Duration::from_secs(300),
        "exp is now + ttl"
    );
    assert_eq!(validated.claims["iat"], json!(1_700_000_000u64));
    assert_eq!(validated.claims["sub"], json!(workload().as_str()));
}

#[test]
fn minted_header_and_claims_have_the_jwt_svid_shape() {
    let key = JwtSigningKey::generate().unwrap();
    let token = JwtSvid::mint(
        &key,
        &workload(),
        &["a".to_owned(), "b".to_owned()],
        Duration::from_secs(60),
        now(),
    )
    .unwrap();
    let header = URL_SAFE_NO_PAD.decode(&parts(&token)[0]).unwrap();
    assert_eq!(
        String::from_utf8(header).unwrap(),
        format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, key.kid())
    );
    let unverified = JwtSvid::parse_insecure(&token).unwrap();
    assert_eq!(unverified.claims["aud"], json!(["a", "b"]));
    assert_eq!(unverified.claims["exp"], json!(1_700_000_060u64));
    assert_eq!(unverified.claims.len(), 4, "{:?}", unverified.claims);
    assert_eq!(
        JwtSvid::parse_spiffe_id_unverified(&token).unwrap(),
        workload()
    );
    // Signatures are the 64-byte JWS `r || s` form, not DER.
    assert_eq!(URL_SAFE_NO_PAD.decode(&parts(&token)[2]).unwrap().len(), 64);
}

#[test]
fn mint_refuses_empty_audience_short_ttl_and_pre_epoch_clock() {
    let key = JwtSigningKey::generate().unwrap();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        JwtSvid::mint(&key, &workload(), &[], ttl, now()),
        Err(JwtError::EmptyAudience)
    );
    assert_eq!(
        JwtSvid::mint(&key, &workload(), &["a".into(), String::new()], ttl, now()),
        Err(JwtError::EmptyAudience)
    );
    let short = Duration::from_millis(999);
    assert_eq!(
        JwtSvid::mint(&key, &workload(), &audience(), short, now()),
        Err(JwtError::BadTtl(short))
    );
    let before_epoch = UNIX_EPOCH - Duration::from_secs(1);
    assert_eq!(
        JwtSvid::mint(&key, &workload(), &audience(), ttl, before_epoch),
        Err(JwtError::ClockBeforeEpoch)
    );
}

#[test]
fn mint_refuses_a_token_too_large_to_validate() {
    let key = JwtSigningKey::generate().unwrap();
    let huge = vec!["x".repeat(MAX_TOKEN_LEN)];
    let err = JwtSvid::mint(&key, &workload(), &huge, Duration::from_secs(60), now());
    assert!(matches!(err, Err(JwtError::TooLarge(_))), "{err:?}");
}

#[test]
fn tampered_payload_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let token = mint(&key);
    let mut claims = claims();
    claims["sub"] = json!("spiffe://example.org/ns/shop/sa/admin");
    let p = parts(&token);
    let tampered = format!("{}.{}.{}", p[0], encode(&claims), p[2]);
    assert_eq!(
        validate(&tampered, &bundles_with(&[&key])),
        Err(JwtError::BadSignature(key.kid().to_owned()))
    );
}

#[test]
fn tampered_header_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let token = mint(&key);
    let mut header = header(&key);
    header["typ"] = json!("JOSE");
    let p = parts(&token);
    let tampered = format!("{}.{}.{}", encode(&header), p[1], p[2]);
    assert_eq!(
        validate(&tampered, &bundles_with(&[&key])),
        Err(JwtError::BadSignature(key.kid().to_owned()))
    );
}

#[test]
fn tampered_signature_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let p = parts(&mint(&key));
    let mut signature = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
    signature[10] ^= 0x01;
    let flipped = format!("{}.{}.{}", p[0], p[1], URL_SAFE_NO_PAD.encode(&signature));
    assert_eq!(
        validate(&flipped, &bundles),
        Err(JwtError::BadSignature(key.kid().to_owned()))
    );
    let truncated = format!(
        "{}.{}.{}",
        p[0],
        p[1],
        URL_SAFE_NO_PAD.encode(&signature[..63])
    );
    assert_eq!(
        validate(&truncated, &bundles),
        Err(JwtError::BadSignature(key.kid().to_owned()))
    );
    let empty = format!("{}.{}.", p[0], p[1]);
    assert_eq!(
        validate(&empty, &bundles),
        Err(JwtError::BadSignature(key.kid().to_owned()))
    );
    let not_base64 = format!("{}.{}.{}!", p[0], p[1], p[2]);
    assert!(matches!(
        validate(&not_base64, &bundles),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn signature_by_another_key_in_the_bundle_is_refused() {
    let signer = JwtSigningKey::generate().unwrap();
    let other = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&signer, &other]);
    // Signed by `signer` but naming `other`'s kid: the signature must be checked with `other`.
    let token = forge(&signer, &header(&other), &claims());
    assert_eq!(
        validate(&token, &bundles),
        Err(JwtError::BadSignature(other.kid().to_owned()))
    );
}

#[test]
fn unknown_kid_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let token = forge_header(&key, |h| {
        h.insert("kid".into(), json!("not-a-key"));
    });
    assert_eq!(
        validate(&token, &bundles_with(&[&key])),
        Err(JwtError::UnknownKey {
            kid: "not-a-key".into(),
            trust_domain: "example.org".into()
        })
    );
}

#[test]
fn missing_or_empty_kid_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let missing = forge_header(&key, |h| {
        h.remove("kid");
    });
    assert_eq!(validate(&missing, &bundles), Err(JwtError::MissingKeyId));
    let empty = forge_header(&key, |h| {
        h.insert("kid".into(), json!(""));
    });
    assert_eq!(validate(&empty, &bundles), Err(JwtError::MissingKeyId));
    let number = forge_header(&key, |h| {
        h.insert("kid".into(), json!(7));
    });
    assert!(matches!(
        validate(&number, &bundles),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn alg_none_with_empty_signature_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let header = json!({"alg": "none", "kid": key.kid(), "typ": "JWT"});
    let token = format!("{}.{}.", encode(&header), encode(&claims()));
    assert_eq!(
        validate(&token, &bundles_with(&[&key])),
        Err(JwtError::UnsupportedAlgorithm("none".into()))
    );
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    // The classic confusion attack: a verifier that lets the token pick the algorithm would use the
    // published public key as an HMAC secret.
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let header = json!({"alg": "HS256", "kid": key.kid(), "typ": "JWT"});
    let input = format!("{}.{}", encode(&header), encode(&claims()));
    let jwk_json = Value::Object(key.public_jwk().to_json()).to_string();
    for secret in [key.public_jwk().public_key(), jwk_json.as_bytes()] {
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        assert_eq!(
            validate(&token, &bundles),
            Err(JwtError::UnsupportedAlgorithm("HS256".into()))
        );
    }
}

#[test]
fn other_algorithms_are_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    for alg in ["RS256", "ES384", "ES512", "PS256", "es256", "EdDSA"] {
        let token = forge_header(&key, |h| {
            h.insert("alg".into(), json!(alg));
        });
        assert_eq!(
            validate(&token, &bundles),
            Err(JwtError::UnsupportedAlgorithm(alg.into())),
            "{alg}"
        );
    }
    let not_string = forge_header(&key, |h| {
        h.insert("alg".into(), json!(["ES256"]));
    });
    assert_eq!(
        validate(&not_string, &bundles),
        Err(JwtError::UnsupportedAlgorithm(r#"["ES256"]"#.into()))
    );
    let missing = forge_header(&key, |h| {
        h.remove("alg");
    });
    assert!(matches!(
        validate(&missing, &bundles),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn header_parameters_outside_the_spec_are_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    for name in ["jku", "jwk", "x5u", "crit", "cty"] {
        let token = forge_header(&key, |h| {
            h.insert(name.into(), json!("https://attacker.example/jwks"));
        });
        assert_eq!(
            validate(&token, &bundles),
            Err(JwtError::UnsupportedHeader(name.into()))
        );
    }
}

#[test]
fn typ_must_be_jwt_or_jose_when_present() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let jose = forge_header(&key, |h| {
        h.insert("typ".into(), json!("JOSE"));
    });
    assert!(validate(&jose, &bundles).is_ok());
    let absent = forge_header(&key, |h| {
        h.remove("typ");
    });
    assert!(validate(&absent, &bundles).is_ok());
    let at_jwt = forge_header(&key, |h| {
        h.insert("typ".into(), json!("at+jwt"));
    });
    assert_eq!(
        validate(&at_jwt, &bundles),
        Err(JwtError::UnsupportedType("at+jwt".into()))
    );
}

#[test]
fn subject_in_a_trust_domain_without_a_bundle_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let token = JwtSvid::mint(
        &key,
        &SpiffeId::parse("spiffe://other.org/web").unwrap(),
        &audience(),
        Duration::from_secs(60),
        now(),
    )
    .unwrap();
    // The key is trusted, but only for example.org: it cannot vouch for other.org.
    assert_eq!(
        validate(&token, &bundles_with(&[&key])),
        Err(JwtError::UnknownTrustDomain("other.org".into()))
    );
}

#[test]
fn missing_or_invalid_subject_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let cases = [
        forge_claims(&key, |c| {
            c.remove("sub");
        }),
        forge_claims(&key, |c| {
            c.insert("sub".into(), json!("web"));
        }),
        forge_claims(&key, |c| {
            c.insert("sub".into(), json!("spiffe://Example.org/web"));
        }),
        forge_claims(&key, |c| {
            c.insert("sub".into(), json!(42));
        }),
    ];
    for token in cases {
        let err = validate(&token, &bundles);
        assert!(matches!(err, Err(JwtError::BadSubject(_))), "{err:?}");
    }
    let missing = forge_claims(&key, |c| {
        c.remove("sub");
    });
    let err = validate(&missing, &bundles).unwrap_err();
    assert_eq!(err.to_string(), "bad jwt subject: `sub` claim is missing");
}

#[test]
fn missing_expiry_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let token = forge_claims(&key, |c| {
        c.remove("exp");
    });
    assert_eq!(
        validate(&token, &bundles_with(&[&key])),
        Err(JwtError::MissingExpiry)
    );
}

#[test]
fn expired_token_is_refused_after_the_leeway() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let token = mint(&key);
    let exp = 1_700_000_300;
    let within = now() + Duration::from_secs(300 + 29);
    assert!(JwtSvid::validate(&token, AUDIENCE, &bundles, within).is_ok());
    let after = now() + Duration::from_secs(300 + 30);
    assert_eq!(
        JwtSvid::validate(&token, AUDIENCE, &bundles, after),
        Err(JwtError::Expired {
            expiry: exp,
            now: exp + 30
        })
    );
}

#[test]
fn bad_expiry_values_are_malformed() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    for exp in [json!(-1), json!("1700000300"), json!(null), json!(1e300)] {
        let token = forge_claims(&key, |c| {
            c.insert("exp".into(), exp.clone());
        });
        let err = validate(&token, &bundles);
        assert!(matches!(err, Err(JwtError::Malformed(_))), "{exp}: {err:?}");
    }
    // Beyond what SystemTime can hold: refused, never a panic.
    let token = forge_claims(&key, |c| {
        c.insert("exp".into(), json!(u64::MAX));
    });
    let err = validate(&token, &bundles);
    assert!(matches!(err, Err(JwtError::Malformed(_))), "{err:?}");
}

#[test]
fn fractional_expiry_rounds_towards_refusal() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let token = forge_claims(&key, |c| {
        c.insert("exp".into(), json!(1_700_000_300.9));
    });
    let validated = validate(&token, &bundles).unwrap();
    assert_eq!(
        validated.expiry,
        UNIX_EPOCH + Duration::from_secs(1_700_000_300)
    );
    let at = now() + Duration::from_secs(330);
    assert!(matches!(
        JwtSvid::validate(&token, AUDIENCE, &bundles, at),
        Err(JwtError::Expired { .. })
    ));
}

#[test]
fn future_not_before_is_refused_after_the_leeway() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let soon = forge_claims(&key, |c| {
        c.insert("nbf".into(), json!(1_700_000_030));
    });
    assert!(validate(&soon, &bundles).is_ok());
    let later = forge_claims(&key, |c| {
        c.insert("nbf".into(), json!(1_700_000_031));
    });
    assert_eq!(
        validate(&later, &bundles),
        Err(JwtError::NotYetValid {
            not_before: 1_700_000_031,
            now: 1_700_000_000
        })
    );
    let fractional = forge_claims(&key, |c| {
        c.insert("nbf".into(), json!(1_700_000_030.5));
    });
    assert!(matches!(
        validate(&fractional, &bundles),
        Err(JwtError::NotYetValid { .. })
    ));
}

#[test]
fn wrong_audience_is_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let token = mint(&key);
    assert_eq!(
        JwtSvid::validate(&token, "spiffe://example.org/billing", &bundles, now()),
        Err(JwtError::WrongAudience {
            expected: "spiffe://example.org/billing".into(),
            found: audience(),
        })
    );
    // A prefix or case variant of the audience is a different audience.
    assert!(matches!(
        JwtSvid::validate(&token, "spiffe://example.org/report", &bundles, now()),
        Err(JwtError::WrongAudience { .. })
    ));
    let missing = forge_claims(&key, |c| {
        c.remove("aud");
    });
    assert_eq!(
        validate(&missing, &bundles),
        Err(JwtError::WrongAudience {
            expected: AUDIENCE.into(),
            found: vec![],
        })
    );
    let empty = forge_claims(&key, |c| {
        c.insert("aud".into(), json!([]));
    });
    assert!(matches!(
        validate(&empty, &bundles),
        Err(JwtError::WrongAudience { .. })
    ));
}

#[test]
fn audience_may_be_a_string_or_an_array() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let string = forge_claims(&key, |c| {
        c.insert("aud".into(), json!(AUDIENCE));
    });
    assert_eq!(validate(&string, &bundles).unwrap().audience, audience());
    let several = forge_claims(&key, |c| {
        c.insert("aud".into(), json!(["other", AUDIENCE]));
    });
    assert_eq!(validate(&several, &bundles).unwrap().audience.len(), 2);
    for aud in [json!(7), json!(["other", 7]), json!({"aud": AUDIENCE})] {
        let token = forge_claims(&key, |c| {
            c.insert("aud".into(), aud.clone());
        });
        let err = validate(&token, &bundles);
        assert!(matches!(err, Err(JwtError::Malformed(_))), "{aud}: {err:?}");
    }
}

#[test]
fn rotation_accepts_either_key_until_one_is_removed() {
    let old = JwtSigningKey::generate().unwrap();
    let new = JwtSigningKey::generate().unwrap();
    let mut bundles = bundles_with(&[&old, &new]);
    let old_token = mint(&old);
    let new_token = mint(&new);
    assert!(validate(&old_token, &bundles).is_ok());
    assert!(validate(&new_token, &bundles).is_ok());

    let removed = bundles.get_mut(&td()).unwrap().remove(old.kid());
    assert_eq!(removed, Some(old.public_jwk()));
    assert_eq!(
        validate(&old_token, &bundles),
        Err(JwtError::UnknownKey {
            kid: old.kid().into(),
            trust_domain: "example.org".into()
        })
    );
    assert!(validate(&new_token, &bundles).is_ok());
}

#[test]
fn malformed_tokens_are_refused() {
    let key = JwtSigningKey::generate().unwrap();
    let bundles = bundles_with(&[&key]);
    let token = mint(&key);
    let p = parts(&token);
    let not_json = URL_SAFE_NO_PAD.encode("not json");
    let array = URL_SAFE_NO_PAD.encode("[1,2]");
    let cases = [
        String::new(),
        "a.b".to_owned(),
        format!("{token}.extra"),
        format!("{}.{}", p[0], p[1]),
        format!("{}=.{}.{}", p[0], p[1], p[2]),
        format!("{}.{}+.{}", p[0], p[1], p[2]),
        format!("{not_json}.{}.{}", p[1], p[2]),
        format!("{array}.{}.{}", p[1], p[2]),
        format!("{}.{not_json}.{}", p[0], p[2]),
        format!("{}.{array}.{}", p[0], p[2]),
    ];
    for case in cases {
        let err = validate(&case, &bundles);
        assert!(
            matches!(err, Err(JwtError::Malformed(_))),
            "{case}: {err:?}"
        );
    }
}

#[test]
fn oversized_token_is_refused_before_parsing() {
    let key = JwtSigningKey::generate().unwrap();
    let token = "a".repeat(MAX_TOKEN_LEN + 1);
    assert_eq!(
        validate(&token, &bundles_with(&[&key])),
        Err(JwtError::TooLarge(MAX_TOKEN_LEN + 1))
    );
    assert_eq!(
        JwtSvid::parse_insecure(&token),
        Err(JwtError::TooLarge(MAX_TOKEN_LEN + 1))
    );
}

#[test]
fn parse_insecure_reads_unverified_tokens_only_for_display() {
    let key = JwtSigningKey::generate().unwrap();
    let p = parts(&mint(&key));
    let unsigned = format!("{}.{}.", p[0], p[1]);
    let unverified = JwtSvid::parse_insecure(&unsigned).unwrap();
    assert_eq!(unverified.header["kid"], json!(key.kid()));
    assert_eq!(unverified.claims["sub"], json!(workload().as_str()));
    assert!(matches!(
        JwtSvid::parse_insecure("x.y"),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn signing_key_pkcs8_round_trip() {
    let key = JwtSigningKey::generate().unwrap();
    assert_eq!(key.kid().len(), 32);
    assert!(key.kid().chars().all(|c| c.is_ascii_hexdigit()));
    let reloaded = JwtSigningKey::from_pkcs8_der(key.kid(), &key.to_pkcs8_der()).unwrap();
    assert_eq!(reloaded.public_jwk(), key.public_jwk());
    assert!(validate(&mint(&reloaded), &bundles_with(&[&key])).is_ok());
    assert_ne!(
        JwtSigningKey::generate().unwrap().kid(),
        key.kid(),
        "kids are random"
    );
}

#[test]
fn signing_key_refuses_bad_input() {
    let key = JwtSigningKey::generate().unwrap();
    assert!(matches!(
        JwtSigningKey::from_pkcs8_der("", &key.to_pkcs8_der()),
        Err(JwtError::BadSigningKey(_))
    ));
    assert!(matches!(
        JwtSigningKey::from_pkcs8_der("k", b"not a key"),
        Err(JwtError::BadSigningKey(_))
    ));
    let p384 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
        .unwrap();
    assert!(matches!(
        JwtSigningKey::from_pkcs8_der("k", p384.as_ref()),
        Err(JwtError::BadSigningKey(_))
    ));
}

#[test]
fn signing_key_debug_redacts_the_key() {
    let key = JwtSigningKey::generate().unwrap();
    let debug = format!("{key:?}");
    assert!(debug.contains(key.kid()), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(!debug.contains(&hex::encode(key.to_pkcs8_der())[..40]));
}

#[test]
fn errors_name_the_offending_value() {
    assert_eq!(
        JwtError::UnsupportedAlgorithm("none".into()).to_string(),
        "jwt algorithm `none` is not supported; only `ES256` is accepted"
    );
    assert_eq!(
        JwtError::UnknownTrustDomain("other.org".into()).to_string(),
        "no jwt bundle for trust domain `other.org`"
    );
}

proptest! {
    #[test]
    fn random_bytes_never_validate(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let key = JwtSigningKey::generate().unwrap();
        let bundles = bundles_with(&[&key]);
        let token = String::from_utf8_lossy(&bytes);
        prop_assert!(validate(&token, &bundles).is_err());
        let _ = JwtSvid::parse_insecure(&token);
    }

    #[test]
    fn random_base64_parts_never_validate(
        header in proptest::collection::vec(any::<u8>(), 0..120),
        claims in proptest::collection::vec(any::<u8>(), 0..200),
        signature in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let key = JwtSigningKey::generate().unwrap();
        let bundles = bundles_with(&[&key]);
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims),
            URL_SAFE_NO_PAD.encode(signature)
        );
        prop_assert!(validate(&token, &bundles).is_err());
    }

    #[test]
    fn any_one_character_change_to_a_valid_token_is_refused(
        index in any::<prop::sample::Index>(),
        replacement in prop::sample::select(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ".to_vec()
        ),
    ) {
        let key = JwtSigningKey::generate().unwrap();
        let bundles = bundles_with(&[&key]);
        let token = mint(&key);
        let mut bytes = token.clone().into_bytes();
        let i = index.index(bytes.len());
        prop_assume!(bytes[i] != replacement);
        bytes[i] = replacement;
        let tampered = String::from_utf8(bytes).unwrap();
        prop_assert!(validate(&tampered, &bundles).is_err(), "{} validated", tampered);
    }
}
