//! CSR verification (the CA's first look at an agent's bytes): never panics, and whatever it accepts
//! carries a P-256 key and a verified self-signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::x509::verify_csr;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = verify_csr(data) {
        assert!(!csr.public_key_der.is_empty());
    }
});
