//! meshward-tests: end-to-end tests that run real meshward parts and real third-party peers over real
//! sockets on loopback.
//!
//! The scenarios live in `tests/tests/*.rs`; shared start-up code for the CA, agent and proxy processes
//! will live here as those parts arrive.
