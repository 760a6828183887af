use rcgen::{
    Attribute, BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    SanType,
};

use super::*;
use crate::x509::key::KeyError;

const ID: &str = "spiffe://example.org/ns/a/sa/b";

fn id() -> SpiffeId {
    SpiffeId::parse(ID).unwrap()
}

/// A CSR made by rcgen from `params` and `key` (any algorithm), to test what other clients might send.
fn csr_from(params: &CertificateParams, key: &impl rcgen::SigningKey) -> Vec<u8> {
    params.serialize_request(key).unwrap().der().to_vec()
}

fn params_with_sans(sans: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    params
}

/// Minimal DER writer for hand-made inputs rcgen refuses to produce.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// A structurally valid CSR with an RSA-2048 key and a junk signature (ring cannot make RSA keys; the
/// key algorithm is refused before the signature is looked at).
fn rsa_csr() -> Vec<u8> {
    let rsa_oid = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let sha256_rsa_oid = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
    ];
    let mut modulus = vec![0x00];
    modulus.extend([0xc3; 256]);
    let rsa_key = tlv(
        0x30,
        &[tlv(0x02, &modulus), tlv(0x02, &[0x01, 0x00, 0x01])].concat(),
    );
    let spki = tlv(
        0x30,
        &[
            tlv(0x30, &[rsa_oid.as_slice(), &[0x05, 0x00]].concat()),
            tlv(0x03, &[&[0x00], rsa_key.as_slice()].concat()),
        ]
        .concat(),
    );
    let info = tlv(
        0x30,
        &[tlv(0x02, &[0x00]), tlv(0x30, &[]), spki, tlv(0xa0, &[])].concat(),
    );
    let sig_alg = tlv(0x30, &[sha256_rsa_oid.as_slice(), &[0x05, 0x00]].concat());
    let sig = tlv(0x03, &[&[0x00], [0x5a; 256].as_slice()].concat());
    tlv(0x30, &[info, sig_alg, sig].concat())
}

fn replace_once(haystack: &mut [u8], needle: &[u8], with: &[u8]) {
    assert_eq!(needle.len(), with.len());
    let at = haystack
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("needle present");
    haystack[at..at + needle.len()].copy_from_slice(with);
}

// --- make_csr / verify_csr round trip -----------------------------------------------------------

#[test]
fn make_csr_round_trips_through_verify_csr() {
    let key = SvidKey::generate().unwrap();
    let der = make_csr(&key, &id()).unwrap();
    let csr = verify_csr(&der).unwrap();
    assert_eq!(csr.requested_uris, vec![ID.to_owned()]);
    assert!(!csr.requests_ca);
    assert_eq!(csr.public_key_der, key.public_key_der());
    csr.check_for(&id()).unwrap();
}

#[test]
fn make_csr_sends_no_subject() {
    let key = SvidKey::generate().unwrap();
    let der = make_csr(&key, &id()).unwrap();
    let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
    assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
}

#[test]
fn csr_without_extensions_is_fine() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(&params_with_sans(&[]), &key)).unwrap();
    assert!(csr.requested_uris.is_empty());
    assert!(!csr.requests_ca);
    csr.check_for(&id()).unwrap();
}

#[test]
fn csr_with_only_dns_san_is_fine_and_reports_no_uri() {
    let key = SvidKey::generate().unwrap();
    let mut params = params_with_sans(&[]);
    params.subject_alt_names = vec![SanType::DnsName("web.example.org".try_into().unwrap())];
    let csr = verify_csr(&csr_from(&params, &key)).unwrap();
    assert!(csr.requested_uris.is_empty());
    csr.check_for(&id()).unwrap();
}

#[test]
fn csr_asking_explicitly_for_ca_false_is_fine() {
    let key = SvidKey::generate().unwrap();
    let mut params = params_with_sans(&[ID]);
    params.is_ca = IsCa::ExplicitNoCa;
    let csr = verify_csr(&csr_from(&params, &key)).unwrap();
    assert!(!csr.requests_ca);
    csr.check_for(&id()).unwrap();
}

#[test]
fn public_key_is_normalized_spki_of_the_csr_key() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(&params_with_sans(&[ID]), &key)).unwrap();
    assert_eq!(csr.public_key_der, key.public_key_der());
    assert_eq!(csr.public_key_der.len(), 91);
}

// --- verify_csr refusals ------------------------------------------------------------------------

#[test]
fn oversized_csr_is_refused_before_parsing() {
    let err = verify_csr(&vec![0x30; MAX_CSR_LEN + 1]).unwrap_err();
    assert_eq!(
        err,
        CsrError::TooLarge {
            len: MAX_CSR_LEN + 1,
            max: MAX_CSR_LEN
        }
    );
    assert!(err.to_string().contains("65536"), "{err}");
}

#[test]
fn csr_at_the_size_limit_is_parsed_not_refused_for_size() {
    let err = verify_csr(&vec![0x30; MAX_CSR_LEN]).unwrap_err();
    assert!(matches!(err, CsrError::Malformed(_)), "{err:?}");
}

#[test]
fn empty_input_is_malformed() {
    assert!(matches!(verify_csr(&[]), Err(CsrError::Malformed(_))));
}

#[test]
fn garbage_is_malformed() {
    assert!(matches!(
        verify_csr(b"-----BEGIN CERTIFICATE REQUEST-----"),
        Err(CsrError::Malformed(_))
    ));
}

#[test]
fn truncated_csr_is_malformed() {
    let key = SvidKey::generate().unwrap();
    let der = make_csr(&key, &id()).unwrap();
    let err = verify_csr(&der[..der.len() - 10]).unwrap_err();
    assert!(matches!(err, CsrError::Malformed(_)), "{err:?}");
}

#[test]
fn trailing_bytes_are_refused() {
    let key = SvidKey::generate().unwrap();
    let mut der = make_csr(&key, &id()).unwrap();
    der.extend([0, 0]);
    let err = verify_csr(&der).unwrap_err();
    assert!(
        matches!(&err, CsrError::Malformed(m) if m.contains("trailing")),
        "{err:?}"
    );
}

#[test]
fn rsa_key_is_refused_by_name() {
    let err = verify_csr(&rsa_csr()).unwrap_err();
    assert_eq!(
        err,
        CsrError::Key(KeyError::UnsupportedAlgorithm {
            algorithm: "rsa".to_owned()
        })
    );
    assert!(err.to_string().contains("`rsa`"), "{err}");
}

#[test]
fn p384_key_is_refused_by_name() {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let err = verify_csr(&csr_from(&params_with_sans(&[ID]), &key)).unwrap_err();
    assert_eq!(
        err,
        CsrError::Key(KeyError::UnsupportedAlgorithm {
            algorithm: "ecdsa p-384".to_owned()
        })
    );
}

#[test]
fn ed25519_key_is_refused_by_name() {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let err = verify_csr(&csr_from(&params_with_sans(&[ID]), &key)).unwrap_err();
    assert_eq!(
        err,
        CsrError::Key(KeyError::UnsupportedAlgorithm {
            algorithm: "ed25519".to_owned()
        })
    );
}

#[test]
fn flipped_signature_byte_is_refused() {
    let key = SvidKey::generate().unwrap();
    let mut der = make_csr(&key, &id()).unwrap();
    *der.last_mut().unwrap() ^= 0x01;
    assert_eq!(verify_csr(&der), Err(CsrError::BadSignature));
}

#[test]
fn tampered_san_is_refused() {
    // Someone rewrites the requested identity after signing: the signature no longer covers it.
    let key = SvidKey::generate().unwrap();
    let mut der = make_csr(&key, &id()).unwrap();
    replace_once(&mut der, b"sa/b", b"sa/c");
    assert_eq!(verify_csr(&der), Err(CsrError::BadSignature));
}

#[test]
fn key_swapped_for_another_is_refused() {
    // The SPKI replaced with someone else's key: proof of possession fails.
    let key = SvidKey::generate().unwrap();
    let other = SvidKey::generate().unwrap();
    let mut der = make_csr(&key, &id()).unwrap();
    replace_once(&mut der, key.public_point(), other.public_point());
    assert_eq!(verify_csr(&der), Err(CsrError::BadSignature));
}

#[test]
fn signature_algorithm_other_than_ecdsa_sha256_is_refused() {
    let key = SvidKey::generate().unwrap();
    let mut der = make_csr(&key, &id()).unwrap();
    // ecdsa-with-SHA256 (1.2.840.10045.4.3.2) -> ecdsa-with-SHA384 (...4.3.3), in the outer AlgorithmIdentifier.
    let sha256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    let sha384 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    replace_once(&mut der, &sha256, &sha384);
    assert_eq!(
        verify_csr(&der),
        Err(CsrError::UnsupportedSignatureAlgorithm(
            "1.2.840.10045.4.3.3".to_owned()
        ))
    );
}

#[test]
fn unparsable_requested_san_is_refused() {
    let key = SvidKey::generate().unwrap();
    let mut params = params_with_sans(&[]);
    // subjectAltName whose value is an OCTET STRING instead of a SEQUENCE of GeneralNames.
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        vec![0x04, 0x01, 0x00],
    )];
    let err = verify_csr(&csr_from(&params, &key)).unwrap_err();
    assert!(matches!(err, CsrError::Malformed(_)), "{err:?}");
}

// --- what the CSR asks for, and check_for -------------------------------------------------------

#[test]
fn csr_asking_for_ca_is_reported_and_refused() {
    let key = SvidKey::generate().unwrap();
    let mut params = params_with_sans(&[ID]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = verify_csr(&csr_from(&params, &key)).unwrap();
    assert!(csr.requests_ca);
    assert_eq!(csr.check_for(&id()), Err(CsrError::RequestsCa));
}

#[test]
fn ca_request_hidden_in_a_second_extension_request_attribute_is_seen() {
    let key = SvidKey::generate().unwrap();
    // SET { SEQUENCE OF Extension { basicConstraints, critical, SEQUENCE { cA TRUE } } }
    let basic_constraints_ca = [
        0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x05, 0x30, 0x03, 0x01,
        0x01, 0xff,
    ];
    let values = tlv(0x31, &tlv(0x30, &basic_constraints_ca));
    let attr = Attribute {
        oid: &[1, 2, 840, 113_549, 1, 9, 14],
        values,
    };
    // The first extensionRequest (the SAN) comes from the params, the second from `attr`.
    let der = params_with_sans(&[ID])
        .serialize_request_with_attributes(&key, vec![attr])
        .unwrap()
        .der()
        .to_vec();
    let csr = verify_csr(&der).unwrap();
    assert_eq!(csr.requested_uris, vec![ID.to_owned()]);
    assert!(csr.requests_ca);
    assert_eq!(csr.check_for(&id()), Err(CsrError::RequestsCa));
}

#[test]
fn two_uri_sans_are_refused() {
    let key = SvidKey::generate().unwrap();
    let other = "spiffe://example.org/ns/a/sa/admin";
    let csr = verify_csr(&csr_from(&params_with_sans(&[ID, other]), &key)).unwrap();
    assert_eq!(csr.requested_uris, vec![ID.to_owned(), other.to_owned()]);
    let err = csr.check_for(&id()).unwrap_err();
    assert_eq!(
        err,
        CsrError::MultipleUriSans(vec![ID.to_owned(), other.to_owned()])
    );
    assert!(err.to_string().contains("`2` uri sans"), "{err}");
}

#[test]
fn two_copies_of_the_same_uri_san_are_refused() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(&params_with_sans(&[ID, ID]), &key)).unwrap();
    assert!(matches!(
        csr.check_for(&id()),
        Err(CsrError::MultipleUriSans(_))
    ));
}

#[test]
fn uri_san_for_another_identity_is_refused() {
    // Consul CVE-2022-40716: the entitlement says sa/b, the CSR asks for sa/admin.
    let key = SvidKey::generate().unwrap();
    let der = make_csr(
        &key,
        &SpiffeId::parse("spiffe://example.org/ns/a/sa/admin").unwrap(),
    )
    .unwrap();
    let err = verify_csr(&der).unwrap().check_for(&id()).unwrap_err();
    assert_eq!(
        err,
        CsrError::IdMismatch {
            requested: "spiffe://example.org/ns/a/sa/admin".to_owned(),
            entitled: ID.to_owned(),
        }
    );
}

#[test]
fn uri_san_in_another_trust_domain_is_refused() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(
        &params_with_sans(&["spiffe://evil.org/ns/a/sa/b"]),
        &key,
    ))
    .unwrap();
    assert!(matches!(
        csr.check_for(&id()),
        Err(CsrError::IdMismatch { .. })
    ));
}

#[test]
fn uri_san_differing_only_in_case_is_refused() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(
        &params_with_sans(&["spiffe://example.org/ns/a/sa/B"]),
        &key,
    ))
    .unwrap();
    assert!(matches!(
        csr.check_for(&id()),
        Err(CsrError::IdMismatch { .. })
    ));
}

#[test]
fn non_spiffe_uri_san_is_refused() {
    let key = SvidKey::generate().unwrap();
    let csr = verify_csr(&csr_from(
        &params_with_sans(&["https://example.org/ns/a/sa/b"]),
        &key,
    ))
    .unwrap();
    assert!(matches!(
        csr.check_for(&id()),
        Err(CsrError::IdMismatch { .. })
    ));
}

#[test]
fn other_requested_extensions_are_reported_as_nothing_and_accepted() {
    // Key usages, EKUs, DNS names, a subject and unknown extensions are not refused: the CA ignores
    // them (the authority tests check the issued certificate carries none of them).
    let key = SvidKey::generate().unwrap();
    let mut params = params_with_sans(&[ID]);
    params
        .subject_alt_names
        .push(SanType::DnsName("evil.example.org".try_into().unwrap()));
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 2, 3, 4],
        vec![0x05, 0x00],
    )];
    let csr = verify_csr(&csr_from(&params, &key)).unwrap();
    assert_eq!(csr.requested_uris, vec![ID.to_owned()]);
    assert!(!csr.requests_ca);
    csr.check_for(&id()).unwrap();
}
