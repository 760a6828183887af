//! The SPIFFE Workload API on the agent socket, exactly as the standard defines it
//! (`identity/proto/workload.proto`), so go-spiffe, py-spiffe and the Rust `spiffe` crate work
//! unmodified.
//!
//! Every call must carry the `workload.spiffe.io: true` metadata (the standard's guard against a
//! browser or an SSRF-tricked HTTP client reaching the socket); without it the call is refused with
//! `InvalidArgument` before anything else happens. The caller is then attested from the socket's
//! peer credentials ([`attest_caller`]), and served the cached SVIDs of the entries whose selectors
//! it has. A caller that matches nothing waits at most [`Services::identity_wait`] (an entry for it
//! may have just been created: the cache is asked to sync at once) and is then refused with
//! `PermissionDenied`; no call ever waits longer.
//!
//! Streams (`FetchX509SVID`, `FetchX509Bundles`, `FetchJWTBundles`) attest once when they open, then
//! follow the cache: a message goes down whenever what the caller sees changed (an SVID rotated, a
//! root was prepared), and the stream ends when the agent shuts down. Errors become a `Status` in
//! one place, [`WorkloadApiError::to_status`]: coarse for the caller, detailed in the log.
//!
//! [`client`] is the other side, for `meshward svid fetch` and the tests.

pub mod client;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use meshward_identity::jwt::{JwtBundleSet, JwtError, JwtSvid};
use meshward_identity::proto::workload as pb;
use meshward_identity::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use meshward_identity::{SpiffeId, SpiffeIdError};
use ring::digest;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::MetadataMap;
use tonic::server::{NamedService, ServerStreamingService};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::Services;
use crate::attest::{AttestError, Selector};
use crate::metrics::AgentMetrics;
use crate::svid_cache::{CacheError, CacheSnapshot, CachedEntry};

/// The metadata key every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The encode buffer of a Workload API stream: it lives as long as the stream, one per workload,
/// and grows to the message if needed (tonic's default is 8 kB, a sixth of a stream's memory).
const STREAM_ENCODE_BUFFER: usize = 1024;

/// The Workload API service for the agent socket.
pub fn server(services: Services) -> WorkloadApiServer {
    let api = Arc::new(WorkloadApi { services });
    WorkloadApiServer {
        generated: SpiffeWorkloadApiServer::from_arc(api.clone()),
        api,
    }
}

/// The generated Workload API server, except that its streams (`FetchX509SVID`,
/// `FetchX509Bundles`, `FetchJWTBundles`) encode with a small buffer ([`STREAM_ENCODE_BUFFER`]).
#[derive(Debug, Clone)]
pub struct WorkloadApiServer {
    api: Arc<WorkloadApi>,
    generated: SpiffeWorkloadApiServer<WorkloadApi>,
}

impl NamedService for WorkloadApiServer {
    const NAME: &'static str = <SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for WorkloadApiServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let api = self.api.clone();
        match request.uri().path() {
            "/SpiffeWorkloadAPI/FetchX509SVID" => {
                small_stream::<pb::X509svidRequest, pb::X509svidResponse>(
                    Follow(api, |api, r| {
                        Box::pin(async move { api.fetch_x509svid(r).await })
                    }),
                    request,
                )
            }
            "/SpiffeWorkloadAPI/FetchX509Bundles" => {
                small_stream::<pb::X509BundlesRequest, pb::X509BundlesResponse>(
                    Follow(api, |api, r| {
                        Box::pin(async move { api.fetch_x509_bundles(r).await })
                    }),
                    request,
                )
            }
            "/SpiffeWorkloadAPI/FetchJWTBundles" => {
                small_stream::<pb::JwtBundlesRequest, pb::JwtBundlesResponse>(
                    Follow(api, |api, r| {
                        Box::pin(async move { api.fetch_jwt_bundles(r).await })
                    }),
                    request,
                )
            }
            _ => self.generated.call(request),
        }
    }
}

/// Serves a server-streaming call of `method` with a [`STREAM_ENCODE_BUFFER`] encode buffer.
fn small_stream<Req, Res>(
    method: Follow<Req, Res>,
    request: http::Request<tonic::body::Body>,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    Req: prost::Message + Default + Send + 'static,
    Res: prost::Message + Unpin + Send + 'static,
{
    Box::pin(async move {
        let codec = SmallEncodeCodec::<Res, Req>::default();
        Ok(tonic::server::Grpc::new(codec)
            .server_streaming(method, request)
            .await)
    })
}

/// A streaming Workload API method, for [`WorkloadApiServer`].
struct Follow<Req, Res>(Arc<WorkloadApi>, OpenFn<Req, Res>);

/// Opens a [`FollowStream`] for a request.
type OpenFn<Req, Res> =
    fn(Arc<WorkloadApi>, Request<Req>) -> BoxFuture<Response<FollowStream<Res>>, Status>;

impl<Req, Res> ServerStreamingService<Req> for Follow<Req, Res>
where
    Res: prost::Message + Unpin + Send + 'static,
{
    type Response = Res;
    type ResponseStream = FollowStream<Res>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        (self.1)(self.0.clone(), request)
    }
}

/// The prost codec, with a [`STREAM_ENCODE_BUFFER`] encode buffer.
struct SmallEncodeCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallEncodeCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallEncodeCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // 32 kB: tonic's default yield threshold.
        tonic_prost::ProstEncoder::new(BufferSettings::new(STREAM_ENCODE_BUFFER, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::default().decoder()
    }
}

/// Serves the SPIFFE Workload API from the SVID cache.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    services: Services,
}

/// A Workload API stream: the caller's view of the SVID cache, sent now and whenever it changes.
///
/// It is polled by the connection itself, with no task or channel of its own: with one stream
/// per workload, those (a task, a channel block and a queue of messages) were a good part of the
/// agent's memory per workload. A caller that reads slowly gets the latest view, not a backlog.
pub struct FollowStream<R> {
    changes: WatchStream<Arc<CacheSnapshot>>,
    build: Box<BuildFn<R>>,
    /// The message to send next, if any.
    next: Option<R>,
    /// The digest of the message sent last: an unchanged view is not sent again. A digest, not
    /// the message (the SVIDs, key and bundle: a kilobyte or more per stream).
    last: Option<digest::Digest>,
    /// Set once the stream has ended (after a failure was sent).
    done: bool,
    method: &'static str,
    metrics: AgentMetrics,
}

/// What a [`FollowStream`] sends for a snapshot (`None`: nothing for this caller).
type BuildFn<R> = dyn FnMut(&CacheSnapshot) -> Result<Option<R>, WorkloadApiError> + Send;

impl<R> std::fmt::Debug for FollowStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowStream")
            .field("method", &self.method)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: prost::Message + Unpin> Stream for FollowStream<R> {
    type Item = Result<R, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(message) = this.next.take() {
                let sum = digest::digest(&digest::SHA256, &message.encode_to_vec());
                if this.last.as_ref().map(digest::Digest::as_ref) != Some(sum.as_ref()) {
                    this.last = Some(sum);
                    this.metrics.stream_push(this.method);
                    return Poll::Ready(Some(Ok(message)));
                }
            }
            // `None` once the cache worker is gone: the agent is shutting down. Ending the
            // stream (instead of leaving it open forever) lets clients reconnect.
            let Some(snapshot) = ready!(Pin::new(&mut this.changes).poll_next(cx)) else {
                this.done = true;
                return Poll::Ready(None);
            };
            match (this.build)(&snapshot) {
                Ok(built) => this.next = built,
                Err(e) => {
                    tracing::info!(method = this.method, error = %e, "stream closed");
                    let status = e.to_status();
                    this.metrics.socket_call(this.method, status.code());
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
    }
}

/// Why the caller of the socket could not be attested (shared with SDS).
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    /// The connection did not come with the peer's credentials (not a unix socket, or the kernel
    /// refused `SO_PEERCRED`).
    #[error("the caller's process cannot be identified: {0}")]
    Unidentified(&'static str),
    /// Attesting the caller's process failed.
    #[error(transparent)]
    Attest(#[from] AttestError),
}

/// Why a Workload API call was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    /// The call lacks the `workload.spiffe.io: true` metadata.
    #[error(
        "security header missing from request: workload api calls must carry the `workload.spiffe.io: true` metadata"
    )]
    MissingHeader,
    /// The caller could not be attested.
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// No entry grants the caller an identity (after the bounded wait).
    #[error("no identity issued to this process (its selectors: {selectors})")]
    NoIdentity {
        /// The caller's selectors, for the operator who registers an entry.
        selectors: String,
    },
    /// `FetchJWTSVID` or `ValidateJWTSVID` without an audience.
    #[error("audience must be specified")]
    NoAudience,
    /// `FetchJWTSVID` named a SPIFFE ID that does not parse.
    #[error("requested spiffe id `{id}` is invalid: {source}")]
    BadSpiffeId {
        /// What was asked for.
        id: String,
        /// Why it does not parse.
        source: SpiffeIdError,
    },
    /// `FetchJWTSVID` named a SPIFFE ID the caller is not entitled to.
    #[error("this process is not entitled to `{0}`")]
    NotEntitled(SpiffeId),
    /// `ValidateJWTSVID` without a token.
    #[error("svid must be specified")]
    NoToken,
    /// The JWT-SVID to validate is not valid.
    #[error("invalid jwt-svid: {0}")]
    InvalidJwt(#[from] JwtError),
    /// A JWT-SVID could not be minted.
    #[error(transparent)]
    Mint(#[from] CacheError),
    /// The JWT bundle has not arrived from the CA yet.
    #[error("the jwt bundle has not been received from the ca yet; retry shortly")]
    NoJwtBundle,
}

impl WorkloadApiError {
    /// The one place Workload API errors become a gRPC status: the caller gets the code and a
    /// message about its own request; anything about the agent's internals goes to the log only.
    pub fn to_status(&self) -> Status {
        match self {
            Self::MissingHeader
            | Self::NoAudience
            | Self::BadSpiffeId { .. }
            | Self::NoToken
            | Self::InvalidJwt(_)
            | Self::Mint(CacheError::NoAudience) => Status::invalid_argument(self.to_string()),
            Self::NoIdentity { .. } | Self::NotEntitled(_) => {
                Status::permission_denied(self.to_string())
            }
            Self::Mint(CacheError::UnknownIdentity(id)) => {
                Status::permission_denied(format!("this process is not entitled to `{id}`"))
            }
            Self::Caller(CallerError::Unidentified(_)) => {
                Status::permission_denied(self.to_string())
            }
            Self::Caller(CallerError::Attest(e)) => {
                Status::permission_denied(format!("workload attestation failed (`{}`)", e.code()))
            }
            Self::Mint(CacheError::Ca(_)) => {
                Status::unavailable("cannot mint a jwt-svid now: the ca is unreachable; retry")
            }
            Self::NoJwtBundle => Status::unavailable(self.to_string()),
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = FollowStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = FollowStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = FollowStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const METHOD: &str = "FetchX509SVID";
        let opened = async {
            let selectors = self.caller(&request).await?;
            self.identities(&selectors, true).await?;
            self.follow(METHOD, move |snapshot| x509_svids(snapshot, &selectors))
        };
        self.respond(METHOD, opened.await)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const METHOD: &str = "FetchX509Bundles";
        let opened = async {
            let selectors = self.caller(&request).await?;
            self.identities(&selectors, false).await?;
            self.follow(METHOD, move |snapshot| x509_bundles(snapshot, &selectors))
        };
        self.respond(METHOD, opened.await)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const METHOD: &str = "FetchJWTSVID";
        let minted = async {
            let selectors = self.caller(&request).await?;
            let asked = request.get_ref();
            if asked.audience.is_empty() || asked.audience.iter().any(String::is_empty) {
                return Err(WorkloadApiError::NoAudience);
            }
            let wanted =
                match asked.spiffe_id.as_str() {
                    "" => None,
                    id => Some(SpiffeId::parse(id).map_err(|source| {
                        WorkloadApiError::BadSpiffeId {
                            id: id.to_owned(),
                            source,
                        }
                    })?),
                };
            let snapshot = self.identities(&selectors, false).await?;
            let mut targets: Vec<(SpiffeId, String)> = Vec::new();
            for entry in snapshot.matching(&selectors) {
                let wanted_here = wanted.as_ref().is_none_or(|w| *w == entry.spiffe_id);
                if wanted_here && !targets.iter().any(|(id, _)| *id == entry.spiffe_id) {
                    targets.push((entry.spiffe_id.clone(), entry.hint.clone()));
                }
            }
            if let (Some(wanted), true) = (&wanted, targets.is_empty()) {
                return Err(WorkloadApiError::NotEntitled(wanted.clone()));
            }
            let mut svids = Vec::with_capacity(targets.len());
            for (id, hint) in targets {
                let token = self.services.cache.mint_jwt(&id, &asked.audience).await?;
                svids.push(pb::Jwtsvid {
                    spiffe_id: id.to_string(),
                    svid: token,
                    hint,
                });
            }
            Ok(pb::JwtsvidResponse { svids })
        };
        self.respond(METHOD, minted.await)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        const METHOD: &str = "FetchJWTBundles";
        let opened = async {
            let selectors = self.caller(&request).await?;
            self.identities(&selectors, false).await?;
            // The JWT bundle comes with the first bundle from the CA; give it the same bounded wait.
            self.services
                .cache
                .wait_for(self.services.identity_wait, |s| {
                    (!s.jwt_bundle.is_empty()).then_some(())
                })
                .await
                .ok_or(WorkloadApiError::NoJwtBundle)?;
            self.follow(METHOD, move |snapshot| jwt_bundles(snapshot, &selectors))
        };
        self.respond(METHOD, opened.await)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const METHOD: &str = "ValidateJWTSVID";
        let validated = async {
            // A verifier needs no identity of its own, but it must still be a local, attestable
            // process (as in SPIRE).
            self.caller(&request).await?;
            let asked = request.get_ref();
            if asked.audience.is_empty() {
                return Err(WorkloadApiError::NoAudience);
            }
            if asked.svid.is_empty() {
                return Err(WorkloadApiError::NoToken);
            }
            let snapshot = self.services.cache.current();
            let bundles: JwtBundleSet = [snapshot.jwt_bundle.clone()].into_iter().collect();
            let valid =
                JwtSvid::validate(&asked.svid, &asked.audience, &bundles, SystemTime::now())?;
            Ok(pb::ValidateJwtsvidResponse {
                spiffe_id: valid.spiffe_id.to_string(),
                claims: Some(json_struct(valid.claims)),
            })
        };
        self.respond(METHOD, validated.await)
    }
}

impl WorkloadApi {
    /// Checks the security header, then attests the caller.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Vec<Selector>, WorkloadApiError> {
        if !has_security_header(request.metadata()) {
            return Err(WorkloadApiError::MissingHeader);
        }
        Ok(attest_caller(&self.services, request.extensions()).await?)
    }

    /// The snapshot once some entry matches `selectors` (holding an SVID, if `need_svid`), after
    /// at most the bounded identity wait.
    async fn identities(
        &self,
        selectors: &[Selector],
        need_svid: bool,
    ) -> Result<Arc<CacheSnapshot>, WorkloadApiError> {
        wait_for_identity(&self.services, selectors, need_svid)
            .await
            .ok_or_else(|| no_identity(selectors))
    }

    /// Opens a stream that sends `build(snapshot)` now and whenever it changes; ends when the
    /// caller goes away, the agent shuts down, or `build` fails (sent as the stream's last item).
    fn follow<R, F>(
        &self,
        method: &'static str,
        mut build: F,
    ) -> Result<FollowStream<R>, WorkloadApiError>
    where
        R: prost::Message + Send + Unpin + 'static,
        F: FnMut(&CacheSnapshot) -> Result<Option<R>, WorkloadApiError> + Send + 'static,
    {
        let mut snapshots = self.services.cache.subscribe();
        let first = {
            let snapshot = snapshots.borrow_and_update().clone();
            build(&snapshot)?
        };
        Ok(FollowStream {
            changes: WatchStream::from_changes(snapshots),
            build: Box::new(build),
            next: first,
            last: None,
            done: false,
            method,
            metrics: self.services.metrics.clone(),
        })
    }

    /// Counts and logs the outcome of a call, and maps its error.
    fn respond<T>(
        &self,
        method: &'static str,
        outcome: Result<T, WorkloadApiError>,
    ) -> Result<Response<T>, Status> {
        match outcome {
            Ok(value) => {
                self.services.metrics.socket_call(method, tonic::Code::Ok);
                Ok(Response::new(value))
            }
            Err(e) => {
                let status = e.to_status();
                self.services.metrics.socket_call(method, status.code());
                tracing::debug!(method, error = %e, code = ?status.code(), "workload api call refused");
                Err(status)
            }
        }
    }
}

/// Whether the `workload.spiffe.io` metadata is present and `true`.
fn has_security_header(metadata: &MetadataMap) -> bool {
    metadata
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Attests the process at the other end of the call's unix socket, and counts it.
pub(crate) async fn attest_caller(
    services: &Services,
    extensions: &http::Extensions,
) -> Result<Vec<Selector>, CallerError> {
    let info = extensions
        .get::<UdsConnectInfo>()
        .ok_or(CallerError::Unidentified(
            "the call did not come over a unix socket",
        ))?;
    let pid = info
        .peer_cred
        .and_then(|cred| cred.pid())
        .ok_or(CallerError::Unidentified(
            "the socket carries no peer process id",
        ))?;
    let started = Instant::now();
    let attested = services
        .attestors
        .attest_for(pid, &services.cache.current())
        .await;
    let code = match &attested {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    services.metrics.attestation(code, started.elapsed());
    match attested {
        Ok(selectors) => {
            tracing::debug!(pid, selectors = selectors.len(), "caller attested");
            Ok(selectors)
        }
        Err(e) => {
            tracing::warn!(pid, error = %e, "workload attestation failed");
            Err(e.into())
        }
    }
}

/// The snapshot once an entry matches `selectors` (and holds an SVID, if `need_svid`), waiting at
/// most `identity_wait`; `None` if that never happened. A caller matching nothing makes the cache
/// sync at once: its entry may have just been created.
pub(crate) async fn wait_for_identity(
    services: &Services,
    selectors: &[Selector],
    need_svid: bool,
) -> Option<Arc<CacheSnapshot>> {
    let found = |s: &CacheSnapshot| {
        let matching = s.matching(selectors);
        let ok = if need_svid {
            matching.iter().any(|e| e.svid.is_some())
        } else {
            !matching.is_empty()
        };
        ok.then(|| Arc::new(s.clone()))
    };
    let current = services.cache.current();
    if let Some(hit) = found(&current) {
        return Some(hit);
    }
    if current.matching(selectors).is_empty() {
        services.cache.request_sync();
    }
    services.cache.wait_for(services.identity_wait, found).await
}

/// The entries of `snapshot` matching `selectors` that hold an SVID, in entry order (the first is
/// the caller's default identity).
pub(crate) fn served<'a>(
    snapshot: &'a CacheSnapshot,
    selectors: &[Selector],
) -> Vec<&'a CachedEntry> {
    snapshot
        .matching(selectors)
        .into_iter()
        .filter(|e| e.svid.is_some())
        .collect()
}

/// `FetchX509SVID`'s message: `None` (nothing to send) while the caller's entries all lack an
/// SVID, and an error once no entry matches the caller anymore (its entry was deleted).
fn x509_svids(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Result<Option<pb::X509svidResponse>, WorkloadApiError> {
    if snapshot.matching(selectors).is_empty() {
        return Err(no_identity(selectors));
    }
    let bundle = snapshot.bundle.to_der_concat();
    let svids: Vec<pb::X509svid> = served(snapshot, selectors)
        .into_iter()
        .filter_map(|entry| {
            let cached = entry.svid.as_ref()?;
            Some(pb::X509svid {
                spiffe_id: entry.spiffe_id.to_string(),
                x509_svid: cached
                    .svid
                    .chain()
                    .iter()
                    .flat_map(|c| c.as_ref().iter().copied())
                    .collect(),
                x509_svid_key: cached.key.to_pkcs8_der().secret_pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: entry.hint.clone(),
            })
        })
        .collect();
    if svids.is_empty() {
        return Ok(None);
    }
    Ok(Some(pb::X509svidResponse {
        svids,
        crl: Vec::new(),
        // meshward does not federate (one trust domain per CA, DESIGN.md).
        federated_bundles: BTreeMap::new(),
    }))
}

/// `FetchX509Bundles`'s message: the trust domain's roots, keyed by its ID.
fn x509_bundles(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Result<Option<pb::X509BundlesResponse>, WorkloadApiError> {
    if snapshot.matching(selectors).is_empty() {
        return Err(no_identity(selectors));
    }
    let bundles = BTreeMap::from([(
        snapshot.trust_domain.id().to_string(),
        snapshot.bundle.to_der_concat(),
    )]);
    Ok(Some(pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    }))
}

/// `FetchJWTBundles`'s message: the trust domain's JWKS, keyed by its ID.
fn jwt_bundles(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Result<Option<pb::JwtBundlesResponse>, WorkloadApiError> {
    if snapshot.matching(selectors).is_empty() {
        return Err(no_identity(selectors));
    }
    if snapshot.jwt_bundle.is_empty() {
        return Ok(None);
    }
    let bundles = BTreeMap::from([(
        snapshot.trust_domain.id().to_string(),
        snapshot.jwt_bundle.to_jwks_json(),
    )]);
    Ok(Some(pb::JwtBundlesResponse { bundles }))
}

fn no_identity(selectors: &[Selector]) -> WorkloadApiError {
    WorkloadApiError::NoIdentity {
        selectors: selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// JWT claims as the `google.protobuf.Struct` `ValidateJWTSVID` returns.
fn json_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, json_value(v)))
            .collect(),
    }
}

fn json_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        // Struct numbers are doubles (as in JSON itself); `exp`/`iat` fit exactly.
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
pub(crate) mod tests;
