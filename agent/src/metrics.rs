//! The agent's Prometheus metrics (`meshward_agent_*`), declared once here and served on the admin
//! HTTP port.
//!
//! Every label value is a `&'static str` from a fixed list in this crate: never a SPIFFE ID, a
//! selector, a pid or anything a workload or the CA chooses.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label, `name=value`, both static so the set stays bounded.
type Label = [(&'static str, &'static str); 1];

/// Two labels, for the socket's calls (`method`, `code`).
type Labels2 = [(&'static str, &'static str); 2];

/// The agent's metrics; cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    svids_minted: Counter,
    svid_mint_failures: Family<Label, Counter>,
    ca_errors: Family<Label, Counter>,
    entries: Gauge,
    svids_cached: Gauge,
    agent_svid_expiry: Gauge<f64, AtomicU64>,
    agent_svid_renewals: Counter,
    bundle_updates: Counter,
    attestations: Family<Label, Counter>,
    attestation_duration: Histogram,
    socket_calls: Family<Labels2, Counter>,
    stream_pushes: Family<Label, Counter>,
    sds_nacks: Counter,
}

impl AgentMetrics {
    /// Registers every `meshward_agent_*` metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshward_agent");
        let svids_minted = Counter::default();
        registry.register(
            "svids_minted",
            "Workload X.509-SVIDs received from the CA (first mints and renewals)",
            svids_minted.clone(),
        );
        let svid_mint_failures = Family::<Label, Counter>::default();
        registry.register(
            "svid_mint_failures",
            "Workload X.509-SVID requests that failed, by kind (`refused`, `ca_unavailable`, `invalid_response`)",
            svid_mint_failures.clone(),
        );
        let ca_errors = Family::<Label, Counter>::default();
        registry.register(
            "ca_errors",
            "Failed calls to the CA, by call",
            ca_errors.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "entries",
            "Registration entries synced for this node",
            entries.clone(),
        );
        let svids_cached = Gauge::default();
        registry.register(
            "svids_cached",
            "Entries holding a valid X.509-SVID",
            svids_cached.clone(),
        );
        let agent_svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "agent_svid_expiry_timestamp_seconds",
            "When the agent's own SVID expires (unix time)",
            agent_svid_expiry.clone(),
        );
        let agent_svid_renewals = Counter::default();
        registry.register(
            "agent_svid_renewals",
            "Agent SVID renewals",
            agent_svid_renewals.clone(),
        );
        let bundle_updates = Counter::default();
        registry.register(
            "bundle_updates",
            "Trust bundle updates received from the CA",
            bundle_updates.clone(),
        );
        let attestations = Family::<Label, Counter>::default();
        registry.register(
            "attestations",
            "Workload attestations, by result (`ok` or an `AttestError` code)",
            attestations.clone(),
        );
        // 100us .. ~3s: a cached attestation is a few procfs reads; hashing a big binary takes longer.
        let attestation_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 15));
        registry.register(
            "attestation_duration_seconds",
            "Time to attest one workload",
            attestation_duration.clone(),
        );
        let socket_calls = Family::<Labels2, Counter>::default();
        registry.register(
            "socket_calls",
            "Workload API and SDS calls on the agent socket, by method and gRPC code (`ok`, `permission_denied`, ...)",
            socket_calls.clone(),
        );
        let stream_pushes = Family::<Label, Counter>::default();
        registry.register(
            "stream_pushes",
            "Messages sent down open Workload API and SDS streams, by method",
            stream_pushes.clone(),
        );
        let sds_nacks = Counter::default();
        registry.register(
            "sds_nacks",
            "SDS responses a caller (Envoy) rejected",
            sds_nacks.clone(),
        );
        Self {
            registry: Arc::new(registry),
            svids_minted,
            svid_mint_failures,
            ca_errors,
            entries,
            svids_cached,
            agent_svid_expiry,
            agent_svid_renewals,
            bundle_updates,
            attestations,
            attestation_duration,
            socket_calls,
            stream_pushes,
            sds_nacks,
        }
    }

    /// The registry in Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// `n` workload SVIDs arrived from the CA.
    pub fn minted(&self, n: u64) {
        self.svids_minted.inc_by(n);
    }

    /// `n` workload SVID requests failed; `kind` is `refused`, `ca_unavailable` or `invalid_response`.
    pub fn mint_failed(&self, kind: &'static str, n: u64) {
        self.svid_mint_failures
            .get_or_create(&[("kind", kind)])
            .inc_by(n);
    }

    /// A call to the CA failed.
    pub fn ca_error(&self, call: &'static str) {
        self.ca_errors.get_or_create(&[("call", call)]).inc();
    }

    /// The entry count and how many hold a valid SVID.
    pub fn set_cache_size(&self, entries: usize, svids: usize) {
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.svids_cached
            .set(i64::try_from(svids).unwrap_or(i64::MAX));
    }

    /// The agent SVID now held expires at `not_after`.
    pub fn set_agent_svid_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.agent_svid_expiry.set(secs);
    }

    /// The agent SVID was renewed.
    pub fn agent_svid_renewed(&self) {
        self.agent_svid_renewals.inc();
    }

    /// A new trust bundle arrived.
    pub fn bundle_updated(&self) {
        self.bundle_updates.inc();
    }

    /// One workload attestation finished; `result` is `ok` or [`crate::attest::AttestError::code`].
    pub fn attestation(&self, result: &'static str, took: Duration) {
        self.attestations.get_or_create(&[("result", result)]).inc();
        self.attestation_duration.observe(took.as_secs_f64());
    }

    /// A Workload API or SDS call (`method`, e.g. `FetchX509SVID`) ended or was refused with `code`.
    pub fn socket_call(&self, method: &'static str, code: tonic::Code) {
        self.socket_calls
            .get_or_create(&[("method", method), ("code", code_label(code))])
            .inc();
    }

    /// A message went down an open stream of `method`.
    pub fn stream_push(&self, method: &'static str) {
        self.stream_pushes
            .get_or_create(&[("method", method)])
            .inc();
    }

    /// A caller rejected an SDS response.
    pub fn sds_nack(&self) {
        self.sds_nacks.inc();
    }
}

/// A gRPC code as a metric label.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_meshward_agent_and_count() {
        let metrics = AgentMetrics::new();
        metrics.minted(3);
        metrics.mint_failed("refused", 1);
        metrics.ca_error("SyncEntries");
        metrics.set_cache_size(4, 2);
        metrics.attestation("ok", Duration::from_millis(1));
        metrics.set_agent_svid_expiry(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        metrics.socket_call("FetchX509SVID", tonic::Code::PermissionDenied);
        metrics.stream_push("StreamSecrets");
        metrics.sds_nack();
        let text = metrics.encode();
        for needle in [
            "meshward_agent_svids_minted_total 3",
            "meshward_agent_svid_mint_failures_total{kind=\"refused\"} 1",
            "meshward_agent_ca_errors_total{call=\"SyncEntries\"} 1",
            "meshward_agent_entries 4",
            "meshward_agent_svids_cached 2",
            "meshward_agent_attestations_total{result=\"ok\"} 1",
            "meshward_agent_agent_svid_expiry_timestamp_seconds 1700000000",
            "meshward_agent_socket_calls_total{method=\"FetchX509SVID\",code=\"permission_denied\"} 1",
            "meshward_agent_stream_pushes_total{method=\"StreamSecrets\"} 1",
            "meshward_agent_sds_nacks_total 1",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
    }
}
