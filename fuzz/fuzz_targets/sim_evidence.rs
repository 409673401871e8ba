//! The sim TEE evidence parser behind the network-facing Attest call: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightvault::attest::Verifier;
use weightvault::attest::sim::SimVerifier;

fuzz_target!(|data: &[u8]| {
    let v = SimVerifier::new(vec![[7u8; 32]], 60_000);
    let _ = v.verify(data, &[0u8; 64], 1_800_000_000_000);
});
