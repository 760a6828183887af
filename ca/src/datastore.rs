//! The CA's persistent state in standalone mode: join tokens, registration entries, attested agents, the
//! issuance journal and the signing authorities, in one SQLite file (`ca.sqlite3`, 0600) in the data dir.
//!
//! [`Datastore`] is a cheap-to-clone handle over one connection. Every call is synchronous and short; the
//! async CA service calls it through `tokio::task::spawn_blocking`.
//!
//! Several CA processes may share one data dir (replicas on a shared volume, or `meshward ca token create`
//! next to a running CA). SQLite's file locks keep that safe as long as every read-then-write runs in one
//! `BEGIN IMMEDIATE` transaction, which is what every mutating call here does: the write lock is taken
//! before the first read, so two writers never act on the same stale read. WAL mode lets readers go on
//! while one writer holds the lock, and `busy_timeout` makes a writer wait for the lock instead of failing.
//!
//! Rows map onto the CA API messages (`meshward.ca.v1.Entry`, `Selector`, `Agent`, `Authority`); times
//! are stored as unix seconds, like the API.
//!
//! Start reading at [`Datastore::open`], then [`tokens`], [`agents`] (the eviction rule), [`entries`] and
//! [`authorities`] (the root rotation states).

pub mod agents;
pub mod authorities;
pub mod entries;
pub mod journal;
mod schema;
pub mod tokens;

#[cfg(test)]
mod tests;

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub use agents::{Admission, Agent, AgentError, AttestationMethod, NewAgent, PendingSvid};
pub use authorities::{Authority, AuthorityError, AuthorityState, authority_id};
pub use entries::{Entry, NewEntry, NodeScope, Selector, SelectorKind};
pub use journal::Issued;
pub use tokens::{JoinGrant, JoinToken, JoinTokenSecret, TokenError};

/// The database file's name inside the CA's data dir.
pub const DB_FILE: &str = "ca.sqlite3";

/// How long a writer waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest node name accepted: a Kubernetes node name is a DNS subdomain (at most 253 characters).
const MAX_NODE_NAME_LEN: usize = 253;

/// A handle to the CA's SQLite database; clone it freely, every clone shares one connection.
#[derive(Clone)]
pub struct Datastore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

/// Why the datastore could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// A file system operation on the data dir failed.
    #[error("could not {doing} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// SQLite failed.
    #[error("could not {doing}: {source}")]
    Sqlite {
        /// What was being done.
        doing: &'static str,
        /// The cause.
        source: rusqlite::Error,
    },
    /// SQLite would not switch to write-ahead logging.
    #[error(
        "sqlite kept journal mode `{mode}` instead of `wal`; put the data dir on a local file system"
    )]
    NotWal {
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// The database was written by a newer meshward.
    #[error(
        "database schema version `{found}` is newer than this meshward supports (`{supported}`); upgrade meshward"
    )]
    SchemaTooNew {
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// A stored value does not parse; someone edited the database by hand, or it is damaged.
    #[error("the database holds an invalid {what} `{value}`")]
    Corrupt {
        /// What kind of value.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A node name is not usable as a SPIFFE ID path segment.
    #[error("node name `{node}` is invalid: {reason}")]
    BadNodeName {
        /// The name as given.
        node: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A join token lifetime is out of range.
    #[error("join token ttl `{}s` is out of range: use 1s to 7 days", ttl.as_secs())]
    BadTokenTtl {
        /// The requested lifetime.
        ttl: Duration,
    },
    /// A selector is not `type:value` with a known type.
    #[error("selector `{selector}` is invalid: {reason}")]
    BadSelector {
        /// The selector as given.
        selector: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry without selectors would match every workload on its nodes.
    #[error(
        "an entry for `{spiffe_id}` needs at least one selector (e.g. `unix:uid:1000`, `k8s:ns:shop`)"
    )]
    NoSelectors {
        /// The entry's SPIFFE ID.
        spiffe_id: String,
    },
    /// An entry named both a node and any-node, or neither.
    #[error(
        "an entry needs exactly one of a node name (`{node}` given) or any-node (`{any_node}` given)"
    )]
    BadScope {
        /// The node name given.
        node: String,
        /// Whether any-node was set.
        any_node: bool,
    },
    /// An entry's SVID lifetime is out of range.
    #[error(
        "entry ttl `{ttl_seconds}s` is out of range: use 0 (the ca default) or 30 to 86400 seconds"
    )]
    BadEntryTtl {
        /// The requested lifetime.
        ttl_seconds: i64,
    },
    /// An entry's hint is too long or holds control characters.
    #[error("entry hint `{hint}` is invalid: {reason}")]
    BadHint {
        /// The hint as given.
        hint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry's SPIFFE ID cannot be a workload identity.
    #[error("spiffe id `{spiffe_id}` cannot be given to workloads: {reason}")]
    NotWorkloadId {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// Why not.
        reason: &'static str,
    },
    /// The same entry exists already.
    #[error(
        "an entry for `{spiffe_id}` with the same selectors and node scope already exists (id `{existing}`)"
    )]
    DuplicateEntry {
        /// The entry's SPIFFE ID.
        spiffe_id: String,
        /// The existing entry's id.
        existing: String,
    },
    /// No entry has this id.
    #[error("no entry has id `{id}`; `meshward ca entry list` shows them")]
    UnknownEntry {
        /// The id asked for.
        id: String,
    },
}

impl Datastore {
    /// Opens (creating if needed) `ca.sqlite3` in `data_dir` and brings its schema up to date.
    ///
    /// A missing data dir is created 0700; the database file is created 0600, and tightened to 0600 if
    /// it is readable by others (it holds no keys, but it holds who may mint what).
    pub fn open(data_dir: &Path) -> Result<Self, DatastoreError> {
        if !data_dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(|source| DatastoreError::Io {
                    doing: "create data dir",
                    path: data_dir.to_path_buf(),
                    source,
                })?;
        }
        let path = data_dir.join(DB_FILE);
        create_private_file(&path)?;

        // The file exists now, so no CREATE flag: if it vanished in between we want an error, not a
        // database with default permissions. NO_MUTEX: our own Mutex serializes access.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).doing("open the database")?;
        configure(&conn)?;
        schema::migrate(&mut conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction and commits if it returns `Ok`; on `Err` (or a panic)
    /// the transaction rolls back when dropped.
    fn write<T, E>(
        &self,
        doing: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<DatastoreError>,
    {
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a DEFERRED transaction
        // that reads and then writes can fail with SQLITE_BUSY without waiting when another process wrote
        // in between, and worse, would have acted on what it read before.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .doing(doing)?;
        let out = f(&tx)?;
        tx.commit().doing(doing)?;
        Ok(out)
    }

    /// Runs `f` on the connection, outside any explicit transaction (each statement is atomic by itself).
    fn read<T, E>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E> {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the database half-written (an open transaction
        // rolls back when dropped), so the connection is still good to use.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Checks that `node` can be a node name: one SPIFFE ID path segment of `[a-zA-Z0-9._-]`, not `.` or `..`.
///
/// Node names end up in agent SPIFFE IDs (`spiffe://td/meshward/agent/join/<node>`), so they must be
/// valid segments; the CLI can call this to refuse a bad name before reaching the CA.
pub fn validate_node_name(node: &str) -> Result<(), DatastoreError> {
    let bad = |reason| {
        Err(DatastoreError::BadNodeName {
            node: node.to_owned(),
            reason,
        })
    };
    if node.is_empty() {
        return bad("it is empty");
    }
    if node == "." || node == ".." {
        return bad("`.` and `..` are not allowed");
    }
    if node.len() > MAX_NODE_NAME_LEN {
        return bad("it is longer than 253 characters");
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("use only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// Adds "what was being done" to a rusqlite result.
pub(crate) trait Doing<T> {
    fn doing(self, doing: &'static str) -> Result<T, DatastoreError>;
}

impl<T> Doing<T> for rusqlite::Result<T> {
    fn doing(self, doing: &'static str) -> Result<T, DatastoreError> {
        self.map_err(|source| DatastoreError::Sqlite { doing, source })
    }
}

/// Unix seconds, as stored; saturating, and negative before 1970.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The inverse of [`unix_seconds`] (to the second).
pub(crate) fn from_unix_seconds(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// `N` bytes from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], DatastoreError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DatastoreError::Random)?;
    Ok(bytes)
}

/// Creates `path` 0600 if missing; tightens an existing file that others could read.
fn create_private_file(path: &Path) -> Result<(), DatastoreError> {
    let io_err = |doing| {
        move |source| DatastoreError::Io {
            doing,
            path: path.to_path_buf(),
            source,
        }
    };
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create the database file"))?;
    let mode = fs::metadata(path)
        .map_err(io_err("inspect the database file"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "database file was readable by others; setting 0600");
        fs::set_permissions(path, Permissions::from_mode(0o600))
            .map_err(io_err("restrict the database file to 0600"))?;
    }
    Ok(())
}

/// Per-connection settings; they are not stored in the file, so every open sets them.
fn configure(conn: &Connection) -> Result<(), DatastoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .doing("set the busy timeout")?;
    let mode = switch_to_wal(conn)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DatastoreError::NotWal { mode });
    }
    // FULL: a commit (a consumed join token, an activated authority) survives a power cut. Batching
    // the issuance journal keeps the fsyncs this costs to one per batch.
    conn.pragma_update(None, "synchronous", "FULL")
        .doing("set synchronous mode")?;
    conn.pragma_update(None, "foreign_keys", true)
        .doing("turn on foreign keys")?;
    Ok(())
}

/// Sets `journal_mode=wal`, retrying while another process holds a lock.
///
/// Leaving rollback-journal mode needs an exclusive lock, and SQLite reports SQLITE_BUSY at once
/// instead of calling the busy handler when two connections race for it (waiting could deadlock), so
/// two processes opening a fresh data dir together would fail without this loop. Once the file is in
/// WAL mode the setting persists and this succeeds on the first try.
fn switch_to_wal(conn: &Connection) -> Result<String, DatastoreError> {
    let started = Instant::now();
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0)) {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result.doing("switch to write-ahead logging"),
        }
    }
}
