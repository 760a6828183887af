//! A small Workload API client over the agent's unix socket, for `meshward svid fetch` and tests:
//! our generated client plus the security header, and the parsing of its answers back into
//! identity's types.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hyper_util::rt::TokioIo;
use meshward_identity::bundle::{BundleError, TrustBundle};
use meshward_identity::proto::workload as pb;
use meshward_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshward_identity::x509::{KeyError, SvidKey, X509Svid, X509SvidError};
use meshward_identity::{SpiffeId, SpiffeIdError};
use rustls_pki_types::CertificateDer;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::SECURITY_HEADER;
use crate::ca_client::leaf_matches_key;

/// An X.509-SVID as the Workload API handed it out, parsed and checked.
#[derive(Debug)]
pub struct FetchedSvid {
    /// The SVID, chain leaf first.
    pub svid: X509Svid,
    /// Its private key.
    pub key: SvidKey,
    /// The roots of its trust domain.
    pub bundle: TrustBundle,
    /// The operator's hint.
    pub hint: String,
}

/// Why talking to the Workload API, or reading its answer, failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to.
    #[error("cannot connect to the workload api at `{}`: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// The answer has no SVID in it.
    #[error("the workload api returned no svid")]
    Empty,
    /// An SVID's `spiffe_id` field does not parse.
    #[error("the workload api returned an svid with spiffe id `{id}`: {source}")]
    BadSpiffeId {
        /// The field.
        id: String,
        /// Why it does not parse.
        source: SpiffeIdError,
    },
    /// The certificate bytes are not a sequence of DER certificates.
    #[error("the workload api returned malformed der for `{id}`: {reason}")]
    BadDer {
        /// Which SVID (or bundle).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The chain is not an X.509-SVID.
    #[error("the workload api returned an invalid x509-svid for `{id}`: {source}")]
    BadSvid {
        /// Which SVID.
        id: String,
        /// Why it is invalid.
        source: X509SvidError,
    },
    /// The chain's SPIFFE ID is not the one the field names.
    #[error("the workload api returned an svid for `{found}` labelled `{id}`")]
    Mislabelled {
        /// The field.
        id: String,
        /// The certificate's ID.
        found: SpiffeId,
    },
    /// The key does not parse.
    #[error("the workload api returned an unusable key for `{id}`: {source}")]
    BadKey {
        /// Which SVID.
        id: String,
        /// Why it does not parse.
        source: KeyError,
    },
    /// The key is not the leaf certificate's.
    #[error("the workload api returned a key that does not match the svid of `{0}`")]
    KeyMismatch(String),
    /// The bundle does not parse.
    #[error("the workload api returned an invalid bundle: {0}")]
    BadBundle(#[from] BundleError),
}

/// Connects to the Workload API on the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<SpiffeWorkloadApiClient<Channel>, ClientError> {
    Ok(SpiffeWorkloadApiClient::new(channel(path).await?))
}

/// A gRPC channel to the agent socket at `path` (for the Workload API or SDS clients).
pub async fn channel(path: &Path) -> Result<Channel, ClientError> {
    let socket = path.to_path_buf();
    // The URI is required by the HTTP/2 client but never dialled: the connector below is.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(channel)
}

/// `message` as a request carrying the `workload.spiffe.io: true` metadata.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// The SVIDs of one `FetchX509SVID` message, each checked: the chain parses as an X.509-SVID
/// for the ID it is labelled with, the key is the leaf's, the bundle parses. The first is the
/// default identity.
pub fn parse_x509_response(
    response: &pb::X509svidResponse,
) -> Result<Vec<FetchedSvid>, ClientError> {
    if response.svids.is_empty() {
        return Err(ClientError::Empty);
    }
    response.svids.iter().map(parse_svid).collect()
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle` fields).
pub fn split_der(id: &str, der: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let mut certs = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        let (after, _) = X509Certificate::from_der(rest).map_err(|e| ClientError::BadDer {
            id: id.to_owned(),
            reason: format!("certificate {}: {e}", certs.len()),
        })?;
        let one = rest.get(..rest.len() - after.len()).unwrap_or_default();
        certs.push(CertificateDer::from(one.to_vec()));
        rest = after;
    }
    if certs.is_empty() {
        return Err(ClientError::BadDer {
            id: id.to_owned(),
            reason: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn parse_svid(svid: &pb::X509svid) -> Result<FetchedSvid, ClientError> {
    let id = svid.spiffe_id.as_str();
    let spiffe_id = SpiffeId::parse(id).map_err(|source| ClientError::BadSpiffeId {
        id: id.to_owned(),
        source,
    })?;
    let chain = split_der(id, &svid.x509_svid)?;
    let parsed = X509Svid::parse_chain(chain).map_err(|source| ClientError::BadSvid {
        id: id.to_owned(),
        source,
    })?;
    if *parsed.spiffe_id() != spiffe_id {
        return Err(ClientError::Mislabelled {
            id: id.to_owned(),
            found: parsed.spiffe_id().clone(),
        });
    }
    let key =
        SvidKey::from_pkcs8_der(&svid.x509_svid_key).map_err(|source| ClientError::BadKey {
            id: id.to_owned(),
            source,
        })?;
    if !leaf_matches_key(&parsed, &key) {
        return Err(ClientError::KeyMismatch(id.to_owned()));
    }
    let bundle = TrustBundle::from_der_concat(spiffe_id.trust_domain(), &svid.bundle)?;
    Ok(FetchedSvid {
        svid: parsed,
        key,
        bundle,
        hint: svid.hint.clone(),
    })
}

impl FetchedSvid {
    /// Whether the SVID is valid now.
    pub fn is_current(&self) -> bool {
        self.svid.is_valid_at(SystemTime::now())
    }
}
