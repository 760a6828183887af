//! Every issuance rule of the CA (DESIGN §2–3): node attestation by join token, agent renewal and
//! authorization, batched workload X.509-SVID minting, JWT-SVID minting, and an agent's entries.
//!
//! What the CA signs, it decides alone: the SAN, key usage and lifetime come from here, never from the
//! CSR. A CSR that *asks* for something else (CA:true, two URI SANs, another URI) is refused loudly
//! (Consul CVE-2022-40716). A workload identity is signed only if it is in the trust domain, is not the
//! trust domain's own ID, is not under the reserved `/meshward/` path (agents and the CA), and an entry
//! entitles it on the asking agent's node (or on any node). The agent itself must be known, not
//! evicted, presenting its current SVID, and not expired — checked again at every call.
//!
//! Every signed SVID gets a journal row (SQLite, one transaction per batch) and an `issuance` audit
//! record; every refusal from an authenticated agent, and every refused join token, gets an audit
//! record too. Audit appends only copy into the log's batch: the log `fsync`s in the background.
//!
//! All calls are synchronous (SQLite and ECDSA): call them from `tokio::task::spawn_blocking`.

mod error;
mod record;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::audit::AuditLog;
use meshward_identity::jwt::{JwtError, JwtSvid};
use meshward_identity::x509::{
    AuthorityError as X509AuthorityError, CsrError, DEFAULT_SVID_TTL, KeyError, MAX_SVID_TTL,
    MIN_SVID_TTL, SignedSvid, VerifiedCsr, verify_csr,
};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;

use crate::datastore::{Admission, AgentError, Datastore, Entry, Issued, NewAgent, TokenError};
use crate::k8s::NodePods;
use crate::keystore::{Keystore, SigningState};
pub use error::IssueError;
use error::{agent_error, internal, same_error};
use record::{Outcome, SvidKind};

/// The reserved first path segment: agents and the CA live under it, workloads never do.
pub const RESERVED_SEGMENT: &str = "meshward";

/// Default lifetime of an agent SVID.
pub const DEFAULT_AGENT_SVID_TTL: Duration = Duration::from_secs(60 * 60);

/// Default lifetime of a JWT-SVID.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(5 * 60);

/// Default cap on the requests of one `mint_x509` batch.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Lifetimes and limits of issuance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Workload SVID lifetime when neither the request nor the entry names one (`--svid-ttl`).
    pub svid_ttl: Duration,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// JWT-SVID lifetime when the request names none.
    pub jwt_ttl: Duration,
    /// Most requests in one `mint_x509` batch.
    pub max_batch: usize,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        Self {
            svid_ttl: DEFAULT_SVID_TTL,
            agent_svid_ttl: DEFAULT_AGENT_SVID_TTL,
            jwt_ttl: DEFAULT_JWT_TTL,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// An agent the mTLS layer authenticated and [`Issuer::authorize_agent`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID (`spiffe://<td>/meshward/agent/...`).
    pub spiffe_id: SpiffeId,
    /// The node it speaks for.
    pub node: String,
    /// The serial of the agent SVID it presented (lower-case hex).
    pub serial: String,
}

/// A freshly signed X.509-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then the CA's intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial, lower-case hex.
    pub serial: String,
    /// `notAfter`.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One workload SVID asked for in a batch.
#[derive(Clone, PartialEq, Eq)]
pub struct SvidRequest {
    /// The SPIFFE ID wanted, as sent (parsed here).
    pub spiffe_id: String,
    /// DER PKCS#10 CSR for the workload's own key.
    pub csr: Vec<u8>,
    /// Lifetime wanted; `None` for the entry's, else the CA's default.
    pub ttl: Option<Duration>,
    /// Kubernetes mode: the attested pod, for the audit record.
    pub pod_uid: Option<String>,
}

impl std::fmt::Debug for SvidRequest {
    // Never log CSRs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidRequest")
            .field("spiffe_id", &self.spiffe_id)
            .field("csr_len", &self.csr.len())
            .field("ttl", &self.ttl)
            .field("pod_uid", &self.pod_uid)
            .finish()
    }
}

/// Signs SVIDs under the rules above; cheap to clone.
#[derive(Clone)]
pub struct Issuer {
    inner: Arc<Inner>,
}

struct Inner {
    keystore: Keystore,
    datastore: Datastore,
    audit: Arc<AuditLog>,
    config: IssuerConfig,
}

impl Issuer {
    /// An issuer signing with `keystore`'s active authority.
    pub fn new(
        keystore: Keystore,
        datastore: Datastore,
        audit: Arc<AuditLog>,
        config: IssuerConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                keystore,
                datastore,
                audit,
                config,
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &IssuerConfig {
        &self.inner.config
    }

    /// Node attestation by join token: spends the token and signs an agent SVID
    /// (`spiffe://<td>/meshward/agent/join/<node>`) for the key in `csr`.
    ///
    /// The CSR is checked before the token is spent, so a broken agent does not burn its token.
    pub fn attest_join_token(
        &self,
        token: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, IssueError> {
        let inner = &*self.inner;
        let csr = verify_csr(csr)?;
        // What can be refused without the node name is refused before the token is spent.
        if csr.requests_ca {
            return Err(CsrError::RequestsCa.into());
        }
        if csr.requested_uris.len() > 1 {
            return Err(CsrError::MultipleUriSans(csr.requested_uris.clone()).into());
        }
        let state = inner.keystore.current();
        let grant = match inner.datastore.consume_join_token(token, now) {
            Ok(grant) => grant,
            Err(TokenError::Datastore(e)) => return Err(internal("spend a join token", e)),
            Err(refusal) => {
                let error = IssueError::BadJoinToken(refusal);
                let resource = match &error {
                    IssueError::BadJoinToken(
                        TokenError::Expired { node, .. } | TokenError::AlreadyUsed { node, .. },
                    ) => agent_id(&state.trust_domain, node)
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                inner.audit(
                    Outcome::refused("", &resource, SvidKind::Agent, None, &error),
                    now,
                );
                return Err(error);
            }
        };
        let node = grant.node().to_owned();
        let id = agent_id(&state.trust_domain, &node)?;
        let refuse = |error: IssueError| {
            inner.audit(
                Outcome::refused("", id.as_str(), SvidKind::Agent, None, &error),
                now,
            );
            error
        };
        csr.check_for(&id).map_err(|e| refuse(e.into()))?;
        let signed = sign(&state, &csr, &id, inner.config.agent_svid_ttl, now).map_err(&refuse)?;
        let new_agent = NewAgent {
            spiffe_id: id.clone(),
            admission: Admission::JoinToken(grant),
            serial: signed.serial.clone(),
            expires_at: signed.not_after,
        };
        match inner.datastore.record_attested_agent(&new_agent, now) {
            Ok(_) => {}
            Err(AgentError::Evicted { .. }) => {
                return Err(refuse(IssueError::AgentEvicted { id: id.to_string() }));
            }
            Err(e) => return Err(internal("record an attested agent", e)),
        }
        // The agent row goes first so a refused (evicted) agent leaves no journal row. If journaling
        // fails now, the row names an SVID nobody holds: harmless, and the node needs a new token,
        // as it would after any failed attestation.
        inner.journal_agent_svid(&state, &signed, &node, now)?;
        inner.audit_checked(
            Outcome::issued(id.as_str(), &signed, SvidKind::Agent, None),
            now,
        )?;
        tracing::info!(agent = %id, node = %node, serial = %signed.serial, "agent attested with a join token");
        Ok(issued(signed))
    }

    /// Kubernetes node attestation, after [`crate::k8s::Cluster::attest_psat`] verified the agent's
    /// token and found its pod on `node`: signs the agent SVID
    /// (`spiffe://<td>/meshward/agent/k8s_psat/<cluster>/<node>`) for the key in `csr`.
    pub fn attest_k8s_psat(
        &self,
        cluster: &str,
        node: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, IssueError> {
        let inner = &*self.inner;
        let state = inner.keystore.current();
        let id = crate::k8s::agent_id(&state.trust_domain, cluster, node)
            .map_err(|e| internal("build the agent spiffe id", e))?;
        let refuse = |error: IssueError| {
            inner.audit(
                Outcome::refused("", id.as_str(), SvidKind::Agent, None, &error),
                now,
            );
            error
        };
        let csr = verify_csr(csr).map_err(|e| refuse(e.into()))?;
        csr.check_for(&id).map_err(|e| refuse(e.into()))?;
        let signed = sign(&state, &csr, &id, inner.config.agent_svid_ttl, now).map_err(&refuse)?;
        let new_agent = NewAgent {
            spiffe_id: id.clone(),
            admission: Admission::K8sPsat {
                node: node.to_owned(),
            },
            serial: signed.serial.clone(),
            expires_at: signed.not_after,
        };
        match inner.datastore.record_attested_agent(&new_agent, now) {
            Ok(_) => {}
            Err(AgentError::Evicted { .. }) => {
                return Err(refuse(IssueError::AgentEvicted { id: id.to_string() }));
            }
            Err(e) => return Err(internal("record an attested agent", e)),
        }
        inner.journal_agent_svid(&state, &signed, node, now)?;
        inner.audit_checked(
            Outcome::issued(id.as_str(), &signed, SvidKind::Agent, None),
            now,
        )?;
        tracing::info!(agent = %id, node, serial = %signed.serial, "agent attested with a kubernetes psat");
        Ok(issued(signed))
    }

    /// Checks the caller of an mTLS call: `peer` (from its verified certificate) must be an agent ID of
    /// this trust domain, known, not evicted, presenting its current SVID (`serial`), and not expired.
    pub fn authorize_agent(
        &self,
        peer: &SpiffeId,
        serial: &str,
        now: SystemTime,
    ) -> Result<AgentIdentity, IssueError> {
        let state = self.inner.keystore.current();
        self.inner.authorize(&state, peer, serial, now)
    }

    /// Signs a new agent SVID for `agent`'s new key. It is pending until the agent first presents it;
    /// from then on the SVID `agent` presented here no longer works (see `datastore::agents`).
    pub fn renew_agent(
        &self,
        agent: &AgentIdentity,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedSvid, IssueError> {
        let inner = &*self.inner;
        let state = inner.keystore.current();
        // Checked before signing so a refused agent costs no signature; checked again atomically below.
        let agent = inner.authorize(&state, &agent.spiffe_id, &agent.serial, now)?;
        let refuse = |error: IssueError| {
            inner.audit(
                Outcome::refused(
                    agent.spiffe_id.as_str(),
                    agent.spiffe_id.as_str(),
                    SvidKind::Agent,
                    None,
                    &error,
                ),
                now,
            );
            error
        };
        let csr = verify_csr(csr).map_err(|e| refuse(e.into()))?;
        csr.check_for(&agent.spiffe_id)
            .map_err(|e| refuse(e.into()))?;
        let signed = sign(
            &state,
            &csr,
            &agent.spiffe_id,
            inner.config.agent_svid_ttl,
            now,
        )
        .map_err(&refuse)?;
        // Journal first: an SVID that is pending in the agent row must be in the journal (root
        // retirement reads it). The other way round, a failed renewal leaves a journal row for an
        // SVID never handed out, which only delays a root's retirement.
        inner.journal_agent_svid(&state, &signed, &agent.node, now)?;
        inner
            .datastore
            .renew_agent(
                &agent.spiffe_id,
                &agent.serial,
                &signed.serial,
                signed.not_after,
                now,
            )
            .map_err(|e| refuse(agent_error(e, &agent.spiffe_id)))?;
        // If this fails the agent gets no answer; its current SVID still works and it renews again.
        // A failed audit log refuses every later record anyway, so the CA is unusable until fixed.
        inner.audit_checked(
            Outcome::issued(agent.spiffe_id.as_str(), &signed, SvidKind::Agent, None),
            now,
        )?;
        tracing::info!(agent = %agent.spiffe_id, serial = %signed.serial, "agent svid renewed");
        Ok(issued(signed))
    }

    /// Signs a batch of workload SVIDs for `agent`; one result per request, in order.
    ///
    /// The agent is re-checked once, the node's entries read once, the journal written in one
    /// transaction: the per-SVID cost is the CSR check and the signature.
    pub fn mint_x509(
        &self,
        agent: &AgentIdentity,
        requests: &[SvidRequest],
        now: SystemTime,
    ) -> Vec<Result<IssuedSvid, IssueError>> {
        self.mint_x509_with_pods(agent, requests, None, now)
    }

    /// [`Self::mint_x509`] for a Kubernetes-attested agent: besides entries, `spiffe://<td>/ns/<ns>/sa/<sa>`
    /// is entitled while `pods` (listed from the cluster for the agent's node just now) holds a running
    /// pod of that service account — the one named by a request's `pod_uid`, if set. Pods listed for
    /// another node than the agent's entitle nothing.
    pub fn mint_x509_with_pods(
        &self,
        agent: &AgentIdentity,
        requests: &[SvidRequest],
        pods: Option<&NodePods>,
        now: SystemTime,
    ) -> Vec<Result<IssuedSvid, IssueError>> {
        let inner = &*self.inner;
        let max = inner.config.max_batch;
        if requests.len() > max {
            tracing::warn!(agent = %agent.spiffe_id, count = requests.len(), max, "mint batch over the limit refused");
            return requests
                .iter()
                .map(|_| {
                    Err(IssueError::TooManyRequests {
                        count: requests.len(),
                        max,
                    })
                })
                .collect();
        }
        let state = inner.keystore.current();
        let principal = agent.spiffe_id.as_str();
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(requests.len());

        let checked = inner
            .authorize(&state, &agent.spiffe_id, &agent.serial, now)
            .and_then(|agent| {
                let entitlements = inner
                    .datastore
                    .entries_for_node(&agent.node)
                    .map_err(|e| internal("read the node's entries", e))?;
                Ok((agent, Entitlements::new(&entitlements)))
            });
        let (agent, entitlements) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                // The whole batch fails the same way; each request is still audited on its own.
                let results = requests
                    .iter()
                    .map(|req| {
                        let copy = same_error(&error);
                        outcomes.push(Outcome::refused(
                            principal,
                            &req.spiffe_id,
                            SvidKind::X509,
                            req.pod_uid.as_deref(),
                            &copy,
                        ));
                        Err(copy)
                    })
                    .collect();
                inner.audit_all(outcomes, now);
                return results;
            }
        };

        let mut results: Vec<Result<IssuedSvid, IssueError>> = Vec::with_capacity(requests.len());
        let mut journal: Vec<Issued> = Vec::with_capacity(requests.len());
        for req in requests {
            match inner.mint_one(&state, &agent, &entitlements, pods, req, now) {
                Ok(signed) => {
                    journal.push(Issued {
                        serial: signed.serial.clone(),
                        spiffe_id: signed.spiffe_id.clone(),
                        agent: Some(agent.spiffe_id.clone()),
                        node: agent.node.clone(),
                        pod: req.pod_uid.clone(),
                        authority: state.authority_id.clone(),
                        not_after: signed.not_after,
                        issued_at: now,
                    });
                    outcomes.push(Outcome::issued(
                        principal,
                        &signed,
                        SvidKind::X509,
                        req.pod_uid.as_deref(),
                    ));
                    results.push(Ok(issued(signed)));
                }
                Err(error) => {
                    outcomes.push(Outcome::refused(
                        principal,
                        &req.spiffe_id,
                        SvidKind::X509,
                        req.pod_uid.as_deref(),
                        &error,
                    ));
                    results.push(Err(error));
                }
            }
        }

        if let Err(e) = inner.datastore.record_issued_batch(&journal) {
            // Nothing signed may leave without its journal row (root retirement relies on it).
            tracing::error!(agent = %agent.spiffe_id, error = %e, count = journal.len(), "could not journal a batch; refusing it");
            let reason = e.to_string();
            for (result, outcome) in results.iter_mut().zip(outcomes.iter_mut()) {
                if result.is_ok() {
                    let error = IssueError::Internal {
                        doing: "journal issued svids",
                        reason: reason.clone(),
                    };
                    *outcome = outcome.clone().into_refused(&error);
                    *result = Err(error);
                }
            }
        }
        if let Err(error) = inner.audit_all_checked(outcomes, now) {
            // An issuance without its audit record must not happen: fail closed.
            return results
                .into_iter()
                .map(|r| match r {
                    Ok(_) => Err(same_error(&error)),
                    Err(e) => Err(e),
                })
                .collect();
        }
        results
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl` (else the configured default);
    /// returns the token and its expiry.
    pub fn mint_jwt(
        &self,
        agent: &AgentIdentity,
        spiffe_id: &str,
        audience: &[String],
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<(String, SystemTime), IssueError> {
        self.mint_jwt_with_pods(agent, spiffe_id, audience, ttl, None, now)
    }

    /// [`Self::mint_jwt`] for a Kubernetes-attested agent, entitled by `pods` as in
    /// [`Self::mint_x509_with_pods`].
    pub fn mint_jwt_with_pods(
        &self,
        agent: &AgentIdentity,
        spiffe_id: &str,
        audience: &[String],
        ttl: Option<Duration>,
        pods: Option<&NodePods>,
        now: SystemTime,
    ) -> Result<(String, SystemTime), IssueError> {
        let inner = &*self.inner;
        let state = inner.keystore.current();
        let principal = agent.spiffe_id.as_str();
        let refuse = |error: IssueError| {
            inner.audit(
                Outcome::refused(principal, spiffe_id, SvidKind::Jwt, None, &error),
                now,
            );
            error
        };
        let agent = inner
            .authorize(&state, &agent.spiffe_id, &agent.serial, now)
            .map_err(&refuse)?;
        let id = workload_id(&state.trust_domain, spiffe_id).map_err(&refuse)?;
        let entitled = inner
            .datastore
            .is_entitled(&agent.node, &id)
            .map_err(|e| refuse(internal("check an entitlement", e)))?
            || pods_entitle(pods, &agent, &id, None);
        if !entitled {
            return Err(refuse(IssueError::NotEntitled {
                id: id.to_string(),
                node: agent.node.clone(),
            }));
        }
        let ttl = check_ttl(ttl.unwrap_or(inner.config.jwt_ttl)).map_err(&refuse)?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(refuse(IssueError::BadAudience));
        }
        let token = JwtSvid::mint(&state.jwt_key, &id, audience, ttl, now).map_err(|e| {
            refuse(match e {
                JwtError::EmptyAudience => IssueError::BadAudience,
                e => internal("sign a jwt-svid", e),
            })
        })?;
        // `exp` is whole seconds after `iat`, which is `now` truncated.
        let expiry = truncate_to_seconds(now)
            .checked_add(Duration::from_secs(ttl.as_secs()))
            .unwrap_or(now);
        inner.audit_checked(Outcome::issued_jwt(principal, &id, expiry, audience), now)?;
        Ok((token, expiry))
    }

    /// The entries `agent`'s node is entitled to: its own and every any-node entry.
    pub fn entries_for(&self, agent: &AgentIdentity) -> Result<Vec<Entry>, IssueError> {
        self.inner
            .datastore
            .entries_for_node(&agent.node)
            .map_err(|e| internal("read the node's entries", e))
    }
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

// --- internals ------------------------------------------------------------------------------------

impl Inner {
    fn authorize(
        &self,
        state: &SigningState,
        peer: &SpiffeId,
        serial: &str,
        now: SystemTime,
    ) -> Result<AgentIdentity, IssueError> {
        let is_agent_id = peer.is_member_of(&state.trust_domain) && {
            let mut segments = peer.segments();
            segments.next() == Some(RESERVED_SEGMENT) && segments.next() == Some("agent")
        };
        if !is_agent_id {
            return Err(IssueError::NotAgent {
                id: peer.to_string(),
            });
        }
        let node = self
            .datastore
            .agent_may_mint(peer, serial, now)
            .map_err(|e| agent_error(e, peer))?;
        Ok(AgentIdentity {
            spiffe_id: peer.clone(),
            node,
            serial: serial.to_owned(),
        })
    }

    /// Every rule for one workload SVID, cheapest first; signs if all pass.
    fn mint_one(
        &self,
        state: &SigningState,
        agent: &AgentIdentity,
        entitlements: &Entitlements,
        pods: Option<&NodePods>,
        req: &SvidRequest,
        now: SystemTime,
    ) -> Result<SignedSvid, IssueError> {
        let id = workload_id(&state.trust_domain, &req.spiffe_id)?;
        let entry_ttl = match entitlements.get(&id) {
            Some(entry_ttl) => entry_ttl,
            None if pods_entitle(pods, agent, &id, req.pod_uid.as_deref()) => None,
            None => {
                return Err(IssueError::NotEntitled {
                    id: id.to_string(),
                    node: agent.node.clone(),
                });
            }
        };
        let ttl = check_ttl(req.ttl.or(entry_ttl).unwrap_or(self.config.svid_ttl))?;
        let csr = verify_csr(&req.csr)?;
        csr.check_for(&id)?;
        sign(state, &csr, &id, ttl, now)
    }

    /// Journals an agent's own SVID (no asking agent, no pod).
    fn journal_agent_svid(
        &self,
        state: &SigningState,
        signed: &SignedSvid,
        node: &str,
        now: SystemTime,
    ) -> Result<(), IssueError> {
        let row = Issued {
            serial: signed.serial.clone(),
            spiffe_id: signed.spiffe_id.clone(),
            agent: None,
            node: node.to_owned(),
            pod: None,
            authority: state.authority_id.clone(),
            not_after: signed.not_after,
            issued_at: now,
        };
        self.datastore
            .record_issued_batch(std::slice::from_ref(&row))
            .map_err(|e| internal("journal an issued svid", e))
    }

    /// Appends a refusal record; a failing audit log is logged (the refusal stands either way).
    fn audit(&self, outcome: Outcome, now: SystemTime) {
        if let Err(e) = self.audit.append(outcome.into_event(now)) {
            tracing::error!(error = %e, "could not write an issuance audit record");
        }
    }

    fn audit_all(&self, outcomes: Vec<Outcome>, now: SystemTime) {
        for outcome in outcomes {
            self.audit(outcome, now);
        }
    }

    /// Appends a record whose success gates handing out an SVID.
    fn audit_checked(&self, outcome: Outcome, now: SystemTime) -> Result<(), IssueError> {
        self.audit
            .append(outcome.into_event(now))
            .map(|_| ())
            .map_err(|e| internal("write the issuance audit record", e))
    }

    fn audit_all_checked(&self, outcomes: Vec<Outcome>, now: SystemTime) -> Result<(), IssueError> {
        let mut first_error = None;
        for outcome in outcomes {
            if let Err(e) = self.audit_checked(outcome, now) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => {
                tracing::error!(error = %e, "could not write issuance audit records; refusing the batch");
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// The entitlements of one node, read once per batch: SPIFFE ID -> the lifetime its entries ask for.
struct Entitlements(HashMap<String, Option<Duration>>);

impl Entitlements {
    fn new(entries: &[Entry]) -> Self {
        let mut map: HashMap<String, Option<Duration>> = HashMap::with_capacity(entries.len());
        for entry in entries {
            let ttl = entry.ttl();
            map.entry(entry.spiffe_id.as_str().to_owned())
                .and_modify(|current| {
                    // Several entries for one identity: the shortest lifetime any of them asks for.
                    *current = match (*current, ttl) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                })
                .or_insert(ttl);
        }
        Self(map)
    }

    /// `None` if not entitled; else the entry's lifetime, if it names one.
    fn get(&self, id: &SpiffeId) -> Option<Option<Duration>> {
        self.0.get(id.as_str()).copied()
    }
}

/// Parses a requested workload identity and checks it may be issued at all (before any entitlement).
fn workload_id(td: &TrustDomain, requested: &str) -> Result<SpiffeId, IssueError> {
    let id = SpiffeId::parse(requested).map_err(|e| IssueError::BadSpiffeId {
        id: requested.to_owned(),
        reason: e.to_string(),
    })?;
    if !id.is_member_of(td) {
        return Err(IssueError::OutsideTrustDomain {
            id: id.to_string(),
            trust_domain: td.clone(),
        });
    }
    if id.is_trust_domain_id() {
        return Err(IssueError::NotWorkloadId {
            id: id.to_string(),
            reason: "it has no path and names the trust domain, which only signing certificates carry",
        });
    }
    // An entry for `/meshward/...` is refused by the datastore; refusing here too means a hand-edited
    // database still cannot make a workload an agent (which would let it attest as a node).
    if id.segments().next() == Some(RESERVED_SEGMENT) {
        return Err(IssueError::NotWorkloadId {
            id: id.to_string(),
            reason: "paths under `/meshward/` are reserved for meshward's agents and ca",
        });
    }
    Ok(id)
}

/// The agent ID of a join-token node.
fn agent_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, IssueError> {
    td.workload_id(&[RESERVED_SEGMENT, "agent", "join", node])
        .map_err(|e| internal("build the agent spiffe id", e))
}

/// Whether the cluster's running pods entitle `id` on `agent`'s node (only pods of that very node count).
fn pods_entitle(
    pods: Option<&NodePods>,
    agent: &AgentIdentity,
    id: &SpiffeId,
    pod_uid: Option<&str>,
) -> bool {
    pods.is_some_and(|pods| pods.node() == agent.node && pods.entitles(id, pod_uid))
}

fn check_ttl(ttl: Duration) -> Result<Duration, IssueError> {
    if (MIN_SVID_TTL..=MAX_SVID_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(IssueError::BadTtl { ttl })
    }
}

fn sign(
    state: &SigningState,
    csr: &VerifiedCsr,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<SignedSvid, IssueError> {
    state
        .authority
        .sign_svid(&csr.public_key_der, id, ttl, now)
        .map_err(|e| match e {
            // The CSR's key was already proven P-256; keep the reason precise anyway.
            X509AuthorityError::Key(KeyError::UnsupportedAlgorithm { algorithm }) => {
                IssueError::BadCsr(CsrError::Key(KeyError::UnsupportedAlgorithm { algorithm }))
            }
            X509AuthorityError::TtlOutOfBounds { ttl, .. } => IssueError::BadTtl { ttl },
            e => internal("sign an svid", e),
        })
}

fn issued(signed: SignedSvid) -> IssuedSvid {
    IssuedSvid {
        spiffe_id: signed.spiffe_id,
        chain: signed.chain,
        serial: signed.serial,
        not_after: signed.not_after,
    }
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(t)
}
