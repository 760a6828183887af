//! Hot reload of policy sets: watch the directories, swap in a new [`Authorizer`] when they change.
//!
//! Polling (every second by default) rather than inotify: it works the same on every filesystem,
//! including Kubernetes ConfigMap volumes, whose atomic symlink swap file-watch APIs report
//! unreliably. A change is detected by content hash, not only by mtime, so a rewrite with the
//! same timestamp is seen and a touch without a change is not a reload.
//!
//! A set that fails to load is refused: the last good [`Authorizer`] stays in force, and the
//! failure is logged (warn) and counted (`meshward_proxy_policy_reload_failures_total`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use ring::digest;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::authz::{Authorizer, PolicyLoadError, PolicySchema, PolicySet};

/// How often the directories are checked by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the policy sets come from.
#[derive(Debug, Clone)]
pub struct PolicyStoreConfig {
    /// The enforced set's directory.
    pub policies: PathBuf,
    /// The dry-run set's directory, if any.
    pub dry_run: Option<PathBuf>,
    /// The schema both sets are validated against.
    pub schema: Arc<PolicySchema>,
    /// How often to look for changes.
    pub poll_interval: Duration,
}

/// Counters for policy loading; register them once on the admin registry.
#[derive(Debug, Clone, Default)]
pub struct PolicyMetrics {
    /// Policy sets swapped in after a change (`meshward_proxy_policy_reloads_total`).
    pub reloads: Counter,
    /// Changed policy sets refused (`meshward_proxy_policy_reload_failures_total`).
    pub reload_failures: Counter,
    /// Policies in the enforced set now in force (`meshward_proxy_policies`).
    pub policies: Gauge,
}

/// The current [`Authorizer`], and the means to reload it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    config: PolicyStoreConfig,
    metrics: PolicyMetrics,
    tx: Arc<watch::Sender<Arc<Authorizer>>>,
}

/// The poll loop's memory of what it last saw.
#[derive(Debug)]
pub struct PolicyWatcher {
    store: PolicyStore,
    last_seen: Fingerprint,
}

/// Content hashes of the `*.cedar` files of the watched directories, or why they could not be read.
type Fingerprint = Result<Vec<(PathBuf, Vec<u8>)>, String>;

impl PolicyMetrics {
    /// Registers the metrics (names without `_total`; the encoder adds it to counters).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshward_proxy_policy_reloads",
            "Policy sets swapped in after a change",
            self.reloads.clone(),
        );
        registry.register(
            "meshward_proxy_policy_reload_failures",
            "Changed policy sets refused because they do not parse or validate; the last good set stays",
            self.reload_failures.clone(),
        );
        registry.register(
            "meshward_proxy_policies",
            "Policies in the enforced set in force",
            self.policies.clone(),
        );
    }
}

impl PolicyStore {
    /// Loads the sets once; fails if they do not load (there is no last good set to keep yet).
    ///
    /// Returns the store (for readers) and the watcher (run it with [`PolicyWatcher::run`]).
    pub fn load(
        config: PolicyStoreConfig,
        metrics: PolicyMetrics,
    ) -> Result<(Self, PolicyWatcher), PolicyLoadError> {
        let last_seen = fingerprint(&config);
        let authorizer = build(&config)?;
        metrics
            .policies
            .set(gauge_value(authorizer.enforced().len()));
        let (tx, _rx) = watch::channel(Arc::new(authorizer));
        let store = Self {
            config,
            metrics,
            tx: Arc::new(tx),
        };
        let watcher = PolicyWatcher {
            store: store.clone(),
            last_seen,
        };
        Ok((store, watcher))
    }

    /// The authorizer in force now.
    pub fn current(&self) -> Arc<Authorizer> {
        Arc::clone(&self.tx.borrow())
    }

    /// A receiver that sees every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Authorizer>> {
        self.tx.subscribe()
    }

    /// The metrics this store updates.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// Loads the sets now and swaps them in; on failure keeps the current ones, logs and counts.
    pub fn reload(&self) -> Result<(), PolicyLoadError> {
        match build(&self.config) {
            Ok(authorizer) => {
                let count = authorizer.enforced().len();
                self.metrics.policies.set(gauge_value(count));
                self.metrics.reloads.inc();
                self.tx.send_replace(Arc::new(authorizer));
                info!(
                    policies = %self.config.policies.display(),
                    count,
                    "policy set reloaded"
                );
                Ok(())
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                warn!(
                    policies = %self.config.policies.display(),
                    error = %e,
                    "policy set refused; the last good set stays in force"
                );
                Err(e)
            }
        }
    }
}

impl PolicyWatcher {
    /// Checks the directories once; reloads if their content changed since the last check.
    ///
    /// Returns `None` when nothing changed, else the reload's outcome. A refused content is
    /// not retried (nor counted again) until it changes again.
    pub fn poll(&mut self) -> Option<Result<(), PolicyLoadError>> {
        let now = fingerprint(&self.store.config);
        if now == self.last_seen {
            return None;
        }
        self.last_seen = now;
        Some(self.store.reload())
    }

    /// Polls every `poll_interval` until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(self.store.config.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {
                    // Reading files blocks; a policy directory is small, and this task is alone.
                    let _ = self.poll();
                }
            }
        }
    }
}

fn build(config: &PolicyStoreConfig) -> Result<Authorizer, PolicyLoadError> {
    let enforced = PolicySet::load_dir(&config.policies, Arc::clone(&config.schema))?;
    let dry_run = match &config.dry_run {
        Some(dir) => Some(PolicySet::load_dir(dir, Arc::clone(&config.schema))?),
        None => None,
    };
    Ok(Authorizer::new(enforced, dry_run))
}

fn fingerprint(config: &PolicyStoreConfig) -> Fingerprint {
    let mut out = Vec::new();
    for dir in std::iter::once(&config.policies).chain(config.dry_run.as_ref()) {
        out.extend(dir_fingerprint(dir)?);
    }
    Ok(out)
}

fn dir_fingerprint(dir: &Path) -> Fingerprint {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            out.push((
                path,
                digest::digest(&digest::SHA256, &bytes).as_ref().to_vec(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
