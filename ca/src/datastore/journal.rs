//! The issuance journal: one row per signed SVID, for operators and for root retirement (an authority
//! may be retired only once nothing it signed is still valid).
//!
//! The CA signs thousands of SVIDs a second, so rows go in batches: one transaction, one fsync, one
//! cached prepared statement per batch. The audit log (hash-chained, DESIGN §3.7) is separate; this is
//! the queryable state, and [`Datastore::prune_issued`] drops rows that expired long ago.

use std::collections::BTreeMap;
use std::time::SystemTime;

use meshward_identity::SpiffeId;
use rusqlite::params;

use super::{Datastore, DatastoreError, Doing, from_unix_seconds, unix_seconds};

/// One signed SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate serial (lower-case hex).
    pub serial: String,
    /// The identity signed.
    pub spiffe_id: SpiffeId,
    /// The agent that asked for it; `None` for the agent's own SVID.
    pub agent: Option<SpiffeId>,
    /// The agent's node.
    pub node: String,
    /// The pod UID (Kubernetes mode), if known.
    pub pod: Option<String>,
    /// The id of the authority that signed it (see [`authority_id`](super::authority_id)).
    pub authority: String,
    /// The certificate's notAfter.
    pub not_after: SystemTime,
    /// When it was signed.
    pub issued_at: SystemTime,
}

impl Datastore {
    /// Appends a batch of issued SVIDs in one transaction, and raises each signing authority's
    /// `signed_until` to the latest notAfter in the batch (never lowers it).
    pub fn record_issued_batch(&self, batch: &[Issued]) -> Result<(), DatastoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
        self.write("record issued svids", |tx| {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO issued (serial, spiffe_id, agent, node, pod, authority, not_after, issued_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .doing("record issued svids")?;
            for issued in batch {
                let not_after = unix_seconds(issued.not_after);
                insert
                    .execute(params![
                        issued.serial,
                        issued.spiffe_id.as_str(),
                        issued.agent.as_ref().map(SpiffeId::as_str),
                        issued.node,
                        issued.pod,
                        issued.authority,
                        not_after,
                        unix_seconds(issued.issued_at),
                    ])
                    .doing("record an issued svid")?;
                let entry = latest.entry(&issued.authority).or_insert(not_after);
                *entry = (*entry).max(not_after);
            }
            let mut bump = tx
                .prepare_cached(
                    "UPDATE authorities SET signed_until = MAX(signed_until, ?2) WHERE id = ?1",
                )
                .doing("raise an authority's signed-until")?;
            for (authority, not_after) in &latest {
                bump.execute(params![authority, not_after])
                    .doing("raise an authority's signed-until")?;
            }
            Ok(())
        })
    }

    /// The latest notAfter of anything `authority` signed, per the journal.
    pub fn latest_not_after(&self, authority: &str) -> Result<Option<SystemTime>, DatastoreError> {
        self.read(|conn| {
            let latest: Option<i64> = conn
                .prepare_cached("SELECT MAX(not_after) FROM issued WHERE authority = ?1")
                .doing("find an authority's latest notAfter")?
                .query_row(params![authority], |row| row.get(0))
                .doing("find an authority's latest notAfter")?;
            Ok(latest.map(from_unix_seconds))
        })
    }

    /// The latest notAfter per signing authority, by authority id.
    pub fn latest_not_after_by_authority(
        &self,
    ) -> Result<Vec<(String, SystemTime)>, DatastoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT authority, MAX(not_after) FROM issued GROUP BY authority ORDER BY authority",
                )
                .doing("find the latest notAfter per authority")?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .doing("find the latest notAfter per authority")?;
            rows.map(|row| {
                let (authority, not_after) =
                    row.doing("find the latest notAfter per authority")?;
                Ok((authority, from_unix_seconds(not_after)))
            })
            .collect()
        })
    }

    /// How many SVIDs the journal holds.
    pub fn issued_count(&self) -> Result<u64, DatastoreError> {
        self.read(|conn| {
            let count: i64 = conn
                .query_row("SELECT COUNT(*) FROM issued", [], |row| row.get(0))
                .doing("count issued svids")?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
    }

    /// Deletes up to `max_rows` journal rows whose notAfter is before `expired_before`; returns how
    /// many. Bounded so that housekeeping never holds the write lock for long: call it until it
    /// returns less than `max_rows`.
    pub fn prune_issued(
        &self,
        expired_before: SystemTime,
        max_rows: u32,
    ) -> Result<usize, DatastoreError> {
        let before = unix_seconds(expired_before);
        self.write("prune the issuance journal", |tx| {
            tx.execute(
                "DELETE FROM issued WHERE rowid IN
                    (SELECT rowid FROM issued WHERE not_after < ?1 LIMIT ?2)",
                params![before, max_rows],
            )
            .doing("prune the issuance journal")
        })
    }
}
