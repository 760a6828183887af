//! The proxy's own identity: its SVID and trust bundles, turned into ready-made rustls configs.
//!
//! A handle ([`IdentityHandle`]) plus one worker ([`IdentityWorker`]) that owns the source: it
//! follows the agent's Workload API `FetchX509SVID` stream (reconnecting with backoff when the
//! agent restarts, while the current SVID keeps serving), or polls an `--svid-dir`. Each new SVID
//! or bundle is built once into a [`TlsState`] — the inbound `ServerConfig`s and one
//! `ClientConfig` per outbound upstream — and published on a `watch` channel. A new connection
//! reads the current state; a connection already made keeps the config it was made with, so a
//! rotation never drops a connection and no request ever rebuilds a config.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::{BundleError, BundleSet, TrustBundle};
use meshward_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshward_identity::proto::workload::{X509svidRequest, X509svidResponse};
use meshward_identity::tls::{TlsError, client_config, server_config};
use meshward_identity::verify::{Expected, PeerVerifier};
use meshward_identity::x509::{KeyError, SvidKey, X509Svid, X509SvidError, X509SvidPemError};
use meshward_identity::{SpiffeId, TrustDomain};
use ring::digest;
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{IdentitySource, Protocol};
use crate::metrics::ProxyMetrics;

/// ALPN offered by HTTP listeners, most preferred first.
pub const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// How often an `--svid-dir` is checked for new files.
pub const SVID_DIR_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// First and longest wait between Workload API reconnects.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One SVID and its bundles, with every rustls config the listeners need, built once.
#[derive(Debug)]
pub struct TlsState {
    svid: X509Svid,
    leaf_sha256: [u8; 32],
    server_http: Arc<ServerConfig>,
    server_tcp: Arc<ServerConfig>,
    // Aligned with the upstreams given to `TlsState::build` (the outbound listeners).
    clients: Vec<Arc<ClientConfig>>,
}

/// An outbound upstream a client config is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The only ID the upstream may present.
    pub expected: SpiffeId,
    /// HTTP (ALPN `h2`, `http/1.1`) or TCP (no ALPN).
    pub protocol: Protocol,
    /// For HTTP: offer `h2` (the default); `false` offers only `http/1.1`.
    pub http2: bool,
}

/// Why an SVID could not be read or turned into TLS configs.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The Workload API sent a response without any SVID.
    #[error("the workload api response holds no svid: is this workload registered?")]
    NoSvid,
    /// The SVID chain does not parse or is not an X.509-SVID.
    #[error("the svid is invalid: {0}")]
    Svid(#[from] X509SvidError),
    /// The PEM SVID file does not parse.
    #[error("the svid file is invalid: {0}")]
    SvidPem(#[from] X509SvidPemError),
    /// The concatenated DER chain is broken.
    #[error("the svid chain is not concatenated der certificates: {0}")]
    ChainDer(String),
    /// The private key is not a PKCS#8 P-256 key.
    #[error("the svid key is invalid: {0}")]
    Key(#[from] KeyError),
    /// A trust bundle does not parse.
    #[error("a trust bundle is invalid: {0}")]
    Bundle(#[from] BundleError),
    /// A federated bundle is keyed by something that is not a trust domain.
    #[error("federated bundle key `{0}` is not a trust domain")]
    BundleKey(String),
    /// rustls refused the key or chain.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A file of the `--svid-dir` cannot be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The current identity, for listeners and connectors. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IdentityHandle {
    rx: watch::Receiver<Option<Arc<TlsState>>>,
}

/// Owns the identity source and publishes each new [`TlsState`].
#[derive(Debug)]
pub struct IdentityWorker {
    source: IdentitySource,
    upstreams: Vec<Upstream>,
    metrics: ProxyMetrics,
    tx: watch::Sender<Option<Arc<TlsState>>>,
}

impl TlsState {
    /// Builds every config for `svid` and `key`, trusting the peers of `bundles`' trust domains.
    pub fn build(
        svid: X509Svid,
        key: &SvidKey,
        bundles: BundleSet,
        upstreams: &[Upstream],
    ) -> Result<Self, IdentityError> {
        let bundles = Arc::new(bundles);
        let accepted: Vec<TrustDomain> = bundles.trust_domains().cloned().collect();
        let verifier = PeerVerifier::new(Arc::clone(&bundles), accepted.iter().cloned());
        let verifier = Arc::new(verifier);
        let chain = svid.chain().to_vec();
        let alpn = |protocol| match protocol {
            Protocol::Http => HTTP_ALPN.iter().map(|p| p.to_vec()).collect(),
            Protocol::Tcp => Vec::new(),
        };
        let server_http = server_config(
            chain.clone(),
            key.to_pkcs8_der(),
            Arc::clone(&verifier),
            alpn(Protocol::Http),
        )?;
        let server_tcp = server_config(
            chain.clone(),
            key.to_pkcs8_der(),
            Arc::clone(&verifier),
            alpn(Protocol::Tcp),
        )?;
        let mut clients = Vec::with_capacity(upstreams.len());
        for upstream in upstreams {
            let verifier = PeerVerifier::new(Arc::clone(&bundles), accepted.iter().cloned())
                .with_expected(Expected::Id(upstream.expected.clone()));
            let config = client_config(
                chain.clone(),
                key.to_pkcs8_der(),
                Arc::new(verifier),
                match upstream.protocol {
                    Protocol::Http if !upstream.http2 => vec![b"http/1.1".to_vec()],
                    protocol => alpn(protocol),
                },
            )?;
            clients.push(Arc::new(config));
        }
        let mut leaf_sha256 = [0u8; 32];
        leaf_sha256.copy_from_slice(digest::digest(&digest::SHA256, svid.leaf()).as_ref());
        Ok(Self {
            svid,
            leaf_sha256,
            server_http: Arc::new(server_http),
            server_tcp: Arc::new(server_tcp),
            clients,
        })
    }

    /// This proxy's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        self.svid.spiffe_id()
    }

    /// This proxy's SVID.
    pub fn svid(&self) -> &X509Svid {
        &self.svid
    }

    /// SHA-256 of our leaf certificate.
    pub fn leaf_sha256(&self) -> &[u8; 32] {
        &self.leaf_sha256
    }

    /// The inbound server config for a listener of `protocol`.
    pub fn server_config(&self, protocol: Protocol) -> &Arc<ServerConfig> {
        match protocol {
            Protocol::Http => &self.server_http,
            Protocol::Tcp => &self.server_tcp,
        }
    }

    /// The client config for the `index`th upstream given to [`TlsState::build`].
    pub fn client_config(&self, index: usize) -> Option<&Arc<ClientConfig>> {
        self.clients.get(index)
    }
}

impl IdentityHandle {
    /// A handle that always holds `state` (for tests and embedders with a fixed identity).
    pub fn fixed(state: TlsState) -> Self {
        let (_tx, rx) = watch::channel(Some(Arc::new(state)));
        Self { rx }
    }

    /// The identity now, if one was loaded.
    pub fn current(&self) -> Option<Arc<TlsState>> {
        self.rx.borrow().clone()
    }

    /// Waits until an identity is loaded and returns it; `None` if the worker is gone without one.
    pub async fn ready(&self) -> Option<Arc<TlsState>> {
        let mut rx = self.rx.clone();
        let result = rx.wait_for(Option::is_some).await;
        result.ok().and_then(|state| state.clone())
    }

    /// A receiver that sees every new identity.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TlsState>>> {
        self.rx.clone()
    }
}

/// A handle and the worker that feeds it; run the worker with [`IdentityWorker::run`].
pub fn identity(
    source: IdentitySource,
    upstreams: Vec<Upstream>,
    metrics: ProxyMetrics,
) -> (IdentityHandle, IdentityWorker) {
    let (tx, rx) = watch::channel(None);
    (
        IdentityHandle { rx },
        IdentityWorker {
            source,
            upstreams,
            metrics,
            tx,
        },
    )
}

impl IdentityWorker {
    /// Follows the source until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        match self.source.clone() {
            IdentitySource::WorkloadApi(socket) => {
                self.follow_workload_api(&socket, shutdown).await
            }
            IdentitySource::SvidDir(dir) => self.poll_svid_dir(&dir, shutdown).await,
        }
    }

    fn publish(&self, state: TlsState, origin: &str) {
        let svid = state.svid();
        let not_after = svid.not_after();
        info!(
            spiffe_id = %svid.spiffe_id(),
            serial = svid.serial(),
            expires = %humantime(not_after),
            origin,
            "svid loaded"
        );
        self.metrics.set_svid_expiry(not_after);
        self.tx.send_replace(Some(Arc::new(state)));
    }

    async fn follow_workload_api(&self, socket: &Path, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.stream_once(socket, &mut backoff) => outcome,
            };
            match outcome {
                Ok(()) => {
                    warn!(socket = %socket.display(), "workload api stream ended; reconnecting")
                }
                Err(e) => warn!(
                    socket = %socket.display(),
                    error = %e,
                    retry_in = ?backoff,
                    "workload api unavailable; keeping the current svid"
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One `FetchX509SVID` stream, from connect to its end; resets `backoff` once a message came.
    async fn stream_once(&self, socket: &Path, backoff: &mut Duration) -> Result<(), String> {
        let channel = workload_api_channel(socket)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut request = tonic::Request::new(X509svidRequest {});
        request.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut stream = client
            .fetch_x509svid(request)
            .await
            .map_err(|status| format!("FetchX509SVID refused: {}", status.message()))?
            .into_inner();
        loop {
            let message = stream
                .message()
                .await
                .map_err(|status| format!("stream broke: {}", status.message()))?;
            let Some(message) = message else {
                return Ok(());
            };
            *backoff = BACKOFF_MIN;
            match state_from_response(&message, &self.upstreams) {
                Ok(state) => self.publish(state, "workload api"),
                // A bad message is the agent's fault; the SVID in force keeps serving.
                Err(e) => {
                    warn!(error = %e, "workload api sent an unusable svid; keeping the current one")
                }
            }
        }
    }

    async fn poll_svid_dir(&self, dir: &Path, shutdown: CancellationToken) {
        let mut last_seen: Option<Vec<u8>> = None;
        let mut ticks = tokio::time::interval(SVID_DIR_POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let files = match read_svid_dir(dir) {
                Ok(files) => files,
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "svid dir not readable yet");
                    continue;
                }
            };
            let fingerprint = files.fingerprint();
            if last_seen.as_ref() == Some(&fingerprint) {
                continue;
            }
            last_seen = Some(fingerprint);
            match files.into_state(&self.upstreams) {
                Ok(state) => self.publish(state, "svid dir"),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "svid dir holds an unusable svid; keeping the current one")
                }
            }
        }
    }
}

/// Builds the state from one Workload API message: its first SVID, its bundle, and the
/// federated bundles.
pub fn state_from_response(
    message: &X509svidResponse,
    upstreams: &[Upstream],
) -> Result<TlsState, IdentityError> {
    let first = message.svids.first().ok_or(IdentityError::NoSvid)?;
    let chain = split_der(&first.x509_svid)?;
    let svid = X509Svid::parse_chain(chain)?;
    let key = SvidKey::from_pkcs8_der(&first.x509_svid_key)?;
    let mut bundles = BundleSet::new();
    bundles.insert(TrustBundle::from_der_concat(
        svid.spiffe_id().trust_domain(),
        &first.bundle,
    )?);
    for (td, der) in &message.federated_bundles {
        let td: TrustDomain = td
            .parse()
            .map_err(|_| IdentityError::BundleKey(td.clone()))?;
        if td == svid.spiffe_id().trust_domain() {
            // Our own trust domain's roots come only from the SVID's `bundle` field.
            continue;
        }
        bundles.insert(TrustBundle::from_der_concat(td, der)?);
    }
    TlsState::build(svid, &key, bundles, upstreams)
}

/// The three files of an `--svid-dir`.
struct SvidFiles {
    svid: String,
    key: String,
    bundle: String,
}

impl SvidFiles {
    fn fingerprint(&self) -> Vec<u8> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [&self.svid, &self.key, &self.bundle] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        ctx.finish().as_ref().to_vec()
    }

    fn into_state(self, upstreams: &[Upstream]) -> Result<TlsState, IdentityError> {
        let svid = X509Svid::from_pem(&self.svid)?;
        let key = SvidKey::from_pkcs8_pem(&self.key)?;
        let mut bundles = BundleSet::new();
        bundles.insert(TrustBundle::from_pem(
            svid.spiffe_id().trust_domain(),
            &self.bundle,
        )?);
        TlsState::build(svid, &key, bundles, upstreams)
    }
}

fn read_svid_dir(dir: &Path) -> Result<SvidFiles, IdentityError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| IdentityError::Read { path, source })
    };
    Ok(SvidFiles {
        svid: read("svid.pem")?,
        key: read("svid.key")?,
        bundle: read("bundle.pem")?,
    })
}

/// Loads an `--svid-dir` once (for start-up checks and tests).
pub fn load_svid_dir(dir: &Path, upstreams: &[Upstream]) -> Result<TlsState, IdentityError> {
    read_svid_dir(dir)?.into_state(upstreams)
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` field).
fn split_der(
    mut der: &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, IdentityError> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let len = der_element_len(der).ok_or_else(|| {
            IdentityError::ChainDer(format!(
                "certificate {} is truncated or not der",
                certs.len()
            ))
        })?;
        let (one, rest) = der.split_at(len);
        certs.push(rustls_pki_types::CertificateDer::from(one.to_vec()));
        der = rest;
    }
    Ok(certs)
}

/// The total length (header and content) of the DER SEQUENCE at the start of `der`.
fn der_element_len(der: &[u8]) -> Option<usize> {
    if der.first() != Some(&0x30) {
        return None;
    }
    let first = *der.get(1)?;
    let (content, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*der.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let total = header.checked_add(content)?;
    (total <= der.len()).then_some(total)
}

/// The Workload API over the agent's unix socket.
async fn workload_api_channel(socket: &Path) -> Result<tonic::transport::Channel, String> {
    let path = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://workload-api.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                message = format!("{message}: {inner}");
                source = inner.source();
            }
            message
        })
}

/// `1700000000` -> seconds since the epoch, for logs (no date crate needed at debug level).
fn humantime(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("unix:{}", d.as_secs()),
        Err(_) => "before 1970".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use meshward_identity::proto::workload::X509svid;
    use meshward_identity::test_util::TestPki;

    use super::*;

    const ID: &str = "spiffe://a.org/ns/shop/sa/api";

    fn response(pki: &TestPki) -> X509svidResponse {
        let (svid, key) = pki.svid(ID);
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: ID.to_owned(),
                x509_svid: svid.chain().iter().flat_map(|c| c.to_vec()).collect(),
                x509_svid_key: key.to_pkcs8_der().secret_pkcs8_der().to_vec(),
                bundle: pki.root_der().to_vec(),
                hint: String::new(),
            }],
            ..X509svidResponse::default()
        }
    }

    #[test]
    fn a_workload_api_message_becomes_configs_for_every_upstream() {
        let pki = TestPki::new("a.org");
        let upstreams = [
            Upstream {
                expected: "spiffe://a.org/ns/x/sa/y".parse().unwrap(),
                protocol: Protocol::Http,
                http2: true,
            },
            Upstream {
                expected: "spiffe://a.org/ns/x/sa/z".parse().unwrap(),
                protocol: Protocol::Tcp,
                http2: true,
            },
            Upstream {
                expected: "spiffe://a.org/ns/x/sa/w".parse().unwrap(),
                protocol: Protocol::Http,
                http2: false,
            },
        ];
        let state = state_from_response(&response(&pki), &upstreams).unwrap();
        assert_eq!(state.id().as_str(), ID);
        assert_eq!(state.svid().chain().len(), 2);
        assert_eq!(
            state.server_config(Protocol::Http).alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(state.server_config(Protocol::Tcp).alpn_protocols.is_empty());
        assert_eq!(state.client_config(0).unwrap().alpn_protocols.len(), 2);
        assert!(state.client_config(1).unwrap().alpn_protocols.is_empty());
        assert_eq!(
            state.client_config(2).unwrap().alpn_protocols,
            [b"http/1.1".to_vec()]
        );
        assert!(state.client_config(3).is_none());
    }

    #[test]
    fn broken_messages_are_refused_with_their_reason() {
        let pki = TestPki::new("a.org");
        let empty = X509svidResponse::default();
        assert!(matches!(
            state_from_response(&empty, &[]),
            Err(IdentityError::NoSvid)
        ));
        let mut truncated = response(&pki);
        truncated.svids[0].x509_svid.truncate(100);
        assert!(matches!(
            state_from_response(&truncated, &[]),
            Err(IdentityError::ChainDer(_))
        ));
        let mut bad_key = response(&pki);
        bad_key.svids[0].x509_svid_key = vec![1, 2, 3];
        assert!(matches!(
            state_from_response(&bad_key, &[]),
            Err(IdentityError::Key(_))
        ));
        let mut bad_federation = response(&pki);
        bad_federation
            .federated_bundles
            .insert("not a domain!".to_owned(), pki.root_der().to_vec());
        assert!(matches!(
            state_from_response(&bad_federation, &[]),
            Err(IdentityError::BundleKey(_))
        ));
    }

    #[test]
    fn der_lengths_are_read_strictly() {
        assert_eq!(der_element_len(&[0x30, 0x01, 0x00]), Some(3));
        assert_eq!(der_element_len(&[0x30, 0x82, 0x00, 0x01, 0x00]), Some(5));
        assert_eq!(der_element_len(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_element_len(&[0x31, 0x01, 0x00]), None);
        assert_eq!(der_element_len(&[0x30, 0x80]), None);
    }
}
