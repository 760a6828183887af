//! meshward-ca: the mesh certificate authority.
//!
//! It attests node agents (join tokens, or Kubernetes PSATs with `--k8s`), then signs workload SVIDs
//! for them, but only for identities an entry (or, in Kubernetes, a running pod) entitles on the
//! agent's node: a compromised node can mint only what runs on it.
//!
//! - Trusts: its own keys (`D/keys/`, 0600), its SQLite state (`D/ca.sqlite3`), and nothing a peer sends
//!   until it is checked: join tokens are single use, CSRs are verified and their extensions ignored, and
//!   agents are authorized from their mTLS certificate on every call.
//! - Talks to: agents over gRPC + TLS (`service`, `meshward.ca.v1.Ca`), operators over the admin unix
//!   socket (`admin`, `meshward.ca.v1.Admin`), Prometheus over the admin HTTP port (`http`, `metrics`).
//! - Writes: one audit record per issuance or refusal to `D/audit.jsonl` (hash-chained).
//!
//! Read first: `issuer` (every issuance rule), then `keystore` (roots, rotation), then `server`.

pub mod admin;
pub mod config;
pub mod datastore;
pub mod http;
pub mod issuer;
pub mod k8s;
pub mod keystore;
pub mod metrics;
pub mod server;
pub mod service;
pub mod webhook;

pub use server::run;
