//! FetchWeights on the wire without an intermediate chunk buffer.
//!
//! A stream message is `WeightChunk { index, ciphertext }` (proto/weightvault/v1/node.proto).
//! Through tonic's codec the ciphertext would be read into memory first and then copied into
//! tonic's send buffer, a fresh allocation for every message. Here the vault answers
//! FetchWeights itself ([`serve_fetch`], routed by `node::NodeServer`): each [`ServedChunk`]
//! becomes one gRPC message written by [`FetchBody`] into a reused buffer, the message prefix
//! and field headers first and the blob file's bytes read from the page cache right behind
//! them. The bytes on the wire are exactly the gRPC framing of prost's encoding of the same
//! `WeightChunk` (a test below compares them), so nodes decode with the generated code.

use std::future::Future;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, uint64};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::http;

use crate::proto::v1::FetchWeightsRequest;
use crate::store::BlobBody;

/// One chunk of a FetchWeights stream, as the server sends it.
pub struct ServedChunk {
    pub index: u64,
    pub body: BlobBody,
    /// Where [`FetchBody`] records what became of the stream's chunks.
    pub tally: Arc<StreamTally>,
}

/// What [`FetchBody`] did with one stream's chunks. The stream's producer queues chunks before
/// they are read, so the bytes that really went into the response, and whether a read
/// failed, are known only here; the producer reads them for its `fetch_end` record once the
/// response is over.
#[derive(Default)]
pub struct StreamTally {
    encoded: AtomicU64,
    chunks: AtomicU64,
    failed: AtomicBool,
    /// Woken after every chunk the body finished (or failed).
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

    /// Waits until the body has finished `chunks` chunks of the stream, or one failed.
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

/// The method's HTTP/2 path.
pub const FETCH_PATH: &str = "/weightvault.v1.NodeService/FetchWeights";

/// The gRPC message prefix: compressed flag (1 byte) and length (4 bytes, big-endian), per
/// the gRPC over HTTP/2 protocol (grpc/grpc doc/PROTOCOL-HTTP2.md, "Length-Prefixed-Message").
pub(crate) const PREFIX: usize = 5;

/// Room in front of a chunk's bytes for the message prefix and the field headers (index: key
/// and a varint of at most 10 bytes; ciphertext: key and a length varint of at most 10 bytes).
const HEAD: usize = PREFIX + 22;

/// The largest FetchWeights request accepted (token, grant id, file name and range take a few
/// hundred bytes).
pub const MAX_REQUEST: usize = 64 * 1024;

/// Message buffers kept for reuse by one response stream once HTTP/2 has sent them.
const POOL_IDLE: usize = 2;

/// Answers one FetchWeights call: reads the request ([`read_request`]), asks `fetch` for the
/// stream's chunks, and returns a response whose body is a [`FetchBody`]. A refusal of the
/// request or by `fetch` (the checks before the stream starts) is a trailers-only response, as
/// tonic sends it; a status after that ends the body in its trailers.
pub async fn serve_fetch<F, Fut>(
    req: http::Request<tonic::body::Body>,
    max_message: usize,
    fetch: F,
) -> http::Response<tonic::body::Body>
where
    F: FnOnce(FetchWeightsRequest) -> Fut,
    Fut: Future<Output = Result<mpsc::Receiver<Result<ServedChunk, Status>>, Status>>,
{
    let (parts, body) = req.into_parts();
    let message = match read_request(&parts.headers, body).await {
        Ok(m) => m,
        Err(status) => return status.into_http(),
    };
    match fetch(message).await {
        Ok(chunks) => {
            let mut response =
                http::Response::new(tonic::body::Body::new(FetchBody::new(chunks, max_message)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The request message of a FetchWeights call: one uncompressed message (this server offers no
/// compression, so a compressed request is UNIMPLEMENTED with `grpc-accept-encoding`, as the
/// generated server answers it) of at most [`MAX_REQUEST`] bytes. The frames are copied into
/// one buffer as they arrive and refused as soon as they would exceed it, so a client sending
/// tiny frames cannot make the vault hold more than that per request.
async fn read_request<B>(headers: &http::HeaderMap, body: B) -> Result<FetchWeightsRequest, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(encoding) = headers.get("grpc-encoding")
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "request compressed with {} which this server does not accept",
            String::from_utf8_lossy(encoding.as_bytes())
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    let too_large = || {
        Status::out_of_range(format!(
            "FetchWeights request larger than {MAX_REQUEST} bytes"
        ))
    };
    let mut body = std::pin::pin!(body);
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        // Trailers (none are defined for this call) are ignored.
        let Ok(piece) = frame.into_data() else {
            continue;
        };
        if data.len() + piece.len() > PREFIX + MAX_REQUEST {
            return Err(too_large());
        }
        data.extend_from_slice(&piece);
        // A declared length over the limit is refused without waiting for the bytes.
        if data.len() >= PREFIX
            && u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize > MAX_REQUEST
        {
            return Err(too_large());
        }
    }
    if data.is_empty() {
        // The generated server's words for the same case.
        return Err(Status::internal("Missing request message."));
    }
    if data.len() < PREFIX {
        return Err(Status::internal("request ended inside a message prefix"));
    }
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::internal(
            "compressed request message without a grpc-encoding",
        ));
    }
    if data.len() < len {
        return Err(Status::internal("request ended inside a message"));
    }
    if data.len() > len {
        return Err(Status::invalid_argument(
            "FetchWeights takes exactly one request message",
        ));
    }
    FetchWeightsRequest::decode(data.freeze()).map_err(|e| Status::internal(e.to_string()))
}

/// The body of a FetchWeights response: each chunk becomes one gRPC message, written into one
/// buffer as the message prefix, the two field headers and the chunk's bytes read from the page
/// cache right behind them, so the whole message is a single `Bytes` (HTTP/2 sends it as one
/// DATA frame when the node's frame size allows, and the node slices it out without a copy).
/// The buffers come back to the stream's pool once HTTP/2 has written them, so a stream reads
/// into memory that is already mapped instead of faulting in fresh pages for every chunk. The
/// status goes out in the trailers once the producer has closed the stream (after its
/// `fetch_end` record is durable): OK after the last chunk, or the error that ended the stream.
pub struct FetchBody {
    chunks: mpsc::Receiver<Result<ServedChunk, Status>>,
    pool: Arc<Pool>,
    max_message: usize,
    /// `RWF_NOWAIT` reads are supported by the blob files' file system (see [`read_piece`]).
    nowait: bool,
    /// A chunk could not be sent: this status goes out once the producer, which sees the
    /// failure on the tally and queues no more, has recorded the end and let go.
    failure: Option<Status>,
    ended: bool,
}

impl FetchBody {
    pub fn new(chunks: mpsc::Receiver<Result<ServedChunk, Status>>, max_message: usize) -> Self {
        Self {
            chunks,
            pool: Arc::default(),
            max_message,
            nowait: true,
            failure: None,
            ended: false,
        }
    }

    /// One chunk as a whole gRPC message, its outcome recorded in the stream's tally.
    fn message(&mut self, chunk: ServedChunk) -> Result<Bytes, Status> {
        let len = chunk.body.len();
        let tally = chunk.tally.clone();
        match self.encode(chunk) {
            Ok(message) => {
                tally.finished(Some(len));
                crate::server::metrics::bytes_served(len);
                Ok(message)
            }
            Err(status) => {
                tally.finished(None);
                Err(status)
            }
        }
    }

    fn encode(&mut self, chunk: ServedChunk) -> Result<Bytes, Status> {
        let len = chunk.body.len();
        let size = usize::try_from(len)
            .map_err(|_| Status::internal("chunk larger than this platform's address space"))?;
        let mut fields = [0u8; HEAD - PREFIX];
        let fields_len = {
            let mut out = &mut fields[..];
            // proto3: fields holding their default value are not encoded (prost does the same).
            if chunk.index != 0 {
                uint64::encode(INDEX_FIELD, &chunk.index, &mut out);
            }
            if len != 0 {
                encode_key(CIPHERTEXT_FIELD, WireType::LengthDelimited, &mut out);
                encode_varint(len, &mut out);
            }
            HEAD - PREFIX - out.len()
        };
        let message_len = fields_len + size;
        if message_len > self.max_message {
            return Err(Status::out_of_range(format!(
                "encoded chunk of {message_len} bytes exceeds the message limit of {} bytes",
                self.max_message
            )));
        }
        // The limit is below 4 GiB in the vault (MAX_MESSAGE); a larger one cannot be framed.
        let prefix_len = u32::try_from(message_len)
            .map_err(|_| Status::out_of_range("a gRPC message is at most 4 GiB"))?;
        let start = HEAD - PREFIX - fields_len;
        let mut buf = self.pool.take(HEAD + size);
        buf[start] = 0; // not compressed
        buf[start + 1..start + PREFIX].copy_from_slice(&prefix_len.to_be_bytes());
        buf[start + PREFIX..HEAD].copy_from_slice(&fields[..fields_len]);
        let dst = &mut buf[HEAD..HEAD + size];
        match chunk.body {
            BlobBody::Bytes(bytes) => dst.copy_from_slice(&bytes),
            BlobBody::File { file, .. } => {
                let mut done = 0usize;
                while done < size {
                    let n = match read_piece(&file, &mut dst[done..], done as u64, &mut self.nowait)
                    {
                        Ok(0) => {
                            tracing::error!(chunk = chunk.index, "chunk blob ended early");
                            return Err(Status::internal("chunk unreadable"));
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(chunk = chunk.index, error = %e, "reading chunk blob");
                            return Err(Status::internal("chunk unreadable"));
                        }
                    };
                    done += n;
                }
            }
        }
        Ok(Bytes::from_owner(Leased {
            buf,
            pool: self.pool.clone(),
        })
        .slice(start..HEAD + size))
    }

    fn end(&mut self, status: Status) -> Frame<Bytes> {
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unencodable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::internal(unencodable.message().to_owned()).add_header(&mut trailers);
        }
        Frame::trailers(trailers)
    }
}

impl http_body::Body for FetchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            let frame = match std::task::ready!(self.chunks.poll_recv(cx)) {
                // Chunks queued before the producer saw a failure are not sent.
                Some(Ok(_)) if self.failure.is_some() => continue,
                Some(Ok(chunk)) => match self.message(chunk) {
                    Ok(message) => Frame::data(message),
                    Err(status) => {
                        self.failure = Some(status);
                        continue;
                    }
                },
                Some(Err(status)) => {
                    let status = self.failure.take().unwrap_or(status);
                    self.end(status)
                }
                None => {
                    let status = self.failure.take().unwrap_or_else(|| Status::ok(""));
                    self.end(status)
                }
            };
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One response stream's idle message buffers.
#[derive(Default)]
struct Pool {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// A buffer of at least `len` initialised bytes: an idle one when it is large enough (a
    /// model's chunks have one size but the last), else a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(buf) if buf.len() >= len => buf,
            _ => vec![0; len],
        }
    }
}

/// A buffer lent to HTTP/2 inside a `Bytes`; back to its pool when HTTP/2 drops it.
struct Leased {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Leased {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut idle) = self.pool.idle.lock()
            && idle.len() < POOL_IDLE
        {
            idle.push(buf);
        }
    }
}

/// Reads part of a chunk file at `offset`. [`FetchBody`] runs on an async worker, so a read must
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
    use http_body_util::Full;
    use prost::Message;

    use super::*;
    use crate::proto::v1::WeightChunk;

    fn body() -> FetchBody {
        FetchBody::new(mpsc::channel(1).1, usize::MAX)
    }

    /// What the vault must send for one chunk: the gRPC framing of prost's encoding.
    fn framed(index: u64, data: &[u8]) -> Vec<u8> {
        let message = WeightChunk {
            index,
            ciphertext: Bytes::copy_from_slice(data),
        }
        .encode_to_vec();
        let mut want = vec![0u8];
        want.extend_from_slice(&(message.len() as u32).to_be_bytes());
        want.extend_from_slice(&message);
        want
    }

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (dir, file)
    }

    fn file_chunk(index: u64, data: &[u8]) -> (tempfile::TempDir, ServedChunk) {
        let (dir, file) = file_with(data);
        let chunk = ServedChunk {
            index,
            body: BlobBody::File {
                file,
                len: data.len() as u64,
            },
            tally: Arc::default(),
        };
        (dir, chunk)
    }

    #[test]
    fn the_bytes_are_the_grpc_framing_of_prosts_encoding() {
        // Sizes around the varints' boundaries, index 0 (omitted field), an empty chunk.
        let mut body = body();
        for (index, size) in [
            (0u64, 0usize),
            (0, 16),
            (1, 127),
            (7, 128),
            (300, 16_383),
            (1 << 40, 16_384),
            (u64::MAX, 3 * 131_072 + 17),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let want = framed(index, &data);
            let from_bytes = body
                .message(ServedChunk {
                    index,
                    body: BlobBody::Bytes(Bytes::from(data.clone())),
                    tally: Arc::default(),
                })
                .unwrap();
            assert_eq!(from_bytes[..], want[..], "bytes body, size {size}");
            let (_dir, chunk) = file_chunk(index, &data);
            let from_file = body.message(chunk).unwrap();
            assert_eq!(from_file[..], want[..], "file body, size {size}");
            assert_eq!(
                WeightChunk::decode(&from_file[PREFIX..]).unwrap().index,
                index
            );
        }
    }

    #[test]
    fn a_file_shorter_than_its_recorded_length_is_an_error_on_the_tally() {
        let mut body = body();
        let tally = Arc::new(StreamTally::default());
        let (_dir, file) = file_with(&[7u8; 100]);
        body.message(ServedChunk {
            index: 2,
            body: BlobBody::File { file, len: 100 },
            tally: tally.clone(),
        })
        .unwrap();
        assert_eq!((tally.encoded_bytes(), tally.failed()), (100, false));
        let (_dir, file) = file_with(&[7u8; 100]);
        let err = body
            .message(ServedChunk {
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

    #[test]
    fn a_message_over_the_limit_is_refused_and_counted_as_failed() {
        let mut body = FetchBody::new(mpsc::channel(1).1, 1000);
        let tally = Arc::new(StreamTally::default());
        let err = body
            .message(ServedChunk {
                index: 1,
                body: BlobBody::Bytes(Bytes::from(vec![1u8; 1000])),
                tally: tally.clone(),
            })
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(tally.failed());
        assert_eq!(tally.encoded_bytes(), 0);
    }

    #[test]
    fn buffers_come_back_once_sent_and_a_reused_one_carries_only_its_own_chunk() {
        let mut body = body();
        let big: Vec<u8> = (0..10_000).map(|i| (i % 241) as u8).collect();
        let (_d1, chunk) = file_chunk(1, &big);
        let first = body.message(chunk).unwrap();
        let base = first.as_ptr() as usize;
        drop(first);
        // The same buffer again (its message starts at the same place for the same index).
        let (_d2, chunk) = file_chunk(1, &big);
        let second = body.message(chunk).unwrap();
        assert_eq!(second.as_ptr() as usize, base);
        drop(second);
        // A smaller last chunk in the larger buffer: exactly its own bytes.
        let small = [9u8; 33];
        let (_d3, chunk) = file_chunk(2, &small);
        let third = body.message(chunk).unwrap();
        assert_eq!(third[..], framed(2, &small)[..]);
        drop(third);
        // At most POOL_IDLE buffers wait once everything in flight came back.
        let held: Vec<Bytes> = (0..POOL_IDLE + 3)
            .map(|i| {
                body.message(ServedChunk {
                    index: i as u64,
                    body: BlobBody::Bytes(Bytes::from(vec![5u8; 64])),
                    tally: Arc::default(),
                })
                .unwrap()
            })
            .collect();
        assert_eq!(body.pool.idle.lock().unwrap().len(), 0);
        drop(held);
        assert_eq!(body.pool.idle.lock().unwrap().len(), POOL_IDLE);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_on_a_multi_thread_runtime_give_the_same_bytes() {
        // The waiting path (block_in_place) and the page-cache path both end in these bytes.
        let data: Vec<u8> = (0..300_005).map(|i| (i % 253) as u8).collect();
        let (_dir, chunk) = file_chunk(9, &data);
        let got = body().message(chunk).unwrap();
        assert_eq!(got[..], framed(9, &data)[..]);
    }

    async fn frames(body: FetchBody) -> (Vec<Bytes>, http::HeaderMap) {
        let mut body = std::pin::pin!(body);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(trailers.is_none(), "a frame after the trailers");
            match frame.into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = Some(f.into_trailers().unwrap()),
            }
        }
        assert!(http_body::Body::is_end_stream(&*body));
        (data, trailers.expect("trailers"))
    }

    #[tokio::test]
    async fn the_body_sends_each_chunk_then_the_status_in_the_trailers() {
        let (tx, rx) = mpsc::channel(4);
        for i in 0..2u64 {
            tx.send(Ok(ServedChunk {
                index: i,
                body: BlobBody::Bytes(Bytes::from(vec![i as u8; 20])),
                tally: Arc::default(),
            }))
            .await
            .unwrap();
        }
        drop(tx);
        let (data, trailers) = frames(FetchBody::new(rx, usize::MAX)).await;
        assert_eq!(data.len(), 2);
        assert_eq!(data[1][..], framed(1, &[1u8; 20])[..]);
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert!(trailers.get("grpc-message").is_none());

        // An error from the producer ends the stream with its status and metadata.
        let (tx, rx) = mpsc::channel(4);
        let mut status = Status::resource_exhausted("budget spent");
        status
            .metadata_mut()
            .insert("x-request-id", "00ff".parse().unwrap());
        tx.send(Err(status)).await.unwrap();
        let (data, trailers) = frames(FetchBody::new(rx, usize::MAX)).await;
        assert!(data.is_empty());
        assert_eq!(trailers.get("grpc-status").unwrap(), "8");
        assert_eq!(trailers.get("grpc-message").unwrap(), "budget%20spent");
        assert_eq!(trailers.get("x-request-id").unwrap(), "00ff");

        // A chunk that cannot be read ends it with INTERNAL after what was sent, and only once
        // the producer has let go of the stream (it records `fetch_end` first); chunks it had
        // queued behind the failed one are not sent.
        let (tx, rx) = mpsc::channel(4);
        let (_dir, file) = file_with(&[1u8; 10]);
        let tally = Arc::new(StreamTally::default());
        for (index, body) in [
            (0, BlobBody::Bytes(Bytes::from_static(b"ok"))),
            (1, BlobBody::File { file, len: 11 }),
            (2, BlobBody::Bytes(Bytes::from_static(b"queued"))),
        ] {
            let tally = tally.clone();
            tx.send(Ok(ServedChunk { index, body, tally }))
                .await
                .unwrap();
        }
        let recorded = Arc::new(AtomicBool::new(false));
        let producer = {
            let recorded = recorded.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                tally.settled(u64::MAX).await;
                assert!(tally.failed());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                recorded.store(true, Ordering::SeqCst);
                drop(tx);
            })
        };
        let (data, trailers) = frames(FetchBody::new(rx, usize::MAX)).await;
        assert!(
            recorded.load(Ordering::SeqCst),
            "status sent before the producer ended"
        );
        producer.await.unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0][..], framed(0, b"ok")[..]);
        assert_eq!(trailers.get("grpc-status").unwrap(), "13");
        assert_eq!(tally.encoded_bytes(), 2);
    }

    async fn request(
        headers: &[(&'static str, &str)],
        body: Vec<u8>,
    ) -> Result<FetchWeightsRequest, Status> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        read_request(&map, Full::new(Bytes::from(body))).await
    }

    fn one_message(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[tokio::test]
    async fn requests_are_read_as_the_generated_server_reads_them_and_bad_ones_refused() {
        let want = FetchWeightsRequest {
            grant_id: "g".into(),
            file: "model.safetensors".into(),
            first_chunk: 3,
            ..Default::default()
        };
        let good = one_message(&want.encode_to_vec());
        assert_eq!(request(&[], good.clone()).await.unwrap(), want);
        assert_eq!(
            request(&[("grpc-encoding", "identity")], good.clone())
                .await
                .unwrap(),
            want
        );

        let compressed = request(&[("grpc-encoding", "gzip")], good.clone())
            .await
            .unwrap_err();
        assert_eq!(compressed.code(), tonic::Code::Unimplemented);
        assert_eq!(
            compressed.metadata().get("grpc-accept-encoding").unwrap(),
            "identity"
        );
        assert_eq!(
            request(&[], Vec::new()).await.unwrap_err().code(),
            tonic::Code::Internal
        );
        assert_eq!(
            request(&[], good[..3].to_vec()).await.unwrap_err().code(),
            tonic::Code::Internal
        );
        let mut flagged = good.clone();
        flagged[0] = 1;
        assert_eq!(
            request(&[], flagged).await.unwrap_err().code(),
            tonic::Code::Internal
        );
        let mut two = good.clone();
        two.extend_from_slice(&good);
        assert_eq!(
            request(&[], two).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            request(&[], good[..good.len() - 1].to_vec())
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Internal
        );
        let huge = one_message(&vec![0u8; MAX_REQUEST + 1]);
        assert_eq!(
            request(&[], huge.clone()).await.unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        // Refused from the declared length alone.
        assert_eq!(
            request(&[], huge[..PREFIX + 10].to_vec())
                .await
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            request(&[], one_message(&[0xff, 0xff]))
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Internal
        );
    }

    fn byte_frames(
        bytes: impl Iterator<Item = u8> + Send + 'static,
    ) -> impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> {
        http_body_util::StreamBody::new(tokio_stream::iter(
            bytes.map(|b| Ok(Frame::data(Bytes::copy_from_slice(&[b])))),
        ))
    }

    #[tokio::test]
    async fn a_request_in_one_byte_frames_is_read_and_an_endless_one_refused_at_the_limit() {
        let want = FetchWeightsRequest {
            grant_id: "g".repeat(300),
            ..Default::default()
        };
        let framed = one_message(&want.encode_to_vec());
        let headers = http::HeaderMap::new();
        let got = read_request(&headers, byte_frames(framed.into_iter())).await;
        assert_eq!(got.unwrap(), want);
        // A prefix declaring the limit, then bytes without end: refused once past the limit
        // (an unbounded reader would never return).
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(MAX_REQUEST as u32).to_be_bytes());
        let endless = prefix.into_iter().chain(std::iter::repeat(0x0a));
        let err = read_request(&headers, byte_frames(endless))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }
}
