//! JWKS loading (federated bundles arrive from other parties): never panics; a loaded bundle
//! re-serializes to a document that loads back to the same keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::TrustDomain;
use meshward_identity::jwt::JwtBundle;

fuzz_target!(|data: &[u8]| {
    let Ok(td) = TrustDomain::new("example.org") else {
        return;
    };
    if let Ok(bundle) = JwtBundle::from_jwks_json(td.clone(), data) {
        let again = JwtBundle::from_jwks_json(td, &bundle.to_jwks_json()).ok();
        assert_eq!(again.map(|b| b.len()), Some(bundle.len()));
    }
});
