//! FetchWeights on the wire without an intermediate chunk buffer.
//!
//! A stream message is `WeightChunk { index, ciphertext }` (proto/weightvault/v1/node.proto). The
//! generated codec would need the ciphertext in memory first and then copy it into tonic's send
//! buffer. Here the server streams [`ServedChunk`]s, whose body may be an open blob file
//! ([`BlobBody::File`]), and [`ChunkEncoder`] writes the message's protobuf encoding itself: the
//! two field headers, then the file's bytes read from the page cache through a small reused
//! buffer straight into the send buffer. The bytes on the wire are exactly prost's encoding of
//! the same `WeightChunk` (a test below compares them), so nodes decode with the generated code.

use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, uint64};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::proto::v1::FetchWeightsRequest;
use crate::store::BlobBody;

/// One chunk of a FetchWeights stream, as the server sends it.
pub struct ServedChunk {
    pub index: u64,
    pub body: BlobBody,
    /// Where the encoder records what became of the stream's chunks.
    pub tally: Arc<StreamTally>,
}

/// What the encoder did with one stream's chunks. The stream's producer queues chunks before
/// they are read, so the bytes that really went into the send buffer, and whether a read
/// failed, are known only here; the producer reads them for its `fetch_end` record once the
/// response is over.
#[derive(Default)]
pub struct StreamTally {
    encoded: AtomicU64,
    chunks: AtomicU64,
    failed: AtomicBool,
    /// Woken after every chunk the encoder finished (or failed).
    progress: tokio::sync::Notify,
}

impl StreamTally {
    /// Ciphertext bytes encoded into the response (handed to HTTP/2).
    pub fn encoded_bytes(&self) -> u64 {
        self.encoded.load(Ordering::SeqCst)
    }

    /// Whether a chunk could not be read (the stream then ended with INTERNAL).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Chunks encoded so far.
    pub fn chunks_done(&self) -> u64 {
        self.chunks.load(Ordering::SeqCst)
    }

    /// Waits until the encoder has finished `chunks` chunks of the stream, or one failed.
    pub async fn settled(&self, chunks: u64) {
        loop {
            // Registered before the check, so a chunk finishing in between is not missed.
            let next = self.progress.notified();
            if self.failed() || self.chunks.load(Ordering::SeqCst) >= chunks {
                return;
            }
            next.await;
        }
    }

    fn finished(&self, len: Option<u64>) {
        match len {
            Some(len) => {
                self.encoded.fetch_add(len, Ordering::SeqCst);
                self.chunks.fetch_add(1, Ordering::SeqCst);
            }
            None => self.failed.store(true, Ordering::SeqCst),
        }
        self.progress.notify_one();
    }
}

/// Protobuf field numbers of `WeightChunk`.
const INDEX_FIELD: u32 = 1;
const CIPHERTEXT_FIELD: u32 = 2;

/// Size of the read buffer between the page cache and the send buffer: large enough that a
/// 4 MiB chunk takes 32 reads, small enough to stay in the core's cache.
const SCRATCH: usize = 128 * 1024;

/// The FetchWeights codec: requests decoded by prost, chunks encoded by [`ChunkEncoder`].
#[derive(Default)]
pub struct ChunkCodec;

impl Codec for ChunkCodec {
    type Encode = ServedChunk;
    type Decode = FetchWeightsRequest;
    type Encoder = ChunkEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> ChunkEncoder {
        ChunkEncoder {
            scratch: Vec::new(),
        }
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder(ProstCodec::<(), FetchWeightsRequest>::default().decoder())
    }
}

/// Decodes FetchWeights requests exactly as the generated code does.
pub struct RequestDecoder(ProstDecoder<FetchWeightsRequest>);

impl Decoder for RequestDecoder {
    type Item = FetchWeightsRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf)
    }
}

/// Encodes [`ServedChunk`]s as `WeightChunk` messages; one per response stream.
pub struct ChunkEncoder {
    /// Allocated on the first file-backed chunk, reused for every later one.
    scratch: Vec<u8>,
}

impl Encoder for ChunkEncoder {
    type Item = ServedChunk;
    type Error = Status;

    fn encode(&mut self, item: ServedChunk, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // Room for the whole message at once (field headers take at most 1 + 10 + 1 + 10 bytes).
        dst.reserve(usize::try_from(item.body.len()).unwrap_or(0) + 22);
        self.write_counted(item, dst)
    }
}

impl ChunkEncoder {
    /// [`ChunkEncoder::write`], recording the outcome in the stream's tally.
    fn write_counted(&mut self, item: ServedChunk, dst: &mut impl BufMut) -> Result<(), Status> {
        let len = item.body.len();
        let tally = item.tally.clone();
        match self.write(item, dst) {
            Ok(()) => {
                tally.finished(Some(len));
                crate::server::metrics::bytes_served(len);
                Ok(())
            }
            Err(status) => {
                tally.finished(None);
                Err(status)
            }
        }
    }

    fn write(&mut self, item: ServedChunk, dst: &mut impl BufMut) -> Result<(), Status> {
        let len = item.body.len();
        let size = usize::try_from(len)
            .map_err(|_| Status::internal("chunk larger than this platform's address space"))?;
        // proto3: fields holding their default value are not encoded (prost does the same).
        if item.index != 0 {
            uint64::encode(INDEX_FIELD, &item.index, dst);
        }
        if len == 0 {
            return Ok(());
        }
        encode_key(CIPHERTEXT_FIELD, WireType::LengthDelimited, dst);
        encode_varint(len, dst);
        match item.body {
            BlobBody::Bytes(bytes) => dst.put_slice(&bytes),
            BlobBody::File { file, .. } => {
                if self.scratch.is_empty() {
                    self.scratch = vec![0; SCRATCH];
                }
                let mut done = 0usize;
                let mut nowait = true;
                while done < size {
                    let want = (size - done).min(SCRATCH);
                    let piece = &mut self.scratch[..want];
                    let n = match read_piece(&file, piece, done as u64, &mut nowait) {
                        Ok(0) => {
                            tracing::error!(chunk = item.index, "chunk blob ended early");
                            return Err(Status::internal("chunk unreadable"));
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(chunk = item.index, error = %e, "reading chunk blob");
                            return Err(Status::internal("chunk unreadable"));
                        }
                    };
                    dst.put_slice(&self.scratch[..n]);
                    done += n;
                }
            }
        }
        Ok(())
    }
}

/// Reads part of a chunk file at `offset`. The encoder runs on an async worker, so a read must
/// not wait for the disk there: it first asks for what the page cache holds without waiting
/// (`preadv2` with `RWF_NOWAIT`, Linux 4.14+; `LocalBlobs::open` asked for the file to be read
/// ahead), and only when that would block does it wait, inside `block_in_place` on a
/// multi-thread runtime so that the worker's other tasks move to another thread. `nowait` turns
/// the first attempt off for file systems that do not support it.
fn read_piece(
    file: &std::fs::File,
    buf: &mut [u8],
    offset: u64,
    nowait: &mut bool,
) -> std::io::Result<usize> {
    use rustix::io::{Errno, ReadWriteFlags, preadv2};
    if *nowait {
        match preadv2(
            file,
            &mut [IoSliceMut::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        ) {
            // Some kernels answer 0 instead of EAGAIN when nothing is cached: only the waiting
            // read below may conclude the end of the file.
            Ok(n) if n > 0 => return Ok(n),
            Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => {}
            Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => *nowait = false,
            Err(e) => return Err(e.into()),
        }
    }
    let mut wait = || file.read_at(buf, offset);
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use prost::Message;

    use super::*;
    use crate::proto::v1::WeightChunk;

    /// The payload our encoder writes for one chunk, without tonic's 5-byte frame header.
    fn encode(chunk: ServedChunk) -> Result<Vec<u8>, Status> {
        let mut buf = BytesMut::new();
        ChunkCodec.encoder().write_counted(chunk, &mut buf)?;
        Ok(buf.to_vec())
    }

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (dir, file)
    }

    #[test]
    fn the_bytes_are_prosts_encoding_of_the_same_weight_chunk() {
        // Sizes around the read buffer's and the varint's boundaries, index 0 (omitted field).
        for (index, size) in [
            (0u64, 16usize),
            (1, 127),
            (7, 128),
            (300, SCRATCH - 1),
            (1 << 40, SCRATCH + 1),
            (u64::MAX, 3 * SCRATCH + 17),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let want = WeightChunk {
                index,
                ciphertext: Bytes::from(data.clone()),
            }
            .encode_to_vec();
            let from_bytes = encode(ServedChunk {
                index,
                body: BlobBody::Bytes(Bytes::from(data.clone())),
                tally: Arc::default(),
            })
            .unwrap();
            assert_eq!(from_bytes, want, "bytes body, size {size}");
            let (_dir, file) = file_with(&data);
            let from_file = encode(ServedChunk {
                index,
                body: BlobBody::File {
                    file,
                    len: size as u64,
                },
                tally: Arc::default(),
            })
            .unwrap();
            assert_eq!(from_file, want, "file body, size {size}");
            assert_eq!(WeightChunk::decode(&from_file[..]).unwrap().index, index);
        }
    }

    #[test]
    fn a_file_shorter_than_its_recorded_length_is_an_error_on_the_tally() {
        let tally = Arc::new(StreamTally::default());
        let (_dir, file) = file_with(&[7u8; 100]);
        encode(ServedChunk {
            index: 2,
            body: BlobBody::File { file, len: 100 },
            tally: tally.clone(),
        })
        .unwrap();
        assert_eq!((tally.encoded_bytes(), tally.failed()), (100, false));
        let (_dir, file) = file_with(&[7u8; 100]);
        let err = encode(ServedChunk {
            index: 3,
            body: BlobBody::File { file, len: 200 },
            tally: tally.clone(),
        })
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert_eq!(err.message(), "chunk unreadable");
        // Only what was encoded counts; the failure is recorded for the stream's audit entry.
        assert_eq!((tally.encoded_bytes(), tally.failed()), (100, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_on_a_multi_thread_runtime_give_the_same_bytes() {
        // The waiting path (block_in_place) and the page-cache path both end in these bytes.
        let data: Vec<u8> = (0..SCRATCH * 2 + 5).map(|i| (i % 253) as u8).collect();
        let (_dir, file) = file_with(&data);
        let want = WeightChunk {
            index: 9,
            ciphertext: Bytes::from(data.clone()),
        }
        .encode_to_vec();
        let got = encode(ServedChunk {
            index: 9,
            body: BlobBody::File {
                file,
                len: data.len() as u64,
            },
            tally: Arc::default(),
        })
        .unwrap();
        assert_eq!(got, want);
    }
}
