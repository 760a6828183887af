//! Streaming over the records of an audit file, one line at a time, in bounded memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::cap::MAX_LINE_BYTES;
use super::field::ChainHash;
use super::record::{AuditRecord, LineError, decode_line};

/// One record read from a file, with the hash its bytes actually have.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRecord {
    /// 1-based line number.
    pub line: usize,
    /// The record as parsed.
    pub record: AuditRecord,
    /// The SHA-256 recomputed from the line's bytes; differs from `record.hash` if the line was edited.
    pub computed_hash: ChainHash,
}

impl ReadRecord {
    /// Whether the line's bytes still hash to the `hash` it states.
    pub fn is_intact(&self) -> bool {
        self.computed_hash == self.record.hash
    }
}

/// Why a line of an audit file could not be read as a record.
#[derive(Debug, thiserror::Error)]
pub enum AuditReadError {
    /// The file could not be opened.
    #[error("cannot open audit file `{path}`: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading failed part-way.
    #[error("line {line}: cannot read: {source}")]
    Io {
        /// The line being read.
        line: usize,
        /// What the OS said.
        source: io::Error,
    },
    /// The line stops before its record does: a write cut short by a crash, or a partial record with
    /// a later one glued on.
    #[error("line {line}: partial record: a write was cut short")]
    Truncated {
        /// The line.
        line: usize,
    },
    /// The line is not an audit record.
    #[error("line {line}: not an audit record: {reason}")]
    Malformed {
        /// The line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl AuditReadError {
    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            AuditReadError::Open { .. } => None,
            AuditReadError::Io { line, .. }
            | AuditReadError::Truncated { line }
            | AuditReadError::Malformed { line, .. } => Some(*line),
        }
    }
}

/// An iterator over the records of an audit file, in file order.
///
/// A bad line yields an error and reading goes on with the next line, so a query can skip damage;
/// an I/O error and a partial last line end the iteration. Lines longer than [`MAX_LINE_BYTES`] are
/// refused without being held in memory.
#[derive(Debug)]
pub struct AuditReader<R> {
    source: R,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl AuditReader<BufReader<File>> {
    /// Opens the audit file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditReadError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| AuditReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::new(BufReader::with_capacity(64 * 1024, file)))
    }
}

impl<R: BufRead> AuditReader<R> {
    /// Reads records from `source`, which starts at the first line of an audit file.
    pub fn new(source: R) -> Self {
        AuditReader {
            source,
            line: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The number of lines read so far.
    pub fn lines_read(&self) -> usize {
        self.line
    }

    fn read_line(&mut self) -> Option<Result<ReadRecord, AuditReadError>> {
        self.buf.clear();
        let limit = u64::try_from(MAX_LINE_BYTES)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let read = (&mut self.source)
            .take(limit)
            .read_until(b'\n', &mut self.buf);
        let line = self.line + 1;
        match read {
            Ok(0) => return None,
            Ok(_) => self.line = line,
            Err(source) => {
                self.done = true;
                return Some(Err(AuditReadError::Io { line, source }));
            }
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if self.buf.len() > MAX_LINE_BYTES {
            if let Err(source) = self.skip_rest_of_line() {
                self.done = true;
                return Some(Err(AuditReadError::Io { line, source }));
            }
            let reason = format!("line is longer than {MAX_LINE_BYTES} bytes");
            return Some(Err(AuditReadError::Malformed { line, reason }));
        } else {
            // Every record ends with `\n`: a last line without one is a write cut short.
            self.done = true;
            return Some(Err(AuditReadError::Truncated { line }));
        }
        Some(match decode_line(&self.buf) {
            Ok((record, computed_hash)) => Ok(ReadRecord {
                line,
                record,
                computed_hash,
            }),
            Err(LineError::Truncated) => Err(AuditReadError::Truncated { line }),
            Err(LineError::Malformed(reason)) => Err(AuditReadError::Malformed { line, reason }),
        })
    }

    fn skip_rest_of_line(&mut self) -> io::Result<()> {
        loop {
            let available = self.source.fill_buf()?;
            if available.is_empty() {
                return Ok(());
            }
            if let Some(pos) = available.iter().position(|&b| b == b'\n') {
                self.source.consume(pos + 1);
                return Ok(());
            }
            let len = available.len();
            self.source.consume(len);
        }
    }
}

impl<R: BufRead> Iterator for AuditReader<R> {
    type Item = Result<ReadRecord, AuditReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.read_line();
        if item.is_none() {
            self.done = true;
        }
        item
    }
}
