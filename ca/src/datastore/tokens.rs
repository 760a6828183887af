//! Join tokens: one-time, expiring secrets that let an agent attest its node (`meshward ca token create`).
//!
//! A token is 32 random bytes, shown once as 64 hex characters; the database keeps only its SHA-256,
//! so a copy of the database does not let anyone attest. Consuming is atomic: of two agents presenting
//! the same token at once (even to two CA processes), exactly one gets the node.

use std::time::{Duration, SystemTime};

use ring::digest::{SHA256, digest};
use rusqlite::{OptionalExtension, params};

use super::{Datastore, DatastoreError, Doing, random_bytes, unix_seconds, validate_node_name};

/// The longest a join token may live before it is used.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long used and expired tokens are kept (as hashes), so that using one is reported as reuse or
/// expiry rather than as an unknown token. After that they are purged.
pub const TOKEN_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A freshly created join token: the secret (shown to the operator once, never stored) and its expiry.
#[derive(Debug)]
pub struct JoinToken {
    /// The token to hand to the agent.
    pub token: JoinTokenSecret,
    /// After this the token is refused.
    pub expires_at: SystemTime,
}

/// A join token's secret text; `Debug` redacts it so it cannot end up in a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenSecret(String);

impl JoinTokenSecret {
    /// The token itself, to print once for the operator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinTokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinTokenSecret(<redacted>)")
    }
}

/// Proof that a join token was just consumed: the node it attests, for
/// [`Admission::JoinToken`](super::Admission::JoinToken).
///
/// Only [`Datastore::consume_join_token`] makes one, so holding one means a token really was spent. It
/// also remembers which token, so that an evicted agent is re-admitted only by a token created after
/// its eviction (see [`agents`](super::agents)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGrant {
    node: String,
    pub(crate) seq: i64,
}

impl JoinGrant {
    /// The node the token was created for.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Why a join token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No such token (never created, mistyped, or purged long after use).
    #[error("unknown join token; create one with `meshward ca token create --node NAME`")]
    Unknown,
    /// The token expired before it was used.
    #[error("join token for node `{node}` expired at unix time `{expired_at}`; create a new one")]
    Expired {
        /// The node it was for.
        node: String,
        /// When it expired (unix seconds).
        expired_at: i64,
    },
    /// The token was used already; tokens are single-use.
    #[error(
        "join token for node `{node}` was already used at unix time `{used_at}`; tokens are single-use, create a new one"
    )]
    AlreadyUsed {
        /// The node it was for.
        node: String,
        /// When it was used (unix seconds).
        used_at: i64,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

impl Datastore {
    /// Creates a single-use join token for `node`, valid for `ttl` (1s to [`MAX_TOKEN_TTL`]).
    ///
    /// Also purges tokens that were used or expired more than [`TOKEN_RETENTION`] ago.
    pub fn create_join_token(
        &self,
        node: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JoinToken, DatastoreError> {
        validate_node_name(node)?;
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(DatastoreError::BadTokenTtl { ttl });
        }
        let token = hex::encode(random_bytes::<32>()?);
        let hash = token_hash(&token);
        let now_s = unix_seconds(now);
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let expires_at = now_s.saturating_add(ttl_s);
        self.write("create a join token", |tx| {
            purge(tx, now_s)?;
            tx.execute(
                "INSERT INTO join_tokens (hash, node, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![hash.as_slice(), node, now_s, expires_at],
            )
            .doing("create a join token")?;
            Ok::<_, DatastoreError>(())
        })?;
        tracing::info!(node, expires_at, "join token created");
        Ok(JoinToken {
            token: JoinTokenSecret(token),
            expires_at: super::from_unix_seconds(expires_at),
        })
    }

    /// Spends `token`: returns the node it attests, or why it cannot be used. Single use, atomically
    /// across threads and processes.
    pub fn consume_join_token(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<JoinGrant, TokenError> {
        // Looked up by hash: timing differences in the index search reveal nothing useful about a token,
        // only about SHA-256 outputs an attacker cannot steer.
        let hash = token_hash(token);
        let now_s = unix_seconds(now);
        self.write("consume a join token", |tx| {
            let row = tx
                .query_row(
                    "SELECT seq, node, expires_at, used_at FROM join_tokens WHERE hash = ?1",
                    params![hash.as_slice()],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, Option<i64>>(3)?,
                        ))
                    },
                )
                .optional()
                .doing("look up a join token")?;
            let Some((seq, node, expires_at, used_at)) = row else {
                return Err(TokenError::Unknown);
            };
            if let Some(used_at) = used_at {
                return Err(TokenError::AlreadyUsed { node, used_at });
            }
            if now_s >= expires_at {
                return Err(TokenError::Expired {
                    node,
                    expired_at: expires_at,
                });
            }
            tx.execute(
                "UPDATE join_tokens SET used_at = ?2 WHERE seq = ?1",
                params![seq, now_s],
            )
            .doing("mark a join token used")?;
            tracing::info!(node = %node, "join token consumed");
            Ok(JoinGrant { node, seq })
        })
    }

    /// Deletes tokens used or expired more than [`TOKEN_RETENTION`] before `now`; returns how many.
    pub fn purge_join_tokens(&self, now: SystemTime) -> Result<usize, DatastoreError> {
        let now_s = unix_seconds(now);
        self.write("purge old join tokens", |tx| purge(tx, now_s))
    }
}

fn purge(tx: &rusqlite::Transaction<'_>, now_s: i64) -> Result<usize, DatastoreError> {
    let retention = i64::try_from(TOKEN_RETENTION.as_secs()).unwrap_or(i64::MAX);
    tx.execute(
        // A used token counts from its use, an unused one from its expiry; unexpired unused ones stay.
        "DELETE FROM join_tokens WHERE COALESCE(used_at, expires_at) < ?1",
        params![now_s.saturating_sub(retention)],
    )
    .doing("purge old join tokens")
}

fn token_hash(token: &str) -> Vec<u8> {
    digest(&SHA256, token.as_bytes()).as_ref().to_vec()
}
