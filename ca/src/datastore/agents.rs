//! Attested agents: which node each agent identity speaks for, and which of its SVIDs is current.
//!
//! The CA lets an agent mint only while its row says so ([`Datastore::agent_may_mint`]): known, not
//! evicted, presenting its *current* SVID (by serial) or its *pending* one, and that SVID not
//! expired.
//!
//! # Renewal
//!
//! A renewed SVID is pending until the agent first presents it; that call makes it current and the
//! previous SVID stale. Until then the previous SVID keeps working, so a renewal answer that never
//! reached the agent (a dropped connection) or that the agent refused does not lock it out: it
//! renews again with the SVID it still holds, and that replaces the pending one, which never works
//! again. SPIRE keeps an agent's previous serial the same way. A copied old agent key therefore stops
//! working as soon as the agent has used its new SVID; re-attestation replaces both at once.
//!
//! # The eviction rule
//!
//! [`Datastore::evict_agent`] bans an agent identity. The ban survives the agent attesting again, with
//! any method and any serial: an evicted node cannot let itself back in. One thing lifts it: attesting
//! with a join token for that node that was **created after the eviction**. A token the operator made
//! earlier (perhaps the one an attacker copied) does not; only a fresh operator decision does. Tokens
//! are ordered by a sequence number that is never reused, so "after" does not depend on clocks.
//! A `k8s_psat` agent, once evicted, stays evicted.

use std::time::SystemTime;

use meshward_identity::SpiffeId;
use rusqlite::{OptionalExtension, Row, params};

use super::{
    Datastore, DatastoreError, Doing, JoinGrant, from_unix_seconds, unix_seconds,
    validate_node_name,
};

/// The longest serial accepted, in hex digits (RFC 5280 allows 20 octets; some encoders add a sign
/// octet; leave room).
const MAX_SERIAL_HEX: usize = 64;

/// How an agent proved its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttestationMethod {
    /// A one-time join token.
    JoinToken,
    /// A Kubernetes projected service-account token.
    K8sPsat,
}

impl AttestationMethod {
    /// The name in the API (`join_token`, `k8s_psat`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JoinToken => "join_token",
            Self::K8sPsat => "k8s_psat",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "join_token" => Some(Self::JoinToken),
            "k8s_psat" => Some(Self::K8sPsat),
            _ => None,
        }
    }
}

impl std::fmt::Display for AttestationMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The evidence an agent was admitted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A join token, just consumed.
    JoinToken(JoinGrant),
    /// A Kubernetes PSAT the CA verified, naming this node.
    K8sPsat {
        /// The node from the token's bound pod.
        node: String,
    },
}

impl Admission {
    /// The node this admission is for.
    pub fn node(&self) -> &str {
        match self {
            Self::JoinToken(grant) => grant.node(),
            Self::K8sPsat { node } => node,
        }
    }

    /// The attestation method.
    pub fn method(&self) -> AttestationMethod {
        match self {
            Self::JoinToken(_) => AttestationMethod::JoinToken,
            Self::K8sPsat { .. } => AttestationMethod::K8sPsat,
        }
    }
}

/// A successful attestation, to record once the agent's SVID is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgent {
    /// The agent's identity, `spiffe://<td>/meshward/agent/<method>/.../<node>`.
    pub spiffe_id: SpiffeId,
    /// The evidence.
    pub admission: Admission,
    /// The serial of the agent SVID just signed (lower-case hex).
    pub serial: String,
    /// Its notAfter.
    pub expires_at: SystemTime,
}

/// An attested agent (the API's `Agent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The agent's identity.
    pub spiffe_id: SpiffeId,
    /// The node it speaks for.
    pub node: String,
    /// How it last attested.
    pub attestation: AttestationMethod,
    /// The serial of its current SVID.
    pub serial: String,
    /// When its current SVID expires.
    pub expires_at: SystemTime,
    /// Its renewed SVID, until the agent first presents it (see the module docs).
    pub pending: Option<PendingSvid>,
    /// Whether an operator evicted it.
    pub evicted: bool,
    /// When it last attested.
    pub attested_at: SystemTime,
}

/// A renewed agent SVID the agent has not presented yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSvid {
    /// Its serial (lower-case hex).
    pub serial: String,
    /// Its notAfter.
    pub expires_at: SystemTime,
}

/// Why an agent may not do what it asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No agent with this identity has attested.
    #[error("agent `{spiffe_id}` has not attested; it must attest first")]
    Unknown {
        /// The agent's identity.
        spiffe_id: String,
    },
    /// An operator evicted the agent.
    #[error(
        "agent `{spiffe_id}` was evicted; only a join token created after the eviction (`meshward ca token create --node NODE`) re-admits it"
    )]
    Evicted {
        /// The agent's identity.
        spiffe_id: String,
    },
    /// The agent's current SVID has expired.
    #[error("agent `{spiffe_id}`'s svid expired at unix time `{expired_at}`; it must attest again")]
    Expired {
        /// The agent's identity.
        spiffe_id: String,
        /// When (unix seconds).
        expired_at: i64,
    },
    /// The agent presented an SVID that is neither its current nor its pending one.
    #[error(
        "agent `{spiffe_id}` presented svid serial `{serial}`, which is no longer valid (the agent has used a newer svid since, or attested again); reconnect with the current svid, or attest again with a new join token if it is lost"
    )]
    StaleSerial {
        /// The agent's identity.
        spiffe_id: String,
        /// The serial presented.
        serial: String,
    },
    /// A serial is not lower-case hex.
    #[error("certificate serial `{serial}` is invalid: expected 1 to 64 lower-case hex digits")]
    BadSerial {
        /// The serial as given.
        serial: String,
    },
    /// The agent identity does not name the admitted node.
    #[error(
        "spiffe id `{spiffe_id}` is not an agent id for node `{node}` (expected `spiffe://<td>/meshward/agent/<method>/.../{node}`)"
    )]
    NotAgentIdForNode {
        /// The identity given.
        spiffe_id: String,
        /// The node admitted.
        node: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

impl Datastore {
    /// Records an attestation: the agent's node and its new SVID. Refuses an evicted agent unless the
    /// admission is a join token created after the eviction (see the module docs), which re-admits it.
    pub fn record_attested_agent(
        &self,
        agent: &NewAgent,
        now: SystemTime,
    ) -> Result<Agent, AgentError> {
        let node = agent.admission.node();
        validate_node_name(node)?;
        validate_serial(&agent.serial)?;
        // `/meshward/agent/<method>/[<cluster>/]<node>`: the node is what scopes issuance, so the
        // identity must name the node the evidence proved.
        let segments: Vec<&str> = agent.spiffe_id.segments().collect();
        let is_agent_id = matches!(segments.as_slice(),
            ["meshward", "agent", _, .., last] if *last == node);
        if !is_agent_id {
            return Err(AgentError::NotAgentIdForNode {
                spiffe_id: agent.spiffe_id.to_string(),
                node: node.to_owned(),
            });
        }
        let id = agent.spiffe_id.as_str();
        let attested_at = unix_seconds(now);
        let expires_at = unix_seconds(agent.expires_at);
        let method = agent.admission.method();
        let readmitted = self.write("record an attested agent", |tx| {
            let ban: Option<Option<i64>> = tx
                .query_row(
                    "SELECT evicted_token_seq FROM agents WHERE spiffe_id = ?1 AND evicted = 1",
                    params![id],
                    |row| row.get(0),
                )
                .optional()
                .doing("look up an agent")?;
            let readmitted = match (ban, &agent.admission) {
                (None, _) => false,
                (Some(banned_up_to), Admission::JoinToken(grant))
                    if grant.seq > banned_up_to.unwrap_or(i64::MAX) =>
                {
                    true
                }
                (Some(_), _) => {
                    return Err(AgentError::Evicted {
                        spiffe_id: id.to_owned(),
                    });
                }
            };
            tx.execute(
                "INSERT INTO agents (spiffe_id, node, attestation, serial, expires_at, attested_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (spiffe_id) DO UPDATE SET
                    node = excluded.node, attestation = excluded.attestation, serial = excluded.serial,
                    expires_at = excluded.expires_at, attested_at = excluded.attested_at,
                    pending_serial = NULL, pending_expires_at = NULL,
                    evicted = 0, evicted_at = NULL, evicted_token_seq = NULL",
                params![id, node, method.as_str(), agent.serial, expires_at, attested_at],
            )
            .doing("record an attested agent")?;
            Ok(readmitted)
        })?;
        if readmitted {
            tracing::warn!(
                agent = id,
                node,
                "evicted agent re-admitted by a new join token"
            );
        }
        tracing::info!(agent = id, node, method = %method, serial = %agent.serial, "agent attested");
        Ok(Agent {
            spiffe_id: agent.spiffe_id.clone(),
            node: node.to_owned(),
            attestation: method,
            serial: agent.serial.clone(),
            expires_at: from_unix_seconds(expires_at),
            pending: None,
            evicted: false,
            attested_at: from_unix_seconds(attested_at),
        })
    }

    /// Records a renewed SVID as the agent's pending one (see the module docs). The agent presented
    /// `presented_serial`: its current SVID, which replaces any pending one never used, or its pending
    /// one, which becomes current first. Returns the agent as it is now.
    ///
    /// Call [`agent_may_mint`](Self::agent_may_mint) before signing, then this: it checks again
    /// atomically with the update.
    pub fn renew_agent(
        &self,
        spiffe_id: &SpiffeId,
        presented_serial: &str,
        new_serial: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Result<Agent, AgentError> {
        validate_serial(new_serial)?;
        let now_s = unix_seconds(now);
        let (agent, dropped) = self.write("renew an agent", |tx| {
            let agent = select_agent(tx, spiffe_id)?;
            let (agent, presented) = check_may_mint(agent.as_ref(), spiffe_id, presented_serial, now_s)?;
            let dropped = match presented {
                Presented::Pending => {
                    promote(tx, spiffe_id, presented_serial)?;
                    None
                }
                Presented::Current => agent.pending.as_ref().map(|p| p.serial.clone()),
            };
            tx.execute(
                "UPDATE agents SET pending_serial = ?2, pending_expires_at = ?3 WHERE spiffe_id = ?1",
                params![spiffe_id.as_str(), new_serial, unix_seconds(expires_at)],
            )
            .doing("renew an agent")?;
            let agent = select_agent(tx, spiffe_id)?.ok_or_else(|| unknown(spiffe_id))?;
            Ok::<_, AgentError>((agent, dropped))
        })?;
        if let Some(dropped) = dropped {
            tracing::warn!(
                agent = %spiffe_id,
                presented = presented_serial,
                dropped = %dropped,
                "agent renewed again with its previous svid; the svid of its last renewal was never used and no longer works (expected after a lost answer; otherwise the old agent key may be in other hands)"
            );
        }
        tracing::info!(agent = %spiffe_id, serial = new_serial, "agent renewed; the new svid is pending until the agent presents it");
        Ok(agent)
    }

    /// Evicts an agent: it may no longer mint or renew, and attesting again does not help (see the
    /// module docs). Evicting an evicted agent renews the ban.
    pub fn evict_agent(&self, spiffe_id: &SpiffeId, now: SystemTime) -> Result<(), AgentError> {
        let now_s = unix_seconds(now);
        let updated = self.write("evict an agent", |tx| {
            tx.execute(
                // sqlite_sequence holds the highest seq ever given to a join token, purged or not.
                "UPDATE agents SET evicted = 1, evicted_at = ?2, evicted_token_seq =
                    COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'join_tokens'), 0)
                 WHERE spiffe_id = ?1",
                params![spiffe_id.as_str(), now_s],
            )
            .doing("evict an agent")
        })?;
        if updated == 0 {
            return Err(unknown(spiffe_id));
        }
        tracing::warn!(agent = %spiffe_id, "agent evicted");
        Ok(())
    }

    /// The agent with this identity, if it ever attested.
    pub fn agent(&self, spiffe_id: &SpiffeId) -> Result<Option<Agent>, DatastoreError> {
        self.read(|conn| select_agent(conn, spiffe_id))
    }

    /// Every agent that ever attested, evicted ones included, by identity.
    pub fn list_agents(&self) -> Result<Vec<Agent>, DatastoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!("{SELECT_AGENT} ORDER BY spiffe_id"))
                .doing("list agents")?;
            let rows = stmt.query_map([], agent_columns).doing("list agents")?;
            rows.map(|row| row.doing("list agents")?.parse()).collect()
        })
    }

    /// Whether the agent presenting SVID `serial` may mint now; returns its node, for the entitlement
    /// check. Refuses, in this order: unknown, evicted, stale serial, expired. The first call with a
    /// pending SVID makes it current, and the previous one stale.
    pub fn agent_may_mint(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
        now: SystemTime,
    ) -> Result<String, AgentError> {
        let now_s = unix_seconds(now);
        let agent = self.read(|conn| select_agent(conn, spiffe_id))?;
        let (agent, presented) = check_may_mint(agent.as_ref(), spiffe_id, serial, now_s)?;
        if presented == Presented::Current {
            return Ok(agent.node.clone());
        }
        // Checked again in the transaction: an eviction or another renewal may have come between.
        let (node, promoted) = self.write("make a renewed agent svid current", |tx| {
            let agent = select_agent(tx, spiffe_id)?;
            let (agent, presented) = check_may_mint(agent.as_ref(), spiffe_id, serial, now_s)?;
            let promoted = presented == Presented::Pending;
            if promoted {
                promote(tx, spiffe_id, serial)?;
            }
            Ok::<_, AgentError>((agent.node.clone(), promoted))
        })?;
        if promoted {
            tracing::info!(agent = %spiffe_id, serial, "agent presented its renewed svid; the previous one no longer works");
        }
        Ok(node)
    }
}

/// Which of an agent's SVIDs a call presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presented {
    Current,
    Pending,
}

/// Makes the pending SVID `serial` current; the previous current one becomes stale.
fn promote(
    tx: &rusqlite::Transaction<'_>,
    spiffe_id: &SpiffeId,
    serial: &str,
) -> Result<(), DatastoreError> {
    tx.execute(
        "UPDATE agents SET serial = pending_serial, expires_at = pending_expires_at,
            pending_serial = NULL, pending_expires_at = NULL
         WHERE spiffe_id = ?1 AND pending_serial = ?2",
        params![spiffe_id.as_str(), serial],
    )
    .doing("make a renewed agent svid current")?;
    Ok(())
}

fn check_may_mint<'a>(
    agent: Option<&'a Agent>,
    spiffe_id: &SpiffeId,
    serial: &str,
    now_s: i64,
) -> Result<(&'a Agent, Presented), AgentError> {
    let Some(agent) = agent else {
        return Err(unknown(spiffe_id));
    };
    let spiffe_id = || spiffe_id.to_string();
    if agent.evicted {
        return Err(AgentError::Evicted {
            spiffe_id: spiffe_id(),
        });
    }
    let (presented, expires_at) = match &agent.pending {
        _ if agent.serial == serial => (Presented::Current, agent.expires_at),
        Some(pending) if pending.serial == serial => (Presented::Pending, pending.expires_at),
        _ => {
            return Err(AgentError::StaleSerial {
                spiffe_id: spiffe_id(),
                serial: serial.to_owned(),
            });
        }
    };
    let expired_at = unix_seconds(expires_at);
    if now_s >= expired_at {
        return Err(AgentError::Expired {
            spiffe_id: spiffe_id(),
            expired_at,
        });
    }
    Ok((agent, presented))
}

fn unknown(spiffe_id: &SpiffeId) -> AgentError {
    AgentError::Unknown {
        spiffe_id: spiffe_id.to_string(),
    }
}

fn validate_serial(serial: &str) -> Result<(), AgentError> {
    let ok = !serial.is_empty()
        && serial.len() <= MAX_SERIAL_HEX
        && serial
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadSerial {
            serial: serial.to_owned(),
        })
    }
}

const SELECT_AGENT: &str =
    "SELECT spiffe_id, node, attestation, serial, expires_at, evicted, attested_at,
        pending_serial, pending_expires_at FROM agents";

fn select_agent(
    conn: &rusqlite::Connection,
    spiffe_id: &SpiffeId,
) -> Result<Option<Agent>, DatastoreError> {
    conn.prepare_cached(&format!("{SELECT_AGENT} WHERE spiffe_id = ?1"))
        .doing("read an agent")?
        .query_row(params![spiffe_id.as_str()], agent_columns)
        .optional()
        .doing("read an agent")?
        .map(AgentColumns::parse)
        .transpose()
}

/// An agent row as stored, before its text is parsed back into types.
struct AgentColumns {
    spiffe_id: String,
    node: String,
    attestation: String,
    serial: String,
    expires_at: i64,
    evicted: bool,
    attested_at: i64,
    pending_serial: Option<String>,
    pending_expires_at: Option<i64>,
}

fn agent_columns(row: &Row<'_>) -> rusqlite::Result<AgentColumns> {
    Ok(AgentColumns {
        spiffe_id: row.get(0)?,
        node: row.get(1)?,
        attestation: row.get(2)?,
        serial: row.get(3)?,
        expires_at: row.get(4)?,
        evicted: row.get(5)?,
        attested_at: row.get(6)?,
        pending_serial: row.get(7)?,
        pending_expires_at: row.get(8)?,
    })
}

impl AgentColumns {
    fn parse(self) -> Result<Agent, DatastoreError> {
        let spiffe_id = SpiffeId::parse(&self.spiffe_id).map_err(|_| DatastoreError::Corrupt {
            what: "agent spiffe id",
            value: self.spiffe_id.clone(),
        })?;
        let attestation =
            AttestationMethod::parse(&self.attestation).ok_or(DatastoreError::Corrupt {
                what: "attestation method",
                value: self.attestation,
            })?;
        Ok(Agent {
            spiffe_id,
            node: self.node,
            attestation,
            serial: self.serial,
            expires_at: from_unix_seconds(self.expires_at),
            // The table's CHECK keeps both or neither.
            pending: self.pending_serial.zip(self.pending_expires_at).map(
                |(serial, expires_at)| PendingSvid {
                    serial,
                    expires_at: from_unix_seconds(expires_at),
                },
            ),
            evicted: self.evicted,
            attested_at: from_unix_seconds(self.attested_at),
        })
    }
}
