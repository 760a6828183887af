//! SVID chain parsing: never panics on arbitrary DER; an accepted leaf has a SPIFFE ID with a path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::x509::X509Svid;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let chain = vec![CertificateDer::from(data.to_vec())];
    if let Ok(svid) = X509Svid::parse_chain(chain) {
        assert!(!svid.spiffe_id().is_trust_domain_id());
    }
});
