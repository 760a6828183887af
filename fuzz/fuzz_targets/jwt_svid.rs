//! JWT-SVID validation against a real bundle: arbitrary tokens never panic and never validate.
#![no_main]

use std::sync::LazyLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use meshward_identity::TrustDomain;
use meshward_identity::jwt::{JwtBundle, JwtBundleSet, JwtSigningKey, JwtSvid};

static BUNDLES: LazyLock<Option<JwtBundleSet>> = LazyLock::new(|| {
    let key = JwtSigningKey::generate().ok()?;
    let mut bundle = JwtBundle::new(TrustDomain::new("example.org").ok()?);
    bundle.insert(key.public_jwk());
    Some([bundle].into_iter().collect())
});

fuzz_target!(|data: &[u8]| {
    let (Ok(token), Some(bundles)) = (std::str::from_utf8(data), BUNDLES.as_ref()) else {
        return;
    };
    // The key's private half was dropped, so no input can carry a valid signature.
    assert!(JwtSvid::validate(token, "aud", bundles, SystemTime::now()).is_err());
    let _ = JwtSvid::parse_insecure(token);
});
