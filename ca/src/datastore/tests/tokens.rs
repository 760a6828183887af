//! Join tokens.

use super::*;

#[test]
fn a_join_token_is_consumed_once() {
    let (_dir, ds) = store();
    let token = ds.create_join_token("node-1", secs(600), now()).unwrap();
    assert_eq!(token.expires_at, now() + secs(600));
    let text = token.token.expose();
    assert_eq!(text.len(), 64);
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );

    let grant = ds.consume_join_token(text, now() + secs(599)).unwrap();
    assert_eq!(grant.node(), "node-1");

    let err = ds.consume_join_token(text, now() + secs(1)).unwrap_err();
    assert!(
        matches!(&err, TokenError::AlreadyUsed { node, used_at }
            if node == "node-1" && *used_at == 1_700_000_599),
        "{err}"
    );
    assert!(err.to_string().contains("single-use"), "{err}");
}

#[test]
fn every_token_is_different() {
    let (_dir, ds) = store();
    let a = ds.create_join_token("n", secs(60), now()).unwrap();
    let b = ds.create_join_token("n", secs(60), now()).unwrap();
    assert_ne!(a.token, b.token);
}

#[test]
fn an_unknown_token_is_refused() {
    let (_dir, ds) = store();
    ds.create_join_token("n", secs(60), now()).unwrap();
    for token in ["", "nope", &"0".repeat(64)] {
        let err = ds.consume_join_token(token, now()).unwrap_err();
        assert!(matches!(err, TokenError::Unknown), "{err}");
    }
}

#[test]
fn an_expired_token_is_refused_and_stays_unused() {
    let (_dir, ds) = store();
    let token = ds.create_join_token("n", secs(60), now()).unwrap();
    for later in [60, 61, 3600] {
        let err = ds
            .consume_join_token(token.token.expose(), now() + secs(later))
            .unwrap_err();
        assert!(
            matches!(&err, TokenError::Expired { node, expired_at }
                if node == "n" && *expired_at == 1_700_000_060),
            "{err}"
        );
    }
}

#[test]
fn the_database_keeps_only_the_tokens_hash() {
    let (_dir, ds) = store();
    let token = ds.create_join_token("n", secs(60), now()).unwrap();
    let conn = raw(&ds);
    let (hash, node): (Vec<u8>, String) = conn
        .query_row("SELECT hash, node FROM join_tokens", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(node, "n");
    let expected = ring::digest::digest(&ring::digest::SHA256, token.token.expose().as_bytes());
    assert_eq!(hash, expected.as_ref());
    drop(conn);
    drop(ds);
    let dir_bytes = std::fs::read(_dir.path().join(DB_FILE)).unwrap();
    let wal = std::fs::read(_dir.path().join("ca.sqlite3-wal")).unwrap_or_default();
    let needle = token.token.expose().as_bytes();
    for bytes in [dir_bytes, wal] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
}

#[test]
fn token_ttl_and_node_are_checked() {
    let (_dir, ds) = store();
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(500),
        crate::datastore::tokens::MAX_TOKEN_TTL + secs(1),
    ] {
        let err = ds.create_join_token("n", ttl, now()).unwrap_err();
        assert!(
            matches!(err, DatastoreError::BadTokenTtl { ttl: t } if t == ttl),
            "{err}"
        );
    }
    ds.create_join_token("n", crate::datastore::tokens::MAX_TOKEN_TTL, now())
        .unwrap();
    for bad in ["", "..", "a/b"] {
        let err = ds.create_join_token(bad, secs(60), now()).unwrap_err();
        assert!(matches!(err, DatastoreError::BadNodeName { .. }), "{err}");
    }
}

#[test]
fn used_and_expired_tokens_are_purged_after_the_retention() {
    let (_dir, ds) = store();
    let used = ds.create_join_token("a", secs(60), now()).unwrap();
    let expired = ds.create_join_token("b", secs(60), now()).unwrap();
    ds.consume_join_token(used.token.expose(), now() + secs(10))
        .unwrap();

    // Just inside the retention: still named as reuse and expiry.
    let edge = now() + secs(10) + crate::datastore::tokens::TOKEN_RETENTION;
    assert_eq!(ds.purge_join_tokens(edge).unwrap(), 0);
    let long = ds.create_join_token("c", secs(60), edge).unwrap();
    assert!(matches!(
        ds.consume_join_token(used.token.expose(), edge),
        Err(TokenError::AlreadyUsed { .. })
    ));

    // Creating a token purges too; the unexpired unused one survives.
    let later = now() + secs(61) + crate::datastore::tokens::TOKEN_RETENTION;
    ds.create_join_token("d", secs(60), later).unwrap();
    for gone in [&used, &expired] {
        assert!(matches!(
            ds.consume_join_token(gone.token.expose(), later),
            Err(TokenError::Unknown)
        ));
    }
    assert_eq!(
        ds.consume_join_token(long.token.expose(), later)
            .unwrap()
            .node(),
        "c"
    );
}

#[test]
fn token_debug_redacts_the_secret() {
    let (_dir, ds) = store();
    let token = ds.create_join_token("n", secs(60), now()).unwrap();
    let debug = format!("{token:?}");
    assert!(!debug.contains(token.token.expose()), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn two_processes_consuming_one_token_at_once_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let a = Datastore::open(dir.path()).unwrap();
    let b = Datastore::open(dir.path()).unwrap();
    for round in 0..20 {
        let token = a.create_join_token("n", secs(60), now()).unwrap();
        let token = token.token.expose();
        let barrier = Barrier::new(2);
        let results: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = [&a, &b]
                .into_iter()
                .map(|ds| {
                    s.spawn(|| {
                        barrier.wait();
                        ds.consume_join_token(token, now())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = results.iter().filter(|r| r.is_ok()).count();
        let reuses = results
            .iter()
            .filter(|r| matches!(r, Err(TokenError::AlreadyUsed { .. })))
            .count();
        assert_eq!((wins, reuses), (1, 1), "round {round}: {results:?}");
    }
}
