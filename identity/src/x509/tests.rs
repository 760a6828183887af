use rcgen::{KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};

use super::key::P256PublicKey;
use super::*;
use crate::test_util::TestPki;

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/a/sa/b";

fn pki() -> TestPki {
    TestPki::new(TD)
}

fn id() -> SpiffeId {
    SpiffeId::parse(ID).unwrap()
}

fn parse_err(chain: Vec<CertificateDer<'static>>) -> X509SvidError {
    X509Svid::parse_chain(chain).unwrap_err()
}

// --- X509Svid::parse_chain: the good case -------------------------------------------------------

#[test]
fn parses_a_test_pki_svid() {
    let pki = pki();
    let (svid, _key) = pki.svid(ID);
    let now = SystemTime::now();
    assert_eq!(svid.spiffe_id(), &id());
    assert_eq!(svid.chain().len(), 2);
    assert_eq!(svid.leaf(), &svid.chain()[0]);
    assert_eq!(svid.chain()[1], pki.intermediate_der());
    assert!(svid.not_before() < now && now < svid.not_after());
    assert!(svid.is_valid_at(now));
    assert!(svid.is_valid_at(svid.not_before()) && svid.is_valid_at(svid.not_after()));
    assert!(!svid.is_valid_at(svid.not_after() + Duration::from_secs(1)));
    assert!(!svid.is_valid_at(svid.not_before() - Duration::from_secs(1)));
    assert!(!svid.serial().is_empty());
    assert!(!svid.serial().starts_with("00"));
}

#[test]
fn debug_shows_identity_not_certificates() {
    let (svid, _) = pki().svid(ID);
    let debug = format!("{svid:?}");
    assert!(
        debug.contains(ID) && debug.contains(svid.serial()),
        "{debug}"
    );
    assert!(debug.len() < 300, "{debug}");
}

// --- X509Svid::parse_chain: every leaf rule -------------------------------------------------------

#[test]
fn empty_chain_is_refused() {
    assert_eq!(parse_err(Vec::new()), X509SvidError::EmptyChain);
}

#[test]
fn garbage_leaf_is_malformed() {
    let err = parse_err(vec![CertificateDer::from(vec![0x30, 0x01, 0x00])]);
    assert!(
        matches!(err, X509SvidError::Malformed { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn leaf_with_trailing_bytes_is_malformed() {
    let (svid, _) = pki().svid(ID);
    let mut leaf = svid.leaf().to_vec();
    leaf.push(0);
    let err = parse_err(vec![CertificateDer::from(leaf)]);
    assert!(
        matches!(&err, X509SvidError::Malformed { index: 0, reason } if reason.contains("trailing")),
        "{err:?}"
    );
}

#[test]
fn garbage_intermediate_is_malformed_with_its_index() {
    let (svid, _) = pki().svid(ID);
    let mut chain = svid.into_chain();
    chain.push(CertificateDer::from(vec![1, 2, 3]));
    let err = parse_err(chain);
    assert!(
        matches!(err, X509SvidError::Malformed { index: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn leaf_without_san_is_refused() {
    let (chain, _) = pki().leaf_without_san();
    assert_eq!(parse_err(chain), X509SvidError::NoUriSan);
}

#[test]
fn leaf_with_only_a_dns_san_is_refused() {
    let (chain, _) = pki().leaf_with_dns_san("web.example.org");
    assert_eq!(parse_err(chain), X509SvidError::NoUriSan);
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    let (chain, _) = pki().leaf_with_two_uri_sans(ID, "spiffe://example.org/ns/a/sa/c");
    assert_eq!(parse_err(chain), X509SvidError::MultipleUriSans(2));
}

#[test]
fn leaf_with_the_same_uri_san_twice_is_refused() {
    let (chain, _) = pki().leaf_with_two_uri_sans(ID, ID);
    assert_eq!(parse_err(chain), X509SvidError::MultipleUriSans(2));
}

#[test]
fn leaf_with_a_non_spiffe_uri_san_is_refused() {
    let (chain, _) = pki().leaf_with_uri_san("https://example.org/ns/a/sa/b");
    assert_eq!(
        parse_err(chain),
        X509SvidError::NotSpiffe("https://example.org/ns/a/sa/b".to_owned())
    );
}

#[test]
fn leaf_with_an_upper_case_scheme_is_not_spiffe() {
    let (chain, _) = pki().leaf_with_uri_san("SPIFFE://example.org/a");
    assert!(matches!(parse_err(chain), X509SvidError::NotSpiffe(_)));
}

#[test]
fn leaf_with_an_invalid_spiffe_id_is_refused() {
    for bad in [
        "spiffe://Example.org/a",
        "spiffe://example.org/a/",
        "spiffe://example.org/a/../b",
        "spiffe://example.org:8443/a",
        "spiffe:///a",
    ] {
        let (chain, _) = pki().leaf_with_uri_san(bad);
        match parse_err(chain) {
            X509SvidError::BadSpiffeId { uri, .. } => assert_eq!(uri, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn leaf_with_a_trust_domain_id_is_refused() {
    let (chain, _) = pki().leaf_with_uri_san("spiffe://example.org");
    assert_eq!(
        parse_err(chain),
        X509SvidError::LeafIdWithoutPath("spiffe://example.org".to_owned())
    );
}

#[test]
fn ca_certificate_as_leaf_is_refused() {
    let (chain, _) = pki().ca_as_leaf(ID);
    assert_eq!(parse_err(chain), X509SvidError::LeafIsCa);
}

#[test]
fn root_and_intermediate_are_not_svids() {
    let pki = pki();
    assert_eq!(parse_err(vec![pki.root_der()]), X509SvidError::LeafIsCa);
    assert_eq!(
        parse_err(vec![pki.intermediate_der()]),
        X509SvidError::LeafIsCa
    );
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    let (chain, _) = pki().leaf_without_digital_signature(ID);
    assert_eq!(parse_err(chain), X509SvidError::MissingDigitalSignature);
}

#[test]
fn leaf_without_key_usage_is_refused() {
    let (chain, _) = pki().leaf_without_key_usage(ID);
    assert_eq!(parse_err(chain), X509SvidError::MissingDigitalSignature);
}

#[test]
fn leaf_with_key_cert_sign_is_refused() {
    let (chain, _) = pki().leaf_with_key_cert_sign(ID);
    assert_eq!(
        parse_err(chain),
        X509SvidError::ForbiddenKeyUsage("keyCertSign")
    );
}

#[test]
fn leaf_with_crl_sign_is_refused() {
    let (chain, _) = pki().leaf_with_crl_sign(ID);
    assert_eq!(
        parse_err(chain),
        X509SvidError::ForbiddenKeyUsage("cRLSign")
    );
}

#[test]
fn error_messages_name_the_offending_value() {
    let (chain, _) = pki().leaf_with_uri_san("https://x.example/a");
    assert_eq!(
        parse_err(chain).to_string(),
        "uri san `https://x.example/a` is not a spiffe id"
    );
}

// --- spiffe_id_of -------------------------------------------------------------------------------

#[test]
fn spiffe_id_of_reads_leaves_and_signing_certificates() {
    let pki = pki();
    let (svid, _) = pki.svid(ID);
    assert_eq!(spiffe_id_of(svid.leaf()).unwrap(), id());
    assert_eq!(
        spiffe_id_of(&pki.root_der()).unwrap(),
        pki.trust_domain().id()
    );
    assert_eq!(
        spiffe_id_of(&pki.intermediate_der()).unwrap(),
        pki.trust_domain().id()
    );
}

#[test]
fn spiffe_id_of_refuses_what_parse_chain_refuses_about_sans() {
    let pki = pki();
    assert_eq!(
        spiffe_id_of(&pki.leaf_without_san().0[0]),
        Err(X509SvidError::NoUriSan)
    );
    assert_eq!(
        spiffe_id_of(&pki.leaf_with_two_uri_sans(ID, ID).0[0]),
        Err(X509SvidError::MultipleUriSans(2))
    );
    assert!(matches!(
        spiffe_id_of(&CertificateDer::from(vec![0u8; 4])),
        Err(X509SvidError::Malformed { .. })
    ));
}

// --- PEM ----------------------------------------------------------------------------------------

#[test]
fn pem_round_trips_a_chain() {
    let (svid, _) = pki().svid(ID);
    let pem = certs_to_pem(svid.chain());
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----\n").count(), 2);
    assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
    assert_eq!(certs_from_pem(&pem).unwrap(), svid.chain());
    assert_eq!(X509Svid::from_pem(&svid.to_pem()).unwrap(), svid);
}

#[test]
fn pem_skips_other_sections() {
    let (svid, key) = pki().svid(ID);
    let pem = format!("{}{}", key.to_pkcs8_pem(), svid.to_pem());
    assert_eq!(certs_from_pem(&pem).unwrap(), svid.chain());
}

#[test]
fn pem_without_certificates_is_refused() {
    assert_eq!(certs_from_pem(""), Err(PemError::NoCertificates));
    assert_eq!(certs_from_pem("hello"), Err(PemError::NoCertificates));
    let key = SvidKey::generate().unwrap();
    assert_eq!(
        certs_from_pem(&key.to_pkcs8_pem()),
        Err(PemError::NoCertificates)
    );
}

#[test]
fn pem_with_broken_base64_or_framing_is_refused() {
    let broken = "-----BEGIN CERTIFICATE-----\n!!!notbase64!!!\n-----END CERTIFICATE-----\n";
    assert!(matches!(certs_from_pem(broken), Err(PemError::Invalid(_))));
    let unterminated = "-----BEGIN CERTIFICATE-----\nMIIB\n";
    assert!(matches!(
        certs_from_pem(unterminated),
        Err(PemError::Invalid(_))
    ));
}

#[test]
fn svid_from_pem_reports_pem_and_svid_errors_apart() {
    assert_eq!(
        X509Svid::from_pem(""),
        Err(X509SvidPemError::Pem(PemError::NoCertificates))
    );
    let (chain, _) = pki().leaf_without_san();
    assert_eq!(
        X509Svid::from_pem(&certs_to_pem(&chain)),
        Err(X509SvidPemError::Svid(X509SvidError::NoUriSan))
    );
}

// --- SvidKey ------------------------------------------------------------------------------------

#[test]
fn key_round_trips_through_pkcs8_der_and_pem() {
    let key = SvidKey::generate().unwrap();
    let from_der = SvidKey::from_pkcs8_der(key.to_pkcs8_der().secret_pkcs8_der()).unwrap();
    assert_eq!(from_der.public_key_der(), key.public_key_der());
    let pem = key.to_pkcs8_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let from_pem = SvidKey::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(from_pem.public_key_der(), key.public_key_der());
    assert!(matches!(
        key.to_private_key_der(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(_)
    ));
}

#[test]
fn generated_keys_differ() {
    assert_ne!(
        SvidKey::generate().unwrap().public_key_der(),
        SvidKey::generate().unwrap().public_key_der()
    );
}

#[test]
fn public_key_der_is_p256_spki() {
    let key = SvidKey::generate().unwrap();
    let spki = key.public_key_der();
    let parsed = P256PublicKey::from_spki_der(&spki).unwrap();
    assert_eq!(parsed.point(), key.public_point());
    assert_eq!(parsed.to_spki_der(), spki);
}

#[test]
fn non_p256_private_keys_are_refused() {
    for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
        let other = KeyPair::generate_for(alg).unwrap();
        assert!(matches!(
            SvidKey::from_pkcs8_der(&other.serialize_der()),
            Err(KeyError::InvalidPrivateKey(_))
        ));
    }
}

#[test]
fn garbage_private_keys_are_refused() {
    assert!(matches!(
        SvidKey::from_pkcs8_der(&[]),
        Err(KeyError::InvalidPrivateKey(_))
    ));
    assert!(matches!(
        SvidKey::from_pkcs8_der(&[0x30, 0x03, 0x02, 0x01, 0x00]),
        Err(KeyError::InvalidPrivateKey(_))
    ));
    assert!(matches!(
        SvidKey::from_pkcs8_pem("nope"),
        Err(KeyError::InvalidPrivateKey(_))
    ));
    let (svid, _) = pki().svid(ID);
    assert!(matches!(
        SvidKey::from_pkcs8_pem(&svid.to_pem()),
        Err(KeyError::InvalidPrivateKey(_))
    ));
}

#[test]
fn key_debug_is_redacted() {
    let key = SvidKey::generate().unwrap();
    let debug = format!("{key:?}");
    assert!(debug.contains("redacted"));
    let der = key.to_pkcs8_der();
    let hex_key = hex::encode(der.secret_pkcs8_der());
    assert!(!debug.contains(&hex_key[hex_key.len() - 16..]));
    assert!(!debug.contains(&format!("{:?}", &der.secret_pkcs8_der()[40..48])));
}

// --- small helpers ------------------------------------------------------------------------------

#[test]
fn serial_hex_strips_leading_zeros() {
    assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
    assert_eq!(serial_hex(&[0x7f]), "7f");
    assert_eq!(serial_hex(&[0x00]), "0");
    assert_eq!(serial_hex(&[]), "0");
}

#[test]
fn certificate_times_before_the_epoch_convert() {
    assert_eq!(asn1_to_system(-10), UNIX_EPOCH - Duration::from_secs(10));
    assert_eq!(asn1_to_system(10), UNIX_EPOCH + Duration::from_secs(10));
}

#[test]
fn ttl_constants_are_the_designed_ones() {
    assert_eq!(DEFAULT_SVID_TTL, Duration::from_secs(3600));
    assert_eq!(MIN_SVID_TTL, Duration::from_secs(30));
    assert_eq!(MAX_SVID_TTL, Duration::from_secs(86_400));
    assert!(MIN_SVID_TTL <= DEFAULT_SVID_TTL && DEFAULT_SVID_TTL <= MAX_SVID_TTL);
}
