//! The SVID cache: every identity entitled on this node, with a key made here and a fresh SVID, ready
//! before any workload asks.
//!
//! [`SvidCache`] is the cheap-to-clone handle; [`CacheWorker`] the one task that owns the state:
//!
//! - `SyncEntries` at start and every `sync_interval` (or at once on [`SvidCache::request_sync`]);
//! - for each entry, a P-256 key made on the agent and a CSR; every entry that needs an SVID is
//!   minted in one `MintX509Svids` batch (chunks of [`MAX_BATCH`]);
//! - each SVID is renewed at half its lifetime, minus up to a tenth of it as jitter (so a thousand
//!   SVIDs minted together do not hit the CA in the same second forever after); SVIDs due within
//!   a short window of each other ([`RENEW_BATCH_WINDOW`], and at most a hundredth of their
//!   lifetime, so the window never undoes the jitter) are renewed in one batch;
//! - while the CA is unreachable, renewals are retried with backoff and the current SVIDs keep being
//!   served until they expire, so a CA outage shorter than half a TTL is invisible to workloads;
//!   an expired SVID is never served;
//! - `WatchBundle` is followed, and reopened with backoff when it breaks; a new bundle goes into
//!   the snapshot and to the node identity (which persists it and reconnects to the CA with it).
//!
//! Everything is published as a `watch` of `Arc<CacheSnapshot>`: readers take the current snapshot
//! and never wait on the worker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::TrustBundle;
use meshward_identity::jwt::JwtBundle;
use meshward_identity::proto::ca as pb;
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls_pki_types::UnixTime;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::attest::{Selector, Wanted};
use crate::ca_client::{self, CaClient, CaClientError, leaf_matches_key};
use crate::metrics::AgentMetrics;
use crate::node::{NodeIdentity, half_life, lifetime, rfc3339, until};

/// Most SVID requests in one `MintX509Svids` call (the CA's default cap is 1,000).
pub const MAX_BATCH: usize = 500;

/// SVIDs due for renewal within this window of the first due one are renewed in the same batch
/// (an SVID rides along only within a hundredth of its lifetime: a tenth of the jitter range, so
/// SVIDs minted together keep spreading out instead of being gathered into one batch again).
pub const RENEW_BATCH_WINDOW: Duration = Duration::from_secs(5);

/// First pause after a failed call to the CA; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Longest pause between retries.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// JWT-SVIDs kept at most.
const MAX_CACHED_JWTS: usize = 4_096;

/// Everything the Workload API and SDS serve from, at one moment.
#[derive(Debug, Clone)]
pub struct CacheSnapshot {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The trust domain's X.509 roots (during a rotation: old and new).
    pub bundle: TrustBundle,
    /// The trust domain's JWT keys (empty until the first bundle from the CA).
    pub jwt_bundle: JwtBundle,
    /// Every entry synced for this node, oldest first.
    pub entries: Vec<CachedEntry>,
    /// False until the first `SyncEntries`, the first mint round and the first bundle finished.
    pub synced: bool,
    /// The costly selectors the entries use ([`Wanted::ALL`] until synced: the entries are not
    /// known yet).
    pub wanted: Wanted,
}

/// One registration entry of this node, and its SVID when it holds one.
#[derive(Debug, Clone)]
pub struct CachedEntry {
    /// The CA's entry ID.
    pub entry_id: String,
    /// The identity it grants.
    pub spiffe_id: SpiffeId,
    /// All must be among a workload's selectors for it to get this identity.
    pub selectors: Vec<Selector>,
    /// The operator's hint (the Workload API's `hint` field).
    pub hint: String,
    /// The current SVID; `None` until minted, and after it expired without renewal.
    pub svid: Option<Arc<CachedSvid>>,
}

/// An X.509-SVID and its key.
#[derive(Debug)]
pub struct CachedSvid {
    /// The chain, leaf first (no root).
    pub svid: X509Svid,
    /// Its key, made on this agent.
    pub key: Arc<SvidKey>,
}

/// Why a JWT-SVID could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No entry synced for this node grants the identity.
    #[error("no entry on this node grants `{0}`")]
    UnknownIdentity(SpiffeId),
    /// A JWT-SVID needs at least one audience.
    #[error("a jwt-svid needs at least one audience")]
    NoAudience,
    /// The CA refused or could not be reached.
    #[error(transparent)]
    Ca(#[from] CaClientError),
}

/// The handle to the cache; cheap to clone.
#[derive(Clone)]
pub struct SvidCache {
    shared: Arc<Shared>,
}

struct Shared {
    snapshots: watch::Receiver<Arc<CacheSnapshot>>,
    client: CaClient,
    jwts: Mutex<HashMap<(SpiffeId, Vec<String>), CachedJwt>>,
    sync_now: Notify,
}

#[derive(Clone)]
struct CachedJwt {
    token: String,
    renew_at: SystemTime,
}

/// The one task that owns the cache's state; run it with [`CacheWorker::run`].
pub struct CacheWorker {
    implicit: Option<ImplicitEntries>,
    node: NodeIdentity,
    client: CaClient,
    metrics: AgentMetrics,
    shared: Arc<Shared>,
    publish: watch::Sender<Arc<CacheSnapshot>>,
    sync_interval: Duration,
    trust_domain: TrustDomain,
    slots: BTreeMap<String, Slot>,
    bundles: Option<(TrustBundle, JwtBundle)>,
    entries_synced: bool,
    minted_once: bool,
    rng: SystemRandom,
}

/// Entries the agent derives itself and adds to every sync (Kubernetes mode: one per service
/// account with a running pod on this node; the CA checks the pod before it signs).
pub type ImplicitEntries = Arc<dyn Fn() -> Vec<pb::Entry> + Send + Sync>;

/// One entry and its SVID state.
struct Slot {
    entry: CachedEntry,
    created_at: i64,
    ttl_seconds: i64,
    renew_at: SystemTime,
    next_try: SystemTime,
    retry: Duration,
}

impl CacheSnapshot {
    /// The entries whose every selector is among `selectors`, oldest first. An entry without
    /// selectors matches nothing.
    pub fn matching(&self, selectors: &[Selector]) -> Vec<&CachedEntry> {
        self.entries
            .iter()
            .filter(|e| {
                !e.selectors.is_empty() && e.selectors.iter().all(|s| selectors.contains(s))
            })
            .collect()
    }
}

impl SvidCache {
    /// A cache for `node`'s entries, talking to the CA through `client`; nothing happens until the
    /// returned worker runs.
    pub fn new(
        node: NodeIdentity,
        client: CaClient,
        metrics: AgentMetrics,
        sync_interval: Duration,
    ) -> (Self, CacheWorker) {
        let state = node.current();
        let trust_domain = state.trust_domain.clone();
        let (publish, snapshots) = watch::channel(Arc::new(CacheSnapshot {
            trust_domain: trust_domain.clone(),
            bundle: state.bundle.clone(),
            jwt_bundle: JwtBundle::new(trust_domain.clone()),
            entries: Vec::new(),
            synced: false,
            wanted: Wanted::ALL,
        }));
        let shared = Arc::new(Shared {
            snapshots,
            client: client.clone(),
            jwts: Mutex::new(HashMap::new()),
            sync_now: Notify::new(),
        });
        let worker = CacheWorker {
            implicit: None,
            node,
            client,
            metrics,
            shared: Arc::clone(&shared),
            publish,
            sync_interval,
            trust_domain,
            slots: BTreeMap::new(),
            bundles: None,
            entries_synced: false,
            minted_once: false,
            rng: SystemRandom::new(),
        };
        (Self { shared }, worker)
    }

    /// Every new snapshot from now on (the current one is marked unseen, so the first `changed()`
    /// returns at once only after a change).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheSnapshot>> {
        self.shared.snapshots.clone()
    }

    /// The snapshot now.
    pub fn current(&self) -> Arc<CacheSnapshot> {
        self.shared.snapshots.borrow().clone()
    }

    /// Asks the worker to sync entries now (e.g. a workload matched nothing: an entry for it may
    /// have just been created).
    pub fn request_sync(&self) {
        self.shared.sync_now.notify_one();
    }

    /// Waits at most `timeout` for a snapshot for which `found` returns something, and returns it;
    /// `None` on timeout. Checks the current snapshot first.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut found: impl FnMut(&CacheSnapshot) -> Option<T>,
    ) -> Option<T> {
        let mut snapshots = self.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            if let Some(hit) = found(&snapshot) {
                return Some(hit);
            }
            match tokio::time::timeout_at(deadline, snapshots.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the worker is gone (shutdown).
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// A JWT-SVID for `id` and `audience`, from the CA; reused until half its lifetime passed.
    pub async fn mint_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<String, CacheError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(CacheError::NoAudience);
        }
        if !self.current().entries.iter().any(|e| e.spiffe_id == *id) {
            return Err(CacheError::UnknownIdentity(id.clone()));
        }
        let key = (id.clone(), audience.to_vec());
        let now = SystemTime::now();
        if let Some(hit) = self.jwts().get(&key).filter(|hit| now < hit.renew_at) {
            return Ok(hit.token.clone());
        }
        let (token, expires_at) = self.shared.client.mint_jwt(id, audience).await?;
        let renew_at = now + until(expires_at, now) / 2;
        let mut jwts = self.jwts();
        if jwts.len() >= MAX_CACHED_JWTS {
            jwts.retain(|_, jwt| now < jwt.renew_at);
            if jwts.len() >= MAX_CACHED_JWTS {
                jwts.clear();
            }
        }
        jwts.insert(
            key,
            CachedJwt {
                token: token.clone(),
                renew_at,
            },
        );
        Ok(token)
    }

    fn jwts(&self) -> std::sync::MutexGuard<'_, HashMap<(SpiffeId, Vec<String>), CachedJwt>> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts are atomic).
        self.shared
            .jwts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for SvidCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snapshot = self.current();
        f.debug_struct("SvidCache")
            .field("entries", &snapshot.entries.len())
            .field("synced", &snapshot.synced)
            .finish()
    }
}

impl CacheWorker {
    /// Runs until `stop` fires. CA failures are retried, never fatal.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut stream: Option<tonic::Streaming<pb::Bundle>> = None;
        let mut watch_retry = FIRST_RETRY;
        let mut watch_at = Instant::now();
        let mut sync_retry = FIRST_RETRY;
        let mut sync_at = Instant::now();
        loop {
            let mint_at = self.next_wakeup();
            tokio::select! {
                () = stop.cancelled() => return,
                message = next_bundle(&mut stream) => {
                    match message {
                        Ok(Some(bundle)) => {
                            watch_retry = FIRST_RETRY;
                            self.apply_bundle(&bundle);
                        }
                        Ok(None) => {
                            tracing::info!("bundle watch ended; reopening");
                            stream = None;
                            watch_at = Instant::now() + watch_retry;
                        }
                        Err(status) => {
                            self.metrics.ca_error("WatchBundle");
                            tracing::warn!(code = ?status.code(), message = status.message(), "bundle watch broke; reopening");
                            stream = None;
                            watch_at = Instant::now() + watch_retry;
                            watch_retry = (watch_retry * 2).min(MAX_RETRY);
                        }
                    }
                }
                () = tokio::time::sleep_until(watch_at), if stream.is_none() => {
                    match self.client.watch_bundle().await {
                        Ok(opened) => stream = Some(opened),
                        Err(e) => {
                            self.metrics.ca_error("WatchBundle");
                            tracing::warn!(error = %e, retry_in = ?watch_retry, "cannot open the bundle watch");
                            watch_at = Instant::now() + watch_retry;
                            watch_retry = (watch_retry * 2).min(MAX_RETRY);
                        }
                    }
                }
                () = tokio::time::sleep_until(sync_at) => {
                    sync_at = Instant::now() + self.sync_and_mint(&mut sync_retry).await;
                }
                () = self.shared.sync_now.notified() => {
                    sync_at = Instant::now() + self.sync_and_mint(&mut sync_retry).await;
                }
                () = tokio::time::sleep_until(mint_at) => {
                    self.mint_due().await;
                }
            }
            self.publish();
        }
    }

    /// Adds `implicit`'s entries to the synced ones at every sync.
    pub fn with_implicit_entries(mut self, implicit: ImplicitEntries) -> Self {
        self.implicit = Some(implicit);
        self
    }

    /// Syncs the entries, then mints what they need; returns when to sync next.
    async fn sync_and_mint(&mut self, retry: &mut Duration) -> Duration {
        match self.client.sync_entries().await {
            Ok(mut entries) => {
                if let Some(implicit) = &self.implicit {
                    entries.extend(implicit());
                }
                *retry = FIRST_RETRY;
                self.apply_entries(entries);
                self.entries_synced = true;
                self.mint_due().await;
                self.minted_once = true;
                self.sync_interval
            }
            Err(e) => {
                self.metrics.ca_error("SyncEntries");
                tracing::warn!(error = %e, "cannot sync entries; serving the ones already synced");
                let pause = *retry;
                *retry = (*retry * 2).min(MAX_RETRY);
                pause.min(self.sync_interval)
            }
        }
    }

    /// Replaces the entry set: new entries get a slot (due at once), removed ones lose theirs,
    /// an entry whose identity changed loses its SVID.
    fn apply_entries(&mut self, entries: Vec<pb::Entry>) {
        let now = SystemTime::now();
        let mut fresh = BTreeMap::new();
        for entry in entries {
            let spiffe_id = match SpiffeId::parse(&entry.spiffe_id) {
                Ok(id) if id.trust_domain() == self.trust_domain => id,
                Ok(id) => {
                    tracing::warn!(entry = %entry.id, spiffe_id = %id, "entry outside the trust domain skipped");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.id, error = %e, "entry with an invalid spiffe id skipped");
                    continue;
                }
            };
            let mut selectors: Vec<Selector> = entry
                .selectors
                .into_iter()
                .map(|s| Selector::new(s.r#type, s.value))
                .collect();
            selectors.sort();
            selectors.dedup();
            let previous = self.slots.remove(&entry.id);
            let slot = match previous {
                Some(mut slot) if slot.entry.spiffe_id == spiffe_id => {
                    if slot.ttl_seconds != entry.ttl_seconds {
                        // A new lifetime applies from the next SVID: renew now, serve the old until then.
                        slot.renew_at = now;
                        slot.ttl_seconds = entry.ttl_seconds;
                    }
                    slot.entry.selectors = selectors;
                    slot.entry.hint = entry.hint;
                    slot
                }
                _ => Slot {
                    entry: CachedEntry {
                        entry_id: entry.id.clone(),
                        spiffe_id,
                        selectors,
                        hint: entry.hint,
                        svid: None,
                    },
                    created_at: entry.created_at,
                    ttl_seconds: entry.ttl_seconds,
                    renew_at: now,
                    next_try: now,
                    retry: FIRST_RETRY,
                },
            };
            fresh.insert(entry.id, slot);
        }
        for gone in self.slots.keys() {
            tracing::info!(entry = %gone, "entry removed; its svid is no longer served");
        }
        self.slots = fresh;
    }

    /// Mints every slot that needs an SVID now, plus those due within the batch window.
    async fn mint_due(&mut self) {
        let now = SystemTime::now();
        let due: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| {
                s.next_try <= now
                    && match &s.entry.svid {
                        None => true,
                        Some(c) => s.renew_at <= now + ride_along(lifetime(&c.svid)),
                    }
            })
            .map(|(id, _)| id.clone())
            .collect();
        // Early renewals only ride along with something actually due now.
        let any_due_now = due.iter().any(|id| {
            self.slots
                .get(id)
                .is_some_and(|s| s.entry.svid.is_none() || s.renew_at <= now)
        });
        if !any_due_now {
            return;
        }
        for chunk in due.chunks(MAX_BATCH) {
            self.mint_batch(chunk).await;
        }
    }

    async fn mint_batch(&mut self, ids: &[String]) {
        let mut keys = Vec::with_capacity(ids.len());
        let mut requests = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(slot) = self.slots.get(id) else {
                continue;
            };
            let made = SvidKey::generate()
                .map_err(|e| e.to_string())
                .and_then(|key| {
                    make_csr(&key, &slot.entry.spiffe_id)
                        .map(|csr| (key, csr))
                        .map_err(|e| e.to_string())
                });
            match made {
                Ok((key, csr)) => {
                    keys.push((id.clone(), key));
                    requests.push(pb::SvidRequest {
                        spiffe_id: slot.entry.spiffe_id.to_string(),
                        csr,
                        // The entry's TTL (or the CA's default) applies.
                        ttl_seconds: 0,
                        pod_uid: String::new(),
                    });
                }
                Err(e) => tracing::error!(entry = %id, error = %e, "cannot make a key or csr"),
            }
        }
        if requests.is_empty() {
            return;
        }
        let count = u64::try_from(requests.len()).unwrap_or(u64::MAX);
        let results = match self.client.mint_x509(requests).await {
            Ok(results) => results,
            Err(e) => {
                let kind = if e.is_refusal() {
                    "refused"
                } else {
                    "ca_unavailable"
                };
                self.metrics.ca_error("MintX509Svids");
                self.metrics.mint_failed(kind, count);
                let now = SystemTime::now();
                let mut pause = Duration::ZERO;
                for (id, _) in &keys {
                    if let Some(slot) = self.slots.get_mut(id) {
                        pause = slot.back_off(now);
                    }
                }
                tracing::warn!(error = %e, count, retry_in = ?pause, "cannot mint svids; the current ones stay in use until they expire");
                return;
            }
        };
        let verifier = self.verifier();
        let now = SystemTime::now();
        let mut minted = 0_u64;
        for ((id, key), result) in keys.into_iter().zip(results) {
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            match check_minted(result.result, &slot.entry.spiffe_id, &key, &verifier) {
                Ok(svid) => {
                    minted += 1;
                    let jitter = jitter(&self.rng, lifetime(&svid) / 10);
                    slot.renew_at = half_life(&svid).checked_sub(jitter).unwrap_or(now);
                    slot.retry = FIRST_RETRY;
                    slot.next_try = now;
                    tracing::debug!(entry = %id, spiffe_id = %svid.spiffe_id(), serial = %svid.serial(), expires = %rfc3339(svid.not_after()), "svid minted");
                    slot.entry.svid = Some(Arc::new(CachedSvid {
                        svid,
                        key: Arc::new(key),
                    }));
                }
                Err(MintFailure::Refused { code, message }) => {
                    self.metrics.mint_failed("refused", 1);
                    let pause = slot.back_off(now);
                    tracing::warn!(entry = %id, spiffe_id = %slot.entry.spiffe_id, code, message, retry_in = ?pause, "the ca refused an svid");
                }
                Err(MintFailure::Invalid(reason)) => {
                    self.metrics.mint_failed("invalid_response", 1);
                    let pause = slot.back_off(now);
                    tracing::warn!(entry = %id, reason, retry_in = ?pause, "the ca returned an unusable svid");
                }
            }
        }
        self.metrics.minted(minted);
        if minted > 0 {
            tracing::info!(count = minted, "svids minted");
        }
    }

    fn apply_bundle(&mut self, bundle: &pb::Bundle) {
        match ca_client::bundle_from_proto("WatchBundle", &self.trust_domain, bundle) {
            Ok((x509, jwt)) => {
                self.metrics.bundle_updated();
                tracing::info!(
                    sequence = bundle.sequence,
                    roots = x509.len(),
                    jwt_keys = jwt.len(),
                    "trust bundle received"
                );
                match self.node.set_bundle(x509.clone()) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot keep the new trust bundle in the data dir")
                    }
                }
                self.bundles = Some((x509, jwt));
            }
            Err(e) => tracing::warn!(error = %e, "unusable bundle from the ca ignored"),
        }
    }

    /// The earliest moment something must happen: a renewal, a retry, or an SVID expiring.
    fn next_wakeup(&self) -> Instant {
        let now = SystemTime::now();
        let next = self
            .slots
            .values()
            .flat_map(|s| {
                let expiry = s.entry.svid.as_ref().map(|c| c.svid.not_after());
                let due = if s.entry.svid.is_none() {
                    s.next_try
                } else {
                    s.renew_at.max(s.next_try)
                };
                [Some(due), expiry]
            })
            .flatten()
            .min();
        match next {
            // An hour at most: the loop re-reads the wall clock at least that often.
            Some(at) => Instant::now() + until(at, now).min(Duration::from_secs(3_600)),
            None => Instant::now() + Duration::from_secs(3_600),
        }
    }

    /// Drops expired SVIDs and publishes the snapshot if anything a reader sees changed.
    fn publish(&mut self) {
        let now = SystemTime::now();
        for slot in self.slots.values_mut() {
            if slot
                .entry
                .svid
                .as_ref()
                .is_some_and(|c| c.svid.not_after() <= now)
            {
                tracing::error!(entry = %slot.entry.entry_id, spiffe_id = %slot.entry.spiffe_id, "svid expired without renewal; it is no longer served");
                slot.entry.svid = None;
                slot.next_try = now;
            }
        }
        let mut entries: Vec<&Slot> = self.slots.values().collect();
        entries.sort_by(|a, b| {
            (a.created_at, &a.entry.entry_id).cmp(&(b.created_at, &b.entry.entry_id))
        });
        let entries: Vec<CachedEntry> = entries.into_iter().map(|s| s.entry.clone()).collect();
        let cached = entries.iter().filter(|e| e.svid.is_some()).count();
        self.metrics.set_cache_size(entries.len(), cached);
        let (bundle, jwt_bundle) = match &self.bundles {
            Some((x509, jwt)) => (x509.clone(), jwt.clone()),
            None => (
                self.node.current().bundle.clone(),
                JwtBundle::new(self.trust_domain.clone()),
            ),
        };
        let synced = self.entries_synced && self.minted_once && self.bundles.is_some();
        let wanted = if synced {
            Wanted::by_selectors(entries.iter().flat_map(|e| &e.selectors))
        } else {
            Wanted::ALL
        };
        let snapshot = CacheSnapshot {
            trust_domain: self.trust_domain.clone(),
            bundle,
            jwt_bundle,
            entries,
            synced,
            wanted,
        };
        self.publish.send_if_modified(|current| {
            if same(current, &snapshot) {
                return false;
            }
            *current = Arc::new(snapshot);
            true
        });
    }

    fn verifier(&self) -> PeerVerifier {
        let bundle = match &self.bundles {
            Some((x509, _)) => x509.clone(),
            None => self.node.current().bundle.clone(),
        };
        let mut set = meshward_identity::bundle::BundleSet::new();
        set.insert(bundle);
        PeerVerifier::new(Arc::new(set), [self.trust_domain.clone()])
    }
}

impl Slot {
    /// Schedules the next attempt after a failure; returns the pause.
    fn back_off(&mut self, now: SystemTime) -> Duration {
        // Never wait past a quarter of what is left of the current SVID, so a short outage is
        // followed by a renewal well before expiry.
        let left = self
            .entry
            .svid
            .as_ref()
            .map_or(MAX_RETRY, |c| until(c.svid.not_after(), now));
        let pause = self.retry.min(left / 4).max(FIRST_RETRY);
        self.next_try = now + pause;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        pause
    }
}

enum MintFailure {
    Refused { code: String, message: String },
    Invalid(String),
}

/// Checks one batch result: an SVID for the entry's ID, for the key we sent, chained to our bundle.
fn check_minted(
    result: Option<pb::svid_result::Result>,
    id: &SpiffeId,
    key: &SvidKey,
    verifier: &PeerVerifier,
) -> Result<X509Svid, MintFailure> {
    let svid = match result {
        Some(pb::svid_result::Result::Svid(svid)) => svid,
        Some(pb::svid_result::Result::Error(e)) => {
            return Err(MintFailure::Refused {
                code: e.code,
                message: e.message,
            });
        }
        None => return Err(MintFailure::Invalid("empty result".into())),
    };
    let svid = ca_client::svid_from_proto("MintX509Svids", svid)
        .map_err(|e| MintFailure::Invalid(e.to_string()))?;
    if svid.spiffe_id() != id {
        return Err(MintFailure::Invalid(format!(
            "svid is for `{}`, not `{id}`",
            svid.spiffe_id()
        )));
    }
    if !leaf_matches_key(&svid, key) {
        return Err(MintFailure::Invalid(
            "svid does not certify the key sent".into(),
        ));
    }
    let (leaf, intermediates) = svid
        .chain()
        .split_first()
        .ok_or_else(|| MintFailure::Invalid("empty chain".into()))?;
    verifier
        .verify(leaf, intermediates, PeerRole::Client, UnixTime::now())
        .map_err(|e| MintFailure::Invalid(e.to_string()))?;
    Ok(svid)
}

/// The next message of the bundle watch; never resolves while there is none.
async fn next_bundle(
    stream: &mut Option<tonic::Streaming<pb::Bundle>>,
) -> Result<Option<pb::Bundle>, tonic::Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// Whether two snapshots look the same to a reader (same SVIDs by pointer, same bundles).
fn same(a: &CacheSnapshot, b: &CacheSnapshot) -> bool {
    a.synced == b.synced
        && a.wanted == b.wanted
        && a.bundle == b.bundle
        && a.jwt_bundle == b.jwt_bundle
        && a.entries.len() == b.entries.len()
        && a.entries.iter().zip(&b.entries).all(|(x, y)| {
            x.entry_id == y.entry_id
                && x.spiffe_id == y.spiffe_id
                && x.selectors == y.selectors
                && x.hint == y.hint
                && match (&x.svid, &y.svid) {
                    (Some(p), Some(q)) => Arc::ptr_eq(p, q),
                    (None, None) => true,
                    _ => false,
                }
        })
}

/// How early an SVID of `lifetime` may be renewed to ride along with one that is due: at most
/// [`RENEW_BATCH_WINDOW`], and a tenth of the jitter range (a thousand SVIDs minted together with a
/// 30 s lifetime are renewed over 3 s; a 5 s window would gather them into one batch again).
fn ride_along(lifetime: Duration) -> Duration {
    RENEW_BATCH_WINDOW.min(lifetime / 100)
}

/// A uniformly random duration in `[0, max)`.
fn jitter(rng: &SystemRandom, max: Duration) -> Duration {
    let mut bytes = [0_u8; 4];
    if rng.fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    let fraction = f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0);
    max.mul_f64(fraction)
}

#[cfg(test)]
mod tests;
