//! The agent-facing `meshward.ca.v1.Ca` service: maps each call onto the [`Issuer`], and every domain
//! error onto a `tonic::Status` in one function, [`status`].
//!
//! Who is calling comes from the TLS layer (see [`crate::server::tls`]): tonic puts the connection's
//! [`PeerInfo`] into every request's extensions. `Attest` needs no client certificate; every other
//! call needs one that [`Issuer::authorize_agent`] accepts (a known, current, unevicted agent).
//! The issuer is synchronous (SQLite and signatures), so it runs on the blocking pool.

use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_server::Ca;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::datastore;
use crate::issuer::{AgentIdentity, IssueError, IssuedSvid, Issuer, SvidRequest};
use crate::k8s::{Cluster, K8sError, NodePods};
use crate::keystore::{Keystore, SigningState};
use crate::metrics::CaMetrics;
use crate::server::tls::{PeerInfo, VerifiedPeer};

/// How often agents should re-fetch the bundle if their stream breaks.
const REFRESH_HINT: Duration = Duration::from_secs(5 * 60);

/// The `Ca` service; cheap to clone.
#[derive(Clone)]
pub struct CaService {
    issuer: Issuer,
    keystore: Keystore,
    metrics: CaMetrics,
    max_batch: usize,
    shutdown: CancellationToken,
    cluster: Option<Cluster>,
}

/// The stream `WatchBundle` answers with.
pub type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::Bundle, Status>> + Send + 'static>>;

impl CaService {
    /// A service over `issuer`; `WatchBundle` streams end when `shutdown` fires, so a graceful
    /// shutdown is not held up by agents that never hang up.
    pub fn new(
        issuer: Issuer,
        keystore: Keystore,
        metrics: CaMetrics,
        max_batch: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            issuer,
            keystore,
            metrics,
            max_batch,
            shutdown,
            cluster: None,
        }
    }

    /// Kubernetes mode: `K8sPsat` attestations are verified against `cluster`, and its agents are
    /// entitled by the pods running on their node.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The running pods of a Kubernetes-attested agent's node, from the pod cache (a pod of `wanted`
    /// it has not seen is looked up live once); `None` for other agents. A cache not yet synced or
    /// an apiserver failure fails the call (closed) rather than minting from entries alone, so an
    /// agent retries instead of caching a refusal.
    async fn node_pods<'a>(
        &self,
        agent: &AgentIdentity,
        wanted: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Option<NodePods>, Status> {
        let Some(cluster) = self
            .cluster
            .as_ref()
            .filter(|_| crate::k8s::is_k8s_agent(&agent.spiffe_id))
        else {
            return Ok(None);
        };
        match cluster.node_pods_for(&agent.node, wanted).await {
            Ok(pods) => Ok(Some(pods)),
            Err(e @ K8sError::PodCache(_)) => {
                tracing::warn!(agent = %agent.spiffe_id, error = %e, "no pod answer yet");
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(agent = %agent.spiffe_id, error = %e, "could not list the node's pods");
                Err(Status::unavailable(
                    "the ca could not read the cluster's pods; retry shortly",
                ))
            }
        }
    }

    /// `Attest` with a Kubernetes PSAT: TokenReview and pod checks, then the agent SVID.
    async fn attest_psat(&self, token: String, csr: Vec<u8>) -> Result<IssuedSvid, Status> {
        let Some(cluster) = self.cluster.clone() else {
            self.metrics.attestation("unsupported");
            return Err(Status::failed_precondition(
                "kubernetes psat attestation is not enabled on this ca (start it with `--k8s`); attest with a join token",
            ));
        };
        let attested = match cluster.attest_psat(&token).await {
            Ok(attested) => attested,
            Err(e) => {
                self.metrics.attestation(e.code());
                return Err(k8s_status(&e));
            }
        };
        let issuer = self.issuer.clone();
        let started = Instant::now();
        let issued = blocking(move || {
            issuer.attest_k8s_psat(cluster.name(), &attested.node, &csr, SystemTime::now())
        })
        .await?;
        self.metrics.signing_took(started.elapsed());
        issued.map_err(|e| {
            self.metrics.attestation(e.code());
            status(&e, "Attest")
        })
    }

    /// The calling agent, authorized from its verified client certificate.
    async fn agent<T>(
        &self,
        request: &Request<T>,
        call: &'static str,
    ) -> Result<AgentIdentity, Status> {
        let peer = verified_peer(request)?;
        let issuer = self.issuer.clone();
        blocking(move || issuer.authorize_agent(&peer.spiffe_id, &peer.serial, SystemTime::now()))
            .await?
            .map_err(|e| status(&e, call))
    }
}

#[tonic::async_trait]
impl Ca for CaService {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        const CALL: &str = "Attest";
        let remote = request.extensions().get::<PeerInfo>().map(|i| i.remote);
        let pb::AttestRequest { attestation, csr } = request.into_inner();
        let token = match attestation {
            Some(pb::attest_request::Attestation::JoinToken(join)) => join.token,
            Some(pb::attest_request::Attestation::K8sPsat(psat)) => {
                let svid = self.attest_psat(psat.token, csr).await?;
                self.metrics.attestation("ok");
                self.metrics.issued(1);
                tracing::info!(agent = %svid.spiffe_id, serial = %svid.serial, ?remote, "agent attested");
                return Ok(Response::new(pb::AttestResponse {
                    svid: Some(svid_to_proto(&svid)),
                    bundle: Some(bundle_to_proto(&self.keystore.current())),
                }));
            }
            None => {
                self.metrics.attestation("malformed");
                return Err(Status::invalid_argument(
                    "attest request carries no attestation; send a join token",
                ));
            }
        };
        let issuer = self.issuer.clone();
        let started = Instant::now();
        let issued =
            blocking(move || issuer.attest_join_token(&token, &csr, SystemTime::now())).await?;
        self.metrics.signing_took(started.elapsed());
        match issued {
            Ok(svid) => {
                self.metrics.attestation("ok");
                self.metrics.issued(1);
                tracing::info!(agent = %svid.spiffe_id, serial = %svid.serial, ?remote, "agent attested");
                Ok(Response::new(pb::AttestResponse {
                    svid: Some(svid_to_proto(&svid)),
                    bundle: Some(bundle_to_proto(&self.keystore.current())),
                }))
            }
            Err(e) => {
                self.metrics.attestation(e.code());
                tracing::info!(?remote, reason = e.code(), "attestation refused");
                Err(status(&e, CALL))
            }
        }
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        const CALL: &str = "RenewAgent";
        let agent = self.agent(&request, CALL).await?;
        let csr = request.into_inner().csr;
        let issuer = self.issuer.clone();
        let started = Instant::now();
        let issued = blocking(move || issuer.renew_agent(&agent, &csr, SystemTime::now())).await?;
        self.metrics.signing_took(started.elapsed());
        match issued {
            Ok(svid) => {
                self.metrics.issued(1);
                Ok(Response::new(pb::RenewAgentResponse {
                    svid: Some(svid_to_proto(&svid)),
                }))
            }
            Err(e) => {
                self.metrics.refused(e.code());
                Err(status(&e, CALL))
            }
        }
    }

    async fn mint_x509_svids(
        &self,
        request: Request<pb::MintX509SvidsRequest>,
    ) -> Result<Response<pb::MintX509SvidsResponse>, Status> {
        const CALL: &str = "MintX509Svids";
        let agent = self.agent(&request, CALL).await?;
        let requests = request.into_inner().requests;
        if requests.len() > self.max_batch {
            return Err(Status::resource_exhausted(format!(
                "batch of `{}` svid requests is over the limit of `{}`; split it",
                requests.len(),
                self.max_batch
            )));
        }
        let requests = requests
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                Ok(SvidRequest {
                    ttl: ttl_from_proto(r.ttl_seconds)
                        .map_err(|e| Status::invalid_argument(format!("request `{index}`: {e}")))?,
                    spiffe_id: r.spiffe_id,
                    csr: r.csr,
                    pod_uid: non_empty(r.pod_uid),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let wanted = requests
            .iter()
            .map(|r| (r.spiffe_id.as_str(), r.pod_uid.as_deref()));
        let pods = self.node_pods(&agent, wanted).await?;
        let issuer = self.issuer.clone();
        let started = Instant::now();
        let results = blocking(move || {
            issuer.mint_x509_with_pods(&agent, &requests, pods.as_ref(), SystemTime::now())
        })
        .await?;
        self.metrics.signing_took(started.elapsed());
        let mut issued = 0;
        let results = results
            .iter()
            .map(|result| {
                let result = match result {
                    Ok(svid) => {
                        issued += 1;
                        pb::svid_result::Result::Svid(svid_to_proto(svid))
                    }
                    Err(e) => {
                        self.metrics.refused(e.code());
                        pb::svid_result::Result::Error(mint_error(e))
                    }
                };
                pb::SvidResult {
                    result: Some(result),
                }
            })
            .collect();
        self.metrics.issued(issued);
        Ok(Response::new(pb::MintX509SvidsResponse { results }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        const CALL: &str = "MintJwtSvid";
        let agent = self.agent(&request, CALL).await?;
        let r = request.into_inner();
        let ttl = ttl_from_proto(r.ttl_seconds).map_err(Status::invalid_argument)?;
        let pods = self
            .node_pods(&agent, [(r.spiffe_id.as_str(), None)])
            .await?;
        let issuer = self.issuer.clone();
        let started = Instant::now();
        let minted = blocking(move || {
            issuer.mint_jwt_with_pods(
                &agent,
                &r.spiffe_id,
                &r.audience,
                ttl,
                pods.as_ref(),
                SystemTime::now(),
            )
        })
        .await?;
        self.metrics.signing_took(started.elapsed());
        match minted {
            Ok((token, expires_at)) => {
                self.metrics.issued(1);
                Ok(Response::new(pb::MintJwtSvidResponse {
                    token,
                    expires_at: unix_seconds(expires_at),
                }))
            }
            Err(e) => {
                self.metrics.refused(e.code());
                Err(status(&e, CALL))
            }
        }
    }

    type WatchBundleStream = BundleStream;

    async fn watch_bundle(
        &self,
        request: Request<pb::WatchBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let agent = self.agent(&request, "WatchBundle").await?;
        let mut states = self.keystore.subscribe();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // The current bundle first, then every change. `borrow_and_update` marks it seen, so a
            // change between here and `changed()` is never lost.
            let mut current = bundle_to_proto(&states.borrow_and_update());
            loop {
                if tx.send(Ok(current)).await.is_err() {
                    break;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    changed = states.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        current = bundle_to_proto(&states.borrow_and_update());
                    }
                }
            }
            tracing::debug!(agent = %agent.spiffe_id, "bundle watch ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        const CALL: &str = "SyncEntries";
        let agent = self.agent(&request, CALL).await?;
        let issuer = self.issuer.clone();
        let entries = blocking(move || issuer.entries_for(&agent))
            .await?
            .map_err(|e| status(&e, CALL))?;
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }
}

/// THE mapping from issuance errors to gRPC statuses: coarse to the caller, detail to the log.
///
/// - a well-formed request the CA will not honour (no entitlement, unknown/evicted/expired agent,
///   stale agent SVID, spent join token): `PermissionDenied`, without saying which check failed
///   beyond what the caller already knows;
/// - a malformed request (CSR, SPIFFE ID, TTL): `InvalidArgument` with the reason, which only
///   concerns the caller's own input;
/// - too much at once: `ResourceExhausted`;
/// - anything else: `Internal`, with the detail only in the log.
pub fn status(err: &IssueError, call: &'static str) -> Status {
    use IssueError as E;
    match err {
        E::NotEntitled { .. }
        | E::NotAgent { .. }
        | E::UnknownAgent { .. }
        | E::AgentEvicted { .. }
        | E::AgentExpired { .. }
        | E::StaleAgentSvid { .. } => {
            tracing::debug!(call, reason = err.code(), error = %err, "request refused");
            Status::permission_denied(format!("refused: {}", err.code()))
        }
        E::BadJoinToken(_) => {
            tracing::debug!(call, error = %err, "join token refused");
            Status::permission_denied(
                "join token refused: it is unknown, expired or already used; create a new one with `meshward ca token create`",
            )
        }
        E::BadCsr(_)
        | E::BadSpiffeId { .. }
        | E::NotWorkloadId { .. }
        | E::OutsideTrustDomain { .. }
        | E::BadTtl { .. }
        | E::BadAudience => {
            tracing::debug!(call, reason = err.code(), error = %err, "malformed request");
            Status::invalid_argument(err.to_string())
        }
        E::TooManyRequests { .. } => Status::resource_exhausted(err.to_string()),
        E::Internal { .. } => {
            tracing::warn!(call, error = %err, "internal error while issuing");
            Status::internal("internal error; the ca log has the details")
        }
    }
}

/// A Kubernetes attestation failure as a gRPC status: the cluster's verdict on the token is
/// `PermissionDenied` (detail in the log), a failure to ask it is `Unavailable` (retry).
pub fn k8s_status(err: &K8sError) -> Status {
    if err.is_refusal() {
        tracing::info!(reason = err.code(), error = %err, "kubernetes attestation refused");
        Status::permission_denied(format!(
            "kubernetes attestation refused: {}; the ca log has the details",
            err.code()
        ))
    } else {
        tracing::warn!(error = %err, "kubernetes attestation could not be checked");
        Status::unavailable("the ca could not check the token with the cluster; retry shortly")
    }
}

/// A per-request refusal in a batch: its stable code, and a message about the caller's own request
/// (internal details stay in the log).
fn mint_error(err: &IssueError) -> pb::MintError {
    let message = match err {
        IssueError::Internal { .. } => {
            tracing::warn!(error = %err, "internal error while minting");
            "internal error; the ca log has the details".to_owned()
        }
        other => {
            tracing::debug!(reason = other.code(), error = %other, "svid request refused");
            other.to_string()
        }
    };
    pb::MintError {
        code: err.code().to_owned(),
        message,
    }
}

/// The verified client certificate's identity, or `Unauthenticated`.
pub(crate) fn verified_peer<T>(request: &Request<T>) -> Result<VerifiedPeer, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|info| info.peer.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a client certificate: connect with the agent svid from `Attest`",
            )
        })
}

/// Runs synchronous issuer/keystore work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "blocking task failed");
        Status::internal("internal error; the ca log has the details")
    })
}

/// The API's form of an issued SVID.
pub(crate) fn svid_to_proto(svid: &IssuedSvid) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: svid.spiffe_id.to_string(),
        cert_chain: svid.chain.iter().map(|c| c.as_ref().to_vec()).collect(),
        expires_at: unix_seconds(svid.not_after),
        serial: svid.serial.clone(),
    }
}

/// The API's form of the current bundle.
pub(crate) fn bundle_to_proto(state: &SigningState) -> pb::Bundle {
    pb::Bundle {
        trust_domain: state.trust_domain.to_string(),
        x509_authorities: state
            .bundle
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect(),
        jwt_authorities: state.jwt_bundle.to_jwks_json(),
        sequence: state.sequence,
        refresh_hint_seconds: i64::try_from(
            state
                .bundle
                .refresh_hint()
                .unwrap_or(REFRESH_HINT)
                .as_secs(),
        )
        .unwrap_or(i64::MAX),
    }
}

/// The API's form of a registration entry.
pub(crate) fn entry_to_proto(entry: &datastore::Entry) -> pb::Entry {
    pb::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        selectors: entry
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind().as_str().to_owned(),
                value: s.value().to_owned(),
            })
            .collect(),
        node: entry.scope.node().to_owned(),
        any_node: entry.scope.is_any_node(),
        ttl_seconds: entry.ttl_seconds,
        created_at: unix_seconds(entry.created_at),
        hint: entry.hint.clone(),
    }
}

/// Unix seconds, saturating; negative before 1970.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// `ttl_seconds` from the API: 0 means "the default"; negative is refused.
fn ttl_from_proto(ttl_seconds: i64) -> Result<Option<Duration>, String> {
    match u64::try_from(ttl_seconds) {
        Ok(0) => Ok(None),
        Ok(secs) => Ok(Some(Duration::from_secs(secs))),
        Err(_) => Err(format!(
            "ttl_seconds `{ttl_seconds}` is negative; use 0 for the default"
        )),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_zero_means_default_and_negative_is_refused() {
        assert_eq!(ttl_from_proto(0), Ok(None));
        assert_eq!(ttl_from_proto(60), Ok(Some(Duration::from_secs(60))));
        let err = ttl_from_proto(-5).unwrap_err();
        assert!(err.contains("`-5`"), "{err}");
    }

    #[test]
    fn unix_seconds_saturates_both_ways() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(42)), 42);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(42)), -42);
    }

    #[test]
    fn calls_without_a_verified_peer_are_unauthenticated() {
        let mut request = Request::new(());
        assert_eq!(
            verified_peer(&request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        request.extensions_mut().insert(PeerInfo {
            remote: "127.0.0.1:1".parse().unwrap(),
            peer: None,
        });
        assert_eq!(
            verified_peer(&request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let id = meshward_identity::SpiffeId::parse("spiffe://td/meshward/agent/join/n").unwrap();
        request.extensions_mut().insert(PeerInfo {
            remote: "127.0.0.1:1".parse().unwrap(),
            peer: Some(VerifiedPeer {
                spiffe_id: id.clone(),
                serial: "01".into(),
            }),
        });
        assert_eq!(verified_peer(&request).unwrap().spiffe_id, id);
    }
}
