//! What the CA's integration tests and benchmarks share: a gRPC channel over the CA's mTLS port, and
//! the trust bundle as an operator fetches it from the admin socket.
//!
//! Included with `mod support;` (benches: `#[path = "../tests/support/mod.rs"]`), so each test crate
//! compiles its own copy.

// Each test crate or bench that includes this uses only some of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use meshward_identity::bundle::TrustBundle;
use meshward_identity::proto::ca as pb;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// An HTTP/2 channel to the CA at `addr` over TLS with `config` (ALPN `h2` is set here), with
/// Nagle off as the agent's is. Panics when the CA cannot be reached: the test cannot go on.
pub async fn tls_channel(addr: SocketAddr, mut config: ClientConfig) -> Channel {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    // The URI is required by tonic but unused: the connector dials `addr` itself.
    Endpoint::from_static("http://ca.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("ca.invalid").map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the ca at {addr}: {e}"))
}

/// The bundle as an operator would fetch it (`meshward ca bundle show`) from the admin socket.
pub async fn admin_bundle(admin_socket: &Path) -> TrustBundle {
    let bundle = meshward_ca::admin::connect(admin_socket)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the admin socket: {e}"))
        .show_bundle(pb::ShowBundleRequest {})
        .await
        .unwrap_or_else(|e| panic!("show_bundle failed: {e}"))
        .into_inner();
    bundle_of(&bundle)
}

/// A bundle message as a [`TrustBundle`].
fn bundle_of(bundle: &pb::Bundle) -> TrustBundle {
    let td = bundle
        .trust_domain
        .parse()
        .unwrap_or_else(|e| panic!("bad trust domain: {e}"));
    let mut out = TrustBundle::new(td);
    for der in &bundle.x509_authorities {
        out.add_authority(CertificateDer::from(der.as_slice()))
            .unwrap_or_else(|e| panic!("bad authority: {e}"));
    }
    out
}
