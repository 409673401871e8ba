//! The fixed 56-byte file header: what a reader needs before the first chunk (cipher, KDF, chunk
//! size, plaintext length, salt). It is authenticated through every chunk's associated data, so
//! parsing it here only checks that it is well formed.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

/// Length of an encoded [`Header`].
pub const HEADER_LEN: usize = 56;
/// Smallest accepted chunk size (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest accepted chunk size (64 MiB).
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;

const MAGIC: &[u8; 8] = b"wvenv/v1";
const AEAD_AES_256_GCM: u8 = 0x01;
const KDF_HKDF_SHA256: u8 = 0x01;
/// At most 2^32 chunks per file: far below the 64-bit STREAM counter, and no more AES-GCM
/// invocations under one file key than NIST SP 800-38D §8.3 allows even for random IVs (our IVs
/// are deterministic, §8.2.1, so this is margin rather than a requirement).
const MAX_CHUNK_COUNT: u64 = 1 << 32;

/// A header or file context that is malformed. Not about authenticity: a well-formed header
/// that was tampered with shows up as [`super::DecryptionFailed`] when its chunks are opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("header is {0} bytes, expected {HEADER_LEN}")]
    Length(usize),
    #[error("header does not start with the magic \"wvenv/v1\"")]
    BadMagic,
    #[error("unsupported AEAD id {0:#04x} (only 0x01, AES-256-GCM)")]
    UnsupportedAead(u8),
    #[error("unsupported KDF id {0:#04x} (only 0x01, HKDF-SHA256)")]
    UnsupportedKdf(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSizeOutOfRange(u32),
    #[error("file would have more than 2^32 chunks")]
    TooManyChunks,
    #[error("{0} is longer than 65535 bytes")]
    NameTooLong(&'static str),
    #[error("the system random number generator failed")]
    RandomUnavailable,
}

/// A decoded, well-formed file header. The salt is public; nothing here is secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    chunk_size: u32,
    plaintext_len: u64,
    salt: [u8; 32],
}

impl Header {
    /// A header for a new file, with a fresh random salt.
    pub fn new(chunk_size: u32, plaintext_len: u64) -> Result<Header, FormatError> {
        let mut salt = [0u8; 32];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| FormatError::RandomUnavailable)?;
        Header::with_salt(chunk_size, plaintext_len, salt)
    }

    /// A header with a chosen salt. Only for test vectors: a repeated salt repeats file keys.
    pub fn with_salt(
        chunk_size: u32,
        plaintext_len: u64,
        salt: [u8; 32],
    ) -> Result<Header, FormatError> {
        // The upper bound keeps each AES-GCM call far below the 2^39-256 bits of plaintext
        // allowed per invocation (NIST SP 800-38D §5.2.1.1).
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(FormatError::ChunkSizeOutOfRange(chunk_size));
        }
        let header = Header {
            chunk_size,
            plaintext_len,
            salt,
        };
        if header.chunk_count() > MAX_CHUNK_COUNT {
            return Err(FormatError::TooManyChunks);
        }
        Ok(header)
    }

    /// The 56 bytes of the header (`docs/format.md`, "File header").
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8] = AEAD_AES_256_GCM;
        out[9] = KDF_HKDF_SHA256;
        // out[10..12]: reserved, zero.
        out[12..16].copy_from_slice(&self.chunk_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.plaintext_len.to_be_bytes());
        out[24..56].copy_from_slice(&self.salt);
        out
    }

    /// Parses exactly [`HEADER_LEN`] bytes. Every field is checked, so a header that decodes
    /// re-encodes to the same bytes.
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let bytes: &[u8; HEADER_LEN] = bytes
            .try_into()
            .map_err(|_| FormatError::Length(bytes.len()))?;
        if &bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if bytes[8] != AEAD_AES_256_GCM {
            return Err(FormatError::UnsupportedAead(bytes[8]));
        }
        if bytes[9] != KDF_HKDF_SHA256 {
            return Err(FormatError::UnsupportedKdf(bytes[9]));
        }
        // Reserved bytes must be zero so that the encoding stays canonical and a future version
        // can give them a meaning without old readers silently ignoring it.
        if bytes[10..12] != [0, 0] {
            return Err(FormatError::ReservedNotZero);
        }
        let chunk_size = u32::from_be_bytes(field(bytes, 12));
        let plaintext_len = u64::from_be_bytes(field(bytes, 16));
        let salt = field(bytes, 24);
        Header::with_salt(chunk_size, plaintext_len, salt)
    }

    /// Plaintext bytes per chunk (all chunks but the last are exactly this long).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Length of the whole file's plaintext.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// `max(1, ceil(plaintext_len / chunk_size))`: an empty file is one empty chunk, so that it
    /// still carries a tag and a last-chunk flag.
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_len
            .div_ceil(u64::from(self.chunk_size))
            .max(1)
    }

    /// Plaintext length of chunk `index`, or `None` if the file has no such chunk.
    pub fn chunk_plain_len(&self, index: u64) -> Option<usize> {
        if index >= self.chunk_count() {
            return None;
        }
        let chunk_size = u64::from(self.chunk_size);
        // index < chunk_count <= 2^32 and chunk_size <= 2^26, so the product fits a u64; the
        // last chunk may start at plaintext_len itself only for the empty file.
        let start = index * chunk_size;
        let len = (self.plaintext_len - start).min(chunk_size);
        usize::try_from(len).ok()
    }

    /// The per-file HKDF salt.
    pub(super) fn salt(&self) -> &[u8; 32] {
        &self.salt
    }
}

fn field<const N: usize>(bytes: &[u8; HEADER_LEN], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[offset..offset + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK;

    fn good() -> [u8; HEADER_LEN] {
        Header::with_salt(4096, 10_000, [0x5a; 32])
            .unwrap()
            .encode()
    }

    #[test]
    fn encode_decode_round_trip() {
        let header = Header::with_salt(4096, 10_000, [0x5a; 32]).unwrap();
        let bytes = header.encode();
        assert_eq!(&bytes[..8], b"wvenv/v1");
        assert_eq!(bytes[8..12], [1, 1, 0, 0]);
        assert_eq!(bytes[12..16], 4096u32.to_be_bytes());
        assert_eq!(bytes[16..24], 10_000u64.to_be_bytes());
        assert_eq!(bytes[24..], [0x5a; 32]);
        assert_eq!(Header::decode(&bytes).unwrap(), header);
    }

    #[test]
    fn new_headers_get_distinct_random_salts() {
        let a = Header::new(DEFAULT_CHUNK, 1).unwrap();
        let b = Header::new(DEFAULT_CHUNK, 1).unwrap();
        assert_ne!(a.salt(), b.salt());
        assert_eq!(a.chunk_size(), DEFAULT_CHUNK);
        assert_eq!(a.plaintext_len(), 1);
    }

    #[test]
    fn decode_rejects_wrong_length() {
        let bytes = good();
        assert_eq!(Header::decode(&bytes[..55]), Err(FormatError::Length(55)));
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(Header::decode(&long), Err(FormatError::Length(57)));
        assert_eq!(Header::decode(&[]), Err(FormatError::Length(0)));
    }

    #[test]
    fn decode_rejects_each_bad_field() {
        let cases: [(usize, u8, FormatError); 6] = [
            (0, b'W', FormatError::BadMagic),
            (7, b'2', FormatError::BadMagic),
            (8, 0x02, FormatError::UnsupportedAead(0x02)),
            (9, 0x00, FormatError::UnsupportedKdf(0x00)),
            (10, 0x01, FormatError::ReservedNotZero),
            (11, 0x80, FormatError::ReservedNotZero),
        ];
        for (offset, value, expected) in cases {
            let mut bytes = good();
            bytes[offset] = value;
            assert_eq!(Header::decode(&bytes), Err(expected), "offset {offset}");
        }
    }

    #[test]
    fn chunk_size_range_is_enforced() {
        for (size, ok) in [
            (0, false),
            (4095, false),
            (4096, true),
            (MAX_CHUNK_SIZE, true),
            (MAX_CHUNK_SIZE + 1, false),
            (u32::MAX, false),
        ] {
            let mut bytes = good();
            bytes[12..16].copy_from_slice(&u32::to_be_bytes(size));
            let decoded = Header::decode(&bytes);
            if ok {
                assert_eq!(decoded.unwrap().chunk_size(), size);
            } else {
                assert_eq!(decoded, Err(FormatError::ChunkSizeOutOfRange(size)));
                assert_eq!(
                    Header::with_salt(size, 0, [0; 32]),
                    Err(FormatError::ChunkSizeOutOfRange(size))
                );
            }
        }
    }

    #[test]
    fn chunk_count_is_capped_at_2_pow_32() {
        let at_limit = 4096u64 << 32;
        assert_eq!(
            Header::with_salt(4096, at_limit, [0; 32])
                .unwrap()
                .chunk_count(),
            1 << 32
        );
        assert_eq!(
            Header::with_salt(4096, at_limit + 1, [0; 32]),
            Err(FormatError::TooManyChunks)
        );
        let mut bytes = good();
        bytes[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(Header::decode(&bytes), Err(FormatError::TooManyChunks));
        // The largest chunk size admits any u64 length below 2^58.
        let big = Header::with_salt(MAX_CHUNK_SIZE, (1 << 58) - 1, [0; 32]).unwrap();
        assert_eq!(big.chunk_count(), 1 << 32);
        assert_eq!(
            big.chunk_plain_len((1 << 32) - 1),
            Some(MAX_CHUNK_SIZE as usize - 1)
        );
    }

    #[test]
    fn chunk_lengths() {
        let empty = Header::with_salt(4096, 0, [0; 32]).unwrap();
        assert_eq!(empty.chunk_count(), 1);
        assert_eq!(empty.chunk_plain_len(0), Some(0));
        assert_eq!(empty.chunk_plain_len(1), None);

        let exact = Header::with_salt(4096, 8192, [0; 32]).unwrap();
        assert_eq!(exact.chunk_count(), 2);
        assert_eq!(exact.chunk_plain_len(1), Some(4096));
        assert_eq!(exact.chunk_plain_len(2), None);

        let ragged = Header::with_salt(4096, 10_000, [0; 32]).unwrap();
        assert_eq!(ragged.chunk_count(), 3);
        assert_eq!(ragged.chunk_plain_len(0), Some(4096));
        assert_eq!(ragged.chunk_plain_len(2), Some(10_000 - 8192));
        assert_eq!(ragged.chunk_plain_len(u64::MAX), None);
    }
}
