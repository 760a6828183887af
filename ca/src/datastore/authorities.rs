//! Signing authorities and root rotation: `prepared` -> `active` -> `old` -> `retired` (DESIGN §3.5).
//!
//! - prepare: a new authority is published in the bundle next to the current one, not yet signing;
//! - activate: it signs from now on; the previous active one becomes `old` (still in the bundle, because
//!   SVIDs it signed are still out there), in one transaction;
//! - retire: an `old` authority leaves the bundle, but only once everything it signed has expired
//!   (`signed_until`), unless forced.
//!
//! INVARIANT: at most one authority is `active` and at most one `prepared` (partial unique indexes
//! enforce it in the schema too); once one has been activated, exactly one is `active`, because the only
//! way out of `active` is being replaced by a prepared one.
//!
//! Rows hold certificates only. Private keys are files (0600) that the signing code manages.

use std::time::SystemTime;

use ring::digest::{SHA256, digest};
use rusqlite::{OptionalExtension, Row, params};
use x509_parser::parse_x509_certificate;

use super::{Datastore, DatastoreError, Doing, from_unix_seconds, unix_seconds};

/// Where an authority is in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityState {
    /// In the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// In the bundle, no longer signing; what it signed may still be valid.
    Old,
    /// Out of the bundle.
    Retired,
}

impl AuthorityState {
    /// The state named `s` (`prepared`, `active`, `old`, `retired`), if any.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::parse(s)
    }

    /// The name in the API (`prepared`, `active`, `old`, `retired`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Retired => "retired",
        }
    }

    /// Whether peers should trust it (it belongs in the trust bundle).
    pub fn is_published(self) -> bool {
        !matches!(self, Self::Retired)
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "prepared" => Some(Self::Prepared),
            "active" => Some(Self::Active),
            "old" => Some(Self::Old),
            "retired" => Some(Self::Retired),
            _ => None,
        }
    }
}

impl std::fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing authority (the API's `Authority`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// Hex SHA-256 of the certificate's SubjectPublicKeyInfo (see [`authority_id`]).
    pub id: String,
    /// Where it is in its rotation.
    pub state: AuthorityState,
    /// The certificate, DER.
    pub certificate: Vec<u8>,
    /// The certificate's notBefore.
    pub not_before: SystemTime,
    /// The certificate's notAfter.
    pub not_after: SystemTime,
    /// The latest notAfter of anything it signed (the epoch if nothing yet).
    pub signed_until: SystemTime,
    /// When it was prepared.
    pub created_at: SystemTime,
}

/// Why a rotation step was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The certificate does not parse.
    #[error("authority certificate is invalid: {reason}")]
    BadCertificate {
        /// What is wrong.
        reason: String,
    },
    /// The certificate cannot sign certificates.
    #[error("certificate `{id}` is not a ca certificate (it lacks basicConstraints CA:true)")]
    NotCa {
        /// Its id.
        id: String,
    },
    /// The certificate has expired.
    #[error("authority `{id}` expired at unix time `{not_after}`; make a new one")]
    Expired {
        /// Its id.
        id: String,
        /// Its notAfter (unix seconds).
        not_after: i64,
    },
    /// An authority with the same key exists.
    #[error("authority `{id}` exists already (state `{state}`)")]
    Exists {
        /// Its id.
        id: String,
        /// Its state.
        state: AuthorityState,
    },
    /// Another authority is prepared already.
    #[error(
        "authority `{id}` is already prepared; activate it first (`meshward ca rotate activate`)"
    )]
    AlreadyPrepared {
        /// The prepared authority's id.
        id: String,
    },
    /// There is nothing to activate.
    #[error("no prepared authority to activate; run `meshward ca rotate prepare` first")]
    NoPrepared,
    /// There is nothing to retire.
    #[error("no old authority to retire; activate a new one first")]
    NoOld,
    /// Several authorities are old; the caller must name one.
    #[error("several authorities are old ({ids}); name the one to retire")]
    SeveralOld {
        /// Their ids, as a list in backticks.
        ids: String,
    },
    /// No authority has this id.
    #[error("no authority has id `{id}`")]
    Unknown {
        /// The id asked for.
        id: String,
    },
    /// The active authority cannot be retired.
    #[error("authority `{id}` is active; prepare and activate a new one before retiring it")]
    RetireActive {
        /// Its id.
        id: String,
    },
    /// Only an old authority can be retired.
    #[error("authority `{id}` is `{state}`; only an `old` authority can be retired")]
    NotOld {
        /// Its id.
        id: String,
        /// Its state.
        state: AuthorityState,
    },
    /// SVIDs the authority signed are still valid.
    #[error(
        "authority `{id}` signed certificates valid until unix time `{signed_until}`; retire it after that (forcing it breaks their holders)"
    )]
    StillSigning {
        /// Its id.
        id: String,
        /// The latest notAfter it signed (unix seconds).
        signed_until: i64,
    },
    /// A retired authority must not sign.
    #[error("authority `{id}` is retired and must not sign")]
    Retired {
        /// Its id.
        id: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// The id of the authority with this certificate: hex SHA-256 of its SubjectPublicKeyInfo (stable
/// across re-issuing the certificate for the same key).
pub fn authority_id(cert_der: &[u8]) -> Result<String, AuthorityError> {
    Ok(parse_certificate(cert_der)?.id)
}

impl Datastore {
    /// Adds a new authority in state `prepared`. Refuses a certificate that is not a valid, unexpired CA
    /// certificate, a key that is already known, and a second prepared authority.
    pub fn insert_prepared_authority(
        &self,
        cert_der: &[u8],
        now: SystemTime,
    ) -> Result<Authority, AuthorityError> {
        let cert = parse_certificate(cert_der)?;
        let now_s = unix_seconds(now);
        if !cert.is_ca {
            return Err(AuthorityError::NotCa { id: cert.id });
        }
        if now_s >= cert.not_after {
            return Err(AuthorityError::Expired {
                id: cert.id,
                not_after: cert.not_after,
            });
        }
        self.write("prepare an authority", |tx| {
            if let Some(existing) = select_authority(tx, "WHERE id = ?1", params![cert.id])? {
                return Err(AuthorityError::Exists {
                    id: existing.id,
                    state: existing.state,
                });
            }
            if let Some(prepared) = select_authority(tx, "WHERE state = 'prepared'", [])? {
                return Err(AuthorityError::AlreadyPrepared { id: prepared.id });
            }
            tx.execute(
                "INSERT INTO authorities (id, state, certificate, not_before, not_after, created_at)
                 VALUES (?1, 'prepared', ?2, ?3, ?4, ?5)",
                params![cert.id, cert_der, cert.not_before, cert.not_after, now_s],
            )
            .doing("prepare an authority")?;
            Ok(())
        })?;
        tracing::info!(authority = %cert.id, "authority prepared");
        Ok(Authority {
            id: cert.id,
            state: AuthorityState::Prepared,
            certificate: cert_der.to_vec(),
            not_before: from_unix_seconds(cert.not_before),
            not_after: from_unix_seconds(cert.not_after),
            signed_until: from_unix_seconds(0),
            created_at: from_unix_seconds(now_s),
        })
    }

    /// Makes the prepared authority the active one; the previous active one becomes `old`, atomically.
    pub fn activate_authority(&self, now: SystemTime) -> Result<Authority, AuthorityError> {
        let now_s = unix_seconds(now);
        let activated = self.write("activate an authority", |tx| {
            let prepared = select_authority(tx, "WHERE state = 'prepared'", [])?
                .ok_or(AuthorityError::NoPrepared)?;
            let not_after = unix_seconds(prepared.not_after);
            if now_s >= not_after {
                return Err(AuthorityError::Expired {
                    id: prepared.id,
                    not_after,
                });
            }
            // Demote first: the unique index on 'active' would refuse two at once, even inside the
            // transaction.
            tx.execute(
                "UPDATE authorities SET state = 'old' WHERE state = 'active'",
                [],
            )
            .doing("demote the active authority")?;
            tx.execute(
                "UPDATE authorities SET state = 'active', activated_at = ?2 WHERE id = ?1",
                params![prepared.id, now_s],
            )
            .doing("activate an authority")?;
            Ok(Authority {
                state: AuthorityState::Active,
                ..prepared
            })
        })?;
        tracing::info!(authority = %activated.id, "authority activated");
        Ok(activated)
    }

    /// Retires an `old` authority: `id`, or the only old one if `None`. Refused while certificates it
    /// signed are still valid (`now` before its `signed_until`, or before the latest notAfter the
    /// journal holds for it), unless `force`.
    pub fn retire_authority(
        &self,
        id: Option<&str>,
        force: bool,
        now: SystemTime,
    ) -> Result<Authority, AuthorityError> {
        let now_s = unix_seconds(now);
        let retired = self.write("retire an authority", |tx| {
            let target = match id {
                Some(id) => select_authority(tx, "WHERE id = ?1", params![id])?.ok_or_else(|| {
                    AuthorityError::Unknown { id: id.to_owned() }
                })?,
                None => only_old(tx)?,
            };
            match target.state {
                AuthorityState::Old => {}
                AuthorityState::Active => {
                    return Err(AuthorityError::RetireActive { id: target.id });
                }
                state => {
                    return Err(AuthorityError::NotOld {
                        id: target.id,
                        state,
                    });
                }
            }
            // The journal is checked too: a batch recorded by another replica raises signed_until in
            // the same transaction, but an older CA version or a hand edit might not have.
            let journal: Option<i64> = tx
                .query_row(
                    "SELECT MAX(not_after) FROM issued WHERE authority = ?1",
                    params![target.id],
                    |row| row.get(0),
                )
                .doing("find an authority's latest notAfter")?;
            let signed_until = unix_seconds(target.signed_until).max(journal.unwrap_or(0));
            if now_s < signed_until {
                if !force {
                    return Err(AuthorityError::StillSigning {
                        id: target.id,
                        signed_until,
                    });
                }
                tracing::warn!(authority = %target.id, signed_until, "retiring an authority whose certificates are still valid (forced)");
            }
            tx.execute(
                "UPDATE authorities SET state = 'retired', retired_at = ?2 WHERE id = ?1",
                params![target.id, now_s],
            )
            .doing("retire an authority")?;
            Ok(Authority {
                state: AuthorityState::Retired,
                ..target
            })
        })?;
        tracing::info!(authority = %retired.id, "authority retired");
        Ok(retired)
    }

    /// Every authority, oldest first.
    pub fn list_authorities(&self) -> Result<Vec<Authority>, DatastoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!("{SELECT_AUTHORITY} ORDER BY created_at, rowid"))
                .doing("list authorities")?;
            let rows = stmt
                .query_map([], authority_columns)
                .doing("list authorities")?;
            rows.map(|row| row.doing("list authorities")?.parse())
                .collect()
        })
    }

    /// The active authority, if one has been activated.
    pub fn active_authority(&self) -> Result<Option<Authority>, DatastoreError> {
        self.read(|conn| select_authority(conn, "WHERE state = 'active'", []))
    }

    /// Raises `id`'s `signed_until` to `not_after` (never lowers it). Call it before handing out a
    /// certificate the authority signed: it fails if another CA process retired the authority meanwhile.
    pub fn bump_signed_until(&self, id: &str, not_after: SystemTime) -> Result<(), AuthorityError> {
        let not_after = unix_seconds(not_after);
        self.write("raise an authority's signed-until", |tx| {
            let authority = select_authority(tx, "WHERE id = ?1", params![id])?
                .ok_or_else(|| AuthorityError::Unknown { id: id.to_owned() })?;
            if authority.state == AuthorityState::Retired {
                return Err(AuthorityError::Retired { id: authority.id });
            }
            tx.execute(
                "UPDATE authorities SET signed_until = MAX(signed_until, ?2) WHERE id = ?1",
                params![id, not_after],
            )
            .doing("raise an authority's signed-until")?;
            Ok(())
        })
    }
}

/// One authority as the Kubernetes keys Secret describes it (see `keystore::shared`): what
/// [`Datastore::mirror_authorities`] makes the local table hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredAuthority {
    /// Its id (must match the certificate's).
    pub id: String,
    /// Its state.
    pub state: AuthorityState,
    /// Its certificate, DER.
    pub certificate: Vec<u8>,
    /// The latest notAfter any replica reported signing with it.
    pub signed_until: SystemTime,
    /// When it was prepared.
    pub created_at: SystemTime,
}

impl Datastore {
    /// Makes the authorities table hold exactly `authorities` (Kubernetes mode, where the keys Secret
    /// is the source of truth and this table a local copy), in one transaction. A row's
    /// `signed_until` is only ever raised: what this replica signed stays recorded.
    pub fn mirror_authorities(
        &self,
        authorities: &[MirroredAuthority],
    ) -> Result<(), AuthorityError> {
        let parsed = authorities
            .iter()
            .map(|a| {
                let cert = parse_certificate(&a.certificate)?;
                if cert.id != a.id {
                    return Err(AuthorityError::BadCertificate {
                        reason: format!(
                            "authority `{}` has the certificate of `{}`",
                            a.id, cert.id
                        ),
                    });
                }
                Ok((a, cert))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.write("mirror the authorities", |tx| {
            let keep: Vec<&str> = authorities.iter().map(|a| a.id.as_str()).collect();
            let existing: Vec<String> = tx
                .prepare_cached("SELECT id FROM authorities")
                .doing("mirror the authorities")?
                .query_map([], |row| row.get(0))
                .doing("mirror the authorities")?
                .collect::<Result<_, _>>()
                .doing("mirror the authorities")?;
            for id in existing.iter().filter(|id| !keep.contains(&id.as_str())) {
                tx.execute("DELETE FROM authorities WHERE id = ?1", params![id])
                    .doing("mirror the authorities")?;
            }
            // 'old' has no unique index: park every row there so the upserts below never see two
            // active (or prepared) rows at once, whatever order they come in.
            tx.execute("UPDATE authorities SET state = 'old'", [])
                .doing("mirror the authorities")?;
            for (a, cert) in &parsed {
                tx.execute(
                    "INSERT INTO authorities (id, state, certificate, not_before, not_after, signed_until, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                         signed_until = MAX(signed_until, excluded.signed_until)",
                    params![
                        a.id,
                        a.state.as_str(),
                        a.certificate,
                        cert.not_before,
                        cert.not_after,
                        unix_seconds(a.signed_until),
                        unix_seconds(a.created_at)
                    ],
                )
                .doing("mirror the authorities")?;
            }
            Ok(())
        })
    }

    /// The latest notAfter this datastore knows `id` signed: its row's `signed_until` or the
    /// journal's latest entry, whichever is later (the epoch if neither).
    pub fn local_signed_until(&self, id: &str) -> Result<SystemTime, DatastoreError> {
        let secs = self.read(|conn| -> Result<i64, DatastoreError> {
            let row: Option<i64> = conn
                .query_row(
                    "SELECT signed_until FROM authorities WHERE id = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .optional()
                .doing("read an authority's signed-until")?;
            let journal: Option<i64> = conn
                .query_row(
                    "SELECT MAX(not_after) FROM issued WHERE authority = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .doing("find an authority's latest notAfter")?;
            Ok(row.unwrap_or(0).max(journal.unwrap_or(0)))
        })?;
        Ok(from_unix_seconds(secs))
    }
}

/// What the datastore needs from an authority certificate.
struct ParsedCert {
    id: String,
    is_ca: bool,
    not_before: i64,
    not_after: i64,
}

fn parse_certificate(der: &[u8]) -> Result<ParsedCert, AuthorityError> {
    let (rest, cert) = parse_x509_certificate(der).map_err(|e| AuthorityError::BadCertificate {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(AuthorityError::BadCertificate {
            reason: format!("`{}` bytes follow the certificate", rest.len()),
        });
    }
    let spki = digest(&SHA256, cert.public_key().raw);
    Ok(ParsedCert {
        id: hex::encode(spki.as_ref()),
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn only_old(conn: &rusqlite::Connection) -> Result<Authority, AuthorityError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "{SELECT_AUTHORITY} WHERE state = 'old' ORDER BY created_at, rowid"
        ))
        .doing("find the old authority")?;
    let old = stmt
        .query_map([], authority_columns)
        .doing("find the old authority")?
        .map(|row| row.doing("find the old authority")?.parse())
        .collect::<Result<Vec<_>, DatastoreError>>()?;
    let mut old = old.into_iter();
    match (old.next(), old.len()) {
        (None, _) => Err(AuthorityError::NoOld),
        (Some(only), 0) => Ok(only),
        (Some(first), _) => {
            let ids = std::iter::once(first)
                .chain(old)
                .map(|a| format!("`{}`", a.id))
                .collect::<Vec<_>>()
                .join(", ");
            Err(AuthorityError::SeveralOld { ids })
        }
    }
}

const SELECT_AUTHORITY: &str = "SELECT id, state, certificate, not_before, not_after, signed_until, created_at FROM authorities";

fn select_authority(
    conn: &rusqlite::Connection,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Option<Authority>, DatastoreError> {
    conn.prepare_cached(&format!("{SELECT_AUTHORITY} {filter}"))
        .doing("read an authority")?
        .query_row(params, authority_columns)
        .optional()
        .doing("read an authority")?
        .map(AuthorityColumns::parse)
        .transpose()
}

/// An authority row as stored, before its text is parsed back into types.
struct AuthorityColumns {
    id: String,
    state: String,
    certificate: Vec<u8>,
    not_before: i64,
    not_after: i64,
    signed_until: i64,
    created_at: i64,
}

fn authority_columns(row: &Row<'_>) -> rusqlite::Result<AuthorityColumns> {
    Ok(AuthorityColumns {
        id: row.get(0)?,
        state: row.get(1)?,
        certificate: row.get(2)?,
        not_before: row.get(3)?,
        not_after: row.get(4)?,
        signed_until: row.get(5)?,
        created_at: row.get(6)?,
    })
}

impl AuthorityColumns {
    fn parse(self) -> Result<Authority, DatastoreError> {
        let state = AuthorityState::parse(&self.state).ok_or(DatastoreError::Corrupt {
            what: "authority state",
            value: self.state,
        })?;
        Ok(Authority {
            id: self.id,
            state,
            certificate: self.certificate,
            not_before: from_unix_seconds(self.not_before),
            not_after: from_unix_seconds(self.not_after),
            signed_until: from_unix_seconds(self.signed_until),
            created_at: from_unix_seconds(self.created_at),
        })
    }
}
