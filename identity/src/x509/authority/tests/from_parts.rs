//! `Authority::from_parts`: loading persisted roots and upstream-signed intermediates.

use super::*;

#[test]
fn from_parts_reloads_a_root_with_its_key() {
    let root = root();
    let key = SvidKey::from_pkcs8_der(root.key().to_pkcs8_der().secret_pkcs8_der()).unwrap();
    let reloaded = Authority::from_parts(root.chain().to_vec(), key).unwrap();
    assert!(reloaded.is_root());
    assert_eq!(reloaded.trust_domain(), &td());
    assert_eq!(reloaded.not_before(), root.not_before());
    assert_eq!(reloaded.not_after(), root.not_after());
    let signed = sign(&reloaded);
    assert_eq!(signed.chain.len(), 1);
    parse(&signed.leaf)
        .verify_signature(Some(parse(root.certificate()).public_key()))
        .unwrap();
    assert_eq!(
        parse(&signed.leaf).issuer().as_raw(),
        parse(root.certificate()).subject().as_raw()
    );
}

#[test]
fn from_parts_with_intermediate_and_root_drops_the_root_from_issued_chains() {
    let root = root();
    let key = SvidKey::generate().unwrap();
    let signed = root
        .sign_intermediate(&key.public_key_der(), secs(3600), t0())
        .unwrap();
    let inter =
        Authority::from_parts(vec![signed.cert.clone(), root.certificate().clone()], key).unwrap();
    assert_eq!(inter.chain().len(), 2);
    let svid = sign(&inter);
    assert_eq!(svid.chain, vec![svid.leaf.clone(), signed.cert]);
}

#[test]
fn from_parts_refuses_an_empty_chain() {
    assert_eq!(
        Authority::from_parts(Vec::new(), SvidKey::generate().unwrap()).unwrap_err(),
        AuthorityError::EmptyChain
    );
}

#[test]
fn from_parts_refuses_garbage() {
    let err = Authority::from_parts(
        vec![CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])],
        SvidKey::generate().unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(err, AuthorityError::Malformed { index: 0, .. }),
        "{err:?}"
    );
    let root = root();
    let err = Authority::from_parts(
        vec![
            root.certificate().clone(),
            CertificateDer::from(vec![1, 2, 3]),
        ],
        SvidKey::from_pkcs8_der(root.key().to_pkcs8_der().secret_pkcs8_der()).unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(err, AuthorityError::Malformed { index: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn from_parts_refuses_a_leaf_svid() {
    let pki = TestPki::new(TD);
    let (svid, key) = pki.svid(ID);
    assert_eq!(
        Authority::from_parts(svid.into_chain(), key).unwrap_err(),
        AuthorityError::NotCa
    );
}

#[test]
fn from_parts_refuses_a_mismatched_key() {
    let root = root();
    assert_eq!(
        Authority::from_parts(root.chain().to_vec(), SvidKey::generate().unwrap()).unwrap_err(),
        AuthorityError::KeyMismatch
    );
}

/// A CA certificate made from `params` over a fresh key, signed by `root`.
fn raw_ca(root: &Authority, params: CertificateParams) -> (CertificateDer<'static>, SvidKey) {
    let key = SvidKey::generate().unwrap();
    let cert = params.signed_by(&key, root.issuer()).unwrap();
    (cert.der().clone(), key)
}

fn raw_ca_params(uri: Option<&str>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.subject_alt_names = uri
        .map(|u| vec![SanType::URI(u.try_into().unwrap())])
        .unwrap_or_default();
    params
}

#[test]
fn from_parts_accepts_a_well_formed_upstream_intermediate() {
    // An upstream CA's own naming (rcgen's default CN) and no pathLenConstraint.
    let root = root();
    let (cert, key) = raw_ca(&root, raw_ca_params(Some("spiffe://example.org")));
    let inter = Authority::from_parts(vec![cert], key).unwrap();
    // Unconstrained, so it may sign intermediates of its own.
    let k = SvidKey::generate().unwrap();
    inter
        .sign_intermediate(&k.public_key_der(), secs(3600), t0())
        .unwrap();
}

#[test]
fn from_parts_refuses_a_ca_without_key_cert_sign() {
    let root = root();
    let mut params = raw_ca_params(Some("spiffe://example.org"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let (cert, key) = raw_ca(&root, params);
    assert_eq!(
        Authority::from_parts(vec![cert], key).unwrap_err(),
        AuthorityError::MissingKeyCertSign
    );
    let mut params = raw_ca_params(Some("spiffe://example.org"));
    params.key_usages = Vec::new();
    let (cert, key) = raw_ca(&root, params);
    assert_eq!(
        Authority::from_parts(vec![cert], key).unwrap_err(),
        AuthorityError::MissingKeyCertSign
    );
}

#[test]
fn from_parts_refuses_a_ca_whose_id_has_a_path() {
    let root = root();
    let (cert, key) = raw_ca(&root, raw_ca_params(Some("spiffe://example.org/ca")));
    assert_eq!(
        Authority::from_parts(vec![cert], key).unwrap_err(),
        AuthorityError::SigningIdHasPath("spiffe://example.org/ca".to_owned())
    );
}

#[test]
fn from_parts_refuses_a_ca_without_spiffe_id() {
    let root = root();
    let (cert, key) = raw_ca(&root, raw_ca_params(None));
    assert_eq!(
        Authority::from_parts(vec![cert], key).unwrap_err(),
        AuthorityError::BadSigningId(X509SvidError::NoUriSan)
    );
    let (cert, key) = raw_ca(&root, raw_ca_params(Some("https://example.org")));
    assert_eq!(
        Authority::from_parts(vec![cert], key).unwrap_err(),
        AuthorityError::BadSigningId(X509SvidError::NotSpiffe("https://example.org".to_owned()))
    );
}

#[test]
fn from_parts_refuses_a_chain_whose_links_do_not_verify() {
    let root = root();
    let other_root = Authority::new_root(&td(), secs(3600), t0()).unwrap();
    let key = SvidKey::generate().unwrap();
    let signed = root
        .sign_intermediate(&key.public_key_der(), secs(3600), t0())
        .unwrap();
    assert_eq!(
        Authority::from_parts(vec![signed.cert, other_root.certificate().clone()], key)
            .unwrap_err(),
        AuthorityError::BrokenChain { index: 0 }
    );
}

#[test]
fn from_parts_refuses_a_subject_issued_certificates_could_not_repeat() {
    // rcgen's default subject is CN UTF8String "rcgen self signed cert"; retag it as VisibleString, a
    // string type rcgen cannot write back, so issued certificates could never name this issuer.
    let root = root();
    let (cert, key) = raw_ca(&root, raw_ca_params(Some("spiffe://example.org")));
    let mut der = cert.to_vec();
    let cn = b"rcgen self signed cert";
    let at = der.windows(cn.len()).position(|w| w == cn).unwrap();
    assert_eq!(der[at - 2], 0x0c);
    der[at - 2] = 0x1a;
    let err = Authority::from_parts(vec![CertificateDer::from(der)], key).unwrap_err();
    assert!(
        matches!(err, AuthorityError::UnreproducibleSubject(_)),
        "{err:?}"
    );
}
