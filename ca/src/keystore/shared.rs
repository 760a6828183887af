//! Kubernetes mode: the authorities live in the keys Secret of the CA's namespace
//! ([`KEYS_SECRET`](crate::k8s::KEYS_SECRET)), so replicas with their own (empty) data dirs sign with
//! one authority, and root rotation is coordinated through the rotation Lease
//! ([`ROTATION_LEASE`](crate::k8s::ROTATION_LEASE)).
//!
//! # The Secret's data (layout version 1)
//!
//! | key                | content                                                                   |
//! |--------------------|---------------------------------------------------------------------------|
//! | `authorities.json` | `{"version": 1, "authorities": [{"id", "state", "signed_until", "created_at"}]}`, oldest first; `state` is `prepared`, `active`, `old` or `retired`; times are unix seconds |
//! | `<id>.crt`         | the authority's certificate, PEM (kept after retirement, for the record)  |
//! | `<id>.key`         | its X.509 signing key, PKCS#8 PEM (absent once retired)                   |
//! | `<id>.jwt.key`     | its JWT signing key, PKCS#8 PEM (absent once retired)                     |
//!
//! `<id>` is the authority id (hex SHA-256 of the certificate's public key). Exactly one authority is
//! `active`, at most one `prepared`. `signed_until` is the latest notAfter any replica reported
//! signing with the authority: the replica that activates a new root records its own, and every
//! replica adds its own for `old` authorities when it next polls, so `retire` can refuse while their
//! certificates are still valid. (A replica that has not polled since the activation can still be
//! signing with the old root; retire after an SVID lifetime has passed since `activate`.)
//!
//! # The local copy
//!
//! Each replica mirrors the Secret into its data dir: key files in `D/keys` (0600, written atomically,
//! like standalone mode) and the authority rows in its SQLite datastore. Files rather than memory,
//! because the whole keystore (loading, the permission checks, the issuer's `signed_until` rows)
//! then works exactly as in standalone mode, and an emptyDir is private to the pod and goes with it;
//! the Secret stays the source of truth: what the data dir holds is overwritten (and keys of
//! authorities the Secret does not name are deleted) at start and on every change.
//!
//! # Changes
//!
//! First start: [`Cluster::load_or_create_keys`]; a replica that loses the create race adopts the
//! winner's authority and drops what it generated, never signing with it. Rotation
//! (`prepare`/`activate`/`retire`): the replica first takes the rotation Lease (refused, naming the
//! holder, while another live replica holds it), applies the step to the Secret with
//! [`Cluster::update_keys`] (a 409 re-reads and re-applies it), mirrors the result, then releases the
//! Lease. Other replicas poll the Secret (`reload`, every `reload_interval`) and mirror what changed,
//! which updates the signing state, hence `WatchBundle` streams and the bundle ConfigMap.
//!
//! Upstream (`cacerts`) mode stays file-based even with `--k8s`: the intermediate comes from the
//! mounted files, and nothing is written to the Secret.
//!
//! Every apiserver call here blocks on the runtime handle given to [`SharedKeys::new`]: the keystore's
//! methods must run on a blocking thread (as the admin service and the reload worker call them), never
//! on an async worker.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use meshward_identity::TrustDomain;
use meshward_identity::jwt::JwtSigningKey;
use meshward_identity::x509::{Authority, SvidKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use crate::datastore::authorities::MirroredAuthority;
use crate::datastore::{AuthorityError, AuthorityState, authority_id};
use crate::k8s::{Cluster, KEYS_SECRET, KeyFiles, ROTATION_LEASE, StoredKeys};

use super::{AuthorityInfo, KeystoreError, files, jwt_key_pem, jwt_kid};

#[cfg(test)]
mod tests;

/// How long a replica holds the rotation Lease at most (it releases it when done; a replica that
/// died while rotating frees it after this).
pub const ROTATION_LEASE_DURATION: Duration = Duration::from_secs(30);

/// The Secret key holding the authority index.
pub const INDEX_KEY: &str = "authorities.json";

/// The layout version this CA writes and reads.
const LAYOUT_VERSION: u32 = 1;

/// Where a keystore's authorities live in Kubernetes mode; cheap to clone.
#[derive(Clone)]
pub struct SharedKeys {
    pub(super) cluster: Cluster,
    pub(super) namespace: String,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) holder: String,
}

impl std::fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeys")
            .field("namespace", &self.namespace)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl SharedKeys {
    /// The keys Secret and rotation Lease of `namespace`, reached through `cluster`; apiserver calls
    /// block on `runtime`. This replica's Lease identity is its host name (the pod name in a
    /// cluster) plus a random suffix, so two processes on one host are two holders.
    pub fn new(cluster: Cluster, namespace: &str, runtime: tokio::runtime::Handle) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "meshward-ca".to_owned());
        let mut suffix = [0u8; 4];
        // A failed draw leaves zeros: the host name still tells replicas on different pods apart.
        let _ = SystemRandom::new().fill(&mut suffix);
        Self {
            cluster,
            namespace: namespace.to_owned(),
            runtime,
            holder: format!("{host}-{}", hex::encode(suffix)),
        }
    }

    /// This replica's identity in the rotation Lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// `namespace/name` of the keys Secret, for messages.
    pub(super) fn secret_name(&self) -> String {
        format!("{}/{KEYS_SECRET}", self.namespace)
    }

    /// The error for a Secret this CA cannot use.
    pub(super) fn bad_secret(&self, reason: impl Into<String>) -> KeystoreError {
        KeystoreError::BadKeySecret {
            secret: self.secret_name(),
            reason: reason.into(),
        }
    }
}

/// The authority index (`authorities.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Index {
    version: u32,
    authorities: Vec<IndexEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    id: String,
    state: String,
    signed_until: i64,
    created_at: i64,
}

/// The Secret's authorities, decoded and checked.
#[derive(Debug, Clone)]
pub(super) struct Model {
    pub(super) entries: Vec<Entry>,
}

/// One authority in the Secret.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) state: AuthorityState,
    /// DER.
    pub(super) certificate: Vec<u8>,
    /// PKCS#8 PEM; `None` once retired.
    pub(super) x509_key: Option<Vec<u8>>,
    /// PKCS#8 PEM; `None` once retired.
    pub(super) jwt_key: Option<Vec<u8>>,
    pub(super) signed_until: i64,
    pub(super) created_at: i64,
}

impl std::fmt::Debug for Entry {
    // Never log key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("signed_until", &self.signed_until)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// A new authority's entry, in `state`.
    pub(super) fn new(
        root: &Authority,
        jwt_key: &JwtSigningKey,
        state: AuthorityState,
        now: SystemTime,
    ) -> Result<Self, KeystoreError> {
        Ok(Self {
            id: authority_id(root.certificate().as_ref())?,
            state,
            certificate: root.certificate().as_ref().to_vec(),
            x509_key: Some(root.key().to_pkcs8_pem().into_bytes()),
            jwt_key: Some(jwt_key_pem(jwt_key).into_bytes()),
            signed_until: 0,
            created_at: unix(now),
        })
    }
}

impl Model {
    /// Decodes and checks the Secret's data for trust domain `td`; the error is the reason, for
    /// [`SharedKeys::bad_secret`].
    pub(super) fn decode(files: &KeyFiles, td: &TrustDomain) -> Result<Self, String> {
        let index = files
            .get(INDEX_KEY)
            .ok_or_else(|| format!("it has no `{INDEX_KEY}`"))?;
        let index: Index = serde_json::from_slice(index)
            .map_err(|e| format!("`{INDEX_KEY}` does not parse: {e}"))?;
        if index.version != LAYOUT_VERSION {
            return Err(format!(
                "`{INDEX_KEY}` has layout version `{}`, this ca reads `{LAYOUT_VERSION}`; run the ca version that wrote it",
                index.version
            ));
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(index.authorities.len());
        for item in index.authorities {
            if entries.iter().any(|e| e.id == item.id) {
                return Err(format!("authority `{}` is listed twice", item.id));
            }
            let state = AuthorityState::from_name(&item.state).ok_or_else(|| {
                format!("authority `{}` has unknown state `{}`", item.id, item.state)
            })?;
            let entry = decode_entry(files, td, item, state)?;
            entries.push(entry);
        }
        let count = |state| entries.iter().filter(|e| e.state == state).count();
        if count(AuthorityState::Active) != 1 {
            return Err(format!(
                "`{}` authorities are active; exactly one must be",
                count(AuthorityState::Active)
            ));
        }
        if count(AuthorityState::Prepared) > 1 {
            return Err("several authorities are prepared; at most one may be".to_owned());
        }
        Ok(Self { entries })
    }

    /// The Secret's data for this model.
    pub(super) fn encode(&self) -> Result<KeyFiles, KeystoreError> {
        let index = Index {
            version: LAYOUT_VERSION,
            authorities: self
                .entries
                .iter()
                .map(|e| IndexEntry {
                    id: e.id.clone(),
                    state: e.state.as_str().to_owned(),
                    signed_until: e.signed_until,
                    created_at: e.created_at,
                })
                .collect(),
        };
        let index = serde_json::to_vec_pretty(&index).map_err(|e| KeystoreError::BadKeySecret {
            secret: KEYS_SECRET.to_owned(),
            reason: format!("cannot encode `{INDEX_KEY}`: {e}"),
        })?;
        let mut files = KeyFiles::from([(INDEX_KEY.to_owned(), index)]);
        for e in &self.entries {
            files.insert(
                format!("{}.crt", e.id),
                pem("CERTIFICATE", &e.certificate).into_bytes(),
            );
            if let Some(key) = &e.x509_key {
                files.insert(format!("{}.key", e.id), key.clone());
            }
            if let Some(key) = &e.jwt_key {
                files.insert(format!("{}.jwt.key", e.id), key.clone());
            }
        }
        Ok(files)
    }

    /// Adds `entry` as the prepared authority.
    pub(super) fn prepare(&mut self, entry: Entry) -> Result<String, AuthorityError> {
        if let Some(existing) = self.entries.iter().find(|e| e.id == entry.id) {
            return Err(AuthorityError::Exists {
                id: existing.id.clone(),
                state: existing.state,
            });
        }
        if let Some(prepared) = self.find(AuthorityState::Prepared) {
            return Err(AuthorityError::AlreadyPrepared {
                id: prepared.id.clone(),
            });
        }
        let id = entry.id.clone();
        self.entries.push(Entry {
            state: AuthorityState::Prepared,
            ..entry
        });
        Ok(id)
    }

    /// Makes the prepared authority active and the active one old, recording what this replica
    /// signed with the latter (`local`: id -> signed-until, unix seconds).
    pub(super) fn activate(
        &mut self,
        now: SystemTime,
        local: &BTreeMap<String, i64>,
    ) -> Result<String, AuthorityError> {
        let prepared = self
            .find(AuthorityState::Prepared)
            .ok_or(AuthorityError::NoPrepared)?;
        let not_after = cert_not_after(&prepared.certificate)?;
        if unix(now) >= not_after {
            return Err(AuthorityError::Expired {
                id: prepared.id.clone(),
                not_after,
            });
        }
        let id = prepared.id.clone();
        for e in &mut self.entries {
            if e.state == AuthorityState::Active {
                e.state = AuthorityState::Old;
                e.signed_until = e.signed_until.max(local.get(&e.id).copied().unwrap_or(0));
            } else if e.id == id {
                e.state = AuthorityState::Active;
            }
        }
        Ok(id)
    }

    /// Retires the only old authority and drops its keys; refused while what it signed is valid
    /// (its recorded or this replica's `local` signed-until is after `now`), unless `force`.
    pub(super) fn retire(
        &mut self,
        now: SystemTime,
        force: bool,
        local: &BTreeMap<String, i64>,
    ) -> Result<String, AuthorityError> {
        let old: Vec<usize> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state == AuthorityState::Old)
            .map(|(i, _)| i)
            .collect();
        let index = match old.as_slice() {
            [] => return Err(AuthorityError::NoOld),
            [only] => *only,
            several => {
                let ids = several
                    .iter()
                    .filter_map(|i| self.entries.get(*i))
                    .map(|e| format!("`{}`", e.id))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(AuthorityError::SeveralOld { ids });
            }
        };
        let entry = self.entries.get_mut(index).ok_or(AuthorityError::NoOld)?;
        let signed_until = entry
            .signed_until
            .max(local.get(&entry.id).copied().unwrap_or(0));
        if unix(now) < signed_until {
            if !force {
                return Err(AuthorityError::StillSigning {
                    id: entry.id.clone(),
                    signed_until,
                });
            }
            tracing::warn!(authority = %entry.id, signed_until, "retiring an authority whose certificates are still valid (forced)");
        }
        entry.state = AuthorityState::Retired;
        entry.signed_until = signed_until;
        entry.x509_key = None;
        entry.jwt_key = None;
        Ok(entry.id.clone())
    }

    /// Raises the `old` authorities' signed-until to this replica's; whether anything changed.
    pub(super) fn record_old_signed_until(&mut self, local: &BTreeMap<String, i64>) -> bool {
        let mut changed = false;
        for e in &mut self.entries {
            let mine = local.get(&e.id).copied().unwrap_or(0);
            if e.state == AuthorityState::Old && mine > e.signed_until {
                e.signed_until = mine;
                changed = true;
            }
        }
        changed
    }

    /// The rows the local datastore should hold.
    pub(super) fn rows(&self) -> Vec<MirroredAuthority> {
        self.entries
            .iter()
            .map(|e| MirroredAuthority {
                id: e.id.clone(),
                state: e.state,
                certificate: e.certificate.clone(),
                signed_until: from_unix(e.signed_until),
                created_at: from_unix(e.created_at),
            })
            .collect()
    }

    fn find(&self, state: AuthorityState) -> Option<&Entry> {
        self.entries.iter().find(|e| e.state == state)
    }
}

fn decode_entry(
    files: &KeyFiles,
    td: &TrustDomain,
    item: IndexEntry,
    state: AuthorityState,
) -> Result<Entry, String> {
    let id = item.id;
    let cert_key = format!("{id}.crt");
    let cert = files
        .get(&cert_key)
        .ok_or_else(|| format!("authority `{id}` has no `{cert_key}`"))?;
    let cert = CertificateDer::from_pem_slice(cert)
        .map_err(|e| format!("`{cert_key}` is not a pem certificate: {e}"))?;
    let actual = authority_id(cert.as_ref()).map_err(|e| format!("`{cert_key}`: {e}"))?;
    if actual != id {
        return Err(format!(
            "`{cert_key}` holds the certificate of authority `{actual}`"
        ));
    }
    let (x509_key, jwt_key) = if state.is_published() {
        let key_name = format!("{id}.key");
        let pem = files
            .get(&key_name)
            .ok_or_else(|| format!("authority `{id}` is `{state}` but `{key_name}` is missing"))?;
        let text = std::str::from_utf8(pem).map_err(|_| format!("`{key_name}` is not pem text"))?;
        let key = SvidKey::from_pkcs8_pem(text).map_err(|e| format!("`{key_name}`: {e}"))?;
        let authority = Authority::from_parts(vec![cert.clone()], key)
            .map_err(|e| format!("`{key_name}` with `{cert_key}`: {e}"))?;
        if authority.trust_domain() != td {
            return Err(format!(
                "authority `{id}` is for trust domain `{}`, not `{td}`; point the ca at the right namespace or --trust-domain",
                authority.trust_domain()
            ));
        }
        let jwt_name = format!("{id}.jwt.key");
        let jwt = files
            .get(&jwt_name)
            .ok_or_else(|| format!("authority `{id}` is `{state}` but `{jwt_name}` is missing"))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(jwt)
            .map_err(|e| format!("`{jwt_name}` is not a pem key: {e}"))?;
        JwtSigningKey::from_pkcs8_der(jwt_kid(&id), der.secret_pkcs8_der())
            .map_err(|e| format!("`{jwt_name}`: {e}"))?;
        (Some(pem.clone()), Some(jwt.clone()))
    } else {
        (None, None)
    };
    Ok(Entry {
        id,
        state,
        certificate: cert.as_ref().to_vec(),
        x509_key,
        jwt_key,
        signed_until: item.signed_until,
        created_at: item.created_at,
    })
}

fn cert_not_after(der: &[u8]) -> Result<i64, AuthorityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| AuthorityError::BadCertificate {
            reason: e.to_string(),
        })?;
    Ok(cert.validity().not_after.timestamp())
}

/// `der` as PEM with `label`.
pub(super) fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 is ASCII, so any split is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

// --- the keystore's side ----------------------------------------------------------------------------

impl super::Ctx {
    /// Reads the keys Secret, creating it (or filling an empty one) with a new root.
    pub(super) fn load_or_create_secret(
        &self,
        shared: &SharedKeys,
        now: SystemTime,
    ) -> Result<StoredKeys, KeystoreError> {
        let generate = || -> Result<KeyFiles, KeystoreError> {
            let (root, jwt_key) = self.new_root(now)?;
            let entry = Entry::new(&root, &jwt_key, AuthorityState::Active, now)?;
            Model {
                entries: vec![entry],
            }
            .encode()
        };
        let stored = shared.runtime.block_on(
            shared
                .cluster
                .load_or_create_keys(&shared.namespace, &generate),
        )?;
        if !stored.files.is_empty() {
            return Ok(stored);
        }
        // An empty Secret (made by hand, or by a chart): fill it, unless another replica does first
        // (the write names the resourceVersion read, so only one fill lands; the others adopt it).
        tracing::info!(secret = %shared.secret_name(), "the ca keys secret is empty; creating the first root in it");
        let mut fresh: Option<KeyFiles> = None;
        shared
            .runtime
            .block_on(shared.cluster.update_keys(&shared.namespace, |files| {
                if !files.is_empty() {
                    return Ok(files.clone());
                }
                match &fresh {
                    Some(made) => Ok(made.clone()),
                    None => {
                        let made = generate()?;
                        fresh = Some(made.clone());
                        Ok(made)
                    }
                }
            }))
    }

    /// Makes the data dir hold what `model` says: key files first (a row never names a missing key),
    /// then the rows, then the keys of retired or unknown authorities go.
    pub(super) fn mirror(&self, model: &Model) -> Result<(), KeystoreError> {
        for e in &model.entries {
            if let (Some(x509), Some(jwt)) = (&e.x509_key, &e.jwt_key) {
                write_if_changed(&files::x509_key_path(&self.keys_dir, &e.id), x509)?;
                write_if_changed(&files::jwt_key_path(&self.keys_dir, &e.id), jwt)?;
            }
        }
        self.datastore.mirror_authorities(&model.rows())?;
        let keep: Vec<&str> = model
            .entries
            .iter()
            .filter(|e| e.x509_key.is_some())
            .map(|e| e.id.as_str())
            .collect();
        let listing = std::fs::read_dir(&self.keys_dir)
            .map_err(|source| files::io_error("list key dir", &self.keys_dir, source))?;
        for item in listing {
            let item =
                item.map_err(|source| files::io_error("list key dir", &self.keys_dir, source))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let id = name
                .strip_suffix(".jwt.key")
                .or_else(|| name.strip_suffix(".key"));
            if let Some(id) = id
                && !keep.contains(&id)
            {
                files::remove_secret(&item.path())?;
            }
        }
        Ok(())
    }

    /// What this replica signed with each authority it knows: id -> unix seconds.
    pub(super) fn local_signed_until(&self) -> Result<BTreeMap<String, i64>, KeystoreError> {
        let mut out = BTreeMap::new();
        for row in self.datastore.list_authorities()? {
            let until = self.datastore.local_signed_until(&row.id)?;
            out.insert(row.id, unix(until));
        }
        Ok(out)
    }
}

impl super::Inner {
    /// One rotation step in Kubernetes mode: hold the Lease, apply `step` to the Secret (re-applied
    /// on a conflict), mirror the result, release the Lease.
    pub(super) fn rotate_shared(
        &self,
        loaded: &mut super::Loaded,
        shared: &SharedKeys,
        now: SystemTime,
        mut step: impl FnMut(&mut Model) -> Result<String, KeystoreError>,
    ) -> Result<AuthorityInfo, KeystoreError> {
        let runtime = &shared.runtime;
        let ns = &shared.namespace;
        let held = runtime.block_on(shared.cluster.acquire_rotation_lease(
            ns,
            &shared.holder,
            ROTATION_LEASE_DURATION,
            now,
        ))?;
        if !held {
            let holder = runtime
                .block_on(shared.cluster.rotation_lease_holder(ns))
                .ok()
                .flatten()
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(KeystoreError::RotationLeaseHeld {
                holder,
                lease: format!("{ns}/{ROTATION_LEASE}"),
                seconds: ROTATION_LEASE_DURATION.as_secs(),
            });
        }
        let result = self.apply_step(loaded, shared, &mut step);
        if let Err(e) = runtime.block_on(shared.cluster.release_rotation_lease(ns, &shared.holder))
        {
            tracing::warn!(error = %e, "could not release the rotation lease; it expires by itself");
        }
        result
    }

    fn apply_step(
        &self,
        loaded: &mut super::Loaded,
        shared: &SharedKeys,
        step: &mut impl FnMut(&mut Model) -> Result<String, KeystoreError>,
    ) -> Result<AuthorityInfo, KeystoreError> {
        let td = &self.ctx.trust_domain;
        let mut affected = None;
        let stored =
            shared
                .runtime
                .block_on(shared.cluster.update_keys(&shared.namespace, |files| {
                    let mut model = Model::decode(files, td).map_err(|r| shared.bad_secret(r))?;
                    affected = Some(step(&mut model)?);
                    model.encode()
                }))?;
        self.mirror_stored(loaded, shared, &stored, true)?;
        let id = affected.ok_or(KeystoreError::NoActiveAuthority)?;
        self.ctx
            .datastore
            .list_authorities()?
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| AuthorityError::Unknown { id }.into())
    }

    /// Polls the Secret: mirrors it if it changed, and records this replica's signed-until of the
    /// `old` authorities in it.
    pub(super) fn reload_shared(
        &self,
        loaded: &mut super::Loaded,
        shared: &SharedKeys,
    ) -> Result<bool, KeystoreError> {
        let stored = shared
            .runtime
            .block_on(shared.cluster.read_keys(&shared.namespace))?
            .ok_or_else(|| shared.bad_secret("it does not exist any more"))?;
        let changed = if loaded.secret_version.as_deref() == Some(stored.resource_version.as_str())
        {
            false
        } else {
            self.mirror_stored(loaded, shared, &stored, false)?
        };
        let local = self.ctx.local_signed_until()?;
        let td = &self.ctx.trust_domain;
        let mut model = Model::decode(&stored.files, td).map_err(|r| shared.bad_secret(r))?;
        if model.record_old_signed_until(&local) {
            let written =
                shared
                    .runtime
                    .block_on(shared.cluster.update_keys(&shared.namespace, |files| {
                        let mut model =
                            Model::decode(files, td).map_err(|r| shared.bad_secret(r))?;
                        model.record_old_signed_until(&local);
                        model.encode()
                    }));
            // Best effort: the next poll tries again.
            if let Err(e) = written {
                tracing::warn!(error = %e, "could not record what this replica signed with an old root");
            }
        }
        Ok(changed)
    }

    fn mirror_stored(
        &self,
        loaded: &mut super::Loaded,
        shared: &SharedKeys,
        stored: &StoredKeys,
        force: bool,
    ) -> Result<bool, KeystoreError> {
        let model = Model::decode(&stored.files, &self.ctx.trust_domain)
            .map_err(|r| shared.bad_secret(r))?;
        self.ctx.mirror(&model)?;
        loaded.secret_version = Some(stored.resource_version.clone());
        self.refresh(loaded, force)
    }
}

/// Writes a key file unless it already holds `contents` (every poll would otherwise fsync).
fn write_if_changed(path: &std::path::Path, contents: &[u8]) -> Result<(), KeystoreError> {
    match files::read_secret(path) {
        Ok(current) if current == contents => Ok(()),
        _ => files::write_secret(path, contents),
    }
}
