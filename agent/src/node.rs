//! The agent's own identity: its agent SVID (`spiffe://TD/meshward/agent/join/<node>`), its key and
//! the trust bundle, kept in the data dir so a restart resumes without a new join token.
//!
//! Files in the data dir `D` (0700): `agent.pem` (chain, leaf first), `agent.key` (PKCS#8, 0600),
//! `bundle.pem` (the roots last received from the CA). Each is written to a temp file and renamed,
//! so a crash leaves the old or the new file, never half of one.
//!
//! Start-up ([`NodeIdentity::establish`]): a valid SVID in `D` is resumed (a join token, if given,
//! is not needed and not spent); without one, the agent attests with the join token; an SVID that
//! expired while the agent was down cannot be renewed (the CA only renews a current SVID), so the
//! agent stops with [`NodeError::ExpiredWhileDown`], which tells the operator to create a new token.
//!
//! Kubernetes mode (`config.k8s`): the agent attests with its projected service-account token
//! instead, read from the token file at every attestation (the kubelet rotates it); an SVID that
//! expired (while down, or while the CA was unreachable) is replaced by attesting again with a
//! fresh token, as no operator step is needed.
//!
//! Afterwards [`NodeIdentity::renew`] renews the SVID at half its lifetime, over mTLS, with a fresh
//! key, retrying with backoff while the CA is unreachable.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{
    NOT_BEFORE_BACKDATE, SvidKey, X509Svid, certs_from_pem, make_csr, spiffe_id_of,
};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::UnixTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca_client::{self, CaClient, CaClientError, leaf_matches_key};
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;

/// The agent SVID chain's file name in the data dir.
pub const SVID_FILE: &str = "agent.pem";
/// The agent key's file name in the data dir (0600).
pub const KEY_FILE: &str = "agent.key";
/// The trust bundle's file name in the data dir.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// Longest pause between two renewal attempts while the CA is unreachable.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The agent's identity right now: one consistent snapshot, swapped whole on every change.
#[derive(Debug)]
pub struct NodeState {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The agent SVID, leaf first.
    pub svid: X509Svid,
    /// Its key (made on this node, never sent anywhere).
    pub key: Arc<SvidKey>,
    /// The X.509 roots of the trust domain, as last received from the CA.
    pub bundle: TrustBundle,
}

/// Why the agent's identity could not be established, kept or renewed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The persisted SVID expired while the agent was not running; only a new join token helps.
    #[error("the agent svid in `{}` expired at {expired_at}: create a new join token for node `{node}` with `meshward ca token create --node {node}` and start the agent with `--join-token`", data_dir.display())]
    ExpiredWhileDown {
        /// The data dir.
        data_dir: PathBuf,
        /// When it expired (RFC 3339, UTC).
        expired_at: String,
        /// The node name in the agent's SPIFFE ID.
        node: String,
    },
    /// The SVID expired while the agent was running: every renewal failed (the CA unreachable,
    /// or refusing, e.g. an evicted agent) until it was too late.
    #[error(
        "the agent svid expired at {expired_at} without a renewal (last attempt: {last_error}): create a new join token for node `{node}` with `meshward ca token create --node {node}` and restart the agent with `--join-token`"
    )]
    Expired {
        /// When it expired (RFC 3339, UTC).
        expired_at: String,
        /// The node name in the agent's SPIFFE ID.
        node: String,
        /// Why the last renewal failed.
        last_error: String,
    },
    /// There is no SVID in the data dir and no join token to get one.
    #[error("no agent svid in `{}` and no join token: create one with `meshward ca token create --node NAME` and pass it with `--join-token`", data_dir.display())]
    NoJoinToken {
        /// The data dir.
        data_dir: PathBuf,
    },
    /// The CA refused or failed the attestation.
    #[error("node attestation failed: {0}")]
    Attest(#[source] CaClientError),
    /// A file could not be read or written.
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file holds something unusable.
    #[error("`{}` is unusable: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The trust domain cannot be told, or does not match.
    #[error("{0}")]
    TrustDomain(String),
    /// The CA's answer could not be used.
    #[error("the ca's answer is unusable: {0}")]
    BadResponse(String),
    /// A key or CSR could not be made.
    #[error("cannot make the agent key or csr: {0}")]
    Key(String),
}

/// The handle to the agent's identity; cheap to clone.
#[derive(Clone)]
pub struct NodeIdentity {
    tx: Arc<watch::Sender<Arc<NodeState>>>,
    store: Arc<NodeStore>,
    node: String,
    /// Kubernetes mode: the config to attest again with when the SVID expired.
    reattest: Option<Arc<AgentConfig>>,
}

/// Reads and writes the identity files in the data dir.
#[derive(Debug)]
struct NodeStore {
    dir: PathBuf,
}

impl NodeIdentity {
    /// Resumes the identity kept in the data dir, or attests with the join token (see the module
    /// docs). `now` is the clock the SVID's validity is checked against.
    pub async fn establish(config: &AgentConfig, now: SystemTime) -> Result<Self, NodeError> {
        let store = NodeStore::open(&config.data_dir)?;
        let persisted = store.load(config.trust_domain.as_ref())?;
        if let Some(state) = persisted {
            let node = node_name(state.svid.spiffe_id());
            if state.svid.not_after() > now {
                tracing::info!(agent = %state.svid.spiffe_id(), serial = %state.svid.serial(), expires = %rfc3339(state.svid.not_after()), "agent svid resumed from the data dir");
                return Ok(Self::publish(state, store, node, config));
            }
            let expired = NodeError::ExpiredWhileDown {
                data_dir: config.data_dir.clone(),
                expired_at: rfc3339(state.svid.not_after()),
                node,
            };
            if config.join_token.is_none() && config.k8s.is_none() {
                return Err(expired);
            }
            tracing::warn!(error = %expired, "agent svid expired; attesting again");
            return Self::attest(config, store).await.map_err(|e| match e {
                // The token was refused too: the expiry is what the operator must fix.
                NodeError::Attest(refusal) if refusal.is_refusal() && config.k8s.is_none() => {
                    expired
                }
                other => other,
            });
        }
        Self::attest(config, store).await
    }

    /// The identity now.
    pub fn current(&self) -> Arc<NodeState> {
        self.tx.borrow().clone()
    }

    /// Every change from now on (renewal, new bundle).
    pub fn subscribe(&self) -> watch::Receiver<Arc<NodeState>> {
        self.tx.subscribe()
    }

    /// The node name from the agent's SPIFFE ID.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Keeps and publishes a new X.509 bundle from the CA; a bundle equal to the current one is a
    /// no-op. Returns whether it changed.
    pub fn set_bundle(&self, bundle: TrustBundle) -> Result<bool, NodeError> {
        let current = self.current();
        if current.bundle.authorities() == bundle.authorities() {
            return Ok(false);
        }
        self.store.save_bundle(&bundle)?;
        self.tx.send_replace(Arc::new(NodeState {
            trust_domain: current.trust_domain.clone(),
            svid: current.svid.clone(),
            key: Arc::clone(&current.key),
            bundle,
        }));
        Ok(true)
    }

    /// Renews the agent SVID at half its lifetime until `stop` fires. Fails only when the SVID
    /// expired without a renewal: then nothing the agent does can work anymore.
    pub async fn renew(
        self,
        client: CaClient,
        metrics: AgentMetrics,
        stop: CancellationToken,
    ) -> Result<(), NodeError> {
        let mut retry = Duration::from_secs(1);
        let mut last_error = String::from("none was attempted");
        loop {
            let state = self.current();
            metrics.set_agent_svid_expiry(state.svid.not_after());
            let wait = until(half_life(&state.svid), SystemTime::now());
            // Sleep in steps so a wall-clock jump is noticed within a minute.
            let step = wait.min(Duration::from_secs(60));
            if !step.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(step) => {}
                }
                // Read the state again: while this task slept, the bundle may have changed (a
                // root rotation) and the renewal must be checked against the one of now.
                continue;
            }
            let now = SystemTime::now();
            if state.svid.not_after() <= now
                && let Some(config) = &self.reattest
            {
                // Kubernetes mode: a fresh service-account token gets a new SVID.
                match Self::attest_state(config, &self.store).await {
                    Ok(fresh) => {
                        self.tx.send_replace(Arc::new(fresh));
                        metrics.agent_svid_renewed();
                        retry = Duration::from_secs(1);
                    }
                    Err(e) => {
                        metrics.ca_error("Attest");
                        tracing::warn!(error = %e, retry_in = ?retry, "agent svid expired and attesting again failed");
                        tokio::select! {
                            () = stop.cancelled() => return Ok(()),
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
                continue;
            }
            if state.svid.not_after() <= now {
                return Err(NodeError::Expired {
                    expired_at: rfc3339(state.svid.not_after()),
                    node: self.node.clone(),
                    last_error,
                });
            }
            match self.renew_once(&client, &state).await {
                Ok(()) => {
                    metrics.agent_svid_renewed();
                    retry = Duration::from_secs(1);
                }
                Err(e) => {
                    metrics.ca_error("RenewAgent");
                    let left = state
                        .svid
                        .not_after()
                        .duration_since(now)
                        .unwrap_or_default();
                    let pause = retry.min(left / 4).max(Duration::from_millis(500));
                    tracing::warn!(error = %e, retry_in = ?pause, expires = %rfc3339(state.svid.not_after()), "agent svid renewal failed; the current svid stays in use");
                    last_error = e.to_string();
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    async fn renew_once(&self, client: &CaClient, state: &NodeState) -> Result<(), NodeError> {
        let key = SvidKey::generate().map_err(|e| NodeError::Key(e.to_string()))?;
        let csr =
            make_csr(&key, state.svid.spiffe_id()).map_err(|e| NodeError::Key(e.to_string()))?;
        let issued = client.renew_agent(csr).await.map_err(NodeError::Attest)?;
        let svid = ca_client::svid_from_proto("RenewAgent", issued)
            .map_err(|e| NodeError::BadResponse(e.to_string()))?;
        // The bundle as it is now, not as it was when the call started: a root activated
        // meanwhile signs the answer, and the bundle that names it arrived with `set_bundle`.
        let bundle = self.current().bundle.clone();
        check_agent_svid(&svid, &key, &bundle, Some(state.svid.spiffe_id()))?;
        // On disk first: if the agent stops right after this, it resumes with the renewed SVID
        // (the CA honours the previous one only until the agent first presents this one).
        self.store.save_svid(&svid, &key)?;
        tracing::info!(agent = %svid.spiffe_id(), serial = %svid.serial(), expires = %rfc3339(svid.not_after()), "agent svid renewed");
        self.tx.send_replace(Arc::new(NodeState {
            trust_domain: state.trust_domain.clone(),
            svid,
            key: Arc::new(key),
            bundle: self.current().bundle.clone(),
        }));
        Ok(())
    }

    async fn attest(config: &AgentConfig, store: NodeStore) -> Result<Self, NodeError> {
        let state = Self::attest_state(config, &store).await?;
        let node = node_name(state.svid.spiffe_id());
        Ok(Self::publish(state, store, node, config))
    }

    /// Node attestation (join token, or in Kubernetes mode the service-account token read now);
    /// the new SVID and bundle are saved in the data dir.
    async fn attest_state(config: &AgentConfig, store: &NodeStore) -> Result<NodeState, NodeError> {
        let bootstrap = bootstrap_bundle(&config.trust_bundle, config.trust_domain.as_ref())?;
        let td = bootstrap.trust_domain().clone();
        let key = SvidKey::generate().map_err(|e| NodeError::Key(e.to_string()))?;
        let csr = attestation_csr(&key)?;
        let (addr, timeout) = (&config.ca_addr, config.ca_timeout);
        let response = match &config.k8s {
            Some(k8s) => {
                let token = read_psat_token(&k8s.psat_token_file)?;
                ca_client::attest_k8s_psat(addr, &bootstrap, &token, csr, timeout).await
            }
            None => {
                let token = config
                    .join_token
                    .as_ref()
                    .ok_or_else(|| NodeError::NoJoinToken {
                        data_dir: config.data_dir.clone(),
                    })?;
                ca_client::attest(addr, &bootstrap, token, csr, timeout).await
            }
        }
        .map_err(NodeError::Attest)?;
        let svid = response
            .svid
            .ok_or_else(|| NodeError::BadResponse("no svid in the attest response".into()))?;
        let svid = ca_client::svid_from_proto("Attest", svid)
            .map_err(|e| NodeError::BadResponse(e.to_string()))?;
        let bundle = match &response.bundle {
            Some(bundle) => {
                ca_client::bundle_from_proto("Attest", &td, bundle)
                    .map_err(|e| NodeError::BadResponse(e.to_string()))?
                    .0
            }
            None => bootstrap,
        };
        check_agent_svid(&svid, &key, &bundle, None)?;
        store.save_bundle(&bundle)?;
        store.save_svid(&svid, &key)?;
        let method = if config.k8s.is_some() {
            "the service-account token"
        } else {
            "the join token"
        };
        tracing::info!(agent = %svid.spiffe_id(), serial = %svid.serial(), expires = %rfc3339(svid.not_after()), "node attested with {method}");
        Ok(NodeState {
            trust_domain: td,
            svid,
            key: Arc::new(key),
            bundle,
        })
    }

    fn publish(state: NodeState, store: NodeStore, node: String, config: &AgentConfig) -> Self {
        let (tx, _) = watch::channel(Arc::new(state));
        Self {
            tx: Arc::new(tx),
            store: Arc::new(store),
            node,
            reattest: config.k8s.is_some().then(|| Arc::new(config.clone())),
        }
    }
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .field("svid", &self.current().svid)
            .finish()
    }
}

impl NodeStore {
    /// Uses `dir`, creating it 0700 if needed.
    fn open(dir: &Path) -> Result<Self, NodeError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| NodeError::Io {
                    what: "create the data dir",
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The persisted identity, `None` if there is none yet.
    fn load(&self, expected_td: Option<&TrustDomain>) -> Result<Option<NodeState>, NodeError> {
        let svid_path = self.dir.join(SVID_FILE);
        let key_path = self.dir.join(KEY_FILE);
        let bundle_path = self.dir.join(BUNDLE_FILE);
        let (Some(svid_pem), Some(key_pem)) =
            (read_optional(&svid_path)?, read_optional(&key_path)?)
        else {
            if svid_path.exists() || key_path.exists() {
                return Err(NodeError::BadFile {
                    path: self.dir.clone(),
                    reason: format!(
                        "holds only one of `{SVID_FILE}` and `{KEY_FILE}`; remove both and attest again with a new join token"
                    ),
                });
            }
            return Ok(None);
        };
        let bad = |path: &Path, reason: String| NodeError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let svid = X509Svid::from_pem(&svid_pem).map_err(|e| bad(&svid_path, e.to_string()))?;
        let key = SvidKey::from_pkcs8_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        if !leaf_matches_key(&svid, &key) {
            return Err(bad(
                &key_path,
                format!(
                    "the key does not belong to the svid in `{SVID_FILE}`; remove both and attest again with a new join token"
                ),
            ));
        }
        let td = svid.spiffe_id().trust_domain();
        if let Some(expected) = expected_td
            && *expected != td
        {
            return Err(NodeError::TrustDomain(format!(
                "the agent svid in `{}` is for trust domain `{td}`, but the agent is configured for `{expected}`",
                self.dir.display()
            )));
        }
        if !is_agent_id(svid.spiffe_id()) {
            return Err(bad(
                &svid_path,
                format!("`{}` is not an agent spiffe id", svid.spiffe_id()),
            ));
        }
        let bundle_pem = read_optional(&bundle_path)?.ok_or_else(|| {
            bad(
                &bundle_path,
                "missing; remove the data dir and attest again with a new join token".into(),
            )
        })?;
        let bundle = TrustBundle::from_pem(td.clone(), &bundle_pem)
            .map_err(|e| bad(&bundle_path, e.to_string()))?;
        Ok(Some(NodeState {
            trust_domain: td,
            svid,
            key: Arc::new(key),
            bundle,
        }))
    }

    fn save_svid(&self, svid: &X509Svid, key: &SvidKey) -> Result<(), NodeError> {
        // The key first: a crash between the two leaves a new key with the old SVID, which `load`
        // refuses by name, rather than a new SVID whose key is lost.
        write_atomic(
            &self.dir.join(KEY_FILE),
            key.to_pkcs8_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(&self.dir.join(SVID_FILE), svid.to_pem().as_bytes(), 0o644)
    }

    fn save_bundle(&self, bundle: &TrustBundle) -> Result<(), NodeError> {
        write_atomic(
            &self.dir.join(BUNDLE_FILE),
            bundle.to_pem().as_bytes(),
            0o644,
        )
    }
}

/// The roots in `path` (`--trust-bundle`), as a bundle of the configured trust domain or, if none
/// is configured, of the trust domain in the roots' own SPIFFE ID.
pub fn bootstrap_bundle(path: &Path, td: Option<&TrustDomain>) -> Result<TrustBundle, NodeError> {
    let pem = fs::read_to_string(path).map_err(|source| NodeError::Io {
        what: "read the trust bundle",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| NodeError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let td = match td {
        Some(td) => td.clone(),
        None => {
            let certs = certs_from_pem(&pem).map_err(|e| bad(e.to_string()))?;
            let ids: Vec<SpiffeId> = certs.iter().filter_map(|c| spiffe_id_of(c).ok()).collect();
            let first = ids.first().ok_or_else(|| {
                NodeError::TrustDomain(format!(
                    "cannot tell the trust domain from `{}`: its roots carry no spiffe id; pass `--trust-domain`",
                    path.display()
                ))
            })?;
            let td = first.trust_domain();
            if ids.iter().any(|id| id.trust_domain() != td) {
                return Err(NodeError::TrustDomain(format!(
                    "the roots in `{}` name several trust domains; pass `--trust-domain`",
                    path.display()
                )));
            }
            td
        }
    };
    TrustBundle::from_pem(td, &pem).map_err(|e| bad(e.to_string()))
}

/// When to renew: half-way through the SVID's lifetime (see [`lifetime`]).
pub fn half_life(svid: &X509Svid) -> SystemTime {
    issued_at(svid) + lifetime(svid) / 2
}

/// How long the SVID was issued for: from its issuance (its `notBefore` is backdated by
/// [`NOT_BEFORE_BACKDATE`] for clock skew, which is not lifetime) to its `notAfter`.
pub fn lifetime(svid: &X509Svid) -> Duration {
    svid.not_after()
        .duration_since(issued_at(svid))
        .unwrap_or_default()
}

fn issued_at(svid: &X509Svid) -> SystemTime {
    svid.not_before()
        .checked_add(NOT_BEFORE_BACKDATE)
        .unwrap_or(svid.not_before())
        .min(svid.not_after())
}

/// How long from `now` until `at` (zero if it passed).
pub(crate) fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or_default()
}

/// A time as RFC 3339 UTC, for messages.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A CSR for the agent's key with no SAN: the CA names the agent after the join token's node.
fn attestation_csr(key: &SvidKey) -> Result<Vec<u8>, NodeError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(key)
        .map_err(|e| NodeError::Key(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// Checks a freshly issued agent SVID: an agent ID (the same one on renewal), our key, and a chain
/// to the bundle.
fn check_agent_svid(
    svid: &X509Svid,
    key: &SvidKey,
    bundle: &TrustBundle,
    expected: Option<&SpiffeId>,
) -> Result<(), NodeError> {
    let id = svid.spiffe_id();
    if !is_agent_id(id) || id.trust_domain() != *bundle.trust_domain() {
        return Err(NodeError::BadResponse(format!(
            "`{id}` is not an agent id of trust domain `{}`",
            bundle.trust_domain()
        )));
    }
    if let Some(expected) = expected
        && id != expected
    {
        return Err(NodeError::BadResponse(format!(
            "renewed svid is for `{id}`, not `{expected}`"
        )));
    }
    if !leaf_matches_key(svid, key) {
        return Err(NodeError::BadResponse(
            "the svid does not certify the key the agent sent".into(),
        ));
    }
    let mut set = BundleSet::new();
    set.insert(bundle.clone());
    let verifier = PeerVerifier::new(Arc::new(set), [bundle.trust_domain().clone()]);
    let (leaf, intermediates) = svid
        .chain()
        .split_first()
        .ok_or_else(|| NodeError::BadResponse("empty svid chain".into()))?;
    verifier
        .verify(leaf, intermediates, PeerRole::Client, UnixTime::now())
        .map_err(|e| NodeError::BadResponse(e.to_string()))?;
    Ok(())
}

/// `spiffe://TD/meshward/agent/...`.
fn is_agent_id(id: &SpiffeId) -> bool {
    let mut segments = id.segments();
    segments.next() == Some("meshward") && segments.next() == Some("agent")
}

/// The last path segment of the agent's ID (`.../join/<node>`).
fn node_name(id: &SpiffeId) -> String {
    id.segments().last().unwrap_or_default().to_owned()
}

/// The projected service-account token, read now (the kubelet replaces the file as it rotates it).
pub fn read_psat_token(path: &Path) -> Result<String, NodeError> {
    let text = fs::read_to_string(path).map_err(|source| NodeError::Io {
        what: "read the service-account token",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(NodeError::BadFile {
            path: path.to_path_buf(),
            reason: "the service-account token file is empty: mount a projected token with audience `meshward-ca`".into(),
        });
    }
    Ok(token.to_owned())
}

fn read_optional(path: &Path) -> Result<Option<String>, NodeError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NodeError::Io {
            what: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` through a temp file in the same dir, with `mode` from the start.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    let io_error = |source| NodeError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    // The umask may have narrowed `mode`; a key must end up exactly 0600.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_error)?;
    fs::rename(&tmp, path).map_err(io_error)
}

#[cfg(test)]
mod tests;
