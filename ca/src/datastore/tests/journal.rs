//! The issuance journal.

use super::*;

fn issued(serial: u32, authority: &str, not_after: SystemTime) -> Issued {
    Issued {
        serial: format!("{serial:x}"),
        spiffe_id: id("spiffe://td/ns/shop/sa/web"),
        agent: Some(id("spiffe://td/meshward/agent/join/n1")),
        node: "n1".into(),
        pod: serial.is_multiple_of(2).then(|| format!("pod-{serial}")),
        authority: authority.into(),
        not_after,
        issued_at: now(),
    }
}

#[test]
fn batches_are_recorded_and_queried_per_authority() {
    let (_dir, ds) = store();
    ds.record_issued_batch(&[]).unwrap();
    assert_eq!(ds.issued_count().unwrap(), 0);
    assert_eq!(ds.latest_not_after("a").unwrap(), None);

    let a = "a".repeat(64);
    let b = "b".repeat(64);
    let batch: Vec<_> = (0..2000)
        .map(|i| {
            let authority = if i % 3 == 0 { &b } else { &a };
            issued(i, authority, now() + secs(u64::from(i)))
        })
        .collect();
    ds.record_issued_batch(&batch).unwrap();
    ds.record_issued_batch(&[issued(9999, &a, now() + secs(10))])
        .unwrap();
    assert_eq!(ds.issued_count().unwrap(), 2001);
    assert_eq!(ds.latest_not_after(&a).unwrap(), Some(now() + secs(1999)));
    assert_eq!(ds.latest_not_after(&b).unwrap(), Some(now() + secs(1998)));
    assert_eq!(ds.latest_not_after("c").unwrap(), None);
    assert_eq!(
        ds.latest_not_after_by_authority().unwrap(),
        vec![(a, now() + secs(1999)), (b, now() + secs(1998))]
    );
}

#[test]
fn a_batch_raises_its_authoritys_signed_until() {
    let (_dir, ds) = store();
    let authority = ds
        .insert_prepared_authority(&authorities::ca_cert(), now())
        .unwrap();
    ds.record_issued_batch(&[
        issued(1, &authority.id, now() + secs(500)),
        issued(2, &authority.id, now() + secs(900)),
        issued(3, "unknown-authority", now() + secs(5000)),
    ])
    .unwrap();
    let signed_until = |ds: &Datastore| ds.list_authorities().unwrap()[0].signed_until;
    assert_eq!(signed_until(&ds), now() + secs(900));
    // Never lowered.
    ds.record_issued_batch(&[issued(4, &authority.id, now() + secs(100))])
        .unwrap();
    assert_eq!(signed_until(&ds), now() + secs(900));
}

#[test]
fn a_failed_batch_records_nothing() {
    let (_dir, ds) = store();
    // A trigger makes the second row fail; the first must roll back with it.
    raw(&ds)
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON issued WHEN NEW.serial = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
    let mut bad = issued(2, "a", now());
    bad.serial = "bad".into();
    let err = ds
        .record_issued_batch(&[issued(1, "a", now()), bad])
        .unwrap_err();
    assert!(matches!(err, DatastoreError::Sqlite { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("could not record an issued svid"),
        "{err}"
    );
    assert_eq!(ds.issued_count().unwrap(), 0);
}

#[test]
fn pruning_drops_only_expired_rows_and_is_bounded() {
    let (_dir, ds) = store();
    let batch: Vec<_> = (0..100)
        .map(|i| issued(i, "a", now() + secs(u64::from(i))))
        .collect();
    ds.record_issued_batch(&batch).unwrap();
    let cutoff = now() + secs(50);
    assert_eq!(ds.prune_issued(cutoff, 30).unwrap(), 30);
    assert_eq!(ds.prune_issued(cutoff, 30).unwrap(), 20);
    assert_eq!(ds.prune_issued(cutoff, 30).unwrap(), 0);
    assert_eq!(ds.issued_count().unwrap(), 50);
    assert_eq!(ds.latest_not_after("a").unwrap(), Some(now() + secs(99)));
}
