//! meshward-identity: everything about identity that crosses a process boundary.
//!
//! - [`spiffe_id`]: `SpiffeId` and `TrustDomain`, parsed exactly per the SPIFFE-ID specification.
//! - [`x509`]: X.509-SVID templates, CSRs, and parsing an SVID chain back into its facts.
//! - [`bundle`]: trust bundles (several roots per trust domain, for rotation) with PEM in/out.
//! - [`verify`]: the peer verifier rustls uses on both sides of every mTLS connection.
//! - [`jwt`]: JWT-SVIDs (ES256) and JWT bundles as JWKS.
//! - [`audit`]: the append-only, hash-chained audit log the CA and the proxy both write.
//! - [`proto`]: the SPIFFE Workload API and meshward's CA API.
//!
//! Nothing here talks to the network or the disk except the audit writer; the CA, agent and proxy
//! crates do. Start reading at [`spiffe_id`], then [`verify`].

pub mod audit;
pub mod bundle;
pub mod jwt;
pub mod proto;
pub mod spiffe_id;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod verify;
pub mod x509;

pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
