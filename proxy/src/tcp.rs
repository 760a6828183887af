//! Plain TCP relaying: bytes both ways until either side closes, or the drain grace runs out.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::server::Drain;

/// Copies between `a` and `b` until both directions are closed, or `drain`'s hard stop fires.
///
/// A graceful shutdown does not cut a relay short: a TCP stream has no request boundary to
/// stop at, so it gets the whole grace period.
pub async fn relay<A, B>(a: &mut A, b: &mut B, drain: &Drain)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional(a, b) => match result {
            Ok((up, down)) => debug!(bytes_in = up, bytes_out = down, "tcp relay closed"),
            Err(e) => debug!(error = %e, "tcp relay failed"),
        },
        () = drain.hard.cancelled() => debug!("tcp relay cut at the end of the drain grace"),
    }
}
