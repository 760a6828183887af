//! meshward-proxy: the sidecar that puts mTLS and a Cedar decision in front of every call.
//!
//! What it trusts: the agent's Workload API for its own SVID and trust bundles, and the
//! policy directories it is pointed at. Everything arriving on a listener is outside input.
//!
//! Read first: [`authz`] (how a request is decided, and why errors deny), [`normalize`] (the
//! one canonical form of a path and host, shared by deciding and forwarding), and
//! [`policy_store`] (hot reload: a bad policy set never replaces a good one).
//!
//! Then the data path: [`server`] (start-up, tasks, drain), [`identity_source`] (the SVID from
//! the agent, prebuilt into rustls configs and swapped on rotation), [`inbound`] (mTLS in,
//! decide every request, forward with XFCC), [`outbound`] (plain in, mTLS out to an expected
//! upstream), [`audit_sink`] and [`metrics`].
//!
//! [`cli`] is the command line of `meshward proxy run` and of the sidecar-only binary
//! `meshward-proxy run` (src/main.rs).

pub mod admin;
pub mod audit_sink;
pub mod authz;
pub mod cli;
pub mod config;
pub mod handshake;
pub mod hop_by_hop;
pub mod identity_source;
pub mod inbound;
pub mod metrics;
pub mod normalize;
pub mod outbound;
pub mod policy_store;
pub mod runtime;
pub mod server;
pub mod tcp;
pub mod xfcc;

pub use config::ProxyConfig;
pub use runtime::runtime;
pub use server::{ProxyError, RunningProxy, run, start};
