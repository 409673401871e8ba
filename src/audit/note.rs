//! C2SP signed-note with Ed25519 (signature type 0x01): signing a text, verifier keys, and
//! opening a note against a set of trusted verifiers. The audit log signs its checkpoints this way.
//!
//! Key strings follow the golang.org/x/mod `sumdb/note` convention, which C2SP does not define:
//! verifier key `name+hex8(key id)+base64(0x01 || public key)`, signer key
//! `PRIVATE+KEY+name+hex8(key id)+base64(0x01 || seed)`.
//!
//! Pure: no I/O. Other signature types (witness cosignatures 0x04, RFC 6962 0x05, ...) are not
//! supported: their verifier keys are rejected and their signature lines count as unknown.

use aws_lc_rs::digest::{Context, SHA256};
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

// C2SP signed-note: signature type identifier byte for Ed25519.
const ALG_ED25519: u8 = 0x01;
// C2SP signed-note: em dash (U+2014) and a space open every signature line.
const SIG_LINE_PREFIX: &str = "\u{2014} ";
// C2SP signed-note: verifiers SHOULD limit the number of signatures and MUST accept at least 16;
// 100 is the golang.org/x/mod limit.
const MAX_SIGNATURES: usize = 100;
const ED25519_KEY_LEN: usize = 32;
const ED25519_SIG_LEN: usize = 64;
const SKEY_PREFIX: &str = "PRIVATE+KEY+";

/// Why a key, a text or a note was rejected. Never carries private key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("invalid key name")]
    InvalidName,
    #[error("invalid note text: {0}")]
    InvalidText(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("malformed note: more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    #[error("invalid verifier key: {0}")]
    BadVerifierKey(&'static str),
    #[error("unsupported signature type 0x{0:02x} in verifier key")]
    UnsupportedKeyType(u8),
    #[error("invalid signer key: {0}")]
    BadSignerKey(&'static str),
    #[error("ambiguous key {name}+{key_id:08x}: more than one verifier matches")]
    AmbiguousKey { name: String, key_id: u32 },
    #[error("invalid signature for key {name}+{key_id:08x}")]
    InvalidSignature { name: String, key_id: u32 },
    #[error("no known signature")]
    NoKnownSignature,
}

// C2SP signed-note: key names are non-empty and contain no Unicode spaces and no '+'. Control
// characters are refused too, since a signed note may not contain them.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

// C2SP signed-note: key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4], big-endian.
fn key_id(name: &str, alg: u8, public_key: &[u8]) -> u32 {
    let mut ctx = Context::new(&SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[alg]);
    ctx.update(public_key);
    let digest = ctx.finish();
    let d = digest.as_ref();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

// The key id as written in key strings: exactly 8 lowercase hex digits.
fn parse_key_id(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

// C2SP signed-note: no ASCII control characters other than newline.
fn has_forbidden_control(s: &str) -> bool {
    s.chars().any(|c| c < ' ' && c != '\n')
}

/// Signs note texts with one Ed25519 key. No `Debug`, no `Clone`: the key pair stays inside.
pub struct NoteSigner {
    name: String,
    key_id: u32,
    key: Ed25519KeyPair,
}

impl NoteSigner {
    /// A signer named `name` (C2SP: non-empty, no spaces, no '+'; RECOMMENDED a schema-less URL).
    pub fn new(name: &str, key: Ed25519KeyPair) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::InvalidName);
        }
        let key_id = key_id(name, ALG_ED25519, key.public_key().as_ref());
        Ok(Self {
            name: name.to_owned(),
            key_id,
            key,
        })
    }

    /// Parses a signer key `PRIVATE+KEY+name+hex8+base64(0x01 || seed)` and checks that its key
    /// id matches the public key derived from the seed.
    pub fn from_skey(skey: &str) -> Result<Self, NoteError> {
        let rest = skey
            .strip_prefix(SKEY_PREFIX)
            .ok_or(NoteError::BadSignerKey("missing PRIVATE+KEY+ prefix"))?;
        // The base64 part may itself contain '+': split into at most three parts.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadSignerKey("wrong number of parts"));
        };
        if !valid_name(name) {
            return Err(NoteError::BadSignerKey("invalid key name"));
        }
        let id = parse_key_id(id).ok_or(NoteError::BadSignerKey("key id is not 8 hex digits"))?;
        let raw = Zeroizing::new(
            STANDARD
                .decode(b64)
                .map_err(|_| NoteError::BadSignerKey("key is not base64"))?,
        );
        let Some((&alg, seed)) = raw.split_first() else {
            return Err(NoteError::BadSignerKey("empty key"));
        };
        if alg != ALG_ED25519 {
            return Err(NoteError::BadSignerKey("unsupported signature type"));
        }
        if seed.len() != ED25519_KEY_LEN {
            return Err(NoteError::BadSignerKey("seed is not 32 bytes"));
        }
        let key = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| NoteError::BadSignerKey("seed rejected"))?;
        let signer = Self::new(name, key)?;
        if signer.key_id != id {
            return Err(NoteError::BadSignerKey("key id does not match the key"));
        }
        Ok(signer)
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The verifier key string `name+hex8+base64(0x01 || public key)` to publish.
    pub fn verifier_key(&self) -> String {
        let mut key = Vec::with_capacity(1 + ED25519_KEY_LEN);
        key.push(ALG_ED25519);
        key.extend_from_slice(self.key.public_key().as_ref());
        format!("{}+{:08x}+{}", self.name, self.key_id, STANDARD.encode(key))
    }

    /// The matching verifier.
    pub fn verifier(&self) -> NoteVerifier {
        let mut public_key = [0u8; ED25519_KEY_LEN];
        public_key.copy_from_slice(self.key.public_key().as_ref());
        NoteVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            public_key,
        }
    }

    /// Signs `text`, which must be non-empty, end with a newline and contain no control
    /// characters other than newline. Returns the signed note: the text, a blank line and one
    /// signature line `— name base64(key id || signature)`.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        // C2SP signed-note: a text ending in newline, with no other control characters.
        if text.is_empty() {
            return Err(NoteError::InvalidText("empty"));
        }
        if !text.ends_with('\n') {
            return Err(NoteError::InvalidText("does not end with a newline"));
        }
        if has_forbidden_control(text) {
            return Err(NoteError::InvalidText("contains a control character"));
        }
        // C2SP signed-note: Ed25519 over the note text (RFC 8032), prefixed by the key id.
        let sig = self.key.sign(text.as_bytes());
        let mut blob = Vec::with_capacity(4 + ED25519_SIG_LEN);
        blob.extend_from_slice(&self.key_id.to_be_bytes());
        blob.extend_from_slice(sig.as_ref());
        Ok(format!(
            "{text}\n{SIG_LINE_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(blob)
        ))
    }
}

/// A trusted Ed25519 note key, parsed from a verifier key string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_id: u32,
    public_key: [u8; ED25519_KEY_LEN],
}

impl NoteVerifier {
    /// Parses `name+hex8+base64(0x01 || 32-byte public key)`, checking the key id.
    pub fn from_vkey(vkey: &str) -> Result<Self, NoteError> {
        // The base64 part may itself contain '+': split into at most three parts.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadVerifierKey("wrong number of parts"));
        };
        if !valid_name(name) {
            return Err(NoteError::BadVerifierKey("invalid key name"));
        }
        let id = parse_key_id(id).ok_or(NoteError::BadVerifierKey("key id is not 8 hex digits"))?;
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| NoteError::BadVerifierKey("key is not base64"))?;
        let Some((&alg, key)) = raw.split_first() else {
            return Err(NoteError::BadVerifierKey("empty key"));
        };
        // C2SP signed-note: the key id commits to the name, the type byte and the key.
        if key_id(name, alg, key) != id {
            return Err(NoteError::BadVerifierKey("key id does not match the key"));
        }
        if alg != ALG_ED25519 {
            return Err(NoteError::UnsupportedKeyType(alg));
        }
        let public_key: [u8; ED25519_KEY_LEN] = key
            .try_into()
            .map_err(|_| NoteError::BadVerifierKey("public key is not 32 bytes"))?;
        Ok(Self {
            name: name.to_owned(),
            key_id: id,
            public_key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The verifier key string this verifier was parsed from.
    pub fn vkey(&self) -> String {
        let mut key = Vec::with_capacity(1 + ED25519_KEY_LEN);
        key.push(ALG_ED25519);
        key.extend_from_slice(&self.public_key);
        format!("{}+{:08x}+{}", self.name, self.key_id, STANDARD.encode(key))
    }

    fn verify(&self, text: &str, sig: &[u8]) -> bool {
        sig.len() == ED25519_SIG_LEN
            && UnparsedPublicKey::new(&ED25519, &self.public_key)
                .verify(text.as_bytes(), sig)
                .is_ok()
    }
}

/// Opens a signed note: checks its format, verifies every signature from a key in `verifiers`,
/// ignores signatures from unknown keys, and returns the text with the names of the keys whose
/// signatures verified (each once, in order of appearance).
///
/// Errors: a malformed note; more than 100 signature lines; two verifiers with the same name and
/// key id; a signature from a known key that does not verify; no signature from a known key.
pub fn open(note: &str, verifiers: &[NoteVerifier]) -> Result<(String, Vec<String>), NoteError> {
    // C2SP signed-note: valid UTF-8 (guaranteed by `&str`) with no control characters but newline.
    if has_forbidden_control(note) {
        return Err(NoteError::Malformed("control character"));
    }
    // C2SP signed-note: the text (ending in newline) is separated from the signatures by the last
    // empty line.
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no signature block"))?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    if sigs.is_empty() {
        return Err(NoteError::Malformed("no signatures"));
    }
    let sigs = sigs.strip_suffix('\n').ok_or(NoteError::Malformed(
        "signature block must end with a newline",
    ))?;
    if sigs.split('\n').count() > MAX_SIGNATURES {
        return Err(NoteError::TooManySignatures);
    }
    let mut verified: Vec<String> = Vec::new();
    for line in sigs.split('\n') {
        // C2SP signed-note: em dash, space, key name, space, base64(key id || signature).
        let rest = line
            .strip_prefix(SIG_LINE_PREFIX)
            .ok_or(NoteError::Malformed("not a signature line"))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or(NoteError::Malformed("signature line without a signature"))?;
        if !valid_name(name) {
            return Err(NoteError::Malformed("invalid key name in a signature line"));
        }
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| NoteError::Malformed("signature is not base64"))?;
        if blob.len() < 5 {
            return Err(NoteError::Malformed("signature too short"));
        }
        let (id, sig) = blob.split_at(4);
        let key_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let mut matching = verifiers
            .iter()
            .filter(|v| v.name == name && v.key_id == key_id);
        // C2SP signed-note: signatures from unknown keys are ignored, even when the name or the id
        // (but not both) matches a known key.
        let Some(verifier) = matching.next() else {
            continue;
        };
        if matching.next().is_some() {
            return Err(NoteError::AmbiguousKey {
                name: name.to_owned(),
                key_id,
            });
        }
        // C2SP signed-note: a signature from a known key MUST be verified; one that fails rejects
        // the whole note.
        if !verifier.verify(text, sig) {
            return Err(NoteError::InvalidSignature {
                name: name.to_owned(),
                key_id,
            });
        }
        if !verified.iter().any(|n| n == name) {
            verified.push(name.to_owned());
        }
    }
    // C2SP signed-note: a note with no verified signature from a known key MUST be rejected.
    if verified.is_empty() {
        return Err(NoteError::NoKnownSignature);
    }
    Ok((text.to_owned(), verified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(name: &str, seed: u8) -> NoteSigner {
        NoteSigner::new(
            name,
            Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn sign_then_open_round_trips() {
        let s = signer("example.com/log", 1);
        let v = NoteVerifier::from_vkey(&s.verifier_key()).unwrap();
        assert_eq!(v, s.verifier());
        assert_eq!(v.vkey(), s.verifier_key());
        let note = s.sign("hello\n\nworld\n").unwrap();
        assert!(note.starts_with("hello\n\nworld\n\n\u{2014} example.com/log "));
        let (text, names) = open(&note, &[v]).unwrap();
        assert_eq!(text, "hello\n\nworld\n");
        assert_eq!(names, ["example.com/log"]);
    }

    #[test]
    fn names_and_texts_are_checked() {
        let key = || Ed25519KeyPair::from_seed_unchecked(&[2; 32]).unwrap();
        for bad in ["", "a b", "a+b", "a\tb", "a\u{a0}b", "a\u{1}b"] {
            assert_eq!(
                NoteSigner::new(bad, key()).err(),
                Some(NoteError::InvalidName)
            );
        }
        let s = signer("n", 3);
        for bad in ["", "no newline", "tab\there\n", "cr\r\n"] {
            assert!(
                matches!(s.sign(bad), Err(NoteError::InvalidText(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn malformed_signature_lines() {
        let v = signer("a", 6).verifier();
        let id = STANDARD.encode(v.key_id().to_be_bytes());
        for sigs in [
            "\u{2014} a \n".to_owned(),
            "\u{2014} a\n".to_owned(),
            format!("\u{2014} a {id}\n"),
            "- a AAAAAAAA\n".to_owned(),
            "\u{2014} a AAAA AAAA\n".to_owned(),
            "\u{2014}  AAAAAAAA\n".to_owned(),
            "\u{2014} a+b AAAAAAAA\n".to_owned(),
            "\u{2014} a\u{3000}b AAAAAAAA\n".to_owned(),
            "\u{2014} a AAAAAA==\n".to_owned(),
        ] {
            assert!(
                matches!(
                    open(&format!("t\n\n{sigs}"), std::slice::from_ref(&v)),
                    Err(NoteError::Malformed(_))
                ),
                "{sigs:?}"
            );
        }
        // Key id and one signature byte: well-formed, but not a valid Ed25519 signature.
        let short = STANDARD.encode([&v.key_id().to_be_bytes()[..], &[0]].concat());
        assert_eq!(
            open(
                &format!("t\n\n\u{2014} a {short}\n"),
                std::slice::from_ref(&v)
            ),
            Err(NoteError::InvalidSignature {
                name: "a".into(),
                key_id: v.key_id()
            })
        );
    }

    #[test]
    fn unknown_only_and_wrong_signatures() {
        let a = signer("a", 4);
        let b = signer("b", 5);
        let note = a.sign("text\n").unwrap();
        assert_eq!(
            open(&note, &[b.verifier()]),
            Err(NoteError::NoKnownSignature)
        );
        // Same name and id as `a`, different key: a known key whose signature fails.
        let mut forged = a.verifier();
        forged.public_key = b.verifier().public_key;
        assert_eq!(
            open(&note, &[forged]),
            Err(NoteError::InvalidSignature {
                name: "a".into(),
                key_id: a.key_id()
            })
        );
        let tampered = note.replacen("text", "texT", 1);
        assert!(matches!(
            open(&tampered, &[a.verifier()]),
            Err(NoteError::InvalidSignature { .. })
        ));
    }
}
