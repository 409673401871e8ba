//! Audit-side parsers an auditor feeds with untrusted files: entries, checkpoints, signed notes,
//! tlog proofs. Never panic; a decoded entry is canonical (re-encodes to the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightvault::audit::AuditEntry;
use weightvault::audit::checkpoint::Checkpoint;
use weightvault::audit::note::{NoteVerifier, open};
use weightvault::audit::proof::TlogProof;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = AuditEntry::decode(data) {
        assert_eq!(e.encode(), data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cp) = Checkpoint::parse(text) {
            assert_eq!(Checkpoint::parse(&cp.to_text()).as_ref(), Ok(&cp));
        }
        let _ = TlogProof::parse(text);
        let _ = NoteVerifier::from_vkey(text);
        if let Ok(v) = NoteVerifier::from_vkey("example.com/foo+530d903a+AVr5sQpOdQoPNG6j6Ot52dYThhpbOr0oTxPHDFr3Ioik") {
            let _ = open(text, &[v]);
        }
    }
});
