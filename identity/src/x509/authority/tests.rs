use std::collections::BTreeSet;

use rcgen::{CustomExtension, KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData};
use rustls_pki_types::UnixTime;
use x509_parser::prelude::{GeneralName, ParsedExtension};

use super::*;
use crate::test_util::TestPki;
use crate::x509::{DEFAULT_SVID_TTL, X509Svid, make_csr, verify_csr};

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/a/sa/b";

// OIDs of the extensions a leaf SVID is allowed to carry.
const OID_SAN: &str = "2.5.29.17";
const OID_BC: &str = "2.5.29.19";
const OID_KU: &str = "2.5.29.15";
const OID_EKU: &str = "2.5.29.37";
const OID_SKI: &str = "2.5.29.14";
const OID_AKI: &str = "2.5.29.35";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn id() -> SpiffeId {
    SpiffeId::parse(ID).unwrap()
}

/// A fixed clock with a sub-second part, to check truncation to whole seconds.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_750)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn root() -> Authority {
    Authority::new_root(&td(), secs(30 * 24 * 3600), t0()).unwrap()
}

fn intermediate_of(root: &Authority, ttl: Duration, now: SystemTime) -> Authority {
    let key = SvidKey::generate().unwrap();
    let signed = root
        .sign_intermediate(&key.public_key_der(), ttl, now)
        .unwrap();
    Authority::from_parts(vec![signed.cert], key).unwrap()
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    X509Certificate::from_der(der.as_ref()).unwrap().1
}

fn extension_oids(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    cert.extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect()
}

fn extension<'a>(
    cert: &'a X509Certificate<'_>,
    oid: &str,
) -> &'a x509_parser::extensions::X509Extension<'a> {
    cert.extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .unwrap_or_else(|| panic!("extension {oid} missing"))
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_owned(),
            other => panic!("unexpected san {other:?}"),
        })
        .collect()
}

fn sign(authority: &Authority) -> SignedSvid {
    let key = SvidKey::generate().unwrap();
    authority
        .sign_svid(&key.public_key_der(), &id(), DEFAULT_SVID_TTL, t0())
        .unwrap()
}

// --- root and intermediate templates ------------------------------------------------------------

#[test]
fn root_is_a_self_signed_ca_for_the_trust_domain_id() {
    let root = root();
    let cert = parse(root.certificate());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, None);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign());
    assert!(ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(uris(&cert), vec!["spiffe://example.org".to_owned()]);
    assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
    cert.verify_signature(None).unwrap();
    assert!(root.is_root());
    assert_eq!(root.trust_domain(), &td());
    assert_eq!(root.chain(), [root.certificate().clone()].as_slice());
}

#[test]
fn root_validity_is_backdated_and_whole_seconds() {
    let root = root();
    let start = UNIX_EPOCH + secs(1_700_000_000 - 30);
    assert_eq!(root.not_before(), start);
    assert_eq!(
        root.not_after(),
        UNIX_EPOCH + secs(1_700_000_000 + 30 * 24 * 3600)
    );
    let cert = parse(root.certificate());
    assert_eq!(cert.validity().not_before.timestamp(), 1_700_000_000 - 30);
}

#[test]
fn roots_get_distinct_names_and_serials() {
    let (a, b) = (root(), root());
    let (ca, cb) = (parse(a.certificate()), parse(b.certificate()));
    assert_ne!(ca.subject().as_raw(), cb.subject().as_raw());
    assert_ne!(ca.raw_serial(), cb.raw_serial());
}

#[test]
fn intermediate_is_a_ca_for_the_trust_domain_id_signed_by_the_root() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let cert = parse(inter.certificate());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert_eq!(uris(&cert), vec!["spiffe://example.org".to_owned()]);
    let root_cert = parse(root.certificate());
    cert.verify_signature(Some(root_cert.public_key())).unwrap();
    assert_eq!(cert.issuer().as_raw(), root_cert.subject().as_raw());
    // The intermediate's AKI names the root's SKI, so path builders can match keys, not just names.
    let aki = match extension(&cert, OID_AKI).parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    let ski = match extension(&root_cert, OID_SKI).parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(ski) => ski.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(aki.0, ski.0);
    assert!(!inter.is_root());
    assert_eq!(inter.trust_domain(), &td());
}

#[test]
fn intermediate_lifetime_is_clamped_to_the_root() {
    let root = Authority::new_root(&td(), secs(3600), t0()).unwrap();
    let inter = intermediate_of(&root, secs(365 * 24 * 3600), t0());
    assert_eq!(inter.not_after(), root.not_after());
}

#[test]
fn intermediate_with_path_len_zero_cannot_sign_intermediates() {
    let root = root();
    let inter = intermediate_of(&root, secs(3600), t0());
    let key = SvidKey::generate().unwrap();
    assert_eq!(
        inter
            .sign_intermediate(&key.public_key_der(), secs(3600), t0())
            .unwrap_err(),
        AuthorityError::PathLenExhausted
    );
}

#[test]
fn authority_ttl_bounds_are_enforced() {
    assert!(matches!(
        Authority::new_root(&td(), secs(29), t0()),
        Err(AuthorityError::TtlOutOfBounds { .. })
    ));
    assert!(matches!(
        Authority::new_root(&td(), MAX_AUTHORITY_TTL + secs(1), t0()),
        Err(AuthorityError::TtlOutOfBounds { .. })
    ));
    let root = root();
    let key = SvidKey::generate().unwrap();
    assert!(matches!(
        root.sign_intermediate(&key.public_key_der(), secs(1), t0()),
        Err(AuthorityError::TtlOutOfBounds { .. })
    ));
}

#[test]
fn root_before_the_epoch_is_refused() {
    let before = UNIX_EPOCH - secs(10);
    assert_eq!(
        Authority::new_root(&td(), secs(3600), before).unwrap_err(),
        AuthorityError::BadTime(before)
    );
}

// --- sign_svid: the leaf template -----------------------------------------------------------------

#[test]
fn svid_has_exactly_the_spiffe_leaf_extensions() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let signed = sign(&inter);
    let cert = parse(&signed.leaf);

    let expected: BTreeSet<String> = [OID_SAN, OID_BC, OID_KU, OID_EKU, OID_SKI, OID_AKI]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(extension_oids(&cert), expected);

    // One URI SAN, and nothing else in the SAN; critical because the subject is empty (RFC 5280 §4.2.1.6).
    assert_eq!(uris(&cert), vec![ID.to_owned()]);
    assert!(extension(&cert, OID_SAN).critical);
    assert_eq!(cert.subject().iter().count(), 0);

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(!bc.value.ca);

    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());
    assert!(!ku.value.key_encipherment());
    assert!(!ku.value.non_repudiation());

    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth);
    assert!(eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing && !eku.value.email_protection);
    assert!(!eku.value.time_stamping && !eku.value.ocsp_signing);
    assert!(eku.value.other.is_empty());

    // The key is the requester's, P-256.
    assert_eq!(
        crate::x509::key::spki_algorithm_name(cert.public_key()),
        "ecdsa p-256"
    );
}

#[test]
fn svid_is_signed_by_the_authority_and_names_it_as_issuer() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let signed = sign(&inter);
    let cert = parse(&signed.leaf);
    let inter_cert = parse(inter.certificate());
    cert.verify_signature(Some(inter_cert.public_key()))
        .unwrap();
    assert_eq!(cert.issuer().as_raw(), inter_cert.subject().as_raw());
    assert!(
        cert.verify_signature(Some(parse(root.certificate()).public_key()))
            .is_err()
    );
}

#[test]
fn svid_chain_is_leaf_plus_intermediate_without_root() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let signed = sign(&inter);
    assert_eq!(
        signed.chain,
        vec![signed.leaf.clone(), inter.certificate().clone()]
    );
}

#[test]
fn svid_signed_by_a_root_is_the_leaf_alone() {
    let signed = sign(&root());
    assert_eq!(signed.chain, vec![signed.leaf.clone()]);
}

#[test]
fn svid_chain_verifies_with_webpki_for_server_and_client_auth() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let signed = sign(&inter);
    let anchor = webpki::anchor_from_trusted_cert(root.certificate()).unwrap();
    let ee = webpki::EndEntityCert::try_from(&signed.leaf).unwrap();
    let at = UnixTime::since_unix_epoch(t0().duration_since(UNIX_EPOCH).unwrap());
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            std::slice::from_ref(&anchor),
            &signed.chain[1..],
            at,
            usage,
            None,
            None,
        )
        .unwrap();
    }
}

#[test]
fn svid_facts_match_what_the_parser_reads_back() {
    let root = root();
    let inter = intermediate_of(&root, secs(24 * 3600), t0());
    let signed = sign(&inter);
    let svid = X509Svid::parse_chain(signed.chain.clone()).unwrap();
    assert_eq!(svid.spiffe_id(), &id());
    assert_eq!(svid.serial(), signed.serial);
    assert_eq!(svid.not_before(), signed.not_before);
    assert_eq!(svid.not_after(), signed.not_after);
    assert_eq!(signed.spiffe_id, id());
}

#[test]
fn svid_not_before_is_backdated_30s_and_not_after_is_now_plus_ttl() {
    let root = root();
    // Sign a day after the root was made, so the root's own start does not clamp the leaf.
    let now = t0() + secs(24 * 3600);
    let key = SvidKey::generate().unwrap();
    let signed = root
        .sign_svid(&key.public_key_der(), &id(), secs(600), now)
        .unwrap();
    let whole_now = UNIX_EPOCH + secs(1_700_000_000 + 24 * 3600);
    assert_eq!(signed.not_before, whole_now - NOT_BEFORE_BACKDATE);
    assert_eq!(signed.not_after, whole_now + secs(600));
    let cert = parse(&signed.leaf);
    assert_eq!(
        cert.validity().not_before.timestamp(),
        1_700_000_000 + 24 * 3600 - 30
    );
    assert_eq!(
        cert.validity().not_after.timestamp(),
        1_700_000_000 + 24 * 3600 + 600
    );
}

#[test]
fn svid_not_before_never_precedes_the_authority() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    // Ten seconds before the root's own notBefore (clock skew between CA replicas).
    let now = root.not_before() - secs(10);
    let signed = root
        .sign_svid(&key.public_key_der(), &id(), secs(600), now)
        .unwrap();
    assert_eq!(signed.not_before, root.not_before());
}

#[test]
fn svid_that_would_end_before_the_authority_starts_is_refused() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let now = root.not_before() - secs(3600);
    assert_eq!(
        root.sign_svid(&key.public_key_der(), &id(), secs(600), now)
            .unwrap_err(),
        AuthorityError::NotYetValid(root.not_before())
    );
}

#[test]
fn svid_not_after_is_clamped_to_the_authority() {
    let root = Authority::new_root(&td(), secs(600), t0()).unwrap();
    let key = SvidKey::generate().unwrap();
    let signed = root
        .sign_svid(&key.public_key_der(), &id(), MAX_SVID_TTL, t0())
        .unwrap();
    assert_eq!(signed.not_after, root.not_after());
    assert_eq!(
        parse(&signed.leaf).validity().not_after.timestamp(),
        1_700_000_000 + 600
    );
}

#[test]
fn svid_from_an_expired_authority_is_refused() {
    let root = Authority::new_root(&td(), secs(600), t0()).unwrap();
    let key = SvidKey::generate().unwrap();
    for now in [root.not_after(), root.not_after() + secs(1)] {
        assert_eq!(
            root.sign_svid(&key.public_key_der(), &id(), secs(60), now)
                .unwrap_err(),
            AuthorityError::Expired(root.not_after())
        );
    }
}

#[test]
fn svid_ttl_bounds_are_inclusive() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    for ttl in [MIN_SVID_TTL, DEFAULT_SVID_TTL, MAX_SVID_TTL] {
        root.sign_svid(&key.public_key_der(), &id(), ttl, t0())
            .unwrap();
    }
    for ttl in [
        Duration::ZERO,
        MIN_SVID_TTL - Duration::from_millis(1),
        MAX_SVID_TTL + Duration::from_millis(1),
    ] {
        assert_eq!(
            root.sign_svid(&key.public_key_der(), &id(), ttl, t0())
                .unwrap_err(),
            AuthorityError::TtlOutOfBounds {
                ttl,
                min: MIN_SVID_TTL,
                max: MAX_SVID_TTL
            }
        );
    }
}

#[test]
fn svid_outside_the_trust_domain_is_refused() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let other = SpiffeId::parse("spiffe://evil.org/ns/a/sa/b").unwrap();
    let err = root
        .sign_svid(&key.public_key_der(), &other, DEFAULT_SVID_TTL, t0())
        .unwrap_err();
    assert_eq!(
        err,
        AuthorityError::OutsideTrustDomain {
            id: other.to_string(),
            trust_domain: TD.to_owned()
        }
    );
    // A trust domain that merely starts with ours is another trust domain.
    let lookalike = SpiffeId::parse("spiffe://example.org.evil/ns/a").unwrap();
    assert!(matches!(
        root.sign_svid(&key.public_key_der(), &lookalike, DEFAULT_SVID_TTL, t0()),
        Err(AuthorityError::OutsideTrustDomain { .. })
    ));
}

#[test]
fn svid_for_the_trust_domain_id_itself_is_refused() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    assert_eq!(
        root.sign_svid(&key.public_key_der(), &td().id(), DEFAULT_SVID_TTL, t0())
            .unwrap_err(),
        AuthorityError::TrustDomainIdAsLeaf("spiffe://example.org".to_owned())
    );
}

#[test]
fn svid_for_a_non_p256_key_is_refused_by_name() {
    let root = root();
    for (alg, name) in [
        (&PKCS_ECDSA_P384_SHA384, "ecdsa p-384"),
        (&PKCS_ED25519, "ed25519"),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let err = root
            .sign_svid(
                &key.subject_public_key_info(),
                &id(),
                DEFAULT_SVID_TTL,
                t0(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            AuthorityError::Key(KeyError::UnsupportedAlgorithm {
                algorithm: name.to_owned()
            })
        );
    }
}

#[test]
fn svid_for_a_malformed_public_key_is_refused() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let mut spki = key.public_key_der();
    for bad in [vec![], vec![0x30, 0x00], spki[..40].to_vec()] {
        assert!(matches!(
            root.sign_svid(&bad, &id(), DEFAULT_SVID_TTL, t0()),
            Err(AuthorityError::Key(KeyError::MalformedPublicKey(_)))
        ));
    }
    // A P-256 SPKI whose point is not uncompressed.
    spki[26] = 0x05;
    assert!(matches!(
        root.sign_svid(&spki, &id(), DEFAULT_SVID_TTL, t0()),
        Err(AuthorityError::Key(KeyError::MalformedPublicKey(_)))
    ));
}

#[test]
fn svid_serials_are_random_positive_and_at_most_128_bits() {
    let root = root();
    let serials: BTreeSet<String> = (0..20).map(|_| sign(&root).serial).collect();
    assert_eq!(serials.len(), 20);
    for serial in &serials {
        assert!(serial.len() <= 32, "{serial}");
        assert!(
            serial
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
    let cert_signed = sign(&root);
    let cert = parse(&cert_signed.leaf);
    assert!(cert.tbs_certificate.serial.bits() <= 128);
    assert!(cert.tbs_certificate.serial > 0u8.into());
}

// --- the CA ignores what a CSR asks for -----------------------------------------------------------

#[test]
fn issued_svid_carries_none_of_the_csr_extensions() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(ID.try_into().unwrap()),
        SanType::DnsName("evil.example.org".try_into().unwrap()),
        SanType::Rfc822Name("admin@example.org".try_into().unwrap()),
    ];
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 2, 3, 4],
        vec![0x05, 0x00],
    )];
    let csr_der = params.serialize_request(&key).unwrap().der().to_vec();
    let csr = verify_csr(&csr_der).unwrap();
    csr.check_for(&id()).unwrap();

    let signed = root
        .sign_svid(&csr.public_key_der, &id(), DEFAULT_SVID_TTL, t0())
        .unwrap();
    let cert = parse(&signed.leaf);
    assert!(!extension_oids(&cert).contains("1.2.3.4"));
    assert_eq!(cert.subject().iter().count(), 0);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(ID)]);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(!eku.value.code_signing);
    assert!(eku.value.server_auth && eku.value.client_auth);
}

#[test]
fn even_a_csr_asking_for_ca_yields_a_non_ca_leaf() {
    // check_for refuses such a CSR; should a caller skip it, the template still decides.
    let root = root();
    let key = SvidKey::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = verify_csr(params.serialize_request(&key).unwrap().der()).unwrap();
    assert!(csr.requests_ca);
    let signed = root
        .sign_svid(&csr.public_key_der, &id(), DEFAULT_SVID_TTL, t0())
        .unwrap();
    assert!(
        !parse(&signed.leaf)
            .basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .ca
    );
}

#[test]
fn make_csr_then_sign_round_trip() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&make_csr(&key, &id()).unwrap()).unwrap();
    csr.check_for(&id()).unwrap();
    let signed = root
        .sign_svid(&csr.public_key_der, &id(), DEFAULT_SVID_TTL, t0())
        .unwrap();
    assert_eq!(
        parse(&signed.leaf)
            .public_key()
            .subject_public_key
            .data
            .as_ref(),
        key.public_point()
    );
}

#[test]
fn debug_output_redacts_the_key() {
    let root = root();
    let debug = format!("{root:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    let pem = root.key().to_pkcs8_pem();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!debug.contains(&body[..20]));
}

mod from_parts;
