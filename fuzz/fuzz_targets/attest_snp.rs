//! The snp evidence parsers (bundle and inner structures) behind Attest: never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightvault::attest::snp::fuzz_parse(data);
});
