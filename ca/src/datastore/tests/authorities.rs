//! Signing authorities and root rotation.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData};
use time::OffsetDateTime;

use super::*;

/// A fresh self-signed CA certificate (new key) valid around [`now`].
pub(super) fn ca_cert() -> Vec<u8> {
    cert(true, 1_600_000_000, 1_800_000_000).1
}

/// A self-signed certificate; returns its key's SPKI DER and the certificate DER.
fn cert(is_ca: bool, not_before: i64, not_after: i64) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    if is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
    params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let der = params.self_signed(&key).unwrap().der().to_vec();
    (key.subject_public_key_info(), der)
}

fn states(ds: &Datastore) -> Vec<(String, AuthorityState)> {
    ds.list_authorities()
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect()
}

/// Prepares and activates a fresh authority, `created` seconds after [`now`].
fn rotate(ds: &Datastore, created: u64) -> Authority {
    ds.insert_prepared_authority(&ca_cert(), now() + secs(created))
        .unwrap();
    ds.activate_authority(now() + secs(created)).unwrap()
}

#[test]
fn the_id_is_the_sha256_of_the_spki() {
    let (spki, der) = cert(true, 1_600_000_000, 1_800_000_000);
    let expected = hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki));
    assert_eq!(authority_id(&der).unwrap(), expected);
}

#[test]
fn prepare_activate_and_rotate() {
    let (_dir, ds) = store();
    assert_eq!(ds.active_authority().unwrap(), None);
    let der = ca_cert();
    let first = ds.insert_prepared_authority(&der, now()).unwrap();
    assert_eq!(first.id, authority_id(&der).unwrap());
    assert_eq!(first.state, AuthorityState::Prepared);
    assert_eq!(first.certificate, der);
    assert_eq!(first.not_before, UNIX_EPOCH + secs(1_600_000_000));
    assert_eq!(first.not_after, UNIX_EPOCH + secs(1_800_000_000));
    assert_eq!(first.signed_until, UNIX_EPOCH);
    assert_eq!(first.created_at, now());
    assert_eq!(ds.list_authorities().unwrap(), vec![first.clone()]);
    assert_eq!(
        ds.active_authority().unwrap(),
        None,
        "prepared is not active"
    );

    let active = ds.activate_authority(now()).unwrap();
    assert_eq!(
        active,
        Authority {
            state: AuthorityState::Active,
            ..first.clone()
        }
    );
    assert_eq!(ds.active_authority().unwrap(), Some(active));

    let second = ds
        .insert_prepared_authority(&ca_cert(), now() + secs(1))
        .unwrap();
    assert_eq!(
        states(&ds),
        vec![
            (first.id.clone(), AuthorityState::Active),
            (second.id.clone(), AuthorityState::Prepared)
        ]
    );
    let active = ds.activate_authority(now() + secs(2)).unwrap();
    assert_eq!(active.id, second.id);
    assert_eq!(
        states(&ds),
        vec![
            (first.id.clone(), AuthorityState::Old),
            (second.id.clone(), AuthorityState::Active)
        ]
    );
    assert!(AuthorityState::Old.is_published());
    assert!(!AuthorityState::Retired.is_published());
}

#[test]
fn exactly_one_authority_is_active_through_rotations() {
    let (_dir, ds) = store();
    for round in 0..4 {
        rotate(&ds, round);
        let active = states(&ds)
            .into_iter()
            .filter(|(_, s)| *s == AuthorityState::Active)
            .count();
        assert_eq!(active, 1);
    }
    // The schema refuses a second active row even from a buggy writer.
    let err = raw(&ds)
        .execute("UPDATE authorities SET state = 'active'", [])
        .unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
}

#[test]
fn activating_without_a_prepared_authority_is_refused() {
    let (_dir, ds) = store();
    let err = ds.activate_authority(now()).unwrap_err();
    assert!(matches!(err, AuthorityError::NoPrepared), "{err}");
    rotate(&ds, 0);
    let err = ds.activate_authority(now()).unwrap_err();
    assert!(matches!(err, AuthorityError::NoPrepared), "{err}");
}

#[test]
fn one_prepared_at_a_time_and_no_key_twice() {
    let (_dir, ds) = store();
    let der = ca_cert();
    let prepared = ds.insert_prepared_authority(&der, now()).unwrap();
    let err = ds.insert_prepared_authority(&der, now()).unwrap_err();
    assert!(
        matches!(&err, AuthorityError::Exists { id, state: AuthorityState::Prepared } if *id == prepared.id),
        "{err}"
    );
    let err = ds.insert_prepared_authority(&ca_cert(), now()).unwrap_err();
    assert!(
        matches!(&err, AuthorityError::AlreadyPrepared { id } if *id == prepared.id),
        "{err}"
    );
    ds.activate_authority(now()).unwrap();
    let err = ds.insert_prepared_authority(&der, now()).unwrap_err();
    assert!(
        matches!(
            err,
            AuthorityError::Exists {
                state: AuthorityState::Active,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_certificates_are_refused() {
    let (_dir, ds) = store();
    let err = ds
        .insert_prepared_authority(b"not a cert", now())
        .unwrap_err();
    assert!(
        matches!(err, AuthorityError::BadCertificate { .. }),
        "{err}"
    );
    let mut trailing = ca_cert();
    trailing.push(0);
    let err = ds.insert_prepared_authority(&trailing, now()).unwrap_err();
    assert!(
        matches!(err, AuthorityError::BadCertificate { .. }),
        "{err}"
    );

    let (_, leaf) = cert(false, 1_600_000_000, 1_800_000_000);
    let err = ds.insert_prepared_authority(&leaf, now()).unwrap_err();
    assert!(matches!(err, AuthorityError::NotCa { .. }), "{err}");

    let (_, expired) = cert(true, 1_600_000_000, 1_700_000_000);
    let err = ds.insert_prepared_authority(&expired, now()).unwrap_err();
    assert!(
        matches!(
            err,
            AuthorityError::Expired {
                not_after: 1_700_000_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(ds.list_authorities().unwrap().is_empty());

    // One that expires while prepared cannot be activated.
    let (_, short) = cert(true, 1_600_000_000, 1_700_000_100);
    ds.insert_prepared_authority(&short, now()).unwrap();
    let err = ds.activate_authority(now() + secs(100)).unwrap_err();
    assert!(matches!(err, AuthorityError::Expired { .. }), "{err}");
}

#[test]
fn retiring_waits_for_what_the_authority_signed() {
    let (_dir, ds) = store();
    let first = rotate(&ds, 0);
    ds.bump_signed_until(&first.id, now() + secs(3600)).unwrap();
    rotate(&ds, 10);

    let err = ds
        .retire_authority(None, false, now() + secs(3599))
        .unwrap_err();
    assert!(
        matches!(&err, AuthorityError::StillSigning { id, signed_until }
            if *id == first.id && *signed_until == 1_700_003_600),
        "{err}"
    );
    assert!(err.to_string().contains("retire it after that"), "{err}");
    let retired = ds
        .retire_authority(Some(&first.id), false, now() + secs(3600))
        .unwrap();
    assert_eq!(retired.id, first.id);
    assert_eq!(retired.state, AuthorityState::Retired);
    assert_eq!(retired.signed_until, now() + secs(3600));
    assert_eq!(states(&ds)[0], (first.id, AuthorityState::Retired));
}

#[test]
fn a_forced_retirement_does_not_wait() {
    let (_dir, ds) = store();
    let first = rotate(&ds, 0);
    ds.bump_signed_until(&first.id, now() + secs(3600)).unwrap();
    rotate(&ds, 10);
    let retired = ds.retire_authority(None, true, now()).unwrap();
    assert_eq!(
        (retired.id, retired.state),
        (first.id, AuthorityState::Retired)
    );
}

#[test]
fn retiring_also_checks_the_journal() {
    let (_dir, ds) = store();
    let der = ca_cert();
    let id = authority_id(&der).unwrap();
    // Journal rows recorded before this process knew the authority did not raise signed_until.
    ds.record_issued_batch(&[Issued {
        serial: "01".into(),
        spiffe_id: super::id("spiffe://td/a"),
        agent: None,
        node: "n1".into(),
        pod: None,
        authority: id.clone(),
        not_after: now() + secs(500),
        issued_at: now(),
    }])
    .unwrap();
    ds.insert_prepared_authority(&der, now()).unwrap();
    ds.activate_authority(now()).unwrap();
    rotate(&ds, 1);
    let err = ds
        .retire_authority(None, false, now() + secs(100))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AuthorityError::StillSigning {
                signed_until: 1_700_000_500,
                ..
            }
        ),
        "{err}"
    );
    ds.retire_authority(None, false, now() + secs(500)).unwrap();
}

#[test]
fn only_an_old_authority_can_be_retired() {
    let (_dir, ds) = store();
    let err = ds.retire_authority(None, false, now()).unwrap_err();
    assert!(matches!(err, AuthorityError::NoOld), "{err}");

    let first = rotate(&ds, 0);
    let err = ds
        .retire_authority(Some(&first.id), true, now())
        .unwrap_err();
    assert!(
        matches!(&err, AuthorityError::RetireActive { id } if *id == first.id),
        "{err}"
    );
    let err = ds.retire_authority(None, true, now()).unwrap_err();
    assert!(matches!(err, AuthorityError::NoOld), "{err}");

    let prepared = ds.insert_prepared_authority(&ca_cert(), now()).unwrap();
    let err = ds
        .retire_authority(Some(&prepared.id), true, now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            AuthorityError::NotOld {
                state: AuthorityState::Prepared,
                ..
            }
        ),
        "{err}"
    );
    ds.activate_authority(now()).unwrap();
    ds.retire_authority(None, false, now()).unwrap();
    let err = ds
        .retire_authority(Some(&first.id), true, now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            AuthorityError::NotOld {
                state: AuthorityState::Retired,
                ..
            }
        ),
        "{err}"
    );

    let err = ds.retire_authority(Some("feed"), true, now()).unwrap_err();
    assert!(
        matches!(&err, AuthorityError::Unknown { id } if id == "feed"),
        "{err}"
    );
}

#[test]
fn several_old_authorities_must_be_named() {
    let (_dir, ds) = store();
    let a = rotate(&ds, 0);
    let b = rotate(&ds, 1);
    rotate(&ds, 2);
    let err = ds.retire_authority(None, false, now()).unwrap_err();
    assert!(
        matches!(&err, AuthorityError::SeveralOld { ids }
            if ids.contains(&a.id) && ids.contains(&b.id)),
        "{err}"
    );
    ds.retire_authority(Some(&b.id), false, now()).unwrap();
    assert_eq!(ds.retire_authority(None, false, now()).unwrap().id, a.id);
}

#[test]
fn signed_until_only_rises_and_a_retired_authority_cannot_sign() {
    let (_dir, ds) = store();
    let first = rotate(&ds, 0);
    let signed_until = |ds: &Datastore| ds.active_authority().unwrap().unwrap().signed_until;
    ds.bump_signed_until(&first.id, now() + secs(100)).unwrap();
    assert_eq!(signed_until(&ds), now() + secs(100));
    ds.bump_signed_until(&first.id, now() + secs(50)).unwrap();
    assert_eq!(signed_until(&ds), now() + secs(100));

    let err = ds.bump_signed_until("feed", now()).unwrap_err();
    assert!(matches!(err, AuthorityError::Unknown { .. }), "{err}");

    rotate(&ds, 1);
    ds.retire_authority(None, false, now() + secs(100)).unwrap();
    let err = ds
        .bump_signed_until(&first.id, now() + secs(200))
        .unwrap_err();
    assert!(
        matches!(&err, AuthorityError::Retired { id } if *id == first.id),
        "{err}"
    );
}
