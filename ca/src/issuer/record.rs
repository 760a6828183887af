//! The audit record of one issuance decision (`kind: issuance`, DESIGN §4 "Audit record").

use std::time::SystemTime;

use meshward_identity::SpiffeId;
use meshward_identity::audit::{AuditDecision, AuditEvent, Timestamp};
use meshward_identity::x509::SignedSvid;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::IssueError;

/// The audit `action` of every issuance record.
pub(super) const ACTION: &str = "issue";

/// What was (or would have been) issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SvidKind {
    /// An agent's own X.509-SVID (attestation or renewal).
    Agent,
    /// A workload X.509-SVID.
    X509,
    /// A workload JWT-SVID.
    Jwt,
}

impl SvidKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

/// One issuance decision, collected during a batch and turned into an [`AuditEvent`] after it.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    decision: AuditDecision,
    principal: String,
    resource: String,
    kind: SvidKind,
    pod: Option<String>,
    serial: Option<String>,
    not_after: Option<SystemTime>,
    code: Option<&'static str>,
    error: Option<String>,
    audience: Vec<String>,
}

impl Outcome {
    /// An X.509-SVID signed for `principal` (the asking agent; the agent itself for its own SVID).
    pub(super) fn issued(
        principal: &str,
        signed: &SignedSvid,
        kind: SvidKind,
        pod: Option<&str>,
    ) -> Self {
        Self {
            decision: AuditDecision::Issued,
            principal: principal.to_owned(),
            resource: signed.spiffe_id.as_str().to_owned(),
            kind,
            pod: pod.map(str::to_owned),
            serial: Some(signed.serial.clone()),
            not_after: Some(signed.not_after),
            code: None,
            error: None,
            audience: Vec::new(),
        }
    }

    /// A JWT-SVID signed for `principal`.
    pub(super) fn issued_jwt(
        principal: &str,
        id: &SpiffeId,
        expiry: SystemTime,
        audience: &[String],
    ) -> Self {
        Self {
            decision: AuditDecision::Issued,
            principal: principal.to_owned(),
            resource: id.as_str().to_owned(),
            kind: SvidKind::Jwt,
            pod: None,
            serial: None,
            not_after: Some(expiry),
            code: None,
            error: None,
            audience: audience.to_vec(),
        }
    }

    /// A refusal of `resource` (the identity asked for, as sent) to `principal`.
    pub(super) fn refused(
        principal: &str,
        resource: &str,
        kind: SvidKind,
        pod: Option<&str>,
        error: &IssueError,
    ) -> Self {
        Self {
            decision: AuditDecision::Refused,
            principal: principal.to_owned(),
            resource: resource.to_owned(),
            kind,
            pod: pod.map(str::to_owned),
            serial: None,
            not_after: None,
            code: Some(error.code()),
            error: Some(error.to_string()),
            audience: Vec::new(),
        }
    }

    /// This outcome turned into a refusal (a signed SVID that could not be journaled).
    pub(super) fn into_refused(self, error: &IssueError) -> Self {
        Self {
            decision: AuditDecision::Refused,
            serial: None,
            not_after: None,
            code: Some(error.code()),
            error: Some(error.to_string()),
            ..self
        }
    }

    /// The audit event, timestamped `now` (the issuer's clock).
    pub(super) fn into_event(self, now: SystemTime) -> AuditEvent {
        let mut event = AuditEvent::new(
            self.decision,
            self.principal.clone(),
            ACTION,
            self.resource.clone(),
        );
        event.ts = Timestamp::from(OffsetDateTime::from(now));
        let mut context = Map::new();
        context.insert("svid".to_owned(), Value::from(self.kind.as_str()));
        if let Some(code) = self.code {
            context.insert("code".to_owned(), Value::from(code));
        }
        if !self.audience.is_empty() {
            context.insert("audience".to_owned(), Value::from(self.audience));
        }
        event.context = context;
        if let Some(error) = self.error {
            event.errors = vec![error];
        }
        if self.decision == AuditDecision::Issued {
            event.spiffe_id = Some(self.resource);
        }
        event.serial = self.serial;
        event.not_after = self
            .not_after
            .map(|t| Timestamp::from(OffsetDateTime::from(t)));
        event.agent = (!self.principal.is_empty()).then_some(self.principal);
        event.pod = self.pod;
        event
    }
}
