//! Envoy SDS v3 (`SecretDiscoveryService`) on the agent socket, with SPIRE's secret names, so an
//! unmodified Envoy can take its certificate and trust bundle from the agent:
//!
//! | resource name | secret |
//! | --- | --- |
//! | `default` | `tls_certificate`: the caller's default SVID (its first matching entry) |
//! | a SPIFFE ID the caller is entitled to | `tls_certificate`: that SVID |
//! | `ROOTCA`, `spiffe://<td>` | `validation_context`: the trust domain's roots as `trusted_ca` |
//! | `ALL` | `validation_context`: every bundle (own and federated) as Envoy's SPIFFE certificate validator |
//!
//! Certificates and keys travel as PEM in `inline_bytes` (chain leaf first, PKCS#8 key). SDS calls
//! carry no Workload API header (Envoy sends none), so none is required; the caller is attested from
//! the socket's peer credentials exactly as for the Workload API.
//!
//! `StreamSecrets` follows the state-of-the-world xDS protocol: every response has a `version_info`
//! (a digest of its content, so the same secrets always have the same version) and a fresh `nonce`;
//! a request carrying the last nonce is an ACK, or a NACK when it has an `error_detail` (logged and
//! counted; the rejected version is not sent again); a request with an older nonce is stale and
//! ignored; new secrets (a rotated SVID, a prepared root) are pushed as a new version. Only
//! `DeltaSecrets` is not served.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use meshward_identity::bundle::TrustBundle;
use meshward_identity::x509::certs_to_pem;
use meshward_identity::{SpiffeId, TrustDomain};
use prost::{Message as _, Name as _};
use ring::digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Services;
use crate::attest::Selector;
use crate::svid_cache::{CacheSnapshot, CachedEntry};
use crate::workload_api::{CallerError, attest_caller, served, wait_for_identity};

/// The secret name of the caller's default identity.
pub const DEFAULT_SECRET: &str = "default";

/// The secret name of the agent's own trust domain's roots.
pub const ROOT_CA_SECRET: &str = "ROOTCA";

/// The secret name of every bundle the agent knows (own and federated).
pub const ALL_BUNDLES_SECRET: &str = "ALL";

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// Messages buffered per open stream.
const STREAM_BUFFER: usize = 4;

/// The SDS service for the agent socket.
pub fn server(services: Services) -> SecretDiscoveryServiceServer<Sds> {
    SecretDiscoveryServiceServer::new(Sds { services })
}

/// The `type_url` of SDS resources and responses.
pub fn secret_type_url() -> String {
    Secret::type_url()
}

/// Serves Envoy secrets from the SVID cache.
#[derive(Debug, Clone)]
pub struct Sds {
    services: Services,
}

/// What a requested resource name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretName {
    /// `default`: the caller's default SVID.
    Default,
    /// A SPIFFE ID: that SVID.
    Identity(SpiffeId),
    /// `ROOTCA`: the agent's trust domain's roots.
    RootCa,
    /// `spiffe://<td>`: that trust domain's roots.
    Bundle(TrustDomain),
    /// `ALL`: every bundle.
    All,
}

/// Why an SDS call was refused.
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    /// The caller could not be attested.
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// A resource name that is none of SPIRE's.
    #[error(
        "unknown secret `{0}`: expected `default`, a spiffe id, `ROOTCA`, `spiffe://<trust domain>` or `ALL`"
    )]
    UnknownName(String),
    /// A request for another resource type than `Secret`.
    #[error("sds serves `{expected}`, not `{0}`", expected = secret_type_url())]
    WrongType(String),
    /// The caller asked for an SVID and holds none (after the bounded wait).
    #[error("no identity issued to this process (its selectors: {selectors})")]
    NoIdentity {
        /// The caller's selectors.
        selectors: String,
    },
    /// The caller asked for an SVID it is not entitled to.
    #[error("this process is not entitled to `{0}`")]
    NotEntitled(SpiffeId),
    /// A bundle of a trust domain the agent has no bundle for.
    #[error("no bundle for trust domain `{0}`")]
    UnknownTrustDomain(TrustDomain),
    /// `DeltaSecrets`.
    #[error("incremental (delta) sds is not supported; use the state-of-the-world `StreamSecrets`")]
    Delta,
}

impl SdsError {
    /// The one place SDS errors become a gRPC status.
    pub fn to_status(&self) -> Status {
        match self {
            Self::UnknownName(_) | Self::WrongType(_) => Status::invalid_argument(self.to_string()),
            Self::NoIdentity { .. } | Self::NotEntitled(_) => {
                Status::permission_denied(self.to_string())
            }
            Self::Caller(CallerError::Unidentified(_)) => {
                Status::permission_denied(self.to_string())
            }
            Self::Caller(CallerError::Attest(e)) => {
                Status::permission_denied(format!("workload attestation failed (`{}`)", e.code()))
            }
            Self::UnknownTrustDomain(_) => Status::not_found(self.to_string()),
            Self::Delta => Status::unimplemented(self.to_string()),
        }
    }
}

impl SecretName {
    /// Reads a resource name as SPIRE names secrets.
    pub fn parse(name: &str) -> Result<Self, SdsError> {
        match name {
            DEFAULT_SECRET => Ok(Self::Default),
            ROOT_CA_SECRET => Ok(Self::RootCa),
            ALL_BUNDLES_SECRET => Ok(Self::All),
            _ => {
                let id =
                    SpiffeId::parse(name).map_err(|_| SdsError::UnknownName(name.to_owned()))?;
                if id.is_trust_domain_id() {
                    Ok(Self::Bundle(id.trust_domain()))
                } else {
                    Ok(Self::Identity(id))
                }
            }
        }
    }

    /// Whether the secret is an SVID (as opposed to a bundle).
    pub fn is_certificate(&self) -> bool {
        matches!(self, Self::Default | Self::Identity(_))
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str(DEFAULT_SECRET),
            Self::Identity(id) => write!(f, "{id}"),
            Self::RootCa => f.write_str(ROOT_CA_SECRET),
            Self::Bundle(td) => write!(f, "{}", td.id()),
            Self::All => f.write_str(ALL_BUNDLES_SECRET),
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.respond("DeltaSecrets", Err(SdsError::Delta))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        const METHOD: &str = "StreamSecrets";
        let attested = attest_caller(&self.services, request.extensions()).await;
        let selectors = match attested {
            Ok(selectors) => selectors,
            Err(e) => return self.respond(METHOD, Err(e.into())),
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = SecretStream {
            services: self.services.clone(),
            selectors,
            inbound: request.into_inner(),
            tx,
            state: StreamState::default(),
        };
        tokio::spawn(stream.run());
        self.respond(METHOD, Ok(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        const METHOD: &str = "FetchSecrets";
        let fetched = async {
            let selectors = attest_caller(&self.services, request.extensions()).await?;
            let asked = request.get_ref();
            check_type(&asked.type_url)?;
            let names = parse_names(&asked.resource_names)?;
            let snapshot = settle(&self.services, &selectors, &names).await;
            let resources = build_resources(&snapshot, &selectors, &names)?;
            Ok(DiscoveryResponse {
                version_info: version_of(&resources),
                resources,
                type_url: secret_type_url(),
                ..Default::default()
            })
        };
        self.respond(METHOD, fetched.await)
    }
}

impl Sds {
    fn respond<T>(
        &self,
        method: &'static str,
        outcome: Result<T, SdsError>,
    ) -> Result<Response<T>, Status> {
        match outcome {
            Ok(value) => {
                self.services.metrics.socket_call(method, tonic::Code::Ok);
                Ok(Response::new(value))
            }
            Err(e) => {
                let status = e.to_status();
                self.services.metrics.socket_call(method, status.code());
                tracing::info!(method, error = %e, "sds call refused");
                Err(status)
            }
        }
    }
}

/// One `StreamSecrets` stream: its caller, its subscription, and the xDS bookkeeping.
struct SecretStream {
    services: Services,
    selectors: Vec<Selector>,
    inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    state: StreamState,
}

/// What was last sent down a stream.
#[derive(Debug, Default)]
struct StreamState {
    /// The subscribed names, as Envoy sent them.
    names: Vec<String>,
    /// The resources of the last response (`None` before the first).
    sent: Option<Vec<Any>>,
    /// The last response's version and nonce.
    version: String,
    nonce: String,
    /// Responses sent, for nonces.
    responses: u64,
}

/// What a request on an open stream was, and so what to do.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// A first request or a new subscription: send the secrets.
    Send,
    /// The last response was applied: nothing to send.
    Ack,
    /// The last response was rejected; send only if the subscription changed with it.
    Nack {
        /// Whether the names changed.
        resend: bool,
    },
    /// An answer to an older response, overtaken by the last one: ignored.
    Stale,
}

impl SecretStream {
    async fn run(mut self) {
        const METHOD: &str = "StreamSecrets";
        let mut snapshots = self.services.cache.subscribe();
        loop {
            tokio::select! {
                request = self.inbound.message() => {
                    let request = match request {
                        Ok(Some(request)) => request,
                        // Envoy closed the stream, or the connection broke.
                        Ok(None) | Err(_) => return,
                    };
                    let reply = self.state.on_request(&request);
                    if let Ok(Reply::Nack { .. }) = reply {
                        self.services.metrics.sds_nack();
                    }
                    match reply {
                        Ok(Reply::Ack | Reply::Stale | Reply::Nack { resend: false }) => {}
                        Ok(Reply::Send | Reply::Nack { resend: true }) => {
                            // A new subscription may need an SVID the cache is still minting.
                            let names = match parse_names(&self.state.names) {
                                Ok(names) => names,
                                Err(e) => return self.fail(METHOD, &e).await,
                            };
                            settle(&self.services, &self.selectors, &names).await;
                            snapshots.borrow_and_update();
                            if !self.push(true).await {
                                return;
                            }
                        }
                        Err(e) => return self.fail(METHOD, &e).await,
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        // The agent is shutting down: end the stream so Envoy reconnects.
                        return;
                    }
                    snapshots.borrow_and_update();
                    if self.state.sent.is_some() && !self.push(false).await {
                        return;
                    }
                }
            }
        }
    }

    /// Builds the subscribed secrets and sends them if they changed (or if `always`); false once
    /// the stream is over.
    async fn push(&mut self, always: bool) -> bool {
        const METHOD: &str = "StreamSecrets";
        let snapshot = self.services.cache.current();
        let built = parse_names(&self.state.names)
            .and_then(|names| build_resources(&snapshot, &self.selectors, &names));
        let resources = match built {
            Ok(resources) => resources,
            Err(e) => {
                self.fail(METHOD, &e).await;
                return false;
            }
        };
        if !always && self.state.sent.as_ref() == Some(&resources) {
            return true;
        }
        let response = self.state.response(resources);
        tracing::debug!(version = %response.version_info, nonce = %response.nonce, names = ?self.state.names, "sds response sent");
        if self.tx.send(Ok(response)).await.is_err() {
            return false;
        }
        self.services.metrics.stream_push(METHOD);
        true
    }

    async fn fail(&self, method: &'static str, error: &SdsError) {
        let status = error.to_status();
        self.services.metrics.socket_call(method, status.code());
        tracing::info!(method, error = %error, "sds stream closed");
        let _ = self.tx.send(Err(status)).await;
    }
}

impl StreamState {
    /// Applies one request of the xDS state-of-the-world protocol.
    fn on_request(&mut self, request: &DiscoveryRequest) -> Result<Reply, SdsError> {
        check_type(&request.type_url)?;
        let answered_last = !self.nonce.is_empty() && request.response_nonce == self.nonce;
        if !self.nonce.is_empty() && !request.response_nonce.is_empty() && !answered_last {
            tracing::debug!(nonce = %request.response_nonce, current = %self.nonce, "stale sds request ignored");
            return Ok(Reply::Stale);
        }
        let same_names = self.sent.is_some() && request.resource_names == self.names;
        if answered_last && let Some(error) = &request.error_detail {
            tracing::warn!(version = %self.version, names = ?self.names, code = error.code, message = %error.message, "envoy rejected sds secrets");
            if same_names {
                // Sending the rejected version again would only be rejected again; the next
                // change (a new SVID or bundle) brings a new version.
                return Ok(Reply::Nack { resend: false });
            }
            self.subscribe(request)?;
            return Ok(Reply::Nack { resend: true });
        }
        if answered_last && same_names {
            tracing::debug!(version = %request.version_info, nonce = %request.response_nonce, "sds response acknowledged");
            return Ok(Reply::Ack);
        }
        self.subscribe(request)?;
        Ok(Reply::Send)
    }

    /// Takes the request's names as the subscription, if they all parse.
    fn subscribe(&mut self, request: &DiscoveryRequest) -> Result<(), SdsError> {
        parse_names(&request.resource_names)?;
        self.names.clone_from(&request.resource_names);
        Ok(())
    }

    /// The next response: `resources`, their version, a fresh nonce.
    fn response(&mut self, resources: Vec<Any>) -> DiscoveryResponse {
        self.responses += 1;
        self.version = version_of(&resources);
        self.nonce = self.responses.to_string();
        self.sent = Some(resources.clone());
        DiscoveryResponse {
            version_info: self.version.clone(),
            resources,
            type_url: secret_type_url(),
            nonce: self.nonce.clone(),
            ..Default::default()
        }
    }
}

/// An empty `type_url` means the default for the service (as Envoy's gRPC mux allows).
fn check_type(type_url: &str) -> Result<(), SdsError> {
    if type_url.is_empty() || type_url == secret_type_url() {
        Ok(())
    } else {
        Err(SdsError::WrongType(type_url.to_owned()))
    }
}

fn parse_names(names: &[String]) -> Result<Vec<SecretName>, SdsError> {
    names.iter().map(|n| SecretName::parse(n)).collect()
}

/// Waits (bounded) for an SVID when a certificate is asked for; returns the snapshot to serve.
async fn settle(
    services: &Services,
    selectors: &[Selector],
    names: &[SecretName],
) -> Arc<CacheSnapshot> {
    // No names: everything the caller has, SVIDs included.
    let wants_svid = names.is_empty() || names.iter().any(SecretName::is_certificate);
    if wants_svid && let Some(snapshot) = wait_for_identity(services, selectors, true).await {
        return snapshot;
    }
    services.cache.current()
}

/// The secrets `names` stand for, for a caller with `selectors`, packed for a response. No names
/// means everything the caller may have: each of its SVIDs by SPIFFE ID, and its trust domain's
/// roots by trust domain ID (as SPIRE answers).
fn build_resources(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
    names: &[SecretName],
) -> Result<Vec<Any>, SdsError> {
    let entries = served(snapshot, selectors);
    let mut secrets = Vec::new();
    if names.is_empty() {
        let mut seen = HashSet::new();
        for entry in &entries {
            if seen.insert(&entry.spiffe_id) {
                secrets.push(tls_secret(entry.spiffe_id.to_string(), entry));
            }
        }
        secrets.push(roots_secret(
            snapshot.trust_domain.id().to_string(),
            &snapshot.bundle,
        ));
    }
    for name in names {
        let secret = match name {
            SecretName::Default => {
                let entry = entries.first().ok_or_else(|| no_identity(selectors))?;
                tls_secret(name.to_string(), entry)
            }
            SecretName::Identity(id) => {
                let entry = entries
                    .iter()
                    .find(|e| e.spiffe_id == *id)
                    .ok_or_else(|| SdsError::NotEntitled(id.clone()))?;
                tls_secret(name.to_string(), entry)
            }
            SecretName::RootCa => roots_secret(name.to_string(), &snapshot.bundle),
            SecretName::Bundle(td) if *td == snapshot.trust_domain => {
                roots_secret(name.to_string(), &snapshot.bundle)
            }
            SecretName::Bundle(td) => return Err(SdsError::UnknownTrustDomain(td.clone())),
            // meshward does not federate (one trust domain per CA, DESIGN.md): the own bundle only.
            SecretName::All => spiffe_validator_secret(name.to_string(), [&snapshot.bundle]),
        };
        secrets.push(secret);
    }
    Ok(secrets.into_iter().map(pack_any).collect())
}

fn tls_secret(name: String, entry: &CachedEntry) -> Secret {
    // `served` only returns entries holding an SVID.
    let (chain, key) = entry.svid.as_ref().map_or_else(Default::default, |cached| {
        (certs_to_pem(cached.svid.chain()), cached.key.to_pkcs8_pem())
    });
    Secret {
        name,
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(chain.into_bytes())),
            private_key: Some(inline(key.into_bytes())),
            ..Default::default()
        })),
    }
}

fn roots_secret(name: String, bundle: &TrustBundle) -> Secret {
    Secret {
        name,
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(bundle.to_pem().into_bytes())),
                ..Default::default()
            },
        )),
    }
}

/// A validation context with Envoy's SPIFFE validator: a peer is checked against the bundle of
/// the trust domain in its SPIFFE ID, never against another trust domain's roots.
fn spiffe_validator_secret<'a>(
    name: String,
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> Secret {
    let trust_domains = bundles
        .into_iter()
        .map(|bundle| spiffe_cert_validator_config::TrustDomain {
            name: bundle.trust_domain().as_str().to_owned(),
            trust_bundle: Some(inline(bundle.to_pem().into_bytes())),
            workload_trust_domain: String::new(),
        })
        .collect();
    let config = SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles: None,
    };
    Secret {
        name,
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.to_owned(),
                    typed_config: Some(pack_any(config)),
                }),
                ..Default::default()
            },
        )),
    }
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    }
}

/// The version of a set of resources: a digest of their bytes, so it names the content.
fn version_of(resources: &[Any]) -> String {
    let mut hash = digest::Context::new(&digest::SHA256);
    for resource in resources {
        hash.update(&resource.encode_length_delimited_to_vec());
    }
    hex::encode(hash.finish().as_ref().get(..8).unwrap_or_default())
}

fn no_identity(selectors: &[Selector]) -> SdsError {
    SdsError::NoIdentity {
        selectors: selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests;
