use std::collections::HashSet;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::cap::MAX_ID_BYTES;
use super::*;

pub(super) fn event(i: usize) -> AuditEvent {
    let decision = if i.is_multiple_of(3) {
        AuditDecision::Deny
    } else {
        AuditDecision::Allow
    };
    let mut e = AuditEvent::new(
        decision,
        format!("spiffe://example.org/ns/a/sa/p{i}"),
        "GET",
        "spiffe://example.org/ns/b/sa/api",
    );
    e.context
        .insert("path".to_owned(), json!(format!("/items/{i}")));
    e.context.insert("method".to_owned(), json!("GET"));
    e.policies.push(format!("policy{i}"));
    e.latency_us = 7;
    e
}

pub(super) fn issuance_event() -> AuditEvent {
    let mut e = AuditEvent::new(
        AuditDecision::Issued,
        "spiffe://example.org/meshward/agent/join/node-1",
        "issue",
        "spiffe://example.org/ns/shop/sa/web",
    );
    e.spiffe_id = Some("spiffe://example.org/ns/shop/sa/web".to_owned());
    e.serial = Some("0a1b2c".to_owned());
    e.not_after = Some("2030-01-02T03:04:05.000000Z".parse().unwrap());
    e.agent = Some("spiffe://example.org/meshward/agent/join/node-1".to_owned());
    e.pod = Some("shop/web-5d9".to_owned());
    e
}

/// A fresh audit file with `n` records, closed (so synced).
pub(super) fn write_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    for i in 0..n {
        log.append(event(i)).unwrap();
    }
    path
}

pub(super) fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub(super) fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

pub(super) fn verify(path: &Path) -> Result<VerifyReport, AuditVerifyError> {
    verify_file(path)
}

// ---- chain ------------------------------------------------------------------------------------------

#[test]
fn intact_file_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    let mut refs = Vec::new();
    for i in 0..20 {
        refs.push(log.append(event(i)).unwrap());
    }
    refs.push(log.append(issuance_event()).unwrap());
    let (seq, head) = log.head();
    drop(log);

    let report = verify(&path).unwrap();
    assert_eq!(report.records, 21);
    assert_eq!(seq, 21);
    assert_eq!(report.head, head);
    assert_eq!(refs.last().unwrap().hash, head);
    assert!(report.first_ts.unwrap() <= report.last_ts.unwrap());
    let seqs: Vec<u64> = refs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
    let ids: HashSet<RecordId> = refs.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 21, "record ids are unique");
}

#[test]
fn empty_file_verifies_with_no_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 0);
    let report = verify(&path).unwrap();
    assert_eq!(
        report,
        VerifyReport {
            records: 0,
            first_ts: None,
            last_ts: None,
            head: ChainHash::GENESIS
        }
    );
}

#[test]
fn first_record_links_to_genesis_and_hash_covers_the_line_up_to_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 2);
    let lines = lines(&path);
    let first: AuditRecord = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first.prev, ChainHash::GENESIS);
    assert_eq!(first.prev.to_string(), "0".repeat(64));
    // The documented scheme, recomputed independently of the crate's reader.
    let cut = lines[0].find(",\"hash\":\"").unwrap();
    let expected = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &lines[0].as_bytes()[..cut],
    ));
    assert_eq!(first.hash.to_string(), expected);
    let second: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second.prev, first.hash);
    assert_eq!(second.seq, 2);
}

#[test]
fn record_serializes_back_to_the_exact_line() {
    // Holds the writer's `Body` and the reader's `AuditRecord` to the same member order.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    log.append(event(1)).unwrap();
    log.append(issuance_event()).unwrap();
    let mut capped = event(2);
    capped.principal = "p".repeat(MAX_ID_BYTES + 1);
    log.append(capped).unwrap();
    drop(log);
    for line in lines(&path) {
        let record: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(serde_json::to_string(&record).unwrap(), line);
    }
}

#[test]
fn record_fields_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "node-7").unwrap();
    let mut authz = event(3);
    authz.mode = Mode::DryRun;
    authz.errors.push("entity `x` not found".to_owned());
    let authz_ref = log.append(authz.clone()).unwrap();
    log.append(issuance_event()).unwrap();
    drop(log);

    let records: Vec<ReadRecord> = AuditReader::open(&path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let r = &records[0].record;
    assert_eq!(records[0].line, 1);
    assert!(records[0].is_intact());
    assert_eq!(r.id, authz_ref.id);
    assert_eq!(
        (r.kind, r.decision, r.mode),
        (AuditKind::Authz, AuditDecision::Deny, Mode::DryRun)
    );
    assert_eq!(r.ts, authz.ts);
    assert_eq!(
        (r.principal.as_str(), r.action.as_str()),
        (authz.principal.as_str(), "GET")
    );
    assert_eq!(r.context, authz.context);
    assert_eq!(r.policies, vec!["policy3"]);
    assert_eq!(r.errors, vec!["entity `x` not found"]);
    assert_eq!((r.latency_us, r.node.as_str()), (7, "node-7"));
    assert_eq!(r.spiffe_id, None);
    assert!(r.truncated.is_empty());

    let line1 = &lines(&path)[0];
    assert!(line1.contains("\"mode\":\"dry-run\""), "{line1}");
    for absent in [
        "spiffe_id",
        "serial",
        "not_after",
        "agent",
        "pod",
        "truncated",
    ] {
        assert!(
            !line1.contains(&format!("\"{absent}\"")),
            "`{absent}` must be omitted: {line1}"
        );
    }

    let i = &records[1].record;
    assert_eq!(
        (i.kind, i.decision),
        (AuditKind::Issuance, AuditDecision::Issued)
    );
    assert_eq!(i.serial.as_deref(), Some("0a1b2c"));
    assert_eq!(
        i.not_after.unwrap().to_string(),
        "2030-01-02T03:04:05.000000Z"
    );
    assert_eq!(i.pod.as_deref(), Some("shop/web-5d9"));
}

#[test]
fn edited_field_is_an_edited_record_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 10);
    let mut lines = lines(&path);
    let original = lines[3].clone();
    lines[3] = original.replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    assert_ne!(lines[3], original, "record 4 is a deny");
    write_lines(&path, &lines);

    match verify(&path) {
        Err(AuditVerifyError::EditedRecord {
            line: 4,
            seq: 4,
            stated,
            computed,
        }) => assert_ne!(stated, computed),
        other => panic!("expected EditedRecord at line 4, got {other:?}"),
    }
}

#[test]
fn edited_and_rehashed_record_breaks_the_link_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 6);
    let mut lines = lines(&path);
    // Forge record 3 with a recomputed hash: it verifies alone, but record 4 still points at the original.
    let edited = lines[2].replace("p2", "p9");
    let cut = edited.find(",\"hash\":\"").unwrap();
    let hash = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &edited.as_bytes()[..cut],
    ));
    lines[2] = format!("{},\"hash\":\"{hash}\"}}", &edited[..cut]);
    write_lines(&path, &lines);

    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BrokenChain {
                line: 4,
                seq: 4,
                prev_seq: 3,
                gap: ChainGap::Relinked
            }
        ),
        "{err:?}"
    );
}

#[test]
fn deleted_middle_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 10);
    let mut lines = lines(&path);
    lines.remove(5); // record 6
    write_lines(&path, &lines);

    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BrokenChain {
                line: 6,
                seq: 7,
                prev_seq: 5,
                gap: ChainGap::Missing { first: 6, last: 6 }
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "line 6: record 7 follows record 5: record 6 is missing"
    );
    assert_eq!(err.line(), Some(6));
    assert_eq!(err.kind(), "broken_chain");
}

#[test]
fn deleted_run_of_records_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 10);
    let mut lines = lines(&path);
    lines.drain(2..5); // records 3, 4, 5
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("record 6 follows record 2: records 3 to 5 are missing"),
        "{err}"
    );
}

#[test]
fn swapped_records_are_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 10);
    let mut lines = lines(&path);
    lines.swap(3, 4); // records 4 and 5
    write_lines(&path, &lines);

    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BrokenChain {
                line: 4,
                seq: 5,
                prev_seq: 3,
                gap: ChainGap::OutOfOrder {
                    expected: 4,
                    found_at_line: Some(5)
                }
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("out of order"), "{err}");
}

#[test]
fn seq_going_backwards_is_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 5);
    let mut lines = lines(&path);
    let moved = lines.remove(1); // record 2 moves to the end
    lines.push(moved);
    write_lines(&path, &lines);
    // 1, 3, 4, 5, 2: at line 2, record 3 follows 1 while record 2 is at line 5.
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BrokenChain {
                line: 2,
                gap: ChainGap::OutOfOrder {
                    expected: 2,
                    found_at_line: Some(5)
                },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn repeated_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 4);
    let mut lines = lines(&path);
    lines.insert(2, lines[1].clone());
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BrokenChain {
                line: 3,
                seq: 2,
                gap: ChainGap::Repeated,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn partial_line_in_the_middle_is_truncated_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 6);
    let mut lines = lines(&path);
    let cut = lines[2].len() / 2;
    lines[2].truncate(cut);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Truncated { line: 3 }),
        "{err:?}"
    );
}

#[test]
fn partial_line_with_a_record_glued_on_is_truncated() {
    // What a torn write followed by a blind append looks like.
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 4);
    let mut lines = lines(&path);
    let cut = lines[1].len() / 2;
    let glued = format!("{}{}", &lines[1][..cut], lines[2]);
    lines[1] = glued;
    lines.remove(2);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Truncated { line: 2 }),
        "{err:?}"
    );
}

#[test]
fn torn_last_line_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() - 20]).unwrap();
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Truncated { line: 3 }),
        "{err:?}"
    );
}

#[test]
fn non_json_line_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let mut lines = lines(&path);
    lines.insert(1, "hello, auditor".to_owned());
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Malformed { line: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn empty_line_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let mut lines = lines(&path);
    lines.insert(2, String::new());
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Malformed { line: 3, ref reason } if reason == "empty line"),
        "{err:?}"
    );
}

#[test]
fn reformatted_line_is_malformed() {
    // `jq -c` style rewrite: same members, another order.
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let mut lines = lines(&path);
    let mut value: serde_json::Map<String, Value> = serde_json::from_str(&lines[1]).unwrap();
    let hash = value.remove("hash").unwrap();
    let mut reordered = serde_json::Map::new();
    reordered.insert("hash".to_owned(), hash);
    reordered.extend(value);
    lines[1] = serde_json::to_string(&reordered).unwrap();
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Malformed { line: 2, ref reason } if reason.contains("`hash` is not the last member")),
        "{err:?}"
    );
}

#[test]
fn kind_that_does_not_match_decision_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 2);
    let mut lines = lines(&path);
    lines[1] = lines[1].replace("\"kind\":\"authz\"", "\"kind\":\"issuance\"");
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::Malformed { line: 2, ref reason } if reason.contains("does not belong to kind")),
        "{err:?}"
    );
}

#[test]
fn removed_first_record_is_a_bad_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 5);
    let mut lines = lines(&path);
    lines.remove(0);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::BadFirstRecord {
                line: 1,
                problem: FirstRecordProblem::NotSeqOne(2)
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("record 1 was removed from the start"),
        "{err}"
    );
}

#[test]
fn removed_end_records_are_caught_only_by_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 8);
    let anchored = verify(&path).unwrap();
    let mut lines = lines(&path);
    lines.truncate(6);
    write_lines(&path, &lines);

    // The shorter chain is valid on its own ...
    assert_eq!(verify(&path).unwrap().records, 6);
    // ... but not against what was anchored.
    let by_count = Anchor {
        head: None,
        records: Some(anchored.records),
    };
    let err = verify_file_anchored(&path, &by_count).unwrap_err();
    assert!(
        matches!(
            err,
            AuditVerifyError::TooFewRecords {
                line: 7,
                expected: 8,
                actual: 6
            }
        ),
        "{err:?}"
    );
    let by_head = Anchor {
        head: Some(anchored.head),
        records: None,
    };
    let err = verify_file_anchored(&path, &by_head).unwrap_err();
    assert!(
        matches!(err, AuditVerifyError::HeadNotFound { line: 7, expected, .. } if expected == anchored.head),
        "{err:?}"
    );
}

#[test]
fn anchor_still_holds_after_more_records_are_appended() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 4);
    let anchored = verify(&path).unwrap();
    let log = AuditLog::open(&path, "node-1").unwrap();
    log.append(event(9)).unwrap();
    drop(log);
    let anchor = Anchor {
        head: Some(anchored.head),
        records: Some(anchored.records),
    };
    assert_eq!(verify_file_anchored(&path, &anchor).unwrap().records, 5);
}

#[test]
fn missing_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = verify(&dir.path().join("nope.jsonl")).unwrap_err();
    assert!(matches!(err, AuditVerifyError::Open { .. }), "{err:?}");
    assert!(!err.is_tampering());
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}

// ---- reader -----------------------------------------------------------------------------------------

#[test]
fn reader_goes_on_after_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let mut lines = lines(&path);
    lines.insert(1, "{not json".to_owned());
    lines.insert(2, "x".repeat(MAX_LINE_BYTES + 10));
    write_lines(&path, &lines);
    let items: Vec<_> = AuditReader::open(&path).unwrap().collect();
    assert_eq!(items.len(), 5);
    assert!(
        matches!(items[1], Err(AuditReadError::Malformed { line: 2, .. })),
        "{:?}",
        items[1]
    );
    match &items[2] {
        Err(AuditReadError::Malformed { line: 3, reason }) => {
            assert!(reason.contains("longer than"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let seqs: Vec<u64> = items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .map(|r| r.record.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(items[4].as_ref().unwrap().line, 5);
}

#[test]
fn reader_over_any_bufread() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let bytes = fs::read(&path).unwrap();
    let report = verify_records(AuditReader::new(Cursor::new(bytes)), &Anchor::default()).unwrap();
    assert_eq!(report.records, 3);
}
