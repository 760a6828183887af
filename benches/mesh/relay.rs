//! A TCP relay: the least any sidecar can do. It accepts a connection, connects to its upstream
//! and copies bytes both ways (tokio's `copy_bidirectional`, one thread): no TLS, no HTTP, no
//! decision, no audit. A pair of relays in the sidecars' places, on the same CPU as the sidecars,
//! makes exactly the crossings, wake-ups and system calls per request that a sidecar pair cannot
//! avoid here (one `epoll_wait`, one read and one write per sidecar run), so its latency is a
//! lower bound for any two-sidecar pair in this topology on this machine. It runs in its own
//! process (this bench binary re-executed with `MESHWARD_BENCH_ROLE=relay`).

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::{TcpListener, TcpStream};

/// The address the relay forwards to (it listens on `backend::LISTEN_ENV`).
pub const UPSTREAM_ENV: &str = "MESHWARD_BENCH_UPSTREAM";

/// The relay process's `main`.
pub fn main() -> ExitCode {
    let addr = |name: &str| -> Option<SocketAddr> { std::env::var(name).ok()?.parse().ok() };
    let (Some(listen), Some(upstream)) = (addr(crate::backend::LISTEN_ENV), addr(UPSTREAM_ENV))
    else {
        eprintln!(
            "relay: set `{}` and `{UPSTREAM_ENV}` to addresses",
            crate::backend::LISTEN_ENV
        );
        return ExitCode::from(64);
    };
    crate::backend::run_child("relay", serve(listen, upstream))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut outbound = match TcpStream::connect(upstream).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    eprintln!("relay: connect to {upstream}: {e}");
                    return;
                }
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}
