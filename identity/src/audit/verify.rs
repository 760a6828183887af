//! Checking an audit file's chain: every record intact, linked to the one before, numbered without
//! gaps from 1.
//!
//! What the chain alone proves: no record was edited, removed, inserted or reordered *before the last
//! record*. Removing records from the end leaves a shorter chain that is still valid, so that is only
//! detectable against a head hash or record count kept elsewhere (an [`Anchor`]): an operator copies
//! the report's `head` and `records` off the machine now and then, and later checks that the chain
//! still contains that head and at least that many records.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::field::{ChainHash, Timestamp};
use super::reader::{AuditReadError, AuditReader, ReadRecord};

/// What a good file looks like: its size and its head, to anchor elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records (also the last record's `seq`).
    pub records: u64,
    /// `ts` of the first record, if any.
    pub first_ts: Option<Timestamp>,
    /// `ts` of the last record, if any.
    pub last_ts: Option<Timestamp>,
    /// The last record's hash ([`ChainHash::GENESIS`] for an empty file).
    pub head: ChainHash,
}

/// Facts about the file kept elsewhere, which catch records removed from its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anchor {
    /// A head seen earlier: the chain must still contain a record with this hash.
    pub head: Option<ChainHash>,
    /// A record count seen earlier: the file must still have at least this many records.
    pub records: Option<u64>,
}

/// How the chain is broken between two neighbouring records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainGap {
    /// Records `first..=last` are not in the file.
    Missing {
        /// The first missing seq.
        first: u64,
        /// The last missing seq.
        last: u64,
    },
    /// The next record in sequence is elsewhere in the file, or the seq goes backwards.
    OutOfOrder {
        /// The seq that should have come here.
        expected: u64,
        /// Where the file has it, if it does.
        found_at_line: Option<usize>,
    },
    /// The same seq twice in a row.
    Repeated,
    /// The seq follows on but `prev` is not the previous record's hash: a record was replaced (and
    /// re-hashed) by one that does not belong to this chain.
    Relinked,
    /// `prev` is the previous record's hash but the seq does not follow on: a record was renumbered.
    Renumbered,
}

/// Why an audit file is not intact, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum AuditVerifyError {
    /// The file could not be opened.
    #[error("cannot open audit file `{path}`: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Reading failed part-way.
    #[error("line {line}: cannot read: {source}")]
    Io {
        /// The line being read.
        line: usize,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A record's bytes do not hash to the `hash` it states: it was edited.
    #[error(
        "line {line}: record {seq} was edited: its content hashes to `{computed}`, not to its `hash` `{stated}`"
    )]
    EditedRecord {
        /// The line.
        line: usize,
        /// The seq the edited record states.
        seq: u64,
        /// The hash it states.
        stated: ChainHash,
        /// The hash of its bytes.
        computed: ChainHash,
    },
    /// A record does not follow on from the record before it.
    #[error("line {line}: record {seq} follows record {prev_seq}: {}", gap_text(*.prev_seq, .gap))]
    BrokenChain {
        /// The line of the record that does not follow on.
        line: usize,
        /// Its seq.
        seq: u64,
        /// The seq of the record before it in the file.
        prev_seq: u64,
        /// How the chain is broken.
        gap: ChainGap,
    },
    /// A partial record: a write cut short (a crash), possibly with a later record glued on.
    #[error(
        "line {line}: partial record: a write was cut short; the records before this line can still be checked"
    )]
    Truncated {
        /// The line.
        line: usize,
    },
    /// A line that is not an audit record.
    #[error("line {line}: not an audit record: {reason}")]
    Malformed {
        /// The line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The first record does not start a chain.
    #[error("line {line}: the first record {problem}")]
    BadFirstRecord {
        /// The line (the first line holding a record).
        line: usize,
        /// What is wrong.
        problem: FirstRecordProblem,
    },
    /// The anchored head is not in the chain.
    #[error(
        "line {line}: the anchored head `{expected}` is not in the chain, which ends at `{head}`: records were removed from the end, or the file was replaced"
    )]
    HeadNotFound {
        /// One past the last line.
        line: usize,
        /// The anchored head.
        expected: ChainHash,
        /// The file's head.
        head: ChainHash,
    },
    /// Fewer records than anchored.
    #[error(
        "line {line}: the file has {actual} records, fewer than the {expected} anchored: records were removed from the end"
    )]
    TooFewRecords {
        /// One past the last line.
        line: usize,
        /// The anchored count.
        expected: u64,
        /// The file's count.
        actual: u64,
    },
}

/// What is wrong with a file's first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstRecordProblem {
    /// Its seq is not 1: records before it were removed.
    NotSeqOne(u64),
    /// Its `prev` is not 64 zeros.
    NotGenesis(ChainHash),
}

impl fmt::Display for FirstRecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FirstRecordProblem::NotSeqOne(0) => {
                f.write_str("has seq 0; records are numbered from 1")
            }
            FirstRecordProblem::NotSeqOne(2) => {
                f.write_str("has seq 2, not 1: record 1 was removed from the start")
            }
            FirstRecordProblem::NotSeqOne(seq) => {
                write!(
                    f,
                    "has seq {seq}, not 1: records 1 to {} were removed from the start",
                    seq - 1
                )
            }
            FirstRecordProblem::NotGenesis(prev) => {
                write!(
                    f,
                    "has prev `{prev}`, not 64 zeros: it does not start a chain"
                )
            }
        }
    }
}

impl AuditVerifyError {
    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            AuditVerifyError::Open { .. } => None,
            AuditVerifyError::Io { line, .. }
            | AuditVerifyError::EditedRecord { line, .. }
            | AuditVerifyError::BrokenChain { line, .. }
            | AuditVerifyError::Truncated { line }
            | AuditVerifyError::Malformed { line, .. }
            | AuditVerifyError::BadFirstRecord { line, .. }
            | AuditVerifyError::HeadNotFound { line, .. }
            | AuditVerifyError::TooFewRecords { line, .. } => Some(*line),
        }
    }

    /// A stable snake_case name of the variant, for JSON output and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditVerifyError::Open { .. } => "open",
            AuditVerifyError::Io { .. } => "io",
            AuditVerifyError::EditedRecord { .. } => "edited_record",
            AuditVerifyError::BrokenChain { .. } => "broken_chain",
            AuditVerifyError::Truncated { .. } => "truncated",
            AuditVerifyError::Malformed { .. } => "malformed",
            AuditVerifyError::BadFirstRecord { .. } => "bad_first_record",
            AuditVerifyError::HeadNotFound { .. } => "head_not_found",
            AuditVerifyError::TooFewRecords { .. } => "too_few_records",
        }
    }

    /// Whether the file was read and found not intact, as opposed to not readable at all.
    pub fn is_tampering(&self) -> bool {
        !matches!(
            self,
            AuditVerifyError::Open { .. } | AuditVerifyError::Io { .. }
        )
    }
}

/// Checks the whole chain of the audit file at `path`.
pub fn verify_file(path: impl AsRef<Path>) -> Result<VerifyReport, AuditVerifyError> {
    verify_file_anchored(path, &Anchor::default())
}

/// Checks the whole chain of the audit file at `path`, and that it still holds what `anchor` says.
pub fn verify_file_anchored(
    path: impl AsRef<Path>,
    anchor: &Anchor,
) -> Result<VerifyReport, AuditVerifyError> {
    let reader = AuditReader::open(path).map_err(|e| match e {
        AuditReadError::Open { path, source } => AuditVerifyError::Open { path, source },
        other => from_read_error(other),
    })?;
    verify_records(reader, anchor)
}

/// Checks the chain of the records `reader` yields; the first error found wins.
pub fn verify_records<R: BufRead>(
    mut reader: AuditReader<R>,
    anchor: &Anchor,
) -> Result<VerifyReport, AuditVerifyError> {
    let mut report = VerifyReport {
        records: 0,
        first_ts: None,
        last_ts: None,
        head: ChainHash::GENESIS,
    };
    let mut last_seq = 0u64;
    let mut anchor_found = anchor.head.is_none();
    while let Some(item) = reader.next() {
        let ReadRecord {
            line,
            record,
            computed_hash,
        } = item.map_err(from_read_error)?;
        if computed_hash != record.hash {
            return Err(AuditVerifyError::EditedRecord {
                line,
                seq: record.seq,
                stated: record.hash,
                computed: computed_hash,
            });
        }
        if report.records == 0 {
            let problem = if record.seq != 1 {
                Some(FirstRecordProblem::NotSeqOne(record.seq))
            } else if record.prev != ChainHash::GENESIS {
                Some(FirstRecordProblem::NotGenesis(record.prev))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(AuditVerifyError::BadFirstRecord { line, problem });
            }
            report.first_ts = Some(record.ts);
        } else if let Some(gap) = chain_gap(
            last_seq,
            &report.head,
            &record.prev,
            record.seq,
            &mut reader,
        ) {
            return Err(AuditVerifyError::BrokenChain {
                line,
                seq: record.seq,
                prev_seq: last_seq,
                gap,
            });
        }
        anchor_found |= anchor.head == Some(record.hash);
        report.records += 1;
        report.last_ts = Some(record.ts);
        report.head = record.hash;
        last_seq = record.seq;
    }
    let end_line = reader.lines_read() + 1;
    if let Some(expected) = anchor.records.filter(|&n| report.records < n) {
        return Err(AuditVerifyError::TooFewRecords {
            line: end_line,
            expected,
            actual: report.records,
        });
    }
    if let (false, Some(expected)) = (anchor_found, anchor.head) {
        return Err(AuditVerifyError::HeadNotFound {
            line: end_line,
            expected,
            head: report.head,
        });
    }
    Ok(report)
}

/// How the record (`seq`, `prev`) fails to follow the one before it (`prev_seq`, `prev_hash`), if it
/// does. A gap reads ahead in `reader` to tell a removed record from a moved one.
fn chain_gap<R: BufRead>(
    prev_seq: u64,
    prev_hash: &ChainHash,
    prev: &ChainHash,
    seq: u64,
    reader: &mut AuditReader<R>,
) -> Option<ChainGap> {
    let next = prev_seq.saturating_add(1);
    let linked = prev == prev_hash;
    Some(match (seq, linked) {
        (s, true) if s == next => return None,
        (s, false) if s == next => ChainGap::Relinked,
        (_, true) => ChainGap::Renumbered,
        (s, false) if s == prev_seq => ChainGap::Repeated,
        (s, false) if s < prev_seq => ChainGap::OutOfOrder {
            expected: next,
            found_at_line: None,
        },
        (s, false) => {
            let missing = next..s;
            let found_at_line = reader
                .by_ref()
                .flatten()
                .find(|r| missing.contains(&r.record.seq))
                .map(|r| r.line);
            match found_at_line {
                Some(line) => ChainGap::OutOfOrder {
                    expected: next,
                    found_at_line: Some(line),
                },
                None => ChainGap::Missing {
                    first: next,
                    last: s - 1,
                },
            }
        }
    })
}

fn from_read_error(e: AuditReadError) -> AuditVerifyError {
    match e {
        AuditReadError::Open { path, source } => AuditVerifyError::Open { path, source },
        AuditReadError::Io { line, source } => AuditVerifyError::Io { line, source },
        AuditReadError::Truncated { line } => AuditVerifyError::Truncated { line },
        AuditReadError::Malformed { line, reason } => AuditVerifyError::Malformed { line, reason },
    }
}

fn gap_text(prev_seq: u64, gap: &ChainGap) -> String {
    match gap {
        ChainGap::Missing { first, last } if first == last => format!("record {first} is missing"),
        ChainGap::Missing { first, last } => format!("records {first} to {last} are missing"),
        ChainGap::OutOfOrder {
            expected,
            found_at_line: Some(at),
        } => {
            format!("records are out of order (record {expected} is at line {at})")
        }
        ChainGap::OutOfOrder {
            expected,
            found_at_line: None,
        } => {
            format!("records are out of order (record {expected} should come next)")
        }
        ChainGap::Repeated => format!("record {prev_seq} appears twice"),
        ChainGap::Relinked => format!(
            "its prev is not record {prev_seq}'s hash: one of the two was replaced by a record from elsewhere"
        ),
        ChainGap::Renumbered => "its seq was changed and the record re-hashed".to_owned(),
    }
}
