//! The agent's side of the CA API (`meshward.ca.v1.Ca`).
//!
//! Two kinds of connection, both TLS with rustls (ring), both verifying that the server is exactly
//! `spiffe://TD/meshward/ca` and chains to the trust bundle:
//!
//! - [`attest`]: once, before the agent holds an SVID, without a client certificate (the bootstrap
//!   bundle from `--trust-bundle` vouches for the CA);
//! - [`CaClient`]: everything else, over mTLS with the agent SVID. It follows the node identity's
//!   watch channel and builds a new channel whenever the agent SVID or the bundle changes: the CA
//!   refuses a renewed agent's previous SVID at once, so calls must not keep using a connection made
//!   with it. A channel connects lazily and reconnects by itself after the CA comes back.

use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use meshward_identity::bundle::{BundleSet, TrustBundle};
use meshward_identity::jwt::JwtBundle;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_client::CaClient as PbClient;
use meshward_identity::tls::{PROTOCOL_VERSIONS, TlsError, client_config, provider};
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{SvidKey, X509Svid};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::JoinToken;
use crate::node::NodeState;

/// Largest message the agent decodes from the CA (a full batch of SVIDs is ~1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// How long to wait for the TCP connection and TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// The TLS config could not be built (our SVID and key do not fit together).
    #[error("cannot build the tls config for the ca: {0}")]
    Tls(#[from] TlsError),
    /// The CA's SPIFFE ID could not be formed from the trust domain.
    #[error("cannot form the ca's spiffe id: {0}")]
    CaId(#[from] meshward_identity::SpiffeIdError),
    /// The CA could not be reached (TCP, TLS handshake, HTTP/2).
    #[error("cannot reach the ca at `{addr}`: {reason}")]
    Connect {
        /// The CA's address.
        addr: String,
        /// The cause, with its sources.
        reason: String,
    },
    /// The CA answered with an error status.
    #[error("ca call `{call}` failed: {code:?}: {message}")]
    Status {
        /// The call.
        call: &'static str,
        /// The gRPC code.
        code: tonic::Code,
        /// The CA's message (and the transport's cause for `Unavailable`).
        message: String,
    },
    /// The CA's answer does not make sense (malformed certificate, wrong trust domain, ...).
    #[error("ca call `{call}` returned an invalid response: {reason}")]
    BadResponse {
        /// The call.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl CaClientError {
    /// Whether the CA looked at the request and said no (as opposed to the CA being unreachable,
    /// overloaded or answering nonsense): retrying the same request will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Status { code, .. } if matches!(
                code,
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
            )
        )
    }
}

/// Node attestation: sends the join token and a CSR for the agent's key over server-authenticated
/// TLS, and returns the CA's answer (the agent SVID chain and the bundle), not yet checked.
pub async fn attest(
    addr: &str,
    bundle: &TrustBundle,
    token: &JoinToken,
    csr: Vec<u8>,
    timeout: Duration,
) -> Result<pb::AttestResponse, CaClientError> {
    let attestation = pb::attest_request::Attestation::JoinToken(pb::JoinTokenAttestation {
        token: token.secret().to_owned(),
    });
    attest_with(addr, bundle, attestation, csr, timeout).await
}

/// Node attestation in Kubernetes: as [`attest`], presenting the agent pod's projected
/// service-account token (audience `meshward-ca`) instead of a join token.
pub async fn attest_k8s_psat(
    addr: &str,
    bundle: &TrustBundle,
    token: &str,
    csr: Vec<u8>,
    timeout: Duration,
) -> Result<pb::AttestResponse, CaClientError> {
    let attestation = pb::attest_request::Attestation::K8sPsat(pb::K8sPsatAttestation {
        token: token.to_owned(),
    });
    attest_with(addr, bundle, attestation, csr, timeout).await
}

/// Sends one `Attest` call with `attestation` over server-authenticated TLS.
async fn attest_with(
    addr: &str,
    bundle: &TrustBundle,
    attestation: pb::attest_request::Attestation,
    csr: Vec<u8>,
    timeout: Duration,
) -> Result<pb::AttestResponse, CaClientError> {
    let verifier = ca_verifier(bundle)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|source| TlsError::Rustls {
            side: "client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    let channel = endpoint(timeout)
        .connect_with_connector(connector(addr, Arc::new(config)))
        .await
        .map_err(|e| CaClientError::Connect {
            addr: addr.to_owned(),
            reason: error_chain(&e),
        })?;
    let request = pb::AttestRequest {
        attestation: Some(attestation),
        csr,
    };
    let response = client(channel)
        .attest(request)
        .await
        .map_err(|s| status_error("Attest", &s))?;
    Ok(response.into_inner())
}

/// The mTLS client for every call after attestation; cheap to clone.
#[derive(Clone)]
pub struct CaClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    timeout: Duration,
    node: watch::Receiver<Arc<NodeState>>,
    // The channel and the node state it was built from; rebuilt when the state changes.
    channel: Mutex<Option<(Arc<NodeState>, Channel)>>,
}

impl CaClient {
    /// A client of the CA at `addr` that authenticates with the agent SVID current in `node`.
    pub fn new(
        addr: impl Into<String>,
        node: watch::Receiver<Arc<NodeState>>,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                addr: addr.into(),
                timeout,
                node,
                channel: Mutex::new(None),
            }),
        }
    }

    /// A new agent SVID for the key in `csr`; the current one stops working at the CA at once.
    pub async fn renew_agent(&self, csr: Vec<u8>) -> Result<pb::X509Svid, CaClientError> {
        const CALL: &str = "RenewAgent";
        let response = self
            .client()?
            .renew_agent(pb::RenewAgentRequest { csr })
            .await
            .map_err(|s| status_error(CALL, &s))?;
        response
            .into_inner()
            .svid
            .ok_or_else(|| bad(CALL, "no svid in the response"))
    }

    /// Workload SVIDs, one result per request, in request order.
    pub async fn mint_x509(
        &self,
        requests: Vec<pb::SvidRequest>,
    ) -> Result<Vec<pb::SvidResult>, CaClientError> {
        const CALL: &str = "MintX509Svids";
        let count = requests.len();
        let results = self
            .client()?
            .mint_x509_svids(pb::MintX509SvidsRequest { requests })
            .await
            .map_err(|s| status_error(CALL, &s))?
            .into_inner()
            .results;
        if results.len() != count {
            return Err(bad(
                CALL,
                &format!("`{}` results for `{count}` requests", results.len()),
            ));
        }
        Ok(results)
    }

    /// A JWT-SVID for `spiffe_id` and `audience`, with its expiry.
    pub async fn mint_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
    ) -> Result<(String, SystemTime), CaClientError> {
        const CALL: &str = "MintJwtSvid";
        let response = self
            .client()?
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                spiffe_id: spiffe_id.to_string(),
                audience: audience.to_vec(),
                ttl_seconds: 0,
                pod_uid: String::new(),
            })
            .await
            .map_err(|s| status_error(CALL, &s))?
            .into_inner();
        if response.token.is_empty() {
            return Err(bad(CALL, "empty token"));
        }
        Ok((response.token, from_unix(response.expires_at)))
    }

    /// The bundle now, then after every change, until the stream breaks.
    pub async fn watch_bundle(&self) -> Result<tonic::Streaming<pb::Bundle>, CaClientError> {
        const CALL: &str = "WatchBundle";
        Ok(self
            .client()?
            .watch_bundle(pb::WatchBundleRequest {})
            .await
            .map_err(|s| status_error(CALL, &s))?
            .into_inner())
    }

    /// The registration entries of this node.
    pub async fn sync_entries(&self) -> Result<Vec<pb::Entry>, CaClientError> {
        const CALL: &str = "SyncEntries";
        Ok(self
            .client()?
            .sync_entries(pb::SyncEntriesRequest {})
            .await
            .map_err(|s| status_error(CALL, &s))?
            .into_inner()
            .entries)
    }

    /// A client on the channel for the current agent SVID and bundle.
    fn client(&self) -> Result<PbClient<Channel>, CaClientError> {
        let inner = &*self.inner;
        let state = inner.node.borrow().clone();
        let mut cached = inner
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((built_from, channel)) = cached.as_ref()
            && Arc::ptr_eq(built_from, &state)
        {
            return Ok(client(channel.clone()));
        }
        let verifier = ca_verifier(&state.bundle)?;
        let config = client_config(
            state.svid.chain().to_vec(),
            state.key.to_pkcs8_der(),
            Arc::new(verifier),
            vec![b"h2".to_vec()],
        )?;
        let channel = endpoint(inner.timeout)
            .connect_with_connector_lazy(connector(&inner.addr, Arc::new(config)));
        *cached = Some((state, channel.clone()));
        Ok(client(channel))
    }
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

/// `spiffe://TD/meshward/ca`, the only server identity the agent accepts.
pub fn ca_spiffe_id(td: &TrustDomain) -> Result<SpiffeId, meshward_identity::SpiffeIdError> {
    td.workload_id(&["meshward", "ca"])
}

/// Reads a chain from the API into an [`X509Svid`] (shape only; the caller verifies the chain).
pub fn svid_from_proto(call: &'static str, svid: pb::X509Svid) -> Result<X509Svid, CaClientError> {
    let chain = svid
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    X509Svid::parse_chain(chain).map_err(|e| bad(call, &e.to_string()))
}

/// Reads a bundle from the API, refusing one for another trust domain or without any root.
pub fn bundle_from_proto(
    call: &'static str,
    td: &TrustDomain,
    bundle: &pb::Bundle,
) -> Result<(TrustBundle, JwtBundle), CaClientError> {
    if bundle.trust_domain != td.as_str() && bundle.trust_domain != td.id().as_str() {
        return Err(bad(
            call,
            &format!(
                "bundle is for trust domain `{}`, not `{td}`",
                bundle.trust_domain
            ),
        ));
    }
    let mut x509 = TrustBundle::new(td.clone());
    for der in &bundle.x509_authorities {
        x509.add_authority(CertificateDer::from(der.as_slice()))
            .map_err(|e| bad(call, &e.to_string()))?;
    }
    if x509.is_empty() {
        return Err(bad(call, "bundle has no x.509 authority"));
    }
    x509.set_sequence(bundle.sequence);
    let hint = u64::try_from(bundle.refresh_hint_seconds)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    x509.set_refresh_hint(hint);
    let jwt = if bundle.jwt_authorities.is_empty() {
        JwtBundle::new(td.clone())
    } else {
        JwtBundle::from_jwks_json(td.clone(), &bundle.jwt_authorities)
            .map_err(|e| bad(call, &e.to_string()))?
    };
    Ok((x509, jwt))
}

/// Whether `svid`'s leaf certifies `key`'s public key.
pub fn leaf_matches_key(svid: &X509Svid, key: &SvidKey) -> bool {
    use x509_parser::prelude::FromDer as _;
    x509_parser::certificate::X509Certificate::from_der(svid.leaf().as_ref())
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.public_key_der().as_slice())
}

/// A verifier that accepts only the CA of `bundle`'s trust domain, chained to `bundle`.
fn ca_verifier(bundle: &TrustBundle) -> Result<PeerVerifier, CaClientError> {
    let td = bundle.trust_domain().clone();
    let ca = ca_spiffe_id(&td)?;
    let mut set = BundleSet::new();
    set.insert(bundle.clone());
    Ok(PeerVerifier::new(Arc::new(set), [td]).with_expected(Expected::Id(ca)))
}

fn endpoint(timeout: Duration) -> Endpoint {
    // The URI only names the `:authority`; the connector decides where to connect.
    Endpoint::from_static("http://meshward-ca")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        // Notices a CA that vanished without closing the connection (a bundle watch would
        // otherwise wait on a dead connection forever).
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// Opens TCP to `addr` and runs the TLS handshake with `config`.
fn connector(
    addr: &str,
    config: Arc<ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let addr = addr.to_owned();
    let connector = TlsConnector::from(config);
    tower::service_fn(move |_: Uri| {
        let addr = addr.clone();
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            // The verifier checks the SPIFFE ID, not this name; it is only sent as SNI.
            let name = server_name(&addr);
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        }
    })
}

fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::from(std::net::Ipv4Addr::LOCALHOST))
}

fn client(channel: Channel) -> PbClient<Channel> {
    PbClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn status_error(call: &'static str, status: &tonic::Status) -> CaClientError {
    let mut message = status.message().to_owned();
    // For transport failures tonic's message is generic; the cause is in the source chain.
    if let Some(source) = status.source() {
        message = format!("{message}: {}", error_chain(source));
    }
    CaClientError::Status {
        call,
        code: status.code(),
        message,
    }
}

fn bad(call: &'static str, reason: &str) -> CaClientError {
    CaClientError::BadResponse {
        call,
        reason: reason.to_owned(),
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Unix seconds from the API; a negative time is the epoch.
pub(crate) fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}
