//! The chunked AEAD stream: a sealer that writes one file's chunks strictly in order and an
//! opener that authenticates and decrypts any chunk on its own.

use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};

use super::{DecryptionFailed, FileContext, FileKey, Header};
use crate::keys::secret::Dek;

/// Length of the AES-256-GCM tag that ends every stored chunk.
pub const TAG_LEN: usize = 16;

/// The nonce of chunk `index`: `0x000000 || u64be(index) || last_flag`.
///
/// STREAM, Hoang-Reyhanitabar-Rogaway-Vizár 2015 §7: the nonce is a fixed prefix, the segment
/// counter and a flag that marks the final segment. The prefix is all zeros because every file
/// has its own key (random salt, file context), so (key, nonce) pairs never repeat across files;
/// within a file each index is used with exactly one flag value, so nonces are unique per key
/// as NIST SP 800-38D §8.2.1 requires of deterministic IVs.
fn chunk_nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[3..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

/// Seals one file's chunks in order. It owns the file key, so the key cannot be reused for a
/// second stream, and only [`FileSealer::finish`], which consumes the sealer, can seal the chunk
/// that carries the last-chunk flag.
pub struct FileSealer {
    key: FileKey,
    header: Header,
    next: u64,
    last: u64,
}

impl FileSealer {
    /// # Panics
    /// If `ctx` fails [`FileContext::check`] (a model or path name longer than 65535 bytes).
    pub fn new(dek: &Dek, ctx: &FileContext<'_>, header: &Header) -> FileSealer {
        let key = FileKey::derive(dek, ctx, header)
            .expect("file context names must fit a u16 length (FileContext::check)");
        FileSealer {
            key,
            header: header.clone(),
            next: 0,
            last: header.chunk_count() - 1,
        }
    }

    /// Seals the next non-last chunk in place: `buf` holds exactly `chunk_size` plaintext bytes
    /// on entry and ciphertext||tag on return. Returns the index of the chunk it sealed.
    ///
    /// # Panics
    /// If the next chunk is the last one (use [`FileSealer::finish`]), if `buf` is not exactly
    /// one chunk long, or on counter overflow: each is a bug in the caller.
    pub fn seal_next(&mut self, buf: &mut Vec<u8>) -> u64 {
        assert!(
            !self.is_last_next(),
            "the last chunk must be sealed with FileSealer::finish"
        );
        let index = self.next;
        self.seal(index, false, buf);
        self.next = index.checked_add(1).expect("chunk counter overflow");
        index
    }

    /// Seals the last chunk (its plaintext must be exactly `chunk_plain_len(last)` bytes) and
    /// consumes the sealer. Returns the index of the chunk it sealed.
    ///
    /// # Panics
    /// If chunks before the last one have not all been sealed, or `buf` has the wrong length.
    pub fn finish(mut self, buf: &mut Vec<u8>) -> u64 {
        assert!(
            self.is_last_next(),
            "FileSealer::finish called before every non-last chunk was sealed"
        );
        let index = self.next;
        self.seal(index, true, buf);
        index
    }

    /// Index of the chunk the next call will seal.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// Whether the next chunk is the last one (and so must go through [`FileSealer::finish`]).
    pub fn is_last_next(&self) -> bool {
        self.next == self.last
    }

    fn seal(&mut self, index: u64, last: bool, buf: &mut Vec<u8>) {
        let expected = self
            .header
            .chunk_plain_len(index)
            .expect("index is below chunk_count");
        assert_eq!(buf.len(), expected, "chunk {index} has the wrong length");
        self.key
            .key
            .seal_in_place_append_tag(chunk_nonce(index, last), Aad::from(&self.key.aad), buf)
            .expect("a chunk of at most 64 MiB is within AES-GCM's per-message limit");
    }
}

/// Opens any chunk of one file on its own: random access, and shareable across threads (every
/// method takes `&self`).
pub struct FileOpener {
    /// `None` when the file context cannot be encoded: nothing was ever sealed under such a
    /// context, so every chunk fails to open.
    key: Option<FileKey>,
    header: Header,
    last: u64,
}

impl FileOpener {
    pub fn new(dek: &Dek, ctx: &FileContext<'_>, header: &Header) -> FileOpener {
        FileOpener {
            key: FileKey::derive(dek, ctx, header),
            header: header.clone(),
            last: header.chunk_count() - 1,
        }
    }

    /// Decrypts chunk `index` from `ciphertext` (ciphertext||tag) into `out`, which on success
    /// holds exactly the chunk's plaintext. `out` is meant to be reused across calls; the
    /// ciphertext is read where it lies, never copied. On failure `out` is wiped and emptied.
    pub fn open_into(
        &self,
        index: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DecryptionFailed> {
        let (key, plain_len) = self.check(index, ciphertext.len())?;
        let (body, tag) = ciphertext.split_at(plain_len);
        // Only grows or shrinks the buffer; a reused buffer of the right size is not rewritten.
        out.resize(plain_len, 0);
        let opened = key.key.open_separate_gather(
            chunk_nonce(index, index == self.last),
            Aad::from(&key.aad),
            body,
            tag,
            out,
        );
        if opened.is_err() {
            // Never leave unauthenticated plaintext where a caller might read it.
            out.fill(0);
            out.clear();
            return Err(DecryptionFailed);
        }
        Ok(())
    }

    /// Decrypts chunk `index` in place; `chunk` holds ciphertext||tag and the plaintext is
    /// returned as its prefix. On failure the whole of `chunk` is wiped.
    pub fn open_in_place<'b>(
        &self,
        index: u64,
        chunk: &'b mut [u8],
    ) -> Result<&'b [u8], DecryptionFailed> {
        let (key, _) = self.check(index, chunk.len())?;
        let nonce = chunk_nonce(index, index == self.last);
        // Two steps so that the failure path can borrow `chunk` again to wipe it.
        if key
            .key
            .open_in_place(nonce, Aad::from(&key.aad), chunk)
            .is_err()
        {
            chunk.fill(0);
            return Err(DecryptionFailed);
        }
        Ok(&chunk[..chunk.len() - TAG_LEN])
    }

    /// The header this opener was built for.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The key and the chunk's plaintext length, if `index` exists and the stored chunk has
    /// exactly the length the header implies; anything else is indistinguishable from a bad tag.
    fn check(&self, index: u64, stored_len: usize) -> Result<(&FileKey, usize), DecryptionFailed> {
        let key = self.key.as_ref().ok_or(DecryptionFailed)?;
        let plain_len = self.header.chunk_plain_len(index).ok_or(DecryptionFailed)?;
        if plain_len.checked_add(TAG_LEN) != Some(stored_len) {
            return Err(DecryptionFailed);
        }
        Ok((key, plain_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{open_file, seal_file};

    const VERSION: [u8; 16] = [0x11; 16];

    fn dek(byte: u8) -> Dek {
        Dek::from_bytes(&mut [byte; 32])
    }

    fn ctx(path: &str) -> FileContext<'_> {
        FileContext {
            model: "llama",
            version_id: &VERSION,
            path,
        }
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn nonce_layout() {
        let index = 0x0102_0304_0506_0708;
        assert_eq!(
            chunk_nonce(index, false).as_ref(),
            &[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
        );
        assert_eq!(
            chunk_nonce(index, true).as_ref(),
            &[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1]
        );
    }

    #[test]
    fn opener_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FileOpener>();
        assert_send_sync::<FileSealer>();
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let cs = 4096usize;
        for len in [0, 1, cs - 1, cs, cs + 1, 3 * cs] {
            let header = Header::new(cs as u32, len as u64).unwrap();
            let data = plaintext(len);
            let chunks = seal_file(&dek(1), &ctx("a.bin"), &header, &data);
            assert_eq!(chunks.len() as u64, header.chunk_count(), "len {len}");
            assert_eq!(chunks.len(), len.div_ceil(cs).max(1), "len {len}");
            for (i, chunk) in chunks.iter().enumerate() {
                assert_eq!(
                    chunk.len(),
                    header.chunk_plain_len(i as u64).unwrap() + TAG_LEN
                );
            }
            let opened = open_file(&dek(1), &ctx("a.bin"), &header, &chunks).unwrap();
            assert_eq!(opened, data, "len {len}");
        }
    }

    #[test]
    fn random_access_with_both_open_methods() {
        let header = Header::new(4096, 10_000).unwrap();
        let data = plaintext(10_000);
        let chunks = seal_file(&dek(1), &ctx("a.bin"), &header, &data);
        let opener = FileOpener::new(&dek(1), &ctx("a.bin"), &header);
        let mut out = vec![0xff; 9000];
        for index in [2u64, 0, 1] {
            let start = index as usize * 4096;
            let end = (start + 4096).min(data.len());
            opener
                .open_into(index, &chunks[index as usize], &mut out)
                .unwrap();
            assert_eq!(out, data[start..end]);
            let mut copy = chunks[index as usize].clone();
            let plain = opener.open_in_place(index, &mut copy).unwrap();
            assert_eq!(plain, &data[start..end]);
        }
        assert_eq!(opener.header(), &header);
    }

    #[test]
    fn every_tampering_is_the_same_error() {
        let header = Header::new(4096, 10_000).unwrap();
        let chunks = seal_file(&dek(1), &ctx("a.bin"), &header, &plaintext(10_000));
        let opener = FileOpener::new(&dek(1), &ctx("a.bin"), &header);
        let mut out = Vec::new();

        // Wrong index, i.e. a chunk moved to another position.
        assert_eq!(
            opener.open_into(1, &chunks[0], &mut out),
            Err(DecryptionFailed)
        );
        // Index past the end.
        assert_eq!(
            opener.open_into(3, &chunks[2], &mut out),
            Err(DecryptionFailed)
        );
        // Wrong length: one byte short, one byte long, tag only.
        assert_eq!(
            opener.open_into(0, &chunks[0][..chunks[0].len() - 1], &mut out),
            Err(DecryptionFailed)
        );
        let mut long = chunks[0].clone();
        long.push(0);
        assert_eq!(opener.open_into(0, &long, &mut out), Err(DecryptionFailed));
        assert_eq!(
            opener.open_into(0, &chunks[0][..TAG_LEN], &mut out),
            Err(DecryptionFailed)
        );
        // Every bit of a chunk is authenticated.
        for bit in [0, 8 * 100 + 3, 8 * (4096 + TAG_LEN) - 1] {
            let mut bad = chunks[0].clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            out = vec![1; 4096];
            assert_eq!(opener.open_into(0, &bad, &mut out), Err(DecryptionFailed));
            assert!(out.is_empty());
            assert_eq!(opener.open_in_place(0, &mut bad), Err(DecryptionFailed));
            assert!(
                bad.iter().all(|&b| b == 0),
                "in-place failure wipes the buffer"
            );
        }
        // Wrong key, wrong path, wrong model, wrong version, wrong header.
        let other_version = [0x12; 16];
        let openers = [
            FileOpener::new(&dek(2), &ctx("a.bin"), &header),
            FileOpener::new(&dek(1), &ctx("b.bin"), &header),
            FileOpener::new(
                &dek(1),
                &FileContext {
                    model: "llamb",
                    ..ctx("a.bin")
                },
                &header,
            ),
            FileOpener::new(
                &dek(1),
                &FileContext {
                    version_id: &other_version,
                    ..ctx("a.bin")
                },
                &header,
            ),
            FileOpener::new(&dek(1), &ctx("a.bin"), &Header::new(4096, 10_000).unwrap()),
        ];
        for opener in &openers {
            assert_eq!(
                opener.open_into(0, &chunks[0], &mut out),
                Err(DecryptionFailed)
            );
        }
    }

    #[test]
    fn truncation_is_caught_by_the_last_flag_even_with_a_rewritten_header() {
        let header = Header::with_salt(4096, 8192 + 10, [7; 32]).unwrap();
        let chunks = seal_file(&dek(1), &ctx("a.bin"), &header, &plaintext(8192 + 10));
        // Same salt, so only the last flag (and the header in the AAD) stand in the way.
        let shorter = Header::with_salt(4096, 8192, [7; 32]).unwrap();
        let opener = FileOpener::new(&dek(1), &ctx("a.bin"), &shorter);
        let mut out = Vec::new();
        assert_eq!(
            opener.open_into(1, &chunks[1], &mut out),
            Err(DecryptionFailed)
        );
        assert_eq!(
            open_file(&dek(1), &ctx("a.bin"), &header, &chunks[..2]),
            Err(DecryptionFailed)
        );
    }

    #[test]
    fn sealer_counts_and_flags() {
        let header = Header::new(4096, 3 * 4096).unwrap();
        let mut sealer = FileSealer::new(&dek(1), &ctx("a.bin"), &header);
        assert_eq!(sealer.next_index(), 0);
        let mut buf = vec![0; 4096];
        assert_eq!(sealer.seal_next(&mut buf), 0);
        assert_eq!(buf.len(), 4096 + TAG_LEN);
        let mut buf = vec![0; 4096];
        assert_eq!(sealer.seal_next(&mut buf), 1);
        assert!(sealer.is_last_next());
        let mut buf = vec![0; 4096];
        assert_eq!(sealer.finish(&mut buf), 2);
    }

    #[test]
    #[should_panic(expected = "FileSealer::finish")]
    fn seal_next_refuses_the_last_chunk() {
        let header = Header::new(4096, 100).unwrap();
        let mut sealer = FileSealer::new(&dek(1), &ctx("a.bin"), &header);
        sealer.seal_next(&mut vec![0; 100]);
    }

    #[test]
    #[should_panic(expected = "before every non-last chunk")]
    fn finish_refuses_to_skip_chunks() {
        let header = Header::new(4096, 5000).unwrap();
        let sealer = FileSealer::new(&dek(1), &ctx("a.bin"), &header);
        sealer.finish(&mut vec![0; 904]);
    }

    #[test]
    #[should_panic(expected = "wrong length")]
    fn seal_next_refuses_a_short_chunk() {
        let header = Header::new(4096, 5000).unwrap();
        let mut sealer = FileSealer::new(&dek(1), &ctx("a.bin"), &header);
        sealer.seal_next(&mut vec![0; 4095]);
    }

    #[test]
    #[should_panic(expected = "wrong length")]
    fn finish_refuses_a_long_last_chunk() {
        let header = Header::new(4096, 10).unwrap();
        FileSealer::new(&dek(1), &ctx("a.bin"), &header).finish(&mut vec![0; 11]);
    }

    #[test]
    fn over_long_names_cannot_seal_and_never_open() {
        let long = "x".repeat(usize::from(u16::MAX) + 1);
        let header = Header::new(4096, 0).unwrap();
        assert!(ctx(&long).check().is_err());
        assert!(
            FileContext {
                model: &long,
                ..ctx("a")
            }
            .check()
            .is_err()
        );
        let max = "x".repeat(usize::from(u16::MAX));
        assert!(ctx(&max).check().is_ok());
        let opener = FileOpener::new(&dek(1), &ctx(&long), &header);
        let mut out = Vec::new();
        assert_eq!(
            opener.open_into(0, &[0; TAG_LEN], &mut out),
            Err(DecryptionFailed)
        );
        let sealing = std::panic::catch_unwind(|| FileSealer::new(&dek(1), &ctx(&long), &header));
        assert!(sealing.is_err());
    }

    #[test]
    fn context_encoding_is_injective() {
        // Without length prefixes these two would encode identically.
        let a = FileContext {
            model: "ab",
            version_id: &VERSION,
            path: "c",
        };
        let b = FileContext {
            model: "a",
            version_id: &VERSION,
            path: "bc",
        };
        assert_ne!(a.encode().unwrap(), b.encode().unwrap());
        let mut expected = b"weightvault/envelope/v1".to_vec();
        expected.extend_from_slice(&[0, 2, b'a', b'b']);
        expected.extend_from_slice(&VERSION);
        expected.extend_from_slice(&[0, 1, b'c']);
        assert_eq!(a.encode().unwrap(), expected);
    }
}
