//! Audit file verification: arbitrary bytes (a damaged or hostile file) never panic the reader or verifier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::audit::{Anchor, AuditReader, verify_records};

fuzz_target!(|data: &[u8]| {
    let reader = AuditReader::new(std::io::BufReader::new(data));
    let _ = verify_records(reader, &Anchor::default());
});
