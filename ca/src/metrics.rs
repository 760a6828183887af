//! The CA's Prometheus metrics, declared once here and served on the admin HTTP port.
//!
//! Every label set is bounded: refusal reasons are [`crate::issuer::IssueError::code`] values (a
//! fixed list), attestation results are `ok` or a reason code. No peer, ID or address ever becomes
//! a label.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::issuer::IssueError;

/// One label, `name=value`, both static so the set stays bounded.
type Label = [(&'static str, &'static str); 1];

/// The CA's metrics; cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct CaMetrics {
    registry: Arc<Registry>,
    svids_issued: Counter,
    svids_refused: Family<Label, Counter>,
    signing_duration: Histogram,
    agents: Gauge,
    authority_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    attestations: Family<Label, Counter>,
}

impl CaMetrics {
    /// Registers every `meshward_ca_*` metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshward_ca");
        let svids_issued = Counter::default();
        registry.register(
            "svids_issued",
            "X.509-SVIDs and JWT-SVIDs signed (workloads and agents)",
            svids_issued.clone(),
        );
        let svids_refused = Family::<Label, Counter>::default();
        // Every reason is exported from the start at 0, so rate() and alerts work before the first
        // refusal of each kind.
        for &reason in IssueError::CODES {
            drop(svids_refused.get_or_create(&[("reason", reason)]));
        }
        registry.register(
            "svids_refused",
            "SVID requests refused, by reason",
            svids_refused.clone(),
        );
        // 50us .. ~1.6s: one signature takes ~50us, a full batch of 1,000 tens of milliseconds.
        let signing_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "signing_duration_seconds",
            "Time to verify and sign one request (a batch counts once)",
            signing_duration.clone(),
        );
        let agents = Gauge::default();
        registry.register(
            "agents",
            "Attested agents that are neither evicted nor expired",
            agents.clone(),
        );
        let authority_expiry = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "authority_expiry_seconds",
            "Seconds until the active signing authority expires",
            authority_expiry.clone(),
        );
        let attestations = Family::<Label, Counter>::default();
        registry.register(
            "attestations",
            "Node attestations, by result (`ok` or the refusal reason)",
            attestations.clone(),
        );
        Self {
            registry: Arc::new(registry),
            svids_issued,
            svids_refused,
            signing_duration,
            agents,
            authority_expiry,
            attestations,
        }
    }

    /// Counts `n` signed SVIDs.
    pub fn issued(&self, n: u64) {
        self.svids_issued.inc_by(n);
    }

    /// Counts one refused SVID request; `reason` is an `IssueError::code()`.
    pub fn refused(&self, reason: &'static str) {
        self.svids_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Records how long one signing call (single or batch) took.
    pub fn signing_took(&self, elapsed: Duration) {
        self.signing_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one attestation; `result` is `ok` or an `IssueError::code()`.
    pub fn attestation(&self, result: &'static str) {
        self.attestations.get_or_create(&[("result", result)]).inc();
    }

    /// Sets the number of live agents.
    pub fn set_agents(&self, n: usize) {
        self.agents.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the time left on the active authority (negative once it has expired).
    pub fn set_authority_expiry(&self, not_after: SystemTime, now: SystemTime) {
        let secs = match not_after.duration_since(now) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        };
        self.authority_expiry.set(secs.floor());
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a metric that fails to encode leaves a partial page,
        // which Prometheus reports as a scrape error.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_metric_is_exposed_with_its_name() {
        let m = CaMetrics::new();
        m.issued(3);
        m.refused("not_entitled");
        m.refused("not_entitled");
        m.refused("bad_csr");
        m.signing_took(Duration::from_millis(2));
        m.attestation("ok");
        m.set_agents(4);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        m.set_authority_expiry(now + Duration::from_secs(3_600), now);
        let text = m.encode();
        assert_eq!(
            line(&text, "meshward_ca_svids_issued_total"),
            Some("meshward_ca_svids_issued_total 3")
        );
        assert_eq!(
            line(
                &text,
                "meshward_ca_svids_refused_total{reason=\"not_entitled\"}"
            ),
            Some("meshward_ca_svids_refused_total{reason=\"not_entitled\"} 2")
        );
        assert!(
            line(
                &text,
                "meshward_ca_svids_refused_total{reason=\"bad_csr\"} 1"
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(&text, "meshward_ca_signing_duration_seconds_count 1").is_some(),
            "{text}"
        );
        assert_eq!(
            line(&text, "meshward_ca_agents "),
            Some("meshward_ca_agents 4")
        );
        assert_eq!(
            line(&text, "meshward_ca_authority_expiry_seconds "),
            Some("meshward_ca_authority_expiry_seconds 3600.0")
        );
        assert!(
            line(&text, "meshward_ca_attestations_total{result=\"ok\"} 1").is_some(),
            "{text}"
        );
    }

    #[test]
    fn every_refusal_reason_is_exported_from_the_start() {
        let text = CaMetrics::new().encode();
        for reason in IssueError::CODES {
            let line = format!("meshward_ca_svids_refused_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing from {text}");
        }
    }

    #[test]
    fn an_expired_authority_shows_negative_time_left() {
        let m = CaMetrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        m.set_authority_expiry(now - Duration::from_secs(10), now);
        assert!(
            m.encode()
                .contains("meshward_ca_authority_expiry_seconds -10.0"),
            "{}",
            m.encode()
        );
    }
}
