//! The mTLS connector: TCP to the upstream, then TLS with the current SVID, verified against the
//! one expected SPIFFE ID. It is a `tower::Service<Uri>` so the pooled hyper client can use it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::demand::{Demand, Live, NotNeeded};
use crate::handshake::{HandshakeError, classify};
use crate::identity_source::IdentityHandle;
use crate::metrics::ProxyMetrics;

/// Connects to one upstream over mTLS. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MtlsConnector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    index: usize,
    upstream: String,
    server_name: ServerName<'static>,
    identity: IdentityHandle,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    metrics: ProxyMetrics,
    /// The pool's demand: pooled connections (made through `tower::Service`) wait for it.
    demand: Arc<Demand>,
}

/// An established mTLS connection to the upstream.
#[derive(Debug)]
pub struct MtlsStream {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
    /// For a pooled connection: counted as live until it is dropped.
    _live: Option<Live>,
}

/// Why the upstream could not be reached or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// This proxy holds no SVID yet.
    #[error("no svid yet: the proxy cannot make mtls connections until the agent provides one")]
    NoSvid,
    /// The TCP connection failed.
    #[error("cannot connect to upstream `{upstream}`: {source}")]
    Connect {
        /// The upstream address.
        upstream: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The TCP connection or the handshake took too long.
    #[error("upstream `{upstream}` did not {stage} within {timeout:?}")]
    Timeout {
        /// The upstream address.
        upstream: String,
        /// `accept the connection` or `finish the tls handshake`.
        stage: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The TLS handshake failed; a wrong upstream identity lands here.
    #[error("upstream `{upstream}` refused: {source}")]
    Handshake {
        /// The upstream address.
        upstream: String,
        /// Why, with the bounded metric reason.
        source: HandshakeError,
    },
    /// A pooled connection attempt that no request needed (see `demand`); it ends unseen.
    #[error("upstream `{upstream}`: {source}")]
    NotNeeded {
        /// The upstream address.
        upstream: String,
        /// How long it waited.
        source: NotNeeded,
    },
}

impl MtlsConnector {
    /// A connector for `upstream` (`host:port`) using the `index`th client config of the
    /// current identity.
    pub fn new(
        index: usize,
        upstream: String,
        identity: IdentityHandle,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        metrics: ProxyMetrics,
    ) -> Self {
        let host = upstream
            .rsplit_once(':')
            .map_or(upstream.as_str(), |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        // The name is only sent as SNI (an IP sends none); the verifier checks the SPIFFE ID.
        let server_name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        Self {
            inner: Arc::new(Inner {
                index,
                upstream,
                server_name,
                identity,
                connect_timeout,
                handshake_timeout,
                metrics,
                demand: Demand::new(),
            }),
        }
    }

    /// The pool's demand for connections: requests through the pool count in it.
    pub fn demand(&self) -> &Arc<Demand> {
        &self.inner.demand
    }

    /// A connection for the pool: made once one is needed, and counted while it lives.
    async fn connect_pooled(&self) -> Result<MtlsStream, ConnectError> {
        let inner = &self.inner;
        let wait = inner.connect_timeout + inner.handshake_timeout;
        let attempt =
            inner
                .demand
                .attempt(wait)
                .await
                .map_err(|source| ConnectError::NotNeeded {
                    upstream: inner.upstream.clone(),
                    source,
                })?;
        let mut stream = self.connect().await?;
        stream._live = Some(attempt.connected(stream.h2));
        Ok(stream)
    }

    /// Connects and handshakes once, now (for a TCP relay: not counted in the pool's demand).
    pub async fn connect(&self) -> Result<MtlsStream, ConnectError> {
        let inner = &self.inner;
        let Some(config) = inner
            .identity
            .current()
            .and_then(|state| state.client_config(inner.index).cloned())
        else {
            inner
                .metrics
                .tls_failure(crate::metrics::TlsFailure::NoSvid);
            return Err(ConnectError::NoSvid);
        };
        let upstream = || inner.upstream.clone();
        let tcp = tokio::time::timeout(inner.connect_timeout, TcpStream::connect(&inner.upstream))
            .await
            .map_err(|_| ConnectError::Timeout {
                upstream: upstream(),
                stage: "accept the connection",
                timeout: inner.connect_timeout,
            })?
            .map_err(|source| ConnectError::Connect {
                upstream: upstream(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            inner.handshake_timeout,
            TlsConnector::from(config).connect(inner.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| {
            inner
                .metrics
                .tls_failure(crate::metrics::TlsFailure::HandshakeTimeout);
            ConnectError::Timeout {
                upstream: upstream(),
                stage: "finish the tls handshake",
                timeout: inner.handshake_timeout,
            }
        })?
        .map_err(|e| {
            let source = classify(&e);
            inner.metrics.tls_failure(source.reason);
            ConnectError::Handshake {
                upstream: upstream(),
                source,
            }
        })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(MtlsStream {
            io: TokioIo::new(tls),
            h2,
            _live: None,
        })
    }
}

impl MtlsStream {
    /// The TLS stream, for relaying raw bytes.
    pub fn into_inner(self) -> TlsStream<TcpStream> {
        self.io.into_inner()
    }
}

impl tower::Service<Uri> for MtlsConnector {
    type Response = MtlsStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<MtlsStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    // The URI is ignored: this connector only ever dials its one upstream.
    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect_pooled().await })
    }
}

impl Connection for MtlsStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
