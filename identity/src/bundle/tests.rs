use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;

use super::*;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A self-signed certificate; `ca` decides basicConstraints, `usages` the key usage extension.
fn self_signed(cn: &str, ca: bool, usages: Vec<KeyUsagePurpose>) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = if ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.key_usages = usages;
    params.self_signed(&key).unwrap().der().clone()
}

fn root(cn: &str) -> CertificateDer<'static> {
    self_signed(
        cn,
        true,
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
    )
}

#[test]
fn new_bundle_is_empty_at_sequence_zero() {
    let bundle = TrustBundle::new(td("example.org"));
    assert!(bundle.is_empty());
    assert_eq!(bundle.len(), 0);
    assert_eq!(bundle.sequence(), 0);
    assert_eq!(bundle.trust_domain(), &td("example.org"));
    assert_eq!(bundle.to_pem(), "");
    assert!(bundle.to_der_concat().is_empty());
}

#[test]
fn add_authority_dedups_and_bumps_sequence_only_on_change() {
    let mut bundle = TrustBundle::new(td("example.org"));
    let a = root("root a");
    assert!(bundle.add_authority(a.clone()).unwrap());
    assert_eq!(bundle.sequence(), 1);
    assert!(!bundle.add_authority(a.clone()).unwrap());
    assert_eq!(bundle.sequence(), 1);
    assert_eq!(bundle.authorities(), &[a]);
    assert_eq!(bundle.trust_anchors().len(), 1);
}

#[test]
fn two_roots_for_rotation_then_retire_the_old_one() {
    let (old, new) = (root("old root"), root("new root"));
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.add_authority(old.clone()).unwrap();
    bundle.add_authority(new.clone()).unwrap();
    assert_eq!(bundle.authorities(), &[old.clone(), new.clone()]);
    assert_eq!(bundle.trust_anchors().len(), 2);

    assert!(bundle.remove_authority(&old));
    assert_eq!(bundle.sequence(), 3);
    assert!(!bundle.remove_authority(&old));
    assert_eq!(bundle.sequence(), 3);
    assert_eq!(bundle.authorities(), std::slice::from_ref(&new));
    // The anchor left behind is the new root's, not the old one's.
    let expected = webpki::anchor_from_trusted_cert(&new).unwrap().to_owned();
    assert_eq!(bundle.trust_anchors(), &[expected]);
}

#[test]
fn refuses_a_leaf_as_authority() {
    let leaf = self_signed("leaf", false, vec![KeyUsagePurpose::DigitalSignature]);
    let mut bundle = TrustBundle::new(td("example.org"));
    let err = bundle.add_authority(leaf).unwrap_err();
    assert!(
        matches!(&err, BundleError::NotCa { subject, .. } if subject.contains("leaf")),
        "{err:?}"
    );
    assert!(err.to_string().contains("CA:true"), "{err}");
    assert!(bundle.is_empty());
    assert_eq!(bundle.sequence(), 0);
}

#[test]
fn refuses_a_ca_whose_key_usage_cannot_sign_certificates() {
    let ca = self_signed("odd ca", true, vec![KeyUsagePurpose::DigitalSignature]);
    let err = TrustBundle::new(td("example.org"))
        .add_authority(ca)
        .unwrap_err();
    assert!(
        matches!(&err, BundleError::NotCa { reason, .. } if reason.contains("keyCertSign")),
        "{err:?}"
    );
}

#[test]
fn refuses_garbage_as_authority() {
    let err = TrustBundle::new(td("example.org"))
        .add_authority(CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]))
        .unwrap_err();
    assert!(matches!(err, BundleError::Der { index: 0, .. }), "{err:?}");
}

#[test]
fn pem_round_trip_keeps_order() {
    let (a, b) = (root("a"), root("b"));
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.add_authority(a.clone()).unwrap();
    bundle.add_authority(b.clone()).unwrap();
    let pem = bundle.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(pem.lines().all(|l| l.len() <= 64));

    let back = TrustBundle::from_pem(td("example.org"), &pem).unwrap();
    assert_eq!(back.authorities(), &[a, b]);
    assert_eq!(back.trust_anchors(), bundle.trust_anchors());
}

#[test]
fn from_pem_skips_other_blocks_and_duplicates() {
    let a = root("a");
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.add_authority(a.clone()).unwrap();
    let key = KeyPair::generate().unwrap().serialize_pem();
    let pem = format!("{key}{}{}", bundle.to_pem(), bundle.to_pem());
    let back = TrustBundle::from_pem(td("example.org"), &pem).unwrap();
    assert_eq!(back.authorities(), &[a]);
}

#[test]
fn from_pem_refuses_empty_input() {
    for pem in [
        "",
        "not pem at all\n",
        &KeyPair::generate().unwrap().serialize_pem(),
    ] {
        let err = TrustBundle::from_pem(td("example.org"), pem).unwrap_err();
        assert_eq!(err, BundleError::EmptyPem(td("example.org")), "{pem:?}");
        assert!(err.to_string().contains("`example.org`"), "{err}");
    }
}

#[test]
fn from_pem_refuses_bad_base64() {
    let pem = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    let err = TrustBundle::from_pem(td("example.org"), pem).unwrap_err();
    assert!(matches!(err, BundleError::Pem { .. }), "{err:?}");
}

#[test]
fn from_pem_refuses_a_leaf_among_roots() {
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.add_authority(root("a")).unwrap();
    let leaf = self_signed("leaf", false, vec![]);
    let mut pem = bundle.to_pem();
    push_pem_block(&mut pem, &leaf);
    let err = TrustBundle::from_pem(td("example.org"), &pem).unwrap_err();
    assert!(matches!(err, BundleError::NotCa { .. }), "{err:?}");
}

#[test]
fn der_concat_round_trip() {
    let (a, b) = (root("a"), root("b"));
    let mut der = a.as_ref().to_vec();
    der.extend_from_slice(b.as_ref());
    let bundle = TrustBundle::from_der_concat(td("example.org"), &der).unwrap();
    assert_eq!(bundle.authorities(), &[a, b]);
    assert_eq!(bundle.to_der_concat(), der);
}

#[test]
fn der_concat_refuses_empty_and_trailing_garbage() {
    let err = TrustBundle::from_der_concat(td("example.org"), &[]).unwrap_err();
    assert_eq!(err, BundleError::Empty(td("example.org")));

    let mut der = root("a").as_ref().to_vec();
    der.extend_from_slice(&[0xde, 0xad]);
    let err = TrustBundle::from_der_concat(td("example.org"), &der).unwrap_err();
    assert!(matches!(err, BundleError::Der { index: 1, .. }), "{err:?}");
}

#[test]
fn refresh_hint_change_bumps_sequence() {
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    assert_eq!(bundle.refresh_hint(), Some(Duration::from_secs(300)));
    assert_eq!(bundle.sequence(), 1);
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    assert_eq!(bundle.sequence(), 1);
    bundle.set_sequence(41);
    bundle.add_authority(root("a")).unwrap();
    assert_eq!(bundle.sequence(), 42);
}

#[test]
fn debug_shows_no_certificate_bytes() {
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.add_authority(root("a")).unwrap();
    let debug = format!("{bundle:?}");
    assert_eq!(
        debug,
        "TrustBundle { trust_domain: \"example.org\", authorities: 1, sequence: 1, refresh_hint: None }"
    );
}

#[test]
fn bundle_set_by_trust_domain() {
    let mut own = TrustBundle::new(td("example.org"));
    own.add_authority(root("own")).unwrap();
    let mut partner = TrustBundle::new(td("partner.test"));
    partner.add_authority(root("partner")).unwrap();

    let mut set: BundleSet = [partner.clone(), own.clone()].into_iter().collect();
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&td("example.org")), Some(&own));
    assert_eq!(set.get(&td("partner.test")), Some(&partner));
    assert_eq!(set.get(&td("other.test")), None);
    let order: Vec<_> = set.trust_domains().map(TrustDomain::as_str).collect();
    assert_eq!(order, ["example.org", "partner.test"]);
    assert_eq!((&set).into_iter().count(), 2);

    let mut rotated = own.clone();
    rotated.add_authority(root("own next")).unwrap();
    assert_eq!(set.insert(rotated.clone()), Some(own));
    assert_eq!(set.get(&td("example.org")).unwrap().len(), 2);

    assert_eq!(set.remove(&td("partner.test")), Some(partner));
    assert_eq!(set.iter().collect::<Vec<_>>(), [&rotated]);
    assert!(!set.is_empty());
}
