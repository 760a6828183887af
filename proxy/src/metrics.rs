//! The proxy's Prometheus metrics, declared once here; label sets are bounded (no paths, no peers).
//!
//! Decision counters are resolved once at start-up for every (action, decision, mode), so
//! counting a decision is one atomic add, not a label-map lookup.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::authz::Action;
use crate::authz::Mode;
use crate::policy_store::PolicyMetrics;

/// Why a TLS connection failed; the `reason` label of `meshward_proxy_tls_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The peer did not finish the handshake in time.
    HandshakeTimeout,
    /// The peer sent no client certificate.
    NoCertificate,
    /// The peer's trust domain is not accepted (or has no bundle).
    UnknownTrustDomain,
    /// The peer's certificate (or its chain) expired or is not yet valid.
    Expired,
    /// The chain does not lead to a trusted root, or a signature is bad.
    Untrusted,
    /// The certificate is not a valid X.509-SVID (SANs, key usage, CA as leaf).
    BadCertificate,
    /// The peer's SPIFFE ID is not the expected one (outbound).
    WrongPeer,
    /// Any other TLS or transport failure during the handshake.
    Protocol,
    /// No SVID is held yet, so no handshake can be made.
    NoSvid,
}

/// The proxy's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    registry: Arc<Registry>,
    // Indexed by `decision_index`.
    decisions: Arc<Vec<Counter>>,
    decision_duration: Histogram,
    tls_failures: Family<TlsFailureLabels, Counter>,
    svid_expiry: Gauge<f64, AtomicU64>,
    upstream_failures: Family<DirectionLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    decision: &'static str,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsFailureLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// The action label of a request whose method is not in the schema.
const OTHER_ACTION: &str = "other";
const ACTION_LABELS: usize = Action::ALL.len() + 1;

impl ProxyMetrics {
    /// Registers every metric, with the policy store's, on a fresh registry.
    pub fn new(policy: &PolicyMetrics) -> Self {
        let mut registry = Registry::default();
        let decision_family = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "meshward_proxy_decisions",
            "Authorization decisions, by action, outcome and mode (enforce or dry-run)",
            decision_family.clone(),
        );
        let mut decisions = Vec::with_capacity(ACTION_LABELS * 4);
        for action in 0..ACTION_LABELS {
            let action_label = Action::ALL.get(action).map_or(OTHER_ACTION, |a| a.as_str());
            for mode in [Mode::Enforce, Mode::DryRun] {
                for allowed in [true, false] {
                    let labels = DecisionLabels {
                        action: action_label,
                        decision: if allowed { "allow" } else { "deny" },
                        mode: mode_label(mode),
                    };
                    decisions.push(decision_family.get_or_create(&labels).clone());
                }
            }
        }
        let decision_duration = Histogram::new(exponential_buckets(1e-6, 2.0, 20));
        registry.register(
            "meshward_proxy_decision_duration_seconds",
            "Time to decide one request (Cedar evaluation of the enforced set)",
            decision_duration.clone(),
        );
        let tls_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            "meshward_proxy_tls_failures",
            "TLS connections refused or failed, by reason",
            tls_failures.clone(),
        );
        let svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "meshward_proxy_svid_expiry_seconds",
            "When the proxy's current SVID expires, as unix seconds (0 before the first SVID)",
            svid_expiry.clone(),
        );
        let upstream_failures = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "meshward_proxy_upstream_failures",
            "Requests that could not reach the local app (inbound) or the upstream (outbound)",
            upstream_failures.clone(),
        );
        policy.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            decisions: Arc::new(decisions),
            decision_duration,
            tls_failures,
            svid_expiry,
            upstream_failures,
        }
    }

    /// Counts one decision; `action` is `None` for a method outside the schema.
    pub fn decision(&self, action: Option<Action>, mode: Mode, allowed: bool) {
        if let Some(counter) = self.decisions.get(decision_index(action, mode, allowed)) {
            counter.inc();
        }
    }

    /// Records how long a decision took.
    pub fn decision_duration(&self, took: Duration) {
        self.decision_duration.observe(took.as_secs_f64());
    }

    /// Counts a failed TLS connection.
    pub fn tls_failure(&self, reason: TlsFailure) {
        self.tls_failures
            .get_or_create(&TlsFailureLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a request that could not be forwarded; `inbound` says which way.
    pub fn upstream_failure(&self, inbound: bool) {
        let direction = if inbound { "inbound" } else { "outbound" };
        self.upstream_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Sets the current SVID's expiry.
    pub fn set_svid_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.svid_expiry.set(secs);
    }

    /// The metrics in the Prometheus / OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl TlsFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::HandshakeTimeout => "handshake_timeout",
            TlsFailure::NoCertificate => "no_certificate",
            TlsFailure::UnknownTrustDomain => "unknown_trust_domain",
            TlsFailure::Expired => "expired",
            TlsFailure::Untrusted => "untrusted",
            TlsFailure::BadCertificate => "bad_certificate",
            TlsFailure::WrongPeer => "wrong_peer",
            TlsFailure::Protocol => "protocol",
            TlsFailure::NoSvid => "no_svid",
        }
    }
}

fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::DryRun => "dry-run",
    }
}

fn decision_index(action: Option<Action>, mode: Mode, allowed: bool) -> usize {
    let action = action
        .and_then(|a| Action::ALL.iter().position(|x| *x == a))
        .unwrap_or(Action::ALL.len());
    let mode = match mode {
        Mode::Enforce => 0,
        Mode::DryRun => 1,
    };
    action * 4 + mode * 2 + usize::from(!allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_under_their_labels() {
        let metrics = ProxyMetrics::new(&PolicyMetrics::default());
        metrics.decision(Some(Action::Get), Mode::Enforce, true);
        metrics.decision(Some(Action::Delete), Mode::DryRun, false);
        metrics.decision(None, Mode::Enforce, false);
        metrics.tls_failure(TlsFailure::Expired);
        let text = metrics.encode();
        for line in [
            r#"meshward_proxy_decisions_total{action="GET",decision="allow",mode="enforce"} 1"#,
            r#"meshward_proxy_decisions_total{action="DELETE",decision="deny",mode="dry-run"} 1"#,
            r#"meshward_proxy_decisions_total{action="other",decision="deny",mode="enforce"} 1"#,
            r#"meshward_proxy_decisions_total{action="GET",decision="deny",mode="enforce"} 0"#,
            r#"meshward_proxy_tls_failures_total{reason="expired"} 1"#,
            "meshward_proxy_policy_reloads_total 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
