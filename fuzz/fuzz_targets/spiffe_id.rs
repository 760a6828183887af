//! SPIFFE ID parsing: never panics; anything accepted displays as exactly its input and re-parses equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(SpiffeId::parse(&id.to_string()).ok(), Some(id.clone()));
        assert!(id.segments().all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
    }
    if let Ok(td) = s.parse::<TrustDomain>() {
        assert_eq!(td.id().trust_domain(), td);
    }
});
