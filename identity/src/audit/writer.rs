//! The append side: one [`AuditLog`] per file per process, shared by every thread that decides.
//!
//! # Durability
//!
//! `append` only serializes, hashes and copies the line into an in-memory batch; it never touches
//! the file, so a thread that decides requests never waits for the disk (nor for a lock held across
//! a write). A background thread writes the batch to the file and `fsync`s it once the oldest
//! record in it is [`SyncPolicy::max_delay`] old or it holds [`SyncPolicy::max_records`] records,
//! whichever comes first; a batch of 64 KiB is written (not synced) by that thread at once. Only
//! when the disk falls so far behind that 4 MiB are waiting does `append` write the batch itself:
//! back-pressure, and the bound on memory. [`AuditLog::sync`] forces a batch out, and dropping the
//! log flushes and syncs what is left.
//!
//! So a crash of the process or the machine can lose at most the records appended since the last
//! completed `fsync` (about one batch), and never corrupts earlier records: lines are only appended
//! (`O_APPEND`), each batch is written with one `write_all` of whole lines, and a line cut short by a
//! crash is refused at the next [`AuditLog::open`] rather than written after.
//!
//! After a write or `fsync` fails, the log refuses every later record ([`AuditError::Failed`]): after
//! a failed `fsync` Linux may already have dropped the dirty pages, so carrying on would risk a chain
//! with a silent hole. The caller decides what a failed audit means (the proxy fails closed).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};
use rustix::fs::FlockOperation;
use tracing::{error, info, warn};

use super::cap::{MAX_LINE_BYTES, MAX_SHORT_BYTES};
use super::field::{ChainHash, RecordId};
use super::record::{AuditEvent, LineError, decode_line, encode_body, finish_line};

/// When the background thread writes and `fsync`s the pending batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Longest a record waits before it is synced.
    pub max_delay: Duration,
    /// Most records waiting before a sync is started (at least 1).
    pub max_records: usize,
}

impl Default for SyncPolicy {
    /// 50 ms or 1,000 records.
    fn default() -> Self {
        SyncPolicy {
            max_delay: Duration::from_millis(50),
            max_records: 1000,
        }
    }
}

/// Names a record just appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRecordRef {
    /// The record's id (the proxy names it in a 403 body).
    pub id: RecordId,
    /// Its position in the chain.
    pub seq: u64,
    /// Its hash: the chain's new head.
    pub hash: ChainHash,
}

/// Why the audit log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be created, opened or read.
    #[error("cannot open audit file `{path}`: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Another `AuditLog` (in this process or another) holds the file.
    #[error(
        "audit file `{path}` is locked by another writer: two writers would fork the chain; stop the other process or use another file"
    )]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The file ends in a partial line, left by a crash in the middle of a write.
    #[error(
        "audit file `{path}` ends with a partial record (a crash during a write?): run `meshward audit verify {path}`, keep a copy, and remove the partial last line before appending again"
    )]
    TornTail {
        /// The file.
        path: PathBuf,
    },
    /// The file's last record is not intact, so the chain cannot go on from it.
    #[error(
        "the last record of audit file `{path}` is not intact ({reason}): run `meshward audit verify {path}` before appending again"
    )]
    BadTail {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The node name is too long to put in every record.
    #[error("node name `{node}` is longer than {max} bytes")]
    NodeTooLong {
        /// The node name.
        node: String,
        /// The limit.
        max: usize,
    },
    /// The background sync thread could not be started.
    #[error("cannot start the audit sync thread for `{path}`: {source}")]
    Spawn {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Writing or syncing the file failed.
    #[error("cannot write audit file `{path}`: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// An earlier write or sync failed; the log takes no more records.
    #[error("audit file `{path}` takes no more records since an earlier failure: {reason}")]
    Failed {
        /// The file.
        path: PathBuf,
        /// The earlier failure.
        reason: String,
    },
    /// The system random source failed while making a record id.
    #[error("cannot make an audit record id: the system random source failed")]
    Random,
    /// The record could not be serialized.
    #[error("cannot encode an audit record: {0}")]
    Encode(String),
}

/// An open, locked audit file that records are appended to. Cheap to share: `append` takes `&self`.
pub struct AuditLog {
    shared: Arc<Shared>,
    syncer: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Opens the audit file at `path` with the default [`SyncPolicy`]; see [`AuditLog::open_with`].
    pub fn open(path: impl AsRef<Path>, node: &str) -> Result<AuditLog, AuditError> {
        Self::open_with(path, node, SyncPolicy::default())
    }

    /// Creates the audit file at `path` (mode 0600), or resumes the chain of an existing one from its
    /// last record, and locks it against other writers. `node` goes into every record.
    ///
    /// Resuming checks only the last record (its hash, so the chain goes on from an intact head); run
    /// [`verify_file`](super::verify_file) for the whole chain. A file ending in a partial line is
    /// refused with [`AuditError::TornTail`].
    pub fn open_with(
        path: impl AsRef<Path>,
        node: &str,
        policy: SyncPolicy,
    ) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_owned();
        if node.len() > MAX_SHORT_BYTES {
            return Err(AuditError::NodeTooLong {
                node: node.to_owned(),
                max: MAX_SHORT_BYTES,
            });
        }
        let (file, created) = open_file(&path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(AuditError::Locked { path }),
            Err(e) => {
                return Err(AuditError::Open {
                    path,
                    source: e.into(),
                });
            }
        }
        let (seq, head) = read_tail(&file, &path)?;
        warn_if_shared(&file, &path);
        if created {
            // The new directory entry must survive a crash too, or synced records could vanish with it.
            sync_parent_dir(&path).map_err(|source| AuditError::Open {
                path: path.clone(),
                source,
            })?;
        }
        let policy = SyncPolicy {
            max_records: policy.max_records.max(1),
            ..policy
        };
        let mut id_base = [0u8; 10];
        SystemRandom::new()
            .fill(&mut id_base)
            .map_err(|_| AuditError::Random)?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            node: node.to_owned(),
            policy,
            file,
            id_base,
            id_next: AtomicU64::new(0),
            state: Mutex::new(State {
                seq,
                head,
                pending: Vec::with_capacity(FLUSH_BYTES),
                unsynced: 0,
                oldest_unsynced: None,
                failed: None,
                stopping: false,
            }),
            wake: Condvar::new(),
            writer: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
        });
        let for_thread = Arc::clone(&shared);
        let syncer = std::thread::Builder::new()
            .name("meshward-audit-sync".to_owned())
            .spawn(move || run_syncer(&for_thread))
            .map_err(|source| AuditError::Spawn {
                path: path.clone(),
                source,
            })?;
        info!(path = %path.display(), seq, created, "audit log opened");
        Ok(AuditLog {
            shared,
            syncer: Some(syncer),
        })
    }

    /// Adds a record for `event` to the chain and returns its id, seq and hash.
    ///
    /// Thread-safe and cheap: serialization happens before the lock; under it only the chain fields
    /// are added, the line hashed and copied into the pending batch. The record is durable once the
    /// batch is synced (see the module docs), or after [`AuditLog::sync`].
    pub fn append(&self, event: AuditEvent) -> Result<AuditRecordRef, AuditError> {
        let n = self.shared.id_next.fetch_add(1, Ordering::Relaxed);
        let id = RecordId::sequenced(event.ts, &self.shared.id_base, n);
        let body = encode_body(event, id, &self.shared.node)
            .map_err(|e| AuditError::Encode(e.to_string()))?;
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        if let Some(reason) = &state.failed {
            return Err(AuditError::Failed {
                path: self.shared.path.clone(),
                reason: reason.clone(),
            });
        }
        let seq = state.seq + 1;
        let before = state.pending.len();
        let hash = finish_line(&mut state.pending, seq, &body, &state.head);
        state.seq = seq;
        state.head = hash;
        state.unsynced += 1;
        let after = state.pending.len();
        if state.unsynced == 1 {
            state.oldest_unsynced = Some(Instant::now());
            self.shared.wake.notify_one();
        } else if state.unsynced == self.shared.policy.max_records
            || (before < FLUSH_BYTES && after >= FLUSH_BYTES)
        {
            self.shared.wake.notify_one();
        }
        drop(guard);
        if after >= MAX_PENDING_BYTES {
            // The background thread is stuck (a disk that stopped answering): wait for it here.
            self.shared.write_out(false)?;
        }
        Ok(AuditRecordRef { id, seq, hash })
    }

    /// Writes and `fsync`s every record appended so far; when it returns `Ok`, they are durable.
    pub fn sync(&self) -> Result<(), AuditError> {
        self.shared.sync_now()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The node name written into every record.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The seq and hash of the last record appended (0 and [`ChainHash::GENESIS`] for an empty file):
    /// the head to anchor elsewhere.
    pub fn head(&self) -> (u64, ChainHash) {
        let state = self.shared.lock();
        (state.seq, state.head)
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path)
            .field("node", &self.shared.node)
            .finish()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(syncer) = self.syncer.take() {
            // The thread never panics (the workspace denies it); a join error would only mean it did.
            let _ = syncer.join();
        }
        match self.shared.sync_now() {
            Ok(()) | Err(AuditError::Failed { .. }) => {}
            Err(e) => {
                error!(path = %self.shared.path.display(), error = %e, "audit log: final sync failed")
            }
        }
    }
}

// ---- internals ----------------------------------------------------------------------------------

/// Pending bytes past which the background thread writes the batch without waiting for its sync.
const FLUSH_BYTES: usize = 64 * 1024;

/// Pending bytes past which `append` writes the batch itself (see the module docs).
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

struct Shared {
    path: PathBuf,
    node: String,
    policy: SyncPolicy,
    // INVARIANT: written only while `writer` is locked, and a batch is taken from
    // `State::pending` only while `writer` is locked, so batches land in chain order.
    file: File,
    /// The write lock, always taken before `state`; it holds the buffer the batch being written is
    /// swapped into, so `append` goes on into an empty one meanwhile.
    writer: Mutex<Vec<u8>>,
    /// Random once per writer; record ids add a counter to it (see [`RecordId::sequenced`]).
    id_base: [u8; 10],
    id_next: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Seq of the last record appended.
    seq: u64,
    /// Hash of the last record appended.
    head: ChainHash,
    /// Whole lines not yet written to the file.
    pending: Vec<u8>,
    /// Records appended since the last sync started.
    unsynced: usize,
    /// When the oldest of those was appended.
    oldest_unsynced: Option<Instant>,
    /// Set after a write or sync failure; every later append fails.
    failed: Option<String>,
    /// Set by `drop`: the syncer exits.
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding this lock can panic (the workspace denies panics), so a poisoned lock still
        // guards consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the pending batch. With `syncing`, the records in it are the ones the caller's
    /// `fsync` will make durable: the sync clock restarts for those appended after.
    fn write_out(&self, syncing: bool) -> Result<(), AuditError> {
        let mut batch = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut state = self.lock();
            if let Some(reason) = &state.failed {
                return Err(AuditError::Failed {
                    path: self.path.clone(),
                    reason: reason.clone(),
                });
            }
            std::mem::swap(&mut state.pending, &mut *batch);
            if syncing {
                state.unsynced = 0;
                state.oldest_unsynced = None;
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        // Outside the state lock: appends go on into the other buffer while this one is written.
        let written = (&self.file).write_all(&batch);
        batch.clear();
        if batch.capacity() > 4 * FLUSH_BYTES {
            // Grown while the disk was slow: do not keep the memory.
            batch.shrink_to(FLUSH_BYTES);
        }
        written.map_err(|source| {
            self.fail(&mut self.lock(), format!("write failed: {source}"));
            AuditError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn sync_now(&self) -> Result<(), AuditError> {
        self.write_out(true)?;
        // Outside both locks: appends go on into the next batch while the disk catches up.
        self.file.sync_data().map_err(|source| {
            self.fail(&mut self.lock(), format!("fsync failed: {source}"));
            AuditError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn fail(&self, state: &mut State, reason: String) {
        error!(path = %self.path.display(), reason = %reason, "audit log failed; no more records will be written");
        state.failed = Some(reason);
        state.pending.clear();
        state.unsynced = 0;
        state.oldest_unsynced = None;
    }
}

fn run_syncer(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.stopping || state.failed.is_some() {
            return;
        }
        if state.pending.len() >= FLUSH_BYTES {
            drop(state);
            // A failure is recorded in `state.failed`; the loop then exits.
            let _ = shared.write_out(false);
            state = shared.lock();
            continue;
        }
        let Some(oldest) = state.oldest_unsynced else {
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let due = oldest + shared.policy.max_delay;
        let now = Instant::now();
        if state.unsynced < shared.policy.max_records && now < due {
            state = match shared.wake.wait_timeout(state, due - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
            continue;
        }
        drop(state);
        // A failure is logged and recorded in `state.failed` by `sync_now`; the loop then exits.
        let _ = shared.sync_now();
        state = shared.lock();
    }
}

/// Opens `path` for appending, creating it 0600 if it does not exist; says whether it created it.
fn open_file(path: &Path) -> Result<(File, bool), AuditError> {
    let created = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map(|file| (file, false))
            .map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            }),
        Err(source) => Err(AuditError::Open {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Audit records name every caller and callee: a file others can read leaks the traffic graph.
fn warn_if_shared(file: &File, path: &Path) {
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format_args!("{mode:o}"), "audit file is accessible to other users; 0600 is expected");
        }
    }
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Reads the seq and hash of the file's last record, checking that it is whole and intact.
fn read_tail(file: &File, path: &Path) -> Result<(u64, ChainHash), AuditError> {
    let io_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let bad_tail = |reason: String| AuditError::BadTail {
        path: path.to_owned(),
        reason,
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok((0, ChainHash::GENESIS));
    }
    let newline_at = len - 1;
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, newline_at).map_err(io_err)?;
    if last != [b'\n'] {
        return Err(AuditError::TornTail {
            path: path.to_owned(),
        });
    }
    // Walk back from the final `\n` to the one before it, at most one maximal line.
    let max_line = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX);
    let mut start = newline_at;
    let mut chunk = vec![0u8; 8192];
    while start > 0 {
        if newline_at - start > max_line {
            return Err(bad_tail(format!(
                "its last line is longer than {MAX_LINE_BYTES} bytes"
            )));
        }
        let step = start.min(chunk.len() as u64);
        let from = start - step;
        let window = chunk
            .get_mut(..usize::try_from(step).unwrap_or(0))
            .unwrap_or_default();
        file.read_exact_at(window, from).map_err(io_err)?;
        if let Some(pos) = window.iter().rposition(|&b| b == b'\n') {
            start = from + pos as u64 + 1;
            break;
        }
        start = from;
    }
    if newline_at - start > max_line {
        return Err(bad_tail(format!(
            "its last line is longer than {MAX_LINE_BYTES} bytes"
        )));
    }
    let mut line = vec![0u8; usize::try_from(newline_at - start).unwrap_or(0)];
    file.read_exact_at(&mut line, start).map_err(io_err)?;
    let (record, computed) = decode_line(&line).map_err(|e| match e {
        LineError::Truncated => bad_tail("its last line is a partial record".to_owned()),
        LineError::Malformed(reason) => {
            bad_tail(format!("its last line is not an audit record: {reason}"))
        }
    })?;
    if computed != record.hash {
        return Err(bad_tail(format!(
            "record {} was edited: its content does not hash to its `hash`",
            record.seq
        )));
    }
    Ok((record.seq, record.hash))
}

#[cfg(test)]
mod tests;
