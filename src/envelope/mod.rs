//! The at-rest format of model weights (envelope v1), pure: no I/O, no clock, no async.
//!
//! A file is a fixed 56-byte [`Header`] plus a sequence of chunks, each sealed with AES-256-GCM
//! under a per-file key that HKDF derives from the model version's DEK. Nonces follow the STREAM
//! construction (chunk index plus a last-chunk flag) and every chunk's associated data binds the
//! model, the version, the file path and the header, so any chunk opens on its own while
//! reordering, truncation, extension and splicing across files or versions fail. A signed
//! [`manifest`] lists a version's files. The byte layout is specified in `docs/format.md`.
//!
//! Every authentication failure, whatever its cause, is the one opaque [`DecryptionFailed`].

mod header;
pub mod manifest;
mod stream;

use aws_lc_rs::digest;
use aws_lc_rs::hkdf;
use thiserror::Error;

use crate::keys::secret::Dek;

pub use header::{FormatError, HEADER_LEN, Header, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use stream::{FileOpener, FileSealer, TAG_LEN};

/// Chunk size the vault uses unless configured otherwise (4 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Domain separator that starts every encoded [`FileContext`].
const CONTEXT_LABEL: &[u8] = b"weightvault/envelope/v1";

/// The one error for every failure to authenticate or decrypt: a wrong key, a tampered, truncated,
/// extended, reordered or spliced chunk, or a chunk of the wrong length all look the same, so a
/// caller (or an attacker watching it) learns nothing about which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("decryption failed")]
pub struct DecryptionFailed;

/// Where a file belongs: the ciphertext is bound to exactly this model, version and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileContext<'a> {
    /// Model name, UTF-8, at most `u16::MAX` bytes.
    pub model: &'a str,
    /// The random identifier of the model version.
    pub version_id: &'a [u8; 16],
    /// Relative, `/`-separated path of the file inside the version, at most `u16::MAX` bytes.
    pub path: &'a str,
}

impl FileContext<'_> {
    /// Checks that the context can be encoded (both names fit a `u16` length prefix).
    /// [`FileSealer::new`] panics on a context that fails this check; [`FileOpener::new`] returns
    /// an opener that rejects every chunk, since nothing can have been sealed under it.
    pub fn check(&self) -> Result<(), FormatError> {
        self.encode().map(drop)
    }

    /// `"weightvault/envelope/v1" || u16be(len(model)) || model || version_id || u16be(len(path))
    /// || path`. The length prefixes make the encoding injective, so two different contexts never
    /// produce the same bytes (and so never the same key or associated data).
    fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let model_len =
            u16::try_from(self.model.len()).map_err(|_| FormatError::NameTooLong("model"))?;
        let path_len =
            u16::try_from(self.path.len()).map_err(|_| FormatError::NameTooLong("path"))?;
        let mut out = Vec::with_capacity(
            CONTEXT_LABEL.len() + 2 + self.model.len() + 16 + 2 + self.path.len(),
        );
        out.extend_from_slice(CONTEXT_LABEL);
        out.extend_from_slice(&model_len.to_be_bytes());
        out.extend_from_slice(self.model.as_bytes());
        out.extend_from_slice(self.version_id);
        out.extend_from_slice(&path_len.to_be_bytes());
        out.extend_from_slice(self.path.as_bytes());
        Ok(out)
    }
}

/// Everything needed to seal or open one file's chunks. Holds the derived key: neither `Debug`
/// nor `Clone`, and it leaves this module only inside a sealer or an opener.
struct FileKey {
    key: aws_lc_rs::aead::LessSafeKey,
    aad: [u8; 32],
}

impl FileKey {
    /// Derives the file key and the file's associated data; `None` if `ctx` cannot be encoded.
    fn derive(dek: &Dek, ctx: &FileContext<'_>, header: &Header) -> Option<FileKey> {
        let ctx_bytes = ctx.encode().ok()?;
        let header_bytes = header.encode();

        // RFC 5869 §2.2: extract with the per-file random salt, the DEK as input keying material.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, header.salt()).extract(dek.expose_secret());
        // RFC 5869 §2.3: expand with `info = "file-key" || ctx` to one AES-256 key (32 bytes).
        let info: [&[u8]; 2] = [b"file-key", &ctx_bytes];
        let okm = prk
            .expand(&info, &aws_lc_rs::aead::AES_256_GCM)
            .expect("32 bytes is within HKDF-SHA256's 255*32-byte output limit");
        let key = aws_lc_rs::aead::LessSafeKey::new(aws_lc_rs::aead::UnboundKey::from(okm));

        // aad = SHA-256("aad" || ctx || header): one value for every chunk of the file.
        let mut h = digest::Context::new(&digest::SHA256);
        h.update(b"aad");
        h.update(&ctx_bytes);
        h.update(&header_bytes);
        let mut aad = [0u8; 32];
        aad.copy_from_slice(h.finish().as_ref());

        Some(FileKey { key, aad })
    }
}

/// Seals a whole file held in memory; returns its chunks in order (tests, tools, benchmarks).
///
/// # Panics
/// If `plaintext.len()` differs from `header.plaintext_len()` or `ctx` fails
/// [`FileContext::check`].
pub fn seal_file(
    dek: &Dek,
    ctx: &FileContext<'_>,
    header: &Header,
    plaintext: &[u8],
) -> Vec<Vec<u8>> {
    assert_eq!(
        u64::try_from(plaintext.len()).ok(),
        Some(header.plaintext_len()),
        "plaintext length must equal the header's plaintext_len"
    );
    let mut sealer = FileSealer::new(dek, ctx, header);
    let chunk_size = header.chunk_size() as usize;
    let mut chunks = Vec::new();
    let mut rest = plaintext;
    while !sealer.is_last_next() {
        let (this, tail) = rest.split_at(chunk_size);
        let mut buf = Vec::with_capacity(chunk_size + TAG_LEN);
        buf.extend_from_slice(this);
        sealer.seal_next(&mut buf);
        chunks.push(buf);
        rest = tail;
    }
    let mut buf = Vec::with_capacity(rest.len() + TAG_LEN);
    buf.extend_from_slice(rest);
    sealer.finish(&mut buf);
    chunks.push(buf);
    chunks
}

/// Opens a whole file: every chunk, in order. A wrong number of chunks (truncation or extension)
/// is [`DecryptionFailed`] like any other authentication failure.
pub fn open_file(
    dek: &Dek,
    ctx: &FileContext<'_>,
    header: &Header,
    chunks: &[Vec<u8>],
) -> Result<Vec<u8>, DecryptionFailed> {
    if u64::try_from(chunks.len()).ok() != Some(header.chunk_count()) {
        return Err(DecryptionFailed);
    }
    let opener = FileOpener::new(dek, ctx, header);
    // Sized from the bytes actually present, not from the unauthenticated header.
    let mut plaintext = Vec::with_capacity(chunks.iter().map(Vec::len).sum());
    let mut out = Vec::new();
    for (index, chunk) in (0u64..).zip(chunks) {
        opener.open_into(index, chunk, &mut out)?;
        plaintext.extend_from_slice(&out);
    }
    Ok(plaintext)
}
