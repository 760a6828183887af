//! Why the CA refused to issue, with the stable reason codes the API and metrics carry.

use std::time::Duration;

use meshward_identity::x509::{CsrError, MAX_SVID_TTL, MIN_SVID_TTL};
use meshward_identity::{SpiffeId, TrustDomain};

use crate::datastore::{AgentError, TokenError};

/// Why the CA refused to issue. [`IssueError::code`] is the stable machine-readable reason.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR is malformed, not P-256, badly signed, or asks for what it may not have.
    #[error("bad csr: {0}")]
    BadCsr(#[from] CsrError),
    /// No entry entitles this identity on the agent's node.
    #[error(
        "spiffe id `{id}` is not entitled on node `{node}`; create an entry for it (`meshward ca entry create --node {node}` or `--any-node`)"
    )]
    NotEntitled {
        /// The identity asked for.
        id: String,
        /// The agent's node.
        node: String,
    },
    /// The caller's identity is not an agent identity of this trust domain.
    #[error("caller `{id}` is not a meshward agent of this trust domain")]
    NotAgent {
        /// The caller's SPIFFE ID.
        id: String,
    },
    /// The agent never attested.
    #[error("agent `{id}` has not attested; attest with a join token first")]
    UnknownAgent {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// An operator evicted the agent.
    #[error("agent `{id}` was evicted; attest again with a join token created after the eviction")]
    AgentEvicted {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// The agent's SVID expired.
    #[error("agent `{id}`'s svid has expired; attest again")]
    AgentExpired {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// The agent presented an SVID that is not its current one.
    #[error(
        "agent `{id}` presented svid serial `{serial}`, which is no longer its current svid; reconnect with the current one"
    )]
    StaleAgentSvid {
        /// The agent's SPIFFE ID.
        id: String,
        /// The serial presented.
        serial: String,
    },
    /// The join token is unknown, used or expired.
    #[error("join token refused: {0}")]
    BadJoinToken(TokenError),
    /// The requested identity is not a SPIFFE ID.
    #[error("`{id}` is not a valid spiffe id: {reason}")]
    BadSpiffeId {
        /// The text sent.
        id: String,
        /// Why.
        reason: String,
    },
    /// The requested identity is not one a workload may hold.
    #[error("spiffe id `{id}` cannot be issued to a workload: {reason}")]
    NotWorkloadId {
        /// The identity asked for.
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// The requested identity is in another trust domain.
    #[error("spiffe id `{id}` is outside trust domain `{trust_domain}`")]
    OutsideTrustDomain {
        /// The identity asked for.
        id: String,
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The requested lifetime is out of range.
    #[error("ttl `{}s` is out of range: ask for `{}s` to `{}s`, or none for the default", ttl.as_secs(), MIN_SVID_TTL.as_secs(), MAX_SVID_TTL.as_secs())]
    BadTtl {
        /// What was asked for.
        ttl: Duration,
    },
    /// A JWT-SVID was asked for without an audience.
    #[error("a jwt-svid needs at least one non-empty audience")]
    BadAudience,
    /// The batch holds more requests than allowed.
    #[error("batch of `{count}` requests is over the limit of `{max}`; split it")]
    TooManyRequests {
        /// Requests in the batch.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The CA failed (datastore, audit log, signer); nothing was issued.
    #[error("internal ca error while trying to {doing}: {reason}")]
    Internal {
        /// What was being done.
        doing: &'static str,
        /// The cause, for the log.
        reason: String,
    },
}

impl IssueError {
    /// The stable reason code (metrics label, `MintError.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadCsr(_) => "bad_csr",
            Self::NotEntitled { .. } => "not_entitled",
            Self::NotAgent { .. } => "not_agent",
            Self::UnknownAgent { .. } => "unknown_agent",
            Self::AgentEvicted { .. } => "agent_evicted",
            Self::AgentExpired { .. } => "agent_expired",
            Self::StaleAgentSvid { .. } => "stale_agent_svid",
            Self::BadJoinToken(_) => "bad_join_token",
            Self::BadSpiffeId { .. } => "bad_spiffe_id",
            Self::NotWorkloadId { .. } => "not_workload_id",
            Self::OutsideTrustDomain { .. } => "outside_trust_domain",
            Self::BadTtl { .. } => "bad_ttl",
            Self::BadAudience => "bad_audience",
            Self::TooManyRequests { .. } => "too_many_requests",
            Self::Internal { .. } => "internal",
        }
    }

    /// Every code [`IssueError::code`] can return (for pre-registering metric labels).
    pub const CODES: &'static [&'static str] = &[
        "bad_csr",
        "not_entitled",
        "not_agent",
        "unknown_agent",
        "agent_evicted",
        "agent_expired",
        "stale_agent_svid",
        "bad_join_token",
        "bad_spiffe_id",
        "not_workload_id",
        "outside_trust_domain",
        "bad_ttl",
        "bad_audience",
        "too_many_requests",
        "internal",
    ];
}

/// The issuance error for an agent the datastore refused.
pub(super) fn agent_error(e: AgentError, id: &SpiffeId) -> IssueError {
    let id = id.to_string();
    match e {
        AgentError::Unknown { .. } => IssueError::UnknownAgent { id },
        AgentError::Evicted { .. } => IssueError::AgentEvicted { id },
        AgentError::Expired { .. } => IssueError::AgentExpired { id },
        // A malformed serial can never be the current one.
        AgentError::StaleSerial { serial, .. } | AgentError::BadSerial { serial } => {
            IssueError::StaleAgentSvid { id, serial }
        }
        e @ (AgentError::NotAgentIdForNode { .. } | AgentError::Datastore(_)) => {
            internal("check the agent", e)
        }
    }
}

/// A copy of an error that applies to every request of a batch (`IssueError` holds non-`Clone` causes).
pub(super) fn same_error(error: &IssueError) -> IssueError {
    match error {
        IssueError::NotAgent { id } => IssueError::NotAgent { id: id.clone() },
        IssueError::UnknownAgent { id } => IssueError::UnknownAgent { id: id.clone() },
        IssueError::AgentEvicted { id } => IssueError::AgentEvicted { id: id.clone() },
        IssueError::AgentExpired { id } => IssueError::AgentExpired { id: id.clone() },
        IssueError::StaleAgentSvid { id, serial } => IssueError::StaleAgentSvid {
            id: id.clone(),
            serial: serial.clone(),
        },
        IssueError::Internal { doing, reason } => IssueError::Internal {
            doing,
            reason: reason.clone(),
        },
        other => IssueError::Internal {
            doing: "process the batch",
            reason: other.to_string(),
        },
    }
}

/// An internal failure while doing `doing`.
pub(super) fn internal(doing: &'static str, e: impl std::fmt::Display) -> IssueError {
    IssueError::Internal {
        doing,
        reason: e.to_string(),
    }
}
