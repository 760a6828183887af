use std::time::{Duration, SystemTime};

use rcgen::ExtendedKeyUsagePurpose;

use super::*;
use crate::bundle::TrustBundle;
use crate::test_util::{RawSvid, SvidOptions, TestPki};
use crate::x509::{NOT_BEFORE_BACKDATE, SvidKey, X509Svid, leaf_params, random_serial};

const ALICE: &str = "spiffe://example.org/ns/shop/sa/alice";
const BOB: &str = "spiffe://example.org/ns/shop/sa/bob";
const PARTNER: &str = "spiffe://partner.test/ns/pay/sa/api";

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn bundle(td_name: &str, pkis: &[&TestPki]) -> TrustBundle {
    let mut bundle = TrustBundle::new(td(td_name));
    for pki in pkis {
        bundle.add_authority(pki.root_der()).unwrap();
    }
    bundle
}

/// A verifier over one bundle per PKI (by its trust domain), accepting `accepted`.
fn verifier(pkis: &[&TestPki], accepted: &[&str]) -> PeerVerifier {
    let set: BundleSet = pkis
        .iter()
        .map(|pki| bundle(pki.trust_domain().as_str(), &[pki]))
        .collect();
    PeerVerifier::new(Arc::new(set), accepted.iter().map(|name| td(name)))
}

fn check_at(
    v: &PeerVerifier,
    chain: &[CertificateDer<'static>],
    role: PeerRole,
    now: UnixTime,
) -> Result<SpiffeId, VerifyError> {
    v.verify(&chain[0], &chain[1..], role, now)
}

fn check(v: &PeerVerifier, chain: &[CertificateDer<'static>]) -> Result<SpiffeId, VerifyError> {
    check_at(v, chain, PeerRole::Client, UnixTime::now())
}

fn chain_of((svid, _): (X509Svid, SvidKey)) -> Vec<CertificateDer<'static>> {
    svid.into_chain()
}

fn raw_chain((chain, _): RawSvid) -> Vec<CertificateDer<'static>> {
    chain
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

// ---- accepted chains ----

#[test]
fn accepts_a_valid_chain_via_the_intermediate_in_both_roles() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let chain = chain_of(pki.svid(ALICE));
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    for role in [PeerRole::Client, PeerRole::Server] {
        assert_eq!(check_at(&v, &chain, role, UnixTime::now()), Ok(id(ALICE)));
    }
}

#[test]
fn accepts_a_leaf_signed_by_the_root_directly() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let chain = chain_of(pki.svid_with(
        ALICE,
        SvidOptions {
            signed_by_root: true,
            ..SvidOptions::default()
        },
    ));
    assert_eq!(chain.len(), 1);
    assert_eq!(check(&v, &chain), Ok(id(ALICE)));
}

#[test]
fn root_rotation_accepts_leaves_from_either_root_then_only_the_new_one() {
    let old = TestPki::new("example.org");
    let new = TestPki::new("example.org");
    let mut both = bundle("example.org", &[&old, &new]);
    let v = PeerVerifier::new(
        Arc::new([both.clone()].into_iter().collect()),
        [td("example.org")],
    );
    let old_leaf = chain_of(old.svid(ALICE));
    let new_leaf = chain_of(new.svid(BOB));
    assert_eq!(check(&v, &old_leaf), Ok(id(ALICE)));
    assert_eq!(check(&v, &new_leaf), Ok(id(BOB)));

    // Retire the old root: a new verifier over the new bundle refuses the old chain.
    assert!(both.remove_authority(&old.root_der()));
    let v = PeerVerifier::new(Arc::new([both].into_iter().collect()), [td("example.org")]);
    assert_eq!(check(&v, &new_leaf), Ok(id(BOB)));
    assert_eq!(
        check(&v, &old_leaf),
        Err(VerifyError::UnknownIssuer { id: id(ALICE) })
    );
}

#[test]
fn federated_trust_domain_accepted_only_when_listed() {
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    let chain = chain_of(partner.svid(PARTNER));

    let federated = verifier(&[&own, &partner], &["example.org", "partner.test"]);
    assert_eq!(check(&federated, &chain), Ok(id(PARTNER)));
    assert_eq!(check(&federated, &chain_of(own.svid(ALICE))), Ok(id(ALICE)));

    // Same bundles, but partner.test is not accepted.
    let own_only = verifier(&[&own, &partner], &["example.org"]);
    assert_eq!(
        check(&own_only, &chain),
        Err(VerifyError::UnknownTrustDomain { id: id(PARTNER) })
    );
}

#[test]
fn expected_peer_accepts_the_named_ids() {
    let pki = TestPki::new("example.org");
    let chain = chain_of(pki.svid(ALICE));
    let exactly = verifier(&[&pki], &["example.org"]).with_expected(Expected::Id(id(ALICE)));
    assert_eq!(check(&exactly, &chain), Ok(id(ALICE)));
    let any_of = verifier(&[&pki], &["example.org"])
        .with_expected(Expected::AnyOf(vec![id(BOB), id(ALICE)]));
    assert_eq!(check(&any_of, &chain), Ok(id(ALICE)));
}

// ---- refusals: identity ----

#[test]
fn refuses_a_trust_domain_that_is_not_accepted() {
    let own = TestPki::new("example.org");
    let other = TestPki::new("other.test");
    // `other.test` is not even in the bundle set: the answer is still "not accepted".
    let v = verifier(&[&own], &["example.org"]);
    let err = check(&v, &chain_of(other.svid("spiffe://other.test/x"))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnknownTrustDomain {
            id: id("spiffe://other.test/x")
        }
    );
    assert_eq!(
        err.to_string(),
        "peer `spiffe://other.test/x` is in trust domain `other.test`, which is not accepted here"
    );
}

#[test]
fn refuses_an_accepted_trust_domain_without_a_bundle() {
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    let v = verifier(&[&own], &["example.org", "partner.test"]);
    let err = check(&v, &chain_of(partner.svid(PARTNER))).unwrap_err();
    assert_eq!(err, VerifyError::NoBundle(td("partner.test")));
    assert!(err.to_string().contains("`partner.test`"), "{err}");
}

#[test]
fn refuses_two_uri_sans() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let err = check(&v, &raw_chain(pki.leaf_with_two_uri_sans(ALICE, BOB))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::MultipleUriSans(vec![ALICE.to_owned(), BOB.to_owned()])
    );
    assert!(
        err.to_string()
            .contains(&format!("2 URI SANs (`{ALICE}`, `{BOB}`)")),
        "{err}"
    );
}

#[test]
fn refuses_a_leaf_without_san() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    assert_eq!(
        check(&v, &raw_chain(pki.leaf_without_san())),
        Err(VerifyError::NoUriSan)
    );
}

#[test]
fn refuses_a_dns_only_san() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    assert_eq!(
        check(&v, &raw_chain(pki.leaf_with_dns_san("alice.shop.svc"))),
        Err(VerifyError::NoUriSan)
    );
}

#[test]
fn refuses_a_non_spiffe_uri() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let uri = "https://example.org/ns/shop/sa/alice";
    let err = check(&v, &raw_chain(pki.leaf_with_uri_san(uri))).unwrap_err();
    assert!(
        matches!(&err, VerifyError::NotSpiffe { uri: u, reason: SpiffeIdError::WrongScheme(_) } if u == uri),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("`{uri}`")), "{err}");
}

#[test]
fn refuses_an_invalid_spiffe_uri() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    // Upper case is not normalized: two parties could read it as two identities.
    let err = check(
        &v,
        &raw_chain(pki.leaf_with_uri_san("spiffe://Example.org/a")),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            VerifyError::NotSpiffe {
                reason: SpiffeIdError::BadTrustDomainChar { ch: 'E', .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_a_ca_certificate_as_leaf() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let err = check(&v, &raw_chain(pki.ca_as_leaf("spiffe://example.org"))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::CaAsLeaf {
            id: "spiffe://example.org".to_owned(),
            reason: "basicConstraints CA:true"
        }
    );
    // Even with a workload-looking ID, and in either role.
    let chain = raw_chain(pki.ca_as_leaf(ALICE));
    let err = check_at(&v, &chain, PeerRole::Server, UnixTime::now()).unwrap_err();
    assert!(matches!(err, VerifyError::CaAsLeaf { .. }), "{err:?}");
}

#[test]
fn refuses_a_leaf_allowed_to_sign_certificates_or_crls() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let err = check(&v, &raw_chain(pki.leaf_with_key_cert_sign(ALICE))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::CaAsLeaf {
            id: ALICE.to_owned(),
            reason: "keyUsage keyCertSign"
        }
    );
    let err = check(&v, &raw_chain(pki.leaf_with_crl_sign(ALICE))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::CaAsLeaf {
            id: ALICE.to_owned(),
            reason: "keyUsage cRLSign"
        }
    );
}

#[test]
fn refuses_a_leaf_without_digital_signature() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    for chain in [
        raw_chain(pki.leaf_without_digital_signature(ALICE)),
        raw_chain(pki.leaf_without_key_usage(ALICE)),
    ] {
        assert_eq!(
            check(&v, &chain),
            Err(VerifyError::NoDigitalSignature { id: id(ALICE) })
        );
    }
}

#[test]
fn refuses_the_wrong_expected_peer() {
    let pki = TestPki::new("example.org");
    let chain = chain_of(pki.svid(BOB));
    let v = verifier(&[&pki], &["example.org"]).with_expected(Expected::Id(id(ALICE)));
    let err = check(&v, &chain).unwrap_err();
    assert_eq!(
        err,
        VerifyError::WrongPeer {
            expected: Expected::Id(id(ALICE)),
            got: id(BOB)
        }
    );
    assert_eq!(
        err.to_string(),
        format!("peer `{BOB}` is not the expected `{ALICE}`")
    );

    let carol = id("spiffe://example.org/ns/shop/sa/carol");
    let v =
        verifier(&[&pki], &["example.org"]).with_expected(Expected::AnyOf(vec![id(ALICE), carol]));
    let err = check(&v, &chain).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "is not one of the expected `{ALICE}`, `spiffe://example.org/ns/shop/sa/carol`"
        )),
        "{err}"
    );

    let nobody = verifier(&[&pki], &["example.org"]).with_expected(Expected::AnyOf(vec![]));
    assert!(matches!(
        check(&nobody, &chain),
        Err(VerifyError::WrongPeer { .. })
    ));
}

// ---- refusals: chain ----

#[test]
fn refuses_an_expired_leaf() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let now = SystemTime::now();
    let not_after = now - Duration::from_secs(3600);
    let chain = chain_of(pki.svid_with(
        ALICE,
        SvidOptions {
            not_before: Some(now - Duration::from_secs(7200)),
            not_after: Some(not_after),
            ..SvidOptions::default()
        },
    ));
    let at = unix(now);
    let err = check_at(&v, &chain, PeerRole::Client, at).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Expired {
            id: id(ALICE),
            not_after: unix(not_after),
            now: at
        }
    );
    assert!(
        err.to_string().contains(&format!("`{ALICE}` expired at ")),
        "{err}"
    );
}

#[test]
fn refuses_a_valid_leaf_checked_after_its_not_after() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let chain = chain_of(pki.svid(ALICE));
    let later = unix(SystemTime::now() + Duration::from_secs(2 * 3600));
    let err = check_at(&v, &chain, PeerRole::Server, later).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err:?}");
}

#[test]
fn refuses_a_leaf_that_is_not_valid_yet() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let now = SystemTime::now();
    let not_before = now + Duration::from_secs(600);
    let chain = chain_of(pki.svid_with(
        ALICE,
        SvidOptions {
            not_before: Some(not_before),
            not_after: Some(now + Duration::from_secs(3600)),
            ..SvidOptions::default()
        },
    ));
    let err = check_at(&v, &chain, PeerRole::Client, unix(now)).unwrap_err();
    assert!(
        matches!(&err, VerifyError::NotYetValid { id: i, not_before: nb, .. }
            if *i == id(ALICE) && nb.as_secs() == unix(not_before).as_secs()),
        "{err:?}"
    );
    // The backdate is what lets a peer whose clock is a little behind accept a fresh SVID.
    let fresh = chain_of(pki.svid(ALICE));
    let behind = unix(now - NOT_BEFORE_BACKDATE / 2);
    assert_eq!(
        check_at(&v, &fresh, PeerRole::Client, behind),
        Ok(id(ALICE))
    );
}

#[test]
fn refuses_a_leaf_from_a_foreign_root_of_the_same_name() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let err = check(&v, &chain_of(pki.foreign_svid(ALICE))).unwrap_err();
    assert_eq!(err, VerifyError::UnknownIssuer { id: id(ALICE) });
    assert_eq!(
        err.to_string(),
        format!(
            "certificate of `{ALICE}` does not chain to any authority in the trust bundle of `example.org`"
        )
    );
}

#[test]
fn a_federated_root_cannot_vouch_for_our_trust_domain() {
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    let v = verifier(&[&own, &partner], &["example.org", "partner.test"]);
    // partner.test's CA signs a leaf claiming an identity in example.org.
    let forged = chain_of(partner.svid_with(ALICE, SvidOptions::default()));
    assert_eq!(
        check(&v, &forged),
        Err(VerifyError::UnknownIssuer { id: id(ALICE) })
    );
}

#[test]
fn refuses_a_chain_missing_its_intermediate() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let chain = chain_of(pki.svid(ALICE));
    assert_eq!(
        v.verify(&chain[0], &[], PeerRole::Client, UnixTime::now()),
        Err(VerifyError::UnknownIssuer { id: id(ALICE) })
    );
}

#[test]
fn refuses_a_bad_signature() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let err = check(&v, &raw_chain(pki.bad_signature_svid(ALICE))).unwrap_err();
    assert_eq!(err, VerifyError::BadSignature { id: id(ALICE) });
}

#[test]
fn refuses_a_leaf_whose_eku_does_not_allow_the_role() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let now = SystemTime::now();
    let mut params = leaf_params(
        &id(ALICE),
        now - NOT_BEFORE_BACKDATE,
        now + Duration::from_secs(3600),
        &random_serial().unwrap(),
    )
    .unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = SvidKey::generate().unwrap();
    let leaf = params.signed_by(&key, pki.intermediate().issuer()).unwrap();
    let chain = vec![leaf.der().clone(), pki.intermediate_der()];

    assert_eq!(
        check_at(&v, &chain, PeerRole::Server, UnixTime::now()),
        Ok(id(ALICE))
    );
    let err = check_at(&v, &chain, PeerRole::Client, UnixTime::now()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::WrongPurpose {
            id: id(ALICE),
            role: PeerRole::Client
        }
    );
    assert!(err.to_string().contains("client authentication"), "{err}");
}

#[test]
fn refuses_garbage_and_trailing_bytes() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]);
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(
        v.verify(&garbage, &[], PeerRole::Client, UnixTime::now()),
        Err(VerifyError::Malformed(_))
    ));
    let chain = chain_of(pki.svid(ALICE));
    let mut padded = chain[0].to_vec();
    padded.push(0);
    let err = v
        .verify(
            &CertificateDer::from(padded),
            &chain[1..],
            PeerRole::Client,
            UnixTime::now(),
        )
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::Malformed("1 bytes after the certificate".to_owned())
    );
}

// ---- after the handshake ----

#[test]
fn peer_spiffe_id_reads_the_leaf() {
    let pki = TestPki::new("example.org");
    assert_eq!(peer_spiffe_id(&chain_of(pki.svid(ALICE))), Ok(id(ALICE)));
    assert_eq!(peer_spiffe_id(&[]), Err(VerifyError::NoCertificate));
    assert_eq!(
        peer_spiffe_id(&raw_chain(pki.leaf_with_dns_san("a.b"))),
        Err(VerifyError::NoUriSan)
    );
}

// ---- rustls glue ----

#[test]
fn rustls_errors_use_standard_variants_where_they_exist() {
    use rustls::Error as R;
    let t = UnixTime::since_unix_epoch(Duration::from_secs(100));
    let n = UnixTime::since_unix_epoch(Duration::from_secs(200));
    let cases: Vec<(VerifyError, R)> = vec![
        (VerifyError::NoCertificate, R::NoCertificatesPresented),
        (
            VerifyError::Malformed("x".into()),
            R::InvalidCertificate(CertificateError::BadEncoding),
        ),
        (
            VerifyError::Expired {
                id: id(ALICE),
                not_after: t,
                now: n,
            },
            R::InvalidCertificate(CertificateError::ExpiredContext {
                time: n,
                not_after: t,
            }),
        ),
        (
            VerifyError::NotYetValid {
                id: id(ALICE),
                not_before: n,
                now: t,
            },
            R::InvalidCertificate(CertificateError::NotValidYetContext {
                time: t,
                not_before: n,
            }),
        ),
        (
            VerifyError::UnknownIssuer { id: id(ALICE) },
            R::InvalidCertificate(CertificateError::UnknownIssuer),
        ),
        (
            VerifyError::BadSignature { id: id(ALICE) },
            R::InvalidCertificate(CertificateError::BadSignature),
        ),
        (
            VerifyError::WrongPurpose {
                id: id(ALICE),
                role: PeerRole::Server,
            },
            R::InvalidCertificate(CertificateError::InvalidPurpose),
        ),
    ];
    for (err, want) in cases {
        assert_eq!(R::from(err.clone()), want, "{err:?}");
    }
}

#[test]
fn spiffe_refusals_travel_inside_rustls_other() {
    let err = VerifyError::WrongPeer {
        expected: Expected::Id(id(ALICE)),
        got: id(BOB),
    };
    let mapped = rustls::Error::from(err.clone());
    let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = mapped else {
        panic!("not CertificateError::Other: {mapped:?}");
    };
    assert_eq!(other.0.downcast_ref::<VerifyError>(), Some(&err));
    for err in [
        VerifyError::NoUriSan,
        VerifyError::MultipleUriSans(vec![]),
        VerifyError::NoBundle(td("x.test")),
        VerifyError::UnknownTrustDomain { id: id(PARTNER) },
        VerifyError::NoDigitalSignature { id: id(ALICE) },
    ] {
        assert!(matches!(
            rustls::Error::from(err),
            rustls::Error::InvalidCertificate(CertificateError::Other(_))
        ),);
    }
}

#[test]
fn client_verifier_requires_a_cert_and_hints_the_accepted_roots() {
    let own = TestPki::new("example.org");
    let partner = TestPki::new("partner.test");
    let v = verifier(&[&own, &partner], &["example.org"]);
    assert!(v.offer_client_auth());
    assert!(v.client_auth_mandatory());
    // Only the accepted trust domain's root is hinted.
    let root = own.root_der();
    let anchor = webpki::anchor_from_trusted_cert(&root).unwrap();
    let hints: Vec<&[u8]> = ClientCertVerifier::root_hint_subjects(&v)
        .iter()
        .map(|dn| dn.as_ref())
        .collect();
    let want = DistinguishedName::in_sequence(anchor.subject.as_ref());
    assert_eq!(hints, [want.as_ref()]);
    assert!(!ClientCertVerifier::supported_verify_schemes(&v).is_empty());

    let good = chain_of(own.svid(ALICE));
    assert!(
        v.verify_client_cert(&good[0], &good[1..], UnixTime::now())
            .is_ok()
    );
    let foreign = chain_of(own.foreign_svid(ALICE));
    assert_eq!(
        v.verify_client_cert(&foreign[0], &foreign[1..], UnixTime::now())
            .unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn server_verifier_ignores_the_dns_name_and_checks_the_spiffe_id() {
    let pki = TestPki::new("example.org");
    let v = verifier(&[&pki], &["example.org"]).with_expected(Expected::Id(id(ALICE)));
    let name = ServerName::try_from("unrelated.example.com").unwrap();
    let alice = chain_of(pki.svid(ALICE));
    assert!(
        v.verify_server_cert(&alice[0], &alice[1..], &name, &[], UnixTime::now())
            .is_ok()
    );
    let bob = chain_of(pki.svid(BOB));
    let err = v
        .verify_server_cert(&bob[0], &bob[1..], &name, &[], UnixTime::now())
        .unwrap_err();
    assert!(
        matches!(&err, rustls::Error::InvalidCertificate(CertificateError::Other(o))
            if matches!(o.0.downcast_ref::<VerifyError>(), Some(VerifyError::WrongPeer { .. }))),
        "{err:?}"
    );
}

#[test]
fn utc_formats_error_times() {
    assert_eq!(
        utc(&UnixTime::since_unix_epoch(Duration::from_secs(
            1_700_000_000
        ))),
        "2023-11-14T22:13:20Z"
    );
}
