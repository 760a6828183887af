//! One audit record per decision, through identity's hash-chained [`AuditLog`].
//!
//! Records hold only bounded facts: the method, the normalized path (or, for a refused path,
//! the raw one, capped by the log), the host, the source IP and the TLS facts — never a header
//! dump. Appending is cheap (the log batches its `fsync`s); if it fails the caller fails closed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::audit::{
    AuditDecision, AuditError, AuditEvent, AuditLog, Mode as AuditMode, RecordId,
};
use serde_json::{Map, Value};

use crate::authz::{Decision, Mode, TlsFacts};

/// Writes authorization records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditSink {
    log: Arc<AuditLog>,
}

/// What the decision saw, for its record.
#[derive(Debug, Clone, Copy)]
pub struct DecisionFacts<'a> {
    /// The caller's SPIFFE ID.
    pub principal: &'a str,
    /// The Cedar action (`GET`, `connect`), or the method as sent if it is not one.
    pub action: &'a str,
    /// Our SPIFFE ID.
    pub resource: &'a str,
    /// The normalized path, or the raw target when it was refused; `None` for TCP.
    pub path: Option<&'a str>,
    /// The normalized host, or the raw one when it was refused.
    pub host: &'a str,
    /// The caller's address.
    pub source_ip: IpAddr,
    /// The TLS session's facts.
    pub tls: &'a TlsFacts,
}

impl AuditSink {
    /// Writes to `log`.
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self { log }
    }

    /// Appends the record of `decision` and returns its id (named in a 403 body).
    pub fn record(
        &self,
        facts: &DecisionFacts<'_>,
        decision: &Decision,
        latency: Duration,
    ) -> Result<RecordId, AuditError> {
        let mut event = AuditEvent::new(
            if decision.allowed {
                AuditDecision::Allow
            } else {
                AuditDecision::Deny
            },
            facts.principal,
            facts.action,
            facts.resource,
        );
        event.context = context(facts);
        event.policies = decision.policies.clone();
        event.errors = decision.errors.clone();
        event.mode = match decision.mode {
            Mode::Enforce => AuditMode::Enforce,
            Mode::DryRun => AuditMode::DryRun,
        };
        event.latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.log.append(event).map(|r| r.id)
    }

    /// Writes and syncs every record so far (on shutdown).
    pub fn sync(&self) -> Result<(), AuditError> {
        self.log.sync()
    }
}

fn context(facts: &DecisionFacts<'_>) -> Map<String, Value> {
    let mut tls = Map::with_capacity(3);
    tls.insert("version".into(), facts.tls.version.clone().into());
    tls.insert("cipher".into(), facts.tls.cipher.clone().into());
    tls.insert("alpn".into(), facts.tls.alpn.clone().into());
    let mut context = Map::with_capacity(5);
    let method = if facts.path.is_some() {
        facts.action
    } else {
        ""
    };
    context.insert("method".into(), method.into());
    context.insert("path".into(), facts.path.unwrap_or("").into());
    context.insert("host".into(), facts.host.into());
    context.insert("sourceIp".into(), facts.source_ip.to_string().into());
    context.insert("tls".into(), Value::Object(tls));
    context
}
