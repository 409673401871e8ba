//! The signed manifest of one model version: which files it has, their sizes, chunk counts,
//! headers and, when the push asked for them, plaintext digests. Its bytes are canonical JSON (one encoding per value, checked
//! by a round trip) and the vault signs exactly those bytes with Ed25519.

use aws_lc_rs::signature::{self, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::header::{FormatError, HEADER_LEN, Header, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Value of the `format` field.
pub const MANIFEST_FORMAT: &str = "weightvault-manifest/v1";
/// Length of a manifest signature (Ed25519).
pub const SIGNATURE_LEN: usize = 64;
/// Domain separator prepended to the manifest bytes before signing, so that a manifest signature
/// can never be taken for a signature over anything else the vault's key signs.
const SIGNATURE_CONTEXT: &[u8] = b"weightvault/manifest/v1\n";

/// The manifest of one model version. Field order is the canonical JSON order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    pub model: String,
    pub version: u64,
    /// 16 bytes, lowercase hex in JSON.
    #[serde(with = "hex_array")]
    pub version_id: [u8; 16],
    /// Chunk size shared by every file of the version.
    pub chunk_size: u32,
    /// Creation time, milliseconds since the Unix epoch (supplied by the caller).
    pub created_ms: u64,
    /// Sorted by `path` (byte order), paths unique.
    pub files: Vec<ManifestFile>,
}

/// One file of a model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Relative `/`-separated path; see [`validate_path`].
    pub path: String,
    /// Plaintext length in bytes.
    pub size: u64,
    /// Number of stored chunks.
    pub chunks: u64,
    /// SHA-256 of the whole plaintext, lowercase hex in JSON; `None` (JSON `null`, the field
    /// still present) when the push recorded no digest. Integrity does not rest on it (the
    /// AEAD tags and the signature do); it is provenance, checked by `--verify-digest`.
    #[serde(with = "hex_option")]
    pub sha256: Option<[u8; 32]>,
    /// The file's encoded envelope header, lowercase hex in JSON.
    #[serde(with = "hex_array")]
    pub header: [u8; HEADER_LEN],
}

impl ManifestFile {
    /// The decoded envelope header of the file.
    pub fn decode_header(&self) -> Result<Header, FormatError> {
        Header::decode(&self.header)
    }
}

/// Why a manifest was rejected.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest signature is not valid")]
    BadSignature,
    #[error("manifest does not match the schema: {0}")]
    Json(#[source] serde_json::Error),
    #[error("manifest is not in canonical form")]
    NotCanonical,
    #[error("unsupported manifest format {0:?}")]
    UnsupportedFormat(String),
    #[error("model name must be 1 to 65535 bytes")]
    BadModel,
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSizeOutOfRange(u32),
    #[error("invalid file path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("files are not sorted by path, or a path repeats, at {path:?}")]
    NotSorted { path: String },
    #[error("header of {path:?} does not decode: {source}")]
    BadHeader {
        path: String,
        #[source]
        source: FormatError,
    },
    #[error("header of {path:?} disagrees with the manifest's {field}")]
    HeaderMismatch { path: String, field: &'static str },
}

impl Manifest {
    /// The canonical bytes: compact JSON, fields in declaration order, lowercase hex.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    /// Parses and checks a manifest: schema without unknown fields, canonical encoding, format,
    /// sorted valid paths, and headers that agree with sizes, chunk counts and chunk size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        // One value, one encoding: whitespace, key order, escapes, hex case or duplicate keys
        // that the parser tolerated all change the re-encoding.
        if manifest.to_bytes() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// The semantic checks of [`Manifest::from_bytes`], for a manifest built in memory.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(self.format.clone()));
        }
        if self.model.is_empty() || self.model.len() > usize::from(u16::MAX) {
            return Err(ManifestError::BadModel);
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::ChunkSizeOutOfRange(self.chunk_size));
        }
        let mut previous: Option<&str> = None;
        for file in &self.files {
            validate_path(&file.path)?;
            // Strictly increasing, which also rules out duplicates.
            if previous.is_some_and(|p| p >= file.path.as_str()) {
                return Err(ManifestError::NotSorted {
                    path: file.path.clone(),
                });
            }
            previous = Some(&file.path);
            self.check_header(file)?;
        }
        Ok(())
    }

    fn check_header(&self, file: &ManifestFile) -> Result<(), ManifestError> {
        let header = file
            .decode_header()
            .map_err(|source| ManifestError::BadHeader {
                path: file.path.clone(),
                source,
            })?;
        let mismatch = if header.plaintext_len() != file.size {
            Some("size")
        } else if header.chunk_count() != file.chunks {
            Some("chunks")
        } else if header.chunk_size() != self.chunk_size {
            Some("chunk_size")
        } else {
            None
        };
        match mismatch {
            Some(field) => Err(ManifestError::HeaderMismatch {
                path: file.path.clone(),
                field,
            }),
            None => Ok(()),
        }
    }
}

/// Checks a file path as the manifest requires: relative, `/`-separated, no empty, `.` or `..`
/// components, no backslash, no control characters (NUL included), at most 65535 bytes.
pub fn validate_path(path: &str) -> Result<(), ManifestError> {
    let reject = |reason| {
        Err(ManifestError::BadPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return reject("empty");
    }
    // The envelope file context stores the path behind a u16 length.
    if path.len() > usize::from(u16::MAX) {
        return reject("longer than 65535 bytes");
    }
    if path.starts_with('/') {
        return reject("absolute");
    }
    if path.contains('\\') {
        return reject("contains a backslash");
    }
    if path.chars().any(char::is_control) {
        return reject("contains a control character");
    }
    for component in path.split('/') {
        match component {
            "" => return reject("has an empty component"),
            // Two spellings of one file would let one manifest entry alias another on disk.
            "." | ".." => return reject("has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Signs canonical manifest bytes. Refuses bytes that [`Manifest::from_bytes`] rejects, so the
/// vault never signs a manifest that a verifier would throw away.
pub fn sign_manifest(
    key: &Ed25519KeyPair,
    manifest_bytes: &[u8],
) -> Result<[u8; SIGNATURE_LEN], ManifestError> {
    Manifest::from_bytes(manifest_bytes)?;
    // RFC 8032 §5.1.6: PureEd25519 over the domain-separated message.
    let signature = key.sign(&signed_message(manifest_bytes));
    let mut out = [0u8; SIGNATURE_LEN];
    out.copy_from_slice(signature.as_ref());
    Ok(out)
}

/// Verifies the signature first and parses only authenticated bytes.
pub fn verify_manifest(
    public_key: &[u8; 32],
    manifest_bytes: &[u8],
    signature: &[u8],
) -> Result<Manifest, ManifestError> {
    // RFC 8032 §5.1.7 (aws-lc rejects non-canonical S and wrong lengths).
    UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&signed_message(manifest_bytes), signature)
        .map_err(|_| ManifestError::BadSignature)?;
    Manifest::from_bytes(manifest_bytes)
}

fn signed_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + manifest_bytes.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(manifest_bytes);
    message
}

/// Fixed-size byte arrays as lowercase hex strings.
mod hex_array {
    use super::{Deserialize, Deserializer, Serializer};
    use serde::de::Error;

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| D::Error::custom(format_args!("expected {} hex digits", 2 * N)))?;
        Ok(out)
    }
}

/// An optional fixed-size byte array: lowercase hex, or JSON `null` for `None`. The field is
/// required either way (no `#[serde(default)]`): absence has exactly one spelling.
mod hex_option {
    use super::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &Option<[u8; N]>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::hex_array::serialize(b, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        #[derive(Deserialize)]
        struct Hex<const M: usize>(#[serde(with = "super::hex_array")] [u8; M]);
        Ok(Option::<Hex<N>>::deserialize(deserializer)?.map(|h| h.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> ManifestFile {
        let header = Header::with_salt(4096, size, [3; 32]).unwrap();
        ManifestFile {
            path: path.to_owned(),
            size,
            chunks: header.chunk_count(),
            sha256: Some([0xab; 32]),
            header: header.encode(),
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.to_owned(),
            model: "llama".to_owned(),
            version: 3,
            version_id: [0x11; 16],
            chunk_size: 4096,
            created_ms: 1_700_000_000_000,
            files: vec![file("config.json", 10), file("weights/0.bin", 10_000)],
        }
    }

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap()
    }

    fn public(key: &Ed25519KeyPair) -> [u8; 32] {
        use aws_lc_rs::signature::KeyPair;
        key.public_key().as_ref().try_into().unwrap()
    }

    #[test]
    fn canonical_round_trip() {
        let m = manifest();
        let bytes = m.to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(
            "{\"format\":\"weightvault-manifest/v1\",\"model\":\"llama\",\"version\":3,\
             \"version_id\":\"11111111111111111111111111111111\",\"chunk_size\":4096,\
             \"created_ms\":1700000000000,\"files\":[{\"path\":\"config.json\",\"size\":10,\
             \"chunks\":1,\"sha256\":\"abab"
        ));
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
    }

    fn reject(bytes: &[u8]) -> ManifestError {
        Manifest::from_bytes(bytes).unwrap_err()
    }

    fn edited(from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8(manifest().to_bytes()).unwrap();
        assert!(text.contains(from), "{from}");
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn rejects_non_canonical_encodings() {
        let bytes = manifest().to_bytes();
        let mut spaced = bytes.clone();
        spaced.push(b'\n');
        assert!(matches!(reject(&spaced), ManifestError::NotCanonical));
        let upper = edited(
            "\"11111111111111111111111111111111\"",
            &format!("\"{}\"", "AA".repeat(16)),
        );
        assert!(matches!(reject(&upper), ManifestError::NotCanonical));
        let escaped = edited("\"llama\"", "\"ll\\u0061ma\"");
        assert!(matches!(reject(&escaped), ManifestError::NotCanonical));
        let reordered = edited(
            "\"model\":\"llama\",\"version\":3,",
            "\"version\":3,\"model\":\"llama\",",
        );
        assert!(matches!(reject(&reordered), ManifestError::NotCanonical));
    }

    #[test]
    fn rejects_schema_violations() {
        for bad in [
            edited("\"version\":3,", "\"version\":3,\"extra\":1,"),
            edited("\"size\":10,", "\"size\":10,\"mode\":1,"),
            edited("\"version\":3,", "\"version\":3.0,"),
            edited("\"version\":3,", "\"version\":-3,"),
            edited("\"version\":3,", ""),
            edited("\"11111111111111111111111111111111\"", "\"1111\""),
            edited(
                "\"11111111111111111111111111111111\"",
                "\"zz111111111111111111111111111111\"",
            ),
            b"not json".to_vec(),
        ] {
            assert!(
                matches!(reject(&bad), ManifestError::Json(_)),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn absent_digest_is_null_and_round_trips() {
        let mut m = manifest();
        m.files[1].sha256 = None;
        let bytes = m.to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.contains("\"path\":\"weights/0.bin\",\"size\":10000,\"chunks\":3,\"sha256\":null,\"header\":\""),
            "{text}"
        );
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
        // Signed and verified like any other manifest.
        let key = key();
        let sig = sign_manifest(&key, &bytes).unwrap();
        assert_eq!(verify_manifest(&public(&key), &bytes, &sig).unwrap(), m);
    }

    #[test]
    fn absent_digest_has_one_spelling() {
        let digest = format!("\"sha256\":\"{}\"", "ab".repeat(32));
        // A missing field, an empty string, a string "null", short hex: schema errors.
        for bad in [
            edited(&format!("{digest},"), ""),
            edited(&digest, "\"sha256\":\"\""),
            edited(&digest, "\"sha256\":\"null\""),
            edited(&digest, "\"sha256\":\"abab\""),
            edited(&digest, "\"sha256\":false"),
            edited(&digest, "\"sha256\":[]"),
        ] {
            assert!(
                matches!(reject(&bad), ManifestError::Json(_)),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
        // `null` in another spelling the parser tolerates is not canonical.
        let spaced = edited(&digest, "\"sha256\": null");
        assert!(matches!(reject(&spaced), ManifestError::NotCanonical));
        // All-zero hex is a digest (of no plaintext anyone has), not absence.
        let zero = edited(&digest, &format!("\"sha256\":\"{}\"", "00".repeat(32)));
        let parsed = Manifest::from_bytes(&zero).unwrap();
        assert_eq!(parsed.files[0].sha256, Some([0; 32]));
        assert_eq!(parsed.to_bytes(), zero);
    }

    #[test]
    fn rejects_semantic_errors() {
        let check = |edit: &dyn Fn(&mut Manifest), expect: &dyn Fn(&ManifestError) -> bool| {
            let mut m = manifest();
            edit(&mut m);
            let err = reject(&m.to_bytes());
            assert!(expect(&err), "{err:?}");
        };
        check(&|m| m.format = "weightvault-manifest/v2".into(), &|e| {
            matches!(e, ManifestError::UnsupportedFormat(_))
        });
        check(&|m| m.model.clear(), &|e| {
            matches!(e, ManifestError::BadModel)
        });
        check(&|m| m.chunk_size = 1024, &|e| {
            matches!(e, ManifestError::ChunkSizeOutOfRange(1024))
        });
        check(&|m| m.files.reverse(), &|e| {
            matches!(e, ManifestError::NotSorted { .. })
        });
        check(&|m| m.files[1].path = "config.json".into(), &|e| {
            matches!(e, ManifestError::NotSorted { .. })
        });
        check(&|m| m.files[1].path = "weights/../x".into(), &|e| {
            matches!(e, ManifestError::BadPath { .. })
        });
        check(&|m| m.files[0].header[0] ^= 1, &|e| {
            matches!(
                e,
                ManifestError::BadHeader {
                    source: FormatError::BadMagic,
                    ..
                }
            )
        });
        check(&|m| m.files[1].size += 1, &|e| {
            matches!(e, ManifestError::HeaderMismatch { field: "size", .. })
        });
        check(&|m| m.files[1].chunks = 2, &|e| {
            matches!(
                e,
                ManifestError::HeaderMismatch {
                    field: "chunks",
                    ..
                }
            )
        });
        check(&|m| m.chunk_size = 8192, &|e| {
            matches!(
                e,
                ManifestError::HeaderMismatch {
                    field: "chunk_size",
                    ..
                }
            )
        });
        // An empty file list is a valid (if useless) version.
        let mut empty = manifest();
        empty.files.clear();
        assert_eq!(Manifest::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }

    #[test]
    fn path_validation() {
        for good in [
            "a",
            "a/b",
            "weights/model-00001.safetensors",
            "a.b/..c/d..",
            "é/ü",
        ] {
            validate_path(good).unwrap();
        }
        let too_long = "a".repeat(65_536);
        for bad in [
            "", "/a", "a/", "a//b", "./a", "a/./b", "..", "a/../b", "a\\b", "a\0b", "a\nb",
            &too_long,
        ] {
            assert!(
                matches!(validate_path(bad), Err(ManifestError::BadPath { .. })),
                "{bad:?}"
            );
        }
        validate_path(&too_long[1..]).unwrap();
    }

    #[test]
    fn sign_and_verify() {
        let key = key();
        let bytes = manifest().to_bytes();
        let sig = sign_manifest(&key, &bytes).unwrap();
        assert_eq!(
            verify_manifest(&public(&key), &bytes, &sig).unwrap(),
            manifest()
        );

        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(matches!(
            verify_manifest(&public(&key), &flipped, &sig),
            Err(ManifestError::BadSignature)
        ));
        let mut bad_sig = sig;
        bad_sig[63] ^= 0x10;
        assert!(matches!(
            verify_manifest(&public(&key), &bytes, &bad_sig),
            Err(ManifestError::BadSignature)
        ));
        assert!(matches!(
            verify_manifest(&public(&key), &bytes, &sig[..63]),
            Err(ManifestError::BadSignature)
        ));
        let other = Ed25519KeyPair::from_seed_unchecked(&[10; 32]).unwrap();
        assert!(matches!(
            verify_manifest(&public(&other), &bytes, &sig),
            Err(ManifestError::BadSignature)
        ));
        // The signature covers the domain separator, not the bare bytes.
        let bare = key.sign(&bytes);
        assert!(matches!(
            verify_manifest(&public(&key), &bytes, bare.as_ref()),
            Err(ManifestError::BadSignature)
        ));
    }

    #[test]
    fn refuses_to_sign_an_invalid_manifest() {
        let mut bytes = manifest().to_bytes();
        bytes.push(b' ');
        assert!(matches!(
            sign_manifest(&key(), &bytes),
            Err(ManifestError::NotCanonical)
        ));
    }
}
