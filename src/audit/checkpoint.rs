//! C2SP tlog-checkpoint: the signed statement "the log `origin` has `size` entries with Merkle
//! root `root`". The body is parsed strictly so that every accepted text re-encodes to the same
//! bytes; signing and opening go through [`super::note`].
//!
//! Origin rule: C2SP says the log's key name SHOULD match the origin line. The vault makes it a
//! MUST: [`sign_checkpoint`] refuses a checkpoint whose origin is not the signer's name, and
//! [`open_checkpoint`] accepts a checkpoint only if a trusted key named like its origin signed it.
//! A signature from another trusted key (say, a second log) does not vouch for this origin.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::merkle::{Hash, empty_root};
use super::note::{NoteError, NoteSigner, NoteVerifier, open};

/// A checkpoint body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity; the name of the key that signs it.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 9162 `MTH` of the first `size` leaves.
    pub root: Hash,
    /// Opaque extension lines, each non-empty, without the newline. C2SP: NOT RECOMMENDED.
    pub extensions: Vec<String>,
}

/// Why a checkpoint was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint must end with a newline")]
    MissingFinalNewline,
    #[error("checkpoint contains a control character")]
    ControlCharacter,
    #[error("checkpoint needs an origin, a size and a root hash line")]
    TooFewLines,
    #[error("checkpoint origin is empty")]
    EmptyOrigin,
    #[error("checkpoint tree size is not a canonical decimal u64")]
    BadSize,
    #[error("checkpoint root is not the standard base64 of 32 bytes")]
    BadRoot,
    #[error("checkpoint of size 0 must carry the empty-tree root")]
    EmptyTreeRoot,
    #[error("checkpoint extension line is empty")]
    EmptyExtension,
    #[error("checkpoint origin {origin:?} is not signed by a trusted key of that name")]
    OriginNotSigned { origin: String },
    #[error(transparent)]
    Note(#[from] NoteError),
}

impl Checkpoint {
    /// The note text: `origin\nsize\nbase64(root)\n`, then each extension line and a newline.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        );
        for ext in &self.extensions {
            text.push_str(ext);
            text.push('\n');
        }
        text
    }

    /// Parses a checkpoint body (the note text, not the signed note).
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        // C2SP tlog-checkpoint: lines separated by newlines; as a signed-note text it ends in one
        // and has no other control characters.
        let body = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::MissingFinalNewline)?;
        if body.chars().any(|c| c < ' ' && c != '\n') {
            return Err(CheckpointError::ControlCharacter);
        }
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(CheckpointError::TooFewLines);
        };
        // C2SP tlog-checkpoint: the origin MUST be non-empty.
        if origin.is_empty() {
            return Err(CheckpointError::EmptyOrigin);
        }
        let size = parse_size(size).ok_or(CheckpointError::BadSize)?;
        // C2SP tlog-checkpoint: standard base64 of the RFC 6962 root; SHA-256, so 32 bytes. The
        // engine rejects non-canonical padding and trailing bits, so the encoding is unique.
        let root: Hash = STANDARD
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(CheckpointError::BadRoot)?;
        // RFC 9162 §2.1.1: MTH({}) = SHA-256().
        if size == 0 && root != empty_root() {
            return Err(CheckpointError::EmptyTreeRoot);
        }
        // C2SP tlog-checkpoint: extension lines, if any, MUST be non-empty.
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(CheckpointError::EmptyExtension);
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }
}

// C2SP tlog-checkpoint: ASCII decimal with no leading zeroes ("0" for the empty tree). Rust's
// `u64::from_str` alone would also accept a leading '+'.
fn parse_size(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Signs `cp` as a C2SP signed note. The origin must be the signer's key name and the checkpoint
/// must be well-formed (it must parse back to itself), so that [`open_checkpoint`] accepts it.
pub fn sign_checkpoint(signer: &NoteSigner, cp: &Checkpoint) -> Result<String, NoteError> {
    if cp.origin != signer.name() {
        return Err(NoteError::InvalidText(
            "checkpoint origin must be the signer's key name",
        ));
    }
    let text = cp.to_text();
    if Checkpoint::parse(&text).as_ref() != Ok(cp) {
        return Err(NoteError::InvalidText("not a well-formed checkpoint"));
    }
    signer.sign(&text)
}

/// Opens a signed checkpoint: the note must carry a valid signature from a key in `verifiers`
/// whose name equals the checkpoint's origin (see the module doc), and the body must parse.
pub fn open_checkpoint(
    note: &str,
    verifiers: &[NoteVerifier],
) -> Result<Checkpoint, CheckpointError> {
    let (text, signers) = open(note, verifiers)?;
    let cp = Checkpoint::parse(&text)?;
    // C2SP tlog-checkpoint: the log's key name SHOULD match the origin; the vault requires it.
    if !signers.contains(&cp.origin) {
        return Err(CheckpointError::OriginNotSigned { origin: cp.origin });
    }
    Ok(cp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::leaf_hash;
    use aws_lc_rs::signature::Ed25519KeyPair;

    fn signer(name: &str, seed: u8) -> NoteSigner {
        NoteSigner::new(
            name,
            Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap(),
        )
        .unwrap()
    }

    fn cp(origin: &str) -> Checkpoint {
        Checkpoint {
            origin: origin.into(),
            size: 42,
            root: leaf_hash(b"x"),
            extensions: vec!["ext one".into()],
        }
    }

    #[test]
    fn text_round_trips() {
        let c = cp("example.com/log");
        let text = c.to_text();
        assert!(text.starts_with("example.com/log\n42\n"));
        assert!(text.ends_with("=\next one\n"));
        assert_eq!(Checkpoint::parse(&text), Ok(c));
    }

    #[test]
    fn strict_body() {
        let root = STANDARD.encode(leaf_hash(b"x"));
        let empty = STANDARD.encode(empty_root());
        let cases = [
            (
                format!("o\n1\n{root}"),
                CheckpointError::MissingFinalNewline,
            ),
            (format!("o\n01\n{root}\n"), CheckpointError::BadSize),
            (format!("o\n+1\n{root}\n"), CheckpointError::BadSize),
            (format!("o\n 1\n{root}\n"), CheckpointError::BadSize),
            (format!("o\n\n{root}\n"), CheckpointError::BadSize),
            (
                "o\n18446744073709551616\nAA==\n".into(),
                CheckpointError::BadSize,
            ),
            (format!("o\n1\n{root}\n\n"), CheckpointError::EmptyExtension),
            (
                format!("o\n1\n{root}\r\n"),
                CheckpointError::ControlCharacter,
            ),
            (format!("o\n1\n{}\n", &root[..43]), CheckpointError::BadRoot),
            (format!("o\n0\n{root}\n"), CheckpointError::EmptyTreeRoot),
            ("o\n1\n".into(), CheckpointError::TooFewLines),
        ];
        for (text, want) in cases {
            assert_eq!(Checkpoint::parse(&text), Err(want), "{text:?}");
        }
        let zero = Checkpoint::parse(&format!("o\n0\n{empty}\n")).unwrap();
        assert_eq!(zero.size, 0);
        let max = Checkpoint::parse(&format!("o\n18446744073709551615\n{root}\n")).unwrap();
        assert_eq!(max.size, u64::MAX);
    }

    #[test]
    fn sign_and_open() {
        let s = signer("example.com/log", 9);
        let note = sign_checkpoint(&s, &cp("example.com/log")).unwrap();
        assert_eq!(
            open_checkpoint(&note, &[s.verifier()]),
            Ok(cp("example.com/log"))
        );

        // The origin must be the signer's name, both ways.
        assert!(sign_checkpoint(&s, &cp("other")).is_err());
        let other = signer("other", 9);
        let note = other.sign(&cp("example.com/log").to_text()).unwrap();
        assert_eq!(
            open_checkpoint(&note, &[other.verifier()]),
            Err(CheckpointError::OriginNotSigned {
                origin: "example.com/log".into()
            })
        );

        // Not canonical: would not parse back.
        let mut bad = cp("example.com/log");
        bad.extensions.push(String::new());
        assert!(sign_checkpoint(&s, &bad).is_err());
        bad.extensions = vec!["a\nb".into()];
        assert!(sign_checkpoint(&s, &bad).is_err());
    }
}
