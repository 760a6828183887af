//! The CA's signing authorities: their keys on disk, root rotation, and the current [`SigningState`].
//!
//! Two modes:
//! - **self-signed** (default): the first start creates a root (and a JWT signing key) for the trust
//!   domain; `prepare` / `activate` / `retire` rotate it (DESIGN §3.5). The bundle holds the roots of
//!   every prepared, active and old authority.
//! - **upstream**: the CA signs with an intermediate from Istio-style `cacerts` files ([`UpstreamCa`]);
//!   the bundle is the upstream root. Rotation is the upstream's business: replace the files, and the
//!   next [`Keystore::reload`] (or restart) picks them up.
//!
//! In Kubernetes mode ([`Keystore::open_shared`]) the authorities live in the CA's keys Secret and the
//! data dir holds a mirror of it; see [`shared`] for the Secret's layout and how rotation is
//! coordinated between replicas.
//!
//! Keys live in `D/keys/<authority-id>.key` (X.509) and `D/keys/<authority-id>.jwt.key` (JWT), PKCS#8
//! PEM, 0600, written atomically; the rows in the datastore hold certificates only. A key file is
//! always written before its row, so a row never names a key that does not exist.
//!
//! The current state travels as a `tokio::sync::watch` of `Arc<SigningState>`: issuance reads the
//! current value, `WatchBundle` streams follow every change. Several CA processes may share a data
//! dir: the datastore's transactions and unique indexes decide races (first start, rotation), and
//! [`Keystore::reload`] picks up what another process changed.

mod files;
pub mod shared;
mod upstream;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use meshward_identity::TrustDomain;
use meshward_identity::bundle::{BundleError, TrustBundle};
use meshward_identity::jwt::{JwtBundle, JwtError, JwtSigningKey};
use meshward_identity::x509::{Authority, AuthorityError as X509AuthorityError, KeyError, SvidKey};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use crate::datastore::{AuthorityError, AuthorityState, Datastore, DatastoreError, authority_id};

pub use crate::datastore::Authority as AuthorityInfo;
pub use shared::{INDEX_KEY, ROTATION_LEASE_DURATION, SharedKeys};
pub use upstream::{UpstreamCa, UpstreamError};

/// Default lifetime of a self-signed root.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How many times the first start retries when another CA process is creating the first root too.
const FIRST_START_ATTEMPTS: usize = 5;

/// One consistent snapshot of what the CA signs with and publishes; swapped whole on every change.
#[derive(Debug)]
pub struct SigningState {
    /// The trust domain the CA signs for.
    pub trust_domain: TrustDomain,
    /// The active signer.
    pub authority: Arc<Authority>,
    /// The datastore id of the active signer (journal rows name it).
    pub authority_id: String,
    /// The active JWT signing key.
    pub jwt_key: Arc<JwtSigningKey>,
    /// X.509 roots of the prepared, active and old authorities (the upstream root in upstream mode).
    pub bundle: TrustBundle,
    /// JWT keys of the prepared, active and old authorities.
    pub jwt_bundle: JwtBundle,
    /// Increases on every change of the authorities; the bundles carry it too.
    pub sequence: u64,
}

/// A handle to the CA's authorities; cheap to clone.
#[derive(Clone)]
pub struct Keystore {
    inner: Arc<Inner>,
}

/// Why the keystore could not load, create or rotate an authority.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// A file operation failed.
    #[error("could not {doing} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file can be read by other users.
    #[error("key file `{}` has mode `{mode:o}`; it must be readable by its owner only: `chmod 600` it (and consider the key leaked)", path.display())]
    KeyFileMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored key does not parse.
    #[error("key file `{}` does not hold a usable key: {reason}", path.display())]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// The datastore refused a rotation step (nothing prepared, still signing, ...).
    #[error(transparent)]
    Rotation(#[from] AuthorityError),
    /// A stored authority cannot sign.
    #[error("authority `{id}` cannot be loaded: {source}")]
    Authority {
        /// Its id.
        id: String,
        /// Why.
        source: X509AuthorityError,
    },
    /// A new root could not be made.
    #[error("could not create a root for `{trust_domain}`: {source}")]
    CreateRoot {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Why.
        source: X509AuthorityError,
    },
    /// A JWT signing key could not be made or loaded.
    #[error("jwt signing key: {0}")]
    Jwt(#[from] JwtError),
    /// A certificate could not go into the trust bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The data dir belongs to another trust domain.
    #[error(
        "the data dir's authority `{id}` is for trust domain `{found}`, not `{expected}`; use the right --trust-domain or another --data-dir"
    )]
    WrongTrustDomain {
        /// The authority's id.
        id: String,
        /// Its trust domain.
        found: TrustDomain,
        /// The configured one.
        expected: TrustDomain,
    },
    /// The upstream CA files cannot be used.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The datastore has no active authority after start (another process broke the invariant).
    #[error("no active signing authority in the datastore; restart the ca to create or load one")]
    NoActiveAuthority,
    /// Another CA process kept racing this one at first start.
    #[error(
        "could not settle on a first root: other ca processes kept changing the authorities; restart"
    )]
    FirstStartRace,
    /// Rotation asked for in upstream mode.
    #[error("`{action}` is not available with an upstream ca: replace the cacerts files (`{}`) with the new certificate and key; the ca picks them up at its next reload or restart", cert_chain.display())]
    UpstreamManaged {
        /// The step asked for.
        action: &'static str,
        /// The chain file to replace.
        cert_chain: PathBuf,
    },
    /// Kubernetes mode: the keys Secret cannot be used (garbage, a key file missing, ...).
    #[error(
        "ca keys secret `{secret}` is unusable: {reason}; restore it from a backup, or delete it to have the ca make a new root (every svid of the old root then stops verifying)"
    )]
    BadKeySecret {
        /// `namespace/name`.
        secret: String,
        /// What is wrong.
        reason: String,
    },
    /// Kubernetes mode: another replica holds the rotation Lease.
    #[error(
        "another ca replica (`{holder}`) holds the rotation lease `{lease}` and may be rotating right now; run the command again when it is done (a replica that died frees the lease after `{seconds}s`)"
    )]
    RotationLeaseHeld {
        /// The holder's identity.
        holder: String,
        /// `namespace/name`.
        lease: String,
        /// The lease duration.
        seconds: u64,
    },
    /// Kubernetes mode: the apiserver failed; nothing was changed on a missing answer.
    #[error(transparent)]
    Cluster(#[from] crate::k8s::K8sError),
    /// The upstream certificate's key was used before and rotated out.
    #[error(
        "the upstream ca key (authority `{id}`) was rotated out before (state `{state}`); issue the intermediate for a new key"
    )]
    UpstreamKeyReused {
        /// The authority id.
        id: String,
        /// Its state.
        state: AuthorityState,
    },
}

impl Keystore {
    /// Opens the keystore in `data_dir`: loads the authorities, creating the first root (self-signed
    /// mode, lifetime `root_ttl`) or loading the upstream intermediate (`upstream`) as needed.
    pub fn open(
        data_dir: &Path,
        datastore: Datastore,
        td: TrustDomain,
        upstream: Option<UpstreamCa>,
        root_ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, KeystoreError> {
        let keys_dir = data_dir.join(files::KEYS_DIR);
        files::ensure_private_dir(&keys_dir)?;
        let ctx = Ctx {
            keys_dir,
            datastore,
            trust_domain: td,
            upstream_files: upstream,
            root_ttl,
            shared: None,
        };
        let upstream = match &ctx.upstream_files {
            Some(files) => Some(ctx.adopt_upstream(files, now)?),
            None => {
                ctx.ensure_first_root(now)?;
                None
            }
        };
        Self::finish_open(ctx, upstream, None)
    }

    /// Kubernetes mode: opens the keystore with its authorities in the keys Secret of `shared`'s
    /// namespace (self-signed mode only; see [`shared`]). The first start creates the Secret with a
    /// new root; replicas racing to create it all end with the winner's root. The data dir's
    /// authorities are replaced by the Secret's.
    ///
    /// Blocks on the apiserver: call it on a blocking thread, not an async worker.
    pub fn open_shared(
        data_dir: &Path,
        datastore: Datastore,
        td: TrustDomain,
        root_ttl: Duration,
        now: SystemTime,
        shared: SharedKeys,
    ) -> Result<Self, KeystoreError> {
        let keys_dir = data_dir.join(files::KEYS_DIR);
        files::ensure_private_dir(&keys_dir)?;
        let ctx = Ctx {
            keys_dir,
            datastore,
            trust_domain: td,
            upstream_files: None,
            root_ttl,
            shared: Some(shared.clone()),
        };
        let stored = ctx.load_or_create_secret(&shared, now)?;
        let model = shared::Model::decode(&stored.files, &ctx.trust_domain)
            .map_err(|reason| shared.bad_secret(reason))?;
        ctx.mirror(&model)?;
        tracing::info!(
            secret = %shared.secret_name(),
            created = stored.created,
            holder = shared.holder(),
            "signing authorities taken from the kubernetes secret"
        );
        Self::finish_open(ctx, None, Some(stored.resource_version))
    }

    fn finish_open(
        ctx: Ctx,
        upstream: Option<ActiveUpstream>,
        secret_version: Option<String>,
    ) -> Result<Self, KeystoreError> {
        let rows = ctx.datastore.list_authorities()?;
        let state = ctx.build_state(&rows, upstream.as_ref(), 0)?;
        tracing::info!(
            trust_domain = %state.trust_domain,
            authority = %state.authority_id,
            upstream = upstream.is_some(),
            sequence = state.sequence,
            "signing authorities loaded"
        );
        let loaded = Loaded {
            fingerprint: fingerprint(&rows),
            upstream,
            secret_version,
        };
        let (sender, _) = watch::channel(Arc::new(state));
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                sender,
                loaded: Mutex::new(loaded),
            }),
        })
    }

    /// The current signing state.
    pub fn current(&self) -> Arc<SigningState> {
        self.inner.sender.borrow().clone()
    }

    /// A receiver that sees the current state and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SigningState>> {
        self.inner.sender.subscribe()
    }

    /// Every authority the datastore knows, retired ones included, oldest first.
    pub fn authorities(&self) -> Result<Vec<AuthorityInfo>, KeystoreError> {
        Ok(self.inner.ctx.datastore.list_authorities()?)
    }

    /// Creates a new root and publishes it in the bundle next to the current one, not yet signing.
    pub fn prepare(&self, now: SystemTime) -> Result<AuthorityInfo, KeystoreError> {
        self.refuse_upstream("rotate prepare")?;
        let mut loaded = self.inner.lock();
        let ctx = &self.inner.ctx;
        if let Some(shared) = &ctx.shared {
            let (root, jwt_key) = ctx.new_root(now)?;
            let entry = shared::Entry::new(&root, &jwt_key, AuthorityState::Prepared, now)?;
            let info = self
                .inner
                .rotate_shared(&mut loaded, shared, now, |model| {
                    Ok(model.prepare(entry.clone())?)
                })?;
            tracing::info!(authority = %info.id, "root prepared in the kubernetes secret");
            return Ok(info);
        }
        let (root, jwt_key) = ctx.new_root(now)?;
        let id = authority_id(root.certificate().as_ref())?;
        ctx.write_keys(&id, &root, &jwt_key)?;
        let info = match ctx
            .datastore
            .insert_prepared_authority(root.certificate().as_ref(), now)
        {
            Ok(info) => info,
            Err(e) => {
                ctx.remove_keys(&id);
                return Err(e.into());
            }
        };
        tracing::info!(authority = %info.id, "root prepared");
        self.inner.refresh(&mut loaded, true)?;
        Ok(info)
    }

    /// Makes the prepared root the signer; the previous one becomes `old` and stays in the bundle.
    pub fn activate(&self, now: SystemTime) -> Result<AuthorityInfo, KeystoreError> {
        self.refuse_upstream("rotate activate")?;
        let mut loaded = self.inner.lock();
        if let Some(shared) = &self.inner.ctx.shared {
            let local = self.inner.ctx.local_signed_until()?;
            let info = self
                .inner
                .rotate_shared(&mut loaded, shared, now, |model| {
                    Ok(model.activate(now, &local)?)
                })?;
            tracing::info!(authority = %info.id, "root activated in the kubernetes secret");
            return Ok(info);
        }
        let info = self.inner.ctx.datastore.activate_authority(now)?;
        tracing::info!(authority = %info.id, "root activated");
        self.inner.refresh(&mut loaded, true)?;
        Ok(info)
    }

    /// Takes the old root out of the bundle and deletes its keys; refused while SVIDs it signed are
    /// still valid, unless `danger_force`.
    pub fn retire(
        &self,
        now: SystemTime,
        danger_force: bool,
    ) -> Result<AuthorityInfo, KeystoreError> {
        self.refuse_upstream("rotate retire")?;
        let mut loaded = self.inner.lock();
        if let Some(shared) = &self.inner.ctx.shared {
            let local = self.inner.ctx.local_signed_until()?;
            let info = self
                .inner
                .rotate_shared(&mut loaded, shared, now, |model| {
                    Ok(model.retire(now, danger_force, &local)?)
                })?;
            tracing::info!(authority = %info.id, forced = danger_force, "root retired in the kubernetes secret");
            return Ok(info);
        }
        let info = self
            .inner
            .ctx
            .datastore
            .retire_authority(None, danger_force, now)?;
        tracing::info!(authority = %info.id, forced = danger_force, "root retired");
        self.inner.ctx.remove_keys(&info.id);
        self.inner.refresh(&mut loaded, true)?;
        Ok(info)
    }

    /// Re-reads the authorities (and, in upstream mode, the cacerts files) and publishes a new state if
    /// they changed, e.g. after another CA process rotated. Returns whether anything changed.
    ///
    /// On error the current state stays in force.
    ///
    /// In Kubernetes mode it re-reads the keys Secret (blocking on the apiserver: call it on a
    /// blocking thread) and records this replica's signed-until of `old` authorities there.
    pub fn reload(&self, now: SystemTime) -> Result<bool, KeystoreError> {
        let mut loaded = self.inner.lock();
        let ctx = &self.inner.ctx;
        if let Some(shared) = &ctx.shared {
            return self.inner.reload_shared(&mut loaded, shared);
        }
        let mut upstream_changed = false;
        if let Some(files) = &ctx.upstream_files {
            let current_id = loaded.upstream.as_ref().map(|u| u.id.clone());
            let fresh = upstream::load(files, &ctx.trust_domain, now)?;
            let fresh_id = authority_id(fresh.authority.certificate().as_ref())?;
            let same = current_id.as_deref() == Some(fresh_id.as_str())
                && loaded.upstream.as_ref().is_some_and(|u| {
                    u.authority.chain() == fresh.authority.chain() && u.roots == fresh.roots
                });
            if !same {
                loaded.upstream = Some(ctx.adopt_loaded_upstream(fresh, now)?);
                upstream_changed = true;
            }
        }
        self.inner.refresh(&mut loaded, upstream_changed)
    }

    fn refuse_upstream(&self, action: &'static str) -> Result<(), KeystoreError> {
        match &self.inner.ctx.upstream_files {
            Some(files) => Err(KeystoreError::UpstreamManaged {
                action,
                cert_chain: files.cert_chain.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystore")
            .field("keys_dir", &self.inner.ctx.keys_dir)
            .field("trust_domain", &self.inner.ctx.trust_domain)
            .field("upstream", &self.inner.ctx.upstream_files.is_some())
            .finish_non_exhaustive()
    }
}

// --- internals ------------------------------------------------------------------------------------

struct Inner {
    ctx: Ctx,
    sender: watch::Sender<Arc<SigningState>>,
    // Held while a state is rebuilt and published, so states go out in sequence order.
    loaded: Mutex<Loaded>,
}

/// What never changes after `open`.
struct Ctx {
    keys_dir: PathBuf,
    datastore: Datastore,
    trust_domain: TrustDomain,
    upstream_files: Option<UpstreamCa>,
    root_ttl: Duration,
    /// Kubernetes mode: where the authorities really live.
    shared: Option<SharedKeys>,
}

/// What the published state was built from.
struct Loaded {
    fingerprint: Vec<(String, AuthorityState)>,
    upstream: Option<ActiveUpstream>,
    /// Kubernetes mode: the keys Secret's resourceVersion last mirrored.
    secret_version: Option<String>,
}

/// The upstream intermediate in use.
struct ActiveUpstream {
    id: String,
    authority: Arc<Authority>,
    roots: Vec<CertificateDer<'static>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Loaded> {
        // The guarded data is only replaced whole after a successful rebuild, so it is never torn.
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rebuilds and publishes the state if the rows changed (or `force`); returns whether it did.
    fn refresh(&self, loaded: &mut Loaded, force: bool) -> Result<bool, KeystoreError> {
        let rows = self.ctx.datastore.list_authorities()?;
        let fingerprint = fingerprint(&rows);
        if !force && fingerprint == loaded.fingerprint {
            return Ok(false);
        }
        let previous = self.sender.borrow().sequence;
        let state = self
            .ctx
            .build_state(&rows, loaded.upstream.as_ref(), previous)?;
        tracing::info!(authority = %state.authority_id, sequence = state.sequence, roots = state.bundle.len(), "signing state changed");
        loaded.fingerprint = fingerprint;
        self.sender.send_replace(Arc::new(state));
        Ok(true)
    }
}

impl Ctx {
    /// Self-signed mode: makes sure an active root exists, creating one if this is the first start.
    ///
    /// Another CA process on the same data dir may be doing the same at the same moment, and "no active
    /// authority, so insert one" is a check-then-act the datastore's rotation calls cannot make atomic
    /// (a prepare is legitimate while an active one exists). A `flock` in the key dir serializes first
    /// starts; under it the check is re-done, so exactly one root is created.
    fn ensure_first_root(&self, now: SystemTime) -> Result<(), KeystoreError> {
        if self.datastore.active_authority()?.is_some() {
            return Ok(());
        }
        let _lock = files::lock_file(&self.keys_dir.join(files::FIRST_START_LOCK))?;
        for _ in 0..FIRST_START_ATTEMPTS {
            if self.datastore.active_authority()?.is_some() {
                return Ok(());
            }
            let rows = self.datastore.list_authorities()?;
            if !rows.iter().any(|a| a.state == AuthorityState::Prepared) {
                let (root, jwt_key) = self.new_root(now)?;
                let id = authority_id(root.certificate().as_ref())?;
                self.write_keys(&id, &root, &jwt_key)?;
                match self
                    .datastore
                    .insert_prepared_authority(root.certificate().as_ref(), now)
                {
                    Ok(_) => {
                        tracing::info!(authority = %id, trust_domain = %self.trust_domain, "first root created")
                    }
                    Err(AuthorityError::AlreadyPrepared { .. } | AuthorityError::Exists { .. }) => {
                        // Another process got there first; use its root.
                        self.remove_keys(&id);
                        continue;
                    }
                    Err(e) => {
                        self.remove_keys(&id);
                        return Err(e.into());
                    }
                }
            }
            // Whoever prepared the first root wrote its keys first, so activating it is safe from here.
            match self.datastore.activate_authority(now) {
                Ok(_) | Err(AuthorityError::NoPrepared) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.datastore.active_authority()?.is_some() {
            return Ok(());
        }
        Err(KeystoreError::FirstStartRace)
    }

    /// Upstream mode: loads the cacerts files and makes their intermediate the active authority.
    fn adopt_upstream(
        &self,
        files: &UpstreamCa,
        now: SystemTime,
    ) -> Result<ActiveUpstream, KeystoreError> {
        let loaded = upstream::load(files, &self.trust_domain, now)?;
        self.adopt_loaded_upstream(loaded, now)
    }

    fn adopt_loaded_upstream(
        &self,
        loaded: upstream::LoadedUpstream,
        now: SystemTime,
    ) -> Result<ActiveUpstream, KeystoreError> {
        let cert = loaded.authority.certificate().clone();
        let id = authority_id(cert.as_ref())?;
        let _lock = files::lock_file(&self.keys_dir.join(files::FIRST_START_LOCK))?;
        // The JWT key is ours, not upstream's: create it once per intermediate key.
        let jwt_path = files::jwt_key_path(&self.keys_dir, &id);
        if !jwt_path.exists() {
            let key = JwtSigningKey::generate()?;
            files::write_secret_new(&jwt_path, jwt_key_pem(&key).as_bytes())?;
        }
        for _ in 0..FIRST_START_ATTEMPTS {
            if let Some(active) = self.datastore.active_authority()?
                && active.id == id
            {
                return Ok(ActiveUpstream {
                    id,
                    authority: Arc::new(loaded.authority),
                    roots: loaded.roots,
                });
            }
            match self.datastore.insert_prepared_authority(cert.as_ref(), now) {
                Ok(_) => tracing::info!(authority = %id, "upstream ca certificate adopted"),
                Err(AuthorityError::Exists {
                    state: AuthorityState::Prepared | AuthorityState::Active,
                    ..
                }) => {}
                Err(AuthorityError::Exists { id, state }) => {
                    return Err(KeystoreError::UpstreamKeyReused { id, state });
                }
                Err(e) => return Err(e.into()),
            }
            match self.datastore.activate_authority(now) {
                Ok(_) | Err(AuthorityError::NoPrepared) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(KeystoreError::FirstStartRace)
    }

    fn new_root(&self, now: SystemTime) -> Result<(Authority, JwtSigningKey), KeystoreError> {
        let root =
            Authority::new_root(&self.trust_domain, self.root_ttl, now).map_err(|source| {
                KeystoreError::CreateRoot {
                    trust_domain: self.trust_domain.clone(),
                    source,
                }
            })?;
        Ok((root, JwtSigningKey::generate()?))
    }

    /// Writes a new authority's keys (before its row exists).
    fn write_keys(
        &self,
        id: &str,
        root: &Authority,
        jwt_key: &JwtSigningKey,
    ) -> Result<(), KeystoreError> {
        files::write_secret(
            &files::x509_key_path(&self.keys_dir, id),
            root.key().to_pkcs8_pem().as_bytes(),
        )?;
        files::write_secret(
            &files::jwt_key_path(&self.keys_dir, id),
            jwt_key_pem(jwt_key).as_bytes(),
        )
    }

    /// Deletes an authority's keys; failures are logged, not returned (the caller's outcome stands).
    fn remove_keys(&self, id: &str) {
        for path in [
            files::x509_key_path(&self.keys_dir, id),
            files::jwt_key_path(&self.keys_dir, id),
        ] {
            if let Err(e) = files::remove_secret(&path) {
                tracing::warn!(error = %e, "could not delete a key file");
            }
        }
    }

    /// Builds the signing state from the authority rows (and the upstream intermediate, if any).
    fn build_state(
        &self,
        rows: &[AuthorityInfo],
        upstream: Option<&ActiveUpstream>,
        previous_sequence: u64,
    ) -> Result<SigningState, KeystoreError> {
        let published: Vec<&AuthorityInfo> =
            rows.iter().filter(|a| a.state.is_published()).collect();
        // The bundle sequence comes from the rows, so every replica publishes the same number for the
        // same authorities; never going backwards guards against a hand-edited database.
        let sequence = rows
            .iter()
            .map(|a| state_weight(a.state))
            .sum::<u64>()
            .max(previous_sequence.saturating_add(1));

        let (authority, authority_id) = match upstream {
            Some(up) => (Arc::clone(&up.authority), up.id.clone()),
            None => {
                let active = published
                    .iter()
                    .find(|a| a.state == AuthorityState::Active)
                    .ok_or(KeystoreError::NoActiveAuthority)?;
                (Arc::new(self.load_authority(active)?), active.id.clone())
            }
        };
        let jwt_key = Arc::new(self.load_jwt_key(&authority_id)?);

        let mut bundle = TrustBundle::new(self.trust_domain.clone());
        match upstream {
            Some(up) => {
                for root in &up.roots {
                    bundle.add_authority(root.clone())?;
                }
            }
            None => {
                for row in &published {
                    bundle.add_authority(CertificateDer::from(row.certificate.clone()))?;
                }
            }
        }
        bundle.set_sequence(sequence);

        let mut jwt_bundle = JwtBundle::new(self.trust_domain.clone());
        for row in &published {
            if row.id == authority_id {
                jwt_bundle.insert(jwt_key.public_jwk());
                continue;
            }
            match self.load_jwt_key(&row.id) {
                Ok(key) => {
                    jwt_bundle.insert(key.public_jwk());
                }
                // An upstream intermediate rotated out before this CA version made JWT keys has none;
                // anything else missing is damage the operator must see.
                Err(e) if upstream.is_some() => {
                    tracing::warn!(authority = %row.id, error = %e, "no jwt key for an old upstream authority");
                }
                Err(e) => return Err(e),
            }
        }
        jwt_bundle.set_sequence(Some(sequence));

        Ok(SigningState {
            trust_domain: self.trust_domain.clone(),
            authority,
            authority_id,
            jwt_key,
            bundle,
            jwt_bundle,
            sequence,
        })
    }

    /// Loads a self-signed authority from its row and key file.
    fn load_authority(&self, row: &AuthorityInfo) -> Result<Authority, KeystoreError> {
        let path = files::x509_key_path(&self.keys_dir, &row.id);
        let pem = files::read_secret(&path)?;
        let pem = String::from_utf8(pem).map_err(|_| bad_key(&path, "not utf-8 pem text"))?;
        let key = SvidKey::from_pkcs8_pem(&pem).map_err(|e: KeyError| bad_key(&path, e))?;
        let authority =
            Authority::from_parts(vec![CertificateDer::from(row.certificate.clone())], key)
                .map_err(|source| KeystoreError::Authority {
                    id: row.id.clone(),
                    source,
                })?;
        if authority.trust_domain() != &self.trust_domain {
            return Err(KeystoreError::WrongTrustDomain {
                id: row.id.clone(),
                found: authority.trust_domain().clone(),
                expected: self.trust_domain.clone(),
            });
        }
        Ok(authority)
    }

    fn load_jwt_key(&self, id: &str) -> Result<JwtSigningKey, KeystoreError> {
        let path = files::jwt_key_path(&self.keys_dir, id);
        let pem = files::read_secret(&path)?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| bad_key(&path, e))?;
        Ok(JwtSigningKey::from_pkcs8_der(
            jwt_kid(id),
            der.secret_pkcs8_der(),
        )?)
    }
}

/// The JWT key id of authority `id`: stable across replicas and restarts, and short.
fn jwt_kid(id: &str) -> &str {
    id.get(..32).unwrap_or(id)
}

/// A JWT signing key as PKCS#8 PEM.
fn jwt_key_pem(key: &JwtSigningKey) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8_der());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 is ASCII, so any split is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

/// How many rotation steps an authority in `state` has been through (prepare, activate, demote,
/// retire): the sum over all rows only grows, and is the same on every replica.
fn state_weight(state: AuthorityState) -> u64 {
    match state {
        AuthorityState::Prepared => 1,
        AuthorityState::Active => 2,
        AuthorityState::Old => 3,
        AuthorityState::Retired => 4,
    }
}

fn fingerprint(rows: &[AuthorityInfo]) -> Vec<(String, AuthorityState)> {
    rows.iter().map(|a| (a.id.clone(), a.state)).collect()
}

fn bad_key(path: &Path, reason: impl std::fmt::Display) -> KeystoreError {
    KeystoreError::BadKeyFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}
