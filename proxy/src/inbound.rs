//! Inbound: mTLS from peers, a Cedar decision, then the local app.
//!
//! Each connection reads the current [`TlsState`](crate::identity_source::TlsState) once, at
//! accept: its server config (client certificate required, verified by the identity crate's
//! `PeerVerifier` in the client role) and our own SPIFFE ID, the resource of every decision on
//! the connection. The verified peer ID, its leaf hash (for XFCC) and the TLS facts are worked
//! out once per connection too; per request only the request itself is normalized and decided.
//!
//! A failure on one connection (handshake, parse, app) ends that connection only; the accept
//! loop goes on. HTTP requests are handled in [`request`], TCP connections in [`connect`].

mod connect;
mod request;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::SpiffeId;
use meshward_identity::verify::peer_spiffe_id;
use ring::digest;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::audit_sink::AuditSink;
use crate::authz::TlsFacts;
use crate::config::{InboundListener, Limits, Protocol};
use crate::handshake::{self, HandshakeError};
use crate::identity_source::IdentityHandle;
use crate::metrics::{ProxyMetrics, TlsFailure};
use crate::policy_store::PolicyStore;
use crate::server::Drain;

pub(crate) use self::request::text;
pub use self::request::{AppClient, ProxyBody, app_client};

/// What every inbound connection of one listener shares.
#[derive(Debug)]
pub struct Inbound {
    /// The listener's settings.
    pub spec: InboundListener,
    /// Identity for the handshake and the decision's resource.
    pub identity: IdentityHandle,
    /// The policy sets in force.
    pub policies: PolicyStore,
    /// Where decisions are recorded.
    pub audit: AuditSink,
    /// Counters.
    pub metrics: ProxyMetrics,
    /// Sizes and timeouts.
    pub limits: Limits,
    /// The pooled plain HTTP/1.1 client to the app.
    pub app: AppClient,
    builders: request::Builders,
    app_authority: ::http::uri::Authority,
}

/// One accepted, verified connection: who is calling whom, over what.
#[derive(Debug)]
struct Peer {
    id: SpiffeId,
    us: SpiffeId,
    leaf_sha256: [u8; 32],
    source_ip: IpAddr,
    tls: TlsFacts,
    sni: Option<String>,
}

impl Inbound {
    /// Everything a listener needs; build once per listener.
    pub fn new(
        spec: InboundListener,
        identity: IdentityHandle,
        policies: PolicyStore,
        audit: AuditSink,
        metrics: ProxyMetrics,
        limits: Limits,
    ) -> Self {
        Self {
            app: app_client(limits.connect_timeout, limits.app_idle_timeout),
            app_authority: request::app_authority(spec.app),
            builders: request::Builders::new(&limits),
            spec,
            identity,
            policies,
            audit,
            metrics,
            limits,
        }
    }

    /// Accepts connections until the drain starts; each is served on its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        // Until the first SVID arrives there is nothing to handshake with; connections wait in
        // the kernel's backlog rather than being refused.
        tokio::select! {
            () = drain.stop.cancelled() => return,
            state = self.identity.ready() => if state.is_none() { return },
        }
        loop {
            let (tcp, addr) = tokio::select! {
                () = drain.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, never give up.
                        warn!(listen = %self.spec.listen, error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = Arc::clone(&self);
            let conn_drain = drain.clone();
            drain
                .tracker
                .spawn(async move { this.connection(tcp, addr, conn_drain).await });
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: Drain) {
        let _ = tcp.set_nodelay(true);
        let Some(state) = self.identity.current() else {
            self.metrics.tls_failure(TlsFailure::NoSvid);
            return;
        };
        let acceptor = TlsAcceptor::from(Arc::clone(state.server_config(self.spec.protocol)));
        let handshake = tokio::select! {
            result = handshake::accept(acceptor, tcp, self.limits.handshake_timeout) => result,
            () = drain.stop.cancelled() => return,
        };
        let stream = match handshake {
            Ok(stream) => stream,
            Err(e) => return self.refused(addr, &e),
        };
        let (_, session) = stream.get_ref();
        let Some(leaf) = handshake::peer_leaf(session) else {
            // Unreachable with a verifier that makes client auth mandatory; fail closed anyway.
            return self.refused(
                addr,
                &HandshakeError {
                    reason: TlsFailure::NoCertificate,
                    detail: "peer presented no certificate".to_owned(),
                },
            );
        };
        let id = match peer_spiffe_id(std::slice::from_ref(leaf)) {
            Ok(id) => id,
            Err(e) => {
                return self.refused(
                    addr,
                    &HandshakeError {
                        reason: TlsFailure::BadCertificate,
                        detail: e.to_string(),
                    },
                );
            }
        };
        let mut leaf_sha256 = [0u8; 32];
        leaf_sha256.copy_from_slice(digest::digest(&digest::SHA256, leaf).as_ref());
        let peer = Peer {
            id,
            us: state.id().clone(),
            leaf_sha256,
            source_ip: addr.ip(),
            tls: handshake::tls_facts(session),
            sni: session.server_name().map(str::to_owned),
        };
        drop(state);
        debug!(peer = %peer.id, source = %addr, tls = %peer.tls.version, alpn = %peer.tls.alpn, "inbound connection");
        match self.spec.protocol {
            Protocol::Http => request::serve(self, stream, peer, drain).await,
            Protocol::Tcp => connect::serve(&self, stream, peer, &drain).await,
        }
    }

    fn refused(&self, addr: SocketAddr, e: &HandshakeError) {
        self.metrics.tls_failure(e.reason);
        debug!(source = %addr, reason = e.reason.as_str(), error = %e.detail, "inbound handshake refused");
    }
}
