//! FetchWeights responses read straight out of the HTTP/2 DATA frames.
//!
//! The generated client copies every response message from the HTTP/2 frames into a buffer of
//! its own before decoding it, and copies again whenever that buffer has to grow while a
//! decoded chunk still points into it: two passes over every byte of a model, on the node's
//! CPU. A chunk message of a few MiB usually arrives inside one DATA frame, so here the message
//! is cut out of the frame without a copy and decrypted from there; only a message that spans
//! frames is gathered into one buffer (which the node then decrypts in place).
//!
//! The request and the framing are those of the generated client, per the gRPC over HTTP/2
//! protocol (grpc/grpc doc/PROTOCOL-HTTP2.md): `POST /weightvault.v1.NodeService/FetchWeights`,
//! `content-type: application/grpc`, `te: trailers`, each message prefixed by a compressed flag
//! byte and a 4-byte big-endian length, the status in the trailers (or in the headers of a
//! trailers-only response). The messages are decoded by the generated `WeightChunk` type, whose
//! `ciphertext` field is `Bytes` (build.rs), so decoding slices instead of copying.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::proto::v1::{FetchWeightsRequest, WeightChunk};
/// The gRPC message prefix, the same on both sides.
use crate::server::wire::PREFIX;

/// The method's HTTP/2 path; the channel fills in scheme and authority.
const PATH: &str = "/weightvault.v1.NodeService/FetchWeights";

/// The chunks of one FetchWeights response, in the order the vault sent them.
pub(crate) struct ChunkStream {
    body: Body,
    /// Frame data received and not yet consumed, in order. Outside an assembly it holds at
    /// most a message prefix's worth of small frames plus the rest of one frame.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// A message that spans frames, gathered as its frames arrive: each frame is copied and
    /// released at once, so a vault sending tiny frames cannot make the node hold more than
    /// one message and one frame.
    assembling: Option<Assembly>,
    max_message: usize,
    /// The response's final status arrived (and was OK), or the body ended.
    ended: bool,
}

struct Assembly {
    buf: BytesMut,
    len: usize,
}

/// Starts a FetchWeights stream on `channel`. Messages longer than `max_message` are refused,
/// as the generated client's decoding limit does.
pub(crate) async fn fetch_weights(
    channel: &mut Channel,
    request: FetchWeightsRequest,
    max_message: usize,
) -> Result<ChunkStream, Status> {
    let message = request.encode_to_vec();
    let len = u32::try_from(message.len())
        .map_err(|_| Status::invalid_argument("FetchWeights request too large"))?;
    let mut framed = BytesMut::with_capacity(PREFIX + message.len());
    framed.put_u8(0);
    framed.put_u32(len);
    framed.put_slice(&message);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(PATH)
        .version(http::Version::HTTP_2)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(Full::new(framed.freeze())))
        .map_err(|e| Status::internal(format!("building the FetchWeights request: {e}")))?;
    std::future::poll_fn(|cx| GrpcService::poll_ready(channel, cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = GrpcService::call(channel, request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    let mut stream = ChunkStream {
        body,
        pending: VecDeque::new(),
        pending_len: 0,
        assembling: None,
        max_message,
        ended: false,
    };
    // A refusal comes as a trailers-only response: the status is in the headers.
    if let Some(status) = status_in(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
        stream.ended = true;
        return Ok(stream);
    }
    // Only something between node and vault (a proxy) answers with another HTTP status; unlike
    // the generated client, which would read on and fail on the body, the HTTP status decides.
    if parts.status != http::StatusCode::OK {
        return Err(status_of_http(parts.status));
    }
    // The request offers no compression, so the vault must not use any. Final, as in the
    // generated client (UNIMPLEMENTED, naming the one encoding accepted).
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "the vault compressed its response ({encoding:?}), which was not offered"
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    Ok(stream)
}

impl ChunkStream {
    /// The next chunk; `None` once the vault ended the stream with status OK. A stream that
    /// ends without a final status, or inside a message, is an error, as in the generated
    /// client.
    pub(crate) async fn message(&mut self) -> Result<Option<WeightChunk>, Status> {
        loop {
            if let Some(message) = self.take_message()? {
                return WeightChunk::decode(message)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("malformed chunk message: {e}")));
            }
            if self.ended {
                return if self.pending_len == 0 && self.assembling.is_none() {
                    Ok(None)
                } else {
                    Err(Status::internal("the stream ended inside a message"))
                };
            }
            match self.body.frame().await {
                // Errors of the body are already statuses (resets, broken connections).
                Some(Err(status)) => return Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.received(data),
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let status = status_in(&trailers).unwrap_or_else(|| {
                            Status::unknown("the response's trailers carry no grpc-status")
                        });
                        if status.code() != Code::Ok {
                            return Err(status);
                        }
                        self.ended = true;
                    }
                },
                // A body that ends without trailers was cut off (a proxy or a reset stream).
                None => {
                    return Err(Status::unknown(
                        "the stream ended without a final status (cut off in transit)",
                    ));
                }
            }
        }
    }

    /// Takes in one DATA frame's payload.
    fn received(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.pending_len += data.len();
            self.pending.push_back(data);
        }
    }

    /// Cuts the next whole message out of the received data, without copying when it lies
    /// within one frame; a message that spans frames is gathered into one buffer.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if let Some(mut assembly) = self.assembling.take() {
            let missing = assembly.len - assembly.buf.len();
            let take = missing.min(self.pending_len);
            self.consume(take, |piece| assembly.buf.extend_from_slice(piece));
            if take == missing {
                return Ok(Some(assembly.buf.freeze()));
            }
            self.assembling = Some(assembly);
            return Ok(None);
        }
        if self.pending_len < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut filled = 0;
        for data in &self.pending {
            let n = (PREFIX - filled).min(data.len());
            prefix[filled..filled + n].copy_from_slice(&data[..n]);
            filled += n;
            if filled == PREFIX {
                break;
            }
        }
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "the vault sent a compressed message, which was not offered",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "invalid compressed flag {flag} in a message prefix"
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "chunk message of {len} bytes is above the limit of {} bytes",
                self.max_message
            )));
        }
        self.consume(PREFIX, |_| {});
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        if let Some(front) = self.pending.front_mut()
            && front.len() >= len
        {
            let message = front.split_to(len);
            if front.is_empty() {
                self.pending.pop_front();
            }
            self.pending_len -= len;
            return Ok(Some(message));
        }
        self.assembling = Some(Assembly {
            buf: BytesMut::with_capacity(len),
            len,
        });
        self.take_message()
    }

    /// Removes `n` bytes (all present) from the front, handing each piece to `each`.
    fn consume(&mut self, mut n: usize, mut each: impl FnMut(&[u8])) {
        self.pending_len -= n;
        while n > 0 {
            let front = self.pending.front_mut().expect("pending holds n bytes");
            let take = n.min(front.len());
            each(&front[..take]);
            front.advance(take);
            n -= take;
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
    }
}

/// The gRPC status in `headers`, if any. The generated client's parser panics on a
/// `grpc-status-details-bin` that is not base64; such details are dropped here instead, decoded
/// exactly as that parser decodes them (standard alphabet, padding optional).
fn status_in(headers: &http::HeaderMap) -> Option<Status> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const DETAILS: &str = "grpc-status-details-bin";
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    match headers.get(DETAILS) {
        Some(details) if LENIENT.decode(details.as_bytes()).is_err() => {
            let mut headers = headers.clone();
            headers.remove(DETAILS);
            Status::from_header_map(&headers)
        }
        _ => Status::from_header_map(headers),
    }
}

/// The status of a response that carries no grpc-status, from its HTTP status (grpc/grpc
/// doc/http-grpc-status-mapping.md).
fn status_of_http(status: http::StatusCode) -> Status {
    let code = match status {
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!("HTTP status {} without a gRPC status", status.as_u16()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream over already-received frames (no body left to read).
    fn stream_of(frames: Vec<Bytes>) -> ChunkStream {
        ChunkStream {
            body: Body::empty(),
            pending_len: frames.iter().map(Bytes::len).sum(),
            pending: frames.into(),
            assembling: None,
            max_message: 1 << 20,
            ended: true,
        }
    }

    fn framed(chunk: &WeightChunk) -> Vec<u8> {
        let message = chunk.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    fn chunk(index: u64, len: usize) -> WeightChunk {
        WeightChunk {
            index,
            ciphertext: Bytes::from(
                (0..len)
                    .map(|i| (i * 7 + index as usize) as u8)
                    .collect::<Vec<u8>>(),
            ),
        }
    }

    async fn all(mut s: ChunkStream) -> Result<Vec<WeightChunk>, Status> {
        let mut out = Vec::new();
        while let Some(c) = s.message().await? {
            out.push(c);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn messages_come_out_whole_wherever_the_frames_are_cut() {
        let want = vec![chunk(0, 1000), chunk(1, 0), chunk(2, 70_000), chunk(3, 1)];
        let wire: Vec<u8> = want.iter().flat_map(framed).collect();
        // One frame, every cut into two frames, and frames of a few bytes each.
        let mut cuts: Vec<Vec<usize>> = vec![vec![]];
        cuts.extend((1..wire.len()).step_by(997).map(|c| vec![c]));
        cuts.extend([1, 2, 3, 4, 5, 6].map(|c| vec![c]));
        cuts.push((1..wire.len()).step_by(3).collect());
        for cut in cuts {
            let mut frames = Vec::new();
            let mut at = 0;
            for &c in cut.iter().chain([wire.len()].iter()) {
                frames.push(Bytes::copy_from_slice(&wire[at..c]));
                at = c;
            }
            let got = all(stream_of(frames)).await.unwrap();
            assert_eq!(got, want, "cut at {cut:?}");
        }
    }

    #[tokio::test]
    async fn a_message_within_one_frame_is_not_copied() {
        let wire = Bytes::from(framed(&chunk(5, 4096)));
        let mut s = stream_of(vec![wire.clone()]);
        let got = s.message().await.unwrap().unwrap();
        // The ciphertext points into the received frame.
        let frame = wire.as_ptr_range();
        assert!(frame.contains(&got.ciphertext.as_ptr()));
        assert_eq!(got.ciphertext.len(), 4096);
    }

    #[tokio::test]
    async fn bad_prefixes_and_truncation_are_errors() {
        let good = framed(&chunk(1, 10));
        let mut compressed = good.clone();
        compressed[0] = 1;
        let mut bad_flag = good.clone();
        bad_flag[0] = 9;
        let mut too_long = good.clone();
        too_long[1..5].copy_from_slice(&(2u32 << 20).to_be_bytes());
        let truncated = good[..good.len() - 1].to_vec();
        let garbage = {
            let mut g = vec![0u8, 0, 0, 0, 3];
            g.extend_from_slice(&[0xff, 0xff, 0xff]);
            g
        };
        for (name, wire, code) in [
            ("compressed", compressed, Code::Internal),
            ("flag", bad_flag, Code::Internal),
            ("too long", too_long, Code::OutOfRange),
            ("truncated", truncated, Code::Internal),
            ("not protobuf", garbage, Code::Internal),
        ] {
            let err = all(stream_of(vec![Bytes::from(wire)])).await.unwrap_err();
            assert_eq!(err.code(), code, "{name}: {err:?}");
        }
    }

    #[tokio::test]
    async fn tiny_frames_are_gathered_as_they_arrive() {
        // One byte per frame: what is held besides the message being gathered stays small.
        let want = chunk(4, 50_000);
        let wire = framed(&want);
        let mut s = stream_of(Vec::new());
        let mut got = None;
        for byte in wire {
            s.received(Bytes::copy_from_slice(&[byte]));
            if let Some(m) = s.take_message().unwrap() {
                got = Some(m);
            }
            assert!(s.pending.len() <= PREFIX, "{} frames held", s.pending.len());
        }
        assert_eq!(WeightChunk::decode(got.unwrap()).unwrap(), want);
    }

    /// A stream whose body yields `frames`, then ends.
    fn stream_over(frames: Vec<Result<http_body::Frame<Bytes>, Status>>) -> ChunkStream {
        ChunkStream {
            body: Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))),
            pending: VecDeque::new(),
            pending_len: 0,
            assembling: None,
            max_message: 1 << 20,
            ended: false,
        }
    }

    fn trailers(pairs: &[(&'static str, &'static str)]) -> http_body::Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        http_body::Frame::trailers(map)
    }

    #[tokio::test]
    async fn the_final_status_comes_from_the_trailers() {
        let data = || Ok(http_body::Frame::data(Bytes::from(framed(&chunk(0, 10)))));
        // OK: the chunks, then the end.
        let got = all(stream_over(vec![
            data(),
            Ok(trailers(&[("grpc-status", "0")])),
        ]))
        .await
        .unwrap();
        assert_eq!(got, vec![chunk(0, 10)]);
        // A refusal after a chunk keeps its code, message and metadata (the vault's request id).
        let mut s = stream_over(vec![
            data(),
            Ok(trailers(&[
                ("grpc-status", "7"),
                ("grpc-message", "grant%20revoked"),
                ("x-request-id", "r-1"),
            ])),
        ]);
        assert!(s.message().await.unwrap().is_some());
        let err = s.message().await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), "grant revoked");
        assert_eq!(err.metadata().get("x-request-id").unwrap(), "r-1");
        // Cut off: no trailers at all, or trailers without a status.
        for frames in [vec![data()], vec![data(), Ok(trailers(&[("x", "y")]))]] {
            let err = all(stream_over(frames)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unknown, "{err:?}");
            assert!(err.metadata().get("x-request-id").is_none());
        }
        // A transport error is passed on as it is.
        let err = all(stream_over(vec![data(), Err(Status::unavailable("reset"))]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        // A status ending the stream inside a message.
        let mut half = framed(&chunk(1, 100));
        half.truncate(50);
        let err = all(stream_over(vec![
            Ok(http_body::Frame::data(Bytes::from(half))),
            Ok(trailers(&[("grpc-status", "0")])),
        ]))
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }

    #[test]
    fn status_details_that_are_not_base64_are_dropped_not_fatal() {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", http::HeaderValue::from_static("5"));
        map.insert(
            "grpc-status-details-bin",
            http::HeaderValue::from_static("not base64!"),
        );
        let status = status_in(&map).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.details().is_empty());
        // Valid details, padded or not, are kept.
        for details in ["AQI=", "AQI"] {
            map.insert(
                "grpc-status-details-bin",
                http::HeaderValue::from_static(details),
            );
            assert_eq!(status_in(&map).unwrap().details(), &[1u8, 2][..]);
        }
    }

    #[test]
    fn http_statuses_without_grpc_status_map_as_grpc_says() {
        assert_eq!(
            status_of_http(http::StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_of_http(http::StatusCode::NOT_FOUND).code(),
            Code::Unimplemented
        );
        assert_eq!(
            status_of_http(http::StatusCode::IM_A_TEAPOT).code(),
            Code::Unknown
        );
    }
}
