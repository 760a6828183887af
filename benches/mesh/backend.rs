//! The backend both pairs forward to: a tiny hyper server (HTTP/1.1 keep-alive, and HTTP/2 with
//! prior knowledge) answering `200 ok` to everything, on one thread. It runs in its own process
//! (this bench binary re-executed with `MESHWARD_BENCH_ROLE=backend`) and is measured alone too,
//! to show it is not the bottleneck.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use http::Response;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The environment variable that turns this binary into the backend.
pub const ROLE_ENV: &str = "MESHWARD_BENCH_ROLE";
/// The address the backend listens on.
pub const LISTEN_ENV: &str = "MESHWARD_BENCH_LISTEN";

/// The backend process's `main`.
pub fn main() -> ExitCode {
    let addr: SocketAddr = match std::env::var(LISTEN_ENV).ok().and_then(|a| a.parse().ok()) {
        Some(addr) => addr,
        None => {
            eprintln!("backend: set `{LISTEN_ENV}` to an address");
            return ExitCode::from(64);
        }
    };
    run_child("backend", serve(addr))
}

/// Runs `serve` on a current-thread runtime as the `main` of a child process named `role`: exit 0
/// when it returns, 1 with the error on stderr when it fails.
pub fn run_child(role: &str, serve: impl Future<Output = std::io::Result<()>>) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|runtime| runtime.block_on(serve));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{role}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}
