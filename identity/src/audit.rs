//! The append-only, hash-chained audit log that the CA (issuance) and the proxy (authorization) write.
//!
//! One record per line (JSON, see below for the exact bytes). Each record carries `seq` (1, 2,
//! ...), `prev` (the hash of the record before it, 64 zeros for the first) and `hash` (SHA-256 of its
//! own line up to the hash), so [`verify_file`] detects an edited, dropped, inserted or reordered
//! record and names the line. Records dropped from the *end* leave a valid, shorter chain: catch that
//! by keeping the head hash and record count elsewhere and checking them with an [`Anchor`].
//!
//! # Line format and hash scheme
//!
//! One record is one line: a JSON object whose members are, in this order, `seq`, `ts`, `id`, `kind`,
//! `decision`, `principal`, `action`, `resource`, `context`, `policies`, `errors`, `mode`, `latency_us`,
//! `node`, the issuance members when set (`spiffe_id`, `serial`, `not_after`, `agent`, `pod`),
//! `truncated` when a field was capped, then `prev` and last `hash`, followed by `\n`.
//!
//! `hash` is the lower-case hex SHA-256 of the line's exact bytes up to, not including, the
//! `,"hash":"` that introduces it. Verification hashes the bytes it read; it never re-serializes, so
//! it does not depend on serde's member order, number formatting or escaping, and a line that a tool
//! re-formatted (`jq .` adds spaces, `jq -S` sorts members) is refused. `prev` is inside the hashed bytes, so each
//! record commits to the whole chain before it. Anyone can recompute a hash with standard tools: the
//! bytes before `,"hash":"` piped through `sha256sum`.
//!
//! # Parts
//!
//! - [`AuditLog`]: the writer. One per file (an exclusive `flock` keeps other writers out), shared by
//!   every thread; appends are cheap and synced to disk in batches ([`SyncPolicy`]).
//! - [`AuditReader`]: streams the records of a file, for `meshward audit` commands.
//! - [`verify_file`]: checks a whole file and reports its size and head.
//!
//! Every field is capped ([`MAX_LINE_BYTES`] bounds a line), so no caller can write an unbounded
//! header dump; a capped field ends in [`TRUNCATION_MARKER`] and is named in the record's `truncated`.

mod cap;
mod field;
mod reader;
mod record;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use cap::{
    CONTEXT_DROPPED_KEY, MAX_CONTEXT_BYTES, MAX_CONTEXT_DEPTH, MAX_CONTEXT_STRING_BYTES,
    MAX_ERROR_BYTES, MAX_ERRORS, MAX_ID_BYTES, MAX_LINE_BYTES, MAX_POLICIES, MAX_POLICY_ID_BYTES,
    MAX_SHORT_BYTES, TRUNCATION_MARKER,
};
pub use field::{AuditFieldError, ChainHash, RecordId, Timestamp};
pub use reader::{AuditReadError, AuditReader, ReadRecord};
pub use record::{AuditDecision, AuditEvent, AuditKind, AuditRecord, Mode};
pub use verify::{
    Anchor, AuditVerifyError, ChainGap, FirstRecordProblem, VerifyReport, verify_file,
    verify_file_anchored, verify_records,
};
pub use writer::{AuditError, AuditLog, AuditRecordRef, SyncPolicy};
