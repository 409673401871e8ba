//! Envelope v1 test vectors: data files in `tests/vectors/envelope/` (format in its README.md and
//! in docs/format.md), generated once by the ignored `generate` test and frozen since.
//!
//! Regenerate (only when the format changes on purpose):
//! `cargo test --test envelope_vectors -- --ignored generate`

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use weightvault::envelope::manifest::{
    MANIFEST_FORMAT, Manifest, ManifestError, ManifestFile, sign_manifest, verify_manifest,
};
use weightvault::envelope::{
    DecryptionFailed, FileContext, FileOpener, HEADER_LEN, Header, TAG_LEN, open_file, seal_file,
};
use weightvault::keys::secret::Dek;

const DEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const WRONG_DEK: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0f00112233445566778899aabbccddeeff";
const SALT: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
const EMPTY_SALT: &str = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf";
const VERSION_ID: &str = "5f3e9a0c7b1d4e2f8a6c0b9d1e3f5a7c";
const OTHER_VERSION_ID: &str = "5f3e9a0c7b1d4e2f8a6c0b9d1e3f5a7d";
const MODEL: &str = "example-model";
const PATH: &str = "weights/model-00001-of-00002.safetensors";
const OTHER_PATH: &str = "weights/model-00002-of-00002.safetensors";
const EMPTY_PATH: &str = "extra/empty.bin";
const CHUNK_SIZE: u32 = 4096;
const FILE_LEN: usize = 10_000;
/// Ed25519 seed of the signing key for the manifest vectors (RFC 8032 §7.1, TEST 1).
const SIGNING_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const CREATED_MS: u64 = 1_735_689_600_000;

/// One file case; the schema is documented in `tests/vectors/envelope/README.md`.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileCase {
    name: String,
    description: String,
    dek: String,
    model: String,
    version_id: String,
    path: String,
    header: String,
    chunks: Vec<String>,
    expect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
}

/// One manifest case (names start with `manifest-`).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct ManifestCase {
    name: String,
    description: String,
    public_key: String,
    manifest: String,
    signature: String,
    expect: String,
}

fn vector_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/envelope")
}

fn dek(hex_key: &str) -> Dek {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).unwrap();
    Dek::from_bytes(&mut bytes)
}

fn arr<const N: usize>(hex_text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(hex_text, &mut out).unwrap();
    out
}

/// Deterministic, non-periodic filler (Knuth's multiplicative hash of the offset).
fn plaintext(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .try_into()
        .unwrap()
}

fn flip(bytes: &mut [u8], byte: usize, bit: u8) {
    bytes[byte] ^= 1 << bit;
}

/// A sealed file plus the context it was sealed under.
struct Sealed {
    model: &'static str,
    version_id: &'static str,
    path: &'static str,
    chunks: Vec<Vec<u8>>,
}

fn seal(
    model: &'static str,
    version_id: &'static str,
    path: &'static str,
    header: &Header,
    data: &[u8],
) -> Sealed {
    let version: [u8; 16] = arr(version_id);
    let ctx = FileContext {
        model,
        version_id: &version,
        path,
    };
    Sealed {
        model,
        version_id,
        path,
        chunks: seal_file(&dek(DEK), &ctx, header, data),
    }
}

fn case(
    name: &str,
    description: &str,
    sealed: &Sealed,
    header: [u8; HEADER_LEN],
    chunks: &[Vec<u8>],
    plaintext: Option<&[u8]>,
) -> FileCase {
    FileCase {
        name: name.to_owned(),
        description: description.to_owned(),
        dek: DEK.to_owned(),
        model: sealed.model.to_owned(),
        version_id: sealed.version_id.to_owned(),
        path: sealed.path.to_owned(),
        header: hex::encode(header),
        chunks: chunks.iter().map(hex::encode).collect(),
        expect: if plaintext.is_some() {
            "ok"
        } else {
            "decryption_failed"
        }
        .to_owned(),
        plaintext: plaintext.map(hex::encode),
    }
}

fn file_cases() -> Vec<FileCase> {
    let data = plaintext(FILE_LEN);
    let header = Header::with_salt(CHUNK_SIZE, FILE_LEN as u64, arr(SALT)).unwrap();
    let good = seal(MODEL, VERSION_ID, PATH, &header, &data);
    let hb = header.encode();
    let c = &good.chunks;
    assert_eq!(c.len(), 3);

    let empty_header = Header::with_salt(CHUNK_SIZE, 0, arr(EMPTY_SALT)).unwrap();
    let empty = seal(MODEL, VERSION_ID, EMPTY_PATH, &empty_header, &[]);
    let full = plaintext(CHUNK_SIZE as usize);
    let full_header = Header::with_salt(CHUNK_SIZE, CHUNK_SIZE.into(), arr(SALT)).unwrap();
    let one = seal(
        MODEL,
        VERSION_ID,
        "config/one-chunk.bin",
        &full_header,
        &full,
    );

    // The strongest splices: same DEK and the very same header (salt included), so only the
    // file context stands between the attacker and success.
    let other_file = seal(MODEL, VERSION_ID, OTHER_PATH, &header, &data);
    let other_version = seal(MODEL, OTHER_VERSION_ID, PATH, &header, &data);
    let other_model = seal("other-model", VERSION_ID, PATH, &header, &data);

    let shorter = Header::with_salt(CHUNK_SIZE, 2 * u64::from(CHUNK_SIZE), arr(SALT))
        .unwrap()
        .encode();
    let mut flipped_header = hb;
    flipped_header[24] ^= 0x01;
    let mut body_flip = c.clone();
    flip(&mut body_flip[1], 100, 0);
    let mut tag_flip = c.clone();
    let last = tag_flip[2].len() - 1;
    flip(&mut tag_flip[2], last, 7);

    let mut wrong_key = case(
        "wrong-key",
        "The good multi-chunk file opened with a different DEK.",
        &good,
        hb,
        c,
        None,
    );
    wrong_key.dek = WRONG_DEK.to_owned();

    vec![
        case(
            "ok-multi-chunk",
            "10000 bytes in chunks of 4096: two full chunks and a last chunk of 1808 bytes.",
            &good,
            hb,
            c,
            Some(&data),
        ),
        case(
            "ok-empty",
            "An empty file: one chunk holding only the 16-byte tag, sealed with the last flag.",
            &empty,
            empty_header.encode(),
            &empty.chunks,
            Some(&[]),
        ),
        case(
            "ok-one-full-chunk",
            "Exactly one chunk_size of plaintext: a single full chunk that is also the last.",
            &one,
            full_header.encode(),
            &one.chunks,
            Some(&full),
        ),
        case(
            "truncated",
            "The last chunk is dropped; two chunks remain where the header implies three.",
            &good,
            hb,
            &c[..2],
            None,
        ),
        case(
            "truncated-header-rewritten",
            "The last chunk is dropped and plaintext_len rewritten to 8192 so the count matches; \
             chunk 1 was sealed without the last flag and the header is in the AAD.",
            &good,
            shorter,
            &c[..2],
            None,
        ),
        case(
            "empty-no-chunks",
            "The only chunk of the empty file is dropped.",
            &empty,
            empty_header.encode(),
            &[],
            None,
        ),
        case(
            "extended",
            "A fourth chunk (a copy of chunk 1) is appended.",
            &good,
            hb,
            &[c[0].clone(), c[1].clone(), c[2].clone(), c[1].clone()],
            None,
        ),
        case(
            "reordered",
            "Chunks 0 and 1 are swapped.",
            &good,
            hb,
            &[c[1].clone(), c[0].clone(), c[2].clone()],
            None,
        ),
        case(
            "spliced-from-other-file",
            "Chunk 1 comes from another file of the same version (same DEK, same header and \
             salt, same plaintext, different path).",
            &good,
            hb,
            &[c[0].clone(), other_file.chunks[1].clone(), c[2].clone()],
            None,
        ),
        case(
            "spliced-from-other-version",
            "Chunk 1 comes from the same file sealed under another version_id (same DEK, same \
             header and salt, same plaintext).",
            &good,
            hb,
            &[c[0].clone(), other_version.chunks[1].clone(), c[2].clone()],
            None,
        ),
        case(
            "spliced-from-other-model",
            "Chunk 1 comes from the same path and version_id under another model name (same \
             DEK, same header and salt, same plaintext).",
            &good,
            hb,
            &[c[0].clone(), other_model.chunks[1].clone(), c[2].clone()],
            None,
        ),
        case(
            "header-bit-flip",
            "Bit 0 of header byte 24 (the first salt byte) is flipped; the header still decodes.",
            &good,
            flipped_header,
            c,
            None,
        ),
        case(
            "chunk-body-bit-flip",
            "Bit 0 of byte 100 of chunk 1 (ciphertext body) is flipped.",
            &good,
            hb,
            &body_flip,
            None,
        ),
        case(
            "tag-bit-flip",
            "Bit 7 of the last byte of chunk 2 (its tag) is flipped.",
            &good,
            hb,
            &tag_flip,
            None,
        ),
        wrong_key,
    ]
}

fn manifest_cases() -> Vec<ManifestCase> {
    let data = plaintext(FILE_LEN);
    let header = Header::with_salt(CHUNK_SIZE, FILE_LEN as u64, arr(SALT)).unwrap();
    let empty_header = Header::with_salt(CHUNK_SIZE, 0, arr(EMPTY_SALT)).unwrap();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        model: MODEL.to_owned(),
        version: 1,
        version_id: arr(VERSION_ID),
        chunk_size: CHUNK_SIZE,
        created_ms: CREATED_MS,
        files: vec![
            ManifestFile {
                path: EMPTY_PATH.to_owned(),
                size: 0,
                chunks: 1,
                sha256: Some(sha256(&[])),
                header: empty_header.encode(),
            },
            ManifestFile {
                path: PATH.to_owned(),
                size: FILE_LEN as u64,
                chunks: 3,
                sha256: Some(sha256(&data)),
                header: header.encode(),
            },
        ],
    };
    let key = Ed25519KeyPair::from_seed_unchecked(&arr::<32>(SIGNING_SEED)).unwrap();
    let public_key = hex::encode(key.public_key().as_ref());
    // The seed is RFC 8032 §7.1 TEST 1, so the public key is known independently.
    assert_eq!(
        public_key,
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    let bytes = manifest.to_bytes();
    let signature = sign_manifest(&key, &bytes).unwrap();

    // Flip the low bit of a hex digit of the first sha256 ('e' <-> 'd' etc.): the manifest
    // still parses and stays canonical, so only the signature can catch it.
    let digit = find(&bytes, b"\"sha256\":\"") + 10;
    let mut flipped_manifest = bytes.clone();
    flip(&mut flipped_manifest, digit, 0);
    Manifest::from_bytes(&flipped_manifest).expect("the flip keeps the manifest well formed");
    let mut flipped_signature = signature;
    flip(&mut flipped_signature, 0, 0);

    let case = |name: &str, description: &str, m: &[u8], s: &[u8], expect: &str| ManifestCase {
        name: name.to_owned(),
        description: description.to_owned(),
        public_key: public_key.clone(),
        manifest: hex::encode(m),
        signature: hex::encode(s),
        expect: expect.to_owned(),
    };
    vec![
        case(
            "manifest-ok",
            "The manifest of the version holding ok-empty and ok-multi-chunk, validly signed.",
            &bytes,
            &signature,
            "ok",
        ),
        case(
            "manifest-bit-flip",
            "One bit of a sha256 hex digit is flipped; the JSON is still valid and canonical.",
            &flipped_manifest,
            &signature,
            "bad_signature",
        ),
        case(
            "manifest-signature-bit-flip",
            "Bit 0 of the first signature byte is flipped.",
            &bytes,
            &flipped_signature,
            "bad_signature",
        ),
    ]
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

/// File name → contents, exactly as `generate` writes them.
fn rendered() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for c in file_cases() {
        out.insert(format!("{}.json", c.name), to_json(&c));
    }
    for c in manifest_cases() {
        out.insert(format!("{}.json", c.name), to_json(&c));
    }
    out
}

fn to_json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    text
}

fn on_disk() -> BTreeMap<String, String> {
    fs::read_dir(vector_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
#[ignore = "writes the frozen vector files; run only when the format changes on purpose"]
fn generate() {
    let dir = vector_dir();
    fs::create_dir_all(&dir).unwrap();
    for (name, text) in rendered() {
        fs::write(dir.join(name), text).unwrap();
    }
}

/// The sealer still produces the frozen bytes and no case was added, lost or edited by hand.
#[test]
fn vectors_are_frozen() {
    let expected = rendered();
    let actual = on_disk();
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, text) in &expected {
        assert!(
            &actual[name] == text,
            "{name} differs from what the code generates"
        );
    }
}

fn open_case(c: &FileCase) -> Result<Vec<u8>, DecryptionFailed> {
    let header_bytes = hex::decode(&c.header).unwrap();
    let header = Header::decode(&header_bytes).expect("every vector header is well formed");
    assert_eq!(header.encode().as_slice(), header_bytes.as_slice());
    let version: [u8; 16] = arr(&c.version_id);
    let ctx = FileContext {
        model: &c.model,
        version_id: &version,
        path: &c.path,
    };
    let chunks: Vec<Vec<u8>> = c.chunks.iter().map(|h| hex::decode(h).unwrap()).collect();
    let whole = open_file(&dek(&c.dek), &ctx, &header, &chunks);

    // Random access must agree with the whole-file result, chunk by chunk, for both methods.
    let opener = FileOpener::new(&dek(&c.dek), &ctx, &header);
    let mut out = Vec::new();
    let mut joined = Vec::new();
    let mut all_ok = u64::try_from(chunks.len()).unwrap() == header.chunk_count();
    for (index, chunk) in (0u64..).zip(&chunks) {
        let into = opener.open_into(index, chunk, &mut out);
        let mut copy = chunk.clone();
        let in_place = opener.open_in_place(index, &mut copy).map(<[u8]>::to_vec);
        assert_eq!(
            into.map(|()| out.clone()),
            in_place,
            "{} chunk {index}",
            c.name
        );
        match in_place {
            Ok(plain) => joined.extend_from_slice(&plain),
            Err(DecryptionFailed) => all_ok = false,
        }
    }
    assert_eq!(whole.is_ok(), all_ok, "{}", c.name);
    if let Ok(plain) = &whole {
        assert_eq!(plain, &joined);
    }
    whole
}

#[test]
fn file_vectors() {
    let cases: Vec<FileCase> = on_disk()
        .iter()
        .filter(|(name, _)| !name.starts_with("manifest-"))
        .map(|(_, text)| serde_json::from_str(text).unwrap())
        .collect();
    assert!(cases.len() >= 13);
    for c in &cases {
        match c.expect.as_str() {
            "ok" => {
                let plain = open_case(c).unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert_eq!(Some(hex::encode(plain)), c.plaintext, "{}", c.name);
            }
            "decryption_failed" => {
                assert_eq!(open_case(c), Err(DecryptionFailed), "{}", c.name);
                assert!(c.plaintext.is_none());
            }
            other => panic!("{}: unknown expectation {other}", c.name),
        }
    }
}

#[test]
fn manifest_vectors() {
    let cases: Vec<ManifestCase> = on_disk()
        .iter()
        .filter(|(name, _)| name.starts_with("manifest-"))
        .map(|(_, text)| serde_json::from_str(text).unwrap())
        .collect();
    assert_eq!(cases.len(), 3);
    for c in &cases {
        let result = verify_manifest(
            &arr(&c.public_key),
            &hex::decode(&c.manifest).unwrap(),
            &hex::decode(&c.signature).unwrap(),
        );
        match c.expect.as_str() {
            "ok" => {
                let manifest = result.unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert_eq!(manifest.files.len(), 2);
            }
            "bad_signature" => assert!(
                matches!(result, Err(ManifestError::BadSignature)),
                "{}: {result:?}",
                c.name
            ),
            other => panic!("{}: unknown expectation {other}", c.name),
        }
    }
}

/// Re-derives the good vector from the primitives as `docs/format.md` describes them, without
/// the envelope module, so the document, the code and the data cannot drift apart.
#[test]
fn vectors_follow_the_documented_construction() {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};

    let c: FileCase = serde_json::from_str(
        &fs::read_to_string(vector_dir().join("ok-multi-chunk.json")).unwrap(),
    )
    .unwrap();
    let header = hex::decode(&c.header).unwrap();
    assert_eq!(&header[..12], b"wvenv/v1\x01\x01\x00\x00");
    let chunk_size = u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize;
    let len = u64::from_be_bytes(header[16..24].try_into().unwrap()) as usize;
    let salt = &header[24..56];

    let mut ctx = b"weightvault/envelope/v1".to_vec();
    ctx.extend_from_slice(&(c.model.len() as u16).to_be_bytes());
    ctx.extend_from_slice(c.model.as_bytes());
    ctx.extend_from_slice(&hex::decode(&c.version_id).unwrap());
    ctx.extend_from_slice(&(c.path.len() as u16).to_be_bytes());
    ctx.extend_from_slice(c.path.as_bytes());

    let mut key_bytes = [0u8; 32];
    Salt::new(HKDF_SHA256, salt)
        .extract(&hex::decode(&c.dek).unwrap())
        .expand(&[b"file-key".as_slice(), &ctx], HKDF_SHA256)
        .unwrap()
        .fill(&mut key_bytes)
        .unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).unwrap());

    let mut aad_input = b"aad".to_vec();
    aad_input.extend_from_slice(&ctx);
    aad_input.extend_from_slice(&header);
    let aad = sha256(&aad_input);

    let count = len.div_ceil(chunk_size).max(1);
    assert_eq!(c.chunks.len(), count);
    let mut plain = Vec::new();
    for (i, chunk) in c.chunks.iter().enumerate() {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        nonce[11] = u8::from(i == count - 1);
        let mut buf = hex::decode(chunk).unwrap();
        let expected_len = (len - i * chunk_size).min(chunk_size) + TAG_LEN;
        assert_eq!(buf.len(), expected_len);
        let opened = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .unwrap();
        plain.extend_from_slice(opened);
    }
    assert_eq!(Some(hex::encode(plain)), c.plaintext);
}
