//! The audit record: its fields and the exact bytes of one line (see the [`audit`](super) docs for
//! the line format and the hash scheme).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cap::cap_event;
use super::field::{ChainHash, RecordId, Timestamp};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditKind {
    /// An authorization decision on a call.
    Authz,
    /// The CA signing, or refusing to sign, an SVID.
    Issuance,
}

impl AuditKind {
    /// The name used in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Authz => "authz",
            AuditKind::Issuance => "issuance",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome a record states. Each outcome belongs to one [`AuditKind`], so a record cannot pair
/// `kind: issuance` with `decision: allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    /// The call was (or, in dry-run, would have been) allowed.
    Allow,
    /// The call was (or, in dry-run, would have been) denied.
    Deny,
    /// The CA signed the SVID.
    Issued,
    /// The CA refused to sign.
    Refused,
}

impl AuditDecision {
    /// The kind of record this outcome belongs to.
    pub fn kind(self) -> AuditKind {
        match self {
            AuditDecision::Allow | AuditDecision::Deny => AuditKind::Authz,
            AuditDecision::Issued | AuditDecision::Refused => AuditKind::Issuance,
        }
    }

    /// The name used in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Allow => "allow",
            AuditDecision::Deny => "deny",
            AuditDecision::Issued => "issued",
            AuditDecision::Refused => "refused",
        }
    }
}

impl fmt::Display for AuditDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the decision was enforced or only recorded (a dry-run policy set next to the enforced one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The decision was enforced.
    #[default]
    Enforce,
    /// The decision was only audited and counted, never enforced.
    DryRun,
}

/// What a caller hands to [`AuditLog::append`](super::AuditLog::append): the facts of one decision.
/// The log adds `seq`, `id`, `node`, `prev` and `hash`, and caps every field (see the `MAX_*` consts).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// When the decision was made.
    pub ts: Timestamp,
    /// The outcome; it also sets the record's `kind`.
    pub decision: AuditDecision,
    /// Who asked: the caller's SPIFFE ID (authz) or the agent's (issuance); empty if unknown.
    pub principal: String,
    /// What was asked: the Cedar action (`GET`, `connect`) or `issue`.
    pub action: String,
    /// On what: the callee's SPIFFE ID, or the SPIFFE ID to be issued.
    pub resource: String,
    /// The request context the decision saw (method, path, host, source IP, TLS facts).
    pub context: Map<String, Value>,
    /// Ids of the policies that determined the decision.
    pub policies: Vec<String>,
    /// Errors met while deciding (a decision with errors is a deny).
    pub errors: Vec<String>,
    /// Enforced or dry-run.
    pub mode: Mode,
    /// How long the decision took, in microseconds.
    pub latency_us: u64,
    /// Issuance: the SPIFFE ID in the SVID.
    pub spiffe_id: Option<String>,
    /// Issuance: the certificate serial, in hex.
    pub serial: Option<String>,
    /// Issuance: the SVID's `notAfter`.
    pub not_after: Option<Timestamp>,
    /// Issuance: the agent that asked.
    pub agent: Option<String>,
    /// Issuance: the pod (`namespace/name`) the SVID is for, in Kubernetes mode.
    pub pod: Option<String>,
}

impl AuditEvent {
    /// An event made now, enforced, with an empty context and no policies, errors or issuance facts.
    pub fn new(
        decision: AuditDecision,
        principal: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        AuditEvent {
            ts: Timestamp::now(),
            decision,
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            context: Map::new(),
            policies: Vec::new(),
            errors: Vec::new(),
            mode: Mode::Enforce,
            latency_us: 0,
            spiffe_id: None,
            serial: None,
            not_after: None,
            agent: None,
            pod: None,
        }
    }
}

/// One record as read back from an audit file.
///
/// Its `Serialize` writes the members in file order, so serializing a record read from a file gives
/// back the same line (a test holds the writer to this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the decision was made.
    pub ts: Timestamp,
    /// The record's unique id.
    pub id: RecordId,
    /// What the record is about; always `decision.kind()` in a valid record.
    pub kind: AuditKind,
    /// The outcome.
    pub decision: AuditDecision,
    /// Who asked.
    pub principal: String,
    /// What was asked.
    pub action: String,
    /// On what.
    pub resource: String,
    /// The request context.
    pub context: Map<String, Value>,
    /// Policies that determined the decision.
    pub policies: Vec<String>,
    /// Errors met while deciding.
    pub errors: Vec<String>,
    /// Enforced or dry-run.
    pub mode: Mode,
    /// Decision latency in microseconds.
    pub latency_us: u64,
    /// The node (host) that wrote the record.
    pub node: String,
    /// Issuance: the SPIFFE ID in the SVID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Issuance: the certificate serial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Issuance: the SVID's `notAfter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
    /// Issuance: the agent that asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Issuance: the pod the SVID is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Names of the fields the writer capped; absent when none was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// The previous record's `hash` ([`ChainHash::GENESIS`] for the first record).
    pub prev: ChainHash,
    /// This record's hash (see the module docs).
    pub hash: ChainHash,
}

// ---- writing ------------------------------------------------------------------------------------

/// The members between `seq` and `prev`, in file order, borrowed from a capped event. Serialized
/// outside the log's lock; only `seq`, `prev` and the hash are added under it.
// INVARIANT: same members, order and serde attributes as `AuditRecord` between `seq` and `prev`.
#[derive(Serialize)]
struct Body<'a> {
    ts: Timestamp,
    id: RecordId,
    kind: AuditKind,
    decision: AuditDecision,
    principal: &'a str,
    action: &'a str,
    resource: &'a str,
    context: &'a Map<String, Value>,
    policies: &'a [String],
    errors: &'a [String],
    mode: Mode,
    latency_us: u64,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    #[serde(skip_serializing_if = "no_names")]
    truncated: &'a [&'static str],
}

fn no_names(names: &&[&'static str]) -> bool {
    names.is_empty()
}

/// Caps `event` and serializes its members between `seq` and `prev`, without the enclosing braces.
pub(crate) fn encode_body(
    mut event: AuditEvent,
    id: RecordId,
    node: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let truncated = cap_event(&mut event);
    let body = Body {
        ts: event.ts,
        id,
        kind: event.decision.kind(),
        decision: event.decision,
        principal: &event.principal,
        action: &event.action,
        resource: &event.resource,
        context: &event.context,
        policies: &event.policies,
        errors: &event.errors,
        mode: event.mode,
        latency_us: event.latency_us,
        node,
        spiffe_id: event.spiffe_id.as_deref(),
        serial: event.serial.as_deref(),
        not_after: event.not_after,
        agent: event.agent.as_deref(),
        pod: event.pod.as_deref(),
        truncated: &truncated,
    };
    let mut bytes = serde_json::to_vec(&body)?;
    // `{...}` -> `...`: the object's members, spliced between `seq` and `prev` by `finish_line`.
    bytes.pop();
    if !bytes.is_empty() {
        bytes.remove(0);
    }
    Ok(bytes)
}

/// Appends the whole line for a record to `out` (its `\n` included) and returns the record's hash.
pub(crate) fn finish_line(out: &mut Vec<u8>, seq: u64, body: &[u8], prev: &ChainHash) -> ChainHash {
    let start = out.len();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b',');
    out.extend_from_slice(body);
    out.extend_from_slice(b",\"prev\":\"");
    prev.push_hex(out);
    out.push(b'"');
    let hash = ChainHash::digest(out.get(start..).unwrap_or_default());
    out.extend_from_slice(HASH_INTRO);
    hash.push_hex(out);
    out.extend_from_slice(b"\"}\n");
    hash
}

/// What introduces the hash at the end of every line.
const HASH_INTRO: &[u8] = b",\"hash\":\"";

/// Bytes from the start of `HASH_INTRO` to the end of the line (without `\n`).
const HASH_SUFFIX_LEN: usize = HASH_INTRO.len() + 64 + 2;

// ---- reading ------------------------------------------------------------------------------------

/// Why one line is not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// The line stops before the record does: a write cut short.
    Truncated,
    /// Not a record, with the reason.
    Malformed(String),
}

/// Parses one line (without its `\n`) and recomputes its hash from its bytes.
pub(crate) fn decode_line(line: &[u8]) -> Result<(AuditRecord, ChainHash), LineError> {
    if line.is_empty() {
        return Err(LineError::Malformed("empty line".to_owned()));
    }
    let record: AuditRecord = match serde_json::from_slice(line) {
        Ok(record) => record,
        Err(e) if e.is_eof() => return Err(LineError::Truncated),
        // A torn write followed by a later append leaves a partial record with a whole one glued on.
        Err(_) if line.len() > 1 && memmem(line.get(1..).unwrap_or_default(), b"{\"seq\":") => {
            return Err(LineError::Truncated);
        }
        Err(e) => return Err(LineError::Malformed(json_reason(&e))),
    };
    if record.kind != record.decision.kind() {
        return Err(LineError::Malformed(format!(
            "decision `{}` does not belong to kind `{}`",
            record.decision, record.kind
        )));
    }
    let hashed_len = line.len().saturating_sub(HASH_SUFFIX_LEN);
    let (hashed, suffix) = line.split_at(hashed_len);
    if !suffix.starts_with(HASH_INTRO) {
        return Err(LineError::Malformed(
            "`hash` is not the last member: the line was rewritten by something other than meshward".to_owned(),
        ));
    }
    Ok((record, ChainHash::digest(hashed)))
}

// ---- helpers ----------------------------------------------------------------------------------------

/// serde_json's message with its position as a column only: the line number is the file's, not its.
fn json_reason(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    format!("{message} at column {}", e.column())
}

fn memmem(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
