//! Registration entries: which SPIFFE ID a workload gets on which node(s), given its selectors.
//!
//! An entry is scoped to one node or to every node (`any_node`); the CA signs an identity for an agent
//! only if an entry for that identity is scoped to the agent's node or to every node (node-scoped
//! issuance, DESIGN §3.3). The agent matches selectors; the CA only checks the (node, identity) pair.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use rusqlite::{OptionalExtension, Row, params};

use super::{
    Datastore, DatastoreError, Doing, from_unix_seconds, random_bytes, unix_seconds,
    validate_node_name,
};

/// The shortest SVID lifetime an entry may ask for.
pub const MIN_ENTRY_TTL_SECONDS: i64 = 30;
/// The longest SVID lifetime an entry may ask for.
pub const MAX_ENTRY_TTL_SECONDS: i64 = 24 * 3600;

const MAX_HINT_LEN: usize = 256;
const MAX_SELECTOR_LEN: usize = 1024;

/// The kind of attestor a selector is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectorKind {
    /// The `unix` workload attestor: `uid:1000`, `gid:..`, `user:..`, `group:..`, `path:..`, `sha256:..`.
    Unix,
    /// The `k8s` workload attestor: `ns:..`, `sa:..`, `pod-label:..`, ...
    K8s,
}

impl SelectorKind {
    /// The name used in selectors and in the API (`unix`, `k8s`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::K8s => "k8s",
        }
    }
}

impl fmt::Display for SelectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `type:value` condition a workload must meet, e.g. `unix:uid:1000` (type `unix`, value `uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    kind: SelectorKind,
    value: String,
}

impl Selector {
    /// Builds a selector from its two API fields (`Selector.type`, `Selector.value`).
    pub fn new(kind: &str, value: &str) -> Result<Self, DatastoreError> {
        let bad = |reason| DatastoreError::BadSelector {
            selector: format!("{kind}:{value}"),
            reason,
        };
        let kind = match kind {
            "unix" => SelectorKind::Unix,
            "k8s" => SelectorKind::K8s,
            "" => return Err(bad("the type is empty")),
            _ => return Err(bad("the type must be `unix` or `k8s`")),
        };
        if value.is_empty() {
            return Err(bad("the value is empty"));
        }
        if value.len() > MAX_SELECTOR_LEN {
            return Err(bad("the value is longer than 1024 bytes"));
        }
        // Control characters never occur in real selector values; refusing them also keeps the stored
        // canonical form (newline-separated) unambiguous.
        if value.chars().any(char::is_control) {
            return Err(bad("the value holds control characters"));
        }
        Ok(Self {
            kind,
            value: value.to_owned(),
        })
    }

    /// The attestor kind.
    pub fn kind(&self) -> SelectorKind {
        self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = DatastoreError;

    /// Parses `type:value`: the type is everything before the first `:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| DatastoreError::BadSelector {
                selector: s.to_owned(),
                reason: "expected `type:value`, e.g. `unix:uid:1000`",
            })?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// Where an entry applies: one node, or every node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeScope {
    /// Only agents attested for this node.
    Node(String),
    /// Every node.
    AnyNode,
}

impl NodeScope {
    /// From the API's `node` and `any_node` fields: exactly one of them must be set.
    pub fn from_parts(node: &str, any_node: bool) -> Result<Self, DatastoreError> {
        match (node.is_empty(), any_node) {
            (true, true) => Ok(Self::AnyNode),
            (false, false) => {
                validate_node_name(node)?;
                Ok(Self::Node(node.to_owned()))
            }
            _ => Err(DatastoreError::BadScope {
                node: node.to_owned(),
                any_node,
            }),
        }
    }

    /// The API's `node` field: the node name, or empty for any node.
    pub fn node(&self) -> &str {
        match self {
            Self::Node(node) => node,
            Self::AnyNode => "",
        }
    }

    /// The API's `any_node` field.
    pub fn is_any_node(&self) -> bool {
        matches!(self, Self::AnyNode)
    }
}

/// What an operator asks for when creating an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The identity workloads matching the selectors get.
    pub spiffe_id: SpiffeId,
    /// All must match. Order and repeats do not matter.
    pub selectors: Vec<Selector>,
    /// The node(s) the entry applies on.
    pub scope: NodeScope,
    /// SVID lifetime: 0 for the CA's default, else 30 to 86400 seconds.
    pub ttl_seconds: i64,
    /// Free text for operators (at most 256 bytes).
    pub hint: String,
}

/// A stored registration entry (the API's `Entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Random, 16 lower-case hex characters.
    pub id: String,
    /// The identity workloads matching the selectors get.
    pub spiffe_id: SpiffeId,
    /// All must match; sorted and without repeats.
    pub selectors: Vec<Selector>,
    /// The node(s) the entry applies on.
    pub scope: NodeScope,
    /// SVID lifetime in seconds: 0 for the CA's default.
    pub ttl_seconds: i64,
    /// When it was created (to the second).
    pub created_at: SystemTime,
    /// Free text for operators.
    pub hint: String,
}

impl Entry {
    /// The SVID lifetime the entry asks for, or `None` for the CA's default.
    pub fn ttl(&self) -> Option<Duration> {
        u64::try_from(self.ttl_seconds)
            .ok()
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
    }
}

impl Datastore {
    /// Creates an entry; refuses bad values and an entry that exists already (same SPIFFE ID, same
    /// selectors, same node scope).
    pub fn create_entry(&self, new: &NewEntry, now: SystemTime) -> Result<Entry, DatastoreError> {
        let selectors = validate(new)?;
        let canonical = selectors
            .iter()
            .map(Selector::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let created_at = unix_seconds(now);
        let spiffe_id = new.spiffe_id.as_str();
        let node = new.scope.node();
        let id = self.write("create an entry", |tx| {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM entries WHERE spiffe_id = ?1 AND node = ?2 AND selectors = ?3",
                    params![spiffe_id, node, canonical],
                    |row| row.get(0),
                )
                .optional()
                .doing("look for a duplicate entry")?;
            if let Some(existing) = existing {
                return Err(DatastoreError::DuplicateEntry {
                    spiffe_id: spiffe_id.to_owned(),
                    existing,
                });
            }
            // 64 random bits: a clash is next to impossible, but costs one lookup to rule out.
            let id = loop {
                let id = hex::encode(random_bytes::<8>()?);
                let taken = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM entries WHERE id = ?1)",
                        params![id],
                        |row| row.get::<_, bool>(0),
                    )
                    .doing("pick an entry id")?;
                if !taken {
                    break id;
                }
            };
            tx.execute(
                "INSERT INTO entries (id, spiffe_id, selectors, node, any_node, ttl_seconds, hint, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    spiffe_id,
                    canonical,
                    node,
                    new.scope.is_any_node(),
                    new.ttl_seconds,
                    new.hint,
                    created_at
                ],
            )
            .doing("create an entry")?;
            Ok(id)
        })?;
        tracing::info!(entry = %id, spiffe_id, node, "entry created");
        Ok(Entry {
            id,
            spiffe_id: new.spiffe_id.clone(),
            selectors,
            scope: new.scope.clone(),
            ttl_seconds: new.ttl_seconds,
            created_at: from_unix_seconds(created_at),
            hint: new.hint.clone(),
        })
    }

    /// Every entry, in creation order.
    pub fn list_entries(&self) -> Result<Vec<Entry>, DatastoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!("{SELECT_ENTRY} ORDER BY created_at, rowid"))
                .doing("list entries")?;
            collect(stmt.query_map([], entry_columns).doing("list entries")?)
        })
    }

    /// The entry with this id, if any.
    pub fn entry(&self, id: &str) -> Result<Option<Entry>, DatastoreError> {
        self.read(|conn| {
            let columns = conn
                .prepare_cached(&format!("{SELECT_ENTRY} WHERE id = ?1"))
                .doing("read an entry")?
                .query_row(params![id], entry_columns)
                .optional()
                .doing("read an entry")?;
            columns.map(EntryColumns::parse).transpose()
        })
    }

    /// Deletes the entry with this id; an unknown id is an error, so a typo does not pass silently.
    pub fn delete_entry(&self, id: &str) -> Result<(), DatastoreError> {
        let deleted = self.write("delete an entry", |tx| {
            tx.execute("DELETE FROM entries WHERE id = ?1", params![id])
                .doing("delete an entry")
        })?;
        if deleted == 0 {
            return Err(DatastoreError::UnknownEntry { id: id.to_owned() });
        }
        tracing::info!(entry = id, "entry deleted");
        Ok(())
    }

    /// The entries an agent on `node` may use: the node's own plus every any-node entry, in creation order.
    pub fn entries_for_node(&self, node: &str) -> Result<Vec<Entry>, DatastoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    // '' is how any-node entries store their node, and never a node name.
                    "{SELECT_ENTRY} WHERE node IN (?1, '') ORDER BY created_at, rowid"
                ))
                .doing("list a node's entries")?;
            collect(
                stmt.query_map(params![node], entry_columns)
                    .doing("list a node's entries")?,
            )
        })
    }

    /// Whether an agent on `node` may get `spiffe_id` signed: some entry for that identity is scoped to
    /// the node or to every node. One index lookup; this is the issuance check.
    pub fn is_entitled(&self, node: &str, spiffe_id: &SpiffeId) -> Result<bool, DatastoreError> {
        if node.is_empty() {
            // An empty node would match the any-node rows' '' and mean nothing; no agent has it.
            return Ok(false);
        }
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM entries WHERE spiffe_id = ?1 AND node IN (?2, ''))",
            )
            .doing("check an entitlement")?
            .query_row(params![spiffe_id.as_str(), node], |row| row.get(0))
            .doing("check an entitlement")
        })
    }
}

/// Checks a new entry; returns its selectors sorted and without repeats.
fn validate(new: &NewEntry) -> Result<Vec<Selector>, DatastoreError> {
    let id = &new.spiffe_id;
    if id.is_trust_domain_id() {
        return Err(DatastoreError::NotWorkloadId {
            spiffe_id: id.to_string(),
            reason: "it has no path (it names the trust domain)",
        });
    }
    // `/meshward/...` names agents and the CA itself. An entry for one would let a workload mint an
    // agent identity, i.e. attest as a node.
    if id.segments().next() == Some("meshward") {
        return Err(DatastoreError::NotWorkloadId {
            spiffe_id: id.to_string(),
            reason: "paths under `/meshward/` are reserved for meshward's agents and ca",
        });
    }
    if let NodeScope::Node(node) = &new.scope {
        validate_node_name(node)?;
    }
    if new.ttl_seconds != 0
        && !(MIN_ENTRY_TTL_SECONDS..=MAX_ENTRY_TTL_SECONDS).contains(&new.ttl_seconds)
    {
        return Err(DatastoreError::BadEntryTtl {
            ttl_seconds: new.ttl_seconds,
        });
    }
    let bad_hint = |reason| DatastoreError::BadHint {
        hint: new.hint.clone(),
        reason,
    };
    if new.hint.len() > MAX_HINT_LEN {
        return Err(bad_hint("it is longer than 256 bytes"));
    }
    if new.hint.chars().any(char::is_control) {
        return Err(bad_hint("it holds control characters"));
    }
    let mut selectors = new.selectors.clone();
    selectors.sort_by_cached_key(Selector::to_string);
    selectors.dedup();
    if selectors.is_empty() {
        return Err(DatastoreError::NoSelectors {
            spiffe_id: id.to_string(),
        });
    }
    Ok(selectors)
}

const SELECT_ENTRY: &str =
    "SELECT id, spiffe_id, selectors, node, any_node, ttl_seconds, hint, created_at FROM entries";

/// An entry row as stored, before its text is parsed back into types.
struct EntryColumns {
    id: String,
    spiffe_id: String,
    selectors: String,
    node: String,
    any_node: bool,
    ttl_seconds: i64,
    hint: String,
    created_at: i64,
}

fn entry_columns(row: &Row<'_>) -> rusqlite::Result<EntryColumns> {
    Ok(EntryColumns {
        id: row.get(0)?,
        spiffe_id: row.get(1)?,
        selectors: row.get(2)?,
        node: row.get(3)?,
        any_node: row.get(4)?,
        ttl_seconds: row.get(5)?,
        hint: row.get(6)?,
        created_at: row.get(7)?,
    })
}

impl EntryColumns {
    fn parse(self) -> Result<Entry, DatastoreError> {
        let corrupt = |what, value: &str| DatastoreError::Corrupt {
            what,
            value: value.to_owned(),
        };
        let spiffe_id = SpiffeId::parse(&self.spiffe_id)
            .map_err(|_| corrupt("entry spiffe id", &self.spiffe_id))?;
        let selectors = self
            .selectors
            .split('\n')
            .map(|s| s.parse().map_err(|_| corrupt("entry selector", s)))
            .collect::<Result<Vec<Selector>, _>>()?;
        let scope = NodeScope::from_parts(&self.node, self.any_node)
            .map_err(|_| corrupt("entry node", &self.node))?;
        Ok(Entry {
            id: self.id,
            spiffe_id,
            selectors,
            scope,
            ttl_seconds: self.ttl_seconds,
            created_at: from_unix_seconds(self.created_at),
            hint: self.hint,
        })
    }
}

fn collect(
    rows: impl Iterator<Item = rusqlite::Result<EntryColumns>>,
) -> Result<Vec<Entry>, DatastoreError> {
    rows.map(|row| row.doing("read an entry")?.parse())
        .collect()
}
