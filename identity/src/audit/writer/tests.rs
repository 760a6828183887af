use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::audit::tests::{event, issuance_event, lines, verify, write_file, write_lines};
use crate::audit::*;

/// A log at `audit.jsonl` in a fresh temp dir (kept alive by the returned guard), synced by its
/// background thread after `max_delay` or `max_records`.
fn open_log(
    max_delay: Duration,
    max_records: usize,
) -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let policy = SyncPolicy {
        max_delay,
        max_records,
    };
    let log = AuditLog::open_with(&path, "node-1", policy).unwrap();
    (dir, path, log)
}

#[test]
fn new_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 1);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn reopen_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let before = verify(&path).unwrap();
    let log = AuditLog::open(&path, "node-2").unwrap();
    assert_eq!(log.head(), (3, before.head));
    let next = log.append(event(3)).unwrap();
    assert_eq!(next.seq, 4);
    log.append(event(4)).unwrap();
    drop(log);
    let lines = lines(&path);
    let fourth: AuditRecord = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(fourth.prev, before.head);
    assert_eq!(fourth.node, "node-2");
    assert_eq!(verify(&path).unwrap().records, 5);
}

#[test]
fn torn_tail_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() - 30]).unwrap();
    let err = AuditLog::open(&path, "node-1").unwrap_err();
    assert!(matches!(err, AuditError::TornTail { .. }), "{err:?}");
    assert!(err.to_string().contains("meshward audit verify"), "{err}");
    // Nothing was appended to the damaged file.
    assert_eq!(fs::read_to_string(&path).unwrap(), text[..text.len() - 30]);
}

#[test]
fn edited_last_record_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 3);
    let mut lines = lines(&path);
    lines[2] = lines[2].replace("p2", "p7");
    write_lines(&path, &lines);
    let err = AuditLog::open(&path, "node-1").unwrap_err();
    assert!(
        matches!(err, AuditError::BadTail { ref reason, .. } if reason.contains("record 3 was edited")),
        "{err:?}"
    );
}

#[test]
fn garbage_last_line_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    fs::write(&path, "not an audit record\n").unwrap();
    let err = AuditLog::open(&path, "node-1").unwrap_err();
    assert!(matches!(err, AuditError::BadTail { .. }), "{err:?}");
}

#[test]
fn second_writer_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let first = AuditLog::open(&path, "node-1").unwrap();
    first.append(event(0)).unwrap();
    let err = AuditLog::open(&path, "node-1").unwrap_err();
    assert!(
        matches!(err, AuditError::Locked { ref path } if path.ends_with("audit.jsonl")),
        "{err:?}"
    );
    assert!(err.to_string().contains("audit.jsonl"), "{err}");
    drop(first);
    let again = AuditLog::open(&path, "node-1").unwrap();
    assert_eq!(again.head().0, 1);
}

#[test]
fn overlong_node_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = AuditLog::open(dir.path().join("a.jsonl"), &"n".repeat(300)).unwrap_err();
    assert!(
        matches!(err, AuditError::NodeTooLong { max: 256, .. }),
        "{err:?}"
    );
}

#[test]
fn records_reach_the_file_without_an_explicit_sync() {
    let (_dir, path, log) = open_log(Duration::from_millis(5), 1000);
    log.append(event(0)).unwrap();
    // The background thread writes the batch once it is 5 ms old; allow a slow machine plenty of time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(verify(&path), Ok(report) if report.records == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch was never written"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(verify(&path).unwrap().records, 1);
    drop(log);
}

#[test]
fn sync_writes_everything_appended() {
    let (_dir, path, log) = open_log(Duration::from_secs(3600), 1_000_000);
    for i in 0..5 {
        log.append(event(i)).unwrap();
    }
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        0,
        "nothing is written before the policy says so"
    );
    log.sync().unwrap();
    assert_eq!(verify(&path).unwrap().records, 5);
    drop(log);
}

#[test]
fn log_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AuditLog>();
}

// ---- caps -------------------------------------------------------------------------------------------

#[test]
fn oversized_fields_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    let mut e = issuance_event();
    // Control characters escape six-fold in JSON: the worst case for the line length.
    let huge = "\u{1}".repeat(20_000);
    e.principal = huge.clone();
    e.action = huge.clone();
    e.resource = format!("é{huge}");
    e.spiffe_id = Some(huge.clone());
    e.serial = Some(huge.clone());
    e.agent = Some(huge.clone());
    e.pod = Some(huge.clone());
    e.policies = vec![huge.clone(); 100];
    e.errors = vec![huge.clone(); 100];
    for i in 0..200 {
        e.context
            .insert(format!("header-{i}"), Value::String(huge.clone()));
    }
    log.append(e).unwrap();
    drop(log);

    let text = fs::read_to_string(&path).unwrap();
    assert!(text.len() <= MAX_LINE_BYTES, "line is {} bytes", text.len());
    let record = AuditReader::open(&path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .record;
    assert!(
        record.principal.len() <= MAX_ID_BYTES && record.principal.ends_with(TRUNCATION_MARKER)
    );
    assert!(record.resource.starts_with('é') && record.resource.ends_with(TRUNCATION_MARKER));
    assert_eq!(record.policies.len(), MAX_POLICIES);
    assert_eq!(record.errors.len(), MAX_ERRORS);
    assert!(serde_json::to_string(&record.context).unwrap().len() <= MAX_CONTEXT_BYTES);
    assert!(
        record
            .context
            .get("_truncated")
            .and_then(Value::as_u64)
            .unwrap()
            > 190
    );
    assert_eq!(
        record.truncated,
        [
            "principal",
            "action",
            "resource",
            "context",
            "policies",
            "errors",
            "spiffe_id",
            "serial",
            "agent",
            "pod"
        ]
    );
    assert_eq!(verify(&path).unwrap().records, 1);
}

#[test]
fn deep_context_is_capped_and_still_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "node-1").unwrap();
    let mut deep = Value::Null;
    for _ in 0..500 {
        deep = Value::Array(vec![deep]);
    }
    let mut e = event(0);
    e.context.insert("deep".to_owned(), deep);
    log.append(e).unwrap();
    drop(log);
    let record = AuditReader::open(&path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .record;
    assert_eq!(record.truncated, ["context"]);
    assert!(
        serde_json::to_string(&record.context)
            .unwrap()
            .contains(TRUNCATION_MARKER)
    );
}

#[test]
fn small_fields_are_not_capped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), 1);
    assert!(!fs::read_to_string(&path).unwrap().contains("truncated"));
}

// ---- batching and writing ---------------------------------------------------------------------------

/// An event whose line is about 1.3 KB, so batches cross the write thresholds often.
fn wide_event(thread: usize, i: usize) -> AuditEvent {
    let mut e = event(i);
    e.principal = format!("t{thread}-{i}-{}", "x".repeat(800));
    e
}

#[test]
fn appends_from_many_threads_while_syncs_run_make_one_chain() {
    const THREADS: usize = 6;
    const PER_THREAD: usize = 500;
    // Background syncs every 32 records or 1 ms, explicit syncs from another thread, and batches
    // past the 64 KiB mark that the background thread writes at once, all at the same time.
    let (_dir, path, log) = open_log(Duration::from_millis(1), 32);
    let log = Arc::new(log);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let (log, done) = (Arc::clone(&log), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut syncs = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                log.sync().unwrap();
                syncs += 1;
            }
            syncs
        })
    };
    let appenders: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut seqs = Vec::with_capacity(PER_THREAD);
                for i in 0..PER_THREAD {
                    seqs.push(log.append(wide_event(t, i)).unwrap().seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = appenders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(syncer.join().unwrap() > 0, "no explicit sync ran");
    // Every synced record is in the file before `sync` returns.
    log.sync().unwrap();
    let total = (THREADS * PER_THREAD) as u64;
    assert_eq!(log.head().0, total);
    let report = verify(&path).unwrap();
    assert_eq!(report.records, total);
    assert_eq!(report.head, log.head().1);
    drop(Arc::into_inner(log).unwrap());

    // Each seq was handed out once, and the file holds the records in seq order, each once.
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let mut seen = HashSet::new();
    for (n, r) in AuditReader::open(&path).unwrap().enumerate() {
        let record = r.unwrap().record;
        assert_eq!(record.seq, n as u64 + 1, "records out of order");
        assert!(seen.insert(record.principal), "a record appears twice");
    }
    for t in 0..THREADS {
        for i in 0..PER_THREAD {
            assert!(
                seen.contains(&wide_event(t, i).principal),
                "t{t}-{i} is missing"
            );
        }
    }
    assert_eq!(verify(&path).unwrap().records, total);
}

#[test]
fn a_full_batch_is_written_before_its_sync_is_due() {
    let (_dir, path, log) = open_log(Duration::from_secs(3600), 1_000_000);
    log.append(wide_event(0, 0)).unwrap();
    log.sync().unwrap();
    let line = usize::try_from(fs::metadata(&path).unwrap().len()).unwrap();
    // Just past the 64 KiB mark.
    let count = super::FLUSH_BYTES / line + 2;
    for i in 1..=count {
        log.append(wide_event(0, i)).unwrap();
    }
    // The batch is written once it holds 64 KiB, although no sync is due for an hour (a bound on
    // memory); the wait allows for a writer other than the appending thread.
    let written = || fs::metadata(&path).unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while written() < (line + super::FLUSH_BYTES) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the full batch was never written ({} bytes in the file)",
            written()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Whole lines only, an intact chain.
    assert!(verify(&path).unwrap().records >= (super::FLUSH_BYTES / line) as u64);
    let expected = (count + 1) as u64;
    log.append(wide_event(0, count + 1)).unwrap();
    drop(log);
    assert_eq!(verify(&path).unwrap().records, expected + 1);
}

/// A thread that decides requests must never wait for the disk: while a write is under way (here
/// the write lock is held, as during a write the disk is slow to take), appends go on into the
/// next batch, past the 64 KiB a batch is written at; once the write is done, every record lands,
/// in chain order.
#[test]
fn appends_do_not_wait_for_a_write_under_way() {
    let (_dir, path, log) = open_log(Duration::from_millis(1), 1);
    let log = Arc::new(log);
    let count = 3 * super::FLUSH_BYTES / 900;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let _writing = log.shared.writer.lock().unwrap();
        let appender = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..count {
                    log.append(wide_event(0, i)).unwrap();
                }
                done_tx.send(()).unwrap();
            })
        };
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("appends waited for the write under way");
        appender.join().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 0, "nothing written yet");
        assert!(log.shared.lock().pending.len() >= 2 * super::FLUSH_BYTES);
    }
    log.sync().unwrap();
    assert_eq!(verify(&path).unwrap().records, count as u64);
}

/// An audit log on /dev/full, which takes the open and the lock, then fails every write with
/// ENOSPC; `None` (with the reason printed) where there is no /dev/full.
fn open_dev_full(policy: SyncPolicy) -> Option<AuditLog> {
    let path = std::path::Path::new("/dev/full");
    if !path.exists() {
        println!("skipped: /dev/full is missing");
        return None;
    }
    // Several tests share /dev/full: wait for another one to let go of its lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match AuditLog::open_with(path, "node-1", policy) {
            Ok(log) => return Some(log),
            Err(AuditError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[test]
fn a_failed_write_refuses_every_later_record() {
    let policy = SyncPolicy {
        max_delay: Duration::from_secs(3600),
        max_records: 1_000_000,
    };
    let Some(log) = open_dev_full(policy) else {
        return;
    };
    let first = log.append(event(0)).unwrap();
    assert_eq!(first.seq, 1);
    let err = log.sync().unwrap_err();
    assert!(
        matches!(&err, AuditError::Write { source, .. } if source.raw_os_error() == Some(28)),
        "{err:?}"
    );
    assert!(err.to_string().contains("/dev/full"), "{err}");
    let err = log.append(event(1)).unwrap_err();
    assert!(
        matches!(&err, AuditError::Failed { reason, .. } if reason.contains("write failed")),
        "{err:?}"
    );
    assert!(matches!(log.sync(), Err(AuditError::Failed { .. })));
    // The refused record did not advance the chain.
    assert_eq!(log.head(), (1, first.hash));
}

#[test]
fn a_failed_background_write_refuses_every_later_record() {
    let policy = SyncPolicy {
        max_delay: Duration::from_millis(1),
        max_records: 1,
    };
    let Some(log) = open_dev_full(policy) else {
        return;
    };
    log.append(event(0)).unwrap();
    // The background thread's write fails; from then on every record is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match log.append(event(1)) {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the failed write was never noticed"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    assert!(
        matches!(&err, AuditError::Failed { reason, .. } if reason.contains("write failed")),
        "{err:?}"
    );
    assert!(matches!(log.sync(), Err(AuditError::Failed { .. })));
    assert!(matches!(
        log.append(event(2)),
        Err(AuditError::Failed { .. })
    ));
}
