//! The Shamir share text an unauthenticated caller submits to `OperatorService.Unseal` (and an
//! admin to `Rekey`/`RekeyCommit`): never panics, and a share that parses has one text form
//! (re-encoding gives back the trimmed input), so no second spelling of a share exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightvault::keys::shamir::Share;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(share) = Share::parse(text) {
        assert_eq!(&*share.to_text(), text.trim());
        assert_ne!(share.x, 0);
        assert!(share.threshold >= 2);
    }
});
