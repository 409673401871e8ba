//! The seal state read back from the metadata store (`seal/state/v1`, JSON) and the seal name an
//! admin passes to `Rekey --to`: never panic; a decoded state re-encodes to a state that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightvault::keys::seal::{SealKind, SealState};

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = SealState::decode(data) {
        let again = SealState::decode(&state.encode()).expect("re-encoded state decodes");
        assert_eq!(again, state);
        let _ = state.generation_bytes();
    }
    if let Ok(name) = std::str::from_utf8(data)
        && let Some(kind) = SealKind::parse(name)
    {
        assert_eq!(kind.as_str(), name);
    }
});
