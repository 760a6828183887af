//! Generated gRPC types and services.
//!
//! [`workload`] is the SPIFFE Workload API exactly as the standard defines it (no proto package, so its
//! service path is `/SpiffeWorkloadAPI/<Method>`); [`ca`] is meshward's own agent-to-CA and admin API.

/// The SPIFFE Workload API (`workload.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// meshward's CA API (`meshward.ca.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod ca {
    include!(concat!(env!("OUT_DIR"), "/meshward.ca.v1.rs"));
}

#[cfg(test)]
mod tests;
