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

/// The method's HTTP/2 path; the channel fills in scheme and authority.
const PATH: &str = "/weightvault.v1.NodeService/FetchWeights";
/// The gRPC message prefix: compressed flag (1 byte) and length (4 bytes, big-endian).
const PREFIX: usize = 5;

/// The chunks of one FetchWeights response, in the order the vault sent them.
pub(crate) struct ChunkStream {
    body: Body,
    /// Frame data received and not yet consumed, in order.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    max_message: usize,
    /// The response's final status arrived (and was OK), or the body ended.
    ended: bool,
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
        max_message,
        ended: false,
    };
    // A refusal comes as a trailers-only response: the status is in the headers.
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
        stream.ended = true;
        return Ok(stream);
    }
    if parts.status != http::StatusCode::OK {
        return Err(status_of_http(parts.status));
    }
    // The request offers no compression, so the vault must not use any.
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::internal(format!(
            "the vault compressed its response ({encoding:?}), which was not offered"
        )));
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
                return if self.pending_len == 0 {
                    Ok(None)
                } else {
                    Err(Status::internal("the stream ended inside a message"))
                };
            }
            match self.body.frame().await {
                // Errors of the body are already statuses (resets, broken connections).
                Some(Err(status)) => return Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            self.pending_len += data.len();
                            self.pending.push_back(data);
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let status = Status::from_header_map(&trailers).unwrap_or_else(|| {
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

    /// Cuts the next whole message out of the received data, without copying when it lies
    /// within one frame.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
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
        if self.pending_len < PREFIX + len {
            return Ok(None);
        }
        self.consume(PREFIX, |_| {});
        match self.pending.front_mut() {
            Some(front) if front.len() >= len => {
                let message = front.split_to(len);
                if front.is_empty() {
                    self.pending.pop_front();
                }
                self.pending_len -= len;
                Ok(Some(message))
            }
            _ => {
                let mut message = BytesMut::with_capacity(len);
                self.consume(len, |piece| message.extend_from_slice(piece));
                Ok(Some(message.freeze()))
            }
        }
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
