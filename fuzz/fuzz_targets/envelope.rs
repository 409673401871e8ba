//! Envelope header and manifest parsers: never panic; what parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightvault::envelope::Header;
use weightvault::envelope::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    if let Ok(m) = Manifest::from_bytes(data) {
        assert_eq!(m.to_bytes(), data);
    }
});
