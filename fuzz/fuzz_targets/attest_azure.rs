//! The Azure vTPM evidence parsers (HCL report, var JSON, bundle) behind Attest: never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weightvault::attest::azure::fuzz_parse(data);
});
