//! The schema, as numbered migrations recorded in `PRAGMA user_version`.
//!
//! Migration `n` (1-based) takes the schema from version `n - 1` to `n`. Never edit a released
//! migration: append a new one. All pending migrations run in one `BEGIN IMMEDIATE` transaction, so two
//! processes opening a fresh data dir at once migrate it exactly once.

use rusqlite::{Connection, TransactionBehavior};

use super::{DatastoreError, Doing};

/// The migrations, oldest first.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r"
    -- Join tokens: only the SHA-256 of each token is stored. Used and expired tokens stay (until
    -- purged) so that a second use is reported as reuse, not as an unknown token.
    -- AUTOINCREMENT: `seq` is never reused, even after purging; the eviction rule compares it.
    CREATE TABLE join_tokens (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        hash       BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
        node       TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER
    );

    -- Registration entries. `selectors` is canonical (sorted, deduplicated, newline-separated
    -- `type:value`), so the UNIQUE constraint refuses the same entry twice whatever the selector order.
    -- `node` is '' for any-node entries (never a valid node name). The UNIQUE index also serves the
    -- issuance check, which looks entries up by spiffe_id.
    CREATE TABLE entries (
        id          TEXT    PRIMARY KEY,
        spiffe_id   TEXT    NOT NULL,
        selectors   TEXT    NOT NULL CHECK (selectors <> ''),
        node        TEXT    NOT NULL,
        any_node    INTEGER NOT NULL CHECK (any_node IN (0, 1)),
        ttl_seconds INTEGER NOT NULL,
        hint        TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        CHECK ((any_node = 1) = (node = '')),
        UNIQUE (spiffe_id, node, selectors)
    );
    CREATE INDEX entries_by_node ON entries (node);

    -- Attested agents. `evicted_token_seq` is the newest join token seq when the agent was evicted:
    -- only a join token created after that re-admits it.
    CREATE TABLE agents (
        spiffe_id         TEXT    PRIMARY KEY,
        node              TEXT    NOT NULL,
        attestation       TEXT    NOT NULL CHECK (attestation IN ('join_token', 'k8s_psat')),
        serial            TEXT    NOT NULL,
        expires_at        INTEGER NOT NULL,
        attested_at       INTEGER NOT NULL,
        evicted           INTEGER NOT NULL DEFAULT 0 CHECK (evicted IN (0, 1)),
        evicted_at        INTEGER,
        evicted_token_seq INTEGER
    );

    -- The issuance journal: one row per signed SVID. No unique index on serial: it would cost a
    -- b-tree insert per SVID, and serials are random.
    CREATE TABLE issued (
        serial    TEXT    NOT NULL,
        spiffe_id TEXT    NOT NULL,
        agent     TEXT,
        node      TEXT    NOT NULL,
        pod       TEXT,
        authority TEXT    NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL
    );
    CREATE INDEX issued_by_authority ON issued (authority, not_after);

    -- Signing authorities (their keys are files, never rows). The partial unique indexes make
    -- 'at most one active' and 'at most one prepared' hold even against a buggy writer.
    CREATE TABLE authorities (
        id           TEXT    PRIMARY KEY CHECK (length(id) = 64),
        state        TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'old', 'retired')),
        certificate  BLOB    NOT NULL,
        not_before   INTEGER NOT NULL,
        not_after    INTEGER NOT NULL,
        signed_until INTEGER NOT NULL DEFAULT 0,
        created_at   INTEGER NOT NULL,
        activated_at INTEGER,
        retired_at   INTEGER
    );
    CREATE UNIQUE INDEX one_active_authority ON authorities (state) WHERE state = 'active';
    CREATE UNIQUE INDEX one_prepared_authority ON authorities (state) WHERE state = 'prepared';
    ",
    // 2: an agent's renewed SVID is pending until the agent first presents it. Until then its
    // current SVID keeps working, so a renewal answer that never reached the agent (or that the
    // agent refused) does not lock it out; the first call with the new SVID makes it current and
    // the old one stale. SPIRE keeps an agent's previous serial the same way.
    r"
    ALTER TABLE agents ADD COLUMN pending_serial TEXT;
    ALTER TABLE agents ADD COLUMN pending_expires_at INTEGER
        CHECK ((pending_serial IS NULL) = (pending_expires_at IS NULL));
    ",
];

/// The schema version this build writes.
pub(crate) fn latest_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// Brings the schema to [`latest_version`]; refuses a database from a newer meshward.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), DatastoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .doing("lock the database to migrate its schema")?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .doing("read the schema version")?;
    let supported = latest_version();
    if found > supported {
        return Err(DatastoreError::SchemaTooNew { found, supported });
    }
    for (version, sql) in (1i64..).zip(MIGRATIONS) {
        if version <= found {
            continue;
        }
        tx.execute_batch(sql).doing("migrate the schema")?;
        tx.pragma_update(None, "user_version", version)
            .doing("record the schema version")?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().doing("commit the schema migration")?;
    Ok(())
}
