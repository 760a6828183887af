//! Tests against real SQLite files in temp dirs: opening, entries and selectors here; tokens, agents,
//! the journal and authorities in submodules.

mod agents;
mod authorities;
mod journal;
mod tokens;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_identity::SpiffeId;
use tempfile::TempDir;

use super::*;

/// A fixed, whole-second "now": the datastore keeps seconds.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn store() -> (TempDir, Datastore) {
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(dir.path()).unwrap();
    (dir, ds)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn new_entry(spiffe_id: &str, selectors: &[&str], scope: NodeScope) -> NewEntry {
    NewEntry {
        spiffe_id: id(spiffe_id),
        selectors: selectors.iter().map(|s| sel(s)).collect(),
        scope,
        ttl_seconds: 0,
        hint: String::new(),
    }
}

fn node(name: &str) -> NodeScope {
    NodeScope::Node(name.to_owned())
}

fn raw(ds: &Datastore) -> rusqlite::Connection {
    rusqlite::Connection::open(ds.path()).unwrap()
}

// ---- open, schema, files ----

#[test]
fn the_handle_is_cheap_to_share_across_threads() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<Datastore>();
}

#[test]
fn open_creates_the_dir_0700_and_the_file_0600() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a/data");
    let ds = Datastore::open(&dir).unwrap();
    assert_eq!(ds.path(), dir.join(DB_FILE));
    let file_mode = std::fs::metadata(ds.path()).unwrap().permissions().mode();
    assert_eq!(file_mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    // The WAL and shared-memory files SQLite makes take the database file's mode.
    ds.create_join_token("n1", secs(60), now()).unwrap();
    for side in ["ca.sqlite3-wal", "ca.sqlite3-shm"] {
        let mode = std::fs::metadata(dir.join(side))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{side} is {mode:o}");
    }
}

#[test]
fn open_tightens_a_database_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    drop(Datastore::open(dir.path()).unwrap());
    let path = dir.path().join(DB_FILE);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Datastore::open(dir.path()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn open_sets_wal_and_the_schema_version() {
    let (_dir, ds) = store();
    let conn = raw(&ds);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::latest_version());
    assert!(version >= 1);
    // Foreign keys and the busy timeout are per connection: check ours.
    let fk: bool = ds
        .lock()
        .pragma_query_value(None, "foreign_keys", |r| r.get(0))
        .unwrap();
    assert!(fk);
    let timeout: i64 = ds
        .lock()
        .pragma_query_value(None, "busy_timeout", |r| r.get(0))
        .unwrap();
    assert_eq!(timeout, 5000);
}

#[test]
fn a_version_1_database_migrates_and_keeps_its_agents() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO agents (spiffe_id, node, attestation, serial, expires_at, attested_at)
             VALUES ('spiffe://td/meshward/agent/join/n1', 'n1', 'join_token', '0a', ?1, ?2)",
            rusqlite::params![unix_seconds(now() + secs(3600)), unix_seconds(now())],
        )
        .unwrap();
    }
    let ds = Datastore::open(dir.path()).unwrap();
    let version: i64 = raw(&ds)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::latest_version());
    let agent_id = id("spiffe://td/meshward/agent/join/n1");
    let agent = ds.agent(&agent_id).unwrap().unwrap();
    assert_eq!((agent.serial.as_str(), agent.pending), ("0a", None));
    assert_eq!(agent.expires_at, now() + secs(3600));
    // The migrated row takes a pending renewal like a new one.
    let renewed = ds
        .renew_agent(&agent_id, "0a", "0b", now() + secs(7200), now())
        .unwrap();
    assert_eq!(renewed.pending.unwrap().serial, "0b");
    ds.agent_may_mint(&agent_id, "0b", now()).unwrap();
    assert_eq!(ds.agent(&agent_id).unwrap().unwrap().serial, "0b");
}

#[test]
fn open_refuses_a_schema_from_a_newer_meshward() {
    let (dir, ds) = store();
    raw(&ds)
        .pragma_update(None, "user_version", schema::latest_version() + 1)
        .unwrap();
    drop(ds);
    let err = Datastore::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, DatastoreError::SchemaTooNew { found, supported }
            if found == supported + 1),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade meshward"), "{err}");
}

#[test]
fn reopening_is_idempotent_and_keeps_everything() {
    let (dir, ds) = store();
    let token = ds.create_join_token("n1", secs(600), now()).unwrap();
    let entry = ds
        .create_entry(
            &new_entry("spiffe://td/ns/shop/sa/web", &["unix:uid:1000"], node("n1")),
            now(),
        )
        .unwrap();
    let grant = ds.consume_join_token(token.token.expose(), now()).unwrap();
    let agent = ds
        .record_attested_agent(
            &NewAgent {
                spiffe_id: id("spiffe://td/meshward/agent/join/n1"),
                admission: Admission::JoinToken(grant),
                serial: "0a".into(),
                expires_at: now() + secs(3600),
            },
            now(),
        )
        .unwrap();
    let cert = authorities::ca_cert();
    let authority = ds.insert_prepared_authority(&cert, now()).unwrap();
    drop(ds);

    let ds = Datastore::open(dir.path()).unwrap();
    assert_eq!(ds.list_entries().unwrap(), vec![entry.clone()]);
    assert_eq!(ds.entry(&entry.id).unwrap(), Some(entry));
    assert_eq!(ds.agent(&agent.spiffe_id).unwrap(), Some(agent));
    assert_eq!(ds.list_authorities().unwrap(), vec![authority]);
    assert!(matches!(
        ds.consume_join_token(token.token.expose(), now()),
        Err(TokenError::AlreadyUsed { .. })
    ));
}

#[test]
fn two_processes_opening_a_fresh_dir_at_once_both_succeed() {
    for _ in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            let opened: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        Datastore::open(dir.path())
                    })
                })
                .collect();
            for handle in opened {
                let ds = handle.join().unwrap().unwrap();
                ds.list_entries().unwrap();
            }
        });
    }
}

#[test]
fn node_names_are_spiffe_path_segments() {
    for good in ["n1", "node-1.example_2", "A", "..."] {
        validate_node_name(good).unwrap();
    }
    let long = "a".repeat(254);
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "nöde",
        "a:b",
        "a%2f",
        long.as_str(),
    ] {
        let err = validate_node_name(bad).unwrap_err();
        assert!(
            matches!(&err, DatastoreError::BadNodeName { node, .. } if node == bad),
            "{bad}: {err}"
        );
    }
    let err = validate_node_name("a/b").unwrap_err();
    assert_eq!(
        err.to_string(),
        "node name `a/b` is invalid: use only letters, digits, `.`, `_` and `-`"
    );
}

#[test]
fn unix_seconds_round_trip_and_saturate() {
    for s in [0, 1, 1_700_000_000, -5] {
        assert_eq!(unix_seconds(from_unix_seconds(s)), s);
    }
    assert_eq!(
        unix_seconds(now() + Duration::from_millis(999)),
        1_700_000_000
    );
}

// ---- selectors and scopes ----

#[test]
fn selectors_parse_type_and_value() {
    let s = sel("unix:uid:1000");
    assert_eq!(s.kind(), SelectorKind::Unix);
    assert_eq!(s.value(), "uid:1000");
    assert_eq!(s.to_string(), "unix:uid:1000");
    let k = sel("k8s:ns:shop");
    assert_eq!((k.kind(), k.value()), (SelectorKind::K8s, "ns:shop"));
    assert_eq!(Selector::new("k8s", "sa:web").unwrap(), sel("k8s:sa:web"));
}

#[test]
fn bad_selectors_are_refused() {
    let long = format!("unix:{}", "x".repeat(1025));
    for bad in [
        "",
        "unix",
        ":uid:1",
        "unix:",
        "docker:image:x",
        "UNIX:uid:1",
        "unix:uid:1\n",
        "unix:a\tb",
        long.as_str(),
    ] {
        let err = bad.parse::<Selector>().unwrap_err();
        assert!(
            matches!(&err, DatastoreError::BadSelector { selector, .. } if selector == bad),
            "{bad:?}: {err}"
        );
    }
    let err = Selector::new("", "uid:1").unwrap_err();
    assert_eq!(
        err.to_string(),
        "selector `:uid:1` is invalid: the type is empty"
    );
}

#[test]
fn a_scope_is_a_node_or_any_node_never_both() {
    assert_eq!(NodeScope::from_parts("n1", false).unwrap(), node("n1"));
    assert_eq!(NodeScope::from_parts("", true).unwrap(), NodeScope::AnyNode);
    for (n, any) in [("n1", true), ("", false)] {
        let err = NodeScope::from_parts(n, any).unwrap_err();
        assert!(matches!(err, DatastoreError::BadScope { .. }), "{err}");
    }
    let err = NodeScope::from_parts("a/b", false).unwrap_err();
    assert!(matches!(err, DatastoreError::BadNodeName { .. }), "{err}");
    assert_eq!(NodeScope::AnyNode.node(), "");
    assert!(NodeScope::AnyNode.is_any_node());
    assert_eq!(node("n1").node(), "n1");
}

// ---- entries ----

#[test]
fn entries_are_created_read_listed_and_deleted() {
    let (_dir, ds) = store();
    let mut new = new_entry(
        "spiffe://td/ns/shop/sa/web",
        &["unix:uid:1000", "unix:gid:50", "unix:uid:1000"],
        node("n1"),
    );
    new.ttl_seconds = 120;
    new.hint = "web frontend".into();
    let e = ds.create_entry(&new, now()).unwrap();
    assert_eq!(e.id.len(), 16);
    assert!(e.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    assert_eq!(e.spiffe_id, new.spiffe_id);
    // Sorted, repeats dropped.
    assert_eq!(e.selectors, vec![sel("unix:gid:50"), sel("unix:uid:1000")]);
    assert_eq!(e.scope, node("n1"));
    assert_eq!(e.ttl_seconds, 120);
    assert_eq!(e.ttl(), Some(secs(120)));
    assert_eq!(e.created_at, now());
    assert_eq!(e.hint, "web frontend");

    let any = ds
        .create_entry(
            &new_entry(
                "spiffe://td/ns/ops/sa/log",
                &["k8s:ns:ops"],
                NodeScope::AnyNode,
            ),
            now() + secs(1),
        )
        .unwrap();
    assert_eq!(any.ttl(), None);
    assert_eq!(ds.entry(&e.id).unwrap(), Some(e.clone()));
    assert_eq!(ds.list_entries().unwrap(), vec![e.clone(), any.clone()]);

    ds.delete_entry(&e.id).unwrap();
    assert_eq!(ds.entry(&e.id).unwrap(), None);
    assert_eq!(ds.list_entries().unwrap(), vec![any]);
    let err = ds.delete_entry(&e.id).unwrap_err();
    assert!(
        matches!(&err, DatastoreError::UnknownEntry { id } if *id == e.id),
        "{err}"
    );
    assert_eq!(ds.entry("nope").unwrap(), None);
}

#[test]
fn duplicate_entries_are_refused_whatever_the_selector_order() {
    let (_dir, ds) = store();
    let first = ds
        .create_entry(
            &new_entry("spiffe://td/a", &["unix:uid:1", "unix:gid:2"], node("n1")),
            now(),
        )
        .unwrap();
    let err = ds
        .create_entry(
            &new_entry(
                "spiffe://td/a",
                &["unix:gid:2", "unix:uid:1", "unix:gid:2"],
                node("n1"),
            ),
            now(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, DatastoreError::DuplicateEntry { spiffe_id, existing }
            if spiffe_id == "spiffe://td/a" && *existing == first.id),
        "{err}"
    );
    assert!(err.to_string().contains(&first.id), "{err}");
    // Differing in any of id, selectors or scope is a different entry.
    for other in [
        new_entry("spiffe://td/b", &["unix:uid:1", "unix:gid:2"], node("n1")),
        new_entry("spiffe://td/a", &["unix:uid:1"], node("n1")),
        new_entry("spiffe://td/a", &["unix:uid:1", "unix:gid:2"], node("n2")),
        new_entry(
            "spiffe://td/a",
            &["unix:uid:1", "unix:gid:2"],
            NodeScope::AnyNode,
        ),
    ] {
        ds.create_entry(&other, now()).unwrap();
    }
    assert_eq!(ds.list_entries().unwrap().len(), 5);
}

#[test]
fn bad_entries_are_refused() {
    let (_dir, ds) = store();
    let ok = || new_entry("spiffe://td/ns/a/sa/b", &["unix:uid:1"], node("n1"));

    for ttl in [-1, 1, 29, 86_401, i64::MAX] {
        let err = ds
            .create_entry(
                &NewEntry {
                    ttl_seconds: ttl,
                    ..ok()
                },
                now(),
            )
            .unwrap_err();
        assert!(
            matches!(err, DatastoreError::BadEntryTtl { ttl_seconds } if ttl_seconds == ttl),
            "{err}"
        );
    }
    for (i, ttl) in [0, 30, 86_400].into_iter().enumerate() {
        let mut e = ok();
        e.ttl_seconds = ttl;
        e.selectors = vec![sel(&format!("unix:uid:{i}"))];
        ds.create_entry(&e, now()).unwrap();
    }

    let err = ds
        .create_entry(
            &NewEntry {
                selectors: vec![],
                ..ok()
            },
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, DatastoreError::NoSelectors { .. }), "{err}");

    for reserved in [
        "spiffe://td",
        "spiffe://td/meshward/agent/join/n1",
        "spiffe://td/meshward/ca",
    ] {
        let err = ds
            .create_entry(
                &NewEntry {
                    spiffe_id: id(reserved),
                    ..ok()
                },
                now(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, DatastoreError::NotWorkloadId { spiffe_id, .. } if spiffe_id == reserved),
            "{err}"
        );
    }
    // Only the first segment is reserved.
    ds.create_entry(
        &NewEntry {
            spiffe_id: id("spiffe://td/ns/meshward/sa/x"),
            ..ok()
        },
        now(),
    )
    .unwrap();

    for hint in ["x".repeat(257), "a\nb".to_owned()] {
        let err = ds
            .create_entry(
                &NewEntry {
                    hint: hint.clone(),
                    ..ok()
                },
                now(),
            )
            .unwrap_err();
        assert!(matches!(err, DatastoreError::BadHint { .. }), "{err}");
    }

    let err = ds
        .create_entry(
            &NewEntry {
                scope: node(".."),
                ..ok()
            },
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, DatastoreError::BadNodeName { .. }), "{err}");

    assert_eq!(
        ds.list_entries().unwrap().len(),
        4,
        "no refused entry was stored"
    );
}

#[test]
fn a_node_sees_its_own_and_any_node_entries() {
    let (_dir, ds) = store();
    let a = ds
        .create_entry(
            &new_entry("spiffe://td/a", &["unix:uid:1"], node("n1")),
            now(),
        )
        .unwrap();
    let b = ds
        .create_entry(
            &new_entry("spiffe://td/b", &["unix:uid:2"], node("n2")),
            now(),
        )
        .unwrap();
    let all = ds
        .create_entry(
            &new_entry("spiffe://td/all", &["unix:uid:3"], NodeScope::AnyNode),
            now(),
        )
        .unwrap();
    assert_eq!(ds.entries_for_node("n1").unwrap(), vec![a, all.clone()]);
    assert_eq!(ds.entries_for_node("n2").unwrap(), vec![b, all.clone()]);
    assert_eq!(ds.entries_for_node("n3").unwrap(), vec![all]);
}

#[test]
fn entitlement_is_node_scoped() {
    let (_dir, ds) = store();
    ds.create_entry(
        &new_entry("spiffe://td/a", &["unix:uid:1"], node("n1")),
        now(),
    )
    .unwrap();
    ds.create_entry(
        &new_entry("spiffe://td/all", &["unix:uid:3"], NodeScope::AnyNode),
        now(),
    )
    .unwrap();
    let a = id("spiffe://td/a");
    let all = id("spiffe://td/all");
    assert!(ds.is_entitled("n1", &a).unwrap());
    assert!(!ds.is_entitled("n2", &a).unwrap(), "another node's entry");
    assert!(ds.is_entitled("n1", &all).unwrap());
    assert!(ds.is_entitled("n2", &all).unwrap());
    assert!(!ds.is_entitled("n1", &id("spiffe://td/other")).unwrap());
    assert!(!ds.is_entitled("n1", &id("spiffe://other/a")).unwrap());
    assert!(!ds.is_entitled("", &a).unwrap());
    // Deleting the entry takes the entitlement away.
    let entry = &ds.entries_for_node("n1").unwrap()[0];
    ds.delete_entry(&entry.id).unwrap();
    assert!(!ds.is_entitled("n1", &a).unwrap());
}

#[test]
fn the_entitlement_check_uses_an_index() {
    let (_dir, ds) = store();
    let plan: Vec<String> = ds
        .lock()
        .prepare(
            "EXPLAIN QUERY PLAN SELECT EXISTS (SELECT 1 FROM entries WHERE spiffe_id = ?1 AND node IN (?2, ''))",
        )
        .unwrap()
        .query_map(["spiffe://td/a", "n1"], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING") && step.contains("INDEX")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.starts_with("SCAN entries")),
        "{plan:?}"
    );
}

#[test]
fn concurrent_entry_creation_from_two_processes_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let handles = [
        Datastore::open(dir.path()).unwrap(),
        Datastore::open(dir.path()).unwrap(),
    ];
    let barrier = Arc::new(Barrier::new(2));
    // Both try the same 30 entries (plus 10 of their own): each shared entry must be created exactly
    // once and refused exactly once.
    let outcomes: Vec<(usize, usize)> = thread::scope(|s| {
        let workers: Vec<_> = handles
            .iter()
            .enumerate()
            .map(|(w, ds)| {
                let barrier = Arc::clone(&barrier);
                s.spawn(move || {
                    barrier.wait();
                    let (mut created, mut duplicates) = (0, 0);
                    for i in 0..40 {
                        let uid = if i < 30 { i } else { 100 * (w + 1) + i };
                        let e =
                            new_entry("spiffe://td/x", &[&format!("unix:uid:{uid}")], node("n1"));
                        match ds.create_entry(&e, now()) {
                            Ok(_) => created += 1,
                            Err(DatastoreError::DuplicateEntry { .. }) => duplicates += 1,
                            Err(other) => panic!("{other}"),
                        }
                    }
                    (created, duplicates)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let created: usize = outcomes.iter().map(|o| o.0).sum();
    let duplicates: usize = outcomes.iter().map(|o| o.1).sum();
    assert_eq!((created, duplicates), (50, 30), "{outcomes:?}");
    for ds in &handles {
        let entries = ds.list_entries().unwrap();
        assert_eq!(entries.len(), 50);
        let mut ids: Vec<_> = entries.iter().map(|e| e.id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50);
    }
    let check: String = raw(&handles[0])
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_hand_edited_row_is_reported_as_corrupt() {
    let (_dir, ds) = store();
    let e = ds
        .create_entry(
            &new_entry("spiffe://td/a", &["unix:uid:1"], node("n1")),
            now(),
        )
        .unwrap();
    raw(&ds)
        .execute(
            "UPDATE entries SET selectors = 'bogus' WHERE id = ?1",
            [&e.id],
        )
        .unwrap();
    let err = ds.entry(&e.id).unwrap_err();
    assert!(
        matches!(&err, DatastoreError::Corrupt { value, .. } if value == "bogus"),
        "{err}"
    );
}
