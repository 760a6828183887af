//! How many mTLS connections the outbound pool needs, so that a burst of waiting requests does not
//! start a handshake each.
//!
//! hyper's pooled client races two things for every request that finds no idle connection: the
//! pool (another request finishing and handing its connection over) and a new connection. When
//! the pool wins, the new connection is still made, in the background. After a stall (the upstream
//! paused, the node busy), every request that queued behind it has started a handshake: 60 of
//! them for a 30 ms stall at 2,000 requests per second, each a full mTLS handshake (resumption is
//! off, see `meshward_identity::tls`) on the CPUs that must also catch up with the queue. The
//! stall grew to 73 ms that way in the proxy bench (docs/benchmarks.md, "Stalls, session 8").
//!
//! [`Demand`] makes a connection attempt wait until it is needed: until the requests in flight
//! outnumber the live connections plus those being made. Attempts go [`MAX_CONNECTING`] at a time
//! while no connection is live (a cold start), one at a time once one is: a busy connection is
//! free again after one response, which is sooner than a handshake on a CPU that is catching up.
//! With that, the 30 ms stall grew to 38 ms instead of 73 ms, and 5 to 7 connections were made
//! instead of about 60 (Envoy: 53 ms).
//!
//! A request in flight counts until its response body is done, which is when an HTTP/1.1
//! connection is free again. An HTTP/2 connection carries every request, so while one is live
//! none is needed. An attempt that is not needed waits for a change (a request starting, a
//! connection closing, an attempt ending) and gives up after the time a connection attempt may
//! take anyway; by then the request it was started for has long been served by a pooled
//! connection, and only the background attempt ends, quietly.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most connection attempts (TCP connect and TLS handshake) to one upstream at once, while none is
/// live; once one is, attempts go one at a time.
pub const MAX_CONNECTING: usize = 4;

/// The outbound pool's demand for connections. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct Demand {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct State {
    /// Requests sent or waiting, until their response body is done.
    in_flight: usize,
    /// Live HTTP/1.1 connections.
    live_h1: usize,
    /// Live HTTP/2 connections.
    live_h2: usize,
    /// Attempts under way.
    connecting: usize,
}

impl State {
    fn needed(&self) -> bool {
        // With connections live, one attempt at a time (see the module docs).
        let most = if self.live_h1 == 0 { MAX_CONNECTING } else { 1 };
        self.live_h2 == 0
            && self.connecting < most
            && self.live_h1 + self.connecting < self.in_flight
    }
}

/// No connection was needed for as long as an attempt may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no new connection was needed within {0:?}: the pooled ones carried every request")]
pub struct NotNeeded(pub Duration);

impl Demand {
    /// No requests, no connections.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain counters, consistent after every update: a panic elsewhere cannot
        // leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request is about to be sent: it counts until the returned guard is dropped (with its
    /// response body).
    pub fn request(self: &Arc<Self>) -> InFlight {
        let needed = {
            let mut state = self.lock();
            state.in_flight += 1;
            state.needed()
        };
        if needed {
            self.changed.notify_one();
        }
        InFlight {
            demand: Arc::clone(self),
        }
    }

    /// Waits until a new connection is needed (see the module docs), at most `wait`.
    pub async fn attempt(self: &Arc<Self>, wait: Duration) -> Result<Attempt, NotNeeded> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a change between the two is not missed.
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.needed() {
                    state.connecting += 1;
                    return Ok(Attempt {
                        demand: Arc::clone(self),
                        connected: false,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(NotNeeded(wait));
            }
        }
    }

    /// Something that may make a connection needed happened: let one waiting attempt look.
    fn changed(&self) {
        self.changed.notify_one();
    }

    #[cfg(test)]
    fn snapshot(&self) -> State {
        *self.lock()
    }
}

/// A request in flight (see [`Demand::request`]).
#[derive(Debug)]
pub struct InFlight {
    demand: Arc<Demand>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Fewer requests never make a connection needed: nobody to wake.
        let mut state = self.demand.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
    }
}

/// A connection attempt under way (see [`Demand::attempt`]); dropping it ends the attempt.
#[derive(Debug)]
pub struct Attempt {
    demand: Arc<Demand>,
    /// Set by [`Attempt::connected`], which has counted the attempt out already.
    connected: bool,
}

impl Attempt {
    /// The attempt made a connection: it counts as live until the returned guard is dropped.
    pub fn connected(mut self, h2: bool) -> Live {
        self.connected = true;
        {
            let mut state = self.demand.lock();
            state.connecting = state.connecting.saturating_sub(1);
            if h2 {
                state.live_h2 += 1;
            } else {
                state.live_h1 += 1;
            }
        }
        // An attempt slot is free again.
        self.demand.changed();
        Live {
            demand: Arc::clone(&self.demand),
            h2,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.connected {
            {
                let mut state = self.demand.lock();
                state.connecting = state.connecting.saturating_sub(1);
            }
            self.demand.changed();
        }
    }
}

/// A live pooled connection (see [`Attempt::connected`]).
#[derive(Debug)]
pub struct Live {
    demand: Arc<Demand>,
    h2: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        {
            let mut state = self.demand.lock();
            if self.h2 {
                state.live_h2 = state.live_h2.saturating_sub(1);
            } else {
                state.live_h1 = state.live_h1.saturating_sub(1);
            }
        }
        self.demand.changed();
    }
}

/// The upstream's response body, counting its request as in flight until it is done.
#[derive(Debug)]
pub struct InFlightBody {
    body: Incoming,
    in_flight: Option<InFlight>,
}

impl InFlightBody {
    /// `body`, whose request is `in_flight`.
    pub fn new(body: Incoming, in_flight: InFlight) -> Self {
        Self {
            body,
            in_flight: Some(in_flight),
        }
    }
}

impl Body for InFlightBody {
    type Data = <Incoming as Body>::Data;
    type Error = <Incoming as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            // Done: the connection is the pool's again.
            this.in_flight = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests;
